"""The kernel's limits, its holding back of a server that is not reading, and its cut-off of
a peer that is not reading, driven without processes.

The rules live in `KernelState` (limits per process, `hold_back`/`release`, `peer_dropped`) and
`KernelLimits`; the process tests in test_slow_peers.py show the same with real sockets and
SIGSTOPs.
"""

from __future__ import annotations

import pytest

from ipcfw import errors
from ipcfw.kernel.limits import KernelLimits
from ipcfw.kernel.state import Send
from ipcfw.protocol import (
    MAX_FRAME,
    Close,
    Complete,
    Completed,
    Cancel,
    Cancelled,
    Connect,
    Connected,
    Deliver,
    Disconnect,
    Dropped,
    NewSession,
    Open,
    PeerGone,
    PeerInfo,
    SessionLost,
    Share,
    Shared,
    Terminate,
    Terminating,
    TerminationReason,
)
from kernel_world import (
    ASYNC,
    BLIND,
    C1,
    C1B,
    C2,
    CHANNEL,
    CLI,
    CLI2,
    IN1,
    IN2,
    S1,
    SYNC,
    deliver,
    hello,
    new_state,
    one,
    open_session,
    request,
    sends,
    start_client,
    start_server,
)


def test_a_process_at_its_session_limit_is_refused_and_nobody_else_is() -> None:
    state = new_state(sessions_per_process=2)
    start_server(state)
    start_client(state)
    start_client(state, CLI2, C2, IN2)
    open_session(state, C1, req_id=1)
    open_session(state, C1, req_id=2)
    actions = state.receive(C1, Connect(3, "Echo", (1, 0, 0), -1, b""))
    assert actions == [Send(C1, Connected(3, errors.KErrOverflow, 0, b""))]  # nothing to the server
    open_session(state, C2, req_id=4)  # another process is not affected


def test_a_closed_session_gives_its_place_back_once_the_server_has_it() -> None:
    state = new_state(sessions_per_process=1)
    start_server(state)
    start_client(state)
    handle = open_session(state, C1, req_id=1)
    state.receive(C1, Close(handle))
    open_session(state, C1, req_id=2)


def test_open_counts_towards_the_limit_and_a_refusal_attaches_nothing() -> None:
    state = new_state(sessions_per_process=1)
    start_server(state, sharing=2)
    start_client(state)
    start_client(state, CLI2, C2, IN2)
    handle = open_session(state, C1, req_id=1)
    token = one(state.receive(C1, Share(2, handle, 2)), C1, Shared).token
    open_session(state, C2, req_id=3)  # CLI2 holds one session already
    actions = state.receive(C2, Open(4, token))
    assert actions == [Send(C2, Connected(4, errors.KErrOverflow, 0, b""))]
    assert C2 not in state.sessions[handle].attached  # it takes none of the 255 places


def test_outstanding_requests_are_limited_per_process_not_per_session() -> None:
    state = new_state(outstanding_per_process=3)
    start_server(state)
    start_client(state)
    start_client(state, CLI2, C2, IN2)
    first, second = open_session(state, C1, req_id=1), open_session(state, C1, req_id=2)
    delivered = [
        deliver(request(state, C1, first, 10, ASYNC)),
        deliver(request(state, C1, second, 11, BLIND)),
    ]
    delivered.append(deliver(request(state, C1, second, 12, ASYNC)))
    refused = request(state, C1, first, 13, ASYNC)
    assert refused == [Send(C1, Completed(13, errors.KErrServerBusy, ()))]
    # A synchronous call counts too (a timed-out one stays outstanding), but never gets
    # KErrServerBusy: like the 513th message of a session, it gets KErrOverflow.
    assert request(state, C1, first, 14, SYNC) == [Send(C1, Completed(14, errors.KErrOverflow, ()))]
    other = open_session(state, C2, req_id=3)
    deliver(request(state, C2, other, 20, ASYNC))  # another process is not affected
    state.receive(S1, _complete(delivered[0].msg_id))
    deliver(request(state, C1, first, 15, SYNC))  # a completion gives the place back


def test_a_session_ending_gives_back_its_outstanding_places() -> None:
    state = new_state(outstanding_per_process=2)
    start_server(state)
    start_client(state)
    handle = open_session(state, C1, req_id=1)
    request(state, C1, handle, 10, ASYNC)
    request(state, C1, handle, 11, ASYNC)
    disconnect = one(state.receive(C1, Close(handle)), S1, Disconnect)
    state.receive(S1, _complete(disconnect.msg_id))
    again = open_session(state, C1, req_id=2)
    deliver(request(state, C1, again, 12, ASYNC))
    deliver(request(state, C1, again, 13, ASYNC))
    assert state.processes[CLI.key].outstanding == 2


def test_a_dropped_channel_is_told_on_itself_and_its_inbox_and_its_sessions_end() -> None:
    state = new_state()
    start_server(state, sharing=1)
    start_client(state)
    hello(state, C1B, CHANNEL, CLI)  # another thread of the same process
    mine = open_session(state, C1, req_id=1)
    shared = open_session(state, C1, req_id=2)
    assert one(state.receive(C1, Share(3, shared, 1)), C1, Shared).result == errors.KErrNone
    other = open_session(state, C1B, req_id=4)
    request(state, C1, mine, 10, ASYNC)
    actions = state.peer_dropped(C1, 120_000)
    assert sends(actions, C1) == [Dropped(C1, 120_000)]  # behind what it has not read
    assert sends(actions, IN1) == [Dropped(C1, 120_000), SessionLost(mine, errors.KErrDisconnected)]
    assert [m.handle for m in sends(actions, S1, Disconnect)] == [mine]  # shared lives on
    assert not state.knows(C1)
    assert state.sessions[shared].held and state.sessions[other].held
    deliver(request(state, C1B, shared, 11, SYNC))  # the process's other threads go on
    assert state.peer_dropped(C1, 1) == []  # once only


def test_a_dropped_server_is_told_and_its_clients_are_answered_as_if_it_had_died() -> None:
    state = new_state()
    start_server(state)
    start_client(state)
    handle = open_session(state, C1)
    request(state, C1, handle, 10, ASYNC)
    actions = state.peer_dropped(S1, 130_000)
    assert sends(actions, S1) == [Dropped(S1, 130_000)]
    assert one(actions, C1, Completed) == Completed(10, errors.KErrServerTerminated, ())
    assert one(actions, IN1, SessionLost).handle == handle
    assert "echo" not in state.servers  # the name is free: it may register again
    start_server(state, b"srv-1-again")


def test_synchronous_requests_held_back_count_towards_the_process_limit() -> None:
    state = new_state(outstanding_per_process=5)
    start_server(state)
    start_client(state)
    handle = open_session(state)
    state.hold_back(S1)
    for req_id in range(10, 15):  # e.g. sync calls that timed out, sent again
        assert request(state, C1, handle, req_id, SYNC) == []
    assert request(state, C1, handle, 15, SYNC) == [
        Send(C1, Completed(15, errors.KErrOverflow, ()))
    ]
    assert state.statistics()["held"] == 5


def test_a_termination_waits_for_what_is_held_back_and_the_server_is_told() -> None:
    state = new_state()
    start_server(state)
    start_client(state)
    start_client(state, CLI2, C2, IN2)
    handle = open_session(state, C1)
    state.hold_back(S1)
    request(state, C1, handle, 10, ASYNC)
    assert sends(state.receive(C2, Terminate(77, "Echo", TerminationReason.ADMINISTRATOR))) == []
    state.receive(C1, Cancel(10))  # nothing of the server's is outstanding now, but ...
    assert "echo" in state.servers  # ... it has not been told yet: the registration goes on
    released = state.release(S1, 1000)
    assert sends(released, S1) == [Terminating(TerminationReason.ADMINISTRATOR)]
    assert one(released, C2, Completed).req_id == 77  # then it ends
    assert "echo" not in state.servers


def test_a_held_back_server_is_sent_nothing_until_released_then_all_in_order() -> None:
    state = new_state()
    start_server(state)
    start_client(state)
    handle = open_session(state, C1)
    assert state.hold_back(S1) and state.holding(S1)
    actions = request(state, C1, handle, 10, ASYNC, args=(1,))
    actions += request(state, C1, handle, 11, ASYNC, args=(2,))
    assert actions == []  # held: the client waits, as for a busy server
    disconnect_actions = state.receive(C1, Close(handle))
    assert sends(disconnect_actions, S1) == []
    assert state.statistics()["held"] == 3
    first = state.release(S1, 2)
    assert [(type(m), getattr(m, "args", None)) for m in sends(first, S1)] == [
        (Deliver, (1,)), (Deliver, (2,))
    ]
    assert state.holding(S1)
    rest = state.release(S1, 1000)
    assert [type(m) for m in sends(rest, S1)] == [Disconnect]
    assert not state.holding(S1) and state.statistics()["held"] == 0
    assert state.release(S1, 1000) == []
    deliver(request(state, C1, open_session(state, C1, req_id=2), 12, SYNC))  # sent directly again


def test_a_request_cancelled_while_held_back_never_reaches_the_server() -> None:
    state = new_state()
    start_server(state)
    start_client(state)
    handle = open_session(state, C1)
    state.hold_back(S1)
    request(state, C1, handle, 10, ASYNC, args=(1,))
    request(state, C1, handle, 11, ASYNC, args=(2,))
    actions = state.receive(C1, Cancel(10))
    assert actions == [Send(C1, Completed(10, errors.KErrCancel, ()))]  # no Cancelled, held or not
    released = sends(state.release(S1, 1000), S1)
    assert [m.args for m in released] == [(2,)]
    assert not any(type(m) is Cancelled for m in released)


def test_peer_info_and_peer_gone_keep_their_order_around_held_messages() -> None:
    state = new_state()
    start_server(state)
    state.hold_back(S1)
    start_client(state)
    state.receive(C1, Connect(1, "Echo", (1, 0, 0), -1, b""))
    state.process_died(CLI.key)
    released = [a.message for a in state.release(S1, 1000)]
    assert [type(m) for m in released] == [PeerInfo, NewSession, PeerGone]


def test_a_dying_process_with_many_sessions_cannot_flood_a_held_back_server() -> None:
    state = new_state()
    start_server(state)
    start_client(state)
    handles = [open_session(state, C1, req_id=n) for n in range(1, 301)]
    state.hold_back(S1)
    actions = state.process_died(CLI.key)
    assert sends(actions, S1) == [] and sends(actions, S1, PeerGone) == []
    released = state.release(S1, 10_000)
    disconnects = [m.handle for m in sends(released, S1, Disconnect)]
    assert disconnects == handles
    assert type(sends(released, S1, PeerGone)[-1]) is PeerGone  # after every Disconnect
    assert state.statistics()["servers"] == 1  # still registered


def test_only_servers_are_held_back_and_a_dead_server_drops_what_was_held() -> None:
    state = new_state()
    start_server(state)
    start_client(state)
    assert not state.hold_back(C1) and not state.holding(C1)
    handle = open_session(state, C1)
    state.hold_back(S1)
    request(state, C1, handle, 10, ASYNC)
    actions = state.peer_gone(S1)
    assert one(actions, C1, Completed) == Completed(10, errors.KErrServerTerminated, ())
    assert not state.holding(S1) and state.statistics()["held"] == 0


def test_limits_resolve_the_backlog_cut_off_above_what_a_client_can_leave_unread() -> None:
    limits = KernelLimits(sessions_per_process=5, outstanding_per_process=7).check()
    assert limits.max_backlog == limits.least_backlog() == 5 + 7 + 10_000
    assert KernelLimits(max_backlog=3).check().max_backlog == 3  # allowed; the kernel warns


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"sessions_per_process": 0}, "sessions_per_process must be a positive int"),
        ({"receive_hwm": -1}, "receive_hwm must be a positive int"),
        ({"pool_slots": 1.5}, "pool_slots must be a positive int"),
        ({"max_frame": MAX_FRAME + 1}, f"max_frame must be in 4096..{MAX_FRAME}"),
        ({"max_frame": 100}, "max_frame must be in"),
        ({"max_backlog": -1}, "max_backlog must be a positive int"),
    ],
)
def test_a_bad_limit_is_named(change: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        KernelLimits(**change).check()


def _complete(msg_id: int) -> Complete:
    return Complete(msg_id, errors.KErrNone, ())
