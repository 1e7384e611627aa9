"""The client runtime of one process: its sockets, its I/O thread, and waiting.

The tables and rules it applies (pending requests, completion exactly once, descriptor
write-back, the lifecycle of sessions) are `ipcfw.client.state`'s, which does no I/O; the runtime
feeds it what arrives and carries out what it decides, from whichever thread is at hand.

Theory of operation
-------------------
A Python thread hand-off costs 10-20 us and contends for the GIL, so the runtime lets the thread
that needs an answer fetch it itself, and keeps its own I/O thread off the hot path.

* Each thread that makes a call gets its own DEALER socket, its **channel**. Every request leaves
  on the calling thread's channel, so the requests of one thread reach the kernel, and the
  server, in the order they were made; every answer, synchronous or not, comes back on it.
* A channel's socket is only ever used under the channel's lock. zmq sockets must never be used
  by two threads at once, but may pass between threads across a full memory barrier, which the
  lock is. So whichever thread needs progress can **settle** a channel: take its lock, read every
  frame waiting, complete the requests they answer, release. A synchronous call holds its
  channel's lock from send to reply: one send, one receive, no hand-off. ``Wait()`` settles the
  status's channel and sleeps on the channel's file descriptor (`zmq.FD`) between settles.
* zmq's FD is edge-like: it only signals new activity, and any use of the socket may consume the
  signal. A settle ends by finding the socket empty, which re-arms it. So whoever holds the lock
  settles before releasing it, with one exception: an async send settles only if some other
  thread or event loop may be asleep on the channel's FD (`Channel.watchers`), or if the
  channel has not been settled for `SETTLE_INTERVAL`. A pipelining thread then reads its
  answers in batches when it waits, instead of probing the socket after every send (each probe
  is a getsockopt and two system calls); only the owner thread sends async requests on its
  channel, and it is not asleep while it sends.
* The process's I/O thread (``ipcfw-inbox``) owns the **inbox** socket, where the kernel sends
  notices (a session lost because its server died), and polls a pidfd on the kernel, so a dead
  kernel is noticed in milliseconds. It also settles channels whose requests nobody is waiting
  for (so ``add_done_callback`` fires) once their owner has been idle for `IDLE` seconds.
* When a thread ends, its channel closes at once (the kernel sees it and disconnects the
  thread's unshared sessions); its requests still pending complete locally with KErrDied.
* If the kernel stops serving a channel (it left the kernel's `max_backlog` answers unread, for
  example while the process was stopped), the kernel forgets it, closes its unshared sessions
  and says so twice: on the inbox at once, and on the channel itself behind the answers already
  queued for it. The inbox's notice marks the channel dropped: the thread's next call gets a new
  channel, the thread's lost sessions fail every call, and the I/O thread reads the old channel
  up to the kernel's notice. Requests answered before it complete with their answers; the rest
  then complete with KErrDisconnected, naming why.

Direct connections (the direct data path)
----------------------------------------
A session created with ``path="direct"`` whose Connected carries a ticket is attached (Attach)
to a **direct connection** of the creating thread: a SOCK_SEQPACKET socket to the server's
process (`DirectChannel`, over `ipcfw.client.direct.DirectSocket`), one per thread per server
socket, made on first use and reused by every session of that server the thread uses. Any
other thread that uses the session (ShareAuto, or a thread of another process after Open)
asks the kernel for a ticket of its own on its first call (`Runtime.join`: Join, answered
once the server holds the ticket) and attaches the session to its own direct connection. The
session's requests from each such thread go on that thread's connection; everything else
(Connect, Share, Open, Join, Close) goes to the kernel. A direct
connection follows the channel's rules: used only under its lock, settled by whoever needs
progress, its requests in the same pending table, waited for by the same `Runtime.wait`, its
file descriptor in the same pollers (level triggered: a frame waiting keeps it readable). A
synchronous call spins on a non-blocking receive before it sleeps (`direct.SPIN`: waking a
sleeping thread costs more than the round trip). Its ends: the thread's end closes it (its
requests complete with KErrDied); the server closing it (its death, or too many answers left
unread) completes its requests with KErrServerTerminated, and later calls on it raise
ServerTerminated; the kernel's death closes them all. A Close says Close(handle) on the
session's direct connections before the kernel's Close, so that the server's Disconnect follows
every request sent before it; a Close or Cancel from any thread is sent without the
connection's lock (one datagram: atomic), or, if the socket is full, queued for its owner or
the I/O thread. A connection is made only to a socket in the kernel's directory; if it cannot
be made or the Attach fails, the session stays on the kernel path (logged at debug). A forked
child closes the direct connections it inherited, sending nothing.

Routing ids are random 128-bit values: the kernel never trusts them as identity (it reads the
process credentials the transport gives it), but a random id cannot collide with libzmq's own.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from typing import Protocol, TypeAlias, TypeVar, cast
from collections.abc import Callable, Iterable, Sequence

import zmq

from .. import endpoint as endpoints
from .. import errors
from .._wakeup import WakePipe
from .._zmqflags import EVENTS, POLLIN
from ..protocol import (
    DIRECT_MAX_UNREAD,
    PROTOCOL_VERSION,
    Attach,
    Close,
    Completed,
    Connected,
    Dropped,
    Hello,
    Join,
    MappedCompleted,
    Message,
    Panicked,
    ProtocolError,
    Role,
    SessionLost,
    Welcome,
    decode,
    encode,
)
from . import shm
from .direct import DirectSocket
from .state import UNDECIDED, ClientState, Pending, SessionLife, log_once, server_error

log = logging.getLogger("ipcfw.client")

HELLO_TIMEOUT = 5.0  # seconds to wait for a Welcome before declaring the kernel unreachable
IDLE = 0.005  # a channel untouched this long is settled by the I/O thread
SETTLE_INTERVAL = 0.001  # a thread only sending async requests still settles this often
_SLICE = 0.05  # blocked waits wake this often (seconds) to notice a dead kernel or a deadline
_JOIN_RETRY = 1.0  # seconds on the kernel path after a Join that timed out, before asking again
_JOIN_RETRY_MOST = 60.0  # ... doubling after each one that times out, up to this
ATTACH_TIMEOUT = 5.0  # seconds to connect to a server's socket and attach, if the connect had none


class Waitable(Protocol):
    """What `Runtime.wait` waits for: a `TRequestStatus`."""

    def done(self) -> bool: ...


W = TypeVar("W", bound=Waitable)


def _hello(socket: zmq.Socket[bytes], role: Role, endpoint: str) -> Welcome:
    socket.send(encode(Hello(int(role), PROTOCOL_VERSION)))
    if not socket.poll(int(HELLO_TIMEOUT * 1000)):
        raise errors.IpcError(
            errors.KErrCouldNotConnect,
            f"no ipcfw kernel answered at {endpoint} within {HELLO_TIMEOUT:.0f} s",
        )
    reply = decode(socket.recv())
    if type(reply) is not Welcome:
        raise errors.IpcError(errors.KErrCouldNotConnect, f"kernel answered Hello with {reply!r}")
    if reply.protocol != PROTOCOL_VERSION:
        raise errors.IpcError(
            errors.KErrNotSupported,
            f"the kernel at {endpoint} speaks ipcfw protocol {reply.protocol}, this client "
            f"{PROTOCOL_VERSION}: run a kernel from the same ipcfw version",
        )
    return reply


class _LockedChannel:
    """What both kinds of channel share: a socket used only under `lock`, the sync calls in
    progress on it (`replies`), and settling (reading everything waiting) by whoever holds
    the lock. Subclasses give `_settle` and the attributes set in their ``__init__``."""

    lock: threading.RLock
    closed: bool
    max_frame: int
    replies: dict[int, Message | None]

    def _settle(self) -> None:
        raise NotImplementedError

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


class Channel(_LockedChannel):
    """A DEALER socket to the kernel, used only under `lock`; created for one thread."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        # Reentrant: a done-callback run while this thread settles may itself make a request.
        self.lock = threading.RLock()
        self.socket = runtime.context.socket(zmq.DEALER)
        self.routing_id = self.socket.routing_id = os.urandom(16)
        self.socket.rcvtimeo = int(_SLICE * 1000)
        self.socket.connect(runtime.endpoint)
        try:
            welcome = _hello(self.socket, Role.CHANNEL, runtime.endpoint)
        except BaseException:
            self.socket.close(linger=0)
            raise
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
        # Synchronous calls in progress on this channel (req_id -> reply once read). A
        # done-callback run during a call may settle the channel and read the call's reply.
        self.replies: dict[int, Message | None] = {}
        self.abandoned: set[int] = set()  # connects that timed out: close them if they succeed
        self.loop_readers: dict[object, int] = {}  # asyncio loop -> awaits settling it there

    def awaits_answers(self) -> bool:
        """Whether something someone waits for will still arrive here: answers to async
        requests, to a connect that timed out, or the kernel's notice that it dropped us."""
        return bool(self.pending or self.abandoned or (self.dropped and not self.ended))

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

    def send_async(self, frame: bytes, req_id: int, pending: Pending[AnyChannel]) -> None:
        """Send an async request, registered first: its answer may be read at once."""
        self.check_size(frame)
        runtime = self.runtime
        with self.lock:
            refusal = self._refusal()
            if refusal is not None:
                raise refusal
            runtime.state.add(req_id, pending)
            with self.count_lock:
                self.pending += 1
            try:
                self.socket.send(frame)
            except BaseException:
                runtime.state.take(req_id)  # withdrawn: it was never sent
                with self.count_lock:
                    self.pending -= 1
                raise
            now = self.last_used = time.monotonic()
            if self.watchers or self.loop_readers or now - self.settled_at > SETTLE_INTERVAL:
                self._settle()
        if self.pending == 1:
            runtime.first_pending()

    def call(
        self, frame: bytes, req_id: int, timeout: float | None = None, *, connect: bool = False
    ) -> Message:
        """Send `frame` and return the reply carrying `req_id`, holding the lock throughout.

        `connect`: the frame is a Connect; if the wait times out and the connect succeeds
        later, the session nobody holds is closed at once.
        """
        self.check_size(frame)
        with self.lock:
            refusal = self._refusal()
            if refusal is not None:
                raise refusal
            self.replies[req_id] = None
            try:
                self.socket.send(frame)
                reply = self._receive(req_id, timeout)
                self._settle()
                return reply
            except TimeoutError:
                if connect:
                    self._abandon(req_id)
                raise
            finally:
                self.replies.pop(req_id, None)
                self.last_used = time.monotonic()

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
            refusal = self._refusal()
            if refusal is not None:
                raise refusal
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

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.socket.close()


class DirectConnectionClosed(errors.ServerTerminated):
    """KErrServerTerminated for the requests and calls of a direct connection the server
    closed: it died, or it stopped serving the connection (the thread left too many answers
    unread). Its text says only that the server closed the connection."""

    def __str__(self) -> str:
        return f"KErrServerTerminated ({self.code}): {self.message}"


class DirectChannel(_LockedChannel):
    """A direct connection from one thread to one server's socket (`DirectSocket`), used only
    under `lock`; beside the thread's `Channel`, sharing the runtime's tables and waiting.

    It carries the Attach, Requests, Cancels and Closes of the sessions the thread created on
    the direct path, and their answers (Completed, Panicked). Its file descriptor is level
    triggered: a frame waiting keeps it readable, so a send needs no settle to re-arm it.
    """

    def __init__(self, runtime: Runtime, path: str, max_frame: int, timeout: float) -> None:
        """Connect to the server's socket `path`; raise OSError if that cannot be done."""
        self.runtime = runtime
        self.path = path
        self.max_frame = max_frame
        self.socket = DirectSocket(path, timeout)
        self.fd = self.socket.fd
        self.thread = threading.get_ident()  # the one thread whose sessions' calls it carries
        self.lock = threading.RLock()  # (reentrant, as the Channel's)
        self.pending = 0  # async requests sent here and not yet completed (under count_lock)
        self.watchers = 0  # other threads that may sleep on `fd` (under count_lock)
        self.count_lock = threading.Lock()
        self.poller = zmq.Poller()  # for threads waiting on this channel without the lock
        self.poller.register(self.fd, zmq.POLLIN)
        self.last_used = self.settled_at = time.monotonic()
        self.closed = False
        self.ended = False  # the server closed the connection (it died, or refused us)
        self.inherited = False  # closed in a forked child: the parent's (`forked`)
        self.replies: dict[int, Message | None] = {}  # sync calls in progress, as the Channel's
        self.loop_readers: dict[object, int] = {}
        # Cancels and Closes of other threads that found the socket full, in order, each with
        # the event to set once it has left (or the connection has gone): sent by whoever
        # holds the lock next (`_flush`), the owner or the I/O thread. Guarded by
        # `outbox_lock`, which is held only across a non-blocking send.
        self.outbox: deque[tuple[bytes, threading.Event]] = deque()
        self.outbox_lock = threading.Lock()
        self.shm: shm.Pool | None = None  # memfds for large descriptors, once one was sent

    def __repr__(self) -> str:
        state = " ended" if self.ended else " closed" if self.closed else ""
        return f"<DirectChannel {self.path} pending={self.pending}{state}>"

    def awaits_answers(self) -> bool:
        return bool(self.pending or self.outbox)

    def ended_error(self) -> errors.IpcError:
        return DirectConnectionClosed(
            f"the server closed this thread's direct connection ({self.path}); it may still "
            "serve (it closes a connection that leaves too many answers unread)"
        )

    def _refusal(self) -> errors.IpcError | None:
        """Why nothing can be sent here any more, or None. Call with the lock held."""
        if self.ended:
            return self.ended_error()
        if self.runtime.kernel_dead:
            return self.runtime.kernel_gone_error()
        if self.inherited:
            return errors.IpcError(
                errors.KErrDisconnected,
                f"the direct connection to {self.path} belongs to the parent process: a "
                "forked child cannot use it (connect a session of its own)",
            )
        if self.closed:
            return errors.IpcError(
                errors.KErrDisconnected, f"the direct connection to {self.path} was closed"
            )
        return None

    def _send(self, frame: bytes, fds: Sequence[int] = ()) -> None:
        """Send under the lock (with the file descriptors `fds`, if any). A full socket (a
        server that reads no more for now) is waited for, as long as the kernel lives; a
        connection that breaks ends (ServerTerminated)."""
        socket = self.socket
        try:
            while self.outbox and not self._flush():  # (what other threads posted goes first)
                if self.runtime.kernel_dead:
                    raise self.runtime.kernel_gone_error()
                socket.wait_writable(_SLICE)
            while not socket.send(frame, fds):
                if self.runtime.kernel_dead:
                    raise self.runtime.kernel_gone_error()
                socket.wait_writable(_SLICE)
        except OSError as exc:
            log.debug("the direct connection to %s failed: %s", self.path, exc)
            self._end()
            raise self.ended_error() from None

    def send(self, frame: bytes) -> threading.Event | None:
        """Send one small frame that expects no answer (a Cancel, a Close), from any thread,
        without the lock: a datagram send is atomic, so it never waits behind the owner's
        sync call. None once sent (or if the connection has ended or closed: its requests are
        all completed already). If the socket is full, the frame is queued for the owner or
        the I/O thread to send, in order; the event returned is set once it has left or the
        connection has gone."""
        self.check_size(frame)
        if self.ended or self.closed:
            return None
        with self.outbox_lock:
            if not self.outbox:
                try:
                    if self.socket.send(frame):
                        return None
                except (OSError, ValueError) as exc:  # (its reader will see the end)
                    log.debug("the direct connection to %s failed: %s", self.path, exc)
                    return None
            sent = threading.Event()
            self.outbox.append((frame, sent))
        self.runtime.nudge()  # the I/O thread sends it if the owner does not
        return sent

    def _flush(self) -> bool:
        """Send what other threads queued (`send`), in order; False if the socket filled up
        again. Call with the lock held. Raises OSError on a broken connection."""
        outbox = self.outbox
        while outbox:
            with self.outbox_lock:
                frame, sent = outbox[0]
                if not self.socket.send(frame):
                    return False
                outbox.popleft()
            sent.set()
        return True

    def _drop_outbox(self) -> None:
        """The connection has gone: nothing queued will be sent (its waiters go on)."""
        with self.outbox_lock:
            queued, self.outbox = self.outbox, deque()
        for _frame, sent in queued:
            sent.set()

    def send_async(self, frame: bytes, req_id: int, pending: Pending[AnyChannel],
                   fds: Sequence[int] = ()) -> None:
        """Send an async request, registered first: its answer may be read at once. With
        `DIRECT_MAX_UNREAD` pending here already, complete it with KErrServerBusy instead: the
        server closes a connection that leaves more answers than that unread (a paused
        thread's), so a thread within the limit is never cut off."""
        self.check_size(frame)
        runtime = self.runtime
        with self.lock:
            refusal = self._refusal()
            if refusal is not None:
                raise refusal
            busy = self.pending >= DIRECT_MAX_UNREAD
            if not busy:
                self._send_registered(frame, req_id, pending, fds)
        if busy:
            pending.complete(errors.KErrServerBusy, error=errors.IpcError(
                errors.KErrServerBusy,
                f"{DIRECT_MAX_UNREAD} asynchronous requests of this thread are pending on its "
                f"direct connection to {self.path}",
            ))
        elif self.pending == 1:
            runtime.first_pending()

    def _send_registered(self, frame: bytes, req_id: int, pending: Pending[AnyChannel],
                         fds: Sequence[int] = ()) -> None:
        """Register and send an async request (with the file descriptors `fds`, if any). Call
        with the lock held."""
        runtime = self.runtime
        runtime.state.add(req_id, pending)
        with self.count_lock:
            self.pending += 1
        try:
            self._send(frame, fds)
        except BaseException:
            if runtime.state.take(req_id) is not None:  # withdrawn: it was never sent
                with self.count_lock:
                    self.pending -= 1
            raise
        now = self.last_used = time.monotonic()
        if now - self.settled_at > SETTLE_INTERVAL:
            self._settle()  # (the server's buffer for us is bounded: keep reading)

    def call(self, frame: bytes, req_id: int, timeout: float | None = None,
             fds: Sequence[int] = ()) -> Message:
        """Send `frame` (with the file descriptors `fds`, if any) and return the reply carrying
        `req_id`, holding the lock throughout."""
        self.check_size(frame)
        with self.lock:
            refusal = self._refusal()
            if refusal is not None:
                raise refusal
            self.replies[req_id] = None
            try:
                self._send(frame, fds)
                return self._receive(req_id, timeout)
            finally:
                self.replies.pop(req_id, None)
                self.last_used = time.monotonic()

    def _receive(self, req_id: int, timeout: float | None) -> Message:
        deadline = None if timeout is None else time.monotonic() + timeout
        socket = self.socket
        while True:
            reply = self.replies.get(req_id)
            if reply is not None:
                return reply  # read by a nested settle, or ended by a Close
            if self.ended:
                raise self.ended_error()
            if self.closed:
                raise self._refusal() or self.ended_error()
            wait = _SLICE if deadline is None else min(_SLICE, deadline - time.monotonic())
            try:
                if self.outbox:
                    self._flush()  # (queued by other threads during this call)
                frame = socket.wait_readable(max(wait, 0.0))
            except OSError as exc:
                log.debug("the direct connection to %s failed: %s", self.path, exc)
                frame = b""
            if frame is None:
                if self.runtime.kernel_dead:
                    raise self.runtime.kernel_gone_error()
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"no reply within {timeout} s")
                continue
            if not frame:
                self._end()
                continue
            self._dispatch_frame(frame)

    def _settle(self) -> None:
        """Read and dispatch everything waiting. Call with the lock held."""
        self.settled_at = time.monotonic()
        while not self.closed:
            try:
                if self.outbox:
                    self._flush()
                frame = self.socket.receive()
            except OSError as exc:
                log.debug("the direct connection to %s failed: %s", self.path, exc)
                frame = b""
            if frame is None:
                return
            if not frame:
                self._end()
                return
            self._dispatch_frame(frame)

    def _dispatch_frame(self, frame: bytes) -> None:
        try:
            reply = decode(frame)
        except ProtocolError as exc:
            log.error("dropping a malformed frame from the server at %s: %s", self.path, exc)
            return
        req_id = getattr(reply, "req_id", None)
        if req_id in self.replies:
            self.replies[req_id] = reply  # (a sync call made here)
        elif type(reply) is Completed:
            # Only a request sent on this connection: a server cannot complete another's.
            error = server_error(reply.value, reply.text) if reply.text else None
            if not self.runtime.complete(reply.req_id, reply.value, reply.writes, error, on=self):
                self._foreign(reply)
        elif type(reply) is Panicked:
            self.runtime.panicked(reply, on=self)
        elif type(reply) is MappedCompleted:  # (its memory copied back by shm.MappedPending)
            writes = shm.Answered(reply.writes)
            error = server_error(reply.value, reply.text) if reply.text else None
            if not self.runtime.complete(reply.req_id, reply.value, writes, error, on=self):
                self._foreign(reply)
        else:
            log.error("unexpected %s from the server at %s", type(reply).__name__, self.path)

    def _foreign(self, reply: Completed | MappedCompleted) -> None:
        if self.runtime.state.pending.get(reply.req_id) is not None:
            log_once("foreign-completion", "dropping a completion from the server at %s of a "
                     "request not sent on its connection", self.path)

    def _end(self) -> None:
        """The server closed the connection (EOF or error): its requests still pending
        complete with KErrServerTerminated. Call with the lock held."""
        if not self.ended:
            self.ended = True
            self._drop_outbox()
            self.runtime.retire_direct(self, self.ended_error)

    def forked(self) -> None:
        """In a forked child: close the inherited socket, sending nothing, and refuse every
        later use (KErrDisconnected). The connection is the parent's: the server must see it
        end when the parent does. Takes no lock: a thread that held one did not survive the
        fork, so fresh locks replace them."""
        self.lock = threading.RLock()
        self.count_lock = threading.Lock()
        self.inherited = self.closed = True
        self.outbox_lock = threading.Lock()
        self.outbox = deque()
        self.socket.close()
        if self.shm is not None:
            self.shm.forked()

    def close(self) -> None:
        """Close the socket (the lock held or not: a thread's end, the kernel's death)."""
        with self.lock:
            if not self.closed:
                self.closed = True
                with self.outbox_lock:  # (not while another thread sends on it)
                    self.socket.close()
                self._drop_outbox()
                if self.shm is not None:
                    self.shm.close()


AnyChannel: TypeAlias = Channel | DirectChannel
"""Where a request's answer arrives: the thread's channel to the kernel, or a direct one."""


class _ThreadSentinel:
    """Lives in a thread's local storage: when the thread ends, its channel and its direct
    connections (server socket path -> connection) are retired, and the routes it chose for
    direct sessions are forgotten (its ident may be reused by a later thread)."""

    def __init__(self, runtime: Runtime, channel: Channel) -> None:
        self.runtime = weakref.ref(runtime)
        self.channel = channel
        self.thread = threading.get_ident()
        self.direct: dict[str, DirectChannel] = {}
        self.routes: list[tuple[weakref.ref[SessionLife[Runtime]], DirectChannel | None]] = []
        self._prune_at = _ROUTES_KEPT
        # Sessions whose Join timed out: when to ask again, and the wait after that one.
        self.join_after: weakref.WeakKeyDictionary[SessionLife[Runtime], tuple[float, float]] = (
            weakref.WeakKeyDictionary()
        )

    def route(self, life: SessionLife[Runtime], direct: DirectChannel | None) -> None:
        """This thread's calls on `life`'s session take `direct` (None: the kernel path)."""
        life.set_route(self.thread, direct)
        self.routes.append((weakref.ref(life), direct))
        if len(self.routes) > self._prune_at:
            # Keep only the routes still in use (a closed session forgot them): a thread that
            # opens and closes sessions for ever keeps as many as it holds, not one per session.
            self.routes = [(ref, d) for ref, d in self.routes if _still_routes(ref, self.thread, d)]
            self._prune_at = max(_ROUTES_KEPT, 2 * len(self.routes))

    def __del__(self) -> None:
        for ref, direct in self.routes:
            life = ref()
            if life is not None:
                life.forget_route(self.thread, direct)
        runtime = self.runtime()
        if runtime is not None:
            for channel in list(self.direct.values()):
                runtime.retire_direct(channel, _thread_ended)
            runtime.retire(self.channel)


_ROUTES_KEPT = 64  # a thread's sentinel keeps this many routes before it drops unused ones


def _still_routes(ref: weakref.ref[SessionLife[Runtime]], thread: int,
                  direct: DirectChannel | None) -> bool:
    life = ref()
    return life is not None and life.routes.get(thread, UNDECIDED) is direct


def _thread_ended() -> errors.IpcError:
    return errors.IpcError(errors.KErrDied, "the thread that made the request has ended")


class Runtime:
    """Per process and per kernel endpoint: the inbox thread, the channels, and the state
    (`ClientState`: pending requests, the holders of each session)."""

    _lock = threading.Lock()
    _instances: dict[tuple[int, str], Runtime] = {}

    @classmethod
    def for_endpoint(cls, endpoint: str | None = None) -> Runtime:
        """The live runtime for `endpoint` in this process, started on first use."""
        resolved = endpoints.resolve(endpoint)
        key = (os.getpid(), resolved)  # a forked child gets runtimes of its own
        with cls._lock:
            runtime = cls._instances.get(key)
            if runtime is None or runtime.kernel_dead:
                if runtime is not None:
                    runtime.close()  # its kernel died: a new one may be listening now
                runtime = cls(resolved)
                cls._instances[key] = runtime
            return runtime

    @classmethod
    def shutdown(cls, endpoint: str | None = None) -> None:
        """Stop this process's runtime for `endpoint`; its sessions become unusable."""
        key = (os.getpid(), endpoints.resolve(endpoint))
        with cls._lock:
            runtime = cls._instances.pop(key, None)
        if runtime is not None:
            runtime.close()

    @classmethod
    def shutdown_all(cls) -> None:
        """Stop every runtime of this process (at interpreter exit)."""
        with cls._lock:
            runtimes = [r for (pid, _), r in cls._instances.items() if pid == os.getpid()]
            cls._instances.clear()
        for runtime in runtimes:
            runtime.close()

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        path = endpoints.ipc_path(endpoint)
        if not os.path.exists(path):
            raise errors.IpcError(
                errors.KErrCouldNotConnect,
                f"no ipcfw kernel at {endpoint} (start one with `ipcfw kernel`)",
            )
        self.context = zmq.Context()
        self.context.linger = 1000  # let a last Close reach the kernel when a thread ends
        # The runtime can no longer talk to its kernel: it died, or stopped serving this
        # process's inbox. `_gone_reason` says which (code, message), for `kernel_gone_error`.
        self.kernel_dead = False
        self._gone_reason: tuple[int, str] | None = None
        self._closed = False
        # pending requests, session holders
        self.state: ClientState[AnyChannel] = ClientState(threading.Lock())
        self.channels: set[Channel] = set()
        self.direct_channels: set[DirectChannel] = set()  # every thread's direct connections
        self.completions = threading.Condition()  # for waiters who cannot settle themselves
        self.blocked_waiters = 0
        self._req_ids = itertools.count(1)
        self._local = threading.local()
        self._inbox = _Inbox(self)
        self._inbox.start_and_wait()

    def forked(self) -> None:
        """In a forked child (`_after_fork_in_child`): close every direct connection inherited
        from the parent, sending nothing; calls on them then fail (KErrDisconnected). The
        child's own sessions use a runtime of its own (`for_endpoint` keys them by pid)."""
        for direct in list(self.direct_channels):
            direct.forked()
        self.direct_channels.clear()

    def next_req_id(self) -> int:
        return next(self._req_ids)

    def channel(self) -> Channel:
        """The calling thread's channel, created on first use."""
        if self.kernel_dead:
            raise self.kernel_gone_error()
        if self._closed:
            raise errors.IpcError(
                errors.KErrDisconnected, f"the client runtime for {self.endpoint} was shut down"
            )
        return self._sentinel().channel

    def _sentinel(self) -> _ThreadSentinel:
        """The calling thread's sentinel, with its channel (created on first use)."""
        sentinel = getattr(self._local, "sentinel", None)
        if sentinel is None:
            channel = Channel(self)
            self.channels.add(channel)
            sentinel = self._local.sentinel = _ThreadSentinel(self, channel)
        elif sentinel.channel.dropped is not None:
            # The kernel stopped serving the old one: the I/O thread reads it to its end.
            old, sentinel.channel = sentinel.channel, Channel(self)
            self.channels.add(sentinel.channel)
            with old.lock:
                old.replaced = True
                self._close_if_finished(old)
        return sentinel

    def attach_direct(
        self, path: str, ticket: bytes, handle: int, timeout: float | None
    ) -> DirectChannel | None:
        """Attach session `handle` to the calling thread's direct connection to the server
        socket `path` (made on first use), with the `ticket` its Connected carried. Returns
        the connection, or None if it cannot be made or the Attach fails: the session then
        stays on the kernel path (logged at debug)."""
        if not endpoints.in_kernel_dir(self.endpoint, path):
            log.debug("the server socket %r is not in the kernel's directory: session 0x%x "
                      "stays on the kernel path", path, handle)
            return None
        wait = ATTACH_TIMEOUT if timeout is None else min(timeout, ATTACH_TIMEOUT)
        sentinel = self._sentinel()
        channel = sentinel.direct.get(path)
        if channel is None or channel.closed:
            try:
                channel = DirectChannel(self, path, sentinel.channel.max_frame, wait)
            except OSError as exc:
                log.debug("no direct connection to %s (%s): session 0x%x stays on the kernel "
                          "path", path, exc, handle)
                return None
            sentinel.direct[path] = channel
            self.direct_channels.add(channel)
        req_id = self.next_req_id()
        try:
            reply = channel.call(encode(Attach(req_id, ticket)), req_id, wait)
        except TimeoutError:
            # It may attach later: its Close must then reach the server (rule 6).
            self.state.attach_direct(handle, channel)
            log.debug("the server at %s did not answer Attach within %s s: session 0x%x stays "
                      "on the kernel path", path, wait, handle)
            return None
        except errors.IpcError as exc:
            log.debug("Attach to %s failed (%s): session 0x%x stays on the kernel path",
                      path, exc, handle)
            return None
        if type(reply) is Completed and reply.value == handle:
            self.state.attach_direct(handle, channel)
            return channel
        log.debug("the server at %s refused Attach (%r): session 0x%x stays on the kernel path",
                  path, reply, handle)
        return None

    def route(self, life: SessionLife[Runtime], direct: DirectChannel | None) -> None:
        """The calling thread's calls on `life`'s session take `direct` (None: the kernel
        path) from now on, until the thread ends."""
        self._sentinel().route(life, direct)

    def join(self, life: SessionLife[Runtime], handle: int) -> DirectChannel | None:
        """The calling thread's first use of direct session `handle` (held by `life`): ask the
        kernel for a ticket of its own (Join: it attaches the thread, as a request would) and
        attach the session to the thread's direct connection to the server (made on first
        use, one per server socket). Returns the connection, or None for the kernel path,
        which the thread then keeps (logged at debug) unless the kernel refused the Join: the
        call then goes to the kernel, which answers it as it answers any refused request."""
        sentinel = self._sentinel()
        existing = sentinel.direct.get(life.direct_path)
        if existing is not None and not existing.closed and self.state.is_attached(
                existing, handle):
            sentinel.route(life, existing)  # (another RSession of this process, same handle)
            return existing
        retry = sentinel.join_after.get(life)
        if retry is not None and time.monotonic() < retry[0]:
            return None  # the last Join timed out: the kernel path until it is time to ask again
        req_id = self.next_req_id()
        try:
            reply = sentinel.channel.call(encode(Join(req_id, handle)), req_id, ATTACH_TIMEOUT)
        except TimeoutError:
            # (The server's loop was busy: a Join is asked again later, each wait twice the
            # last, so that a thread does not stay on the kernel path for good.)
            wait = _JOIN_RETRY if retry is None else min(2 * retry[1], _JOIN_RETRY_MOST)
            sentinel.join_after[life] = (time.monotonic() + wait, wait)
            log.debug("the kernel did not answer Join within %s s: session 0x%x takes the "
                      "kernel path for this thread, and asks again in %s s", ATTACH_TIMEOUT,
                      handle, wait)
            return None
        sentinel.join_after.pop(life, None)
        if type(reply) is not Connected or reply.result < 0:
            # Refused (a handle not held, a panicked session, the 255...): not kept; the call
            # goes to the kernel, which refuses it as it refuses any request (an async one
            # through its status).
            return None
        direct = None
        if reply.ticket:
            direct = self.attach_direct(reply.direct, reply.ticket, handle, None)
        else:
            log.debug("the server did not take a ticket for session 0x%x: it stays on the "
                      "kernel path for this thread", handle)
        sentinel.route(life, direct)
        return direct

    def retire_direct(
        self, channel: DirectChannel, error: Callable[[], errors.IpcError]
    ) -> None:
        """A direct connection ends (its thread ended, its server closed it, the kernel died):
        answers already read are delivered, its requests still pending complete with a new
        `error()`, and it closes."""
        if not channel.ended:
            channel.try_settle()
        _handles, requests = self.state.connection_ended(channel)
        for req_id in requests:
            failure = error()
            self.complete(req_id, failure.code, (), failure)
        self.direct_channels.discard(channel)
        channel.close()

    def kernel_gone_error(self) -> errors.IpcError:
        """The error of a call this runtime can no longer make (a new one each time)."""
        if self._gone_reason is not None:
            return errors.IpcError(*self._gone_reason)
        return errors.IpcError(
            errors.KErrServerTerminated, f"the ipcfw kernel at {self.endpoint} has gone"
        )

    # -- pending requests --------------------------------------------------------------------

    def all_channels(self) -> list[AnyChannel]:
        """Every channel and direct connection, taken at once (other threads change them)."""
        return [*list(self.channels), *list(self.direct_channels)]

    def nudge(self) -> None:
        """Wake the I/O thread (it settles the channels left to it, and sends their outbox)."""
        self._inbox.wake()

    def first_pending(self) -> None:
        """A channel has its first pending request: wake the I/O thread if it sleeps with no
        timeout (it settles channels left idle), not otherwise: a wake-up costs the writer a
        syscall and the I/O thread a turn for the GIL, on every burst of requests."""
        if self._inbox.sleeps_for_good:
            self._inbox.wake()

    def complete(
        self, req_id: int, value: int, writes: Sequence[tuple[int, bytes]] = (),
        error: BaseException | None = None, *, on: DirectChannel | None = None,
    ) -> bool:
        """Complete a pending async request, once; a late or unknown completion is dropped
        (False). `on`: the direct connection the answer came on; a request sent elsewhere is
        not completed (False).

        Any thread may call it (settling, Close, a dead kernel): it never waits for socket I/O.
        """
        pending = self.state.take(req_id) if on is None else self.state.take_on(req_id, on)
        if pending is None:
            return False  # completed already (or, `on`, not sent there)
        channel = pending.channel
        # Counted down before the callbacks run: one may send again on this channel, and must
        # then see the count it would see had the completion come first (send_async's nudge).
        with channel.count_lock:
            channel.pending -= 1
        pending.complete(value, writes, error)
        if self.blocked_waiters:
            with self.completions:
                self.completions.notify_all()
        return True

    def panicked(self, reply: Panicked, on: DirectChannel | None = None) -> None:
        """A panic (from the kernel, or, `on`, from a direct connection: it may then only end
        a session attached to that connection, and only a request sent on it)."""
        panic = errors.ClientPanic(reply.category, reply.reason)
        if reply.session_dead:
            if on is None or self.state.is_attached(on, reply.handle):
                self.session_lost(reply.handle, panic)
            else:
                log_once("foreign-panic", "ignoring a panic from the server at %s of a session "
                         "not attached to its connection", on.path)
        self.complete(reply.req_id, errors.KErrDied, (), panic, on=on)

    def session_lost(self, handle: int, error: BaseException) -> None:
        """Every RSession of this process on `handle` is dead (server death or panic)."""
        for abort in self.state.session_lost(handle, error):
            abort.run()

    def attach_session(self, life: SessionLife[Runtime]) -> None:
        """An RSession holds `life.handle` now (its connect or Open succeeded): it learns of
        the session's loss from now on. `close_session` undoes it."""
        self.state.register(life)

    def requests_pending(self, life: SessionLife[Runtime]) -> int:
        """How many async requests of the RSession holding `life` are still pending."""
        return len(self.state.requests_of(life))

    def close_session(self, life: SessionLife[Runtime], handle: int, owner_gone: bool) -> None:
        """An RSession let go of `handle` (its Close): its requests still pending and its sync
        calls in flight on other threads complete with KErrSessionClosed; every direct
        connection attached to the handle is told, then the kernel, unless it ended the
        session already (it is gone, or, `owner_gone`, the unshared session's thread ended,
        and its channel's end closed the session)."""
        closing = self.state.close(life, handle, ended=self.kernel_dead or owner_gone)
        for req_id in closing.requests:
            self.complete(req_id, errors.KErrSessionClosed)
        for channel, answer in closing.answers:
            channel.end_call(answer.req_id, answer)  # (before the Close below waits for its lock)
        queued: list[threading.Event] = []
        if closing.direct:
            frame = encode(Close(handle))
            for direct in closing.direct:  # before the kernel's: Disconnect follows them all
                sent = direct.send(frame)  # (never waits for the connection's owner)
                if sent is not None:
                    queued.append(sent)
        if closing.tell_kernel:
            channel, frame = self.channel(), encode(Close(handle))
            if queued:  # a full socket: the kernel's Close follows once the direct ones left
                threading.Thread(
                    target=self._close_after, args=(queued, channel, frame),
                    name="ipcfw-close", daemon=True,
                ).start()
            else:
                channel.send(frame)

    def _close_after(self, queued: list[threading.Event], channel: Channel, frame: bytes) -> None:
        for sent in queued:
            while not sent.wait(_SLICE * 10):
                if self.kernel_dead or self._closed:
                    return
        if channel.closed:
            # The closing thread has ended meanwhile (its channel with it): this thread's own
            # carries the Close (any thread of a holding process may close a shared handle; an
            # unshared one ended with its thread's channel).
            channel = self.channel()
        channel.send(frame)

    def wait(self, waits: Sequence[tuple[W, AnyChannel | None]], timeout: float | None) -> W:
        """Block until one of the statuses in `waits` completes and return it; settle their
        channels (each status's, None if it has none) meanwhile.

        Raises TimeoutError after `timeout` seconds.
        """
        channels = {channel for _, channel in waits if channel is not None}
        # Watch before the first settle: a send on these channels from now on settles after
        # itself, so it cannot leave an answer unread behind a consumed FD signal.
        _add_watchers(channels, 1)
        try:
            return self._wait(waits, channels, timeout)
        finally:
            _add_watchers(channels, -1)

    def _wait(
        self, waits: Sequence[tuple[W, AnyChannel | None]], channels: set[AnyChannel],
        timeout: float | None,
    ) -> W:
        deadline = None if timeout is None else time.monotonic() + timeout
        poller: zmq.Poller | None = None
        while True:
            busy = False
            for status, channel in waits:
                if status.done():
                    return status
                if channel is not None and not channel.try_settle():
                    busy = True
            for status, _ in waits:
                if status.done():
                    return status
            remaining = _SLICE if deadline is None else min(_SLICE, deadline - time.monotonic())
            if remaining <= 0:
                raise TimeoutError(f"request still pending after {timeout} s")
            if busy:
                self._sleep_on_completions(waits, remaining)  # another thread settles for us
            else:
                poller = poller or _fd_poller(channels)
                poller.poll(int(remaining * 1000))

    def _sleep_on_completions(
        self, waits: Sequence[tuple[Waitable, AnyChannel | None]], seconds: float
    ) -> None:
        with self.completions:
            self.blocked_waiters += 1
            try:
                # (Checked again once counted: a completion just before went unnotified.)
                self.completions.wait_for(lambda: any(s.done() for s, _ in waits), seconds)
            finally:
                self.blocked_waiters -= 1

    # -- lifecycle ---------------------------------------------------------------------------

    def retire(self, channel: Channel) -> None:
        """The channel's thread ended: its socket closes now, which tells the kernel (its
        unshared sessions are disconnected), and requests still pending on it complete
        locally with KErrDied, as a thread's requests die with it in Symbian. (Answers that
        reached the channel before that are delivered first.)"""
        channel.try_settle()
        for req_id in self.state.requests_on(channel):
            self.complete(req_id, errors.KErrDied)
        self.channels.discard(channel)
        channel.close()

    def channel_dropped(self, routing_id: bytes, waiting: int) -> None:
        """The kernel stopped serving the channel with this routing id (its inbox notice)."""
        for channel in list(self.channels):
            if channel.routing_id == routing_id and channel.dropped is None:
                channel.dropped = (
                    f"the ipcfw kernel stopped serving this thread's channel: {waiting} answers "
                    "waited unread for it (the kernel's max_backlog)"
                )
                self.nudge()  # the I/O thread reads it up to the kernel's own notice

    def channel_ended(self, channel: Channel, waiting: int) -> None:
        """The kernel's notice was read from `channel`: no answer can follow it. Its requests
        still pending complete with KErrDisconnected; the channel closes if its thread has
        moved on to a new one. Called with the channel's lock held."""
        if channel.dropped is None:  # (the channel's notice overtook the inbox's)
            self.channel_dropped(channel.routing_id, waiting)
        channel.ended = True
        for req_id in self.state.requests_on(channel):
            self.complete(req_id, errors.KErrDisconnected, (), channel.dropped_error())
        self._close_if_finished(channel)

    def _close_if_finished(self, channel: Channel) -> None:
        """Close a dropped channel that has ended and been replaced. Call with its lock held."""
        if channel.ended and channel.replaced and not channel.closed:
            self.channels.discard(channel)
            channel.closed = True
            channel.socket.close()

    def kernel_died(self, lost: tuple[int, str] | None = None) -> None:
        """The kernel has gone (or, with `lost`, a code and message, stopped serving this
        process): every session is lost and every pending request fails with that error; the
        next call starts a new runtime."""
        self._gone_reason = lost
        self.kernel_dead = True
        for abort in self.state.every_session_lost(self.kernel_gone_error):
            abort.run()
        for req_id in list(self.state.pending):
            error = self.kernel_gone_error()
            self.complete(req_id, error.code, (), error)
        for direct in list(self.direct_channels):
            self.retire_direct(direct, self.kernel_gone_error)

    def close(self) -> None:
        """Stop the inbox thread and close every idle channel (tests, interpreter exit)."""
        self._closed = True
        self._inbox.stop()
        for req_id in list(self.state.pending):
            self.complete(req_id, errors.KErrDisconnected)
        self.close_channels()

    def close_channels(self) -> None:
        for direct in list(self.direct_channels):
            self.direct_channels.discard(direct)
            if direct.lock.acquire(timeout=1.0):  # a thread may still be in a call
                direct.close()
                direct.lock.release()
        for channel in list(self.channels):
            if channel.lock.acquire(timeout=1.0):  # a thread may still be in a call
                channel.closed = True
                channel.socket.close()
                channel.lock.release()
        self.channels.clear()


def _fd_poller(channels: set[AnyChannel]) -> zmq.Poller:
    if len(channels) == 1:
        return next(iter(channels)).poller
    poller = zmq.Poller()
    for channel in channels:
        poller.register(channel.fd, zmq.POLLIN)
    return poller


def _add_watchers(channels: Iterable[AnyChannel], delta: int) -> None:
    for channel in channels:
        with channel.count_lock:
            channel.watchers += delta


class _Inbox:
    """The runtime's I/O thread: owns the inbox socket, watches the kernel, settles idle
    channels."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._wakeup = WakePipe()
        self._stopping = False
        # True from before the thread looks for channels awaiting answers until its poll
        # returns, unless it found some (it then polls with a timeout): a channel's first
        # pending request wakes it only then (`Runtime.first_pending`).
        self.sleeps_for_good = False
        self.routing_id = b""  # the inbox socket's, once it is open
        self._thread = threading.Thread(target=self._main, name="ipcfw-inbox", daemon=True)

    def start_and_wait(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._wakeup.closed:
            return
        self._stopping = True
        self._wakeup.wake()  # harmless if the thread already ended (kernel died)
        self._thread.join(timeout=2.0)
        self._wakeup.close()

    def wake(self) -> None:
        self._wakeup.wake()

    def _main(self) -> None:
        socket = self.runtime.context.socket(zmq.DEALER)
        socket.routing_id = self.routing_id = os.urandom(16)
        socket.linger = 0
        socket.connect(self.runtime.endpoint)
        kernel_fd = None
        try:
            try:
                welcome = _hello(socket, Role.INBOX, self.runtime.endpoint)
                kernel_fd = os.pidfd_open(welcome.kernel_pid)
            except BaseException as exc:  # reported to the thread that started us
                self._error = exc
                return
            finally:
                self._ready.set()
            self._serve(socket, kernel_fd)
        finally:
            socket.close(linger=0)
            if kernel_fd is not None:
                os.close(kernel_fd)

    def _serve(self, socket: zmq.Socket[bytes], kernel_fd: int) -> None:
        while not self._stopping and not self.runtime.kernel_dead:
            poller = zmq.Poller()
            poller.register(socket, zmq.POLLIN)
            poller.register(kernel_fd, zmq.POLLIN)
            poller.register(self._wakeup.fd, zmq.POLLIN)
            watched = self._unattended_channels()
            for channel in watched:
                poller.register(channel.fd, zmq.POLLIN)
            self.sleeps_for_good = True  # (before looking: see __init__)
            waiting = any(c.awaits_answers() for c in self.runtime.all_channels())
            self.sleeps_for_good = not waiting
            try:
                ready = dict(poller.poll(int(IDLE * 1000) if waiting else None))
            except zmq.ZMQError:
                continue  # a watched channel was closed under us (its thread ended): look again
            finally:
                self.sleeps_for_good = False
            if self._wakeup.fd in ready:
                self._wakeup.drain()
            if socket in ready:
                self._drain(socket)
            for channel in watched:
                channel.try_settle()
            if kernel_fd in ready:
                self._drain(socket)
                log.warning("the ipcfw kernel at %s has died", self.runtime.endpoint)
                self.runtime.kernel_died()
                return

    def _unattended_channels(self) -> list[AnyChannel]:
        now = time.monotonic()
        return [
            c for c in self.runtime.all_channels()
            if not c.closed and c.awaits_answers() and now - c.last_used > IDLE
        ]

    def _drain(self, socket: zmq.Socket[bytes]) -> None:
        while socket.get(EVENTS) & POLLIN:  # type: ignore[operator]  # (as in Channel._settle)
            raw = socket.recv()
            try:
                self._dispatch(decode(raw))
            except ProtocolError as exc:
                log.error("dropping a malformed frame from the kernel: %s", exc)
            except Exception:  # a user callback raised: keep serving everyone else
                log.exception("error while handling a kernel notice")

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, SessionLost):
            self.runtime.session_lost(message.handle, _session_lost_error(message.code))
        elif isinstance(message, Dropped) and message.routing_id == self.routing_id:
            self._dropped(message.waiting)
        elif isinstance(message, Dropped):
            self.runtime.channel_dropped(message.routing_id, message.waiting)
        else:
            log.error("unexpected %s on the inbox", type(message).__name__)

    def _dropped(self, waiting: int) -> None:
        """The kernel stopped serving this inbox: the process can no longer learn of lost
        sessions, so the runtime ends. Closing its channels makes the kernel end its sessions."""
        log.error("the ipcfw kernel at %s stopped serving this process (%d notices waited unread "
                  "for it); its sessions have ended", self.runtime.endpoint, waiting)
        self.runtime.kernel_died((
            errors.KErrDisconnected,
            f"the ipcfw kernel at {self.runtime.endpoint} stopped serving this process: {waiting} "
            "notices waited unread for it; its sessions have ended",
        ))
        self.runtime.close_channels()


def _session_lost_error(code: int) -> errors.IpcError:
    if code == errors.KErrDisconnected:
        return errors.IpcError(
            code,
            "the ipcfw kernel stopped serving the thread that created this session (it left "
            "too many answers unread), and closed the session",
        )
    return errors.IpcError(code)


def _after_fork_in_child() -> None:
    """A forked child must not speak on its parent's direct connections (the server checked
    the parent's pid at Attach), nor keep them open once the parent has gone."""
    for runtime in list(Runtime._instances.values()):  # (no lock: see DirectChannel.forked)
        runtime.forked()


atexit.register(Runtime.shutdown_all)
os.register_at_fork(after_in_child=_after_fork_in_child)
