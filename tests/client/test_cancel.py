"""Cancelling an asynchronous request: exactly once, slot freed, server told, late completion
dropped."""

from __future__ import annotations

import threading

import pytest

import ipcfw
from ipcfw import KErrCancel, RSession, ServerHost, TRequestStatus
from conftest import wait_until
from plugins import probe

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


def test_the_host_forgets_messages_once_completed_cancelled_or_disconnected(kernel):
    """The server host keeps each delivered request findable for a Cancel until it completes,
    is cancelled, or its session ends; then it forgets it (no leak)."""
    host = ServerHost(probe.ProbeServer(), kernel.endpoint)
    ready = threading.Event()
    loop = threading.Thread(target=host.run, args=(ready,), name="probe-host")
    loop.start()
    try:
        assert ready.wait(10)
        session = RSession.connect("probe", VERSION)
        for i in range(20):
            assert session.SendReceive(probe.EEcho, (i,)) == i
        held = [TRequestStatus() for _ in range(3)]
        for tag, status in enumerate(held):
            session.SendReceive(probe.EHold, (tag,), status)
        wait_until(lambda: len(host.server.held) == 3, what="three held messages")
        handle = session.Handle()
        assert sorted(m.Int0() for m in host.state.in_service(handle)) == [0, 1, 2]
        assert held[0].Cancel() == KErrCancel
        wait_until(lambda: len(host.state.in_service(handle)) == 2,
                   what="the cancelled one forgotten")
        assert session.SendReceive(probe.ECompleteHeld, (1, 11)) == 0
        assert held[1].Wait(5) == 11
        assert [m.Int0() for m in host.state.in_service(handle)] == [2]
        session.Close()  # the last one is still held by the server's code...
        wait_until(lambda: host.state.statistics()["in_service"] == 0,
                   what="the host to forget the closed session's")
        assert host.server.held.keys() >= {2}
    finally:
        host.stop()
        loop.join(10)
    assert not loop.is_alive()
