"""Several client processes at once: the aggregate sync calls/s of a server's many clients.

Each client process (``python -m ipcfw.tools.bench.fleet``) holds its own client of one system
(an ``echo`` session on the direct path or through the kernel, or a managers proxy), listens on
a control socket in the bench's directory, and writes READY (``--ready-fd``) once both are made.
For each run the bench sends every process the same duration; each makes sync calls in a loop
for that long and answers (calls, first call's start, last call's end), on the system-wide
monotonic clock. A run's aggregate is all the calls over the span from the earliest start to
the latest end, so a process that started late or ran long makes the figure smaller, not larger.

Runs of the systems alternate (`Fleet.measure`), so that noise hits every system alike. A
process that sees its control connection end closes its client and exits.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import connection
from pathlib import Path

from ...client import RSession
from ...testing import Process, ReadySignal, stop_processes
from .clients import Client, IpcfwClient, ManagersClient, WrongReply
from .measure import ROUNDS, cpu_seconds
from .roles import exit_when_orphaned, role_argv

SYSTEMS = {"ipcfw-direct": "direct", "ipcfw": "kernel", "managers": None}
"""The systems a fleet can run, and the ipcfw path of each (None: managers)."""
DEFAULT_PROCESSES = 8


def open_client(system: str, target: str) -> Client:
    """The client of `system`: `target` is the kernel's endpoint, or the managers' address."""
    path = SYSTEMS[system]
    if path is None:
        return ManagersClient(target)
    return IpcfwClient(RSession.connect("echo", path=path, endpoint=target))


def call_for(client: Client, seconds: float) -> tuple[int, int, int]:
    """Sync calls for `seconds`: (calls, start ns, end ns) on the monotonic clock."""
    clock, call, expected = time.monotonic_ns, client.call, client.expected
    start = clock()
    end, now, calls = start + int(seconds * 1e9), start, 0
    while now < end:
        if call() != expected:
            raise WrongReply(f"a fleet call returned something else than {expected!r}")
        calls += 1
        now = clock()
    return calls, start, now


def serve(system: str, target: str, control: str, parent_pid: int, ready: ReadySignal) -> None:
    """A fleet process: open the client, then run what the bench asks until it hangs up."""
    exit_when_orphaned(parent_pid)
    client = open_client(system, target)
    try:
        with connection.Listener(control, family="AF_UNIX") as listener:
            ready.set()
            with listener.accept() as conn:
                while True:
                    try:
                        seconds = conn.recv()
                    except EOFError:
                        return
                    conn.send(call_for(client, seconds))
    finally:
        client.close()


@dataclass(frozen=True)
class FleetResult:
    processes: int
    calls: int
    seconds: float
    """The sum of every run's span."""
    cpu_us: dict[str, float]
    """CPU microseconds per call of the client processes together ("clients") and of the
    system's other processes ("broker", "server"), over the runs."""

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds


class Fleet:
    """`processes` client processes of each system of `targets` (its kernel endpoint or managers
    address), started with `spawn(name, argv)` (ready=True: it passes ``--ready-fd``)."""

    def __init__(self, spawn: Callable[[str, list[str]], Process], workdir: Path,
                 targets: dict[str, str], processes: int) -> None:
        self.members: dict[str, list[tuple[Process, str]]] = {}
        for system, target in targets.items():
            self.members[system] = []
            for i in range(processes):
                control = str(workdir / f"fleet-{system}-{i}")
                argv = role_argv("fleet", target, "--system", system, "--control", control,
                                 module=__name__)
                self.members[system].append((spawn(f"fleet-{system}-{i}", argv), control))
        self.conns: dict[str, list[connection.Connection]] = {}

    def connect(self, timeout: float) -> None:
        """Wait for every process to be ready and connect to its control socket."""
        for system, members in self.members.items():
            self.conns[system] = []
            for process, control in members:
                process.wait_ready(timeout)
                self.conns[system].append(connection.Client(control, family="AF_UNIX"))

    def run(self, system: str, seconds: float) -> tuple[int, float]:
        """One run of every process of `system`: (calls, span in seconds)."""
        conns = self.conns[system]
        for conn in conns:
            conn.send(seconds)
        answers = [conn.recv() for conn in conns]
        start, end = min(a[1] for a in answers), max(a[2] for a in answers)
        return sum(a[0] for a in answers), (end - start) / 1e9

    def cpu(self, system: str, others: dict[str, int]) -> dict[str, float]:
        """CPU seconds so far of the clients of `system` together, and of `others` by role."""
        clients = sum(cpu_seconds(process.pid) for process, _ in self.members[system])
        return {"clients": clients, **{role: cpu_seconds(pid) for role, pid in others.items()}}

    def measure(self, seconds: float, others: dict[str, dict[str, int]],
                rounds: int = ROUNDS) -> dict[str, FleetResult]:
        """`seconds` of calls by each system's clients, in `rounds` alternating runs; `others`
        are each system's other processes by role, whose CPU is reported with the clients'."""
        calls = dict.fromkeys(self.conns, 0)
        spans = dict.fromkeys(self.conns, 0.0)
        cpu: dict[str, dict[str, float]] = {system: {} for system in self.conns}
        names = list(self.conns)
        for i in range(rounds):
            for system in names[i % len(names):] + names[:i % len(names)]:
                before = self.cpu(system, others.get(system, {}))
                n, span = self.run(system, seconds / rounds)
                after = self.cpu(system, others.get(system, {}))
                calls[system] += n
                spans[system] += span
                for role, value in after.items():
                    cpu[system][role] = cpu[system].get(role, 0.0) + value - before[role]
        return {system: FleetResult(len(self.conns[system]), calls[system], spans[system],
                                    {role: s / calls[system] * 1e6
                                     for role, s in cpu[system].items()})
                for system in self.conns}

    def close(self) -> None:
        """Hang up: each process closes its client and exits."""
        for conns in self.conns.values():
            for conn in conns:
                conn.close()
        self.conns.clear()

    def stop(self, timeout: float) -> None:
        """Wait up to `timeout` for the processes to exit after `close`; then stop those still
        running (SIGTERM, then SIGKILL)."""
        processes = [process for members in self.members.values() for process, _ in members]
        deadline = time.monotonic() + timeout
        for process in processes:
            try:
                process.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
        stop_processes((p.popen for p in processes), timeout)
        for process in processes:
            process.stop(0)  # reaped already: closes its ready pipe


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ipcfw.tools.bench.fleet")
    parser.add_argument("--role", choices=("fleet",), default="fleet")
    parser.add_argument("--endpoint", required=True,
                        help="the kernel's endpoint, or the managers' address")
    parser.add_argument("--system", required=True, choices=tuple(SYSTEMS))
    parser.add_argument("--control", required=True, help="the control socket to listen on")
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--ready-fd", type=int)
    args = parser.parse_args(argv)
    try:
        serve(args.system, args.endpoint, args.control, args.parent_pid,
              ReadySignal(args.ready_fd))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
