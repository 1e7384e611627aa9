"""Hostile frames for `ipcfw.protocol.decode`, and the measurements behind its decoding limits.

The frames are what a peer can send to make decoding cost more than the frame: msgpack gives
every array, map, str and bin its own Python object, so one byte (an empty map) can become a
64-byte dict. tests/kernel/test_bounded_decoding.py sends some of them to a real kernel; run
this file to measure `decode` itself, against whichever ipcfw is first on the path:

    python tests/hostile_decoding.py timing     # the hot path: typical messages, min of runs
    python tests/hostile_decoding.py timing /tmp/base/ipcfw/protocol.py   # ... beside another
    python tests/hostile_decoding.py memory     # each hostile frame, in a fresh process
    PYTHONPATH=/some/older/checkout python tests/hostile_decoding.py memory   # to compare

`memory` reports, per frame, the decode's wall time, its tracemalloc peak and the growth of the
process's peak RSS (VmHWM, reset through /proc/self/clear_refs), each as a multiple of the
frame's size.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
import time
import timeit
import tracemalloc
from pathlib import Path
from types import ModuleType
from collections.abc import Callable

#: The size of the frame in issue 9 (one frame of empty maps took the kernel to about 1.3 GB).
FRAME_SIZE = 15 * 2**20

EMPTY_MAP = b"\x80"
ONE_ITEM_ARRAY = b"\x91\x00"  # (0,): a new 1-tuple around a cached int
SHORT_STR = b"\xa2ab"  # "ab": a new str object (1- and 0-character strs are cached)
WIDE_CHAR = b"\xa2\xc4\x80"  # "\u0100": a new 74-byte str (only Latin-1 characters are cached)
SHORT_BIN = b"\xc4\x02ab"  # b"ab": a new bytes object
BIG_INT = b"\xcd\x01\x01"  # 257: the first int CPython does not cache
FLOAT = b"\xca\x3f\x80\x00\x00"  # 1.0 as a float32: a new float
EMPTY_EXT = b"\xc7\x00\x05"  # ExtType(5, b"")


def array_of(item: bytes, size: int = FRAME_SIZE) -> bytes:
    """One array32 holding as many copies of the msgpack object `item` as fit in `size` bytes."""
    count = (size - 5) // len(item)
    return b"\xdd" + struct.pack(">I", count) + item * count


def tree_of(item: bytes, size: int = FRAME_SIZE, width: int = 8) -> bytes:
    """A tree of `width`-item arrays with `item` leaves, as big as fits in `size` bytes.

    Every array is no longer than the protocol's longest message, so no length limit refuses it:
    only a limit on the number of arrays does. The last level holds shorter arrays where a full
    one would not fit."""
    if size >= 1 + width * len(item):
        return bytes([0x90 + width]) + tree_of(item, (size - 1) // width, width) * width
    count = (size - 1) // len(item)
    return bytes([0x90 + count]) + item * count if count > 0 else item


def spine_of(item: bytes, depth: int = 1023, width: int = 8) -> bytes:
    """`depth` nested `width`-item arrays, each holding `width - 1` copies of `item` before the
    next. msgpack finishes no array until it has read the innermost one, so a hook counting
    finished arrays sees none before then: what it builds is bounded by msgpack's depth limit
    (1024) instead, and grows with the frame only up to that depth."""
    return (bytes([0x90 + width]) + item * (width - 1)) * depth + item


def _open_map(keys: list[bytes]) -> bytes:
    """A map16 of len(keys) entries: every key but the last with the value 0, the last without
    its value, which is whatever follows."""
    return (
        b"\xde" + struct.pack(">H", len(keys)) + b"".join(key + b"\x00" for key in keys[:-1])
        + keys[-1]
    )


def hostile_frames() -> dict[str, Callable[[], bytes]]:
    """Name -> builder of each hostile frame of at most FRAME_SIZE bytes (built on demand: some
    take a moment)."""
    # [STATS_REPLY, req_id 1, counters ...]: a map is allowed there
    stats_reply_head = b"\x93\x19\x01"
    keys = [b"\xa4" + f"k{i:03d}".encode() for i in range(256)]
    cached_keys = [chr(i).encode() if i < 0x80 else b"\xa2" + chr(i).encode() for i in range(256)]
    cached_keys = [b"\xa1" + key if len(key) == 1 else key for key in cached_keys]
    share = (FRAME_SIZE - 1024) // 256
    return {
        # Refused by a length limit at the header: one array far longer than any message.
        "array of empty maps": lambda: array_of(EMPTY_MAP),  # the frame of issue 9
        "array of one-item arrays": lambda: array_of(ONE_ITEM_ARRAY),
        "array of short strs": lambda: array_of(SHORT_STR),
        "array of short bins": lambda: array_of(SHORT_BIN),
        "array of big ints": lambda: array_of(BIG_INT),
        "array of floats": lambda: array_of(FLOAT),
        "array of empty exts": lambda: array_of(EMPTY_EXT),
        # Within every length limit: only counting arrays (and refusing maps) bounds these.
        "tree of empty maps": lambda: tree_of(EMPTY_MAP),
        "tree of one-item arrays": lambda: tree_of(ONE_ITEM_ARRAY),
        "tree of short strs": lambda: tree_of(SHORT_STR),
        "tree of big ints": lambda: tree_of(BIG_INT),
        "tree of empty exts": lambda: tree_of(EMPTY_EXT),
        "StatsReply of trees of maps": lambda: (
            stats_reply_head + b"\xde\x01\x00"
            + b"".join(key + tree_of(EMPTY_MAP, share) for key in keys)
        ),
        # Every array left open: bounded by msgpack's depth limit, not by the frame's size.
        "spine of short strs": lambda: spine_of(SHORT_STR),
        "spine of one-character strs": lambda: spine_of(WIDE_CHAR),
        "spine of floats": lambda: spine_of(FLOAT),
        # Maps 1,000 deep, each with 255 entries (cached keys and values) open around the next:
        # if msgpack built the counters, each would be a 10 KiB dict of a 1 KiB map.
        "StatsReply spine of maps": lambda: (
            stats_reply_head + _open_map(cached_keys) * 1000 + b"\x80"
        ),
        # A big frame, for reference: one bin (a Request with a 15 MiB read-only descriptor) ...
        "Request with a 15 MiB bin": lambda: (
            b"\x96\x04\x01\x01\x01\x91\xc6" + struct.pack(">I", FRAME_SIZE - 16)
            + bytes(FRAME_SIZE - 16) + b"\x00"
        ),
        # ... one str (a server name far over the limit) ...
        "Register with a 15 MiB name": lambda: (
            b"\x95\x02\x01\xdb" + struct.pack(">I", FRAME_SIZE - 16) + b"n" * (FRAME_SIZE - 16)
            + b"\x00\x93\x01\x00\x00"
        ),
        # ... and the worst a small frame can do, decoded without counting arrays.
        "4 KiB tree of one-item arrays": lambda: tree_of(ONE_ITEM_ARRAY, 4096),
        "4 KiB array of one-item arrays": lambda: array_of(ONE_ITEM_ARRAY, 4096),
        "4 KiB spine of short strs": lambda: spine_of(SHORT_STR, (4096 - 3) // 19),
    }


# -- measurement ---------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def measure(name: str) -> dict:
    """Decode hostile frame `name` in this process: time, tracemalloc peak, peak RSS growth."""
    from ipcfw.protocol import ProtocolError, decode

    frame = hostile_frames()[name]()
    gc.collect()

    def attempt() -> str:
        try:
            return f"decoded {type(decode(frame)).__name__}"
        except ProtocolError as exc:
            return f"ProtocolError: {str(exc)[:120]}"

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss_before = _status_kib("VmRSS")
    start = time.perf_counter()
    outcome = attempt()
    seconds = time.perf_counter() - start
    rss_growth = (_status_kib("VmHWM") - rss_before) * 1024
    gc.collect()
    tracemalloc.start()
    attempt()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "frame": name,
        "bytes": len(frame),
        "outcome": outcome,
        "seconds": round(seconds, 4),
        "tracemalloc peak / size": round(peak / len(frame), 2),
        "tracemalloc peak": peak,
        "peak RSS growth / size": round(rss_growth / len(frame), 2),
        "peak RSS growth": rss_growth,
    }


def typical_frames() -> dict[str, bytes]:
    """The hot path: what every call sends (Request, Deliver) and answers (Complete, Completed),
    plus frames around the size where decode starts counting arrays."""
    from ipcfw.protocol import Complete, Completed, Deliver, Mode, Request, encode

    args = (7, b"hello world", (b"", 64))
    return {
        "Request": encode(Request(12345, 5, 1, args, Mode.SYNC)),
        "Deliver": encode(Deliver(123456, 5, 1, args, 3)),
        "Complete": encode(Complete(123456, 0, ((2, b"x" * 20),))),
        "Completed": encode(Completed(12345, 0, ((2, b"x" * 20),))),
        "Request, 4000-byte descriptor": encode(
            Request(12345, 5, 1, (7, b"d" * 4000, (b"", 64)), Mode.SYNC)
        ),
        "Request, 4200-byte descriptor": encode(
            Request(12345, 5, 1, (7, b"d" * 4200, (b"", 64)), Mode.SYNC)
        ),
        "Request, 64 KiB descriptor": encode(
            Request(12345, 5, 1, (7, b"d" * 65536, (b"", 64)), Mode.SYNC)
        ),
    }


def load_protocol(path: str) -> ModuleType:
    """Another copy of ipcfw/protocol.py (it imports nothing from ipcfw), e.g. the last commit's,
    loaded as a module of its own so that both can be timed in one process."""
    spec = importlib.util.spec_from_file_location(f"protocol_at_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and typing look the module up by name
    spec.loader.exec_module(module)
    return module


def timing(
    decoders: dict[str, Callable[[bytes], object]], repeat: int = 9
) -> dict[str, dict[str, float]]:
    """Microseconds per decode of each typical frame by each decoder: the minimum over `repeat`
    runs, the decoders' runs interleaved so that a noisy machine slows them alike."""
    results: dict[str, dict[str, float]] = {}
    for name, frame in typical_frames().items():
        number = 100_000 if len(frame) < 1000 else 20_000
        best = {label: float("inf") for label in decoders}
        for _ in range(repeat):
            for label, decode in decoders.items():
                seconds = timeit.timeit(lambda: decode(frame), number=number)
                best[label] = min(best[label], seconds / number * 1e6)
        results[name] = {label: round(micros, 3) for label, micros in best.items()}
    return results


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else "memory"
    if command == "timing":  # timing [OTHER/ipcfw/protocol.py]
        from ipcfw.protocol import decode

        decoders = {"this": decode}
        if len(argv) > 2:
            decoders["other"] = load_protocol(argv[2]).decode
        print(f"{'':32} " + " ".join(f"{label:>10}" for label in decoders))
        for name, row in timing(decoders).items():
            print(f"{name:32} " + " ".join(f"{micros:7.3f} us" for micros in row.values()))
        return 0
    if command == "measure":  # one frame, in this process (run by `memory`)
        print(json.dumps(measure(argv[2])))
        return 0
    if command == "memory":
        names = argv[2:] or list(hostile_frames())
        for name in names:
            done = subprocess.run([sys.executable, __file__, "measure", name],
                                  capture_output=True, text=True, env=os.environ)
            if done.returncode:
                print(f"{name}: failed\n{done.stderr}")
                continue
            row = json.loads(done.stdout)
            print(f"{row['frame']:32} {row['bytes']:>9} B {row['seconds']:8.4f} s  "
                  f"tracemalloc {row['tracemalloc peak / size']:7.2f}x "
                  f"({row['tracemalloc peak'] / 2**20:8.2f} MiB)  "
                  f"RSS {row['peak RSS growth / size']:7.2f}x "
                  f"({row['peak RSS growth'] / 2**20:8.2f} MiB)  "
                  f"{row['outcome']}")
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
