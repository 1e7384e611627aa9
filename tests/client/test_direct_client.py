"""The client's direct path: a fake kernel and a fake server, both threads of this process
(tests/client/fakes_direct.py), and a real client runtime between them. No process starts;
every wait is bounded. (End-to-end tests with a real kernel and server come with them.)
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import mmap
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import ipcfw
from ipcfw import ClientPanic, IpcError, RSession, TIpcArgs, TRequestStatus, User
from ipcfw.client import direct as client_direct
from ipcfw.client import connection as client_connection
from ipcfw.client import runtime as client_runtime
from ipcfw._spin import PROBE, AdaptiveSpin
from ipcfw.client.direct import SPIN, DirectSocket
from ipcfw.protocol import (
    DIRECT_ANSWER_OVERHEAD, DIRECT_MAX_UNREAD_BYTES, Attach, Close, Connect, Join, MappedRequest,
    Path, SharedMemory,
)
from conftest import wait_until
from fakes_direct import EBUSY, EECHO, EHOLD, EPANIC, EWRITE, World, fake_world


@pytest.fixture
def world() -> Iterator[World]:
    with fake_world() as world:
        yield world


def test_a_bad_path_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="'sideways'"):
        RSession().CreateSession("fake", path="sideways")
    with pytest.raises(ValueError, match="path"):
        RSession.connect("fake", path=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("chosen, expected", [
    ({}, Path.DIRECT),
    ({"env": "kernel"}, Path.KERNEL),
    ({"env": "kernel", "path": "direct"}, Path.DIRECT),
    ({"env": "direct", "path": "kernel"}, Path.KERNEL),
])
def test_the_direct_path_is_the_default_and_ipcfw_path_or_path_choose(
    world: World, monkeypatch: pytest.MonkeyPatch, chosen: dict[str, str], expected: Path
) -> None:
    monkeypatch.delenv("IPCFW_PATH", raising=False)
    if "env" in chosen:
        monkeypatch.setenv("IPCFW_PATH", chosen["env"])
    path = {"path": chosen["path"]} if "path" in chosen else {}
    with RSession.connect("fake", endpoint=world.endpoint, **path) as session:
        assert session.SendReceive(EECHO, (5,)) == 5
    connect = next(e for e in world.kernel.events if isinstance(e, Connect))
    assert connect.path == expected
    if expected == Path.KERNEL:  # no ticket asked for, nothing on a direct connection
        assert world.kernel.served == 1 and world.direct_requests() == []
    else:
        assert world.kernel.served == 0 and len(world.direct_requests()) == 1


def test_a_bad_ipcfw_path_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPCFW_PATH", "sideways")
    with pytest.raises(ValueError, match="IPCFW_PATH .*'sideways'"):
        RSession().CreateSession("fake")


def test_sync_calls_of_the_creating_thread_go_direct(world: World) -> None:
    with world.connect() as session:
        assert [session.SendReceive(EECHO, (i,)) for i in range(20)] == list(range(20))
        reply = bytearray(16)
        assert session.SendReceive(EWRITE, TIpcArgs(0, reply)) == 0
        assert reply == b"direct"
    connect = next(e for e in world.kernel.events if isinstance(e, Connect))
    assert connect.path == Path.DIRECT
    assert any(isinstance(e, Attach) for e in world.server.events)
    assert world.kernel.served == 0 and len(world.direct_requests()) == 21


def test_async_calls_go_direct_and_every_way_of_waiting_works(world: World) -> None:
    with world.connect() as session:
        statuses = [TRequestStatus() for _ in range(4)]
        for i, status in enumerate(statuses):
            session.SendReceive(EECHO, (i,), status)
        assert statuses[0].Wait(timeout=5) == 0
        assert statuses[1].result(timeout=5) == 1
        assert User.WaitForRequest(statuses[2], timeout=5) in statuses
        fired = threading.Event()
        statuses[3].add_done_callback(lambda s: fired.set())
        assert fired.wait(5) and statuses[3].Int() == 3

        async def awaited() -> int:
            status = TRequestStatus()
            session.SendReceive(EECHO, (42,), status)
            return await asyncio.wait_for(status, 5)

        assert asyncio.run(awaited()) == 42
    assert world.kernel.served == 0


def test_a_callback_fires_while_the_thread_is_idle(world: World) -> None:
    with world.connect() as session:
        status = TRequestStatus()
        fired = threading.Event()
        status.add_done_callback(lambda s: fired.set())
        session.SendReceive(EHOLD, (), status)
        wait_until(lambda: any(r.function == EHOLD for r in world.direct_requests()), 5)
        held = next(r.req_id for r in world.direct_requests() if r.function == EHOLD)
        world.server.release(held, 9)
        # This thread makes no ipcfw call: the runtime's I/O thread settles the connection.
        assert fired.wait(5) and status.Int() == 9


def test_wait_for_request_across_a_kernel_and_a_direct_session(world: World) -> None:
    with world.connect() as direct, world.connect(path="kernel") as kernel_path:
        held, quick = TRequestStatus(), TRequestStatus()
        direct.SendReceive(EHOLD, (), held)
        kernel_path.SendReceive(EECHO, (3,), quick)
        assert User.WaitForRequest(held, quick, timeout=5) is quick
        wait_until(lambda: any(r.function == EHOLD for r in world.direct_requests()), 5)
        world.server.release(world.direct_requests()[-1].req_id, 4)
        assert User.WaitForRequest(held, timeout=5) is held and held.Int() == 4


def test_send_returns_on_the_servers_ack_and_raises_server_busy(world: World) -> None:
    with world.connect() as session:
        session.Send(EECHO, (1,))
        with pytest.raises(ipcfw.ServerBusy):
            session.Send(EBUSY)
    assert [r.mode for r in world.direct_requests()] == [2, 2]


def test_a_thread_keeps_fewer_answers_pending_than_the_server_leaves_unread(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server closes a connection that leaves DIRECT_MAX_UNREAD answers unread; past that
    # many pending, a request completes with KErrServerBusy and is not sent, so a thread that
    # stops reading within the limit is never cut off.
    monkeypatch.setattr(client_connection, "DIRECT_MAX_UNREAD", 3)
    with world.connect() as session:
        held = [TRequestStatus() for _ in range(3)]
        for status in held:
            session.SendReceive(EHOLD, (), status)
        busy = TRequestStatus()
        session.SendReceive(EECHO, (1,), busy)
        assert busy.Wait(5) == ipcfw.KErrServerBusy
        with pytest.raises(ipcfw.ServerBusy, match="3 asynchronous requests of this thread"):
            busy.result()
        assert session.SendReceive(EECHO, (2,)) == 2  # a sync call is not refused
        wait_until(lambda: len(world.direct_requests()) == 4, 5)
        world.server.release(world.direct_requests()[0].req_id, 7)
        assert held[0].Wait(5) == 7
        again = TRequestStatus()
        session.SendReceive(EECHO, (3,), again)  # room again
        assert again.Wait(5) == 3
        assert [r.function for r in world.direct_requests()] == [EHOLD] * 3 + [EECHO] * 2


def test_a_thread_is_owed_fewer_answer_bytes_than_the_server_leaves_unread(world: World) -> None:
    # The server closes a connection that leaves direct_unread_bytes(max_frame) (64 MiB here)
    # of answers unread; each pending request counts its writable descriptors carried in the
    # frame (here 60 KiB) and DIRECT_ANSWER_OVERHEAD (room for an error text too): past the
    # bound, KErrServerBusy, unsent.
    size = 60 * 1024
    fits = DIRECT_MAX_UNREAD_BYTES // (size + DIRECT_ANSWER_OVERHEAD)
    with world.connect() as session:
        held = [TRequestStatus() for _ in range(fits)]
        for status in held:
            session.SendReceive(EHOLD, (0, bytearray(size)), status)
        busy = TRequestStatus()
        session.SendReceive(EHOLD, (0, bytearray(size)), busy)
        assert busy.Wait(5) == ipcfw.KErrServerBusy
        with pytest.raises(ipcfw.ServerBusy, match=f"bound of {DIRECT_MAX_UNREAD_BYTES} bytes"):
            busy.result()
        assert session.SendReceive(EECHO, (1,)) == 1  # a sync call is not refused
        wait_until(lambda: len(world.direct_requests()) == fits + 1, 10)
        world.server.release(world.direct_requests()[0].req_id, 7)
        assert held[0].Wait(5) == 7
        again = TRequestStatus()
        session.SendReceive(EHOLD, (0, bytearray(size)), again)  # room again
        wait_until(lambda: len(world.direct_requests()) == fits + 2, 10)
        assert not again.done()


def test_cancel_goes_on_the_direct_connection(world: World) -> None:
    with world.connect() as session:
        status = TRequestStatus()
        session.SendReceive(EHOLD, (), status)
        assert status.Cancel(timeout=5) == ipcfw.KErrCancel
    assert world.kernel.served == 0


def in_thread(fn: Callable[[], Any]) -> Any:
    """Run `fn` in a new thread (which then ends) and return what it returned, or raise."""
    result: list[Any] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    if failure:
        raise failure[0]
    return result[0]


def joins(world: World) -> list[Join]:
    return [e for e in world.kernel.events if isinstance(e, Join)]


def until_decided(session: RSession) -> int:
    """Make sync calls (EECHO 0, 1, ...) on `session` from this thread until its route is
    decided (its direct connection, or the kernel path for good); returns how many."""
    calls = 0
    deadline = time.monotonic() + 5
    while threading.get_ident() not in session._life.routes:
        assert session.SendReceive(EECHO, (calls,)) == calls
        calls += 1
        assert time.monotonic() < deadline, "the thread's route was not decided within 5 s"
    return calls


def go_direct(world: World, session: RSession) -> int:
    """Make sync calls (EECHO 0) on `session` from this thread until one goes direct: the
    thread's move to its direct connection goes on in the background, one step per call.
    Returns how many took the kernel path meanwhile."""
    before = world.kernel.served
    deadline = time.monotonic() + 5
    while True:
        sent = len(world.direct_requests())
        assert session.SendReceive(EECHO, (0,)) == 0
        if len(world.direct_requests()) > sent:
            return world.kernel.served - before
        assert time.monotonic() < deadline, "the thread did not go direct within 5 s"


def test_other_threads_of_a_shared_session_go_direct_each_on_its_own_connection(
    world: World,
) -> None:
    with world.connect() as session:
        session.ShareAuto()

        def use() -> tuple[int, int, int]:
            kernel_path = go_direct(world, session)
            return kernel_path, session.SendReceive(EECHO, (8,)), session.SendReceive(EECHO, (9,))

        kernel_path, *values = in_thread(use)
        assert values == [8, 9] and kernel_path >= 1  # its first call did not wait
        assert session.SendReceive(EECHO, (10,)) == 10
        assert world.kernel.served == kernel_path and len(world.direct_requests()) == 4
        assert [j.handle for j in joins(world)] == [session.Handle()]  # once, for that thread
        assert len([e for e in world.server.events if isinstance(e, Attach)]) == 2
        wait_until(lambda: world.server.eofs == 1, 5)  # the thread's end closed its connection


def test_a_thread_uses_one_connection_for_every_session_of_a_server(world: World) -> None:
    with world.connect() as first, world.connect() as second:
        first.ShareAuto()
        second.ShareAuto()
        in_thread(lambda: (go_direct(world, first), go_direct(world, second)))
    attaches = [e for e in world.server.events if isinstance(e, Attach)]
    assert len(attaches) == 4  # two sessions, each on two threads' connections
    assert world.server.accepted == 2  # one per thread
    assert len(joins(world)) == 2


def test_a_thread_without_a_ticket_keeps_the_kernel_path_and_says_why(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.kernel.no_join_tickets = True
    with world.connect() as session:
        session.ShareAuto()
        with caplog.at_level(logging.DEBUG, logger="ipcfw.client"):
            calls = in_thread(lambda: until_decided(session))
        assert world.kernel.served == calls and len(joins(world)) == 1  # decided once
        assert "stays on the kernel path for this thread" in caplog.text
        assert session.SendReceive(EECHO, (4,)) == 4 and world.kernel.served == calls


def test_a_threads_first_calls_do_not_wait_for_its_join_and_it_goes_direct_once_answered(
    world: World,
) -> None:
    with world.connect() as session:
        session.ShareAuto()
        world.kernel.silent_joins = True  # (the server's loop busy: no ticket yet)

        def calls() -> list[int]:
            status = TRequestStatus()
            started = time.monotonic()
            session.SendReceive(EECHO, (1,), status)  # the thread's first call
            assert time.monotonic() - started < 2.0  # (not ATTACH_TIMEOUT: 5 s; a bound)
            values = [status.Wait(5), session.SendReceive(EECHO, (2,))]  # kernel path
            assert len(joins(world)) == 1  # asked once, not on every call meanwhile
            world.kernel.silent_joins = False
            go_direct(world, session)
            values.append(session.SendReceive(EECHO, (3,)))
            return values

        assert in_thread(calls) == [1, 2, 3]
        assert len(joins(world)) == 1
        assert [r.args[0] for r in world.direct_requests()] == [0, 3]


def test_a_thread_whose_attach_is_refused_uses_the_kernel_path(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    with world.connect() as session:
        session.ShareAuto()
        world.kernel.bad_tickets = True
        with caplog.at_level(logging.DEBUG, logger="ipcfw.client"):
            calls = in_thread(lambda: until_decided(session))
        assert world.kernel.served == calls and "refused its Attach" in caplog.text


def test_a_thread_whose_connection_cannot_be_made_uses_the_kernel_path(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    with world.connect() as session:
        session.ShareAuto()
        os.unlink(world.server.path)  # the creator's connection lives on; no new one can be made
        with caplog.at_level(logging.DEBUG, logger="ipcfw.client"):
            calls = in_thread(lambda: until_decided(session))
        assert world.kernel.served == calls and "no direct connection" in caplog.text
        assert session.SendReceive(EECHO, (6,)) == 6 and world.kernel.served == calls


def test_a_thread_opening_and_closing_sessions_keeps_no_route_per_session(world: World) -> None:
    runtime = client_runtime.Runtime.for_endpoint(world.endpoint)
    for _ in range(300):
        with world.connect() as session:
            assert session.SendReceive(EECHO, (1,)) == 1
    assert len(runtime._local.sentinel.routes) <= 2 * client_runtime._ROUTES_KEPT


def test_a_close_tells_every_threads_direct_connection_before_the_kernel(world: World) -> None:
    session = world.connect()
    session.ShareAuto()
    handle = session.Handle()
    ready, done = threading.Event(), threading.Event()
    statuses: list[TRequestStatus] = []

    def hold() -> None:  # a thread that stays alive with a request held by the server
        go_direct(world, session)
        status = TRequestStatus()
        session.SendReceive(EHOLD, (), status)
        statuses.append(status)
        ready.set()
        done.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert ready.wait(10)
        session.SendReceive(EECHO, (1,))
        session.Close()
        assert statuses[0].Wait(5) == ipcfw.KErrSessionClosed
        wait_until(lambda: Close(handle) in world.kernel.events, 5)
        closes = [e for e in world.server.events if e == Close(handle)]
        assert len(closes) == 2  # one on each thread's connection, before the kernel's
    finally:
        done.set()
        thread.join(5)


def test_a_joined_thread_ending_forgets_its_route_and_fails_its_requests(world: World) -> None:
    with world.connect() as session:
        session.ShareAuto()
        held: list[TRequestStatus] = []

        def hold() -> None:
            go_direct(world, session)
            status = TRequestStatus()
            session.SendReceive(EHOLD, (), status)
            held.append(status)

        in_thread(hold)
        wait_until(held[0].done, 5)
        assert held[0].Int() == ipcfw.KErrDied
        wait_until(lambda: world.server.eofs == 1, 5)
        wait_until(lambda: len(session._life.routes) == 1, 5)  # the creator's alone
        in_thread(lambda: go_direct(world, session))  # a new thread: Join
        assert len(joins(world)) == 2


def test_close_tells_the_direct_connection_before_the_kernel(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []
    direct_send = client_runtime.DirectChannel.send
    kernel_send = client_runtime.Channel.send

    def on_direct(self: Any, frame: bytes) -> None:
        order.append("direct")
        direct_send(self, frame)

    def on_kernel(self: Any, frame: bytes) -> None:
        order.append("kernel")
        kernel_send(self, frame)

    monkeypatch.setattr(client_runtime.DirectChannel, "send", on_direct)
    monkeypatch.setattr(client_runtime.Channel, "send", on_kernel)
    session = world.connect()
    handle = session.Handle()
    status = TRequestStatus()
    session.SendReceive(EHOLD, (), status)
    session.Close()
    assert order == ["direct", "kernel"]
    assert status.Int() == ipcfw.KErrSessionClosed
    wait_until(lambda: Close(handle) in world.server.events, 5)
    wait_until(lambda: Close(handle) in world.kernel.events, 5)


def test_a_refused_attach_leaves_the_session_on_the_kernel_path(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.kernel.bad_tickets = True
    with caplog.at_level(logging.DEBUG, logger="ipcfw.client"):
        with world.connect() as session:
            assert session.SendReceive(EECHO, (6,)) == 6
    assert world.kernel.served == 1 and world.direct_requests() == []
    assert "refused Attach" in caplog.text


def test_an_unreachable_server_socket_leaves_the_session_on_the_kernel_path(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.server.kill()
    os.unlink(world.server.path)
    with caplog.at_level(logging.DEBUG, logger="ipcfw.client"):
        with world.connect() as session:
            assert session.SendReceive(EECHO, (6,)) == 6
    assert world.kernel.served == 1
    assert "no direct connection" in caplog.text


def test_a_server_death_fails_pending_and_later_direct_calls(world: World) -> None:
    session = world.connect()
    status = TRequestStatus()
    session.SendReceive(EHOLD, (), status)
    wait_until(lambda: any(r.function == EHOLD for r in world.direct_requests()), 5)
    world.server.kill()
    assert status.Wait(timeout=5) == ipcfw.KErrServerTerminated
    with pytest.raises(ipcfw.ServerTerminated):
        session.SendReceive(EECHO, (1,))
    session.Close()


def test_a_server_death_during_a_sync_call_raises_server_terminated(world: World) -> None:
    with world.connect() as session:
        threading.Timer(0.1, world.server.kill).start()
        with pytest.raises(ipcfw.ServerTerminated):
            session.SendReceive(EHOLD, (), timeout=5)


def test_a_panic_kills_the_session(world: World) -> None:
    session = world.connect()
    with pytest.raises(ClientPanic, match="TEST"):
        session.SendReceive(EPANIC)
    with pytest.raises(ClientPanic):
        session.SendReceive(EECHO, (1,))
    session.Close()


def test_a_sync_call_times_out(world: World) -> None:
    with world.connect() as session:
        with pytest.raises(TimeoutError):
            session.SendReceive(EHOLD, (), timeout=0.2)
        assert session.SendReceive(EECHO, (2,)) == 2


def test_a_thread_end_closes_its_direct_connection_and_fails_its_requests(world: World) -> None:
    made: list[tuple[RSession, TRequestStatus]] = []

    def run() -> None:
        session = world.connect()
        session.ShareAuto()  # (survives its thread)
        status = TRequestStatus()
        session.SendReceive(EHOLD, (), status)
        made.append((session, status))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(5)
    session, status = made[0]
    wait_until(status.done, 5)
    assert status.Int() == ipcfw.KErrDied
    wait_until(lambda: world.server.eofs == 1, 5)
    go_direct(world, session)  # this thread: a connection of its own
    assert session.SendReceive(EECHO, (3,)) == 3
    assert len(joins(world)) == 1
    session.Close()


def test_a_kernel_death_fails_pending_and_closes_every_direct_connection(world: World) -> None:
    session = world.connect()
    status = TRequestStatus()
    session.SendReceive(EHOLD, (), status)
    runtime = client_runtime.Runtime.for_endpoint(world.endpoint)
    runtime.kernel_died()  # (what the I/O thread does when the kernel's pidfd fires)
    assert status.Wait(timeout=5) == ipcfw.KErrServerTerminated
    with pytest.raises(IpcError):
        session.SendReceive(EECHO, (1,))
    wait_until(lambda: world.server.eofs == 1, 5)
    assert runtime.direct_channels == set()
    session.Close()


# -- the socket itself, against a socketpair peer ---------------------------------------------


@pytest.fixture
def seqpacket_listener() -> Iterator[tuple[str, socket.socket]]:
    """A SOCK_SEQPACKET socket listening at a fresh path, for a DirectSocket to connect to."""
    path = f"/tmp/dk-{os.getpid()}-{time.monotonic_ns()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)
    try:
        yield path, listener
    finally:
        listener.close()
        os.unlink(path)


def test_a_direct_socket_spins_then_sleeps_and_sees_the_peers_end(
    seqpacket_listener: tuple[str, socket.socket],
) -> None:
    path, listener = seqpacket_listener
    direct = DirectSocket(path, 1.0)
    peer, _ = listener.accept()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    assert direct.receive() is None
    started = time.perf_counter()
    assert direct.wait_readable(0.05) is None
    assert time.perf_counter() - started >= 0.04
    peer.send(b"one")
    peer.send(b"two")
    assert direct.wait_readable(1.0) == b"one"  # one frame a datagram
    assert direct.receive() == b"two"
    threading.Timer(SPIN / 2, peer.send, (b"late",)).start()
    assert direct.wait_readable(1.0) == b"late"
    assert direct.send(b"x" * 1000)
    assert peer.recv(2000) == b"x" * 1000
    assert direct.send(b"b" * 300_000)  # over the default send buffer's 208 KiB
    assert peer.recv(400_000) == b"b" * 300_000
    with pytest.raises(ValueError, match="path='kernel'"):
        direct.send(b"h" * 40_000_000)  # no datagram this large: refused, still connected
    peer.send(b"c" * 300_000)  # (peers raise their send buffer as the client does)
    assert direct.wait_readable(1.0) == b"c" * 300_000
    peer.close()
    assert direct.wait_readable(1.0) == b""  # the peer's end
    direct.close()
    direct = DirectSocket(path, 1.0)
    peer, _ = listener.accept()
    while direct.send(b"y" * 10000):  # the peer reads nothing: the buffer fills
        pass
    direct.wait_writable(0.05)  # (returns, full or not)
    peer.close()  # with frames unread: the connection is reset
    with pytest.raises(ConnectionResetError):
        direct.send(b"z")
    direct.close()


def _resident_bytes(buffer: mmap.mmap) -> int:
    """How much of `buffer` is resident (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    pages = (len(buffer) + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vector = (ctypes.c_ubyte * pages)()
    result = libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(len(buffer)), vector)
    assert result == 0, os.strerror(ctypes.get_errno())
    return sum(v & 1 for v in vector) * mmap.PAGESIZE


def test_a_large_frame_does_not_stay_resident_and_a_failed_setup_leaks_no_socket(
    seqpacket_listener: tuple[str, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, listener = seqpacket_listener
    direct = DirectSocket(path, 1.0)
    peer, _ = listener.accept()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    peer.send(b"s" * 100_000)
    assert direct.wait_readable(1.0) == b"s" * 100_000
    peer.send(b"L" * 3_000_000)
    assert direct.wait_readable(1.0) == b"L" * 3_000_000
    assert _resident_bytes(direct._buffer) < 1_000_000  # its pages were given back
    peer.close()
    direct.close()
    fds = len(os.listdir("/proc/self/fd"))

    def no_memory(*args: object, **kwargs: object) -> None:
        raise OSError(12, "no memory")

    monkeypatch.setattr(client_direct.mmap, "mmap", no_memory)
    with pytest.raises(OSError):
        DirectSocket(path, 1.0)
    listener.accept()[0].close()
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_direct_socket_to_nowhere_raises_oserror() -> None:
    with pytest.raises(OSError):
        DirectSocket("/tmp/no-such-ipcfw-socket", 0.5)


def test_a_close_from_another_thread_ends_a_direct_sync_call_in_flight(world: World) -> None:
    session = world.connect()
    session.ShareAuto()
    handle = session.Handle()
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            session.SendReceive(EHOLD, (), timeout=5)
        except BaseException as exc:
            outcome.append(exc)

    # The creating thread makes the call (it goes direct); another thread closes.
    closer_done = threading.Event()

    def close_soon() -> None:
        wait_until(lambda: any(r.function == EHOLD for r in world.direct_requests()), 5)
        session.Close()
        closer_done.set()

    closer = threading.Thread(target=close_soon)
    closer.start()
    call()
    closer.join(5)
    assert closer_done.is_set()
    assert len(outcome) == 1 and isinstance(outcome[0], ipcfw.SessionClosed)
    wait_until(lambda: Close(handle) in world.server.events, 5)
    wait_until(lambda: Close(handle) in world.kernel.events, 5)


def test_a_large_descriptor_goes_in_shared_memory_not_in_the_frame(world: World) -> None:
    # (Before shared memory, a frame over the socket's buffer was refused with ValueError.)
    with world.connect() as session:
        assert session.SendReceive(EECHO, (b"x" * 10_000_000,)) == 0
        status = TRequestStatus()
        session.SendReceive(EECHO, (b"x" * 10_000_000,), status)
        assert status.Wait(10) == 0
        assert session.SendReceive(EECHO, (7,)) == 7
    seen = [e for e in world.server.events if isinstance(e, (SharedMemory, MappedRequest))]
    assert seen[0] == SharedMemory()  # once, before the first MappedRequest
    assert [e.args for e in seen[1:]] == [((0, 10_000_000, 0),)] * 2


def test_the_spin_stops_while_spins_miss_probes_and_comes_back() -> None:
    spin = AdaptiveSpin()
    assert all(spin.now() for _ in range(100))  # nothing learnt yet: spin
    spin.missed()
    assert spin.now()  # one miss is noise
    misses = 1
    while spin.now():  # a loaded machine: every spin misses
        spin.missed()
        misses += 1
    assert 2 < misses < 10  # a few misses in a row turn it off
    decided = [spin.now() for _ in range(PROBE * 4)]
    assert decided.count(True) == 4  # only probes while off
    while not spin.now():
        pass
    spin.caught()  # the probes catch their frames again ...
    caught = 1
    while not spin.now() or spin.score < 0.5:
        spin.caught()
        caught += 1
    assert caught < 10  # ... and a few turn it back on
    assert all(spin.now() for _ in range(100))


def test_occasional_misses_do_not_turn_the_spin_off() -> None:
    spin = AdaptiveSpin()
    for call in range(1000):
        assert spin.now()
        if call % 5 == 0:
            spin.missed()  # one spin in five misses its frame
        else:
            spin.caught()


@pytest.mark.parametrize("path", ["kernel", "direct"])
def test_a_failed_send_raced_by_a_completion_is_uncounted_once(
    world: World, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    # A request whose send fails is withdrawn, and uncounted, only if it is still in the table:
    # a Close (or the kernel's death) on another thread may have completed it meanwhile.
    with world.connect(path=path) as session:
        runtime, _ = session._life.usable()
        channel = runtime.channel() if path == "kernel" else session._life.routes[
            threading.get_ident()]
        kind = type(channel)

        def racing(self: Any, frame: bytes, fds: Any) -> None:
            for req_id in list(runtime.state.pending):  # completed meanwhile, by a Close
                runtime.complete(req_id, ipcfw.KErrSessionClosed)
            raise OSError("the send failed")

        monkeypatch.setattr(kind, "_transmit", racing)
        status = TRequestStatus()
        with pytest.raises(OSError):
            session.SendReceive(EECHO, (1,), status)
        assert channel.pending == 0 and channel.owed == 0  # (was -1 on the kernel channel)
        monkeypatch.undo()
        assert session.SendReceive(EECHO, (2,)) == 2
