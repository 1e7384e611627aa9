"""The client's side of the direct path against a server that misbehaves, and its limits:
a direct server may answer only its own connection's requests and sessions, and write only
what the request's descriptors take (as the kernel enforces on the kernel path).

Uses the fakes of tests/client/fakes_direct.py (threads of this process, no kernel process).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import ipcfw
from ipcfw import RSession, TIpcArgs, TRequestStatus
from ipcfw.client import runtime as client_runtime
from ipcfw.protocol import Close, Completed, Panicked, Request, encode
from conftest import wait_until
from fakes_direct import EECHO, EHOLD, EWRITE, FakeKernel, FakeServer, World, fake_world

EHOLDK = 66  # the kernel path holds it: never answered


class HoldingKernel(FakeKernel):
    def _answer(self, message: Any) -> Any:
        if isinstance(message, Request) and message.function == EHOLDK:
            return None
        return super()._answer(message)


@pytest.fixture
def world() -> Iterator[World]:
    with fake_world(HoldingKernel) as world:
        yield world


def test_a_direct_server_cannot_complete_or_kill_what_is_not_on_its_connection(
    world: World,
) -> None:
    victim_session = world.connect(path="kernel")
    buffer = bytearray(4)
    status = TRequestStatus()
    victim_session.SendReceive(EHOLDK, TIpcArgs(0, buffer), status)
    wait_until(lambda: any(isinstance(e, Request) and e.function == EHOLDK
                           for e in world.kernel.events), 5)
    victim = next(e for e in world.kernel.events
                  if isinstance(e, Request) and e.function == EHOLDK)
    serve = world.server._serve

    def hostile(fd: int, request: Request, attached: set[int]) -> Any:
        connection = world.server.connections[fd]
        connection.send(encode(Completed(victim.req_id, 5, ((1, b"X" * 100),))))
        connection.send(encode(Panicked(victim.req_id, victim.handle, "EVIL", 1, 1)))
        return serve(fd, request, attached)

    world.server._serve = hostile  # type: ignore[method-assign]
    with world.connect() as hostile_session:
        assert hostile_session.SendReceive(EECHO, (1,)) == 1
        assert hostile_session.SendReceive(EECHO, (2,)) == 2
    assert not status.done() and buffer == bytearray(4)
    assert victim_session.SendReceive(EECHO, (3,)) == 3  # alive
    victim_session.Close()
    assert status.Int() == ipcfw.KErrSessionClosed and buffer == bytearray(4)


def test_a_write_past_a_descriptor_or_to_no_descriptor_is_bad_descriptor(world: World) -> None:
    with world.connect() as session:
        short = bytearray(b"four")  # EWRITE writes b"direct" (6 bytes) to argument 1
        with pytest.raises(ipcfw.IpcError) as raised:
            session.SendReceive(EWRITE, TIpcArgs(0, short))
        assert raised.value.code == ipcfw.KErrBadDescriptor and short == b"four"
        status = TRequestStatus()
        session.SendReceive(EWRITE, TIpcArgs(0, short), status)
        assert status.Wait(5) == ipcfw.KErrBadDescriptor and short == b"four"
        status = TRequestStatus()
        session.SendReceive(EWRITE, TIpcArgs(0, b"read-only"), status)  # not writable
        assert status.Wait(5) == ipcfw.KErrBadDescriptor
        enough = bytearray(6)
        assert session.SendReceive(EWRITE, TIpcArgs(0, enough)) == 0 and enough == b"direct"


def test_a_close_from_another_thread_does_not_wait_behind_an_unrelated_sync_call(
    world: World,
) -> None:
    shared = world.connect()
    shared.ShareAuto()
    busy = world.connect()
    assert shared.SendReceive(EECHO, (1,)) == 1
    handle = shared.Handle()
    took: list[float] = []

    def close_soon() -> None:
        wait_until(lambda: any(isinstance(e, Request) and e.function == EHOLD
                               for e in world.server.events), 5)
        started = time.monotonic()
        shared.Close()
        took.append(time.monotonic() - started)

    closer = threading.Thread(target=close_soon)
    closer.start()
    with pytest.raises(TimeoutError):
        busy.SendReceive(EHOLD, (), timeout=3.0)  # holds this thread's direct connection
    closer.join(5)
    assert took and took[0] < 1.5, took  # not behind the 3 s call (a bound, not a speed)
    assert Close(handle) in world.server.events and Close(handle) in world.kernel.events
    busy.Close()


def fill(session: RSession, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The calling thread's direct connection of `session` finds its socket full (a server
    that reads no more) until the event returned is cleared."""
    direct = session._life.routes[threading.get_ident()]
    full = threading.Event()
    full.set()
    send = direct.socket.send
    monkeypatch.setattr(direct.socket, "send",
                        lambda frame: False if full.is_set() else send(frame))
    return full


def test_a_close_that_finds_the_socket_full_is_sent_later_and_the_kernels_after_it(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = world.connect()
    handle = session.Handle()
    status = TRequestStatus()
    session.SendReceive(EHOLD, (), status)
    full = fill(session, monkeypatch)
    started = time.monotonic()
    session.Close()
    # (A bound against blocking until the socket drains, which it never would here.)
    assert time.monotonic() - started < 1.0 and status.Int() == ipcfw.KErrSessionClosed
    time.sleep(0.2)
    assert Close(handle) not in world.server.events and Close(handle) not in world.kernel.events
    full.clear()  # the server reads again: the I/O thread sends the Close, then the kernel's
    wait_until(lambda: Close(handle) in world.server.events, 5)
    wait_until(lambda: Close(handle) in world.kernel.events, 5)


def test_a_close_sent_later_is_sent_by_the_io_thread_not_a_thread_of_its_own(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = world.connect()
    handle = session.Handle()
    full = fill(session, monkeypatch)
    senders: list[str] = []
    kernel_send = client_runtime.Channel.send

    def recording(channel: client_runtime.Channel, frame: bytes) -> None:
        senders.append(threading.current_thread().name)
        kernel_send(channel, frame)

    monkeypatch.setattr(client_runtime.Channel, "send", recording)
    before = {thread.name for thread in threading.enumerate()}
    session.Close()
    assert {thread.name for thread in threading.enumerate()} <= before  # (STYLE 3.3)
    full.clear()
    wait_until(lambda: Close(handle) in world.kernel.events, 5)
    assert senders == ["ipcfw-inbox"]  # the runtime's own I/O thread, which it joins


def test_a_server_socket_outside_the_kernels_directory_is_not_connected_to(
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory = tempfile.mkdtemp(prefix="dk", dir="/tmp")
    elsewhere = tempfile.mkdtemp(prefix="dk", dir="/tmp")
    server = FakeServer(elsewhere)
    kernel = FakeKernel(server, directory)
    try:
        with caplog.at_level(logging.DEBUG, logger="ipcfw.client"):
            with RSession.connect("fake", endpoint=kernel.endpoint, path="direct",
                                  timeout=5) as session:
                assert session.SendReceive(EECHO, (4,)) == 4
        assert kernel.served == 1 and server.events == []
        assert "not in the kernel's directory" in caplog.text
    finally:
        client_runtime.Runtime.shutdown(kernel.endpoint)
        server.kill()
        kernel.stop()
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_a_connection_the_server_closed_does_not_claim_the_server_died(world: World) -> None:
    session = world.connect()
    world.server.kill()
    with pytest.raises(ipcfw.ServerTerminated) as raised:
        session.SendReceive(EECHO, (1,))
    assert "server closed this thread's direct connection" in str(raised.value)
    assert "crashed" not in str(raised.value) and "died" not in str(raised.value)
    session.Close()


def test_a_close_sent_later_reaches_the_kernel_when_the_closing_thread_has_ended(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = world.connect()
    session.ShareAuto()
    handle = session.Handle()
    full = fill(session, monkeypatch)
    runtime, _ = session._life.usable()
    channels = []

    def close() -> None:  # (a shared session: any thread may close it)
        channels.append(runtime.channel())
        session.Close()

    closer = threading.Thread(target=close)
    closer.start()
    closer.join(5)
    # the closing thread has ended, and its channel with it, before the socket drains
    wait_until(lambda: channels[0].closed, 5)
    full.clear()
    wait_until(lambda: Close(handle) in world.kernel.events, 5)
