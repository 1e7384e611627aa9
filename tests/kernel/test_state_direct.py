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
    SESSIONS_PAGE,
    Admit,
    Census,
    CensusReply,
    Join,
    ListSessions,
    Open,
    PeerInfo,
    SessionList,
    SessionRow,
    Share,
    Shared,
    pack_census,
    CensusItem,
    unpack_session_rows,
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
    C1B,
    C2,
    CHANNEL,
    CLI,
    CLI2,
    IN2,
    targets,
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


# -- every thread and process of a shared direct session (Join, Admit) -------------------------


def shared_direct_world() -> tuple[KernelState, int]:
    """As `direct_world`, "Echo" allowing every sharing mode, a second channel (C1B) of the
    client, and a second client process (CLI2: C2, IN2); returns the state and the handle of
    an open direct session created by C1 and shared with ShareProtected (token TICKETS[1])."""
    state = new_state(new_token=numbered_tokens())
    hello(state, S1, SERVER, SRV)
    state.receive(S1, Register(900, "Echo", 2, (1, 0, 0), SOCKET))
    start_client(state)
    hello(state, C1B, CHANNEL, CLI)
    start_client(state, CLI2, C2, IN2)
    handle = _open_direct(state)
    assert state.receive(C1, Share(2, handle, 2)) == [
        Send(C1, Shared(2, errors.KErrNone, TICKETS[1]))
    ]
    return state, handle


def join(state: KernelState, chan: bytes, handle: int, req_id: int = 30) -> list:
    return state.receive(chan, Join(req_id, handle))


def test_another_thread_gets_its_own_ticket_once_the_server_holds_it() -> None:
    state, handle = shared_direct_world()
    actions = join(state, C1B, handle)
    admit = one(actions, S1, Admit)  # the server first; the thread nothing yet
    assert sends(actions, C1B) == []
    assert (admit.handle, admit.ticket) == (handle, b"tok-000000000003")
    assert C1B in state.sessions[handle].attached  # attached on first use, as by a request
    assert state.receive(S1, Complete(admit.msg_id, errors.KErrNone, ())) == [
        Send(C1B, Connected(30, errors.KErrNone, handle, b"", SOCKET, admit.ticket))
    ]
    assert state.statistics()["admitted"] == 1 and state.statistics()["messages"] == 0


def test_another_process_opens_a_direct_session_and_its_thread_joins() -> None:
    state, handle = shared_direct_world()
    # Open names the server's socket, with no ticket: each thread asks for its own.
    assert state.receive(C2, Open(5, TICKETS[1])) == [
        Send(C2, Connected(5, errors.KErrNone, handle, b"", SOCKET))
    ]
    actions = join(state, C2, handle)
    info = one(actions, S1, PeerInfo)  # the server learns who may present the ticket
    admit = one(actions, S1, Admit)
    assert info.pid == CLI2.pid and admit.client == info.client
    assert targets(actions) == [S1, S1]  # (PeerInfo before Admit)
    reply = one(state.receive(S1, Complete(admit.msg_id, errors.KErrNone, ())), C2, Connected)
    assert (reply.direct, reply.ticket) == (SOCKET, admit.ticket)


def test_a_server_refusing_the_ticket_leaves_the_thread_on_the_kernel_path() -> None:
    state, handle = shared_direct_world()
    admit = one(join(state, C1B, handle), S1, Admit)
    assert state.receive(S1, Complete(admit.msg_id, errors.KErrNotSupported, ())) == [
        Send(C1B, Connected(30, errors.KErrNone, handle, b""))
    ]
    assert C1B in state.sessions[handle].attached and state.statistics()["admitted"] == 0


def test_a_join_needs_a_held_handle_and_a_free_place_among_the_255() -> None:
    state, handle = shared_direct_world()
    # C2's process has not opened it: KERN-EXEC 0, nothing reaches the server
    assert join(state, C2, handle) == [Send(C2, Panicked(30, handle, "KERN-EXEC", 0, 0))]
    session = state.sessions[handle]
    session.attached.update(b"other-%03d" % i for i in range(254))  # 255 with C1
    assert join(state, C1B, handle) == [Send(C1B, Connected(30, errors.KErrOverflow, 0, b""))]


def test_an_unshared_direct_session_cannot_be_joined_by_another_thread() -> None:
    state = direct_world()
    handle = _open_direct(state)
    hello(state, C1B, CHANNEL, CLI)
    assert join(state, C1B, handle) == [Send(C1B, Panicked(30, handle, "KERN-EXEC", 0, 0))]


def test_a_join_of_a_kernel_path_session_attaches_without_a_ticket() -> None:
    state = direct_world()
    new = connect(state, path=Path.KERNEL)
    state.receive(S1, Complete(new.msg_id, errors.KErrNone, ()))
    assert join(state, C1, new.handle) == [
        Send(C1, Connected(30, errors.KErrNone, new.handle, b""))
    ]


def test_a_session_ending_while_the_server_takes_the_ticket_answers_the_thread() -> None:
    state, handle = shared_direct_world()
    admit = one(join(state, C1B, handle), S1, Admit)
    actions = state.receive(S1, SessionPanicked(handle, "PROBE", 1))  # the session dies
    assert Send(C1B, Panicked(30, handle, "PROBE", 1, 1)) in actions
    assert state.receive(S1, Complete(admit.msg_id, errors.KErrNone, ())) == []  # late


def test_a_server_death_while_it_takes_the_ticket_answers_the_thread() -> None:
    state, handle = shared_direct_world()
    one(join(state, C1B, handle), S1, Admit)
    actions = state.peer_gone(S1)
    assert Send(C1B, Connected(30, errors.KErrServerTerminated, 0, b"")) in actions


def test_a_joined_thread_ending_detaches_it_and_the_session_lives_on() -> None:
    state, handle = shared_direct_world()
    admit = one(join(state, C1B, handle), S1, Admit)
    state.receive(S1, Complete(admit.msg_id, errors.KErrNone, ()))
    assert state.peer_gone(C1B) == []
    session = state.sessions[handle]
    assert C1B not in session.attached and session.state is SessionState.OPEN


def test_a_killed_sharing_process_does_not_end_the_session_for_the_others() -> None:
    state, handle = shared_direct_world()
    state.receive(C2, Open(5, TICKETS[1]))
    admit = one(join(state, C2, handle), S1, Admit)
    state.receive(S1, Complete(admit.msg_id, errors.KErrNone, ()))
    actions = state.process_died(CLI2.key)
    assert sends(actions, S1, Disconnect) == []
    assert state.sessions[handle].state is SessionState.OPEN
    assert [p.identity.pid for p in state.sessions[handle].holders] == [CLI.pid]


# -- the session list (ipcfw ps) ---------------------------------------------------------------


def listing(actions: list, rid: bytes = C1) -> tuple[int, list[SessionRow]]:
    reply = one(actions, rid, SessionList)
    return reply.next, unpack_session_rows(reply.rows)


def test_the_list_asks_the_server_of_a_direct_session_what_is_in_service() -> None:
    state, handle = shared_direct_world()
    state.receive(C2, Open(5, TICKETS[1]))
    kernel_path = connect(state, path=Path.KERNEL, req_id=6)
    actions = state.receive(C1, ListSessions(40, 0))
    one(actions, S1, Census)
    assert sends(actions, C1) == [] and state.statistics()["listings"] == 1
    assert state.receive(C1B, ListSessions(41, 0)) == []  # (one Census at a time per server)
    actions = state.receive(S1, CensusReply(0, pack_census(
        [CensusItem(handle, CLI.pid, 2, 0, 0), CensusItem(handle, CLI2.pid, 1, 0, 0),
         CensusItem(0x7777, CLI.pid, 9, 9, 0)]
    )))
    assert listing(actions, C1) == (0, [
        SessionRow(handle, "Echo", 1, "OPEN", 3, ((CLI.pid, 1), (CLI2.pid, 1)),
                   creator_pid=CLI.pid, slots=4),
        SessionRow(kernel_path.handle, "Echo", 0, "CONNECTING", 1, ((CLI.pid, 1),),
                   creator_pid=CLI.pid, slots=4),
    ])
    assert listing(actions, C1B)[1][0].outstanding == 3
    assert state.statistics()["listings"] == 0


def test_a_list_without_direct_sessions_is_answered_at_once_a_page_at_a_time() -> None:
    state = direct_world()
    for n in range(SESSIONS_PAGE + 3):
        state.receive(C1, Connect(100 + n, "Plain", (1, 0, 0), 0, b""))
    more, rows = listing(state.receive(C1, ListSessions(40, 0)))
    assert len(rows) == SESSIONS_PAGE and more == rows[-1].handle == SESSIONS_PAGE
    assert rows[0] == SessionRow(1, "Plain", 0, "CONNECTING", 1, ((CLI.pid, 1),),
                                 creator_pid=CLI.pid)
    more, rows = listing(state.receive(C1, ListSessions(41, more)))
    assert more == 0 and [row.handle for row in rows] == [257, 258, 259]


def test_a_server_dying_before_its_census_answers_the_list() -> None:
    state, handle = shared_direct_world()
    one(state.receive(C1, ListSessions(40, 0)), S1, Census)
    actions = state.peer_gone(S1)
    _, rows = listing(actions)
    assert rows[0].handle == handle and rows[0].state == "DEAD"


def test_a_census_from_a_peer_that_is_no_server_or_malformed_is_misbehaviour() -> None:
    state, _ = shared_direct_world()
    with pytest.raises(PeerMisbehaved):
        state.receive(C1, CensusReply(0, b""))
    with pytest.raises(PeerMisbehaved):
        state.receive(S1, CensusReply(0, b"\x01"))


def test_joins_waiting_for_the_server_count_towards_the_processs_outstanding_limit() -> None:
    state, handle = shared_direct_world()
    state.outstanding_per_process = 1
    admit = one(join(state, C1B, handle), S1, Admit)
    assert join(state, C1, handle, req_id=31) == [  # the limit: the kernel path, no ticket
        Send(C1, Connected(31, errors.KErrNone, handle, b""))
    ]
    state.receive(S1, Complete(admit.msg_id, errors.KErrNone, ()))
    assert state.processes[CLI.key].outstanding == 0


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


def test_a_registration_naming_another_servers_direct_socket_is_refused() -> None:
    state = direct_world()
    hello(state, b"srv-3", SERVER, SRV2)
    assert state.receive(b"srv-3", Register(901, "Impostor", 0, (1, 0, 0), SOCKET)) == [
        Send(b"srv-3", Completed(901, errors.KErrInUse, ()))
    ]
    assert "impostor" not in state.servers
    assert state.receive(b"srv-3", Register(902, "Honest", 0, (1, 0, 0), SOCKET + "f")) == [
        Send(b"srv-3", Completed(902, errors.KErrNone, ()))
    ]
