"""Start-up that cannot race: ``RSession.connect(name, wait=S)`` and ``wait_for_server`` wait
for the kernel and for the server, whichever order they start in; a timeout says what was
missing and how long it waited, and leaves nothing waiting in the kernel. On both data paths."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

import ipcfw
from ipcfw import RSession, testing
from conftest import PYTHONPATH, REPO, wait_until

pytestmark = [pytest.mark.process, pytest.mark.usefixtures("data_path")]

ECHO = "servers.echo:EchoServer"


@pytest.fixture
def stack():
    """A kernel's endpoint and workdir, the kernel NOT started (the tests start it)."""
    stack = testing.Stack(env={"PYTHONPATH": PYTHONPATH}, cwd=str(REPO))
    try:
        yield stack
    finally:
        stack.stop()


class Background:
    """`fn()` on a thread of its own: its result or exception, bounded by `join`."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), name="waiter")
        self.thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # (handed to the test)
            self.error = exc

    def join(self, timeout: float = 20.0) -> object:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the waiter is still waiting"
        if self.error is not None:
            raise self.error
        return self.result


def echo_call(endpoint: str, wait: float) -> int:
    with RSession.connect("echo", wait=wait, endpoint=endpoint) as session:
        return session.SendReceive(1, (42,))


def test_connect_waits_for_the_kernel_then_the_server(stack):
    waiter = Background(lambda: echo_call(stack.endpoint, 30))
    stack.start()
    server = stack.serve(ECHO, wait=False)
    assert waiter.join() == 42
    stack.wait_ready(server)


def test_connect_waits_for_a_server_started_before_the_kernel(stack):
    server = stack.serve(ECHO, "--wait-kernel", "30", wait=False)
    waiter = Background(lambda: echo_call(stack.endpoint, 30))
    stack.start()
    assert waiter.join() == 42
    stack.wait_ready(server)


def test_the_kernel_answers_a_waiting_client_when_the_server_registers(stack):
    stack.start()
    waiter = Background(lambda: echo_call(stack.endpoint, 30))
    # The wait is held in the kernel (one AwaitServer), not polled for.
    wait_until(lambda: stack.statistics()["awaits"] == 1, what="the client's wait in the kernel")
    stack.serve(ECHO)
    assert waiter.join() == 42
    assert stack.statistics()["awaits"] == 0


def test_a_wait_survives_a_kernel_restart(stack):
    stack.start()
    waiter = Background(lambda: echo_call(stack.endpoint, 30))
    wait_until(lambda: stack.statistics()["awaits"] == 1, what="the client's wait in the kernel")
    stack.restart()
    stack.serve(ECHO)
    assert waiter.join() == 42


def test_no_kernel_times_out_naming_the_endpoint_and_the_wait(stack):
    started = time.monotonic()
    with pytest.raises(ipcfw.CouldNotConnect) as caught:
        RSession.connect("echo", wait=0.3, endpoint=stack.endpoint)
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 5, elapsed
    text = str(caught.value)
    assert f"no ipcfw kernel at {stack.endpoint} after waiting 0.3 s" in text
    assert "ipcfw kernel" in text and "IPCFW_KERNEL" in text


def test_no_server_times_out_naming_it_and_leaves_no_wait_in_the_kernel(stack):
    stack.start()
    started = time.monotonic()
    with pytest.raises(ipcfw.NotFound) as caught:
        RSession.connect("nosuch", wait=0.3, endpoint=stack.endpoint)
    assert 0.3 <= time.monotonic() - started < 5
    assert "no server 'nosuch' registered" in str(caught.value)
    assert "after waiting 0.3 s" in str(caught.value)
    wait_until(lambda: stack.statistics()["awaits"] == 0, what="the cancelled wait to go")
    with pytest.raises(ipcfw.NotFound):
        ipcfw.wait_for_server("nosuch", 0.1, endpoint=stack.endpoint)
    wait_until(lambda: stack.statistics()["awaits"] == 0, what="the cancelled wait to go")


def test_wait_for_server_returns_at_once_for_a_registered_name(stack):
    stack.start()
    stack.serve(ECHO)
    started = time.monotonic()
    ipcfw.wait_for_server("ECHO", 10, endpoint=stack.endpoint)  # (case-insensitive)
    assert time.monotonic() - started < 5  # (well before its 10 s, even on a loaded machine)
    assert echo_call(stack.endpoint, 0) == 42


def test_a_wait_of_zero_still_finds_a_running_kernel_and_a_registered_server(stack):
    # A wait of 0 looks once: the kernel that is there gets its time to answer (it used to
    # get 1 ms, too little on a loaded machine).
    stack.start()
    stack.serve(ECHO)
    for _ in range(20):
        ipcfw.wait_for_server("echo", 0, endpoint=stack.endpoint)
    assert echo_call(stack.endpoint, 0) == 42


def test_bad_wait_arguments_are_refused_before_anything_is_sent(stack):
    for wait in (-1, float("nan"), "5", True):
        with pytest.raises(ValueError, match="wait must be a number of seconds"):
            RSession.connect("echo", wait=wait, endpoint=stack.endpoint)
    with pytest.raises(ipcfw.BadName):
        ipcfw.wait_for_server("a*b", 1, endpoint=stack.endpoint)


def test_connect_wait_reconnects_after_a_kernel_restart(stack):
    """The documented way back after a kernel death (docs/failures.md): a new session with
    ``connect(wait=)``, which waits for the new kernel and the server's registration again."""
    stack.start()
    server = stack.serve(ECHO)
    session = RSession.connect("echo", wait=10, endpoint=stack.endpoint)
    try:
        assert session.SendReceive(1, (1,)) == 1
        stack.restart()
        with pytest.raises(ipcfw.ServerTerminated):
            session.SendReceive(1, (2,))
    finally:
        session.Close()
    assert echo_call(stack.endpoint, 30) == 42  # `ipcfw serve` registers again meanwhile
    assert server.alive()
