"""Soak: a million requests over sessions that open and close, from several client processes,
against a kernel and an echo server started for the run; the kernel's and the server's memory
before and after, and every answer checked.

    python scripts/soak.py                       # 1,000,000 requests, 4 client processes
    python scripts/soak.py --requests 100000 --path kernel

A warm-up (a tenth of the requests) runs first; memory is read after it and at the end, and the
growth between must stay under 10% (exit status 1 otherwise, or on any wrong or lost answer).
Each client opens a session, makes `--per-session` calls (synchronous and, in windows of 16,
asynchronous), checks each answer, and closes it; then the next. Not a CI test: it takes
minutes. Its results go in the closing note of the session that ran it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import deque
from typing import Any

import psutil

from ipcfw import RSession, TRequestStatus
from ipcfw.testing import Stack

ECHO = "ipcfw.tools.bench.echo:EchoServer"
EEchoInt = 1
WINDOW = 16


def client(endpoint: str, requests: int, per_session: int, seed: int) -> dict[str, int]:
    """One client process's share: sessions opened, answers right, wrong and lost."""
    done = wrong = lost = sessions = 0
    value = seed * 1_000_000_000 % (2**31 - 1)
    while done < requests:
        with RSession.connect("echo", (1, 0, 0), WINDOW, endpoint=endpoint) as session:
            sessions += 1
            calls = min(per_session, requests - done)
            half = calls // 2
            for _ in range(half):  # synchronous
                value = (value + 7919) % (2**31 - 1)
                wrong += session.SendReceive(EEchoInt, (value,)) != value
            pending: deque[tuple[TRequestStatus, int]] = deque()
            for _ in range(calls - half):  # asynchronous, WINDOW in flight
                value = (value + 7919) % (2**31 - 1)
                status = TRequestStatus()
                session.SendReceive(EEchoInt, (value,), status)
                pending.append((status, value))
                if len(pending) >= WINDOW:
                    wrong, lost = _settle(pending.popleft(), wrong, lost)
            while pending:
                wrong, lost = _settle(pending.popleft(), wrong, lost)
            done += calls
    return {"requests": done, "sessions": sessions, "wrong": wrong, "lost": lost}


def _settle(item: tuple[TRequestStatus, int], wrong: int, lost: int) -> tuple[int, int]:
    status, expected = item
    try:
        got = status.Wait(30)
    except TimeoutError:
        return wrong, lost + 1
    return wrong + (got != expected), lost


def run_clients(endpoint: str, clients: int, requests: int, per_session: int,
                path: str) -> dict[str, int]:
    """`clients` processes sharing `requests`; their totals."""
    share = requests // clients
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--client", endpoint, str(share), str(per_session),
             str(index + 1)],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "IPCFW_PATH": path},
        )
        for index in range(clients)
    ]
    totals: dict[str, int] = {"requests": 0, "sessions": 0, "wrong": 0, "lost": 0}
    for child in children:
        out, _ = child.communicate(timeout=3600)
        if child.returncode != 0:
            raise SystemExit(f"a client failed (exit status {child.returncode})")
        for key, count in json.loads(out.strip().splitlines()[-1]).items():
            totals[key] += count
    return totals


def memory(stack: Stack) -> dict[str, int]:
    """RSS of the kernel and of the server, in bytes."""
    server, kernel = stack.servers[0], stack.kernel
    assert kernel is not None
    return {"kernel": psutil.Process(kernel.pid).memory_info().rss,
            "server": psutil.Process(server.pid).memory_info().rss}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.client:
        endpoint, requests, per_session, seed = args.client
        print(json.dumps(client(endpoint, int(requests), int(per_session), int(seed))))
        return 0
    with Stack() as stack:
        stack.serve(ECHO)
        warm = args.requests // 10
        started = time.monotonic()
        warm_totals = run_clients(stack.endpoint, args.clients, warm, args.per_session, args.path)
        before = memory(stack)
        totals = run_clients(stack.endpoint, args.clients, args.requests - warm,
                             args.per_session, args.path)
        after = memory(stack)
        seconds = time.monotonic() - started
        statistics = stack.statistics()
    for key in totals:
        totals[key] += warm_totals[key]
    growth = {name: (after[name] - before[name]) / before[name] for name in before}
    report: dict[str, Any] = {
        **totals, "seconds": round(seconds, 1), "path": args.path, "clients": args.clients,
        "rss_after_warm_up": before, "rss_at_end": after,
        "growth": {k: round(v, 4) for k, v in growth.items()},
        "kernel_at_end": {k: statistics[k] for k in ("sessions", "messages", "pool_used")},
    }
    print(json.dumps(report, indent=2))
    ok = (not totals["wrong"] and not totals["lost"] and all(g < 0.10 for g in growth.values())
          and totals["requests"] >= args.requests - args.clients)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--per-session", type=int, default=200,
                        help="calls on each session before it is closed (default 200)")
    parser.add_argument("--path", choices=("direct", "kernel"), default="direct")
    parser.add_argument("--client", nargs=4, help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    sys.exit(main())
