"""What the kernel can tell anyone about itself: its counters and its tables of servers,
sessions and peer processes, as ``ipcfw ps`` shows them.

Each is one request on the calling thread's channel (no session is needed); a table comes a
page at a time (`ipcfw.protocol.SESSIONS_PAGE` rows...), each page read under the limits of
its table (`ipcfw.protocol.unpack_session_rows`...). The rows are the protocol's own
(`SessionRow`, `ServerRow`, `ProcessRow`); docs/cli.md shows what ``ipcfw ps`` makes of them.
"""

from __future__ import annotations

from typing import Any, TypeVar
from collections.abc import Callable

from .. import errors
from ..protocol import (
    ListProcesses,
    ListServers,
    ListSessions,
    Message,
    ProcessList,
    ProcessRow,
    ServerList,
    ServerRow,
    SessionList,
    SessionRow,
    Stats,
    StatsReply,
    encode,
    unpack_process_rows,
    unpack_server_rows,
    unpack_session_rows,
)
from .runtime import Runtime

__all__ = ["kernel_statistics", "kernel_sessions", "kernel_servers", "kernel_processes"]

Row = TypeVar("Row")
After = TypeVar("After", int, str)


def _ask(runtime: Runtime, message: Message, req_id: int, answer: type, timeout: float
         ) -> Any:
    reply = runtime.channel().call(encode(message), req_id, timeout)
    if type(reply) is not answer:
        raise errors.IpcError(
            errors.KErrGeneral, f"unexpected reply to {type(message).__name__}: {reply!r}"
        )
    return reply


def kernel_statistics(endpoint: str | None = None, timeout: float = 5.0) -> dict[str, int]:
    """The kernel's counters: peers, processes, servers, sessions by state, messages, slots."""
    runtime = Runtime.for_endpoint(endpoint)
    req_id = runtime.next_req_id()
    reply: StatsReply = _ask(runtime, Stats(req_id), req_id, StatsReply, timeout)
    return dict(reply.counters)


def _pages(endpoint: str | None, timeout: float, first: After,
           page: Callable[[int, After], Message], answer: type,
           unpack: Callable[[bytes], list[Row]]) -> list[Row]:
    """Every row of a table, asked a page at a time from `first` (a page's `next` is the
    `after` of the one after it; the first value again after the last)."""
    runtime = Runtime.for_endpoint(endpoint)
    rows: list[Row] = []
    after = first
    while True:
        req_id = runtime.next_req_id()
        reply = _ask(runtime, page(req_id, after), req_id, answer, timeout)
        rows += unpack(reply.rows)
        after = reply.next
        if after == first:
            return rows


def kernel_sessions(endpoint: str | None = None, timeout: float = 5.0) -> list[SessionRow]:
    """Every session the kernel holds, in handle order (what ``ipcfw ps --sessions`` lists):
    handle, server, data path, state, outstanding messages (for a direct session, with what
    its server has in service on its direct connections) and the oldest one's age, holders as
    (pid, attached threads) per process, creator pid and thread, slots, and age."""
    return _pages(endpoint, timeout, 0, ListSessions, SessionList, unpack_session_rows)


def kernel_servers(endpoint: str | None = None, timeout: float = 5.0) -> list[ServerRow]:
    """Every registered server, in the order of their names' lookup keys (what ``ipcfw ps``
    lists): name, pid, executable, version, sharing, direct, sessions, outstanding messages
    (both paths) and the oldest one's age, up time and state."""
    return _pages(endpoint, timeout, "", ListServers, ServerList, unpack_server_rows)


def kernel_processes(endpoint: str | None = None, timeout: float = 5.0) -> list[ProcessRow]:
    """Every process with a socket to the kernel, in pid order (what ``ipcfw ps --processes``
    lists): pid, uid, executable, channels, inbox, servers hosted, sessions held and
    requests outstanding."""
    return _pages(endpoint, timeout, 0, ListProcesses, ProcessList, unpack_process_rows)
