"""A hostile process for tests/kernel/test_floods.py: a client that opens sessions until the
kernel refuses it, then holds them until it is killed.

    python tests/hostile_sessions.py ENDPOINT

A raw channel (a DEALER with a random routing id) says Hello and connects to the dam server
(tests/plugins/dam.py) as fast as the answers come, `WINDOW` connects in flight, until the
kernel has refused `REFUSALS` of them (KErrOverflow: the kernel's `sessions_per_process`), and
for `LEAST` seconds at least.
Then the client library, in the same process, tries once more and must be refused with an
error that names the limit.

It prints ``flooding`` with its clock at the first connect and, once refused, one JSON line:
``{"started", "ended", "sessions", "refused", "refusal", "library", "problems"}``; then it holds its
sessions until the test kills it (SIGKILL), or `HOLD` seconds.
"""

from __future__ import annotations

import sys
import time

from hostile_flood import Flood, RawPeer, report
from ipcfw import Overflow, RSession
from ipcfw.errors import KErrNone, KErrOverflow
from ipcfw.protocol import Connect, Connected, Role

WINDOW = 64  # connects in flight at once
REFUSALS = 50
LEAST = 4.0  # seconds it goes on connecting, refused or not
LIMIT = 1_000_000  # connects at most, whatever the kernel's limit
HOLD = 60.0


def run(flood: Flood, peer: RawPeer) -> dict:
    problems = flood.problems
    peer.hello(Role.CHANNEL)
    sessions = refused = sent = 0
    first_refusal = ""
    print(f"flooding {time.monotonic()}", flush=True)
    started = time.monotonic()
    while ((refused < REFUSALS or time.monotonic() - started < LEAST)
           and sent < LIMIT and not problems):
        while sent - sessions - refused < WINDOW:
            sent += 1
            peer.send_message(Connect(sent, "dam", (1, 0, 0), 0, b""))
        reply = peer.wait_for("a Connected", lambda m: type(m) is Connected)
        if reply is None:
            break
        if reply.result == KErrNone:
            sessions += 1
        elif reply.result == KErrOverflow:
            refused += 1
            first_refusal = first_refusal or reply.text
        else:
            problems.append(f"connect {reply.req_id}: {reply!r}")
    while sent - sessions - refused > 0 and not problems:  # the ones still in flight
        reply = peer.wait_for("a Connected", lambda m: type(m) is Connected)
        if reply is None:
            break
        sessions += reply.result == KErrNone
        refused += reply.result != KErrNone
    ended = time.monotonic()
    library = "not refused"
    try:
        RSession.connect("dam", endpoint=flood.endpoint, timeout=10).Close()
    except Overflow as exc:
        library = str(exc)
    return {"started": started, "ended": ended, "sessions": sessions, "refused": refused,
            "refusal": first_refusal, "library": library, "problems": problems}


def main(argv: list[str]) -> int:
    flood = Flood(argv[1])
    peer = RawPeer(flood, "sessions channel")  # (its socket, so its sessions, live till the end)
    summary = run(flood, peer)
    status = report(summary)
    if not status:
        time.sleep(HOLD)  # holding every session, until killed
    flood.close()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
