"""``ipcfw demo``: a kernel, the three example servers and their clients, on a private endpoint.

Needs nothing configured: the demo makes a private temporary directory (0700, under ``/tmp`` so
the ipc path stays short), starts ``python -m ipcfw kernel`` on a socket in it and the example
servers (``servers.echo``, ``servers.kv``, ``servers.notifier``) as ``python -m ipcfw serve``
processes with `ipcfw.testing.Stack`, waits until each is ready, runs the example clients
(``clients/*_client.py``) in this process, then measures a synchronous round trip and
pipelined asynchronous throughput against the echo server, on the direct path beside a
``multiprocessing.managers`` proxy (the standard library's answer), then through the kernel.

Everything it starts is stopped on the way out: after success, after a failure, and on Ctrl-C
(exit status 130) or SIGTERM (143). The processes' logs go to files in the temporary directory;
they are shown if something fails, and removed with the directory at the end.

The servers and clients are found in a source checkout (``servers/`` and ``clients/`` next to the
``ipcfw`` package, hosted as ``servers.echo:EchoServer`` and so on), else in the installed
package, where the wheel puts the same files (``ipcfw.examples.servers.echo:EchoServer``): the
demo runs from ``pip install -e .`` and from a plain ``pip install`` of the wheel alike.
"""

from __future__ import annotations

import gc
import importlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from ..client import RSession, TRequestStatus
from ..endpoint import IPC_PATH_MAX
from ..testing import Stack, StartError
from .bench.clients import WINDOW  # the same pipelined measurement as the bench's, in small
from .bench.clients import ManagersClient  # (and the same managers proxy)
from .bench.roles import role_argv
from .bench.measure import percentile

SYNC_CALLS = 2000
WARMUP_CALLS = 200
PIPELINE_SECONDS = 1.0
REPLY_TIMEOUT = 5.0

# (server name, plugin, example client module), named as in a checkout (see `Examples`)
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


# The exception a signal raised (KeyboardInterrupt, _Terminated). Raised at a moment Python
# runs a finalizer or a weakref callback, it is only reported there, not propagated: the demo
# raises it again at its next step (`_raise_if_signalled`), and does not report it.
_signalled: list[BaseException] = []


def _on_signal(signum: int, frame: object) -> None:
    exc: BaseException = KeyboardInterrupt() if signum == signal.SIGINT else _Terminated()
    _signalled.append(exc)
    raise exc


def _raise_if_signalled() -> None:
    if _signalled:
        raise _signalled[0]


def _unraisable(
    previous: Callable[[sys.UnraisableHookArgs], object],
) -> Callable[[sys.UnraisableHookArgs], object]:
    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        if unraisable.exc_value not in _signalled:  # (that one is raised again: see above)
            previous(unraisable)
    return hook


INSTALLED = "ipcfw.examples."
"""The package the wheel installs ``servers/`` and ``clients/`` as (pyproject.toml)."""


@dataclass(frozen=True)
class Examples:
    """Where the example servers and clients are loaded from: a source checkout's ``servers``
    and ``clients`` (`root` is the checkout, `prefix` empty), or the installed package's
    ``ipcfw.examples.servers`` and ``ipcfw.examples.clients`` (`root` None)."""

    prefix: str
    root: Path | None

    def module(self, name: str) -> str:
        """`name` (``servers.echo:EchoServer``, ``clients.echo_client``) as loaded from here."""
        return self.prefix + name


def repo_root() -> Path | None:
    """The source checkout holding ``ipcfw/``, ``servers/`` and ``clients/``; None if absent."""
    root = Path(__file__).resolve().parents[2]
    if (root / "servers" / "echo.py").is_file() and (root / "clients" / "__init__.py").is_file():
        return root
    return None


def find_examples() -> Examples | None:
    """The checkout's examples if this ipcfw runs from one, else the installed package's; None
    if neither is there (a copy of the ``ipcfw`` package alone)."""
    root = repo_root()
    if root is not None:
        return Examples("", root)
    if all(find_spec(INSTALLED + part) is not None for part in ("servers", "clients")):
        return Examples(INSTALLED, None)
    return None


def _make_stack(examples: Examples) -> Stack | None:
    """A stack in a private directory under /tmp; None if its path is too long for a socket.
    Its processes run in the checkout, with it on their path; or, for the installed examples,
    in that directory, so that nothing in the user's working directory shadows a module."""
    workdir = Path(tempfile.mkdtemp(prefix="ipcfw-demo-", dir="/tmp"))
    os.chmod(workdir, 0o700)
    if examples.root is None:
        stack = Stack(workdir, cwd=workdir)
    else:
        pythonpath = os.pathsep.join(
            p for p in (str(examples.root), os.environ.get("PYTHONPATH", "")) if p)
        stack = Stack(workdir, env={"PYTHONPATH": pythonpath}, cwd=examples.root)
    if len(stack.endpoint) - len("ipc://") > IPC_PATH_MAX:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"ipcfw demo: temporary path {workdir} is too long for an ipc socket",
              file=sys.stderr)
        return None
    return stack


def _logs(stack: Stack) -> str:
    """Each process's log tail, the servers first, for a failure report."""
    processes = [*stack.servers, *([stack.kernel] if stack.kernel else [])]
    return "\n".join(
        f"  {p.name} log ({p.log_path.name}):\n{p.log_tail()}" for p in processes
    )


def _print(line: str = "") -> None:
    print(line, flush=True)


# -- the clients and the measurements ----------------------------------------------------------


def _run_clients(examples: Examples, endpoint: str) -> bool:
    """Run each example client's walkthrough in this process; print one line each."""
    all_ok = True
    for name, _plugin, module_name in EXAMPLES:
        lines: list[str] = []
        try:
            module = importlib.import_module(examples.module(module_name))
            summary = module.run(out=lines.append, endpoint=endpoint)
        except Exception as exc:  # any failure of an example is reported, then the demo fails
            all_ok = False
            _print(f"  {name:<9} FAILED: {type(exc).__name__}: {exc}")
            for line in lines:
                _print(f"      {line}")
            continue
        _print(f"  {name:<9} ok  ({summary})")
    return all_ok


def _measure_sync(session: RSession) -> tuple[float, float, int]:
    """Median and p99 of a synchronous EEchoInt round trip, in microseconds."""
    return _timed(lambda: session.SendReceive(EEchoInt, (42,)), 42, "EEchoInt(42)")


def _timed(call: Callable[[], object], expected: object,
           what: str) -> tuple[float, float, int]:
    """Median and p99 of `call()`'s round trip in microseconds, after a warm-up."""
    for _ in range(WARMUP_CALLS):
        call()
    clock = time.perf_counter_ns
    samples = [0] * SYNC_CALLS
    with _gc_paused():
        for i in range(SYNC_CALLS):
            t0 = clock()
            value = call()
            samples[i] = clock() - t0
            if value != expected:
                raise DemoError(f"{what} returned {value}")
    samples.sort()
    return percentile(samples, 50) / 1000, percentile(samples, 99) / 1000, SYNC_CALLS


def _measure_managers(stack: Stack, direct_median: float) -> None:
    """The standard library's answer, measured the same way: a ``multiprocessing.managers``
    proxy in this process calling a method of an object in another (the bench's managers
    helper), printed beside the direct path's sync median (microseconds)."""
    address = str(stack.workdir / "managers")
    helper = stack.spawn(role_argv("managers", address), "managers", ready=True)
    helper.wait_ready(stack.timeout)
    client = ManagersClient(address)
    try:
        median, p99, calls = _timed(client.call, ManagersClient.expected, "adder.add")
    finally:
        client.close()
    _print(f"  multiprocessing.managers proxy, for comparison: sync median {median:.0f} us, "
           f"p99 {p99:.0f} us ({calls} calls; the direct path takes "
           f"{direct_median / median:.2f}x its time); a proxy cannot pipeline")


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


def _measure(stack: Stack) -> None:
    endpoint = stack.endpoint
    with RSession.connect("echo", endpoint=endpoint, path="direct") as session:
        median, p99, calls = _measure_sync(session)
        _raise_if_signalled()
        _print(f"  direct path: sync round trip median {median:.0f} us, p99 {p99:.0f} us "
               f"({calls} calls)")
        _measure_managers(stack, median)
        _raise_if_signalled()
        rate = _measure_pipelined(session)
        _raise_if_signalled()
        _print(f"  direct path: async pipelined {rate:,.0f} calls/s ({WINDOW} in flight)")
    with RSession.connect("echo", endpoint=endpoint, path="kernel") as session:
        median, p99, _ = _measure_sync(session)
        rate = _measure_pipelined(session)
        _raise_if_signalled()
        _print(f"  the same through the kernel (path='kernel'): median {median:.0f} us, "
               f"p99 {p99:.0f} us; {rate:,.0f} calls/s")


# -- the command ---------------------------------------------------------------------------------


def run_demo() -> int:
    """Run the demo; returns the exit status (0 ok, 1 failed, 2 cannot run, 130 interrupted)."""
    examples = find_examples()
    if examples is None:
        print(
            "ipcfw demo: the example servers and clients were not found: neither next to the "
            f"ipcfw package ({Path(__file__).resolve().parents[2]}) nor installed as "
            f"{INSTALLED}servers and {INSTALLED}clients.\nInstall ipcfw with pip (`pip install "
            "ipcfw-*.whl`, or `pip install -e .` in a source checkout) and run it again.",
            file=sys.stderr,
        )
        return 2
    if examples.root is not None and str(examples.root) not in sys.path:
        sys.path.insert(0, str(examples.root))  # for `clients.*` and `servers.*`

    stack = _make_stack(examples)
    if stack is None:
        return 2

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = previous_interrupt = None
    if in_main_thread:
        _signalled.clear()
        previous_sigterm = signal.signal(signal.SIGTERM, _on_signal)
        previous_interrupt = signal.signal(signal.SIGINT, _on_signal)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _unraisable(previous_hook)
    status = 1
    try:
        status = _run(stack, examples)
        _raise_if_signalled()
    except KeyboardInterrupt:
        print("\nipcfw demo: interrupted; stopping", file=sys.stderr, flush=True)
        status = 130
    except _Terminated:
        print("ipcfw demo: terminated; stopping", file=sys.stderr, flush=True)
        status = 143
    except Exception as exc:  # DemoError, or anything unexpected: report it with the logs
        if isinstance(exc, (DemoError, StartError)):
            detail = str(exc).split("\n", 1)[0]  # the logs follow
        else:
            detail = f"{type(exc).__name__}: {exc}"
        print(f"ipcfw demo: failed: {detail}", file=sys.stderr)
        print(_logs(stack), file=sys.stderr, flush=True)
        status = 1
    finally:
        # Clean up whatever happened; a second Ctrl-C or SIGTERM must not cut the cleanup short.
        if in_main_thread:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            stack.stop()  # this process's client runtime first, then the servers, the kernel
            if stack.kernel is not None:
                servers = len(stack.servers)
                _print(f"stopped kernel and {servers} server{'s' if servers != 1 else ''}")
            shutil.rmtree(stack.workdir, ignore_errors=True)
        finally:
            sys.unraisablehook = previous_hook
            if in_main_thread:
                signal.signal(signal.SIGINT, previous_interrupt)
                signal.signal(signal.SIGTERM, previous_sigterm)
    return status


def _run(stack: Stack, examples: Examples) -> int:
    kernel = stack.start()
    _print(f"ipcfw demo: kernel pid {kernel.pid} on {stack.endpoint}")
    for name, plugin, _client in EXAMPLES:  # started together, then waited for
        stack.serve(examples.module(plugin), wait=False, name=name)
    for server in stack.servers:
        stack.wait_ready(server)

    if not _run_clients(examples, stack.endpoint):
        print("ipcfw demo: an example client failed", file=sys.stderr)
        print(_logs(stack), file=sys.stderr, flush=True)
        return 1
    _raise_if_signalled()
    _measure(stack)
    return 0
