"""The example servers (servers/kv.py, servers/notifier.py) and client programs (clients/*.py),
against a real kernel and real server processes."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import wait_until
from ipcfw import (
    BadArgument,
    BadDescriptor,
    Cancelled,
    KErrCancel,
    KErrInUse,
    KErrOverflow,
    KErrSessionClosed,
    NotFound,
    NotSupported,
    Overflow,
    KErrServerTerminated,
    RSession,
    ServerHost,
    TIpcArgs,
    TRequestStatus,
)
from servers.kv import ECount, EDelete, EGet, ESet, EValueLength
from servers.notifier import (
    ECancelWait,
    EPublish,
    EPublishAfter,
    EWaitForEvent,
    EWaiterCount,
    MAX_DELAY_MS,
    NotifierServer,
)

TIMEOUT = 5.0


# -- kv ------------------------------------------------------------------------------------------


@pytest.mark.smoke
def test_kv_set_get_delete_count(kv):
    with RSession.connect("kv") as session:
        assert session.SendReceive(ECount) == 0
        assert session.SendReceive(ESet, (b"colour", b"blue")) == 0
        assert session.SendReceive(ESet, (b"shape", b"round")) == 0
        assert session.SendReceive(ECount) == 2

        assert session.SendReceive(EValueLength, (b"colour",)) == 4
        buffer = bytearray(4)
        assert session.SendReceive(EGet, (b"colour", buffer)) == 4
        assert buffer == b"blue"

        # A larger buffer: afterwards it holds exactly the value (a descriptor's new length).
        roomy = bytearray(100)
        assert session.SendReceive(EGet, (b"shape", roomy)) == 5
        assert roomy == b"round"

        # Overwrite, then delete.
        session.SendReceive(ESet, (b"colour", b"green"))
        assert session.SendReceive(ECount) == 2
        assert session.SendReceive(EValueLength, (b"colour",)) == 5
        assert session.SendReceive(EDelete, (b"colour",)) == 0
        assert session.SendReceive(ECount) == 1

        with pytest.raises(NotFound):
            session.SendReceive(EGet, (b"colour", bytearray(10)))
        with pytest.raises(NotFound):
            session.SendReceive(EDelete, (b"colour",))
        with pytest.raises(NotFound):
            session.SendReceive(EValueLength, (b"colour",))

        # Empty values are values.
        session.SendReceive(ESet, (b"empty", b""))
        empty = bytearray(3)
        assert session.SendReceive(EGet, (b"empty", empty)) == 0
        assert empty == b""


def test_kv_data_is_shared_by_all_sessions(kv):
    with RSession.connect("kv") as writer, RSession.connect("kv") as reader:
        writer.SendReceive(ESet, (b"k", b"from the writer"))
        buffer = bytearray(64)
        assert reader.SendReceive(EGet, (b"k", buffer)) == len(b"from the writer")
        assert buffer == b"from the writer"
        reader.SendReceive(EDelete, (b"k",))
        assert writer.SendReceive(ECount) == 0


def test_kv_buffer_too_small_raises_overflow_and_leaves_it_unchanged(kv):
    with RSession.connect("kv") as session:
        session.SendReceive(ESet, (b"key", b"a long value"))
        small = bytearray(b"xy")
        with pytest.raises(Overflow) as raised:
            session.SendReceive(EGet, (b"key", small))
        assert raised.value.code == KErrOverflow
        assert small == b"xy"
        # The server survived its WriteL leaving, and the session still works.
        exact = bytearray(session.SendReceive(EValueLength, (b"key",)))
        assert session.SendReceive(EGet, (b"key", exact)) == 12
        assert exact == b"a long value"


def test_kv_bad_arguments_are_errors_not_crashes(kv):
    with RSession.connect("kv") as session:
        with pytest.raises(BadArgument):
            session.SendReceive(ESet, (1, b"value"))  # key is an int
        with pytest.raises(BadArgument):
            session.SendReceive(ESet, (b"key",))  # no value
        session.SendReceive(ESet, (b"key", b"value"))
        with pytest.raises(BadDescriptor):
            session.SendReceive(EGet, (b"key", b"read-only"))  # not writable
        with pytest.raises(NotSupported):
            session.SendReceive(99)
        assert session.SendReceive(ECount) == 1


def test_kv_async_requests(kv):
    with RSession.connect("kv") as session:
        session.SendReceive(ESet, (b"a", b"1"))
        buffer = bytearray(8)
        get, count, missing = TRequestStatus(), TRequestStatus(), TRequestStatus()
        session.SendReceive(EGet, (b"a", buffer), get)
        session.SendReceive(ECount, (), count)
        session.SendReceive(EValueLength, (b"zz",), missing)
        assert get.result(TIMEOUT) == 1 and buffer == b"1"
        assert count.result(TIMEOUT) == 1
        with pytest.raises(NotFound):
            missing.result(TIMEOUT)


# -- notifier ------------------------------------------------------------------------------------


@pytest.fixture
def notifier(kernel):
    kernel.serve("servers.notifier:NotifierServer", "notifier")
    return kernel


def _wait(session: RSession, payload: bytearray | None = None) -> TRequestStatus:
    status = TRequestStatus()
    session.SendReceive(EWaitForEvent, TIpcArgs(payload) if payload is not None else (), status)
    return status


def _held(session: RSession, count: int) -> None:
    wait_until(lambda: session.SendReceive(EWaiterCount) == count, timeout=TIMEOUT,
               what=f"{count} held waits")


@pytest.mark.smoke
def test_notifier_one_publish_wakes_every_waiter(notifier):
    with RSession.connect("notifier") as a, RSession.connect("notifier") as b, \
            RSession.connect("notifier") as c, RSession.connect("notifier") as publisher:
        a_payload, b_payload = bytearray(len(b"payload")), bytearray(64)
        a_wait, b_wait, c_wait = _wait(a, a_payload), _wait(b, b_payload), _wait(c)
        _held(publisher, 3)
        assert not (a_wait.done() or b_wait.done() or c_wait.done())

        assert publisher.SendReceive(EPublish, (5, b"payload")) == 3
        assert a_wait.result(TIMEOUT) == 5
        assert b_wait.result(TIMEOUT) == 5
        assert c_wait.result(TIMEOUT) == 5  # no buffer given: only the value
        assert a_payload == b"payload"
        assert b_payload == b"payload"
        assert publisher.SendReceive(EWaiterCount) == 0


def test_notifier_completes_from_another_thread_while_the_loop_serves(notifier):
    with RSession.connect("notifier") as a, RSession.connect("notifier") as b, \
            RSession.connect("notifier") as other:
        a_payload, b_payload = bytearray(16), bytearray(16)
        a_wait, b_wait = _wait(a, a_payload), _wait(b, b_payload)
        started = time.monotonic()
        other.SendReceive(EPublishAfter, (400, 9, b"late"))
        # The loop answers other requests while the waits are held...
        for _ in range(20):
            assert other.SendReceive(EWaiterCount) == 2
        assert not a_wait.done() and not b_wait.done()
        # ...and with no further request, the timer thread completes them.
        assert a_wait.result(TIMEOUT) == 9
        assert b_wait.result(TIMEOUT) == 9
        assert time.monotonic() - started >= 0.35
        assert a_payload == b_payload == b"late"
        assert other.SendReceive(EWaiterCount) == 0


def test_notifier_a_wait_sent_after_a_publish_waits_for_the_next_event(notifier):
    with RSession.connect("notifier") as early, RSession.connect("notifier") as late, \
            RSession.connect("notifier") as publisher:
        early_wait = _wait(early)
        assert publisher.SendReceive(EPublish, (1,)) == 1
        late_wait = _wait(late)
        assert early_wait.result(TIMEOUT) == 1
        _held(publisher, 1)
        assert not late_wait.done()
        assert publisher.SendReceive(EPublish, (2,)) == 1
        assert late_wait.result(TIMEOUT) == 2


def test_notifier_cancel_idiom(notifier):
    with RSession.connect("notifier") as session, RSession.connect("notifier") as other:
        status = _wait(session)
        other_wait = _wait(other)
        _held(session, 2)
        assert session.SendReceive(ECancelWait) == 0
        assert status.Wait(TIMEOUT) == KErrCancel
        with pytest.raises(Cancelled):
            status.result(0)
        # Only this session's wait was cancelled.
        assert session.SendReceive(EWaiterCount) == 1
        assert not other_wait.done()
        # Cancelling with nothing outstanding is harmless.
        assert session.SendReceive(ECancelWait) == 0
        assert other.SendReceive(ECancelWait) == 0
        assert other_wait.Wait(TIMEOUT) == KErrCancel


def test_notifier_one_wait_per_session(notifier):
    with RSession.connect("notifier") as session:
        first, second = _wait(session), _wait(session)
        assert second.Wait(TIMEOUT) == KErrInUse
        assert not first.done()
        session.SendReceive(ECancelWait)
        assert first.Wait(TIMEOUT) == KErrCancel


def test_notifier_closing_a_session_with_a_held_wait(notifier):
    observer = RSession.connect("notifier")
    try:
        session = RSession.connect("notifier")
        status = _wait(session)
        _held(observer, 1)
        session.Close()
        # Completed at once, locally; the server's KErrCancel for it is dropped.
        assert status.done()
        assert status.Int() == KErrSessionClosed
        _held(observer, 0)  # Disconnect released the held wait
        assert observer.SendReceive(EPublish, (3,)) == 0
        assert notifier.statistics()["sessions"] == 1
    finally:
        observer.Close()


def test_notifier_payload_too_long_for_the_buffer(notifier):
    with RSession.connect("notifier") as small, RSession.connect("notifier") as plain, \
            RSession.connect("notifier") as publisher:
        small_wait, plain_wait = _wait(small, bytearray(2)), _wait(plain)
        _held(publisher, 2)
        assert publisher.SendReceive(EPublish, (4, b"too long")) == 2
        assert small_wait.Wait(TIMEOUT) == KErrOverflow
        assert plain_wait.Wait(TIMEOUT) == 4


def test_notifier_bad_arguments(notifier):
    with RSession.connect("notifier") as session:
        with pytest.raises(BadArgument):
            session.SendReceive(EPublish, (-1,))
        with pytest.raises(BadArgument):
            session.SendReceive(EPublishAfter, (MAX_DELAY_MS + 1, 1))
        with pytest.raises(BadArgument):
            session.SendReceive(EPublishAfter, (-5, 1))
        with pytest.raises(NotSupported):
            session.SendReceive(77)
        assert session.SendReceive(EWaiterCount) == 0


def test_a_late_completion_after_the_host_stopped_is_harmless(kernel, tmp_path):
    # The notifier's timer thread can fire after the host was stopped (SIGTERM): the same
    # situation, made deterministic by hosting the server in this process and completing by hand.
    server = NotifierServer()
    host = ServerHost(server, kernel.endpoint)
    ready = threading.Event()
    loop = threading.Thread(target=host.run, args=(ready,), name="test-host-loop")
    loop.start()
    assert ready.wait(TIMEOUT)
    with RSession.connect("notifier") as session:
        status = _wait(session)
        _held(session, 1)
        host.stop()
        loop.join(TIMEOUT)
        assert not loop.is_alive()
        assert not status.done() or status.Int() == KErrServerTerminated
    (waiter,) = server.take_waiters()

    # Files opened now may be given the numbers of the host's closed pipe.
    paths = [tmp_path / f"unrelated-{i}" for i in range(8)]
    files = [open(path, "wb", buffering=0) for path in paths]
    try:
        waiter.deliver(1, b"")  # from this thread, as the timer thread would: must be harmless
    finally:
        for file in files:
            file.close()
    assert [path.read_bytes() for path in paths] == [b""] * len(paths)


# -- the client programs -------------------------------------------------------------------------

CLIENTS = [
    ("servers.echo:EchoServer", "echo", "clients/echo_client.py",
     ["EEchoInt(42)          -> 42", "b'hello'", "[100, 200, 300]"]),
    ("servers.kv:KvServer", "kv", "clients/kv_client.py",
     ["count() = 3", "SendReceive(ECount)   -> 3", "KErrOverflow", "KErrNotFound",
      "async count() = 2"]),
    ("servers.notifier:NotifierServer", "notifier", "clients/notifier_client.py",
     ["woke 2 waits", "b'door opened'", "KErrCancel"]),
]


@pytest.mark.parametrize("plugin, name, script, expected", CLIENTS, ids=[c[1] for c in CLIENTS])
def test_client_program(kernel, plugin, name, script, expected):
    kernel.serve(plugin, name)
    result = kernel.client([script])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    for text in expected:
        assert text in result.stdout
    assert f"{script.split('/')[1][:-3]}: ok (" in result.stdout
    assert len(result.stdout.splitlines()) >= 4
    # The client closed everything it opened.
    wait_until(lambda: kernel.statistics()["sessions"] == 0, what="the client's sessions to go")


def test_kv_client_runs_twice_against_the_same_server(kv):
    for _ in range(2):
        result = kv.client(["clients/kv_client.py"])
        assert result.returncode == 0, result.stdout + result.stderr
    with RSession.connect("kv") as session:
        assert session.SendReceive(ECount) == 0  # the example cleaned up after itself


def test_client_program_without_its_server_says_how_to_start_it(kernel):
    result = kernel.client(["clients/kv_client.py"])
    assert result.returncode == 1
    assert "no server named 'kv' is running" in result.stderr
    assert "ipcfw serve servers.kv:KvServer" in result.stderr
    assert "Traceback" not in result.stderr
