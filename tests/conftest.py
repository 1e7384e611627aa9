"""Fixtures that run real ipcfw processes: a kernel, server plugins, client programs.

Every process a fixture starts is stopped at teardown (SIGTERM, a bounded wait, then SIGKILL),
and every wait polls a condition against a deadline instead of sleeping a fixed time. The kernel
fixture also fails the test if the kernel died during it: no test may crash the kernel.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

import ipcfw

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
PYTHONPATH = os.pathsep.join([str(REPO), str(TESTS)])


def wait_until(
    condition: Callable[[], object], timeout: float = 10.0, what: str = "condition"
) -> object:
    """Poll `condition` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


class ManagedProcess:
    """A child process with its output in a log file, stopped for sure at teardown."""

    def __init__(
        self, argv: list[str], log_path: Path, env: dict[str, str], cwd: Optional[str] = None
    ) -> None:
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd or str(REPO),
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.alive():
            os.kill(self.popen.pid, signum)

    def stop(self, timeout: float = 5.0) -> Optional[int]:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        self._log.close()
        return self.popen.returncode


class KernelFixture:
    """A real kernel on a private endpoint, plus helpers to start servers and clients."""

    def __init__(self, workdir: Path, options: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.endpoint = f"ipc://{workdir}/kernel"
        self.env = dict(os.environ, IPCFW_KERNEL=self.endpoint, PYTHONPATH=PYTHONPATH)
        self.children: list[ManagedProcess] = []
        self.options = options  # e.g. ("--max-backlog", "2000"), from @pytest.mark.kernel_options
        self.process = self._spawn("kernel", ["kernel", "--endpoint", self.endpoint, *options])
        wait_until(lambda: os.path.exists(f"{workdir}/kernel") or not self.process.alive(),
                   what="the kernel socket")
        assert self.process.alive(), f"kernel failed to start:\n{self.process.log()}"

    def _spawn(self, label: str, ipcfw_args: list[str]) -> ManagedProcess:
        argv = [sys.executable, "-m", "ipcfw", "--log-level", "info", *ipcfw_args]
        log = self.workdir / f"{label}-{len(self.children)}.log"
        child = ManagedProcess(argv, log, self.env)
        self.children.append(child)
        return child

    def serve(self, plugin: str, name: Optional[str] = None, *extra: str) -> ManagedProcess:
        """Host `plugin` (module:Class) in its own process; return once it is registered."""
        server = self._spawn("serve", ["serve", plugin, "--endpoint", self.endpoint, *extra])
        if name is not None:
            wait_until(lambda: f"server {name!r} registered" in server.log() or not server.alive(),
                       what=f"server {name!r} to register")
            assert server.alive(), f"server {plugin} died:\n{server.log()}"
        return server

    def client(self, argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run a client program to completion (bounded by `timeout`)."""
        return subprocess.run(
            [sys.executable, *argv], env=self.env, cwd=str(REPO), capture_output=True,
            text=True, timeout=timeout,
        )

    def spawn_client(self, argv: list[str], label: str = "client") -> ManagedProcess:
        """Start a client program in the background; it is stopped at teardown."""
        child = ManagedProcess(
            [sys.executable, *argv], self.workdir / f"{label}-{len(self.children)}.log", self.env
        )
        self.children.append(child)
        return child

    def restart(self) -> None:
        """SIGKILL the kernel and start a new one on the same endpoint."""
        self.process.kill()
        self.process.popen.wait(10)
        self.process = self._spawn("kernel", ["kernel", "--endpoint", self.endpoint, *self.options])
        wait_until(lambda: "listening" in self.process.log() or not self.process.alive(),
                   what="the new kernel")
        assert self.process.alive(), f"kernel failed to restart:\n{self.process.log()}"

    def statistics(self) -> dict[str, int]:
        return ipcfw.kernel_statistics(self.endpoint)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


@pytest.fixture
def kernel(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[KernelFixture]:
    """A fresh kernel for one test; `IPCFW_KERNEL` points at it. Mark the test with
    ``@pytest.mark.kernel_options("--max-backlog", "2000")`` to start it with options."""
    marker = request.node.get_closest_marker("kernel_options")
    workdir = Path(tempfile.mkdtemp(prefix="ipcfw-"))
    os.chmod(workdir, 0o700)
    fixture = KernelFixture(workdir, tuple(marker.args) if marker else ())
    monkeypatch.setenv("IPCFW_KERNEL", fixture.endpoint)
    crashed = False
    try:
        yield fixture
        crashed = not fixture.process.alive()
    finally:
        fixture.stop()
        kernel_log = fixture.process.log()
        shutil.rmtree(workdir, ignore_errors=True)
    assert not crashed, f"the kernel died during the test:\n{kernel_log}"


# -- process tests -------------------------------------------------------------------------------
# A test that starts a process is a process test: marked `process`, so that `pytest -m "not
# process"` runs the pure tests alone, in seconds. Tests that use the `kernel` fixture are marked
# here; a module whose tests start processes otherwise says `pytestmark = pytest.mark.process`.
# An unmarked test that starts a process fails, so the marks cannot drift from the truth.


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "kernel" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.process)


@pytest.fixture(autouse=True)
def _processes_only_in_process_tests(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if request.node.get_closest_marker("process") is not None:
        return

    def refuse(*args: object, **kwargs: object) -> subprocess.Popen:
        raise AssertionError(
            f"{request.node.nodeid} starts a process: mark it @pytest.mark.process"
        )

    monkeypatch.setattr(subprocess, "Popen", refuse)
