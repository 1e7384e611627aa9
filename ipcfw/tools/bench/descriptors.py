"""Descriptor round trips: the MB/s a request carrying a descriptor moves, beside an in-process
copy of the same size.

A round trip of size S is ``SendReceive(ECHO_DES, (data, out))``, `data` a read-only descriptor
(``bytes`` of S) and `out` a writable one (a ``bytearray`` of S): the echo server reads `data`
whole and writes it into `out`, so S bytes go to the server and S bytes come back. Its rate is
S / (the median round-trip time), in MB/s (10**6 bytes). The copy's rate is S / (the median time
of ``out[:] = data`` in this process): one copy of S bytes, the least any transport pays. The
sizes and paths are measured in rounds (copy, direct, kernel, rotating), their times pooled.

A size a path cannot carry (the transport refuses the frame, the server answers an error) is
not measured: its result carries the error's text. The sessions have a thread of their own: a
thread's direct sessions share its connection to the server, and a frame the server refuses
might end that connection, which must not take the bench's other direct session with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ...client import RSession
from .clients import ECHO_DES, gc_paused
from .measure import ROUNDS, percentile

SIZES = (1 << 10, 64 << 10, 1 << 20, 16 << 20)
BUDGET_MIB = 128
"""MiB each path moves per size (split over the rounds), between 3 and `MAX_REPEATS` calls."""
MAX_REPEATS = 1000
LEAST_COPIES = 30
"""The copy is cheap: at least this many, whatever the size (its median is noisy above the
caches' size on a shared machine)."""
PATHS = ("copy", "direct", "kernel")
"""``copy``: the in-process copy; ``direct`` and ``kernel``: round trips on an ``echo`` session
of that path."""


@dataclass(frozen=True)
class DescriptorResult:
    path: str
    size: int
    mb_per_s: float | None
    """None when the path could not carry the size."""
    median_us: float | None
    calls: int
    error: str | None = None


def repeats(size: int, budget_mib: int) -> int:
    return max(3, min(MAX_REPEATS, (budget_mib << 20) // size))


def pattern(size: int) -> bytes:
    """`size` bytes that are not all alike, so that a wrong echo is seen."""
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def time_copy(data: bytes, out: bytearray, n: int) -> list[int]:
    clock, times = time.perf_counter_ns, []
    with gc_paused():
        for _ in range(n):
            t0 = clock()
            out[:] = data
            times.append(clock() - t0)
    return times


def time_round_trips(session: RSession, data: bytes, out: bytearray, n: int) -> list[int]:
    """`n` round trips; raises the call's error, or ValueError for a wrong echo."""
    clock, call, times = time.perf_counter_ns, session.SendReceive, []
    with gc_paused():
        for _ in range(n):
            t0 = clock()
            value = call(ECHO_DES, (data, out))
            times.append(clock() - t0)
    if value != len(data) or out != data:
        raise ValueError(f"EEchoDes of {len(data)} bytes completed with {value!r} and "
                         f"{len(out)} bytes written back, not an echo")
    return times


class DescriptorBench:
    """The descriptor round trips of every size on every path, run on a thread of its own."""

    def __init__(self, server: str, sizes: Sequence[int], budget_mib: int) -> None:
        self.server, self.sizes, self.budget_mib = server, tuple(sizes), budget_mib
        self.results: list[DescriptorResult] = []
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="bench-descriptors", daemon=True)

    def run(self, timeout: float) -> list[DescriptorResult]:
        """Measure everything; returns the results (raises TimeoutError after `timeout`)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive():  # short joins: a SIGALRM must reach the main thread
            if time.monotonic() > deadline:
                raise TimeoutError(f"descriptor round trips unfinished after {timeout:.0f} s")
            self._thread.join(0.1)
        if self.error is not None:
            raise RuntimeError(self.error)
        return self.results

    def _run(self) -> None:
        sessions: dict[str, RSession] = {}
        try:
            for path in PATHS[1:]:
                sessions[path] = RSession.connect(self.server, path=path)
            self.results = [r for size in self.sizes for r in self._measure(size, sessions)]
        except Exception as exc:  # reported by run(), in the main thread
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            for session in sessions.values():
                session.Close()

    def _measure(self, size: int, sessions: dict[str, RSession]) -> list[DescriptorResult]:
        data, n = pattern(size), repeats(size, self.budget_mib)
        outs = {path: bytearray(size) for path in PATHS}
        steps: dict[str, Callable[[int], list[int]]] = {
            "copy": lambda k: time_copy(data, outs["copy"], max(k, LEAST_COPIES // ROUNDS)),
            **{path: _round_trips(session, data, outs[path])
               for path, session in sessions.items()},
        }
        times: dict[str, list[int]] = {path: [] for path in steps}
        failed: dict[str, str] = {}
        for i in range(ROUNDS):
            order = PATHS[i % len(PATHS):] + PATHS[:i % len(PATHS)]
            for path in (p for p in order if p not in failed):
                try:
                    times[path] += steps[path](max(1, n // ROUNDS))
                except Exception as exc:  # the path cannot carry it: report, measure the rest
                    failed[path] = f"{type(exc).__name__}: {exc}"
        return [_result(path, size, times[path], failed.get(path)) for path in PATHS]


def _round_trips(session: RSession, data: bytes, out: bytearray) -> Callable[[int], list[int]]:
    return lambda n: time_round_trips(session, data, out, n)


def _result(path: str, size: int, times: list[int], error: str | None) -> DescriptorResult:
    if error is not None or not times:
        return DescriptorResult(path, size, None, None, 0, error or "not measured")
    median_ns = percentile(sorted(times), 50)
    return DescriptorResult(path, size, size / 1e6 / (median_ns / 1e9), median_ns / 1000,
                            len(times))
