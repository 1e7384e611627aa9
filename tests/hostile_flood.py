"""A hostile process for tests/kernel/test_hostile.py: floods the kernel with bad frames from raw
sockets.

    python tests/hostile_flood.py ENDPOINT VICTIM_HANDLE

It speaks the wire protocol by hand over raw pyzmq DEALER sockets (random 16-byte routing ids):
malformed frames of every kind in tests/hostile_frames.py, valid messages before Hello, messages
from the wrong role, Close and Requests on handles it does not hold (VICTIM_HANDLE belongs to a
well-behaved client of another process), a registered server that completes and panics message
ids that are not its own, a legitimate session that floods its server with held requests, and
frames over the kernel's size limit. It checks every answer the kernel owes it (a Panicked for
each request on a handle not held, KErrOverflow past 512 outstanding, ...) and that nothing else
arrives. Every answer to a request, sync, async or blind, and every refusal of one, must come back
on the channel that sent the request; the process's inbox only ever gets SessionLost notices, and
this run loses no session, so the inbox must get nothing at all.

It runs in its own process because a hostile peer is another process: the kernel keys peers by
process (its handles, its one inbox).

Prints one JSON line ``{"sent": N, "problems": [...], ...}``; exits 0 iff there are no problems.
Every wait has a deadline; the sockets are closed with linger 0 at exit, and the kernel cleans up
the sessions and the server this process leaves behind.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import random
import sys
import time
from collections.abc import Callable

import msgpack
import zmq

from hostile_frames import KERNEL_BOUND, NOT_KERNEL_BOUND, malformed_frames
from ipcfw.errors import (
    KErrAlreadyExists,
    KErrBadDescriptor,
    KErrBadName,
    KErrInUse,
    KErrNone,
    KErrOverflow,
    KErrPermissionDenied,
    KErrServerBusy,
)
from ipcfw.protocol import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    Close,
    Complete,
    Completed,
    Connect,
    Connected,
    Deliver,
    Disconnect,
    Hello,
    Kind,
    Message,
    Mode,
    NewSession,
    Panic,
    Panicked,
    PeerInfo,
    Register,
    Request,
    Role,
    Stats,
    StatsReply,
    Welcome,
    decode,
    encode,
)

EEcho, EHold = 1, 2  # tests/plugins/probe.py
GARBAGE = 1500  # malformed frames from the channel (plus 100 before Hello)
HOLDS = 600  # held async requests on one session: 512 go through, the rest overflow
OUTSTANDING_LIMIT = 512
SWEEPS, SWEEP_WIDTH = 4, 1500  # sweeps of completions over live message ids, and their width
WAIT = 15.0  # seconds any single answer may take

class Flood:
    """The sockets of this process, what they sent and received, and the problems found."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.context = zmq.Context()
        self.sent = 0
        self.problems: list[str] = []
        self.req_ids = itertools.count(1000)

    def close(self) -> None:
        self.context.destroy(linger=0)


class RawPeer:
    """One raw DEALER socket to the kernel, with the messages it received and not yet claimed."""

    def __init__(self, flood: Flood, label: str) -> None:
        self.flood = flood
        self.label = label
        self.socket = flood.context.socket(zmq.DEALER)
        self.socket.routing_id = os.urandom(16)
        self.socket.linger = 0
        self.socket.connect(flood.endpoint)
        self.received: list[Message] = []

    def send(self, *frames: bytes) -> None:
        self.socket.send_multipart(list(frames))
        self.flood.sent += 1

    def send_message(self, message: Message) -> None:
        self.send(encode(message))

    def drain(self, timeout_ms: int = 0) -> None:
        if not self.socket.poll(timeout_ms):
            return
        while True:
            try:
                raw = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.received.append(decode(raw))

    def wait_for(self, what: str, match: Callable[[Message], bool]) -> Message | None:
        """Claim the first received message that matches; None (and a problem) at the deadline."""
        deadline = time.monotonic() + WAIT
        while True:
            for index, message in enumerate(self.received):
                if match(message):
                    return self.received.pop(index)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.flood.problems.append(f"{self.label}: no {what} within {WAIT} s")
                return None
            self.drain(int(remaining * 1000) + 1)

    def reply_to(self, req_id: int, kind: type) -> Message | None:
        return self.wait_for(
            f"{kind.__name__} for req {req_id}",
            lambda m: type(m) is kind and m.req_id == req_id,
        )

    def hello(self, role: Role) -> None:
        self.send_message(Hello(int(role), PROTOCOL_VERSION))
        self.wait_for("Welcome", lambda m: type(m) is Welcome)

    def settle(self) -> list[Message]:
        """Ask for Stats and wait for the reply; the kernel answers one socket in order, so
        every earlier answer has then arrived. Returns the unclaimed messages."""
        req_id = next(self.flood.req_ids)
        self.send_message(Stats(req_id))
        self.reply_to(req_id, StatsReply)
        unclaimed, self.received = self.received, []
        return unclaimed

    def expect(
        self, req_id: int, kind: type, check: Callable[[Message], bool], what: str
    ) -> Message | None:
        reply = self.reply_to(req_id, kind)
        if reply is not None and not check(reply):
            self.flood.problems.append(f"{self.label}: {what}: got {reply!r}")
        return reply


def run(endpoint: str, victim: int) -> dict:
    flood = Flood(endpoint)
    rng = random.Random(0x1BC5F00D)
    problems = flood.problems
    summary: dict = {}
    try:
        # -- 1. valid messages and garbage before Hello: no answer at all --------------------
        pre = RawPeer(flood, "pre-hello peer")
        for _ in range(10):
            for message in (
                Connect(1, "probe", (1, 0, 0), -1, b""),
                Request(2, victim, EEcho, (1,), int(Mode.SYNC)),
                Stats(3),
                Close(victim),
                Complete(1, 0, ()),
                Register(4, "evil", 0, (1, 0, 0)),
                Panic(1, "X", 0),
            ):
                pre.send_message(message)
        for _, frames in malformed_frames(rng, 100, KERNEL_BOUND, NOT_KERNEL_BOUND):
            pre.send(*frames)
        pre.send_message(Hello(int(Role.CHANNEL), PROTOCOL_VERSION))
        first = pre.wait_for("Welcome", lambda m: True)
        if type(first) is not Welcome:
            problems.append(f"pre-hello peer: first answer was {first!r}, not Welcome")

        # -- 2. a channel: protocol violations and garbage, none answered --------------------
        chan = RawPeer(flood, "channel")
        chan.hello(Role.CHANNEL)
        # Async requests before this process has an inbox are requests like any other, answered
        # on the channel: a forged handle is panicked, a session of our own is served.
        chan.send_message(Request(10, victim, EEcho, (1,), int(Mode.ASYNC)))
        chan.expect(10, Panicked,
                    lambda m: (m.handle, m.category, m.reason) == (victim, "KERN-EXEC", 0),
                    "async request on a handle not held, no inbox yet")
        chan.send_message(Connect(17, "probe", (1, 0, 0), 1, b""))
        early = chan.expect(17, Connected, lambda m: m.result == KErrNone,
                            "connect with no inbox yet")
        if early is not None:
            chan.send_message(Request(18, early.handle, EEcho, (18,), int(Mode.ASYNC)))
            chan.expect(18, Completed, lambda m: (m.value, m.writes) == (18, ()),
                        "async echo, no inbox yet")
            chan.send_message(Request(19, early.handle, EEcho, (19,), int(Mode.BLIND)))
            chan.expect(19, Completed, lambda m: (m.value, m.writes) == (KErrNone, ()),
                        "blind ack, no inbox yet")
            chan.send_message(Close(early.handle))
        chan.send_message(Hello(int(Role.CHANNEL), PROTOCOL_VERSION))  # a second Hello
        chan.send_message(Complete(1, 0, ()))  # wrong role
        chan.send_message(Panic(1, "X", 0))
        chan.send_message(Register(11, "evil", 0, (1, 0, 0)))
        for handle in (victim, 2**31 - 1, 424242, 1, 2, 3):
            chan.send_message(Close(handle))  # not held
        chan.send(encode(Stats(12)), encode(Stats(13)))  # two frames: refused whole
        chan.send(encode(Stats(14)), encode(Stats(15)), encode(Stats(16)))
        for index, (_, frames) in enumerate(
            malformed_frames(rng, GARBAGE, KERNEL_BOUND, NOT_KERNEL_BOUND)
        ):
            chan.send(*frames)
            if index % 100 == 0:
                chan.drain()
        # Frames just under the size limit whose fields are oversized.
        chan.send(
            msgpack.packb((int(Kind.CONNECT), 1, "x" * (MAX_FRAME - 1024), (1, 0, 0), -1, b""))
        )
        chan.send(msgpack.packb(b"\0" * (MAX_FRAME - 100)))
        summary["channel: unanswered garbage"] = [repr(m) for m in chan.settle()]
        if summary["channel: unanswered garbage"]:
            problems.append("channel: the kernel answered garbage or a protocol violation")

        # -- 3. the inbox, a second inbox, requests on handles not held ----------------------
        inbox = RawPeer(flood, "inbox")
        inbox.hello(Role.INBOX)
        second_inbox = RawPeer(flood, "second inbox")
        second_inbox.send_message(Hello(int(Role.INBOX), PROTOCOL_VERSION))  # refused
        expected_panics: dict[int, Mode] = {}  # req_id -> mode; every one answered on the channel
        forged = (victim, 2**31 - 1, 777777)
        for round_ in range(40):
            for handle in forged + (rng.randint(1, 2**31 - 1),):
                for mode in (Mode.SYNC, Mode.ASYNC, Mode.BLIND):
                    req_id = next(flood.req_ids)
                    chan.send_message(Request(req_id, handle, EEcho, (round_,), int(mode)))
                    expected_panics[req_id] = mode
            chan.drain()
            inbox.drain()
        req_id = next(flood.req_ids)  # a near-limit frame on a forged handle: valid, so answered
        chan.send_message(
            Request(req_id, victim, EEcho, (b"\0" * (MAX_FRAME - 1024),), int(Mode.SYNC))
        )
        expected_panics[req_id] = Mode.SYNC
        got = chan.settle()
        panics = collections.Counter(
            m.req_id for m in got
            if type(m) is Panicked and (m.category, m.reason) == ("KERN-EXEC", 0)
        )
        others = [m for m in got if not (type(m) is Panicked and m.req_id in panics)]
        if set(panics) != set(expected_panics) or len(got) != len(expected_panics):
            problems.append(
                f"channel: expected {len(expected_panics)} KERN-EXEC 0 panics, one per request,"
                f" got {sum(panics.values())}"
                f" (missing {sorted(set(expected_panics) - set(panics))[:5]}, "
                f"extra {sorted(set(panics) - set(expected_panics))[:5]}, "
                f"twice {sorted(r for r, n in panics.items() if n > 1)[:5]}), others {others[:3]!r}"
            )
        summary["channel: KERN-EXEC panics"] = len(panics)
        summary["channel: KERN-EXEC panics of async requests"] = sum(
            expected_panics.get(r) is Mode.ASYNC for r in panics
        )
        summary["inbox: unexpected"] = [repr(m) for m in inbox.settle()]
        if summary["inbox: unexpected"]:
            problems.append(f"inbox: got answers to requests: {summary['inbox: unexpected'][:3]}")

        # -- 4. a server peer: wrong role, refusals, other servers' message ids --------------
        srv = RawPeer(flood, "server")
        srv.hello(Role.SERVER)
        srv.send_message(Request(1, victim, EEcho, (1,), int(Mode.SYNC)))  # wrong role
        srv.send_message(Connect(1, "probe", (1, 0, 0), -1, b""))
        srv.send_message(Close(victim))
        srv.send_message(Complete(1, 0, ()))  # not a server yet
        srv.send_message(Panic(1, "X", 0))
        hostile_name = f"hostile-{os.getpid()}"
        for req_id, name, code in (
            (1, "bad*name", KErrBadName),
            (2, "PROBE", KErrAlreadyExists),
            (3, "!protected", KErrPermissionDenied),
            (4, hostile_name, KErrNone),
            (5, "another", KErrInUse),
        ):
            srv.send_message(Register(req_id, name, 2, (1, 0, 0)))
            srv.expect(req_id, Completed, lambda m, code=code: m.value == code,
                       f"Register {name!r}")
        # Complete and panic message ids that were the probe server's: all must be dropped.
        for msg_id in range(1, 401):
            srv.send_message(Complete(msg_id, 666, ((0, b"EVIL"), (1, b"EVIL"))))
            srv.send_message(Panic(msg_id, "EVIL", 1))
        summary["server: unanswered"] = [repr(m) for m in srv.settle()]
        if summary["server: unanswered"]:
            problems.append("server: the kernel answered other servers' message ids")

        # -- 5. legitimate sessions used hostilely -------------------------------------------
        chan.send_message(Connect(20, "probe", (1, 0, 0), -1, b""))
        connected = chan.expect(20, Connected, lambda m: m.result == KErrNone, "connect to probe")
        handle = connected.handle if connected else 0
        chan.send_message(Request(21, handle, EEcho, (7,), int(Mode.SYNC)))
        chan.expect(21, Completed, lambda m: m.value == 7, "echo 7")
        hold_ids = []
        for tag in range(HOLDS):
            hold_ids.append(next(flood.req_ids))
            chan.send_message(
                Request(hold_ids[-1], handle, EHold, (100000 + tag,), int(Mode.ASYNC))
            )
            if tag % 100 == 0:
                chan.drain()
        got = chan.settle()
        overflowed = [
            m.req_id for m in got
            if type(m) is Completed and (m.value, m.writes) == (KErrOverflow, ())
        ]
        # The first 512 are held by the probe; every one after them overflows, once, on the channel.
        if overflowed != hold_ids[OUTSTANDING_LIMIT:] or len(got) != len(overflowed):
            problems.append(
                "channel: expected KErrOverflow completions for the last"
                f" {HOLDS - OUTSTANDING_LIMIT} held requests, got {len(overflowed)} of {len(got)}:"
                f" {got[:3]!r}"
            )
        extra = inbox.settle()
        if extra:
            problems.append(f"inbox: answers to held requests: {extra[:3]!r}")
        summary["holds overflowed"] = len(overflowed)

        # A session with the hostile server, which misbehaves toward its own client.
        chan.send_message(Connect(30, hostile_name, (1, 0, 0), 0, b""))
        srv.wait_for("PeerInfo", lambda m: type(m) is PeerInfo and m.pid == os.getpid())
        new = srv.wait_for("NewSession", lambda m: type(m) is NewSession)
        if new is not None:
            srv.send_message(Complete(new.msg_id, 0, ()))
        connected = chan.expect(30, Connected, lambda m: m.result == KErrNone,
                                "connect to the hostile server")
        h2 = connected.handle if connected else 0

        def deliver(req_id: int, args: tuple) -> Deliver | None:
            chan.send_message(Request(req_id, h2, EEcho, args, int(Mode.SYNC)))
            return srv.wait_for(f"Deliver for req {req_id}",
                                lambda m: type(m) is Deliver and m.handle == h2)

        d = deliver(31, ((b"", 4), 5))  # writes more than the max length
        if d:
            srv.send_message(Complete(d.msg_id, 3, ((0, b"too long"),)))
        chan.expect(31, Completed, lambda m: (m.value, m.writes) == (KErrBadDescriptor, ()),
                    "overlong write")
        d = deliver(32, (5,))  # writes into an int argument
        if d:
            srv.send_message(Complete(d.msg_id, 1, ((0, b"x"),)))
        chan.expect(32, Completed, lambda m: (m.value, m.writes) == (KErrBadDescriptor, ()),
                    "write to an int")
        d = deliver(33, ((b"", 4),))  # a fair write, then a second completion and a panic
        if d:
            srv.send_message(Complete(d.msg_id, 4, ((0, b"abcd"),)))
            srv.send_message(Complete(d.msg_id, 5, ()))
            srv.send_message(Panic(d.msg_id, "EVIL", 2))
        chan.expect(33, Completed, lambda m: (m.value, m.writes) == (4, ((0, b"abcd"),)),
                    "fair write")
        # Message ids are one kernel-wide sequence, and the well-behaved client's messages to the
        # probe are in flight right now: sweep completions and panics across the ids just issued
        # and about to be issued. The kernel must drop every one (they are not this server's),
        # or that client gets a wrong value or a panic.
        summary["ids swept"] = 0
        for sweep in range(SWEEPS):
            d = deliver(40 + sweep, ())
            if d is None:
                break
            srv.send_message(Complete(d.msg_id, 0, ()))
            chan.expect(40 + sweep, Completed, lambda m: m.value == 0,
                        "a request to learn the current id")
            for msg_id in range(d.msg_id - 50, d.msg_id + SWEEP_WIDTH):
                srv.send_message(Complete(msg_id, 666, ((0, b"EVIL"), (1, b"EVIL"))))
                srv.send_message(Panic(msg_id, "EVIL", 1))
            summary["ids swept"] += SWEEP_WIDTH + 50
            # Let the kernel take the whole sweep before this server gets new messages of its
            # own, which the sweep would otherwise (legitimately) complete.
            extra = srv.settle()
            if extra:
                problems.append(f"server: answers to a sweep: {extra[:3]!r}")
        chan.send_message(Request(34, h2, EEcho, (1,), int(Mode.ASYNC)))  # 0 slots: busy
        chan.expect(34, Completed, lambda m: m.value == KErrServerBusy, "async on a 0-slot session")
        d = deliver(35, ())
        if d:
            srv.send_message(Panic(d.msg_id, "EVIL", 3))
        chan.expect(35, Panicked, lambda m: (m.category, m.reason) == ("EVIL", 3), "server panic")
        chan.send_message(Request(36, h2, EEcho, (1,), int(Mode.SYNC)))
        chan.expect(36, Panicked, lambda m: (m.category, m.reason) == ("EVIL", 3),
                    "request after panic")
        srv.wait_for("Disconnect after the panic",
                     lambda m: type(m) is Disconnect and m.handle == h2)
        # ... which the hostile server never completes: the kernel cleans up when we exit.
        for peer in (chan, inbox, srv):
            extra = peer.settle()
            if extra:
                problems.append(f"{peer.label}: unexpected {extra[:3]!r}")

        # -- 6. frames over the kernel's limit: libzmq drops the connection -----------------
        big = RawPeer(flood, "oversized, no hello")
        big.send(b"\0" * (MAX_FRAME + 8192))
        big_hello = RawPeer(flood, "oversized after hello")
        big_hello.hello(Role.CHANNEL)
        big_hello.send(msgpack.packb((int(Kind.STATS), 1, b"\0" * (MAX_FRAME + 8192))))
        # The kernel must still answer everyone else.
        for peer in (pre, chan, inbox, srv):
            extra = peer.settle()
            if extra:
                problems.append(f"{peer.label}: unexpected {extra[:3]!r}")
    finally:
        flood.close()
    summary["sent"] = flood.sent
    summary["problems"] = problems
    return summary


def report(summary: dict) -> int:
    """Print `summary` as one JSON line (a hostile process's last); its exit status: 1 if the
    summary lists problems, else 0."""
    print(json.dumps(summary), flush=True)
    return 1 if summary["problems"] else 0


def main(argv: list[str]) -> int:
    endpoint, victim = argv[1], int(argv[2])
    return report(run(endpoint, victim))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
