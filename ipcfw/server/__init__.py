"""The server side: the plugin API (`CServer`, `CSession`, `RMessage`, `CObjectIx`, `COverlay`)
and the host that runs a plugin in its process (`ServerHost`, `serve`)."""

from .host import ClientInfo, CServer, CSession, RMessage, ServerHost, ServerPanic, serve
from .objectix import CObjectIx
from .overlay import COverlay, COverlaySession

__all__ = [
    "CServer", "CSession", "RMessage", "ClientInfo", "ServerPanic", "CObjectIx", "COverlay",
    "COverlaySession", "ServerHost", "serve",
]
