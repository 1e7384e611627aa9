"""The report: the tables, the targets and the JSON record of a bench run."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from typing import Any

import zmq

from .clients import WINDOW
from .measure import CPU_ROLES, SHARED_SYSTEM, SHARED_THREADS, RunResult, SharedResult

SYNC_TARGET = 1.5
PIPELINED_TARGET = 0.5
BASELINE = "bare-forwarder"
MANAGERS = "managers"
"""The standard library's answer, which users compare ipcfw with: a reference, not a target."""
DIRECT = "ipcfw-direct"
"""ipcfw with the session on the direct path (its requests skip the kernel)."""
PINGPONG = "bare-pingpong"


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


def verdicts(results: dict[str, RunResult]) -> dict[str, Any]:
    """Targets for ipcfw against the baseline; ``passed`` is None when ipcfw was not measured.
    ``managers_sync_ratio`` (ipcfw's sync median over managers') is a reference."""
    if "ipcfw" not in results:
        return {"sync_ratio": None, "pipelined_ratio": None,
                "sync_pass": None, "pipelined_pass": None, "managers_sync_ratio": None,
                **_direct_references(results)}
    ipcfw = results["ipcfw"]
    sync_ratio, pipe_ratio = ratios(ipcfw, results[BASELINE])
    managers = results.get(MANAGERS)
    return {"sync_ratio": sync_ratio, "pipelined_ratio": pipe_ratio,
            "sync_pass": sync_ratio <= SYNC_TARGET,
            "pipelined_pass": pipe_ratio is not None and pipe_ratio >= PIPELINED_TARGET,
            "managers_sync_ratio": (None if managers is None
                                    else ipcfw.sync_median_us / managers.sync_median_us),
            **_direct_references(results)}


def _direct_references(results: dict[str, RunResult]) -> dict[str, float | None]:
    """ipcfw-direct's sync median over managers', and its pipelined rate over bare-pingpong's
    (a raw pyzmq DEALER/ROUTER, direct): references for the direct path."""
    direct, managers, pingpong = (results.get(n) for n in (DIRECT, MANAGERS, PINGPONG))
    sync = None if direct is None or managers is None else (
        direct.sync_median_us / managers.sync_median_us)
    pipelined = None if direct is None or pingpong is None else ratios(direct, pingpong)[1]
    return {"direct_managers_sync_ratio": sync, "direct_pingpong_pipelined_ratio": pipelined}


def format_targets(v: dict[str, Any]) -> str:
    def mark(ok: bool | None, ratio: float | None) -> str:
        return "n/a   NOT MEASURED" if ok is None else f"{ratio:.2f}x  {'PASS' if ok else 'MISS'}"

    lines = [f"target: ipcfw sync median  <= {SYNC_TARGET:.1f}x {BASELINE}: "
             f"{mark(v['sync_pass'], v['sync_ratio'])}",
             f"target: ipcfw pipelined    >= {PIPELINED_TARGET:.1f}x {BASELINE}: "
             f"{mark(v['pipelined_pass'], v['pipelined_ratio'])}"]
    if v["managers_sync_ratio"] is not None:
        lines.append(f"reference: ipcfw sync median = {v['managers_sync_ratio']:.2f}x "
                     "multiprocessing.managers' (every ipcfw call crosses the kernel)")
    if v["direct_managers_sync_ratio"] is not None:
        lines.append(f"reference: {DIRECT} sync median = {v['direct_managers_sync_ratio']:.2f}x "
                     "multiprocessing.managers'")
    if v["direct_pingpong_pipelined_ratio"] is not None:
        lines.append(f"reference: {DIRECT} pipelined = "
                     f"{v['direct_pingpong_pipelined_ratio']:.2f}x {PINGPONG}'s")
    return "\n".join(lines)


def write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
