"""Decoding is bounded (issue 9, item 3): a hostile frame costs at most a small multiple of its
size, in memory and in time, and a kernel that receives one keeps serving everyone else.

The pure tests hold `decode`'s limits to the protocol's (ipcfw/protocol.py, "Bounded
decoding"), check that every message still decodes where arrays are counted, and measure the
hostile frames of tests/hostile_decoding.py with tracemalloc. The last test sends the frame of
the issue (15 MiB of empty maps, which once took the kernel to 1.3 GB and stalled it for
seconds) to a real kernel while a bystander makes echo calls.
"""

from __future__ import annotations

import random
import re
import statistics
import struct
import threading
import time
import tracemalloc
import typing
from pathlib import Path

import msgpack
import psutil
import pytest

from conftest import KernelFixture, wait_until
from hostile_decoding import EMPTY_MAP, FRAME_SIZE, array_of, hostile_frames, spine_of, tree_of
from hostile_flood import Flood, RawPeer
from ipcfw import RSession
from ipcfw import protocol
from ipcfw.protocol import (
    MAX_CATEGORY,
    MAX_FRAME,
    MAX_NAME,
    MAX_PATH,
    Complete,
    Completed,
    Connect,
    Deliver,
    Mode,
    NewSession,
    ProtocolError,
    Register,
    Request,
    Role,
    StatsReply,
    decode,
    encode,
)
from test_protocol import MALFORMED, ROUND_TRIP

MiB = 2**20
SMALL = 4096  # frames up to this size are decoded without counting arrays (protocol._SMALL_FRAME)
PAIRS = tuple((b"w" * 1200, 1200) for _ in range(4))  # four writable descriptors: > 4 KiB in all

#: The messages with the most arrays, small and (descriptors filled past 4 KiB) large, and the
#: largest StatsReply.
MOST_ARRAYS = [
    Connect(1, "echo", (1, 0, 0), -1, b"", (2, 1, ((b"", 4),) * 4)),
    Connect(1, "echo", (1, 0, 0), -1, b"", (2, 1, PAIRS)),
    Request(1, 1, 1, ((b"", 4),) * 4, Mode.SYNC),
    Request(1, 1, 1, PAIRS, Mode.SYNC),
    Deliver(1, 1, 1, PAIRS, 3),
    Complete(1, 0, tuple((i, b"c" * 1200) for i in range(4))),
    Completed(1, 0, tuple((i, b"c" * 1200) for i in range(4))),
    Register(1, "r" * MAX_NAME, 0, (1, 0, 0)),
    NewSession(1, 1, (1, 0, 0), 1, b"p" * 256),
    StatsReply(1, {f"counter {i:03d} " + "n" * 40: i for i in range(256)}),
]


def arrays_in(frame: bytes) -> int:
    """How many arrays msgpack builds for `frame`."""
    count = 0

    def hook(array: list) -> list:
        nonlocal count
        count += 1
        return array

    msgpack.unpackb(frame, list_hook=hook)
    return count


@pytest.fixture
def counting_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode every frame, however small, the way frames over 4 KiB are: counting arrays."""
    monkeypatch.setattr(protocol, "_SMALL_FRAME", -1)


# -- the limits are the protocol's -------------------------------------------------------------


def test_limits_are_the_protocols() -> None:
    # The longest array is the longest message: its kind and Connect's eight fields.
    assert protocol._MAX_ARRAY_LEN == 9 == 1 + max(
        len(cls._fields) for cls in typing.get_args(protocol.Message)
    )
    # No string field is longer, in UTF-8, than the str limit; no descriptor than the frame's.
    assert protocol._MAX_STR_BYTES == 4 * max(MAX_NAME, MAX_CATEGORY, MAX_PATH)
    # The most arrays any message has: Connect, its version, its first request, that request's
    # arguments and their four writable descriptors.
    assert protocol._MAX_ARRAYS == 8 == max(arrays_in(encode(m)) for m in MOST_ARRAYS)
    assert arrays_in(encode(MOST_ARRAYS[0])) == 8
    assert protocol._SMALL_FRAME == SMALL


@pytest.mark.parametrize(
    "message", MOST_ARRAYS, ids=lambda m: f"{type(m).__name__}, {len(encode(m))} bytes"
)
def test_the_messages_with_the_most_arrays_decode(message: tuple) -> None:
    assert decode(encode(message)) == message
    assert type(decode(encode(message))) is type(message)


@pytest.mark.usefixtures("counting_everywhere")
@pytest.mark.parametrize("message", ROUND_TRIP, ids=lambda m: repr(m)[:60])
def test_every_message_decodes_when_arrays_are_counted(message: tuple) -> None:
    decoded = decode(encode(message))
    assert decoded == message and type(decoded) is type(message)


@pytest.mark.usefixtures("counting_everywhere")
@pytest.mark.parametrize(
    "frame", [frame for _, frame, _ in MALFORMED], ids=[case for case, _, _ in MALFORMED]
)
def test_every_malformed_frame_is_refused_when_arrays_are_counted(frame: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(frame)
    assert len(str(info.value)) < 400


def test_one_array_more_than_any_message_is_refused_in_a_large_frame() -> None:
    # Connect's first request with a fifth writable descriptor is 9 arrays (the field check
    # would refuse it too, but only after msgpack had built them).
    items = [
        int(protocol.Kind.CONNECT), 1, "echo", [1, 0, 0], -1, b"",
        [2, 1, [list(p) for p in PAIRS] + [[b"", 4]]],
    ]
    frame = msgpack.packb(items)
    assert len(frame) > SMALL and arrays_in(frame) == 9
    with pytest.raises(ProtocolError, match=r"^more than 8 arrays, where no message has more$"):
        decode(frame)
    # A small frame of 9 arrays is decoded (it is bounded anyway) and refused by the field check.
    small = msgpack.packb(items[:-1] + [[2, 1, [[b"", 4]] * 5]])
    with pytest.raises(ProtocolError, match=r"^Connect\.first: "):
        decode(small)


def _str32(size: int) -> bytes:
    return b"\xdb" + struct.pack(">I", size) + b"s" * size


def _bin32(size: int) -> bytes:
    return b"\xc6" + struct.pack(">I", size) + bytes(size)


#: (case, frame, the ProtocolError's whole message)
LIMITS: list[tuple[str, bytes, str]] = [
    ("array of 15 MiB", b"\xdd" + struct.pack(">I", FRAME_SIZE),
     r"^array of 15728640 items exceeds the protocol's 9$"),
    ("array of 10", b"\x9a" + b"\x00" * 10, r"^array of 10 items exceeds the protocol's 9$"),
    ("array32 of 10", b"\xdd\x00\x00\x00\x0a" + b"\x00" * 10,
     r"^array of 10 items exceeds the protocol's 9$"),
    ("map32 of 2**32-1", b"\xdf\xff\xff\xff\xff",
     r"^a map of 4294967295 entries, where the protocol has none"),
    ("fixmap of 1", b"\x81\xa1k\x00", r"^a map of 1 entry, where the protocol has none"),
    ("empty map", b"\x80",
     r"^a map, where the protocol has none \(only StatsReply\.counters is a map\)$"),
    ("fixext1", b"\x92\x04\xd4\x05\x00", r"^an ext type, where the protocol has none$"),
    ("ext8 of 3 bytes", b"\x92\x04\xc7\x03\x05abc", r"^an ext type, where the protocol has none$"),
    ("empty ext8", b"\x92\x04\xc7\x00\x05", r"^ext type 5, where the protocol has none$"),
    ("timestamp", msgpack.packb(msgpack.Timestamp(1, 0)),
     r"^an ext type, where the protocol has none$"),
    ("str of 16 KiB + 1 (small frames stop at 4 KiB)",
     b"\x95\x02\x01" + _str32(16385) + b"\x00\x93\x01\x00\x00",
     r"^str of 16385 bytes exceeds the protocol's 16384$"),
    ("str of 16 KiB", b"\x95\x02\x01" + _str32(16384) + b"\x00\x93\x01\x00\x00",
     r"^Register\.name: expected a string of at most 256 characters"),
    ("257 counters",
     b"\x93\x19\x01\xde\x01\x01" + b"".join(msgpack.packb(f"k{i}") + b"\x00" for i in range(257)),
     r"^map of 257 entries exceeds the protocol's 256$"),
    ("counters of 2**32-1", b"\x93\x19\x01\xdf\xff\xff\xff\xff",
     r"^map of 4294967295 entries exceeds the protocol's 256$"),
    ("a StatsReply of 10", b"\x9a\x19" + b"\x00" * 9,
     r"^array of 10 items exceeds the protocol's 9$"),
    ("tree of one-item arrays", tree_of(b"\x91\x00", 8192),
     r"^more than 8 arrays, where no message has more$"),
    ("deeper than msgpack allows", spine_of(b"\x00", 1100), r"^not a msgpack frame \(StackError"),
]


@pytest.mark.parametrize(("frame", "pattern"), [pytest.param(f, p, id=c) for c, f, p in LIMITS])
def test_each_limit_names_what_was_refused(frame: bytes, pattern: str) -> None:
    with pytest.raises(ProtocolError, match=pattern):
        decode(frame)


def test_a_large_stats_reply_decodes() -> None:
    message = MOST_ARRAYS[-1]
    assert len(encode(message)) > SMALL
    assert decode(encode(message)) == message
    # Only the counters are a map; a key of the wrong type is the field check's to refuse.
    with pytest.raises(ProtocolError, match=r"^StatsReply\.counters: expected str -> int"):
        decode(msgpack.packb([25, 1, {b"bytes key": 1}]))
    with pytest.raises(ProtocolError, match=r"^StatsReply\.counters: expected str -> int"):
        decode(msgpack.packb([25, 1, {"k": 1, 2: 3}]))


# -- what a hostile frame costs ----------------------------------------------------------------


def _peak_of_decode(frame: bytes) -> tuple[int, float, str]:
    """(tracemalloc peak, seconds without tracemalloc, outcome) of decoding `frame`."""
    def attempt() -> str:
        try:
            return type(decode(frame)).__name__
        except ProtocolError as exc:
            return str(exc)

    start = time.perf_counter()
    outcome = attempt()
    seconds = time.perf_counter() - start
    tracemalloc.start()
    try:
        attempt()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, seconds, outcome


@pytest.mark.parametrize("name", list(hostile_frames()))
def test_a_hostile_frame_costs_at_most_its_size(name: str) -> None:
    """The worst frames within 15 MiB (before: up to 81 times their size and 6 s). Now the only
    objects that grow with the frame are strs and bins, which hold its bytes (or, for a
    StatsReply, msgpack's copy of the frame); everything else is bounded by the depth limit."""
    frame = hostile_frames()[name]()
    assert len(frame) <= FRAME_SIZE
    peak, seconds, outcome = _peak_of_decode(frame)
    assert peak <= 1.1 * len(frame) + 1 * MiB, (
        f"{name}: peak {peak / MiB:.1f} MiB for {len(frame) / MiB:.1f} MiB ({outcome})"
    )
    # A refusal is at most a walk over the frame; 0.25 s is 1,000 times what it takes here.
    assert seconds < 0.25, f"{name}: {seconds:.3f} s ({outcome})"
    if len(frame) <= SMALL:
        assert peak < 256 * 1024, f"{name}: a small frame peaked at {peak} bytes"


def test_a_descriptor_is_bounded_by_its_frame_alone() -> None:
    """A bin costs its own bytes, so it needs no limit but the frame's: the transport bounds
    that (the kernel's MAXMSGSIZE), and a server decodes whatever its kernel sends it, even a
    descriptor over MAX_FRAME (tests/kernel/test_hostile.py relies on that)."""
    frame = encode(Deliver(1, 1, 1, (bytes(MAX_FRAME + 1),), 1))
    peak, _, outcome = _peak_of_decode(frame)
    assert outcome == "Deliver"
    assert peak <= 1.01 * len(frame) + 64 * 1024


def test_the_frame_of_the_issue_is_refused_at_its_header() -> None:
    frame = array_of(EMPTY_MAP)
    peak, seconds, outcome = _peak_of_decode(frame)
    assert outcome == "array of 15728635 items exceeds the protocol's 9"
    assert peak < 64 * 1024  # no dict, no tuple: refused before anything is built


_LEAVES = [b"\x00", b"\x80", b"\x90", b"\x91\x00", b"\xa2ab", b"\xc4\x02ab", b"\xcd\x01\x01",
           b"\xca\x3f\x80\x00\x00", b"\xc7\x00\x05", b"\xd6\xff\x00\x00\x00\x01", b"\xc0", b"\xc3",
           b"\x81\xa1k\x00"]


def _random_large_frame(rng: random.Random) -> bytes:
    """A frame over 4 KiB: a message's start, then random structure, then padding in a bin."""
    def value(depth: int) -> bytes:
        choice = rng.randrange(10)
        if choice < 4 or depth > 6:
            return rng.choice(_LEAVES)
        if choice < 7:
            width = rng.randrange(0, 9)
            return bytes([0x90 + width]) + b"".join(value(depth + 1) for _ in range(width))
        if choice < 8:
            return b"\x81\xa1k" + value(depth + 1)
        if choice < 9:
            return tree_of(rng.choice(_LEAVES), rng.randrange(20, 3000), rng.randrange(2, 8))
        return spine_of(rng.choice(_LEAVES), rng.randrange(1, 50), rng.randrange(1, 8))

    kind = rng.choice([int(k) for k in protocol.Kind])
    fields = [value(0) for _ in range(rng.randrange(0, 6))]
    pad = _bin32(rng.randrange(4096, 9000))
    frame = bytes([0x90 + len(fields) + 2, kind]) + b"".join(fields) + pad
    if rng.random() < 0.3:  # and sometimes damaged
        cut = bytearray(frame)
        cut[rng.randrange(len(cut))] = rng.randrange(256)
        frame = bytes(cut[: rng.randrange(len(cut) // 2, len(cut) + 1)])
    return frame


def test_fuzz_large_frames_raise_only_protocol_error() -> None:
    rng = random.Random(0xB0DED)
    outcomes = {"decoded": 0, "refused": 0}
    for _ in range(1500):
        frame = _random_large_frame(rng)
        try:
            decode(frame)
            outcomes["decoded"] += 1
        except ProtocolError as exc:
            assert str(exc) and len(str(exc)) < 400
            outcomes["refused"] += 1
        except Exception as exc:  # pragma: no cover - reported
            pytest.fail(
                f"decode raised {type(exc).__name__}: {exc} for a frame starting {frame[:40]!r}"
            )
    assert outcomes["refused"] > 1000


# -- a real kernel, a bystander and the frame of the issue -------------------------------------

EEchoInt = 1  # servers/echo.py
INTERVAL = 0.004  # the bystander's schedule: one call every 4 ms
BEFORE = 3.0  # seconds of calls measured before the frame
WINDOW = 3.0  # seconds of calls measured from the frame on


class Bystander(threading.Thread):
    """Sync echo calls on a fixed schedule (open loop). Each call's latency counts from when it
    was due, not from when it was sent: a kernel that stalls for a second makes every call due
    in that second late, as the callers of a real service would be, instead of one slow call
    among thousands of fast ones."""

    def __init__(self) -> None:
        super().__init__(name="bystander", daemon=True)
        self.samples: list[tuple[float, float]] = []  # (due, latency)
        self.stop_after: float | None = None
        self.connected = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            with RSession.connect("echo") as session:
                self.connected.set()
                due = time.monotonic()
                number = 0
                while self.stop_after is None or due <= self.stop_after:
                    pause = due - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                    number += 1
                    if session.SendReceive(EEchoInt, (number,), timeout=60) != number:
                        self.errors.append(f"call {number} echoed a wrong value")
                    self.samples.append((due, time.monotonic() - due))
                    due += INTERVAL
        except BaseException as exc:  # reported by the test
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.connected.set()

    def p99(self, start: float, end: float) -> tuple[float, int]:
        """The 99th percentile latency of the calls due in [start, end), and their number."""
        latencies = sorted(latency for due, latency in self.samples if start <= due < end)
        assert len(latencies) >= 100, f"only {len(latencies)} calls due in the period"
        return statistics.quantiles(latencies, n=100)[98], len(latencies)


def _status_bytes(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


class Outcome(typing.NamedTuple):
    """What one frame did to the kernel and to the bystander."""

    rss_before: int
    growth: int  # of the kernel's peak RSS over its RSS before the frame
    peak_from: str  # "VmHWM" (reset before the frame) or "sampled" (every 5 ms)
    p99_before: float
    calls_before: int
    p99_window: float
    calls_window: int

    def __str__(self) -> str:
        return (
            f"kernel RSS {self.rss_before / MiB:.1f} MiB, "
            f"peak +{self.growth / MiB:.1f} MiB ({self.peak_from}); "
            f"bystander p99 {self.p99_before * 1e3:.2f} ms over {self.calls_before} calls before, "
            f"{self.p99_window * 1e3:.2f} ms over {self.calls_window} calls from the frame on"
        )


def _send_beside_a_bystander(kernel: KernelFixture, frame: bytes) -> Outcome:
    """Run a bystander for BEFORE seconds, send `frame` from a raw channel that said Hello, and
    keep the bystander on for WINDOW seconds more, watching the kernel's RSS."""
    pid = kernel.process.pid
    bystander = Bystander()
    flood = Flood(kernel.endpoint)
    try:
        bystander.start()
        assert bystander.connected.wait(15) and not bystander.errors, bystander.errors
        hostile = RawPeer(flood, "hostile")
        hostile.hello(Role.CHANNEL)
        assert not flood.problems, flood.problems
        time.sleep(0.5)  # the bystander's first calls warm its channel and the kernel's tables
        measure_from = time.monotonic()
        time.sleep(BEFORE)
        rss_before = _status_bytes(pid, "VmRSS")
        try:  # reset the kernel's peak RSS (VmHWM) to its RSS now
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            peak_from = "VmHWM"
        except OSError:
            peak_from = "sampled"
        sampled = rss_before
        sent = time.monotonic()
        hostile.send(frame)
        bystander.stop_after = sent + WINDOW
        while bystander.is_alive() and time.monotonic() < sent + 60:
            sampled = max(sampled, psutil.Process(pid).memory_info().rss)
            time.sleep(0.005)
        bystander.join(timeout=30)
        peak = _status_bytes(pid, "VmHWM") if peak_from == "VmHWM" else sampled
    finally:
        bystander.stop_after = time.monotonic()
        flood.close()
        bystander.join(timeout=30)
    assert not bystander.is_alive() and not bystander.errors, bystander.errors
    return Outcome(rss_before, peak - rss_before, peak_from,
                   *bystander.p99(measure_from, sent), *bystander.p99(sent, sent + WINDOW))


def test_a_frame_of_empty_maps_neither_bloats_nor_stalls_the_kernel(kernel: KernelFixture) -> None:
    """The issue's frame: 15 MiB of empty maps from a peer that said Hello. Before, the kernel
    built 15 million dicts (+1.2 GB) and served no one for seconds (the bystander's p99 went
    from milliseconds to 2.5 s); now it refuses the frame at its first header, and its memory
    grows by the frame's two copies only (libzmq's message and the loop's bytes).

    The latency claim is measured twice if it fails once: a burst of load from elsewhere on a
    shared machine can fall in the window by chance, but not twice in a row, while a kernel that
    stalls on the frame fails both times."""
    kernel.serve("servers.echo:EchoServer", "echo")
    frame = array_of(EMPTY_MAP)
    most = 3 * len(frame)
    first = _send_beside_a_bystander(kernel, frame)
    print(first)
    wait_until(lambda: "rejected malformed frame" in kernel.process.log(), timeout=30,
               what="the kernel to refuse the frame")
    # The frame and the copy the kernel's loop takes of it, and slack. Before: 81 times it.
    assert first.growth <= most, first
    if first.p99_window > 5 * first.p99_before:
        second = _send_beside_a_bystander(kernel, frame)
        print(second)
        assert second.p99_window <= 5 * second.p99_before, f"twice: {first}; {second}"
    assert "array of 15728635 items exceeds the protocol's 9" in kernel.process.log()
    assert kernel.process.alive()
