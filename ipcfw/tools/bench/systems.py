"""Starting the systems: the bare baselines' helper processes and the ipcfw stack.

Every process is started and waited for by `ipcfw.testing` (the READY handshake on an inherited
pipe), so a helper that dies or hangs fails the start at once, with its exit status and its log.
The bench owns what it starts in a `Processes` and stops it all, whatever happens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from ... import errors
from ...client import RSession
from ...testing import Process, Stack, StartError, stop_processes
from .clients import (
    STOP_TIMEOUT,
    BareClient,
    BenchError,
    IpcfwClient,
    ManagersClient,
    PipeClient,
    SharedEcho,
    watchdog,
)
from .echo import SHARED_SERVER
from .roles import STARTUP_TIMEOUT, role_argv

ECHO_PLUGIN = "ipcfw.tools.bench.echo:EchoServer"
SHARED_PLUGIN = "ipcfw.tools.bench.echo:SharedEchoServer"


class Unavailable(Exception):
    """The ipcfw stack could not be started or measured; the bare numbers still stand."""


@dataclass
class Processes:
    """Every process the bench starts: the bare helpers, and the ipcfw stack once started.

    `stop` stops the ipcfw servers, then its kernel, then the helpers (newest first), each
    group with SIGTERM, a bounded wait and SIGKILL.
    """

    workdir: Path
    helpers: list[Process] = field(default_factory=list)
    stack: Stack | None = None

    def spawn(self, name: str, argv: list[str], *, ready: bool) -> Process:
        """Start a helper process, its output in ``workdir/NAME.log``."""
        process = Process(argv, self.workdir / f"{name}.log", name=name, ready=ready)
        self.helpers.append(process)
        return process

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop(STOP_TIMEOUT)
        stop_processes((p.popen for p in reversed(self.helpers)), STOP_TIMEOUT)
        for process in self.helpers:
            process.stop(0)  # reaped already: closes its ready pipe
        self.helpers.clear()


def _wait_ready(process: Process) -> None:
    try:
        process.wait_ready(STARTUP_TIMEOUT)
    except StartError as exc:
        raise BenchError(str(exc)) from None


def start_bare_pingpong(
    processes: Processes, ctx: zmq.Context[zmq.Socket[bytes]], workdir: Path,
) -> tuple[BareClient, dict[str, int]]:
    endpoint = f"ipc://{workdir}/pingpong"
    server = processes.spawn("bare-pingpong", role_argv("echo-router", endpoint), ready=True)
    _wait_ready(server)
    return BareClient(ctx, endpoint), {"server": server.pid}


def start_bare_forwarder(
    processes: Processes, ctx: zmq.Context[zmq.Socket[bytes]], workdir: Path,
) -> tuple[BareClient, dict[str, int]]:
    front, back = f"ipc://{workdir}/fwd-front", f"ipc://{workdir}/fwd-back"
    forwarder = processes.spawn(
        "bare-forwarder", role_argv("forwarder", front, "--backend", back), ready=True)
    worker = processes.spawn(
        "bare-forwarder-worker", role_argv("echo-worker", back), ready=False)
    _wait_ready(forwarder)  # the forwarder is ready once the worker has registered with it
    return BareClient(ctx, front), {"broker": forwarder.pid, "server": worker.pid}


def managers_address(workdir: Path) -> str:
    """Where the managers baseline's server listens (the fleet's managers clients connect)."""
    return str(workdir / "managers")


def start_managers(processes: Processes, workdir: Path) -> tuple[ManagersClient, dict[str, int]]:
    address = managers_address(workdir)
    server = processes.spawn("managers", role_argv("managers", address), ready=True)
    _wait_ready(server)
    return ManagersClient(address), {"server": server.pid}


def start_mp_pipe(processes: Processes, workdir: Path) -> tuple[PipeClient, dict[str, int]]:
    address = str(workdir / "mp-pipe")
    server = processes.spawn("mp-pipe", role_argv("mp-pipe", address), ready=True)
    _wait_ready(server)
    return PipeClient(address), {"server": server.pid}


@dataclass
class IpcfwStack:
    client: IpcfwClient
    pids: dict[str, int]
    direct: IpcfwClient | None = None
    """A second session to the same echo server, on the direct path (None if not granted)."""
    direct_error: str | None = None
    """The kernel ("broker") and the echo server ("server")."""
    shared: SharedEcho | None = None
    shared_error: str | None = None
    """Why the shared-session case is not available, when it was asked for."""


def _close_quietly(session: RSession) -> None:
    try:
        session.Close()
    except Exception:  # a half-made session: nothing useful to report
        pass


def _connect(stack: Stack, server: Process, name: str, path: str) -> RSession:
    """Wait until `server` is registered, then connect to `name` on `path`; raise Unavailable
    if not."""
    try:
        stack.wait_ready(server)
    except StartError as exc:
        raise Unavailable(str(exc)) from None
    session = RSession()
    try:
        with watchdog(STARTUP_TIMEOUT + 2):
            session.CreateSession(name, (1, 0, 0), message_slots=-1, path=path)
    except Exception as exc:
        _close_quietly(session)
        raise Unavailable(f"connecting to {name} raised {exc!r}\n{server.log_tail()}") from exc
    return session


def start_ipcfw(processes: Processes, workdir: Path, shared_threads: int = 0,
                kernel_options: tuple[str, ...] = ()) -> IpcfwStack:
    """Start kernel (with `kernel_options`) + echo server (+ the shared echo server), connect;
    raise Unavailable on any failure of the single-session stack. A failure of the shared case
    only is `shared_error`.

    Sets ``IPCFW_KERNEL`` in this process (``main`` restores it).
    """
    stack = processes.stack = Stack(workdir, timeout=STARTUP_TIMEOUT,
                                    kernel_options=kernel_options)
    os.environ["IPCFW_KERNEL"] = stack.endpoint
    try:
        kernel = stack.start()
    except StartError as exc:
        raise Unavailable(str(exc)) from None
    echo = stack.serve(ECHO_PLUGIN, wait=False, name="ipcfw-echo-server")
    if shared_threads:
        shared_server = stack.serve(SHARED_PLUGIN, wait=False, name="ipcfw-echo-shared-server")
    session = _connect(stack, echo, "echo", path="kernel")
    result = IpcfwStack(IpcfwClient(session), {"broker": kernel.pid, "server": echo.pid})
    try:
        result.direct = _start_direct(stack, echo)
    except Unavailable as exc:
        result.direct_error = str(exc)
    if shared_threads:
        try:
            result.shared = _start_shared(stack, shared_server, shared_threads)
        except Unavailable as exc:
            result.shared_error = str(exc)
    return result


def _start_direct(stack: Stack, server: Process) -> IpcfwClient:
    """A session to the same echo server on the direct path; Unavailable if the kernel did not
    grant it (it would silently be on the kernel path)."""
    before = stack.statistics()["sessions_direct"]
    session = _connect(stack, server, "echo", path="direct")
    if stack.statistics()["sessions_direct"] == before:
        _close_quietly(session)
        raise Unavailable("the kernel did not grant the direct path")
    return IpcfwClient(session)


def _start_shared(stack: Stack, server: Process, threads: int) -> SharedEcho:
    session = _connect(stack, server, SHARED_SERVER, path="kernel")
    try:
        session.ShareAuto()
    except (errors.IpcError, TimeoutError) as exc:
        _close_quietly(session)
        raise Unavailable(f"ShareAuto on the {SHARED_SERVER} session raised {exc!r}") from exc
    return SharedEcho(session, threads)
