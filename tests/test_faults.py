"""What clients see when a server or the kernel dies (real SIGKILLs)."""

from __future__ import annotations

import json
import signal

import pytest

import ipcfw
from ipcfw import RSession, TRequestStatus
from conftest import wait_until
from plugins import probe

VERSION = (1, 2, 0)


def test_server_death_completes_outstanding_requests_with_server_terminated(kernel):
    server = kernel.serve("plugins.probe:ProbeServer", "probe")
    session = RSession.connect("probe", VERSION)
    statuses = [TRequestStatus() for _ in range(10)]
    for tag, status in enumerate(statuses):
        session.SendReceive(probe.EHold, (tag,), status)
    wait_until(lambda: kernel.statistics()["messages"] == 10, what="the requests to be held")
    server.kill(signal.SIGKILL)
    assert [s.Wait(5) for s in statuses] == [ipcfw.KErrServerTerminated] * 10
    with pytest.raises(ipcfw.ServerTerminated):
        session.SendReceive(probe.EEcho, (1,))
    session.Close()
    wait_until(lambda: kernel.statistics()["sessions"] == 0, what="the dead session to be freed")
    kernel.serve("plugins.probe:ProbeServer", "probe")  # the name is free for a new instance
    with RSession.connect("probe", VERSION) as again:
        assert again.SendReceive(probe.EEcho, (2,)) == 2


def test_client_death_disconnects_its_sessions(kernel):
    kernel.serve("plugins.probe:ProbeServer", "probe")
    script = (
        "import os, signal, ipcfw; from plugins import probe\n"
        "sessions = [ipcfw.RSession.connect('probe', (1, 2, 0)) for _ in range(3)]\n"
        "for s in sessions: s.SendReceive(probe.EHold, (s.Handle(),), ipcfw.TRequestStatus())\n"
        "for s in sessions: s.SendReceive(probe.EEcho, (0,))  # in order: the holds arrived\n"
        "print(' '.join(str(s.Handle()) for s in sessions), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = kernel.client(["-c", script])
    assert result.returncode == -signal.SIGKILL
    handles = [int(h) for h in result.stdout.split()]
    assert len(handles) == 3
    wait_until(lambda: kernel.statistics()["sessions"] == 0, timeout=5, what="Disconnect for every session")
    with RSession.connect("probe", VERSION) as session:
        buffer = bytearray(1 << 16)
        session.SendReceive(probe.EEvents, (buffer,))
        events = json.loads(buffer)
        for handle in handles:  # completing the held messages afterwards is harmless
            session.SendReceive(probe.ECompleteHeld, (handle, 0))
        assert session.SendReceive(probe.EEcho, (3,)) == 3
    assert all(events.count(["disconnect", h]) == 1 for h in handles)
