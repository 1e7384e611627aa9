"""``ipcfw ps``: what a running kernel holds, as tables or JSON.

Views (docs/cli.md shows each): the servers, then one line of the kernel's counters
(``--counters``: all of them); ``--sessions``; ``--processes``; ``--older-than SECONDS``
keeps only the servers and sessions holding a message outstanding longer than that. Each
takes ``--json``. The rows come from the kernel (`ipcfw.client.introspect`); everything here
but `run` is pure: rows in, text or JSON-ready dicts out (tests/test_ps_format.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from collections.abc import Callable, Sequence

from ..protocol import Path, ProcessRow, ServerRow, SessionRow, TServerType

__all__ = [
    "run", "format_servers", "format_sessions", "format_processes", "format_summary",
    "format_counters", "server_json", "session_json", "process_json", "older_than",
    "format_age", "sharing_name", "slots_text",
]

_SHARING = {
    int(TServerType.EUnsharableSessions): "unsharable",
    int(TServerType.ESharableSessions): "sharable",
    int(TServerType.EGlobalSharableSessions): "global",
}


def format_age(ms: int) -> str:
    """A duration for a table: ``850ms``, ``2.3s``, ``1m05s``, ``2h03m``, ``3d04h``."""
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f}s"
    seconds = ms // 1000
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def sharing_name(sharing: int) -> str:
    """A server's sharing (`TServerType`) as ps shows it."""
    return _SHARING.get(sharing, str(sharing))


def slots_text(used: int, slots: int) -> str:
    """A session's slots in use and its slots: ``1/4``, ``0/pool`` (-1: the kernel's pool),
    ``0/sync`` (0: sync calls only)."""
    total = {-1: "pool", 0: "sync"}.get(slots, str(slots))
    return f"{used}/{total}"


def _oldest(outstanding: int, oldest: int) -> str:
    return format_age(oldest) if outstanding else "-"


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    table = [header, *lines]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    return "\n".join(
        ("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1])
        .rstrip()
        for line in table
    )


def format_servers(rows: list[ServerRow]) -> str:
    """The server table: one line per server."""
    if not rows:
        return "no server is registered"
    return _table(
        ("SERVER", "PID", "VERSION", "SHARING", "DIRECT", "SESSIONS", "OUTSTANDING", "OLDEST",
         "UP", "STATE", "EXECUTABLE"),
        [(row.name, str(row.pid), ".".join(map(str, row.version)), sharing_name(row.sharing),
          "yes" if row.direct else "no", str(row.sessions), str(row.outstanding),
          _oldest(row.outstanding, row.oldest), format_age(row.up), row.state, row.exe or "?")
         for row in rows],
    )


def format_sessions(rows: list[SessionRow]) -> str:
    """The session table: one line per session; the creator as pid/thread (the thread's native
    id; ``?`` when its client did not say), holders as pid/threads attached."""
    if not rows:
        return "no session is open"
    lines = []
    for row in rows:
        holders = " ".join(f"{pid}/{threads}" for pid, threads in row.holders) or "-"
        creator = f"{row.creator_pid}/{row.creator_thread or '?'}"
        lines.append((f"0x{row.handle:x}", row.server, Path(row.path).name.lower(), row.state,
                      creator, slots_text(row.slots_used, row.slots), str(row.outstanding),
                      _oldest(row.outstanding, row.oldest), format_age(row.age), holders))
    return _table(("SESSION", "SERVER", "PATH", "STATE", "CREATOR", "SLOTS", "OUTSTANDING",
                   "OLDEST", "AGE", "HOLDERS (pid/threads)"), lines)


def roles(row: ProcessRow) -> list[str]:
    """What a process is to the kernel: ``client`` (it has client threads' channels or an
    inbox), and ``server NAME`` for each server it hosts."""
    found = ["client"] if row.channels or row.inbox else []
    return found + [f"server {name}" for name in row.servers]


def format_processes(rows: list[ProcessRow]) -> str:
    """The process table: one line per process with a socket to the kernel."""
    if not rows:
        return "no process is connected"
    return _table(
        ("PID", "UID", "ROLES", "CHANNELS", "SESSIONS", "OUTSTANDING", "EXECUTABLE"),
        [(str(row.pid), str(row.uid), ", ".join(roles(row)) or "-", str(row.channels),
          str(row.sessions), str(row.outstanding), row.exe or "?") for row in rows],
    )


def format_summary(counters: dict[str, int]) -> str:
    """The kernel's counters in one line (``--counters`` shows each)."""
    def count(key: str, one: str, many: str) -> str:
        n = counters.get(key, 0)
        return f"{n} {one if n == 1 else many}"

    return (
        f"kernel: {count('processes', 'process', 'processes')} "
        f"({count('peers', 'socket', 'sockets')}), {count('servers', 'server', 'servers')}, "
        f"{count('sessions', 'session', 'sessions')} ({counters.get('sessions_open', 0)} open, "
        f"{counters.get('sessions_direct', 0)} direct), "
        f"{count('messages', 'message', 'messages')} outstanding through it, "
        f"pool slots {counters.get('pool_used', 0)}/{counters.get('pool_slots', 0)} used; "
        f"all {len(counters)} counters: ipcfw ps --counters"
    )


def format_counters(counters: dict[str, int]) -> str:
    """Every counter, one per line: name, count."""
    width = max((len(name) for name in counters), default=0)
    return "\n".join(f"{name:<{width}}  {count}" for name, count in counters.items())


def older_than(rows: list[Any], seconds: float) -> list[Any]:
    """The rows (servers or sessions) holding a message outstanding longer than `seconds`."""
    return [row for row in rows if row.outstanding and row.oldest > seconds * 1000]


def server_json(row: ServerRow) -> dict[str, Any]:
    """A server as ``ipcfw ps --json`` gives it."""
    return {
        "name": row.name, "pid": row.pid, "exe": row.exe, "version": list(row.version),
        "sharing": sharing_name(row.sharing), "direct": row.direct, "sessions": row.sessions,
        "outstanding": row.outstanding, "oldest_ms": row.oldest if row.outstanding else None,
        "up_ms": row.up, "state": row.state,
    }


def session_json(row: SessionRow) -> dict[str, Any]:
    """A session as ``ipcfw ps --sessions --json`` gives it."""
    return {
        "handle": row.handle, "server": row.server, "path": Path(row.path).name.lower(),
        "state": row.state,
        "creator": {"pid": row.creator_pid, "thread": row.creator_thread or None},
        "holders": [{"pid": pid, "threads": threads} for pid, threads in row.holders],
        "slots_used": row.slots_used,
        "slots": {-1: "pool"}.get(row.slots, row.slots),
        "outstanding": row.outstanding, "oldest_ms": row.oldest if row.outstanding else None,
        "age_ms": row.age,
    }


def process_json(row: ProcessRow) -> dict[str, Any]:
    """A process as ``ipcfw ps --processes --json`` gives it."""
    return {
        "pid": row.pid, "uid": row.uid, "exe": row.exe, "roles": roles(row),
        "channels": row.channels, "inbox": row.inbox, "servers": list(row.servers),
        "sessions": row.sessions, "outstanding": row.outstanding,
    }


def run(args: argparse.Namespace) -> int:
    """``ipcfw ps`` with its parsed options (`args.sessions`, `args.processes`,
    `args.older_than`, `args.counters`, `args.json`, `args.endpoint`)."""
    from ..client import kernel_processes, kernel_servers, kernel_sessions, kernel_statistics
    from .activatable import format_activatable, kernel_activatable

    if args.older_than is not None and (args.processes or args.counters):
        print("ipcfw ps: --older-than lists servers and sessions; it does not go with "
              f"{'--processes' if args.processes else '--counters'}", file=sys.stderr)
        return 2
    endpoint = args.endpoint
    out: dict[str, Any] = {}
    text: list[str] = []
    if args.processes:
        processes = kernel_processes(endpoint)
        out["processes"] = [process_json(row) for row in processes]
        text.append(format_processes(processes))
    elif args.older_than is not None:
        sessions = older_than(kernel_sessions(endpoint), args.older_than)
        if not args.sessions:
            servers = older_than(kernel_servers(endpoint), args.older_than)
            out["servers"] = [server_json(row) for row in servers]
            text.append(format_servers(servers) if servers else
                        f"no server holds a message older than {args.older_than:g} s")
        out["sessions"] = [session_json(row) for row in sessions]
        text.append(format_sessions(sessions) if sessions else
                    f"no session holds a message older than {args.older_than:g} s")
    elif args.sessions:
        sessions = kernel_sessions(endpoint)
        out["sessions"] = [session_json(row) for row in sessions]
        text.append(format_sessions(sessions))
    elif args.counters:
        counters = kernel_statistics(endpoint)
        out["kernel"] = counters
        text.append(format_counters(counters))
    else:
        servers = kernel_servers(endpoint)
        counters = kernel_statistics(endpoint)
        out["servers"] = [server_json(row) for row in servers]
        out["kernel"] = counters
        text += [format_servers(servers), format_summary(counters)]
        services = kernel_activatable(endpoint)  # (ipcfw kernel --services)
        if services:
            out["activatable"] = [{"name": name, "state": state} for name, state in services]
            text.append(format_activatable(services))
    print(json.dumps(out, indent=2) if args.json else "\n\n".join(text))
    return 0


def add_arguments(parser: argparse.ArgumentParser,
                  seconds: Callable[[str], float] = float) -> None:
    """``ipcfw ps``'s options (tools/cli.py registers the command); `seconds` reads a number
    of seconds (the command's own argparse type for them)."""
    view = parser.add_mutually_exclusive_group()
    view.add_argument("--sessions", action="store_true",
                      help="one line per session: handle, server, path, state, creator, slots, "
                           "outstanding messages and the oldest's age, age, holders")
    view.add_argument("--processes", action="store_true",
                      help="one line per process connected to the kernel: pid, uid, roles, "
                           "channels, sessions held, outstanding requests, executable")
    view.add_argument("--counters", action="store_true",
                      help="every counter of the kernel, one per line")
    parser.add_argument("--older-than", type=seconds, metavar="SECONDS",
                        help="only the servers and sessions (with --sessions: only the "
                             "sessions) holding a message outstanding longer than SECONDS")
    parser.add_argument("--json", action="store_true",
                        help="print the view as JSON (its shape: docs/cli.md)")
