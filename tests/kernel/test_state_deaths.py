"""Tests of ipcfw.kernel.state: server and client deaths, completions that are not the server's
to make, and the session lifecycle table.

No processes, sockets, clocks or sleeps: see kernel_world.py for the fake world.
"""

from __future__ import annotations

import collections

import pytest

from ipcfw import errors
from ipcfw.kernel import state as kstate
from ipcfw.kernel.state import (
    KernelInvariantError,
    KernelState,
    PeerMisbehaved,
    Send,
    SessionEvent,
    SessionState,
    Unwatch,
    Watch,
)
from ipcfw.protocol import (
    PeerGone,
    Close,
    Complete,
    Completed,
    Connected,
    Disconnect,
    Panic,
    Panicked,
    Role,
    SessionLost,
    Stats,
    StatsReply,
    decode,
    encode,
)

from kernel_world import (
    echo_world,
    CHANNEL,
    INBOX,
    SERVER,
    SYNC,
    ASYNC,
    BLIND,
    ANSWERS,
    SRV,
    SRV2,
    CLI,
    CLI2,
    S1,
    S2,
    C1,
    C1B,
    IN1,
    C2,
    IN2,
    new_state,
    hello,
    sends,
    one,
    targets,
    start_server,
    register,
    start_client,
    begin_connect,
    open_session,
    request,
    deliver,
    snapshot,
    counts,
    ZERO,
)


# -- Server death ------------------------------------------------------------------------------


def _busy_server_world() -> tuple[KernelState, dict]:
    """Server S1 with two open sessions (C1, C2) and a connecting one, all with requests out."""
    state = new_state()
    start_server(state)
    start_client(state)
    start_client(state, CLI2, C2, IN2)
    h1 = open_session(state, C1, slots=5, req_id=1)
    h2 = open_session(state, C2, req_id=2)
    request(state, C1, h1, 10, SYNC)
    request(state, C1, h1, 11, ASYNC)
    request(state, C1, h1, 12, ASYNC)
    request(state, C1, h1, 13, BLIND)
    request(state, C2, h2, 20, SYNC)
    request(state, C2, h2, 21, ASYNC)
    _, new = begin_connect(state, C2, 30)
    return state, {"h1": h1, "h2": h2, "h3": new.handle}


def _check_server_death(state: KernelState, handles: dict, actions: list) -> None:
    terminated = errors.KErrServerTerminated
    answers = collections.Counter(m.req_id for m in sends(actions) if type(m) in ANSWERS)
    assert answers == {10: 1, 11: 1, 12: 1, 20: 1, 21: 1, 30: 1}  # blind 13 was answered already
    by_req = {m.req_id: (a.rid, m) for a in actions if type(a) is Send
              for m in [a.message] if type(m) in ANSWERS}
    assert by_req[10] == (C1, Completed(10, terminated, ()))
    assert by_req[11] == (C1, Completed(11, terminated, ()))
    assert by_req[12] == (C1, Completed(12, terminated, ()))
    assert by_req[20] == (C2, Completed(20, terminated, ()))
    assert by_req[21] == (C2, Completed(21, terminated, ()))
    assert by_req[30] == (C2, Connected(30, terminated, 0, b""))
    h1, h2 = handles["h1"], handles["h2"]
    # The inboxes hear of the lost sessions, and of nothing else.
    assert sends(actions, IN1) == [SessionLost(h1, terminated)]
    assert sends(actions, IN2) == [SessionLost(h2, terminated)]
    assert set(targets(actions)) == {C1, C2, IN1, IN2}
    stats = state.statistics()
    assert stats["servers"] == 0 and stats["sessions_dead"] == 2 and stats["sessions"] == 2
    assert stats["messages"] == 0 and stats["pool_used"] == 0
    # Later requests fail at once, to the right place, and reach nobody else.
    for req, mode in ((40, SYNC), (41, ASYNC), (42, BLIND)):
        assert request(state, C1, h1, req, mode) == [Send(C1, Completed(req, terminated, ()))]
    # The name is free for a new instance.
    hello(state, b"srv-new", SERVER, SRV2)
    assert register(state, b"srv-new", "ECHO") == errors.KErrNone
    fresh = open_session(state, C1, b"srv-new", req_id=50)
    assert fresh not in (h1, h2)
    # Closing a dead session removes it, without a Disconnect to anyone.
    assert state.receive(C1, Close(h1)) == []
    assert state.receive(C2, Close(h2)) == []
    assert state.statistics()["sessions"] == 1 and state.statistics()["sessions_dead"] == 0


def test_server_peer_gone_terminates_every_outstanding_request_once() -> None:
    state, handles = _busy_server_world()
    actions = state.peer_gone(S1)
    assert not [a for a in actions if type(a) is Send and a.rid == S1]
    _check_server_death(state, handles, actions)


def test_server_process_died_terminates_every_outstanding_request_once() -> None:
    state, handles = _busy_server_world()
    actions = state.process_died(SRV.key)
    assert actions[-1] == Unwatch(SRV.key)
    assert state.statistics()["processes"] == 2
    _check_server_death(state, handles, actions)


def test_late_messages_from_a_dead_server_are_refused() -> None:
    ks = echo_world()
    h = open_session(ks)
    d = deliver(request(ks, C1, h, 1))
    ks.peer_gone(S1)
    with pytest.raises(PeerMisbehaved):
        ks.receive(S1, Complete(d.msg_id, 0, ()))


def test_server_death_with_a_closing_or_panicked_session() -> None:
    ks = echo_world()
    closing = open_session(ks)
    panicked = open_session(ks, req_id=2)
    ks.receive(C1, Close(closing))
    p = deliver(request(ks, C1, panicked, 3))
    ks.receive(S1, Panic(p.msg_id, "P", 1))
    actions = ks.peer_gone(S1)
    # Nobody had anything outstanding; the panicked session's holder learns it is lost.
    assert [type(m) for m in sends(actions)] == [SessionLost]
    assert ks.statistics()["sessions"] == 1 and ks.statistics()["sessions_dead"] == 1
    assert request(ks, C1, panicked, 4) == [Send(C1, Panicked(4, panicked, "P", 1, 1))]
    ks.receive(C1, Close(panicked))
    assert counts(ks) == ZERO


def test_other_servers_are_unaffected_by_a_server_death() -> None:
    state = new_state()
    start_server(state, S1, SRV, "Echo")
    start_server(state, S2, SRV2, "KV")
    start_client(state)
    h1 = open_session(state, C1, S1, "Echo")
    h2 = open_session(state, C1, S2, "KV", req_id=2)
    d = deliver(request(state, C1, h2, 3), S2)
    state.peer_gone(S1)
    assert state.receive(S2, Complete(d.msg_id, 9, ())) == [Send(C1, Completed(3, 9, ()))]
    assert state.sessions[h1].state is SessionState.DEAD
    assert state.sessions[h2].state is SessionState.OPEN


# -- Client death ------------------------------------------------------------------------------


def test_client_process_death_disconnects_each_of_its_sessions() -> None:
    ks = echo_world()
    base = counts(ks)
    base_stats = ks.statistics()
    start_client(ks, CLI2, C2, IN2)
    hello(ks, b"chan-2b", CHANNEL, CLI2)
    h1 = open_session(ks, C2, req_id=1)
    h2 = open_session(ks, C2, slots=2, req_id=2)
    h3 = open_session(ks, b"chan-2b", req_id=3)
    held = [
        deliver(request(ks, C2, h1, 10, SYNC)),
        deliver(request(ks, C2, h2, 11, ASYNC)),
        deliver(request(ks, b"chan-2b", h3, 12, BLIND)),
    ]
    # A session of another client is not touched.
    mine = open_session(ks, C1, req_id=4)
    actions = ks.process_died(CLI2.key)
    disconnects = sends(actions, S1, Disconnect)
    assert sorted(d.handle for d in disconnects) == sorted([h1, h2, h3])
    assert len(sends(actions)) == 3  # nothing but the Disconnects
    assert actions[-1] == Unwatch(CLI2.key)
    assert ks.statistics()["sessions_closing"] == 3
    # Late completions are dropped.
    for d in held:
        assert ks.receive(S1, Complete(d.msg_id, 0, ((0, b""),))) == []
    for d in disconnects:
        assert ks.receive(S1, Complete(d.msg_id, 0, ())) == []
    last = one(ks.receive(C1, Close(mine)), S1, Disconnect)
    assert ks.receive(S1, Complete(last.msg_id, 0, ())) == []
    assert counts(ks) == base
    assert ks.statistics() == base_stats


def test_client_death_while_connecting_abandons_then_disconnects() -> None:
    ks = echo_world()
    _, new = begin_connect(ks, C1, 1)
    assert sends(ks.process_died(CLI.key)) == []
    assert ks.statistics()["sessions_abandoned"] == 1
    d = one(ks.receive(S1, Complete(new.msg_id, 0, ())), S1, Disconnect)
    ks.receive(S1, Complete(d.msg_id, 0, ()))
    assert counts(ks) == ZERO


def test_channel_gone_disconnects_only_the_sessions_it_owned() -> None:
    ks = echo_world()
    hello(ks, C1B, CHANNEL, CLI)
    mine = [open_session(ks, C1B, req_id=1), open_session(ks, C1B, req_id=2)]
    other = open_session(ks, C1, req_id=3)
    held = deliver(request(ks, C1B, mine[0], 4, ASYNC))  # its answer would have gone to C1B
    actions = ks.peer_gone(C1B)
    assert sorted(d.handle for d in sends(actions, S1, Disconnect)) == sorted(mine)
    assert len(sends(actions)) == 2
    # Nobody waits for the async request any more: not the inbox, nor another channel.
    assert ks.receive(S1, Complete(held.msg_id, 0, ())) == []
    assert not [a for a in actions if type(a) in (Watch, Unwatch)]  # the process lives on
    assert ks.statistics()["processes"] == 2
    d = deliver(request(ks, C1, other, 5))
    assert ks.receive(S1, Complete(d.msg_id, 1, ())) == [Send(C1, Completed(5, 1, ()))]


def test_peer_gone_and_process_died_for_unknown_peers_do_nothing() -> None:
    ks = echo_world()
    before = snapshot(ks)
    assert ks.peer_gone(b"nobody") == []
    assert ks.process_died((1, 2.0)) == []
    assert snapshot(ks) == before


def test_last_peer_of_a_process_unwatches_it() -> None:
    ks = echo_world()
    assert ks.peer_gone(C1) == []
    assert ks.peer_gone(IN1) == [Unwatch(CLI.key)]
    assert ks.statistics()["processes"] == 1
    # The process may come back (a new peer of the same identity): watched again.
    assert hello(ks, C1, CHANNEL, CLI)[0] == Watch(CLI)


# -- Completions that are not the server's to make ---------------------------------------------


def test_completion_of_another_servers_message_is_dropped() -> None:
    state = new_state()
    start_server(state, S1, SRV, "Echo")
    start_server(state, S2, SRV2, "KV")
    start_client(state)
    h = open_session(state, C1, S1, "Echo")
    d = deliver(request(state, C1, h, 1, ASYNC))
    before = snapshot(state)
    assert state.receive(S2, Complete(d.msg_id, 666, ((0, b"x"),))) == []
    assert state.receive(S2, Panic(d.msg_id, "Evil", 1)) == []
    assert snapshot(state) == before
    assert state.receive(S1, Complete(d.msg_id, 5, ())) == [Send(C1, Completed(1, 5, ()))]


def test_completion_of_an_unknown_or_already_completed_message_is_dropped() -> None:
    ks = echo_world()
    h = open_session(ks)
    d = deliver(request(ks, C1, h, 1))
    assert ks.receive(S1, Complete(d.msg_id, 1, ())) == [Send(C1, Completed(1, 1, ()))]
    before = snapshot(ks)
    for msg_id in (d.msg_id, 0, 10**9, 2**63 - 1):
        assert ks.receive(S1, Complete(msg_id, 2, ())) == []
        assert ks.receive(S1, Panic(msg_id, "X", 0)) == []
    assert snapshot(ks) == before


@pytest.mark.parametrize("role", [CHANNEL, INBOX, SERVER])
def test_completion_from_a_peer_without_a_server_raises(role: Role) -> None:
    ks = echo_world()
    h = open_session(ks)
    d = deliver(request(ks, C1, h, 1))
    hello(ks, b"rogue", role, CLI2)  # a SERVER-role peer that registered nothing is no server
    before = snapshot(ks)
    for message in (Complete(d.msg_id, 0, ()), Panic(d.msg_id, "X", 0)):
        with pytest.raises(PeerMisbehaved) as info:
            ks.receive(b"rogue", message)
        assert info.value.kind == "not a server"
    with pytest.raises(PeerMisbehaved):
        ks.receive(C1, Complete(d.msg_id, 0, ()))
    assert snapshot(ks) == before
    assert ks.receive(S1, Complete(d.msg_id, 0, ())) == [Send(C1, Completed(1, 0, ()))]


@pytest.mark.parametrize("inbox", ["gone", "replaced"])
@pytest.mark.parametrize("how", ["complete", "server dies"])
def test_async_answer_goes_to_the_channel_whatever_became_of_the_inbox(
    how: str, inbox: str
) -> None:
    ks = echo_world()
    h = open_session(ks)
    d = deliver(request(ks, C1, h, 1, ASYNC))
    assert ks.peer_gone(IN1) == []  # the process lives on through its channel
    if inbox == "replaced":
        hello(ks, b"inbox-new", INBOX, CLI)
    if how == "complete":
        assert ks.receive(S1, Complete(d.msg_id, 3, ())) == [Send(C1, Completed(1, 3, ()))]
        return
    actions = ks.peer_gone(S1)
    terminated = errors.KErrServerTerminated
    expected = [Send(C1, Completed(1, terminated, ()))]
    if inbox == "replaced":  # the loss is announced to the process's inbox of now
        expected.append(Send(b"inbox-new", SessionLost(h, terminated)))
    assert actions == expected + [Unwatch(SRV.key)]


def test_server_forgets_client_keys_of_dead_processes() -> None:
    ks = echo_world()
    open_session(ks)
    key = ks.peers[C1].process.client_key
    server = ks.server_of_peer[S1]
    assert key in server.informed
    for d in sends(ks.process_died(CLI.key), S1, Disconnect):
        ks.receive(S1, Complete(d.msg_id, 0, ()))
    assert counts(ks) == ZERO
    assert key not in server.informed


def test_handles_wrap_and_skip_live_ones() -> None:
    ks = echo_world()
    first = open_session(ks, req_id=1)
    assert first == 1
    ks._next_handle = 2**31 - 3
    assert open_session(ks, req_id=2) == 2**31 - 2
    assert open_session(ks, req_id=3) == 2**31 - 1
    assert open_session(ks, req_id=4) == 2  # 0 is never a handle; 1 is still live
    assert open_session(ks, req_id=5) == 3


def test_statistics_fit_in_a_stats_reply() -> None:
    ks = echo_world()
    open_session(ks)
    reply = one(ks.receive(C1, Stats(5)), C1, StatsReply)
    assert decode(encode(reply)) == reply


# -- the session lifecycle table ---------------------------------------------------------------


def _session_in(state_name: SessionState) -> tuple[KernelState, int]:
    """A kernel with one session driven to `state_name` through real messages."""
    ks_ = new_state()
    start_server(ks_)
    start_client(ks_)
    if state_name in (SessionState.CONNECTING, SessionState.ABANDONED):
        _, new = begin_connect(ks_, C1, 1)
        if state_name is SessionState.ABANDONED:
            ks_.receive(C1, Close(new.handle))
        handle = new.handle
    else:
        handle = open_session(ks_)
        if state_name is SessionState.CLOSING:
            ks_.receive(C1, Close(handle))
        elif state_name is SessionState.PANICKED:
            d = deliver(request(ks_, C1, handle, 2))
            ks_.receive(S1, Panic(d.msg_id, "P", 1))
        elif state_name is SessionState.DEAD:
            ks_.peer_gone(S1)
    assert ks_.sessions[handle].state is state_name
    return ks_, handle


ILLEGAL = [
    (s, e)
    for s in SessionState
    for e in SessionEvent
    if e not in kstate._SESSION_TRANSITIONS[s]
]


def test_the_transition_table_covers_every_state() -> None:
    assert set(kstate._SESSION_TRANSITIONS) == set(SessionState)
    assert len(ILLEGAL) > 10


@pytest.mark.parametrize(("session_state", "event"), ILLEGAL, ids=lambda x: x.value)
def test_illegal_transition_raises_and_changes_nothing(
    session_state: SessionState, event: SessionEvent
) -> None:
    ks_, handle = _session_in(session_state)
    before = snapshot(ks_)
    with pytest.raises(
        KernelInvariantError, match=rf"{event.value}.*0x{handle:x}.*{session_state.value}"
    ):
        ks_._transition(ks_.sessions[handle], event)
    assert snapshot(ks_) == before


def test_every_state_is_reachable_through_messages() -> None:
    for s in SessionState:
        ks_, handle = _session_in(s)
        assert ks_.statistics()[f"sessions_{s.value.lower()}"] == 1


def test_peer_gone_tells_each_informed_server_once() -> None:
    state = new_state()
    start_server(state, S1, SRV, "Echo")
    start_server(state, S2, SRV2, "KV")
    start_client(state)
    open_session(state, C1, S1, "Echo")
    actions = state.process_died(CLI.key)
    gone = [(a.rid, a.message) for a in actions if type(a) is Send and type(a.message) is PeerGone]
    assert len(gone) == 1 and gone[0][0] == S1  # KV never had a PeerInfo for this client
    assert all(not server.informed for server in state.server_of_peer.values())
