"""The server's direct port: its side of the direct path's sockets, for one registration.

A SOCK_SEQPACKET listening socket in the kernel socket's private directory, registered with the
kernel (`Register.direct`), and the connections accepted on it, each polled by the host's loop
beside the kernel socket. The port reads and decodes their frames and hands them to the
state's direct rules (`ipcfw.server.direct`), and sends what the rules give it without
blocking: a connection whose peer does not read keeps an outbox of at most
`protocol.DIRECT_MAX_UNREAD` frames and `outbox_bytes` bytes, past which it is closed. What
serving the frames read from one connection in a turn sends it goes in one datagram, a batch
(`protocol.pack_batch`): a pipelining client's answers cost one send and one receive per turn,
not one each.
Completions made on other threads go through the port's own outbox to the loop, as the
kernel's go through the host's (and are dropped once the registration's rules have ended).

Bounds on what clients can make the port hold: file descriptors at once, for connections and
their maps of clients' memfds, one each (`connection_cap`, from RLIMIT_NOFILE, in one
`shm.FdBudget`), connections per client pid (`DIRECT_PER_PID`), and time to the first Attach
(`ATTACH_WITHIN` seconds, checked on the port's own clock: `timeout` is the poll timeout the
loop uses while the port waits for something). When accept() fails for want of descriptors
(EMFILE, ENFILE), the port closes the waiting connection with a spare descriptor kept for that,
or, failing that, stops polling the listener for `_PAUSE` seconds: never a busy loop.
"""

from __future__ import annotations

import collections
import errno
import logging
import mmap
import os
import resource
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import zmq

from .. import endpoint as endpoints
from .._zmqflags import POLLERR, POLLIN, POLLOUT
from .. import errors
from ..protocol import (
    BATCH_BYTES,
    BATCH_MARK,
    DIRECT_MAX_UNREAD,
    direct_unread_bytes,
    MAX_MAPPED_FDS,
    Completed,
    MappedCompleted,
    MappedRequest,
    Request,
    ProtocolError,
    SharedMemory,
    decode,
    encode,
    pack_batch,
    unpack_batch,
)
from . import shm
from .direct import DirectConnection, DirectRules
from .mapped import MappedArgs
from .message import DirectMessage

log = logging.getLogger("ipcfw.server")

__all__ = ["DirectPort"]

DIRECT_PER_PID = 64  # direct connections of one client process at once
ATTACH_WITHIN = 5.0  # seconds a connection may stay open without a granted Attach
_DIRECT_BATCH = 64  # frames read from one direct connection per turn of the loop
# Answers sent in one batch at most: enough to share a system call among several, few enough
# that the client gets the first ones while the server serves the rest. (With 64 in flight,
# pipelined calls/s: 16 or 32 frames 108-114k, 64 frames 73-77k, unbatched 91k at best.)
BATCH_FRAMES = 16
_DRAIN_LIMIT = 4096  # frames read from one connection before a Disconnect (rule 8)
_PAUSE = 0.1  # seconds the listener is not polled after an accept() out of descriptors
_DIRECT_SNDBUF = 4 << 20  # asked for on each connection (the OS caps it: net.core.wmem_max)
_PEERCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
# As plain ints: the socket and zmq constants are enums, whose `|` and `&` cost about 0.5 us
# each, several times per request on the loop's hot path.
_SEND_FLAGS = int(socket.MSG_DONTWAIT)
_RECEIVE_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_TRUNC)
_READABLE = POLLIN | POLLERR


class Link:
    """One accepted direct connection: its socket, its state in the rules, and the frames
    waiting for its peer to read (sends never block)."""

    __slots__ = ("sock", "fd", "connection", "outbox", "queued", "unread", "closing", "hung_up",
                 "maps", "gathered", "gathered_bytes")

    def __init__(self, sock: socket.socket, connection: DirectConnection) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.connection = connection
        # Datagrams waiting for room in its socket, each with the frames it carries.
        self.outbox: collections.deque[tuple[bytes, int]] = collections.deque()
        self.queued = 0  # bytes in the outbox
        self.unread = 0  # frames in the outbox (a batch's count each)
        self.closing = False
        # The client closed its end (a send failed with EPIPE): nothing more is sent, but what
        # it sent before is still read, and served, up to the end of file (a thread that ends
        # right after its requests, or after a Close: the Disconnect comes after them).
        self.hung_up = False
        # Its client's shared memory (ipcfw.server.shm), once it said it sends some: from then
        # on its frames are read with their file descriptors.
        self.maps: shm.Maps | None = None
        # While its frames are read (`DirectPort._read`): the frames sent to it meanwhile,
        # sent together, as one batch, once the reading stops (None: sent at once).
        self.gathered: list[bytes] | None = None
        self.gathered_bytes = 0


def connection_cap() -> int:
    """File descriptors a port holds at once, for its direct connections and their maps: three
    quarters of the soft RLIMIT_NOFILE (the rest is the process's own: the kernel's socket,
    the plugin's files), at least 16."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft > 1 << 16:
        soft = 1 << 16
    return max(16, soft * 3 // 4)


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
        self.fds = shm.FdBudget(connection_cap())  # connections and their maps, one each
        self._per_pid: collections.Counter[int] = collections.Counter()
        self._spare: int | None = None  # a descriptor to give up when accept() has none
        self._paused_until: float | None = None  # the listener is not polled until then
        self._unattached: collections.deque[tuple[float, Link]] = collections.deque()
        self.timeout: int | None = None  # ms the loop may wait before calling `serve`, or None

    @property
    def outbox_bytes(self) -> int:
        """The most bytes a connection may leave unread before it is closed."""
        return direct_unread_bytes(self.max_frame)

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
        self._spare = _open_spare()

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
            if self._poller is not None and self._paused_until is None:
                self._poller.unregister(self._listener.fileno())
            self._paused_until = None
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.path)
            except OSError:
                pass  # removed already (the kernel's directory went with it)
        self.path = ""
        self._unattached.clear()
        self._per_pid.clear()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None

    # -- the rules' DirectIO ------------------------------------------------------------------

    def send(self, connection: DirectConnection, frame: bytes) -> None:
        link = self._links.get(connection.key)
        if link is None or link.connection is not connection or link.closing or link.hung_up:
            return  # it has closed: dropped
        gathered = link.gathered
        if gathered is None:
            self._send_now(link, frame)
            return
        size = len(frame) + 4  # (its length in the batch)
        if link.gathered_bytes + size > BATCH_BYTES:
            self._send_gathered(link)  # (the frames before it go first)
            if size > BATCH_BYTES:
                self._send_now(link, frame)
                return
        gathered.append(frame)
        link.gathered_bytes += size
        if len(gathered) >= BATCH_FRAMES:
            self._send_gathered(link)

    def _send_gathered(self, link: Link) -> None:
        """Send the frames gathered for `link`: one alone, several as one batch."""
        gathered = link.gathered
        if not gathered or link.hung_up:
            return
        link.gathered = []
        link.gathered_bytes = 0
        if len(gathered) == 1:
            self._send_now(link, gathered[0])
        else:
            self._send_now(link, pack_batch(gathered), len(gathered))

    def _send_now(self, link: Link, frame: bytes, frames: int = 1) -> None:
        """Send `frame` (a datagram of `frames` frames) now, or queue it behind the others."""
        if link.outbox:
            self._queue(link, frame, frames)
            return
        try:
            link.sock.send(frame, _SEND_FLAGS)
        except BlockingIOError:
            self._queue(link, frame, frames)
            if self._poller is not None:
                self._poller.register(link.fd, zmq.POLLIN | zmq.POLLOUT)
        except OSError as exc:
            self._failed_send(link, frame, exc)

    def post(self, connection: DirectConnection, message: DirectMessage, frame: bytes) -> None:
        rules = self.rules
        if rules is None or rules.ended:
            return  # the registration is over: dropped, not kept
        if self._on_loop_thread():
            rules.finish(connection, message, frame)
        else:
            self._outbox.append((connection, message, frame))
            self._wake()  # does nothing once the host has stopped: dropped

    def drain(self, connection: DirectConnection) -> None:
        link = self._links.get(connection.key)
        if link is None or link.connection is not connection or link.closing:
            return
        self._read(link, _DRAIN_LIMIT)
        if self._closing:
            self._wake()  # ended on the next turn (the rules are mid-way through a Disconnect)

    def close_client(self, pid: int) -> None:
        if not self._per_pid.get(pid):
            return
        for link in list(self._links.values()):
            if link.connection.pid == pid:
                self._close(link)
        if self._closing:
            self._wake()

    # -- the loop -------------------------------------------------------------------------------

    def flush(self) -> None:
        """Apply the completions made on other threads (on a wake-up)."""
        outbox, rules = self._outbox, self.rules
        while outbox and rules is not None:
            rules.finish(*outbox.popleft())
        self._end_closing()

    def serve(self, ready: dict[Any, int]) -> None:
        """Accept, read and write what the poller found ready; then, if the port waits for a
        time, see to it (after reading: an Attach that came while the loop was busy counts)."""
        if self._listener is not None and self._listener.fileno() in ready:
            self._accept()
        links = self._links
        for fd, events in ready.items():
            link = links.get(fd) if type(fd) is int else None
            if link is None:
                continue
            if events & POLLOUT:
                self._write(link)
            if events & _READABLE:
                self._read(link)
        if self.timeout is not None:
            self._on_time()
        self._end_closing()

    def _on_time(self) -> None:
        """Re-arm a paused listener, close connections that did not Attach in time."""
        now = time.monotonic()
        if self._paused_until is not None and now >= self._paused_until:
            self._paused_until = None
            if self._listener is not None and self._poller is not None:
                self._poller.register(self._listener.fileno(), zmq.POLLIN)
        unattached = self._unattached
        while unattached and unattached[0][0] <= now:
            link = unattached.popleft()[1]
            if (not link.closing and link.connection.attaches == 0
                    and self._links.get(link.fd) is link):
                assert self.rules is not None
                self.rules.report("no Attach in time",
                                  f"pid {link.connection.pid} sent none in {ATTACH_WITHIN} s; "
                                  "closing its direct connection")
                self._close(link)
        self._set_timeout(now)

    def _set_timeout(self, now: float) -> None:
        when = [t for t in (self._paused_until,
                            self._unattached[0][0] if self._unattached else None) if t is not None]
        self.timeout = max(1, int((min(when) - now) * 1000) + 1) if when else None

    def _accept(self) -> None:
        assert self._listener is not None and self.rules is not None and self._poller is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                shed = self._shed() if exc.errno in (errno.EMFILE, errno.ENFILE) else False
                if shed is None:
                    return  # (Linux takes the descriptor before it looks at the backlog)
                if shed:
                    self.rules.report("out of file descriptors",
                                      f"accept() failed ({exc}); closing the new direct "
                                      "connection at once (the client uses the kernel path)")
                    continue
                self.rules.report("accept failed",
                                  f"{exc}; the listener rests for {_PAUSE} s")
                self._pause()
                return
            sock.setblocking(False)
            pid, uid, gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            if self._per_pid[pid] >= DIRECT_PER_PID:
                self.rules.report("too many direct connections of one process",
                                  f"pid {pid} has {self._per_pid[pid]} open")
                sock.close()
                continue
            if not self.fds.take():
                self.rules.report("too many direct connections",
                                  f"{len(self._links)} open, holding {self.fds.used} of "
                                  f"{self.fds.cap} file descriptors with their maps")
                sock.close()
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _DIRECT_SNDBUF)
            except OSError:
                pass  # the default buffer: completions over it are answered KErrOverflow
            link = Link(sock, self.rules.connection(sock.fileno(), pid, uid, gid))
            self._links[link.fd] = link
            self._per_pid[pid] += 1
            self._poller.register(link.fd, zmq.POLLIN)
            now = time.monotonic()
            self._unattached.append((now + ATTACH_WITHIN, link))
            if self.timeout is None:
                self._set_timeout(now)

    def _shed(self) -> bool | None:
        """accept() has no descriptor for a waiting connection: give up the spare one, accept
        the connection and close it, take the spare again. False if there was no spare to give
        (or accept failed again), None if no connection was waiting."""
        if self._spare is None:
            self._spare = _open_spare()
            return False
        assert self._listener is not None
        os.close(self._spare)
        self._spare = None
        shed: bool | None
        try:
            self._listener.accept()[0].close()
            shed = True
        except BlockingIOError:
            shed = None
        except OSError:
            shed = False
        self._spare = _open_spare()
        return shed

    def _pause(self) -> None:
        """Stop polling the listener for `_PAUSE` seconds (`serve` re-arms it)."""
        if self._paused_until is None and self._listener is not None and self._poller is not None:
            self._poller.unregister(self._listener.fileno())
            now = time.monotonic()
            self._paused_until = now + _PAUSE
            self._set_timeout(now)

    def _read(self, link: Link, limit: int = _DIRECT_BATCH) -> None:
        """Read and serve up to `limit` frames of `link`; what the serving sends it goes as
        one batch once they are read (see protocol.BATCH_MARK)."""
        if link.gathered is not None:  # (already reading it, further up the stack)
            self._read_frames(link, limit)
            return
        link.gathered = []
        try:
            self._read_frames(link, limit)
        finally:
            self._send_gathered(link)
            link.gathered = None

    def _read_frames(self, link: Link, limit: int) -> None:
        rules = self.rules
        assert rules is not None
        if self._buffer is None:
            self._buffer = mmap.mmap(-1, self.max_frame)
        buffer = self._buffer
        connection = link.connection
        for _ in range(limit):
            if link.closing:
                return
            if link.maps is not None:
                if not self._read_shared(link, rules, buffer):
                    return
                continue
            try:
                size = link.sock.recv_into(buffer, 0, _RECEIVE_FLAGS)
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
            if type(message) is SharedMemory:
                link.maps = shm.Maps(self.fds)  # (descriptors sent before it: closed by Linux)
            elif rules.receive(connection, message):
                self._close(link)
                return

    def _read_shared(self, link: Link, rules: DirectRules, buffer: mmap.mmap) -> bool:
        """`_read`'s turn for a connection that sends shared memory: one frame with its file
        descriptors, every one of them closed before this returns (`ipcfw.server.shm`). False
        when there is nothing more to read now, or the connection is closing."""
        connection = link.connection
        assert link.maps is not None
        try:
            size, fds, truncated = shm.receive(link.sock, buffer)
        except BlockingIOError:
            return False
        except OSError as exc:
            log.debug("direct connection of pid %d failed: %s", connection.pid, exc)
            self._close(link)
            return False
        try:
            if size == 0:  # the peer closed it (or sent an empty frame)
                self._close(link)
                return False
            message = _decoded(buffer, size, truncated)
            if type(message) is MappedRequest:
                return self._mapped(link, rules, message, fds)
            if isinstance(message, str) or fds:
                problem = (message if isinstance(message, str)
                           else f"file descriptors with a {type(message).__name__}")
                rules.misbehaved(connection, "bad frame with shared memory", problem)
                self._close(link)
                return False
            if type(message) is SharedMemory:
                return True
            if rules.receive(connection, message):
                self._close(link)
                return False
            return True
        finally:
            shm.close_fds(fds)

    def _mapped(self, link: Link, rules: DirectRules, message: MappedRequest,
                fds: list[int]) -> bool:
        """A MappedRequest and its memfds: mapped, then served as a Request; or answered with
        an error code and not served (a bad memfd); or the connection misbehaved."""
        assert link.maps is not None
        if message.handle not in link.connection.attached:
            # Nothing is mapped for a session not attached here: the rules answer it as any
            # request for it (KERN-EXEC 0), and its file descriptors are closed unread.
            return self._unmapped(link, rules, message)
        request = shm.adopt(message, fds, link.maps)
        if isinstance(request, str):
            rules.misbehaved(link.connection, "bad MappedRequest", request)
            self._close(link)
            return False
        if isinstance(request, shm.Refused):
            code, why = request
            rules.report("bad shared memory" if code == errors.KErrBadDescriptor
                         else "too much shared memory",
                         f"pid {link.connection.pid}, request {message.req_id}: {why}; "
                         f"answered {errors.describe(code)}")
            self.send(link.connection, encode(Completed(message.req_id, code, ())))
            return True
        in_service = link.connection.in_service
        misbehaved = rules.receive(link.connection, request)
        if in_service.get(message.req_id) is None:
            # Not in service: never served (refused), or served and completed (released
            # already): either way its memory is not the server's any more (idempotent).
            args = request.args
            if isinstance(args, MappedArgs):
                args.release()
        if misbehaved:
            self._close(link)
            return False
        return True

    def _unmapped(self, link: Link, rules: DirectRules, message: MappedRequest) -> bool:
        request = Request(message.req_id, message.handle, message.function, (), message.mode)
        if rules.receive(link.connection, request):
            self._close(link)
            return False
        return True

    def _write(self, link: Link) -> None:
        outbox = link.outbox
        while outbox and not link.closing:
            frame, frames = outbox[0]
            try:
                link.sock.send(frame, _SEND_FLAGS)
            except BlockingIOError:
                return
            except OSError as exc:
                outbox.popleft()
                link.queued -= len(frame)
                link.unread -= frames
                self._failed_send(link, frame, exc)
                continue
            outbox.popleft()
            link.queued -= len(frame)
            link.unread -= frames
        if not link.closing and self._poller is not None:
            self._poller.register(link.fd, zmq.POLLIN)  # nothing left to write

    def _queue(self, link: Link, frame: bytes, frames: int) -> None:
        if (link.unread + frames > DIRECT_MAX_UNREAD
                or link.queued + len(frame) > self.outbox_bytes):
            assert self.rules is not None
            self.rules.report("client does not read",
                              f"{link.unread} frames ({link.queued} bytes) unread by pid "
                              f"{link.connection.pid}; closing its direct connection")
            self._close(link)
            return
        link.outbox.append((frame, frames))
        link.queued += len(frame)
        link.unread += frames

    def _failed_send(self, link: Link, frame: bytes, exc: OSError) -> None:
        if exc.errno in (errno.EPIPE, errno.ECONNRESET):
            link.hung_up = True  # (its reader closes it at the end of file)
            link.outbox.clear()
            link.queued = link.unread = 0
            return
        if exc.errno != errno.EMSGSIZE:
            log.debug("direct connection of pid %d failed: %s", link.connection.pid, exc)
            self._close(link)
            return
        # A completion bigger than the connection's buffer: KErrOverflow, as one bigger than
        # the kernel's limit is on the kernel path.
        if frame[0] == BATCH_MARK:  # (a batch is far smaller than any buffer: for sure)
            for one in unpack_batch(frame):
                self._failed_send(link, one, exc)
            return
        reply = decode(frame)
        log.error("a completion of %d bytes does not fit the direct connection of pid %d; "
                  "completing with KErrOverflow instead", len(frame), link.connection.pid)
        if type(reply) is Completed or type(reply) is MappedCompleted:
            self.send(link.connection, encode(type(reply)(reply.req_id, errors.KErrOverflow, ())))

    def _close(self, link: Link) -> None:
        """Close `link` once the current turn is over (the rules may be mid-way through it)."""
        if link.gathered and not link.closing:
            self._send_gathered(link)  # (answers to what it sent before: they stay sent)
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
            self.fds.give()
            pid = link.connection.pid
            if self._per_pid[pid] > 1:
                self._per_pid[pid] -= 1
            else:
                del self._per_pid[pid]
            if self._poller is not None:
                self._poller.unregister(link.fd)
        link.outbox.clear()
        link.queued = link.unread = 0
        link.sock.close()
        if link.maps is not None:
            link.maps.close()


def _decoded(buffer: mmap.mmap, size: int, truncated: bool) -> object:
    """The message of a frame of `size` bytes received into `buffer` with file descriptors, or
    a str saying what is wrong with it (`truncated`: more descriptors came than fit)."""
    if truncated:
        return f"more than {MAX_MAPPED_FDS} file descriptors with one frame"
    if size > len(buffer):
        return f"a frame of {size} bytes, over {len(buffer)}"
    try:
        with memoryview(buffer)[:size] as frame:
            return decode(frame)
    except ProtocolError as exc:
        return f"malformed frame: {exc}"


def _open_spare() -> int | None:
    """A descriptor kept to be given up when accept() finds none (EMFILE), or None."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
