"""The socket of a direct connection: one client thread's SOCK_SEQPACKET connection to a
server's process (the direct data path; ipcfw.client.connection's `DirectChannel` uses it).

Every frame is one `protocol.encode(message)`, one datagram. This module only moves frames:
it knows nothing of requests, sessions or the runtime's tables. Its one policy is how a thread
waits for an answer (`DirectSocket.wait_readable`): it spins on a non-blocking receive for up
to `SPIN` seconds before it sleeps in poll, because waking a thread that slept in the kernel
costs more than a whole round trip to a server that answers at once; the spin adapts to how
fast answers come (`ipcfw._spin`).
"""

from __future__ import annotations

import array
import errno
import logging
import mmap
import select
import socket
import time
from collections.abc import Sequence

from .._spin import SPIN, AdaptiveSpin

log = logging.getLogger("ipcfw.client")

# Above protocol.MAX_FRAME. Frames are received into one buffer of this size per connection:
# private anonymous memory, so only the pages a frame touched are resident, and those of a
# frame over `RELEASE_OVER` are given back at once (madvise MADV_DONTNEED), so that one large
# answer does not stay resident for the connection's life. (recv(n) allocates n bytes each
# time: 12 us per call at this size, against 1.3 us for recv_into and a copy.)
MAX_DATAGRAM = 17 * 1024 * 1024
RELEASE_OVER = 1024 * 1024
_RECEIVE_FLAGS = socket.MSG_DONTWAIT | socket.MSG_TRUNC


class DirectSocket:
    """A connected SOCK_SEQPACKET socket; its user serialises all use of it (a lock)."""

    def __init__(self, path: str, timeout: float) -> None:
        """Connect to `path`; raise OSError if it cannot be done within `timeout` seconds."""
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # A datagram must fit the send buffer: ask for room for the largest frame (Linux
            # caps it at twice net.core.wmem_max; the default, about 208 KiB, is too small).
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_DATAGRAM)
            self.socket.settimeout(timeout)
            self.socket.connect(path)
            self.socket.setblocking(False)
            self.fd = self.socket.fileno()
            # (Private: MADV_DONTNEED frees its pages, and a forked child shares none of it.)
            self._buffer = mmap.mmap(
                -1, MAX_DATAGRAM, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            )
            self._view = memoryview(self._buffer)
            self._poll = select.poll()
            self._poll.register(self.fd, select.POLLIN)
            self.spin = AdaptiveSpin()
        except BaseException:
            self.socket.close()  # (a failing mmap or poll must not leak the connection)
            raise

    def send(self, frame: bytes, fds: Sequence[int] = ()) -> bool:
        """Send one frame, with the file descriptors `fds` (SCM_RIGHTS) if any; False if the
        socket's buffer is full (nothing sent: wait with `wait_writable`). Raises ValueError
        for a frame larger than a datagram can be here (nothing sent, the connection intact),
        OSError if the peer has gone."""
        try:
            if fds:
                self.socket.sendmsg(
                    [frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                )
            else:
                self.socket.send(frame)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                raise
            limit = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            raise ValueError(
                f"a frame of {len(frame)} bytes is larger than the direct connection to "
                f"{self.path} carries (its send buffer holds {limit} bytes; Linux caps it at "
                "twice net.core.wmem_max): use a session on path='kernel' for it"
            ) from None
        return True

    def wait_writable(self, seconds: float) -> None:
        """Sleep until the socket has room for a frame, or `seconds` have passed."""
        poll = select.poll()
        poll.register(self.fd, select.POLLOUT)
        poll.poll(max(0, int(seconds * 1000)))

    def receive(self) -> bytes | None:
        """One waiting frame, b"" at the peer's end, None if nothing waits. Raises OSError
        on a broken connection."""
        while True:
            try:
                size = self.socket.recv_into(self._buffer, 0, _RECEIVE_FLAGS)
            except BlockingIOError:
                return None
            if size <= RELEASE_OVER:
                return bytes(self._view[:size])
            if size <= MAX_DATAGRAM:
                frame = bytes(self._view[:size])
                self._buffer.madvise(mmap.MADV_DONTNEED, 0, size)
                return frame
            self._buffer.madvise(mmap.MADV_DONTNEED)
            log.error("dropping a frame of %d bytes from %s: over any ipcfw frame", size, self.path)

    def wait_readable(self, seconds: float) -> bytes | None:
        """One frame (b"" at the peer's end) if one arrives within `seconds`, else None.

        Spins up to `SPIN` seconds on a non-blocking receive, then sleeps in poll."""
        frame = self.receive()
        if frame is not None:
            return frame
        if self.spin.now() and seconds > 0:
            frame = self._spin(min(SPIN, seconds))  # (SPIN read each time: a bench may vary it)
            if frame is not None:
                return frame
        if self._poll.poll(max(0, int(seconds * 1000))):
            return self.receive()
        return None

    def _spin(self, seconds: float) -> bytes | None:
        """Receive without sleeping for up to `seconds`."""
        perf = time.perf_counter
        spin_end = perf() + seconds
        while perf() < spin_end:
            frame = self.receive()
            if frame is not None:
                self.spin.caught()
                return frame
        self.spin.missed()
        return None

    def close(self) -> None:
        self.socket.close()
        self._view.release()
        self._buffer.close()
