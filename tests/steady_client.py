"""A well-behaved client for the flood tests (tests/kernel/test_floods.py): it calls the probe
server at a steady pace, checks every answer, and times its own round trips.

    python tests/steady_client.py RESULT_PATH STOP_PATH

Once connected it prints ``connected RID`` (RID: its thread's channel's routing id, in hex);
then, every `PERIOD` seconds, a synchronous echo of a new number (timed), and every tenth turn
also an asynchronous echo and a descriptor write (checked, not timed), until STOP_PATH exists
(or `DEADLINE` passes). It then writes RESULT_PATH:
``{"calls": N, "errors": [...], "samples": [[start, seconds], ...]}``, where each sample is one
synchronous echo: when it started (``time.monotonic()``, the same clock in every process on the
machine, so the test can place it before or during a flood) and how long it took. Every call
has a timeout; an error is recorded, never raised, and the client goes on. The data path is
the environment's (``IPCFW_PATH``).
"""

from __future__ import annotations

import json
import os
import sys
import time

from ipcfw import RSession, TRequestStatus
from ipcfw.client.runtime import Runtime
from plugins.probe import EEcho, ETryWrite

PERIOD = 0.002  # seconds between the starts of two turns: 500 timed calls a second
DEADLINE = 50.0  # seconds the client runs at most, whatever happens
CALL_TIMEOUT = 10.0


def run(stop_path: str) -> dict:
    samples: list[list[float]] = []
    errors: list[str] = []
    calls = 0
    ends = time.monotonic() + DEADLINE
    with RSession.connect("probe") as session:
        channel = Runtime.for_endpoint().channel()  # (its routing id: a victim to impersonate)
        print(f"connected {channel.routing_id.hex()}", flush=True)
        turn = 0
        next_turn = time.monotonic()
        while not os.path.exists(stop_path) and time.monotonic() < ends:
            turn += 1
            try:
                started = time.monotonic()
                value = session.SendReceive(EEcho, (turn,), timeout=CALL_TIMEOUT)
                samples.append([started, time.monotonic() - started])
                calls += 1
                if value != turn:
                    errors.append(f"echo {turn} answered {value}")
                if turn % 10 == 0:
                    calls += 2
                    errors.extend(_checked_calls(session, turn))
            except Exception as exc:  # noqa: BLE001 - recorded: the test reports every one
                errors.append(f"turn {turn}: {type(exc).__name__}: {exc}")
            next_turn += PERIOD
            pause = next_turn - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            else:
                next_turn = time.monotonic()  # late (a slow call): no burst to catch up
    return {"calls": calls, "errors": errors, "samples": samples}


def _checked_calls(session: RSession, turn: int) -> list[str]:
    """An asynchronous echo and a descriptor write; what was wrong with their answers."""
    problems = []
    status = TRequestStatus()
    session.SendReceive(EEcho, (turn + 1_000_000,), status)
    if status.result(timeout=CALL_TIMEOUT) != turn + 1_000_000:
        problems.append(f"async echo {turn + 1_000_000} answered {status.Int()}")
    buffer = bytearray(b"zz" + bytes(6))
    answer = session.SendReceive(ETryWrite, (b"abcd", buffer, 2), timeout=CALL_TIMEOUT)
    if answer != 0 or buffer != b"zzabcd":
        problems.append(f"descriptor write answered {answer} with {bytes(buffer)!r}")
    return problems


def main(argv: list[str]) -> int:
    result_path, stop_path = argv[1], argv[2]
    result = run(stop_path)
    with open(result_path + ".tmp", "w") as file:
        json.dump(result, file)
    os.replace(result_path + ".tmp", result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
