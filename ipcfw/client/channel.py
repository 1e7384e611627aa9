"""A thread's channel to the kernel (`Channel`: a DEALER socket), and what it shares with a
direct connection (`LockedChannel`: `ipcfw.client.connection.DirectChannel`).

How channels are used, settled and waited for is in `ipcfw.client.runtime`'s docstring: a
socket used only under its channel's lock, settled by whichever thread needs progress, its
async requests in the runtime's pending table (`ipcfw.client.state`). The runtime is reached
through `Host`, what a channel needs of it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

import zmq

from .. import errors
from .._zmqflags import EVENTS, POLLIN
from ..kernelprobe import welcome_error
from ..transport import (
    discard,
    exchange,
    hello_message,
    open_socket,
    routing_id,
    stop_watching,
)
from ..protocol import (
    Close,
    Completed,
    Connected,
    Dropped,
    Message,
    Panicked,
    ProtocolError,
    Role,
    Welcome,
    decode,
    encode,
)
from .joining import Joining
from .state import ClientState, Pending, server_error

log = logging.getLogger("ipcfw.client")

HELLO_TIMEOUT = 5.0  # seconds to wait for a Welcome before declaring the kernel unreachable
SETTLE_INTERVAL = 0.001  # a thread only sending async requests still settles this often
SLICE = 0.05  # blocked waits wake this often (seconds) to notice a dead kernel or a deadline


class Waitable(Protocol):
    """What `Runtime.wait` waits for: a `TRequestStatus`."""

    def done(self) -> bool: ...


W = TypeVar("W", bound=Waitable)


class Host(Protocol):
    """What a channel needs of its runtime (`ipcfw.client.runtime.Runtime`), and what a
    status waiting on a channel needs (`wait`)."""

    context: zmq.Context[Any]
    endpoint: str
    kernel_dead: bool
    state: ClientState[Any]

    def kernel_gone_error(self) -> errors.IpcError: ...

    def complete(self, req_id: int, value: int, writes: Sequence[tuple[int, bytes]] = (),
                 error: BaseException | None = None, *, on: Any = None) -> bool: ...

    def panicked(self, reply: Panicked, on: Any = None) -> None: ...

    def channel_ended(self, channel: Channel, waiting: int) -> None: ...

    def nudge(self) -> None: ...

    def first_pending(self) -> None: ...

    def retire_direct(self, channel: Any, error: Callable[[], errors.IpcError]) -> None: ...

    def wait(self, waits: Sequence[tuple[W, Any]], timeout: float | None) -> W: ...


def hello(socket: zmq.Socket[bytes], role: Role, endpoint: str) -> Welcome:
    """Say Hello on a new DEALER `socket` in `role`; the kernel's Welcome, or IpcError
    (KErrCouldNotConnect, KErrNotSupported for another protocol, KErrPermissionDenied for a
    process the kernel does not admit, or whose key a kernel over tcp refuses)."""
    if not exchange(socket, endpoint, encode(hello_message(role)), HELLO_TIMEOUT):
        raise errors.IpcError(
            errors.KErrCouldNotConnect,
            f"no ipcfw kernel answered at {endpoint} within {HELLO_TIMEOUT:.0f} s",
        )
    reply = decode(socket.recv())
    if type(reply) is not Welcome:
        raise errors.IpcError(errors.KErrCouldNotConnect, f"kernel answered Hello with {reply!r}")
    refused = welcome_error(reply, endpoint, "client")
    if refused is not None:
        raise refused
    return reply



class LockedChannel:
    """What both kinds of channel share: a socket used only under `lock`, the sync calls in
    progress on it (`replies`), the async requests pending on it (`pending`, `owed`), and
    settling (reading everything waiting) by whoever holds the lock. One async send and one
    call serve both; subclasses give the socket's side: `_transmit`, `_receive`, `_settle`,
    `_refusal`, and when to settle (`_settles_after_send`, `_after_call`)."""

    runtime: Host
    lock: threading.RLock
    closed: bool
    max_frame: int
    replies: dict[int, Message | None]
    pending: int  # async requests sent here and not yet completed (under count_lock)
    owed = 0  # bytes their answers may take (a direct connection's bound; under count_lock)
    count_lock: threading.Lock
    last_used: float
    settled_at: float

    def _settle(self) -> None:
        raise NotImplementedError

    def _refusal(self) -> errors.IpcError | None:
        """Why nothing can be sent here any more, or None. Call with the lock held."""
        raise NotImplementedError

    def _raise_refusal(self) -> None:
        """Raise `_refusal`'s error, if any. Call with the lock held: another thread may have
        closed the channel, or read its ending, since it was fetched."""
        refusal = self._refusal()
        if refusal is not None:
            raise refusal

    def _transmit(self, frame: bytes, fds: Sequence[int]) -> None:
        """Send `frame` (with the file descriptors `fds`). Call with the lock held."""
        raise NotImplementedError

    def _receive(self, req_id: int, timeout: float | None) -> Message:
        """The reply carrying `req_id`, read under the lock."""
        raise NotImplementedError

    def _settles_after_send(self, now: float) -> bool:
        """Whether an async send settles after itself (see the runtime's docstring)."""
        raise NotImplementedError

    def _after_call(self) -> None:
        """What a call does once it has its reply, the lock still held."""

    def _busy(self, pending: Pending[Any]) -> errors.IpcError | None:
        """Why the async request `pending` completes at once, unsent (a bound), or None."""
        return None

    def check_size(self, frame: bytes) -> None:
        if len(frame) > self.max_frame:
            raise ValueError(
                f"request of {len(frame)} bytes exceeds the kernel's limit of"
                f" {self.max_frame} bytes"
            )

    def end_call(self, req_id: int, reply: Message) -> None:
        """Answer the sync call `req_id` in flight here with `reply` ourselves (its session was
        closed by another thread): its thread sees it within one wait slice."""
        if req_id in self.replies:
            self.replies[req_id] = reply

    def try_settle(self) -> bool:
        """Settle if nobody else holds the lock; False if somebody does (they will settle)."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if not self.closed:  # its thread ended and retired it meanwhile
                self._settle()
        finally:
            self.lock.release()
        return True

    def send_async(self, frame: bytes, req_id: int, pending: Pending[Any],
                   fds: Sequence[int] = ()) -> None:
        """Send an async request (with the file descriptors `fds`, if any), registered first:
        its answer may be read at once. If a bound refuses it (`_busy`), it completes with
        that error instead, unsent."""
        self.check_size(frame)
        with self.lock:
            self._raise_refusal()
            busy = self._busy(pending)
            if busy is None:
                self._send_registered(frame, req_id, pending, fds)
        if busy is not None:
            pending.complete(busy.code, error=busy)
        elif self.pending == 1:
            self.runtime.first_pending()

    def _send_registered(self, frame: bytes, req_id: int, pending: Pending[Any],
                         fds: Sequence[int]) -> None:
        """Register, count and send an async request; withdraw it if the send fails. Call with
        the lock held. A request is uncounted only by whoever takes it from the table: here
        if it was never sent, else its completion (which may race a failed send: a Close, the
        kernel's death)."""
        runtime = self.runtime
        runtime.state.add(req_id, pending)
        with self.count_lock:
            self.pending += 1
            self.owed += pending.owed
        try:
            self._transmit(frame, fds)
        except BaseException:
            if runtime.state.take(req_id) is not None:  # withdrawn: it was never sent
                with self.count_lock:
                    self.pending -= 1
                    self.owed -= pending.owed
            raise
        now = self.last_used = time.monotonic()
        if self._settles_after_send(now):
            self._settle()

    def call(self, frame: bytes, req_id: int, timeout: float | None = None,
             fds: Sequence[int] = ()) -> Message:
        """Send `frame` (with the file descriptors `fds`, if any) and return the reply carrying
        `req_id`, holding the lock throughout. Raises TimeoutError after `timeout` seconds."""
        self.check_size(frame)
        with self.lock:
            self._raise_refusal()
            self.replies[req_id] = None
            try:
                self._transmit(frame, fds)
                reply = self._receive(req_id, timeout)
                self._after_call()
                return reply
            finally:
                self.replies.pop(req_id, None)
                self.last_used = time.monotonic()


class Channel(LockedChannel):
    """A DEALER socket to the kernel, used only under `lock`; created for one thread."""

    def __init__(self, runtime: Host) -> None:
        self.runtime = runtime
        # Reentrant: a done-callback run while this thread settles may itself make a request.
        self.lock = threading.RLock()
        self.socket: zmq.Socket[bytes] = open_socket(runtime.context, runtime.endpoint)
        self.routing_id = routing_id(self.socket)
        self.socket.rcvtimeo = int(SLICE * 1000)
        try:
            welcome = hello(self.socket, Role.CHANNEL, runtime.endpoint)
        except BaseException:
            discard(self.socket)
            raise
        stop_watching(self.socket)  # (the process's inbox watches its kernel)
        self.fd = cast(int, self.socket.get(zmq.FD))
        self.max_frame = welcome.max_frame
        self.pending = 0  # async requests sent here and not yet completed (under count_lock)
        self.watchers = 0  # other threads that may sleep on `fd` (under count_lock)
        self.count_lock = threading.Lock()  # never held across socket I/O
        self.poller = zmq.Poller()  # for threads waiting on this channel without the lock
        self.poller.register(self.fd, zmq.POLLIN)
        self.last_used = self.settled_at = time.monotonic()
        self.closed = False
        # Why the kernel stopped serving this channel, once it has (see the module docstring);
        # `ended` once the kernel's own notice has been read from it: nothing can follow it.
        self.dropped: str | None = None
        self.ended = False
        self.replaced = False  # its thread has a new channel: close this one once it has ended
        self.inherited = False  # a forked child's copy: never touch its socket (`forked`)
        # Synchronous calls in progress on this channel (req_id -> reply once read). A
        # done-callback run during a call may settle the channel and read the call's reply.
        self.replies: dict[int, Message | None] = {}
        self.abandoned: set[int] = set()  # connects that timed out: close them if they succeed
        self.joins: dict[int, Joining] = {}  # Joins in flight (req_id -> the move they serve)
        # Calls a coroutine awaits (req_id -> what to do with the answer: ipcfw.client.aio)
        self.awaited: dict[int, Callable[[Message], None]] = {}
        self.loop_readers: dict[object, int] = {}  # asyncio loop -> awaits settling it there

    def awaits_answers(self) -> bool:
        """Whether something someone waits for will still arrive here: answers to async
        requests, to a connect that timed out, or the kernel's notice that it dropped us."""
        return bool(self.pending or self.abandoned or self.awaited
                    or (self.dropped and not self.ended))

    def dropped_error(self) -> errors.IpcError:
        """The error of a request this channel can no longer answer (a new one each time)."""
        return errors.IpcError(errors.KErrDisconnected, self.dropped or "the channel was dropped")

    def _refusal(self) -> errors.IpcError | None:
        """Why nothing can be sent on this channel any more, or None. Call with the lock held:
        another thread may have read the kernel's notice, or closed it, since it was fetched."""
        if self.ended:
            return self.dropped_error()
        if self.closed:
            return self.runtime.kernel_gone_error()
        return None

    def send(self, frame: bytes) -> None:
        """Send one frame that expects no answer (a close, a cancel): lock, send, settle,
        unlock. On a channel that has ended or closed, nothing is sent: the kernel no longer
        serves it, and has ended what it would have ended (its requests are all completed)."""
        self.check_size(frame)
        with self.lock:
            if self.ended or self.closed:
                return
            self.socket.send(frame)
            self._settle()
            self.last_used = time.monotonic()

    def send_join(self, frame: bytes, req_id: int, joining: Joining) -> None:
        """Send a Join (`ipcfw.client.joining`) without waiting for its answer: whoever reads
        it records it in `joining`."""
        with self.lock:
            self._raise_refusal()
            self.joins[req_id] = joining
            try:
                self.socket.send(frame)
            except BaseException:
                del self.joins[req_id]
                raise
            self._settle()
            self.last_used = time.monotonic()

    def send_awaited(self, frame: bytes, req_id: int,
                     answered: Callable[[Message], None]) -> None:
        """Send a request whose answer a coroutine awaits (`ipcfw.client.aio.call`): whoever
        reads the answer (the coroutine's loop, another thread settling) hands it to
        `answered`, once."""
        self.check_size(frame)
        with self.lock:
            self._raise_refusal()
            self.awaited[req_id] = answered
            try:
                self.socket.send(frame)
            except BaseException:
                del self.awaited[req_id]
                raise
            self.last_used = time.monotonic()

    def forget_awaited(self, req_id: int, *, connect: bool = False) -> None:
        """Nobody awaits the answer to `req_id` any more (the coroutine timed out or was
        cancelled); a `connect` that succeeds later is closed at once. (Under the lock: an
        answer read meanwhile is either handed over or, for a connect, closed.)"""
        with self.lock:
            if self.awaited.pop(req_id, None) is not None and connect:
                self._abandon(req_id)

    def call(self, frame: bytes, req_id: int, timeout: float | None = None,
             fds: Sequence[int] = (), *, connect: bool = False) -> Message:
        """As `LockedChannel.call`. `connect`: the frame is a Connect; if the wait times out
        and the connect succeeds later, the session nobody holds is closed at once."""
        with self.lock:  # (reentrant: the base takes it again; the abandon is under it too)
            try:
                return super().call(frame, req_id, timeout, fds)
            except TimeoutError:
                if connect:
                    self._abandon(req_id)
                raise

    def _transmit(self, frame: bytes, fds: Sequence[int]) -> None:
        self.socket.send(frame)  # (no file descriptors travel to the kernel)

    def _after_call(self) -> None:
        self._settle()  # (re-arms the FD: see the runtime's docstring)

    def _settles_after_send(self, now: float) -> bool:
        return bool(self.watchers or self.loop_readers or now - self.settled_at > SETTLE_INTERVAL)

    def _abandon(self, connect_id: int) -> None:
        """Nobody waits for this connect any more: if it succeeds, close the session at once."""
        self.abandoned.add(connect_id)
        self.runtime.nudge()  # the I/O thread settles this channel, and closes it then

    def call_then(
        self, frame: bytes, req_id: int, then_id: int, timeout: float | None
    ) -> tuple[Message, Message | TimeoutError | None]:
        """A Connect carrying a first request: its Connected, then (if it succeeded) the first
        request's answer (or the TimeoutError that ended the wait for it), both awaited under
        one hold of the lock."""
        self.check_size(frame)
        with self.lock:
            self._raise_refusal()
            self.replies[req_id] = self.replies[then_id] = None
            try:
                self.socket.send(frame)
                try:
                    connected = self._receive(req_id, timeout)
                except TimeoutError:
                    self._abandon(req_id)
                    raise
                if type(connected) is not Connected or connected.result < 0:
                    self._settle()
                    return connected, None  # the kernel dropped the first request with it
                try:
                    answer = self._receive(then_id, timeout)
                except TimeoutError as exc:
                    return connected, exc  # connected: the caller keeps the session
                self._settle()
                return connected, answer
            finally:
                self.replies.pop(req_id, None)
                self.replies.pop(then_id, None)
                self.last_used = time.monotonic()

    def _receive(self, req_id: int, timeout: float | None) -> Message:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            reply = self.replies.get(req_id)
            if reply is not None:
                return reply  # read by a nested settle
            if self.ended:
                raise self.dropped_error()
            try:
                raw = self.socket.recv()
            except zmq.Again:
                if self.runtime.kernel_dead:
                    raise self.runtime.kernel_gone_error() from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"no reply within {timeout} s") from None
                continue
            try:
                self._dispatch(decode(raw))
            except ProtocolError as exc:
                log.error("dropping a malformed frame from the kernel: %s", exc)

    def _settle(self) -> None:
        """Read and dispatch everything waiting. Call with the lock held."""
        self.settled_at = time.monotonic()
        socket = self.socket
        # (closed by a Dropped notice; EVENTS is an int option, not the bytes `get` may return)
        while not self.closed and socket.get(EVENTS) & POLLIN:  # type: ignore[operator]
            try:
                self._dispatch(decode(socket.recv()))
            except ProtocolError as exc:
                log.error("dropping a malformed frame from the kernel: %s", exc)

    def _dispatch(self, reply: Message) -> None:
        req_id = getattr(reply, "req_id", None)
        if req_id in self.replies:
            self.replies[req_id] = reply
            return
        if self.awaited and req_id in self.awaited:
            self.awaited.pop(req_id)(reply)  # (under the lock, as forget_awaited)
            return
        if self.joins and req_id in self.joins:
            joining = self.joins[req_id]
            if type(reply) is Connected:
                joining.joined(reply.result, reply.direct, reply.ticket)
            else:  # Panicked: the kernel panics the call that the thread sent with it too
                joining.joined(errors.KErrGeneral)
            del self.joins[req_id]  # (after: `Runtime.join` reads "gone, unanswered" as lost)
            return
        # (`type(x) is C`, not a saved `type(x)`, so that type checkers narrow `reply`.)
        if type(reply) is Completed:
            error = server_error(reply.value, reply.text) if reply.text else None
            self.runtime.complete(reply.req_id, reply.value, reply.writes, error)
        elif type(reply) is Panicked:
            self.runtime.panicked(reply)
        elif type(reply) is Dropped and reply.routing_id == self.routing_id:
            self.runtime.channel_ended(self, reply.waiting)
        elif type(reply) is Connected and req_id in self.abandoned:
            self.abandoned.discard(req_id)
            if reply.handle:  # the caller gave up waiting: nobody holds this session
                self.socket.send(encode(Close(reply.handle)))
        else:
            log.debug("dropping a late reply on a channel: %r", reply)

    def forked(self) -> None:
        """In a forked child (`Runtime.forked`): closed, its socket left alone (the parent's
        context's), with fresh locks. Takes no lock."""
        self.lock = threading.RLock()
        self.count_lock = threading.Lock()
        self.inherited = self.closed = True

    def close(self) -> None:
        with self.lock:
            self.closed = True
            if not self.inherited:
                self.socket.close()
