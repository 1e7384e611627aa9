"""A monitor attached: what does ``ipcfw monitor`` cost the calls it watches?

Sync calls to the echo server are timed on both data paths, with no monitor, then with one
watching the server (``Monitor("echo")`` from this process), in interleaved chunks (the order
alternating chunk by chunk, so that noise on a shared machine hits both alike). The monitor is
opened before its chunk and read and closed after it, outside the timing: the calls pay what
the kernel and the server do for it (an event per request and per completion, the server's
reports on the direct path, the batches sent), not the monitor's own reading, which is another
process's work in real use. The report gives each path's median with and without, and their
ratio; the events the monitor read and lost are counted as a check that it saw the calls.

Nobody monitoring, the kernel pays one flag test per event site and the server one per direct
request and completion: that is the "without" column, the same code as every other case.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ...client import Monitor, MonitorEvent, RSession
from .clients import IpcfwClient
from .measure import CHUNKS, percentile, time_sync

DEFAULT_MONITORED = 2_000
"""Sync calls per path and condition by default (``--monitored``; 0 leaves the case out)."""
PATHS = ("kernel", "direct")


@dataclass(frozen=True)
class MonitoredResult:
    calls: int
    """Sync calls per path and condition."""
    without_us: dict[str, tuple[float, float]]
    """Path -> (median, p99) in microseconds, no monitor."""
    with_us: dict[str, tuple[float, float]]
    """Path -> (median, p99) in microseconds, a monitor watching the server."""
    seen: int
    """Events the monitors read, all chunks together."""
    lost: int = 0
    """Events they were told they lost (0 expected: a chunk fits in a monitor's buffers)."""
    ratios: dict[str, float] = field(default_factory=dict)
    """Path -> the median with a monitor over the median without."""


def measure_monitored(server: str, calls: int) -> MonitoredResult:
    """Time `calls` sync calls per path to `server` without and with a monitor (see above)."""
    clients = {path: IpcfwClient(RSession.connect(server, path=path)) for path in PATHS}
    latencies: dict[tuple[str, bool], list[int]] = {
        (p, m): [] for p in PATHS for m in (False, True)}
    seen = lost = 0
    try:
        for client in clients.values():
            time_sync(client, max(10, calls // 10))  # warm up
        per_chunk = max(1, calls // CHUNKS)
        for chunk in range(CHUNKS):
            for monitored in ((False, True) if chunk % 2 == 0 else (True, False)):
                for path, client in clients.items():
                    if not monitored:
                        latencies[(path, False)] += time_sync(client, per_chunk)
                        continue
                    with Monitor(server) as watch:
                        latencies[(path, True)] += time_sync(client, per_chunk)
                        read = _read_all(watch, 2 * per_chunk)
                    seen += len(read)
                    lost += sum(event.lost for event in read)
    finally:
        for client in clients.values():
            client.close()
    without = {p: _median_p99(latencies[(p, False)]) for p in PATHS}
    with_ = {p: _median_p99(latencies[(p, True)]) for p in PATHS}
    ratios = {p: with_[p][0] / without[p][0] for p in PATHS}
    return MonitoredResult(per_chunk * CHUNKS, without, with_, seen, lost, ratios)


def _read_all(watch: Monitor, expected: int, timeout: float = 10.0) -> list[MonitorEvent]:
    """What the monitor has been sent, until it holds `expected` requests and completions (or
    `timeout`)."""
    events: list[MonitorEvent] = []
    deadline = time.monotonic() + timeout
    while (sum(e.kind in ("request", "complete") or e.lost for e in events) < expected
           and time.monotonic() < deadline):
        events += watch.read(timeout=0.1)
    return events


def _median_p99(latencies_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(latencies_ns)
    return percentile(ordered, 50) / 1000, percentile(ordered, 99) / 1000


def format_monitored(result: MonitoredResult) -> str:
    """The report's section: per path, the sync median and p99 without and with a monitor."""
    lines = [f"Monitor attached (sync calls to echo, {result.calls:,} per path and condition, "
             "interleaved):",
             f"{'path':<8}{'without med/p99 (us)':>24}{'with med/p99 (us)':>22}{'ratio':>8}"]
    for path in PATHS:
        (m0, p0), (m1, p1) = result.without_us[path], result.with_us[path]
        lines.append(f"{path:<8}{m0:>14.1f} /{p0:>7.1f}{m1:>12.1f} /{p1:>7.1f}"
                     f"{result.ratios[path]:>7.2f}x")
    lines.append(f"(the monitors read {result.seen:,} events, lost {result.lost:,})")
    return "\n".join(lines)
