"""``ipcfw demo`` as a user runs it: a subprocess with no configuration, which must succeed, say
what it did, and leave no process or directory behind, even when interrupted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO

pytestmark = pytest.mark.process  # every test here runs the ipcfw command

DEMO_TIMEOUT = 60.0


class Demo:
    """`python -m ipcfw demo` in the background; records every descendant while it runs."""

    def __init__(self, tmp_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("IPCFW_KERNEL", "PYTHONPATH")}
        self.stdout_path, self.stderr_path = tmp_path / "demo.out", tmp_path / "demo.err"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            # cwd is not the checkout: the demo must find its servers by itself.
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "ipcfw", "demo"], stdout=out, stderr=err, env=env,
                cwd=str(tmp_path),
            )
        self.process = psutil.Process(self.popen.pid)
        self.seen: dict[tuple[int, float], list[str]] = {}

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def record_children(self) -> None:
        try:
            children = self.process.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            try:
                key, cmdline = (child.pid, child.create_time()), child.cmdline()
            except psutil.Error:  # gone, or a zombie
                continue
            # Keep the latest non-empty cmdline: a child seen between fork and exec still shows
            # the demo's, and a zombie shows none.
            if cmdline or key not in self.seen:
                self.seen[key] = cmdline

    def run_until(self, condition, deadline: float) -> None:
        while self.popen.poll() is None and not condition():
            self.record_children()
            if time.monotonic() > deadline:
                self.kill_all()
                pytest.fail(
                    f"demo still running after {DEMO_TIMEOUT} s:\n{self.stdout()}\n{self.stderr()}"
                )
            time.sleep(0.01)

    def wait(self, deadline: float) -> int:
        self.run_until(lambda: False, deadline)
        return self.popen.wait()

    def survivors(self) -> list[str]:
        alive = []
        for (pid, created), cmdline in self.seen.items():
            try:
                if psutil.Process(pid).create_time() == created:
                    alive.append(f"{pid}: {' '.join(cmdline)}")
            except psutil.NoSuchProcess:
                pass
        return alive

    def kill_all(self) -> None:
        """Test cleanup on failure: kill what the demo started (by pid), then the demo."""
        for (pid, created), _ in self.seen.items():
            try:
                process = psutil.Process(pid)
                if process.create_time() == created:
                    process.kill()
            except psutil.NoSuchProcess:
                pass
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def _endpoint(output: str) -> str:
    match = re.search(r"kernel pid (\d+) on (ipc://\S+)", output)
    assert match, f"no kernel line in the demo's output:\n{output}"
    return match.group(2)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if text in cmdline:
            found.append(f"{process.info['pid']}: {cmdline}")
    return found


def _assert_everything_stopped(demo: Demo, endpoint: str) -> None:
    assert demo.survivors() == [], "the demo left processes behind"
    assert _processes_mentioning(endpoint) == []
    workdir = endpoint[len("ipc://"):].rsplit("/", 1)[0]
    assert not os.path.exists(workdir), f"the demo left {workdir} behind"


def _started_everything(demo: Demo) -> bool:
    """True once the demo's kernel and its three servers have all been seen running."""
    argvs = list(demo.seen.values())
    kernel = any(argv[1:4] == ["-m", "ipcfw", "kernel"] for argv in argvs)
    plugins = {argv[4] for argv in argvs if argv[1:4] == ["-m", "ipcfw", "serve"] and len(argv) > 4}
    return kernel and plugins >= {"servers.echo:EchoServer", "servers.kv:KvServer",
                                  "servers.notifier:NotifierServer"}


def test_demo_runs_reports_and_cleans_up(tmp_path):
    demo = Demo(tmp_path)
    try:
        status = demo.wait(time.monotonic() + DEMO_TIMEOUT)
    finally:
        demo.kill_all()
    out, err = demo.stdout(), demo.stderr()
    assert status == 0, f"exit {status}\n{out}\n{err}"
    assert err == ""

    endpoint = _endpoint(out)
    assert endpoint.startswith("ipc:///tmp/ipcfw-demo-")
    assert len(endpoint) - len("ipc://") < 107
    for name in ("echo", "kv", "notifier"):
        assert re.search(rf"^  {name}\s+ok  \(.+\)$", out, re.MULTILINE), out
    assert "'colour' = 'blue'" in out
    assert "2 waiters woken by one publish" in out
    sync = re.search(r"direct path: sync round trip median (\d+) us, p99 (\d+) us "
                     r"\((\d+) calls\)", out)
    assert sync, out
    median, p99, calls = map(int, sync.groups())
    assert 0 < median <= p99 and calls == 2000
    managers = re.search(r"multiprocessing.managers proxy, for comparison: sync median (\d+) us, "
                         r"p99 (\d+) us \(2000 calls; the direct path takes ([\d.]+)x its "
                         r"time\); a proxy cannot pipeline", out)
    assert managers, out
    managers_median = int(managers.group(1))
    assert 0 < managers_median <= int(managers.group(2))
    assert abs(float(managers.group(3)) - median / managers_median) < 0.1  # (rounded medians)
    pipelined = re.search(r"direct path: async pipelined ([\d,]+) calls/s \(64 in flight\)", out)
    assert pipelined and int(pipelined.group(1).replace(",", "")) > 0, out
    kernel_path = re.search(r"the same through the kernel \(path='kernel'\): median (\d+) us, "
                            r"p99 (\d+) us; ([\d,]+) calls/s", out)
    assert kernel_path and 0 < int(kernel_path.group(1)) <= int(kernel_path.group(2)), out
    assert out.rstrip().endswith("stopped kernel and 3 servers")

    assert _started_everything(demo), f"did not see the demo's processes: {demo.seen}"
    _assert_everything_stopped(demo, endpoint)


@pytest.mark.parametrize(
    "signum, expected, phase",
    [
        (signal.SIGINT, 130, "startup"),
        (signal.SIGINT, 130, "measuring"),
        (signal.SIGTERM, 143, "startup"),
    ],
    ids=["ctrl-c-at-startup", "ctrl-c-while-measuring", "sigterm"],
)
def test_demo_interrupted_stops_everything(tmp_path, signum, expected, phase):
    demo = Demo(tmp_path)
    deadline = time.monotonic() + DEMO_TIMEOUT
    try:
        demo.run_until(lambda: _started_everything(demo), deadline)
        if phase == "measuring":  # the clients are done; the measurements take over a second
            demo.run_until(lambda: "  notifier " in demo.stdout(), deadline)
        assert demo.popen.poll() is None, (
            f"the demo ended before it could be interrupted:\n{demo.stdout()}"
        )
        demo.popen.send_signal(signum)
        status = demo.wait(deadline)
    finally:
        demo.kill_all()
    out, err = demo.stdout(), demo.stderr()
    assert status == expected, f"exit {status}\n{out}\n{err}"
    assert "stopping" in err
    assert "Traceback" not in err
    assert "the same through the kernel" not in out  # the measurements did not finish
    assert "stopped kernel and 3 servers" in out
    _assert_everything_stopped(demo, _endpoint(out))


def test_demo_without_its_examples_says_so(tmp_path):
    # A copy of the ipcfw package alone: no servers/ beside it, none in ipcfw.examples. Run
    # without site (-S), so that the editable install's finder cannot map the checkout's in;
    # the dependencies come from this environment's site-packages on the path.
    import shutil

    import zmq

    shutil.copytree(REPO / "ipcfw", tmp_path / "site" / "ipcfw",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "IPCFW_KERNEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"),
                                         str(Path(zmq.__file__).resolve().parents[1])])
    result = subprocess.run([sys.executable, "-S", "-m", "ipcfw", "demo"], env=env,
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "the example servers and clients were not found" in result.stderr
    assert "ipcfw.examples.servers" in result.stderr and "pip install" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_failure_shows_the_logs_and_stops_everything(monkeypatch, capsys):
    # In this process, with a server plugin that cannot load: the demo must say which process
    # failed, show its log, and still stop the kernel and the server that did start.
    import ipcfw.tools.demo as demo

    monkeypatch.setattr(demo, "EXAMPLES", (
        demo.EXAMPLES[0],
        ("broken", "servers.no_such_module:NoServer", "clients.echo_client"),
    ))
    monkeypatch.delenv("IPCFW_KERNEL", raising=False)
    assert demo.run_demo() == 1
    out, err = capsys.readouterr()
    endpoint = _endpoint(out)
    assert "broken exited with status 2" in err
    assert "cannot load plugin 'servers.no_such_module:NoServer'" in err  # the server's log
    assert "kernel log" in err
    assert out.rstrip().endswith("stopped kernel and 2 servers")
    assert _processes_mentioning(endpoint) == []
    assert not os.path.exists(endpoint[len("ipc://"):].rsplit("/", 1)[0])
