"""The client's shared memory (ipcfw.client.shm) without a server: memfds sealed, a
MappedCompleted copied back only when it fits, memfds back in the pool only when the server said
it is done with them. Real memfds, no processes."""

from __future__ import annotations

import fcntl
import os

import pytest

from ipcfw import errors
from ipcfw.client import shm
from ipcfw.client.args import SHARED_OVER, TIpcArgs
from ipcfw.protocol import Completed, MappedCompleted

SIZE = SHARED_OVER + 100


def test_a_memfd_is_sealed_against_shrinking_growing_and_more_seals() -> None:
    region = shm.Region(SIZE)
    try:
        seals = fcntl.fcntl(region.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        assert seals & fcntl.F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.ftruncate(region.fd, 0)  # a server cannot make this process's map SIGBUS
    finally:
        region.close()


def test_large_descriptors_are_placeholders_and_small_ones_stay_in_the_frame() -> None:
    pool = shm.Pool()
    data, out = b"d" * SIZE, bytearray(b"o" * SIZE)
    call = shm.MappedCall(pool, TIpcArgs(data, out, b"small", bytearray(3)))
    assert call.wire == ((0, SIZE, 0), (1, SIZE, 1), b"small", (b"\x00" * 3, 3))
    assert len(call.fds) == 2
    assert call.regions[0].map[:SIZE] == data and call.regions[1].map[:SIZE] == bytes(out)
    call.finish(None)
    pool.close()


def test_a_zero_bytearray_is_sent_as_its_length_alone() -> None:
    pool = shm.Pool()
    stale = pool.take(SIZE)
    stale.map[:SIZE] = b"\xee" * SIZE  # a former request's bytes
    pool.give(stale)
    call = shm.MappedCall(pool, TIpcArgs(bytearray(SIZE)))
    assert call.wire == ((0, SIZE, 2),)  # 2: zeros, not copied
    assert call.regions[0] is stale and stale.map[:SIZE] == b"\xee" * SIZE
    call.finish(None)
    assert shm.all_zeros(bytearray(3 * SIZE)) and not shm.all_zeros(bytearray(SIZE) + b"\x01")
    pool.close()


def _call(pool: shm.Pool) -> tuple[shm.MappedCall, TIpcArgs, bytearray]:
    out = bytearray(b"o" * SIZE)
    ipc_args = TIpcArgs(b"d" * SIZE, out)
    return shm.MappedCall(pool, ipc_args), ipc_args, out


def test_a_mapped_completion_is_copied_back_and_the_memfds_reused() -> None:
    pool = shm.Pool()
    call, ipc_args, out = _call(pool)
    region = call.regions[1]
    region.map[:10] = b"written..."
    reply = call.finish(MappedCompleted(4, 10, ((1, 10),)), ipc_args.buffers, ipc_args.limits)
    assert reply == Completed(4, 10, ())
    assert out == b"written..."
    again, _, _ = _call(pool)
    assert region in again.regions.values()  # the same memfd (and the server's map of it)
    again.finish(None)
    pool.close()


def test_a_completion_past_the_max_length_writes_nothing() -> None:
    pool = shm.Pool()
    call, ipc_args, out = _call(pool)
    reply = call.finish(MappedCompleted(4, 0, ((1, SIZE + 1),)), ipc_args.buffers,
                        ipc_args.limits)
    assert reply == Completed(4, errors.KErrBadDescriptor, ())
    assert out == b"o" * SIZE
    call, ipc_args, out = _call(pool)
    reply = call.finish(MappedCompleted(4, 0, ((0, 5),)), ipc_args.buffers, ipc_args.limits)
    assert reply == Completed(4, errors.KErrBadDescriptor, ())  # (0 is read-only)
    pool.close()


def test_memfds_of_a_request_the_server_did_not_finish_are_closed_not_reused() -> None:
    pool = shm.Pool()
    call, ipc_args, _ = _call(pool)
    fds = list(call.fds)
    reply = call.finish(Completed(4, 0, ()))  # e.g. a blind request's early answer
    assert reply == Completed(4, 0, ())
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert shm._idle_bytes == 0
    pool.close()


def test_idle_memfds_stay_within_the_process_budget() -> None:
    pools = [shm.Pool() for _ in range(4)]
    try:
        for pool in pools:
            region = pool.take(shm.IDLE_BYTES // 3)
            pool.give(region)
        assert shm._idle_bytes <= shm.IDLE_BYTES
    finally:
        for pool in pools:
            pool.close()
    assert shm._idle_bytes == 0


def test_a_descriptor_over_the_largest_mapped_one_is_refused_before_anything_is_made(
    monkeypatch,
) -> None:
    monkeypatch.setattr(shm, "MAX_MAPPED", SIZE - 1)
    pool = shm.Pool()
    with pytest.raises(ValueError, match="larger than a direct connection carries"):
        shm.MappedCall(pool, TIpcArgs(b"d" * SIZE))
    assert shm._idle_bytes == 0
    pool.close()


def test_no_memfd_to_be_had_is_no_memory(monkeypatch) -> None:
    def fail(size: int) -> shm.Region:
        raise OSError(24, "Too many open files")

    pool = shm.Pool()
    monkeypatch.setattr(pool, "take", fail)
    with pytest.raises(errors.IpcError) as info:
        shm.MappedCall(pool, TIpcArgs(b"d" * SIZE))
    assert info.value.code == errors.KErrNoMemory
