"""Large descriptors on a direct connection: through shared memory, not the socket.

A request on a direct connection (`ipcfw.client.connection.DirectChannel`) with a descriptor of
`args.SHARED_OVER` bytes or more is sent as a `MappedRequest`: each such descriptor is copied
into a memfd of the connection's `Pool`, the frame carries ``(fd_index, length, writable)`` in
its place, and the memfds go with the frame (SCM_RIGHTS). The server maps them (see
`ipcfw.server.shm`); what it writes into a writable one is in the memfd when its
`MappedCompleted` arrives, which says each written descriptor's new length, and the bytes are
copied from this process's own map into the caller's bytearray.

The memfds are sealed against shrinking and growing (and further seals): the server cannot
truncate one under this process's map (SIGBUS), and trusts the size. They are reused: a
fresh 16 MiB memfd costs 20 ms in page faults to fill, a warm one 1 ms. A memfd goes back to
its connection's pool only when the server's MappedCompleted says the server is done with it;
a request that ends otherwise (a Blind request's early answer, a cancel, a closed session, a
panic) closes its memfds instead, since the server may still touch them. Idle memfds are
bounded for the whole process by `IDLE_BYTES` (past it, they are closed); a pool's memfds go
only to its one server (a memfd never carries one server's data to another).

A writable descriptor's content is needed only if the server reads it (`ReadL`), but fetching
it only then would make the server wait on its client in the middle of ``ServiceL`` (a client
could stall a server's loop: rejected). So a bytearray whose content is all zeros (a fresh
output buffer) is sent as its max length alone: nothing is copied, and the server reads zeros
until it writes (the memfd may hold a former request's bytes; the server never shows them).
Any other content is copied in. The test for zeros compares with a read-only anonymous map
(every page the kernel's one zero page): 1.1 ms for 16 MiB of zeros against 1.3-1.9 ms for the
copy it saves, measured here, and it stops at the first byte that is not zero.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
from collections.abc import Mapping

from .. import errors
from ..protocol import (
    MAX_MAPPED,
    mapped_capacity,
    Completed,
    MappedCompleted,
    MappedRequest,
    Message,
    SharedMemory,
    encode,
)
from typing import Any
from collections.abc import Sequence

from .args import SHARED_OVER, TIpcArgs
from .state import Pending, writes_fit

__all__ = ["Pool", "Region", "MappedCall", "MappedPending", "IDLE_BYTES", "Answered", "pool_of"]

#: Bytes of idle memfds kept for reuse, in the whole process.
IDLE_BYTES = 64 << 20
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

_budget_lock = threading.Lock()
_idle_bytes = 0
_zeros: memoryview | None = None  # a read-only map of zeros, as long as the longest test


def _reset_after_fork() -> None:
    global _budget_lock, _idle_bytes
    _budget_lock = threading.Lock()
    _idle_bytes = 0


os.register_at_fork(after_in_child=_reset_after_fork)


def all_zeros(content: bytes | bytearray) -> bool:
    """Whether `content` is all zero bytes (compared with a map of the zero page: no copy)."""
    global _zeros
    zeros = _zeros
    if zeros is None or len(zeros) < len(content):
        size = mapped_capacity(len(content))
        zeros = _zeros = memoryview(mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                              mmap.PROT_READ))
    same: bool = content == zeros[: len(content)]  # type: ignore[comparison-overlap]
    return same  # (bytes compare with any buffer: a memcmp)


class Region:
    """One sealed memfd and this process's map of it."""

    __slots__ = ("fd", "map", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("ipcfw", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
            self.map = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class Pool:
    """One direct connection's memfds: those idle, for its next requests. `announced` says
    the server has been told this connection sends shared memory (`SharedMemory`)."""

    def __init__(self) -> None:
        self._idle: list[Region] = []
        self._lock = threading.Lock()
        self.announced = False
        self.closed = False

    def take(self, size: int) -> Region:
        """An idle memfd of `mapped_capacity(size)` bytes, or a new one (a server refuses a
        larger one)."""
        global _idle_bytes
        wanted = mapped_capacity(size)
        with self._lock:
            region = next((r for r in self._idle if r.size == wanted), None)
            if region is not None:
                self._idle.remove(region)
                with _budget_lock:
                    _idle_bytes -= region.size
                return region
        return Region(mapped_capacity(size))

    def give(self, region: Region) -> None:
        """`region` is free again (the server said so): keep it, within `IDLE_BYTES`."""
        global _idle_bytes
        with self._lock:
            if not self.closed:
                with _budget_lock:
                    keep = _idle_bytes + region.size <= IDLE_BYTES
                    if keep:
                        _idle_bytes += region.size
                if keep:
                    self._idle.append(region)
                    return
        region.close()

    def close(self) -> None:
        """The connection has closed: close the idle memfds (those in flight close when their
        requests end)."""
        global _idle_bytes
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, []
            with _budget_lock:
                _idle_bytes -= sum(region.size for region in idle)
        for region in idle:
            region.close()

    def forked(self) -> None:
        """In a forked child: the memfds are the parent's too; close this process's handles
        of them, taking no lock (its holder did not survive the fork)."""
        self.closed = True
        idle, self._idle = self._idle, []
        for region in idle:
            region.close()


class Answered(tuple[Any, ...]):
    """The writes of a MappedCompleted, as the connection hands them to `MappedPending`: the
    server is done with the request's memory."""


class MappedPending(Pending[Any]):
    """An asynchronous request with descriptors in shared memory (`call`)."""

    __slots__ = ("call",)
    call: MappedCall

    def complete(
        self, value: int, writes: Sequence[tuple[int, bytes]] = (),
        error: BaseException | None = None,
    ) -> None:
        if type(writes) is Answered:
            reply = self.call.finish(MappedCompleted(0, value, tuple(writes)),
                                     self.buffers, self.limits)
            assert type(reply) is Completed
            if reply.value != value:  # (KErrBadDescriptor: not the server's error)
                error = None
            value, writes = reply.value, reply.writes
        else:  # ended without the server's answer: it may still touch the memory
            self.call.finish(None)
        super().complete(value, writes, error)


class MappedCall:
    """One request's descriptors in shared memory: made from its `TIpcArgs` (copying each
    large descriptor into a memfd of `pool`), then ended once (`finish`). Raises ValueError
    for a descriptor over `MAX_MAPPED` and NoMemory when no memfd can be made, sending
    nothing."""

    __slots__ = ("pool", "regions", "fds", "wire")

    def __init__(self, pool: Pool, ipc_args: TIpcArgs) -> None:
        self.pool = pool
        self.regions: dict[int, Region] = {}
        self.fds: list[int] = []
        wire: list[Any] = list(ipc_args.wire)
        try:
            for index, arg in enumerate(ipc_args.wire):
                if type(arg) is bytes and len(arg) >= SHARED_OVER:
                    content: bytes | bytearray = arg
                    writable = 0
                elif type(arg) is tuple and arg[1] >= SHARED_OVER:
                    content, writable = arg[0], 1
                    if all_zeros(arg[0]):
                        writable = 2  # nothing to copy: the server reads zeros
                else:
                    continue
                if len(content) > MAX_MAPPED:
                    raise ValueError(
                        f"argument {index}: a descriptor of {len(content)} bytes is larger than "
                        f"a direct connection carries ({MAX_MAPPED} bytes)"
                    )
                try:
                    region = pool.take(len(content))
                except OSError as exc:
                    raise errors.IpcError(
                        errors.KErrNoMemory, f"no shared memory for argument {index}: {exc}"
                    ) from None
                self.regions[index] = region
                if writable != 2:
                    region.map[: len(content)] = content
                wire[index] = (len(self.fds), len(content), writable)
                self.fds.append(region.fd)
        except BaseException:
            self.finish(None)
            raise
        self.wire = tuple(wire)

    def frame(self, req_id: int, handle: int, function: int, mode: int) -> bytes:
        return encode(MappedRequest(req_id, handle, function, self.wire, mode))

    def finish(self, reply: Message | None, buffers: Mapping[int, bytearray] = {},
               limits: Mapping[int, int] = {}) -> Message | None:
        """End the call with the server's `reply` (None: ended without one). A
        MappedCompleted becomes the Completed it stands for, its shared-memory writes copied
        into `buffers` first (all or none: writes past a descriptor's max length, or to a
        descriptor that is not writable, write nothing and the value is KErrBadDescriptor);
        the memfds then go back to the pool. Any other reply is returned as it is, and the
        memfds are closed (the server may still touch them)."""
        regions, self.regions = self.regions, {}
        if type(reply) is not MappedCompleted:
            for region in regions.values():
                region.close()
            return reply
        value = reply.value
        mapped = [(i, n) for i, n in reply.writes if type(n) is int]
        plain = tuple((i, data) for i, data in reply.writes if type(data) is bytes)
        fits = writes_fit(limits, plain) and all(
            i in regions and i in buffers and n <= limits.get(i, -1) for i, n in mapped
        )
        if not fits:
            value, plain, mapped = errors.KErrBadDescriptor, (), []
        for index, length in mapped:
            _copy_back(buffers[index], regions[index], length)
        for region in regions.values():
            self.pool.give(region)
        return Completed(reply.req_id, value, plain, reply.text if fits else "")


def _copy_back(buffer: bytearray, region: Region, length: int) -> None:
    """`buffer` becomes the first `length` bytes of `region` (one copy)."""
    if len(buffer) >= length:
        with memoryview(buffer) as target, memoryview(region.map) as source:
            target[:length] = source[:length]
        del buffer[length:]
    else:  # (the caller grew its bytearray during the call)
        buffer[:] = region.map[:length]


def pool_of(channel: object) -> tuple[Pool, bytes | None]:
    """`channel`'s pool (made on first use), and the SharedMemory frame to send before the
    first MappedRequest (None once sent). Call with the channel's lock held."""
    pool: Pool | None = getattr(channel, "shm", None)
    if pool is None:
        pool = Pool()
        channel.shm = pool  # type: ignore[attr-defined]
    if pool.announced:
        return pool, None
    pool.announced = True
    return pool, encode(SharedMemory())
