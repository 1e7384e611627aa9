"""``ipcfw bench``: how much does the ipcfw stack cost over a hand-written ZeroMQ broker?

What is measured
----------------
For each system, from this (the bench) process acting as the client:

* **sync round-trip latency**: one call at a time, each call timed on its own with
  ``time.perf_counter_ns``; the median and the 99th percentile are reported, in microseconds.
* **pipelined throughput**: 64 requests kept in flight (issue 64, then wait for the oldest and
  issue one more), reported as completed calls per second.
* **shared-session throughput** (ipcfw only): 8 threads of this process make sync calls on ONE
  session, shared with ``ShareAuto``; reported as the calls per second of all 8 together (wall
  time from the start of a chunk to the last thread's last reply), with the per-call median and
  99th percentile, next to ipcfw's single-thread sync calls per second from the same run (its
  calls divided by the sum of their latencies). The threads share one GIL: the figure shows how
  far the client runtime and the kernel overlap concurrent round trips on one session.

* **CPU per pipelined call** of each process of each system (this one as the client, the
  broker, the server), all threads included, over the pipelined steps: where the time goes.

Every request carries the equivalent of an opcode and four 32-bit ints (a 32-byte body for the
bare systems, ``SendReceive(1, (42, 0, 0, 0))`` for ipcfw), and every reply echoes it.

The systems
-----------
``bare-pingpong``
    A DEALER in this process, a ROUTER echo server in another. Two processes, one hop: the floor
    that any ZeroMQ-in-Python design pays.
``bare-forwarder``
    DEALER client -> a Python ROUTER/ROUTER forwarder process -> an echo worker process (a
    DEALER). Three processes and two hops, exactly the shape of ipcfw's client -> kernel ->
    server path. The forwarder is what a competent engineer would hand-write: a plain
    ``zmq.Poller`` loop that drains each ready socket with ``NOBLOCK``, two frames on the
    client side and three on the worker side, no decoding, no tables. It is **the** fair
    baseline: it pays for the same process hops and context switches as ipcfw, so the ratio
    of ipcfw to it isolates what ipcfw itself adds (codec, handle and slot checks, policy,
    completion routing, the client runtime), while the ratio to ``bare-pingpong`` also
    includes the price of having a broker at all.
``ipcfw``
    The real stack: ``python -m ipcfw kernel``, ``python -m ipcfw serve servers.echo:EchoServer``
    and an ``RSession`` in this process.
``ipcfw-shared-8``
    The same kernel, a second server process ``python -m ipcfw serve
    ipcfw.tools.bench:SharedEchoServer`` (``servers.echo.EchoServer`` registered as
    ``echo-shared`` with
    ``sharing = ESharableSessions``: ``EchoServer`` itself refuses ``ShareAuto``), one
    ``RSession`` created by the main thread and shared with ``ShareAuto``, and 8 worker threads
    calling ``SendReceive(1, (42, 0, 0, 0))`` on it, each on its own channel to the kernel.
    Reported in its own table below the main one; ``--shared 0`` leaves it out.

Targets: ipcfw's sync median at most 1.5x bare-forwarder's, and its pipelined throughput at
least 0.5x bare-forwarder's.

All systems are started first, warmed up, and then measured in interleaved chunks (the order
rotates chunk by chunk; the shared-session case takes its turn among the sync chunks), so that
noise from other work on a shared machine hits every system alike; ``--repeat R`` runs the whole
set R times and keeps each system's best run.

Exit status: 0 when every system was measured (or ipcfw was left out with ``--no-ipcfw``), 1 when
ipcfw or its shared-session case could not be started or measured (the other numbers are still
reported) or a baseline failed, 2 with ``--strict`` when ipcfw was measured but missed a target,
130 when interrupted.

The same module, run with the hidden ``--role`` option, is the body of the helper processes
(``echo-router``, ``forwarder``, ``echo-worker``); each prints ``READY`` on stdout once it can
serve, which is the handshake the bench waits for.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import math
import os
import platform
import queue
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol

import psutil
import zmq

WINDOW = 64
"""Requests in flight in the pipelined measurement."""

ECHO_INT = 1
"""ipcfw echo server opcode ``EEchoInt``: completes with ``Int0``."""

ECHO_ARGS = (42, 0, 0, 0)
PAYLOAD = struct.pack("<I4i", ECHO_INT, *ECHO_ARGS).ljust(32, b"\0")
"""The bare systems' request body: opcode + four int32, padded to 32 bytes."""

SYNC_TARGET = 1.5
PIPELINED_TARGET = 0.5
BASELINE = "bare-forwarder"

DEFAULT_SYNC, DEFAULT_PIPELINED = 5000, 20000
QUICK_SYNC, QUICK_PIPELINED = 1000, 5000

SHARED_THREADS = 8
"""Threads sharing one ipcfw session in the shared-session case."""
SHARED_SYSTEM = f"ipcfw-shared-{SHARED_THREADS}"
SHARED_SERVER = "echo-shared"
"""The name ``SharedEchoServer`` registers."""
DEFAULT_SHARED, QUICK_SHARED = 1000, 250
"""Sync calls per thread in the shared-session case."""
CHUNKS = 10
"""Each measurement is split into this many chunks, interleaved across systems."""

STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 3.0
REPLY_TIMEOUT_MS = 10_000
STEP_BUDGET_S, STEP_BUDGET_PER_CALL_S = 20.0, 0.005
PARENT_CHECK_MS = 1000
READY_LINE = b"READY"
HELLO = b"HELLO"
IPCFW_CLIENT_LOGGER = "ipcfw.client"


class BenchError(Exception):
    """A bare system failed: the bench cannot produce a baseline."""


class Unavailable(Exception):
    """The ipcfw stack could not be started or measured; the bare numbers still stand."""


class WrongReply(Exception):
    """A system answered, but not with the echo of the request."""


# --------------------------------------------------------------------------------------------
# Helper process roles (run as ``python bench.py --role ROLE ...``)
# --------------------------------------------------------------------------------------------


def _announce_ready() -> None:
    sys.stdout.buffer.write(READY_LINE + b"\n")
    sys.stdout.flush()


def _orphaned(parent_pid: int) -> bool:
    return parent_pid > 0 and os.getppid() != parent_pid


def _echo_loop(sock: zmq.Socket, parent_pid: int) -> None:
    """Echo every multipart message back unchanged; return when the bench process is gone."""
    sock.rcvtimeo = PARENT_CHECK_MS
    while True:
        try:
            frames = sock.recv_multipart()
        except zmq.Again:
            if _orphaned(parent_pid):
                return
            continue
        sock.send_multipart(frames)


def run_echo_router(endpoint: str, parent_pid: int) -> None:
    """bare-pingpong's server: a ROUTER that sends ``[rid, body]`` straight back."""
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as sock:
        sock.linger = 0
        sock.bind(endpoint)
        _announce_ready()
        _echo_loop(sock, parent_pid)


def run_echo_worker(endpoint: str, parent_pid: int) -> None:
    """bare-forwarder's worker: a DEALER that registers with HELLO, then echoes
    ``[client_rid, body]`` back to the forwarder."""
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.linger = 0
        sock.connect(endpoint)
        sock.send(HELLO)
        _echo_loop(sock, parent_pid)


def _pump_requests(front: zmq.Socket, back: zmq.Socket, worker_rid: bytes) -> None:
    """Drain the client side: ``[client_rid, body]`` -> ``[worker_rid, client_rid, body]``."""
    try:
        while True:
            client_rid, body = front.recv_multipart(zmq.NOBLOCK)
            back.send_multipart((worker_rid, client_rid, body))
    except zmq.Again:
        pass


def _pump_replies(back: zmq.Socket, front: zmq.Socket) -> None:
    """Drain the worker side: ``[worker_rid, client_rid, body]`` -> ``[client_rid, body]``."""
    try:
        while True:
            _worker_rid, client_rid, body = back.recv_multipart(zmq.NOBLOCK)
            front.send_multipart((client_rid, body))
    except zmq.Again:
        pass


def _await_worker(back: zmq.Socket) -> bytes:
    if not back.poll(STARTUP_TIMEOUT * 1000):
        raise TimeoutError(f"no echo worker registered within {STARTUP_TIMEOUT:.0f} s")
    worker_rid, hello = back.recv_multipart()
    if hello != HELLO:
        raise RuntimeError(f"expected {HELLO!r} from the worker, got {hello!r}")
    return worker_rid


def run_forwarder(frontend: str, backend: str, parent_pid: int) -> None:
    """bare-forwarder's broker: ROUTER for clients, ROUTER for the worker, one Poller loop.

    Ready (prints READY) only once the worker has registered, so the bench's handshake
    covers both processes.
    """
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as front, ctx.socket(zmq.ROUTER) as back:
        front.linger = back.linger = 0
        front.bind(frontend)
        back.bind(backend)
        worker_rid = _await_worker(back)
        _announce_ready()
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(back, zmq.POLLIN)
        while True:
            events = poller.poll(PARENT_CHECK_MS)
            if not events and _orphaned(parent_pid):
                return
            for sock, _ in events:
                if sock is front:
                    _pump_requests(front, back, worker_rid)
                else:
                    _pump_replies(back, front)


def _run_role(args: argparse.Namespace) -> int:
    try:
        if args.role == "echo-router":
            run_echo_router(args.endpoint, args.parent_pid)
        elif args.role == "echo-worker":
            run_echo_worker(args.endpoint, args.parent_pid)
        else:
            run_forwarder(args.endpoint, args.backend, args.parent_pid)
    except KeyboardInterrupt:
        pass
    return 0


# --------------------------------------------------------------------------------------------
# Watchdog: a lost reply must fail a step, not hang the bench
# --------------------------------------------------------------------------------------------


class Stalled(Exception):
    """A step took longer than its budget: a lost reply or a hung call."""


@contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Raise Stalled in the main thread if the block runs longer than ``seconds``.

    Lost replies must not hang the bench; outside the main thread this does nothing.
    """
    def expire(signum: int, frame: object) -> None:
        raise Stalled(f"no progress within {seconds:.0f} s")

    try:
        previous = signal.signal(signal.SIGALRM, expire)
    except ValueError:
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------
# Process ownership
# --------------------------------------------------------------------------------------------


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path


class Children:
    """Owns every process the bench starts: ``stop_all`` terminates, waits, then kills.

    Children run in their own session, so a Ctrl-C at the terminal reaches only the bench,
    which then stops them itself (no tracebacks from helpers).
    """

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._children: list[_Child] = []

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        handshake: bool,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> _Child:
        """Start ``argv``; its stderr (and stdout, unless ``handshake``) goes to a log file."""
        log_path = self._workdir / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if handshake else log,
                stderr=log,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        child = _Child(name, proc, log_path)
        self._children.append(child)
        return child

    def stop_all(self) -> None:
        """Terminate every child (newest first), wait with a timeout, kill stragglers."""
        from ipcfw.tools.children import stop_processes  # (lazy: this file also runs as a script)

        children = list(reversed(self._children))
        stop_processes((child.proc for child in children), STOP_TIMEOUT)
        for child in children:
            if child.proc.stdout is not None:
                child.proc.stdout.close()
        self._children.clear()


def log_tail(child: _Child, lines: int = 15) -> str:
    """The last lines a child wrote to its log, indented, for error messages."""
    try:
        text = child.log_path.read_text(errors="replace").rstrip()
    except OSError:
        return ""
    tail = text.splitlines()[-lines:]
    return "".join(f"\n    | {line}" for line in tail)


def await_ready(child: _Child, deadline: float) -> None:
    """Wait for the child's READY line; raise BenchError if it dies or the deadline passes."""
    stdout: IO[bytes] | None = child.proc.stdout
    assert stdout is not None, "await_ready needs a child spawned with handshake=True"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(
                f"{child.name} not ready within {STARTUP_TIMEOUT:.0f} s{log_tail(child)}")
        readable, _, _ = select.select([stdout], [], [], remaining)
        if not readable:
            continue
        line = stdout.readline()
        if line.strip() == READY_LINE:
            return
        if not line:
            code = child.proc.wait()
            raise BenchError(
                f"{child.name} exited with status {code} before READY{log_tail(child)}")


def _role_argv(role: str, endpoint: str, *extra: str) -> list[str]:
    script = str(Path(__file__).resolve())
    return [sys.executable, script, "--role", role, "--endpoint", endpoint,
            "--parent-pid", str(os.getpid()), *extra]


# --------------------------------------------------------------------------------------------
# Clients: one per system, all driven by the same measurement code
# --------------------------------------------------------------------------------------------


class Client(Protocol):
    expected: object
    """What ``call()`` must return."""

    def call(self) -> object:
        """One synchronous round trip; returns the reply."""

    def pipelined(self, n: int, window: int) -> None:
        """Complete ``n`` calls with up to ``window`` in flight."""

    def close(self) -> None: ...


class BareClient:
    """A DEALER sending PAYLOAD; a missing reply raises BenchError instead of hanging."""

    expected: object = PAYLOAD

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        self._sock.rcvtimeo = REPLY_TIMEOUT_MS
        self._sock.connect(endpoint)

    def _recv(self) -> bytes:
        try:
            return self._sock.recv()
        except zmq.Again:
            raise BenchError(f"no reply within {REPLY_TIMEOUT_MS / 1000:.0f} s") from None

    def call(self) -> bytes:
        self._sock.send(PAYLOAD)
        return self._recv()

    def pipelined(self, n: int, window: int) -> None:
        send, recv = self._sock.send, self._recv
        issued = min(window, n)
        for _ in range(issued):
            send(PAYLOAD)
        for _ in range(n):
            recv()
            if issued < n:
                send(PAYLOAD)
                issued += 1

    def close(self) -> None:
        self._sock.close(linger=0)


class IpcfwClient:
    """An ``RSession`` to the echo server; pipelining keeps TRequestStatus objects in a deque."""

    expected: object = ECHO_ARGS[0]

    def __init__(self, session: Any, status_cls: type) -> None:
        self._session = session
        self._status_cls = status_cls

    def call(self) -> object:
        return self._session.SendReceive(ECHO_INT, ECHO_ARGS)

    def _issue(self) -> Any:
        status = self._status_cls()
        self._session.SendReceive(ECHO_INT, ECHO_ARGS, status)
        return status

    def pipelined(self, n: int, window: int) -> None:
        inflight = deque(self._issue() for _ in range(min(window, n)))
        issued = len(inflight)
        while inflight:
            value = inflight.popleft().Wait()
            if value != self.expected:
                raise WrongReply(
                    f"async EEchoInt completed with {value!r}, expected {self.expected!r}")
            if issued < n:
                inflight.append(self._issue())
                issued += 1

    def close(self) -> None:
        self._session.Close()


class SharedEcho:
    """``threads`` worker threads making sync calls on one ``ShareAuto``'d ``RSession``.

    The workers live as long as the case (each thread's first call opens its channel to the
    kernel, which then stays attached to the session); ``run`` hands each the same number of
    calls and waits for all of them.
    """

    def __init__(self, session: Any, threads: int) -> None:
        self._session = session
        self._results: queue.SimpleQueue[list[int] | BaseException] = queue.SimpleQueue()
        self._orders: list[queue.SimpleQueue[int | None]] = [
            queue.SimpleQueue() for _ in range(threads)
        ]
        self._threads = [
            threading.Thread(target=self._work, args=(orders,), name=f"bench-shared-{i}",
                             daemon=True)
            for i, orders in enumerate(self._orders)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self, orders: queue.SimpleQueue[int | None]) -> None:
        clock, call, expected = time.perf_counter_ns, self._session.SendReceive, ECHO_ARGS[0]
        while (n := orders.get()) is not None:
            out = [0] * n
            try:
                for i in range(n):
                    t0 = clock()
                    value = call(ECHO_INT, ECHO_ARGS)
                    out[i] = clock() - t0
                    if value != expected:
                        raise WrongReply(f"EEchoInt on the shared session returned {value!r},"
                                         f" expected {expected!r}")
            except BaseException as exc:  # handed to the main thread, which reports it
                self._results.put(exc)
            else:
                self._results.put(out)

    def _next_result(self) -> list[int] | BaseException:
        while True:  # short waits: the watchdog's SIGALRM must get through to the main thread
            try:
                return self._results.get(timeout=0.1)
            except queue.Empty:
                continue

    def run(self, n: int) -> tuple[float, list[int]]:
        """Every thread makes ``n`` sync calls; returns (wall seconds, every call's latency in
        ns)."""
        with _gc_paused():
            t0 = time.perf_counter()
            for orders in self._orders:
                orders.put(n)
            results = [self._next_result() for _ in self._orders]
            seconds = time.perf_counter() - t0
        latencies: list[int] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            latencies.extend(result)
        return seconds, latencies

    def close(self) -> None:
        """Stop the workers, then close the session (which also releases a worker stuck in a
        call)."""
        for orders in self._orders:
            orders.put(None)
        deadline = time.monotonic() + STOP_TIMEOUT
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._session.Close()


@functools.cache
def _shared_echo_server() -> type:
    from ipcfw import ESharableSessions
    from servers.echo import EchoServer

    return type("SharedEchoServer", (EchoServer,), {
        "__module__": __name__,
        "__doc__": "servers.echo's EchoServer, registered as echo-shared, allowing ShareAuto.",
        "name": SHARED_SERVER,
        "sharing": ESharableSessions,
    })


def __getattr__(name: str) -> Any:
    """``SharedEchoServer``, built on first use, for
    ``ipcfw serve ipcfw.tools.bench:SharedEchoServer``.

    Lazily, so that importing the bench never imports the ipcfw server side or ``servers``.
    """
    if name == "SharedEchoServer":
        return _shared_echo_server()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# Starting the systems
# --------------------------------------------------------------------------------------------


def start_bare_pingpong(
    children: Children, ctx: zmq.Context, workdir: Path,
) -> tuple[BareClient, dict[str, int]]:
    endpoint = f"ipc://{workdir}/pingpong"
    child = children.spawn("bare-pingpong", _role_argv("echo-router", endpoint), handshake=True)
    await_ready(child, time.monotonic() + STARTUP_TIMEOUT)
    return BareClient(ctx, endpoint), {"server": child.proc.pid}


def start_bare_forwarder(
    children: Children, ctx: zmq.Context, workdir: Path,
) -> tuple[BareClient, dict[str, int]]:
    front, back = f"ipc://{workdir}/fwd-front", f"ipc://{workdir}/fwd-back"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    forwarder = children.spawn(
        "bare-forwarder", _role_argv("forwarder", front, "--backend", back), handshake=True)
    worker = children.spawn(
        "bare-forwarder-worker", _role_argv("echo-worker", back), handshake=False)
    await_ready(forwarder, deadline)
    return BareClient(ctx, front), {"broker": forwarder.proc.pid, "server": worker.proc.pid}


def _repo_root() -> Path:
    """The directory holding ``ipcfw/`` and ``servers/``."""
    return Path(__file__).resolve().parents[2]


class _IpcfwApi(NamedTuple):
    RSession: type
    TRequestStatus: type
    NotFound: type[BaseException]
    IpcError: type[BaseException]


def _import_ipcfw() -> _IpcfwApi:
    """Import the client API lazily: the bench must run while the package is incomplete."""
    try:
        import ipcfw
        import ipcfw.client  # noqa: F401  (part of the contract: it must import)

        return _IpcfwApi(ipcfw.RSession, ipcfw.TRequestStatus, ipcfw.NotFound, ipcfw.IpcError)
    except Exception as exc:  # any failure here means "stack not available", reported clearly
        raise Unavailable(
            f"cannot import the ipcfw client API: {type(exc).__name__}: {exc}") from exc


def _ipcfw_env(endpoint: str) -> dict[str, str]:
    root = str(_repo_root())
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "IPCFW_KERNEL": endpoint, "PYTHONPATH": path}


def _check_alive(stack: Sequence[_Child]) -> None:
    for child in stack:
        code = child.proc.poll()
        if code is not None:
            raise Unavailable(f"`{child.name}` exited with status {code}{log_tail(child)}")


def _close_quietly(session: Any) -> None:
    try:
        session.Close()
    except Exception:  # a half-made probe session: nothing useful to report
        pass


def _connect_echo(api: _IpcfwApi, stack: Sequence[_Child], deadline: float,
                  name: str = "echo") -> Any:
    """Retry CreateSession(name) until the kernel and that echo server are both up."""
    last: BaseException | None = None
    while time.monotonic() < deadline:
        _check_alive(stack)
        session = api.RSession()
        try:
            session.CreateSession(name, (1, 0, 0), message_slots=-1)
            return session
        except (api.NotFound, api.IpcError) as exc:
            last = exc
            _close_quietly(session)
        time.sleep(0.05)
    tails = "".join(f"\n  {c.name} log:{log_tail(c)}" for c in stack)
    raise Unavailable(f"ipcfw stack not ready within {STARTUP_TIMEOUT:.0f} s "
                      f"(last error: {last!r}){tails}")


def _spawn_ipcfw(children: Children, name: str, args: Sequence[str], endpoint: str) -> _Child:
    argv = [sys.executable, "-m", "ipcfw", *args, "--endpoint", endpoint]
    return children.spawn(name, argv, handshake=False, env=_ipcfw_env(endpoint), cwd=_repo_root())


@dataclass
class IpcfwStack:
    client: IpcfwClient
    pids: dict[str, int]
    """The kernel ("broker") and the echo server ("server")."""
    shared: SharedEcho | None = None
    shared_error: str | None = None
    """Why the shared-session case is not available, when it was asked for."""


def start_ipcfw(children: Children, workdir: Path, shared_threads: int = 0) -> IpcfwStack:
    """Start kernel + echo server (+ the shared echo server), connect; raise Unavailable on any
    failure of the single-session stack. A failure of the shared case only is `shared_error`.

    Sets ``IPCFW_KERNEL`` in this process (``main`` restores it).
    """
    endpoint = f"ipc://{workdir}/kernel"
    os.environ["IPCFW_KERNEL"] = endpoint
    api = _import_ipcfw()
    plugin = _repo_root() / "servers" / "echo.py"
    if not plugin.is_file():
        raise Unavailable(f"no echo server plugin at {plugin}")
    deadline = time.monotonic() + STARTUP_TIMEOUT
    stack = [_spawn_ipcfw(children, "ipcfw-kernel", ["kernel"], endpoint),
             _spawn_ipcfw(children, "ipcfw-echo-server", ["serve", "servers.echo:EchoServer"],
                          endpoint)]
    if shared_threads:
        shared_server = _spawn_ipcfw(children, "ipcfw-echo-shared-server",
                                     ["serve", "ipcfw.tools.bench:SharedEchoServer"], endpoint)
    try:
        with watchdog(STARTUP_TIMEOUT + 2):
            session = _connect_echo(api, stack, deadline)
    except Unavailable:
        raise
    except Exception as exc:
        raise Unavailable(
            f"connecting to the echo server raised {exc!r}{log_tail(stack[0])}") from exc
    pids = {"broker": stack[0].proc.pid, "server": stack[1].proc.pid}
    result = IpcfwStack(IpcfwClient(session, api.TRequestStatus), pids)
    if shared_threads:
        try:
            result.shared = _start_shared(api, [stack[0], shared_server], deadline, shared_threads)
        except Unavailable as exc:
            result.shared_error = str(exc)
    return result


def _start_shared(api: _IpcfwApi, stack: Sequence[_Child], deadline: float,
                  threads: int) -> SharedEcho:
    try:
        with watchdog(STARTUP_TIMEOUT + 2):
            session = _connect_echo(api, stack, deadline, SHARED_SERVER)
    except Unavailable:
        raise
    except Exception as exc:
        raise Unavailable(
            f"connecting to {SHARED_SERVER} raised {exc!r}{log_tail(stack[1])}") from exc
    try:
        session.ShareAuto()
    except Exception as exc:
        _close_quietly(session)
        raise Unavailable(f"ShareAuto on the {SHARED_SERVER} session raised {exc!r}") from exc
    return SharedEcho(session, threads)


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


#: The processes of a system, as the CPU table names them: this process is always the client.
CPU_ROLES = ("client", "broker", "server")


@dataclass
class System:
    name: str
    client: Client
    pids: dict[str, int] = field(default_factory=dict)
    """Its processes other than this one, by role ("broker", "server")."""
    error: str | None = None
    latencies_ns: list[int] = field(default_factory=list)
    pipelined_calls: int = 0
    pipelined_seconds: float = 0.0
    pipelined_cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds each process spent during the pipelined steps, by role."""

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far of each of the system's processes (all threads)."""
        return {role: cpu_seconds(pid)
                for role, pid in {"client": os.getpid(), **self.pids}.items()}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of all threads of `pid`, in seconds.

    From the scheduler's nanosecond counters where Linux has them (``/proc/<pid>/task/*/
    schedstat``): the clock-tick counts behind ``psutil.cpu_times`` are 10 ms coarse, as long
    as a whole chunk of pipelined calls.
    """
    total_ns, seen = 0, False
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tids = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total_ns += int(f.read().split()[0])
            seen = True
        except (OSError, ValueError, IndexError):  # the thread ended, or no schedstat here
            continue
    if seen:
        return total_ns / 1e9
    return sum(psutil.Process(pid).cpu_times()[:2])


@dataclass(frozen=True)
class RunResult:
    sync_median_us: float
    sync_p99_us: float
    pipelined_calls_per_s: float
    sync_calls_per_s: float = 0.0
    """Sync calls divided by the sum of their latencies: one thread's sync throughput."""
    pipelined_cpu_us: dict[str, float] = field(default_factory=dict)
    """CPU microseconds per pipelined call of each process, by role."""


@dataclass
class SharedCase:
    """The shared-session case: its runner and what one run measured."""

    runner: SharedEcho
    name: str = SHARED_SYSTEM
    error: str | None = None
    latencies_ns: list[int] = field(default_factory=list)
    calls: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class SharedResult:
    calls_per_s: float
    """Of all the threads together."""
    call_median_us: float
    call_p99_us: float
    single: RunResult | None
    """ipcfw's single-thread result in the same run (None if ipcfw failed)."""

    @property
    def vs_single(self) -> float | None:
        """Shared calls/s over ipcfw's single-thread sync calls/s of the same run."""
        return self.calls_per_s / self.single.sync_calls_per_s if self.single is not None else None


@contextmanager
def _gc_paused() -> Iterator[None]:
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def time_sync(client: Client, n: int) -> list[int]:
    clock, call = time.perf_counter_ns, client.call
    out = [0] * n
    with _gc_paused():
        for i in range(n):
            t0 = clock()
            call()
            out[i] = clock() - t0
    return out


def time_pipelined(client: Client, n: int, window: int = WINDOW) -> float:
    with _gc_paused():
        t0 = time.perf_counter()
        client.pipelined(n, window)
        return time.perf_counter() - t0


def warm_up(system: System, sync_n: int, pipelined_n: int) -> None:
    reply = system.client.call()
    if reply != system.client.expected:
        raise WrongReply(f"echo returned {reply!r}, expected {system.client.expected!r}")
    time_sync(system.client, max(50, sync_n // 10))
    time_pipelined(system.client, max(WINDOW, pipelined_n // 10))


def split(n: int, parts: int) -> list[int]:
    """``n`` as ``parts`` near-equal non-negative chunks."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _rotations(steps: Sequence[tuple[Any, Callable[[], None], int]], chunk: int) -> list:
    """The (system, step, calls) of live systems, rotated by ``chunk``."""
    live = [step for step in steps if step[0].error is None]
    k = chunk % len(live) if live else 0
    return live[k:] + live[:k]


def _guarded(system: System | SharedCase, step: Callable[[], None], calls: int) -> None:
    """Run a step under a watchdog; ipcfw failures disable that system, bare ones abort."""
    try:
        with watchdog(STEP_BUDGET_S + calls * STEP_BUDGET_PER_CALL_S):
            step()
    except (BenchError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if not system.name.startswith("ipcfw"):
            raise BenchError(f"{system.name}: {exc!r}") from exc
        system.error = f"failed during measurement: {type(exc).__name__}: {exc}"


def run_once(systems: Sequence[System], sync_n: int, pipelined_n: int,
             shared: SharedCase | None = None, shared_n: int = 0) -> dict[str, RunResult]:
    """One interleaved run over all live systems (and the shared-session case, if any)."""
    for s in systems:
        s.latencies_ns, s.pipelined_calls, s.pipelined_seconds, s.pipelined_cpu_s = [], 0, 0.0, {}
    if shared is not None:
        shared.latencies_ns, shared.calls, shared.seconds = [], 0, 0.0
    shared_chunks = split(shared_n, CHUNKS) if shared is not None else [0] * CHUNKS
    for i, (n, m) in enumerate(zip(split(sync_n, CHUNKS), shared_chunks)):
        steps = [(s, lambda s=s, n=n: s.latencies_ns.extend(time_sync(s.client, n)), n)
                 for s in systems]
        if m:
            steps.append((shared, lambda m=m: _add_shared(shared, m), m * SHARED_THREADS))
        for system, step, calls in _rotations(steps, i):
            _guarded(system, step, calls)
    for i, n in enumerate(split(pipelined_n, CHUNKS)):
        for system, step, calls in _rotations(
                [(s, lambda s=s, n=n: _add_pipelined(s, n), n) for s in systems], i):
            _guarded(system, step, calls)
    return {s.name: summarize(s) for s in systems if s.error is None}


def _add_shared(case: SharedCase, n: int) -> None:
    seconds, latencies = case.runner.run(n)
    case.seconds += seconds
    case.calls += len(latencies)
    case.latencies_ns.extend(latencies)


def summarize_shared(case: SharedCase, single: RunResult | None) -> SharedResult:
    lat = sorted(case.latencies_ns)
    return SharedResult(
        calls_per_s=case.calls / case.seconds,
        call_median_us=percentile(lat, 50) / 1000,
        call_p99_us=percentile(lat, 99) / 1000,
        single=single,
    )


def _add_pipelined(system: System, n: int) -> None:
    before = system.cpu_seconds()
    system.pipelined_seconds += time_pipelined(system.client, n)
    after = system.cpu_seconds()
    system.pipelined_calls += n
    for role, seconds in after.items():
        system.pipelined_cpu_s[role] = (
            system.pipelined_cpu_s.get(role, 0.0) + seconds - before[role])


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of already sorted values."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(system: System) -> RunResult:
    lat = sorted(system.latencies_ns)
    return RunResult(
        sync_median_us=percentile(lat, 50) / 1000,
        sync_p99_us=percentile(lat, 99) / 1000,
        pipelined_calls_per_s=system.pipelined_calls / system.pipelined_seconds,
        sync_calls_per_s=len(lat) / (sum(lat) / 1e9),
        pipelined_cpu_us={role: seconds / system.pipelined_calls * 1e6
                          for role, seconds in system.pipelined_cpu_s.items()},
    )


def best_of(runs: Sequence[RunResult]) -> RunResult:
    """Best sync median (with that run's p99) and best throughputs across repeats (with the
    CPU of the run with the best pipelined throughput)."""
    fastest = min(runs, key=lambda r: r.sync_median_us)
    most = max(runs, key=lambda r: r.pipelined_calls_per_s)
    return RunResult(fastest.sync_median_us, fastest.sync_p99_us, most.pipelined_calls_per_s,
                     max(r.sync_calls_per_s for r in runs), most.pipelined_cpu_us)


def best_shared(runs: Sequence[SharedResult]) -> SharedResult:
    """The run with the best shared throughput, compared with ipcfw's single thread of that run."""
    return max(runs, key=lambda r: r.calls_per_s)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "platform": platform.platform(),
    }


def format_header(env: dict[str, Any], sync_n: int, pipelined_n: int, repeat: int,
                  shared_n: int = 0) -> str:
    shared = f", shared {SHARED_THREADS} threads x {shared_n} calls" if shared_n else ""
    return (
        f"ipcfw bench: sync {sync_n} calls, pipelined {pipelined_n} calls "
        f"({WINDOW} in flight){shared}, repeat {repeat}, best run per system\n"
        f"{env['python']} | pyzmq {env['pyzmq']} | libzmq {env['libzmq']} | "
        f"cpus {env['cpu_count']} (usable {env['cpu_affinity']}) | {env['platform']}"
    )


_COLUMNS = ("system", "sync median us", "sync p99 us", "pipelined calls/s",
            "sync vs fwd", "pipelined vs fwd")
_WIDTHS = (16, 14, 14, 20, 14, 19)


def _row(cells: Sequence[str]) -> str:
    first, *rest = cells
    return f"{first:<{_WIDTHS[0]}}" + "".join(f"{c:>{w}}" for c, w in zip(rest, _WIDTHS[1:]))


def ratios(result: RunResult, base: RunResult) -> tuple[float, float]:
    """(sync median / baseline's, throughput / baseline's)."""
    return (result.sync_median_us / base.sync_median_us,
            result.pipelined_calls_per_s / base.pipelined_calls_per_s)


def format_table(results: dict[str, RunResult], failed: dict[str, str]) -> str:
    base = results[BASELINE]
    lines = [_row(_COLUMNS)]
    for name, r in results.items():
        sync_ratio, pipe_ratio = ratios(r, base)
        lines.append(_row((name, f"{r.sync_median_us:.1f}", f"{r.sync_p99_us:.1f}",
                           f"{r.pipelined_calls_per_s:,.0f}", f"{sync_ratio:.2f}x",
                           f"{pipe_ratio:.2f}x")))
    for name in failed:
        lines.append(_row((name, "-", "-", "-", "-", "-")))
    return "\n".join(lines)


def format_cpu(results: dict[str, RunResult]) -> str:
    """Where the pipelined time goes: CPU per call of each process of each system."""
    lines = ["CPU per pipelined call, us"
             " (user + system, all threads of each process; the runs above)",
             f"{'system':<16}" + "".join(f"{role:>10}" for role in (*CPU_ROLES, "total"))]
    for name, r in results.items():
        cpu = r.pipelined_cpu_us
        cells = [f"{cpu[role]:.1f}" if role in cpu else "-" for role in CPU_ROLES]
        lines.append(f"{name:<16}"
                     + "".join(f"{c:>10}" for c in (*cells, f"{sum(cpu.values()):.1f}")))
    return "\n".join(lines)


_SHARED_COLUMNS = ("system", "sync calls/s", "call median us", "call p99 us", "vs ipcfw 1 thread")
_SHARED_WIDTHS = (16, 14, 16, 14, 19)


def format_shared(shared: SharedResult, shared_n: int) -> str:
    """The shared-session table: ipcfw's one thread, then the threads sharing one session, both
    from the same run."""
    def row(cells: Sequence[str]) -> str:
        first, *rest = cells
        return (f"{first:<{_SHARED_WIDTHS[0]}}"
                + "".join(f"{c:>{w}}" for c, w in zip(rest, _SHARED_WIDTHS[1:])))

    lines = [f"shared session: {SHARED_THREADS} threads x {shared_n} sync calls"
             " on one ShareAuto'd session; "
             f"calls/s of all {SHARED_THREADS} together (ipcfw: one thread, same run)",
             row(_SHARED_COLUMNS)]
    single = shared.single
    if single is not None:
        lines.append(row(("ipcfw", f"{single.sync_calls_per_s:,.0f}",
                          f"{single.sync_median_us:.1f}", f"{single.sync_p99_us:.1f}", "1.00x")))
    ratio = "-" if shared.vs_single is None else f"{shared.vs_single:.2f}x"
    lines.append(row((SHARED_SYSTEM, f"{shared.calls_per_s:,.0f}", f"{shared.call_median_us:.1f}",
                      f"{shared.call_p99_us:.1f}", ratio)))
    return "\n".join(lines)


def verdicts(results: dict[str, RunResult]) -> dict[str, Any]:
    """Targets for ipcfw against the baseline; ``passed`` is None when ipcfw was not measured."""
    if "ipcfw" not in results:
        return {"sync_ratio": None, "pipelined_ratio": None,
                "sync_pass": None, "pipelined_pass": None}
    sync_ratio, pipe_ratio = ratios(results["ipcfw"], results[BASELINE])
    return {"sync_ratio": sync_ratio, "pipelined_ratio": pipe_ratio,
            "sync_pass": sync_ratio <= SYNC_TARGET,
            "pipelined_pass": pipe_ratio >= PIPELINED_TARGET}


def format_targets(v: dict[str, Any]) -> str:
    def mark(ok: bool | None, ratio: float | None) -> str:
        return "n/a   NOT MEASURED" if ok is None else f"{ratio:.2f}x  {'PASS' if ok else 'MISS'}"

    return (f"target: ipcfw sync median  <= {SYNC_TARGET:.1f}x {BASELINE}: "
            f"{mark(v['sync_pass'], v['sync_ratio'])}\n"
            f"target: ipcfw pipelined    >= {PIPELINED_TARGET:.1f}x {BASELINE}: "
            f"{mark(v['pipelined_pass'], v['pipelined_ratio'])}")


def write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ipcfw bench",
        description="Sync latency and pipelined throughput of ipcfw against bare pyzmq baselines.")
    p.add_argument("--sync", type=int, metavar="N",
                   help=f"sync calls per system (default {DEFAULT_SYNC})")
    p.add_argument("--pipelined", type=int, metavar="N",
                   help=f"pipelined calls per system (default {DEFAULT_PIPELINED})")
    p.add_argument("--shared", type=int, metavar="N",
                   help=f"sync calls per thread in the {SHARED_THREADS}-thread shared-session case "
                        f"(default {DEFAULT_SHARED}; 0 leaves the case out)")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_SYNC} sync / {QUICK_PIPELINED} pipelined"
                        f" / {QUICK_SHARED} shared calls")
    p.add_argument("--repeat", type=int, default=1, metavar="R",
                   help="run the interleaved set R times, report each system's best run")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--strict", action="store_true", help="exit 2 when ipcfw misses a target")
    p.add_argument("--no-ipcfw", action="store_true", help="measure the bare systems only")
    p.add_argument("--role", choices=("echo-router", "forwarder", "echo-worker"),
                   help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    argv = list(argv)
    if argv[:1] == ["--"]:  # `ipcfw bench -- --quick`: the CLI may pass the separator through
        argv = argv[1:]
    args = p.parse_args(argv)
    quick = (QUICK_SYNC, QUICK_PIPELINED) if args.quick else (DEFAULT_SYNC, DEFAULT_PIPELINED)
    args.sync = args.sync if args.sync is not None else quick[0]
    args.pipelined = args.pipelined if args.pipelined is not None else quick[1]
    if args.shared is None:
        args.shared = QUICK_SHARED if args.quick else DEFAULT_SHARED
    if args.sync < 1 or args.pipelined < 1 or args.repeat < 1:
        p.error("--sync, --pipelined and --repeat must be at least 1")
    if args.shared < 0:
        p.error("--shared must be at least 0")
    if args.role and (not args.endpoint or (args.role == "forwarder" and not args.backend)):
        p.error("--role needs --endpoint (and --backend for the forwarder)")
    return args


@dataclass
class Outcome:
    results: dict[str, RunResult]
    runs: dict[str, list[RunResult]]
    failed: dict[str, str]
    notes: list[str] = field(default_factory=list)
    shared: SharedResult | None = None
    shared_runs: list[SharedResult] = field(default_factory=list)


def start_systems(
    children: Children, ctx: zmq.Context, workdir: Path, with_ipcfw: bool,
    shared_threads: int = 0,
) -> tuple[list[System], SharedCase | None, dict[str, str]]:
    systems = [System("bare-pingpong", *start_bare_pingpong(children, ctx, workdir)),
               System(BASELINE, *start_bare_forwarder(children, ctx, workdir))]
    failed: dict[str, str] = {}
    if not with_ipcfw:
        failed["ipcfw"] = "skipped (--no-ipcfw)"
        return systems, None, failed
    try:
        stack = start_ipcfw(children, workdir, shared_threads)
    except Unavailable as exc:
        failed["ipcfw"] = str(exc)
        if shared_threads:
            failed[SHARED_SYSTEM] = "the ipcfw stack is not available"
        return systems, None, failed
    systems.append(System("ipcfw", stack.client, stack.pids))
    if stack.shared_error is not None:
        failed[SHARED_SYSTEM] = stack.shared_error
    return systems, SharedCase(stack.shared) if stack.shared is not None else None, failed


def measure(systems: list[System], shared: SharedCase | None, failed: dict[str, str],
            args: argparse.Namespace) -> Outcome:
    for s in systems:
        _guarded(s, lambda s=s: warm_up(s, args.sync, args.pipelined), args.sync + args.pipelined)
    if shared is not None:
        warm = max(10, args.shared // 10)
        _guarded(shared, lambda: shared.runner.run(warm), warm * SHARED_THREADS)
    runs: dict[str, list[RunResult]] = {s.name: [] for s in systems}
    shared_runs: list[SharedResult] = []
    for _ in range(args.repeat):
        results = run_once(systems, args.sync, args.pipelined, shared, args.shared)
        for name, result in results.items():
            runs[name].append(result)
        if shared is not None and shared.error is None:
            shared_runs.append(summarize_shared(shared, results.get("ipcfw")))
    for s in systems:
        if s.error is not None:
            failed[s.name] = s.error
            runs.pop(s.name, None)
    if shared is not None and shared.error is not None:
        failed[SHARED_SYSTEM] = shared.error
        shared_runs = []
    results = {name: best_of(r) for name, r in runs.items()}
    best = best_shared(shared_runs) if shared_runs else None
    return Outcome(results, runs, failed, shared=best, shared_runs=shared_runs)


def close_clients(systems: list[System], shared: SharedCase | None = None) -> list[str]:
    """Close and forget every client (so a second call is a no-op); return what went wrong."""
    problems = []
    closers: list[tuple[str, Callable[[], None]]] = [(s.name, s.client.close) for s in systems]
    if shared is not None:
        closers.append((shared.name, shared.runner.close))
    systems.clear()
    for name, close in reversed(closers):
        try:
            with watchdog(2 * STOP_TIMEOUT):
                close()
        except Exception as exc:  # reported; the processes are stopped next anyway
            problems.append(f"{name}: closing the client raised {type(exc).__name__}: {exc}")
    return problems


def bench(args: argparse.Namespace, workdir: Path) -> Outcome:
    """Start everything, measure, and stop everything, whatever happens."""
    children = Children(workdir)
    ctx = zmq.Context()
    systems: list[System] = []
    shared: SharedCase | None = None
    try:
        systems, shared, failed = start_systems(
            children, ctx, workdir, with_ipcfw=not args.no_ipcfw,
            shared_threads=SHARED_THREADS if args.shared else 0)
        outcome = measure(systems, shared, failed, args)
        outcome.notes += close_clients(systems, shared)
        shared = None
        return outcome
    finally:
        close_clients(systems, shared)
        # We stop the kernel on purpose: the client runtime's "kernel has died" warning is noise.
        logging.getLogger(IPCFW_CLIENT_LOGGER).setLevel(logging.ERROR)
        children.stop_all()
        ctx.destroy(linger=0)


def _make_workdir() -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="ipcfw-bench-"))
    if len(f"ipc://{workdir}/bare-forwarder-worker") - len("ipc://") > zmq.IPC_PATH_MAX_LEN - 8:
        shutil.rmtree(workdir, ignore_errors=True)
        workdir = Path(tempfile.mkdtemp(prefix="ipcfw-bench-", dir="/tmp"))
    return workdir


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Make SIGTERM unwind like Ctrl-C, so ``finally`` blocks stop the children."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report(args: argparse.Namespace, outcome: Outcome) -> int:
    env = environment()
    print(format_header(env, args.sync, args.pipelined, args.repeat,
                        0 if args.no_ipcfw else args.shared))
    print()
    print(format_table(outcome.results, outcome.failed))
    print()
    if outcome.results:
        print(format_cpu(outcome.results))
        print()
    if outcome.shared is not None:
        print(format_shared(outcome.shared, args.shared))
        print()
    for name, reason in outcome.failed.items():
        print(f"{name}: NOT MEASURED: {reason}")
    for note in outcome.notes:
        print(f"note: {note}")
    v = verdicts(outcome.results)
    print(format_targets(v))
    if args.json:
        write_json(args.json, {
            "environment": env,
            "config": {"sync": args.sync, "pipelined": args.pipelined, "window": WINDOW,
                       "shared": args.shared, "shared_threads": SHARED_THREADS,
                       "repeat": args.repeat, "chunks": CHUNKS, "baseline": BASELINE,
                       "sync_target": SYNC_TARGET, "pipelined_target": PIPELINED_TARGET},
            "results": {n: asdict(r) for n, r in outcome.results.items()},
            "runs": {n: [asdict(r) for r in rs] for n, rs in outcome.runs.items()},
            "shared": None if outcome.shared is None else {
                **asdict(outcome.shared), "system": SHARED_SYSTEM,
                "vs_single": outcome.shared.vs_single,
                "runs": [asdict(r) for r in outcome.shared_runs]},
            "not_measured": outcome.failed,
            "notes": outcome.notes,
            "targets": v,
        })
    if ("ipcfw" in outcome.failed or SHARED_SYSTEM in outcome.failed) and not args.no_ipcfw:
        return 1
    return 2 if args.strict and not (v["sync_pass"] and v["pipelined_pass"]) else 0


def main(argv: Sequence[str]) -> int:
    """Entry point of ``ipcfw bench``; returns the process exit status."""
    args = parse_args(argv)
    if args.role:
        return _run_role(args)
    saved_kernel = os.environ.get("IPCFW_KERNEL")
    client_log = logging.getLogger(IPCFW_CLIENT_LOGGER)
    saved_log_level = client_log.level
    workdir = _make_workdir()
    try:
        with _sigterm_as_interrupt():
            outcome = bench(args, workdir)
        return _report(args, outcome)
    except KeyboardInterrupt:
        print("ipcfw bench: interrupted; all helper processes stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"ipcfw bench: a baseline failed, no results: {exc}", file=sys.stderr)
        return 1
    finally:
        if saved_kernel is None:
            os.environ.pop("IPCFW_KERNEL", None)
        else:
            os.environ["IPCFW_KERNEL"] = saved_kernel
        client_log.setLevel(saved_log_level)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
