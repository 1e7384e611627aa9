"""A hostile process for tests/kernel/test_floods.py: a client that sends requests and never
reads their completions.

    python tests/hostile_unread.py ENDPOINT [COUNT]

A raw channel (a DEALER with a random routing id, as every ipcfw peer's) says Hello, connects
to the dam server (tests/plugins/dam.py) on the kernel's pool of slots, and sends COUNT
asynchronous echo requests as fast as the kernel takes them, reading nothing. Each has an
answer: the dam echoes, and once 512 are outstanding on the session the kernel refuses the next
with KErrOverflow itself. The answers pile up, in zmq's queue and then the kernel's backlog for
this socket, until the kernel cuts it off (`max_backlog`, 120,000 frames by default).

It prints ``flooding`` with its clock at the first request, then, once every request is sent,
reads what came and prints one JSON line: ``{"started", "ended", "sent", "answers",
"dropped", "problems"}``. A problem is an answer that is neither the echo nor KErrOverflow or
KErrServerBusy, an answer after the kernel's `Dropped` notice, or no notice at all (the kernel
never cut it off).
"""

from __future__ import annotations

import sys
import time

from hostile_flood import Flood, RawPeer, report
from ipcfw.errors import KErrNone, KErrOverflow, KErrServerBusy
from ipcfw.protocol import Completed, Connect, Connected, Dropped, Mode, Request, Role, encode

EEcho = 1  # tests/plugins/dam.py
COUNT = 200_000  # enough to pass the default backlog cut-off, whatever zmq's queues hold
READ_FOR = 20.0  # seconds to read the answers and the notice, at most


def run(endpoint: str, count: int) -> dict:
    flood = Flood(endpoint)
    summary: dict = {"answers": 0, "dropped": None}
    try:
        peer = RawPeer(flood, "unread channel")
        peer.hello(Role.CHANNEL)
        peer.send_message(Connect(1, "dam", (1, 0, 0), -1, b""))
        connected = peer.reply_to(1, Connected)
        if connected is None or connected.result != KErrNone:
            flood.problems.append(f"connect to dam: {connected!r}")
            return {**summary, "started": 0, "ended": 0, "sent": 0, "problems": flood.problems}
        frames = [encode(Request(n, connected.handle, EEcho, (n,), int(Mode.ASYNC)))
                  for n in range(2, count + 2)]
        print(f"flooding {time.monotonic()}", flush=True)
        summary["started"] = time.monotonic()
        for frame in frames:
            peer.socket.send(frame)
        summary["ended"] = time.monotonic()
        summary["sent"] = count
        _read_answers(peer, summary, flood.problems)
    finally:
        flood.close()
    summary["problems"] = flood.problems
    return summary


def _read_answers(peer: RawPeer, summary: dict, problems: list[str]) -> None:
    ends = time.monotonic() + READ_FOR
    while time.monotonic() < ends and peer.socket.poll(1000):
        peer.drain()
        for message in peer.received:
            if summary["dropped"] is not None:
                problems.append(f"an answer after the Dropped notice: {message!r}")
            elif type(message) is Dropped:
                summary["dropped"] = message.waiting
                if message.routing_id != peer.socket.routing_id:
                    problems.append(f"a notice for another socket: {message!r}")
            elif type(message) is Completed and message.value in (
                message.req_id, KErrOverflow, KErrServerBusy
            ):
                summary["answers"] += 1
            else:
                problems.append(f"an answer that is not the request's: {message!r}")
            if len(problems) > 10:
                return
        peer.received.clear()
    if summary["dropped"] is None:
        problems.append(f"no Dropped notice after {summary['answers']} answers")


def main(argv: list[str]) -> int:
    return report(run(argv[1], int(argv[2]) if len(argv) > 2 else COUNT))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
