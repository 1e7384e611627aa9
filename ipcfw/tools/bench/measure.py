"""Measuring the systems: interleaved chunks, per-call latencies, throughput, CPU per call.

All systems are measured in interleaved chunks (`CHUNKS`; the order rotates chunk by chunk, and
the shared-session case takes its turn among the sync chunks), so that noise from other work on
a shared machine hits every system alike. Each step runs under a `watchdog`: a failure of a
bare system aborts the bench (`BenchError`), one of ipcfw only takes that system out.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psutil

from .clients import WINDOW, BenchError, Client, SharedEcho, WrongReply, gc_paused, watchdog

SHARED_THREADS = 8
"""Threads sharing one ipcfw session in the shared-session case."""
SHARED_SYSTEM = f"ipcfw-shared-{SHARED_THREADS}"
CHUNKS = 10
"""Each measurement is split into this many chunks, interleaved across systems."""
ROUNDS = 3
"""The measurements of the bench's second part (client processes, descriptors) alternate their
systems or paths in this many rounds."""

STEP_BUDGET_S, STEP_BUDGET_PER_CALL_S = 20.0, 0.005
"""A step's watchdog: this many seconds, plus this many per call."""

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
    pipelined_calls_per_s: float | None
    """None for a system that cannot pipeline (a managers proxy)."""
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


def time_sync(client: Client, n: int) -> list[int]:
    clock, call = time.perf_counter_ns, client.call
    out = [0] * n
    with gc_paused():
        for i in range(n):
            t0 = clock()
            call()
            out[i] = clock() - t0
    return out


def time_pipelined(client: Client, n: int, window: int = WINDOW) -> float:
    with gc_paused():
        t0 = time.perf_counter()
        client.pipelined(n, window)
        return time.perf_counter() - t0


def warm_up(system: System, sync_n: int, pipelined_n: int) -> None:
    reply = system.client.call()
    if reply != system.client.expected:
        raise WrongReply(f"echo returned {reply!r}, expected {system.client.expected!r}")
    time_sync(system.client, max(50, sync_n // 10))
    if system.client.pipelines:
        time_pipelined(system.client, max(WINDOW, pipelined_n // 10))


def split(n: int, parts: int) -> list[int]:
    """``n`` as ``parts`` near-equal non-negative chunks."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


Step = tuple["System | SharedCase", Callable[[], object], int]
"""A step of a run: the system (or shared case) it measures, the step, and its calls."""


def _rotations(steps: Sequence[Step], chunk: int) -> list[Step]:
    """The steps of live systems, rotated by ``chunk``."""
    live = [step for step in steps if step[0].error is None]
    k = chunk % len(live) if live else 0
    return live[k:] + live[:k]


def guarded(system: System | SharedCase, step: Callable[[], object], calls: int) -> None:
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
        steps: list[Step] = [(s, functools.partial(_add_sync, s, n), n) for s in systems]
        if shared is not None and m:
            steps.append((shared, functools.partial(_add_shared, shared, m), m * SHARED_THREADS))
        for system, step, calls in _rotations(steps, i):
            guarded(system, step, calls)
    for i, n in enumerate(split(pipelined_n, CHUNKS)):
        pipelined: list[Step] = [(s, functools.partial(_add_pipelined, s, n), n)
                                 for s in systems if s.client.pipelines]
        for system, step, calls in _rotations(pipelined, i):
            guarded(system, step, calls)
    return {s.name: summarize(s) for s in systems if s.error is None}


def _add_sync(system: System, n: int) -> None:
    system.latencies_ns.extend(time_sync(system.client, n))


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
    """The `q`-th percentile (0 < q <= 100) of already sorted values, by nearest rank: the
    smallest value with at least q% of the values at or below it (rank ceil(q/100 * n)).

    Always one of the measured values, never an interpolation. The one formula of the bench
    and the demo: their medians are ``percentile(values, 50)``.
    """
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(system: System) -> RunResult:
    lat = sorted(system.latencies_ns)
    return RunResult(
        sync_median_us=percentile(lat, 50) / 1000,
        sync_p99_us=percentile(lat, 99) / 1000,
        pipelined_calls_per_s=(system.pipelined_calls / system.pipelined_seconds
                               if system.pipelined_calls else None),
        sync_calls_per_s=len(lat) / (sum(lat) / 1e9),
        pipelined_cpu_us={role: seconds / system.pipelined_calls * 1e6
                          for role, seconds in system.pipelined_cpu_s.items()},
    )


def best_of(runs: Sequence[RunResult]) -> RunResult:
    """Best sync median (with that run's p99) and best throughputs across repeats (with the
    CPU of the run with the best pipelined throughput)."""
    fastest = min(runs, key=lambda r: r.sync_median_us)
    most = max(runs, key=lambda r: r.pipelined_calls_per_s or 0.0)
    return RunResult(fastest.sync_median_us, fastest.sync_p99_us, most.pipelined_calls_per_s,
                     max(r.sync_calls_per_s for r in runs), most.pipelined_cpu_us)


def best_shared(runs: Sequence[SharedResult]) -> SharedResult:
    """The run with the best shared throughput, compared with ipcfw's single thread of that run."""
    return max(runs, key=lambda r: r.calls_per_s)
