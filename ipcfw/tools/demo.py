"""``ipcfw demo``: a kernel, the three example servers and their clients, on a private endpoint.

Needs nothing configured: the demo makes a private temporary directory (0700, under ``/tmp`` so
the ipc path stays short), starts ``python -m ipcfw kernel`` on a socket in it and the example
servers (``servers.echo``, ``servers.kv``, ``servers.notifier``) as ``python -m ipcfw serve``
processes, waits until each answers (by condition, against a deadline), runs the example clients
(``clients/*_client.py``) in this process, then measures a synchronous round trip and
pipelined asynchronous throughput against the echo server.

Everything it starts is stopped on the way out: after success, after a failure, and on Ctrl-C
(exit status 130) or SIGTERM (143). The processes' logs go to files in the temporary directory;
they are shown if something fails, and removed with the directory at the end.

The servers and clients live in the source tree, next to the ``ipcfw`` package, so the demo needs
a source checkout installed with ``pip install -e .``.
"""

from __future__ import annotations

import gc
import importlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional

from .. import errors
from .children import stop_processes
from .bench import WINDOW  # the same pipelined measurement, in small
from ..client import RSession, TRequestStatus, kernel_statistics
from ..endpoint import IPC_PATH_MAX

STARTUP_TIMEOUT = 15.0  # seconds for the kernel and every server to answer
STOP_TIMEOUT = 5.0  # seconds for a process to exit after SIGTERM, before SIGKILL
SYNC_CALLS = 2000
WARMUP_CALLS = 200
PIPELINE_SECONDS = 1.0
REPLY_TIMEOUT = 5.0

# (server name, plugin, example client module)
EXAMPLES = (
    ("echo", "servers.echo:EchoServer", "clients.echo_client"),
    ("kv", "servers.kv:KvServer", "clients.kv_client"),
    ("notifier", "servers.notifier:NotifierServer", "clients.notifier_client"),
)
EEchoInt = 1  # servers.echo.EEchoInt (the servers package is imported only once it is found)


class DemoError(Exception):
    """The demo cannot go on; the message says why."""


class _Terminated(BaseException):
    """SIGTERM arrived: stop like on Ctrl-C."""


def repo_root() -> Optional[Path]:
    """The source checkout holding ``ipcfw/``, ``servers/`` and ``clients/``; None if absent."""
    root = Path(__file__).resolve().parents[2]
    if (root / "servers" / "echo.py").is_file() and (root / "clients" / "__init__.py").is_file():
        return root
    return None


class _Child:
    def __init__(
        self, name: str, argv: list[str], log_path: Path, env: dict[str, str], cwd: Path
    ) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "wb") as log:
            # A session of its own: a Ctrl-C at the terminal reaches only the demo, which then
            # stops its children in order.
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=str(cwd), start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").rstrip()
        except OSError:
            return "    (no log)"
        if not text:
            return "    (empty log)"
        return "\n".join(f"    | {line}" for line in text.splitlines()[-lines:])


class _Stack:
    """The processes the demo started: the kernel first, then the servers."""

    def __init__(self, workdir: Path, root: Path) -> None:
        self.workdir = workdir
        self.root = root
        self.endpoint = f"ipc://{workdir}/kernel"
        pythonpath = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
        self.env = {**os.environ, "IPCFW_KERNEL": self.endpoint, "PYTHONPATH": pythonpath}
        self.kernel: Optional[_Child] = None
        self.servers: list[_Child] = []

    def _spawn(self, name: str, ipcfw_args: list[str]) -> _Child:
        argv = [sys.executable, "-m", "ipcfw", *ipcfw_args, "--endpoint", self.endpoint]
        return _Child(name, argv, self.workdir / f"{name}.log", self.env, self.root)

    def start_kernel(self, deadline: float) -> _Child:
        self.kernel = self._spawn("kernel", ["kernel"])
        socket_path = self.endpoint[len("ipc://"):]
        while not os.path.exists(socket_path):
            self._check_alive(self.kernel)
            _before(deadline, "the kernel to create its socket")
            time.sleep(0.01)
        while True:  # the socket exists; wait until the kernel answers
            self._check_alive(self.kernel)
            try:
                kernel_statistics(self.endpoint, timeout=1.0)
                return self.kernel
            except (errors.IpcError, TimeoutError):
                _before(deadline, "the kernel to answer")
                time.sleep(0.02)

    def start_server(self, name: str, plugin: str) -> _Child:
        child = self._spawn(name, ["serve", plugin])
        self.servers.append(child)
        return child

    def wait_registered(self, child: _Child, deadline: float) -> None:
        """Retry connecting to the server until it is registered (not NotFound any more)."""
        while True:
            self._check_alive(child)
            try:
                RSession.connect(child.name, endpoint=self.endpoint).Close()
                return
            except errors.NotFound:
                _before(deadline, f"server {child.name!r} to register")
                time.sleep(0.02)

    def _check_alive(self, child: _Child) -> None:
        if not child.alive():
            raise DemoError(f"{child.name} exited with status {child.popen.returncode}")
        if self.kernel is not None and child is not self.kernel and not self.kernel.alive():
            raise DemoError(f"the kernel exited with status {self.kernel.popen.returncode}")

    def children(self) -> list[_Child]:
        return [*self.servers, *([self.kernel] if self.kernel else [])]

    def logs(self) -> str:
        return "\n".join(
            f"  {c.name} log ({c.log_path.name}):\n{c.log_tail()}" for c in self.children()
        )

    def stop(self) -> None:
        """SIGTERM the servers, then the kernel; wait with a deadline; SIGKILL stragglers."""
        for group in (self.servers, [self.kernel] if self.kernel else []):
            stop_processes((child.popen for child in group), STOP_TIMEOUT)


def _before(deadline: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise DemoError(f"timed out after {STARTUP_TIMEOUT:.0f} s waiting for {what}")


def _print(line: str = "") -> None:
    print(line, flush=True)


# -- the clients and the measurements ----------------------------------------------------------


def _run_clients(endpoint: str) -> bool:
    """Run each example client's walkthrough in this process; print one line each."""
    all_ok = True
    for name, _plugin, module_name in EXAMPLES:
        lines: list[str] = []
        try:
            module = importlib.import_module(module_name)
            summary = module.run(out=lines.append, endpoint=endpoint)
        except Exception as exc:  # any failure of an example is reported, then the demo fails
            all_ok = False
            _print(f"  {name:<9} FAILED: {type(exc).__name__}: {exc}")
            for line in lines:
                _print(f"      {line}")
            continue
        _print(f"  {name:<9} ok  ({summary})")
    return all_ok


def _percentile(sorted_values: list[int], q: float) -> int:
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def _measure_sync(session: RSession) -> tuple[float, float, int]:
    """Median and p99 of a synchronous EEchoInt round trip, in microseconds."""
    call = session.SendReceive
    for _ in range(WARMUP_CALLS):
        call(EEchoInt, (42,))
    clock = time.perf_counter_ns
    samples = [0] * SYNC_CALLS
    with _gc_paused():
        for i in range(SYNC_CALLS):
            t0 = clock()
            value = call(EEchoInt, (42,))
            samples[i] = clock() - t0
            if value != 42:
                raise DemoError(f"EEchoInt(42) returned {value}")
    samples.sort()
    return statistics.median(samples) / 1000, _percentile(samples, 99) / 1000, SYNC_CALLS


def _measure_pipelined(session: RSession) -> float:
    """Completed EEchoInt calls per second with WINDOW asynchronous requests in flight."""

    def issue() -> TRequestStatus:
        status = TRequestStatus()
        session.SendReceive(EEchoInt, (42,), status)
        return status

    def complete(status: TRequestStatus) -> None:
        value = status.Wait(REPLY_TIMEOUT)
        if value != 42:
            raise DemoError(f"async EEchoInt(42) completed with {value}")

    with _gc_paused():
        inflight = deque(issue() for _ in range(WINDOW))
        done = 0
        start = time.perf_counter()
        end = start + PIPELINE_SECONDS
        while time.perf_counter() < end:
            complete(inflight.popleft())
            done += 1
            inflight.append(issue())
        while inflight:
            complete(inflight.popleft())
            done += 1
        elapsed = time.perf_counter() - start
    return done / elapsed


class _gc_paused:
    def __enter__(self) -> None:
        gc.collect()
        self._was_enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc_info: object) -> None:
        if self._was_enabled:
            gc.enable()


def _measure(endpoint: str) -> None:
    with RSession.connect("echo", endpoint=endpoint) as session:
        median, p99, calls = _measure_sync(session)
        _print(f"  sync round trip: median {median:.0f} us, p99 {p99:.0f} us ({calls} calls)")
        rate = _measure_pipelined(session)
        _print(f"  async pipelined: {rate:,.0f} calls/s ({WINDOW} in flight)")


def _close_client_runtime(endpoint: str) -> None:
    """Stop this process's client runtime for `endpoint` (its I/O thread and sockets) before the
    kernel stops, so that it does not report the kernel's exit as a death."""
    from ..client.runtime import Runtime

    Runtime.shutdown(endpoint)


# -- the command ---------------------------------------------------------------------------------


def run_demo() -> int:
    """Run the demo; returns the exit status (0 ok, 1 failed, 2 cannot run, 130 interrupted)."""
    root = repo_root()
    if root is None:
        print(
            "ipcfw demo: the example servers and clients were not found next to the ipcfw package "
            f"({Path(__file__).resolve().parents[2]}).\nThe demo needs a source checkout "
            "installed with `pip install -e .`; run it from there.",
            file=sys.stderr,
        )
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # for `clients.*` and `servers.*`

    workdir = Path(tempfile.mkdtemp(prefix="ipcfw-demo-", dir="/tmp"))
    os.chmod(workdir, 0o700)
    stack = _Stack(workdir, root)
    if len(stack.endpoint) - len("ipc://") > IPC_PATH_MAX:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"ipcfw demo: temporary path {workdir} is too long for an ipc socket",
              file=sys.stderr)
        return 2

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = None
    if in_main_thread:
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    status = 1
    try:
        status = _run(stack)
    except KeyboardInterrupt:
        print("\nipcfw demo: interrupted; stopping", file=sys.stderr, flush=True)
        status = 130
    except _Terminated:
        print("ipcfw demo: terminated; stopping", file=sys.stderr, flush=True)
        status = 143
    except Exception as exc:  # DemoError, or anything unexpected: report it with the logs
        detail = str(exc) if isinstance(exc, DemoError) else f"{type(exc).__name__}: {exc}"
        print(f"ipcfw demo: failed: {detail}", file=sys.stderr)
        print(stack.logs(), file=sys.stderr, flush=True)
        status = 1
    finally:
        # Clean up whatever happened; a second Ctrl-C or SIGTERM must not cut the cleanup short.
        previous_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            try:
                _close_client_runtime(stack.endpoint)
            except Exception:  # best effort: the processes below are what must go
                pass
            stack.stop()
            if stack.kernel is not None:
                servers = len(stack.servers)
                _print(f"stopped kernel and {servers} server{'s' if servers != 1 else ''}")
            shutil.rmtree(workdir, ignore_errors=True)
        finally:
            if in_main_thread:
                signal.signal(signal.SIGINT, previous_sigint)
                signal.signal(signal.SIGTERM, previous_sigterm)
    return status


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated()


def _run(stack: _Stack) -> int:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    kernel = stack.start_kernel(deadline)
    _print(f"ipcfw demo: kernel pid {kernel.pid} on {stack.endpoint}")
    for name, plugin, _client in EXAMPLES:
        stack.start_server(name, plugin)
    for child in stack.servers:
        stack.wait_registered(child, deadline)

    if not _run_clients(stack.endpoint):
        print("ipcfw demo: an example client failed", file=sys.stderr)
        print(stack.logs(), file=sys.stderr, flush=True)
        return 1
    _measure(stack.endpoint)
    return 0
