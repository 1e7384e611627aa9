"""Churn: sessions opened and closed many times must leave nothing behind.

`churn` opens a direct session to the echo server and closes it, `cycles` times, from this
thread (after `warm` cycles that let the allocators and the tables reach their working size),
then waits until the kernel holds no more sessions than before. The kernel's and the server's
footprints (RSS, open file descriptors) before and after show anything that grows with each
session; ``tests/test_churn.py`` asserts a bound on them with a smaller count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ...client import RSession
from .memory import Footprint, footprints

DEFAULT_CHURN = 2_000
"""Open/close cycles by default (``--churn 100000`` for the full count of issue 11)."""


@dataclass(frozen=True)
class ChurnResult:
    cycles: int
    seconds: float
    before: dict[str, Footprint]
    after: dict[str, Footprint]
    sessions_left: int
    """Sessions the kernel held after the churn beyond those before it (0 when all closed)."""


def wait_for_sessions(statistics: Callable[[], dict[str, int]], at_most: int,
                      timeout: float) -> int:
    """Wait until the kernel holds at most `at_most` sessions, or `timeout`; return its count."""
    deadline = time.monotonic() + timeout
    while (held := statistics()["sessions"]) > at_most and time.monotonic() < deadline:
        time.sleep(0.05)
    return held


def settled(statistics: Callable[[], dict[str, int]], timeout: float) -> dict[str, int]:
    """The kernel's counters once no session is closing (or after `timeout`): sessions an
    earlier step closed are still counted until the server has seen them go."""
    deadline = time.monotonic() + timeout
    while (counts := statistics())["sessions_closing"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return counts


def churn(server: str, statistics: Callable[[], dict[str, int]], pids: dict[str, int],
          cycles: int, progress: Callable[[int, int], None], timeout: float) -> ChurnResult:
    baseline = settled(statistics, timeout)["sessions"]
    warm = min(cycles, max(100, cycles // 20))
    for _ in range(warm):
        RSession.connect(server, path="direct").Close()
    wait_for_sessions(statistics, baseline, timeout)
    before = footprints(pids)
    t0 = time.perf_counter()
    for i in range(1, cycles + 1):
        RSession.connect(server, path="direct").Close()
        if i % 1000 == 0:
            progress(i, cycles)
    seconds = time.perf_counter() - t0
    held = wait_for_sessions(statistics, baseline, timeout)
    return ChurnResult(cycles, seconds, before, footprints(pids), held - baseline)
