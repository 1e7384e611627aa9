"""Cancelling an asynchronous request: exactly once, slot freed, server told, late completion
dropped."""

from __future__ import annotations


import pytest

import ipcfw
from ipcfw import KErrCancel, RSession, TRequestStatus
from conftest import wait_until
from plugins import probe

pytestmark = pytest.mark.usefixtures("data_path")  # each test on both data paths

VERSION = (1, 2, 0)


@pytest.fixture
def probe_server(kernel):
    return kernel.serve("plugins.probe:ProbeServer", "probe")


events = probe.recorded_events


def test_cancel_completes_with_kerrcancel_frees_the_slot_and_tells_the_server(kernel, probe_server):
    with RSession.connect("probe", VERSION, message_slots=1) as session:
        held = TRequestStatus()
        session.SendReceive(probe.EHold, (5,), held)
        busy = TRequestStatus()
        session.SendReceive(probe.EEcho, (1,), busy)
        assert busy.Wait(5) == ipcfw.KErrServerBusy  # the one slot is taken
        assert held.Cancel() == KErrCancel
        assert held.Int() == KErrCancel
        again = TRequestStatus()
        session.SendReceive(probe.EEcho, (2,), again)  # the slot is free again
        assert again.Wait(5) == 2
        wait_until(lambda: ["cancelled", session.Handle(), probe.EHold, 5] in events(session),
                   what="the server's Cancelled hook")
        # The server completing the cancelled message later is harmless: nothing is sent.
        assert session.SendReceive(probe.ECompleteHeld, (5, 99)) == 0
        assert held.Int() == KErrCancel
        assert session.SendReceive(probe.EEcho, (3,)) == 3
    wait_until(lambda: kernel.statistics()["messages"] == 0, what="no message left")


def test_cancelling_a_completed_request_returns_its_value(probe_server):
    with RSession.connect("probe", VERSION) as session:
        status = TRequestStatus()
        session.SendReceive(probe.EEcho, (7,), status)
        assert status.Wait(5) == 7
        assert status.Cancel() == 7
        assert not [e for e in events(session) if e[0] == "cancelled"]


def test_cancel_racing_the_servers_completion_completes_exactly_once(kernel, probe_server):
    with RSession.connect("probe", VERSION) as session:
        session.ShareAuto()
        finals = []
        for tag in range(40):
            status = TRequestStatus()
            session.SendReceive(probe.EHold, (tag,), status)
            session.SendReceive(probe.ECompleteHeldLater, (tag, 1000 + tag, tag % 3))
            finals.append((tag, status.Cancel()))
        for tag, value in finals:
            assert value in (KErrCancel, 1000 + tag)
        assert session.SendReceive(probe.EEcho, (4,)) == 4
    wait_until(lambda: kernel.statistics()["messages"] == 0, what="no message left")
    assert kernel.statistics()["cancellable"] == 0
