"""Tests of ipcfw.kernel.state: Hello, Register, Connect, requests, message slots, handles,
Close and Panic, fed as messages and checked on actions.

No processes, sockets, clocks or sleeps: see kernel_world.py for the fake world.
"""

from __future__ import annotations

import collections
import itertools
import random

import pytest

from ipcfw import errors
from ipcfw.kernel import state as kstate
from ipcfw.kernel.state import (
    MAX_OUTSTANDING,
    KernelState,
    PeerMisbehaved,
    Send,
    SessionState,
    Unwatch,
    Watch,
)
from ipcfw.protocol import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    Close,
    Complete,
    Completed,
    Connect,
    Connected,
    Deliver,
    Disconnect,
    Hello,
    Mode,
    NewSession,
    Panic,
    Panicked,
    PeerInfo,
    Register,
    Request,
    Role,
    Stats,
    StatsReply,
    Terminate,
    TerminationReason,
    Welcome,
)

from kernel_world import (
    echo_world,
    KPID,
    CHANNEL,
    INBOX,
    SERVER,
    SYNC,
    ASYNC,
    BLIND,
    ident,
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


# -- Hello -------------------------------------------------------------------------------------


def test_hello_watches_the_first_peer_of_a_process_and_welcomes_every_peer() -> None:
    state = new_state()
    assert hello(state, C1, CHANNEL, CLI) == [
        Watch(CLI), Send(C1, Welcome(KPID, MAX_FRAME, PROTOCOL_VERSION))
    ]
    # A second peer of the same process: no second Watch.
    assert hello(state, IN1, INBOX, CLI) == [Send(IN1, Welcome(KPID, MAX_FRAME, PROTOCOL_VERSION))]
    assert hello(state, C1B, CHANNEL, CLI) == [
        Send(C1B, Welcome(KPID, MAX_FRAME, PROTOCOL_VERSION))
    ]
    # Another process is watched on its own.
    assert hello(state, S1, SERVER, SRV) == [
        Watch(SRV), Send(S1, Welcome(KPID, MAX_FRAME, PROTOCOL_VERSION))
    ]
    stats = state.statistics()
    assert stats["peers"] == 4 and stats["processes"] == 2


def test_same_pid_with_another_create_time_is_another_process() -> None:
    state = new_state()
    hello(state, C1, CHANNEL, CLI)
    reused = CLI._replace(create_time=CLI.create_time + 1)
    assert hello(state, C2, CHANNEL, reused) == [
        Watch(reused), Send(C2, Welcome(KPID, MAX_FRAME, PROTOCOL_VERSION))
    ]
    assert state.statistics()["processes"] == 2


def test_welcome_carries_the_configured_max_frame() -> None:
    state = KernelState(kernel_pid=12, max_frame=4096)
    assert sends(hello(state, C1, CHANNEL, CLI)) == [Welcome(12, 4096, PROTOCOL_VERSION)]


def test_duplicate_hello_raises_and_changes_nothing() -> None:
    state = new_state()
    hello(state, C1, CHANNEL, CLI)
    before = snapshot(state)
    for role, identity in ((CHANNEL, CLI), (SERVER, CLI), (INBOX, CLI2)):
        with pytest.raises(PeerMisbehaved) as info:
            hello(state, C1, role, identity)
        assert info.value.kind == "duplicate hello"
        assert snapshot(state) == before


def test_second_inbox_of_a_process_raises_and_changes_nothing() -> None:
    state = new_state()
    start_client(state)
    before = snapshot(state)
    with pytest.raises(PeerMisbehaved, match="inbox"):
        hello(state, b"inbox-again", INBOX, CLI)
    assert snapshot(state) == before
    # Once the first inbox is gone, a new one is welcome.
    state.peer_gone(IN1)
    assert sends(hello(state, b"inbox-again", INBOX, CLI)) == [
        Welcome(KPID, MAX_FRAME, PROTOCOL_VERSION)
    ]


@pytest.mark.parametrize(
    "message",
    [
        Register(1, "Echo", 0, (1, 0, 0)),
        Connect(1, "Echo", (1, 0, 0), -1, b""),
        Request(1, 1, 1, (), SYNC),
        Close(1),
        Complete(1, 0, ()),
        Panic(1, "X", 0),
        Stats(1),
    ],
    ids=lambda m: type(m).__name__,
)
def test_messages_before_hello_raise_and_change_nothing(message: tuple) -> None:
    ks = echo_world()
    before = snapshot(ks)
    with pytest.raises(PeerMisbehaved) as info:
        ks.receive(b"stranger", message)
    assert info.value.kind == "no hello"
    assert snapshot(ks) == before


@pytest.mark.parametrize(
    "message",
    [
        Welcome(1, 1, PROTOCOL_VERSION),
        Completed(1, 0, ()),
        Disconnect(1, 1),
        PeerInfo(1, 1, 1, 1, ""),
    ],
    ids=lambda m: type(m).__name__,
)
def test_messages_not_for_the_kernel_raise_and_change_nothing(message: tuple) -> None:
    ks = echo_world()
    before = snapshot(ks)
    with pytest.raises(PeerMisbehaved) as info:
        ks.receive(C1, message)
    assert info.value.kind == "wrong direction"
    assert snapshot(ks) == before


def test_a_second_hello_from_a_known_peer_is_a_duplicate() -> None:
    ks = echo_world()
    before = snapshot(ks)
    with pytest.raises(PeerMisbehaved) as info:
        ks.receive(C1, Hello(CHANNEL, 1))
    assert info.value.kind == "duplicate hello"
    assert snapshot(ks) == before


def test_stats_answers_any_peer_with_statistics() -> None:
    ks = echo_world()
    for rid in (C1, IN1, S1):
        actions = ks.receive(rid, Stats(77))
        assert actions == [Send(rid, StatsReply(77, ks.statistics()))]
    stats = ks.statistics()
    assert stats["peers"] == 3 and stats["processes"] == 2 and stats["servers"] == 1
    assert stats["sessions"] == 0 and stats["pool_slots"] == 4096
    assert {k for k in stats if k.startswith("sessions_")} == {
        f"sessions_{s.value.lower()}" for s in SessionState
    } | {"sessions_direct"}


# -- Register ----------------------------------------------------------------------------------


def test_register_succeeds_and_counts_a_server() -> None:
    state = new_state()
    hello(state, S1, SERVER, SRV)
    assert state.receive(S1, Register(5, "Echo", 1, (2, 3, 4))) == [Send(S1, Completed(5, 0, ()))]
    assert state.statistics()["servers"] == 1


@pytest.mark.parametrize(
    "name",
    ["", "x" * 81, "a*b", "*", "a?b", "?", "a:b", "tab\there", "new\nline", "nul\x00", "del\x7f",
     "caf\u00e9", "\x1f"],
)
def test_register_bad_name(name: str) -> None:
    state = new_state()
    hello(state, S1, SERVER, SRV)
    assert register(state, S1, name) == errors.KErrBadName
    assert state.statistics()["servers"] == 0


@pytest.mark.parametrize("name", ["x" * 80, "a", "with space", "~!@#$%^&()_+-=[]{};'\",./<>|\\`"])
def test_register_good_name(name: str) -> None:
    state = new_state()
    hello(state, S1, SERVER, SRV)
    assert register(state, S1, name) == errors.KErrNone


@pytest.mark.parametrize("second", ["Echo", "ECHO", "echo", "eCHo"])
def test_register_live_name_again_is_already_exists(second: str) -> None:
    state = new_state()
    start_server(state, S1, SRV, "Echo")
    hello(state, S2, SERVER, SRV2)
    before = snapshot(state)
    assert register(state, S2, second) == errors.KErrAlreadyExists
    assert snapshot(state) == before  # only the reply; no table changes
    # The original still serves.
    start_client(state)
    open_session(state, C1, S1, second)


def test_one_server_peer_registers_once() -> None:
    state = new_state()
    start_server(state, S1, SRV, "Echo")
    assert register(state, S1, "Other") == errors.KErrInUse
    assert state.statistics()["servers"] == 1


def test_protected_name_needs_protserv() -> None:
    state = new_state(protserv_uids=frozenset({0}))
    hello(state, S1, SERVER, ident(100, uid=1000))
    assert register(state, S1, "!sys") == errors.KErrPermissionDenied
    assert state.statistics()["servers"] == 0
    hello(state, S2, SERVER, ident(101, uid=0))
    assert register(state, S2, "!sys") == errors.KErrNone
    # Only the prefix makes a name protected.
    assert register(state, S1, "sys!") == errors.KErrNone


def test_protected_name_refused_by_default() -> None:
    state = new_state()
    hello(state, S1, SERVER, ident(100, uid=0))
    assert register(state, S1, "!root") == errors.KErrPermissionDenied


@pytest.mark.parametrize("role", [CHANNEL, INBOX])
def test_register_from_a_non_server_peer_raises_and_changes_nothing(role: Role) -> None:
    state = new_state()
    hello(state, C1, role, CLI)
    before = snapshot(state)
    with pytest.raises(PeerMisbehaved) as info:
        state.receive(C1, Register(1, "Echo", 0, (1, 0, 0)))
    assert info.value.kind == "wrong role"
    assert snapshot(state) == before


# -- Connect -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "slots", "code"),
    [
        ("Nobody", -1, errors.KErrNotFound),
        ("", -1, errors.KErrBadName),
        ("a*b", -1, errors.KErrBadName),
        ("x" * 81, -1, errors.KErrBadName),
        ("Echo", -2, errors.KErrArgument),
        ("Echo", 256, errors.KErrArgument),
        ("Echo", -(2**31), errors.KErrArgument),
        ("Echo", 2**31 - 1, errors.KErrArgument),
        ("Nobody", 256, errors.KErrArgument),  # slots are judged before the lookup
        ("a:b", 256, errors.KErrBadName),  # and the name before the slots
    ],
)
def test_connect_refused(name: str, slots: int, code: int) -> None:
    ks = echo_world()
    before = snapshot(ks)
    actions = ks.receive(C1, Connect(9, name, (1, 0, 0), slots, b""))
    [send] = actions
    assert send.rid == C1 and send.message._replace(text="") == Connected(9, code, 0, b"")
    if code == errors.KErrNotFound:  # the name asked for is repeated; a bad name's problem said
        assert repr(name) in send.message.text
    assert bool(send.message.text) == (code != errors.KErrArgument)
    assert snapshot(ks) == before


def test_an_unknown_name_is_answered_with_the_closest_registered_names() -> None:
    ks = echo_world()
    start_server(ks, S2, SRV2, "EchoServer")
    start_server(ks, b"srv-3", ident(120), "kv")
    [send] = ks.receive(C1, Connect(9, "echo-server", (1, 0, 0), -1, b""))
    assert send.message == Connected(9, errors.KErrNotFound, 0, b"", text=(
        "no server is registered under 'echo-server'; the closest registered name: "
        "'EchoServer'"))
    [send] = ks.receive(C1, Connect(11, "ecoh", (1, 0, 0), -1, b""))
    assert send.message.text == ("no server is registered under 'ecoh'; the closest "
                                 "registered name: 'Echo'")
    [send] = ks.receive(C1, Connect(10, "zzz", (1, 0, 0), -1, b""))
    assert send.message.text == ("no server is registered under 'zzz' (start it, or wait for "
                                 "it to register: 3 registered, none with a similar name)")


@pytest.mark.parametrize("slots", [-1, 0, 1, 255])
def test_connect_accepted_slot_counts(slots: int) -> None:
    ks = echo_world()
    handle = open_session(ks, slots=slots)
    assert ks.sessions[handle].slots == slots


def test_connect_path_peer_info_once_per_client_process_per_server() -> None:
    ks = echo_world()
    actions = ks.receive(C1, Connect(1, "echo", (1, 2, 3), 4, b"negotiation"))
    key = ks.peers[C1].process.client_key
    assert len(actions) == 2
    granted = "LocalServices Location NetworkServices ReadUserData UserEnvironment WriteUserData"
    assert actions[0] == Send(S1, PeerInfo(key, CLI.pid, CLI.uid, CLI.gid, CLI.exe, granted))
    new = actions[1].message
    assert actions[1].rid == S1 and type(new) is NewSession
    assert new == NewSession(new.msg_id, new.handle, (1, 2, 3), key, b"negotiation", b"", 4)
    assert ks.statistics()["sessions_connecting"] == 1
    # The same process again, from another channel: no second PeerInfo.
    hello(ks, C1B, CHANNEL, CLI)
    again = ks.receive(C1B, Connect(2, "Echo", (1, 0, 0), -1, b""))
    assert [type(m) for m in sends(again, S1)] == [NewSession]
    assert sends(again, S1)[0].handle != new.handle
    # Another process gets its own PeerInfo, with its own client key.
    start_client(ks, CLI2, C2, IN2)
    other = ks.receive(C2, Connect(3, "Echo", (1, 0, 0), -1, b""))
    info = one(other, S1, PeerInfo)
    assert info.pid == CLI2.pid and info.client != key
    # Another server gets a PeerInfo for a process the first one already knows.
    start_server(ks, S2, SRV2, "KV")
    third = ks.receive(C1, Connect(4, "KV", (1, 0, 0), -1, b""))
    assert [type(m) for m in sends(third, S2)] == [PeerInfo, NewSession]
    assert one(third, S2, PeerInfo).client == key


def test_connect_accepted() -> None:
    ks = echo_world()
    _, new = begin_connect(ks, C1, 7)
    actions = ks.receive(S1, Complete(new.msg_id, 0, ()))
    assert actions == [Send(C1, Connected(7, 0, new.handle, b""))]
    stats = ks.statistics()
    assert stats["sessions"] == stats["sessions_open"] == 1 and stats["messages"] == 0


def test_connect_positive_completion_is_success() -> None:
    ks = echo_world()
    _, new = begin_connect(ks, C1, 7)
    assert ks.receive(S1, Complete(new.msg_id, 5, ())) == [
        Send(C1, Connected(7, 0, new.handle, b""))
    ]


@pytest.mark.parametrize("code", [errors.KErrNotSupported, errors.KErrPermissionDenied, -(2**31)])
def test_connect_rejected_by_server_leaves_no_session(code: int) -> None:
    ks = echo_world()
    base = counts(ks)
    _, new = begin_connect(ks, C1, 7)
    actions = ks.receive(S1, Complete(new.msg_id, code, ()))
    assert actions == [Send(C1, Connected(7, code, 0, b""))]
    assert counts(ks) == base == ZERO
    assert ks.statistics()["sessions_connecting"] == 0
    # The handle is not usable.
    assert sends(request(ks, C1, new.handle, 8)) == [Panicked(8, new.handle, "KERN-EXEC", 0, 0)]


def test_connect_from_a_server_peer_raises() -> None:
    ks = echo_world()
    before = snapshot(ks)
    with pytest.raises(PeerMisbehaved):
        ks.receive(S1, Connect(1, "Echo", (1, 0, 0), -1, b""))
    with pytest.raises(PeerMisbehaved):
        ks.receive(IN1, Connect(1, "Echo", (1, 0, 0), -1, b""))
    assert snapshot(ks) == before


def test_requests_sent_while_connecting_are_delivered_after_new_session() -> None:
    ks = echo_world()
    log = []
    connect_actions, new = begin_connect(ks, C1, 1)
    log += connect_actions
    log += request(ks, C1, new.handle, 2, function=10)
    log += request(ks, C1, new.handle, 3, ASYNC, function=11)
    server_msgs = sends(log, S1)
    assert [type(m) for m in server_msgs] == [PeerInfo, NewSession, Deliver, Deliver]
    assert [m.function for m in server_msgs[2:]] == [10, 11]
    log = ks.receive(S1, Complete(new.msg_id, 0, ()))
    log += ks.receive(S1, Complete(server_msgs[2].msg_id, 100, ()))
    log += ks.receive(S1, Complete(server_msgs[3].msg_id, 101, ()))
    assert sends(log) == [
        Connected(1, 0, new.handle, b""), Completed(2, 100, ()), Completed(3, 101, ())
    ]
    assert targets(log) == [C1, C1, C1]  # every answer, async too, on the requesting channel


# -- Requests ----------------------------------------------------------------------------------


def test_sync_request_delivered_and_completed_to_the_channel() -> None:
    ks = echo_world()
    h = open_session(ks)
    actions = request(ks, C1, h, 10, SYNC, 3, (1, b"two"))
    key = ks.peers[C1].process.client_key
    assert len(actions) == 1
    d = deliver(actions)
    assert d == Deliver(d.msg_id, h, 3, (1, b"two"), key)
    assert ks.statistics()["messages"] == 1 and ks.pool_used == 0  # sync takes no slot
    assert ks.receive(S1, Complete(d.msg_id, 42, ())) == [Send(C1, Completed(10, 42, ()))]
    assert counts(ks) == {"sessions": 1, "messages": 0, "pool_used": 0}


def test_async_request_completed_to_the_requesting_channel() -> None:
    ks = echo_world()
    h = open_session(ks)
    actions = request(ks, C1, h, 11, ASYNC)
    assert targets(actions) == [S1]  # delivered; nothing to the channel or the inbox yet
    d = deliver(actions)
    assert ks.pool_used == 1
    assert ks.receive(S1, Complete(d.msg_id, -3, ())) == [Send(C1, Completed(11, -3, ()))]
    assert ks.pool_used == 0


def test_each_channel_of_a_process_gets_the_answers_to_its_own_requests() -> None:
    ks = echo_world()
    hello(ks, C1B, CHANNEL, CLI)
    start_client(ks, CLI2, C2, IN2)
    ha = open_session(ks, C1, slots=4, req_id=1)
    hb = open_session(ks, C1B, req_id=2)
    h2 = open_session(ks, C2, req_id=3)
    # Interleaved requests of every mode from two channels of one process and one of another;
    # the req ids of the channels overlap, as each runtime numbers its own.
    log = []
    for req, (chan, handle) in itertools.product((10, 11, 12), ((C1, ha), (C1B, hb), (C2, h2))):
        mode = {10: SYNC, 11: ASYNC, 12: BLIND}[req]
        log += request(ks, chan, handle, req, mode, function=req)
    acks = [a for a in log if type(a) is Send and a.rid != S1]
    assert acks == [Send(C1, Completed(12, 0, ())), Send(C1B, Completed(12, 0, ())),
                    Send(C2, Completed(12, 0, ()))]
    owner = {ha: C1, hb: C1B, h2: C2}
    answers = []
    for d in reversed(sends(log, S1, Deliver)):
        actions = ks.receive(S1, Complete(d.msg_id, 100 * d.function + d.handle, ()))
        if d.function == 12:
            assert actions == []  # a blind request's answer is dropped
        else:
            assert actions == [
                Send(owner[d.handle], Completed(d.function, 100 * d.function + d.handle, ()))
            ]
            answers += actions
    assert collections.Counter((a.rid, a.message.req_id) for a in answers) == {
        (chan, req): 1 for chan in (C1, C1B, C2) for req in (10, 11)
    }
    assert counts(ks) == {"sessions": 3, "messages": 0, "pool_used": 0}


def test_blind_request_acknowledged_at_once_and_answer_dropped() -> None:
    ks = echo_world()
    h = open_session(ks)
    actions = request(ks, C1, h, 12, BLIND, 5, (9,))
    assert len(actions) == 2
    d = deliver(actions)
    assert actions[1] == Send(C1, Completed(12, errors.KErrNone, ()))
    assert targets(actions) == [S1, C1]  # acknowledged once queued for the server
    assert ks.pool_used == 1
    assert ks.receive(S1, Complete(d.msg_id, 77, ())) == []
    assert counts(ks) == {"sessions": 1, "messages": 0, "pool_used": 0}


def test_async_request_from_a_process_without_an_inbox_is_served() -> None:
    state = new_state()
    start_server(state)
    start_client(state, CLI, C1, inbox=None)
    h = open_session(state, slots=1)
    # An async request needs no inbox: it is delivered, takes a slot, and is answered on C1.
    actions = request(state, C1, h, 1, ASYNC, 4, ((b"", 2),))
    assert targets(actions) == [S1]
    d = deliver(actions)
    assert state.sessions[h].slots_used == 1
    assert request(state, C1, h, 2, ASYNC) == [Send(C1, Completed(2, errors.KErrServerBusy, ()))]
    assert state.receive(S1, Complete(d.msg_id, 7, ((0, b"ok"),))) == [
        Send(C1, Completed(1, 7, ((0, b"ok"),)))
    ]
    assert state.sessions[h].slots_used == 0
    # Sync and blind as ever.
    s = deliver(request(state, C1, h, 3, SYNC))
    assert state.receive(S1, Complete(s.msg_id, 8, ())) == [Send(C1, Completed(3, 8, ()))]
    blind = request(state, C1, h, 4, BLIND)
    assert sends(blind, C1) == [Completed(4, errors.KErrNone, ())]
    assert state.receive(S1, Complete(deliver(blind).msg_id, 9, ())) == []
    # When the server dies, an outstanding async request is failed on the channel; the lost
    # session has no inbox to be announced to.
    deliver(request(state, C1, h, 5, ASYNC))
    assert state.peer_gone(S1) == [
        Send(C1, Completed(5, errors.KErrServerTerminated, ())), Unwatch(SRV.key)
    ]
    assert counts(state) == {"sessions": 1, "messages": 0, "pool_used": 0}


@pytest.mark.parametrize("rid", [S1, IN1])
def test_request_from_a_non_channel_raises(rid: bytes) -> None:
    ks = echo_world()
    h = open_session(ks)
    before = snapshot(ks)
    with pytest.raises(PeerMisbehaved):
        request(ks, rid, h, 1)
    assert snapshot(ks) == before


def test_deliveries_keep_the_order_of_requests() -> None:
    ks = echo_world()
    h = open_session(ks, slots=255)
    rng = random.Random(5)
    modes = [rng.choice([SYNC, ASYNC, BLIND]) for _ in range(60)]
    log = []
    for i, mode in enumerate(modes):
        log += request(ks, C1, h, 100 + i, mode, function=i)
    delivered = sends(log, S1, Deliver)
    assert [d.function for d in delivered] == list(range(60))
    assert [d.msg_id for d in delivered] == sorted(d.msg_id for d in delivered)
    # Completed out of order, each answer goes to its own requester once.
    answers = []
    for d in reversed(delivered):
        answers += ks.receive(S1, Complete(d.msg_id, d.function, ()))
    expected = {100 + i: i for i, mode in enumerate(modes) if mode != BLIND}
    assert {m.req_id: m.value for m in sends(answers)} == expected
    assert len(sends(answers)) == len(expected)


def test_writes_forwarded_for_writable_args_within_max_length() -> None:
    ks = echo_world()
    h = open_session(ks)
    args = (b"read-only", (b"old", 8), 7, (b"", 0))
    d = deliver(request(ks, C1, h, 20, SYNC, 1, args))
    assert d.args == args
    writes = ((1, b"12345678"), (3, b""))
    assert ks.receive(S1, Complete(d.msg_id, 8, writes)) == [Send(C1, Completed(20, 8, writes))]


def test_writes_of_an_async_request_go_to_the_requesting_channel() -> None:
    ks = echo_world()
    h = open_session(ks)
    d = deliver(request(ks, C1, h, 21, ASYNC, 1, ((b"", 4),)))
    assert ks.receive(S1, Complete(d.msg_id, 0, ((0, b"abcd"),))) == [
        Send(C1, Completed(21, 0, ((0, b"abcd"),)))
    ]


@pytest.mark.parametrize(
    "writes",
    [
        ((1, b"123456789"),),  # past the max length
        ((0, b"x"),),  # read-only descriptor
        ((2, b"x"),),  # an int argument
        ((3, b""),),  # no argument there
        ((1, b"ok"), (0, b"bad")),  # one bad write spoils the lot
    ],
)
def test_bad_writes_fail_the_request_with_bad_descriptor(writes: tuple) -> None:
    ks = echo_world()
    h = open_session(ks)
    d = deliver(request(ks, C1, h, 22, SYNC, 1, (b"ro", (b"", 8), 5)))
    actions = ks.receive(S1, Complete(d.msg_id, 3, writes))
    assert actions == [Send(C1, Completed(22, errors.KErrBadDescriptor, ()))]
    assert ks.statistics()["messages"] == 0


@pytest.mark.parametrize("mode", [SYNC, ASYNC, BLIND])
def test_writable_max_lengths_past_the_frame_are_refused_on_the_channel(
    mode: Mode
) -> None:
    ks = echo_world()
    h = open_session(ks, slots=1)
    limit = MAX_FRAME - kstate._COMPLETION_OVERHEAD  # room for a completion that fills them all
    before = snapshot(ks)
    args = ((b"", limit // 2), 5, (b"x", limit - limit // 2 + 1))
    assert request(ks, C1, h, 30, mode, 1, args) == [
        Send(C1, Completed(30, errors.KErrArgument, ()))
    ]
    assert snapshot(ks) == before  # nothing delivered, no slot taken
    # Exactly at the limit, the request is delivered.
    fits = ((b"", limit // 2), 5, (b"x", limit - limit // 2))
    assert deliver(request(ks, C1, h, 31, mode, 1, fits)).args == fits


# -- Message slots -----------------------------------------------------------------------------


def test_session_slots_bound_async_but_never_sync() -> None:
    ks = echo_world()
    h = open_session(ks, slots=2)
    a1 = deliver(request(ks, C1, h, 1, ASYNC))
    deliver(request(ks, C1, h, 2, ASYNC))
    assert ks.sessions[h].slots_used == 2
    busy = request(ks, C1, h, 3, ASYNC)
    assert busy == [Send(C1, Completed(3, errors.KErrServerBusy, ()))]
    assert request(ks, C1, h, 4, BLIND) == [Send(C1, Completed(4, errors.KErrServerBusy, ()))]
    # Sync needs no slot.
    s = deliver(request(ks, C1, h, 5, SYNC))
    assert ks.sessions[h].slots_used == 2 and ks.pool_used == 0
    # Completing a sync request frees nothing; completing an async one frees one slot.
    ks.receive(S1, Complete(s.msg_id, 0, ()))
    assert request(ks, C1, h, 6, ASYNC) == [Send(C1, Completed(6, errors.KErrServerBusy, ()))]
    ks.receive(S1, Complete(a1.msg_id, 0, ()))
    assert ks.sessions[h].slots_used == 1
    deliver(request(ks, C1, h, 7, BLIND))
    assert ks.sessions[h].slots_used == 2
    assert request(ks, C1, h, 8, ASYNC) == [Send(C1, Completed(8, errors.KErrServerBusy, ()))]


def test_zero_slots_allows_sync_only() -> None:
    ks = echo_world()
    h = open_session(ks, slots=0)
    assert request(ks, C1, h, 1, ASYNC) == [Send(C1, Completed(1, errors.KErrServerBusy, ()))]
    assert request(ks, C1, h, 2, BLIND) == [Send(C1, Completed(2, errors.KErrServerBusy, ()))]
    for i in range(3):
        deliver(request(ks, C1, h, 10 + i, SYNC))
    assert ks.pool_used == 0 and ks.statistics()["messages"] == 3


def test_pool_slots_are_kernel_wide() -> None:
    state = new_state(pool_slots=3)
    start_server(state)
    start_client(state)
    start_client(state, CLI2, C2, IN2)
    h1 = open_session(state, C1)
    h2 = open_session(state, C2, req_id=2)
    own = open_session(state, C1, slots=2, req_id=3)
    d1 = deliver(request(state, C1, h1, 10, ASYNC))
    deliver(request(state, C2, h2, 11, BLIND))
    deliver(request(state, C1, h1, 12, ASYNC))
    assert state.pool_used == 3
    assert request(state, C2, h2, 13, ASYNC) == [Send(C2, Completed(13, errors.KErrServerBusy, ()))]
    assert request(state, C1, h1, 14, BLIND) == [Send(C1, Completed(14, errors.KErrServerBusy, ()))]
    # A session with its own slots does not draw from the pool.
    deliver(request(state, C1, own, 15, ASYNC))
    assert state.pool_used == 3 and state.sessions[own].slots_used == 1
    # Sync never needs the pool.
    deliver(request(state, C2, h2, 16, SYNC))
    # Completing one pool message frees one pool slot, for any session.
    state.receive(S1, Complete(d1.msg_id, 0, ()))
    assert state.pool_used == 2
    deliver(request(state, C2, h2, 17, ASYNC))
    assert state.pool_used == 3
    assert state.statistics()["pool_used"] == 3 and state.statistics()["pool_slots"] == 3


def test_more_than_512_outstanding_is_overflow() -> None:
    ks = echo_world()
    h = open_session(ks, slots=0)
    delivered = []
    for i in range(MAX_OUTSTANDING):
        delivered.append(deliver(request(ks, C1, h, 1000 + i, SYNC)))
    assert MAX_OUTSTANDING == 512 and ks.statistics()["messages"] == 512
    before = snapshot(ks)
    assert request(ks, C1, h, 9999, SYNC) == [Send(C1, Completed(9999, errors.KErrOverflow, ()))]
    assert snapshot(ks) == before
    # One completed makes room for one more.
    ks.receive(S1, Complete(delivered[0].msg_id, 0, ()))
    deliver(request(ks, C1, h, 10000, SYNC))
    assert request(ks, C1, h, 10001, SYNC) == [Send(C1, Completed(10001, errors.KErrOverflow, ()))]


def test_overflow_is_per_session() -> None:
    ks = echo_world()
    h = open_session(ks, slots=0)
    other = open_session(ks, slots=0, req_id=2)
    for i in range(MAX_OUTSTANDING):
        request(ks, C1, h, 1000 + i, SYNC)
    assert sends(request(ks, C1, h, 1, SYNC))[0].value == errors.KErrOverflow
    deliver(request(ks, C1, other, 2, SYNC))


# -- Handles -----------------------------------------------------------------------------------


def test_unknown_handle_is_a_kern_exec_panic_and_reaches_no_server() -> None:
    ks = echo_world()
    open_session(ks)
    before = snapshot(ks)
    for handle, mode in ((999, SYNC), (2**31 - 1, BLIND), (12345, ASYNC)):
        actions = request(ks, C1, handle, 5, mode)
        assert actions == [Send(C1, Panicked(5, handle, "KERN-EXEC", 0, 0))]
    assert snapshot(ks) == before


def test_handle_of_another_process_is_a_kern_exec_panic() -> None:
    ks = echo_world()
    h = open_session(ks)
    start_client(ks, CLI2, C2, IN2)
    before = snapshot(ks)
    assert request(ks, C2, h, 5) == [Send(C2, Panicked(5, h, "KERN-EXEC", 0, 0))]
    assert request(ks, C2, h, 6, ASYNC) == [Send(C2, Panicked(6, h, "KERN-EXEC", 0, 0))]
    assert request(ks, C2, h, 7, BLIND) == [Send(C2, Panicked(7, h, "KERN-EXEC", 0, 0))]
    assert snapshot(ks) == before
    # The rightful holder is unaffected.
    d = deliver(request(ks, C1, h, 8))
    assert ks.receive(S1, Complete(d.msg_id, 1, ())) == [Send(C1, Completed(8, 1, ()))]


def test_unshared_handle_from_another_thread_of_the_process_is_a_kern_exec_panic(
) -> None:
    ks = echo_world()
    h = open_session(ks)
    hello(ks, C1B, CHANNEL, CLI)
    before = snapshot(ks)
    assert request(ks, C1B, h, 5) == [Send(C1B, Panicked(5, h, "KERN-EXEC", 0, 0))]
    assert request(ks, C1B, h, 6, BLIND) == [Send(C1B, Panicked(6, h, "KERN-EXEC", 0, 0))]
    assert request(ks, C1B, h, 7, ASYNC) == [Send(C1B, Panicked(7, h, "KERN-EXEC", 0, 0))]
    assert snapshot(ks) == before
    deliver(request(ks, C1, h, 8))


def test_close_of_a_handle_not_held_raises_and_changes_nothing() -> None:
    ks = echo_world()
    h = open_session(ks)
    hello(ks, C1B, CHANNEL, CLI)
    before = snapshot(ks)
    for rid, handle in ((C1, 999), (C1B, h)):
        with pytest.raises(PeerMisbehaved) as info:
            ks.receive(rid, Close(handle))
        assert info.value.kind == "close of a handle not held"
    with pytest.raises(PeerMisbehaved):
        ks.receive(S1, Close(h))
    assert snapshot(ks) == before


# -- Close -------------------------------------------------------------------------------------


def test_close_sends_disconnect_after_earlier_deliveries() -> None:
    ks = echo_world()
    base = counts(ks)
    h = open_session(ks, slots=3)
    log = []
    log += request(ks, C1, h, 1, SYNC)
    log += request(ks, C1, h, 2, ASYNC)
    log += request(ks, C1, h, 3, BLIND)
    log += ks.receive(C1, Close(h))
    assert [type(m) for m in sends(log, S1)] == [Deliver, Deliver, Deliver, Disconnect]
    disconnect = sends(log, S1)[-1]
    assert disconnect.handle == h
    assert ks.statistics()["sessions_closing"] == 1
    # Requests on the closed handle are refused at once and reach no server.
    assert request(ks, C1, h, 4) == [Send(C1, Panicked(4, h, "KERN-EXEC", 0, 0))]
    # The server may still complete the messages it held: nobody hears of them.
    for d in sends(log, S1, Deliver):
        assert ks.receive(S1, Complete(d.msg_id, 0, ((0, b"x"),))) == []
    assert ks.receive(S1, Complete(disconnect.msg_id, 0, ())) == []
    assert counts(ks) == base


def test_disconnect_completion_frees_slots_still_held() -> None:
    ks = echo_world()
    h = open_session(ks, slots=2)
    pool = open_session(ks, req_id=2)
    request(ks, C1, h, 1, ASYNC)
    request(ks, C1, pool, 2, ASYNC)
    request(ks, C1, pool, 3, BLIND)
    assert ks.pool_used == 2 and ks.sessions[h].slots_used == 1
    log = ks.receive(C1, Close(h)) + ks.receive(C1, Close(pool))
    assert ks.pool_used == 2  # still held by the server until it lets go
    for d in sends(log, S1, Disconnect):
        ks.receive(S1, Complete(d.msg_id, 0, ()))
    assert counts(ks) == ZERO


def test_disconnect_completed_with_an_error_or_a_panic_still_removes() -> None:
    ks = echo_world()
    h1 = open_session(ks)
    h2 = open_session(ks, req_id=2)
    d1 = one(ks.receive(C1, Close(h1)), S1, Disconnect)
    d2 = one(ks.receive(C1, Close(h2)), S1, Disconnect)
    assert ks.receive(S1, Complete(d1.msg_id, -2, ())) == []
    assert ks.receive(S1, Panic(d2.msg_id, "Oops", 1)) == []
    assert counts(ks) == ZERO


def test_close_while_connecting_then_accept_disconnects() -> None:
    ks = echo_world()
    _, new = begin_connect(ks, C1, 1)
    assert ks.receive(C1, Close(new.handle)) == []
    assert ks.statistics()["sessions_abandoned"] == 1
    actions = ks.receive(S1, Complete(new.msg_id, 0, ()))
    assert actions == [Send(S1, Disconnect(actions[0].message.msg_id, new.handle))]
    assert ks.statistics()["sessions_closing"] == 1
    ks.receive(S1, Complete(actions[0].message.msg_id, 0, ()))
    assert counts(ks) == ZERO


def test_close_while_connecting_then_reject_is_silent() -> None:
    ks = echo_world()
    _, new = begin_connect(ks, C1, 1)
    ks.receive(C1, Close(new.handle))
    assert ks.receive(S1, Complete(new.msg_id, errors.KErrNotSupported, ())) == []
    assert counts(ks) == ZERO


# -- Panic -------------------------------------------------------------------------------------


def test_server_panic_of_a_client() -> None:
    ks = echo_world()
    base = counts(ks)
    h = open_session(ks, slots=4)
    a = deliver(request(ks, C1, h, 1, SYNC))
    b = deliver(request(ks, C1, h, 2, ASYNC))
    c = deliver(request(ks, C1, h, 3, BLIND))
    d = deliver(request(ks, C1, h, 4, SYNC))
    actions = ks.receive(S1, Panic(a.msg_id, "MyServer", 7))
    # The requester, then every other outstanding requester, then the server's Disconnect.
    assert sends(actions) == [
        Panicked(1, h, "MyServer", 7, 1),
        Panicked(2, h, "MyServer", 7, 1),
        Panicked(4, h, "MyServer", 7, 1),
        Disconnect(sends(actions, S1)[0].msg_id, h),
    ]
    assert targets(actions) == [C1, C1, C1, S1]
    assert ks.statistics()["sessions_panicked"] == 1
    # Later requests on the handle get the same panic, and reach no server.
    for req, mode in ((5, SYNC), (6, ASYNC), (7, BLIND)):
        assert request(ks, C1, h, req, mode) == [Send(C1, Panicked(req, h, "MyServer", 7, 1))]
    # Completions of the other messages are dropped.
    for m in (b, c, d):
        assert ks.receive(S1, Complete(m.msg_id, 0, ())) == []
    assert ks.receive(S1, Panic(b.msg_id, "Again", 1)) == []
    # The server lets go; the client still holds the dead handle.
    disconnect = sends(actions, S1)[0]
    assert ks.receive(S1, Complete(disconnect.msg_id, 0, ())) == []
    assert ks.statistics()["sessions_dead"] == 1
    assert request(ks, C1, h, 8) == [Send(C1, Panicked(8, h, "MyServer", 7, 1))]
    # Close after that frees everything, with no second Disconnect.
    assert ks.receive(C1, Close(h)) == []
    assert counts(ks) == base


def test_panic_of_the_connect_message_fails_the_connect() -> None:
    ks = echo_world()
    _, new = begin_connect(ks, C1, 1)
    actions = ks.receive(S1, Panic(new.msg_id, "Refuse", 3))
    assert actions == [Send(C1, Panicked(1, new.handle, "Refuse", 3, 1))]
    assert counts(ks) == ZERO


@pytest.mark.parametrize("how", ["close", "channel gone", "process died"])
def test_close_after_panic_before_disconnect_done_sends_one_disconnect(
    how: str
) -> None:
    ks = echo_world()
    h = open_session(ks)
    a = deliver(request(ks, C1, h, 1, SYNC))
    log = ks.receive(S1, Panic(a.msg_id, "MyServer", 7))
    if how == "close":
        log += ks.receive(C1, Close(h))
    elif how == "channel gone":
        log += ks.peer_gone(C1)
    else:
        log += ks.process_died(CLI.key)
    assert len(sends(log, S1, Disconnect)) == 1
    for d in sends(log, S1, Disconnect):
        ks.receive(S1, Complete(d.msg_id, 0, ()))
    assert counts(ks) == ZERO


def test_panic_of_an_abandoned_connect_removes_the_session() -> None:
    ks = echo_world()
    _, new = begin_connect(ks, C1, 1)
    ks.receive(C1, Close(new.handle))
    assert ks.receive(S1, Panic(new.msg_id, "Refuse", 3)) == []
    assert counts(ks) == ZERO
    assert ks.statistics()["sessions_abandoned"] == 0


def test_a_connect_to_a_server_ending_its_registration_says_so() -> None:
    ks = echo_world()
    handle = open_session(ks)
    ks.receive(C1, Request(5, handle, 1, (), Mode.SYNC))  # outstanding: the name is kept
    ks.receive(C1, Terminate(77, "Echo", TerminationReason.ADMINISTRATOR))
    [send] = ks.receive(C1, Connect(9, "echo", (1, 0, 0), -1, b""))
    assert send.message == Connected(9, errors.KErrServerTerminated, 0, b"", text=(
        "server 'Echo' is ending its registration (ADMINISTRATOR)"))
