"""The client's pure rules (ipcfw.client.state): pending requests, completion exactly once,
descriptor write-back, session and subsession lifecycles. No kernel, socket or sleep: requests
and replies go in, statuses, holders and what a Close must do are checked.
(The same scenarios with real processes: test_sessions.py, test_client_runtime.py, test_cancel.py.)
"""

from __future__ import annotations

import logging
import sys
import threading
import weakref
from types import CodeType, FrameType
from typing import Any
from collections.abc import Callable

import pytest

import ipcfw
from ipcfw import ClientPanic, IpcError, TRequestStatus
from ipcfw.client.state import (
    SESSION_WORDS,
    UNDECIDED,
    SUBSESSION_WORDS,
    Abort,
    ClientState,
    Hold,
    Pending,
    SessionLife,
    write_back,
    writes_fit,
)
from ipcfw.client.session import death_of
from ipcfw.client.status import complete_request
from ipcfw.protocol import Completed, Panicked, Welcome

H, OTHER = 0x2A, 0x2B  # session handles


class FakeStatus:
    """Records every completion it is given (a TRequestStatus completes once per request)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, BaseException | None]] = []


def record(status: FakeStatus, value: int, error: BaseException | None) -> None:
    """Complete a FakeStatus, as `complete_request` completes a TRequestStatus."""
    status.calls.append((value, error))


class Holder:
    """Stands for an RSession: what a SessionLife passes to its abort callback."""


def life_on(handle: int, holder: Holder, via: object = "runtime") -> SessionLife[Any]:
    life: SessionLife[Any] = SessionLife(holder, threading.Lock())
    life.attach(via, handle)
    return life


def complete(state: ClientState[Any], req_id: int, value: int, writes: tuple = (),
             error: BaseException | None = None) -> bool:
    """What the runtime does with an answer, minus its counting and waking."""
    pending = state.take(req_id)
    if pending is None:
        return False
    pending.complete(value, writes, error)
    return True


def interrupted(call: Callable[[], Any], code: CodeType, at: int,
                intruder: Callable[[], None], unit: str = "opcode") -> tuple[bool, Any]:
    """Run `call()`, and run `intruder()` once, between two bytecodes (`unit` "line": two
    lines) of `code`, the `at`-th and the next: another thread's work landing there. Returns
    whether the intruder ran, and what `call` returned or raised."""
    steps = 0

    def step(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal steps
        if event == unit:
            if steps == at:
                intruder()  # (runs untraced: tracing is off inside a trace function)
            steps += 1
        return step

    def enter(frame: FrameType, event: str, arg: object) -> Any:
        if frame.f_code is not code:
            return None
        frame.f_trace_opcodes = True
        return step

    previous = sys.gettrace()
    sys.settrace(enter)
    try:
        outcome: Any = call()
    except BaseException as exc:
        outcome = exc
    finally:
        sys.settrace(previous)
    return steps > at, outcome


def every_interleaving(
    setup: Callable[[], Any], call: Callable[[Any], Any], code: CodeType,
    intruder: Callable[[Any], None], unit: str = "opcode",
) -> list[Any]:
    """The outcomes of `call(setup())` with `intruder` landing at each point of `code` in
    turn (each on a new setup), until it runs out of points."""
    outcomes = []
    for at in range(10_000):
        world = setup()
        ran, outcome = interrupted(
            lambda: call(world), code, at, lambda: intruder(world), unit
        )
        if not ran:
            return outcomes
        outcomes.append(outcome)
    raise AssertionError("no end to the points")


# -- completion, exactly once -------------------------------------------------------------------


def test_a_request_completes_once_and_a_late_completion_is_dropped() -> None:
    state: ClientState[str] = ClientState(threading.Lock())
    status = FakeStatus()
    state.add(1, Pending(status, record, "session", {}, "channel"))
    assert complete(state, 1, 5)
    assert not complete(state, 1, -3)  # a duplicate (the kernel's answer after a Close)
    assert not complete(state, 99, 0)  # a request this process never made
    assert status.calls == [(5, None)]
    assert state.pending == {}


def test_racing_completers_complete_each_request_exactly_once() -> None:
    """Settling threads, a Close and a dead kernel may all try to complete one request."""
    state: ClientState[str] = ClientState(threading.Lock())
    statuses = [FakeStatus() for _ in range(2000)]
    for req_id, status in enumerate(statuses):
        state.add(req_id, Pending(status, record, "session", {}, "channel"))
    start = threading.Barrier(4)

    def complete_all(value: int) -> None:
        start.wait()
        for req_id in range(len(statuses)):
            complete(state, req_id, value)

    threads = [threading.Thread(target=complete_all, args=(v,)) for v in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert [len(s.calls) for s in statuses] == [1] * len(statuses)


def test_a_real_status_completes_with_its_value_or_its_error() -> None:
    state: ClientState[str] = ClientState(threading.Lock())
    done, failed = TRequestStatus(), TRequestStatus()
    fired: list[int] = []
    done.add_done_callback(lambda s: fired.append(s.Int()))
    state.add(1, Pending(done, complete_request, "session", {}, "channel"))
    state.add(2, Pending(failed, complete_request, "session", {}, "channel"))
    complete(state, 1, 7)
    complete(state, 1, 8)
    complete(state, 2, ipcfw.KErrDied, (), ClientPanic("PROBE", 3))
    assert (done.Int(), done.result(0), fired) == (7, 7, [7])
    assert failed.Int() == ipcfw.KErrDied
    with pytest.raises(ClientPanic):
        failed.result(0)


def test_a_status_offers_a_client_no_way_to_begin_or_complete_a_request() -> None:
    """Only the runtime completes a request (exactly once): a client program sees no method
    that would complete it again."""
    status = TRequestStatus()
    public = {name for name in dir(status) if not name.startswith("_")}
    assert public == {"Cancel", "Int", "Wait", "add_done_callback", "done", "result"}


def test_requests_are_found_by_channel_and_by_session() -> None:
    state: ClientState[str] = ClientState(threading.Lock())
    state.add(1, Pending(FakeStatus(), record, "s1", {}, "c1"))
    state.add(2, Pending(FakeStatus(), record, "s2", {}, "c1"))
    state.add(3, Pending(FakeStatus(), record, "s1", {}, "c2"))
    assert state.requests_on("c1") == [1, 2]
    assert state.requests_of("s1") == [1, 3]
    complete(state, 1, 0)
    assert state.requests_on("c1") == [2] and state.requests_of("s1") == [3]


# -- descriptor write-back -----------------------------------------------------------------------


def test_write_back_gives_each_buffer_exactly_what_was_written() -> None:
    shrunk, grown, untouched = bytearray(b"12345678"), bytearray(2), bytearray(b"keep")
    write_back({0: shrunk, 1: grown, 3: untouched}, [(0, b"abc"), (1, b"wxyz"), (2, b"none")])
    assert (shrunk, grown, untouched) == (b"abc", b"wxyz", b"keep")


def test_an_async_request_writes_back_once_and_only_when_it_completes() -> None:
    state: ClientState[str] = ClientState(threading.Lock())
    buffer = bytearray(8)
    state.add(1, Pending(FakeStatus(), record, "session", {0: buffer}, "channel"))
    assert buffer == bytearray(8)  # pending: untouched
    complete(state, 1, 0, ((0, b"first"),))
    assert buffer == b"first"
    buffer[:] = b"mine now"
    complete(state, 1, 0, ((0, b"again"),))  # a duplicate writes nothing
    assert buffer == b"mine now"


def test_a_request_ended_without_the_servers_answer_leaves_its_buffer_alone() -> None:
    state: ClientState[Any] = ClientState(threading.Lock())
    holder = Holder()
    life = life_on(H, holder)
    state.register(life)
    buffer = bytearray(b"before")
    state.add(1, Pending(FakeStatus(), record, life, {0: buffer}, "channel"))
    for req_id in state.close(life, H, ended=False).requests:
        complete(state, req_id, ipcfw.KErrSessionClosed)
    complete(state, 1, 0, ((0, b"late"),))  # the server's answer, after the Close
    assert buffer == b"before"


def test_a_sync_reply_writes_back_then_returns_or_raises() -> None:
    life = life_on(H, holder := Holder())
    buffer = bytearray(4)
    assert life.finish(Completed(1, 3, ((0, b"hi"),)), {0: buffer}) == 3
    assert buffer == b"hi"
    with pytest.raises(ipcfw.NotFound):
        life.finish(Completed(2, ipcfw.KErrNotFound, ((0, b"err"),)), {0: buffer}, {0: 4})
    assert buffer == b"err"  # what the server wrote before failing still arrives
    with pytest.raises(IpcError) as raised:
        life.finish(Welcome(1, 1, 1), {0: buffer})
    assert raised.value.code == ipcfw.KErrGeneral
    assert life.dead is None and holder is not None


def test_writes_that_do_not_fit_the_descriptors_write_nothing_and_fail() -> None:
    """As the kernel refuses them (a direct server's answers do not pass through it)."""
    assert writes_fit({1: 4}, [(1, b"four")]) and not writes_fit({1: 4}, [(1, b"fives")])
    assert not writes_fit({1: 4}, [(0, b"")]) and writes_fit({}, [])
    life = life_on(H, Holder())
    buffer = bytearray(b"four")
    with pytest.raises(IpcError) as raised:
        life.finish(Completed(1, 0, ((0, b"ok"), (1, b"x"))), {0: buffer}, {0: 4})
    assert raised.value.code == ipcfw.KErrBadDescriptor and buffer == b"four"
    state: ClientState[str] = ClientState(threading.Lock())
    status = FakeStatus()
    state.add(1, Pending(status, record, "session", {0: buffer}, "c", {0: 4}))
    complete(state, 1, 7, ((0, b"toolong"),))
    assert buffer == b"four" and status.calls == [(ipcfw.KErrBadDescriptor, None)]


def test_a_connection_takes_only_its_own_requests_and_attached_handles() -> None:
    state: ClientState[str] = ClientState(threading.Lock())
    state.add(1, Pending(FakeStatus(), record, "session", {}, "kernel channel"))
    assert state.take_on(1, "connection A") is None and 1 in state.pending
    assert state.take_on(1, "kernel channel") is not None
    state.attach_direct(H, "connection A")
    assert state.is_attached("connection A", H) and not state.is_attached("connection B", H)


def test_a_sync_reply_that_panics_writes_nothing_and_may_kill_the_session() -> None:
    life = life_on(H, Holder())
    aborted: list[object] = []
    life.set_abort_callback(lambda s, e: aborted.append(e))
    buffer = bytearray(b"kept")
    with pytest.raises(ClientPanic):
        life.finish(Panicked(1, OTHER, "KERN-EXEC", 0, 1), {0: buffer})  # another handle
    assert life.dead is None
    with pytest.raises(ClientPanic) as raised:
        life.finish(Panicked(2, H, "PROBE", 7, 1), {0: buffer})
    assert life.dead is raised.value and buffer == b"kept"
    assert aborted == []  # a panic runs no abort callback: the panicked call raises it
    with pytest.raises(ClientPanic) as again:
        life.usable()
    assert again.value is raised.value


# -- session lost, and abort callbacks -----------------------------------------------------------


def test_a_lost_session_kills_every_holder_and_runs_each_abort_callback_once() -> None:
    state: ClientState[Any] = ClientState(threading.Lock())
    first, second, bystander = Holder(), Holder(), Holder()
    lives = [life_on(H, first), life_on(H, second), life_on(OTHER, bystander)]
    calls: list[tuple[object, int]] = []
    for life in lives:
        state.register(life)
        life.set_abort_callback(lambda session, error: calls.append((session, error.code)))
    error = ipcfw.IpcError(ipcfw.KErrServerTerminated)
    for abort in state.session_lost(H, error):
        abort.run()
    assert sorted(map(id, (s for s, _ in calls))) == sorted(map(id, (first, second)))
    assert {code for _, code in calls} == {ipcfw.KErrServerTerminated}
    assert lives[0].dead is error and lives[1].dead is error and lives[2].dead is None
    assert state.session_lost(H, ipcfw.IpcError(ipcfw.KErrDied)) == []  # lost once
    assert lives[0].dead is error
    with pytest.raises(ipcfw.ServerTerminated):
        lives[1].usable()
    assert lives[2].usable() == ("runtime", OTHER)


def test_a_panic_kills_every_holder_and_runs_no_abort_callback() -> None:
    state: ClientState[Any] = ClientState(threading.Lock())
    life = life_on(H, holder := Holder())
    state.register(life)
    life.set_abort_callback(lambda s, e: pytest.fail("called for a panic"))
    panic = ClientPanic("PROBE", 1)
    assert state.session_lost(H, panic) == []
    assert life.dead is panic and holder is not None


def test_an_abort_callback_set_after_the_loss_runs_at_once_and_none_removes_it() -> None:
    life = life_on(H, holder := Holder())
    assert life.set_abort_callback(None) is None
    error = ipcfw.IpcError(ipcfw.KErrServerTerminated)
    assert life.lose(error) is None  # no callback yet
    abort = life.set_abort_callback(lambda s, e: None)
    assert abort is not None and abort.session is holder and abort.error is error
    assert life.set_abort_callback(None) is None


def test_when_the_kernel_goes_every_session_is_lost_each_with_its_own_error() -> None:
    state: ClientState[Any] = ClientState(threading.Lock())
    holders = [Holder(), Holder()]
    lives = [life_on(H, holders[0]), life_on(OTHER, holders[1])]
    for life in lives:
        state.register(life)
        life.set_abort_callback(lambda s, e: None)
    aborts = state.every_session_lost(lambda: IpcError(ipcfw.KErrServerTerminated, "gone"))
    assert len(aborts) == 2 and aborts[0].error is not aborts[1].error
    assert all(isinstance(life.dead, ipcfw.ServerTerminated) for life in lives)


def test_an_abort_callback_that_raises_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    def broken(session: object, error: IpcError) -> None:
        raise RuntimeError("user bug")

    with caplog.at_level(logging.ERROR, logger="ipcfw.client"):
        Abort(broken, Holder(), IpcError(ipcfw.KErrServerTerminated)).run()
    assert "abort callback raised" in caplog.text and "user bug" in caplog.text


def test_a_holder_gone_from_memory_leaves_the_table() -> None:
    state: ClientState[Any] = ClientState(threading.Lock())
    holder = Holder()
    state.register(life_on(H, holder))  # (only the holder keeps its life alive)
    assert state.session_lost(H, IpcError(ipcfw.KErrServerTerminated)) == []
    assert len(state.sessions[H]) == 0


class Racing:
    """A state with holders on H, and threads registering more meanwhile (as an Open)."""

    def __init__(self, holders: int) -> None:
        self.state: ClientState[Any] = ClientState(threading.Lock())
        self.holders = [Holder() for _ in range(holders + 1)]
        self.lives = [life_on(H, holder) for holder in self.holders]
        for life in self.lives[:-1]:
            self.state.register(life)
        self.threads: list[threading.Thread] = []

    def open_on_another_thread(self) -> None:
        """Register the last life from another thread, and give it a moment: it cannot
        finish while the interrupted call holds the state's lock."""
        thread = threading.Thread(target=self.state.register, args=(self.lives[-1],))
        thread.start()
        thread.join(0.01)
        self.threads.append(thread)

    def settle(self) -> None:
        for thread in self.threads:
            thread.join(10)


def test_a_session_lost_while_another_holder_opens_kills_every_holder() -> None:
    """The I/O thread walks the holders of a lost session while an Open registers one more:
    no "Set changed size during iteration", every holder it walked is dead."""
    def lose(world: Racing) -> object:
        try:
            return world.state.session_lost(H, IpcError(ipcfw.KErrServerTerminated))
        except BaseException as exc:
            return exc
        finally:
            world.settle()

    worlds: list[Racing] = []

    def setup() -> Racing:
        worlds.append(Racing(2))
        return worlds[-1]

    outcomes = every_interleaving(setup, lose, weakref.WeakSet.__iter__.__code__,
                                  Racing.open_on_another_thread, unit="line")
    assert outcomes and [o for o in outcomes if not isinstance(o, list)] == []
    assert all(life.dead is not None for world in worlds for life in world.lives[:-1])


def test_a_close_racing_an_open_on_the_same_handle_keeps_the_new_holder() -> None:
    """A Close forgets the last holder of H while an Open registers a new one: the table
    keeps the new holder."""
    def close(world: Racing) -> None:
        world.lives[0].detach()
        world.state.close(world.lives[0], H, ended=False)
        world.settle()

    worlds: list[Racing] = []

    def setup() -> Racing:
        worlds.append(Racing(1))
        return worlds[-1]

    assert every_interleaving(setup, close, ClientState.close.__code__,
                              Racing.open_on_another_thread, unit="line")
    raced = worlds[:-1]  # (the last ran out of points: nothing registered there)
    assert all(list(world.state.sessions.get(H, ())) == [world.lives[-1]] for world in raced)


# -- Close ---------------------------------------------------------------------------------------


def test_close_ends_that_sessions_requests_only_and_forgets_the_holder() -> None:
    state: ClientState[Any] = ClientState(threading.Lock())
    mine, shared_too = Holder(), Holder()
    life, other = life_on(H, mine), life_on(H, shared_too)
    state.register(life)
    state.register(other)
    state.add(1, Pending(FakeStatus(), record, life, {}, "channel"))
    state.add(2, Pending(FakeStatus(), record, other, {}, "channel"))
    state.add(3, Pending(FakeStatus(), record, life, {}, "channel"))
    assert life.detach() == ("runtime", H) and life.handle == 0
    closing = state.close(life, H, ended=False)
    assert closing.requests == [1, 3] and closing.tell_kernel
    assert list(state.sessions[H]) == [other]
    state.close(other, H, ended=False)
    assert H not in state.sessions


def test_close_answers_the_sync_calls_in_flight_with_kerrsessionclosed() -> None:
    state: ClientState[Any] = ClientState(threading.Lock())
    life = life_on(H, holder := Holder())
    life.sync_calls[7] = "channel of thread A"
    life.sync_calls[9] = "channel of thread B"
    closing = state.close(life, H, ended=False)
    assert closing.answers == [
        ("channel of thread A", Completed(7, ipcfw.KErrSessionClosed, ())),
        ("channel of thread B", Completed(9, ipcfw.KErrSessionClosed, ())),
    ]
    assert holder is not None


@pytest.mark.parametrize(
    ("ended", "dead", "tell"),
    [
        (False, None, True),
        (True, None, False),  # the kernel is gone, or the owner thread's end closed it
        (False, ipcfw.IpcError(ipcfw.KErrDisconnected), False),  # dropped with its channel
        (False, ipcfw.IpcError(ipcfw.KErrServerTerminated), True),  # the kernel still holds it
    ],
)
def test_close_tells_the_kernel_unless_it_ended_the_session(
    ended: bool, dead: BaseException | None, tell: bool
) -> None:
    state: ClientState[Any] = ClientState(threading.Lock())
    life = life_on(H, holder := Holder())
    if dead is not None:
        life.lose(dead)
    assert state.close(life, H, ended=ended).tell_kernel is tell and holder is not None


def test_a_sync_call_ended_by_close_from_another_thread() -> None:
    """Thread A waits in a sync call; the main thread closes the (shared) session: A's call
    raises SessionClosed, with no answer from any kernel."""
    state: ClientState[Any] = ClientState(threading.Lock())
    life = life_on(H, holder := Holder())
    state.register(life)
    replies: dict[int, Completed | None] = {}
    answered = threading.Condition()
    in_flight = threading.Event()
    outcome: list[BaseException] = []

    def sync_call() -> None:  # as RSession.SendReceive and Channel.call do it
        replies[5] = None
        life.sync_calls[5] = "A's channel"
        in_flight.set()
        with answered:
            answered.wait_for(lambda: replies[5] is not None, timeout=10)
        reply = replies.pop(5)
        life.sync_calls.pop(5)
        try:
            life.finish(reply if reply is not None else Welcome(0, 0, 0), {})
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=sync_call)
    thread.start()
    assert in_flight.wait(10)
    _, handle = life.detach()
    for _channel, answer in state.close(life, handle, ended=False).answers:
        with answered:  # as Channel.end_call does
            replies[answer.req_id] = answer
            answered.notify_all()
    thread.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], ipcfw.SessionClosed)
    assert holder is not None


# -- one holder, one handle (RSession and RSubSession) -------------------------------------------


def test_a_hold_refuses_a_second_connect_while_connected_or_connecting() -> None:
    hold: Hold[str] = Hold(SESSION_WORDS, threading.Lock())
    hold.begin(threading.current_thread())
    other = threading.Thread(name="other-thread")
    with pytest.raises(ClientPanic) as busy:
        hold.begin(other)
    assert (busy.value.category, busy.value.reason) == ("KERN-EXEC", 9)
    assert "already being connected" in str(busy.value) and "'MainThread'" in str(busy.value)
    hold.attach("runtime", H)
    hold.end()
    with pytest.raises(ClientPanic) as held:
        hold.begin(other)
    assert (held.value.category, held.value.reason) == ("KERN-EXEC", 57)
    assert "already connected (handle 0x2a)" in str(held.value)
    assert hold.detach() == ("runtime", H)
    hold.begin(other)  # free again
    assert hold.busy is other


def test_a_subsession_hold_speaks_of_subsessions_and_refuses_use_when_not_open() -> None:
    hold: Hold[str] = Hold(SUBSESSION_WORDS, threading.Lock())
    with pytest.raises(ClientPanic, match="the subsession is not open") as raised:
        hold.usable()
    assert (raised.value.category, raised.value.reason) == ("KERN-EXEC", 0)
    hold.attach("session", OTHER)
    assert hold.usable() == ("session", OTHER)
    with pytest.raises(ClientPanic, match="RSubSession is already open"):
        hold.begin(threading.current_thread())
    assert hold.detach() == ("session", OTHER)
    assert hold.detach() == (None, 0)  # closing twice does nothing


def test_a_session_reconnected_after_its_death_is_alive() -> None:
    life = life_on(H, holder := Holder())
    life.lose(IpcError(ipcfw.KErrServerTerminated))
    with pytest.raises(ipcfw.ServerTerminated):
        life.usable()
    life.detach()
    with pytest.raises(ClientPanic, match="the session is not connected"):
        life.usable()
    life.attach("runtime", OTHER)
    assert life.usable() == ("runtime", OTHER) and life.dead is None and holder is not None


def previously_dead_life() -> SessionLife[Any]:
    """A holder whose last session died, then was closed: not connected."""
    life = life_on(H, Holder())
    life.lose(IpcError(ipcfw.KErrServerTerminated))
    life.detach()
    return life


def fresh_life() -> SessionLife[Any]:
    """A holder never connected."""
    return SessionLife(Holder(), threading.Lock())


def allowed_outcome(outcome: object) -> bool:
    """Before the connect: KERN-EXEC 0. After it: the new session, alive."""
    if isinstance(outcome, ClientPanic):
        return (outcome.category, outcome.reason) == ("KERN-EXEC", 0)
    return outcome == ("new runtime", OTHER)


@pytest.mark.parametrize("setup", [fresh_life, previously_dead_life])
def test_a_call_racing_a_connect_sees_the_state_before_or_after_it(
    setup: Callable[[], SessionLife[Any]]
) -> None:
    """A connect (or Open) finishing on another thread at any point of a call's check, or
    the call's check at any point of the connect: never an AssertionError or TypeError,
    never the previous session's death on the new handle."""
    def connect(life: SessionLife[Any]) -> None:
        life.attach("new runtime", OTHER)

    def call(life: SessionLife[Any]) -> object:
        try:
            return life.usable()
        except BaseException as exc:
            return exc

    during_call = every_interleaving(setup, call, SessionLife.usable.__code__, connect)
    during_connect: list[object] = []  # what calls made at each point of the connect saw
    every_interleaving(setup, connect, SessionLife.attach.__code__,
                       lambda life: during_connect.append(call(life)))
    assert during_call and during_connect
    bad = [o for o in during_call + during_connect if not allowed_outcome(o)]
    assert bad == []


def test_an_rsession_tells_ipcfw_why_it_died() -> None:
    session = ipcfw.RSession()
    assert death_of(session) is None and session.Handle() == 0
    assert not hasattr(session, "death")  # (not for a client program: its calls raise it)
    life = session._life  # (what a connect would attach; no kernel here)
    life.attach("runtime", H)
    error = IpcError(ipcfw.KErrServerTerminated)
    life.lose(error)
    assert death_of(session) is error
    with pytest.raises(ipcfw.ServerTerminated):
        session.SendReceive(1)
    life.detach()  # (no Close: there is no runtime to tell)


# -- the direct path (rule 6) -------------------------------------------------------------------


def test_a_direct_session_routes_each_thread_on_its_own_route() -> None:
    life: SessionLife[Any] = SessionLife(Holder(), threading.Lock())
    life.attach("runtime", H, "/run/ipcfw/d-1", {11: "connection of 11"})
    assert life.route(11) == "connection of 11"
    assert life.route(12) is UNDECIDED  # another thread's first use: it asks for a ticket
    life.set_route(12, "connection of 12")
    life.set_route(13, None)  # no connection could be made: the kernel path, decided once
    assert (life.route(12), life.route(13)) == ("connection of 12", None)
    life.forget_route(12, "another connection")  # (a later thread with a reused ident's)
    assert life.route(12) == "connection of 12"
    life.forget_route(12, "connection of 12")  # the thread ended
    assert life.route(12) is UNDECIDED
    assert life.detach() == ("runtime", H)
    assert life.route(11) is None  # closed: nothing routes direct
    life.set_route(11, "late")  # (a join finishing after the Close)
    assert life.route(11) is None


def test_a_close_leaves_the_direct_connections_while_another_holder_of_the_process_holds() -> None:
    state: ClientState[Any] = ClientState(threading.Lock())
    first, second = life_on(H, one := Holder()), life_on(H, two := Holder())  # (two Opens)
    state.register(first)
    state.register(second)
    state.attach_direct(H, "connection A")
    assert state.close(first, H, ended=False).direct == []  # the other one still uses it
    assert state.close(second, H, ended=False).direct == ["connection A"]
    assert one is not None and two is not None


def test_a_kernel_path_session_routes_nothing_direct() -> None:
    life = life_on(H, Holder())
    assert life.route(0) is None and life.route(11) is None


def test_close_names_the_direct_connections_to_tell_first_and_forgets_them() -> None:
    state: ClientState[Any] = ClientState(threading.Lock())
    life, other = life_on(H, holder := Holder()), life_on(OTHER, Holder())
    state.register(life)
    state.register(other)
    state.attach_direct(H, "connection A")
    state.attach_direct(OTHER, "connection A")
    state.attach_direct(H, "connection B")  # (an Attach whose answer never came)
    closing = state.close(life, H, ended=False)
    assert sorted(closing.direct) == ["connection A", "connection B"] and closing.tell_kernel
    assert state.close(life, H, ended=False).direct == []  # told once
    assert state.close(other, OTHER, ended=True).direct == ["connection A"]
    assert holder is not None


def test_a_kernel_path_close_tells_no_direct_connection() -> None:
    state: ClientState[Any] = ClientState(threading.Lock())
    life = life_on(H, holder := Holder())
    state.register(life)
    assert state.close(life, H, ended=False).direct == [] and holder is not None


def test_a_direct_connection_that_ends_gives_its_handles_and_its_pending_requests() -> None:
    state: ClientState[Any] = ClientState(threading.Lock())
    life = life_on(H, holder := Holder())
    state.attach_direct(H, "connection A")
    state.attach_direct(OTHER, "connection A")
    state.add(1, Pending(FakeStatus(), record, life, {}, "connection A"))
    state.add(2, Pending(FakeStatus(), record, life, {}, "kernel channel"))
    state.add(3, Pending(FakeStatus(), record, life, {}, "connection A"))
    assert state.connection_ended("connection A") == ({H, OTHER}, [1, 3])
    assert state.connection_ended("connection A") == (set(), [1, 3])  # (until completed)
    assert state.close(life, H, ended=False).direct == []  # it ended: nothing to tell it
    assert holder is not None
