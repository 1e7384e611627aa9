"""Scenarios ported from Symbian's own kernel tests (e32test), where ipcfw once differed from
Symbian: what ipcfw now does, whether it matches Symbian or differs by design (as
docs/concepts.md's "Where ipcfw differs from Symbian" says).

Against a real kernel and a real server process (tests/plugins/differences.py), with real
threads where two calls race.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

import pytest

from conftest import KernelFixture, wait_until
from ipcfw import BadHandle, ClientPanic, RSession, RSubSession, TVersion
from plugins import differences
from plugins.differences import (
    EAliased,
    ECompleteThenPanic,
    EConnects,
    EOpenZero,
    EPanicThenComplete,
    ESlowOpen,
    ESubSessions,
)

pytestmark = pytest.mark.usefixtures("data_path")  # each test on both data paths

NAME = "differences"
PLAIN = TVersion(1, 0, 0)
GATED = TVersion(1, 0, differences.GATED)
SLOW = TVersion(1, 0, differences.SLOW)
TIMEOUT = 10.0


class Gate:
    """The files through which a test holds a connect in the server's NewSessionL."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        self.entered = directory / "entered"
        self.opened = directory / "open"

    def wait_entered(self, timeout: float = TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while not self.entered.exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def open(self) -> None:
        self.opened.touch()


@pytest.fixture
def gate(kernel: KernelFixture) -> Gate:
    """The differences server, hosted in its own process, with a gate for its connects."""
    gate = Gate(kernel.workdir / "gate")
    kernel.env["IPCFW_TEST_GATE"] = str(gate.entered.parent)
    kernel.serve("plugins.differences:DifferencesServer", NAME)
    return gate


def _panic_of(outcome: Any) -> tuple[str, int]:
    assert isinstance(outcome, ClientPanic), f"expected a ClientPanic, got {outcome!r}"
    return outcome.category, outcome.reason


def _events(label: str) -> list:
    with RSession.connect(NAME, PLAIN) as observer:
        return [event for event in differences.recorded_events(observer) if event[0] == label]


# -- 1. One RSession, two connects at once ---------------------------------------------------------
#
# Symbian (t_svr_connect): a second connect while one is outstanding panics the caller KERN-EXEC 9,
# and one session exists. ipcfw used to send both: the server made two sessions, the first one
# orphaned until its thread ended.

SECOND_CONNECTS: dict[str, Callable[[RSession, bytes], object]] = {
    "CreateSession": lambda session, token: session.CreateSession(NAME, PLAIN, timeout=2.0),
    "connect": lambda session, token: session.connect(NAME, PLAIN, timeout=2.0),
    "Open": lambda session, token: session.Open(token, timeout=2.0),
}


@pytest.mark.parametrize("second_connect", sorted(SECOND_CONNECTS))
def test_a_second_connect_while_one_is_outstanding_panics_its_caller(kernel, gate, second_connect):
    with RSession.connect(NAME, PLAIN) as sharer:
        token = sharer.ShareProtected()  # (for Open)
        session = RSession()
        outcome: list[Any] = []
        seen: list[str] = []

        def second() -> None:
            try:
                if not gate.wait_entered():
                    outcome.append("the first connect never reached NewSessionL")
                    return
                # The first connect is in the server's NewSessionL now: the two overlap.
                seen.append(repr(session))
                SECOND_CONNECTS[second_connect](session, token)
                outcome.append("connected")
            except BaseException as exc:
                outcome.append(exc)
            finally:
                gate.open()

        thread = threading.Thread(target=second, name="second-connect")
        thread.start()
        try:
            session.CreateSession(NAME, GATED, timeout=TIMEOUT)
        finally:
            thread.join(TIMEOUT)
        assert not thread.is_alive()
        assert len(outcome) == 1 and _panic_of(outcome[0]) == ("KERN-EXEC", 9)
        assert "already being connected" in str(outcome[0])
        assert repr(threading.current_thread().name) in str(outcome[0])  # who is connecting it
        assert seen == ["<RSession connecting>"]

        # The first connect went on undisturbed, and it made the only session.
        assert session.Handle() != 0
        assert session.SendReceive(EConnects) == 1
        assert kernel.statistics()["sessions"] == 2  # the sharer's and this one
        # Once connected, every way of connecting it again panics KERN-EXEC 57.
        for again in SECOND_CONNECTS.values():
            with pytest.raises(ClientPanic) as raised:
                again(session, token)
            assert (raised.value.category, raised.value.reason) == ("KERN-EXEC", 57)
            assert "already connected" in str(raised.value)
        assert session.SendReceive(EConnects) == 1
        session.Close()
        wait_until(lambda: kernel.statistics()["sessions"] == 1, timeout=TIMEOUT,
                   what="the closed session to go")


def test_connect_and_open_called_on_an_rsession_fill_that_one(kernel, gate):
    with RSession.connect(NAME, PLAIN) as sharer:
        token = sharer.ShareProtected()
        shared = RSession()
        assert shared.Open(token) is shared  # Symbian's way: RSessionBase::Open fills the object
        assert shared.Handle() == sharer.Handle()
        assert shared.SendReceive(EConnects) == 0
        shared.Close()
        assert shared.connect(NAME, PLAIN) is shared  # closed: it may be connected again
        assert shared.Handle() not in (0, sharer.Handle())
        shared.Close()
        other = RSession.connect(NAME, PLAIN)  # on the class: a new one, as before
        assert isinstance(other, RSession) and other is not shared
        other.Close()


def test_threads_racing_to_connect_one_rsession_make_one_session(kernel, gate):
    session = RSession()
    racers = 8
    start = threading.Barrier(racers)
    checked = threading.Event()
    outcomes: dict[str, Any] = {}

    def race() -> None:
        name = threading.current_thread().name
        try:
            start.wait(TIMEOUT)
            session.CreateSession(NAME, SLOW, timeout=TIMEOUT)  # NewSessionL takes 0.3 s
            outcomes[name] = "connected"
        except BaseException as exc:
            outcomes[name] = exc
        # Stay alive until the sessions are counted: an unshared session ends with its thread.
        checked.wait(TIMEOUT)
        if outcomes[name] == "connected":
            session.Close()

    threads = [threading.Thread(target=race, name=f"racer-{n}") for n in range(racers)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(outcomes) == racers, timeout=TIMEOUT, what="every racer to finish")
        sessions = kernel.statistics()["sessions"]
    finally:
        checked.set()
        for thread in threads:
            thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    winners = [name for name, outcome in outcomes.items() if outcome == "connected"]
    assert len(winners) == 1, outcomes
    losers = [outcome for outcome in outcomes.values() if outcome != "connected"]
    # Most lose while the winner's connect is outstanding (9); a late one after it is done (57).
    assert {_panic_of(outcome) for outcome in losers} <= {("KERN-EXEC", 9), ("KERN-EXEC", 57)}
    assert sessions == 1
    with RSession.connect(NAME, PLAIN) as observer:
        assert observer.SendReceive(EConnects) == 1  # one connect reached the server


def test_threads_racing_to_create_one_rsubsession_make_one_subsession(gate):
    with RSession.connect(NAME, PLAIN) as session:
        session.ShareAuto()
        subsession = RSubSession()
        racers = 4
        start = threading.Barrier(racers)
        outcomes: list[Any] = []

        def race() -> None:
            try:
                start.wait(TIMEOUT)
                subsession.CreateSubSession(session, ESlowOpen)  # the server takes 0.3 s
                outcomes.append("created")
            except BaseException as exc:
                outcomes.append(exc)

        threads = [threading.Thread(target=race, name=f"racer-{n}") for n in range(racers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        assert not any(thread.is_alive() for thread in threads)
        assert outcomes.count("created") == 1, outcomes
        losers = [outcome for outcome in outcomes if outcome != "created"]
        assert {_panic_of(outcome) for outcome in losers} <= {("KERN-EXEC", 9), ("KERN-EXEC", 57)}
        assert session.SendReceive(ESubSessions) == 1  # no orphaned object in the server
        assert subsession.SubSessionHandle() != 0
        subsession.CloseSubSession(99)  # (the answer is ignored; the object ends with the session)


# -- 2. One bytearray passed as two arguments ------------------------------------------------------
#
# Symbian: both arguments are one piece of client memory, so the server reads through one what
# it wrote through the other. ipcfw differs, by design: every argument is a copy in the request,
# and writes reach the client's bytearray at completion.


def test_one_bytearray_passed_as_two_arguments_is_two_descriptors(gate):
    with RSession.connect(NAME, PLAIN) as session:
        content = b"the old content, long enough"
        shared, seen = bytearray(content), bytearray(64)
        length = session.SendReceive(EAliased, (shared, shared, seen, 0))
        # After WriteL(0, ...), ReadL(1) still showed what the client sent as argument 1.
        assert bytes(seen) == content and length == len(content)
        # The bytearray ends as the server left argument 0, the only one it wrote.
        assert bytes(shared) == differences.ALIAS_WRITE

        shared, seen = bytearray(content), bytearray(64)
        session.SendReceive(EAliased, (shared, shared, seen, 1))  # writes through 0, then 1
        assert bytes(seen) == content
        # Both written: the bytearray ends as the higher-numbered argument was left.
        assert bytes(shared) == differences.ALIAS_WRITE_1


# -- 3. A subsession create that writes handle 0 ---------------------------------------------------
#
# Symbian: CreateSubSession returns KErrNone with the subsession handle 0 (not open). ipcfw
# differs, by design: 0 names no subsession, so the create raises BadHandle at once.


def test_a_subsession_create_that_writes_handle_0_raises_bad_handle(gate):
    with RSession.connect(NAME, PLAIN) as session:
        subsession = RSubSession()
        with pytest.raises(BadHandle, match="left handle 0 in argument 3") as raised:
            subsession.CreateSubSession(session, EOpenZero)
        assert f"function {EOpenZero}" in str(raised.value)
        assert subsession.SubSessionHandle() == 0 and subsession.Session() is None
        with pytest.raises(ClientPanic) as not_open:
            subsession.SendReceive(ESubSessions)
        assert (not_open.value.category, not_open.value.reason) == ("KERN-EXEC", 0)
        subsession.CreateSubSession(session, ESlowOpen)  # it may be created again
        assert subsession.SubSessionHandle() != 0
        subsession.CloseSubSession(99)


# -- 4. Panic() through a message already completed ------------------------------------------------
#
# Symbian: completing a message nulls its handle; Complete() again panics the server USER 70,
# Panic() (RMessagePtr2::Panic -> the kernel, with a null handle) KERN-EXEC 44.


def test_panic_through_a_completed_message_is_kern_exec_44_and_sends_nothing(gate):
    with RSession.connect(NAME, PLAIN) as session:
        assert session.SendReceive(ECompleteThenPanic, (5,)) == 5
        # The late Panic() reached nobody: the session is alive and answers.
        assert session.SendReceive(EConnects) == 0
        (complete_again,) = _events("complete-again")
        assert complete_again[1:3] == ["USER", 70], complete_again
        assert "already completed" in complete_again[3]
        (panic_after,) = _events("panic-after-complete")
        assert panic_after[1:3] == ["KERN-EXEC", 44], panic_after
        assert "Panic()" in panic_after[3] and "already completed" in panic_after[3]


def test_after_a_panic_complete_is_user_70_and_panic_is_kern_exec_44(gate):
    victim = RSession.connect(NAME, PLAIN)
    try:
        with pytest.raises(ClientPanic) as raised:
            victim.SendReceive(EPanicThenComplete, (2,))
        assert (raised.value.category, raised.value.reason) == ("DIFF", 2)  # the first one only
    finally:
        victim.Close()
    (panic_again,) = _events("panic-again")
    assert panic_again[1:3] == ["KERN-EXEC", 44], panic_again
    (complete_after,) = _events("complete-after-panic")
    assert complete_after[1:3] == ["USER", 70], complete_after
    assert "completed by Panic()" in complete_after[3]
