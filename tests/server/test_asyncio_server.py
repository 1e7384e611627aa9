"""An ``async def ServiceL`` server, hosted by ``ipcfw serve`` in its own process, with clients
on both data paths: sessions awaiting do not stop the others, coroutines start in the order
their requests came, a cancel or the client's death cancels the coroutine, a coroutine that
raises fails its request, and ``Complete`` works from a thread."""

from __future__ import annotations

import asyncio
import signal
import threading

import pytest

import ipcfw
from ipcfw import KErrCancel, RSession, TRequestStatus
from conftest import wait_until
from plugins import aio

pytestmark = pytest.mark.usefixtures("data_path")  # each test on both data paths

VERSION = (1, 0, 0)


@pytest.fixture
def aio_server(kernel):
    return kernel.serve("plugins.aio:AioServer", "aio")


def test_a_session_awaiting_does_not_stop_the_others(aio_server):
    with RSession.connect("aio", VERSION) as waiting, RSession.connect("aio", VERSION) as other:
        status = TRequestStatus()
        waiting.SendReceive(aio.EWait, (1, 41), status)
        assert other.SendReceive(aio.EStart, (5,)) == 5  # served while the first one waits
        assert status.Int() == ipcfw.KRequestPending
        assert other.SendReceive(aio.EOpen, (1,)) == 0
        assert status.Wait(5) == 41


def test_one_sessions_coroutines_start_in_the_order_of_its_requests(aio_server):
    with RSession.connect("aio", VERSION) as session:
        statuses = [TRequestStatus() for _ in range(20)]
        for i, status in enumerate(statuses):
            session.SendReceive(aio.EStart, (i,), status)
        assert [status.Wait(5) for status in statuses] == list(range(20))
        starts = [e[1] for e in aio.recorded_events(session) if e[0] == "start"]
        assert starts == list(range(20))


def test_the_clients_cancel_cancels_the_coroutine(aio_server):
    with RSession.connect("aio", VERSION) as session:
        status = TRequestStatus()
        session.SendReceive(aio.EWait, (2, 0), status)
        assert session.SendReceive(aio.EStart, (1,)) == 1  # the coroutine is waiting now
        assert status.Cancel() == KErrCancel
        wait_until(lambda: ["cancelled", 2] in aio.recorded_events(session),
                   what="the coroutine to be cancelled")


def test_the_clients_death_cancels_its_coroutines(kernel, aio_server):
    client = kernel.spawn_client(["-c", (
        "import time, ipcfw\n"
        "s = ipcfw.RSession.connect('aio', (1, 0, 0))\n"
        "status = ipcfw.TRequestStatus(); s.SendReceive(1, (3, 0), status)\n"
        "print(s.SendReceive(6, (9,)), flush=True)\n"
        "time.sleep(60)\n"
    )])
    wait_until(lambda: "9" in client.log(), what="the client's request to be waiting")
    client.kill(signal.SIGKILL)
    with RSession.connect("aio", VERSION) as session:
        wait_until(lambda: ["cancelled", 3] in aio.recorded_events(session), timeout=5,
                   what="the dead client's coroutine to be cancelled")


def test_a_coroutine_that_raises_fails_its_request_and_the_server_goes_on(aio_server):
    with RSession.connect("aio", VERSION) as session:
        with pytest.raises(ipcfw.General):
            session.SendReceive(aio.ERaise)
        assert session.SendReceive(aio.EStart, (3,)) == 3


def test_a_coroutine_can_complete_its_message_from_a_thread(aio_server):
    with RSession.connect("aio", VERSION) as session:
        assert session.SendReceive(aio.EFromThread, (77,)) == 77


def test_an_awaiting_client_of_an_async_server(aio_server):
    async def main() -> list[int]:
        with RSession.connect("aio", VERSION) as session:
            waits = [TRequestStatus() for _ in range(3)]
            for i, status in enumerate(waits):
                session.SendReceive(aio.EWait, (10 + i, i), status)
            assert session.SendReceive(aio.EOpen, (11,)) == 0
            first = await waits[1]
            for tag in (10, 12):
                session.SendReceive(aio.EOpen, (tag,))
            return [first, await waits[0], await waits[2]]

    assert asyncio.run(asyncio.wait_for(main(), 10)) == [1, 0, 2]


def test_requests_that_come_while_coroutines_complete_are_all_served(aio_server):
    # A coroutine's Complete sends on the kernel socket from the loop thread while the loop
    # awaits its sockets' readiness; a request arriving then must still wake the loop.
    def client(index: int, failures: list[str]) -> None:
        with RSession.connect("aio", VERSION) as session:
            for i in range(300):
                status = TRequestStatus()
                session.SendReceive(aio.EStart, (i,), status)
                try:
                    assert status.Wait(5) == i
                except TimeoutError:
                    failures.append(f"client {index}: request {i} not answered in 5 s")
                    status.Cancel()
                    return

    failures: list[str] = []
    threads = [threading.Thread(target=client, args=(n, failures)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []


def test_an_async_server_under_an_overlay(kernel):
    # After the overlay hands the session off, the layer under it serves with its async
    # ServiceL: the coroutine it returns must be run, not dropped.
    kernel.serve("plugins.aio:AioServer", "aio", "--overlay", "plugins.overlays:QuickWorkOverlay")
    with RSession.connect("aio", VERSION, timeout=5) as session, \
            RSession.connect("aio", VERSION, timeout=5) as other:
        for handed_off in (session, other):
            wait_until(lambda s=handed_off: s.SendReceive(aio.EStart, (5,), timeout=5) == 5,
                       what="the overlay to hand the session off")
        status = TRequestStatus()
        session.SendReceive(aio.EWait, (7, 41), status)
        assert other.SendReceive(aio.EOpen, (7,), timeout=5) == 0
        assert status.Wait(5) == 41
        with pytest.raises(ipcfw.General):
            session.SendReceive(aio.ERaise, timeout=5)
