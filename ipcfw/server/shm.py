"""The server's side of shared memory on the direct path: receiving memfds, checking and mapping
them (`ipcfw.server.mapped` holds the rules, this module the I/O).

A client sends a descriptor above its threshold as a memfd beside a `MappedRequest` frame
(SCM_RIGHTS). For each file descriptor that comes, on any frame, the port calls this module,
which closes it before returning, whatever happens: descriptors never stay in the server's
table. What stays is a map (``mmap`` holds its own reference to the file), in the connection's
`Maps`.

A memfd is accepted only if it is one (``F_GET_SEALS`` succeeds only on a memfd: reading and
writing it never waits for a disk), sealed against shrinking and growing (``F_SEAL_SHRINK |
F_SEAL_GROW``: the file keeps its size for ever, so that touching the map never raises SIGBUS,
which would kill the server), and at least as long as the descriptors it carries; otherwise
the request is answered KErrBadDescriptor, not served, with a log line. (``os.pread`` would
survive a file that shrinks, but costs 2.4 ms a 16 MiB read here against 1.0 ms from a map,
and 3.8 ms against 1.0 ms a write.)

Maps are kept per connection and found again by the file's inode: a client reuses its memfds,
and mapping a 16 MiB memfd afresh costs its page faults each time (6.5 ms for a write through
a new map, 1.0 ms through one already faulted in). A map is in use while a message holds it;
at most `IDLE_MAPS` unused ones are kept (least recently used first to go), and at most
`LIVE_MAPS` are in use on one connection (a request over it is answered KErrNoMemory). All of
them close with the connection. Each map holds one file descriptor (Python's ``mmap`` keeps a
duplicate), so a connection holds at most LIVE_MAPS + IDLE_MAPS of them; and every map counts,
with every connection, in the port's one budget of descriptors (`FdBudget`, of
``port.connection_cap()``): a map past it takes an idle map's place, or the request is
answered KErrNoMemory (a new connection past it is closed at once).
"""

from __future__ import annotations

import array
import collections
import fcntl
import mmap
import os
import socket
import stat
import threading
from typing import Any, NamedTuple

from .. import errors
from ..protocol import MAX_MAPPED_FDS, MappedRequest, Request, mapped_capacity
from .mapped import MappedDescriptor, mapped_args, plan

__all__ = [
    "FdBudget", "Maps", "Refused", "receive", "adopt", "close_fds", "ANCILLARY_SIZE", "IDLE_MAPS",
    "LIVE_MAPS",
]

IDLE_MAPS = 4  # unused maps kept per connection, for the client's next requests
LIVE_MAPS = 64  # maps in use at once per connection
#: Room for the most descriptors a frame may carry; Linux closes any beyond it (MSG_CTRUNC).
ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_MAPPED_FDS * array.array("i").itemsize)
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_RECEIVE_FLAGS = socket.MSG_DONTWAIT | socket.MSG_TRUNC | socket.MSG_CMSG_CLOEXEC


def receive(sock: socket.socket, buffer: Any) -> tuple[int, list[int], bool]:
    """One frame into `buffer` with its file descriptors: (size, fds, truncated), where
    `truncated` says more descriptors came than a frame may carry (Linux closed the rest).
    Raises what ``recvmsg_into`` raises (BlockingIOError when nothing waits)."""
    size, ancillary, flags, _ = sock.recvmsg_into([buffer], ANCILLARY_SIZE, _RECEIVE_FLAGS)
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[: len(data) - len(data) % received.itemsize])
            fds.extend(received)
    return size, fds, bool(flags & socket.MSG_CTRUNC)


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _Map:
    __slots__ = ("key", "map", "size", "writable", "users")

    def __init__(self, key: tuple[int, int], memory: mmap.mmap, size: int,
                 writable: bool) -> None:
        self.key, self.map, self.size, self.writable = key, memory, size, writable
        self.users = 0


class FdBudget:
    """The file descriptors a direct port may hold at once (`cap`): its connections and their
    maps, one each. Taken on the loop thread, given back on any thread (a map released at a
    message's end): a lock."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        """One more descriptor, if the budget has room."""
        with self._lock:
            if self.used >= self.cap:
                return False
            self.used += 1
            return True

    def give(self, count: int = 1) -> None:
        with self._lock:
            self.used -= count


class Maps:
    """One direct connection's maps of its client's memfds (see the module docstring). Maps
    are taken on the loop thread and released on any thread (a message's end): a lock. Each
    counts in `budget`, the port's."""

    def __init__(self, budget: FdBudget) -> None:
        self._budget = budget
        self._maps: dict[tuple[int, int], _Map] = {}
        self._idle: collections.OrderedDict[tuple[int, int], _Map] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._live = 0
        self.closed = False

    def __len__(self) -> int:
        return len(self._maps)

    def take(self, fd: int, length: int, writable: bool,
             zeros: bool = False) -> MappedDescriptor | tuple[int, str]:
        """A descriptor of `length` bytes in the memfd `fd` (not closed here; `zeros`: its
        content is zeros, not in the memory), or the code to answer the request with and why
        (KErrBadDescriptor, KErrNoMemory)."""
        bad = errors.KErrBadDescriptor
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return bad, "not a memfd (not a regular file)"
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:
                return bad, "not a memfd (no seals)"
            if seals & _SEALS != _SEALS:
                return bad, "a memfd not sealed against shrinking and growing"
            if not length <= info.st_size <= mapped_capacity(length):
                return bad, (f"a memfd of {info.st_size} bytes for a descriptor of {length} "
                             f"(at least that, at most {mapped_capacity(length)})")
        except OSError as exc:
            return bad, f"unreadable file descriptor ({exc})"
        if info.st_size == 0:
            return MappedDescriptor(bytearray(), 0, writable, zeros=zeros)
        key = (info.st_dev, info.st_ino)
        busy = errors.KErrNoMemory, f"{LIVE_MAPS} maps in use on the connection"
        with self._lock:
            if self.closed:
                return bad, "the connection has closed"
            entry = self._maps.get(key)
            if entry is None:
                if self._live >= LIVE_MAPS:
                    return busy
                if not self._budget.take():
                    if not self._idle:
                        return errors.KErrNoMemory, (
                            f"the server holds its budget of {self._budget.cap} file "
                            "descriptors (direct connections and their maps)")
                    self._drop_oldest_idle()  # (its descriptor is this one's now)
                try:
                    entry = self._map(key, fd, info.st_size)
                except (OSError, ValueError) as exc:
                    self._budget.give()
                    return bad, f"cannot map it ({exc})"
            if writable and not entry.writable:
                return bad, "a writable descriptor in a memfd that cannot be written"
            if entry.users == 0:
                if self._live >= LIVE_MAPS:
                    return busy
                self._idle.pop(key, None)
                self._live += 1
            entry.users += 1
        return MappedDescriptor(entry.map, length, writable, lambda: self._release(entry),
                                zeros)

    def _map(self, key: tuple[int, int], fd: int, size: int) -> _Map:
        try:
            memory = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            writable = True
        except PermissionError:  # a read-only descriptor, or a memfd sealed against writes
            memory = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            writable = False
        entry = _Map(key, memory, size, writable)
        self._maps[key] = entry
        return entry

    def _release(self, entry: _Map) -> None:
        with self._lock:
            entry.users -= 1
            if entry.users or self._maps.get(entry.key) is not entry:
                return
            self._live -= 1
            self._idle[entry.key] = entry
            while len(self._idle) > IDLE_MAPS:
                self._drop_oldest_idle()
                self._budget.give()

    def _drop_oldest_idle(self) -> None:
        """Close the least recently used idle map (its descriptor stays counted). Call with
        the lock held."""
        _, oldest = self._idle.popitem(last=False)
        del self._maps[oldest.key]
        oldest.map.close()

    def close(self) -> None:
        """The connection has ended: close every map (a message still held reads
        KErrBadDescriptor from now on)."""
        with self._lock:
            self.closed = True
            for entry in self._maps.values():
                try:
                    entry.map.close()
                except BufferError:  # (never exported; closed with the last reference else)
                    pass
            self._budget.give(len(self._maps))
            self._maps.clear()
            self._idle.clear()
            self._live = 0


class Refused(NamedTuple):
    """A MappedRequest to answer with `code`, not served, because of `why`."""

    code: int
    why: str


def adopt(request: MappedRequest, fds: list[int], maps: Maps) -> Request | Refused | str:
    """The `Request` a MappedRequest is, its descriptors mapped from `fds` (which the caller
    closes); `Refused` if it is to be answered with a code and not served (a bad memfd:
    KErrBadDescriptor; too many maps: KErrNoMemory); or why the connection misbehaved (a
    str). Whatever was taken is released again on refusal."""
    placed = plan(request.args, len(fds))
    if isinstance(placed, str):
        return placed
    taken: dict[int, MappedDescriptor] = {}
    for index, fd_index, length, writable in placed:
        descriptor = maps.take(fds[fd_index], length, writable > 0, writable == 2)
        if not isinstance(descriptor, MappedDescriptor):
            for done in taken.values():
                done.release()
            return Refused(descriptor[0], f"argument {index}: {descriptor[1]}")
        taken[index] = descriptor
    return Request(request.req_id, request.handle, request.function,
                   mapped_args(request.args, taken), request.mode)
