"""The server's direct port: its side of the direct path's sockets, for one registration.

A SOCK_SEQPACKET listening socket in the kernel socket's private directory, registered with the
kernel (`Register.direct`), and the connections accepted on it, each polled by the host's loop
beside the kernel socket. The port reads and decodes their frames and hands them to the
state's direct rules (`ipcfw.server.direct`), and sends what the rules give it without
blocking: a connection whose peer does not read keeps an outbox of at most `DIRECT_OUTBOX`
frames, past which it is closed. Completions made on other threads go through the port's own
outbox to the loop, as the kernel's go through the host's.
"""

from __future__ import annotations

import collections
import errno
import logging
import mmap
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

import zmq

from .. import endpoint as endpoints
from .. import errors
from ..protocol import Completed, ProtocolError, decode, encode
from .direct import DirectConnection, DirectRules
from .message import DirectMessage

log = logging.getLogger("ipcfw.server")

__all__ = ["DirectPort", "DIRECT_OUTBOX"]

DIRECT_OUTBOX = 1000  # frames a direct connection may leave unread before it is closed
_DIRECT_BATCH = 64  # frames read from one direct connection per turn of the loop
_DIRECT_CONNECTIONS = 1024  # direct connections at once; more are closed as they come
_DIRECT_SNDBUF = 4 << 20  # asked for on each connection (the OS caps it: net.core.wmem_max)
_PEERCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


class Link:
    """One accepted direct connection: its socket, its state in the rules, and the frames
    waiting for its peer to read (sends never block)."""

    __slots__ = ("sock", "fd", "connection", "outbox", "closing")

    def __init__(self, sock: socket.socket, connection: DirectConnection) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.connection = connection
        self.outbox: collections.deque[bytes] = collections.deque()
        self.closing = False


class DirectPort:
    """The host's direct path for one registration (see the module docstring): its listening
    socket, its connections and the completions made on other threads. It is the `DirectIO`
    of the registration's direct rules. Everything but `post` runs on the loop thread."""

    def __init__(self, name: str, on_loop_thread: Callable[[], bool],
                 wake: Callable[[], None]) -> None:
        self.path = ""  # the listening socket, once open
        self.rules: DirectRules | None = None
        self.max_frame = 0
        self._name = name  # the server's, for log lines
        self._on_loop_thread = on_loop_thread
        self._wake = wake  # the loop's wake-up: it then calls `flush`
        self._listener: socket.socket | None = None
        self._poller: zmq.Poller | None = None
        self._links: dict[int, Link] = {}  # by fd
        self._closing: list[Link] = []
        self._outbox: collections.deque[tuple[DirectConnection, DirectMessage, bytes]] = (
            collections.deque()
        )
        self._buffer: mmap.mmap | None = None  # pages are only touched by the frames read

    def open(self, directory: str) -> None:
        """Make the listening socket in `directory` (the kernel's, private); on failure, log at
        debug and stay closed (the server registers without the direct path)."""
        path = os.path.join(directory, f"d-{os.urandom(6).hex()}")
        if len(path) > endpoints.IPC_PATH_MAX:
            log.debug("no direct path for server %r: %s is too long for a Unix socket",
                      self._name, path)
            return
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.setblocking(False)
            listener.bind(path)
            os.chmod(path, 0o600)
            listener.listen(64)
        except OSError as exc:
            log.debug("no direct path for server %r: %s: %s", self._name, path, exc)
            listener.close()
            if os.path.exists(path):
                os.unlink(path)
            return
        self._listener, self.path = listener, path

    def watch(self, poller: zmq.Poller) -> None:
        """Poll the listener (and, later, each connection) with the loop's `poller`."""
        self._poller = poller
        if self._listener is not None:
            poller.register(self._listener.fileno(), zmq.POLLIN)

    def close(self) -> None:
        """End the direct path: close every connection and the listener, remove its socket."""
        for link in list(self._links.values()):
            self._forget(link)
            if self.rules is not None:
                link.connection.open = False
        self._links.clear()
        self._outbox.clear()
        if self._listener is not None:
            if self._poller is not None:
                self._poller.unregister(self._listener.fileno())
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.path)
            except OSError:
                pass  # removed already (the kernel's directory went with it)
        self.path = ""
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None

    # -- the rules' DirectIO ------------------------------------------------------------------

    def send(self, connection: DirectConnection, frame: bytes) -> None:
        link = self._links.get(connection.key)
        if link is None or link.connection is not connection or link.closing:
            return  # it has closed: dropped
        if link.outbox:
            self._queue(link, frame)
            return
        try:
            link.sock.send(frame, socket.MSG_DONTWAIT)
        except BlockingIOError:
            self._queue(link, frame)
            if self._poller is not None:
                self._poller.register(link.fd, zmq.POLLIN | zmq.POLLOUT)
        except OSError as exc:
            self._failed_send(link, frame, exc)

    def post(self, connection: DirectConnection, message: DirectMessage, frame: bytes) -> None:
        if self._on_loop_thread():
            if self.rules is not None:
                self.rules.finish(connection, message, frame)
        else:
            self._outbox.append((connection, message, frame))
            self._wake()  # does nothing once the host has stopped: dropped

    # -- the loop -------------------------------------------------------------------------------

    def flush(self) -> None:
        """Apply the completions made on other threads (on a wake-up)."""
        outbox, rules = self._outbox, self.rules
        while outbox and rules is not None:
            rules.finish(*outbox.popleft())
        self._end_closing()

    def serve(self, ready: dict[Any, int]) -> None:
        """Accept, read and write what the poller found ready."""
        if self._listener is not None and self._listener.fileno() in ready:
            self._accept()
        links = self._links
        for fd, events in ready.items():
            link = links.get(fd) if type(fd) is int else None
            if link is None:
                continue
            if events & zmq.POLLOUT:
                self._write(link)
            if events & (zmq.POLLIN | zmq.POLLERR):
                self._read(link)
        self._end_closing()

    def _accept(self) -> None:
        assert self._listener is not None and self.rules is not None and self._poller is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # EMFILE and the like: the others are served meanwhile
                self.rules.report("accept failed", str(exc))
                return
            if len(self._links) >= _DIRECT_CONNECTIONS:
                self.rules.report("too many direct connections", f"{len(self._links)} open")
                sock.close()
                continue
            sock.setblocking(False)
            pid, uid, gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _DIRECT_SNDBUF)
            except OSError:
                pass  # the default buffer: completions over it are answered KErrOverflow
            link = Link(sock, self.rules.connection(sock.fileno(), pid, uid, gid))
            self._links[link.fd] = link
            self._poller.register(link.fd, zmq.POLLIN)

    def _read(self, link: Link) -> None:
        rules = self.rules
        assert rules is not None
        if self._buffer is None:
            self._buffer = mmap.mmap(-1, self.max_frame)
        buffer = self._buffer
        connection = link.connection
        for _ in range(_DIRECT_BATCH):
            if link.closing:
                return
            try:
                size = link.sock.recv_into(buffer, 0, socket.MSG_DONTWAIT | socket.MSG_TRUNC)
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("direct connection of pid %d failed: %s", connection.pid, exc)
                self._close(link)
                return
            if size == 0:  # the peer closed it (or sent an empty frame, which is no message)
                self._close(link)
                return
            if size > len(buffer):
                rules.misbehaved(connection, "frame over the limit",
                                 f"{size} bytes, over {len(buffer)}")
                self._close(link)
                return
            try:
                with memoryview(buffer)[:size] as frame:
                    message = decode(frame)
            except ProtocolError as exc:
                rules.misbehaved(connection, "malformed frame", str(exc))
                self._close(link)
                return
            if rules.receive(connection, message):
                self._close(link)
                return

    def _write(self, link: Link) -> None:
        outbox = link.outbox
        while outbox and not link.closing:
            try:
                link.sock.send(outbox[0], socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                self._failed_send(link, outbox.popleft(), exc)
                continue
            outbox.popleft()
        if not link.closing and self._poller is not None:
            self._poller.register(link.fd, zmq.POLLIN)  # nothing left to write

    def _queue(self, link: Link, frame: bytes) -> None:
        if len(link.outbox) >= DIRECT_OUTBOX:
            assert self.rules is not None
            self.rules.report("client does not read",
                              f"{len(link.outbox)} frames unread by pid {link.connection.pid}; "
                              "closing its direct connection")
            self._close(link)
            return
        link.outbox.append(frame)

    def _failed_send(self, link: Link, frame: bytes, exc: OSError) -> None:
        if exc.errno != errno.EMSGSIZE:
            log.debug("direct connection of pid %d failed: %s", link.connection.pid, exc)
            self._close(link)
            return
        # A completion bigger than the connection's buffer: KErrOverflow, as one bigger than
        # the kernel's limit is on the kernel path.
        reply = decode(frame)
        log.error("a completion of %d bytes does not fit the direct connection of pid %d; "
                  "completing with KErrOverflow instead", len(frame), link.connection.pid)
        if type(reply) is Completed:
            self.send(link.connection, encode(Completed(reply.req_id, errors.KErrOverflow, ())))

    def _close(self, link: Link) -> None:
        """Close `link` once the current turn is over (the rules may be mid-way through it)."""
        if not link.closing:
            link.closing = True
            self._closing.append(link)

    def _end_closing(self) -> None:
        while self._closing:
            link = self._closing.pop()
            self._forget(link)
            if self.rules is not None:
                self.rules.connection_ended(link.connection)

    def _forget(self, link: Link) -> None:
        if self._links.get(link.fd) is link:
            del self._links[link.fd]
            if self._poller is not None:
                self._poller.unregister(link.fd)
        link.outbox.clear()
        link.sock.close()
