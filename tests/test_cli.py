"""The `ipcfw` command: the kernel's endpoint handling and lifecycle, and `ipcfw serve`."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import ipcfw
import ipcfw.testing
from conftest import HOME, PYTHONPATH, REPO, ManagedProcess, wait_until

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


@pytest.mark.smoke
def test_ps_counters_shows_the_kernel_counters(kernel):
    kernel.serve("servers.echo:EchoServer", "echo")
    result = kernel.client(["-m", "ipcfw", "ps", "--counters"])
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
         "--descriptor-mib", "1", "--connections", "2", "--churn", "50", "--monitored", "100",
         "--remote", "100", "--json", str(record), "--plot", str(picture)],
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
    monitored = result.stdout.split("Monitor attached", 1)[1].split("\n\n", 1)[0]
    assert [line.split()[0] for line in monitored.splitlines()[2:4]] == ["kernel", "direct"]
    assert "lost 0)" in monitored and json.loads(record.read_text())["monitored"]["seen"] >= 400
    remote = result.stdout.split("Over tcp with CURVE", 1)[1].split("\n\n", 1)[0]
    assert [line.split()[0] for line in remote.splitlines()[2:4]] == ["ipc", "tcp+curve"]
    assert json.loads(record.read_text())["remote"]["ratio"] > 0

    # Where the time goes: CPU per pipelined call of each process of each system.
    cpu_table = result.stdout.split("CPU per pipelined call", 1)[1].split("\n\n", 1)[0]
    cpu = {line.split()[0]: line.split()[1:] for line in cpu_table.splitlines()[2:]}
    assert cpu["bare-pingpong"][1] == "-" and "managers" not in cpu  # no broker; no pipelining
    for name, roles in {
        "bare-forwarder": (0, 1, 2), "ipcfw": (0, 1, 2), "bare-pingpong": (0, 2),
        "mp-pipe": (0, 2), "ipcfw-direct": (0, 2),
    }.items():
        assert all(float(cpu[name][i]) > 0 for i in roles), cpu_table


# -- start-up that cannot race, and the CLI's polish (issue 12, items 4 and 6) -------------------


def ipcfw_run(*args: str, env: dict | None = None, cwd: Path | str = HOME, timeout: float = 60,
              ) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=PYTHONPATH, **(env or {}))
    return subprocess.run([sys.executable, "-m", "ipcfw", *args], capture_output=True, text=True,
                          timeout=timeout, env=environment, cwd=str(cwd))


@pytest.fixture
def unstarted():
    """A kernel's private endpoint with no kernel yet (the test may start it); stopped for sure."""
    stack = ipcfw.testing.Stack(env={"PYTHONPATH": PYTHONPATH}, cwd=str(HOME))
    try:
        yield stack
    finally:
        stack.stop()


@pytest.mark.smoke
def test_version_comes_from_one_place():
    import importlib.metadata

    result = ipcfw_run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ipcfw {ipcfw.__version__}"
    assert importlib.metadata.version("ipcfw") == ipcfw.__version__  # (pyproject reads it)


def test_log_level_is_accepted_before_or_after_the_command(kernel):
    for args in (["--log-level", "warning", "ps"], ["ps", "--log-level", "warning"],
                 ["--log-level", "debug", "ps", "--log-level", "error"]):
        result = ipcfw_run(*args)
        assert result.returncode == 0, (args, result.stderr)
        assert "servers" in result.stdout


@pytest.mark.parametrize("args", [["--log-level", "verbose", "ps"], ["ps", "--log-level", "loud"],
                                  ["kernel", "--log-level", "WARNING"]])
def test_an_unknown_log_level_is_refused_with_the_choices(args):
    result = ipcfw_run(*args)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr and "debug" in result.stderr
    assert "Traceback" not in result.stderr


PLUGIN_MODULES = {
    "raises_at_import.py": "raise RuntimeError('the plugin\\nbroke')\n",
    "not_servers.py": "class Thing:\n    pass\nvalue = 3\n",
    "bad_init.py": (
        "from ipcfw import CServer\n"
        "class Server(CServer):\n"
        "    name = 'badinit'\n"
        "    def __init__(self):\n"
        "        raise ValueError('no config file')\n"
    ),
}


@pytest.fixture
def plugin_dir(tmp_path):
    for name, text in PLUGIN_MODULES.items():
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["raises_at_import:S"], "cannot load plugin 'raises_at_import:S': RuntimeError: the plugin "
                             "broke"),
    (["no_such_module:X"], "cannot load plugin 'no_such_module:X': ModuleNotFoundError: No "
                           "module named 'no_such_module'"),
    (["not_servers:Thing"], "cannot load plugin 'not_servers:Thing': Thing is not a subclass of "
                            "ipcfw.CServer"),
    (["not_servers:value"], "cannot load plugin 'not_servers:value': it is a int, not a class"),
    (["not_servers:Missing"], "cannot load plugin 'not_servers:Missing': module 'not_servers' "
                              "has no 'Missing'"),
    (["not_servers"], "plugin 'not_servers' must look like package.module:ServerClass"),
    (["bad_init:Server"], "cannot start plugin 'bad_init:Server': ValueError: no config file"),
    (["servers.echo:EchoServer", "--overlay", "servers.echo:EchoServer"],
     "cannot load overlay 'servers.echo:EchoServer': EchoServer is not a subclass of "
     "ipcfw.COverlay"),
])
def test_a_bad_plugin_gets_one_line_naming_it_and_the_reason(unstarted, plugin_dir, args,
                                                             message):
    result = ipcfw_run("serve", *args, "--endpoint", unstarted.endpoint, cwd=plugin_dir)
    assert result.returncode == 2
    assert result.stderr == f"ipcfw: {message}\n"  # one line: no traceback, no "overlays []"


def test_a_bad_plugin_shows_its_traceback_at_debug_level(unstarted, plugin_dir):
    result = ipcfw_run("serve", "raises_at_import:S", "--log-level", "debug",
                       "--endpoint", unstarted.endpoint, cwd=plugin_dir)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "RuntimeError: the plugin" in result.stderr
    assert result.stderr.endswith("ipcfw: cannot load plugin 'raises_at_import:S': "
                                  "RuntimeError: the plugin broke\n")


def test_serve_without_a_kernel_says_at_once_what_to_do(unstarted):
    started = time.monotonic()
    result = ipcfw_run("serve", "servers.echo:EchoServer", "--endpoint", unstarted.endpoint)
    assert time.monotonic() - started < 4  # not the 5 s of an unanswered registration
    assert result.returncode == 1
    assert f"no ipcfw kernel at {unstarted.endpoint}:" in result.stderr
    for hint in ("`ipcfw kernel`", "IPCFW_KERNEL", "--wait-kernel"):
        assert hint in result.stderr, hint
    assert "Traceback" not in result.stderr


def test_serve_wait_kernel_times_out_saying_how_long(unstarted):
    result = ipcfw_run("serve", "servers.echo:EchoServer", "--wait-kernel", "0.3",
                       "--endpoint", unstarted.endpoint)
    assert result.returncode == 1
    assert f"no ipcfw kernel at {unstarted.endpoint} after waiting 0.3 s" in result.stderr


def test_serve_wait_kernel_registers_once_the_kernel_starts(unstarted):
    server = unstarted.serve("servers.echo:EchoServer", "--wait-kernel", "30", wait=False)
    wait_until(lambda: "waits for a kernel" in server.log() or not server.alive(),
               what="the server to wait")
    assert server.alive(), server.log()
    unstarted.start()
    unstarted.wait_ready(server)
    with ipcfw.RSession.connect("echo", endpoint=unstarted.endpoint) as session:
        assert session.SendReceive(1, (7,)) == 7


@pytest.mark.smoke
def test_wait_exits_0_once_the_name_is_registered(unstarted):
    waiter = unstarted.spawn(unstarted.ipcfw_argv("wait", "echo", "--timeout", "30"), "wait")
    unstarted.start()
    assert waiter.alive()  # the kernel is up, the server not yet
    unstarted.serve("servers.echo:EchoServer")
    wait_until(lambda: not waiter.alive(), timeout=20, what="ipcfw wait to exit")
    assert waiter.returncode == 0, waiter.log()


def test_wait_times_out_with_a_message(unstarted):
    result = ipcfw_run("wait", "echo", "--timeout", "0.2", "--endpoint", unstarted.endpoint)
    assert result.returncode == 1
    assert "no ipcfw kernel at" in result.stderr and "after waiting 0.2 s" in result.stderr
    unstarted.start()
    result = ipcfw_run("wait", "echo", "--timeout", "0.2", "--endpoint", unstarted.endpoint)
    assert result.returncode == 1
    assert "no server 'echo' registered" in result.stderr
    for bad in ("-1", "soon"):
        result = ipcfw_run("wait", "echo", "--timeout", bad)
        assert result.returncode == 2 and "expected a number of seconds" in result.stderr


@pytest.mark.parametrize("level, traced", [("debug", True), ("info", False)])
@pytest.mark.parametrize("path", ["kernel", "direct"])
def test_debug_logs_each_connect_request_and_completion(path, level, traced):
    with ipcfw.testing.Stack(env={"PYTHONPATH": PYTHONPATH}, cwd=str(REPO),
                             log_level=level) as stack:
        server = stack.serve("servers.echo:EchoServer")
        with ipcfw.RSession.connect("echo", endpoint=stack.endpoint, path=path) as session:
            assert session.SendReceive(1, (4242,)) == 4242
        assert stack.kernel is not None
        kernel_log, server_log = stack.kernel.log(), server.log()
    kernel_lines = [re.compile(r"from pid \d+ channel: Connect\(req_id=\d+, name='echo'"),
                    re.compile(r"to pid \d+ channel: Connected\(")]
    if path == "kernel":
        kernel_lines += [re.compile(r"from pid \d+ channel: Request\(.*args=\(4242,\)"),
                         re.compile(r"to pid \d+ server: Deliver\(.*args=\(4242,\)"),
                         re.compile(r"from pid \d+ server: Complete\(msg_id=\d+, value=4242"),
                         re.compile(r"to pid \d+ channel: Completed\(req_id=\d+, value=4242")]
    server_lines = [re.compile(r"server 'echo': connect of session 0x[0-9a-f]+ .*from pid \d+"),
                    re.compile(rf"server 'echo': <RMessage \d+ request function=1 pending> "
                               rf"from pid \d+ \({path} path\)"),
                    re.compile(r"server 'echo': <RMessage \d+ request function=1 completed> "
                               r"answered: Complete\w*\(\w+=\d+, value=4242")]
    for pattern in kernel_lines:
        assert bool(pattern.search(kernel_log)) is traced, (pattern, kernel_log)
    for pattern in server_lines:
        assert bool(pattern.search(server_log)) is traced, (pattern, server_log)


def test_serve_waiting_for_a_kernel_stops_at_once_on_sigterm(unstarted):
    server = unstarted.serve("servers.echo:EchoServer", "--wait-kernel", "60", wait=False)
    wait_until(lambda: "waits for a kernel" in server.log() or not server.alive(),
               what="the server to wait")
    started = time.monotonic()
    server.kill(signal.SIGTERM)
    wait_until(lambda: not server.alive(), timeout=5, what="the server to exit")
    assert time.monotonic() - started < 2
    assert server.returncode == 0, server.log()
