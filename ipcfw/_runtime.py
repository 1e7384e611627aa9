"""The client runtime of one process: its sockets, its I/O thread, its pending requests.

Theory of operation
-------------------
zmq sockets must never be used by two threads, and a Python thread hand-off costs 10-20 us, so
the runtime avoids hand-offs on the paths that matter:

* Each thread that makes a call gets its own DEALER socket, its **channel** (created on first use,
  closed when the thread ends). Every request leaves on the calling thread's channel, so requests
  from one thread reach the kernel, and the server, in the order they were made. A synchronous
  call waits for its reply on the same channel, in the same thread: one send, one receive, no
  hand-off.
* Each process has one **inbox**: a DEALER socket owned by the runtime's I/O thread
  (``ipcfw-inbox``). The kernel sends asynchronous completions and notices (a session lost
  because its server died) to the inbox, so they are delivered whichever thread is busy, and
  `TRequestStatus` callbacks, waits and ``await`` work from any thread.
* The kernel's pid arrives in its Welcome; the I/O thread polls a pidfd on it, so a dead kernel is
  noticed within milliseconds and every waiter is released with an error.

Routing ids are random 128-bit values: the kernel never trusts them as identity (it reads the
process credentials the transport gives it), but a random id cannot collide with libzmq's own.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
import weakref
from typing import Any, Callable, Optional

import zmq

from . import endpoint as endpoints
from . import errors
from ._zmqflags import EVENTS, POLLIN
from .protocol import (
    PROTOCOL_VERSION,
    Completed,
    Hello,
    Message,
    Panicked,
    ProtocolError,
    Role,
    SessionLost,
    Welcome,
    decode,
    encode,
)

log = logging.getLogger("ipcfw.client")

HELLO_TIMEOUT = 5.0  # seconds to wait for a Welcome before declaring the kernel unreachable
_SLICE_MS = 200  # a waiting channel wakes this often to notice a dead kernel


class KernelGone(Exception):
    """Internal: the kernel went away while we waited. Turned into an IpcError for users."""


class Pending:
    """An asynchronous request the inbox will complete: its status and writable buffers."""

    __slots__ = ("status", "session", "buffers")

    def __init__(self, status: Any, session: Any, buffers: dict) -> None:
        self.status = status
        self.session = session
        self.buffers = buffers


def _hello(socket: zmq.Socket, role: Role, endpoint: str) -> Welcome:
    socket.send(encode(Hello(int(role), PROTOCOL_VERSION)))
    if not socket.poll(int(HELLO_TIMEOUT * 1000)):
        raise errors.IpcError(
            errors.KErrCouldNotConnect,
            f"no ipcfw kernel answered at {endpoint} within {HELLO_TIMEOUT:.0f} s",
        )
    reply = decode(socket.recv())
    if type(reply) is not Welcome:
        raise errors.IpcError(errors.KErrCouldNotConnect, f"kernel answered Hello with {reply!r}")
    return reply


def _kernel_gone_error(endpoint: str) -> errors.IpcError:
    return errors.IpcError(errors.KErrServerTerminated, f"the ipcfw kernel at {endpoint} has gone")


class Channel:
    """One thread's DEALER socket to the kernel. Only its thread may use it."""

    def __init__(self, runtime: "Runtime") -> None:
        self.runtime = runtime
        self.socket = runtime.context.socket(zmq.DEALER)
        self.socket.routing_id = os.urandom(16)
        self.socket.rcvtimeo = _SLICE_MS
        self.socket.connect(runtime.endpoint)
        try:
            welcome = _hello(self.socket, Role.CHANNEL, runtime.endpoint)
        except BaseException:
            self.socket.close(linger=0)
            raise
        self.max_frame = welcome.max_frame

    def send(self, frame: bytes) -> None:
        if len(frame) > self.max_frame:
            raise ValueError(
                f"request of {len(frame)} bytes exceeds the kernel's limit of {self.max_frame} bytes"
            )
        self.socket.send(frame)

    def call(self, frame: bytes, req_id: int, timeout: Optional[float] = None) -> Message:
        """Send `frame` and return the reply carrying `req_id`; drop stale replies."""
        self.send(frame)
        return self.wait_reply(req_id, timeout)

    def wait_reply(self, req_id: int, timeout: Optional[float]) -> Message:
        waited = 0.0
        while True:
            try:
                raw = self.socket.recv()
            except zmq.Again:
                if self.runtime.kernel_dead:
                    raise KernelGone() from None
                waited += _SLICE_MS / 1000
                if timeout is not None and waited >= timeout:
                    raise TimeoutError(f"no reply within {timeout} s") from None
                continue
            reply = decode(raw)
            if getattr(reply, "req_id", None) == req_id:
                return reply
            log.debug("dropping a late reply on a channel: %r", reply)

    def close(self) -> None:
        self.socket.close()


class _ThreadChannels(threading.local):
    channel: Optional[Channel] = None

    def __del__(self) -> None:
        # The thread is ending: its socket closes, and the kernel sees the disconnect.
        channel = self.channel
        if channel is not None:
            channel.close()


class Runtime:
    """Per process and per kernel endpoint: the inbox thread, channels and pending requests."""

    _lock = threading.Lock()
    _instances: dict[tuple[int, str], "Runtime"] = {}

    @classmethod
    def for_endpoint(cls, endpoint: Optional[str] = None) -> "Runtime":
        """The live runtime for `endpoint` in this process, started on first use."""
        resolved = endpoints.resolve(endpoint)
        key = (os.getpid(), resolved)  # a forked child gets runtimes of its own
        with cls._lock:
            runtime = cls._instances.get(key)
            if runtime is None or runtime.kernel_dead:
                runtime = cls(resolved)
                cls._instances[key] = runtime
            return runtime

    @classmethod
    def shutdown(cls, endpoint: Optional[str] = None) -> None:
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
        self.kernel_dead = False
        self._closed = False
        self.pending: dict[int, Pending] = {}
        self.sessions: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
        self._req_ids = itertools.count(1)
        self._channels = _ThreadChannels()
        self._inbox = _Inbox(self)
        self._inbox.start_and_wait()

    def next_req_id(self) -> int:
        return next(self._req_ids)

    def channel(self) -> Channel:
        """The calling thread's channel, created on first use."""
        if self.kernel_dead:
            raise _kernel_gone_error(self.endpoint)
        if self._closed:
            raise errors.IpcError(errors.KErrDisconnected, f"the client runtime for {self.endpoint} was shut down")
        channel = self._channels.channel
        if channel is None:
            channel = self._channels.channel = Channel(self)
        return channel

    def kernel_gone_error(self) -> errors.IpcError:
        return _kernel_gone_error(self.endpoint)

    def complete(self, req_id: int, value: int, writes: tuple = (), panic: Any = None) -> None:
        """Complete a pending async request (called by the inbox, or locally on Close)."""
        pending = self.pending.pop(req_id, None)
        if pending is None:
            return  # completed locally already (Close, timeout): a late completion is dropped
        for index, data in writes:
            buffer = pending.buffers.get(index)
            if buffer is not None:
                buffer[:] = data
        pending.session._forget_request(req_id)
        pending.status._complete(value, panic)

    def kernel_died(self) -> None:
        self.kernel_dead = True
        error = self.kernel_gone_error()
        for session in list(self.sessions.values()):
            session._lost(error)
        for req_id in list(self.pending):
            self.complete(req_id, errors.KErrServerTerminated)

    def close(self) -> None:
        """Stop the inbox thread and close this thread's channel (tests, interpreter exit)."""
        self._closed = True
        self._inbox.stop()
        channel = self._channels.channel
        if channel is not None:
            self._channels.channel = None
            channel.close()


class _Inbox:
    """The runtime's I/O thread: owns the inbox socket, completes async requests."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._main, name="ipcfw-inbox", daemon=True)

    def start_and_wait(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._wake_w < 0:
            return
        os.write(self._wake_w, b"x")  # ignored if the thread already ended (kernel died)
        self._thread.join(timeout=2.0)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1

    def _main(self) -> None:
        socket = self.runtime.context.socket(zmq.DEALER)
        socket.routing_id = os.urandom(16)
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

    def _serve(self, socket: zmq.Socket, kernel_fd: int) -> None:
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(kernel_fd, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if socket in ready:
                self._drain(socket)
            if kernel_fd in ready:
                self._drain(socket)
                log.warning("the ipcfw kernel at %s has died", self.runtime.endpoint)
                self.runtime.kernel_died()
                return
            if self._wake_r in ready:
                return

    def _drain(self, socket: zmq.Socket) -> None:
        while socket.get(EVENTS) & POLLIN:
            raw = socket.recv()
            try:
                self._dispatch(decode(raw))
            except ProtocolError as exc:
                log.error("dropping a malformed frame from the kernel: %s", exc)
            except Exception:  # a user callback raised: keep serving everyone else
                log.exception("error while completing a request")

    def _dispatch(self, message: Message) -> None:
        kind = type(message)
        if kind is Completed:
            self.runtime.complete(message.req_id, message.value, message.writes)
        elif kind is Panicked:
            panic = errors.ClientPanic(message.category, message.reason)
            session = self.runtime.sessions.get(message.handle)
            if session is not None and message.session_dead:
                session._lost(panic)
            self.runtime.complete(message.req_id, errors.KErrDied, (), panic)
        elif kind is SessionLost:
            session = self.runtime.sessions.get(message.handle)
            if session is not None:
                session._lost(errors.IpcError(message.code))
        else:
            log.error("unexpected %s on the inbox", kind.__name__)



atexit.register(Runtime.shutdown_all)
