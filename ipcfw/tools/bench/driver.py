"""The driver of ``ipcfw bench``: its options, the run (start, warm up, measure, stop, whatever
happens) and the exit status."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import zmq

from ...testing import private_dir
from .clients import STOP_TIMEOUT, WINDOW, BenchError, watchdog
from .measure import (
    CHUNKS, SHARED_SYSTEM, SHARED_THREADS, RunResult, SharedCase, SharedResult, System,
    best_of, best_shared, guarded, run_once, summarize_shared, warm_up,
)
from .churn import DEFAULT_CHURN
from .crowd import DEFAULT_LARGE, kernel_options
from .descriptors import BUDGET_MIB
from .fleet import DEFAULT_PROCESSES
from .memory import DEFAULT_CONNECTIONS
from .monitored import DEFAULT_MONITORED, format_monitored
from .remote import DEFAULT_REMOTE, format_remote
from .phases import Extras, direct_context, run_phases
from .plot import PlotUnavailable, load as load_record, plot, require as require_plot
from .progress import Progress
from .report import (
    environment, format_churn, format_connections, format_cpu, format_crowd,
    format_descriptors, format_fleet, format_header, format_shared, format_table,
    format_targets, write_json,
)
from .systems import (
    Processes, Unavailable, start_bare_forwarder, start_bare_pingpong, start_ipcfw,
    start_managers, start_mp_pipe,
)
from .targets import (
    BASELINE, DIRECT, MANAGERS, Target, crowd_target, descriptor_target, fleet_target,
    references, run_targets,
)

DEFAULT_SYNC, DEFAULT_PIPELINED = 5000, 20000
QUICK_SYNC, QUICK_PIPELINED = 1000, 5000
DEFAULT_SHARED, QUICK_SHARED = 1000, 250
"""Sync calls per thread in the shared-session case."""
DEFAULT_FLEET_SECONDS, QUICK_FLEET_SECONDS = 3.0, 1.5

IPCFW_CLIENT_LOGGER = "ipcfw.client"


def build_parser() -> argparse.ArgumentParser:
    """``ipcfw bench``'s own parser (`ipcfw.tools.clidoc` documents it)."""
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
    p.add_argument("--fleet", type=int, default=DEFAULT_PROCESSES, metavar="N",
                   help="client processes per system in the aggregate calls/s case "
                        f"(default {DEFAULT_PROCESSES}; 0 leaves it out)")
    p.add_argument("--fleet-seconds", type=float, metavar="S",
                   help="seconds of calls per system in that case, over 3 alternating runs "
                        f"(default {DEFAULT_FLEET_SECONDS:g}; --quick {QUICK_FLEET_SECONDS:g})")
    p.add_argument("--open-sessions", type=int, default=DEFAULT_LARGE, metavar="N",
                   help="time ipcfw-direct with N/10, then N idle direct sessions open "
                        f"(default {DEFAULT_LARGE}; 0 leaves it out)")
    p.add_argument("--descriptor-mib", type=int, default=BUDGET_MIB, metavar="M",
                   help="MiB each path moves per descriptor size "
                        f"(default {BUDGET_MIB}; 0 leaves descriptors out)")
    p.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS, metavar="N",
                   help="client threads, each with a direct connection, for the memory per "
                        f"connection (default {DEFAULT_CONNECTIONS}, at most 60; 0 leaves it out)")
    p.add_argument("--churn", type=int, default=DEFAULT_CHURN, metavar="N",
                   help="direct sessions opened and closed to look for growth "
                        f"(default {DEFAULT_CHURN}; issue 11 asks for 100000; 0 leaves it out)")
    p.add_argument("--monitored", type=int, default=DEFAULT_MONITORED, metavar="N",
                   help="sync calls per data path timed without, then with, a monitor watching "
                        f"the server (default {DEFAULT_MONITORED}; 0 leaves it out)")
    p.add_argument("--remote", type=int, default=DEFAULT_REMOTE, metavar="N",
                   help="sync calls on the kernel path over ipc, then over tcp with CURVE (a "
                        f"kernel of its own; default {DEFAULT_REMOTE}; 0 leaves it out)")
    p.add_argument("--repeat", type=int, default=1, metavar="R",
                   help="run the interleaved set R times, report each system's best run")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--plot", metavar="FILE",
                   help="also draw the comparison into FILE (.svg, .png or .pdf; needs the "
                        "[plot] extra: matplotlib)")
    p.add_argument("--from-json", metavar="PATH",
                   help="with --plot: draw the record an earlier --json wrote, measure nothing")
    p.add_argument("--strict", action="store_true", help="exit 2 when ipcfw misses a target")
    p.add_argument("--no-ipcfw", action="store_true", help="measure the bare systems only")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = build_parser()
    argv = list(argv)
    if argv[:1] == ["--"]:  # `ipcfw bench -- --quick`: the CLI may pass the separator through
        argv = argv[1:]
    args = p.parse_args(argv)
    if args.from_json and not args.plot:
        p.error("--from-json draws an earlier run: give --plot FILE too")
    if args.plot:
        try:
            require_plot(args.plot)  # now, not after minutes of measuring
        except PlotUnavailable as exc:
            p.error(str(exc))
    quick = (QUICK_SYNC, QUICK_PIPELINED) if args.quick else (DEFAULT_SYNC, DEFAULT_PIPELINED)
    args.sync = args.sync if args.sync is not None else quick[0]
    args.pipelined = args.pipelined if args.pipelined is not None else quick[1]
    if args.shared is None:
        args.shared = QUICK_SHARED if args.quick else DEFAULT_SHARED
    if args.fleet_seconds is None:
        args.fleet_seconds = QUICK_FLEET_SECONDS if args.quick else DEFAULT_FLEET_SECONDS
    counts = ("fleet", "open_sessions", "descriptor_mib", "connections", "churn", "monitored",
              "remote")
    if any(getattr(args, name) < 0 for name in counts) or args.fleet_seconds <= 0:
        p.error("--fleet, --open-sessions, --descriptor-mib, --connections, --churn, "
                "--monitored and --remote must be at least 0, --fleet-seconds more than 0")
    if args.connections > 60:
        p.error("--connections must be at most 60 (a server takes 64 direct connections "
                "from one process)")
    if args.sync < 1 or args.pipelined < 1 or args.repeat < 1:
        p.error("--sync, --pipelined and --repeat must be at least 1")
    if args.shared < 0:
        p.error("--shared must be at least 0")
    return args


@dataclass
class Outcome:
    results: dict[str, RunResult]
    runs: dict[str, list[RunResult]]
    failed: dict[str, str]
    notes: list[str] = field(default_factory=list)
    shared: SharedResult | None = None
    shared_runs: list[SharedResult] = field(default_factory=list)
    extras: Extras = field(default_factory=Extras)


def start_systems(
    processes: Processes, ctx: zmq.Context[zmq.Socket[bytes]], workdir: Path, with_ipcfw: bool,
    shared_threads: int = 0, open_sessions: int = 0,
) -> tuple[list[System], SharedCase | None, dict[str, str]]:
    systems = [System("bare-pingpong", *start_bare_pingpong(processes, ctx, workdir)),
               System(BASELINE, *start_bare_forwarder(processes, ctx, workdir)),
               System(MANAGERS, *start_managers(processes, workdir)),
               System("mp-pipe", *start_mp_pipe(processes, workdir))]
    failed: dict[str, str] = {}
    if not with_ipcfw:
        failed["ipcfw"] = "skipped (--no-ipcfw)"
        return systems, None, failed
    try:
        stack = start_ipcfw(processes, workdir, shared_threads, kernel_options(open_sessions))
    except Unavailable as exc:
        failed["ipcfw"] = str(exc)
        if shared_threads:
            failed[SHARED_SYSTEM] = "the ipcfw stack is not available"
        return systems, None, failed
    systems.append(System("ipcfw", stack.client, stack.pids))
    if stack.direct is not None:
        systems.append(System(DIRECT, stack.direct, {"server": stack.pids["server"]}))
    else:
        failed[DIRECT] = stack.direct_error or "not started"
    if stack.shared_error is not None:
        failed[SHARED_SYSTEM] = stack.shared_error
    return systems, SharedCase(stack.shared) if stack.shared is not None else None, failed


def measure(systems: list[System], shared: SharedCase | None, failed: dict[str, str],
            args: argparse.Namespace) -> Outcome:
    for s in systems:
        guarded(s, functools.partial(warm_up, s, args.sync, args.pipelined),
                args.sync + args.pipelined)
    if shared is not None:
        warm = max(10, args.shared // 10)
        guarded(shared, functools.partial(shared.runner.run, warm), warm * SHARED_THREADS)
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
    processes = Processes(workdir)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    systems: list[System] = []
    shared: SharedCase | None = None
    try:
        systems, shared, failed = start_systems(
            processes, ctx, workdir, with_ipcfw=not args.no_ipcfw,
            shared_threads=SHARED_THREADS if args.shared else 0,
            open_sessions=args.open_sessions)
        outcome = measure(systems, shared, failed, args)
        context = direct_context(processes, workdir, systems, Progress())
        if context is not None:
            outcome.extras = run_phases(context, args)
        elif not args.no_ipcfw:
            outcome.extras.failed["later phases"] = f"{DIRECT} is not running"
        outcome.notes += close_clients(systems, shared)
        shared = None
        return outcome
    finally:
        close_clients(systems, shared)
        # We stop the kernel on purpose: the client runtime's "kernel has died" warning is noise.
        logging.getLogger(IPCFW_CLIENT_LOGGER).setLevel(logging.ERROR)
        processes.stop()
        ctx.destroy(linger=0)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Make SIGTERM unwind like Ctrl-C, so ``finally`` blocks stop the processes."""
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


def targets_of(args: argparse.Namespace, outcome: Outcome) -> list[Target]:
    extras = outcome.extras
    crowd = extras.crowd
    large = args.open_sessions
    return [*run_targets(outcome.results),
            fleet_target(extras.fleet, args.fleet),
            crowd_target(None if crowd is None else crowd.growth, large // 10, large),
            descriptor_target(extras.descriptors)]


def _print_extras(args: argparse.Namespace, extras: Extras) -> None:
    sections = [
        extras.fleet and format_fleet(extras.fleet, args.fleet_seconds),
        extras.descriptors and format_descriptors(extras.descriptors),
        extras.crowd and format_crowd(extras.crowd),
        extras.connections and format_connections(extras.connections),
        extras.monitored and format_monitored(extras.monitored),
        extras.churn and format_churn(extras.churn),
        extras.remote and format_remote(extras.remote),
    ]
    for section in sections:
        if section:
            print(section)
            print()


def _config(args: argparse.Namespace) -> dict[str, object]:
    return {"sync": args.sync, "pipelined": args.pipelined, "window": WINDOW,
            "shared": args.shared, "shared_threads": SHARED_THREADS,
            "repeat": args.repeat, "chunks": CHUNKS, "baseline": BASELINE,
            "fleet": args.fleet, "fleet_seconds": args.fleet_seconds,
            "open_sessions": [args.open_sessions // 10, args.open_sessions],
            "descriptor_mib": args.descriptor_mib, "connections": args.connections,
            "churn": args.churn, "monitored": args.monitored, "remote": args.remote}


def _extras_json(extras: Extras) -> dict[str, object]:
    crowd, connections, churn = extras.crowd, extras.connections, extras.churn
    return {
        "fleet": None if extras.fleet is None else {
            n: {**asdict(r), "calls_per_s": r.calls_per_s} for n, r in extras.fleet.items()},
        "descriptors": [asdict(r) for r in extras.descriptors],
        "open_sessions": None if crowd is None else {
            **asdict(crowd), "growth": crowd.growth, "rss_per_session": crowd.rss_per_session()},
        "memory_per_connection": None if connections is None else {
            **asdict(connections), "rss_per_connection": connections.rss_per_connection(),
            "fds_per_connection": connections.fds_per_connection()},
        "churn": None if churn is None else asdict(churn),
        "monitored": None if extras.monitored is None else asdict(extras.monitored),
        "remote": None if extras.remote is None else asdict(extras.remote),
    }


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
    _print_extras(args, outcome.extras)
    for name, reason in {**outcome.failed, **outcome.extras.failed}.items():
        print(f"{name}: NOT MEASURED: {reason}")
    for note in outcome.notes:
        print(f"note: {note}")
    targets = targets_of(args, outcome)
    refs = references(outcome.results)
    print(format_targets(targets, refs))
    record = _record(args, outcome, env, targets, refs)
    if args.json:
        write_json(args.json, record)
    if args.plot:
        plot(record, args.plot)
        print(f"plot: {args.plot}")
    ipcfw_failed = {"ipcfw", DIRECT, SHARED_SYSTEM} & set(outcome.failed)
    if (ipcfw_failed or outcome.extras.failed) and not args.no_ipcfw:
        return 1
    return 2 if args.strict and any(t.passed is False for t in targets) else 0


def _record(args: argparse.Namespace, outcome: Outcome, env: dict[str, Any],
            targets: list[Target], refs: dict[str, float | None]) -> dict[str, Any]:
    """The run as one record: what --json writes and --plot draws."""
    return {
        "environment": env,
        "config": _config(args),
        "results": {n: asdict(r) for n, r in outcome.results.items()},
        "runs": {n: [asdict(r) for r in rs] for n, rs in outcome.runs.items()},
        "shared": None if outcome.shared is None else {
            **asdict(outcome.shared), "system": SHARED_SYSTEM,
            "vs_single": outcome.shared.vs_single,
            "runs": [asdict(r) for r in outcome.shared_runs]},
        **_extras_json(outcome.extras),
        "not_measured": {**outcome.failed, **outcome.extras.failed},
        "notes": outcome.notes,
        "targets": {t.name: t.record() for t in targets},
        "references": refs,
    }


def _replot(source: str, target: str) -> int:
    try:
        plot(load_record(source), target)
    except PlotUnavailable as exc:
        print(f"ipcfw bench: {exc}", file=sys.stderr)
        return 2
    print(f"plot: {target}")
    return 0


def main(argv: Sequence[str]) -> int:
    """Entry point of ``ipcfw bench``; returns the process exit status."""
    args = parse_args(argv)
    if args.from_json:
        return _replot(args.from_json, args.plot)
    saved_kernel = os.environ.get("IPCFW_KERNEL")
    client_log = logging.getLogger(IPCFW_CLIENT_LOGGER)
    saved_log_level = client_log.level
    workdir = private_dir("ipcfw-bench-")
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
