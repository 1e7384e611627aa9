"""Subsessions: RSubSession in the client, CSession's object index in the server.

Against a real kernel, with the key-value server (servers/kv.py: cursors and tables) in its own
process, and, where a test needs a server of its own, one hosted on a thread of this process.
"""

from __future__ import annotations

import asyncio
import struct
import textwrap
import threading

import pytest

from conftest import wait_until
from ipcfw import (
    BadDescriptor,
    BadHandle,
    BadName,
    ClientPanic,
    CServer,
    CSession,
    EndOfFile,
    KErrBadHandle,
    KErrEof,
    KErrNone,
    NotFound,
    Overflow,
    RMessage,
    RSession,
    RSubSession,
    ServerHost,
    ServerTerminated,
    TIpcArgs,
    TRequestStatus,
    User,
)
from servers.kv import (
    ECloseCursor,
    ECloseTable,
    ECount,
    ECursorNext,
    EOpenCursor,
    EOpenCursors,
    EOpenTable,
    ESet,
    ETableCount,
    ETableDelete,
    ETableGet,
    ETableSet,
)

pytestmark = pytest.mark.usefixtures("data_path")  # each test on both data paths

TIMEOUT = 5.0


@pytest.fixture
def kv(kernel):
    kernel.kv_server = kernel.serve("servers.kv:KvServer", "kv")
    return kernel


def _fill(session: RSession, keys: dict[bytes, bytes]) -> None:
    for key, value in keys.items():
        session.SendReceive(ESet, (key, value))


def _next(cursor: RSubSession, with_value: bool = True) -> tuple[bytes, bytes] | None:
    key, value = bytearray(64), bytearray(64)
    try:
        length = cursor.SendReceive(ECursorNext, (key, value) if with_value else (key,))
    except EndOfFile:
        return None
    assert length == len(key)
    return bytes(key), bytes(value) if with_value else b""


def _walk(cursor: RSubSession) -> list[bytes]:
    keys = []
    while (item := _next(cursor, with_value=False)) is not None:
        keys.append(item[0])
    return keys


def _open_cursors(session: RSession) -> int:
    return session.SendReceive(EOpenCursors)


def _cursors_back_to(observer: RSession, count: int) -> None:
    wait_until(lambda: _open_cursors(observer) == count, timeout=TIMEOUT,
               what=f"{count} open cursors in the kv server")


# -- create, use, close ------------------------------------------------------------------------


def test_cursor_create_use_close(kv):
    with RSession.connect("kv") as session:
        _fill(session, {b"fruit:apple": b"red", b"fruit:kiwi": b"green", b"veg:leek": b"white",
                        b"fruit:banana": b"yellow"})
        cursor = RSubSession()
        assert cursor.SubSessionHandle() == 0 and cursor.Session() is None
        cursor.CreateSubSession(session, EOpenCursor, (b"fruit:",))
        assert cursor.SubSessionHandle() != 0
        assert cursor.Session() is session
        assert _open_cursors(session) == 1

        assert _next(cursor) == (b"fruit:apple", b"red")
        assert _next(cursor) == (b"fruit:banana", b"yellow")
        assert _next(cursor) == (b"fruit:kiwi", b"green")
        assert _next(cursor) is None
        assert _next(cursor) is None  # stays at the end
        with pytest.raises(EndOfFile) as raised:
            cursor.SendReceive(ECursorNext, (bytearray(8),))
        assert raised.value.code == KErrEof

        cursor.CloseSubSession(ECloseCursor)
        assert cursor.SubSessionHandle() == 0 and cursor.Session() is None
        assert _open_cursors(session) == 0
        assert session.SendReceive(ECount) == 4  # the session itself is unaffected


def test_cursor_without_prefix_walks_a_snapshot_of_every_key(kv):
    with RSession.connect("kv") as session:
        _fill(session, {b"b": b"2", b"a": b"1", b"c": b"3"})
        with RSubSession.open(session, EOpenCursor, ECloseCursor) as cursor:
            session.SendReceive(ESet, (b"aa", b"added later"))  # not in the snapshot
            session.SendReceive(ESet, (b"b", b"changed"))  # values are read as they are now
            assert _next(cursor) == (b"a", b"1")
            assert _next(cursor) == (b"b", b"changed")
            assert _next(cursor) == (b"c", b"3")
            assert _next(cursor) is None
            assert _open_cursors(session) == 1
        assert cursor.SubSessionHandle() == 0
        assert _open_cursors(session) == 0


def test_cursor_overflow_writes_nothing_and_keeps_its_place(kv):
    with RSession.connect("kv") as session:
        _fill(session, {b"long-key": b"a rather long value"})
        with RSubSession.open(session, EOpenCursor, ECloseCursor) as cursor:
            short_key = bytearray(b"xy")
            with pytest.raises(Overflow):
                cursor.SendReceive(ECursorNext, (short_key,))
            assert short_key == b"xy"
            key, short_value = bytearray(16), bytearray(4)
            with pytest.raises(Overflow):
                cursor.SendReceive(ECursorNext, (key, short_value))
            assert key == bytes(16) and short_value == bytes(4)
            with pytest.raises(BadDescriptor):
                cursor.SendReceive(ECursorNext, (5,))  # the key buffer is an int
            assert _next(cursor) == (b"long-key", b"a rather long value")


def test_handles_are_never_zero_and_each_subsession_has_its_own(kv):
    with RSession.connect("kv") as session:
        _fill(session, {b"x1": b"", b"x2": b"", b"y1": b"", b"y2": b""})
        xs, ys, all_keys = RSubSession(), RSubSession(), RSubSession()
        xs.CreateSubSession(session, EOpenCursor, (b"x",))
        ys.CreateSubSession(session, EOpenCursor, (b"y",))
        all_keys.CreateSubSession(session, EOpenCursor)
        handles = {xs.SubSessionHandle(), ys.SubSessionHandle(), all_keys.SubSessionHandle()}
        assert len(handles) == 3 and 0 not in handles
        # Interleaved: each request reaches the cursor its argument 3 names.
        assert _next(xs)[0] == b"x1"
        assert _next(ys)[0] == b"y1"
        assert _next(all_keys)[0] == b"x1"
        assert _next(ys)[0] == b"y2"
        assert _next(xs)[0] == b"x2"
        assert _next(xs) is None
        assert _walk(all_keys) == [b"x2", b"y1", b"y2"]
        assert _open_cursors(session) == 3
        for cursor in (xs, ys, all_keys):
            cursor.CloseSubSession(ECloseCursor)
        assert _open_cursors(session) == 0

        # A slot used again gets a new handle.
        again = RSubSession()
        again.CreateSubSession(session, EOpenCursor)
        assert again.SubSessionHandle() not in handles | {0}
        again.CloseSubSession(ECloseCursor)


def test_argument_3_is_the_handle(kv):
    # What RSubSession sends is an ordinary request with the handle as the int in argument 3:
    # the same request made by hand on the session reaches the same cursor.
    with RSession.connect("kv") as session:
        _fill(session, {b"k1": b"v1", b"k2": b"v2"})
        with RSubSession.open(session, EOpenCursor, ECloseCursor) as cursor:
            handle = cursor.SubSessionHandle()
            key, value = bytearray(8), bytearray(8)
            assert session.SendReceive(ECursorNext, (key, value, 0, handle)) == 2
            assert (key, value) == (b"k1", b"v1")
            assert _next(cursor) == (b"k2", b"v2")

        # The create request's argument 3 is a 4-byte writable descriptor the server writes into.
        buffer = bytearray(4)
        assert session.SendReceive(EOpenCursor, (0, 0, 0, buffer)) == KErrNone
        (raw_handle,) = struct.unpack("<i", buffer)
        assert raw_handle != 0
        assert session.SendReceive(ECursorNext, (bytearray(8), 0, 0, raw_handle)) == 2
        assert session.SendReceive(ECloseCursor, (0, 0, 0, raw_handle)) == KErrNone
        assert _open_cursors(session) == 0


def test_async_send_receive_on_a_subsession(kv):
    with RSession.connect("kv") as session:
        _fill(session, {b"a": b"1", b"b": b"2", b"c": b"3"})
        with RSubSession.open(session, EOpenCursor, ECloseCursor) as cursor:
            buffers = [bytearray(4) for _ in range(4)]
            statuses = [TRequestStatus() for _ in range(4)]
            for buffer, status in zip(buffers, statuses):
                assert cursor.SendReceive(ECursorNext, (buffer,), status) is None
            # Requests on a session reach the server in order, so the cursor answers in order.
            assert [status.Wait(TIMEOUT) for status in statuses] == [1, 1, 1, KErrEof]
            assert buffers[:3] == [b"a", b"b", b"c"]
            with pytest.raises(EndOfFile):
                statuses[3].result(0)
            # Reused statuses, User.WaitForRequest and a timeout keyword.
            status = statuses[0]
            cursor.SendReceive(ECursorNext, (bytearray(4),), status)
            assert User.WaitForRequest(status, timeout=TIMEOUT) is status
            assert status.Int() == KErrEof
            with pytest.raises(EndOfFile):
                cursor.SendReceive(ECursorNext, (bytearray(4),), timeout=TIMEOUT)


def test_await_on_a_subsession_request(kv):
    async def walk(cursor: RSubSession) -> list[bytes]:
        keys = []
        while True:
            key, status = bytearray(8), TRequestStatus()
            cursor.SendReceive(ECursorNext, (key,), status)
            try:
                await status
            except EndOfFile:
                return keys
            keys.append(bytes(key))

    with RSession.connect("kv") as session:
        _fill(session, {b"p": b"", b"q": b""})
        with RSubSession.open(session, EOpenCursor, ECloseCursor) as cursor:
            assert asyncio.run(walk(cursor)) == [b"p", b"q"]


def test_blind_send_on_a_subsession(kv):
    with RSession.connect("kv") as session:
        _fill(session, {b"a": b"", b"b": b"", b"c": b""})
        with RSubSession.open(session, EOpenCursor, ECloseCursor) as cursor:
            cursor.Send(ECursorNext, (bytearray(4),))  # moves the cursor; nothing comes back
            assert _next(cursor)[0] == b"b"  # ordered after the blind send


# -- bad handles -------------------------------------------------------------------------------


def test_a_closed_subsessions_handle_is_refused(kv):
    with RSession.connect("kv") as session:
        _fill(session, {b"k": b"v"})
        cursor = RSubSession()
        cursor.CreateSubSession(session, EOpenCursor)
        stale = cursor.SubSessionHandle()
        cursor.CloseSubSession(ECloseCursor)
        with pytest.raises(BadHandle) as raised:
            session.SendReceive(ECursorNext, (bytearray(8), 0, 0, stale))
        assert raised.value.code == KErrBadHandle
        with pytest.raises(BadHandle):
            session.SendReceive(ECloseCursor, (0, 0, 0, stale))

        # Even once its slot is in use again, by a new cursor.
        fresh = RSubSession()
        fresh.CreateSubSession(session, EOpenCursor)
        assert fresh.SubSessionHandle() & 0x7FFF == stale & 0x7FFF
        assert fresh.SubSessionHandle() != stale
        with pytest.raises(BadHandle):
            session.SendReceive(ECursorNext, (bytearray(8), 0, 0, stale))
        assert _next(fresh) == (b"k", b"v")  # the new cursor was not moved
        fresh.CloseSubSession(ECloseCursor)


@pytest.mark.parametrize("made_up", [0, 1, -1, 0x12345, 0x7FFF_FFFF])
def test_a_made_up_handle_is_refused(kv, made_up):
    with RSession.connect("kv") as session:
        with RSubSession.open(session, EOpenCursor, ECloseCursor) as cursor:
            assert made_up != cursor.SubSessionHandle()
            with pytest.raises(BadHandle):
                session.SendReceive(ECursorNext, (bytearray(8), 0, 0, made_up))
            with pytest.raises(BadHandle):
                session.SendReceive(ECloseCursor, (0, 0, 0, made_up))
        assert _open_cursors(session) == 0


def test_a_handle_is_refused_where_it_names_something_else(kv):
    with RSession.connect("kv") as session:
        with RSubSession.open(session, EOpenTable, ECloseTable, (b"t",)) as table:
            with pytest.raises(BadHandle):  # a table is not a cursor
                table.SendReceive(ECursorNext, (bytearray(8),))
            with pytest.raises(BadHandle):
                table.SendReceive(ECloseCursor)
            assert table.SendReceive(ETableCount) == 0  # still open
        # No handle at all (argument 3 not sent), or a descriptor in its place.
        with pytest.raises(BadHandle):
            session.SendReceive(ECursorNext, (bytearray(8),))
        with pytest.raises(BadHandle):
            session.SendReceive(ECursorNext, (bytearray(8), 0, 0, b"\x00\x00\x01\x00"))


def test_handles_belong_to_their_session(kv):
    with RSession.connect("kv") as owner, RSession.connect("kv") as other:
        with RSubSession.open(owner, EOpenCursor, ECloseCursor) as cursor:
            with pytest.raises(BadHandle):
                other.SendReceive(ECursorNext, (bytearray(8), 0, 0, cursor.SubSessionHandle()))
            with pytest.raises(BadHandle):
                other.SendReceive(ECloseCursor, (0, 0, 0, cursor.SubSessionHandle()))
            assert _open_cursors(other) == 1


def test_an_open_whose_handle_cannot_be_written_leaks_nothing(kv):
    with RSession.connect("kv") as session:
        with pytest.raises(BadDescriptor):  # argument 3 read-only
            session.SendReceive(EOpenCursor, (0, 0, 0, b"\x00\x00\x00\x00"))
        with pytest.raises(Overflow):  # too short for the handle
            session.SendReceive(EOpenCursor, (0, 0, 0, bytearray(2)))
        with pytest.raises(BadDescriptor):  # an int
            session.SendReceive(EOpenCursor, (0, 0, 0, 0))
        assert _open_cursors(session) == 0  # each cursor was closed again


# -- the session's end closes its subsessions ----------------------------------------------------


def test_closing_the_session_releases_every_cursor(kv):
    with RSession.connect("kv") as observer:
        _fill(observer, {b"a": b"1", b"b": b"2"})
        kept = RSubSession()
        kept.CreateSubSession(observer, EOpenCursor)
        assert _open_cursors(observer) == 1

        session = RSession.connect("kv")
        cursors = []
        for _ in range(5):
            cursor = RSubSession()
            cursor.CreateSubSession(session, EOpenCursor, (b"a",))
            cursors.append(cursor)
        table = RSubSession.open(session, EOpenTable, ECloseTable, (b"t",))
        _next(cursors[0])
        assert _open_cursors(observer) == 6

        session.Close()  # no CloseSubSession: the server closes them with the session
        _cursors_back_to(observer, 1)
        for cursor in cursors:  # harmless afterwards, and forgets the handles
            cursor.CloseSubSession(ECloseCursor)
            assert cursor.SubSessionHandle() == 0
        table.CloseSubSession(ECloseTable)
        assert _next(kept) == (b"a", b"1")  # the observer's own cursor is untouched
        kept.CloseSubSession(ECloseCursor)
        assert _open_cursors(observer) == 0


def test_a_killed_client_process_releases_its_cursors(kv):
    script = textwrap.dedent("""
        import sys, time
        from ipcfw import RSession, RSubSession
        from servers.kv import EOpenCursor, EOpenTable
        session = RSession.connect("kv")
        cursors = []
        for _ in range(3):
            cursor = RSubSession()
            cursor.CreateSubSession(session, EOpenCursor)
            cursors.append(cursor)
        table = RSubSession()
        table.CreateSubSession(session, EOpenTable, (b"t",))
        print("ready", flush=True)
        time.sleep(600)
    """)
    with RSession.connect("kv") as observer:
        with RSubSession.open(observer, EOpenCursor, ECloseCursor):
            client = kv.spawn_client(["-c", script], label="holder")
            wait_until(lambda: "ready" in client.log() or not client.alive(), timeout=15,
                       what="the client to open its cursors")
            assert client.alive(), client.log()
            assert _open_cursors(observer) == 4
            client.kill()  # SIGKILL: no Close, no CloseSubSession
            _cursors_back_to(observer, 1)
        assert _open_cursors(observer) == 0


class _HolderSession(CSession):
    """A session of the in-process test server: subsession objects that count their closes."""

    EOpen, EHandleSeen, EPanicMe = 1, 2, 3

    def ServiceL(self, message: RMessage) -> None:
        server = self.Server()
        if message.Function() == self.EOpen:
            self.NewSubSessionL(message, _Counted(server))
            message.Complete(KErrNone)
        elif message.Function() == self.EHandleSeen:
            self.SubSessionL(message)  # must be an open subsession...
            message.Complete(message.Int3())  # ...and the server sees its handle as Int3()
        elif message.Function() == self.EPanicMe:
            message.Panic("TEST", 7)
        else:
            message.Complete(len(self.ObjectIx()))


class _Counted:
    def __init__(self, server: _HolderServer) -> None:
        self.server = server
        server.opened += 1

    def Close(self) -> None:
        self.server.closed += 1


class _ForgetfulSession(_HolderSession):
    def Disconnect(self, message: RMessage) -> None:
        message.Complete(KErrNone)  # does not call CSession.Disconnect


class _RaisingSession(_HolderSession):
    def Disconnect(self, message: RMessage) -> None:
        raise RuntimeError("Disconnect failed")


class _LateSession(_HolderSession):
    def Disconnect(self, message: RMessage) -> None:
        self.Server().late = message  # completed later, by the test


class _HolderServer(CServer):
    name = "holder"

    def __init__(self, session_class: type) -> None:
        self.session_class = session_class
        self.opened = self.closed = 0
        self.late: RMessage | None = None


@pytest.fixture
def host_server(kernel):
    """Host a `_HolderServer` on a thread of this process; yields a function that starts it."""
    hosts = []

    def start(session_class: type) -> _HolderServer:
        server = _HolderServer(session_class)
        host = ServerHost(server, kernel.endpoint)
        ready = threading.Event()
        loop = threading.Thread(target=host.run, args=(ready,), name="test-holder-loop")
        loop.start()
        hosts.append((host, loop))
        assert ready.wait(TIMEOUT)
        return server

    yield start
    for host, loop in hosts:
        host.stop()
        loop.join(TIMEOUT)


def test_the_server_sees_the_handle_as_int3(host_server):
    host_server(_HolderSession)
    with RSession.connect("holder") as session:
        subsessions = [RSubSession() for _ in range(3)]
        for subsession in subsessions:
            subsession.CreateSubSession(session, _HolderSession.EOpen)
        for subsession in subsessions:
            handle = subsession.SubSessionHandle()
            assert subsession.SendReceive(
                _HolderSession.EHandleSeen, (1, b"two", bytearray(3))
            ) == handle
            status = TRequestStatus()
            subsession.SendReceive(_HolderSession.EHandleSeen, (), status)
            assert status.result(TIMEOUT) == handle
        for subsession in subsessions:
            subsession.CloseSubSession(99)  # not a close function: the answer is ignored


@pytest.mark.parametrize("session_class", [_HolderSession, _ForgetfulSession, _RaisingSession])
def test_subsessions_close_with_the_session_whatever_disconnect_does(host_server, session_class):
    server = host_server(session_class)
    session = RSession.connect("holder")
    subsessions = [RSubSession() for _ in range(4)]
    for subsession in subsessions:
        subsession.CreateSubSession(session, _HolderSession.EOpen)
    assert server.opened == 4 and server.closed == 0
    session.Close()
    wait_until(lambda: server.closed == 4, timeout=TIMEOUT, what="the 4 subsessions to close")
    for subsession in subsessions:
        subsession.CloseSubSession(2)  # the session is closed: only forgets the handle
    with RSession.connect("holder") as later:  # the server goes on serving
        assert later.SendReceive(99) == 0  # a new session has an empty index


def test_subsessions_close_when_disconnect_returns_even_if_it_completes_later(host_server, kernel):
    server = host_server(_LateSession)
    session = RSession.connect("holder")
    subsession = RSubSession()
    subsession.CreateSubSession(session, _HolderSession.EOpen)
    session.Close()
    subsession.CloseSubSession(2)
    wait_until(lambda: server.closed == 1, timeout=TIMEOUT, what="the subsession to close")
    assert server.late is not None and not server.late.IsNull()
    server.late.Complete(KErrNone)
    wait_until(lambda: kernel.statistics()["sessions"] == 0, timeout=TIMEOUT,
               what="the session to go")


def test_close_subsession_after_the_client_was_panicked_is_harmless(host_server):
    server = host_server(_HolderSession)
    with RSession.connect("holder") as session:
        subsession = RSubSession()
        subsession.CreateSubSession(session, _HolderSession.EOpen)
        with pytest.raises(ClientPanic):
            session.SendReceive(_HolderSession.EPanicMe)
        subsession.CloseSubSession(2)  # the session is dead: nothing is raised
        assert subsession.SubSessionHandle() == 0
        wait_until(lambda: server.closed == 1, timeout=TIMEOUT, what="the subsession to close")


# -- client-side rules ---------------------------------------------------------------------------


def test_create_subsession_takes_at_most_three_arguments(kv):
    # Refused before anything is sent: not even the unconnected session is looked at.
    with pytest.raises(ValueError, match="argument 3"):
        RSubSession().CreateSubSession(RSession(), EOpenCursor, (1, 2, 3, 4))
    with RSession.connect("kv") as session:
        cursor = RSubSession()
        for args in [(b"a", 0, 0, bytearray(4)), TIpcArgs(b"a", 0, 0, 0)]:
            with pytest.raises(ValueError, match="argument 3"):
                cursor.CreateSubSession(session, EOpenCursor, args)
        with pytest.raises(TypeError):
            cursor.CreateSubSession(session, EOpenCursor, ("a str",))
        with pytest.raises(TypeError):
            cursor.CreateSubSession("kv", EOpenCursor)
        assert cursor.SubSessionHandle() == 0
        assert _open_cursors(session) == 0  # nothing reached the server

        # a TIpcArgs of three or fewer
        cursor.CreateSubSession(session, EOpenCursor, TIpcArgs(b"a"))
        with pytest.raises(ValueError, match="argument 3"):
            cursor.SendReceive(ECursorNext, (bytearray(4), 0, 0, 1))
        with pytest.raises(ValueError, match="argument 3"):
            cursor.Send(ECursorNext, TIpcArgs(bytearray(4), 0, 0, 1))
        with pytest.raises(ClientPanic) as raised:  # already open
            cursor.CreateSubSession(session, EOpenCursor)
        assert (raised.value.category, raised.value.reason) == ("KERN-EXEC", 57)
        assert _open_cursors(session) == 1
        cursor.CloseSubSession(ECloseCursor)


def test_errors_from_the_server_propagate_and_leave_it_closed(kv):
    with RSession.connect("kv") as session:
        table = RSubSession()
        with pytest.raises(BadName):
            table.CreateSubSession(session, EOpenTable, (b"",))
        with pytest.raises(BadDescriptor):
            table.CreateSubSession(session, EOpenTable, (7,))
        assert table.SubSessionHandle() == 0 and table.Session() is None


def test_a_create_that_writes_no_handle_is_refused(kv):
    with RSession.connect("kv") as session:
        session.SendReceive(ESet, (b"k", b"v"))
        not_a_subsession = RSubSession()
        with pytest.raises(BadHandle, match="NewSubSessionL"):
            not_a_subsession.CreateSubSession(session, ECount)  # completes with 1, writes nothing
        assert not_a_subsession.SubSessionHandle() == 0


def test_using_a_subsession_that_is_not_open_panics(kv):
    cursor = RSubSession()
    for call in (lambda: cursor.SendReceive(ECursorNext, (bytearray(4),)),
                 lambda: cursor.SendReceive(ECursorNext, (), TRequestStatus()),
                 lambda: cursor.Send(ECursorNext)):
        with pytest.raises(ClientPanic) as raised:
            call()
        assert (raised.value.category, raised.value.reason) == ("KERN-EXEC", 0)
    with RSession.connect("kv") as session:
        cursor.CreateSubSession(session, EOpenCursor)
        cursor.CloseSubSession(ECloseCursor)
        with pytest.raises(ClientPanic):
            cursor.SendReceive(ECursorNext, (bytearray(4),))


def test_close_subsession_is_idempotent_and_harmless_after_the_session_closed(kv):
    with RSession.connect("kv") as observer:
        cursor = RSubSession()
        cursor.CloseSubSession(ECloseCursor)  # never opened: nothing happens

        session = RSession.connect("kv")
        cursor.CreateSubSession(session, EOpenCursor)
        cursor.CloseSubSession(ECloseCursor)
        cursor.CloseSubSession(ECloseCursor)
        assert _open_cursors(observer) == 0

        cursor.CreateSubSession(session, EOpenCursor)  # an RSubSession can be opened again
        assert _open_cursors(observer) == 1
        session.Close()
        cursor.CloseSubSession(ECloseCursor)  # session closed: no request, no error
        cursor.CloseSubSession(ECloseCursor)
        assert cursor.SubSessionHandle() == 0
        _cursors_back_to(observer, 0)


def test_close_subsession_with_the_wrong_function_ignores_the_servers_answer(kv):
    with RSession.connect("kv") as session:
        cursor = RSubSession()
        cursor.CreateSubSession(session, EOpenCursor)
        cursor.CloseSubSession(ECloseTable)  # BadHandle from the server: ignored, as in Symbian
        assert cursor.SubSessionHandle() == 0
        assert _open_cursors(session) == 1  # the cursor stays open in the server...
    with RSession.connect("kv") as session:
        assert _open_cursors(session) == 0  # ...until its session closed


def test_close_subsession_after_the_server_died_is_harmless(kv):
    session = RSession.connect("kv")
    try:
        cursor = RSubSession()
        cursor.CreateSubSession(session, EOpenCursor)
        kv.kv_server.kill()
        wait_until(lambda: not kv.kv_server.alive(), timeout=TIMEOUT, what="the server to die")

        def refused() -> bool:
            try:
                cursor.SendReceive(ECursorNext, (bytearray(4),))
            except ServerTerminated:
                return True
            except EndOfFile:  # answered: the kernel has not seen the server go yet
                pass
            return False

        wait_until(refused, timeout=TIMEOUT, what="the session to see its server gone")
        cursor.CloseSubSession(ECloseCursor)
        assert cursor.SubSessionHandle() == 0
    finally:
        session.Close()


def test_with_needs_to_know_the_close_function(kv):
    with RSession.connect("kv") as session:
        plain = RSubSession()
        plain.CreateSubSession(session, EOpenCursor)
        with pytest.raises(TypeError, match="RSubSession.open"):
            with plain:
                pass
        assert plain.SubSessionHandle() != 0  # nothing was closed
        plain.CloseSubSession(ECloseCursor)

        with RSubSession(close_function=ECloseCursor) as cursor:
            cursor.CreateSubSession(session, EOpenCursor)
            assert _open_cursors(session) == 1
        assert _open_cursors(session) == 0

        with pytest.raises(RuntimeError):
            with RSubSession.open(session, EOpenCursor, ECloseCursor):
                raise RuntimeError("the body failed")
        assert _open_cursors(session) == 0  # closed on the way out


# -- tables --------------------------------------------------------------------------------------


def test_tables_are_named_stores_shared_between_sessions(kv):
    with RSession.connect("kv") as a, RSession.connect("kv") as b:
        with RSubSession.open(a, EOpenTable, ECloseTable, (b"colours",)) as colours, \
                RSubSession.open(a, EOpenTable, ECloseTable, (b"sizes",)) as sizes, \
                RSubSession.open(b, EOpenTable, ECloseTable, (b"colours",)) as colours_b:
            colours.SendReceive(ETableSet, (b"sky", b"blue"))
            sizes.SendReceive(ETableSet, (b"sky", b"large"))
            value = bytearray(16)
            assert colours_b.SendReceive(ETableGet, (b"sky", value)) == 4 and value == b"blue"
            value = bytearray(16)
            assert sizes.SendReceive(ETableGet, (b"sky", value)) == 5 and value == b"large"
            assert a.SendReceive(ECount) == 0  # not in the main store
            colours_b.SendReceive(ETableDelete, (b"sky",))
            with pytest.raises(NotFound):
                colours.SendReceive(ETableGet, (b"sky", bytearray(16)))
            assert colours.SendReceive(ETableCount) == 0 and sizes.SendReceive(ETableCount) == 1
        # The data outlives the handles.
        with RSubSession.open(b, EOpenTable, ECloseTable, (b"sizes",)) as sizes:
            assert sizes.SendReceive(ETableCount) == 1


# -- the example client ----------------------------------------------------------------------------


def test_kv_client_walks_a_cursor_and_closes_it(kv):
    result = kv.client(["clients/kv_client.py"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cursor on prefix 's'  -> ['shape', 'size']" in result.stdout
    with RSession.connect("kv") as session:
        assert _open_cursors(session) == 0


def test_close_subsession_from_a_thread_that_may_not_use_the_session_raises(kernel):
    import threading

    from ipcfw import ClientPanic, RSession, RSubSession
    from servers.kv import ECloseCursor, EOpenCursor

    kernel.serve("servers.kv:KvServer", "kv")
    with RSession.connect("kv") as session:
        cursor = RSubSession()
        cursor.CreateSubSession(session, EOpenCursor, (b"",))
        caught: list = []

        def close_elsewhere() -> None:
            try:
                cursor.CloseSubSession(ECloseCursor)
            except BaseException as exc:
                caught.append(exc)

        thread = threading.Thread(target=close_elsewhere)
        thread.start()
        thread.join(10)
        assert len(caught) == 1 and isinstance(caught[0], ClientPanic)
        assert cursor.SubSessionHandle() != 0  # still open: its owner can close it
        cursor.CloseSubSession(ECloseCursor)
        assert cursor.SubSessionHandle() == 0
