"""Malformed ipcfw frames, for the hostile-peer tests (tests/kernel/test_hostile.py,
tests/hostile_flood.py).

`malformed_frames(rng, count, samples, wrong_way)` returns `count` zmq messages (each a list of
frames), cycling through the kinds of garbage a hostile peer can send. Every one of them must be
refused by whoever receives it (the kernel, or a server host) without an answer:

* random bytes, truncated valid frames, empty frames, multi-frame messages;
* well-formed msgpack of the wrong shape: a map, a str, nested arrays, an ExtType, a bool where an
  int is expected, a float, nil, deep nesting, a declared length far beyond the frame;
* unknown kinds and wrong field counts;
* ints outside their field's range (2**40, -2**63, 2**64-1) in args, handles, ids and functions;
* absurd handles (0, -1) that no decoder may accept;
* fields over their size limit (a 10k-character name, a 5000-byte payload, a 1000-character panic
  category, five arguments, a writable descriptor longer than its max length);
* structurally valid messages that travel the other way (`wrong_way`), which the receiver must
  refuse as unexpected.

`samples` are valid messages *to* the receiver: they are only truncated or given a wrong number of
fields, never sent whole. The list is built from a seeded `random.Random`, so a failure replays.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import msgpack

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
    SessionLost,
    Stats,
    StatsReply,
    Welcome,
    encode,
)

Frames = list  # list[bytes]: one zmq message

# Valid messages by direction: the `samples` and `wrong_way` arguments of `malformed_frames`.
KERNEL_BOUND: list[Message] = [
    Hello(int(Role.CHANNEL), PROTOCOL_VERSION),
    Register(1, "probe", 0, (1, 0, 0)),
    Connect(1, "probe", (1, 0, 0), -1, b"payload"),
    Request(1, 1, 1, (1, b"ro", (b"rw", 8)), int(Mode.SYNC)),
    Close(1),
    Complete(1, 0, ((0, b"x"),)),
    Panic(1, "CAT", 3),
    Stats(1),
]
CLIENT_BOUND: list[Message] = [
    Welcome(1, MAX_FRAME, PROTOCOL_VERSION),
    Connected(1, 0, 1, b""),
    Completed(1, 0, ()),
    Panicked(1, 1, "KERN-EXEC", 0, 0),
    SessionLost(1, -15),
    StatsReply(1, {"peers": 1}),
]
SERVER_BOUND: list[Message] = [
    NewSession(1, 1, (1, 0, 0), 1, b""),
    Deliver(1, 1, 1, (1, b"ro", (b"rw", 8)), 1),
    Disconnect(1, 1),
    PeerInfo(1, 1, 0, 0, "/bin/true"),
]
NOT_KERNEL_BOUND = CLIENT_BOUND + SERVER_BOUND
NOT_SERVER_BOUND = KERNEL_BOUND + CLIENT_BOUND


def _pack(*items: object) -> bytes:
    return msgpack.packb(items)


def _random_bytes(
    rng: random.Random, samples: Sequence[Message], wrong_way: Sequence[Message]
) -> Frames:
    return [rng.randbytes(rng.randint(1, 300))]


def _truncated(
    rng: random.Random, samples: Sequence[Message], wrong_way: Sequence[Message]
) -> Frames:
    # Every sample is a msgpack array whose header declares its item count: any strict
    # prefix is incomplete, so it can never decode.
    frame = encode(rng.choice(samples))
    return [frame[: rng.randrange(1, len(frame))]]


def _empty(rng: random.Random, samples: Sequence[Message], wrong_way: Sequence[Message]) -> Frames:
    return [b""]


def _multi_frame(
    rng: random.Random, samples: Sequence[Message], wrong_way: Sequence[Message]
) -> Frames:
    choice = rng.randrange(4)
    if choice == 0:
        return [encode(rng.choice(wrong_way)), encode(rng.choice(wrong_way))]
    if choice == 1:
        return [encode(rng.choice(wrong_way)), b"", rng.randbytes(20)]
    if choice == 2:
        return [b"", b""]
    return [rng.randbytes(10), encode(rng.choice(wrong_way)), b"\xc1"]


_WRONG_TYPES: list[bytes] = [
    msgpack.packb({1: 2}),
    msgpack.packb({"kind": 4, "handle": 1}),
    msgpack.packb("a string, not an array"),
    msgpack.packb([[4, 1], 1]),
    msgpack.packb([[[[1]]]]),
    msgpack.packb(msgpack.ExtType(7, b"ext")),
    msgpack.packb([msgpack.ExtType(1, b""), 1]),
    msgpack.packb(True),
    msgpack.packb(None),
    msgpack.packb(1.5),
    msgpack.packb(b"bytes, not an array"),
    msgpack.packb([]),
    msgpack.packb(msgpack.Timestamp(1, 0)),
    _pack(True, 1),  # bool as the kind
    _pack(float(Kind.STATS), 1),  # float as the kind
    _pack(Kind.STATS, True),  # bool where an int is expected
    _pack(Kind.STATS, 1.0),
    _pack(Kind.STATS, "1"),
    _pack(Kind.STATS, None),
    _pack(Kind.CLOSE, False),
    _pack(Kind.REQUEST, 1, True, 1, (), 0),
    _pack(Kind.REQUEST, 1, 1, 1.0, (), 0),
    _pack(Kind.REQUEST, 1, 1, "1", (), 0),
    _pack(Kind.REQUEST, 1, 1, 1, {"a": 1}, 0),
    _pack(Kind.REQUEST, 1, 1, 1, ((((1,),),),), 0),
    _pack(Kind.REQUEST, 1, 1, 1, (msgpack.ExtType(3, b"x"),), 0),
    _pack(Kind.REQUEST, 1, 1, 1, (True,), 0),
    _pack(Kind.REQUEST, 1, 1, 1, (1.5,), 0),
    _pack(Kind.REQUEST, 1, 1, 1, ("text",), 0),
    _pack(Kind.REQUEST, 1, 1, 1, (None,), 0),
    _pack(Kind.REQUEST, 1, 1, 1, "not a tuple", 0),
    _pack(Kind.REQUEST, 1, 1, 1, (), True),
    _pack(Kind.CONNECT, 1, b"probe", (1, 0, 0), -1, b""),  # bytes where str is expected
    _pack(Kind.CONNECT, 1, "probe", [1, 0], -1, b""),
    _pack(Kind.CONNECT, 1, "probe", (1, 0, 0), -1, "payload"),
    _pack(Kind.HELLO, 1.0, 1),
    _pack(Kind.COMPLETE, 1, 0, ((0, "str"),)),
    _pack(Kind.COMPLETE, 1, 0, (("0", b""),)),
    _pack(Kind.DELIVER, 1, 1, 1, {"0": 1}, 1),
    _pack(Kind.NEW_SESSION, 1, 1, (1, 0, 0), True, b""),
    _pack(Kind.PEER_INFO, 1, 1, 1, 1, 17),
    b"\x91" * 10_000 + b"\x01",  # 10,000 nested one-element arrays
    b"\xdd\xff\xff\xff\xff",  # array32 declaring 4 billion items
    b"\xdb\xff\xff\xff\xff",  # str32 declaring 4 GiB
    b"\x96\x04",  # an array of 6 with only the kind
    b"\xc1",  # the one byte msgpack never uses
    b"\x96" + b"\x04\x01\x01\x01\x90\x00" + b"trailing",  # a valid Request plus extra data
]


def _wrong_type(
    rng: random.Random, samples: Sequence[Message], wrong_way: Sequence[Message]
) -> Frames:
    return [rng.choice(_WRONG_TYPES)]


# Kinds no message has (derived from Kind, which grows: 19 and 27 were unknown once).
_UNKNOWN_KINDS = [
    kind for kind in (0, 11, 19, 27, 34, 39, 44, 57, 63, 99, 255, -1, -128, 2**31, 2**40, 2**64 - 1)
    if kind not in {int(known) for known in Kind}
]


def _unknown_kind(
    rng: random.Random, samples: Sequence[Message], wrong_way: Sequence[Message]
) -> Frames:
    kind = rng.choice(_UNKNOWN_KINDS)
    return [_pack(kind, *[rng.randint(0, 9) for _ in range(rng.randint(0, 5))])]


def _wrong_field_count(
    rng: random.Random, samples: Sequence[Message], wrong_way: Sequence[Message]
) -> Frames:
    sample = rng.choice(list(samples) + list(wrong_way))
    kind = msgpack.unpackb(encode(sample))[0]
    fields = tuple(sample)
    choice = rng.randrange(3)
    if choice == 0:
        return [_pack(kind)]
    if choice == 1 and type(sample)._fields[-1] not in type(sample)._field_defaults:
        return [_pack(kind, *fields[:-1])]  # (a trailing field with a default may be left out)
    if choice == 1:
        return [_pack(kind)]
    return [_pack(kind, *fields, 0)]


_HUGE_INTS: list[bytes] = []
for _big in (2**40, -(2**63), 2**64 - 1, 2**31, -(2**31) - 1):
    _HUGE_INTS += [
        _pack(Kind.REQUEST, 1, 1, 1, (_big,), 0),  # an int argument outside 32 bits
        _pack(Kind.REQUEST, 1, 1, 1, (1, 2, 3, _big), 1),
        _pack(Kind.REQUEST, 1, _big, 1, (), 0),  # handle
        _pack(Kind.REQUEST, 1, 1, _big, (), 0),  # function
        _pack(Kind.REQUEST, 1, 1, 1, (), _big),  # mode
        _pack(Kind.CLOSE, _big),
        _pack(Kind.COMPLETE, 1, _big, ()),
        _pack(Kind.PANIC, 1, "X", _big),
        _pack(Kind.CONNECT, 1, "probe", (1, 0, 0), _big, b""),  # slots
        _pack(Kind.DELIVER, 1, 1, 1, (_big,), 1),
        _pack(Kind.DELIVER, 1, _big, 1, (), 1),
        _pack(Kind.DISCONNECT, 1, _big),
        _pack(Kind.NEW_SESSION, 1, _big, (1, 0, 0), 1, b""),
    ]
for _big in (-1, -(2**63), 2**64 - 1):  # unsigned 63-bit ids
    _HUGE_INTS += [
        _pack(Kind.STATS, _big),
        _pack(Kind.REQUEST, _big, 1, 1, (), 0),
        _pack(Kind.COMPLETE, _big, 0, ()),
        _pack(Kind.DELIVER, _big, 1, 1, (), 1),
        _pack(Kind.PEER_INFO, _big, 1, 1, 1, ""),
    ]


def _huge_int(
    rng: random.Random, samples: Sequence[Message], wrong_way: Sequence[Message]
) -> Frames:
    return [rng.choice(_HUGE_INTS)]


_ABSURD_HANDLES: list[bytes] = []
for _handle in (0, -1):
    _ABSURD_HANDLES += [
        _pack(Kind.REQUEST, 1, _handle, 1, (), 0),
        _pack(Kind.REQUEST, 1, _handle, 1, (), 1),
        _pack(Kind.CLOSE, _handle),
        _pack(Kind.DELIVER, 1, _handle, 1, (1,), 1),
        _pack(Kind.DISCONNECT, 1, _handle),
        _pack(Kind.NEW_SESSION, 1, _handle, (1, 0, 0), 1, b""),
        _pack(Kind.SESSION_LOST, _handle, -15),
    ]


def _absurd_handle(
    rng: random.Random, samples: Sequence[Message], wrong_way: Sequence[Message]
) -> Frames:
    return [rng.choice(_ABSURD_HANDLES)]


_OVERSIZE_FIELDS: list[bytes] = [
    _pack(Kind.CONNECT, 1, "x" * 10_000, (1, 0, 0), -1, b""),
    _pack(Kind.REGISTER, 1, "y" * 10_000, 0, (1, 0, 0)),
    _pack(Kind.CONNECT, 1, "probe", (1, 0, 0), -1, b"p" * 5000),
    _pack(Kind.NEW_SESSION, 1, 1, (1, 0, 0), 1, b"p" * 5000),
    _pack(Kind.PANIC, 1, "c" * 1000, 0),
    _pack(Kind.PANICKED, 1, 1, "c" * 1000, 0, 0),
    _pack(Kind.PEER_INFO, 1, 1, 1, 1, "e" * 5000),
    _pack(Kind.REQUEST, 1, 1, 1, (1, 2, 3, 4, 5), 0),
    _pack(Kind.DELIVER, 1, 1, 1, (1, 2, 3, 4, 5), 1),
    _pack(Kind.REQUEST, 1, 1, 1, ((b"abc", 2),), 0),  # content longer than its max length
    _pack(Kind.REQUEST, 1, 1, 1, ((b"", MAX_FRAME + 1),), 0),  # max length over the frame limit
    _pack(Kind.REQUEST, 1, 1, 1, ((b"", 4, 4),), 0),
    _pack(Kind.REQUEST, 1, 1, 1, ((1, 2),), 0),
    _pack(Kind.DELIVER, 1, 1, 1, ((b"abc", -1),), 1),
    _pack(Kind.COMPLETE, 1, 0, ((7, b"x"),)),
    _pack(Kind.COMPLETE, 1, 0, tuple((0, b"x") for _ in range(5))),
    _pack(Kind.STATS_REPLY, 1, {f"c{i}": i for i in range(300)}),
    _pack(Kind.CONNECT, 1, "probe", (128, 0, 0), -1, b""),
    _pack(Kind.CONNECT, 1, "probe", (1, 0, 32768), -1, b""),
    _pack(Kind.CONNECT, 1, "probe", (-1, 0, 0), -1, b""),
    _pack(Kind.CONNECT, 1, "probe", (1, 2), -1, b""),
    _pack(Kind.NEW_SESSION, 1, 1, (1, 0, 0, 0), 1, b""),
    _pack(Kind.HELLO, 99, 1),  # no such role
    _pack(Kind.HELLO, 1, 2**16),
]


def _oversize_field(
    rng: random.Random, samples: Sequence[Message], wrong_way: Sequence[Message]
) -> Frames:
    return [rng.choice(_OVERSIZE_FIELDS)]


def _wrong_way(
    rng: random.Random, samples: Sequence[Message], wrong_way: Sequence[Message]
) -> Frames:
    return [encode(rng.choice(wrong_way))]


_KINDS: list[tuple[str, Callable[..., Frames]]] = [
    ("random bytes", _random_bytes),
    ("truncated", _truncated),
    ("empty", _empty),
    ("multi-frame", _multi_frame),
    ("wrong type", _wrong_type),
    ("unknown kind", _unknown_kind),
    ("wrong field count", _wrong_field_count),
    ("huge int", _huge_int),
    ("absurd handle", _absurd_handle),
    ("oversize field", _oversize_field),
    ("wrong way", _wrong_way),
]
KINDS = [name for name, _ in _KINDS]


def malformed_frames(
    rng: random.Random, count: int, samples: Sequence[Message], wrong_way: Sequence[Message]
) -> list[tuple[str, Frames]]:
    """`count` (kind, frames) pairs, round-robin over every kind of garbage above."""
    return [
        (name, make(rng, samples, wrong_way))
        for name, make in (_KINDS[i % len(_KINDS)] for i in range(count))
    ]
