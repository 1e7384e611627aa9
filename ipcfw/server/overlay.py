"""Overlays: session middleware over a server (seed 000).

An overlay is initialised with the server it overlays (or with another overlay: they stack). It
sees each new session first and either hands it off at once, or manages it, briefly inline or
on a thread of its own for a long task, and then hands it off. While it manages a session, the
client's requests go to the overlay's session; after the hand-off they go to the overlaid
layer's session, in order, none lost. Closing the session (or the client dying) while the
overlay manages it asks the overlay to stop::

    class Audit(COverlay):
        def NewSessionL(self, version, message):
            log.info("session from pid %d", message.Client().pid)
            return None                      # hand off at once

    ipcfw.serve(Audit(KvServer()))           # or: ipcfw serve servers.kv:KvServer --overlay ...

An overlay may own error codes outside Symbian's set (`error_strings`); `RSession.ErrorString`
asks the overlays first, then the server, then `ipcfw.errors`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, ClassVar, Optional, Union

from .host import CServer, CSession, RMessage
from ..version import TVersion

if TYPE_CHECKING:
    from .host import _LayeredSession

__all__ = ["COverlay", "COverlaySession", "layers_of"]


class COverlay:
    """Session middleware over `overlaid` (a `CServer`, or another `COverlay`).

    Attributes:
        error_strings: the codes this overlay owns, and their descriptions.
    """

    error_strings: ClassVar[dict[int, str]] = {}

    def __init__(self, overlaid: Union[CServer, "COverlay"]) -> None:
        if not isinstance(overlaid, (CServer, COverlay)):
            raise TypeError(
                f"an overlay overlays a CServer or a COverlay, not {type(overlaid).__name__}"
            )
        self.overlaid = overlaid

    def NewSessionL(self, version: TVersion, message: RMessage) -> Optional["COverlaySession"]:
        """Decide how to treat a new session: return None to hand it off at once, or a
        `COverlaySession` to manage it until it calls `HandOff`. Raising rejects the connect."""
        return None

    def ErrorString(self, code: int) -> Optional[str]:
        """The description of `code` if this overlay owns it, else None."""
        return self.error_strings.get(code)


class COverlaySession(CSession):
    """An overlay's management of one session, until `HandOff()`.

    Its ``ServiceL`` gets the client's requests while it manages the session. For a long task,
    start a thread in ``CreateL`` and watch `stopping` (set when the client closes the session
    or dies), then call `HandOff()` from that thread when done.
    """

    _layered: "_LayeredSession"

    def __init__(self) -> None:
        self.stopping = threading.Event()

    def HandOff(self) -> None:
        """Give the session to the overlaid layer. From any thread; once.

        Called from ``ServiceL`` (the host's loop), it takes effect before the next request is
        delivered; from another thread, as soon as the loop gets to it. If the overlaid layer
        refuses the session (its ``NewSessionL`` or ``CreateL`` raises), every later request
        of the client fails with that error.
        """
        self._layered.hand_off_from(self)

    def Stop(self) -> None:
        """The session is closing while this overlay manages it: stop promptly. The default
        sets `stopping`; a thread doing a long task should watch it and end."""
        self.stopping.set()

    def Overlay(self) -> COverlay:
        """The overlay managing this session."""
        return self._server  # type: ignore[return-value]


def layers_of(top: Union[CServer, COverlay]) -> tuple[list[COverlay], CServer]:
    """(overlays from the outermost in, the server they overlay) for a stack's top object."""
    overlays: list[COverlay] = []
    while isinstance(top, COverlay):
        overlays.append(top)
        top = top.overlaid
    if not isinstance(top, CServer):
        raise TypeError(
            f"the bottom of an overlay stack must be a CServer, not {type(top).__name__}"
        )
    return overlays, top
