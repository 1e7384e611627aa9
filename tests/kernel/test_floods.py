"""Floods and hostile peers against a real kernel (issue #14, item 8; docs/security.md, "Floods
and hostile peers"), each in its own process, while a well-behaved client calls a real server.

Each test: a kernel with its default limits, the probe server, the well-behaved client
(tests/steady_client.py: a timed synchronous echo every 2 ms, plus checked async and descriptor
calls, on the probe), a quiet stretch, then the hostile process. It then holds the kernel to
four promises:

* it stays up, and still serves a new client afterwards;
* its RSS grows by at most `RSS_BOUND` while the hostile peer does its worst (sampled before,
  during and after);
* the well-behaved client loses nothing: every call answered, once, with the right value;
* the client's p99 round trip during the flood is within `P99_FACTOR` times its p99 in the
  quiet stretch just before, on the same machine in the same test.

The hostile clients of cases 2 and 3 use a server of their own (dam): a server serves its
sessions' requests in the order they come, as Symbian's did, so a client that floods the
well-behaved client's own server delays it there, in the server's queue, whatever the kernel
does (the per-process limits bound how much). What is measured here is the kernel's fairness.

The machine is small and shared (2 cores, and other test runs beside this one), so two choices
keep the latency comparison about the kernel rather than the OS scheduler; both are stated here
rather than hidden in a loose bound:

* The hostile process runs at nice 19, and so does its server (dam), which works only for it.
  It sends as fast as it can, and unniced it would take a whole core from the client, the
  server and the kernel alike: that measures the scheduler. Niced, it still sends faster than
  the kernel takes (the kernel's socket pushes back on it), so the kernel works flat out on its
  frames throughout.
* The quiet p99 is floored at `QUIET_FLOOR` (4 ms). A flood keeps the kernel's two threads
  (its loop, and libzmq's I/O thread) busy, which on 2 cores is both of them, and a call on the
  kernel path is handed from thread to thread about twelve times (in each of the client, the
  kernel twice and the server, from the Python thread to zmq's I/O thread and back), each of
  which may wait out a running thread's slice (1.5-3 ms with Linux's EEVDF scheduler). So a
  fair kernel still shows a p99 of several ms under a flood here, from the scheduler alone:
  measured, 4-8 ms on the direct path, which the kernel does not touch, and 13-20 ms on the
  kernel path under the garbage flood (the hardest on the kernel's I/O thread) during full
  test runs on a machine busy with other work too. Against a quiet p99 of 0.5 ms, 5x would fail
  on that; 5 x 4 ms = 20 ms still fails a kernel that serves a flooding peer first (draining
  the 1,000 frames its socket queues for one peer, `receive_hwm`, takes 10-15 ms, twice per
  call), and tests/kernel/test_fair_drain.py holds the drain's fairness to a number without
  any clock.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass

import psutil
import pytest

from conftest import TESTS, KernelFixture, wait_until
from ipcfw import testing

pytestmark = [pytest.mark.process, pytest.mark.usefixtures("data_path")]

PROBE = "plugins.probe:ProbeServer"  # the well-behaved client's server
DAM = "plugins.dam:DamServer"  # the hostile clients' (see the module's docstring)
P99_FACTOR = 5.0  # the bound
QUIET_FLOOR = 0.004  # seconds: see the module's docstring
QUIET = 3.0  # seconds of quiet calls measured before the flood
# Timed calls each stretch must have for its p99 to mean something: with 800, the p99 is the
# 8th slowest call, which one hiccup of the machine cannot make alone. So the floods last a
# few seconds: the garbage is 400,000 frames, four times the 100,000.
LEAST_CALLS = 800
#: The kernel's RSS may grow by this much over a flood. Measured: +3.6-3.9 MiB for the garbage,
#: +5.3 MiB for the unread answers (the backlog up to its cut-off), +10.9 MiB for 10,000
#: sessions, +4-6 MiB for the routing-id peers. 64 MiB leaves room for the allocator's moods and
#: still catches a leak of 200 bytes per malformed frame or per unread answer.
RSS_BOUND = 64 * 1024 * 1024


@dataclass
class Stretch:
    """The well-behaved client's timed calls in one stretch of time."""

    latencies: list[float]

    @property
    def p99(self) -> float:
        return statistics.quantiles(self.latencies, n=100)[98]

    def __str__(self) -> str:
        return (f"{len(self.latencies)} calls, median {statistics.median(self.latencies) * 1e3:.2f}"
                f" ms, p99 {self.p99 * 1e3:.2f} ms, max {max(self.latencies) * 1e3:.2f} ms")


class Bystander:
    """The well-behaved client process (tests/steady_client.py) and what it measured."""

    def __init__(self, kernel: KernelFixture) -> None:
        self.result_path = kernel.workdir / "steady.json"
        self.stop_path = kernel.workdir / "steady.stop"
        self.process = kernel.spawn_client(
            [str(TESTS / "steady_client.py"), str(self.result_path), str(self.stop_path)],
            label="steady",
        )
        line = wait_until(lambda: _line(self.process, "connected ") or not self.process.alive(),
                          what="the well-behaved client to connect")
        assert isinstance(line, str), self.process.log()
        self.routing_id = line.split()[1]  # its channel's, in hex
        self.result: dict = {}

    def finish(self) -> None:
        """Stop calling; check that every call was answered rightly."""
        self.stop_path.touch()
        wait_until(lambda: not self.process.alive(), timeout=30,
                   what="the well-behaved client to finish")
        assert self.process.returncode == 0, self.process.log()[-3000:]
        self.result = json.loads(self.result_path.read_text())
        assert not self.result["errors"], self.result["errors"][:10]

    def stretch(self, start: float, end: float) -> Stretch:
        return Stretch([seconds for began, seconds in self.result["samples"]
                        if start <= began < end])


class Hostile:
    """A hostile process (tests/hostile_*.py), niced (see the module's docstring)."""

    def __init__(self, kernel: KernelFixture, script: str, *args: str) -> None:
        self.process = kernel.stack.spawn(
            ["nice", "-n", "19", sys.executable, str(TESTS / script), *args], script
        )
        self.summary: dict = {}

    def started(self) -> float:
        """When its flood began (its clock, `time.monotonic()`, is the machine's)."""
        line = wait_until(lambda: _line(self.process, "flooding ") or not self.process.alive(),
                          timeout=30, what="the hostile process to start")
        assert isinstance(line, str), self.process.log()[-3000:]
        return float(line.split()[1])

    def report(self, rss: RssWatch, timeout: float = 40) -> dict:
        """Wait for its JSON line (sampling the kernel's RSS meanwhile); its summary, checked."""
        deadline = time.monotonic() + timeout
        while not _line(self.process, "{") and self.process.alive():
            rss.sample()
            assert time.monotonic() < deadline, "the hostile process did not report"
            time.sleep(0.05)
        line = _line(self.process, "{")
        assert line, self.process.log()[-5000:]
        self.summary = json.loads(line)
        assert not self.summary["problems"], self.summary["problems"][:10]
        return self.summary

    def finish(self, rss: RssWatch) -> None:
        """Wait for it to exit by itself, successfully."""
        wait_until(lambda: rss.sample() or not self.process.alive(), timeout=30,
                   what="the hostile process to exit")
        assert self.process.returncode == 0, self.process.log()[-5000:]


def _nice(process: testing.Process) -> None:
    """Nice every thread `process` has (its later threads inherit it) to the hostile's 19."""
    for thread in os.listdir(f"/proc/{process.pid}/task"):
        os.setpriority(os.PRIO_PROCESS, int(thread), 19)


def _line(process: testing.Process, prefix: str) -> str | None:
    """The first line of `process`'s output that starts with `prefix`."""
    return next((line for line in process.log().splitlines() if line.startswith(prefix)), None)


class RssWatch:
    """The kernel process's resident memory: before the flood, and the most seen since."""

    def __init__(self, kernel: KernelFixture) -> None:
        self.process = psutil.Process(kernel.process.pid)
        self.before = self.process.memory_info().rss
        self.peak = self.before

    def sample(self) -> None:
        self.peak = max(self.peak, self.process.memory_info().rss)
        return None

    def grown(self) -> int:
        self.sample()
        return self.peak - self.before


def _quiet_stretch() -> tuple[float, float]:
    """Let the client call undisturbed for `QUIET` seconds (after a moment's warm-up)."""
    start = time.monotonic() + 0.3
    time.sleep(0.3 + QUIET)
    return start, time.monotonic()


def _assert_unaffected(quiet: Stretch, during: Stretch) -> None:
    assert len(quiet.latencies) >= LEAST_CALLS, f"quiet: {quiet}"
    assert len(during.latencies) >= LEAST_CALLS, f"during the flood: {during}"
    bound = P99_FACTOR * max(quiet.p99, QUIET_FLOOR)
    assert during.p99 <= bound, (
        f"p99 during the flood {during.p99 * 1e3:.2f} ms > {bound * 1e3:.2f} ms;\n"
        f"quiet: {quiet}\nduring: {during}"
    )


def _assert_serving(kernel: KernelFixture) -> None:
    """The kernel is up and a new client's session works."""
    assert kernel.process.alive(), kernel.process.log()[-5000:]
    fresh = kernel.client(["-c", "from ipcfw import RSession\n"
                                 "with RSession.connect('probe') as s: "
                                 "print(s.SendReceive(1, (42,), timeout=10))"])
    assert fresh.stdout.strip() == "42", fresh.stderr[-3000:]
    log = kernel.process.log()
    assert "Traceback" not in log and "invariant" not in log, log[-5000:]


@dataclass
class Flooded:
    """What one flood did: the hostile process, its summary, and the measurements around it."""

    hostile: Hostile
    summary: dict
    quiet: Stretch
    during: Stretch
    rss: RssWatch


def _flood(kernel: KernelFixture, script: str, *, victim: bool = False,
           stays: bool = False) -> Flooded:
    """The probe and dam servers, the well-behaved client (on the probe), a quiet stretch, then
    the hostile `script` (given the client's channel's routing id if `victim`) until it reports
    (and exits, unless it `stays`); checks that the client lost nothing."""
    kernel.serve(PROBE, "probe")
    _nice(kernel.serve(DAM, "dam"))  # (the hostile peers' server: see the module's docstring)
    bystander = Bystander(kernel)
    quiet_from, quiet_to = _quiet_stretch()
    rss = RssWatch(kernel)
    hostile = Hostile(kernel, script, kernel.endpoint,
                      *([bystander.routing_id] if victim else []))
    hostile.started()
    summary = hostile.report(rss)
    if not stays:
        hostile.finish(rss)
    bystander.finish()
    flooded = Flooded(hostile, summary, bystander.stretch(quiet_from, quiet_to),
                      bystander.stretch(summary["started"], summary["ended"]), rss)
    print(f"\n{script}: quiet {flooded.quiet}; during {flooded.during}; kernel RSS "
          f"{rss.before >> 20} MiB, grown {rss.grown() / 2**20:.1f} MiB; "
          f"{summary['ended'] - summary['started']:.1f} s")
    return flooded


def _assert_everything_freed(kernel: KernelFixture) -> None:
    """Every session, message and slot is gone; the two servers' processes are all it knows."""
    expected = {"sessions": 0, "messages": 0, "pool_used": 0, "servers": 2, "processes": 3}

    def freed() -> bool:
        stats = kernel.statistics()
        return {name: stats[name] for name in expected} == expected

    wait_until(freed, timeout=30,
               what=f"the kernel's statistics to come back to {expected}, not "
                    f"{ {name: kernel.statistics()[name] for name in expected} }")


def _assert_kernel_kept_its_promises(kernel: KernelFixture, flooded: Flooded) -> None:
    _assert_unaffected(flooded.quiet, flooded.during)
    assert flooded.rss.grown() <= RSS_BOUND, f"{flooded.rss.grown() >> 20} MiB"
    _assert_serving(kernel)


# -- 1. malformed frames (400,000: the issue asks for 100,000) -----------------------------------


def test_100000_malformed_frames(kernel: KernelFixture) -> None:
    flooded = _flood(kernel, "hostile_garbage.py")
    # (The kernel answered none of it: the hostile process checks.)
    assert flooded.summary["frames"] >= 100_000
    _assert_kernel_kept_its_promises(kernel, flooded)


# -- 2. a peer that never reads its completions ---------------------------------------------------


def test_a_peer_that_never_reads_its_completions_is_cut_off(kernel: KernelFixture) -> None:
    flooded = _flood(kernel, "hostile_unread.py")
    summary = flooded.summary
    # It hit the backlog cut-off: the kernel told it so, behind the answers it had not read,
    # having left max_backlog (120,000 by default) frames unread.
    assert summary["dropped"] is not None and summary["dropped"] >= 120_000, summary
    log = kernel.process.log()
    assert log.count("stopped serving the channel socket") == 1, log[-3000:]
    _assert_kernel_kept_its_promises(kernel, flooded)
    _assert_everything_freed(kernel)


# -- 3. a peer that opens sessions until refused ---------------------------------------------------


def test_a_peer_that_opens_sessions_until_refused_is_refused_alone(kernel: KernelFixture) -> None:
    flooded = _flood(kernel, "hostile_sessions.py", stays=True)
    summary = flooded.summary
    assert summary["sessions"] == 10_000 and summary["refused"] >= 50, summary  # the default
    assert "limit of sessions" in summary["library"], summary  # the clear error
    assert kernel.statistics()["sessions"] == 10_000
    _assert_kernel_kept_its_promises(kernel, flooded)
    flooded.hostile.process.kill(signal.SIGKILL)
    _assert_everything_freed(kernel)
    assert flooded.rss.grown() <= RSS_BOUND


# -- 4. routing-id collisions ----------------------------------------------------------------------


def test_routing_id_collisions_neither_abort_the_kernel_nor_reach_the_victim(
    kernel: KernelFixture,
) -> None:
    # Before the kernel seeded rand() (ipcfw/kernel/autoids.py), the first peer without a
    # routing id aborted it: libzmq's assertion that its auto id was free.
    flooded = _flood(kernel, "hostile_routing.py", victim=True)
    assert flooded.summary["answered"] > 0
    _assert_kernel_kept_its_promises(kernel, flooded)
    _assert_everything_freed(kernel)
