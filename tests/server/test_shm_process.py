"""Shared memory on the direct path, the server's side with real sockets and memfds: a bulk
server process (tests/plugins/bulk.py) registered with the fake kernel of
test_direct_process.py, and raw SOCK_SEQPACKET connections sending MappedRequests with file
descriptors (SCM_RIGHTS), good and hostile. What must hold: a good one is served from the
memfds; a bad memfd is answered KErrBadDescriptor, a frame whose descriptors do not match
ends its connection; nothing crashes the server, no descriptor stays in it, and others are
served all along. Every wait is bounded, every process is stopped."""

from __future__ import annotations

import array
import fcntl
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import wait_until
from ipcfw.errors import KErrBadDescriptor
from ipcfw.protocol import (
    Attach,
    Completed,
    MappedCompleted,
    MappedRequest,
    Panicked,
    Request,
    SharedMemory,
    encode,
)
from plugins.bulk import ECopy, ECrc, EFds
from test_direct_process import Hosted, call, ended, receive

pytestmark = pytest.mark.process

BULK = "plugins.bulk:BulkServer"
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
SIZE = 256 * 1024


@pytest.fixture
def bulk() -> Iterator[Hosted]:
    hosted = Hosted(BULK)
    try:
        yield hosted
    finally:
        hosted.close()


def memfd(size: int, content: bytes = b"", seals: int = SEALS) -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if content:
        os.pwrite(fd, content, 0)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def send(sock: socket.socket, message: Any, fds: list[int] | None = None,
         frame: bytes | None = None) -> None:
    frame = encode(message) if frame is None else frame
    if fds:
        sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(frame)


def server_fds(hosted: Hosted) -> int:
    return len(os.listdir(f"/proc/{hosted.server.popen.pid}/fd"))


def shared(hosted: Hosted, handle: int) -> socket.socket:
    sock = hosted.attached(handle)
    send(sock, SharedMemory())
    return sock


def test_a_mapped_request_is_served_from_the_memfds_and_keeps_no_descriptor(bulk) -> None:
    before = server_fds(bulk)
    sock = shared(bulk, 7)
    data = os.urandom(SIZE)
    source, target = memfd(SIZE, data), memfd(SIZE, b"\xaa" * SIZE)
    try:
        # ReadL(0, offset 100) written at offset 50 of the writable descriptor
        send(sock, MappedRequest(2, 7, ECopy, ((0, SIZE, 0), (1, SIZE, 1), 100, 50), 0),
             [source, target])
        length = 50 + SIZE - 100
        assert receive(sock) == MappedCompleted(2, length, ((1, length),))
        assert os.pread(target, length, 0) == b"\xaa" * 50 + data[100:]
        # The same memfds again (a client's pool): served from the maps kept.
        send(sock, MappedRequest(3, 7, ECrc, ((0, SIZE, 0), 0, 0), 0), [source])
        crc = receive(sock)
        assert type(crc) is MappedCompleted and crc.value > 0
    finally:
        os.close(source)
        os.close(target)
    sock.close()
    wait_until(lambda: server_fds(bulk) == before,
               what="the server to close the connection's maps")


def _unsealed(sock: socket.socket) -> None:
    fd = memfd(SIZE, seals=0)
    send(sock, MappedRequest(5, 7, ECrc, ((0, SIZE, 0), 0, 0), 0), [fd])
    os.close(fd)


def _too_small(sock: socket.socket) -> None:
    fd = memfd(1000)
    send(sock, MappedRequest(5, 7, ECrc, ((0, SIZE, 0), 0, 0), 0), [fd])
    os.close(fd)


def _too_large(sock: socket.socket) -> None:
    fd = memfd(64 * SIZE)  # more than a descriptor of SIZE bytes needs: not mapped
    send(sock, MappedRequest(5, 7, ECrc, ((0, SIZE, 0), 0, 0), 0), [fd])
    os.close(fd)


def _a_pipe(sock: socket.socket) -> None:
    r, w = os.pipe()
    send(sock, MappedRequest(5, 7, ECrc, ((0, 10, 0), 0, 0), 0), [r, w][:1])
    os.close(r)
    os.close(w)


def _read_only_for_writable(sock: socket.socket) -> None:
    fd, other = memfd(SIZE), memfd(SIZE)
    read_only = os.open(f"/proc/self/fd/{other}", os.O_RDONLY)  # (the same memfd, read-only)
    send(sock, MappedRequest(5, 7, ECopy, ((0, SIZE, 0), (1, SIZE, 1), 0, 0), 0),
         [fd, read_only])
    for each in (fd, other, read_only):
        os.close(each)


def _fds_with_an_attach(sock: socket.socket) -> None:
    fd = memfd(SIZE)
    send(sock, Attach(9, b"t" * 16), [fd])
    os.close(fd)


def _too_many_fds(sock: socket.socket) -> None:
    fds = [memfd(4096) for _ in range(6)]
    send(sock, MappedRequest(5, 7, ECrc, ((0, 4096, 0), 0, 0), 0), fds)
    for fd in fds:
        os.close(fd)


def _an_fd_no_argument_names(sock: socket.socket) -> None:
    fds = [memfd(SIZE), memfd(SIZE)]
    send(sock, MappedRequest(5, 7, ECrc, ((0, SIZE, 0), 0, 0), 0), fds)
    for fd in fds:
        os.close(fd)


def _garbage_with_fds(sock: socket.socket) -> None:
    fd = memfd(SIZE)
    send(sock, None, [fd], frame=b"\x95\x3d garbage")
    os.close(fd)


def _a_truncated_frame_with_fds(sock: socket.socket) -> None:
    fd = memfd(SIZE)
    frame = encode(MappedRequest(5, 7, ECrc, ((0, SIZE, 0), 0, 0), 0))
    send(sock, None, [fd], frame=frame[:-3])
    os.close(fd)


def _a_mapped_request_before_shared_memory(sock: socket.socket) -> None:
    # (Linux drops the descriptors of a frame read without room for them: none reach the
    # server; the frame is then a message the rules do not take.)
    fd = memfd(SIZE)
    send(sock, MappedRequest(5, 7, ECrc, ((0, SIZE, 0), 0, 0), 0), [fd])
    os.close(fd)


def _unattached_handle(sock: socket.socket) -> None:
    fd = memfd(SIZE)
    send(sock, MappedRequest(5, 99, ECrc, ((0, SIZE, 0), 0, 0), 0), [fd])
    os.close(fd)


# (what the peer does, whether it sends SharedMemory first, what it gets: an answer or the end)
HOSTILE: list[tuple[Callable[[socket.socket], None], bool, Any]] = [
    (_unsealed, True, Completed(5, KErrBadDescriptor, ())),
    (_too_small, True, Completed(5, KErrBadDescriptor, ())),
    (_too_large, True, Completed(5, KErrBadDescriptor, ())),
    (_a_pipe, True, Completed(5, KErrBadDescriptor, ())),
    (_read_only_for_writable, True, Completed(5, KErrBadDescriptor, ())),
    (_unattached_handle, True, Panicked(5, 99, "KERN-EXEC", 0, 0)),
    (_fds_with_an_attach, True, None),
    (_too_many_fds, True, None),
    (_an_fd_no_argument_names, True, None),
    (_garbage_with_fds, True, None),
    (_a_truncated_frame_with_fds, True, None),
    (_a_mapped_request_before_shared_memory, False, None),
]


@pytest.mark.parametrize(("hostile", "announce", "answer"), HOSTILE,
                         ids=[h.__name__.strip("_") for h, _, _ in HOSTILE])
def test_a_hostile_peer_with_file_descriptors_cannot_hurt_the_server(
    bulk, hostile, announce, answer
) -> None:
    good = bulk.attached(3)  # another client, served all along
    before = server_fds(bulk)
    sock = bulk.attached(7)
    if announce:
        send(sock, SharedMemory())
    hostile(sock)
    if answer is None:
        assert ended(sock)
    else:
        assert receive(sock) == answer
        assert call(sock, Request(6, 7, EFds, (), 0)).value > 0  # the connection lives
    sock.close()
    wait_until(lambda: server_fds(bulk) == before, what="the server to hold no descriptor")
    # (its own count sees one more: the directory it lists)
    assert call(good, Request(4, 3, EFds, (), 0)) == Completed(4, before + 1, ())
    assert bulk.server.alive()


def test_maps_are_bounded_per_connection_and_all_closed_with_it(bulk) -> None:
    from ipcfw.errors import KErrNoMemory
    from ipcfw.server.shm import IDLE_MAPS, LIVE_MAPS
    from plugins.bulk import EHold

    before = server_fds(bulk)
    sock = shared(bulk, 7)
    # Served one after the other, ten memfds leave at most IDLE_MAPS maps (one descriptor each).
    for req_id in range(10):
        fd = memfd(SIZE)
        send(sock, MappedRequest(req_id + 1, 7, ECrc, ((0, SIZE, 0), 0, 0), 0), [fd])
        os.close(fd)
        assert type(receive(sock)) is MappedCompleted
    # (the descriptor received with the last frame is closed just after its answer is sent)
    wait_until(lambda: server_fds(bulk) <= before + 1 + IDLE_MAPS,  # (+1: the connection)
               what=f"at most {IDLE_MAPS} idle maps")
    # Held by the server, LIVE_MAPS memfds are in use; one more is refused, not mapped.
    for tag in range(LIVE_MAPS + 1):
        fd = memfd(SIZE)
        send(sock, MappedRequest(100 + tag, 7, EHold, ((0, SIZE, 0), tag), 0), [fd])
        os.close(fd)
    assert receive(sock) == Completed(100 + LIVE_MAPS, KErrNoMemory, ())
    sock.close()
    wait_until(lambda: server_fds(bulk) == before,
               what="the server to close the maps of the held messages too")


def test_a_connection_without_the_session_gets_nothing_mapped(bulk) -> None:
    sock = bulk.connect()  # no Attach: it holds no session here
    huge = memfd(1 << 29)  # sparse: 512 MiB, sealed, of the size its descriptor declares
    try:
        send(sock, SharedMemory())
        send(sock, MappedRequest(5, 7, ECrc, ((0, 1 << 29, 0), 0, 0), 0), [huge])
        assert receive(sock) == Panicked(5, 7, "KERN-EXEC", 0, 0)
        with open(f"/proc/{bulk.server.popen.pid}/maps") as maps:
            assert "memfd:test" not in maps.read()  # nothing of it was mapped
    finally:
        sock.close()
        os.close(huge)

