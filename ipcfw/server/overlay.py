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

The layering lives here too: `Layers` (a server and its overlays: which layer opens a session,
whose ``ErrorString`` answers) and `LayeredSession` (a session of an overlaid server, which
sends each request to the layer managing it now). The server's state uses them through the
small interface it declares (`ipcfw.server.state.Stack`); the host gives them its loop
(`LoopAccess`) so that a hand-off from another thread happens on the loop thread.
"""

from __future__ import annotations

import logging
import threading
from typing import ClassVar, Protocol, cast
from collections.abc import Awaitable, Callable

from .. import errors
from ..version import TVersion
from .message import ClientInfo, MessageKind, RMessage, route_to, stand_in_message
from .plugin import CServer, CSession, close_subsessions, code_of, service_failed, start_session

log = logging.getLogger("ipcfw.server")

# What plugin authors use. `Layers`, `LayeredSession` and `LoopAccess` are the host's and the
# server state's side of the layering, not part of the plugin API.
__all__ = ["COverlay", "COverlaySession", "layers_of"]


class COverlay:
    """Session middleware over `overlaid` (a `CServer`, or another `COverlay`).

    Attributes:
        error_strings: the codes this overlay owns, and their descriptions.
    """

    error_strings: ClassVar[dict[int, str]] = {}

    def __init__(self, overlaid: CServer | COverlay) -> None:
        if not isinstance(overlaid, (CServer, COverlay)):
            raise TypeError(
                f"an overlay overlays a CServer or a COverlay, not {type(overlaid).__name__}"
            )
        self.overlaid = overlaid

    def NewSessionL(self, version: TVersion, message: RMessage) -> COverlaySession | None:
        """Decide how to treat a new session: return None to hand it off at once, or a
        `COverlaySession` to manage it until it calls `HandOff`. Raising rejects the connect."""
        return None

    def ErrorString(self, code: int) -> str | None:
        """The description of `code` if this overlay owns it, else None."""
        return self.error_strings.get(code)


# Guards COverlaySession's binding to its LayeredSession against a HandOff from another thread.
_binding = threading.Lock()


class COverlaySession(CSession):
    """An overlay's management of one session, until `HandOff()`.

    Its ``ServiceL`` gets the client's requests while it manages the session. For a long task,
    start a thread in ``CreateL`` and watch `stopping` (set when the client closes the session
    or dies), then call `HandOff()` from that thread when done.
    """

    _layered: LayeredSession | None = None  # set once CreateL has returned
    _early_hand_off = False  # HandOff came before that (from CreateL, or a thread it started)

    def __init__(self) -> None:
        self.stopping = threading.Event()

    def HandOff(self) -> None:
        """Give the session to the overlaid layer. From any thread; once.

        Called from ``ServiceL`` (the host's loop), it takes effect before the next request is
        delivered; from another thread, as soon as the loop gets to it. Called during
        ``CreateL`` (or by a thread it started, before ``CreateL`` returned), it takes effect
        once ``CreateL`` has returned, before the first request. If the overlaid layer
        refuses the session (its ``NewSessionL`` or ``CreateL`` raises), every later request
        of the client fails with that error.
        """
        with _binding:
            layered = self._layered
            if layered is None:
                self._early_hand_off = True
                return
        layered.hand_off_from(self)

    def bind(self, layered: LayeredSession) -> None:
        """The framework's: `layered` now routes this session's requests (CreateL returned);
        a HandOff that came earlier takes effect now."""
        with _binding:
            self._layered = layered
            early = self._early_hand_off
        if early:
            layered.hand_off_from(self)

    def Stop(self) -> None:
        """The session is closing while this overlay manages it: stop promptly. The default
        sets `stopping`; a thread doing a long task should watch it and end."""
        self.stopping.set()

    def Overlay(self) -> COverlay:
        """The overlay managing this session."""
        return cast(COverlay, self.Server())


def layers_of(top: CServer | COverlay) -> tuple[list[COverlay], CServer]:
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


class LoopAccess(Protocol):
    """What the layering needs of the host's loop: hand-offs happen on the loop thread."""

    def on_loop_thread(self) -> bool:
        """True when called on the loop thread (where ServiceL runs)."""

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn()` on the loop thread, soon (from any thread)."""


class Layers:
    """A server and the overlays over it, from the outermost in: which layer opens a new
    session, and which one describes an error code."""

    def __init__(self, top: CServer | COverlay, loop: LoopAccess) -> None:
        self.overlays, self.server = layers_of(top)
        self.loop = loop

    def open_session(self, version: TVersion, connect: RMessage, handle: int,
                     client: ClientInfo | None) -> CSession:
        """The session for a new client, ``CreateL`` done: the server's own, or a
        `LayeredSession` when there are overlays. Raises what the layers' ``NewSessionL`` or
        ``CreateL`` raised."""
        if not self.overlays:
            return self.open_layer(0, version, connect, handle)[1]
        session = LayeredSession(self, handle, version, client)
        session.start(connect)
        return session

    def open_layer(self, start: int, version: TVersion, message: RMessage,
                   handle: int) -> tuple[int, CSession]:
        """The session of the first layer from `start` (overlays outermost first, then the
        server) that takes the session: (its index, its CSession, CreateL done)."""
        for index, layer in enumerate(self.overlays[start:], start):
            session = layer.NewSessionL(version, message)
            if session is not None:
                return index, start_session(layer, session, handle)
        # (an overlay returning None hands the session off at once)
        return len(self.overlays), start_session(
            self.server, self.server.NewSessionL(version, message), handle
        )

    @staticmethod
    def reaches_server(session: CSession) -> bool:
        """Whether a request for `session` goes to the server's own session, not an overlay's
        (a server's policy, ``CPolicyServer``, applies to those only)."""
        return not isinstance(session, LayeredSession) or session.at_server()

    def error_string(self, code: int) -> str | None:
        """``RSession.ErrorString``'s answer: the overlays' (outermost first), then the
        server's; None if no layer owns `code`."""
        layers: list[COverlay | CServer] = [*self.overlays, self.server]
        for layer in layers:
            text = layer.ErrorString(code)
            if text:
                return text
        return None


class LayeredSession(CSession):
    """A session of a server with overlays: requests go to the layer managing it now.

    `current` is the managing overlay's `COverlaySession` until it hands off, then the next
    layer's session, down to the server's. Hand-offs happen on the loop thread, between two
    requests, so none is lost or reordered: one asked for during ``ServiceL`` takes effect
    right after it, before the next request.
    """

    def __init__(self, layers: Layers, handle: int, version: TVersion,
                 client: ClientInfo | None) -> None:
        self.layers = layers
        self.handle = handle
        self._version = version
        self._client = client
        self.index = -1
        self.current: CSession | None = None
        self.failed: int | None = None  # the code the overlaid layer refused the session with
        self._servicing = False
        self._handoff_pending = False

    def start(self, connect: RMessage) -> None:
        """Open the session on the first layer that takes it."""
        self._enter(*self.layers.open_layer(0, self._version, connect, self.handle))

    def _enter(self, index: int, session: CSession) -> None:
        self.index, self.current = index, session
        if isinstance(session, COverlaySession):
            session.bind(self)

    def at_server(self) -> bool:
        """True once the server (not an overlay) serves the session."""
        return self.current is not None and self.index == len(self.layers.overlays)

    def hand_off_from(self, session: CSession) -> None:
        """`session` (an overlay's) hands the session to the next layer (`HandOff`)."""
        if session is not self.current:
            return  # a second HandOff, or one from a layer already left: nothing to do
        if not self.layers.loop.on_loop_thread():
            self.layers.loop.call_soon(lambda: self.hand_off_from(session))
        elif self._servicing:
            self._handoff_pending = True  # right after this request, before the next one
        else:
            self._hand_off()

    def _hand_off(self) -> None:
        self._handoff_pending = False
        if self.current is not None:
            close_subsessions(self.current)  # the overlay's own subsessions end with its part
        connect = stand_in_message(MessageKind.CONNECT, self._client)
        try:
            self._enter(
                *self.layers.open_layer(self.index + 1, self._version, connect, self.handle)
            )
        except Exception as exc:
            self.failed = code_of(exc)
            self.current = None
            log.info("the layer under %r refused the session: %s",
                     self.layers.overlays[self.index], exc,
                     exc_info=not isinstance(exc, errors.IpcError))

    def ServiceL(self, message: RMessage) -> Awaitable[None] | None:
        current = self.current
        if self.failed is not None or current is None:
            raise errors.IpcError(
                self.failed if self.failed is not None else errors.KErrBadHandle,
                "the overlaid server refused this session",
            )
        route_to(message, current)
        self._servicing = True
        try:
            # (an async ServiceL's coroutine goes back to the server's state, which runs it)
            return current.ServiceL(message)
        except Exception as exc:
            service_failed(current, message, exc)
            return None
        finally:
            self._servicing = False
            if self._handoff_pending:
                self._hand_off()

    def Cancelled(self, message: RMessage) -> None:
        if self.current is not None:
            self.current.Cancelled(message)

    def Disconnect(self, message: RMessage) -> None:
        current = self.current
        if current is None:
            message.Complete(errors.KErrNone)
            return
        if isinstance(current, COverlaySession):
            current.Stop()  # an overlay still manages it: ask it to stop
        try:
            current.Disconnect(message)
        finally:
            close_subsessions(current)
            self.current = None  # a HandOff that comes after this is ignored
