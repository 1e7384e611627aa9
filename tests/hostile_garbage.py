"""A hostile process for tests/kernel/test_floods.py: COUNT malformed frames (400,000 unless
told), as fast as the kernel takes them.

    python tests/hostile_garbage.py ENDPOINT [COUNT]

From raw DEALER sockets (random 16-byte routing ids, as every ipcfw peer's): three channels and a
server that said Hello, and two peers that never do. The frames, round-robin over the peers, are
every kind tests/hostile_frames.py makes (not msgpack, wrong types, unknown kinds, wrong field
counts, huge ints, absurd handles, oversized fields, multi-frame messages, messages that travel
the other way), valid messages from the wrong role (a channel completing, a server requesting),
and, from the peers without Hello, valid requests before Hello. Then five frames over the
kernel's size limit, each from a socket of its own (zmq drops such a connection).

It prints ``flooding`` with its clock when the first frame goes, and at the end one JSON line:
``{"started", "ended", "sent", "problems"}``. A problem is any answer to garbage: the kernel
answers none of it, so once each Hello'd peer's Stats is answered (the kernel answers a socket
in order) it must have received nothing else, and the peers without Hello nothing at all.
"""

from __future__ import annotations

import random
import sys
import time

from hostile_flood import Flood, RawPeer, report
from hostile_frames import KERNEL_BOUND, NOT_KERNEL_BOUND, malformed_frames
from ipcfw.protocol import (
    MAX_FRAME,
    Close,
    Complete,
    Connect,
    Mode,
    Panic,
    Register,
    Request,
    Role,
    Stats,
    encode,
)

COUNT = 400_000  # the 100,000, four times over: see tests/kernel/test_floods.py
OVERSIZED = 5


def _wrong_role(rng: random.Random, role: Role) -> bytes:
    """A valid message the kernel takes only from the other role."""
    if role is Role.SERVER:
        choice = rng.choice((Request(1, 1, 1, (1,), int(Mode.SYNC)),
                             Connect(2, "probe", (1, 0, 0), -1, b""), Close(3)))
    else:
        choice = rng.choice((Complete(rng.randrange(1, 2**40), 0, ()), Panic(1, "X", 0)))
    return encode(choice)


def _before_hello(rng: random.Random) -> bytes:
    return encode(rng.choice((Connect(1, "probe", (1, 0, 0), -1, b""), Stats(2),
                              Request(3, 1, 1, (1,), int(Mode.SYNC)),
                              Register(4, "evil", 0, (1, 0, 0)))))


def run(endpoint: str, count: int) -> dict:
    flood = Flood(endpoint)
    rng = random.Random(0x6A5BA6E)
    try:
        hello_peers = [RawPeer(flood, f"channel {n}") for n in range(3)]
        for peer in hello_peers:
            peer.hello(Role.CHANNEL)
        server = RawPeer(flood, "server")
        server.hello(Role.SERVER)
        hello_peers.append(server)
        silent = [RawPeer(flood, f"no hello {n}") for n in range(2)]
        peers = hello_peers + silent
        garbage = malformed_frames(rng, count, KERNEL_BOUND, NOT_KERNEL_BOUND)
        plan = []  # (socket, frames): built before the clock starts
        for index, (_, frames) in enumerate(garbage):
            peer = peers[index % len(peers)]
            if index % 10 == 9:  # a tenth: well-formed, but wrong for the peer that sends it
                frames = ([_before_hello(rng)] if peer in silent
                          else [_wrong_role(rng, Role.SERVER if peer is server else Role.CHANNEL)])
            plan.append((peer.socket, frames))
        print(f"flooding {time.monotonic()}", flush=True)
        started = time.monotonic()
        for socket, frames in plan:
            socket.send_multipart(frames)
        for _ in range(OVERSIZED):
            RawPeer(flood, "oversized").send(b"\0" * (MAX_FRAME + 8192))
        ended = time.monotonic()
        flood.sent += len(plan)
        frames = len(plan)
        for peer in hello_peers:
            unclaimed = peer.settle()
            if unclaimed:
                flood.problems.append(f"{peer.label}: answered garbage: {unclaimed[:3]!r}")
        for peer in silent:
            peer.drain(200)
            if peer.received:
                flood.problems.append(f"{peer.label}: answered before Hello: {peer.received[:3]!r}")
    finally:
        flood.close()
    return {"started": started, "ended": ended, "frames": frames, "problems": flood.problems}


def main(argv: list[str]) -> int:
    return report(run(argv[1], int(argv[2]) if len(argv) > 2 else COUNT))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
