"""The report: the tables, the targets and the JSON record of a bench run."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from typing import Any

import zmq

from .clients import WINDOW
from .churn import ChurnResult
from .crowd import CrowdResult
from .descriptors import PATHS, DescriptorResult
from .fleet import FleetResult
from .measure import CPU_ROLES, SHARED_SYSTEM, SHARED_THREADS, RunResult, SharedResult
from .memory import ConnectionCost, Footprint
from .targets import BASELINE, DIRECT, MANAGERS, Target

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


def ratios(result: RunResult, base: RunResult) -> tuple[float, float | None]:
    """(sync median / baseline's, throughput / baseline's; None if it cannot pipeline)."""
    pipelined, base_pipelined = result.pipelined_calls_per_s, base.pipelined_calls_per_s
    return (result.sync_median_us / base.sync_median_us,
            None if pipelined is None or not base_pipelined else pipelined / base_pipelined)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_table(results: dict[str, RunResult], failed: dict[str, str]) -> str:
    base = results[BASELINE]
    lines = [_row(_COLUMNS)]
    for name, r in results.items():
        sync_ratio, pipe_ratio = ratios(r, base)
        pipelined = "-" if r.pipelined_calls_per_s is None else f"{r.pipelined_calls_per_s:,.0f}"
        lines.append(_row((name, f"{r.sync_median_us:.1f}", f"{r.sync_p99_us:.1f}", pipelined,
                           _ratio(sync_ratio), _ratio(pipe_ratio))))
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
        if not cpu:
            continue  # it made no pipelined calls
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


def format_targets(targets: list[Target], refs: dict[str, float | None]) -> str:
    lines = [t.line() for t in targets]
    if refs.get("kernel_managers_sync_ratio") is not None:
        lines.append(f"reference: ipcfw sync median = {refs['kernel_managers_sync_ratio']:.2f}x "
                     f"{MANAGERS}' (every ipcfw call crosses the kernel)")
    return "\n".join(lines)


def format_fleet(fleet: dict[str, FleetResult], seconds: float) -> str:
    """The client-processes table: aggregate sync calls/s of each system's processes."""
    processes = next(iter(fleet.values())).processes
    managers = fleet.get(MANAGERS)
    lines = [f"{processes} client processes, each its own client making sync calls "
             f"({seconds:g} s per system, in alternating runs); aggregate calls/s",
             f"{'system':<16}{'calls':>12}{'calls/s':>14}{'vs managers':>14}"
             "   CPU us per call: clients / broker / server / total"]
    for name, r in fleet.items():
        ratio = "-" if managers is None else f"{r.calls_per_s / managers.calls_per_s:.2f}x"
        cpu = " / ".join(f"{r.cpu_us[role]:.1f}" if role in r.cpu_us else "-"
                         for role in ("clients", "broker", "server"))
        lines.append(f"{name:<16}{r.calls:>12,}{r.calls_per_s:>14,.0f}{ratio:>14}"
                     f"   {cpu} / {sum(r.cpu_us.values()):.1f}")
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def format_descriptors(results: list[DescriptorResult]) -> str:
    """Descriptor round trips (bytes in, bytearray of the same size out, echoed) in MB/s of
    descriptor size per round trip, beside an in-process bytes -> bytearray copy."""
    lines = ["descriptor round trips: SendReceive(2, (bytes of S, bytearray of S)), the server "
             "writes it back; MB/s = S / median round trip (10^6 bytes)",
             f"{'size':<10}" + "".join(f"{p + ' MB/s':>16}" for p in PATHS)
             + f"{'direct vs copy':>16}"]
    by_size: dict[int, dict[str, DescriptorResult]] = {}
    for r in results:
        by_size.setdefault(r.size, {})[r.path] = r
    failures = []
    for size, row in by_size.items():
        cells = []
        for path in PATHS:
            cell = row.get(path)
            if cell is None or cell.mb_per_s is None:
                cells.append("FAIL")
                if cell is not None:
                    failures.append(f"  {_size(size)} {path}: FAIL: {cell.error}")
            else:
                cells.append(f"{cell.mb_per_s:,.1f}")
        direct, copy = row.get("direct"), row.get("copy")
        ratio = ("-" if direct is None or copy is None or not direct.mb_per_s
                 or not copy.mb_per_s else f"{direct.mb_per_s / copy.mb_per_s:.1%}")
        lines.append(f"{_size(size):<10}" + "".join(f"{c:>16}" for c in cells) + f"{ratio:>16}")
    return "\n".join(lines + failures)


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _kib(n: float) -> str:
    return f"{n / 1024:.2f} KiB"


def format_crowd(crowd: CrowdResult) -> str:
    per_session = crowd.rss_per_session()
    lines = [f"open sessions: {DIRECT} sync calls with idle direct sessions open"
             " to the same server (one connection)",
             f"{'open':>8}{'median us':>12}{'p99 us':>12}",
             f"{crowd.small:>8,}{crowd.small_median_us:>12.1f}{crowd.small_p99_us:>12.1f}",
             f"{crowd.large:>8,}{crowd.large_median_us:>12.1f}{crowd.large_p99_us:>12.1f}"
             f"   ({crowd.growth:.2f}x)"]
    for role, name in (("broker", "kernel"), ("server", "server")):
        lines.append(f"{name} RSS: {_mib(crowd.before[role].rss)} with none open, "
                     f"{_mib(crowd.with_large[role].rss)} with {crowd.large:,} open "
                     f"({_kib(per_session[role])} per session)")
    return "\n".join(lines)


def format_connections(cost: ConnectionCost) -> str:
    rss, fds = cost.rss_per_connection(), cost.fds_per_connection()
    names = {"broker": "kernel", "server": "server", "client": "client"}
    return "\n".join(
        [f"per direct connection ({cost.connections} client threads each holding a direct "
         "session, RSS and fd deltas / threads):"]
        + [f"  {names.get(role, role):<8}{_kib(rss[role]):>12} RSS{fds[role]:>8.2f} fds "
           f"(RSS {_mib(cost.before[role].rss)} -> {_mib(cost.after[role].rss)})"
           for role in rss])


def _change(before: Footprint, after: Footprint) -> str:
    return (f"RSS {_mib(before.rss)} -> {_mib(after.rss)} ({(after.rss - before.rss) / 1024:+,.0f}"
            f" KiB), fds {before.fds} -> {after.fds}")


def format_churn(churn: ChurnResult) -> str:
    lines = [f"churn: {churn.cycles:,} direct sessions opened and closed in {churn.seconds:.1f} s"
             f" ({churn.cycles / churn.seconds:,.0f}/s); sessions left in the kernel: "
             f"{churn.sessions_left}"]
    for role, name in (("broker", "kernel"), ("server", "server")):
        lines.append(f"  {name:<8}{_change(churn.before[role], churn.after[role])}")
    return "\n".join(lines)


def write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
