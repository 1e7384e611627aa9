"""Tests of the monitor's rules (``ipcfw monitor``): ipcfw.kernel.monitor (who watches what,
bounded buffers, credit) and KernelState's rule 14 (the events it makes, which direct servers
report their traffic, when a monitor starts). No processes, sockets, clocks or sleeps
(kernel_world.py)."""

from __future__ import annotations

import random

import pytest

from ipcfw import errors
from ipcfw.events import Event, EventKind, pack_events, unpack_events
from ipcfw.kernel.monitor import Monitors
from ipcfw.kernel.state import MONITORS_PER_PROCESS, KernelState, PeerMisbehaved
from ipcfw.protocol import (
    MAX_EVENTS_FRAME,
    MONITOR_CREDIT,
    Cancel,
    Close,
    Complete,
    Completed,
    Connect,
    Monitor,
    MonitorEvents,
    NewSession,
    Path,
    Register,
    Report,
    Traffic,
)

from kernel_world import (
    ASYNC,
    C1,
    C2,
    CLI,
    CLI2,
    IN1,
    S1,
    S2,
    SERVER,
    SRV,
    SRV2,
    hello,
    new_state,
    one,
    open_session,
    request,
    sends,
    start_client,
    start_server,
)

SOCKET = "/run/ipcfw-test/d-0123456789ab"


def event(n: int, server: str = "Echo", kind: EventKind = EventKind.REQUEST) -> Event:
    return Event(float(n), int(kind), server, 200, 1, 0, n, 1, 0, -1, "")


def batch_events(message: MonitorEvents) -> list[Event]:
    return unpack_events(message.events)


def kinds(state: KernelState, rid: bytes = C2, req_id: int = 5) -> list[str]:
    """The kinds of the events monitor (rid, req_id) is sent this turn."""
    out = []
    for message in sends(state.monitor_batches(), rid, MonitorEvents):
        assert message.req_id == req_id
        out += [EventKind(e.kind).name for e in batch_events(message)]
    return out


# -- ipcfw.kernel.monitor ----------------------------------------------------------------------


def test_a_monitor_that_falls_behind_keeps_its_newest_events_and_is_told_how_many_it_lost():
    monitors = Monitors(buffer=3)
    monitors.add(C1, 1, "", credit=4)
    for n in range(5):
        monitors.record("echo", event(n))
    [(rid, batch)] = monitors.batches()
    assert rid == C1 and batch.lost == 2
    assert [e.msg for e in batch_events(batch)] == [2, 3, 4]  # the oldest went
    monitors.record("echo", event(5))
    [(_, batch)] = monitors.batches()
    assert batch.lost == 0 and [e.msg for e in batch_events(batch)] == [5]


def test_without_credit_a_monitor_is_sent_nothing_and_its_events_wait_in_its_bounded_buffer():
    monitors = Monitors(buffer=10)
    watcher = monitors.add(C1, 1, "", credit=1)
    assert watcher is not None
    monitors.record("echo", event(1))
    assert len(monitors.batches()) == 1
    for n in range(2, 30):
        monitors.record("echo", event(n))
    assert monitors.batches() == [] and not monitors.pending()
    assert len(watcher.events) == 10 and watcher.lost == 18
    monitors.grant(watcher, 1)
    [(_, batch)] = monitors.batches()
    assert batch.lost == 18 and [e.msg for e in batch_events(batch)] == list(range(20, 30))


def test_credit_is_capped_and_a_batch_holds_at_most_a_frame_of_events():
    monitors = Monitors(buffer=10_000)
    watcher = monitors.add(C1, 1, "", credit=MONITOR_CREDIT)
    assert watcher is not None
    monitors.grant(watcher, MONITOR_CREDIT)
    assert watcher.credit == MONITOR_CREDIT
    for n in range(MAX_EVENTS_FRAME + 10):
        monitors.record("echo", event(n))
    [(_, first)] = monitors.batches()
    [(_, second)] = monitors.batches()
    assert len(batch_events(first)) == MAX_EVENTS_FRAME and len(batch_events(second)) == 10


def test_a_named_monitor_sees_its_server_only_and_an_all_monitor_sees_every_server():
    monitors = Monitors()
    monitors.add(C1, 1, "echo", credit=4)
    monitors.add(C2, 1, "", credit=4)
    assert monitors.wants("echo") and monitors.wants("other")
    monitors.record("echo", event(1))
    monitors.record("other", event(2, "Other"))
    monitors.record("", event(3))  # concerns no one server: the all-monitors only
    sent = {rid: [e.msg for e in batch_events(b)] for rid, b in monitors.batches()}
    assert sent == {C1: [1], C2: [1, 2, 3]}


def test_the_kernel_keeps_at_most_its_number_of_monitors():
    monitors = Monitors(most=2)
    assert monitors.add(C1, 1, "", 1) and monitors.add(C1, 2, "", 1)
    assert monitors.add(C1, 3, "", 1) is None
    assert len(monitors.watchers) == 2


# -- KernelState: starting and stopping -------------------------------------------------------


def world() -> KernelState:
    """"Echo" on S1 taking direct connections, "Plain" on S2 (kernel path only), a client
    process (C1, IN1) and a monitor's process (C2)."""
    state = new_state()
    hello(state, S1, SERVER, SRV)
    state.receive(S1, Register(900, "Echo", 0, (1, 0, 0), SOCKET))
    start_server(state, S2, SRV2, "Plain")
    start_client(state)
    start_client(state, CLI2, C2, None)
    return state


def start_monitor(state: KernelState, name: str = "", req_id: int = 5,
                  rid: bytes = C2) -> list:
    return state.receive(rid, Monitor(req_id, name, MONITOR_CREDIT))


def test_one_process_cannot_take_every_monitor() -> None:
    state = world()
    for req_id in range(1, MONITORS_PER_PROCESS + 1):
        answers = [a.message for a in start_monitor(state, "Plain", req_id)
                   if type(a.message) is Completed]
        assert [a.value for a in answers] == [0]
    (refused,) = [a.message for a in start_monitor(state, "Plain", 99)]
    assert refused.value == errors.KErrOverflow
    assert f"this process has {MONITORS_PER_PROCESS} monitors already" in refused.text
    answers = [a.message for a in start_monitor(state, "Plain", 1, rid=C1)]  # another process
    assert [a.value for a in answers if type(a) is Completed] == [0]


def test_a_monitor_of_a_direct_server_starts_once_the_server_reports_its_traffic():
    state = world()
    actions = start_monitor(state, "echo")
    report = one(actions, S1, Report)
    assert report.on == 1 and sends(actions, C2) == []  # not started yet
    assert sends(actions, S2) == []  # not watched
    actions = state.receive(S1, Traffic(report.req_id, 0, pack_events([])))
    assert sends(actions, C2) == [Completed(5, errors.KErrNone, ())]


def test_a_monitor_of_a_kernel_path_server_starts_at_once_and_no_server_is_told():
    state = world()
    actions = start_monitor(state, "plain")
    assert sends(actions) == [Completed(5, errors.KErrNone, ())]


def test_reporting_stops_when_the_last_monitor_of_a_server_leaves_and_not_before():
    state = world()
    report = one(start_monitor(state, "Echo"), S1, Report)
    state.receive(S1, Traffic(report.req_id, 0, pack_events([])))
    hello(state, b"chan-3", 1, CLI2)
    actions = start_monitor(state, "", req_id=6, rid=b"chan-3")
    assert sends(actions) == [Completed(6, errors.KErrNone, ())]  # S1 reports already
    actions = state.receive(C2, Cancel(5))
    assert sends(actions) == [Completed(5, errors.KErrCancel, ())]  # the other still watches
    actions = state.peer_gone(b"chan-3")
    assert sends(actions) == [Report(0, 0)] and one(actions, S1, Report).on == 0
    assert not state.monitor.active and state.monitor.watchers == {}


def test_a_monitor_waiting_for_a_server_that_dies_starts():
    state = world()
    start_monitor(state, "echo")
    actions = state.peer_gone(S1)
    assert Completed(5, errors.KErrNone, ()) in sends(actions, C2)


def test_a_bad_name_is_refused_with_its_reason_and_a_credit_for_a_running_monitor_is_taken():
    state = world()
    [refusal] = sends(start_monitor(state, "no*stars"))
    assert refusal.value == errors.KErrBadName and "*" in refusal.text
    start_monitor(state, "plain")
    assert state.receive(C2, Monitor(5, "plain", 3)) == []  # more credit, not a new monitor
    assert len(state.monitor.watchers) == 1


def test_traffic_is_handed_to_the_monitors_under_the_kernels_name_for_the_server():
    state = world()
    report = one(start_monitor(state, "echo"), S1, Report)
    state.receive(S1, Traffic(report.req_id, 0, pack_events([])))
    lying = Event(3.0, int(EventKind.REQUEST), "Plain", 200, 1, 0, 7, 2, 0, -1, "5")
    assert state.receive(S1, Traffic(0, 4, pack_events([lying]))) == []
    [batch] = sends(state.monitor_batches(), C2, MonitorEvents)
    assert batch.lost == 4
    [seen] = batch_events(batch)
    assert (seen.server, seen.path, seen.function, seen.detail) == ("Echo", 1, 2, "5")


def test_traffic_of_a_server_nobody_watches_is_dropped_and_bad_traffic_is_refused():
    state = world()
    assert state.receive(S1, Traffic(0, 0, pack_events([event(1)]))) == []
    assert not state.monitor.active
    with pytest.raises(PeerMisbehaved, match="events"):
        state.receive(S1, Traffic(0, 0, b"\x91\x01"))
    with pytest.raises(PeerMisbehaved, match="not a server"):
        state.receive(C1, Traffic(0, 0, pack_events([])))


def test_a_server_registering_a_watched_name_is_told_to_report_and_its_registration_is_seen():
    state = new_state()
    start_client(state, CLI2, C2, None)
    assert sends(start_monitor(state, "later")) == [Completed(5, errors.KErrNone, ())]
    hello(state, S1, SERVER, SRV)
    actions = state.receive(S1, Register(900, "Later", 0, (1, 0, 0), SOCKET))
    assert one(actions, S1, Report).on == 1
    assert kinds(state) == ["REGISTER"]


# -- KernelState: the events -----------------------------------------------------------------


def test_the_kernel_path_shows_connect_request_completion_with_duration_and_disconnect():
    state = world()
    start_monitor(state, "plain")
    state.now = 10.0
    handle = open_session(state, server=S2, name="Plain")
    state.now = 20.0
    actions = request(state, C1, handle, 3, function=7, args=(42, b"hello, world", (b"", 64)))
    deliver = sends(actions, S2)[-1]
    state.now = 20.000250
    state.receive(S2, Complete(deliver.msg_id, 12, ((2, b"x"),)))
    state.receive(C1, Close(handle))
    events = [e for m in sends(state.monitor_batches(), C2, MonitorEvents)
              for e in batch_events(m)]
    assert [EventKind(e.kind).name for e in events] == [
        "CONNECT", "CONNECTED", "REQUEST", "COMPLETE", "DISCONNECT"]
    connect, connected, req, done, disconnect = events
    assert {e.pid for e in events} == {CLI.pid} and {e.handle for e in events} == {handle}
    assert connected.value == handle and connected.micros == 0
    assert (req.function, req.detail) == (7, "42, des[12]'hello, w'..., out[0/64]")
    assert (req.time, done.time) == (20.0, 20.000250)
    assert done.msg == req.msg and done.value == 12 and done.micros == 250
    assert {e.path for e in events} == {int(Path.KERNEL)}


def test_a_cancel_and_an_error_completion_are_seen_with_their_code_and_text():
    state = world()
    start_monitor(state, "plain")
    handle = open_session(state, server=S2, name="Plain")
    request(state, C1, handle, 3, ASYNC)
    state.receive(C1, Cancel(3))
    deliver = sends(request(state, C1, handle, 4), S2)[-1]
    state.receive(S2, Complete(deliver.msg_id, errors.KErrNotFound, (), "no such key"))
    done = [e for m in sends(state.monitor_batches(), C2, MonitorEvents)
            for e in batch_events(m) if e.kind == EventKind.COMPLETE]
    assert [(e.value, e.detail) for e in done] == [
        (errors.KErrCancel, "cancelled by the client"), (errors.KErrNotFound, "no such key")]


def test_a_monitor_of_one_server_sees_nothing_of_another():
    state = world()
    start_monitor(state, "plain")
    state.monitor_batches()
    request_world_echo = state.receive(C1, Connect(1, "Echo", (1, 0, 0), -1, b""))
    assert sends(request_world_echo, S1, NewSession)
    assert state.monitor_batches() == []


def test_a_client_that_dies_holding_sessions_is_seen_dying_and_one_that_closed_them_is_not():
    state = world()
    start_monitor(state, "plain")
    handle = open_session(state, server=S2, name="Plain")
    state.receive(C1, Close(handle))
    state.peer_gone(C1)
    state.peer_gone(IN1)
    assert "DIED" not in kinds(state)
    start_client(state)
    open_session(state, server=S2, name="Plain", req_id=2)
    state.process_died(CLI.key)  # every socket at once: a SIGKILL
    events = [e for m in sends(state.monitor_batches(), C2, MonitorEvents)
              for e in batch_events(m)]
    died = [e for e in events if e.kind == EventKind.DIED]
    assert [(e.pid, e.server, e.detail) for e in died] == [
        (CLI.pid, "Plain", "client: 1 session ended with it")]
    assert EventKind(events[-2].kind).name == "DISCONNECT"  # (before its process ends)


def test_a_server_that_dies_is_seen_dying():
    state = world()
    start_monitor(state, "plain")
    state.monitor_batches()
    state.peer_gone(S2)
    [batch] = sends(state.monitor_batches(), C2, MonitorEvents)
    [died] = batch_events(batch)
    assert (died.kind, died.pid, died.server, died.detail) == (
        EventKind.DIED, SRV2.pid, "Plain", "server")


def test_nobody_monitoring_no_event_is_made_and_nothing_is_sent():
    state = world()
    handle = open_session(state, server=S2, name="Plain")
    request(state, C1, handle, 3)
    assert not state.monitor.active and state.monitor_batches() == []
    assert not any(server.monitored for server in state.servers.values())


@pytest.mark.parametrize("seed", range(5))
def test_every_event_is_either_sent_or_counted_lost_whatever_the_order_of_things(seed):
    rng = random.Random(seed)
    monitors = Monitors(buffer=rng.randint(1, 50))
    watchers = [monitors.add(b"c%d" % n, n, rng.choice(["", "echo", "other"]), rng.randint(0, 3))
                for n in range(4)]
    assert all(w is not None for w in watchers)
    made = {id(w): 0 for w in watchers}
    told = {id(w): 0 for w in watchers}
    by_rid = {w.rid: w for w in watchers if w is not None}
    for _ in range(2000):
        op = rng.random()
        if op < 0.7:
            key = rng.choice(["echo", "other"])
            monitors.record(key, event(0, key))
            for w in monitors.watching(key):
                made[id(w)] += 1
        elif op < 0.85:
            monitors.grant(rng.choice(watchers), rng.randint(0, 4))
        else:
            for rid, batch in monitors.batches():
                told[id(by_rid[rid])] += len(batch_events(batch)) + batch.lost
        for w in watchers:
            assert len(w.events) <= monitors.buffer and 0 <= w.credit <= MONITOR_CREDIT
    for w in watchers:
        w.credit = MONITOR_CREDIT
    while monitors.pending():
        for rid, batch in monitors.batches():
            told[id(by_rid[rid])] += len(batch_events(batch)) + batch.lost
        for w in watchers:
            w.credit = MONITOR_CREDIT
    assert told == made
