"""Tests of ipcfw.kernel.state: the kernel's side of the direct data path.

The kernel grants the direct path at Connect: a one-time ticket goes to the server first (in
NewSession, with the session's slots), then, once the server accepts, to the client (in
Connected, with the server's socket). Everything else stays the kernel's: the session, its
holders, its end. No processes: see kernel_world.py for the fake world.
"""

from __future__ import annotations

import pytest

from ipcfw import errors
from ipcfw.kernel.state import KernelState, PeerMisbehaved, RemoveSocket, Send, SessionState
from ipcfw.protocol import (
    Complete,
    Completed,
    Connect,
    Connected,
    Deliver,
    Deregister,
    Disconnect,
    Mode,
    Negotiated,
    NewSession,
    Panicked,
    Path,
    Register,
    SessionPanicked,
    Terminate,
    Terminating,
    TerminationReason,
)
from kernel_world import (
    C1,
    S1,
    S2,
    SERVER,
    SRV,
    SRV2,
    hello,
    new_state,
    numbered_tokens,
    one,
    request,
    sends,
    start_client,
    start_server,
)

SOCKET = "/run/ipcfw-test/d-0123456789ab"
TICKETS = [b"tok-000000000001", b"tok-000000000002"]  # (numbered_tokens)


def direct_world() -> KernelState:
    """A kernel with "Echo" on S1 taking direct connections at SOCKET, "Plain" on S2 taking
    none, and a client (CLI) with C1 and IN1; tickets are numbered."""
    state = new_state(new_token=numbered_tokens())
    hello(state, S1, SERVER, SRV)
    assert state.receive(S1, Register(900, "Echo", 0, (1, 0, 0), SOCKET)) == [
        Send(S1, Completed(900, errors.KErrNone, ()))
    ]
    start_server(state, S2, SRV2, "Plain")
    start_client(state)
    return state


def connect(state: KernelState, name: str = "Echo", path: Path = Path.DIRECT,
            slots: int = 4, req_id: int = 1) -> NewSession:
    actions = state.receive(C1, Connect(req_id, name, (1, 0, 0), slots, b"hi", (), path))
    return sends(actions, cls=NewSession)[0]


def test_a_direct_connect_gives_the_ticket_to_the_server_first_then_to_the_client() -> None:
    state = direct_world()
    new = connect(state)
    assert (new.ticket, new.slots) == (TICKETS[0], 4)
    assert state.statistics()["sessions_direct"] == 1
    actions = state.receive(S1, Negotiated(new.msg_id, errors.KErrNone, b"reply"))
    assert actions == [
        Send(C1, Connected(1, errors.KErrNone, new.handle, b"reply", SOCKET, TICKETS[0]))
    ]


def test_each_session_gets_its_own_ticket_and_the_client_learns_it_once() -> None:
    state = direct_world()
    first, second = connect(state, req_id=1), connect(state, req_id=2)
    assert {first.ticket, second.ticket} == set(TICKETS)
    state.receive(S1, Complete(first.msg_id, errors.KErrNone, ()))
    assert state.sessions[first.handle].ticket == b""  # (kept no longer than needed)


@pytest.mark.parametrize("name, path", [("Echo", Path.KERNEL), ("Plain", Path.DIRECT)])
def test_the_kernel_path_when_asked_for_or_when_the_server_takes_no_direct_connections(
    name: str, path: Path
) -> None:
    state = direct_world()
    new = connect(state, name, path)
    assert new.ticket == b""
    server = S1 if name == "Echo" else S2
    actions = state.receive(server, Complete(new.msg_id, errors.KErrNone, ()))
    assert actions == [Send(C1, Connected(1, errors.KErrNone, new.handle, b""))]
    assert state.statistics()["sessions_direct"] == 0


def test_a_refused_direct_connect_gives_the_client_no_ticket() -> None:
    state = direct_world()
    new = connect(state)
    actions = state.receive(S1, Complete(new.msg_id, errors.KErrPermissionDenied, ()))
    assert actions == [Send(C1, Connected(1, errors.KErrPermissionDenied, 0, b""))]
    assert state.statistics()["sessions"] == 0 and state.statistics()["sessions_direct"] == 0


def test_a_direct_session_still_takes_requests_through_the_kernel() -> None:
    # Other threads of a shared session, other processes after Open, and a client that could
    # not make its direct connection all use the kernel path.
    state = direct_world()
    new = connect(state)
    state.receive(S1, Complete(new.msg_id, errors.KErrNone, ()))
    delivered = one(request(state, C1, new.handle, 7, function=3, args=(5,)), S1, Deliver)
    assert (delivered.handle, delivered.function, delivered.args) == (new.handle, 3, (5,))


def test_a_server_registered_without_a_socket_takes_none() -> None:
    state = direct_world()
    assert state.servers["plain"].direct == "" and state.servers["echo"].direct == SOCKET


def _open_direct(state: KernelState) -> int:
    new = connect(state)
    state.receive(S1, Complete(new.msg_id, errors.KErrNone, ()))
    return new.handle


def test_a_panic_on_the_direct_path_ends_the_session_as_one_through_the_kernel() -> None:
    state = direct_world()
    handle = _open_direct(state)
    waiting = request(state, C1, handle, 7, mode=Mode.ASYNC)  # through the kernel meanwhile
    waiting_msg = one(waiting, S1, Deliver).msg_id
    actions = state.receive(S1, SessionPanicked(handle, "PROBE", 3))
    assert Send(C1, Panicked(7, handle, "PROBE", 3, 1)) in actions
    disconnect = one(actions, S1, Disconnect)
    assert disconnect.handle == handle and state.sessions[handle].state is SessionState.PANICKED
    assert state.messages[waiting_msg].reply_to is None  # answered (freed when the server ends it)
    # Later requests through the kernel learn it too; a second notice changes nothing.
    assert request(state, C1, handle, 8) == [Send(C1, Panicked(8, handle, "PROBE", 3, 1))]
    assert state.receive(S1, SessionPanicked(handle, "PROBE", 3)) == []


def test_a_server_cannot_panic_another_servers_session() -> None:
    state = direct_world()
    handle = _open_direct(state)
    with pytest.raises(PeerMisbehaved):
        state.receive(S2, SessionPanicked(handle, "X", 1))
    assert state.sessions[handle].state is SessionState.OPEN


def test_a_termination_of_a_server_taking_direct_connections_ends_when_it_deregisters() -> None:
    # The kernel cannot see the requests it serves on direct connections: it deregisters once
    # they have ended, and only then is the name released.
    state = direct_world()
    actions = state.receive(C1, Terminate(77, "Echo", TerminationReason.ADMINISTRATOR))
    assert sends(actions, S1) == [Terminating(TerminationReason.ADMINISTRATOR)]
    assert sends(actions, C1) == []
    assert "echo" in state.servers
    released = state.receive(S1, Deregister(5))
    assert one(released, C1, Completed).req_id == 77
    assert one(released, S1, Completed).req_id == 5
    assert "echo" not in state.servers
    assert RemoveSocket(SOCKET) in released  # (a killed server could not remove it itself)


def test_a_termination_of_a_server_taking_none_ends_once_drained() -> None:
    state = direct_world()
    actions = state.receive(C1, Terminate(78, "Plain", TerminationReason.ADMINISTRATOR))
    assert one(actions, C1, Completed).req_id == 78
    assert "plain" not in state.servers
    assert not any(isinstance(action, RemoveSocket) for action in actions)  # it has none
