"""A client that stops itself (SIGSTOP) while a flood of answers comes its way, then reports.

Used by tests/kernel/test_slow_peers.py: it opens SESSIONS sessions, has the dam server hold 255
requests of each, asks the server to let them all go 300 ms later, and stops itself at once, so
the answers pile up in the kernel for its thread's channel. The test resumes it (SIGCONT) once
the kernel has cut the channel off; the client then prints one JSON line: what became of each
request and session, and what later calls do.
"""

import json
import os
import signal
import sys
import time

from ipcfw import IpcError, RSession, TRequestStatus
from ipcfw.errors import KErrDisconnected
from plugins.dam import EEcho, EHold, ERelease

SESSIONS = int(sys.argv[1])
PER_SESSION = 255


def main() -> None:
    lost = []
    sessions = [RSession.connect("dam", message_slots=PER_SESSION) for _ in range(SESSIONS)]
    for session in sessions:
        session.SetAbortCallback(lambda session, error: lost.append(error))
    statuses = []
    for s, session in enumerate(sessions):
        for i in range(PER_SESSION):
            status = TRequestStatus()
            session.SendReceive(EHold, (s * PER_SESSION + i,), status)
            statuses.append(status)
    control = RSession.connect("dam")
    control.SendReceive(ERelease, (300,))
    print("stopping", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
    # -- resumed ---------------------------------------------------------------------------
    deadline = time.monotonic() + 20
    for status in statuses:
        try:
            status.Wait(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            break
    answered = sum(1 for n, s in enumerate(statuses) if s.Int() == n)
    disconnected = [s for s in statuses if s.Int() == KErrDisconnected]
    reasons = set()
    for status in disconnected[:10]:
        try:
            status.result(0)
        except IpcError as exc:
            reasons.add(str(exc))
    started = time.monotonic()
    try:
        sessions[0].SendReceive(EEcho, (1,))
        later = "returned"
    except IpcError as exc:
        later = f"{type(exc).__name__} {exc.code}"
    later_seconds = time.monotonic() - started
    with RSession.connect("dam") as fresh:
        fresh_answer = fresh.SendReceive(EEcho, (7,))
    print(json.dumps({
        "requests": len(statuses),
        "answered": answered,
        "disconnected": len(disconnected),
        "pending": sum(1 for s in statuses if not s.done()),
        "other": (
            len(statuses) - answered - len(disconnected) - sum(1 for s in statuses if not s.done())
        ),
        "reasons": sorted(reasons),
        "sessions_lost": len(lost),
        "lost_codes": sorted({e.code for e in lost}),
        "later_call": later,
        "later_call_seconds": later_seconds,
        "fresh_session_answer": fresh_answer,
    }), flush=True)
    for session in [*sessions, control]:
        session.Close()


if __name__ == "__main__":
    main()
