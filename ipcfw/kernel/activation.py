"""Activation on demand: the service table and its rules (``ipcfw kernel --services DIR``). No I/O.

Theory of operation
-------------------
A service file (``DIR/NAME.toml``, parsed here by `parse_service`) tells the kernel how to start
the server registered as NAME. `Activations` holds one `Activation` per service and decides,
from the inputs `KernelState` gives it, when a server is started, when the connects held for it
proceed or fail, and when an idle one is told to end. `ipcfw.kernel.spawner` does the I/O: it
runs the command, reads its output, reports its exit, kills it. Times come in as arguments (the
loop's clock); nothing here reads a clock.

Rules:

1. A connect (or an `AwaitServer`) for a name that is not registered, or whose registration is
   ending, but has a service, is held here (the waits stay in the kernel's own table). Once
   the name is free, the kernel asks `want`, which starts the server (`Spawn`) unless a
   process of its service runs: concurrent connects start it exactly once. At most `MAX_HELD`
   connects per channel are held at once.
2. Phases: ACTIVATABLE (no process) -> STARTING (started, not registered) -> RUNNING (its name
   registered) -> STOPPING (its registration ended, or it was told to end) -> ACTIVATABLE (its
   process exited). A registration of the name while STARTING, by anyone, makes it RUNNING.
3. Registered: the held connects proceed as if just received (`registered` returns them).
4. The process exited before registering: the held connects and waits fail with KErrNotFound;
   it did not register within `start_timeout`: it is killed (`Kill`), and once it has exited
   they fail with KErrTimedOut. Either text names the service file, the exit status and the
   last lines of the server's output.
5. Idle exit: a RUNNING server with `idle_exit` that has had no session for that many seconds
   is told to end (the kernel's termination, reason IDLE) and becomes STOPPING. A STOPPING
   process has `STOP_GRACE` seconds to exit, then it is killed. Connects that arrive while it
   stops are held, and once it has exited a new one is started for them.
6. A service whose start failed is not started again at once: after its n-th failed start in a
   row the connects and waits that come within `restart_delay(n)` seconds (1 s, doubling, at
   most `RESTART_DELAY_MOST`) fail at once with the last failure's error, saying when it may be
   started again. A registration clears the count. (A crashing server cannot make the kernel
   fork in a loop at any client's asking.)
"""

from __future__ import annotations

import enum
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from collections.abc import Iterable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover (Python 3.10)
    import tomli as tomllib

from .. import errors
from ..naming import lookup_key, name_problem
from ..protocol import ACTIVATABLE_ROWS, Connect, error_text

__all__ = [
    "DEFAULT_START_TIMEOUT", "STOP_GRACE", "RESTART_DELAY_MOST", "restart_delay", "MAX_HELD",
    "MAX_SERVICES", "SERVICE_SUFFIX",
    "ServiceFileError", "Service", "parse_service", "Phase", "Spawn", "Kill", "Failure",
    "Activations",
]

#: Seconds a started server has to register, when its file gives no ``start_timeout``.
DEFAULT_START_TIMEOUT = 10.0
#: Seconds a server told to end (or whose registration ended) has to exit before it is killed.
STOP_GRACE = 5.0
#: The longest wait before a service that keeps failing to start is started again (rule 6).
RESTART_DELAY_MOST = 30.0


def restart_delay(failures: int) -> float:
    """Seconds before a service is started again after `failures` failed starts in a row."""
    return min(2.0 ** (failures - 1), RESTART_DELAY_MOST) if failures else 0.0
#: Connects one channel may have held at once while servers start (KErrOverflow past it).
MAX_HELD = 16
#: Service files one directory may hold (the kernel refuses to start with more).
MAX_SERVICES = ACTIVATABLE_ROWS
#: A service file's name: the server's name and this suffix.
SERVICE_SUFFIX = ".toml"
#: Characters of a server's output an error text quotes, at most (its last lines).
_TAIL_CHARS = 600

_KEYS = ("command", "working_directory", "environment", "start_timeout", "idle_exit")


class ServiceFileError(ValueError):
    """A service file the kernel cannot use: the message names the file, the key (if one is
    at fault) and what was wrong."""

    def __init__(self, source: str, key: str | None, problem: str) -> None:
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")
        self.source, self.key, self.problem = source, key, problem


@dataclass(frozen=True)
class Service:
    """How to start the server registered as `name` (one service file)."""

    name: str
    command: tuple[str, ...]
    source: str  # the file it came from, for messages
    working_directory: str | None = None  # None: the kernel's
    environment: tuple[tuple[str, str], ...] = ()  # added to the kernel's environment
    start_timeout: float = DEFAULT_START_TIMEOUT
    idle_exit: float | None = None  # None: it runs until it ends by itself or the kernel stops


def parse_service(name: str, text: str, source: str) -> Service:
    """The `Service` for server `name` described by TOML `text` (read from `source`).

    Raises `ServiceFileError` naming `source`, the key and the problem: TOML that does not
    parse, an unknown key, a missing or empty ``command``, a value of the wrong type, a
    timeout that is not a positive number, or a file name that is not a server name.
    """
    problem = name_problem(name)
    if problem:
        raise ServiceFileError(
            source, None, f"the file's name must be the server's name: {problem}")
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ServiceFileError(source, None, f"not valid TOML: {exc}") from None
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        raise ServiceFileError(source, unknown[0], f"unknown key (the keys are {', '.join(_KEYS)})")
    if "command" not in table:
        raise ServiceFileError(source, "command", "missing: the command that starts the server")
    return Service(
        name=name,
        command=_command(source, table["command"]),
        source=source,
        working_directory=_optional_str(source, "working_directory", table),
        environment=_environment(source, table.get("environment", {})),
        start_timeout=_seconds(source, "start_timeout", table) or DEFAULT_START_TIMEOUT,
        idle_exit=_seconds(source, "idle_exit", table),
    )


def _command(source: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            words = shlex.split(value)
        except ValueError as exc:
            raise ServiceFileError(
                source, "command", f"cannot be split into words: {exc}") from None
    elif isinstance(value, list) and all(isinstance(word, str) for word in value):
        words = list(value)
    else:
        raise ServiceFileError(
            source, "command", f"must be a list of strings or a string, got {_shown(value)}")
    if not words or not words[0]:
        raise ServiceFileError(source, "command", "is empty")
    return tuple(words)


def _optional_str(source: str, key: str, table: dict[str, Any]) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ServiceFileError(source, key, f"must be a non-empty string, got {_shown(value)}")
    return value


def _environment(source: str, value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ServiceFileError(
            source, "environment", f"must be a table of strings, got {_shown(value)}")
    pairs = []
    for key, item in value.items():
        if not key or "=" in key or "\0" in key:
            raise ServiceFileError(
                source, f"environment.{key}", "is not a variable name (empty, or holds = or NUL)")
        if not isinstance(item, str) or "\0" in item:
            raise ServiceFileError(
                source, f"environment.{key}", f"must be a string, got {_shown(item)}")
        pairs.append((key, item))
    return tuple(pairs)


def _seconds(source: str, key: str, table: dict[str, Any]) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if type(value) not in (int, float) or not 0 < value < 1e9:
        raise ServiceFileError(
            source, key, f"must be a number of seconds above 0, got {_shown(value)}")
    return float(value)


def _shown(value: object) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)
    return f"{kind} ({value!r})" if not isinstance(value, (list, dict)) else kind


# -- the rules ---------------------------------------------------------------------------------


class Phase(enum.Enum):
    """Where a service's server is (rule 2); the value is what ``ipcfw ps`` shows."""

    ACTIVATABLE = "activatable"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


class Spawn(NamedTuple):
    """Start `service`'s command; report its exit with ``KernelState.service_exited``."""

    service: Service


class Kill(NamedTuple):
    """Kill the process started for the service of name key `key` (SIGKILL); its exit is then
    reported as any other."""

    key: str


class Failure(NamedTuple):
    """A start that failed (rule 4): what the connects and waits held for it are answered."""

    code: int
    text: str
    held: list[tuple[bytes, Connect]]


@dataclass(eq=False)
class Activation:
    service: Service
    phase: Phase = Phase.ACTIVATABLE
    deadline: float | None = None  # STARTING: the start timeout; STOPPING: the kill
    killed: bool = False  # Kill asked, since the last start
    timed_out: bool = False  # killed for not registering in time
    idle_since: float | None = None  # RUNNING with no session since then
    held: list[tuple[bytes, Connect]] = field(default_factory=list)
    starts: int = 0
    failures: int = 0  # failed starts in a row (rule 6)
    retry_at: float = 0.0  # not started again before this time
    last_failure: tuple[int, str] | None = None  # the last failed start's code and text


class Activations:
    """The services by name key, and the rules above. Each method takes what happened (and
    `now`, the loop's clock) and returns what to do."""

    def __init__(self, services: Iterable[Service] = ()) -> None:
        self.by_key: dict[str, Activation] = {}
        for service in services:
            key = lookup_key(service.name)
            other = self.by_key.get(key)
            if other is not None:
                raise ServiceFileError(
                    service.source, None,
                    f"names the same server as {other.service.source} (names are "
                    "case-insensitive)")
            self.by_key[key] = Activation(service)
        self.held_per_channel: dict[bytes, int] = {}
        self.timed: set[str] = set()  # keys with a deadline or an idle timer

    def __bool__(self) -> bool:
        return bool(self.by_key)

    def get(self, key: str) -> Activation | None:
        return self.by_key.get(key)

    def can_hold(self, rid: bytes) -> bool:
        return self.held_per_channel.get(rid, 0) < MAX_HELD

    def hold(self, key: str, rid: bytes, connect: Connect) -> None:
        """A connect for `key` waits for its server (rule 1); `want` starts it."""
        self.by_key[key].held.append((rid, connect))
        self.held_per_channel[rid] = self.held_per_channel.get(rid, 0) + 1

    def refusal(self, key: str, now: float) -> Failure | None:
        """Rule 6: if `key`'s service failed to start lately and may not be started again yet,
        the failure its waiting connects are answered with (they are taken); else None."""
        activation = self.by_key[key]
        if (activation.phase is not Phase.ACTIVATABLE or activation.last_failure is None
                or now >= activation.retry_at):
            return None
        code, text = activation.last_failure
        again = (f"server {activation.service.name!r} is not started again for "
                 f"{activation.retry_at - now:.1f} s: its last {activation.failures} "
                 f"start{'s' if activation.failures != 1 else ''} failed. The last: {text}")
        return Failure(code, error_text(again), self._take_held(activation))

    def want(self, key: str, now: float) -> list[Spawn]:
        """Someone waits for `key`, which is not registered: start its server unless a process
        of it runs (the kernel calls this again when that process has exited)."""
        activation = self.by_key[key]
        if activation.phase is not Phase.ACTIVATABLE:
            return []
        activation.phase = Phase.STARTING
        activation.deadline = now + activation.service.start_timeout
        activation.killed = activation.timed_out = False
        activation.starts += 1
        self.timed.add(key)
        return [Spawn(activation.service)]

    def drop_channel(self, rid: bytes) -> None:
        """A channel went: the connects it had held are forgotten."""
        if self.held_per_channel.pop(rid, None) is None:
            return
        for activation in self.by_key.values():
            if activation.held:
                activation.held = [(r, c) for r, c in activation.held if r != rid]

    def _take_held(self, activation: Activation) -> list[tuple[bytes, Connect]]:
        held, activation.held = activation.held, []
        for rid, _ in held:
            left = self.held_per_channel[rid] - 1
            if left:
                self.held_per_channel[rid] = left
            else:
                del self.held_per_channel[rid]
        return held

    def registered(self, key: str, now: float) -> list[tuple[bytes, Connect]]:
        """The name `key` was registered (rule 3): the held connects, to proceed."""
        activation = self.by_key[key]
        if activation.phase is Phase.STARTING and not activation.killed:
            activation.phase = Phase.RUNNING
            activation.deadline = None
            activation.idle_since = now if activation.service.idle_exit is not None else None
            activation.failures, activation.last_failure = 0, None
            self._retime(key, activation)
        return self._take_held(activation)

    def released(self, key: str, now: float) -> None:
        """The name's registration ended (its server deregistered, was terminated or died)."""
        activation = self.by_key[key]
        if activation.phase is Phase.RUNNING:
            activation.phase = Phase.STOPPING
            activation.deadline = now + STOP_GRACE
            activation.idle_since = None
            self._retime(key, activation)

    def busy(self, key: str) -> None:
        """The name's server has a session again."""
        activation = self.by_key[key]
        if activation.idle_since is not None:
            activation.idle_since = None
            self._retime(key, activation)

    def idle(self, key: str, now: float) -> None:
        """The name's server has no session left."""
        activation = self.by_key[key]
        if activation.phase is Phase.RUNNING and activation.service.idle_exit is not None:
            activation.idle_since = now
            self.timed.add(key)

    def exited(self, key: str, status: str, tail: str, now: float) -> Failure | None:
        """The process started for `key` exited (`status` says how, `tail` is the end of its
        output): the start that failed, if it had not registered (rule 4; rule 6 counts it).
        Connects still held (rule 5) wait for the kernel's next `want`."""
        activation = self.by_key[key]
        phase, activation.phase = activation.phase, Phase.ACTIVATABLE
        activation.deadline = activation.idle_since = None
        self.timed.discard(key)
        if phase is not Phase.STARTING:
            return None
        failure = self._failure(activation, status, tail)
        activation.failures += 1
        activation.retry_at = now + restart_delay(activation.failures)
        activation.last_failure = (failure.code, failure.text)
        return failure

    def _failure(self, activation: Activation, status: str, tail: str) -> Failure:
        service = activation.service
        command = shlex.join(service.command)
        if activation.timed_out:
            code = errors.KErrTimedOut
            what = (f"server {service.name!r} did not register within "
                    f"{service.start_timeout:g} s of its start, and was killed")
        else:
            code = errors.KErrNotFound
            what = f"server {service.name!r} {status} before it registered"
        output = tail.strip()
        if len(output) > _TAIL_CHARS:
            output = "..." + output[-_TAIL_CHARS:]
        said = f"; its output ended:\n{output}" if output else "; it wrote nothing"
        text = f"{what} (started by {service.source}: {command}){said}"
        return Failure(code, error_text(text), self._take_held(activation))

    def due(self, now: float) -> tuple[list[Kill], list[str]]:
        """What the time `now` calls for: processes to kill (a start that took too long, a
        stop that took too long), and the names whose idle servers must be told to end."""
        kills: list[Kill] = []
        idle: list[str] = []
        for key in sorted(self.timed):
            activation = self.by_key[key]
            if activation.deadline is not None and now >= activation.deadline:
                activation.deadline = None
                if not activation.killed:
                    activation.killed = True
                    activation.timed_out = activation.phase is Phase.STARTING
                    kills.append(Kill(key))
            elif (activation.idle_since is not None and activation.service.idle_exit is not None
                  and now >= activation.idle_since + activation.service.idle_exit):
                activation.phase = Phase.STOPPING
                activation.idle_since = None
                activation.deadline = now + STOP_GRACE
                idle.append(key)
            self._retime(key, activation)
        return kills, idle

    def next_deadline(self) -> float | None:
        """When `due` next has something to do (None: nothing is timed)."""
        times = []
        for key in self.timed:
            activation = self.by_key[key]
            if activation.deadline is not None:
                times.append(activation.deadline)
            if activation.idle_since is not None and activation.service.idle_exit is not None:
                times.append(activation.idle_since + activation.service.idle_exit)
        return min(times, default=None)

    def _retime(self, key: str, activation: Activation) -> None:
        if activation.deadline is None and activation.idle_since is None:
            self.timed.discard(key)
        else:
            self.timed.add(key)

    def listing(self) -> list[tuple[str, str]]:
        """(name, phase) of every service, by name."""
        return sorted(
            ((a.service.name, a.phase.value) for a in self.by_key.values()),
            key=lambda row: lookup_key(row[0]),
        )
