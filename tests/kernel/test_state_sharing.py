"""Tests of ipcfw.kernel.state: ShareAuto, ShareProtected and Open, the 255-thread rule, and
attaching and detaching threads.

No processes, sockets, clocks or sleeps: see kernel_world.py for the fake world.
"""

from __future__ import annotations


import pytest

from ipcfw import errors
from ipcfw.kernel.state import (
    MAX_ATTACHED,
    KernelState,
    PeerMisbehaved,
    Send,
    Unwatch,
)
from ipcfw.protocol import (
    Close,
    Complete,
    Completed,
    Connected,
    Deliver,
    Disconnect,
    Mode,
    Open,
    Panic,
    Panicked,
    SessionLost,
    Share,
    Shared,
)

from kernel_world import (
    numbered_tokens,
    CHANNEL,
    SYNC,
    ASYNC,
    BLIND,
    ident,
    SRV,
    CLI,
    CLI2,
    S1,
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
    start_client,
    begin_connect,
    open_session,
    request,
    deliver,
    snapshot,
)


# -- Sharing -----------------------------------------------------------------------------------

CLI3 = ident(400)
C2B, C3 = b"chan-2b", b"chan-3"
DENIED, OVERFLOW = errors.KErrPermissionDenied, errors.KErrOverflow
TERMINATED = errors.KErrServerTerminated


TOKEN1 = b"tok-000000000001"


def sharing_world(server_sharing: int = 2) -> KernelState:
    """Server "Echo" on S1 allowing `server_sharing`; CLI with C1, C1B and IN1; CLI2 with C2, C2B
    and IN2; CLI3 with C3 and no inbox. Tokens are numbered (TOKEN1 first)."""
    state = new_state(new_token=numbered_tokens())
    start_server(state, sharing=server_sharing)
    start_client(state)
    hello(state, C1B, CHANNEL, CLI)
    start_client(state, CLI2, C2, IN2)
    hello(state, C2B, CHANNEL, CLI2)
    start_client(state, CLI3, C3, None)
    return state


def share(state: KernelState, chan: bytes, handle: int, mode: int, req_id: int = 70) -> Shared:
    """Send Share; the single action must be the Shared answer to `chan`."""
    actions = state.receive(chan, Share(req_id, handle, mode))
    assert len(actions) == 1, actions
    reply = one(actions, chan, Shared)
    assert reply.req_id == req_id
    return reply


def open_token(state: KernelState, chan: bytes, token: bytes, req_id: int = 80) -> Connected:
    """Send Open; the single action must be the Connected answer to `chan`."""
    actions = state.receive(chan, Open(req_id, token))
    assert len(actions) == 1, actions
    reply = one(actions, chan, Connected)
    assert reply.req_id == req_id and reply.payload == b""
    return reply


def stat(state: KernelState, *keys: str) -> tuple:
    stats = state.statistics()
    return tuple(stats[key] for key in keys)


def served(
    state: KernelState, chan: bytes, handle: int, req_id: int, mode: Mode = SYNC, value: int = 7
) -> None:
    """A request from `chan` reaches the server and its answer comes back to `chan`, only."""
    d = deliver(request(state, chan, handle, req_id, mode))
    assert d.handle == handle
    assert state.receive(S1, Complete(d.msg_id, value, ())) == [
        Send(chan, Completed(req_id, value, ()))
    ]


def refused_kern_exec(state: KernelState, chan: bytes, handle: int, req_id: int = 60) -> None:
    """Every mode of request on `handle` from `chan` is a KERN-EXEC 0 panic that changes nothing."""
    before = snapshot(state)
    for mode in (SYNC, ASYNC, BLIND):
        assert request(state, chan, handle, req_id, mode) == [
            Send(chan, Panicked(req_id, handle, "KERN-EXEC", 0, 0))
        ]
    assert snapshot(state) == before


def test_share_auto_lets_every_channel_of_the_process_use_the_session() -> None:
    ks = sharing_world(server_sharing=1)
    h = open_session(ks)
    refused_kern_exec(ks, C1B, h)  # unshared: the creating channel only
    assert stat(ks, "sessions_open", "attached", "tokens") == (1, 1, 0)
    assert ks.receive(C1, Share(7, h, 1)) == [Send(C1, Shared(7, errors.KErrNone, b""))]
    assert stat(ks, "sessions_open", "attached", "tokens", "messages") == (1, 1, 0, 0)
    # Another channel of the process may now send; each answer goes to the channel that asked.
    sync = deliver(request(ks, C1B, h, 8, SYNC))
    async_ = deliver(request(ks, C1B, h, 9, ASYNC))
    mine = deliver(request(ks, C1, h, 10, SYNC))
    assert stat(ks, "attached", "messages", "pool_used") == (2, 3, 1)
    assert ks.receive(S1, Complete(async_.msg_id, 2, ())) == [Send(C1B, Completed(9, 2, ()))]
    assert ks.receive(S1, Complete(mine.msg_id, 3, ())) == [Send(C1, Completed(10, 3, ()))]
    assert ks.receive(S1, Complete(sync.msg_id, 1, ())) == [Send(C1B, Completed(8, 1, ()))]
    assert stat(ks, "messages", "pool_used") == (0, 0)
    # A channel of another process is still refused, and nothing reaches the server.
    refused_kern_exec(ks, C2, h)
    refused_kern_exec(ks, C3, h)


def test_share_auto_session_outlives_its_creating_channel_and_ends_with_the_process() -> None:
    ks = sharing_world()
    h = open_session(ks)
    share(ks, C1, h, 1)
    held = deliver(request(ks, C1, h, 3, ASYNC))
    assert ks.peer_gone(C1) == []  # no Disconnect: the process holds the session
    assert stat(ks, "sessions_open", "attached", "pool_used") == (1, 0, 1)
    assert ks.receive(S1, Complete(held.msg_id, 0, ())) == []  # nobody waits for it any more
    assert stat(ks, "messages", "pool_used") == (0, 0)
    served(ks, C1B, h, 4)
    actions = ks.process_died(CLI.key)
    disconnects = sends(actions, S1, Disconnect)
    assert [d.handle for d in disconnects] == [h]  # exactly once
    assert len(sends(actions)) == 1 and actions[-1] == Unwatch(CLI.key)
    assert stat(ks, "sessions_closing", "attached", "processes") == (1, 0, 3)
    assert ks.receive(S1, Complete(disconnects[0].msg_id, 0, ())) == []
    assert stat(ks, "sessions", "messages", "tokens") == (0, 0, 0)


def test_share_protected_token_lets_another_process_open_the_session() -> None:
    ks = sharing_world()
    h = open_session(ks)
    assert ks.receive(C1, Share(7, h, 2)) == [Send(C1, Shared(7, errors.KErrNone, TOKEN1))]
    assert stat(ks, "tokens", "attached") == (1, 1)
    # Asking again, from any channel of the process, gives the same token; ShareAuto adds nothing.
    assert share(ks, C1, h, 2, req_id=8) == Shared(8, errors.KErrNone, TOKEN1)
    assert share(ks, C1B, h, 2, req_id=9) == Shared(9, errors.KErrNone, TOKEN1)
    assert share(ks, C1B, h, 1, req_id=10) == Shared(10, errors.KErrNone, b"")
    assert stat(ks, "tokens", "attached") == (1, 1)
    assert ks.sessions[h].sharing == 2
    # Before Open, the other process is a stranger to the handle.
    refused_kern_exec(ks, C2, h)
    assert ks.receive(C2, Open(11, TOKEN1)) == [Send(C2, Connected(11, errors.KErrNone, h, b""))]
    assert stat(ks, "sessions", "attached", "tokens", "messages") == (1, 2, 1, 0)
    # Then every channel of that process may send, and gets its own answers.
    served(ks, C2, h, 12)
    served(ks, C2B, h, 13, ASYNC)
    served(ks, C1, h, 14)
    assert stat(ks, "attached", "messages", "pool_used") == (3, 0, 0)
    refused_kern_exec(ks, C3, h)  # a process that did not Open is still a stranger


@pytest.mark.parametrize("token", [b"", b"nope", TOKEN1, b"tok-000000000002", b"\0" * 64])
def test_open_with_an_unknown_token_is_permission_denied_and_changes_nothing(token: bytes) -> None:
    ks = sharing_world()
    h = open_session(ks)
    if token != TOKEN1:
        share(ks, C1, h, 2)  # a real token exists, but it is not this one
    before = snapshot(ks)
    assert ks.receive(C2, Open(11, token)) == [Send(C2, Connected(11, DENIED, 0, b""))]
    assert snapshot(ks) == before
    refused_kern_exec(ks, C2, h)


@pytest.mark.parametrize(("server_sharing", "mode", "code"), [
    (0, 1, DENIED), (0, 2, DENIED), (1, 2, DENIED),
    (1, 1, errors.KErrNone), (2, 1, errors.KErrNone), (2, 2, errors.KErrNone),
])
def test_share_is_bounded_by_the_servers_sharing(server_sharing: int, mode: int, code: int) -> None:
    ks = sharing_world(server_sharing)
    h = open_session(ks)
    before = snapshot(ks)
    reply = share(ks, C1, h, mode, req_id=5)
    if code:
        assert reply == Shared(5, code, b"")
        assert snapshot(ks) == before
        refused_kern_exec(ks, C1B, h)  # still unshared
    else:
        assert reply == Shared(5, errors.KErrNone, TOKEN1 if mode == 2 else b"")
        assert stat(ks, "tokens") == (int(mode == 2),)
        served(ks, C1B, h, 6)


def test_share_auto_after_a_refused_share_protected() -> None:
    ks = sharing_world(server_sharing=1)
    h = open_session(ks)
    assert share(ks, C1, h, 2, req_id=5) == Shared(5, DENIED, b"")
    refused_kern_exec(ks, C1B, h)
    assert share(ks, C1, h, 1, req_id=6) == Shared(6, errors.KErrNone, b"")
    served(ks, C1B, h, 7)
    # still refused, from any channel
    assert share(ks, C1B, h, 2, req_id=8) == Shared(8, DENIED, b"")
    assert stat(ks, "tokens") == (0,)


def test_share_of_a_handle_not_held_is_a_kern_exec_panic_and_changes_nothing() -> None:
    ks = sharing_world()
    unshared = open_session(ks)
    auto = open_session(ks, req_id=2)
    share(ks, C1, auto, 1)
    before = snapshot(ks)
    cases = [
        (C1, 999),  # no such handle
        (C1B, unshared),  # another channel of the creating process, before ShareAuto
        (C2, unshared),  # another process
        (C2, auto),  # ShareAuto is this process only
        (C3, auto),
    ]
    for rid, handle in cases:
        for mode in (1, 2):
            actions = ks.receive(rid, Share(9, handle, mode))
            assert actions == [Send(rid, Panicked(9, handle, "KERN-EXEC", 0, 0))]
    assert snapshot(ks) == before


@pytest.mark.parametrize("rid", [S1, IN1])
def test_share_and_open_from_a_non_channel_raise_and_change_nothing(rid: bytes) -> None:
    ks = sharing_world()
    h = open_session(ks)
    token = share(ks, C1, h, 2).token
    before = snapshot(ks)
    for message in (Share(9, h, 1), Share(9, h, 2), Open(9, token)):
        with pytest.raises(PeerMisbehaved) as info:
            ks.receive(rid, message)
        assert info.value.kind == "wrong role"
    assert snapshot(ks) == before


def test_close_of_a_shared_handle_not_held_raises_and_changes_nothing() -> None:
    ks = sharing_world()
    h = open_session(ks)
    token = share(ks, C1, h, 2).token
    open_token(ks, C2, token)
    before = snapshot(ks)
    for rid in (C3, S1):  # a process that never opened it; a server
        with pytest.raises(PeerMisbehaved):
            ks.receive(rid, Close(h))
    assert snapshot(ks) == before
    # A process that has let go of its only handle does not hold it any more.
    assert ks.receive(C2, Close(h)) == []
    before = snapshot(ks)
    for rid in (C2, C2B):
        with pytest.raises(PeerMisbehaved) as info:
            ks.receive(rid, Close(h))
        assert info.value.kind == "close of a handle not held"
    assert snapshot(ks) == before
    refused_kern_exec(ks, C2B, h)


def test_protected_session_lives_until_its_last_holder_process_closes() -> None:
    ks = sharing_world()
    h = open_session(ks)
    token = share(ks, C1, h, 2).token
    assert open_token(ks, C2, token, req_id=10) == Connected(10, errors.KErrNone, h, b"")
    # CLI2 twice
    assert open_token(ks, C2B, token, req_id=11) == Connected(11, errors.KErrNone, h, b"")
    assert ks.sessions[h].holders[ks.processes[CLI2.key]] == 2
    # The first process lets go: no Disconnect; its channels are strangers now.
    assert ks.receive(C1, Close(h)) == []
    assert stat(ks, "sessions_open", "attached", "tokens") == (1, 2, 1)
    refused_kern_exec(ks, C1B, h)
    # The second process opened twice: its first Close is not its last.
    assert ks.receive(C2, Close(h)) == []
    assert stat(ks, "sessions_open", "attached") == (1, 2)
    served(ks, C2B, h, 12)
    served(ks, C2, h, 13)
    actions = ks.receive(C2B, Close(h))
    (disconnect,) = sends(actions)
    assert actions == [Send(S1, Disconnect(disconnect.msg_id, h))]
    assert stat(ks, "sessions_closing", "attached") == (1, 0)
    refused_kern_exec(ks, C2, h)
    # A closing session can no longer be opened.
    assert open_token(ks, C3, token, req_id=14) == Connected(14, DENIED, 0, b"")
    assert ks.receive(S1, Complete(disconnect.msg_id, 0, ())) == []
    assert stat(ks, "sessions", "tokens", "attached", "messages") == (0, 0, 0, 0)
    # After removal the token is gone for good.
    before = snapshot(ks)
    assert open_token(ks, C1, token, req_id=15) == Connected(15, DENIED, 0, b"")
    assert snapshot(ks) == before


def test_a_process_that_let_go_may_open_again_while_another_holds() -> None:
    ks = sharing_world()
    h = open_session(ks)
    token = share(ks, C1, h, 2).token
    open_token(ks, C2, token)
    assert ks.receive(C1, Close(h)) == []
    refused_kern_exec(ks, C1, h)
    assert open_token(ks, C1B, token, req_id=90) == Connected(90, errors.KErrNone, h, b"")
    served(ks, C1, h, 91)  # any channel of the process again
    assert ks.receive(C2, Close(h)) == []
    assert len(sends(ks.receive(C1, Close(h)), S1, Disconnect)) == 1


def test_process_death_releases_every_open_of_a_shared_session_at_once() -> None:
    ks = sharing_world()
    h = open_session(ks)
    token = share(ks, C1, h, 2).token
    for req_id in (10, 11, 12):
        open_token(ks, C2, token, req_id=req_id)
    actions = ks.process_died(CLI2.key)
    assert sends(actions) == []  # CLI still holds it
    assert actions == [Unwatch(CLI2.key)]
    assert stat(ks, "sessions_open", "attached") == (1, 1)
    actions = ks.process_died(CLI.key)
    assert [d.handle for d in sends(actions, S1, Disconnect)] == [h]
    assert len(sends(actions)) == 1


def _attach_full(ks: KernelState, h: int) -> list:
    """Attach MAX_ATTACHED channels to `h`: C1 (the creator), 200 more of CLI, C2 by Open and 53
    more of CLI2 by requests (each completed). Returns the attached channels' routing ids."""
    attached = [C1]
    for i in range(200):
        rid = b"cli-chan-%d" % i
        hello(ks, rid, CHANNEL, CLI)
        served(ks, rid, h, 1000 + i)
        attached.append(rid)
    open_token(ks, C2, TOKEN1)
    attached.append(C2)
    for i in range(MAX_ATTACHED - 202):
        rid = b"cli2-chan-%d" % i
        hello(ks, rid, CHANNEL, CLI2)
        served(ks, rid, h, 2000 + i)
        attached.append(rid)
    assert len(attached) == MAX_ATTACHED == 255
    assert stat(ks, "attached", "messages") == (MAX_ATTACHED, 0)
    return attached


def test_the_256th_channel_gets_overflow_and_the_255_are_unaffected() -> None:
    ks = sharing_world()
    h = open_session(ks)
    assert share(ks, C1, h, 2).token == TOKEN1
    attached = _attach_full(ks, h)
    before = snapshot(ks)
    # The 256th: a channel of a holder process, in every mode; nothing reaches the server.
    for rid in (C1B, C2B):
        for mode in (SYNC, ASYNC, BLIND):
            assert request(ks, rid, h, 3000, mode) == [Send(rid, Completed(3000, OVERFLOW, ()))]
    # Open by a 256th channel: refused, and its process does not become a holder.
    assert open_token(ks, C3, TOKEN1, req_id=3001) == Connected(3001, OVERFLOW, 0, b"")
    assert snapshot(ks) == before
    assert ks.processes[CLI3.key] not in ks.sessions[h].holders
    refused_kern_exec(ks, C3, h)
    # An attached channel opening again only counts one more open.
    assert open_token(ks, C2, TOKEN1, req_id=3002) == Connected(3002, errors.KErrNone, h, b"")
    assert ks.sessions[h].holders[ks.processes[CLI2.key]] == 2
    # The 255 are served as before, async and blind too.
    log = []
    for i, rid in enumerate(attached):
        log += request(ks, rid, h, 4000 + i, (SYNC, ASYNC, BLIND)[i % 3])
    delivered = sends(log, S1, Deliver)
    assert len(delivered) == MAX_ATTACHED
    assert [
        a.rid for a in log if type(a) is Send and type(a.message) is Completed
    ] == attached[2::3]
    for d in delivered:
        ks.receive(S1, Complete(d.msg_id, 0, ()))
    assert stat(ks, "messages", "pool_used") == (0, 0)
    # One attached channel goes away: a new one can attach.
    assert ks.peer_gone(attached[1]) == []
    assert stat(ks, "attached") == (MAX_ATTACHED - 1,)
    served(ks, C1B, h, 5000)
    assert stat(ks, "attached") == (MAX_ATTACHED,)
    assert request(ks, C2B, h, 5001) == [Send(C2B, Completed(5001, OVERFLOW, ()))]
    # Another one goes: the stranger can now Open and become a holder.
    ks.peer_gone(attached[2])
    assert open_token(ks, C3, TOKEN1, req_id=5002) == Connected(5002, errors.KErrNone, h, b"")
    assert ks.processes[CLI3.key] in ks.sessions[h].holders
    served(ks, C3, h, 5003)


def test_a_request_refused_before_delivery_does_not_attach_its_channel() -> None:
    ks = sharing_world()
    h = open_session(ks, slots=1)
    share(ks, C1, h, 1)
    held = deliver(request(ks, C1, h, 1, ASYNC))  # takes the one slot
    assert stat(ks, "attached") == (1,)
    assert request(ks, C1B, h, 2, ASYNC) == [Send(C1B, Completed(2, errors.KErrServerBusy, ()))]
    assert stat(ks, "attached") == (1,)  # refused: C1B holds no place among the 255
    served(ks, C1B, h, 3)  # a request that is delivered attaches it
    assert stat(ks, "attached") == (2,)
    ks.receive(S1, Complete(held.msg_id, 0, ()))


def test_a_gone_channel_of_a_shared_session_gets_no_answers_others_do() -> None:
    ks = sharing_world()
    h = open_session(ks, slots=4)
    token = share(ks, C1, h, 2).token
    open_token(ks, C2, token)
    mine = deliver(request(ks, C1B, h, 1, ASYNC))
    mine_sync = deliver(request(ks, C1B, h, 2, SYNC))
    theirs = deliver(request(ks, C2, h, 3, ASYNC))
    creator = deliver(request(ks, C1, h, 4, SYNC))
    assert ks.sessions[h].slots_used == 2
    assert ks.peer_gone(C1B) == []
    assert stat(ks, "attached", "sessions_open", "messages") == (2, 1, 4)
    assert ks.receive(S1, Complete(mine.msg_id, 0, ())) == []
    assert ks.receive(S1, Complete(mine_sync.msg_id, 0, ())) == []
    assert ks.receive(S1, Complete(theirs.msg_id, 5, ())) == [Send(C2, Completed(3, 5, ()))]
    assert ks.receive(S1, Complete(creator.msg_id, 6, ())) == [Send(C1, Completed(4, 6, ()))]
    assert ks.sessions[h].slots_used == 0 and stat(ks, "messages") == (0,)


def test_a_process_letting_go_answers_its_pending_requests_only() -> None:
    ks = sharing_world()
    h = open_session(ks)
    token = share(ks, C1, h, 2).token
    open_token(ks, C2, token)
    mine = deliver(request(ks, C2B, h, 1, ASYNC))
    theirs = deliver(request(ks, C1, h, 2, ASYNC))
    # CLI2's requests are answered KErrSessionClosed at once (one may have crossed the Close on
    # another of its threads' sockets); CLI1's stay with the server.
    assert ks.receive(C2, Close(h)) == [Send(C2B, Completed(1, errors.KErrSessionClosed, ()))]
    assert stat(ks, "attached") == (1,)
    assert ks.receive(S1, Complete(mine.msg_id, 0, ())) == []
    assert ks.receive(S1, Complete(theirs.msg_id, 1, ())) == [Send(C1, Completed(2, 1, ()))]
    assert stat(ks, "messages", "pool_used") == (0, 0)


@pytest.mark.parametrize("how", ["peer_gone", "process_died"])
def test_server_death_tells_every_holder_process_once(how: str) -> None:
    ks = sharing_world()
    h = open_session(ks)
    token = share(ks, C1, h, 2).token
    open_token(ks, C2, token, req_id=10)
    open_token(ks, C2B, token, req_id=11)  # CLI2 holds it twice: still told once
    open_token(ks, C3, token, req_id=12)  # CLI3 has no inbox: nothing to tell
    request(ks, C1B, h, 20, ASYNC)
    request(ks, C2B, h, 21, SYNC)
    request(ks, C3, h, 22, ASYNC)
    actions = ks.peer_gone(S1) if how == "peer_gone" else ks.process_died(SRV.key)
    assert sends(actions, IN1) == [SessionLost(h, TERMINATED)]
    assert sends(actions, IN2) == [SessionLost(h, TERMINATED)]
    assert sends(actions, C1B) == [Completed(20, TERMINATED, ())]
    assert sends(actions, C2B) == [Completed(21, TERMINATED, ())]
    assert sends(actions, C3) == [Completed(22, TERMINATED, ())]
    assert set(targets(actions)) == {IN1, IN2, C1B, C2B, C3}
    assert stat(ks, "sessions_dead", "messages", "pool_used", "tokens") == (1, 0, 0, 1)
    # Later use by any holder fails at once; so do Open and Share.
    for req_id, rid in enumerate((C1, C2, C3), 30):
        assert request(ks, rid, h, req_id) == [Send(rid, Completed(req_id, TERMINATED, ()))]
    before = snapshot(ks)
    assert open_token(ks, C1, token, req_id=40) == Connected(40, TERMINATED, 0, b"")
    assert share(ks, C2, h, 2, req_id=41) == Shared(41, TERMINATED, b"")
    assert snapshot(ks) == before
    # Each holder closes; the last close removes it, with no Disconnect to anyone.
    assert ks.receive(C1, Close(h)) == []
    assert ks.receive(C2, Close(h)) == []
    assert ks.receive(C3, Close(h)) == []
    assert stat(ks, "sessions", "tokens") == (1, 1)
    assert ks.receive(C2B, Close(h)) == []
    assert stat(ks, "sessions", "tokens", "attached") == (0, 0, 0)


def test_server_panic_of_a_shared_session_reaches_every_holder_on_use() -> None:
    ks = sharing_world()
    h = open_session(ks)
    token = share(ks, C1, h, 2).token
    open_token(ks, C2, token)
    pending = deliver(request(ks, C2, h, 1, ASYNC))
    culprit = deliver(request(ks, C1, h, 2))
    actions = ks.receive(S1, Panic(culprit.msg_id, "Bad", 4))
    assert sends(actions, C1) == [Panicked(2, h, "Bad", 4, 1)]
    assert sends(actions, C2) == [Panicked(1, h, "Bad", 4, 1)]
    disconnect = one(actions, S1, Disconnect)
    assert ks.receive(S1, Complete(pending.msg_id, 0, ())) == []  # already answered
    assert request(ks, C2B, h, 3) == [Send(C2B, Panicked(3, h, "Bad", 4, 1))]
    assert ks.receive(C1, Close(h)) == []
    assert ks.receive(C2, Close(h)) == []  # one Disconnect in all
    assert stat(ks, "sessions_closing") == (1,)
    ks.receive(S1, Complete(disconnect.msg_id, 0, ()))
    assert stat(ks, "sessions", "tokens") == (0, 0)


@pytest.mark.parametrize("ending", ["accepted", "rejected", "panicked", "server died"])
def test_a_session_cannot_be_shared_while_connecting(ending: str) -> None:
    # Regression: Share used to be accepted on a CONNECTING session, so another process could
    # Open it and be told Connected(0, handle); if the connect then failed, the session was
    # removed without a SessionLost to that process, whose later requests got KERN-EXEC 0.
    ks = sharing_world()
    _, new = begin_connect(ks, C1, 1)
    h = new.handle
    before = snapshot(ks)
    for mode in (1, 2):  # a client that pipelines Share after its Connect
        assert share(ks, C1, h, mode, req_id=2) == Shared(2, errors.KErrNotReady, b"")
    assert snapshot(ks) == before
    refused_kern_exec(ks, C1B, h)
    if ending == "accepted":
        actions = ks.receive(S1, Complete(new.msg_id, errors.KErrNone, ()))
        assert actions == [Send(C1, Connected(1, errors.KErrNone, h, b""))]
        assert share(ks, C1, h, 2, req_id=3) == Shared(3, errors.KErrNone, TOKEN1)
        assert open_token(ks, C2, TOKEN1, req_id=4) == Connected(4, errors.KErrNone, h, b"")
        return
    if ending == "rejected":
        actions = ks.receive(S1, Complete(new.msg_id, errors.KErrNotSupported, ()))
    elif ending == "panicked":
        actions = ks.receive(S1, Panic(new.msg_id, "Refuse", 3))
    else:
        actions = ks.peer_gone(S1)
    assert [a.rid for a in actions if type(a) is Send] == [C1]  # the connect's failure, only
    assert stat(ks, "sessions", "tokens", "attached") == (0, 0, 0)
