"""Activation on demand, for real: ``ipcfw kernel --services DIR`` starting servers on their
first connect (on both data paths), once for concurrent connects; failed starts (an exit, a
timeout) reaching the clients with the server's status and output; idle exit and the restart
after it; waits that activate; the kernel stopping what it started; a bad service file."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from collections.abc import Iterator

import psutil
import pytest

import ipcfw
from ipcfw import RSession, testing
from ipcfw.client import kernel_sessions
from ipcfw.protocol import Path as DataPath
from conftest import PYTHONPATH, REPO, wait_until

pytestmark = [pytest.mark.process, pytest.mark.usefixtures("data_path")]

ECHO = "servers.echo:EchoServer"


class Activating:
    """A services directory, and a kernel started with ``--services`` on it (`start`)."""

    def __init__(self) -> None:
        self.workdir = testing.private_dir()
        self.services = self.workdir / "services"
        self.services.mkdir()
        self.stack: testing.Stack | None = None

    def echo(self, **keys: object) -> Path:
        """The service "echo" hosting the echo server, which appends its pid to the file this
        returns, as it starts."""
        starts = self.workdir / "echo.starts"
        script = (f"echo $$ >> {shlex.quote(str(starts))}; exec {shlex.quote(sys.executable)} "
                  f"-m ipcfw serve {ECHO}")
        self.service("echo", ["sh", "-c", script], **keys)
        return starts

    def service(self, name: str, command: list[str], **keys: object) -> None:
        lines = [f"command = {_toml(command)}", f"working_directory = {_toml(str(REPO))}"]
        lines += [f"{key} = {_toml(value)}" for key, value in keys.items()]
        (self.services / f"{name}.toml").write_text("\n".join(lines) + "\n")

    def start(self) -> testing.Stack:
        self.stack = testing.Stack(
            self.workdir, kernel_options=("--services", str(self.services)),
            env={"PYTHONPATH": PYTHONPATH}, cwd=str(REPO), log_level="info",
        )
        self.stack.start()
        return self.stack

    def kernel_log(self) -> str:
        assert self.stack is not None and self.stack.kernel is not None
        return self.stack.kernel.log()


def _toml(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


@pytest.fixture
def activating() -> Iterator[Activating]:
    setup = Activating()
    try:
        yield setup
    finally:
        if setup.stack is not None:
            setup.stack.stop()
        shutil.rmtree(setup.workdir, ignore_errors=True)


def started(stack: testing.Stack, monkeypatch: pytest.MonkeyPatch) -> testing.Stack:
    monkeypatch.setenv("IPCFW_KERNEL", stack.endpoint)
    return stack


def pids(starts: Path) -> list[int]:
    try:
        return [int(line) for line in starts.read_text().split()]
    except FileNotFoundError:
        return []


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_first_connect_starts_the_server(activating, monkeypatch, data_path):
    starts = activating.echo()
    started(activating.start(), monkeypatch)
    assert ipcfw.kernel_statistics()["servers"] == 0
    with RSession.connect("Echo", timeout=20) as session:
        assert session.SendReceive(1, (42,)) == 42
        row, = kernel_sessions()
        assert DataPath(row.path).name.lower() == data_path
    assert len(pids(starts)) == 1
    assert "started server 'echo'" in activating.kernel_log()


def test_concurrent_connects_start_the_server_once(activating, monkeypatch):
    starts = activating.echo()
    stack = started(activating.start(), monkeypatch)
    script = ("import ipcfw\n"
              "with ipcfw.RSession.connect('echo', timeout=20) as s: print(s.SendReceive(1, (7,)))")
    clients = [stack.spawn([sys.executable, "-c", script], "client") for _ in range(5)]
    results: list[object] = []

    def connect() -> None:
        try:
            with RSession.connect("echo", timeout=20) as session:
                results.append(session.SendReceive(1, (5,)))
        except Exception as exc:  # (reported by the assert below)
            results.append(exc)

    threads = [threading.Thread(target=connect) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [5] * 5
    for client in clients:
        client.popen.wait(30)
        assert client.returncode == 0, client.log()
        assert client.log().strip() == "7"
    assert len(pids(starts)) == 1


def test_a_server_that_exits_before_registering_fails_the_connect_with_its_output(
        activating, monkeypatch):
    activating.service("broken", ["sh", "-c", "echo 'ModuleNotFoundError: no servers.nope' >&2;"
                                              " exit 3"])
    started(activating.start(), monkeypatch)
    with pytest.raises(ipcfw.NotFound) as caught:
        RSession.connect("broken", timeout=20)
    text = str(caught.value)
    assert "server 'broken' exited with status 3 before it registered" in text
    assert "broken.toml" in text
    assert text.endswith("its output ended:\nModuleNotFoundError: no servers.nope")


def test_a_server_that_never_registers_times_out_and_is_killed(activating, monkeypatch):
    pidfile = activating.workdir / "mute.pid"
    activating.service("mute", ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"],
                       start_timeout=1)
    started(activating.start(), monkeypatch)
    with pytest.raises(ipcfw.IpcError) as caught:
        RSession.connect("mute", timeout=20)
    assert caught.value.code == ipcfw.KErrTimedOut
    assert "server 'mute' did not register within 1 s of its start, and was killed" in str(
        caught.value)
    pid = int(pidfile.read_text())
    wait_until(lambda: gone(pid), timeout=5, what="the server to be killed")


def test_an_idle_server_exits_and_the_next_connect_starts_it_again(activating, monkeypatch):
    starts = activating.echo(idle_exit=0.5)
    started(activating.start(), monkeypatch)
    with RSession.connect("echo", timeout=20) as session:
        assert session.SendReceive(1, (1,)) == 1
    first, = pids(starts)
    wait_until(lambda: gone(first), timeout=10, what="the idle server to exit")
    wait_until(lambda: ipcfw.kernel_statistics()["servers"] == 0, what="its name to be free")
    with RSession.connect("echo", timeout=20) as session:
        assert session.SendReceive(1, (2,)) == 2
    assert len(pids(starts)) == 2 and pids(starts)[1] != first
    assert "the kernel ends its registration (IDLE)" in activating.kernel_log()


def test_connect_with_wait_and_ipcfw_wait_start_the_server(activating, monkeypatch):
    starts = activating.echo(idle_exit=0.5)
    stack = started(activating.start(), monkeypatch)
    wait = subprocess.run(stack.ipcfw_argv("wait", "echo", "--timeout", "20"), env=stack.env,
                          capture_output=True, text=True, timeout=30)
    assert wait.returncode == 0, wait.stderr
    assert len(pids(starts)) == 1
    wait_until(lambda: gone(pids(starts)[0]), timeout=10, what="the idle server to exit")
    with RSession.connect("echo", wait=20) as session:
        assert session.SendReceive(1, (3,)) == 3
    assert len(pids(starts)) == 2


def test_connect_with_wait_fails_at_once_with_a_failed_start(activating, monkeypatch):
    activating.service("broken", ["sh", "-c", "exit 4"])
    started(activating.start(), monkeypatch)
    with pytest.raises(ipcfw.NotFound, match="exited with status 4 before it registered"):
        RSession.connect("broken", wait=20)


def echo_started(activating: Activating, monkeypatch: pytest.MonkeyPatch) -> tuple[
        testing.Process, int]:
    """A kernel whose "echo" service a connect has started: the kernel, and the server's pid."""
    starts = activating.echo()
    stack = started(activating.start(), monkeypatch)
    with RSession.connect("echo", timeout=20) as session:
        assert session.SendReceive(1, (1,)) == 1
    pid, = pids(starts)
    assert stack.kernel is not None
    return stack.kernel, pid


def test_the_kernel_stops_the_servers_it_started(activating, monkeypatch):
    kernel, pid = echo_started(activating, monkeypatch)
    assert kernel.stop() == 0
    assert gone(pid)
    assert "stopping server 'echo'" in kernel.log()


def test_ipcfw_ps_shows_the_activatable_names(activating, monkeypatch):
    activating.echo()
    activating.service("other", ["sh", "-c", "exit 1"])
    stack = started(activating.start(), monkeypatch)
    with RSession.connect("echo", timeout=20):
        ps = subprocess.run(stack.ipcfw_argv("ps"), env=stack.env, capture_output=True,
                            text=True, timeout=30)
    assert ps.returncode == 0, ps.stderr
    section = ps.stdout[ps.stdout.index("ACTIVATABLE"):].split("\n")
    assert [line.split() for line in section if line] == [
        ["ACTIVATABLE", "STATE"], ["echo", "running"], ["other", "activatable"]]


def test_a_bad_service_file_stops_the_kernel_at_start(activating):
    activating.service("echo", ["sh"], start_timeout=-1)
    endpoint = f"ipc://{activating.workdir}/kernel"
    result = subprocess.run(
        [sys.executable, "-m", "ipcfw", "kernel", "--endpoint", endpoint, "--services",
         str(activating.services)], capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"ipcfw: {activating.services / 'echo.toml'}: start_timeout: must be a number of "
        "seconds above 0, got an integer (-1)")


def test_a_started_server_ends_with_its_kernel_instead_of_waiting_for_the_next(
        activating, monkeypatch):
    kernel, pid = echo_started(activating, monkeypatch)
    kernel.kill()  # SIGKILL: the kernel cannot stop it; IPCFW_ACTIVATED makes it go
    wait_until(lambda: gone(pid), timeout=10, what="the server to exit with its kernel")
