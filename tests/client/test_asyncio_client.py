"""The client under asyncio, on both data paths: cancelling the task that awaits a request
cancels the request (its slot is freed, the server told), and ``Cancel()`` on a loop's thread
never waits for the answer."""

from __future__ import annotations

import asyncio

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
