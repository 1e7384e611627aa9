"""Tests of ipcfw.server.state: the server's rules, fed as decoded messages, checked on frames.

No processes, sockets or sleeps (STYLE.md 2.14): each test builds a `ServerState` over a
plugin (through `Layers`, with a fake loop), feeds it what a kernel would send with `receive`,
and asserts on the frames it emits (decoded back) and on what the plugin saw. The wiring (a
real kernel, the host's socket and outbox) is tested by the process tests beside this file.
"""

from __future__ import annotations

import struct
import threading
from typing import Any
from collections.abc import Callable

import pytest

from ipcfw import errors
from ipcfw.protocol import (
    ERROR_STRING_FUNCTION,
    MAX_ERROR_TEXT,
    MAX_FRAME,
    TRUNCATED,
    Cancelled,
    Complete,
    Completed,
    Deliver,
    Deregister,
    Disconnect,
    Dropped,
    Hello,
    Negotiated,
    NewSession,
    Panic,
    PeerGone,
    PeerInfo,
    Terminating,
    TerminationReason,
    decode,
)
from ipcfw.server import (
    ClientInfo,
    COverlay,
    COverlaySession,
    CServer,
    CSession,
    RMessage,
    ServerPanic,
)
from ipcfw.server.message import cancel_by_client, complete_unless_ended
from ipcfw.server.overlay import Layers
from ipcfw.server.state import DEREGISTER_REQ, Outcome, ServerState
from ipcfw.version import TVersion

HANDLE = 0x101
CLIENT = 7
ROUTING_ID = b"r" * 16


class FakeLoop:
    """The host's loop as the layering sees it: which thread we are on, and call_soon."""

    def __init__(self) -> None:
        self.on_loop = True
        self.calls: list[Callable[[], None]] = []

    def on_loop_thread(self) -> bool:
        return self.on_loop

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.calls.append(fn)

    def run_calls(self) -> None:
        calls, self.calls = self.calls, []
        for fn in calls:
            fn()


class Recorder(CSession):
    """A session that records what it is asked, and holds messages unless told otherwise."""

    def CreateL(self) -> None:
        self.Server().events.append(("create", type(self).__name__))

    def ServiceL(self, message: RMessage) -> None:
        server = self.Server()
        server.events.append(("service", type(self).__name__, message.Function()))
        server.held.append(message)
        action = server.actions.pop(0) if server.actions else None
        if action is not None:
            action(self, message)

    def Cancelled(self, message: RMessage) -> None:
        self.Server().events.append(("cancelled", message.Function()))

    def Disconnect(self, message: RMessage) -> None:
        self.Server().events.append(("disconnect", type(self).__name__))
        message.Complete(errors.KErrNone)


class Server(CServer):
    name = "state-test"
    version = TVersion(1, 2, 0)
    session_class = Recorder
    error_strings = {-9001: "server's own"}

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.held: list[RMessage] = []
        # what ServiceL does with each next message, after recording it (None: hold it)
        self.actions: list[Callable[[CSession, RMessage], None] | None] = []
        self.refuse: int | None = None

    def AcceptL(self, client: ClientInfo | None, version: TVersion, payload: bytes) -> bytes:
        if self.refuse is not None:
            raise errors.IpcError(self.refuse, "refused by the test")
        return b"hi " + payload

    def TerminateIndication(self, reason: TerminationReason) -> None:
        self.events.append(("indication", reason))


def complete_with(value: int) -> Callable[[CSession, RMessage], None]:
    return lambda session, message: message.Complete(value)


class Harness:
    """A `ServerState` over `top`, and the frames it sent, decoded."""

    def __init__(self, top: CServer | COverlay, max_frame: int = MAX_FRAME) -> None:
        self.loop = FakeLoop()
        self.layers = Layers(top, self.loop)
        self.sent: list[Any] = []
        self.state = ServerState(self.layers, self.emit, max_frame=max_frame,
                                 routing_id=ROUTING_ID)
        self._next_msg = 100

    def emit(self, frame: bytes) -> None:
        self.sent.append(decode(frame))

    def take(self) -> list[Any]:
        sent, self.sent = self.sent, []
        return sent

    def msg_id(self) -> int:
        self._next_msg += 1
        return self._next_msg

    def connect(self, handle: int = HANDLE, version: tuple[int, int, int] = (1, 0, 0),
                payload: bytes = b"") -> Any:
        msg_id = self.msg_id()
        assert self.state.receive(NewSession(msg_id, handle, version, CLIENT, payload)) is None
        (reply,) = self.take()
        assert reply.msg_id == msg_id
        return reply

    def deliver(self, function: int, args: tuple[Any, ...] = (), handle: int = HANDLE) -> int:
        msg_id = self.msg_id()
        assert self.state.receive(Deliver(msg_id, handle, function, args, CLIENT)) is None
        return msg_id


@pytest.fixture
def server() -> Server:
    return Server()


@pytest.fixture
def harness(server: Server) -> Harness:
    return Harness(server)


# -- sessions --------------------------------------------------------------------------------


def test_a_connect_opens_a_session_and_answers_the_negotiation(harness, server):
    reply = harness.connect(payload=b"there")
    assert reply == Negotiated(reply.msg_id, errors.KErrNone, b"hi there")
    assert server.events == [("create", "Recorder")]
    assert harness.state.statistics() == {
        "sessions": 1, "in_service": 0, "refused": 0, "coroutines": 0
    }


def test_a_version_not_served_refuses_the_connect(harness, server):
    reply = harness.connect(version=(1, 3, 0))
    assert reply == Complete(reply.msg_id, errors.KErrNotSupported, (),
                             "server 'state-test' serves version 1.2.0; the client asked for 1.3.0")
    assert server.events == [] and harness.state.statistics()["sessions"] == 0


def test_a_refused_connects_first_request_is_answered_bad_handle_quietly(harness, server):
    server.refuse = errors.KErrPermissionDenied
    reply = harness.connect()
    assert reply.value == errors.KErrPermissionDenied
    first = harness.deliver(1)  # sent with the connect: expected, not a problem
    assert harness.take() == [Complete(first, errors.KErrBadHandle, ())]
    assert harness.state.problems == {}
    second = harness.deliver(1)  # a second one is
    assert harness.take() == [Complete(second, errors.KErrBadHandle, ())]
    assert harness.state.problems == {"request for an unknown session": 1}
    assert server.events == []


def test_a_connect_completed_by_the_plugin_is_refused_with_a_server_panic(server):
    class Eager(Recorder):
        def CreateL(self) -> None:
            raise ServerPanic("test", 1)

    server.session_class = Eager
    harness = Harness(server)
    assert harness.connect().value == errors.KErrGeneral
    assert harness.state.statistics()["sessions"] == 0


def test_peer_info_names_the_client_of_later_messages(harness, server):
    harness.state.receive(PeerInfo(CLIENT, 4242, 1000, 1000, "/usr/bin/python3"))
    harness.connect()
    harness.deliver(1)
    assert server.held[0].Client() == ClientInfo(4242, 1000, 1000, "/usr/bin/python3")
    harness.state.receive(PeerGone(CLIENT))
    harness.deliver(2)
    with pytest.raises(ServerPanic):
        server.held[1].Client()
    assert server.held[0].Client().pid == 4242  # a message keeps the ClientInfo it was built with


def test_an_unexpected_message_is_counted_not_obeyed(harness):
    assert harness.state.receive(Hello(1, 1)) is None
    assert harness.state.problems == {"unexpected message": 1}
    assert harness.take() == []


# -- requests and completion -----------------------------------------------------------------


def test_a_request_stays_in_service_until_completed(harness, server):
    harness.connect()
    msg_id = harness.deliver(5, (42,))
    assert [m.Int0() for m in harness.state.in_service(HANDLE)] == [42]
    assert harness.take() == []
    server.held[0].Complete(7)
    assert harness.take() == [Complete(msg_id, 7, ())]
    assert harness.state.in_service(HANDLE) == []


def test_completing_twice_raises_user_70_and_sends_once(harness, server):
    harness.connect()
    msg_id = harness.deliver(1)
    message = server.held[0]
    message.Complete(1)
    with pytest.raises(ServerPanic) as twice:
        message.Complete(2)
    assert (twice.value.category, twice.value.reason) == ("USER", 70)
    with pytest.raises(ServerPanic) as panic_after:
        message.Panic("late", 3)
    assert (panic_after.value.category, panic_after.value.reason) == ("KERN-EXEC", 44)
    assert harness.take() == [Complete(msg_id, 1, ())]


def test_a_panic_is_a_completion(harness, server):
    harness.connect()
    msg_id = harness.deliver(1)
    server.held[0].Panic("a-category-longer-than-16", 9)
    with pytest.raises(ServerPanic) as after:
        server.held[0].Complete(0)
    assert (after.value.category, after.value.reason) == ("USER", 70)
    assert harness.take() == [Panic(msg_id, "a-category-longe", 9)]


def test_writes_reach_the_completion_and_an_oversized_one_becomes_overflow(server):
    harness = Harness(server, max_frame=64)
    harness.connect()
    small = harness.deliver(1, ((b"ab", 8),))
    server.held[0].WriteL(0, b"xyz", 1)
    server.held[0].Complete(0)
    assert harness.take() == [Complete(small, 0, ((0, b"axyz"),))]
    big = harness.deliver(1, ((b"", 200),))
    server.held[1].WriteL(0, b"x" * 200)
    server.held[1].Complete(0)
    assert harness.take() == [Complete(big, errors.KErrOverflow, (), "the server's answer to "
                                       "function 1 (210 bytes) is over the 64-byte frame limit")]


@pytest.mark.parametrize(
    "exc, code, text",
    [(errors.IpcError(errors.KErrNotFound), errors.KErrNotFound, ""),
     (errors.IpcError(errors.KErrNotFound, "no key"), errors.KErrNotFound, "no key"),
     (KeyError("boom"), errors.KErrGeneral,
      "KeyError in the server's ServiceL (function 1); the traceback is in the server's log")],
)
def test_service_l_raising_completes_through_service_error(harness, server, exc, code, text):
    def fail(session: CSession, message: RMessage) -> None:
        raise exc

    server.actions.append(fail)
    harness.connect()
    msg_id = harness.deliver(1)
    assert harness.take() == [Complete(msg_id, code, (), text)]
    assert harness.state.in_service(HANDLE) == []
    assert harness.deliver(2) and server.events[-1] == ("service", "Recorder", 2)  # still serving
    server.held[-1].Complete(0)  # (not left for the interpreter's exit to find forgotten)


def test_a_service_error_override_answers_instead(server):
    class Answering(Recorder):
        def ServiceError(self, message: RMessage, error: errors.IpcError) -> None:
            message.Complete(1000 - error.code)

    def fail(session: CSession, message: RMessage) -> None:
        raise errors.IpcError(errors.KErrNotFound)

    server.session_class = Answering
    server.actions.append(fail)
    harness = Harness(server)
    harness.connect()
    msg_id = harness.deliver(1)
    assert harness.take() == [Complete(msg_id, 1000 - errors.KErrNotFound, ())]


def test_the_frameworks_fallback_completion_never_panics_nor_sends_twice(harness, server):
    """`complete_unless_ended` is how the framework completes a message for a plugin that did
    not (ServiceL or Disconnect raised): if another thread ended the message first, it must
    neither raise USER 70 out of the loop nor send a second answer."""
    harness.connect()
    done_id, _, pending_id = (harness.deliver(1) for _ in range(3))
    done, cancelled, pending = server.held
    done.Complete(5)  # a worker thread won the race
    assert cancel_by_client(cancelled)
    complete_unless_ended(done, errors.KErrGeneral)
    complete_unless_ended(cancelled, errors.KErrGeneral)
    complete_unless_ended(pending, errors.KErrGeneral)
    assert harness.take() == [Complete(done_id, 5, ()),
                              Complete(pending_id, errors.KErrGeneral, ())]
    with pytest.raises(ServerPanic, match="USER 70"):
        pending.Complete(0)  # the plugin's own second Complete still panics


def test_error_string_asks_the_overlays_first_then_the_server(server):
    class Owner(COverlay):
        error_strings = {-9001: "overlay's", -9002: "overlay only"}

    harness = Harness(Owner(server))
    harness.connect()
    answers = []
    for code in (-9001, -9002, -1):
        msg_id = harness.deliver(ERROR_STRING_FUNCTION, (code, (b"", 5)))
        answers.append((harness.take(), msg_id))
    assert answers[0] == ([Complete(answers[0][1], 5, ((1, b"overl"),))], answers[0][1])
    assert answers[1][0] == [Complete(answers[1][1], 5, ((1, b"overl"),))]
    assert answers[2][0] == [Complete(answers[2][1], 0, ())]  # nobody's: the client's own table
    assert server.events == [("create", "Recorder")]  # ServiceL never saw them


def test_a_bad_error_string_request_is_refused_and_the_server_goes_on(harness, server):
    harness.connect()
    not_a_descriptor = harness.deliver(ERROR_STRING_FUNCTION, (5, 7))
    not_an_int = harness.deliver(ERROR_STRING_FUNCTION, (b"x", (b"", 10)))
    assert harness.take() == [Complete(not_a_descriptor, errors.KErrBadDescriptor, ()),
                              Complete(not_an_int, errors.KErrArgument, ())]
    server.actions.append(complete_with(4))
    harness.deliver(1)
    assert values(harness) == [4]


# -- cancel ----------------------------------------------------------------------------------


def test_a_cancel_of_a_message_in_service_ends_it_and_tells_the_session(harness, server):
    harness.connect()
    msg_id = harness.deliver(3)
    harness.state.receive(Cancelled(msg_id, HANDLE))
    message = server.held[0]
    assert server.events[-1] == ("cancelled", 3)
    assert message.IsNull() and message.IsCancelled()
    assert harness.state.in_service(HANDLE) == []
    message.Complete(0)  # the kernel completed it for the client: silently dropped
    message.Panic("too late", 1)
    assert harness.take() == []


def test_a_cancel_that_lost_the_race_to_a_completion_changes_nothing(harness, server):
    harness.connect()
    msg_id = harness.deliver(3)
    server.held[0].Complete(5)
    harness.state.receive(Cancelled(msg_id, HANDLE))
    assert harness.take() == [Complete(msg_id, 5, ())]
    assert not server.held[0].IsCancelled()
    assert server.events[-1] == ("service", "Recorder", 3)  # no Cancelled callback
    harness.state.receive(Cancelled(msg_id + 1000, HANDLE))  # one it never had: nothing
    assert harness.take() == []


def test_complete_and_cancel_racing_on_threads_end_each_message_once(harness, server):
    harness.connect()
    msg_ids = [harness.deliver(function) for function in range(200)]
    messages = list(server.held)
    start = threading.Barrier(2)
    wins: list[bool] = []

    def complete_all() -> None:
        start.wait()
        for message in messages:
            message.Complete(1)  # never raises: the only other party is the cancel

    def cancel_all() -> None:
        start.wait()
        wins.extend(cancel_by_client(message) for message in messages)

    threads = [threading.Thread(target=complete_all), threading.Thread(target=cancel_all)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    completed = {frame.msg_id for frame in harness.take()}
    cancelled = {msg_id for msg_id, won in zip(msg_ids, wins) if won}
    assert completed.isdisjoint(cancelled)
    assert len(completed) + len(cancelled) == len(messages)
    assert all(m.IsNull() for m in messages) and harness.state.in_service(HANDLE) == []


def test_a_message_is_forgotten_once_completed_cancelled_or_disconnected(harness, server):
    """Each delivered request stays findable for a Cancel until it completes, is cancelled,
    or its session ends; then the state forgets it (no leak), even if the plugin holds it."""
    harness.connect()
    server.actions += [complete_with(i) for i in range(20)]
    for i in range(20):
        harness.deliver(1, (i,))
    assert values(harness) == list(range(20))
    held = [harness.deliver(2, (tag,)) for tag in range(3)]
    assert [m.Int0() for m in harness.state.in_service(HANDLE)] == [0, 1, 2]
    harness.state.receive(Cancelled(held[0], HANDLE))
    assert [m.Int0() for m in harness.state.in_service(HANDLE)] == [1, 2]
    server.held[21].Complete(11)
    assert [m.Int0() for m in harness.state.in_service(HANDLE)] == [2]
    harness.state.receive(Disconnect(harness.msg_id(), HANDLE))
    assert harness.state.statistics()["in_service"] == 0
    assert not server.held[22].IsNull()  # the plugin's code still holds it


# -- disconnect ------------------------------------------------------------------------------


class Cursor:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def Close(self) -> None:
        self.log.append("closed")


def test_disconnect_ends_the_session_and_closes_its_subsessions(server):
    closed: list[str] = []

    def open_cursor(session: CSession, message: RMessage) -> None:
        session.NewSubSessionL(message, Cursor(closed))
        message.Complete(0)

    server.actions += [open_cursor, None]
    harness = Harness(server)
    harness.connect()
    opened = harness.deliver(10, (0, 0, 0, (b"", 4)))
    held = harness.deliver(11)
    assert harness.take()[0].msg_id == opened
    disconnect_id = harness.msg_id()
    harness.state.receive(Disconnect(disconnect_id, HANDLE))
    assert harness.take() == [Complete(disconnect_id, errors.KErrNone, ())]
    assert server.events[-1] == ("disconnect", "Recorder") and closed == ["closed"]
    assert harness.state.statistics() == {
        "sessions": 0, "in_service": 0, "refused": 0, "coroutines": 0
    }
    harness.state.receive(Cancelled(held, HANDLE))  # the kernel answered it: nothing to find
    assert server.events[-1] == ("disconnect", "Recorder")


def test_a_disconnect_raising_still_completes_and_closes_subsessions(server):
    closed: list[str] = []

    class Raising(Recorder):
        def Disconnect(self, message: RMessage) -> None:
            raise RuntimeError("bug in Disconnect")

    def open_cursor(session: CSession, message: RMessage) -> None:
        session.NewSubSessionL(message, Cursor(closed))
        message.Complete(0)

    server.session_class = Raising
    server.actions.append(open_cursor)
    harness = Harness(server)
    harness.connect()
    harness.deliver(10, (0, 0, 0, (b"", 4)))
    harness.take()
    disconnect_id = harness.msg_id()
    harness.state.receive(Disconnect(disconnect_id, HANDLE))
    assert harness.take() == [Complete(disconnect_id, errors.KErrNone, ())]
    assert closed == ["closed"]


def test_a_disconnect_for_an_unknown_session_is_answered(harness):
    harness.state.receive(Disconnect(55, 0x999))
    assert harness.take() == [Complete(55, errors.KErrNone, ())]


# -- generations -----------------------------------------------------------------------------


def test_nothing_of_an_ended_registration_is_ever_sent(server):
    old = Harness(server)
    old.connect()
    old.deliver(1)
    held = server.held[0]
    assert old.state.end() == 1  # the kernel died
    assert server.events[-1] == ("disconnect", "Recorder")  # its Disconnect was not sent...
    assert old.take() == []
    new = Harness(server)  # the next kernel: same handle, same message numbers
    new._next_msg = old._next_msg - 2
    new.connect()
    new.deliver(1)
    held.Complete(99)  # ...nor is a completion of the old kernel's message, held till now
    assert old.take() == [] and new.take() == []
    server.held[1].Complete(1)
    assert [frame.value for frame in new.take()] == [1]
    assert old.state.receive(Deliver(1, HANDLE, 1, (), CLIENT)) is None
    assert old.take() == []  # (and an ended state answers nothing at all)


def test_ending_closes_the_subsessions_of_every_session(server):
    closed: list[str] = []

    def open_cursor(session: CSession, message: RMessage) -> None:
        session.NewSubSessionL(message, Cursor(closed))
        message.Complete(0)

    server.actions += [open_cursor, open_cursor]
    harness = Harness(server)
    harness.connect(HANDLE)
    harness.connect(HANDLE + 1)
    harness.deliver(10, (0, 0, 0, (b"", 4)), HANDLE)
    harness.deliver(10, (0, 0, 0, (b"", 4)), HANDLE + 1)
    assert harness.state.end() == 2
    assert closed == ["closed", "closed"]
    assert harness.state.statistics() == {
        "sessions": 0, "in_service": 0, "refused": 0, "coroutines": 0
    }


# -- termination and deregistration ---------------------------------------------------------


def test_termination_is_indicated_once_then_the_server_deregisters(harness, server):
    harness.connect()
    harness.deliver(1)
    reason = int(TerminationReason.SHUTDOWN)
    assert harness.state.receive(Terminating(reason)) is None
    assert harness.state.receive(Terminating(reason)) is None
    assert server.events[-1] == ("indication", TerminationReason.SHUTDOWN)
    assert [e for e in server.events if e[0] == "indication"] == [server.events[-1]]
    assert harness.take() == [Deregister(DEREGISTER_REQ)]
    harness.state.deregister()  # asked again (ServerHost.Deregister): sent once
    assert harness.take() == []
    server.held[0].Complete(3)  # outstanding messages still complete
    assert [type(f) for f in harness.take()] == [Complete]
    assert harness.state.receive(Completed(DEREGISTER_REQ + 5, 0, ())) is None
    assert harness.state.receive(Completed(DEREGISTER_REQ, 0, ())) is Outcome.DEREGISTERED
    assert harness.state.deregistered


def test_a_deregistration_asked_first_is_not_asked_again_by_the_indication(harness, server):
    harness.state.deregister()
    harness.state.receive(Terminating(int(TerminationReason.ADMINISTRATOR)))
    assert harness.take() == [Deregister(DEREGISTER_REQ)]
    assert server.events == [("indication", TerminationReason.ADMINISTRATOR)]


def test_a_completed_that_is_not_our_deregistration_means_nothing(harness):
    assert harness.state.receive(Completed(DEREGISTER_REQ, 0, ())) is None
    assert not harness.state.deregistered


def test_a_dropped_notice_for_our_socket_ends_the_registration(harness):
    assert harness.state.receive(Dropped(b"x" * 16, 10)) is None
    assert harness.state.problems == {"Dropped notice for another socket": 1}
    assert harness.state.receive(Dropped(ROUTING_ID, 10)) is Outcome.DROPPED
    assert harness.state.dropped


# -- overlays and hand-off -------------------------------------------------------------------


class Manager(COverlaySession):
    """Manages a session: answers 1000 + function, and hands off on function 9."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def ServiceL(self, message: RMessage) -> None:
        self.log.append(f"overlay {message.Function()}")
        message.Complete(1000 + message.Function())
        if message.Function() == 9:
            self.HandOff()
            self.HandOff()  # a second one does nothing

    def Disconnect(self, message: RMessage) -> None:
        self.log.append("overlay disconnect")
        message.Complete(errors.KErrNone)


class Managing(COverlay):
    def __init__(self, overlaid: CServer | COverlay) -> None:
        super().__init__(overlaid)
        self.log: list[str] = []
        self.sessions: list[Manager] = []

    def NewSessionL(self, version: TVersion, message: RMessage) -> Manager:
        session = Manager(self.log)
        self.sessions.append(session)
        return session


class Passing(COverlay):
    def NewSessionL(self, version: TVersion, message: RMessage) -> None:
        return None  # hands off at once


def served(server: Server) -> list[Any]:
    return [e[1:] for e in server.events if e[0] == "service"]


def values(harness: Harness) -> list[int]:
    return [frame.value for frame in harness.take()]


def test_a_hand_off_in_service_l_takes_effect_before_the_next_request(server):
    class Watching(Manager):
        def ServiceL(self, message: RMessage) -> None:
            super().ServiceL(message)  # (hands off on 9)
            opened = server.events.count(("create", "Recorder"))
            self.log.append(f"returns, server sessions: {opened}")

    class Overlay(Managing):
        def NewSessionL(self, version: TVersion, message: RMessage) -> Manager:
            session = Watching(self.log)
            self.sessions.append(session)
            return session

    overlay = Overlay(Passing(server))
    harness = Harness(overlay)
    harness.connect()
    assert overlay.sessions[0].Overlay() is overlay
    server.actions += [complete_with(1), complete_with(2)]
    for function in (1, 9, 2, 3):
        harness.deliver(function)
    # The next layer's session is opened after the ServiceL that handed off returned...
    assert overlay.log == ["overlay 1", "returns, server sessions: 0",
                           "overlay 9", "returns, server sessions: 0"]
    # ...and before the next request, which it gets, in order, none lost.
    assert served(server) == [("Recorder", 2), ("Recorder", 3)]
    assert values(harness) == [1001, 1009, 1, 2]


def test_a_hand_off_from_another_thread_happens_on_the_loop_in_order(server):
    overlay = Managing(server)
    harness = Harness(overlay)
    harness.connect()
    server.actions += [complete_with(3), complete_with(4)]
    harness.deliver(1)
    harness.loop.on_loop = False  # the overlay's own thread hands off...
    overlay.sessions[0].HandOff()
    harness.loop.on_loop = True
    harness.deliver(2)  # ...which reaches the loop after this request: the overlay has it
    harness.loop.run_calls()
    harness.deliver(3)
    harness.deliver(4)
    assert overlay.log == ["overlay 1", "overlay 2"]
    assert served(server) == [("Recorder", 3), ("Recorder", 4)]
    assert values(harness) == [1001, 1002, 3, 4]


def test_a_hand_off_during_create_l_takes_effect_before_the_first_request(server):
    # CreateL itself (or a thread it starts, which may run before CreateL returns) hands off:
    # the session is not bound to its layer yet, so the hand-off waits for that.
    class HandsOffAtOnce(Manager):
        def CreateL(self) -> None:
            self.HandOff()
            self.log.append("created")

    class Overlay(Managing):
        def NewSessionL(self, version: TVersion, message: RMessage) -> Manager:
            return HandsOffAtOnce(self.log)

    overlay = Overlay(server)
    harness = Harness(overlay)
    harness.connect()
    server.actions += [complete_with(5)]
    harness.deliver(1)
    assert overlay.log == ["created"]
    assert served(server) == [("Recorder", 1)]
    assert values(harness) == [5]


def test_a_layer_refusing_the_handed_off_session_fails_every_later_request(server):
    overlay = Managing(server)
    harness = Harness(overlay)
    harness.connect()
    server.session_class = None  # the server's NewSessionL raises (NotImplementedError)
    harness.deliver(9)
    assert values(harness) == [1009]
    harness.deliver(1)
    harness.deliver(2)
    assert values(harness) == [errors.KErrGeneral, errors.KErrGeneral]
    assert served(server) == []


def test_a_disconnect_while_an_overlay_manages_the_session_stops_it(server):
    overlay = Managing(server)
    harness = Harness(overlay)
    harness.connect()
    manager = overlay.sessions[0]
    harness.state.receive(Disconnect(77, HANDLE))
    assert manager.stopping.is_set()
    assert overlay.log == ["overlay disconnect"]
    assert harness.take() == [Complete(77, errors.KErrNone, ())]
    manager.HandOff()  # after the disconnect: ignored
    assert server.events == []


def test_an_overlays_subsessions_end_at_the_hand_off(server):
    closed: list[str] = []

    class Subsessions(Manager):
        def ServiceL(self, message: RMessage) -> None:
            if message.Function() == 10:
                self.NewSubSessionL(message, Cursor(closed))
                message.Complete(0)
            else:
                super().ServiceL(message)

    class Owning(Managing):
        def NewSessionL(self, version: TVersion, message: RMessage) -> Manager:
            return Subsessions(self.log)

    harness = Harness(Owning(server))
    harness.connect()
    harness.deliver(10, (0, 0, 0, (b"", 4)))
    assert closed == []
    harness.deliver(9)
    assert closed == ["closed"]
    assert server.events == [("create", "Recorder")]


def test_a_session_handed_off_at_once_goes_straight_to_the_server(server):
    harness = Harness(Passing(Passing(server)))
    harness.connect()
    server.actions.append(complete_with(5))
    harness.deliver(1)
    assert values(harness) == [5]
    assert isinstance(server.held[0].Session(), Recorder)  # the layer's session, not a wrapper


def test_a_subsession_handle_in_argument_3_is_written_as_four_bytes(harness, server):
    def open_cursor(session: CSession, message: RMessage) -> None:
        message.Complete(session.NewSubSessionL(message, Cursor([])))

    server.actions.append(open_cursor)
    harness.connect()
    harness.deliver(10, (0, 0, 0, (b"", 4)))
    (frame,) = harness.take()
    assert frame.writes == ((3, struct.pack("<i", frame.value)),)


# -- errors that say what happened, forgotten completions -------------------------------------


@pytest.mark.parametrize(
    "value, error, text",
    [
        (True, TypeError, "Complete(True): a bool is not a completion value; complete with an "
                          "int (KErrNone, a count) or an IpcError"),
        ("ok", TypeError, "Complete('ok'): a completion value is an int (>= 0 success, < 0 an "
                          "error code) or an IpcError, not str"),
        (None, TypeError, "Complete(None): a completion value is an int (>= 0 success, < 0 an "
                          "error code) or an IpcError, not NoneType"),
        (2**40, ValueError, "Complete(1099511627776): a completion value is a 32-bit signed int "
                            "(-2147483648..2147483647)"),
    ],
)
def test_a_bad_completion_value_raises_at_the_call_naming_it(harness, server, value, error, text):
    harness.connect()
    msg_id = harness.deliver(1)
    with pytest.raises(error) as caught:
        server.held[0].Complete(value)
    assert str(caught.value) == text
    assert not server.held[0].IsNull() and harness.take() == []  # still pending: nothing sent
    server.held[0].Complete(7)
    assert harness.take() == [Complete(msg_id, 7, ())]


def test_complete_with_an_ipcerror_sends_its_code_and_text(harness, server):
    harness.connect()
    msg_id = harness.deliver(1)
    server.held[0].Complete(errors.IpcError(errors.KErrNotFound, "no key b'colour'"))
    assert harness.take() == [Complete(msg_id, errors.KErrNotFound, (), "no key b'colour'")]


def test_an_error_text_is_cut_to_the_bound_with_a_marker(harness, server):
    server.actions.append(lambda session, message: message.Complete(
        errors.IpcError(errors.KErrArgument, "x" * (MAX_ERROR_TEXT + 1))))
    harness.connect()
    harness.deliver(1)
    [complete] = harness.take()
    assert len(complete.text) == MAX_ERROR_TEXT and complete.text.endswith(TRUNCATED)
    assert complete.text == "x" * (MAX_ERROR_TEXT - len(TRUNCATED)) + TRUNCATED


def test_a_bare_not_supported_names_the_function_and_the_fix(harness, server):
    def refuse(session: CSession, message: RMessage) -> None:
        raise errors.IpcError(errors.KErrNotSupported)

    server.actions.append(refuse)
    harness.connect()
    msg_id = harness.deliver(42)
    assert harness.take() == [Complete(msg_id, errors.KErrNotSupported, (), (
        "server 'state-test' does not support function 42 (Recorder.ServiceL refused it): "
        "check the function number the client sends, and that client and server use the same "
        "interface version"))]


@pytest.mark.parametrize("send_text", [False, True])
def test_another_exception_names_its_type_and_the_log(server, send_text, caplog):
    server.send_exception_text = send_text
    harness = Harness(server)

    def fail(session: CSession, message: RMessage) -> None:
        raise KeyError("secret-key")

    server.actions.append(fail)
    harness.connect()
    msg_id = harness.deliver(3)
    detail = ": 'secret-key'" if send_text else ""
    assert harness.take() == [Complete(msg_id, errors.KErrGeneral, (), (
        f"KeyError in the server's ServiceL (function 3){detail}; the traceback is in the "
        "server's log"))]
    assert "KeyError: 'secret-key'" in caplog.text  # the traceback, in the server's log


def deferring_state(server: Server) -> tuple[ServerState, FakeLoop, list[Any]]:
    """A state whose `defer` is a fake loop's call_soon (as the host's is), a session open
    (connect msg 1, acknowledged in `sent[0]`), and the frames it sends, decoded."""
    loop = FakeLoop()
    sent: list[Any] = []
    state = ServerState(Layers(server, loop), lambda f: sent.append(decode(f)),
                        max_frame=MAX_FRAME, defer=loop.call_soon)
    state.receive(NewSession(1, HANDLE, (1, 0, 0), CLIENT, b""))
    return state, loop, sent


def test_a_request_let_go_of_is_completed_on_the_loop_and_logged(server, caplog):
    state, loop, sent = deferring_state(server)
    server.actions.append(lambda session, message: server.held.remove(message))  # let go
    assert state.receive(Deliver(2, HANDLE, 5, (), CLIENT)) is None
    assert sent[1:] == [] and len(loop.calls) == 1  # the finalizer did no I/O: deferred
    loop.run_calls()
    assert sent[1:] == [Complete(2, errors.KErrGeneral, (), (
        "the server dropped the request without completing it (function 5); see the server's "
        "log"))]
    assert ("the server let go of message 2 (function 5) of session 0x101 without completing "
            "it: its client gets KErrGeneral") in caplog.text
    assert state.in_service(HANDLE) == [] and state.statistics()["in_service"] == 0


def test_a_request_held_or_completed_is_not_forgotten(server):
    state, loop, sent = deferring_state(server)
    state.receive(Deliver(2, HANDLE, 5, (), CLIENT))  # held by the Recorder
    server.actions.append(complete_with(9))
    state.receive(Deliver(3, HANDLE, 5, (), CLIENT))
    server.held.pop()  # completed, then let go: nothing more to do
    assert loop.calls == [] and sent[1:] == [Complete(3, 9, ())]
    assert [m.Function() for m in state.in_service(HANDLE)] == [5]


def test_a_request_let_go_of_after_the_registration_ended_sends_nothing(server):
    state, loop, sent = deferring_state(server)
    state.receive(Deliver(2, HANDLE, 5, (), CLIENT))
    state.end()
    server.held.clear()
    loop.run_calls()
    assert loop.calls == [] and [m for m in sent if type(m) is Complete] == []


def test_a_disconnect_let_go_of_is_completed_and_frees_the_session(server, caplog):
    class Forgetful(Recorder):
        def Disconnect(self, message: RMessage) -> None:
            self.Server().events.append(("disconnect", "Forgetful"))  # neither completed nor kept

    server.session_class = Forgetful
    state, loop, sent = deferring_state(server)
    state.receive(Disconnect(2, HANDLE))
    assert sent[1:] == [] and len(loop.calls) == 1
    loop.run_calls()
    assert sent[1:] == [Complete(2, errors.KErrNone, ())]
    assert "Disconnect let go of the disconnect message of session 0x101" in caplog.text


def test_an_overlays_refusal_names_the_server_under_it(server):
    class GateSession(COverlaySession):
        def ServiceL(self, message: RMessage) -> None:
            raise errors.IpcError(errors.KErrNotSupported)

    class Gate(COverlay):
        def NewSessionL(self, version: TVersion, message: RMessage) -> COverlaySession:
            return GateSession()

    harness = Harness(Gate(server))
    harness.connect()
    msg_id = harness.deliver(7)
    [complete] = harness.take()
    assert complete.msg_id == msg_id and complete.text.startswith(
        "server 'state-test' does not support function 7 (GateSession.ServiceL refused it)")
