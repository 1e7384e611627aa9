"""The server's tables and every rule about its sessions and messages. No I/O.

Theory of operation
-------------------
`ServerState` is one registration of a server with one kernel. The host (`ipcfw.server.host`)
decodes what the kernel sends and feeds it to `receive()`; the state keeps the tables, calls the
plugin's code (``AcceptL``, ``NewSessionL``/``CreateL`` through the `Stack`, ``ServiceL``,
``Cancelled``, ``Disconnect``, ``TerminateIndication``), and hands every frame to send to the
`emit` function the host gave it. `receive()` returns an `Outcome` when the host must act
(stop: the registration is over). Nothing here touches a socket, a clock, a thread or the OS,
so the rules are tested by feeding messages and reading frames
(tests/server/test_server_state.py). When the kernel goes (dies, or stops serving the host),
the host ends this state and makes a new one for the next kernel.

Rules this module keeps:

1. A connect (`NewSession`) runs ``AcceptL``, then the layers' ``NewSessionL`` and ``CreateL``;
   anything raised refuses it with its code and leaves no session. The handle of a refused
   connect is remembered (the last 256), because the client may have sent its first request
   with the connect: that request is answered ``KErrBadHandle`` without a warning.
2. A request (`Deliver`) goes to its session's ``ServiceL`` and stays "in service" (findable by
   a Cancel) until it completes. ``ServiceL`` raising completes it through ``ServiceError``.
   A request for a session this registration does not know is answered ``KErrBadHandle``.
3. A message is completed exactly once (`RMessage` enforces it: USER 70 / KERN-EXEC 44). A
   cancel (`Cancelled`) of a message still in service ends it here, and the session's
   ``Cancelled`` is told; a cancel that lost the race to a completion changes nothing.
4. `Disconnect` ends a session: its requests in service are forgotten (the kernel has answered
   them), its ``Disconnect`` runs, and its subsessions are closed whatever that did.
5. Generations: a state lives as long as its registration. Once `end()` has run, nothing is
   sent, ever: a message of a dead kernel completed later (held by the plugin, or the
   Disconnects `end()` itself gives) must not complete a request of the next kernel, which
   numbers its messages anew.
6. Termination: the kernel's `Terminating` is indicated to the server once
   (``TerminateIndication``), then the server deregisters itself. A deregistration is asked for
   once, whoever asks (the indication, or ``ServerHost.Deregister``); the kernel's `Completed`
   for it ends the registration (`Outcome.DEREGISTERED`). The kernel cannot see requests in
   service on direct connections: with any live, `Deregister` is sent once they have ended
   (`DirectRules.close`), and meanwhile the server refuses new work itself as the kernel would
   (a request or a connect is answered ``KErrServerTerminated``).
7. A `Dropped` notice for our socket means the kernel stopped serving us (`Outcome.DROPPED`);
   nothing after it is for us.
8. The direct path (`ipcfw.server.direct`, `self.direct`): an accepted `NewSession` with a
   ticket leaves the ticket there (before the acceptance is sent); before a `Disconnect` runs,
   the direct connections holding the session are read to their end and let it go; a
   `PeerGone` closes the client process's direct connections. An `Admit` (another thread of a
   holder) leaves its ticket there and is answered at once; a `Census` is answered with what
   is in service on the direct connections, per session.

Threads: every method runs on the host's loop thread, except `completed`, which an `RMessage`
calls from whichever thread completed it; it only reads `ended` and calls `emit`, which the
host makes safe from any thread. A message ended on another thread also takes itself out of its
session's table of messages in service (one ``dict.pop``, atomic), so that a later Cancel
finds nothing.
"""

from __future__ import annotations

import collections
import enum
import inspect
import logging
from typing import Any, Protocol
from collections.abc import Callable

from .. import errors
from ..protocol import (
    ERROR_STRING_FUNCTION,
    MAX_PAYLOAD,
    Admit,
    Cancelled,
    Census,
    CensusReply,
    Complete,
    Completed,
    Deliver,
    Deregister,
    Disconnect,
    Dropped,
    NewSession,
    PeerGone,
    PeerInfo,
    Report,
    SessionPanicked,
    Terminating,
    TerminationReason,
    Traffic,
    encode,
    pack_census,
)
from ..events import pack_events
from ..version import TVersion
from . import trace
from .coroutines import Coroutines, Spawn
from .direct import DirectIO, DirectRules
from .message import (
    ClientInfo,
    DirectMessage,
    InService,
    MessageKind,
    RMessage,
    ServerPanic,
    accept_connect,
    cancel_by_client,
    complete_forgotten,
    complete_unless_ended,
)
from .policy import CPolicyServer, PolicyGate
from .plugin import CServer, CSession, close_subsessions, code_of, service_failed, text_of

log = logging.getLogger("ipcfw.server")

__all__ = ["ServerState", "Outcome", "Stack", "DEREGISTER_REQ"]

DEREGISTER_REQ = 2  # the request id of Deregister (Register used 1)
_REFUSED_KEPT = 256  # handles of refused connects remembered, for a first request behind one


def _at_once(fn: Callable[[], None]) -> None:
    fn()


class Outcome(enum.Enum):
    """What `ServerState.receive` tells the host to do: the registration is over."""

    DEREGISTERED = "the kernel confirmed the deregistration"
    DROPPED = "the kernel stopped serving this server (it left too many frames unread)"


class Stack(Protocol):
    """What the state needs of the server and its overlays (`ipcfw.server.overlay.Layers`)."""

    @property
    def server(self) -> CServer:
        """The server at the bottom of the stack."""

    def open_session(self, version: TVersion, connect: RMessage, handle: int,
                     client: ClientInfo | None) -> CSession:
        """The session for a new client, ``CreateL`` done; raises to refuse the connect."""

    def error_string(self, code: int) -> str | None:
        """The description of `code` from the layer that owns it, if any."""

    def reaches_server(self, session: CSession) -> bool:
        """Whether a request for `session` goes to the server's own session (not an
        overlay's)."""


class ServerState:
    """One registration of a server with one kernel: its sessions, the messages in service,
    and the rules (see the module's theory of operation).

    `stack` is the server and its overlays; `emit(frame)` sends a frame to the kernel (from
    any thread); `max_frame` is the kernel's frame limit; `routing_id` is the host's socket
    identity (a `Dropped` notice names it). With `direct` (the host's sending side of its
    direct connections), the state keeps the direct path's rules in `self.direct`
    (`ipcfw.server.direct`); without it, tickets are ignored.
    """

    def __init__(self, stack: Stack, emit: Callable[[bytes], None], *, max_frame: int,
                 routing_id: bytes = b"", direct: DirectIO | None = None,
                 spawn: Spawn | None = None,
                 defer: Callable[[Callable[[], None]], None] | None = None,
                 clock: Callable[[], float] = lambda: 0.0) -> None:
        self.stack = stack
        self.max_frame = max_frame
        self._emit = emit
        # Runs a function on the loop thread, soon (the host's call_soon; without a host, at
        # once): what a message's finalizer needs done (`forgotten`).
        self._defer = defer if defer is not None else _at_once
        self._routing_id = routing_id
        self.sessions: dict[int, CSession] = {}
        self.clients: dict[int, ClientInfo] = {}
        # Per session handle, its delivered requests not yet completed (in ServiceL, or held),
        # by msg_id, so a Cancel can find them. A request leaves when it completes; the
        # session's table goes when the session is disconnected.
        self._in_service: dict[int, InService] = {}
        self._refused: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.problems: collections.Counter[str] = collections.Counter()
        self.ended = False
        self.indicated = False  # TerminateIndication was called
        self.in_indication = False  # ... and is running now
        self.deregistering = False  # a deregistration has begun (rule 6)
        self.deregister_sent = False  # ... Deregister was sent (no direct request is live)
        # Deregistering, and the kernel not told yet: the server refuses new work itself.
        self._refusing = False
        self.deregistered = False  # ... and the kernel confirmed it
        self.dropped: Dropped | None = None  # the kernel's notice, once it stopped serving us
        # what async ServiceLs are still serving (run by `spawn`: ipcfw.server.coroutines)
        self.coroutines = Coroutines(spawn)
        # A CPolicyServer's policy, checked before ServiceL (None: every request is served).
        server = stack.server
        self._gate = (PolicyGate(server, self.coroutines.start)
                      if isinstance(server, CPolicyServer) else None)
        self.direct = (DirectRules(self, direct, max_frame=max_frame, name=stack.server.name,
                                   clock=clock)
                       if direct is not None else None)
        self._trace = trace.enabled()  # (read once: the hot path tests a bool)
        self._handlers: dict[type, Callable[[Any], Outcome | None]] = {
            Deliver: self._on_deliver,
            Completed: self._on_completed,
            PeerInfo: self._on_peer_info,
            PeerGone: self._on_peer_gone,
            Cancelled: self._on_cancelled,
            NewSession: self._on_new_session,
            Disconnect: self._on_disconnect,
            Terminating: self._on_terminating,
            Dropped: self._on_dropped,
            Admit: self._on_admit,
            Census: self._on_census,
            Report: self._on_report,
        }

    # -- input -------------------------------------------------------------------------------

    def receive(self, message: object) -> Outcome | None:
        """Apply one decoded message from the kernel; returns an `Outcome` when the
        registration is over."""
        handler = self._handlers.get(type(message))
        if handler is None:
            self.report("unexpected message", f"{type(message).__name__} is not sent to servers")
            return None
        return handler(message)

    def report(self, kind: str, detail: str) -> None:
        """Count a problem with what the kernel sent (logged the first time of each kind)."""
        self.problems[kind] += 1
        if self.problems[kind] == 1:
            log.warning("server %r dropped %s: %s (further ones are counted, not logged)",
                        self.stack.server.name, kind, detail)

    def deregister(self) -> None:
        """Ask the kernel to end this registration once outstanding messages have completed
        (asked once, whoever asks; after the direct path's requests have ended: rule 6)."""
        if self.deregistering or self.ended:
            return
        self.deregistering = self._refusing = True
        if self.direct is not None:
            self.direct.close(when_idle=self._send_deregister)
        else:
            self._send_deregister()

    def _send_deregister(self) -> None:
        self.deregister_sent, self._refusing = True, False
        if not self.ended:
            self._emit(encode(Deregister(DEREGISTER_REQ)))

    def end(self) -> int:
        """The registration is over (kernel death, deregistration, dropped): every session
        ends. Each gets its ``Disconnect`` (whose completion, like that of any message of this
        registration from now on, is never sent) and loses its subsessions. Returns how many
        sessions ended."""
        self.ended = True
        self.coroutines.end()
        if self.direct is not None:
            self.direct.end()
        sessions, self.sessions = self.sessions, {}
        self.clients.clear()
        self._refused.clear()
        self._in_service.clear()
        for session in sessions.values():
            message = RMessage(self, 0, MessageKind.DISCONNECT, -2, (), session, None)
            try:
                session.Disconnect(message)
            except Exception:
                log.exception("Disconnect of a session of an ended registration raised")
            close_subsessions(session)
        return len(sessions)

    # -- output: the Completer of this registration's messages ---------------------------------

    def completed(self, message: RMessage, frame: bytes) -> None:
        """Send a completion (from any thread), unless the registration has ended."""
        if self.ended:
            # From a kernel that died: the next one numbers its messages anew, so sending this
            # would complete somebody else's request.
            log.debug("dropping the completion of %r: its registration has ended", message)
            return
        if self._trace:
            trace.completion(self.stack.server.name, message, frame)
        self._emit(frame)

    def forgotten(self, message: RMessage) -> None:
        """The plugin let go of `message` without completing it (its finalizer, any thread):
        complete it on the loop thread, soon, unless the registration has ended."""
        if not self.ended:
            self._defer(lambda: complete_forgotten(message))

    def session_panicked(self, handle: int, category: str, reason: int) -> None:
        """Tell the kernel the server panicked the client of `handle` on the direct path (it
        then ends the session as for a panic through it)."""
        if not self.ended:
            self._emit(encode(SessionPanicked(handle, category, reason)))

    # -- reading -----------------------------------------------------------------------------

    def in_service(self, handle: int) -> list[RMessage]:
        """The requests of session `handle` delivered and not yet completed, in order."""
        held = self._in_service.get(handle)
        return [] if held is None else held.values()

    def statistics(self) -> dict[str, int]:
        """Counts: sessions, requests in service, refused connects remembered."""
        return {
            "sessions": len(self.sessions),
            "in_service": sum(len(held) for held in self._in_service.values()),
            "refused": len(self._refused),
            "coroutines": len(self.coroutines),
        }

    def __repr__(self) -> str:
        stats = " ".join(f"{k}={v}" for k, v in self.statistics().items())
        flags = "ended " if self.ended else ""
        return f"<ServerState {self.stack.server.name!r} {flags}{stats}>"

    # -- the handlers --------------------------------------------------------------------------

    def _on_deliver(self, request: Deliver) -> None:
        session = self.sessions.get(request.handle)
        if session is None or self._refusing:
            self._refuse_delivery(request)
            return
        held = self._in_service[request.handle]
        message = RMessage(self, request.msg_id, MessageKind.REQUEST, request.function,
                           request.args, session, self.clients.get(request.client), held)
        self.service(session, message, request.function, held, request.msg_id)

    def service(self, session: CSession, message: RMessage, function: int,
                held: InService, key: int) -> None:
        """Serve one request (its `function`), from the kernel or a direct connection:
        ``RSession.ErrorString`` is answered here; anything else goes to ``ServiceL`` (raising:
        ``ServiceError``), and stays in `held` under `key`, findable by a cancel, until it
        ends."""
        if function == ERROR_STRING_FUNCTION:
            self._error_string(message)
            return
        held[key] = message
        if self._trace:
            trace.request(self.stack.server.name, message,
                          "direct" if isinstance(message, DirectMessage) else "kernel")
        if self._gate is not None and self.stack.reaches_server(session):
            try:
                if not self._gate.admits(session, message, self._serve):
                    return
            except Exception as exc:  # a custom check that raised, or a bad result
                service_failed(session, message, exc)
                return
        self._serve(session, message)

    def _serve(self, session: CSession, message: RMessage) -> None:
        try:
            served = session.ServiceL(message)
            if served is not None and inspect.isawaitable(served):
                self.coroutines.start(session, message, served)  # an async ServiceL
        except Exception as exc:
            service_failed(session, message, exc)

    def _refuse_delivery(self, request: Deliver) -> None:
        """A request for a session not known here (KErrBadHandle), or one that came while the
        direct path's requests drain before a deregistration (KErrServerTerminated)."""
        if request.handle in self._refused:
            del self._refused[request.handle]  # a refused connect's first request: expected
            code = errors.KErrBadHandle
        elif request.handle in self.sessions:
            code = errors.KErrServerTerminated
        else:
            self.report("request for an unknown session", f"handle 0x{request.handle:x}")
            code = errors.KErrBadHandle
        RMessage(self, request.msg_id, MessageKind.REQUEST, request.function, request.args,
                 None, self.clients.get(request.client)).Complete(code)

    def _error_string(self, message: RMessage) -> None:
        """Answer ``RSession.ErrorString``: the overlays, outermost first, then the server."""
        try:
            text = self.stack.error_string(message.Int0())
            data = (text or "").encode()[: message.GetDesMaxLength(1)]
            if data:
                message.WriteL(1, data)
            message.Complete(len(data))
        except Exception as exc:  # bad arguments, or a layer's ErrorString raising
            log.info("ErrorString request failed: %s", exc,
                     exc_info=not isinstance(exc, errors.IpcError))
            complete_unless_ended(message, code_of(exc))

    def _on_new_session(self, request: NewSession) -> None:
        client = self.clients.get(request.client)
        if self._trace:
            trace.connect(self.stack.server.name, request.handle, TVersion(*request.version),
                          client)
        message = RMessage(self, request.msg_id, MessageKind.CONNECT, -1, (), None, client)
        try:
            if self._refusing:
                raise errors.IpcError(errors.KErrServerTerminated, "the server is deregistering")
            version = TVersion(*request.version)
            if self._gate is not None:
                self._gate.admits_connect(message)
            reply = _negotiation_reply(
                self.stack.server.AcceptL(client, version, request.payload)
            )
            session = self.stack.open_session(version, message, request.handle, client)
            if message.IsNull():
                raise ServerPanic(
                    "CServer", 2, "NewSessionL or CreateL completed the connect message"
                )
        except Exception as exc:
            server = self.stack.server
            log.info("connect to %r refused: %s", server.name, exc,
                     exc_info=not isinstance(exc, errors.IpcError))
            complete_unless_ended(message, code_of(exc),
                                  text_of(exc, "connect (AcceptL, NewSessionL, CreateL)", server))
            self._refused[request.handle] = None  # its first request, if any, comes next
            if len(self._refused) > _REFUSED_KEPT:
                self._refused.popitem(last=False)
            return
        self.sessions[request.handle] = session
        self._in_service[request.handle] = InService(request.handle)
        if request.ticket and self.direct is not None:
            # before the acceptance is sent: the client's Attach may follow it at once
            self.direct.add_ticket(request.ticket, request.handle, client, request.slots)
        accept_connect(message, reply)

    def _on_disconnect(self, request: Disconnect) -> None:
        if self.direct is not None:
            # what its direct connections sent first is served first: see ipcfw.server.direct
            self.direct.session_ending(request.handle)
        session = self.sessions.pop(request.handle, None)
        # The kernel has answered what the session still held: a Cancel now finds nothing.
        self._in_service.pop(request.handle, None)
        # (its own table: held weakly, a Disconnect the plugin let go of is completed for it)
        message = RMessage(self, request.msg_id, MessageKind.DISCONNECT, -2, (), session, None,
                           InService(request.handle))
        if session is None:
            message.Complete(errors.KErrNone)
            return
        self.coroutines.session_ended(session)
        try:
            session.Disconnect(message)
        except Exception:
            log.exception("Disconnect raised; completing the disconnect anyway")
            complete_unless_ended(message, errors.KErrNone)
        finally:
            # The session's subsessions end with it, whatever an overriding Disconnect did.
            close_subsessions(session)

    def _on_cancelled(self, request: Cancelled) -> None:
        held = self._in_service.get(request.handle)
        message = None if held is None else held.get(request.msg_id)
        if message is None or not cancel_by_client(message):
            return  # completed already: the kernel dropped our completion, or will
        self.coroutines.cancel(message)
        try:
            message.Session().Cancelled(message)
        except Exception:
            log.exception("Cancelled raised")

    def _on_admit(self, admit: Admit) -> None:
        # Answered only once the ticket is kept: the kernel then gives it to the client thread.
        code = errors.KErrNotSupported
        if self.direct is not None and admit.handle in self.sessions:
            code = self.direct.admit(admit.ticket, admit.handle, self.clients.get(admit.client))
        if not self.ended:
            self._emit(encode(Complete(admit.msg_id, code, ())))

    def _on_census(self, census: Census) -> None:
        counts = self.direct.census() if self.direct is not None else []
        if not self.ended:
            self._emit(encode(CensusReply(census.req_id, pack_census(counts))))

    def _on_report(self, report: Report) -> None:
        # A monitor watches this server (or no longer): its direct traffic is reported, or not.
        if self.direct is not None:
            answer = self.direct.traffic.report(report.req_id, bool(report.on))
        elif report.on:  # (nothing to report: the kernel sees all of it)
            answer = encode(Traffic(report.req_id, 0, pack_events([])))
        else:
            answer = None
        if answer is not None and not self.ended:
            self._emit(answer)

    def traffic_frame(self) -> bytes | None:
        """What the direct connections' traffic has for the kernel (the host sends it at most
        once a loop turn), while a monitor watches; None otherwise."""
        if self.direct is None or self.ended:
            return None
        return self.direct.traffic.frame()

    def _on_peer_info(self, info: PeerInfo) -> None:
        self.clients[info.client] = ClientInfo(info.pid, info.uid, info.gid, info.exe,
                                               frozenset(info.capabilities.split()))

    def _on_peer_gone(self, notice: PeerGone) -> None:
        info = self.clients.pop(notice.client, None)  # messages already built keep theirs
        if info is not None and self.direct is not None:
            self.direct.client_gone(info.pid)

    def _on_terminating(self, notice: Terminating) -> None:
        if self.indicated:
            return
        self.indicated = True
        reason = TerminationReason(notice.reason)
        log.warning("server %r: the kernel ends its registration (%s)",
                    self.stack.server.name, reason.name)
        self.in_indication = True
        try:
            self.stack.server.TerminateIndication(reason)
        except Exception:
            log.exception("TerminateIndication raised")
        finally:
            self.in_indication = False
        # Deregister ourselves: the registration ends once the kernel says every outstanding
        # message has completed.
        self.deregister()

    def _on_completed(self, reply: Completed) -> Outcome | None:
        if reply.req_id == DEREGISTER_REQ and self.deregistering:
            self.deregistered = True
            return Outcome.DEREGISTERED
        return None

    def _on_dropped(self, notice: Dropped) -> Outcome | None:
        if notice.routing_id != self._routing_id:
            self.report("Dropped notice for another socket", notice.routing_id.hex())
            return None
        self.dropped = notice
        return Outcome.DROPPED


def _negotiation_reply(reply: object) -> bytes:
    if reply is None:
        return b""
    if not isinstance(reply, bytes):
        raise TypeError(f"AcceptL must return bytes or None, not {type(reply).__name__}")
    if len(reply) > MAX_PAYLOAD:
        raise ValueError(f"AcceptL's reply of {len(reply)} bytes exceeds {MAX_PAYLOAD}")
    return reply
