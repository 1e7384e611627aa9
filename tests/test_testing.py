"""ipcfw.testing: readiness by ``--ready-fd``, clear start failures, stopping for sure; and the
one percentile formula of the demo and the bench."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

import ipcfw
from ipcfw import testing
from conftest import PYTHONPATH, wait_until
from ipcfw.testing import READY_LINE, Process, ReadySignal, Stack, StartError
from ipcfw.tools.bench.measure import percentile

# -- pure ---------------------------------------------------------------------------------------


def test_ready_signal_writes_ready_once_then_closes_the_pipe() -> None:
    read_end, write_end = os.pipe()
    try:
        ready = ReadySignal(write_end)
        ready.set()
        ready.set()  # a server that registers again after a kernel restart: nothing more
        assert ready.is_set()
        assert os.read(read_end, 100) == READY_LINE
        assert os.read(read_end, 100) == b""  # end of file: the write end is closed
    finally:
        os.close(read_end)


def test_ready_signal_refuses_a_descriptor_that_is_not_open() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    with pytest.raises(ValueError, match=f"file descriptor {write_end} is not open"):
        ReadySignal(write_end)


def test_ready_signal_without_a_descriptor_is_an_event() -> None:
    ready = ReadySignal(None)
    ready.set()
    assert ready.is_set()


@pytest.mark.parametrize("values, q, expected", [
    (list(range(1, 101)), 50, 50),
    (list(range(1, 101)), 99, 99),
    (list(range(1, 101)), 100, 100),
    ([10, 20, 30, 40], 50, 20),  # nearest rank: a measured value, never an average
    ([10, 20, 30, 40], 99, 40),
    ([7], 1, 7),
])
def test_percentile_is_nearest_rank(values: list[int], q: float, expected: int) -> None:
    assert percentile(values, q) == expected


# -- processes ----------------------------------------------------------------------------------


@pytest.mark.process
def test_a_stack_serves_restarts_and_leaves_nothing_behind() -> None:
    with Stack(env={"PYTHONPATH": PYTHONPATH}) as stack:
        server = stack.serve("servers.echo:EchoServer")
        with ipcfw.RSession.connect("echo", endpoint=stack.endpoint) as session:
            assert session.SendReceive(1, (42,)) == 42
        first = stack.kernel
        assert first is not None
        second = stack.restart()
        assert second.pid != first.pid and first.returncode == -signal.SIGKILL
        wait_until(lambda: stack.statistics()["servers"] == 1, what="the server to register again")
    assert not os.path.exists(stack.workdir)
    assert not any(p.alive() for p in stack.processes)
    assert server.returncode == 0 and second.returncode == 0  # SIGTERM: a clean exit


@pytest.mark.process
def test_a_plugin_that_cannot_load_fails_at_once_with_its_status_and_log() -> None:
    with Stack() as stack:
        started = time.monotonic()
        with pytest.raises(StartError) as failed:
            stack.serve("no_such_module:NoServer")
        assert time.monotonic() - started < stack.timeout / 2  # not at the deadline
    message = str(failed.value)
    assert "serve exited with status 2 before it was ready" in message
    assert "cannot load plugin 'no_such_module:NoServer'" in message  # the log's tail


@pytest.mark.process
def test_a_process_that_is_never_ready_times_out_and_is_stopped_for_sure() -> None:
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            " print('up', flush=True); time.sleep(60)")
    with Stack() as stack:
        stubborn = stack.spawn([sys.executable, "-c", code], "stubborn", ready=True)
        with pytest.raises(StartError, match="stubborn not ready within"):
            stubborn.wait_ready(0.5)
        wait_until(lambda: "up" in stubborn.log(), what="SIGTERM to be ignored")
        started = time.monotonic()
        stack.stop(timeout=0.5)
        assert time.monotonic() - started < 5
    assert stubborn.returncode == -signal.SIGKILL


@pytest.mark.process
def test_readiness_is_seen_on_a_descriptor_beyond_select_s_limit(tmp_path: Path) -> None:
    """A long test process may hold more than 1024 descriptors (zmq sockets): the ready
    pipe's may be beyond what select() can watch."""
    code = "import os, sys; os.write(int(sys.argv[-1]), b'READY\\n')"
    child = Process([sys.executable, "-c", code], tmp_path / "child.log", ready=True)
    high = 1500
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= high:
        if hard != resource.RLIM_INFINITY and hard <= high:
            pytest.skip(f"descriptors limited to {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (high + 1, hard))
    try:
        low = child._ready_fd
        assert low is not None
        os.dup2(low, high)  # (the pipe, as the 1501st descriptor would be)
        os.close(low)
        child._ready_fd = high
        child.wait_ready(10)
        assert child.ready
    finally:
        child.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.process
def test_a_stack_interrupted_while_stopping_its_servers_still_stops_its_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Ctrl-C never reaches the children (they run in sessions of their own): a stop
    interrupted while it waits for the servers must still stop everything."""
    stack = Stack()
    stack.start()
    sleeper = stack.spawn([sys.executable, "-c", "import time; time.sleep(60)"], "sleeper")
    real_stop = testing.stop_processes
    calls = []

    def interrupted_once(processes: Iterable[subprocess.Popen[bytes]], timeout: float) -> None:
        calls.append(timeout)
        if len(calls) == 1:
            raise KeyboardInterrupt  # (as if during the wait)
        real_stop(processes, timeout)

    monkeypatch.setattr(testing, "stop_processes", interrupted_once)
    try:
        with pytest.raises(KeyboardInterrupt):
            stack.stop()
        assert stack.kernel is not None and stack.kernel.returncode is not None
        assert sleeper.returncode in (-signal.SIGTERM, -signal.SIGKILL)  # stopped, reaped
        assert not os.path.exists(stack.workdir)
    finally:  # (whatever this test finds, it leaves nothing running)
        monkeypatch.undo()
        stack.stop(0)


@pytest.mark.process
def test_a_kernel_that_cannot_start_says_why() -> None:
    with pytest.raises(StartError) as failed:
        with Stack(kernel_options=("--max-frame", "-1")):
            pass
    assert "kernel exited with status 2 before it was ready" in str(failed.value)
