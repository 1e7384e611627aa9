"""The direct path's rules on the server side: tickets, attached sessions, slots. No I/O.

Theory of operation
-------------------
A session on the direct path is created and owned by the kernel as any other; only its
requests travel on Unix SOCK_SEQPACKET connections from each client thread that uses it
straight to this process (the host's listening socket, in the kernel's private directory).
`DirectRules` belongs to one `ServerState` (one registration) and decides what happens on
those connections; the host accepts them, reads their frames, decodes them and feeds them
here, and sends what the rules hand to its `DirectIO`.

Rules this module keeps:

1. Tickets. A `NewSession` carrying a ticket, once accepted, leaves the ticket here with the
   session's handle, the client's identity (from the kernel's PeerInfo) and its message slots.
   A refused connect leaves nothing. Every other thread of a holder gets a ticket of its own:
   the kernel's `Admit` leaves it here for an open direct session (`admit`), before the kernel
   gives it to the thread. A ticket goes when it is used, or when its session ends; a session
   keeps at most `MAX_UNUSED_TICKETS` unused (the oldest goes first).
2. Attach. ``Attach(req_id, ticket)`` attaches the ticket's session to the connection if the
   ticket is known (so: not used yet), its session is open and alive, and the connection's
   SO_PEERCRED pid and uid (read by the host at accept) are those the kernel named for the
   client. A session may be attached to many connections (one per client thread using it, in
   any holder process), and a connection to many sessions (one connection per client thread
   per server process); each connection's requests are served in its order, and its
   `ClientInfo` is that of its tickets.
   The answer is ``Completed(req_id, handle)``. Anything else: ``Completed(req_id,
   KErrPermissionDenied)``, a log line (once per kind), and the connection stays open.
3. Requests. A request for a handle not attached to its connection is answered
   ``Panicked(req_id, handle, "KERN-EXEC", 0, 0)`` and served nowhere. Otherwise it goes to the
   session's ``ServiceL`` as a kernel `Deliver` does (`DirectMessage`, the same overlays,
   ERROR_STRING_FUNCTION answered by the host); its completion goes back on the connection.
4. Slots. SYNC requests take none; ASYNC and BLIND take one of the session's until they end:
   slots 0 allows none, n allows n, -1 (the kernel's shared pool on the kernel path) allows
   `POOL_SLOTS`. Past the limit: ``Completed(req_id, KErrServerBusy)``, not served. A BLIND
   request is answered ``Completed(req_id, KErrNone)`` as it is accepted; its own completion
   is never sent.
5. Panic. A request panicked by the server answers ``Panicked(..., 1)``, and the session is dead
   on the direct path: every later request for it, on any connection, gets the same answer,
   until the kernel's Disconnect. The kernel is told (``SessionPanicked``): it ends the session
   as for a panic through it.
6. Cancel. ``Cancel(req_id)`` ends that request of the connection if it is still in service
   (it is then answered ``Completed(req_id, KErrCancel)`` and the session's ``Cancelled`` is
   told); a request already completed is left alone.
7. Close and connection end. ``Close(handle)`` detaches the handle from the connection (not
   answered); its requests still in service there are forgotten (as the kernel path forgets a
   session's requests at Disconnect: ``Cancelled`` is not told). A connection that ends
   detaches all its handles, and its requests still in service are ended as cancelled
   (``Cancelled`` is told; their completions go nowhere). The kernel's `PeerGone` for a
   client process closes every connection whose SO_PEERCRED pid is that process's.
8. Disconnect comes last. Before the kernel's Disconnect of a session runs, the connections
   attached to it are read until they have nothing more (`DirectIO.drain`): the client sends
   Close on its direct connection before it closes the session with the kernel, and a local
   SEQPACKET send is queued at the receiver before it returns, so every request it sent is
   served first. Then the session is detached from every connection and its requests in
   service there are forgotten: nothing of it is served, or told ``Cancelled``, after its
   ``Disconnect``, whether or not the client cooperated (a forked child holding the
   connection, a client that died).
9. Misbehaviour. Any other message on a connection (or, in the host, a frame that does not
   decode) is logged once per kind and the connection is closed; other connections go on.
10. Generations. Once the registration has ended (`end`), nothing is sent.
11. Deregistration. The kernel cannot see the requests in service on direct connections, so
    the server deregisters only once they have ended (`close`): from then on an Attach is
    refused and a request is answered ``Completed(req_id, KErrServerTerminated)``, as the
    kernel answers a request through it once a deregistration has begun; when no direct
    request is live (taken and neither finished, cancelled nor forgotten), `close`'s callback
    runs, once. A request forgotten by a Close or a Disconnect does not count: the kernel path
    does not wait for a closed session's requests either.

Threads: as in `ServerState`, everything runs on the loop thread except the completion of a
message, which reaches `DirectConnection.completed` on whichever thread made it; that hands it
to `DirectIO.post`, which the host makes bring it to the loop thread, where `finish` applies
the rules (a slot freed, a blind answer dropped, a panic noted) and sends it.
"""

from __future__ import annotations

import collections
import logging
import weakref
from typing import NamedTuple, Protocol
from collections.abc import Callable

from .. import errors
from ..protocol import (
    Attach,
    Cancel,
    CensusItem,
    Close,
    Completed,
    Mode,
    Panicked,
    Request,
    encode,
)
from . import trace
from .coroutines import Coroutines
from .message import ClientInfo, DirectMessage, InService, RMessage, cancel_by_client
from .plugin import CSession
from .traffic import TrafficLog

log = logging.getLogger("ipcfw.server")

__all__ = ["DirectRules", "DirectConnection", "DirectIO", "POOL_SLOTS", "MAX_UNUSED_TICKETS"]

#: The most ASYNC/BLIND requests outstanding on the direct path for a session whose slots are
#: the kernel's shared pool (-1): a bound per session, as the pool bounds the kernel path.
POOL_SLOTS = 255
#: The most tickets a session keeps unused (granted by the kernel, not yet presented): past
#: it, the oldest goes (its thread, if it ever attaches, is refused and uses the kernel path).
MAX_UNUSED_TICKETS = 256

_SYNC, _BLIND = int(Mode.SYNC), int(Mode.BLIND)


class DirectIO(Protocol):
    """What the rules need from the host: sending on a connection, and bringing a completion
    made on any thread to the loop thread."""

    def send(self, connection: DirectConnection, frame: bytes) -> None:
        """Send `frame` on `connection` (loop thread; dropped if it has closed)."""

    def post(self, connection: DirectConnection, message: DirectMessage, frame: bytes) -> None:
        """`message` of `connection` completed with `frame`, on any thread: have the loop
        thread call `DirectRules.finish` with them (or drop them once the host has stopped)."""

    def drain(self, connection: DirectConnection) -> None:
        """Read what `connection` has sent and not yet been read, feeding it to the rules, until
        it has nothing more (loop thread; rule 8)."""

    def close_client(self, pid: int) -> None:
        """Close every connection whose SO_PEERCRED pid is `pid` (loop thread)."""


class StateView(Protocol):
    """What the rules need of the `ServerState` that owns them."""

    sessions: dict[int, CSession]
    coroutines: Coroutines  # what async ServiceLs are serving

    def service(self, session: CSession, message: RMessage, function: int,
                held: InService, key: int) -> None:
        """Serve one request as a kernel Deliver is served (``ServiceL``, ErrorString)."""

    def forgotten(self, message: RMessage) -> None:
        """The plugin let go of `message` without completing it: complete it, soon."""

    def session_panicked(self, handle: int, category: str, reason: int) -> None:
        """Tell the kernel the server panicked the client of `handle` on the direct path."""


class _Ticket(NamedTuple):
    handle: int
    client: ClientInfo
    slots: int


class DirectConnection:
    """One accepted direct connection as the rules see it: who is at the other end (SO_PEERCRED,
    from the host), the handles attached to it and its requests in service, by req_id. It is
    the `Completer` of those requests. `key` is the host's name for it."""

    def __init__(self, rules: DirectRules, key: int, pid: int, uid: int, gid: int) -> None:
        self.key = key
        self.pid, self.uid, self.gid = pid, uid, gid
        self.max_frame = rules.max_frame
        self.attached: set[int] = set()
        self.attaches = 0  # Attach requests granted on it, ever
        self.client: ClientInfo | None = None  # the kernel's PeerInfo for it, from its tickets
        self.in_service = InService()  # (weakly: see ipcfw.server.message)
        self.open = True
        self._io = rules.io
        self._state = rules._state
        self._server = rules._name  # (for the debug log)
        self._trace = trace.enabled()  # (read once: the hot path tests a bool)

    def completed(self, message: RMessage, frame: bytes) -> None:
        """A request of this connection completed (any thread): to the loop, through the host."""
        assert isinstance(message, DirectMessage)
        if self._trace:
            trace.completion(self._server, message, frame)
        self._io.post(self, message, frame)

    def forgotten(self, message: RMessage) -> None:
        """The plugin let go of a request of this connection without completing it."""
        self._state.forgotten(message)

    def __repr__(self) -> str:
        state = "open" if self.open else "closed"
        return (f"<DirectConnection {self.key} pid={self.pid} {state} "
                f"attached={len(self.attached)} in_service={len(self.in_service)}>")


class DirectRules:
    """The direct path's rules for one registration (see the module's theory of operation).

    `state` is the `ServerState` they belong to, `io` the host's sending side, `max_frame` the
    kernel's frame limit (a completion over it is answered KErrOverflow, as on the kernel path).
    """

    def __init__(self, state: StateView, io: DirectIO, *, max_frame: int, name: str = "",
                 clock: Callable[[], float] = lambda: 0.0) -> None:
        self.io = io
        # What a monitor sees of the direct connections (`ipcfw.server.traffic`), while on.
        self.traffic = TrafficLog(name, clock)
        self.max_frame = max_frame
        self.ended = False
        self.now: float = 0.0  # the host's clock (seconds), set before each turn: request ages
        self._state = state
        self._name = name
        self._tickets: dict[bytes, _Ticket] = {}
        self._ticket_of: dict[int, dict[bytes, None]] = {}  # handle -> its unused tickets
        self._slots: dict[int, int] = {}  # handle -> its limit of ASYNC/BLIND outstanding
        self._outstanding: dict[int, int] = {}  # handle -> ASYNC/BLIND requests not ended
        self._holders: dict[int, set[DirectConnection]] = {}  # handle -> connections attached
        self._dead: dict[int, tuple[str, int]] = {}  # handle -> the panic that killed it
        # Requests taken and not yet ended here (rule 11): finished, cancelled or forgotten.
        # (Weakly: a request the plugin let go of is finalized; see ipcfw.server.message.)
        self._live: weakref.WeakSet[DirectMessage] = weakref.WeakSet()
        self.closing = False  # a deregistration has begun (rule 11)
        self._when_idle: Callable[[], None] | None = None
        self.problems: collections.Counter[str] = collections.Counter()
        self._handlers = {
            Request: self._on_request,
            Attach: self._on_attach,
            Cancel: self._on_cancel,
            Close: self._on_close,
        }

    # -- from the kernel, through ServerState ----------------------------------------------------

    def add_ticket(self, ticket: bytes, handle: int, client: ClientInfo | None,
                   slots: int) -> None:
        """An accepted NewSession carried `ticket` (rule 1)."""
        if not ticket or self.ended:
            return
        if client is None:
            # Without the client's pid the ticket could not be checked: the session stays on
            # the kernel path (the client's Attach fails, and it falls back).
            self.report("ticket of an unknown client", f"session 0x{handle:x}")
            return
        self._slots[handle] = POOL_SLOTS if slots < 0 else slots
        self._keep_ticket(ticket, _Ticket(handle, client, slots))

    def admit(self, ticket: bytes, handle: int, client: ClientInfo | None) -> int:
        """The kernel's Admit: another thread of a holder (`client`) will present `ticket` for
        session `handle` (rule 1). KErrNone once kept; an error if the session is not open on
        the direct path here (or its client is unknown): that thread uses the kernel path."""
        if self.ended or handle not in self._slots or handle in self._dead:
            return errors.KErrNotSupported  # not a direct session here (or no longer)
        if client is None:
            self.report("ticket of an unknown client", f"session 0x{handle:x}")
            return errors.KErrNotSupported
        self._keep_ticket(ticket, _Ticket(handle, client, self._slots[handle]))
        return errors.KErrNone

    def _keep_ticket(self, ticket: bytes, entry: _Ticket) -> None:
        unused = self._ticket_of.setdefault(entry.handle, {})
        if len(unused) >= MAX_UNUSED_TICKETS:  # a client that never attaches: the oldest goes
            oldest = next(iter(unused))
            del unused[oldest]
            self._tickets.pop(oldest, None)
        self._tickets[ticket] = entry
        unused[ticket] = None

    def session_ending(self, handle: int) -> None:
        """The kernel's Disconnect of `handle` is about to run (rule 8): serve what its
        connections sent before it, then detach it from them and forget everything about it."""
        for connection in list(self._holders.get(handle, ())):
            if connection.open:
                self.io.drain(connection)  # may detach it (a Close), or serve requests
        for connection in self._holders.pop(handle, ()):
            connection.attached.discard(handle)
            self._forget_requests(connection, handle)
        for ticket in self._ticket_of.pop(handle, ()):
            self._tickets.pop(ticket, None)
        self._slots.pop(handle, None)
        self._outstanding.pop(handle, None)
        self._dead.pop(handle, None)

    def client_gone(self, pid: int) -> None:
        """The kernel's PeerGone: the client process `pid` is gone (rule 7). Its connections
        close (one a forked child inherited would otherwise keep its sessions served)."""
        if not self.ended:
            self.io.close_client(pid)

    def close(self, when_idle: Callable[[], None]) -> None:
        """A deregistration begins (rule 11): take no new work, and call `when_idle` (once)
        when no direct request is live, now if none is."""
        if self.closing or self.ended:
            return
        self.closing = True
        self._when_idle = when_idle
        self._idle_check()

    def end(self) -> None:
        """The registration is over (rule 10): nothing is sent from now on."""
        self.ended = True
        self._when_idle = None
        self._live.clear()
        self._tickets.clear()
        self._ticket_of.clear()
        for holders in self._holders.values():
            for connection in holders:
                connection.open = False
        self._holders.clear()

    # -- connections -----------------------------------------------------------------------------

    def connection(self, key: int, pid: int, uid: int, gid: int) -> DirectConnection:
        """A connection was accepted; `pid`, `uid`, `gid` are its SO_PEERCRED."""
        return DirectConnection(self, key, pid, uid, gid)

    def receive(self, connection: DirectConnection, message: object) -> bool:
        """Apply one decoded frame from `connection`. True: it misbehaved, close it (rule 9)."""
        handler = self._handlers.get(type(message))
        if handler is None:
            self.misbehaved(connection, "unexpected message",
                            f"{type(message).__name__} is not sent on a direct connection")
            return True
        return handler(connection, message)  # type: ignore[no-any-return,operator]

    def misbehaved(self, connection: DirectConnection, kind: str, detail: str) -> None:
        """Log (once per kind) why `connection` is being closed."""
        self.report(kind, f"{detail}; closing the direct connection of pid {connection.pid}")

    def connection_ended(self, connection: DirectConnection) -> None:
        """`connection` ended (EOF, error, or closed by the host): rule 7, then rule 8."""
        if not connection.open:
            return
        connection.open = False
        # (copy(): another thread completing a message takes it out of the dict meanwhile)
        for message in connection.in_service.values():
            self._cancel(message, tell_client=False, connection=connection)
        connection.in_service.clear()
        for handle in list(connection.attached):
            self._detach(connection, handle)
        self._idle_check()

    def finish(self, connection: DirectConnection, message: DirectMessage, frame: bytes) -> None:
        """A request of `connection` completed with `frame` (loop thread): free its slot, note a
        panic (rule 5), and send the frame unless it answers a BLIND request (rule 4) or its
        handle has left the connection (rules 7, 8)."""
        if self.ended:
            return
        if message.mode != _SYNC:
            self._free_slot(message.handle)
        if self.traffic.on:
            self.traffic.completion(connection.pid, message.handle, message.req_id,
                                    message.stamp, frame)
        if connection.open and message.mode != _BLIND and message.handle in connection.attached:
            self.io.send(connection, frame)  # (not once Close or Disconnect let the handle go)
        if message.panic is not None and message.handle in self._state.sessions:
            self._panicked(message.handle, message.panic)
        self._live.discard(message)
        if self.closing:
            self._idle_check()

    def _panicked(self, handle: int, panic: tuple[str, int]) -> None:
        """Rule 5: the session is dead on the direct path; the kernel is told, so that it ends
        the session as for a panic through it."""
        if handle in self._dead:
            return
        self._dead[handle] = panic
        self._state.session_panicked(handle, *panic)

    # -- reading ---------------------------------------------------------------------------------

    def report(self, kind: str, detail: str) -> None:
        """Count a problem on the direct path (logged the first time of each kind)."""
        self.problems[kind] += 1
        if self.problems[kind] == 1:
            log.warning("server %r, direct path: %s: %s (further ones are counted, not logged)",
                        self._name, kind, detail)

    def attached(self, handle: int) -> int:
        """How many connections have `handle` attached."""
        return len(self._holders.get(handle, ()))

    def census(self) -> list[CensusItem]:
        """Per session and client process with any, its requests in service on its direct
        connections, how many of them hold a slot, and how long (ms, by `now`) the oldest has
        been (the kernel's Census, for `ipcfw ps`)."""
        found: dict[tuple[int, int], tuple[int, int, float]] = {}
        connections = {c for holders in self._holders.values() for c in holders}
        for connection in connections:  # (one pass over each connection's requests)
            for message in connection.in_service.values():
                if isinstance(message, DirectMessage) and message.handle in connection.attached:
                    key = (message.handle, connection.pid)
                    count, slots, since = found.get(key, (0, 0, message.since))
                    found[key] = (count + 1, slots + (message.mode != _SYNC),
                                  min(since, message.since))
        return [CensusItem(handle, pid, count, slots, max(0, int((self.now - since) * 1000)))
                for (handle, pid), (count, slots, since) in sorted(found.items())]

    def statistics(self) -> dict[str, int]:
        """Counts: unused tickets, attached sessions, outstanding slots, dead sessions."""
        return {
            "tickets": len(self._tickets),
            "attached": sum(1 for holders in self._holders.values() if holders),
            "slots_used": sum(self._outstanding.values()),
            "dead": len(self._dead),
        }

    def __repr__(self) -> str:
        stats = " ".join(f"{k}={v}" for k, v in self.statistics().items())
        return f"<DirectRules {self._name!r} {'ended ' if self.ended else ''}{stats}>"

    # -- the handlers ----------------------------------------------------------------------------

    def _on_attach(self, connection: DirectConnection, attach: Attach) -> bool:
        if self.closing:
            return self._refuse(connection, attach, "the server is deregistering")
        ticket = self._tickets.get(attach.ticket)
        if ticket is None:
            return self._refuse(connection, attach, "unknown or used ticket")
        if ticket.client.pid != connection.pid:
            return self._refuse(connection, attach, "ticket presented by another process",
                                f"the kernel named pid {ticket.client.pid}")
        if ticket.client.uid != connection.uid:
            return self._refuse(connection, attach, "ticket presented by another user",
                                f"uid {connection.uid}, the kernel named uid {ticket.client.uid}")
        handle = ticket.handle
        if handle not in self._state.sessions or handle in self._dead:
            return self._refuse(connection, attach, "ticket of a closed session")
        del self._tickets[attach.ticket]
        unused = self._ticket_of[handle]
        del unused[attach.ticket]
        if not unused:
            del self._ticket_of[handle]
        connection.client = ticket.client  # (one process: the pid was checked)
        connection.attached.add(handle)
        connection.attaches += 1
        self._holders.setdefault(handle, set()).add(connection)
        self.io.send(connection, encode(Completed(attach.req_id, handle, ())))
        return False

    def _refuse(self, connection: DirectConnection, attach: Attach, kind: str,
                detail: str = "") -> bool:
        self.report(f"Attach refused: {kind}",
                    f"pid {connection.pid}" + (f" ({detail})" if detail else ""))
        self.io.send(connection, encode(Completed(attach.req_id, errors.KErrPermissionDenied, ())))
        return False

    def _on_request(self, connection: DirectConnection, request: Request) -> bool:
        req_id, handle = request.req_id, request.handle
        session = self._state.sessions.get(handle)
        if handle not in connection.attached or session is None:
            self.io.send(connection, encode(Panicked(req_id, handle, "KERN-EXEC", 0, 0)))
            return False
        dead = self._dead.get(handle)
        if dead is not None:
            self.io.send(connection, encode(Panicked(req_id, handle, dead[0], dead[1], 1)))
            return False
        if req_id in connection.in_service:
            self.misbehaved(connection, "request id in use",
                            f"req_id {req_id} is still in service on this connection")
            return True
        if self.closing:
            self.io.send(connection, encode(Completed(req_id, errors.KErrServerTerminated, ())))
            return False
        mode = request.mode
        if mode != _SYNC:
            used = self._outstanding.get(handle, 0)
            if used >= self._slots.get(handle, 0):
                self.io.send(connection, encode(Completed(req_id, errors.KErrServerBusy, ())))
                return False
            self._outstanding[handle] = used + 1
            if mode == _BLIND:
                self.io.send(connection, encode(Completed(req_id, errors.KErrNone, ())))
        held = connection.in_service
        message = DirectMessage(connection, req_id, request.function, request.args, session,
                                connection.client, held, handle, mode)
        message.since = self.now
        if self.traffic.on:
            message.stamp = self.traffic.request(connection.pid, handle, req_id,
                                                 request.function, request.args)
        self._live.add(message)
        self._state.service(session, message, request.function, held, req_id)
        return False

    def _on_cancel(self, connection: DirectConnection, cancel: Cancel) -> bool:
        message = connection.in_service.get(cancel.req_id)
        if isinstance(message, DirectMessage) and message.mode != _BLIND:
            self._cancel(message, tell_client=True, connection=connection)
        return False

    def _on_close(self, connection: DirectConnection, close: Close) -> bool:
        if close.handle in connection.attached:
            self._detach(connection, close.handle)
            self._forget_requests(connection, close.handle)
        return False

    # -- helpers ---------------------------------------------------------------------------------

    def _cancel(self, message: RMessage, *, tell_client: bool,
                connection: DirectConnection) -> None:
        """End `message` as cancelled by its client, if it is still in service (rules 6, 7)."""
        if not isinstance(message, DirectMessage) or not cancel_by_client(message):
            return  # completed already: its completion is on its way through `finish`
        self._live.discard(message)
        if message.mode != _SYNC:
            self._free_slot(message.handle)
        if tell_client:
            frame = encode(Completed(message.req_id, errors.KErrCancel, ()))
            if self.traffic.on:
                self.traffic.completion(connection.pid, message.handle, message.req_id,
                                        message.stamp, frame)
            self.io.send(connection, frame)
        self._state.coroutines.cancel(message)
        try:
            message.Session().Cancelled(message)
        except Exception:
            log.exception("Cancelled raised")
        if self.closing:
            self._idle_check()

    def _detach(self, connection: DirectConnection, handle: int) -> None:
        connection.attached.discard(handle)
        holders = self._holders.get(handle)
        if holders is None:
            return
        holders.discard(connection)
        if not holders:
            del self._holders[handle]

    def _forget_requests(self, connection: DirectConnection, handle: int) -> None:
        """Take the requests of `handle` out of `connection`'s table in service (rules 7, 8):
        a Cancel or the connection's end no longer finds them, a deregistration no longer
        waits for them (rule 11); their completions still free their slots. (A scan: a
        connection has few requests in service, and this runs once per Close.)"""
        in_service = connection.in_service
        for req_id, message in in_service.items():
            if isinstance(message, DirectMessage) and message.handle == handle:
                in_service.pop(req_id, None)
                self._live.discard(message)
        if self.closing:
            self._idle_check()

    def _idle_check(self) -> None:
        """Rule 11: once a deregistration has begun and no direct request is live, go on."""
        if self._when_idle is not None and not self._live:
            when_idle, self._when_idle = self._when_idle, None
            when_idle()

    def _free_slot(self, handle: int) -> None:
        used = self._outstanding.get(handle, 0)
        if used > 1:
            self._outstanding[handle] = used - 1
        else:
            self._outstanding.pop(handle, None)

