"""A direct port's one budget of file descriptors (ipcfw.server.shm.FdBudget): its connections
and their maps of clients' memfds, one descriptor each, within `port.connection_cap()`. Real
memfds and maps, in this process; no socket, no other process.

What must hold: a map past the budget takes an idle map's place, or, with none idle, its
request is answered KErrNoMemory naming the budget; every map gives its descriptor back when
it closes (idle eviction, the connection's end)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator

import pytest

from ipcfw.errors import KErrNoMemory
from ipcfw.server.mapped import MappedDescriptor
from ipcfw.server.shm import FdBudget, Maps

SIZE = 64 * 1024


@pytest.fixture
def memfds() -> Iterator[list[int]]:
    fds = []
    for _ in range(4):
        fd = os.memfd_create("budget", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, SIZE)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        fds.append(fd)
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def test_maps_count_in_the_ports_descriptor_budget(memfds: list[int]) -> None:
    budget = FdBudget(4)
    assert budget.take()  # the connection itself
    maps = Maps(budget)
    held = [maps.take(fd, SIZE, False) for fd in memfds[:3]]
    assert all(isinstance(d, MappedDescriptor) for d in held)
    assert budget.used == 4
    refused = maps.take(memfds[3], SIZE, False)  # none idle to give its place
    assert refused == (KErrNoMemory, "the server holds its budget of 4 file descriptors "
                                     "(direct connections and their maps)")
    assert not budget.take()  # (nor may a new connection come)
    held[0].release()  # idle now: its place can be taken
    taken = maps.take(memfds[3], SIZE, False)
    assert isinstance(taken, MappedDescriptor) and len(maps) == 3 and budget.used == 4
    maps.close()
    assert budget.used == 1  # the connection's alone
