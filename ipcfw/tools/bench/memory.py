"""Memory: what the kernel, a server and a client process hold, and what one more client thread
with a direct connection costs them.

A `Footprint` is a process's resident set size (RSS, bytes) and its open file descriptors, read
with psutil. RSS moves in pages and with the allocator's arenas, so a cost per connection is a
difference over many connections (`per_connection`), divided by their count.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass

import psutil

from ...client import RSession
from .clients import ECHO_ARGS, ECHO_INT

DEFAULT_CONNECTIONS = 32
"""Client threads in the per-connection measurement (a server takes at most 64 direct
connections from one process: ``ipcfw.server.port.DIRECT_PER_PID``)."""


@dataclass(frozen=True)
class Footprint:
    rss: int
    fds: int


def footprint(pid: int) -> Footprint:
    process = psutil.Process(pid)
    return Footprint(process.memory_info().rss, process.num_fds())


def footprints(pids: dict[str, int]) -> dict[str, Footprint]:
    """The footprint of each process, by role."""
    return {role: footprint(pid) for role, pid in pids.items()}


@dataclass(frozen=True)
class ConnectionCost:
    connections: int
    before: dict[str, Footprint]
    after: dict[str, Footprint]

    def rss_per_connection(self) -> dict[str, float]:
        return {role: (self.after[role].rss - self.before[role].rss) / self.connections
                for role in self.before}

    def fds_per_connection(self) -> dict[str, float]:
        return {role: (self.after[role].fds - self.before[role].fds) / self.connections
                for role in self.before}


def per_connection(server: str, pids: dict[str, int], n: int, timeout: float) -> ConnectionCost:
    """The footprints of `pids` (and of this process, as "client") before and while `n` threads
    of this process each hold a direct session to `server` (its own direct connection: one per
    client thread per server process), each after one call on it."""
    roles = {**pids, "client": os.getpid()}
    holders = _Holders(server, n)
    before = footprints(roles)
    try:
        holders.start(timeout)
        return ConnectionCost(n, before, footprints(roles))
    finally:
        holders.stop(timeout)


class _Holders:
    """`n` threads, each holding a direct session until `stop`."""

    def __init__(self, server: str, n: int) -> None:
        self._server = server
        self._release = threading.Event()
        self._ready: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._hold, name=f"bench-holder-{i}",
                                          daemon=True) for i in range(n)]

    def _hold(self) -> None:
        try:
            session = RSession.connect(self._server, path="direct")
        except BaseException as exc:  # handed to the main thread
            self._ready.put(exc)
            return
        try:
            session.SendReceive(ECHO_INT, ECHO_ARGS)
            self._ready.put(None)
            self._release.wait()
        except BaseException as exc:
            self._ready.put(exc)
        finally:
            session.Close()

    def start(self, timeout: float) -> None:
        """Start the threads; return once each holds its session and made its call."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.start()
        for _ in self._threads:
            while True:  # short waits: a SIGALRM must reach the main thread
                try:
                    problem = self._ready.get(timeout=0.1)
                    break
                except queue.Empty:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"client threads not connected in {timeout:.0f} s")
            if problem is not None:
                raise problem

    def stop(self, timeout: float) -> None:
        self._release.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.ident is not None:  # (started)
                thread.join(max(0.0, deadline - time.monotonic()))
