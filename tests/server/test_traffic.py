"""Tests of ipcfw.server.traffic and its use by the direct rules: what a server reports of its
direct connections while a monitor watches it (the kernel's `Report`), stamped by the host's
clock. No processes: the fake host of test_direct_state.py, and a clock the test moves."""

from __future__ import annotations

from typing import Any

from ipcfw import errors
from ipcfw.events import EventKind, unpack_events
from ipcfw.protocol import (
    MAX_EVENTS_FRAME,
    MAX_FRAME,
    Attach,
    Cancel,
    Completed,
    Mode,
    NewSession,
    PeerInfo,
    Report,
    Request,
    Traffic,
    decode,
    encode,
)
from ipcfw.server.overlay import Layers
from ipcfw.server.state import ServerState
from ipcfw.server.traffic import NOT_SEEN, TrafficLog

from test_direct_state import (
    CLIENT,
    GID,
    HANDLE,
    PID,
    TICKET,
    UID,
    FakeIO,
    FakeLoop,
    Server,
    complete_with,
)

SYNC, ASYNC = int(Mode.SYNC), int(Mode.ASYNC)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


class World:
    """A ServerState with direct rules over the fake host, a client attached on a connection,
    and the clock the host would give (time.monotonic)."""

    def __init__(self) -> None:
        self.server = Server()
        self.io = FakeIO()
        self.clock = Clock()
        self.kernel: list[Any] = []
        self.state = ServerState(Layers(self.server, FakeLoop()),
                                 lambda frame: self.kernel.append(decode(frame)),
                                 max_frame=MAX_FRAME, direct=self.io, clock=self.clock)
        assert self.state.direct is not None
        self.rules = self.state.direct
        self.io.rules = self.rules
        self.state.receive(PeerInfo(CLIENT, PID, UID, GID, "/bin/client"))
        self.state.receive(NewSession(1, HANDLE, (1, 0, 0), CLIENT, b"", TICKET, 4))
        self.kernel.clear()
        self.connection = self.rules.connection(1, PID, UID, GID)
        assert self.rules.receive(self.connection, Attach(1, TICKET)) is False

    def events(self) -> list:
        frame = self.state.traffic_frame()
        if frame is None:
            return []
        traffic = decode(frame)
        assert type(traffic) is Traffic and traffic.req_id == 0
        return unpack_events(traffic.events)


def test_reporting_off_a_direct_request_makes_no_event_and_reads_no_clock():
    world = World()
    world.server.actions = [complete_with(7)]
    world.rules.receive(world.connection, Request(5, HANDLE, 3, (1,), SYNC))
    assert world.clock.reads == 0 and world.state.traffic_frame() is None


def test_reporting_on_is_answered_at_once_and_off_drops_what_was_kept():
    world = World()
    world.state.receive(Report(12, 1))
    assert [(type(m), m.req_id, m.lost) for m in world.kernel] == [(Traffic, 12, 0)]
    assert unpack_events(world.kernel[0].events) == []
    world.server.actions = [complete_with(7)]
    world.rules.receive(world.connection, Request(5, HANDLE, 3, (1,), SYNC))
    world.state.receive(Report(0, 0))
    assert world.state.traffic_frame() is None and len(world.kernel) == 1  # (off: no answer)


def test_a_direct_request_and_its_completion_are_reported_with_the_hosts_clock():
    world = World()
    world.state.receive(Report(12, 1))
    held: list = []
    world.server.actions = [held.append]
    world.rules.receive(world.connection, Request(5, HANDLE, 3, (42, b"hi"), ASYNC))
    world.clock.now = 100.000375
    held[0].Complete(9)
    request, done = world.events()
    assert (request.kind, request.pid, request.handle, request.path, request.msg) == (
        EventKind.REQUEST, PID, HANDLE, 1, 5)
    assert (request.function, request.detail, request.time) == (3, "42, des[2]'hi'", 100.0)
    assert (done.kind, done.msg, done.value, done.micros, done.time) == (
        EventKind.COMPLETE, 5, 9, 375, 100.000375)
    assert world.state.traffic_frame() is None  # sent once


def test_a_cancel_and_an_error_are_reported_with_their_codes():
    world = World()
    world.state.receive(Report(12, 1))
    world.server.actions = [None]  # held
    world.rules.receive(world.connection, Request(5, HANDLE, 3, (), ASYNC))
    world.rules.receive(world.connection, Cancel(5))

    def fail(message: Any) -> None:
        message.Complete(errors.IpcError(errors.KErrNotFound, "no such key"))

    world.server.actions = [fail]
    world.rules.receive(world.connection, Request(6, HANDLE, 3, (), SYNC))
    done = [e for e in world.events() if e.kind == EventKind.COMPLETE]
    assert [(e.msg, e.value, e.detail) for e in done] == [
        (5, errors.KErrCancel, ""), (6, errors.KErrNotFound, "no such key")]


def test_the_log_is_bounded_and_says_how_many_it_lost():
    clock = Clock()
    log = TrafficLog("s", clock, buffer=4)
    log.report(1, True)
    for n in range(10):
        log.request(PID, HANDLE, n, 1, ())
    traffic = decode(log.frame() or b"")
    assert type(traffic) is Traffic and traffic.lost == 6
    assert [e.msg for e in unpack_events(traffic.events)] == [6, 7, 8, 9]
    assert log.frame() is None


def test_a_frame_holds_at_most_a_frame_of_events_and_a_completion_unseen_has_no_duration():
    log = TrafficLog("s", Clock())
    log.report(1, True)
    for n in range(MAX_EVENTS_FRAME + 1):
        log.completion(PID, HANDLE, n, NOT_SEEN, encode(Completed(n, 0, ())))
    first = unpack_events(decode(log.frame() or b"").events)  # type: ignore[union-attr]
    assert len(first) == MAX_EVENTS_FRAME and {e.micros for e in first} == {-1}
    assert len(unpack_events(decode(log.frame() or b"").events)) == 1  # type: ignore[union-attr]
