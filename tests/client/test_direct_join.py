"""A thread's move to the direct path on a shared direct session, end to end: a real kernel and
a real server process (tests/plugins/probe.py).

What must hold: the thread's first call never waits for its ticket (a Join the server's loop
answers only when it is free), even with the loop busy for seconds; its calls take the kernel
path meanwhile; and the requests it makes reach the server in the order it made them, whatever
their kind, across the switch to its direct connection.
"""

from __future__ import annotations

import threading
import time

import pytest

from conftest import KernelFixture, wait_until
from ipcfw import RSession, TRequestStatus
from plugins.probe import EEcho, ERecord, ESleep, recorded_events
from test_direct_client import in_thread
from test_direct_shared import until_direct

pytestmark = pytest.mark.process

PROBE = "plugins.probe:ProbeServer"
COUNT = 400
MOVES = 5  # threads, one after another, each moving to the direct path


@pytest.fixture
def probe(kernel: KernelFixture) -> KernelFixture:
    kernel.serve(PROBE, "probe")
    return kernel


def test_a_threads_first_async_call_does_not_wait_while_the_servers_loop_is_busy(probe) -> None:
    with RSession.connect("probe", path="direct") as session, \
            RSession.connect("probe", path="kernel") as busy:
        session.ShareAuto()
        sleeping = TRequestStatus()
        busy.SendReceive(ESleep, (4000, 1), sleeping)  # the server's loop: busy for 4 s
        wait_until(lambda: probe.statistics()["messages"] == 1, what="the sleep delivered")

        def first_call() -> tuple[float, int]:
            status = TRequestStatus()
            started = time.monotonic()
            session.SendReceive(EEcho, (5,), status)  # (its Join is answered after the sleep)
            returned = time.monotonic() - started
            return returned, status.Wait(10)

        returned, value = in_thread(first_call)
        assert returned < 2.0 and value == 5  # (a bound; it waited ~4 s for its Join before)
        assert sleeping.Wait(10) == 1


def test_one_threads_requests_arrive_in_order_across_its_move_to_the_direct_path(
    probe,
) -> None:
    with RSession.connect("probe", path="direct") as session, \
            RSession.connect("probe", path="kernel") as other:
        session.ShareAuto()
        other.ShareAuto()
        handle = session.Handle()
        stop = threading.Event()

        def load() -> None:  # (keeps the kernel busy: kernel-path requests lag behind more)
            while not stop.is_set():
                other.SendReceive(EEcho, (0,))

        def requests(first: int) -> list[int]:
            statuses = []
            for i in range(first, first + COUNT):  # async; every 16th sync, and blind
                if i % 16 == 15:
                    assert session.SendReceive(ERecord, (i,)) == i
                elif i % 16 == 7:
                    session.Send(ERecord, (i,))
                else:
                    statuses.append(TRequestStatus())
                    session.SendReceive(ERecord, (i,), statuses[-1])
            values = [status.Wait(10) for status in statuses]
            until_direct(session)  # (the thread did go direct, at some point)
            return values

        loader = threading.Thread(target=load)
        loader.start()
        try:
            for first in range(0, MOVES * COUNT, COUNT):  # a new thread each: a new move
                assert in_thread(lambda: requests(first)) == [
                    i for i in range(first, first + COUNT) if i % 16 not in (7, 15)
                ]
        finally:
            stop.set()
            loader.join(10)
        every = MOVES * COUNT
        wait_until(lambda: sum(e[:2] == ["arg", handle] for e in recorded_events(session))
                   == every, what="every request served")
        arrived = [e[2] for e in recorded_events(session) if e[:2] == ["arg", handle]]
        assert arrived == list(range(every))
