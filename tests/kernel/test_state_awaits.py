"""Tests of ipcfw.kernel.state's waits for a server name (rule 13: `AwaitServer`), fed as
messages and checked on actions. No processes, sockets, clocks or sleeps (kernel_world.py)."""

from __future__ import annotations

import pytest

from ipcfw import errors
from ipcfw.kernel.state import MAX_AWAITS, KernelState, PeerMisbehaved
from ipcfw.protocol import AwaitServer, Cancel, Completed, Register, Terminate

from kernel_world import (
    C1,
    C1B,
    C2,
    CHANNEL,
    CLI,
    CLI2,
    S1,
    S2,
    SERVER,
    SRV,
    SRV2,
    ASYNC,
    hello,
    new_state,
    one,
    open_session,
    request,
    sends,
    start_client,
    start_server,
)


def waiting_world() -> KernelState:
    """A kernel with two client processes (channels C1 and C2) and no server yet."""
    state = new_state()
    start_client(state)
    start_client(state, CLI2, C2, None)
    return state


def register_echo(state: KernelState, rid: bytes = S1, name: str = "Echo") -> list:
    """Server `rid` registers `name`; the actions."""
    hello(state, rid, SERVER, SRV if rid == S1 else SRV2)
    return state.receive(rid, Register(900, name, 0, (1, 0, 0)))


def test_a_wait_for_a_registered_name_is_answered_at_once() -> None:
    state = waiting_world()
    start_server(state, name="Echo")
    actions = state.receive(C1, AwaitServer(7, "ECHO"))  # looked up case-insensitively
    assert actions and sends(actions) == [Completed(7, errors.KErrNone, ())]
    assert state.statistics()["awaits"] == 0


def test_waits_are_answered_when_the_name_registers_and_not_before() -> None:
    state = waiting_world()
    assert state.receive(C1, AwaitServer(1, "echo")) == []
    assert state.receive(C2, AwaitServer(5, "Echo")) == []
    assert state.receive(C1, AwaitServer(2, "other")) == []
    assert state.statistics()["awaits"] == 3
    start_server(state, S2, SRV2, name="unrelated")
    assert state.statistics()["awaits"] == 3
    actions = register_echo(state)
    assert actions[0].rid == S1  # the server hears of its registration first
    assert one(actions, S1, Completed).value == errors.KErrNone
    assert sends(actions, C1) == [Completed(1, errors.KErrNone, ())]
    assert sends(actions, C2) == [Completed(5, errors.KErrNone, ())]
    assert state.statistics()["awaits"] == 1  # "other" still waits
    assert state.peers[C1].awaits == {2: "other"}


def test_a_wait_while_the_name_terminates_waits_for_the_next_registration() -> None:
    state = waiting_world()
    start_server(state, name="Echo")
    handle = open_session(state, C1, S1, "Echo")
    request(state, C1, handle, 10, ASYNC)  # outstanding: the termination waits for it
    state.receive(C2, Terminate(3, "Echo", 3))
    assert state.servers["echo"].terminating is not None
    assert state.receive(C2, AwaitServer(4, "echo")) == []  # not the ending registration
    state.peer_gone(S1)  # it ends
    assert state.statistics()["awaits"] == 1
    actions = register_echo(state, S2)
    assert sends(actions, C2) == [Completed(4, errors.KErrNone, ())]


def test_a_bad_name_is_refused_with_bad_name() -> None:
    state = waiting_world()
    for name in ("", "a*b", "x" * 81, "a:b"):
        actions = state.receive(C1, AwaitServer(1, name))
        assert one(actions, C1, Completed).value == errors.KErrBadName, name
    assert state.statistics()["awaits"] == 0


def test_waits_per_channel_are_bounded_and_others_are_unaffected() -> None:
    state = waiting_world()
    for req_id in range(1, MAX_AWAITS + 1):
        assert state.receive(C1, AwaitServer(req_id, "echo")) == []
    actions = state.receive(C1, AwaitServer(99, "echo"))
    assert sends(actions) == [Completed(99, errors.KErrOverflow, ())]
    assert state.receive(C2, AwaitServer(1, "echo")) == []  # another channel still may
    assert state.statistics()["awaits"] == MAX_AWAITS + 1
    actions = register_echo(state)
    assert len(sends(actions, C1)) == MAX_AWAITS and len(sends(actions, C2)) == 1
    assert state.statistics()["awaits"] == 0


def test_cancel_ends_a_wait_with_kerrcancel_once() -> None:
    state = waiting_world()
    state.receive(C1, AwaitServer(1, "echo"))
    state.receive(C1, AwaitServer(2, "echo"))
    assert sends(state.receive(C1, Cancel(1))) == [Completed(1, errors.KErrCancel, ())]
    assert state.receive(C1, Cancel(1)) == []  # twice, or crossing the answer: nothing
    assert state.receive(C2, Cancel(2)) == []  # another channel's req_id 2 is not C1's
    assert sends(register_echo(state), C1) == [Completed(2, errors.KErrNone, ())]
    assert state.receive(C1, Cancel(2)) == []
    assert state.awaits == {}


def test_a_channel_that_goes_takes_its_waits_with_it() -> None:
    state = waiting_world()
    hello(state, C1B, CHANNEL, CLI)
    state.receive(C1, AwaitServer(1, "echo"))
    state.receive(C1B, AwaitServer(1, "echo"))
    state.peer_gone(C1)
    assert state.statistics()["awaits"] == 1
    actions = register_echo(state)
    assert sends(actions, C1B) == [Completed(1, errors.KErrNone, ())]
    assert C1 not in [a.rid for a in actions]
    state.receive(C2, AwaitServer(4, "late"))
    state.peer_dropped(C2, 10)  # a channel the loop stops serving, too
    assert state.awaits == {} and state.statistics()["awaits"] == 0


def test_a_reused_req_id_or_a_server_peer_is_refused_and_nothing_changes() -> None:
    state = waiting_world()
    state.receive(C1, AwaitServer(1, "echo"))
    with pytest.raises(PeerMisbehaved, match="reused req_id 1"):
        state.receive(C1, AwaitServer(1, "other"))
    assert state.peers[C1].awaits == {1: "echo"} and list(state.awaits) == ["echo"]
    start_server(state, S2, SRV2, name="srv")
    with pytest.raises(PeerMisbehaved, match="wrong role"):
        state.receive(S2, AwaitServer(2, "echo"))
    assert state.statistics()["awaits"] == 1
