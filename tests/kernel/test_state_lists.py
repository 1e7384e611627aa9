"""Tests of ipcfw.kernel.state: the server, session and process lists (``ipcfw ps``) and the
ages of outstanding messages (rule 12), on both data paths. No processes: the kernel's clock
(`KernelState.now`) is set by hand, as the loop sets it before each turn."""

from __future__ import annotations

from ipcfw import errors
from ipcfw.kernel.listing import MAX_LISTINGS
from ipcfw.kernel.state import KernelState
from ipcfw.protocol import (
    PROCESSES_PAGE,
    SERVERS_PAGE,
    Census,
    CensusItem,
    CensusReply,
    Complete,
    Connect,
    ListProcesses,
    ListServers,
    ListSessions,
    Path,
    ProcessList,
    ProcessRow,
    ServerList,
    ServerRow,
    SessionList,
    Terminate,
    TerminationReason,
    pack_census,
    unpack_process_rows,
    unpack_server_rows,
    unpack_session_rows,
)
from kernel_world import (
    ASYNC,
    C1,
    C1B,
    CHANNEL,
    CLI,
    S1,
    S2,
    SRV,
    SRV2,
    hello,
    ident,
    new_state,
    one,
    request,
    start_client,
    start_server,
)

SOCKET = "/run/ipcfw-test/d-0123456789ab"


def world() -> KernelState:
    """At t=100 s: "Echo" (SRV, on S1) takes direct connections, "Plain" (SRV2, on S2) takes
    none; a client CLI with C1, C1B and its inbox."""
    state = new_state()
    state.now = 100.0
    start_server(state, S1, SRV, "Echo", sharing=1, version=(1, 2, 3), direct=SOCKET)
    state.now = 101.0
    start_server(state, S2, SRV2, "Plain")
    start_client(state)
    hello(state, C1B, CHANNEL, CLI)
    return state


def open_session(state: KernelState, name: str, path: Path, slots: int = 4, req_id: int = 1,
                 thread: int = 0) -> int:
    actions = state.receive(C1, Connect(req_id, name, (1, 0, 0), slots, b"", (), path, thread))
    new = [a.message for a in actions if type(a.message).__name__ == "NewSession"][0]
    state.receive(S1 if name == "Echo" else S2, Complete(new.msg_id, errors.KErrNone, ()))
    return new.handle


def sessions(actions: list) -> list:
    return unpack_session_rows(one(actions, C1, SessionList).rows)


def servers(actions: list) -> list:
    return unpack_server_rows(one(actions, C1, ServerList).rows)


def processes(actions: list) -> list:
    return unpack_process_rows(one(actions, C1, ProcessList).rows)


def test_a_kernel_path_message_has_the_age_of_its_arrival_and_leaves_the_list_completed() -> None:
    state = world()
    handle = open_session(state, "Plain", Path.KERNEL, thread=4321)
    state.now = 102.0
    deliver = request(state, C1, handle, 7, ASYNC)[0].message
    request(state, C1, handle, 8, ASYNC)
    state.now = 105.5
    [row] = sessions(state.receive(C1, ListSessions(1, 0)))
    assert (row.outstanding, row.oldest, row.slots_used, row.slots) == (2, 3500, 2, 4)
    assert (row.creator_pid, row.creator_thread, row.age, row.path) == (CLI.pid, 4321, 4500, 0)
    state.receive(S2, Complete(deliver.msg_id, 0, ()))  # the oldest: the next one is as old
    [row] = sessions(state.receive(C1, ListSessions(2, 0)))
    assert (row.outstanding, row.oldest, row.slots_used) == (1, 3500, 1)
    [plain] = [s for s in servers(state.receive(C1, ListServers(3, ""))) if s.name == "Plain"]
    assert (plain.outstanding, plain.oldest) == (1, 3500)


def test_a_direct_sessions_ages_and_slots_come_from_its_servers_census() -> None:
    state = world()
    handle = open_session(state, "Echo", Path.DIRECT)
    state.now = 110.0
    actions = state.receive(C1, ListSessions(1, 0))
    one(actions, S1, Census)  # (the list waits for it)
    census = pack_census([CensusItem(handle, CLI.pid, 3, 2, 4000)])
    [row] = sessions(state.receive(S1, CensusReply(0, census)))
    assert (row.outstanding, row.oldest, row.slots_used, row.path) == (3, 4000, 2, 1)
    state.now = 111.0  # a list answered from the census the server last gave: it ages
    state.listings = [object()] * MAX_LISTINGS  # (so a list is answered at once)
    [row] = sessions(state.receive(C1, ListSessions(2, 0)))
    assert (row.outstanding, row.oldest) == (3, 5000)


def test_a_census_for_a_session_that_is_gone_or_not_its_servers_counts_for_nobody() -> None:
    state = world()
    handle = open_session(state, "Echo", Path.DIRECT)
    one(state.receive(C1, ListServers(1, "")), S1, Census)
    census = pack_census([CensusItem(handle, CLI.pid, 1, 0, 10),
                          CensusItem(0x7777, CLI.pid, 5, 5, 99_000)])
    echo = servers(state.receive(S1, CensusReply(0, census)))[0]
    assert (echo.name, echo.outstanding, echo.oldest) == ("Echo", 1, 10)
    state.sessions[handle].server.sessions.discard(handle)  # (as a closing session leaves it)
    state.listings = [object()] * MAX_LISTINGS
    echo = servers(state.receive(C1, ListServers(2, "")))[0]
    assert (echo.outstanding, echo.oldest) == (0, 0)


def test_the_server_list_shows_each_registration() -> None:
    state = world()
    handle = open_session(state, "Plain", Path.KERNEL)
    state.now = 161.0
    rows = servers(state.receive(C1, ListServers(1, "")))
    assert rows[1] == ServerRow("Plain", SRV2.pid, SRV2.exe, (1, 0, 0), 0, False, 1, 0, 0,
                                60_000, "running")
    assert rows[0][:6] == ("Echo", SRV.pid, SRV.exe, (1, 2, 3), 1, True)
    request(state, C1, handle, 4, ASYNC)  # (held: the registration ends once it completes)
    state.receive(C1, Terminate(5, "Plain", TerminationReason.ADMINISTRATOR))
    assert [r.state for r in servers(state.receive(C1, ListServers(2, "")))] == [
        "running", "terminating"
    ]


def test_the_server_list_comes_a_page_at_a_time_by_lookup_key() -> None:
    state = new_state()
    for n in range(SERVERS_PAGE + 2):
        start_server(state, b"s%d" % n, ident(1000 + n), f"S{n:04d}")
    start_client(state)
    first = one(state.receive(C1, ListServers(1, "")), C1, ServerList)
    rows = unpack_server_rows(first.rows)
    assert len(rows) == SERVERS_PAGE and first.next == rows[-1].name.casefold() == "s0255"
    last = one(state.receive(C1, ListServers(2, first.next)), C1, ServerList)
    assert [r.name for r in unpack_server_rows(last.rows)] == ["S0256", "S0257"]
    assert last.next == ""


def test_the_process_list_shows_roles_sessions_and_requests_on_both_paths() -> None:
    state = world()
    kernel_path = open_session(state, "Plain", Path.KERNEL, req_id=1)
    direct = open_session(state, "Echo", Path.DIRECT, req_id=2)
    request(state, C1, kernel_path, 7, ASYNC)
    actions = state.receive(C1, ListProcesses(3, 0))
    one(actions, S1, Census)
    census = pack_census([CensusItem(direct, CLI.pid, 2, 1, 50)])
    rows = processes(state.receive(S1, CensusReply(0, census)))
    assert rows == [
        ProcessRow(SRV.pid, SRV.uid, SRV.exe, 0, False, ("Echo",), 0, 0),
        ProcessRow(SRV2.pid, SRV2.uid, SRV2.exe, 0, False, ("Plain",), 0, 0),
        ProcessRow(CLI.pid, CLI.uid, CLI.exe, 2, True, (), 2, 1 + 2),
    ]


def test_the_process_list_comes_a_page_at_a_time_by_pid() -> None:
    state = new_state()
    for n in range(PROCESSES_PAGE + 1):
        hello(state, b"c%d" % n, CHANNEL, ident(5000 + n))
    first = one(state.receive(b"c0", ListProcesses(1, 0)), b"c0", ProcessList)
    rows = unpack_process_rows(first.rows)
    assert len(rows) == PROCESSES_PAGE and first.next == rows[-1].pid == 5000 + 255
    last = one(state.receive(b"c0", ListProcesses(2, first.next)), b"c0", ProcessList)
    assert [r.pid for r in unpack_process_rows(last.rows)] == [5256] and last.next == 0
