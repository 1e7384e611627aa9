"""Descriptors in shared memory, the pure rules (ipcfw.server.mapped): a frame's placeholders
matched with its file descriptors, and ReadL/WriteL with offsets on a descriptor whose memory is
a bytearray here (an mmap in the host), which must behave exactly as one sent in the frame.
No processes, no file descriptors."""

from __future__ import annotations

from typing import Any

import pytest

from ipcfw import errors
from ipcfw.protocol import Completed, MappedCompleted, decode
from ipcfw.server import RMessage
from ipcfw.server.mapped import MappedDescriptor, mapped_args, plan
from ipcfw.server.message import DirectMessage


class Recorder:
    max_frame = 1 << 24

    def __init__(self) -> None:
        self.frames: list[Any] = []

    def completed(self, message: RMessage, frame: bytes) -> None:
        self.frames.append(decode(frame))


def direct_message(args: tuple[Any, ...], recorder: Recorder | None = None) -> DirectMessage:
    return DirectMessage(recorder or Recorder(), 7, 1, args, None, None, None, 5, 0)


def mapped(content: bytes, writable: bool, released: list[int] | None = None,
           spare: int = 0) -> MappedDescriptor:
    """A descriptor in a `bytearray` memory (with `spare` stale bytes past it, as a reused
    memfd has)."""
    memory = bytearray(content) + b"\xee" * spare
    return MappedDescriptor(memory, len(content), writable,
                            None if released is None else lambda: released.append(1))


# -- rule 1: placeholders and file descriptors -----------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fds", "expected"),
    [
        (((0, 10, 0),), 1, [(0, 0, 10, False)]),
        ((1, (1, 5, 1), b"x", (0, 6, 0)), 2, [(1, 1, 5, True), (3, 0, 6, False)]),
    ],
)
def test_plan_matches_each_placeholder_with_its_fd(args, fds, expected) -> None:
    assert plan(args, fds) == expected


@pytest.mark.parametrize(
    ("args", "fds", "why"),
    [
        (((1, 10, 0),), 1, "names file descriptor 1 of 1"),
        (((0, 10, 0), (0, 10, 1)), 2, "names file descriptor 0 twice"),
        (((0, 10, 0),), 2, "1 file descriptors no argument names"),
        ((1, b"x"), 0, "no descriptor in shared memory"),
        (((0, 10, 0),), 5, "5 file descriptors with one frame"),
    ],
)
def test_plan_refuses_fds_and_placeholders_that_do_not_match(args, fds, why) -> None:
    refused = plan(args, fds)
    assert isinstance(refused, str) and why in refused


# -- rule 2: the same semantics as a descriptor in the frame ---------------------------------------

CONTENT = bytes(range(200))

# Each case: the writable descriptor's content, then WriteL (data, offset) calls, then ReadL
# offsets to compare after them.
CASES = [
    ([], [0, 5, 199, 200, 300]),
    ([(b"abc", 0)], [0, 1, 3, 4]),
    ([(b"abc", 10)], [0, 9, 13]),
    ([(b"abc", 0), (b"XY", 7)], [0, 3, 7, 9]),  # a gap past the length: zeros, not old content
    ([(b"abc", 150), (b"Z", 2)], [0, 2, 3]),
    ([(b"", 0)], [0]),
    ([(b"q" * 200, 0)], [0, 199]),
    ([(b"x" * 70_000, 100_000)], [0, 99_999, 100_000]),  # a gap longer than ZEROS
]


def _frame_message(content: bytes, max_length: int) -> DirectMessage:
    return direct_message((b"ro", (content, max_length)))


@pytest.mark.parametrize(("writes", "reads"), CASES)
def test_read_and_write_with_offsets_as_in_the_frame(writes, reads) -> None:
    max_length = 200_000 if any(o > 200 for _, o in writes) else 200
    content = (CONTENT * 1000)[:max_length]
    framed = _frame_message(content, max_length)
    descriptor = mapped(content, True, spare=64)
    shared = direct_message(mapped_args((b"ro", (0, max_length, 1)), {1: descriptor}))
    for data, offset in writes:
        framed.WriteL(1, data, offset)
        shared.WriteL(1, data, offset)
        assert shared.GetDesLength(1) == framed.GetDesLength(1)
        assert shared.GetDesMaxLength(1) == framed.GetDesMaxLength(1) == max_length
    for offset in reads:
        assert shared.ReadL(1, offset) == framed.ReadL(1, offset)
    if writes:
        # What the client copies back (the memory's first `length` bytes) is what the frame
        # path would have sent back.
        assert bytes(descriptor.memory[: descriptor.length]) == framed.ReadL(1)


@pytest.mark.parametrize(("writes", "reads"), CASES)
def test_zero_content_not_copied_reads_as_zeros_never_the_memorys_old_bytes(writes, reads) -> None:
    max_length = 200_000 if any(o > 200 for _, o in writes) else 200
    framed = _frame_message(bytes(max_length), max_length)
    stale = bytearray(b"\xee" * (max_length + 64))  # a former request's bytes in the memfd
    descriptor = MappedDescriptor(stale, max_length, True, zeros=True)
    shared = direct_message(mapped_args((b"ro", (0, max_length, 2)), {1: descriptor}))
    for offset in reads:
        assert shared.ReadL(1, offset) == framed.ReadL(1, offset)
    for data, offset in writes:
        framed.WriteL(1, data, offset)
        shared.WriteL(1, data, offset)
        assert shared.GetDesLength(1) == framed.GetDesLength(1)
        for offset in reads:
            assert shared.ReadL(1, offset) == framed.ReadL(1, offset)
    if writes:
        assert bytes(descriptor.memory[: descriptor.length]) == framed.ReadL(1)


def test_a_read_only_mapped_descriptor_reads_and_refuses_writes() -> None:
    message = direct_message(mapped_args((3, (0, 200, 0)), {1: mapped(CONTENT, False)}))
    assert message.ReadL(1) == CONTENT and message.ReadL(1, 150) == CONTENT[150:]
    assert message.GetDesLength(1) == message.GetDesMaxLength(1) == 200
    with pytest.raises(errors.IpcError) as info:
        message.WriteL(1, b"x")
    assert info.value.code == errors.KErrBadDescriptor
    with pytest.raises(errors.IpcError) as info:
        message.ReadL(0)  # the int is still an int
    assert info.value.code == errors.KErrBadDescriptor


def test_writing_past_the_max_length_overflows_and_writes_nothing() -> None:
    descriptor = mapped(CONTENT, True)
    message = direct_message(mapped_args(((0, 200, 1),), {0: descriptor}))
    with pytest.raises(errors.IpcError) as info:
        message.WriteL(0, b"xy", 199)
    assert info.value.code == errors.KErrOverflow
    assert not descriptor.written and bytes(descriptor.memory) == CONTENT


# -- completion and rule 3: the memory is the server's only while the message is in service -------


def test_the_completion_says_the_written_lengths_and_releases_the_memory() -> None:
    released: list[int] = []
    recorder = Recorder()
    args = mapped_args(
        ((0, 200, 0), (1, 200, 1), (b"small", 9), (2, 200, 1)),
        {0: mapped(CONTENT, False, released), 1: mapped(CONTENT, True, released),
         3: mapped(CONTENT, True, released)},
    )
    message = direct_message(args, recorder)
    message.WriteL(1, b"new", 4)
    message.WriteL(2, b"framed")
    message.Complete(3)
    # Only what was written, and of descriptor 1 only its length: the bytes are in its memory.
    assert recorder.frames == [MappedCompleted(7, 3, ((1, 7), (2, b"framed")))]
    assert released == [1, 1, 1]
    with pytest.raises(errors.IpcError) as info:
        message.ReadL(0)  # the client may be using the memory for its next request already
    assert info.value.code == errors.KErrBadDescriptor
    with pytest.raises(errors.IpcError):
        args[1].write(b"late", 0)


def test_an_error_completion_of_a_mapped_request_is_still_a_mapped_completed() -> None:
    released: list[int] = []
    recorder = Recorder()
    message = direct_message(mapped_args(((0, 200, 0),), {0: mapped(CONTENT, False, released)}),
                             recorder)
    message.Complete(errors.KErrNotSupported)
    assert recorder.frames == [MappedCompleted(7, errors.KErrNotSupported, ())]
    assert released == [1]


def test_a_request_without_shared_memory_completes_as_before() -> None:
    recorder = Recorder()
    message = direct_message((1, (b"ab", 4)), recorder)
    message.WriteL(1, b"xyz")
    message.Complete(0)
    assert recorder.frames == [Completed(7, 0, ((1, b"xyz"),))]


def test_release_is_once_and_a_closed_memory_reads_as_a_bad_descriptor() -> None:
    released: list[int] = []
    descriptor = mapped(CONTENT, True, released)
    descriptor.release()
    descriptor.release()
    assert released == [1]

    class Closed:
        def __getitem__(self, index: slice) -> bytes:
            raise ValueError("mmap closed or invalid")

    with pytest.raises(errors.IpcError) as info:
        MappedDescriptor(Closed(), 10, False).read(0)
    assert info.value.code == errors.KErrBadDescriptor
