"""A thread's direct connection to a server's process (`DirectChannel`), over its socket
(`ipcfw.client.direct.DirectSocket`), and `AnyChannel`, where a request's answer arrives.

How direct connections are made, attached, used and ended is in `ipcfw.client.runtime`'s
docstring ("Direct connections"); a connection keeps a channel's rules
(`ipcfw.client.channel.LockedChannel`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, TypeAlias

import zmq

from .. import errors
from ..protocol import (
    BATCH_MARK,
    DIRECT_ANSWER_OVERHEAD,
    DIRECT_MAX_UNREAD,
    SHARED_OVER,
    Completed,
    MappedCompleted,
    Message,
    Panicked,
    ProtocolError,
    decode,
    direct_unread_bytes,
    unpack_batch,
)
from . import shm
from .channel import SETTLE_INTERVAL, SLICE, Channel, Host, LockedChannel
from .direct import DirectSocket
from .state import Pending, log_once, server_error

log = logging.getLogger("ipcfw.client")


class DirectConnectionClosed(errors.ServerTerminated):
    """KErrServerTerminated for the requests and calls of a direct connection the server
    closed: it died, or it stopped serving the connection (the thread left too many answers
    unread). Its text says only that the server closed the connection."""

    def __str__(self) -> str:
        return f"KErrServerTerminated ({self.code}): {self.message}"


class DirectChannel(LockedChannel):
    """A direct connection from one thread to one server's socket (`DirectSocket`), used only
    under `lock`; beside the thread's `Channel`, sharing the runtime's tables and waiting.

    It carries the Attach, Requests, Cancels and Closes of the sessions the thread created on
    the direct path, and their answers (Completed, Panicked). Its file descriptor is level
    triggered: a frame waiting keeps it readable, so a send needs no settle to re-arm it.
    """

    def __init__(self, runtime: Host, path: str, max_frame: int, timeout: float) -> None:
        """Connect to the server's socket `path`; raise OSError if that cannot be done."""
        self.runtime = runtime
        self.path = path
        self.max_frame = max_frame
        self.max_owed = direct_unread_bytes(max_frame)  # (the server's bound: see send_async)
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

    def _transmit(self, frame: bytes, fds: Sequence[int] = ()) -> None:
        """Send under the lock (with the file descriptors `fds`, if any). A full socket (a
        server that reads no more for now) is waited for, as long as the kernel lives; a
        connection that breaks ends (ServerTerminated)."""
        socket = self.socket
        try:
            while self.outbox and not self._flush():  # (what other threads posted goes first)
                if self.runtime.kernel_dead:
                    raise self.runtime.kernel_gone_error()
                socket.wait_writable(SLICE)
            while not socket.send(frame, fds):
                if self.runtime.kernel_dead:
                    raise self.runtime.kernel_gone_error()
                socket.wait_writable(SLICE)
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

    def _busy(self, pending: Pending[Any]) -> errors.IpcError | None:
        """KErrServerBusy with `DIRECT_MAX_UNREAD` requests pending here already, or answers
        of more bytes than the server's bound owed (`direct_unread_bytes`: each pending
        request's writable descriptors carried in its answer's frame, and
        `DIRECT_ANSWER_OVERHEAD`): the server closes a connection that leaves more than either
        unread (a paused thread's), so a thread within the limits is never cut off."""
        owed = pending.owed = DIRECT_ANSWER_OVERHEAD + sum(
            n for n in pending.limits.values() if n < SHARED_OVER  # (larger: shared memory)
        )
        if self.pending >= DIRECT_MAX_UNREAD:
            why = f"{DIRECT_MAX_UNREAD} asynchronous requests of this thread are pending"
        elif self.owed + owed > self.max_owed:
            why = (f"the answers to this thread's pending asynchronous requests may take "
                   f"{self.owed} bytes, and this one's {owed} more would pass the server's "
                   f"bound of {self.max_owed} bytes unread")
        else:
            return None
        return errors.IpcError(errors.KErrServerBusy,
                               f"{why} on its direct connection to {self.path}")

    def _settles_after_send(self, now: float) -> bool:
        # (level triggered: no FD to re-arm; but the server's buffer for us is bounded)
        return now - self.settled_at > SETTLE_INTERVAL

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
            wait = SLICE if deadline is None else min(SLICE, deadline - time.monotonic())
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
        if frame[0] == BATCH_MARK:  # several answers in one datagram
            try:
                frames = unpack_batch(frame)
            except ProtocolError as exc:
                log.error("dropping a malformed batch from the server at %s: %s", self.path, exc)
                return
            for one in frames:
                self._dispatch_one(one)
        else:
            self._dispatch_one(frame)

    def _dispatch_one(self, frame: bytes) -> None:
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
