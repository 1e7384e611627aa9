"""A hostile process for tests/kernel/test_floods.py: the routing-id collision attack of
DESIGN.md section 5, and impostors of a live peer's routing id.

    python tests/hostile_routing.py ENDPOINT VICTIM_RID_HEX

libzmq's ROUTER names a peer that brings no routing id ``0x00`` + a 32-bit counter, which
starts at `generate_random()`: two calls of the C library's `rand()`, never seeded by libzmq, so
in a fresh process the same numbers every time. It asserts that such an id is free; a peer
holding it aborts the process. The attack, in this order:

1. squatters: for each of the first `ROUTERS` ROUTERs a fresh process could make, `SQUAT` raw
   DEALERs whose routing ids are the first auto ids that ROUTER would give (computed here from
   glibc's unseeded `rand()`); each says Hello;
2. `ANONYMOUS` peers without a routing id (so libzmq gives each an auto id: the one a squatter
   holds, unless the kernel's counter starts elsewhere); each says Hello;
3. impostors: DEALERs claiming the routing id of VICTIM (a live client's channel), and of a
   squatter. libzmq keeps the first owner (ROUTER_HANDOVER 0) and takes the impostor's first
   frame as its routing id instead; some impostors make that first frame empty, which has
   libzmq pick an auto id for them too;
4. for `DURATION` seconds every peer that said Hello asks for Stats, round after round, and
   each must be answered: the kernel serves a squatter and an auto-id peer like any other.

It prints ``flooding`` with its clock at the start of step 1, and at the end one JSON line:
``{"started", "ended", "answered", "problems"}``.
"""

from __future__ import annotations

import ctypes
import sys
import time

import zmq

from hostile_flood import Flood, RawPeer, report
from ipcfw.protocol import PROTOCOL_VERSION, Hello, Role, Stats, StatsReply, encode

ROUTERS = 4  # ROUTERs a process may make before the kernel's (each takes two rand() calls)
SQUAT = 8  # auto ids squatted per ROUTER
ANONYMOUS = 8
IMPOSTORS = 4  # of each kind
DURATION = 4.0  # seconds of Stats rounds once every peer is in


def auto_id_starts(routers: int) -> list[int]:
    """Where libzmq's auto-id counter starts for the first `routers` ROUTERs of a process whose
    C library's `rand()` was never seeded (glibc: as if seeded with 1)."""
    libc = ctypes.CDLL(None)
    libc.srand(1)
    draws = [libc.rand() for _ in range(2 * routers)]
    # generate_random(): low = rand(); high = rand() << 31, in 32 bits.
    return [(draws[2 * n] | (draws[2 * n + 1] << 31)) & 0xFFFFFFFF for n in range(routers)]


def auto_id(counter: int) -> bytes:
    return b"\x00" + (counter & 0xFFFFFFFF).to_bytes(4, "big")


class NamedPeer(RawPeer):
    """A raw peer with the routing id it is given (None: none, so zmq's auto id)."""

    def __init__(self, flood: Flood, label: str, routing_id: bytes | None) -> None:
        self.flood = flood
        self.label = label
        self.socket = flood.context.socket(zmq.DEALER)
        if routing_id is not None:
            self.socket.routing_id = routing_id
        self.socket.linger = 0
        self.socket.connect(flood.endpoint)
        self.received = []


def run(endpoint: str, victim: bytes) -> dict:
    flood = Flood(endpoint)
    answered = 0
    try:
        print(f"flooding {time.monotonic()}", flush=True)
        started = time.monotonic()
        squatters = [
            NamedPeer(flood, f"squatter {start:#x}+{n}", auto_id(start + n))
            for start in auto_id_starts(ROUTERS) for n in range(SQUAT)
        ]
        for peer in squatters:
            peer.hello(Role.CHANNEL)
        anonymous = [NamedPeer(flood, f"no routing id {n}", None) for n in range(ANONYMOUS)]
        for peer in anonymous:
            peer.hello(Role.CHANNEL)
        impostors = []
        for n in range(IMPOSTORS):
            for label, claimed in (("victim", victim), ("squatter", auto_id_starts(1)[0])):
                rid = claimed if isinstance(claimed, bytes) else auto_id(claimed)
                for first in (encode(Hello(int(Role.CHANNEL), PROTOCOL_VERSION)), b""):
                    peer = NamedPeer(flood, f"impostor of the {label} {n}", rid)
                    peer.send(first)  # taken by libzmq as its routing id
                    peer.send_message(Hello(int(Role.CHANNEL), PROTOCOL_VERSION))
                    impostors.append(peer)
        honest = squatters + anonymous
        rounds = 0
        ends = time.monotonic() + DURATION
        while time.monotonic() < ends or rounds == 0:
            rounds += 1
            for peer in honest:
                peer.send_message(Stats(rounds))
            for peer in impostors:
                # Not blocking: libzmq leaves an impostor's connection unread (the id is
                # taken), so its queue fills (its high-water mark, 1,000 frames on each side)
                # and a blocking send would wait for ever once the rounds outnumber it.
                try:
                    peer.socket.send(encode(Stats(rounds)), zmq.NOBLOCK)
                except zmq.Again:
                    pass
                peer.drain()
            for peer in honest:
                if peer.reply_to(rounds, StatsReply) is not None:
                    answered += 1
        ended = time.monotonic()
        if answered != rounds * len(honest):
            flood.problems.append(f"{answered} of {rounds * len(honest)} Stats answered")
    finally:
        flood.close()
    return {"started": started, "ended": ended, "answered": answered, "problems": flood.problems}


def main(argv: list[str]) -> int:
    return report(run(argv[1], bytes.fromhex(argv[2])))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
