"""The client runtime's threading: who settles a channel, and when callbacks fire."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import ipcfw
from ipcfw import ClientPanic, RSession, TRequestStatus, User
from ipcfw.client import inbox as client_inbox
from conftest import wait_until
from plugins import probe

VERSION = (1, 2, 0)


@pytest.fixture
def probe_server(kernel):
    return kernel.serve("plugins.probe:ProbeServer", "probe")


def connect() -> RSession:
    return RSession.connect("probe", VERSION)


def test_callback_fires_while_the_issuing_thread_is_idle(probe_server):
    with connect() as session:
        fired = threading.Event()
        status = TRequestStatus()
        status.add_done_callback(lambda s: fired.set())
        session.SendReceive(probe.ESleep, (20, 5), status)
        # This thread makes no further ipcfw call: the runtime's I/O thread must settle.
        assert fired.wait(5)
        assert status.Int() == 5


def test_callbacks_fire_while_the_issuing_thread_keeps_sending(probe_server):
    """An async send does not probe the socket each time, but still settles every millisecond
    or so: a thread that only sends sees its callbacks fire without ever waiting."""
    with connect() as session:
        completed = 0

        def count(_status: TRequestStatus) -> None:
            nonlocal completed
            completed += 1

        deadline = time.monotonic() + 5
        sent = 0
        while completed < 50 and time.monotonic() < deadline:
            status = TRequestStatus()
            status.add_done_callback(count)
            session.SendReceive(probe.EEcho, (sent,), status)  # (no wait, no sync call)
            sent += 1
            busy_until = time.monotonic() + 0.0002  # some work between sends: never idle
            while time.monotonic() < busy_until:
                pass
        assert completed >= 50, f"{completed} callbacks after {sent} sends"


def test_callback_may_issue_a_new_request(probe_server):
    with connect() as session:
        second = TRequestStatus()
        first = TRequestStatus()
        first.add_done_callback(lambda s: session.SendReceive(probe.EEcho, (s.Int() + 1,), second))
        session.SendReceive(probe.EEcho, (10,), first)
        assert first.Wait(5) == 10
        assert second.Wait(5) == 11


def test_another_thread_can_wait_for_a_request(probe_server):
    with connect() as session:
        status = TRequestStatus()
        session.SendReceive(probe.EHold, (1,), status)
        seen: list[int] = []
        waiter = threading.Thread(target=lambda: seen.append(status.Wait(10)))
        waiter.start()
        for i in range(20):  # the issuing thread keeps the channel busy meanwhile
            assert session.SendReceive(probe.EEcho, (i,)) == i
        session.SendReceive(probe.ECompleteHeld, (1, 42))
        waiter.join(10)
        assert seen == [42]


def test_wait_for_request_across_sessions(probe_server):
    with connect() as first, connect() as second:
        held, quick = TRequestStatus(), TRequestStatus()
        first.SendReceive(probe.EHold, (3,), held)
        second.SendReceive(probe.ESleep, (30, 9), quick)
        assert User.WaitForRequest(held, quick, timeout=5) is quick
        first.SendReceive(probe.ECompleteHeld, (3, 0))
        assert held.Wait(5) == 0


def test_many_awaits_in_one_event_loop(probe_server):
    with connect() as session:

        async def one(value: int) -> int:
            status = TRequestStatus()
            session.SendReceive(probe.ESleep, (value % 7, value), status)
            return await status

        async def main() -> list[int]:
            return await asyncio.gather(*(one(v) for v in range(50)))

        assert asyncio.run(asyncio.wait_for(main(), 20)) == list(range(50))


def test_await_reads_an_answer_that_arrived_behind_a_send(probe_server, monkeypatch):
    """An async send does not always read the socket, and a later send may consume the FD's
    signal while an answer waits: `await` must read what is there before it sleeps on the FD.
    (The I/O thread's rescue of idle channels is pushed out of reach, so a miss hangs.)"""
    monkeypatch.setattr(client_inbox, "IDLE", 60.0)
    with connect() as session:

        async def main() -> None:
            for i in range(300):
                first, second = TRequestStatus(), TRequestStatus()
                session.SendReceive(probe.EEcho, (i,), first)
                busy_until = time.monotonic() + 0.0002 + (i % 5) * 0.0002  # first's answer arrives
                while time.monotonic() < busy_until:
                    pass
                session.SendReceive(probe.EEcho, (i,), second)
                assert await asyncio.wait_for(first, 5) == i
                assert await asyncio.wait_for(second, 5) == i

        asyncio.run(main())


def test_a_thread_ending_with_requests_pending_completes_them_with_kerrdied(kernel, probe_server):
    statuses: list[TRequestStatus] = []
    sessions: list[RSession] = []

    def issue() -> None:
        session = connect()
        sessions.append(session)
        for value in range(5):
            status = TRequestStatus()
            session.SendReceive(probe.ESleep, (50, value), status)
            statuses.append(status)

    thread = threading.Thread(target=issue)
    thread.start()
    thread.join(10)
    # The thread's requests die with it, and its unshared session is disconnected at once.
    assert [s.Wait(5) for s in statuses] == [ipcfw.KErrDied] * 5
    wait_until(lambda: kernel.statistics()["sessions"] == 0, timeout=3, what="Disconnect")


def test_closing_an_unshared_session_from_another_thread_is_refused(probe_server):
    session = connect()
    caught: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(session.Close, caught))
    thread.start()
    thread.join(10)
    assert len(caught) == 1 and isinstance(caught[0], ClientPanic)
    assert session.SendReceive(probe.EEcho, (1,)) == 1  # still open for its owner
    session.Close()


def test_wait_timeout_leaves_the_request_pending(probe_server):
    with connect() as session:
        status = TRequestStatus()
        session.SendReceive(probe.EHold, (8,), status)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            status.Wait(0.2)
        assert time.monotonic() - started < 2
        session.SendReceive(probe.ECompleteHeld, (8, 3))
        assert status.Wait(5) == 3


def test_a_status_in_use_cannot_be_reused(probe_server):
    with connect() as session:
        status = TRequestStatus()
        session.SendReceive(probe.EHold, (2,), status)
        with pytest.raises(RuntimeError):
            session.SendReceive(probe.EEcho, (1,), status)
        session.SendReceive(probe.ECompleteHeld, (2, 0))
        assert status.Wait(5) == 0
        session.SendReceive(probe.EEcho, (4,), status)  # free again once completed
        assert status.Wait(5) == 4


def _capture(fn, into: list) -> None:
    try:
        fn()
    except BaseException as exc:
        into.append(exc)


def test_a_callback_run_during_a_sync_call_does_not_steal_its_reply(probe_server):
    with connect() as session:
        chained = TRequestStatus()
        first = TRequestStatus()
        first.add_done_callback(lambda s: session.SendReceive(probe.EEcho, (7,), chained))
        session.SendReceive(probe.ESleep, (20, 1), first)
        # The callback fires while this thread waits in the sync call, on this channel.
        assert session.SendReceive(probe.ESleep, (150, 2)) == 2
        assert first.Wait(5) == 1
        assert chained.Wait(5) == 7


def test_a_connect_that_timed_out_is_closed_when_it_completes(kernel):
    kernel.serve("plugins.slow:SlowServer", "slow")
    with pytest.raises(TimeoutError):
        RSession().CreateSession("slow", timeout=0.2)
    wait_until(lambda: kernel.statistics()["sessions"] == 0, timeout=10,
               what="the orphan to be closed")


def test_close_after_the_creating_thread_ended(probe_server):
    holder: list[RSession] = []
    thread = threading.Thread(target=lambda: holder.append(connect()))
    thread.start()
    thread.join(10)
    holder[0].Close()  # the kernel closed it with the thread's channel; this only tidies up
    assert holder[0].Handle() == 0


def test_threads_ending_right_after_async_calls_leave_the_io_thread_alive(probe_server):
    def one() -> None:
        with connect() as session:
            status = TRequestStatus()
            session.SendReceive(probe.ESleep, (20, 1), status)
            assert status.Wait(5) == 1

    for _ in range(40):
        thread = threading.Thread(target=one)
        thread.start()
        thread.join(10)
    assert any(t.name == "ipcfw-inbox" and t.is_alive() for t in threading.enumerate())
    with connect() as session:  # the I/O thread still settles idle channels
        fired = threading.Event()
        status = TRequestStatus()
        status.add_done_callback(lambda s: fired.set())
        session.SendReceive(probe.ESleep, (20, 2), status)
        assert fired.wait(5)


def test_closing_a_shared_session_ends_another_threads_sync_call(probe_server):
    session = connect()
    session.ShareAuto()
    outcome: list = []

    def blocked() -> None:
        try:
            outcome.append(session.SendReceive(probe.EHold, (1,)))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=blocked)
    thread.start()
    wait_until(lambda: session._life.sync_calls, what="the sync call to be in flight")
    started = time.monotonic()
    session.Close()
    thread.join(5)
    assert len(outcome) == 1 and isinstance(outcome[0], ipcfw.SessionClosed)
    assert time.monotonic() - started < 2


def test_a_first_request_that_times_out_leaves_the_session_connected(kernel, probe_server):
    session = RSession()
    with pytest.raises(TimeoutError):
        session.CreateSession("probe", VERSION, timeout=0.2, first_request=(probe.ESleep, (600, 1)))
    assert session.Handle() != 0  # the caller holds it, and closes it
    session.Close()
    wait_until(lambda: kernel.statistics()["sessions"] == 0, what="the session to close")


def test_shutting_the_runtime_down_completes_pending_requests(probe_server):
    from ipcfw.client.runtime import Runtime

    session = connect()
    status = TRequestStatus()
    session.SendReceive(probe.EHold, (1,), status)
    Runtime.shutdown()
    assert status.Wait(5) == ipcfw.KErrDisconnected
    with pytest.raises(ipcfw.IpcError):
        session.SendReceive(probe.EEcho, (1,))
