"""Fixtures that run real ipcfw processes: a kernel, server plugins, client programs.

Every process a fixture starts is stopped at teardown (SIGTERM, a bounded wait, then SIGKILL),
and every wait polls a condition against a deadline instead of sleeping a fixed time. The kernel
fixture also fails the test if the kernel died during it: no test may crash the kernel.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, settings

import ipcfw
from ipcfw import testing

# The hypothesis state machines' profiles (tests/*/test_*_properties.py), defined once here: a
# profile loaded in a test module is every module's, whichever was imported last. "ci", the
# default, runs in seconds, the same examples every run (a CI run is not a search: a red one
# must be reproducible); HYPOTHESIS_PROFILE=long searches, for minutes, with new examples.
settings.register_profile("ci", max_examples=200, stateful_step_count=60, deadline=None,
                          derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=3000, stateful_step_count=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
INSTALLED = not Path(ipcfw.__file__).resolve().is_relative_to(REPO)
"""True when the ipcfw under test is installed (CI's smoke run of the wheel), not the checkout."""


def _examples_home() -> Path:
    """A directory holding links to the checkout's ``servers/`` and ``clients/`` and nothing
    else, removed at exit: run in it, with it on their path, the processes the fixtures start
    find ``servers.echo:EchoServer`` and the installed ipcfw, not the checkout's."""
    home = Path(tempfile.mkdtemp(prefix="ipcfw-tests-home-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    for name in ("servers", "clients"):
        (home / name).symlink_to(REPO / name, target_is_directory=True)
    sys.path.insert(0, str(home))  # for this process's own `from servers.kv import ...`
    return home


HOME = _examples_home() if INSTALLED else REPO
"""Where the processes the fixtures start run, with it on their path: the checkout, or beside an
installed ipcfw the links `_examples_home` makes."""
PYTHONPATH = os.pathsep.join([str(HOME), str(TESTS)])


def pytest_report_header() -> str:
    """Which ipcfw the tests import (CI's smoke run of the wheel shows it is the installed one)."""
    where = "installed" if INSTALLED else "this checkout"
    return f"ipcfw {ipcfw.__version__} from {Path(ipcfw.__file__).parent} ({where})"


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


class ManagedProcess(testing.Process):
    """A child process with its output in a log file, stopped for sure at teardown (started
    in `HOME` unless `cwd` says otherwise)."""

    def __init__(
        self, argv: list[str], log_path: Path, env: dict[str, str], cwd: str | None = None
    ) -> None:
        super().__init__(argv, log_path, env, cwd or str(HOME))


class KernelFixture:
    """A real kernel on a private endpoint, plus helpers to start servers and clients: an
    `ipcfw.testing.Stack` with the names the tests use."""

    def __init__(self, workdir: Path, options: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.options = options  # e.g. ("--max-backlog", "2000"), from @pytest.mark.kernel_options
        self.stack = testing.Stack(
            workdir, kernel_options=options, env={"PYTHONPATH": PYTHONPATH}, cwd=str(HOME),
            log_level="info",
        )
        self.endpoint = self.stack.endpoint
        self.env = self.stack.env
        self.children = self.stack.processes  # tests may add processes for teardown to stop
        try:
            self.process = self.stack.start()
        except BaseException:
            self.stack.stop()
            raise

    def serve(self, plugin: str, name: str | None = None, *extra: str) -> testing.Process:
        """Host `plugin` (module:Class) in its own process; with a `name`, return once it is
        registered (without one, at once: for a server expected to fail)."""
        return self.stack.serve(plugin, *extra, wait=name is not None)

    def client(self, argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run a client program to completion (bounded by `timeout`)."""
        return subprocess.run(
            [sys.executable, *argv], env=self.env, cwd=str(HOME), capture_output=True,
            text=True, timeout=timeout,
        )

    def spawn_client(self, argv: list[str], label: str = "client") -> testing.Process:
        """Start a client program in the background; it is stopped at teardown."""
        return self.stack.spawn([sys.executable, *argv], label)

    def restart(self) -> None:
        """SIGKILL the kernel and start a new one on the same endpoint."""
        self.process = self.stack.restart()

    def statistics(self) -> dict[str, int]:
        return self.stack.statistics()

    def stop(self) -> None:
        self.stack.stop()


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


@pytest.fixture
def echo(kernel: KernelFixture) -> KernelFixture:
    """The kernel with the example echo server registered."""
    kernel.serve("servers.echo:EchoServer", "echo")
    return kernel


@pytest.fixture
def kv(kernel: KernelFixture) -> KernelFixture:
    """The kernel with the example key-value server registered."""
    kernel.serve("servers.kv:KvServer", "kv")
    return kernel


@pytest.fixture(params=["kernel", "direct"])
def data_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once per data path: every session created without ``path=``, in this process
    and in the processes the test starts, takes it (through ``IPCFW_PATH``). A module applies
    it to all its tests with ``pytestmark = pytest.mark.usefixtures("data_path")``, which pytest
    sets up before the `kernel` fixture, whose processes inherit the environment."""
    monkeypatch.setenv("IPCFW_PATH", request.param)
    return str(request.param)


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
