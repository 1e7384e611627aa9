"""Sessions opened and closed thousands of times leave nothing behind (issue 11, item 8).

Each cycle opens a direct session to the echo server, makes one call on it and closes it. After
a warm-up (the allocators and the tables reach their working size), `CYCLES` more cycles may
not grow the kernel's or the server's RSS by more than `RSS_BOUND` (so a leak of more than
RSS_BOUND / CYCLES, about 200 bytes, per session is caught) nor their open descriptors by more
than `FD_BOUND` (a leak of one per session would be thousands), and the kernel must end with
no session at all. ``ipcfw bench --churn 100000`` runs the full count and reports the same
figures; this test bounds them.
"""

from __future__ import annotations

import psutil
import pytest

from conftest import KernelFixture, wait_until
from ipcfw import RSession

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

WARM_UP = 500
CYCLES = 5000
RSS_BOUND = 1 << 20
FD_BOUND = 2
"""Room for a descriptor the loops open for their own reasons (none per session)."""


def cycle(n: int, endpoint: str) -> None:
    for i in range(n):
        with RSession.connect("echo", endpoint=endpoint, path="direct") as session:
            assert session.SendReceive(1, (i,)) == i


def footprint(process: psutil.Process) -> tuple[int, int]:
    return process.memory_info().rss, process.num_fds()


def test_direct_sessions_opened_and_closed_leave_nothing_behind(kernel: KernelFixture) -> None:
    server = kernel.serve("servers.echo:EchoServer", "echo")
    processes = {"kernel": psutil.Process(kernel.process.pid), "server": psutil.Process(server.pid)}
    with RSession.connect("echo", endpoint=kernel.endpoint, path="direct"):
        assert kernel.statistics()["sessions_direct"] == 1  # the direct path was granted
    cycle(WARM_UP, kernel.endpoint)
    wait_until(lambda: kernel.statistics()["sessions"] == 0, what="the warm-up's sessions to go")
    before = {name: footprint(p) for name, p in processes.items()}

    cycle(CYCLES, kernel.endpoint)

    wait_until(lambda: kernel.statistics()["sessions"] == 0, what="every session to go")
    after = {name: footprint(p) for name, p in processes.items()}
    for name in processes:
        (rss_before, fds_before), (rss_after, fds_after) = before[name], after[name]
        assert rss_after - rss_before <= RSS_BOUND, (name, rss_before, rss_after)
        assert fds_after - fds_before <= FD_BOUND, (name, fds_before, fds_after)
    counts = kernel.statistics()
    assert counts["sessions"] == counts["messages"] == counts["attached"] == 0, counts
