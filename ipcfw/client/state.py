"""The client's tables and rules: pending requests, completion, descriptor write-back, and the
lifecycle of sessions and subsessions. No I/O.

Theory of operation
-------------------
The runtime (`ipcfw.client.runtime`) owns the sockets, the I/O thread and waiting; the API
classes (`RSession`, `RSubSession`, `TRequestStatus`) are what a client program calls. Every rule
about what a request or a session may do next lives here, so that it can be tested with no
kernel, socket or thread (tests/client/test_client_state.py). Nothing here imports a socket, a
clock, a thread or the OS; decoded replies come in, and what the caller must do comes out (the
abort callbacks to run, the requests and sync calls to end, whether to tell the kernel).

Rules this module keeps:

1. An async request is pending from its send until its completion, and completes exactly once:
   whoever takes it from the table (`ClientState.take`) completes it; a late or duplicate
   completion (the kernel's answer racing a Close, a thread's end or a dead kernel) finds
   nothing and is dropped.
2. A request's writable descriptors receive what the server wrote (`write_back`) when, and only
   when, the request completes with the server's answer: in one place, sync and async alike.
3. Several RSession objects of this process may hold one session handle (after `Open`); the
   table `ClientState.sessions` finds them all. When the session is lost (its server died or
   panicked the client, the kernel went), every holder is dead: each later call raises the
   error it died with, and each abort callback given to a holder runs once: at the loss, or
   at once if given after it (not for a panic: the call that was panicked raises it).
4. `Close` detaches the RSession (`ClientState.close` says what to do): its pending requests
   complete with KErrSessionClosed, its sync calls in flight on other threads are answered
   KErrSessionClosed, and the kernel is told unless it has ended the session itself.
5. One RSession holds one session, one RSubSession one subsession (`Hold`): connecting or
   creating one that holds one already is ClientPanic KERN-EXEC 57; while another thread is
   connecting or creating it, KERN-EXEC 9.
6. The direct path: a session on the direct path (``path="direct"``, or an Open of one: its
   `SessionLife.direct_path` names the server's socket) is attached to a direct connection of
   each thread that uses it, on that thread's first use (`ClientState.attach_direct`): the
   creating thread's at connect, any other's (ShareAuto, or another process after Open) with
   a ticket of its own from the kernel (Join). Each thread's calls go on its route
   (`SessionLife.route`): its direct connection, or the kernel path where none could be made
   (decided once per thread, `SessionLife.set_route`; forgotten at the thread's end,
   `forget_route`). A Close by the process's last holder of the handle first says
   Close(handle) on every direct connection of the process attached to it, then to the kernel
   (`Closing.direct`), so that the server's Disconnect follows every request sent before it.
   A direct connection that ends (its thread ended, its server closed it, the kernel died)
   forgets its attachments (`ClientState.connection_ended`); its requests still pending
   complete on the way (the runtime chooses the code: KErrDied, KErrServerTerminated, the
   kernel's end).

Threads: the pending table's exactly-once rests on `dict.pop`, which is atomic (one caller
gets the entry), so completions need no lock. The holders table (`ClientState.sessions`) does
need one: a connect or Open adds to it and a Close removes from it on the API's threads while
the I/O thread walks it for a lost session. A hold is changed by its users' threads and by
whichever thread learns of a death, and "dead once, abort callback once" needs a lock too.
This module imports no threading, so it creates no lock: the owner gives `ClientState` and
each `Hold` one, which they take around each change, never around a callback.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import AbstractContextManager
from typing import (
    Any, Generic, NamedTuple, Protocol,
    TypeVar,
)
from collections.abc import Callable, Iterable, Mapping, Sequence

from .. import errors
from ..protocol import Completed, Message, Panicked

log = logging.getLogger("ipcfw.client")

C = TypeVar("C")  # the runtime's channel: where a request's answer arrives
V = TypeVar("V")  # what a hold is held through: a runtime (a session), a session (a subsession)

AbortCallback = Callable[[Any, errors.IpcError], None]  # (session, error)
Lock = AbstractContextManager[object]


def write_back(buffers: Mapping[int, bytearray], writes: Iterable[tuple[int, bytes]]) -> None:
    """Put what the server wrote into the request's writable descriptors (rule 2): each
    bytearray then holds exactly the written bytes, its length offset + bytes written."""
    for index, data in writes:
        buffer = buffers.get(index)
        if buffer is not None:
            buffer[:] = data


def writes_fit(limits: Mapping[int, int], writes: Iterable[tuple[int, bytes]]) -> bool:
    """Whether every write goes to a writable descriptor of the request (`limits`: index ->
    max length, as sent) and fits its max length. The kernel refuses any other completion
    with KErrBadDescriptor; a direct server's answers are held to the same rule here."""
    for index, data in writes:
        limit = limits.get(index)
        if limit is None or type(data) is not bytes or len(data) > limit:
            return False
    return True


_logged: set[str] = set()


def log_once(kind: str, message: str, *args: object) -> None:
    """Log an error the first time a `kind` of misbehaviour is seen in this process."""
    if kind not in _logged:
        _logged.add(kind)
        log.error(message + " (logged once)", *args)


def bad_writes(value: int, writes: Sequence[tuple[int, bytes]], limits: Mapping[int, int]
               ) -> tuple[int, Sequence[tuple[int, bytes]]]:
    """`(value, writes)`, or `(KErrBadDescriptor, ())` if the writes do not fit `limits`
    (logged once): the request fails, its buffers untouched."""
    if not writes or writes_fit(limits, writes):
        return value, writes
    log_once("bad-descriptor", "a server wrote past a descriptor's max length or to an argument "
             "that is not a writable descriptor: the request completes with KErrBadDescriptor")
    return errors.KErrBadDescriptor, ()


def server_error(value: int, text: str) -> errors.IpcError | None:
    """What a request the server completed with `value` and `text` raises, when the text says
    more than the code: the server's error, saying it came from the server
    (`errors.from_server`). None otherwise (a success, or an error without text: the code's
    own exception, as `errors.check` raises it)."""
    return errors.from_server(value, text) if value < 0 and text else None


CompleteStatus = Callable[[Any, int, "BaseException | None"], None]
"""How a request's status is completed: ``complete_status(status, value, error)``
(`ipcfw.client.status.complete_request` for a `TRequestStatus`; this module cannot import it)."""


K = TypeVar("K")  # a table's keys
T = TypeVar("T")  # a table's values


def snapshot(table: dict[K, T]) -> list[tuple[K, T]]:
    """The items of a table other threads change, taken at once.

    ``list(table.items())`` is not atomic: each item's tuple is a new object, whose allocation
    may start a garbage collection, whose finalizers run Python code, during which another
    thread may add to the table ("dictionary changed size during iteration"). ``dict.copy``
    allocates no object per item, so no other thread runs while it copies."""
    return list(table.copy().items())


class Pending(Generic[C]):
    """An asynchronous request not yet completed: its status and how to complete it, its
    session and writable buffers, and the channel its answer arrives on."""

    __slots__ = ("status", "complete_status", "session", "buffers", "limits", "channel", "owed")

    def __init__(
        self, status: object, complete_status: CompleteStatus, session: object,
        buffers: Mapping[int, bytearray], channel: C, limits: Mapping[int, int] | None = None,
    ) -> None:
        """`limits`: each writable descriptor's max length as sent (`TIpcArgs.limits`);
        without it, each buffer's length now."""
        self.status = status
        self.complete_status = complete_status
        self.session = session
        self.buffers = buffers
        self.limits = {i: len(b) for i, b in buffers.items()} if limits is None else limits
        self.channel = channel
        self.owed = 0  # bytes its answer may take on a direct connection (the runtime's count)

    def complete(
        self, value: int, writes: Sequence[tuple[int, bytes]] = (),
        error: BaseException | None = None,
    ) -> None:
        """Write back, then complete the status (running its callbacks). Call only for a
        request taken from the table (`ClientState.take`): that is what makes it once. Writes
        that do not fit the request's descriptors write nothing: KErrBadDescriptor (and
        `error`, which was the server's, is not raised)."""
        if writes:
            value, checked = bad_writes(value, writes, self.limits)
            if checked is not writes:
                error, writes = None, checked
            write_back(self.buffers, writes)
        self.complete_status(self.status, value, error)


class Abort(NamedTuple):
    """An abort callback to run, for a session that was lost (rule 3)."""

    callback: AbortCallback
    session: object
    error: errors.IpcError

    def run(self) -> None:
        try:
            self.callback(self.session, self.error)
        except Exception:  # a user's callback: log it, keep serving everyone else
            log.exception("an abort callback raised")


class Named(Protocol):
    """A thread, as a hold's panics name it."""

    @property
    def name(self) -> str: ...


class Words(NamedTuple):
    """How the panics of rule 5 name the holder and what it holds."""

    kind: str  # "RSession"
    thing: str  # "session"
    held: str  # "connected": the state of a holder that holds one
    doing: str  # "connected": as in "being connected"
    verb: str  # "connect"


SESSION_WORDS = Words("RSession", "session", "connected", "connected", "connect")
SUBSESSION_WORDS = Words("RSubSession", "subsession", "open", "created", "create")


class Hold(Generic[V]):
    """One API object's hold on one handle (rule 5): the handle (0 when none), what it is
    held through, and the thread connecting or creating it meanwhile."""

    __slots__ = ("handle", "via", "busy", "words", "lock", "__weakref__")

    def __init__(self, words: Words, lock: Lock) -> None:
        self.handle = 0
        self.via: V | None = None
        self.busy: Named | None = None  # the thread connecting or creating it, meanwhile
        self.words = words
        self.lock = lock

    def begin(self, thread: Named) -> None:
        """`thread` starts to connect (create) it; raise the panic Symbian gives a second one."""
        w = self.words
        with self.lock:
            if self.handle:
                raise errors.ClientPanic(
                    "KERN-EXEC", 57,
                    f"this {w.kind} is already {w.held} (handle 0x{self.handle:x}): close it "
                    f"first, or {w.verb} another {w.kind}",
                )
            if self.busy is not None:
                raise errors.ClientPanic(
                    "KERN-EXEC", 9,
                    f"this {w.kind} is already being {w.doing}, by thread {self.busy.name!r}: "
                    f"one {w.kind} holds one {w.thing}, so {w.verb} another {w.kind}",
                )
            self.busy = thread

    def end(self) -> None:
        """The connect (create) begun by `begin` is over, whatever its outcome."""
        with self.lock:
            self.busy = None

    def attach(self, via: V, handle: int) -> None:
        """Hold `handle` now (the connect or create succeeded), through `via`.

        `via` is written before `handle`, and `usable` reads them in the other order: a
        reader that sees the new handle sees its `via` too."""
        with self.lock:
            self.via = via
            self.handle = handle

    def detach(self) -> tuple[V | None, int]:
        """Let go of the handle; return what it was held through and the handle (0: none)."""
        with self.lock:
            via, handle = self.via, self.handle
            self.via, self.handle = None, 0
        return via, handle

    def usable(self) -> tuple[V, int]:
        """What to send a request through, and the handle; ClientPanic KERN-EXEC 0 if none.

        Reads without the lock (every call's path), once each, in the order `attach` makes
        safe, and decides from what it read."""
        handle = self.handle
        via = self.via
        if not handle or via is None:
            raise self._not_held()
        return via, handle

    def _not_held(self) -> errors.ClientPanic:
        """The panic of a call on a holder that holds nothing (KERN-EXEC 0)."""
        w = self.words
        return errors.ClientPanic("KERN-EXEC", 0, f"the {w.thing} is not {w.held}")


class SessionLife(Hold[V]):
    """An RSession's hold on a session, and how the session ended under it (rules 3 and 4):
    the error it died with, its abort callback, and its sync calls in flight."""

    __slots__ = ("dead", "sync_calls", "direct_path", "routes", "_abort_callback", "_session")

    def __init__(self, session: object, lock: Lock) -> None:
        super().__init__(SESSION_WORDS, lock)
        self._session = weakref.ref(session)  # the abort callback's argument
        self.dead: BaseException | None = None
        self._abort_callback: AbortCallback | None = None
        # req_id -> channel, of sync calls in flight: a Close from another thread ends them.
        self.sync_calls: dict[int, Any] = {}
        # Rule 6: the server's socket if the session is on the direct path (else ""), and each
        # thread's route (its ident -> its direct connection, or None for the kernel path).
        self.direct_path = ""
        self.routes: dict[int, Any] = {}

    def attach(self, via: V, handle: int, direct_path: str = "",
               routes: dict[int, Any] | None = None) -> None:
        """As `Hold.attach`, alive: a new session, whatever became of the last one. The last
        one's death is cleared first, so that no reader sees the new handle with it.
        `direct_path`: the server's socket, for a session on the direct path; `routes`: the
        threads' routes decided already (the creating thread's, at connect) (rule 6)."""
        with self.lock:
            self.dead = None
            self.direct_path, self.routes = direct_path, dict(routes or {})
            self.via = via
            self.handle = handle

    def detach(self) -> tuple[V | None, int]:
        """As `Hold.detach`; the session's calls no longer take its direct connections."""
        with self.lock:
            self.direct_path, self.routes = "", {}
            via, handle = self.via, self.handle
            self.via, self.handle = None, 0
        return via, handle

    def route(self, thread: int) -> Any:
        """The route of a call from thread `thread` (its ident): its direct connection, None
        for the kernel path, or `UNDECIDED` (the thread's first use of a direct session: ask
        the kernel for a ticket, then `set_route`) (rule 6). One read of each field, without
        the lock: a Close meanwhile clears them, and the call then meets the closed session
        either way."""
        if not self.direct_path:
            return None
        return self.routes.get(thread, UNDECIDED)

    def set_route(self, thread: int, direct: Any) -> None:
        """Thread `thread`'s calls take `direct` (None: the kernel path) from now on, while the
        session is held (a Close, or a new session, forgets it)."""
        with self.lock:
            if self.direct_path:
                self.routes[thread] = direct

    def forget_route(self, thread: int, direct: Any) -> None:
        """Thread `thread` ended (its ident may be reused): forget its route if it is still
        `direct` (its connection, or None)."""
        with self.lock:
            if thread in self.routes and self.routes[thread] is direct:
                del self.routes[thread]

    def usable(self) -> tuple[V, int]:
        """As `Hold.usable`; raise the error the session died with, if it died.

        One read of each field, handle first and death last (the reverse of `attach`), and
        the decision from those reads alone: with a connect, Open or Close finishing on
        another thread meanwhile, the call goes ahead, raises KERN-EXEC 0, or raises the
        death of the handle it read (never a previous session's death on a new handle)."""
        handle = self.handle
        via = self.via
        dead = self.dead
        if not handle or via is None:
            raise self._not_held()
        if dead is not None:
            raise dead
        return via, handle

    def lose(self, error: BaseException) -> Abort | None:
        """The session died under this holder: the first loss counts (rule 3). Returns the
        abort callback to run, if any; run it with no lock held."""
        with self.lock:
            if self.dead is not None:
                return None
            self.dead = error
            return self._abort(error)

    def set_abort_callback(self, callback: AbortCallback | None) -> Abort | None:
        """Keep `callback` for a loss to come; returns it to run at once if the session is
        lost already."""
        with self.lock:
            self._abort_callback = callback
            dead = self.dead
            return None if dead is None else self._abort(dead)

    def _abort(self, error: BaseException) -> Abort | None:
        callback, session = self._abort_callback, self._session()
        if callback is None or session is None or not isinstance(error, errors.IpcError):
            return None  # (a ClientPanic is raised by the call that was panicked)
        return Abort(callback, session, error)

    def finish(
        self, reply: Message, buffers: Mapping[int, bytearray],
        limits: Mapping[int, int] | None = None,
    ) -> int:
        """The value of a sync call's reply, its descriptors written back (rule 2); raise its
        error, or the panic it carries (which kills this holder if it kills the session).
        Writes that do not fit the descriptors (`limits`, as `Pending`'s) write nothing and
        raise KErrBadDescriptor."""
        if type(reply) is Panicked:
            panic = errors.ClientPanic(reply.category, reply.reason)
            if reply.session_dead and reply.handle == self.handle:
                self.lose(panic)  # (a panic has no abort to run)
            raise panic
        if type(reply) is not Completed:
            raise errors.IpcError(errors.KErrGeneral, f"unexpected reply: {reply!r}")
        value = reply.value
        if reply.writes:
            if limits is None:
                limits = {i: len(b) for i, b in buffers.items()}
            value, writes = bad_writes(value, reply.writes, limits)
            write_back(buffers, writes)
        if value < 0 and reply.text and value == reply.value:
            raise errors.from_server(value, reply.text)
        return errors.check(value)


class _Undecided:
    def __repr__(self) -> str:
        return "UNDECIDED"


#: `SessionLife.route` for a thread that has not used a direct session yet.
UNDECIDED: Any = _Undecided()


class Closing(NamedTuple):
    """What a Close must do (rule 4)."""

    requests: list[int]  # pending requests: complete each with KErrSessionClosed
    answers: list[tuple[Any, Completed]]  # sync calls in flight: (channel, the answer to give)
    tell_kernel: bool  # send the kernel a Close for the handle
    direct: list[Any]  # direct connections to send Close(handle) on first (rule 6)


class ClientState(Generic[C]):
    """One runtime's tables: the pending async requests (rule 1) and the holders of each
    session handle (rule 3). `lock` guards the holders table (see the module docstring)."""

    def __init__(self, lock: Lock) -> None:
        self.pending: dict[int, Pending[C]] = {}
        # handle -> the holds of this process's RSession objects on it (several after Open).
        self.sessions: dict[int, weakref.WeakSet[SessionLife[Any]]] = {}
        # direct connection -> the session handles attached to it (rule 6).
        self.attached: dict[C, set[int]] = {}
        self.lock = lock

    # -- pending requests (rules 1 and 2) -----------------------------------------------------

    def add(self, req_id: int, pending: Pending[C]) -> None:
        """Register an async request before it is sent: its answer may be read at once."""
        self.pending[req_id] = pending

    def take(self, req_id: int) -> Pending[C] | None:
        """The request to complete, once: None if it completed already or never was."""
        return self.pending.pop(req_id, None)  # atomic: exactly one caller gets it

    def requests_on(self, channel: C) -> list[int]:
        """The req_ids of the requests still pending on `channel`."""
        return [req_id for req_id, p in snapshot(self.pending) if p.channel is channel]

    def requests_of(self, session: object) -> list[int]:
        """The req_ids of `session`'s requests still pending."""
        return [req_id for req_id, p in snapshot(self.pending) if p.session is session]

    # -- sessions (rules 3 and 4) -------------------------------------------------------------

    def register(self, life: SessionLife[Any]) -> None:
        """`life` holds its handle now (a connect or an Open succeeded)."""
        with self.lock:
            self.sessions.setdefault(life.handle, weakref.WeakSet()).add(life)

    def session_lost(self, handle: int, error: BaseException) -> list[Abort]:
        """Every holder of `handle` is dead; returns the abort callbacks to run."""
        with self.lock:
            holders = list(self.sessions.get(handle, ()))
        aborts = (life.lose(error) for life in holders)
        return [abort for abort in aborts if abort is not None]

    def every_session_lost(self, error: Callable[[], BaseException]) -> list[Abort]:
        """The kernel has gone: every session is lost, each with a new `error()`."""
        with self.lock:
            handles = list(self.sessions)
        return [abort for handle in handles for abort in self.session_lost(handle, error())]

    def close(self, life: SessionLife[Any], handle: int, *, ended: bool) -> Closing:
        """`life` let go of `handle` (its Close; see `Hold.detach`): forget it, and say what
        to do (rule 4). `ended`: the kernel has ended the session already, for a reason this
        state cannot see (the kernel is gone, or the unshared session's thread ended)."""
        with self.lock:
            holders = self.sessions.get(handle)
            if holders is not None:
                holders.discard(life)
                if not holders:
                    del self.sessions[handle]
            direct: list[Any] = []
            if not holders:  # the process's last holder: its direct connections let go
                direct = [c for c, handles in self.attached.items() if handle in handles]
            for channel in direct:
                self.attached[channel].discard(handle)
        answers = [(channel, Completed(req_id, errors.KErrSessionClosed, ()))
                   for req_id, channel in snapshot(life.sync_calls)]
        # Disconnected: the kernel stopped serving the session's creating channel, and ended
        # the session with it.
        ended = ended or isinstance(life.dead, errors.Disconnected)
        return Closing(self.requests_of(life), answers, not ended, direct)

    # -- direct connections (rule 6) ----------------------------------------------------------

    def attach_direct(self, handle: int, channel: C) -> None:
        """`handle` is attached to the direct connection `channel` (or may be: an Attach whose
        answer never came). A Close of the handle says so on `channel` first."""
        with self.lock:
            self.attached.setdefault(channel, set()).add(handle)

    def detach_direct(self, handle: int, channel: C) -> None:
        """`handle` is not attached to `channel` after all (the server refused it)."""
        with self.lock:
            handles = self.attached.get(channel)
            if handles is not None:
                handles.discard(handle)

    def is_attached(self, channel: C, handle: int) -> bool:
        """Whether `handle` is attached to the direct connection `channel` (a panic that
        kills a session counts only from the connection that carries it)."""
        with self.lock:
            return handle in self.attached.get(channel, ())

    def take_on(self, req_id: int, channel: C) -> Pending[C] | None:
        """As `take`, only if the request was sent on `channel`: a connection answers only
        its own requests."""
        pending = self.pending.get(req_id)
        if pending is None or pending.channel is not channel:
            return None
        return self.take(req_id)

    def connection_ended(self, channel: C) -> tuple[set[int], list[int]]:
        """The direct connection `channel` has ended: forget its attachments. Returns the
        handles that were attached to it, and its requests still pending (complete each)."""
        with self.lock:
            handles = self.attached.pop(channel, set())
        return handles, self.requests_on(channel)
