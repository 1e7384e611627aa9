"""``ipcfw monitor``: a monitor sees, live and on both data paths, what happens to a server's
sessions: connects, requests, completions with their durations, disconnects, and the deaths
of clients and servers (real SIGKILLs); one that never reads loses events, counted, and slows
nobody. Real processes over real sockets."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from ipcfw import RSession, TRequestStatus
from ipcfw.client import Monitor, MonitorEvent
from conftest import wait_until
from plugins import probe

pytestmark = pytest.mark.usefixtures("data_path")  # each test on both data paths

VERSION = (1, 2, 0)


def collect(watch: Monitor, until, timeout: float = 10.0) -> list[MonitorEvent]:
    """Read `watch` until `until(events)` holds (fails the test after `timeout`)."""
    events: list[MonitorEvent] = []
    deadline = time.monotonic() + timeout
    while not until(events):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for events; got {[e.kind for e in events]}")
        events += watch.read(timeout=0.1)
    return events


def has(kind: str, **fields: object):
    def found(events: list[MonitorEvent]) -> bool:
        return any(e.kind == kind and all(getattr(e, k) == v for k, v in fields.items())
                   for e in events)
    return found


def test_a_monitor_sees_a_session_from_its_connect_to_its_disconnect(kernel, data_path):
    kernel.serve("plugins.probe:ProbeServer", "probe")
    with Monitor("probe") as watch:
        with RSession.connect("probe", VERSION) as session:
            assert session.SendReceive(probe.EEcho, (42, b"hello, world")) == 42
            handle = session.Handle()
        events = collect(watch, lambda ev: has("disconnect")(ev) and has("complete")(ev))
    # (a server's direct events reach the kernel after its own of the same moment: in time
    # order, they are in the order they happened)
    events = sorted((e for e in events if e.handle == handle), key=lambda e: e.time)
    assert [e.kind for e in events] == ["connect", "connected", "request", "complete",
                                       "disconnect"]
    connect, connected, request, complete, _ = events
    assert {e.server for e in events} == {"probe"} and {e.path for e in events} == {data_path}
    assert {e.pid for e in events} == {os.getpid()}
    assert connected.value == handle and connected.micros >= 0
    assert request.function == probe.EEcho
    assert request.detail == "42, des[12]'hello, w'..."
    assert complete.msg == request.msg and complete.value == 42
    assert 0 <= complete.micros < 5_000_000 and complete.time >= request.time


def test_an_error_completion_is_seen_with_its_code(kernel):
    kernel.serve("plugins.probe:ProbeServer", "probe")
    with Monitor("probe") as watch, RSession.connect("probe", VERSION) as session:
        with pytest.raises(Exception):
            session.SendReceive(probe.ERaiseIpc, (-1,))
        events = collect(watch, has("complete"))
    [complete] = [e for e in events if e.kind == "complete"]
    assert complete.value == -1


def test_a_sigkilled_client_is_seen_dying_with_its_session(kernel):
    kernel.serve("plugins.probe:ProbeServer", "probe")
    with Monitor("probe") as watch:
        script = (
            "import os, signal, ipcfw; from plugins import probe\n"
            "session = ipcfw.RSession.connect('probe', (1, 2, 0))\n"
            "session.SendReceive(probe.EEcho, (1,))\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n"
        )
        result = kernel.client(["-c", script])
        assert result.returncode == -signal.SIGKILL
        events = collect(watch, has("died"))
    [died] = [e for e in events if e.kind == "died"]
    assert died.server == "probe" and died.detail == "client: 1 session ended with it"
    requests = [e for e in events if e.kind == "request"]
    assert [e.pid for e in requests] == [died.pid]  # the client's own pid
    disconnects = [e for e in events if e.kind == "disconnect"]
    assert [e.handle for e in disconnects] == [requests[0].handle]


def test_a_sigkilled_server_is_seen_dying(kernel):
    server = kernel.serve("plugins.probe:ProbeServer", "probe")
    with Monitor("probe") as watch, RSession.connect("probe", VERSION) as session:
        session.SendReceive(probe.EEcho, (1,))
        server.kill(signal.SIGKILL)
        events = collect(watch, has("died"))
    [died] = [e for e in events if e.kind == "died"]
    assert (died.pid, died.server, died.detail) == (server.pid, "probe", "server")


def test_a_name_filters_what_a_monitor_sees_and_no_name_sees_every_server(kernel):
    kernel.serve("plugins.probe:ProbeServer", "probe")
    kernel.serve("servers.echo:EchoServer", "echo")
    with Monitor("ECHO") as named, Monitor() as everything:
        with RSession.connect("probe", VERSION) as session:
            session.SendReceive(probe.EEcho, (1,))
        with RSession.connect("echo", (1, 0, 0)) as session:
            session.SendReceive(1, (2,))
        seen_all = collect(everything, lambda ev: sum(e.kind == "disconnect" for e in ev) == 2)
        seen = collect(named, has("disconnect"))
    assert {e.server for e in seen} == {"echo"}
    assert {e.server for e in seen_all} == {"probe", "echo"}


def test_a_monitor_that_never_reads_loses_events_counted_and_slows_no_client(kernel, data_path):
    kernel.serve("plugins.probe:ProbeServer", "probe")
    calls = 12_000  # 24,000 events: more than a monitor's buffer and its credit together
    with Monitor("probe") as watch:
        with RSession.connect("probe", VERSION) as session:
            for first in range(0, calls, 200):  # 200 at a time in flight
                statuses = [(n, TRequestStatus()) for n in range(first, first + 200)]
                for n, status in statuses:
                    session.SendReceive(probe.EEcho, (n,), status)
                assert [status.Wait(30) for _, status in statuses] == [n for n, _ in statuses]
        # Nothing reached the monitor's reader meanwhile; now it reads everything that is left.
        events = collect(watch, has("disconnect"), timeout=30)
        events += watch.read(timeout=0.5)
    lost = sum(e.lost for e in events)
    assert lost > 0
    requests = sum(e.kind == "request" for e in events)
    completes = sum(e.kind == "complete" for e in events)
    # Every event is either seen or counted lost: connect, connected, the calls, disconnect.
    assert requests + completes + lost + 3 == 2 * calls + 3
    # And the kernel still serves: a new client, and the same monitor, as before.
    with Monitor("probe") as again, RSession.connect("probe", VERSION) as session:
        assert session.SendReceive(probe.EEcho, (7,)) == 7
        assert collect(again, has("complete", value=7))


def test_the_command_prints_a_line_per_event_and_ctrl_c_ends_it(kernel, data_path):
    kernel.serve("plugins.probe:ProbeServer", "probe")
    lines = kernel.spawn_client(["-m", "ipcfw", "monitor", "probe"], "monitor")
    jsonl = kernel.spawn_client(["-m", "ipcfw", "monitor", "--json"], "monitor-json")

    def call_seen() -> bool:
        # (a call each time: the monitors print what they see once they have started)
        with RSession.connect("probe", VERSION) as session:
            session.SendReceive(probe.EEcho, (5, b"abc"))
        return "disconnect" in lines.log() and '"disconnect"' in jsonl.log()

    wait_until(call_seen, timeout=20, what="a call's events, printed by both monitors")
    for process in (lines, jsonl):
        process.kill(signal.SIGINT)
    wait_until(lambda: lines.returncode is not None and jsonl.returncode is not None,
               what="both monitors to end")
    assert (lines.returncode, jsonl.returncode) == (0, 0)
    text = lines.log()
    assert text.splitlines()[0].split() == ["TIME", "PID", "SERVER", "SESSION", "PATH", "EVENT"]
    assert f"{data_path:<6}  request #" in text and "fn 1 (5, des[3]'abc')" in text
    assert "Traceback" not in text and "Traceback" not in jsonl.log()
    events = [json.loads(line) for line in jsonl.log().splitlines() if line.startswith("{")]
    complete = [e for e in events if e["kind"] == "complete"][-1]
    assert complete["value"] == 5 and complete["path"] == data_path and complete["micros"] >= 0


def test_an_async_servers_requests_are_seen_too(kernel, data_path):
    from plugins import aio

    kernel.serve("plugins.aio:AioServer", "aio")
    with Monitor("aio") as watch, RSession.connect("aio", (1, 0, 0)) as session:
        assert session.SendReceive(aio.EStart, (3,)) == 3
        status = TRequestStatus()
        session.SendReceive(aio.EWait, (1, 8), status)
        assert session.SendReceive(aio.EOpen, (1,)) == 0
        assert status.Wait(10) == 8
        events = collect(watch, lambda ev: sum(e.kind == "complete" for e in ev) == 3)
    functions = sorted(e.function for e in events if e.kind == "request")
    assert functions == sorted([aio.EStart, aio.EWait, aio.EOpen])
    completes = sorted(e.value for e in events if e.kind == "complete")
    assert completes == [0, 3, 8] and {e.path for e in events} == {data_path}
