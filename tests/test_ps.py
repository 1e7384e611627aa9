"""``ipcfw ps`` against a real kernel and servers, on both data paths: each view, its JSON, and
the ages of the messages a server holds (tests/test_ps_format.py tests the formatting alone)."""

from __future__ import annotations

import json
import os
import threading
import time

import psutil
import pytest

from ipcfw import RSession, TRequestStatus
from conftest import wait_until
from plugins.holder import EEcho, EHold, ERelease

pytestmark = pytest.mark.usefixtures("data_path")  # each test on both data paths

HELD = 0.6  # seconds a request is held before ps looks


def ps(kernel, *options: str) -> str:
    result = kernel.client(["-m", "ipcfw", "ps", *options])
    assert result.returncode == 0, result.stderr
    return result.stdout


def ps_json(kernel, *options: str) -> dict:
    return json.loads(ps(kernel, *options, "--json"))


@pytest.fixture
def holder(kernel):
    """The holder server, and a session with it holding one async request; both released."""
    server = kernel.serve("plugins.holder:HolderServer", "holder")
    session = RSession.connect("holder", message_slots=4)
    status = TRequestStatus()
    session.SendReceive(EHold, (), status)
    try:
        yield server, session, status
    finally:
        session.SendReceive(ERelease, (0,))
        status.Wait(10)
        session.Close()


def test_a_held_message_is_listed_with_its_age_and_a_completed_one_is_not(
        kernel, holder, data_path):
    _, session, status = holder
    started = time.monotonic()
    other = RSession.connect("holder")
    assert other.SendReceive(EEcho, (5,)) == 5  # completed: nothing outstanding
    time.sleep(HELD)
    rows = {row["handle"]: row for row in ps_json(kernel, "--sessions")["sessions"]}
    held, done = rows[session.Handle()], rows[other.Handle()]
    assert held["path"] == data_path and done["path"] == data_path
    assert held["outstanding"] == 1 and held["oldest_ms"] >= HELD * 1000
    assert held["oldest_ms"] <= (time.monotonic() - started) * 1000 + 100
    assert held["slots_used"] == 1 and held["slots"] == 4
    assert held["creator"] == {"pid": os.getpid(), "thread": threading.get_native_id()}
    assert held["holders"] == [{"pid": os.getpid(), "threads": 1}]
    assert done["outstanding"] == 0 and done["oldest_ms"] is None and done["slots"] == "pool"
    older = ps_json(kernel, "--older-than", str(HELD / 2))
    assert [row["handle"] for row in older["sessions"]] == [session.Handle()]
    assert [(row["name"], row["outstanding"]) for row in older["servers"]] == [("holder", 1)]
    assert older["servers"][0]["oldest_ms"] >= HELD * 1000
    assert ps_json(kernel, "--older-than", "60") == {"servers": [], "sessions": []}
    table = ps(kernel, "--sessions", "--older-than", str(HELD / 2)).splitlines()
    assert len(table) == 2 and table[1].split()[0] == f"0x{session.Handle():x}"
    session.SendReceive(ERelease, (0,))  # completed: no longer listed
    assert status.Wait(10) == 0
    assert ps_json(kernel, "--older-than", "0") == {"servers": [], "sessions": []}
    other.Close()


def test_ps_lists_each_server_with_its_process_and_the_kernels_summary(kernel, holder):
    server, _, _ = holder
    kernel.serve("servers.echo:EchoServer", "echo")
    view = ps_json(kernel)
    echo, mine = view["servers"]
    assert mine == {
        "name": "holder", "pid": server.pid, "exe": psutil.Process(server.pid).exe(),
        "version": [1, 2, 3], "sharing": "unsharable", "direct": True, "sessions": 1,
        "outstanding": 1, "oldest_ms": mine["oldest_ms"], "up_ms": mine["up_ms"],
        "state": "running",
    }
    assert mine["oldest_ms"] >= 0 and mine["up_ms"] >= mine["oldest_ms"]
    assert (echo["name"], echo["sessions"], echo["outstanding"]) == ("echo", 0, 0)
    assert view["kernel"]["servers"] == 2 and view["kernel"]["sessions"] == 1
    text = ps(kernel).splitlines()
    assert text[0].split()[:3] == ["SERVER", "PID", "VERSION"]
    assert text[2].split()[:3] == ["holder", str(server.pid), "1.2.3"]
    assert text[-1].startswith("kernel: ") and text[-1].endswith("ipcfw ps --counters")


def test_ps_processes_shows_each_peer_process_and_its_roles(kernel, holder):
    server, _, _ = holder
    rows = {row["pid"]: row for row in ps_json(kernel, "--processes")["processes"]}
    me = rows[os.getpid()]
    assert me["roles"] == ["client"] and me["sessions"] == 1 and me["outstanding"] == 1
    assert me["channels"] >= 1 and me["exe"] == psutil.Process().exe()
    host = rows[server.pid]
    assert host["roles"] == ["server holder"] and host["servers"] == ["holder"]
    assert (host["channels"], host["sessions"], host["outstanding"]) == (0, 0, 0)
    table = ps(kernel, "--processes").splitlines()
    assert table[0].split()[:3] == ["PID", "UID", "ROLES"]
    assert any(line.split()[:4] == [str(server.pid), str(os.getuid()), "server", "holder"]
               for line in table[1:])


def test_a_terminating_server_is_shown_so(kernel):
    kernel.serve("plugins.holder:HolderServer", "holder")
    from ipcfw.client import terminate_server

    with RSession.connect("holder", message_slots=4) as session:
        status = TRequestStatus()
        session.SendReceive(EHold, (), status)  # (the registration ends once it has ended)
        ended = threading.Thread(target=terminate_server, args=("holder",),
                                 kwargs={"timeout": 20})
        ended.start()
        try:
            wait_until(lambda: ps_json(kernel)["servers"][0]["state"] == "terminating",
                       what="the server to be listed as terminating")
        finally:
            status.Cancel()
            ended.join(20)
        assert not ended.is_alive()
        assert ps_json(kernel)["servers"] == []
