"""Activation's I/O: reading a services directory, and running the servers the kernel starts.

`load_services` reads ``DIR/*.toml`` (each parsed by `ipcfw.kernel.activation.parse_service`)
and checks what only the OS can say: that the working directory exists and the command's
program can be run. `Spawner` starts a service's command (`Spawn`), with ``IPCFW_KERNEL`` set to
the kernel's endpoint and ``IPCFW_ACTIVATED`` to the server's name; its output (stdout and
stderr, one pipe) is read as it comes, logged line by line, and its last lines kept for the
error text of a start that fails. Its exit is seen through a pidfd in the kernel's poller (no
SIGCHLD handler, so no signal races the loop) and reaped then; `kill` sends SIGKILL, and
`stop_all`, when the kernel stops, ends every process it started: SIGTERM, a bounded wait,
SIGKILL.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import NamedTuple
from collections.abc import Callable

from .activation import MAX_SERVICES, SERVICE_SUFFIX, Service, ServiceFileError, parse_service

log = logging.getLogger(__name__)

#: Set (to the server's name) in the environment of each server the kernel starts: ``ipcfw
#: serve`` then exits when its kernel dies instead of registering with the next one.
ACTIVATED_ENV = "IPCFW_ACTIVATED"
#: Seconds the servers the kernel started have to exit after SIGTERM when the kernel stops.
SERVERS_STOP_TIMEOUT = 3.0
_TAIL_LINES = 12  # lines of a server's output kept for the error of a failed start
_LINE_CHARS = 400  # characters kept of each
_READ = 65536


def load_services(directory: str) -> list[Service]:
    """Every service in `directory` (one ``NAME.toml`` per server name). Raises
    `ServiceFileError` naming the directory or the file, the key and what was wrong."""
    try:
        entries = sorted(os.listdir(directory))
    except OSError as exc:
        raise ServiceFileError(directory, None, f"cannot read the services directory: "
                                                f"{exc.strerror}") from None
    files = [e for e in entries if e.endswith(SERVICE_SUFFIX) and not e.startswith(".")]
    if len(files) > MAX_SERVICES:
        raise ServiceFileError(directory, None, f"holds {len(files)} service files, more than "
                                                f"the {MAX_SERVICES} a kernel takes")
    services = []
    for entry in files:
        path = os.path.join(directory, entry)
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ServiceFileError(path, None, f"cannot be read: {exc}") from None
        service = parse_service(entry[: -len(SERVICE_SUFFIX)], text, path)
        services.append(_checked(service, directory))
    return services


def _checked(service: Service, directory: str) -> Service:
    """`service` with its working directory made absolute (a relative one is taken from the
    services directory), once the directory and the command's program are found."""
    cwd = service.working_directory
    if cwd is not None:
        cwd = os.path.abspath(os.path.join(directory, os.path.expanduser(cwd)))
        if not os.path.isdir(cwd):
            raise ServiceFileError(service.source, "working_directory",
                                   f"{cwd!r} is not a directory")
        service = dataclasses.replace(service, working_directory=cwd)
    program = service.command[0]
    if program == "ipcfw":
        return service  # the kernel's own (see `command_of`)
    if os.sep in program:
        found = os.path.join(cwd or os.getcwd(), program)
        if not (os.path.isfile(found) and os.access(found, os.X_OK)):
            raise ServiceFileError(service.source, "command",
                                   f"{found!r} is not an executable file")
        return service
    search = dict(service.environment).get("PATH", os.environ.get("PATH", os.defpath))
    if shutil.which(program, path=search) is None:
        raise ServiceFileError(service.source, "command",
                               f"{program!r} is not found on the PATH ({search})")
    return service


def command_of(service: Service) -> list[str]:
    """The argv that runs `service`: a command whose first word is ``ipcfw`` runs this
    kernel's own ipcfw (``sys.executable -m ipcfw``), which speaks its protocol, PATH or not."""
    command = list(service.command)
    if command[0] == "ipcfw":
        return [sys.executable, "-m", "ipcfw", *command[1:]]
    return command


class Exit(NamedTuple):
    """A started server's process ended: how (`status`), and the end of its output."""

    name: str
    status: str
    tail: str


class _Child:
    def __init__(self, service: Service, popen: subprocess.Popen[bytes], pidfd: int) -> None:
        self.service = service
        self.popen = popen
        self.pidfd = pidfd
        assert popen.stdout is not None  # (stdout=PIPE)
        self.output: int | None = popen.stdout.fileno()
        self.partial = b""
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)

    def read(self) -> None:
        """Read what its output pipe holds, logging each whole line."""
        fd = self.output
        if fd is None:
            return
        while True:
            try:
                chunk = os.read(fd, _READ)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("reading the output of %r: %s", self.service.name, exc)
                chunk = b""
            if not chunk:
                self.close_output()
                return
            *lines, self.partial = (self.partial + chunk).split(b"\n")
            for line in lines:
                self.line(line)

    def line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        log.info("%s[%d]: %s", self.service.name, self.popen.pid, text)
        self.tail.append(text[:_LINE_CHARS])

    def close_output(self) -> None:
        if self.partial:
            self.line(self.partial)
            self.partial = b""
        self.output = None
        assert self.popen.stdout is not None
        self.popen.stdout.close()


class Spawner:
    """The processes the kernel started, by the lookup key of their server's name. `watch`
    and `unwatch` add a file descriptor to the kernel's poller and take it out."""

    def __init__(self, endpoint: str, watch: Callable[[int], None],
                 unwatch: Callable[[int], None]) -> None:
        self.endpoint = endpoint
        self._watch, self._unwatch = watch, unwatch
        self.children: dict[str, _Child] = {}
        self._by_fd: dict[int, tuple[str, _Child]] = {}

    def owns(self, fd: object) -> bool:
        return fd in self._by_fd

    def spawn(self, key: str, service: Service) -> Exit | None:
        """Start `service`'s command; an `Exit` if it could not be started at all."""
        env = {**os.environ, **dict(service.environment),
               "IPCFW_KERNEL": self.endpoint, ACTIVATED_ENV: service.name}
        argv = command_of(service)
        try:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                cwd=service.working_directory, env=env, start_new_session=True,
            )
        except OSError as exc:
            log.error("could not start server %r (%s): %s", service.name, service.source, exc)
            return Exit(service.name, f"could not be started ({exc})", "")
        try:
            pidfd = os.pidfd_open(popen.pid)
        except OSError as exc:  # (out of descriptors): a child we cannot watch is not kept
            popen.kill()
            popen.wait()
            if popen.stdout is not None:
                popen.stdout.close()
            log.error("could not watch server %r (%s): %s", service.name, service.source, exc)
            return Exit(service.name, f"could not be watched ({exc}); it was stopped", "")
        child = _Child(service, popen, pidfd)
        assert child.output is not None
        os.set_blocking(child.output, False)
        self.children[key] = child
        for fd in (pidfd, child.output):
            self._by_fd[fd] = (key, child)
            self._watch(fd)
        log.info("started server %r: pid %d, %s (%s)", service.name, popen.pid, " ".join(argv),
                 service.source)
        return None

    def ready(self, fd: int) -> Exit | None:
        """`fd` (a pidfd or an output pipe of ours) is readable: the `Exit` if a process
        ended (it is reaped, and its output read to what is there)."""
        key, child = self._by_fd[fd]
        if fd != child.pidfd:
            child.read()
            if child.output is None:
                self._forget_fd(fd)
            return None
        if child.output is not None:
            output = child.output
            child.read()  # what it wrote before it ended (a child of its may hold the pipe)
            if child.output is not None:
                child.close_output()
            self._forget_fd(output)
        self._forget_fd(fd)
        os.close(fd)
        del self.children[key]
        code = child.popen.wait()  # (the pidfd says it has exited: this does not block)
        status = (f"exited with status {code}" if code >= 0
                  else f"was killed by {_signal_name(-code)}")
        log.log(logging.INFO if code == 0 else logging.WARNING,
                "server %r (pid %d) %s", child.service.name, child.popen.pid, status)
        return Exit(child.service.name, status, "\n".join(child.tail))

    def _forget_fd(self, fd: int) -> None:
        del self._by_fd[fd]
        self._unwatch(fd)

    def kill(self, key: str) -> None:
        """SIGKILL the process started for `key`, if it still runs (its exit comes as usual)."""
        child = self.children.get(key)
        if child is not None and child.popen.returncode is None:
            log.warning("killing server %r (pid %d)", child.service.name, child.popen.pid)
            child.popen.kill()  # (not reaped until its pidfd fires: the pid cannot be reused)

    def stop_all(self, timeout: float = SERVERS_STOP_TIMEOUT) -> None:
        """The kernel stops: SIGTERM every process it started, wait up to `timeout` seconds
        for them together (reading their output meanwhile, so that none blocks writing its
        last lines), SIGKILL those still running, and reap them all."""
        children = list(self.children.values())
        self.children.clear()
        for child in children:
            log.info("stopping server %r (pid %d)", child.service.name, child.popen.pid)
            child.popen.terminate()
        deadline = time.monotonic() + timeout
        running = list(children)
        while running and time.monotonic() < deadline:
            for child in running:
                child.read()
            running = [child for child in running if child.popen.poll() is None]
            if running:
                time.sleep(0.01)
        for child in running:
            log.warning("server %r (pid %d) did not stop within %g s: killed",
                        child.service.name, child.popen.pid, timeout)
            child.popen.kill()
        for child in children:
            child.popen.wait()
            child.read()
            if child.output is not None:
                child.close_output()
            os.close(child.pidfd)
        self._by_fd.clear()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
