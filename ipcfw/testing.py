"""Start, wait for and stop a kernel and servers: for your own tests, and for ipcfw's.

A `Stack` is a kernel on a private endpoint (a socket in a 0700 temporary directory) plus the
server plugins you host next to it, each in its own process started the way a user starts it
(``python -m ipcfw kernel``, ``python -m ipcfw serve module:Class``)::

    from ipcfw import RSession
    from ipcfw.testing import Stack

    def test_echo():
        with Stack() as stack:
            stack.serve("servers.echo:EchoServer")  # returns once "echo" is registered
            with RSession.connect("echo", endpoint=stack.endpoint) as session:
                assert session.SendReceive(1, (42,)) == 42

Readiness is one mechanism, not a log line or a retry loop: each child is started with
``--ready-fd N``, an inherited pipe on which it writes one line, ``READY``, once the kernel
listens or the server is registered (`ReadySignal` is the writing end). A child that exits
first closes the pipe, so a failed start is seen at once, not at a deadline. Every wait is
bounded, and a failure raises `StartError` with the child's exit status and the tail of its log.

Stopping is for sure: SIGTERM, one bounded wait shared by the group, then SIGKILL
(`stop_processes`); the servers go first, then the kernel. The processes run in sessions of
their own, so a Ctrl-C at the terminal reaches only the test runner, which stops them itself.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from .endpoint import IPC_PATH_MAX

__all__ = ["READY_LINE", "Process", "ReadySignal", "Stack", "StartError", "private_dir",
           "stop_processes"]

log = logging.getLogger(__name__)

READY_LINE = b"READY\n"
"""What a child writes on its ``--ready-fd`` pipe once it can serve."""
START_TIMEOUT = 15.0
"""Seconds a kernel or a server has to become ready."""
STOP_TIMEOUT = 5.0
"""Seconds a group of processes has to exit after SIGTERM, before SIGKILL."""
_POLL = 0.1  # seconds between checks of the kernel while a server starts


class StartError(RuntimeError):
    """A process did not become ready: it exited (the message gives its status) or the time
    ran out. The message ends with the tail of the process's log."""


def stop_processes(processes: Iterable[subprocess.Popen[bytes]], timeout: float) -> None:
    """Terminate every process still running, wait until `timeout` seconds have passed for all
    of them together, and kill (and reap) the ones still running then."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def private_dir(prefix: str = "ipcfw-") -> Path:
    """A new 0700 temporary directory whose path is short enough for ipc sockets in it (under
    ``/tmp`` when the default temporary directory's path is too long)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if len(str(path)) > IPC_PATH_MAX - 40:  # room for a socket name
        shutil.rmtree(path, ignore_errors=True)
        path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o700)
    return path


class ReadySignal(threading.Event):
    """The child's end of ``--ready-fd``: an Event whose first `set` also writes `READY_LINE`
    on `fd` and closes it (later ones, after a re-registration, only set the event).

    ``ipcfw kernel`` and ``ipcfw serve`` pass one to ``Kernel.run(ready)`` and
    ``ServerHost.run(ready)``; with `fd` None it is a plain Event. Raises ValueError if `fd`
    is not open.
    """

    def __init__(self, fd: int | None) -> None:
        super().__init__()
        self._fd = fd
        if fd is not None:
            try:
                os.set_inheritable(fd, False)  # not passed on to processes this one starts
            except OSError as exc:
                raise ValueError(f"file descriptor {fd} is not open: {exc.strerror}") from None

    def set(self) -> None:
        super().set()
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.write(fd, READY_LINE)
        except OSError as exc:  # the starter is gone or stopped waiting: nothing to tell
            log.debug("could not write READY on fd %d: %s", fd, exc)
        finally:
            os.close(fd)


class Process:
    """A child process with its output (stdout and stderr) in a log file.

    With ``ready=True`` the child gets ``--ready-fd N`` appended to `argv` and `wait_ready`
    waits for its READY line. `stop` (SIGTERM, a bounded wait, SIGKILL) is for sure.
    """

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        *,
        name: str | None = None,
        ready: bool = False,
    ) -> None:
        self.name = name or Path(log_path).stem
        self.log_path = Path(log_path)
        self._ready_fd: int | None = None
        self.ready = False
        """True once the process wrote READY."""
        pass_fds: tuple[int, ...] = ()
        argv = list(argv)
        if ready:
            self._ready_fd, write_end = os.pipe()
            argv += ["--ready-fd", str(write_end)]
            pass_fds = (write_end,)
        self.argv = argv
        try:
            with open(self.log_path, "wb") as log_file:
                # A session of its own: a Ctrl-C at the terminal reaches only this process.
                self.popen: subprocess.Popen[bytes] = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    env=None if env is None else dict(env), cwd=cwd, pass_fds=pass_fds,
                    start_new_session=True,
                )
        except BaseException:
            self._close_ready()
            raise
        finally:
            for fd in pass_fds:
                os.close(fd)

    def __repr__(self) -> str:
        state = "running" if self.alive() else f"exited {self.popen.returncode}"
        return f"<Process {self.name} pid {self.pid} {state}>"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status, None while it runs (negative: the signal that ended it)."""
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        """Everything the process has written so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        """The last `lines` lines of the log, indented, for error messages."""
        text = self.log().rstrip()
        if not text:
            return "    (empty log)"
        return "\n".join(f"    | {line}" for line in text.splitlines()[-lines:])

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """Send `signum` (default SIGKILL) if the process still runs."""
        if self.alive():
            os.kill(self.popen.pid, signum)

    def wait_ready(self, timeout: float = START_TIMEOUT, also: Process | None = None) -> None:
        """Return once the process wrote READY on its ``--ready-fd`` pipe. Raise `StartError`
        if it exits first, if `also` (its kernel, say) exits meanwhile, or after `timeout`."""
        fd = self._ready_fd
        if self.ready:
            return
        if fd is None:
            raise ValueError(f"{self.name} was not started with ready=True")
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StartError(f"{self.name} not ready within {timeout:.0f} s\n{self.log_tail()}")
            if also is not None and not also.alive():
                raise also.exited("while " + self.name + " started")
            if _readable(fd, min(remaining, _POLL)):
                chunk = os.read(fd, len(READY_LINE))
                if not chunk:
                    self._close_ready()
                    raise self.exited("before it was ready", wait=1.0)
                line += chunk
        self._close_ready()
        if line != READY_LINE:
            raise StartError(f"{self.name} wrote {line!r} on its ready pipe\n{self.log_tail()}")
        self.ready = True

    def exited(self, when: str, wait: float = 0.0) -> StartError:
        """The error for a process that has ended (or closed its ready pipe) `when`."""
        try:
            status: int | str | None = self.popen.wait(wait)
        except subprocess.TimeoutExpired:
            status = "unknown (it closed its ready pipe but still runs)"
        return StartError(f"{self.name} exited with status {status} {when}\n{self.log_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait up to `timeout`, then SIGKILL; returns the exit status."""
        stop_processes([self.popen], timeout)
        self._close_ready()
        return self.popen.returncode

    def _close_ready(self) -> None:
        fd, self._ready_fd = self._ready_fd, None
        if fd is not None:
            os.close(fd)


def _readable(fd: int, timeout: float) -> bool:
    """Whether `fd` has data or its end of file within `timeout` seconds (poll, not select:
    a long test process may hold descriptors beyond select's 1024)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


class Stack:
    """A kernel on a private endpoint and the servers hosted next to it, stopped for sure.

    `workdir` holds the kernel's socket and every process's log; by default a new private
    directory, removed by `stop`. A given `workdir` must be private (0700) and is kept.
    `kernel_options` are added to ``ipcfw kernel`` (e.g. ``("--max-backlog", "2000")``);
    `env` is added to this process's environment for the children, and `env` always holds
    ``IPCFW_KERNEL`` = `endpoint`; `cwd` is the children's working directory.

    Use it as a context manager (``with Stack() as stack:``), or call `start` and `stop`. Pass
    ``endpoint=stack.endpoint`` to ``RSession.connect``, or set ``IPCFW_KERNEL`` to it.

    A stack not used as a context manager must be stopped (``try: ... finally:
    stack.stop()``): nothing else stops it. Its processes run in sessions of their own, so
    neither a Ctrl-C nor this process's exit ends them, and its directory stays.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        kernel_options: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        log_level: str | None = None,
        timeout: float = START_TIMEOUT,
    ) -> None:
        self._owns_workdir = workdir is None
        self.workdir = private_dir() if workdir is None else Path(workdir)
        self.endpoint = f"ipc://{self.workdir}/kernel"
        self.kernel_options = tuple(kernel_options)
        self.env = {**os.environ, **(env or {}), "IPCFW_KERNEL": self.endpoint}
        self.cwd = cwd
        self.log_level = log_level
        self.timeout = timeout
        self.kernel: Process | None = None
        """The running kernel (`restart` replaces it)."""
        self._kernels: list[Process] = []
        self.servers: list[Process] = []
        self.processes: list[Process] = []
        """Every process started, in order (the kernel, servers, clients)."""

    def __repr__(self) -> str:
        return f"<Stack {self.endpoint} kernel={self.kernel} servers={len(self.servers)}>"

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def ipcfw_argv(self, *args: str) -> list[str]:
        """``python -m ipcfw [--log-level L] ARGS``."""
        level = ["--log-level", self.log_level] if self.log_level else []
        return [sys.executable, "-m", "ipcfw", *level, *args]

    def spawn(
        self, argv: Sequence[str], name: str, *, ready: bool = False,
        cwd: str | Path | None = None, env: Mapping[str, str] | None = None,
    ) -> Process:
        """Start `argv` with the stack's environment (and `env` over it), its log in
        ``workdir/NAME-N.log``; it is stopped by `stop`. ``ready=True`` passes ``--ready-fd``
        (see `Process.wait_ready`)."""
        log_path = self.workdir / f"{name}-{len(self.processes)}.log"
        process = Process(argv, log_path, {**self.env, **(env or {})},
                          cwd if cwd is not None else self.cwd, name=name, ready=ready)
        self.processes.append(process)
        return process

    def start(self) -> Process:
        """Start the kernel and return once it listens (`StartError` if it does not)."""
        if self.kernel is not None and self.kernel.alive():
            raise RuntimeError(f"the kernel of {self} is already running")
        argv = self.ipcfw_argv("kernel", "--endpoint", self.endpoint, *self.kernel_options)
        self.kernel = self.spawn(argv, "kernel", ready=True)
        self._kernels.append(self.kernel)
        self.kernel.wait_ready(self.timeout)
        return self.kernel

    def restart(self) -> Process:
        """SIGKILL the kernel and start a new one on the same endpoint (servers hosted with
        ``ipcfw serve`` register again with it on their own)."""
        if self.kernel is not None:
            self.kernel.kill()
            self.kernel.popen.wait(self.timeout)
        return self.start()

    def serve(self, plugin: str, *args: str, wait: bool = True, name: str = "serve") -> Process:
        """Host `plugin` (``module:Class``) with ``ipcfw serve`` and extra `args` (e.g.
        ``"--overlay", "m:Overlay"``); return once it is registered, or at once with
        ``wait=False`` (then call `wait_ready`)."""
        argv = self.ipcfw_argv("serve", plugin, "--endpoint", self.endpoint, *args)
        server = self.spawn(argv, name, ready=True)
        self.servers.append(server)
        if wait:
            self.wait_ready(server)
        return server

    def wait_ready(self, server: Process) -> None:
        """Return once `server` is registered; `StartError` if it or the kernel exits first,
        or after the stack's timeout."""
        server.wait_ready(self.timeout, also=self.kernel)

    def statistics(self) -> dict[str, int]:
        """The kernel's counters (``ipcfw.kernel_statistics``)."""
        from .client import kernel_statistics

        return kernel_statistics(self.endpoint)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Close this process's client runtime for the endpoint (its sessions become
        unusable), stop every other process, then the kernel (each group: SIGTERM, at most
        `timeout` seconds, SIGKILL); remove the workdir if the stack made it.

        If stopping the others is interrupted (a KeyboardInterrupt during the wait), those
        still running are killed, and the kernel is stopped and the workdir removed all the
        same."""
        self._close_client_runtime()
        others = [p for p in reversed(self.processes) if p not in self._kernels]
        try:
            _stop_group(others, timeout)
        finally:
            try:
                _stop_group(self._kernels, timeout)
            finally:
                if self._owns_workdir:
                    shutil.rmtree(self.workdir, ignore_errors=True)

    def _close_client_runtime(self) -> None:
        """So that the kernel's exit is not reported (and logged) as a death."""
        from .client.runtime import Runtime

        try:
            Runtime.shutdown(self.endpoint)
        except Exception:  # best effort: the processes are what must go
            log.exception("closing the client runtime for %s", self.endpoint)


def _stop_group(group: Sequence[Process], timeout: float) -> None:
    """Stop `group` together (`stop_processes`), then close their ready pipes; if the wait
    is interrupted, SIGKILL (and reap) those still running."""
    try:
        stop_processes((p.popen for p in group), timeout)
    finally:
        for process in group:
            process.stop(0)  # reaped already, or (interrupted) killed now; closes its pipe
