"""The `ipcfw` command: the kernel's endpoint handling and lifecycle, and `ipcfw serve`."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import ipcfw
from conftest import PYTHONPATH, REPO, ManagedProcess, wait_until

pytestmark = pytest.mark.process  # every test here runs the ipcfw command


@pytest.fixture
def workdir():
    path = Path(tempfile.mkdtemp(prefix="ipcfw-cli-"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def start(
    workdir: Path, *args: str, env: dict | None = None, label: str = "proc"
) -> ManagedProcess:
    argv = [sys.executable, "-m", "ipcfw", "--log-level", "info", *args]
    environment = dict(os.environ, PYTHONPATH=PYTHONPATH, **(env or {}))
    return ManagedProcess(argv, workdir / f"{label}.log", environment)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_kernel_default_endpoint_is_private_and_removed_on_signal(workdir, signum):
    runtime = workdir / "xdg"
    runtime.mkdir(mode=0o700)
    kernel = start(workdir, "kernel", env={"XDG_RUNTIME_DIR": str(runtime)}, label="kernel")
    try:
        socket_path = runtime / "ipcfw" / "kernel"
        wait_until(lambda: socket_path.exists() or not kernel.alive(), what="the kernel socket")
        assert kernel.alive(), kernel.log()
        assert stat.S_IMODE(os.stat(runtime / "ipcfw").st_mode) == 0o700
        kernel.kill(signum)
        wait_until(lambda: not kernel.alive(), what="the kernel to exit")
        assert kernel.popen.returncode == 0
        assert not socket_path.exists()
    finally:
        kernel.stop()


def test_kernel_refuses_to_start_twice_on_one_endpoint(workdir):
    endpoint = f"ipc://{workdir}/kernel"
    first = start(workdir, "kernel", "--endpoint", endpoint, label="first")
    try:
        wait_until(lambda: (workdir / "kernel").exists(), what="the first kernel")
        second = subprocess.run(
            [sys.executable, "-m", "ipcfw", "kernel", "--endpoint", endpoint],
            capture_output=True, text=True, timeout=30,
        )
        assert second.returncode == 1
        assert "already running" in second.stderr
        assert first.alive()
        assert ipcfw.kernel_statistics(endpoint)["servers"] == 0  # the first still answers
    finally:
        first.stop()


def test_kernel_refuses_a_directory_open_to_others(workdir):
    shared = workdir / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    result = subprocess.run(
        [sys.executable, "-m", "ipcfw", "kernel", "--endpoint", f"ipc://{shared}/kernel"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "must be private" in result.stderr


def test_kernel_refuses_tcp_and_overlong_paths(workdir):
    for endpoint, reason in [
        ("tcp://127.0.0.1:5555", "not ipc://"), (f"ipc:///{'x' * 120}", "107")
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "ipcfw", "kernel", "--endpoint", endpoint],
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 2 and reason in result.stderr


def test_serve_finds_a_plugin_in_the_current_directory(kernel, tmp_path):
    plugin_dir = Path(tempfile.mkdtemp(prefix="ipcfw-plugin-"))
    (plugin_dir / "hello_plugin.py").write_text(
        "from ipcfw import CServer, CSession\n"
        "class S(CSession):\n"
        "    def ServiceL(self, m): m.Complete(m.Int0() * 2)\n"
        "class HelloServer(CServer):\n"
        "    name = 'hello'\n"
        "    session_class = S\n"
    )
    server = ManagedProcess(
        [sys.executable, "-m", "ipcfw", "--log-level", "info", "serve", "hello_plugin:HelloServer"],
        plugin_dir / "serve.log",
        dict(os.environ, IPCFW_KERNEL=kernel.endpoint, PYTHONPATH=str(REPO)),
        cwd=str(plugin_dir),
    )
    try:
        wait_until(lambda: "registered" in server.log() or not server.alive(), what="registration")
        with ipcfw.RSession.connect("hello") as session:
            assert session.SendReceive(0, (21,)) == 42
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(plugin_dir)], check=False)


@pytest.mark.parametrize("plugin, message", [
    ("no_such_module:X", "cannot load plugin"),
    ("servers.echo:Missing", "has no 'Missing'"),
    ("servers.echo", "package.module:ServerClass"),
])
def test_serve_reports_a_bad_plugin_clearly(kernel, plugin, message):
    result = kernel.client(["-m", "ipcfw", "serve", plugin])
    assert result.returncode == 2
    assert message in result.stderr


def test_ps_shows_the_kernel_counters(kernel):
    kernel.serve("servers.echo:EchoServer", "echo")
    result = kernel.client(["-m", "ipcfw", "ps"])
    assert result.returncode == 0, result.stderr
    counters = dict(line.split() for line in result.stdout.splitlines())
    assert counters["servers"] == "1"


def _check_plot(picture: Path, record: Path) -> None:
    """The picture --plot drew shows every system measured and each target's verdict, and
    --from-json draws the same record again without measuring."""
    svg = picture.read_text()
    assert svg.startswith("<?xml") and "</svg>" in svg
    systems = json.loads(record.read_text())["results"]
    assert all(f">{name}<" in svg for name in systems), systems
    assert "sync median / managers'" in svg and "client processes" in svg
    again = picture.with_suffix(".png")
    result = subprocess.run(
        [sys.executable, "-m", "ipcfw", "bench", "--plot", str(again), "--from-json", str(record)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert again.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ipcfw bench: sync" not in result.stdout  # nothing was measured


@pytest.mark.parametrize("argv, expected", [
    (["--plot", "bench.txt"], "the file must end in .svg, .png, .pdf"),
    (["--from-json", "bench.json"], "--from-json draws an earlier run: give --plot FILE too"),
    (["--plot", "bench.svg", "--from-json", "missing.json"], "--from-json missing.json: "),
])
def test_bench_plot_options_are_checked_before_anything_runs(tmp_path, argv, expected):
    result = subprocess.run([sys.executable, "-m", "ipcfw", "bench", *argv], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert result.stdout == ""


def test_bench_plot_without_matplotlib_says_how_to_get_it(tmp_path):
    blocked = ("import sys; sys.modules['matplotlib'] = None\n"  # as if not installed
               "from ipcfw.tools.cli import main\n"
               "sys.exit(main(['bench', '--quick', '--plot', 'bench.svg']))\n")
    result = subprocess.run([sys.executable, "-c", blocked], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--plot needs matplotlib, which is not installed: pip install 'ipcfw[plot]'" in (
        result.stderr)
    assert result.stdout == "" and not (tmp_path / "bench.svg").exists()


def test_bench_runs_every_system_end_to_end(tmp_path):
    # A functional check only: speed is measured by `ipcfw bench` itself, never by tests.
    record, picture = tmp_path / "bench.json", tmp_path / "bench.svg"
    result = subprocess.run(
        [sys.executable, "-m", "ipcfw", "bench", "--sync", "200", "--pipelined", "500",
         "--fleet", "2", "--fleet-seconds", "0.3", "--open-sessions", "50",
         "--descriptor-mib", "1", "--connections", "2", "--churn", "50",
         "--json", str(record), "--plot", str(picture)],
        capture_output=True, text=True, timeout=120, cwd=str(REPO),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    _check_plot(picture, record)
    table = result.stdout.split("\n\n")[1]
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:]}
    assert set(rows) == {
        "bare-pingpong", "bare-forwarder", "managers", "mp-pipe", "ipcfw", "ipcfw-direct"
    }
    assert rows["managers"][2] == "-" and float(rows["managers"][0]) > 0  # a proxy cannot pipeline
    assert all(row[2] != "-" for name, row in rows.items() if name != "managers")
    assert "NOT MEASURED" not in result.stdout
    assert "reference: ipcfw sync median = " in result.stdout  # how far from managers'
    targets = [line for line in result.stdout.splitlines() if line.startswith("target: ")]
    assert len(targets) == 7 and all(line.endswith(("PASS", "FAIL")) or "FAIL (" in line
                                     for line in targets), targets

    # The second part: client processes, descriptors, open sessions, memory, churn.
    fleet = result.stdout.split("2 client processes", 1)[1].split("\n\n", 1)[0]
    assert {line.split()[0] for line in fleet.splitlines()[2:]} == {
        "ipcfw-direct", "ipcfw", "managers"}
    descriptors = result.stdout.split("descriptor round trips", 1)[1].split("\n\n", 1)[0]
    rows = {line.split()[0] + line.split()[1]: line.split()[2:]
            for line in descriptors.splitlines()[2:6]}
    assert set(rows) == {"1KiB", "64KiB", "1MiB", "16MiB"}
    assert all(float(cell.replace(",", "")) > 0 for cell in rows["1KiB"][:3])  # every path
    assert "with 50 open" in result.stdout and "per direct connection" in result.stdout
    assert "sessions left in the kernel: 0" in result.stdout

    # Where the time goes: CPU per pipelined call of each process of each system.
    cpu_table = result.stdout.split("CPU per pipelined call", 1)[1].split("\n\n", 1)[0]
    cpu = {line.split()[0]: line.split()[1:] for line in cpu_table.splitlines()[2:]}
    assert cpu["bare-pingpong"][1] == "-" and "managers" not in cpu  # no broker; no pipelining
    for name, roles in {
        "bare-forwarder": (0, 1, 2), "ipcfw": (0, 1, 2), "bare-pingpong": (0, 2),
        "mp-pipe": (0, 2), "ipcfw-direct": (0, 2),
    }.items():
        assert all(float(cpu[name][i]) > 0 for i in roles), cpu_table
