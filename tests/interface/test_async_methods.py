"""An interface served by ``async def`` methods (tests/plugins/typed_aio.py), on the host's
asyncio loop, on both data paths: the coroutine's return answers the call, one session awaiting
does not stop the others, raising fails the call, and the client's cancel (a Reply's status, or
an awaiting task timing out) cancels the coroutine."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from conftest import wait_until
from ipcfw import KErrCancel, KErrNotFound, NotFound
from plugins.typed_aio import Sleeper

pytestmark = pytest.mark.usefixtures("data_path")  # each test on both data paths

TIMEOUT = 5.0


@pytest.fixture
def sleeper(kernel):
    kernel.serve("plugins.typed_aio:SleeperServer", "sleeper")
    return kernel


def test_async_methods_answer_with_what_they_return(sleeper):
    with Sleeper.connect() as proxy:
        assert proxy.sleep_then(10, 7) == 7
        assert proxy.shout("quiet") == "QUIET"
        with pytest.raises(NotFound):
            proxy.fail(KErrNotFound)
        assert proxy.cancellations() == 0
        assert proxy.caller_pid() == os.getpid()  # self.Message() in an async method


def test_one_session_awaiting_does_not_stop_the_others(sleeper):
    with Sleeper.connect() as slow, Sleeper.connect() as quick:
        started = time.monotonic()
        waiting = slow.sleep_then.send(600, 1)
        for _ in range(5):
            assert quick.shout("x") == "X"
        assert time.monotonic() - started < 0.5 and not waiting.done()
        assert waiting.result(TIMEOUT) == 1


def test_the_clients_cancel_cancels_the_coroutine(sleeper):
    with Sleeper.connect() as proxy:
        reply = proxy.wait_forever.send()
        wait_until(lambda: proxy.waiting() == 1, timeout=TIMEOUT, what="the coroutine to start")
        assert reply.status.Cancel() == KErrCancel
        wait_until(lambda: proxy.cancellations() == 1 and proxy.waiting() == 0,
                   timeout=TIMEOUT, what="the coroutine to be cancelled")

        async def timed_out() -> None:
            awaiting = asyncio.ensure_future(
                asyncio.wait_for(proxy.wait_forever.call_async(), 2.0))
            deadline = time.monotonic() + TIMEOUT
            while proxy.waiting() == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # (the coroutine starts well before the timeout)
            await awaiting

        with pytest.raises(asyncio.TimeoutError):
            asyncio.run(timed_out())
        wait_until(lambda: proxy.cancellations() == 2, timeout=TIMEOUT,
                   what="the awaited coroutine to be cancelled")
