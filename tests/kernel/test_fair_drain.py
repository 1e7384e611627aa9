"""The kernel's router drain lets a peer that was idle take its turn at once, even while another
floods it (ipcfw/kernel/loop.py, `drain_router`; docs/security.md, "Floods and hostile peers").

libzmq's ROUTER round-robins over the peers it knows to have frames waiting, and hears that an
idle peer has sent one only when it processes its commands: recv does that once per 100 frame
parts. Without the kernel's own look every `_NOTICE_EVERY` messages, an idle peer's frame
waited behind up to 50 of the flood's, at any place in that range. Driven here with real zmq
sockets in this process (a real ROUTER, DEALERs over ipc) and the kernel's own drain.
"""

from __future__ import annotations

import os
import tempfile
import time

from collections.abc import Callable

import zmq

from ipcfw.kernel.loop import drain_router

ROUNDS = 10
FLOOD = 600  # frames queued by the flooding peer before each idle peer speaks
SPEAKS_AT = 5  # flood frames handled before the idle peer speaks
WITHIN = 20  # frames handled after it spoke before its own, at most (11 here; 46 without the looks)


def test_an_idle_peer_is_served_within_a_few_frames_of_a_flood() -> None:
    directory = tempfile.mkdtemp(prefix="ipcfw-fair-")
    endpoint = f"ipc://{directory}/router"
    context = zmq.Context()
    try:
        router = context.socket(zmq.ROUTER)
        router.rcvhwm = 0
        router.linger = 0
        router.bind(endpoint)
        flooder, *idle = [context.socket(zmq.DEALER) for _ in range(ROUNDS + 1)]
        for number, dealer in enumerate([flooder, *idle]):
            dealer.routing_id = b"peer-%d" % number
            dealer.sndhwm = 0
            dealer.linger = 0
            dealer.connect(endpoint)
            dealer.send(b"attach")
        handled: list[bytes] = []

        def drain_all(on_frame: Callable[[bytes, zmq.Frame, zmq.Socket], None]) -> None:
            while router.poll(200):
                drain_router(router, on_frame, _unexpected)

        drain_all(lambda rid, body, router: handled.append(rid))
        assert len(handled) == ROUNDS + 1
        waits = []
        for peer in idle:
            handled.clear()
            for _ in range(FLOOD):
                flooder.send(b"flood")
            time.sleep(0.05)  # (all of it queued at the router)

            def on_frame(rid: bytes, body: zmq.Frame, router: zmq.Socket,
                         peer: zmq.Socket = peer) -> None:
                handled.append(rid)
                if len(handled) == SPEAKS_AT:  # the idle peer speaks while the kernel drains
                    peer.send(b"my turn")
                    time.sleep(0.005)  # (queued at the router, and the router told)

            drain_all(on_frame)
            assert len(handled) == FLOOD + 1
            waits.append(handled.index(peer.routing_id) - SPEAKS_AT)
        assert max(waits) <= WITHIN, waits
    finally:
        context.destroy(linger=0)
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


def _unexpected(router: zmq.Socket, body: zmq.Frame) -> None:
    raise AssertionError("a multi-frame message")
