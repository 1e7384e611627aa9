"""Tests of ipcfw.server.coroutines through the server's state: an ``async def ServiceL``'s
coroutine is run by the host's `spawn` (here a fake that keeps it), cancelled with its message
or its session, and fails its message when it raises. No processes: the process tests are in
test_asyncio_server.py."""

from __future__ import annotations

from typing import Any
from collections.abc import Awaitable, Callable, Iterator

import pytest

from ipcfw import errors
from ipcfw.protocol import MAX_FRAME, Cancelled, Complete, Disconnect
from ipcfw.server import CServer, CSession, RMessage
from ipcfw.server.overlay import Layers
from ipcfw.server.state import ServerState
from ipcfw.version import TVersion

from test_server_state import HANDLE, FakeLoop, Harness


class FakeTask:
    """What the fake spawn returns: the awaitable it was given, and whether it was cancelled."""

    def __init__(self, awaitable: Awaitable[Any],
                 done: Callable[[BaseException | None, bool], None]) -> None:
        self.awaitable = awaitable
        self.done = done
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    def finish(self, exc: BaseException | None = None) -> None:
        """End it as asyncio would: its done callback, with how it ended."""
        self.awaitable.close()  # type: ignore[attr-defined]
        self.done(exc, self.cancelled and exc is None)


class AsyncSession(CSession):
    async def ServiceL(self, message: RMessage) -> None:
        message.Complete(message.Function())


class Server(CServer):
    name = "coroutines-test"
    version = TVersion(1, 0, 0)
    session_class = AsyncSession


class AsyncHarness(Harness):
    """A `Harness` whose state has a fake `spawn` keeping every task it starts."""

    def __init__(self, top: CServer, spawn: bool = True) -> None:
        self.tasks: list[FakeTask] = []
        super().__init__(top)
        self.state = ServerState(Layers(top, FakeLoop()), self.emit, max_frame=MAX_FRAME,
                                 spawn=self.spawn if spawn else None)

    def spawn(self, awaitable: Awaitable[Any],
              done: Callable[[BaseException | None, bool], None]) -> FakeTask:
        task = FakeTask(awaitable, done)
        self.tasks.append(task)
        return task


@pytest.fixture
def harness() -> Iterator[AsyncHarness]:
    harness = AsyncHarness(Server())
    harness.connect()
    yield harness
    for task in harness.tasks:
        task.awaitable.close()  # type: ignore[attr-defined]  (never run: no warning for it)


def test_an_async_servicel_is_spawned_and_its_message_stays_in_service(harness):
    msg = harness.deliver(3)
    (task,) = harness.tasks
    assert harness.take() == []  # nothing completed: the coroutine has not run
    assert harness.state.statistics()["coroutines"] == 1
    assert [m.Function() for m in harness.state.in_service(HANDLE)] == [3]
    task.finish()
    assert harness.state.statistics()["coroutines"] == 0
    harness.state.receive(Cancelled(msg, HANDLE))  # nothing left to cancel
    assert not task.cancelled


def test_the_clients_cancel_cancels_the_coroutine(harness):
    msg = harness.deliver(3)
    (task,) = harness.tasks
    harness.state.receive(Cancelled(msg, HANDLE))
    assert task.cancelled
    task.finish()
    assert harness.take() == []  # the kernel answered the client; nothing is sent
    assert harness.state.statistics()["coroutines"] == 0


def test_the_sessions_end_cancels_all_its_coroutines_before_disconnect(harness):
    harness.deliver(3)
    harness.deliver(4)
    harness.connect(handle=HANDLE + 1)
    harness.deliver(5, handle=HANDLE + 1)
    first, second, other = harness.tasks
    harness.state.receive(Disconnect(harness.msg_id(), HANDLE))
    assert first.cancelled and second.cancelled and not other.cancelled
    harness.state.end()
    assert other.cancelled


def test_a_coroutine_that_raises_fails_its_message_with_the_errors_code_and_text(harness):
    msg = harness.deliver(3)
    (task,) = harness.tasks
    task.finish(errors.IpcError(errors.KErrNotReady, "not yet"))
    assert harness.take() == [Complete(msg, errors.KErrNotReady, (), "not yet")]
    other = harness.deliver(4)
    harness.tasks[1].finish(ValueError("boom"))
    assert harness.take() == [Complete(other, errors.KErrGeneral, (), (
        "ValueError in the server's ServiceL (function 4); the traceback is in the server's "
        "log"))]


def test_a_coroutine_that_completed_its_message_then_raised_sends_nothing_more(harness):
    harness.deliver(3)
    (task,) = harness.tasks
    (message,) = harness.state.in_service(HANDLE)
    message.Complete(7)
    assert len(harness.take()) == 1
    task.finish(ValueError("after the completion"))
    assert harness.take() == []


def test_an_async_servicel_without_an_asyncio_host_fails_its_message():
    harness = AsyncHarness(Server(), spawn=False)
    harness.connect()
    msg = harness.deliver(3)
    assert harness.take() == [Complete(msg, errors.KErrGeneral, (), (
        "TypeError in the server's ServiceL (function 3); the traceback is in the server's "
        "log"))]
    assert harness.tasks == []
