"""A fake kernel and a fake direct server, each a thread of the test process, for the client's
direct path (tests/client/test_direct_client.py). They start no process.

`FakeKernel` is a ROUTER socket that speaks just enough of protocol 10 to a client runtime:
Hello, Connect (answering a DIRECT one with the fake server's socket and a ticket), Join
(another thread's ticket), Share, Close, and Requests on the kernel path (echoed, and
recorded as served by the kernel).
`FakeServer` listens on a SOCK_SEQPACKET socket and answers Attach, Requests, Cancels and
Closes as the contract's server does; `kill()` closes every connection (a server's death).
`fake_world()` runs both and hands the tests a `World`.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import zmq

from ipcfw import RSession, errors
from ipcfw.client import runtime as client_runtime
from ipcfw.protocol import (
    MappedCompleted,
    MappedRequest,
    MAX_FRAME,
    PROTOCOL_VERSION,
    Attach,
    Cancel,
    Close,
    Completed,
    Connect,
    Connected,
    Hello,
    Join,
    Mode,
    Panicked,
    Path,
    Request,
    Share,
    Shared,
    Welcome,
    decode,
    encode,
)

# Functions both fakes serve.
EECHO = 1  # Completed(args[0])
EHOLD = 2  # completes only when cancelled (async), or at `release()`
EPANIC = 3  # Panicked, session dead
EWRITE = 4  # writes b"direct" (b"kernel") into descriptor 1, completes 0
EBUSY = 5  # KErrServerBusy


class FakeServer:
    """The server's side of direct connections, in a thread."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "d-fake")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(self.path)
        self.listener.listen(16)
        self.tickets: dict[bytes, int] = {}  # ticket -> handle
        self.connections: dict[int, socket.socket] = {}
        self.attached: dict[int, set[int]] = {}  # fd -> handles
        self.held: dict[int, tuple[int, int]] = {}  # req_id -> (fd, handle)
        self.events: list[tuple[Any, ...]] = []  # what it saw, in order
        self.eofs = 0
        self.accepted = 0  # connections, ever
        self.error: BaseException | None = None  # what ended its thread, if not kill()
        self._stop = False
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._main, name="fake-server", daemon=True)
        self._thread.start()

    def new_ticket(self, handle: int) -> bytes:
        ticket = os.urandom(16)
        self.tickets[ticket] = handle
        return ticket

    def release(self, req_id: int, value: int) -> None:
        """Complete a held request now (from the test's thread)."""
        with self._lock:
            fd, _handle = self.held.pop(req_id)
            self.connections[fd].send(encode(Completed(req_id, value, ())))

    def kill(self) -> None:
        """The server dies: every connection and the listener close."""
        with self._lock:
            stopped, self._stop = self._stop, True
            if not stopped:
                os.write(self._wake_w, b"x")
        self._thread.join(5)
        if self.error is not None:
            raise self.error

    def _main(self) -> None:
        try:
            while True:
                poll = select.poll()
                poll.register(self.listener, select.POLLIN)
                poll.register(self._wake_r, select.POLLIN)
                for fd in list(self.connections):
                    poll.register(fd, select.POLLIN)
                for fd, _ in poll.poll(1000):
                    with self._lock:
                        if self._stop:
                            return
                        if fd == self.listener.fileno():
                            conn, _ = self.listener.accept()
                            self.accepted += 1
                            self.connections[conn.fileno()] = conn
                            self.attached[conn.fileno()] = set()
                        elif fd in self.connections:
                            self._read(fd)
                with self._lock:
                    if self._stop:
                        return
        except BaseException as exc:
            self.error = exc
            self._stop = True
            raise
        finally:
            for conn in self.connections.values():
                conn.close()
            self.listener.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _read(self, fd: int) -> None:
        conn = self.connections[fd]
        frame = conn.recv(1 << 20)
        if not frame:
            self.eofs += 1
            self.events.append(("eof",))
            del self.connections[fd]
            conn.close()
            return
        message = decode(frame)
        self.events.append(message)
        attached = self.attached[fd]
        if isinstance(message, Attach):
            handle = self.tickets.pop(message.ticket, None)
            if handle is None:
                conn.send(encode(Completed(message.req_id, errors.KErrPermissionDenied, ())))
            else:
                attached.add(handle)
                conn.send(encode(Completed(message.req_id, handle, ())))
        elif isinstance(message, Close):
            attached.discard(message.handle)
        elif isinstance(message, Cancel):
            if message.req_id in self.held:
                del self.held[message.req_id]
                conn.send(encode(Completed(message.req_id, errors.KErrCancel, ())))
        elif isinstance(message, Request):
            reply = self._serve(fd, message, attached)
            if reply is not None:
                conn.send(encode(reply))
        elif isinstance(message, MappedRequest):  # (its memfds were dropped by recv: unread)
            conn.send(encode(MappedCompleted(message.req_id, 0, ())))

    def _serve(self, fd: int, request: Request, attached: set[int]) -> Any:
        req_id, handle = request.req_id, request.handle
        if handle not in attached:
            return Panicked(req_id, handle, "KERN-EXEC", 0, 0)
        if request.function == EBUSY:
            return Completed(req_id, errors.KErrServerBusy, ())
        if request.mode == Mode.BLIND:
            return Completed(req_id, errors.KErrNone, ())
        if request.function == EPANIC:
            return Panicked(req_id, handle, "TEST", 3, 1)
        if request.function == EWRITE:
            return Completed(req_id, 0, ((1, b"direct"),))
        if request.function == EHOLD:
            self.held[req_id] = (fd, handle)
            return None
        return Completed(req_id, request.args[0], ())


class FakeKernel:
    """Just enough of a kernel for a client runtime, in a thread; direct sessions get the
    socket of `server` (if any) and a ticket it knows."""

    def __init__(self, server: FakeServer | None, directory: str | None = None) -> None:
        self.directory = directory or tempfile.mkdtemp(prefix="dk", dir="/tmp")
        self.endpoint = f"ipc://{self.directory}/kernel"
        self.server = server
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.bind(self.endpoint)
        self.events: list[Any] = []
        self.served = 0  # requests served on the kernel path
        self.bad_tickets = False  # give tickets the server does not know
        self.no_join_tickets = False  # answer Join without a ticket (the server took none)
        # Hold Joins unanswered (a server's loop busy for long); answered once it is False.
        self.silent_joins = False
        self._held_joins: list[tuple[bytes, Join]] = []
        self.direct_handles: set[int] = set()
        self._next_handle = 0x100
        self._stop = False
        self._thread = threading.Thread(target=self._main, name="fake-kernel", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.socket.close()
        self.context.term()

    def _main(self) -> None:
        while not self._stop:
            if self._held_joins and not self.silent_joins:
                for routing_id, join in self._held_joins:
                    self.socket.send_multipart([routing_id, encode(self._answer(join))])
                self._held_joins = []
            if not self.socket.poll(20):
                continue
            routing_id, frame = self.socket.recv_multipart()
            message = decode(frame)
            self.events.append(message)
            if isinstance(message, Join) and self.silent_joins:
                self._held_joins.append((routing_id, message))
                continue
            reply = self._answer(message)
            if reply is not None:
                self.socket.send_multipart([routing_id, encode(reply)])

    def _answer(self, message: Any) -> Any:
        if isinstance(message, Hello):
            return Welcome(os.getpid(), MAX_FRAME, PROTOCOL_VERSION)
        if isinstance(message, Connect):
            self._next_handle += 1
            handle = self._next_handle
            if message.path == Path.DIRECT and self.server is not None:
                ticket = os.urandom(16) if self.bad_tickets else self.server.new_ticket(handle)
                self.direct_handles.add(handle)
                return Connected(message.req_id, 0, handle, b"", self.server.path, ticket)
            return Connected(message.req_id, 0, handle, b"")
        if isinstance(message, Join):
            handle = message.handle
            if handle not in self.direct_handles or self.no_join_tickets or self.server is None:
                return Connected(message.req_id, 0, handle, b"")
            ticket = os.urandom(16) if self.bad_tickets else self.server.new_ticket(handle)
            return Connected(message.req_id, 0, handle, b"", self.server.path, ticket)
        if isinstance(message, Share):
            return Shared(message.req_id, 0, b"")
        if isinstance(message, Request):
            self.served += 1
            if message.function == EWRITE:
                return Completed(message.req_id, 0, ((1, b"kernel"),))
            if message.mode == Mode.BLIND:
                return Completed(message.req_id, 0, ())
            return Completed(message.req_id, message.args[0], ())
        return None  # Close, Cancel: recorded only


class World:
    """A fake kernel and a fake server (and a client runtime to them: this process's)."""

    def __init__(self, kernel: FakeKernel, server: FakeServer) -> None:
        self.kernel, self.server = kernel, server
        self.endpoint = kernel.endpoint

    def connect(self, path: str = "direct", **kwargs: Any) -> RSession:
        return RSession.connect("fake", endpoint=self.endpoint, path=path, timeout=5, **kwargs)

    def direct_requests(self) -> list[Request]:
        return [e for e in self.server.events if isinstance(e, Request)]


@contextlib.contextmanager
def fake_world(kernel_class: type[FakeKernel] = FakeKernel) -> Iterator[World]:
    """A `World` in a private directory, stopped for sure (the runtime to it first)."""
    directory = tempfile.mkdtemp(prefix="dk", dir="/tmp")
    server = FakeServer(directory)
    kernel = kernel_class(server, directory)
    try:
        yield World(kernel, server)
    finally:
        client_runtime.Runtime.shutdown(kernel.endpoint)
        server.kill()
        kernel.stop()
        shutil.rmtree(directory, ignore_errors=True)

