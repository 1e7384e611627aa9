"""The client under asyncio, on both data paths: cancelling the task that awaits a request
cancels the request (its slot is freed, the server told), and ``Cancel()`` on a loop's thread
never waits for the answer."""

from __future__ import annotations

import asyncio
import time

import pytest

import ipcfw
from ipcfw import KErrCancel, KRequestPending, RSession, TRequestStatus
from conftest import wait_until
from plugins import probe

pytestmark = pytest.mark.usefixtures("data_path")  # each test on both data paths

VERSION = (1, 2, 0)


@pytest.fixture
def probe_server(kernel):
    return kernel.serve("plugins.probe:ProbeServer", "probe")


def test_wait_for_timing_out_cancels_the_request_and_frees_its_slot(probe_server):
    with RSession.connect("probe", VERSION, message_slots=1) as session:
        held = TRequestStatus()

        async def ask() -> None:
            session.SendReceive(probe.EHold, (4,), held)
            await asyncio.wait_for(held, 0.2)

        with pytest.raises(asyncio.TimeoutError):
            asyncio.run(ask())
        wait_until(held.done, what="the cancelled request to complete")
        assert held.Int() == KErrCancel
        again = TRequestStatus()
        session.SendReceive(probe.EEcho, (8,), again)  # the one slot is free again
        assert again.Wait(5) == 8
        wait_until(lambda: ["cancelled", session.Handle(), probe.EHold, 4]
                   in probe.recorded_events(session), what="the server's Cancelled hook")


def test_a_cancelled_task_cancels_its_request(probe_server):
    with RSession.connect("probe", VERSION) as session:
        held = TRequestStatus()

        async def main() -> None:
            session.SendReceive(probe.EHold, (5,), held)
            task = asyncio.ensure_future(held)
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(asyncio.wait_for(main(), 10))
        wait_until(held.done, what="the cancelled request to complete")
        assert held.Int() == KErrCancel
        assert session.SendReceive(probe.ECompleteHeld, (5, 1)) == 0  # too late: dropped
        assert held.Int() == KErrCancel


def test_cancel_on_a_loops_thread_does_not_wait_for_the_answer(probe_server, data_path):
    with RSession.connect("probe", VERSION) as session, \
            RSession.connect("probe", VERSION) as other:
        held = TRequestStatus()
        session.SendReceive(probe.EHold, (6,), held)
        busy = TRequestStatus()
        other.SendReceive(probe.ESleep, (1000, 0), busy)  # the server's loop sleeps for 1 s

        async def cancel() -> tuple[int, int]:
            first = held.Cancel()
            with pytest.raises(ipcfw.Cancelled):
                await held
            return first, held.Int()

        first, final = asyncio.run(asyncio.wait_for(cancel(), 10))
        # On the direct path only the sleeping server can answer; through the kernel, the
        # kernel answers a cancel itself, possibly before Cancel() has returned.
        assert first == KRequestPending or (data_path == "kernel" and first == KErrCancel)
        assert final == KErrCancel
        assert busy.Wait(5) == 0


# -- connecting from a coroutine ---------------------------------------------------------------


def _keep_the_server_busy(session: RSession) -> None:
    """Make the probe server's loop sleep for 2 s. Nothing can tell when the sleep has begun
    (the server answers nothing meanwhile), so the request gets a head start of 0.3 s, in
    which it reaches an idle loop; the connects after it then wait at least 1.7 s."""
    busy = TRequestStatus()
    session.SendReceive(probe.ESleep, (2000, 0), busy)
    time.sleep(0.3)


async def _ticking_while(work):
    """Run `work` (a coroutine) beside a ticker; return its result and how often the ticker
    ran meanwhile (a blocked loop does not tick)."""
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.ensure_future(ticker())
    try:
        result = await work
    finally:
        task.cancel()
    return result, ticks


def test_connect_async_does_not_block_the_loop_while_the_server_is_busy(probe_server):
    with RSession.connect("probe", VERSION) as other:
        _keep_the_server_busy(other)

        async def main() -> tuple[int, int]:
            session, ticks = await _ticking_while(RSession.connect_async("probe", VERSION))
            with session:
                return session.SendReceive(probe.EEcho, (7,)), ticks

        value, ticks = asyncio.run(asyncio.wait_for(main(), 20))
        assert value == 7
        assert ticks >= 10  # the loop ran while the server could not answer the connect


def test_an_async_connected_session_keeps_one_threads_order_across_the_switch(probe_server):
    async def main() -> list[int]:
        session = await RSession.connect_async("probe", VERSION, message_slots=64)
        with session:
            statuses = []
            for i in range(40):  # async and sync requests, as the session moves
                if i % 3:
                    status = TRequestStatus()
                    session.SendReceive(probe.ERecord, (i,), status)
                    statuses.append(status)
                else:
                    assert session.SendReceive(probe.ERecord, (i,)) == i
            for status in statuses:
                await status
            return [e[2] for e in probe.recorded_events(session) if e[0] == "arg"]

    assert asyncio.run(asyncio.wait_for(main(), 20)) == list(range(40))


def test_connect_async_given_up_leaves_no_session_behind(kernel, probe_server):
    with RSession.connect("probe", VERSION) as other:
        before = kernel.statistics()["sessions"]
        _keep_the_server_busy(other)  # the connect cannot be accepted yet

        async def main() -> None:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(RSession.connect_async("probe", VERSION), 0.2)

        asyncio.run(asyncio.wait_for(main(), 10))
        # The kernel created the session once the server accepted it; nobody held it: closed.
        wait_until(lambda: kernel.statistics()["sessions"] == before,
                   what="the abandoned session to be closed")


def test_connect_async_waits_for_a_server_that_starts_later(kernel):
    async def main() -> int:
        connecting = asyncio.ensure_future(RSession.connect_async("probe", VERSION, wait=20))
        await asyncio.sleep(0.3)
        assert not connecting.done()
        await asyncio.get_running_loop().run_in_executor(
            None, kernel.serve, "plugins.probe:ProbeServer", "probe")
        with await connecting as session:
            return session.SendReceive(probe.EEcho, (5,))

    assert asyncio.run(asyncio.wait_for(main(), 30)) == 5


def test_connect_async_refused_raises_with_the_kernels_text(kernel, probe_server):
    async def main() -> None:
        await RSession.connect_async("prob", VERSION)

    with pytest.raises(ipcfw.NotFound, match="closest registered name: 'probe'"):
        asyncio.run(asyncio.wait_for(main(), 10))


def test_a_task_awaiting_an_unused_status_is_cancelled_as_any_task_is():
    async def main() -> None:
        task = asyncio.ensure_future(_await(TRequestStatus()))  # (given to no request)
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(main(), 5))


async def _await(status: TRequestStatus) -> int:
    return await status
