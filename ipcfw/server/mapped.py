"""Descriptors in shared memory, as the server sees them: the rules, without the memory's I/O.

A `MappedRequest` on a direct connection carries some descriptors as ``(fd_index, length,
writable)`` placeholders, their memory (a memfd each) beside the frame. The host
(`ipcfw.server.shm`) receives the file descriptors, checks and maps them, and hands this module
the maps; this module decides the rest:

1. `plan` matches a frame's placeholders with the file descriptors that came with it: every
   placeholder names one of them, each exactly once, and nothing else came. Anything else is
   the connection misbehaving (its frames are the client library's, which never does it).
2. A `MappedDescriptor` is one descriptor argument of an `RMessage`: its memory (anything that
   slices as bytes: an ``mmap`` in the host, a ``bytearray`` in the tests), its length, max
   length and whether it is writable. It keeps the semantics of a descriptor sent in the frame
   (`RMessage.ReadL`, `WriteL` with offsets): the content is the memory's first `valid` bytes
   followed by zeros up to `length` (a writable descriptor whose content is all zeros is not
   copied into the memory by the client, which may hold a former request's bytes: `valid` is
   0 then, else `length`); ``WriteL(data, offset)`` makes the content its first `offset` bytes
   (zeros past the old length) followed by `data`, writing zeros into the memory from `valid`
   to `offset` first, so that the memory's first `length` bytes are the content again. A
   written descriptor's completion says its new length, not its bytes: the client copies them
   from its own map of the same memory.
3. The memory is the server's only while the message is in service: the message's end
   releases it (`release`, once), after which `read` and `write` fail with KErrBadDescriptor,
   never touching the memory, which the client may be using for its next request.

`MappedArgs` is a request's argument tuple holding such descriptors: `ipcfw.server.message`
knows a message with shared memory by it, at the cost of one type check per request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import errors
from ..protocol import MAX_MAPPED_FDS

__all__ = ["MappedDescriptor", "MappedArgs", "plan", "mapped_args", "ZEROS"]

#: Zeros written at a time into a gap a WriteL leaves past the old length.
ZEROS = bytes(64 * 1024)


class MappedDescriptor:
    """One descriptor argument in shared memory (rule 2). `memory` slices as bytes and takes
    slice assignment (an mmap, a bytearray); `release` is what to call, once, when the message
    no longer needs the memory (the host's count of the map's users; None for none)."""

    __slots__ = ("memory", "length", "max_length", "valid", "writable", "written", "_release",
                 "_gone")

    def __init__(self, memory: Any, length: int, writable: bool,
                 release: Callable[[], None] | None = None, zeros: bool = False) -> None:
        self.memory = memory
        self.length = length  # the content's length now (the server's writes change it)
        self.max_length = length  # (a writable one's length when sent is its max length)
        self.valid = 0 if zeros else length  # the memory's bytes that are content; zeros after
        self.writable = writable
        self.written = False
        self._release = release
        self._gone = False

    def read(self, offset: int) -> bytes:
        """The content from `offset` (b"" past its end)."""
        length, valid = self.length, self.valid
        if offset >= length:
            self._check()
            return b""
        if valid >= length:
            return self._get(offset, length)
        if offset >= valid:
            self._check()
            return bytes(length - offset)
        return self._get(offset, valid) + bytes(length - valid)

    def write(self, data: bytes, offset: int) -> None:
        """Make the content its first `offset` bytes followed by `data` (the caller has checked
        that it is writable and that offset + len(data) <= max_length)."""
        end = offset + len(data)
        # From `valid` to `offset` the content is zeros (a gap past the length, as in the
        # frame, or content that was not copied): the memory must say so.
        for start in range(self.valid, offset, len(ZEROS)):
            self._set(start, ZEROS[: min(len(ZEROS), offset - start)])
        self._set(offset, data)
        self.length = self.valid = end
        self.written = True

    def release(self) -> None:
        """The message has ended: the memory is not this server's any more (rule 3)."""
        if not self._gone:
            self._gone = True
            if self._release is not None:
                self._release()

    def _check(self) -> None:
        if self._gone:
            raise errors.IpcError(errors.KErrBadDescriptor,
                                  "the message has ended: its client's shared memory is gone")

    def _get(self, start: int, end: int) -> bytes:
        self._check()
        try:
            content: bytes = self.memory[start:end]
            return content
        except ValueError:  # the host closed the map (its connection ended)
            raise errors.IpcError(errors.KErrBadDescriptor,
                                  "the client's shared memory is gone") from None

    def _set(self, start: int, data: Any) -> None:
        self._check()
        try:
            self.memory[start:start + len(data)] = data
        except (ValueError, TypeError):  # the map was closed, or is read-only
            raise errors.IpcError(errors.KErrBadDescriptor,
                                  "the client's shared memory cannot be written") from None

    def __repr__(self) -> str:
        kind = "writable" if self.writable else "read-only"
        return f"<MappedDescriptor {kind} length={self.length}{' ended' if self._gone else ''}>"


class MappedArgs(tuple[Any, ...]):
    """A request's arguments, some of them `MappedDescriptor`s (`descriptors`, in order)."""

    descriptors: tuple[MappedDescriptor, ...] = ()

    def release(self) -> None:
        """Release every descriptor's memory (idempotent)."""
        for descriptor in self.descriptors:
            descriptor.release()


def plan(args: tuple[Any, ...], fds: int) -> list[tuple[int, int, int, int]] | str:
    """Rule 1: for a `MappedRequest`'s checked `args` and the number of file descriptors that
    came with its frame, the placeholders as ``(argument index, fd_index, length, writable)``
    (`writable` as sent: 0, 1, or 2 for zeros not copied); or why the frame is refused (the
    connection then misbehaved)."""
    if fds > MAX_MAPPED_FDS:
        return f"{fds} file descriptors with one frame (at most {MAX_MAPPED_FDS})"
    placed: list[tuple[int, int, int, int]] = []
    used: set[int] = set()
    for index, arg in enumerate(args):
        if type(arg) is tuple and len(arg) == 3:
            fd_index, length, writable = arg
            if fd_index >= fds:
                return f"argument {index} names file descriptor {fd_index} of {fds}"
            if fd_index in used:
                return f"argument {index} names file descriptor {fd_index} twice"
            used.add(fd_index)
            placed.append((index, fd_index, length, writable))
    if not placed:
        return "a MappedRequest with no descriptor in shared memory"
    if len(used) != fds:
        return f"{fds - len(used)} file descriptors no argument names"
    return placed


def mapped_args(args: tuple[Any, ...],
                descriptors: dict[int, MappedDescriptor]) -> MappedArgs:
    """`args` with the descriptors at their argument indexes in place of the placeholders."""
    result = MappedArgs(descriptors.get(index, arg) for index, arg in enumerate(args))
    result.descriptors = tuple(descriptors[index] for index in sorted(descriptors))
    return result
