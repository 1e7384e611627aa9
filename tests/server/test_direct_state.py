"""Tests of ipcfw.server.direct: the direct path's rules, fed as decoded frames, checked on frames.

No processes, sockets or sleeps: a `ServerState` over a small plugin, with a fake `DirectIO`
recording what the rules send on each connection. What a kernel sends is fed with `receive`;
what a client sends on a direct connection with `rules.receive(connection, frame)`. The
sockets (the host's `_DirectPort`) are tested in test_direct_process.py.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable

import pytest

from ipcfw import errors
from ipcfw.protocol import (
    ERROR_STRING_FUNCTION,
    Admit,
    Census,
    CensusReply,
    unpack_census,
    CensusItem,
    MAX_FRAME,
    Attach,
    Cancel,
    Close,
    Complete,
    Completed,
    Connect,
    Deliver,
    Deregister,
    Disconnect,
    Mode,
    Negotiated,
    NewSession,
    Panicked,
    SessionPanicked,
    PeerGone,
    PeerInfo,
    Request,
    decode,
)
from ipcfw.server import ClientInfo, CServer, CSession, RMessage
from ipcfw.server.direct import MAX_UNUSED_TICKETS, POOL_SLOTS, DirectConnection, DirectRules
from ipcfw.server.message import DirectMessage
from ipcfw.server.overlay import Layers
from ipcfw.server.state import ServerState
from ipcfw.version import TVersion

HANDLE = 0x201
CLIENT = 9
PID, UID, GID = 4242, 1000, 1000
TICKET = bytes(range(16))
SYNC, ASYNC, BLIND = int(Mode.SYNC), int(Mode.ASYNC), int(Mode.BLIND)


class Holder(CSession):
    """Records what it is asked; holds messages unless the server has an action for them."""

    def ServiceL(self, message: RMessage) -> None:
        server = self.Server()
        server.events.append(("service", message.Function(), message.Client().pid))
        server.held.append(message)
        action = server.actions.pop(0) if server.actions else None
        if action is not None:
            action(message)

    def Cancelled(self, message: RMessage) -> None:
        self.Server().events.append(("cancelled", message.Function()))

    def Disconnect(self, message: RMessage) -> None:
        self.Server().events.append(("disconnect",))
        message.Complete(errors.KErrNone)


class Server(CServer):
    name = "direct-test"
    version = TVersion(1, 0, 0)
    session_class = Holder
    error_strings = {-9002: "direct's own"}

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.held: list[RMessage] = []
        self.actions: list[Callable[[RMessage], None] | None] = []
        self.refuse = False

    def AcceptL(self, client: ClientInfo | None, version: TVersion, payload: bytes) -> None:
        if self.refuse:
            raise errors.IpcError(errors.KErrPermissionDenied, "refused by the test")


def complete_with(value: int) -> Callable[[RMessage], None]:
    return lambda message: message.Complete(value)


class FakeLoop:
    def on_loop_thread(self) -> bool:
        return True

    def call_soon(self, fn: Callable[[], None]) -> None:
        fn()


class FakeIO:
    """The host's side: frames sent per connection (decoded), and completions made 'on another
    thread' (queued until `run_posted`) when `on_loop` is False."""

    def __init__(self) -> None:
        self.rules: DirectRules | None = None
        self.sent: dict[int, list[Any]] = {}
        self.on_loop = True
        self.posted: list[tuple[DirectConnection, DirectMessage, bytes]] = []
        self.unread: dict[int, list[Any]] = {}  # frames sent by clients, not read yet
        self.closed_pids: list[int] = []

    def drain(self, connection: DirectConnection) -> None:
        assert self.rules is not None
        for message in self.unread.pop(connection.key, []):
            if self.rules.receive(connection, message):
                self.rules.connection_ended(connection)
                return

    def close_client(self, pid: int) -> None:
        self.closed_pids.append(pid)

    def send(self, connection: DirectConnection, frame: bytes) -> None:
        if connection.open:
            self.sent.setdefault(connection.key, []).append(decode(frame))

    def post(self, connection: DirectConnection, message: DirectMessage, frame: bytes) -> None:
        assert self.rules is not None
        if self.on_loop:
            self.rules.finish(connection, message, frame)
        else:
            self.posted.append((connection, message, frame))

    def run_posted(self) -> None:
        assert self.rules is not None
        posted, self.posted = self.posted, []
        for item in posted:
            self.rules.finish(*item)


class Harness:
    def __init__(self, server: Server, max_frame: int = MAX_FRAME) -> None:
        self.server = server
        self.io = FakeIO()
        self.kernel: list[Any] = []
        self.state = ServerState(Layers(server, FakeLoop()), self.emit, max_frame=max_frame,
                                 direct=self.io)
        assert self.state.direct is not None
        self.rules: DirectRules = self.state.direct
        self.io.rules = self.rules
        self._ids = 1000
        self._keys = 0
        self.state.receive(PeerInfo(CLIENT, PID, UID, GID, "/bin/client"))

    def emit(self, frame: bytes) -> None:
        self.kernel.append(decode(frame))

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def new_session(self, handle: int = HANDLE, ticket: bytes = TICKET, slots: int = 0) -> Any:
        msg_id = self.next_id()
        self.state.receive(NewSession(msg_id, handle, (1, 0, 0), CLIENT, b"", ticket, slots))
        return self.kernel.pop()

    def connection(self, pid: int = PID) -> DirectConnection:
        self._keys += 1
        return self.rules.connection(self._keys, pid, UID, GID)

    def feed(self, connection: DirectConnection, message: Any) -> list[Any]:
        """Feed one client frame; returns what was sent on `connection` meanwhile."""
        assert self.rules.receive(connection, message) is False
        return self.take(connection)

    def take(self, connection: DirectConnection) -> list[Any]:
        return self.io.sent.pop(connection.key, [])

    def attached(self, handle: int = HANDLE, ticket: bytes = TICKET,
                 slots: int = 0) -> DirectConnection:
        assert self.new_session(handle, ticket, slots).value == errors.KErrNone
        connection = self.connection()
        assert self.feed(connection, Attach(1, ticket)) == [Completed(1, handle, ())]
        return connection


@pytest.fixture
def server() -> Server:
    return Server()


@pytest.fixture
def harness(server: Server) -> Harness:
    return Harness(server)


# -- tickets and Attach ---------------------------------------------------------------------------


def test_a_ticket_attaches_its_session_and_requests_are_served_on_the_connection(harness, server):
    connection = harness.attached()
    server.actions = [complete_with(7)]
    assert harness.feed(connection, Request(5, HANDLE, 3, (), SYNC)) == [Completed(5, 7, ())]
    assert server.events == [("service", 3, PID)]
    assert harness.kernel == []  # nothing goes to the kernel
    assert harness.rules.statistics()["attached"] == 1


def test_writes_travel_back_with_the_completion(harness, server):
    connection = harness.attached()

    def write(message: RMessage) -> None:
        message.WriteL(0, b"hello")
        message.Complete(5)

    server.actions = [write]
    assert harness.feed(connection, Request(6, HANDLE, 1, ((b"", 16),), SYNC)) == [
        Completed(6, 5, ((0, b"hello"),))
    ]


def test_attach_from_another_process_is_refused_and_the_ticket_stays(harness):
    harness.new_session()
    intruder = harness.connection(pid=PID + 1)
    assert harness.feed(intruder, Attach(1, TICKET)) == [
        Completed(1, errors.KErrPermissionDenied, ())
    ]
    assert harness.feed(intruder, Request(2, HANDLE, 1, (), SYNC)) == [
        Panicked(2, HANDLE, "KERN-EXEC", 0, 0)
    ]
    rightful = harness.connection()
    assert harness.feed(rightful, Attach(3, TICKET)) == [Completed(3, HANDLE, ())]
    assert harness.rules.problems == {"Attach refused: ticket presented by another process": 1}


def test_forged_and_replayed_tickets_are_refused(harness):
    connection = harness.attached()
    again = harness.connection()
    assert harness.feed(again, Attach(2, TICKET)) == [Completed(2, errors.KErrPermissionDenied, ())]
    assert harness.feed(connection, Attach(3, b"\xff" * 16)) == [
        Completed(3, errors.KErrPermissionDenied, ())
    ]
    assert harness.rules.problems == {"Attach refused: unknown or used ticket": 2}


def test_a_refused_connect_leaves_no_ticket(harness, server):
    server.refuse = True
    assert harness.new_session().value == errors.KErrPermissionDenied
    assert harness.rules.statistics()["tickets"] == 0
    connection = harness.connection()
    assert harness.feed(connection, Attach(1, TICKET)) == [
        Completed(1, errors.KErrPermissionDenied, ())
    ]


def test_a_session_on_the_kernel_path_has_no_ticket(harness):
    assert harness.new_session(ticket=b"").value == errors.KErrNone
    assert harness.rules.statistics()["tickets"] == 0


def test_a_ticket_of_a_closed_session_is_refused(harness):
    harness.new_session()
    harness.state.receive(Disconnect(harness.next_id(), HANDLE))
    connection = harness.connection()
    assert harness.feed(connection, Attach(1, TICKET)) == [
        Completed(1, errors.KErrPermissionDenied, ())
    ]
    assert harness.rules.statistics()["tickets"] == 0


def test_a_ticket_of_an_unknown_client_is_not_kept(harness):
    harness.state.receive(NewSession(harness.next_id(), HANDLE, (1, 0, 0), CLIENT + 1, b"",
                                     TICKET, 0))
    assert harness.kernel.pop().value == errors.KErrNone  # the session works on the kernel path
    assert harness.rules.statistics()["tickets"] == 0


# -- requests ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [SYNC, ASYNC, BLIND])
def test_a_request_for_a_handle_not_attached_here_is_kern_exec_0(harness, server, mode):
    harness.attached()
    other = harness.connection()
    assert harness.feed(other, Request(9, HANDLE, 1, (), mode)) == [
        Panicked(9, HANDLE, "KERN-EXEC", 0, 0)
    ]
    assert harness.feed(other, Request(10, 0x7777, 1, (), mode)) == [
        Panicked(10, 0x7777, "KERN-EXEC", 0, 0)
    ]
    assert server.events == []


def test_error_string_is_answered_by_the_framework(harness, server):
    connection = harness.attached()
    reply = harness.feed(connection, Request(4, HANDLE, ERROR_STRING_FUNCTION,
                                             (-9002, (b"", 64)), SYNC))
    assert reply == [Completed(4, len(b"direct's own"), ((1, b"direct's own"),))]
    assert server.events == []


def test_serviceL_raising_completes_with_its_code_and_text(harness, server):
    connection = harness.attached()

    def fail(message: RMessage) -> None:
        raise errors.IpcError(errors.KErrNotFound, "no")

    server.actions = [fail]
    assert harness.feed(connection, Request(4, HANDLE, 1, (), SYNC)) == [
        Completed(4, errors.KErrNotFound, (), "no")
    ]


def test_a_completion_over_the_frame_limit_is_overflow(server):
    harness = Harness(server, max_frame=64)
    connection = harness.attached()

    def big(message: RMessage) -> None:
        message.WriteL(0, b"x" * 100)
        message.Complete(0)

    server.actions = [big]
    assert harness.feed(connection, Request(4, HANDLE, 1, ((b"", 200),), SYNC)) == [
        Completed(4, errors.KErrOverflow, (), "the server's answer to function 1 (110 bytes) is "
                  "over the 64-byte frame limit")
    ]


def test_completions_from_another_thread_go_through_the_host(harness, server):
    connection = harness.attached(slots=1)
    harness.feed(connection, Request(4, HANDLE, 1, (), ASYNC))
    harness.io.on_loop = False
    server.held[0].Complete(3)
    assert harness.take(connection) == []
    assert harness.rules.statistics()["slots_used"] == 1  # freed on the loop thread
    harness.io.run_posted()
    assert harness.take(connection) == [Completed(4, 3, ())]
    assert harness.rules.statistics()["slots_used"] == 0


def test_a_reused_request_id_in_service_is_misbehaviour(harness):
    connection = harness.attached()
    harness.feed(connection, Request(4, HANDLE, 1, (), SYNC))
    assert harness.rules.receive(connection, Request(4, HANDLE, 1, (), SYNC)) is True
    assert harness.rules.problems == {"request id in use": 1}


@pytest.mark.parametrize("message", [
    Connect(1, "x", (1, 0, 0), 0, b""), Completed(1, 0, ()), Complete(1, 0, ()),
    Deliver(1, HANDLE, 1, (), 1), Negotiated(1, 0, b""),
])
def test_any_other_message_is_misbehaviour(harness, message):
    connection = harness.connection()
    assert harness.rules.receive(connection, message) is True
    assert harness.rules.problems == {"unexpected message": 1}


# -- slots and blind requests -------------------------------------------------------------------


def test_no_slots_refuses_async_and_blind_but_not_sync(harness, server):
    connection = harness.attached(slots=0)
    assert harness.feed(connection, Request(2, HANDLE, 1, (), ASYNC)) == [
        Completed(2, errors.KErrServerBusy, ())
    ]
    assert harness.feed(connection, Request(3, HANDLE, 1, (), BLIND)) == [
        Completed(3, errors.KErrServerBusy, ())
    ]
    server.actions = [complete_with(1)]
    assert harness.feed(connection, Request(4, HANDLE, 1, (), SYNC)) == [Completed(4, 1, ())]
    assert len(server.held) == 1


def test_n_slots_allow_n_outstanding_and_a_completion_frees_one(harness, server):
    connection = harness.attached(slots=2)
    assert harness.feed(connection, Request(2, HANDLE, 1, (), ASYNC)) == []
    assert harness.feed(connection, Request(3, HANDLE, 1, (), BLIND)) == [
        Completed(3, errors.KErrNone, ())
    ]
    assert harness.feed(connection, Request(4, HANDLE, 1, (), ASYNC)) == [
        Completed(4, errors.KErrServerBusy, ())
    ]
    assert harness.feed(connection, Request(5, HANDLE, 1, (), SYNC)) == []  # sync takes none
    server.held[0].Complete(0)
    assert harness.take(connection) == [Completed(2, 0, ())]
    assert harness.feed(connection, Request(6, HANDLE, 1, (), ASYNC)) == []


def test_the_kernel_pool_allows_a_bounded_number_on_the_direct_path(harness):
    connection = harness.attached(slots=-1)
    for req_id in range(POOL_SLOTS):
        assert harness.feed(connection, Request(req_id + 10, HANDLE, 1, (), ASYNC)) == []
    assert harness.feed(connection, Request(1, HANDLE, 1, (), ASYNC)) == [
        Completed(1, errors.KErrServerBusy, ())
    ]


def test_a_blind_requests_own_completion_is_not_sent(harness, server):
    connection = harness.attached(slots=1)
    assert harness.feed(connection, Request(2, HANDLE, 1, (), BLIND)) == [
        Completed(2, errors.KErrNone, ())
    ]
    server.held[0].Complete(99)
    assert harness.take(connection) == []
    assert harness.rules.statistics()["slots_used"] == 0


# -- cancel ------------------------------------------------------------------------------------


def test_cancel_ends_a_request_in_service(harness, server):
    connection = harness.attached(slots=1)
    harness.feed(connection, Request(2, HANDLE, 8, (), ASYNC))
    assert harness.feed(connection, Cancel(2)) == [Completed(2, errors.KErrCancel, ())]
    assert server.events[-1] == ("cancelled", 8)
    assert server.held[0].IsCancelled()
    server.held[0].Complete(0)  # dropped: the client has its answer
    assert harness.take(connection) == []
    assert harness.rules.statistics()["slots_used"] == 0


def test_cancel_of_a_completed_request_does_nothing(harness, server):
    connection = harness.attached(slots=1)
    server.actions = [complete_with(4)]
    assert harness.feed(connection, Request(2, HANDLE, 8, (), ASYNC)) == [Completed(2, 4, ())]
    assert harness.feed(connection, Cancel(2)) == []
    assert harness.feed(connection, Cancel(12345)) == []
    assert ("cancelled", 8) not in server.events


def test_cancel_on_another_connection_finds_nothing(harness, server):
    connection = harness.attached(slots=1)
    harness.feed(connection, Request(2, HANDLE, 8, (), ASYNC))
    assert harness.feed(harness.connection(), Cancel(2)) == []
    assert not server.held[0].IsNull()


# -- Close, connection end, Disconnect -------------------------------------------------------


def test_close_detaches_the_handle_from_the_connection(harness, server):
    connection = harness.attached()
    assert harness.feed(connection, Close(HANDLE)) == []
    assert harness.feed(connection, Request(2, HANDLE, 1, (), SYNC)) == [
        Panicked(2, HANDLE, "KERN-EXEC", 0, 0)
    ]
    assert harness.feed(connection, Close(HANDLE)) == []  # again: nothing
    assert harness.rules.attached(HANDLE) == 0


def test_a_disconnect_first_serves_what_the_connection_sent_before_its_close(harness, server):
    connection = harness.attached()
    server.actions = [complete_with(1)]
    # the client sent a request, then Close, on its direct connection, then Close to the
    # kernel: its Disconnect arrives before the server has read them
    harness.io.unread[connection.key] = [Request(3, HANDLE, 4, (), SYNC), Close(HANDLE)]
    msg_id = harness.next_id()
    harness.state.receive(Disconnect(msg_id, HANDLE))
    assert harness.take(connection) == [Completed(3, 1, ())]
    assert server.events == [("service", 4, PID), ("disconnect",)]
    assert harness.kernel == [Complete(msg_id, errors.KErrNone, ())]
    assert harness.state.statistics()["sessions"] == 0
    assert harness.rules.statistics() == {"tickets": 0, "attached": 0, "slots_used": 0, "dead": 0}


def test_a_disconnect_without_close_runs_at_once_and_nothing_of_the_session_follows_it(
        harness, server):
    # a client that never sends Close (it died, or a forked child holds its connection)
    connection = harness.attached(slots=2)
    harness.feed(connection, Request(2, HANDLE, 5, (), ASYNC))  # held by the plugin
    msg_id = harness.next_id()
    harness.state.receive(Disconnect(msg_id, HANDLE))
    assert harness.kernel == [Complete(msg_id, errors.KErrNone, ())]
    assert harness.rules.attached(HANDLE) == 0 and len(connection.in_service) == 0
    assert harness.feed(connection, Request(3, HANDLE, 1, (), SYNC)) == [
        Panicked(3, HANDLE, "KERN-EXEC", 0, 0)
    ]
    assert harness.feed(connection, Cancel(2)) == []
    harness.rules.connection_ended(connection)
    assert server.events[-1] == ("disconnect",)  # no Cancelled after it
    server.held[0].Complete(0)  # a late completion goes nowhere
    assert harness.take(connection) == []


def test_close_then_disconnect_then_connection_end_tells_no_cancelled(harness, server):
    # the reviewer's case: connect, a held request, Close, Disconnect, the thread ends
    connection = harness.attached(slots=1)
    harness.feed(connection, Request(2, HANDLE, 3, (), ASYNC))
    harness.feed(connection, Close(HANDLE))
    harness.state.receive(Disconnect(harness.next_id(), HANDLE))
    harness.rules.connection_ended(connection)
    assert [e[0] for e in server.events] == ["service", "disconnect"]


def test_a_peer_gone_closes_the_processs_direct_connections(harness):
    harness.state.receive(PeerGone(CLIENT))
    assert harness.io.closed_pids == [PID]
    harness.state.receive(PeerGone(CLIENT))  # once: the client is forgotten
    assert harness.io.closed_pids == [PID]


def test_attach_from_another_user_is_refused(harness):
    harness.new_session()
    connection = harness.rules.connection(99, PID, UID + 1, GID)
    assert harness.feed(connection, Attach(1, TICKET)) == [
        Completed(1, errors.KErrPermissionDenied, ())
    ]
    assert harness.rules.problems == {"Attach refused: ticket presented by another user": 1}


def test_a_disconnect_of_a_session_not_attached_runs_at_once(harness, server):
    harness.new_session()  # ticket never used
    msg_id = harness.next_id()
    harness.state.receive(Disconnect(msg_id, HANDLE))
    assert harness.kernel == [Complete(msg_id, errors.KErrNone, ())]
    assert harness.rules.statistics()["tickets"] == 0


def test_connection_end_cancels_its_requests(harness, server):
    connection = harness.attached(slots=2)
    harness.feed(connection, Request(2, HANDLE, 5, (), ASYNC))
    harness.feed(connection, Request(3, HANDLE, 6, (), SYNC))
    harness.rules.connection_ended(connection)
    assert ("cancelled", 5) in server.events and ("cancelled", 6) in server.events
    assert harness.rules.attached(HANDLE) == 0
    server.held[0].Complete(0)  # a late completion goes nowhere
    assert harness.take(connection) == []
    harness.rules.connection_ended(connection)  # twice: nothing more


def test_the_kernel_path_is_unchanged_beside_the_direct_one(harness, server):
    harness.attached()
    server.actions = [complete_with(8)]
    harness.state.receive(Deliver(77, HANDLE, 1, (), CLIENT))
    assert harness.kernel == [Complete(77, 8, ())]


# -- panic ----------------------------------------------------------------------------------------


def test_a_panic_kills_the_session_on_the_direct_path_until_disconnect(harness, server):
    connection = harness.attached()
    server.actions = [lambda message: message.Panic("TEST", 7)]
    assert harness.feed(connection, Request(2, HANDLE, 1, (), SYNC)) == [
        Panicked(2, HANDLE, "TEST", 7, 1)
    ]
    assert harness.feed(connection, Request(3, HANDLE, 1, (), ASYNC)) == [
        Panicked(3, HANDLE, "TEST", 7, 1)
    ]
    assert harness.kernel == [SessionPanicked(HANDLE, "TEST", 7)]  # told once
    harness.state.receive(Disconnect(harness.next_id(), HANDLE))
    assert harness.rules.statistics()["dead"] == 0


def test_the_disconnect_after_a_panic_is_the_last_the_session_hears(harness, server):
    connection = harness.attached(slots=2)
    harness.feed(connection, Request(2, HANDLE, 1, (), ASYNC))  # held by the plugin
    server.actions = [lambda message: message.Panic("TEST", 8)]
    harness.feed(connection, Request(3, HANDLE, 2, (), SYNC))
    harness.state.receive(Disconnect(harness.next_id(), HANDLE))  # the client has not closed
    harness.rules.connection_ended(connection)
    assert server.events[-1] == ("disconnect",)  # the held request is not Cancelled after it


# -- the registration ends --------------------------------------------------------------------


def test_nothing_is_sent_once_the_registration_has_ended(harness, server):
    connection = harness.attached(slots=1)
    harness.feed(connection, Request(2, HANDLE, 1, (), ASYNC))
    harness.io.on_loop = False
    harness.state.end()
    server.held[0].Complete(0)
    harness.io.run_posted()
    assert harness.take(connection) == []
    assert harness.rules.ended and not connection.open
    assert harness.rules.statistics()["tickets"] == 0


def test_a_state_without_direct_io_ignores_tickets(server):
    kernel: list[Any] = []
    state = ServerState(Layers(server, FakeLoop()), lambda f: kernel.append(decode(f)),
                        max_frame=MAX_FRAME)
    state.receive(PeerInfo(CLIENT, PID, UID, GID, "x"))
    state.receive(NewSession(1, HANDLE, (1, 0, 0), CLIENT, b"", TICKET, 1))
    assert state.direct is None and kernel == [Negotiated(1, errors.KErrNone, b"")]


def test_the_overflow_rule_is_written_once_for_both_paths(server):
    # A direct message differs from a kernel one only in its completion frame.
    assert "_send_completion" not in DirectMessage.__dict__
    assert "_completion_frame" in DirectMessage.__dict__
    harness = Harness(server, max_frame=256)
    connection = harness.attached()
    server.actions = [lambda message: (message.WriteL(0, b"x" * 300), message.Complete(1))]
    assert harness.feed(connection, Request(2, HANDLE, 1, ((b"", 400),), SYNC)) == [
        Completed(2, errors.KErrOverflow, (), "the server's answer to function 1 (311 bytes) is "
                  "over the 256-byte frame limit")
    ]


# -- a session on several connections (every thread of a shared session) ---------------------


CLIENT2, PID2 = 10, 5151  # a second client process, after Open


def admitted(harness: Harness, ticket: bytes, client: int = CLIENT, pid: int = PID,
             handle: int = HANDLE) -> DirectConnection:
    """The kernel admits another thread (of process `client`) with `ticket`; that thread's
    connection attaches it."""
    msg_id = harness.next_id()
    harness.state.receive(Admit(msg_id, handle, client, ticket))
    assert harness.kernel.pop() == Complete(msg_id, errors.KErrNone, ())
    connection = harness.connection(pid)
    assert harness.feed(connection, Attach(1, ticket)) == [Completed(1, handle, ())]
    return connection


@pytest.fixture
def two(harness: Harness) -> tuple[DirectConnection, DirectConnection]:
    """The session attached on the creator's connection and on another process's."""
    harness.state.receive(PeerInfo(CLIENT2, PID2, UID, GID, "/bin/other"))
    first = harness.attached(slots=2)
    return first, admitted(harness, b"t2" * 8, CLIENT2, PID2)


def test_an_admit_keeps_a_ticket_for_another_thread_and_answers_once_it_is_kept(harness):
    harness.attached()
    same_process = admitted(harness, b"t2" * 8)
    assert harness.rules.attached(HANDLE) == 2 and same_process.pid == PID


@pytest.mark.parametrize("handle, ticket", [(0x7777, TICKET), (HANDLE, b"")])
def test_an_admit_for_a_session_not_direct_here_is_refused(harness, handle, ticket):
    harness.new_session(ticket=ticket)  # b"": a session on the kernel path
    harness.state.receive(Admit(50, handle, CLIENT, b"t2" * 8))
    assert harness.kernel == [Complete(50, errors.KErrNotSupported, ())]


def test_each_connection_is_served_in_its_order_with_its_own_client(harness, server, two):
    first, second = two
    server.actions = [complete_with(1), complete_with(2), complete_with(3)]
    assert harness.feed(first, Request(5, HANDLE, 10, (), SYNC)) == [Completed(5, 1, ())]
    assert harness.feed(second, Request(5, HANDLE, 20, (), SYNC)) == [Completed(5, 2, ())]
    assert harness.feed(first, Request(6, HANDLE, 11, (), SYNC)) == [Completed(6, 3, ())]
    assert server.events == [("service", 10, PID), ("service", 20, PID2), ("service", 11, PID)]
    assert harness.kernel == []


def test_slots_are_the_sessions_across_its_connections(harness, server, two):
    first, second = two
    harness.feed(first, Request(2, HANDLE, 1, (), ASYNC))
    harness.feed(second, Request(2, HANDLE, 1, (), ASYNC))
    assert harness.feed(second, Request(3, HANDLE, 1, (), ASYNC)) == [
        Completed(3, errors.KErrServerBusy, ())
    ]


def test_a_cancel_ends_only_its_connections_request(harness, server, two):
    first, second = two
    harness.feed(first, Request(2, HANDLE, 1, (), ASYNC))
    harness.feed(second, Request(2, HANDLE, 2, (), ASYNC))
    assert harness.feed(second, Cancel(2)) == [Completed(2, errors.KErrCancel, ())]
    assert server.events[-1] == ("cancelled", 2)
    server.held[0].Complete(7)
    assert harness.take(first) == [Completed(2, 7, ())]


def test_a_close_on_one_connection_detaches_only_that_one(harness, server, two):
    first, second = two
    assert harness.feed(second, Close(HANDLE)) == []
    assert harness.feed(second, Request(3, HANDLE, 1, (), SYNC)) == [
        Panicked(3, HANDLE, "KERN-EXEC", 0, 0)
    ]
    server.actions = [complete_with(4)]
    assert harness.feed(first, Request(3, HANDLE, 1, (), SYNC)) == [Completed(3, 4, ())]
    assert harness.rules.attached(HANDLE) == 1 and "disconnect" not in str(server.events)


def test_a_connection_ending_cancels_its_requests_and_the_session_lives(harness, server, two):
    first, second = two
    harness.feed(second, Request(2, HANDLE, 5, (), ASYNC))  # held
    harness.rules.connection_ended(second)  # the thread ended, or its process was killed
    assert server.events[-1] == ("cancelled", 5) and harness.rules.attached(HANDLE) == 1
    server.actions = [complete_with(6)]
    assert harness.feed(first, Request(3, HANDLE, 1, (), SYNC)) == [Completed(3, 6, ())]


def test_the_disconnect_runs_once_after_what_every_connection_sent(harness, server, two):
    first, second = two
    server.actions = [complete_with(1), complete_with(2), complete_with(3)]
    harness.io.unread[first.key] = [Request(7, HANDLE, 10, (), SYNC), Close(HANDLE)]
    harness.io.unread[second.key] = [Request(7, HANDLE, 20, (), SYNC),
                                     Request(8, HANDLE, 21, (), SYNC)]  # no Close: it died
    msg_id = harness.next_id()
    harness.state.receive(Disconnect(msg_id, HANDLE))
    functions = [e[1] for e in server.events[:-1]]  # (the connections' order is not fixed)
    assert sorted(functions) == [10, 20, 21] and functions.index(20) < functions.index(21)
    assert server.events[-1] == ("disconnect",)
    assert len(harness.take(first)) == 1 and len(harness.take(second)) == 2
    assert harness.kernel == [Complete(msg_id, errors.KErrNone, ())]
    assert harness.rules.attached(HANDLE) == 0


def test_a_census_counts_what_is_in_service_per_session_and_client_with_the_oldest_age(
        harness, server, two):
    first, second = two
    harness.rules.now = 100.0
    harness.feed(first, Request(2, HANDLE, 1, (), ASYNC))
    harness.rules.now = 101.5
    harness.feed(first, Request(3, HANDLE, 1, (), SYNC))
    harness.feed(second, Request(2, HANDLE, 1, (), ASYNC))
    harness.rules.now = 103.0
    harness.state.receive(Census(4))
    reply = harness.kernel.pop()
    assert type(reply) is CensusReply and unpack_census(reply.counts) == [
        CensusItem(HANDLE, PID, 2, 1, 3000), CensusItem(HANDLE, PID2, 1, 1, 1500),
    ]
    server.held[0].Complete(0)  # the oldest: the age is the next one's
    assert harness.rules.census() == [
        CensusItem(HANDLE, PID, 1, 0, 1500), CensusItem(HANDLE, PID2, 1, 1, 1500),
    ]


def test_unused_tickets_are_bounded_per_session(harness):
    harness.attached()
    for n in range(MAX_UNUSED_TICKETS + 1):
        harness.state.receive(Admit(harness.next_id(), HANDLE, CLIENT, b"%016d" % n))
    assert harness.rules.statistics()["tickets"] == MAX_UNUSED_TICKETS
    late = harness.connection()
    assert harness.feed(late, Attach(1, b"%016d" % 0)) == [  # the oldest went
        Completed(1, errors.KErrPermissionDenied, ())
    ]
    harness.state.receive(Disconnect(harness.next_id(), HANDLE))
    assert harness.rules.statistics()["tickets"] == 0


# -- deregistration (rule 11) -----------------------------------------------------------------


def deregisters_sent(harness: Harness) -> int:
    return sum(isinstance(frame, Deregister) for frame in harness.kernel)


def test_a_deregistration_waits_for_the_live_direct_requests(harness, server):
    connection = harness.attached(slots=2)
    harness.feed(connection, Request(5, HANDLE, 1, (0,), ASYNC))
    harness.state.deregister()
    assert deregisters_sent(harness) == 0  # the kernel cannot see that request
    # new work is refused meanwhile, as the kernel refuses it once it is told
    assert harness.feed(connection, Request(6, HANDLE, 2, (0,), SYNC)) == [
        Completed(6, errors.KErrServerTerminated, ())
    ]
    harness.state.receive(Deliver(77, HANDLE, 3, (0,), CLIENT))
    assert harness.kernel.pop() == Complete(77, errors.KErrServerTerminated, ())
    assert harness.new_session(0x202, b"\x01" * 16).value == errors.KErrServerTerminated
    assert harness.feed(harness.connection(), Attach(2, b"\x01" * 16)) == [
        Completed(2, errors.KErrPermissionDenied, ())
    ]
    server.held[0].Complete(5)
    assert harness.take(connection) == [Completed(5, 5, ())]
    assert deregisters_sent(harness) == 1
    harness.state.deregister()  # asked again: sent once
    assert deregisters_sent(harness) == 1


def test_a_deregistration_without_live_direct_requests_is_sent_at_once(harness):
    harness.attached()
    harness.state.deregister()
    assert deregisters_sent(harness) == 1


def test_a_completion_made_on_another_thread_is_sent_before_the_deregistration(harness, server):
    connection = harness.attached()
    harness.feed(connection, Request(5, HANDLE, 1, (0,), SYNC))
    harness.io.on_loop = False
    server.held[0].Complete(1)  # out of the table in service, its frame not sent yet
    harness.state.deregister()
    assert deregisters_sent(harness) == 0
    harness.io.run_posted()
    assert harness.take(connection) == [Completed(5, 1, ())]
    assert deregisters_sent(harness) == 1


@pytest.mark.parametrize("end", ["cancel", "close", "connection end", "disconnect"])
def test_requests_ended_without_a_completion_do_not_hold_back_the_deregistration(
    harness, server, end
):
    connection = harness.attached(slots=1)
    harness.feed(connection, Request(5, HANDLE, 1, (0,), ASYNC))
    harness.state.deregister()
    assert deregisters_sent(harness) == 0
    if end == "cancel":
        harness.feed(connection, Cancel(5))
    elif end == "close":
        harness.feed(connection, Close(HANDLE))
    elif end == "connection end":
        harness.rules.connection_ended(connection)
    else:
        harness.state.receive(Disconnect(99, HANDLE))
    assert deregisters_sent(harness) == 1
