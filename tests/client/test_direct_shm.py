"""Large descriptors on the direct path, end to end: a real kernel, a bulk server process
(tests/plugins/bulk.py) and RSession(path="direct") here. Descriptors of SHARED_OVER bytes or
more go through shared memory (memfds), never through the kernel nor in a frame; what the
server reads and writes at any offset is what the kernel path gives."""

from __future__ import annotations

import zlib

import pytest

from conftest import KernelFixture
from ipcfw import (
    IpcError,
    KErrBadDescriptor,
    KErrCancel,
    KErrOverflow,
    RSession,
    TRequestStatus,
)
from ipcfw.client import shm
from ipcfw.client.args import SHARED_OVER
from plugins.bulk import (
    ECompleteHeld,
    ECopy,
    ECrc,
    EFill,
    EHold,
    ELastError,
    ELengths,
    EReverse,
    ETryAfter,
)

pytestmark = pytest.mark.process

MiB = 1 << 20


@pytest.fixture
def bulk(kernel: KernelFixture) -> KernelFixture:
    kernel.serve("plugins.bulk:BulkServer", "bulk")
    return kernel


def session(path: str = "direct") -> RSession:
    return RSession.connect("bulk", (1, 0, 0), 8, path=path)


def pattern(size: int, seed: int = 0) -> bytes:
    return (bytes(range(seed, 256)) + bytes(range(seed))) * (size // 256) + bytes(size % 256)


@pytest.mark.parametrize("size", [MiB, 16 * MiB], ids=["1MiB", "16MiB"])
def test_bytes_in_and_bytearray_out_round_trip_through_shared_memory(bulk, size) -> None:
    data = pattern(size)
    with session() as direct:
        for seed in (0, 7):  # twice: the second time on the memfds and maps kept
            data = pattern(size, seed)
            out = bytearray(size)
            assert direct.SendReceive(ECopy, (data, out, 0, 0)) == size
            assert out == data
        status = TRequestStatus()
        out = bytearray(size)
        direct.SendReceive(ECopy, (data, out, 0, 0), status)
        assert status.Wait(30) == size and out == data
        assert direct.SendReceive(ECrc, (data, 0, 0)) == zlib.crc32(data) & 0x7FFFFFFF
        assert bulk.statistics()["messages"] == 0  # none of it went through the kernel


def test_read_and_write_at_offsets_as_on_the_kernel_path(bulk) -> None:
    size = 300_000  # (over SHARED_OVER; the kernel path carries it in frames)
    data = pattern(size)
    results = {}
    for path in ("direct", "kernel"):
        with session(path) as each:
            out = bytearray(b"\xaa" * (size - 1000))  # content the server keeps before 5000
            copied = each.SendReceive(ECopy, (data[: size - 1000 - 4000], out, 1000, 5000))
            crc = each.SendReceive(ECrc, (data, 0, 123_457))
            reverse = bytearray(pattern(size, 3))  # an in-out descriptor: read, then written
            each.SendReceive(EReverse, (reverse,))
            lengths = [
                each.SendReceive(ELengths, (bytearray(size), 0, 0)),
                each.SendReceive(ELengths, (bytearray(size), 0, 1)),
                each.SendReceive(ELengths, (data, 0, 0)),
            ]
            filled = bytearray(size)
            each.SendReceive(EFill, (filled, 0x5A, 1000, size - 1000))
            results[path] = (copied, bytes(out), crc, bytes(reverse), lengths, bytes(filled))
    assert results["direct"] == results["kernel"]
    copied, out, crc, reverse, lengths, filled = results["direct"]
    assert out == b"\xaa" * 5000 + data[1000 : size - 1000 - 4000]
    assert crc == zlib.crc32(data[123_457:]) & 0x7FFFFFFF
    assert reverse == pattern(size, 3)[::-1]
    assert lengths == [size, size, size]
    assert filled == bytes(size - 1000) + b"\x5a" * 1000


def test_a_zero_bytearray_reads_as_zeros_in_the_server_whatever_its_memfd_held(bulk) -> None:
    size = 2 * MiB
    with session() as direct:
        out = bytearray(size)
        direct.SendReceive(ECopy, (pattern(size), out, 0, 0))  # its memfd now holds the pattern
        zeros = bytearray(size)  # sent as its length alone, on one of the same memfds
        assert direct.SendReceive(ECrc, (zeros, 0, 0)) == zlib.crc32(bytes(size)) & 0x7FFFFFFF
        assert direct.SendReceive(ECrc, (zeros, 0, size - 10)) == zlib.crc32(bytes(10)) & 0x7FFFFFFF
        # Written at an offset: the content before it is zeros in the client too.
        direct.SendReceive(EFill, (zeros, 0x33, 100, size - 100))
        assert zeros == bytes(size - 100) + b"\x33" * 100


def test_a_held_request_is_written_when_the_server_completes_it_later(bulk) -> None:
    with session() as direct:
        out = bytearray(4 * MiB)
        status = TRequestStatus()
        direct.SendReceive(EHold, (out, 1), status)
        data = pattern(3 * MiB)
        assert direct.SendReceive(ECompleteHeld, (1, data)) == 0
        assert status.Wait(30) == 3 * MiB
        assert out == data


def test_a_write_after_the_client_cancelled_is_refused_and_reaches_no_other_request(bulk) -> None:
    # The cancelled request's memory goes back to the client, which may reuse it at once: the
    # server still holding the message must not be able to write into it any more.
    with session() as direct:
        out = bytearray(4 * MiB)
        status = TRequestStatus()
        direct.SendReceive(EHold, (out, 1), status)
        status.Cancel()
        assert status.Wait(30) == KErrCancel
        reused = bytearray(4 * MiB)
        assert direct.SendReceive(EFill, (reused, 0x11, 4 * MiB, 0)) == 4 * MiB
        with pytest.raises(IpcError) as info:
            direct.SendReceive(ECompleteHeld, (1, pattern(3 * MiB)))  # writes into the held one
        assert info.value.code == KErrBadDescriptor
        assert out == bytes(4 * MiB) and reused == b"\x11" * (4 * MiB)
        # The memory the refused write aimed at carries the next request's content intact.
        data = pattern(4 * MiB, seed=7)
        assert direct.SendReceive(ECrc, (data, 0, 0)) == zlib.crc32(data) & 0x7FFFFFFF


def test_writing_past_a_large_descriptors_max_length_overflows_in_the_server(bulk) -> None:
    with session() as direct:
        out = bytearray(SHARED_OVER)
        with pytest.raises(IpcError) as info:
            direct.SendReceive(EFill, (out, 1, 10, SHARED_OVER - 5))
        assert info.value.code == KErrOverflow
        assert out == bytes(SHARED_OVER)  # untouched


def test_the_memory_is_gone_for_the_server_once_the_message_completed(bulk) -> None:
    with session() as direct:
        direct.SendReceive(ETryAfter, (pattern(MiB),))
        assert direct.SendReceive(ELastError, ()) == -KErrBadDescriptor


def test_a_blind_send_with_a_large_descriptor_is_delivered(bulk) -> None:
    with session() as direct:
        direct.Send(ECrc, (pattern(MiB), 0, 0))
        assert direct.SendReceive(ECrc, (pattern(MiB), 0, 0)) > 0


def test_idle_memfds_are_bounded_in_the_process(bulk) -> None:
    with session() as direct:
        for size in (MiB, 3 * MiB, 9 * MiB, 20 * MiB, 33 * MiB):
            out = bytearray(size)
            direct.SendReceive(ECopy, (pattern(size), out, 0, 0))
            assert out == pattern(size)
            assert shm._idle_bytes <= shm.IDLE_BYTES
