"""The server side: the plugin API (`CServer`, `CSession`, `RMessage`, `CObjectIx`, `COverlay`)
and the host that runs a plugin in its process (`ServerHost`, `serve`).

Modules: `plugin` (CServer, CSession), `message` (RMessage, ClientInfo, ServerPanic), `objectix`
(CObjectIx), `overlay` (COverlay, COverlaySession and the layering), `state` (the pure rules:
sessions, messages in service, cancel, termination), `direct` (the pure rules of the direct
path), `policy` (CPolicyServer: a security policy checked before ServiceL), `host` (the loop around
the state, and the direct connections).
"""

from .host import ServerHost, serve
from .message import ClientInfo, RMessage, ServerPanic
from .objectix import CObjectIx
from .overlay import COverlay, COverlaySession
from .plugin import CServer, CSession
from .policy import (
    ALWAYS_PASS,
    CUSTOM_CHECK,
    NOT_SUPPORTED,
    CPolicyServer,
    CustomResult,
    EFailClient,
    EPanicClient,
    EPassAndLog,
    TPolicy,
    TPolicyElement,
)

__all__ = [
    "CServer", "CSession", "RMessage", "ClientInfo", "ServerPanic", "CObjectIx", "COverlay",
    "COverlaySession", "ServerHost", "serve", "CPolicyServer", "TPolicy", "TPolicyElement",
    "CustomResult", "ALWAYS_PASS", "NOT_SUPPORTED", "CUSTOM_CHECK", "EFailClient",
    "EPanicClient", "EPassAndLog",
]
