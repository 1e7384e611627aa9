"""Many open sessions: does a call get slower when a server has 10,000 idle sessions?

The bench's direct session is timed (sync calls, as in the main table) with `small` extra idle
direct sessions open to the same echo server, then with `large`, then with `small` again; the
two `small` halves are pooled, so that drift during the run does not favour either count. The
extra sessions are opened by this thread, so on the server they share the timed session's direct
connection (one per client thread per server process): the figure is about tables of sessions,
not connections. The kernel's and the server's footprints are taken before any extra session is
opened and with `large` open.

A process may hold ``--sessions-per-process`` sessions (10,000 by default): the bench starts its
kernel with room for `large` more than its own (`kernel_options`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ...client import RSession
from ...kernel.limits import KernelLimits
from .churn import settled
from .clients import Client
from .measure import cpu_seconds, percentile, time_sync
from .memory import Footprint, footprints

DEFAULT_SMALL, DEFAULT_LARGE = 1_000, 10_000
HEADROOM = 100
"""Sessions the bench holds beside the extra ones (its clients, the shared case, the
descriptor sessions), with room to spare."""
QUIET_WINDOW, QUIET_SHARE, QUIET_TIMEOUT = 0.1, 0.05, 10.0
GROWTH_TARGET = 1.2
"""The sync median with `large` open at most this many times the median with `small` open."""


def kernel_options(large: int) -> tuple[str, ...]:
    """``ipcfw kernel`` options that let the bench process hold `large` extra sessions."""
    limit = max(KernelLimits().sessions_per_process, large + HEADROOM)
    return ("--sessions-per-process", str(limit))


@dataclass(frozen=True)
class CrowdResult:
    small: int
    large: int
    small_median_us: float
    small_p99_us: float
    large_median_us: float
    large_p99_us: float
    before: dict[str, Footprint]
    """The kernel's ("broker") and the server's footprint with no extra session open."""
    with_large: dict[str, Footprint]

    @property
    def growth(self) -> float:
        return self.large_median_us / self.small_median_us

    def rss_per_session(self) -> dict[str, float]:
        return {role: (self.with_large[role].rss - self.before[role].rss) / self.large
                for role in self.before}


class Crowd:
    """Extra idle direct sessions to `server`, opened and closed by this thread."""

    def __init__(self, server: str, statistics: Callable[[], dict[str, int]],
                 progress: Callable[[int, int], None], timeout: float) -> None:
        self.server, self.statistics, self.progress = server, statistics, progress
        self.timeout = timeout
        """Seconds the kernel has to close the sessions closed."""
        self.sessions: list[RSession] = []

    def grow(self, n: int) -> None:
        """Open sessions until `n` are open; raise if the kernel did not grant the direct
        path to all of them (counted once sessions closed before have gone)."""
        before = settled(self.statistics, self.timeout)["sessions_direct"]
        added = n - len(self.sessions)
        while len(self.sessions) < n:
            self.sessions.append(RSession.connect(self.server, path="direct"))
            if len(self.sessions) % 500 == 0:
                self.progress(len(self.sessions), n)
        granted = self.statistics()["sessions_direct"] - before
        if granted != added:
            raise RuntimeError(f"the kernel granted the direct path to {granted} of {added} "
                               "new sessions")

    def shrink(self, n: int) -> None:
        """Close sessions until `n` are open, and wait until the kernel has closed them."""
        target = self.statistics()["sessions"] - (len(self.sessions) - n)
        while len(self.sessions) > n:
            self.sessions.pop().Close()
        deadline = time.monotonic() + self.timeout
        while (left := self.statistics()["sessions"]) > target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{left - target} closed sessions still held by the kernel "
                                   f"after {self.timeout:.0f} s")
            time.sleep(0.05)


def wait_quiet(pids: dict[str, int], timeout: float = QUIET_TIMEOUT) -> None:
    """Wait until the processes of `pids` have used at most `QUIET_SHARE` of a core over a
    `QUIET_WINDOW`, or `timeout`: after thousands of sessions open or close, the kernel and the
    server are busy for a while, and a call timed then measures that, not the open sessions."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = sum(cpu_seconds(pid) for pid in pids.values())
        time.sleep(QUIET_WINDOW)
        if sum(cpu_seconds(pid) for pid in pids.values()) - before <= QUIET_SHARE * QUIET_WINDOW:
            return


def measure_crowd(client: Client, crowd: Crowd, pids: dict[str, int], small: int, large: int,
                  calls: int) -> CrowdResult:
    """Time `client` with `small`, `large`, then `small` extra sessions open; close them all."""
    try:
        before = footprints(pids)
        crowd.grow(small)
        wait_quiet(pids)
        small_ns = _timed(client, calls // 2)
        crowd.grow(large)
        wait_quiet(pids)
        with_large = footprints(pids)
        large_ns = _timed(client, calls)
        crowd.shrink(small)
        wait_quiet(pids)
        small_ns += _timed(client, calls - calls // 2)
    finally:
        crowd.shrink(0)
    return CrowdResult(small, large, *_median_p99(small_ns), *_median_p99(large_ns),
                       before, with_large)


def _timed(client: Client, n: int) -> list[int]:
    time_sync(client, max(10, n // 10))  # warm up
    return time_sync(client, max(1, n))


def _median_p99(latencies_ns: Sequence[int]) -> tuple[float, float]:
    ordered = sorted(latencies_ns)
    return percentile(ordered, 50) / 1000, percentile(ordered, 99) / 1000
