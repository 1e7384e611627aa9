"""Tests of ipcfw.protocol: every message both ways, every malformed frame, and a fuzz loop.

Pure: no sockets, no processes. The shape follows h11's ``test_io.py`` (STYLE.md 2.13): one table
of messages checked both ways (``decode(encode(m)) == m`` with its type preserved), one table of
malformed frames each of which must raise ``ProtocolError`` naming the field, and a seeded random
loop asserting that ``decode`` returns a message or raises ``ProtocolError``, never anything else.
"""

from __future__ import annotations

import random
import typing

import msgpack
import pytest

from ipcfw import protocol
from ipcfw.protocol import (
    Event,
    EventKind,
    pack_events,
    unpack_events,
    BATCH_MARK,
    pack_batch,
    unpack_batch,
    Attach,
    SessionPanicked,
    Admit,
    Census,
    CensusReply,
    Join,
    ListSessions,
    SessionList,
    SessionRow,
    CensusItem,
    ProcessRow,
    ServerRow,
    pack_census,
    pack_process_rows,
    pack_server_rows,
    pack_session_rows,
    unpack_census,
    unpack_process_rows,
    unpack_server_rows,
    unpack_session_rows,
    PeerGone,
    Dropped,
    Deregister,
    Terminate,
    Terminating,
    Negotiated,
    Cancel,
    Cancelled,
    MAX_TOKEN,
    Open,
    Share,
    Shared,
    PROTOCOL_VERSION,
    MAX_CATEGORY,
    MAX_FRAME,
    MAX_NAME,
    MAX_PAYLOAD,
    Close,
    Complete,
    Completed,
    Connect,
    Connected,
    Deliver,
    Disconnect,
    Hello,
    Kind,
    Mode,
    NewSession,
    Panic,
    Panicked,
    PeerInfo,
    ProtocolError,
    Register,
    Request,
    Role,
    SessionLost,
    Stats,
    StatsReply,
    Welcome,
    check_args,
    decode,
    encode,
)

I32_MIN, I32_MAX = -(2**31), 2**31 - 1
U63_MAX = 2**63 - 1
SERVER_ROW = ServerRow("echo", 4242, "/usr/bin/python3", (1, 2, 3), 1, True, 2, 3, 1500,
                       60_000, "running")
PROCESS_ROW = ProcessRow(4242, 1000, "/usr/bin/python3", 2, True, ("echo", "kv"), 3, 4)
MESSAGE_CLASSES = frozenset(typing.get_args(protocol.Message))

#: Arguments at every edge the codec accepts: ints at the 32-bit edges, read-only descriptors
#: (empty, binary, large), writable pairs (empty, full, with spare room, at MAX_FRAME).
EDGE_ARGS = [
    (),
    (0,),
    (I32_MIN, I32_MAX, -1, 1),
    (b"",),
    (b"\x00\xff" * 8, b"x"),
    (b"a" * 70_000,),
    ((b"", 0),),
    ((b"", 64),),
    ((b"full", 4),),
    ((b"abc", MAX_FRAME),),
    (I32_MAX, b"ro", (b"rw", 16), I32_MIN),
    ((b"", 0), (b"", 1), (b"a", 1), (b"\x00", 2)),
]

# -- the table of valid messages ---------------------------------------------------------------

ROUND_TRIP: list = [
    # client or server -> kernel
    Hello(Role.CHANNEL, protocol.PROTOCOL_VERSION),
    Hello(Role.INBOX, 0),
    Hello(Role.SERVER, 0xFFFF),
    Register(0, "echo", 0, (1, 0, 0)),
    Register(U63_MAX, "!protected", 2, (127, 127, 32767)),
    Register(7, "n" * MAX_NAME, 1, (0, 0, 0)),
    Register(8, "", 0, (1, 2, 3)),  # the codec is structural: the kernel judges names
    Register(9, "unicode \u00e9\u4e2d", 0, (1, 0, 0)),
    Connect(1, "echo", (1, 0, 0), -1, b""),
    Connect(2, "echo", (0, 0, 0), 255, b"\x00" * MAX_PAYLOAD),
    Connect(U63_MAX, "x", (127, 127, 32767), I32_MIN, b"negotiate"),
    Connect(3, "x", (1, 0, 0), I32_MAX, b""),
    *[Request(10 + i, 1, 0, args, Mode.SYNC) for i, args in enumerate(EDGE_ARGS)],
    Request(0, I32_MAX, I32_MAX, (1,), Mode.ASYNC),
    Request(U63_MAX, 1, 0, (b"blind",), Mode.BLIND),
    Close(1),
    Close(I32_MAX),
    Complete(0, 0, ()),
    Complete(U63_MAX, I32_MIN, ()),
    Complete(5, I32_MAX, ((0, b""), (3, b"abc"))),
    Complete(6, -38, ((0, b"a"), (1, b"b"), (2, b"c"), (3, b"d"))),
    Complete(7, -1, (), "no key b'colour'"),
    Complete(8, -2, ((0, b"x"),), "é" * protocol.MAX_ERROR_TEXT),
    Panic(1, "KERN-EXEC", 0),
    Panic(U63_MAX, "c" * MAX_CATEGORY, I32_MIN),
    Panic(2, "", I32_MAX),
    Stats(0),
    Stats(U63_MAX),
    Share(1, 1, 1),
    Share(U63_MAX, I32_MAX, 2),
    Open(1, b""),
    Open(2, b"t" * MAX_TOKEN),
    Shared(1, 0, b"\x00" * 16),
    Shared(2, I32_MIN, b""),
    Cancel(1),
    Cancel(U63_MAX),
    Terminate(1, "server", 3),
    Terminate(U63_MAX, "x" * MAX_NAME, 5),
    Deregister(2),
    PeerGone(1),
    PeerGone(U63_MAX),
    Dropped(b"\x01" * 16, 100_000),
    Dropped(b"", U63_MAX),
    Terminating(1),
    Terminating(5),
    Negotiated(1, 0, b""),
    Negotiated(U63_MAX, I32_MIN, b"p" * MAX_PAYLOAD),
    Connect(4, "first", (1, 0, 0), 0, b"hi", (5, 1, (7, b"x", (b"", 4)))),
    Cancelled(1, 1),
    Cancelled(U63_MAX, I32_MAX),
    # the direct path (protocol 9)
    Register(10, "direct", 0, (1, 0, 0), "/run/ipcfw/d-0123456789ab"),
    Connect(5, "echo", (1, 0, 0), 4, b"", (), 1),
    Attach(1, b"t" * 16),
    Attach(U63_MAX, b""),
    SessionPanicked(1, "KERN-EXEC", 0),
    SessionPanicked(I32_MAX, "c" * MAX_CATEGORY, I32_MIN),
    # every thread on the direct path, and the session list (protocol 10)
    Join(1, 1),
    Join(U63_MAX, I32_MAX),
    Admit(1, 1, 1, b"t" * 16),
    Admit(U63_MAX, I32_MAX, U63_MAX, b"t" * MAX_TOKEN),
    ListSessions(1, 0),
    ListSessions(U63_MAX, I32_MAX),
    SessionList(1, 0, b"\x90"),
    SessionList(U63_MAX, I32_MAX, pack_session_rows(
        [SessionRow(7, "echo", 1, "OPEN", 2, ((4242, 3), (4243, 0)))])),
    Census(1),
    CensusReply(1, b""),
    # waiting for a server name (protocol 12)
    protocol.AwaitServer(1, "echo"),
    protocol.AwaitServer(U63_MAX, "n" * MAX_NAME),
    # the monitor (protocol 15)
    protocol.Monitor(1, "", 0),
    protocol.Monitor(U63_MAX, "n" * MAX_NAME, protocol.MONITOR_CREDIT),
    protocol.MonitorEvents(1, 0, b"\x90"),
    protocol.MonitorEvents(U63_MAX, U63_MAX, b"x" * 100),
    protocol.Report(1, 0),
    protocol.Report(U63_MAX, 1),
    protocol.Traffic(0, 0, b"\x90"),
    protocol.Traffic(U63_MAX, U63_MAX, b"x" * 100),
    # activation (protocol 16)
    protocol.ListActivatable(1),
    protocol.ActivatableList(1, protocol.pack_activatable([("echo", "starting")])),
    CensusReply(U63_MAX, pack_census([
        CensusItem(1, 2, 3, 1, 4), CensusItem(I32_MAX, 2**32 - 1, 2**32 - 1, 2**32 - 1, U63_MAX),
    ])),
    # the server and process lists, message ages (protocol 14)
    Connect(1, "x", (1, 0, 0), 0, b"", (), 1, 2**32 - 1),
    protocol.ListServers(1, ""),
    protocol.ListServers(U63_MAX, "n" * MAX_NAME),
    protocol.ServerList(1, "", b"\x90"),
    protocol.ServerList(U63_MAX, "n" * MAX_NAME, pack_server_rows([SERVER_ROW])),
    protocol.ListProcesses(1, 0),
    protocol.ListProcesses(U63_MAX, 2**32 - 1),
    protocol.ProcessList(1, 0, b"\x90"),
    protocol.ProcessList(U63_MAX, 2**32 - 1, pack_process_rows([PROCESS_ROW])),
    # shared memory on a direct connection
    protocol.SharedMemory(),
    protocol.MappedRequest(1, 1, 1, ((0, 1 << 20, 0),), Mode.SYNC),
    protocol.MappedRequest(
        U63_MAX, I32_MAX, 0,
        ((3, protocol.MAX_MAPPED, 1), b"ro", (b"rw", 16), (0, 0, 2)), Mode.ASYNC,
    ),
    protocol.MappedCompleted(1, 0, ()),
    protocol.MappedCompleted(2, -1, ((0, b"abc"), (1, protocol.MAX_MAPPED), (3, 0))),
    protocol.MappedCompleted(3, -1, ((1, 5),), "no such record"),
    # kernel -> client
    Welcome(0, MAX_FRAME, PROTOCOL_VERSION),
    Welcome(2**32 - 1, U63_MAX, PROTOCOL_VERSION),
    Connected(1, 0, 1, b""),
    Connected(2, -1, 0, b""),
    Connected(U63_MAX, I32_MIN, I32_MAX, b"p" * MAX_PAYLOAD),
    Connected(3, 0, 7, b"", "/run/ipcfw/d-0123456789ab", b"t" * 16),
    Connected(4, -1, 0, b"", text="no server is registered under 'x'"),
    Completed(1, 0, ()),
    Completed(U63_MAX, I32_MAX, ((2, b"\x00" * 100),)),
    Completed(3, I32_MIN, ((0, b""), (1, b"x"), (2, b"yy"), (3, b"zzz"))),
    Completed(4, -1, (), "t" * protocol.MAX_ERROR_TEXT),
    Panicked(1, 1, "KERN-EXEC", 0, 0),
    Panicked(U63_MAX, I32_MAX, "c" * MAX_CATEGORY, I32_MIN, 1),
    SessionLost(1, -15),
    SessionLost(I32_MAX, I32_MIN),
    StatsReply(1, {}),
    StatsReply(2, {"sessions": 3, "pool_used": 0, "big": 2**63 - 1, "neg": -(2**63)}),
    StatsReply(3, {f"k{i}": i for i in range(256)}),
    # kernel -> server
    NewSession(1, 1, (1, 0, 0), 1, b""),
    NewSession(U63_MAX, I32_MAX, (127, 127, 32767), U63_MAX, b"q" * MAX_PAYLOAD),
    NewSession(2, 7, (1, 0, 0), 3, b"", b"t" * 16, -1),
    NewSession(3, 7, (1, 0, 0), 3, b"", b"t" * MAX_TOKEN, 255),
    *[Deliver(100 + i, 2, 7, args, 1) for i, args in enumerate(EDGE_ARGS)],
    Deliver(U63_MAX, I32_MAX, I32_MAX, (I32_MIN,), U63_MAX),
    Disconnect(1, 1),
    Disconnect(U63_MAX, I32_MAX),
    PeerInfo(1, 4242, 1000, 1000, "/usr/bin/python3"),
    PeerInfo(U63_MAX, 2**32 - 1, 0, 2**32 - 1, ""),
    PeerInfo(2, 1, 2, 3, "/" + "p" * 4095),
    PeerInfo(3, 1, 2, 3, "/bin/x", "ProtServ ReadUserData com.example.Billing"),
]


def _id(message: object) -> str:
    text = repr(message)
    return text if len(text) <= 70 else text[:67] + "..."


def test_round_trip_table_covers_every_message_class() -> None:
    assert {type(m) for m in ROUND_TRIP} == MESSAGE_CLASSES
    assert len(MESSAGE_CLASSES) == 51


def test_every_kind_has_exactly_one_class() -> None:
    kinds = {cls: _kind_of(cls) for cls in MESSAGE_CLASSES}
    assert sorted(kinds.values()) == sorted(int(k) for k in Kind)
    assert len(set(kinds.values())) == len(MESSAGE_CLASSES)


def _kind_of(cls: type) -> int:
    """The kind tag `encode` writes for `cls`, read from a real frame."""
    sample = next(m for m in ROUND_TRIP if type(m) is cls)
    return msgpack.unpackb(encode(sample))[0]


@pytest.mark.parametrize("message", ROUND_TRIP, ids=_id)
def test_round_trip(message: tuple) -> None:
    frame = encode(message)
    assert type(frame) is bytes
    decoded = decode(frame)
    assert decoded == message
    # NamedTuples compare as tuples (Hello(1, 1) == Completed(1, 1, ...)): check the type
    # separately.
    assert type(decoded) is type(message)
    assert decoded._fields == message._fields
    # Encoding is deterministic, and a decoded message re-encodes to the same frame.
    assert encode(decoded) == frame


@pytest.mark.parametrize("message", ROUND_TRIP, ids=_id)
def test_frame_is_kind_then_fields(message: tuple) -> None:
    items = msgpack.unpackb(encode(message), use_list=False)
    assert len(items) == 1 + len(message._fields)
    assert Kind(items[0]).value == items[0]


def test_decoded_fields_are_plain_wire_types() -> None:
    # Enum members go out as ints and come back as ints that still compare equal.
    decoded = decode(encode(Request(1, 2, 3, ((b"a", 4), 5, b"c"), Mode.BLIND)))
    assert decoded.mode == Mode.BLIND and type(decoded.mode) is int
    assert decoded.args == ((b"a", 4), 5, b"c")
    assert type(decoded.args) is tuple and type(decoded.args[0]) is tuple
    assert type(decode(encode(Hello(Role.SERVER, 1))).role) is int


def test_encode_refuses_a_non_message() -> None:
    with pytest.raises(KeyError):
        encode((1, 1))  # a bare tuple is not a message
    with pytest.raises(KeyError):
        encode("Hello")


# -- the table of malformed frames -------------------------------------------------------------


def pack(*items: object) -> bytes:
    return msgpack.packb(list(items))


def _deep_array(depth: int) -> bytes:
    """`depth` nested one-element arrays around an int, as raw msgpack."""
    return b"\x91" * depth + b"\x01"


def _deep_map(depth: int) -> bytes:
    return b"\x81\xa1k" * depth + b"\x01"


_VALID_REQUEST = encode(Request(1, 1, 1, (b"abc", 5), Mode.SYNC))
_BAD_UTF8_NAME = (
    b"\x95" + pack(2)[1:] + b"\x01" + b"\xa2\xff\xfe" + b"\x00" + msgpack.packb([1, 0, 0])
)
H, R, C, Q, X, P = Kind.HELLO, Kind.REGISTER, Kind.CONNECT, Kind.REQUEST, Kind.CLOSE, Kind.PANIC
V = [1, 0, 0]
EXT = msgpack.ExtType(5, b"ext")
TS = msgpack.Timestamp(1, 2)
#: What decode says of a map outside StatsReply.counters, and of any ext type: msgpack refuses
#: them while reading (see tests/kernel/test_bounded_decoding.py), so no field is named.
NO_MAP = (
    r"^a map( of \d+ entr(y|ies))?, where the protocol has none "
    r"\(only StatsReply\.counters is a map\)$"
)
NO_EXT = r"^(an ext type|ext type -?\d+), where the protocol has none$"

#: (case id, frame, regex the ProtocolError message must match)
MALFORMED: list[tuple[str, bytes, str]] = [
    # not msgpack at all, or not exactly one msgpack object
    ("empty", b"", r"not a msgpack frame"),
    # an error's text: a str of at most MAX_ERROR_TEXT characters
    ("text over the bound", pack(Kind.COMPLETED, 1, -1, [], "t" * 1025),
     r"^Completed\.text: expected a string of at most 1024 characters"),
    ("text is bytes", pack(Kind.COMPLETE, 1, -1, [], b"no"),
     r"^Complete\.text: expected a string of at most 1024 characters"),
    ("text is nil", pack(Kind.MAPPED_COMPLETED, 1, -1, [], None),
     r"^MappedCompleted\.text: expected a string"),
    ("reserved byte 0xc1", b"\xc1", r"not a msgpack frame"),
    ("truncated request", _VALID_REQUEST[:-2], r"not a msgpack frame"),
    ("truncated to one byte", _VALID_REQUEST[:1], r"not a msgpack frame"),
    ("trailing byte", _VALID_REQUEST + b"\x00", r"not a msgpack frame"),
    ("two objects", encode(Close(1)) + encode(Close(2)), r"not a msgpack frame"),
    ("str with bad utf-8", _BAD_UTF8_NAME, r"not a msgpack frame"),
    ("map with int key", msgpack.packb({1: 2}), NO_MAP),
    ("array of map with int key", pack(H, {1: 2}, 1), NO_MAP),
    ("counters with int key", pack(Kind.STATS_REPLY, 1, {1: 2}),
     r"^StatsReply\.counters: expected str -> int"),
    # not a [kind, ...] array
    ("map instead of array", msgpack.packb({"kind": 1, "role": 1}), NO_MAP),
    ("empty map instead of array", msgpack.packb({}), NO_MAP),
    ("scalar int", msgpack.packb(1), r"not a \[kind"),
    ("nil", msgpack.packb(None), r"not a \[kind"),
    ("bytes", msgpack.packb(b"\x01\x01\x01"), r"not a \[kind"),
    ("empty array", pack(), r"not a \[kind"),
    ("kind is str", pack("1", 1, 1), r"not a \[kind"),
    ("kind is float", pack(1.0, 1, 1), r"not a \[kind"),
    ("kind is bool True", pack(True, 1, 1), r"not a \[kind"),
    ("kind is nil", pack(None, 1, 1), r"not a \[kind"),
    ("top-level ExtType", msgpack.packb(EXT), NO_EXT),
    ("top-level Timestamp", msgpack.packb(TS), NO_EXT),
    ("kind is ExtType", pack(EXT, 1, 1), NO_EXT),
    ("kind is an empty ExtType", pack(msgpack.ExtType(7, b""), 1, 1),
     r"^ext type 7, where the protocol has none$"),
    # unknown kinds
    ("kind 0", pack(0, 1, 1), r"unknown message kind 0\b"),
    ("kind 11", pack(11, 1), r"unknown message kind 11\b"),
    ("kind 99", pack(99), r"unknown message kind 99\b"),
    ("kind -1", pack(-1, 1, 1), r"unknown message kind -1\b"),
    ("kind 2**64-1", pack(2**64 - 1), r"unknown message kind 18446744073709551615"),
    # wrong field counts
    ("hello missing a field", pack(H, 1), r"Hello needs 4 fields, got 1"),
    ("hello no fields", pack(H), r"Hello needs 4 fields, got 0"),
    ("hello extra field", pack(H, 1, 1, 1, 1, 1), r"Hello needs 4 fields, got 5"),
    ("request missing mode", pack(Q, 1, 1, 1, []), r"Request needs 5 fields, got 4"),
    ("request extra field", pack(Q, 1, 1, 1, [], 0, 0), r"Request needs 5 fields, got 6"),
    ("close extra", pack(X, 1, 2), r"Close needs 1 fields, got 2"),
    # wrong types, named by field
    ("hello role str", pack(H, "1", 1), r"Hello\.role: expected a role, got '1'"),
    ("hello role True", pack(H, True, 1), r"Hello\.role: .*got True"),
    ("hello role float", pack(H, 1.0, 1), r"Hello\.role: .*got 1\.0"),
    ("hello role nil", pack(H, None, 1), r"Hello\.role: .*got None"),
    ("hello role 0", pack(H, 0, 1), r"Hello\.role"),
    ("hello role 4", pack(H, 4, 1), r"Hello\.role"),
    ("hello protocol 65536", pack(H, 1, 0x10000), r"Hello\.protocol: expected an unsigned 16-bit"),
    ("hello protocol -1", pack(H, 1, -1), r"Hello\.protocol"),
    ("hello protocol True", pack(H, 1, True), r"Hello\.protocol: .*got True"),
    ("register req_id -1", pack(R, -1, "n", 0, V),
     r"Register\.req_id: expected an unsigned 63-bit"),
    ("register req_id 2**63", pack(R, 2**63, "n", 0, V), r"Register\.req_id"),
    ("register name bytes", pack(R, 1, b"n", 0, V), r"Register\.name: expected a string"),
    ("register name int", pack(R, 1, 5, 0, V), r"Register\.name"),
    ("register sharing 3", pack(R, 1, "n", 3, V), r"Register\.sharing: expected a sharing mode"),
    ("register sharing False", pack(R, 1, "n", False, V), r"Register\.sharing: .*got False"),
    ("register version pair", pack(R, 1, "n", 0, [1, 0]), r"Register\.version: expected a \(major"),
    ("register version 4 items", pack(R, 1, "n", 0, [1, 0, 0, 0]), r"Register\.version"),
    ("register version map", pack(R, 1, "n", 0, {"a": 1}), NO_MAP),
    ("register version empty map", pack(R, 1, "n", 0, {}), NO_MAP),
    ("register version str", pack(R, 1, "n", 0, "1.0.0"), r"Register\.version"),
    ("register major 128", pack(R, 1, "n", 0, [128, 0, 0]),
     r"Register\.version: expected a version"),
    ("register minor -1", pack(R, 1, "n", 0, [1, -1, 0]), r"Register\.version"),
    ("register build 32768", pack(R, 1, "n", 0, [1, 0, 32768]), r"Register\.version"),
    ("register major True", pack(R, 1, "n", 0, [True, 0, 0]), r"Register\.version"),
    ("register version bytes part", pack(R, 1, "n", 0, [b"1", 0, 0]), r"Register\.version"),
    ("connect slots 2**31", pack(C, 1, "n", V, 2**31, b""), r"Connect\.slots: expected a 32-bit"),
    ("connect slots -2**31-1", pack(C, 1, "n", V, -(2**31) - 1, b""), r"Connect\.slots"),
    ("connect slots True", pack(C, 1, "n", V, True, b""), r"Connect\.slots: .*got True"),
    ("connect payload int", pack(C, 1, "n", V, 1, 5), r"Connect\.payload: expected bytes"),
    ("connect payload str", pack(C, 1, "n", V, 1, "p"), r"Connect\.payload"),
    ("close handle str", pack(X, "1"), r"Close\.handle: expected a handle"),
    ("complete value True", pack(Kind.COMPLETE, 1, True, []), r"Complete\.value: .*got True"),
    ("complete value float", pack(Kind.COMPLETE, 1, 0.0, []), r"Complete\.value"),
    ("complete value 2**31", pack(Kind.COMPLETE, 1, 2**31, []),
     r"Complete\.value: expected a 32-bit"),
    ("welcome pid -1", pack(Kind.WELCOME, -1, 1, PROTOCOL_VERSION),
     r"Welcome\.kernel_pid: expected an unsigned 32-bit"),
    ("welcome pid 2**32", pack(Kind.WELCOME, 2**32, 1, PROTOCOL_VERSION), r"Welcome\.kernel_pid"),
    ("connected handle -1", pack(Kind.CONNECTED, 1, 0, -1, b""), r"Connected\.handle"),
    ("connected handle 2**31", pack(Kind.CONNECTED, 1, 0, 2**31, b""), r"Connected\.handle"),
    ("peerinfo uid -1", pack(Kind.PEER_INFO, 1, 1, -1, 1, ""), r"PeerInfo\.uid"),
    ("peerinfo exe bytes", pack(Kind.PEER_INFO, 1, 1, 1, 1, b"/x"), r"PeerInfo\.exe"),
    ("stats req_id nil", pack(Kind.STATS, None), r"Stats\.req_id"),
    # the first bad field is the one named
    ("two bad fields", pack(Q, -1, 0, 1, [], 0), r"Request\.req_id"),
    # handles and functions
    ("request handle 0", pack(Q, 1, 0, 1, [], 0),
     r"Request\.handle: expected a handle in 1\.\.2\*\*31-1, got 0"),
    ("request handle -1", pack(Q, 1, -1, 1, [], 0), r"Request\.handle: .*got -1"),
    ("request handle 2**31", pack(Q, 1, 2**31, 1, [], 0), r"Request\.handle"),
    ("request handle str", pack(Q, 1, "1", 1, [], 0), r"Request\.handle"),
    ("close handle 0", pack(X, 0), r"Close\.handle: .*got 0"),
    ("close handle -5", pack(X, -5), r"Close\.handle: .*got -5"),
    ("panicked handle 0", pack(Kind.PANICKED, 1, 0, "c", 0, 0), r"Panicked\.handle"),
    ("panicked session_dead 2", pack(Kind.PANICKED, 1, 1, "c", 0, 2),
     r"Panicked\.session_dead: expected 0 or 1"),
    ("panicked session_dead True", pack(Kind.PANICKED, 1, 1, "c", 0, True),
     r"Panicked\.session_dead"),
    ("session lost handle 0", pack(Kind.SESSION_LOST, 0, -15), r"SessionLost\.handle"),
    ("deliver handle -1", pack(Kind.DELIVER, 1, -1, 1, [], 1), r"Deliver\.handle"),
    ("disconnect handle 0", pack(Kind.DISCONNECT, 1, 0), r"Disconnect\.handle"),
    ("newsession handle 0", pack(Kind.NEW_SESSION, 1, 0, V, 1, b""), r"NewSession\.handle"),
    ("request function -1", pack(Q, 1, 1, -1, [], 0),
     r"Request\.function: expected a function number"),
    ("request function 2**31", pack(Q, 1, 1, 2**31, [], 0), r"Request\.function"),
    ("deliver function -1", pack(Kind.DELIVER, 1, 1, -1, [], 1), r"Deliver\.function"),
    ("request mode 3", pack(Q, 1, 1, 1, [], 3), r"Request\.mode: expected a mode"),
    ("request mode -1", pack(Q, 1, 1, 1, [], -1), r"Request\.mode"),
    # arguments
    ("args not an array", pack(Q, 1, 1, 1, 5, 0), r"Request\.args: expected a tuple of at most 4"),
    ("args a map", pack(Q, 1, 1, 1, {"a": 1}, 0), NO_MAP),
    ("args bytes", pack(Q, 1, 1, 1, b"abc", 0), r"Request\.args: expected a tuple"),
    ("five args", pack(Q, 1, 1, 1, [1, 2, 3, 4, 5], 0),
     r"Request\.args: expected a tuple of at most 4"),
    ("arg 2**31", pack(Q, 1, 1, 1, [2**31], 0),
     r"Request\.args: argument 0: int 2147483648 is outside 32 bits"),
    ("arg -2**31-1", pack(Q, 1, 1, 1, [0, -(2**31) - 1], 0),
     r"Request\.args: argument 1: int -2147483649 is outside"),
    ("arg 2**64-1", pack(Q, 1, 1, 1, [0, 0, 2**64 - 1], 0),
     r"Request\.args: argument 2: int .* outside 32 bits"),
    ("arg -2**63", pack(Q, 1, 1, 1, [0, 0, 0, -(2**63)], 0), r"Request\.args: argument 3: int"),
    ("arg True", pack(Q, 1, 1, 1, [True], 0),
     r"Request\.args: argument 0: bool is not int, bytes or a pair"),
    ("arg str", pack(Q, 1, 1, 1, [1, "s"], 0), r"Request\.args: argument 1: str is not int"),
    ("arg float", pack(Q, 1, 1, 1, [1.5], 0), r"Request\.args: argument 0: float is not"),
    ("arg nil", pack(Q, 1, 1, 1, [None], 0), r"Request\.args: argument 0: NoneType is not"),
    ("arg map", pack(Q, 1, 1, 1, [{"a": 1}], 0), NO_MAP),
    ("arg ExtType", pack(Q, 1, 1, 1, [EXT], 0), NO_EXT),
    ("arg Timestamp", pack(Q, 1, 1, 1, [1, TS], 0), NO_EXT),
    ("writable content > maxlen", pack(Q, 1, 1, 1, [[b"abcde", 4]], 0),
     r"Request\.args: argument 0: malformed writable descriptor"),
    ("writable maxlen -1", pack(Q, 1, 1, 1, [[b"", -1]], 0), r"argument 0: malformed writable"),
    ("writable maxlen > MAX_FRAME", pack(Q, 1, 1, 1, [[b"", MAX_FRAME + 1]], 0),
     r"argument 0: malformed writable"),
    ("writable maxlen True", pack(Q, 1, 1, 1, [[b"", True]], 0), r"argument 0: malformed writable"),
    ("writable maxlen str", pack(Q, 1, 1, 1, [[b"", "4"]], 0), r"argument 0: malformed writable"),
    ("writable content str", pack(Q, 1, 1, 1, [["ab", 4]], 0), r"argument 0: malformed writable"),
    ("writable content int", pack(Q, 1, 1, 1, [[1, 4]], 0), r"argument 0: malformed writable"),
    ("writable triple", pack(Q, 1, 1, 1, [[b"", 4, 4]], 0), r"argument 0: malformed writable"),
    ("writable single", pack(Q, 1, 1, 1, [[b""]], 0), r"argument 0: malformed writable"),
    ("writable empty", pack(Q, 1, 1, 1, [[]], 0), r"argument 0: malformed writable"),
    ("mapped fd index 4", pack(Kind.MAPPED_REQUEST, 1, 1, 1, [[4, 1, 0]], 0),
     r"MappedRequest\.args: argument 0: malformed shared-memory descriptor"),
    ("mapped length over MAX_MAPPED",
     pack(Kind.MAPPED_REQUEST, 1, 1, 1, [[0, (1 << 30) + 1, 0]], 0),
     r"argument 0: malformed shared-memory"),
    ("mapped writable 3", pack(Kind.MAPPED_REQUEST, 1, 1, 1, [[0, 1, 3]], 0),
     r"argument 0: malformed shared-memory"),
    ("mapped length -1", pack(Kind.MAPPED_REQUEST, 1, 1, 1, [[0, -1, 0]], 0),
     r"argument 0: malformed shared-memory"),
    ("mapped placeholder in a Request", pack(Q, 1, 1, 1, [[0, 1, 0]], 0),
     r"Request\.args: argument 0: malformed writable"),
    ("mapped write length over MAX_MAPPED",
     pack(Kind.MAPPED_COMPLETED, 1, 0, [[0, (1 << 30) + 1]]), r"MappedCompleted\.writes"),
    ("deliver arg outside 32 bits", pack(Kind.DELIVER, 1, 1, 1, [2**31], 1),
     r"Deliver\.args: argument 0"),
    ("deliver writable too long", pack(Kind.DELIVER, 1, 1, 1, [1, [b"xx", 1]], 1),
     r"Deliver\.args: argument 1"),
    # completion writes
    ("writes index 4", pack(Kind.COMPLETE, 1, 0, [[4, b""]]),
     r"Complete\.writes: expected \(index 0\.\.3, bytes\)"),
    ("writes index -1", pack(Kind.COMPLETE, 1, 0, [[-1, b""]]), r"Complete\.writes"),
    ("writes index True", pack(Kind.COMPLETE, 1, 0, [[True, b""]]), r"Complete\.writes"),
    ("writes content str", pack(Kind.COMPLETE, 1, 0, [[0, "x"]]), r"Complete\.writes"),
    ("writes not pairs", pack(Kind.COMPLETE, 1, 0, [0, b"x"]), r"Complete\.writes"),
    ("five writes", pack(Kind.COMPLETE, 1, 0, [[0, b""]] * 5),
     r"Complete\.writes: expected a tuple of at most 4"),
    ("writes a map", pack(Kind.COMPLETE, 1, 0, {"0": b""}), NO_MAP),
    ("writes ExtType", pack(Kind.COMPLETE, 1, 0, [[0, EXT]]), NO_EXT),
    ("completed writes triple", pack(Kind.COMPLETED, 1, 0, [[0, b"", 1]]), r"Completed\.writes"),
    # counters
    ("counters bytes key", pack(Kind.STATS_REPLY, 1, {b"k": 1}),
     r"StatsReply\.counters: expected str -> int"),
    ("counters str value", pack(Kind.STATS_REPLY, 1, {"k": "1"}), r"StatsReply\.counters"),
    ("counters bool value", pack(Kind.STATS_REPLY, 1, {"k": True}), r"StatsReply\.counters"),
    ("counters array", pack(Kind.STATS_REPLY, 1, [1]), r"StatsReply\.counters: expected a map"),
    ("257 counters", pack(Kind.STATS_REPLY, 1, {f"k{i}": i for i in range(257)}),
     r"^map of 257 entries exceeds the protocol's 256$"),
    ("counter a map", pack(Kind.STATS_REPLY, 1, {"k": {}}), NO_MAP),
    ("counter an ExtType", pack(Kind.STATS_REPLY, 1, {"k": EXT}), NO_EXT),
    ("counters truncated", pack(Kind.STATS_REPLY, 1, {"k": 1, "l": 2})[:-1],
     r"^not a msgpack frame"),
    ("counters with trailing data", pack(Kind.STATS_REPLY, 1, {"k": 1}) + b"\x00",
     r"^not a msgpack frame"),
    ("counters with an extra field", pack(Kind.STATS_REPLY, 1, {"k": 1}, 0),
     r"^StatsReply needs 2 fields, got 3$"),
    ("map in a StatsReply's req_id", pack(Kind.STATS_REPLY, {}, {}), NO_MAP),
    ("map after a StatsReply's counters", pack(Kind.STATS_REPLY, 1, {}, {}), NO_MAP),
    ("StatsReply without counters, with a map", pack(Kind.STATS_REPLY, {}), NO_MAP),
    ("map in a non-canonical StatsReply", b"\xdc\x00\x03\x19\x01\x80", NO_MAP),
    # oversized strings and payloads
    ("name 257 chars", pack(R, 1, "n" * (MAX_NAME + 1), 0, V),
     r"Register\.name: expected a string of at most 256"),
    ("connect name 257 chars", pack(C, 1, "n" * (MAX_NAME + 1), V, 0, b""), r"Connect\.name"),
    ("await name 257 chars", pack(Kind.AWAIT_SERVER, 1, "n" * (MAX_NAME + 1)),
     r"AwaitServer\.name"),
    ("await name bytes", pack(Kind.AWAIT_SERVER, 1, b"echo"), r"AwaitServer\.name"),
    ("payload over the limit", pack(C, 1, "n", V, 0, b"p" * (MAX_PAYLOAD + 1)),
     rf"Connect\.payload: expected bytes of at most {MAX_PAYLOAD}"),
    ("connected payload over the limit", pack(Kind.CONNECTED, 1, 0, 1, b"p" * (MAX_PAYLOAD + 1)),
     r"Connected\.payload"),
    ("newsession payload over the limit",
     pack(Kind.NEW_SESSION, 1, 1, V, 1, b"p" * (MAX_PAYLOAD + 1)),
     r"NewSession\.payload"),
    ("panic category 17", pack(P, 1, "c" * (MAX_CATEGORY + 1), 0),
     r"Panic\.category: expected a string of at most 16"),
    ("panicked category 17", pack(Kind.PANICKED, 1, 1, "c" * (MAX_CATEGORY + 1), 0, 1),
     r"Panicked\.category"),
    ("panic category bytes", pack(P, 1, b"KERN", 0), r"Panic\.category"),
    ("peerinfo exe 4097", pack(Kind.PEER_INFO, 1, 1, 1, 1, "e" * 4097), r"PeerInfo\.exe"),
    # extension types where plain values are expected
    ("ExtType as role", pack(H, EXT, 1), NO_EXT),
    ("Timestamp as req_id", pack(Kind.STATS, TS), NO_EXT),
    ("ExtType as payload", pack(C, 1, "n", V, 0, EXT), NO_EXT),
    ("Timestamp as name", pack(R, 1, TS, 0, V), NO_EXT),
    ("ExtType as version", pack(R, 1, "n", 0, msgpack.ExtType(1, b"\x01\x00\x00")), NO_EXT),
    ("ExtType as args", pack(Q, 1, 1, 1, msgpack.ExtType(1, b""), 0),
     r"^ext type 1, where the protocol has none$"),
    ("ExtType as writes", pack(Kind.COMPLETE, 1, 0, EXT), NO_EXT),
    # nesting: shallow bombs are type errors, deep ones hit msgpack's stack limit
    ("nested 100 as field", pack(H, 1, 1)[:2] + _deep_array(100) + b"\x01", r"Hello\.role"),
    ("nested 100 in args",
     b"\x96" + pack(Q)[1:] + b"\x01\x01\x01" + b"\x91" + _deep_array(100) + b"\x00",
     r"Request\.args: argument 0"),
    ("nested 2000 arrays", _deep_array(2000), r"not a msgpack frame"),
    ("nested 2000 maps", _deep_map(2000), NO_MAP),
    ("nested 2000 in field", b"\x93\x01" + _deep_array(2000) + b"\x01", r"not a msgpack frame"),
    ("nested 100 maps as kind", b"\x91" + _deep_map(100), NO_MAP),
]


def test_malformed_case_ids_are_unique() -> None:
    ids = [case_id for case_id, _, _ in MALFORMED]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    ("frame", "pattern"),
    [pytest.param(frame, pattern, id=case_id) for case_id, frame, pattern in MALFORMED],
)
def test_malformed_frame_raises_protocol_error(frame: bytes, pattern: str) -> None:
    with pytest.raises(ProtocolError, match=pattern) as info:
        decode(frame)
    # The message is bounded even when the bad value is large.
    assert len(str(info.value)) < 400


@pytest.mark.parametrize("message", ROUND_TRIP, ids=_id)
def test_every_message_with_a_field_missing_or_extra(message: tuple) -> None:
    cls = type(message)
    items = msgpack.unpackb(encode(message), use_list=False)
    n = len(cls._fields)
    if n == 0:  # (SharedMemory: nothing to leave out)
        with pytest.raises(ProtocolError, match=rf"^{cls.__name__} needs 0 fields, got 1$"):
            decode(msgpack.packb((*items, 0)))
        return
    missing = msgpack.packb(items[:-1])
    extra = msgpack.packb((*items, 0))
    if cls._fields[-1] in cls._field_defaults:
        # A field a later protocol version added, with a default: a frame without it decodes.
        assert decode(missing) == message._replace(
            **{cls._fields[-1]: cls._field_defaults[cls._fields[-1]]}
        )
    else:
        with pytest.raises(ProtocolError, match=rf"^{cls.__name__} needs {n} fields, got {n - 1}$"):
            decode(missing)
    # One field too many for the longest messages is an array longer than any message.
    too_long = rf"^array of {n + 2} items exceeds the protocol's {protocol._MAX_ARRAY_LEN}$"
    with pytest.raises(ProtocolError, match=rf"^{cls.__name__} needs {n} fields, got {n + 1}$"
                       if n + 1 < protocol._MAX_ARRAY_LEN else too_long):
        decode(extra)


@pytest.mark.parametrize("message", ROUND_TRIP, ids=_id)
def test_every_field_rejects_a_wrong_type(message: tuple) -> None:
    """Each field in turn replaced by a value of a type no field accepts there names that field;
    an ext type or a map there is refused while reading, before any field is looked at."""
    cls = type(message)
    items = list(msgpack.unpackb(encode(message), use_list=False))
    for index, name in enumerate(cls._fields, start=1):
        # A float is never valid; a bool is never valid (`type(v) is int` excludes it).
        for wrong in (1.5, True):
            frame = msgpack.packb(items[:index] + [wrong] + items[index + 1 :])
            with pytest.raises(ProtocolError, match=rf"^{cls.__name__}\.{name}: "):
                decode(frame)
        for wrong, refusal in ((EXT, NO_EXT), (TS, NO_EXT), ({"a": 1}, NO_MAP), ({}, NO_MAP)):
            if (cls, name) == (StatsReply, "counters") and type(wrong) is dict:
                continue  # the one map in the protocol
            frame = msgpack.packb(items[:index] + [wrong] + items[index + 1 :])
            with pytest.raises(ProtocolError, match=refusal):
                decode(frame)


@pytest.mark.parametrize("depth", [1000, 1023])
@pytest.mark.parametrize("where", ["top level", "field", "kind position", "map"])
def test_depth_bomb_below_msgpack_limit_raises_protocol_error(where: str, depth: int) -> None:
    frame = {
        "top level": _deep_array(depth),
        "field": b"\x93\x01" + _deep_array(depth) + b"\x01",
        "kind position": b"\x92" + _deep_array(depth) + b"\x01",
        "map": _deep_map(depth),
    }[where]
    with pytest.raises(ProtocolError):
        decode(frame)


def test_connect_payload_is_limited_to_256_bytes_as_designed() -> None:
    assert decode(pack(C, 1, "n", V, 0, b"p" * 256)) == Connect(1, "n", (1, 0, 0), 0, b"p" * 256)
    assert MAX_PAYLOAD == 256
    try:
        decode(pack(C, 1, "n", V, 0, b"p" * 257))
    except ProtocolError:
        return
    raise AssertionError("a 257-byte Connect payload was accepted")


def test_bool_is_not_an_int_anywhere() -> None:
    # msgpack's bool is a distinct type; True == 1 in Python, but the codec uses `type(v) is int`.
    assert decode(pack(H, 1, 1)) == Hello(1, 1)
    for frame in (pack(H, True, 1), pack(True, 1, 1), pack(Q, 1, True, 1, [], 0), pack(X, True)):
        with pytest.raises(ProtocolError):
            decode(frame)


def test_int_edges_of_each_range_are_accepted_and_one_past_refused() -> None:
    accepted = [
        (pack(Q, 0, 1, 0, [I32_MIN, I32_MAX], 0), Request(0, 1, 0, (I32_MIN, I32_MAX), Mode.SYNC)),
        (pack(Q, U63_MAX, I32_MAX, I32_MAX, [], 2),
         Request(U63_MAX, I32_MAX, I32_MAX, (), Mode.BLIND)),
        (pack(C, 1, "n", V, I32_MIN, b""), Connect(1, "n", (1, 0, 0), I32_MIN, b"")),
        (pack(Kind.WELCOME, 2**32 - 1, U63_MAX, PROTOCOL_VERSION),
         Welcome(2**32 - 1, U63_MAX, PROTOCOL_VERSION)),
    ]
    for frame, message in accepted:
        assert decode(frame) == message
    refused = [
        pack(Q, 0, 1, 0, [I32_MIN - 1], 0),
        pack(Q, 0, 1, 0, [I32_MAX + 1], 0),
        pack(Q, U63_MAX + 1, 1, 0, [], 0),
        pack(Q, 0, I32_MAX + 1, 0, [], 0),
        pack(Q, 0, 1, I32_MAX + 1, [], 0),
        pack(C, 1, "n", V, I32_MIN - 1, b""),
        pack(Kind.WELCOME, 2**32, 1, PROTOCOL_VERSION),
    ]
    for frame in refused:
        with pytest.raises(ProtocolError):
            decode(frame)


def test_check_args_is_usable_directly() -> None:
    assert check_args((1, b"x", (b"y", 2))) == (1, b"x", (b"y", 2))
    assert check_args(()) == ()
    for bad in ([1], (1, 2, 3, 4, 5), (2**31,), (True,), ((b"xyz", 2),), ("s",)):
        with pytest.raises(ValueError):
            check_args(bad)


# -- fuzz --------------------------------------------------------------------------------------

FUZZ_SEED = 0x1BC5F
VALID_FRAMES = [encode(m) for m in ROUND_TRIP if len(encode(m)) < 2000]
_KINDS = [int(k) for k in Kind]


def _random_value(rng: random.Random, depth: int = 0) -> object:
    choice = rng.randrange(14 if depth < 3 else 10)
    if choice == 0:
        return rng.choice(
            [0, 1, -1, I32_MIN, I32_MAX, I32_MIN - 1, I32_MAX + 1, U63_MAX, 2**64 - 1, -(2**63)]
        )
    if choice == 1:
        return rng.randint(-5, 300)
    if choice == 2:
        return rng.random() * 10
    if choice == 3:
        return rng.choice([True, False, None])
    if choice == 4:
        return rng.randbytes(rng.choice([0, 1, 4, 17, 300]))
    if choice == 5:
        return rng.choice(["", "echo", "KERN-EXEC", "\u00e9", "x" * 20])
    if choice == 6:
        return msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.randrange(4)))
    if choice == 7:
        return msgpack.Timestamp(rng.randrange(2**32), rng.randrange(10**9))
    if choice == 8:
        return rng.randint(0, 5)
    if choice == 9:
        return rng.choice([(1, 0, 0), (b"ab", 4), (0, b"x"), ()])
    if choice in (10, 11):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    if choice == 12:
        return {
            rng.choice(["a", "b", "sessions"]): _random_value(rng, depth + 1)
            for _ in range(rng.randrange(3))
        }
    return [
        (rng.randrange(-1, 5), rng.randbytes(rng.randrange(3))) for _ in range(rng.randrange(6))
    ]


def _structured_frame(rng: random.Random) -> bytes:
    """A msgpack array with a real kind and random fields (a plausible but random message)."""
    kind = rng.choice(_KINDS)
    fields = [_random_value(rng) for _ in range(rng.randrange(7))]
    return msgpack.packb([kind, *fields], datetime=False)


def _mutated_frame(rng: random.Random) -> bytes:
    frame = bytearray(rng.choice(VALID_FRAMES))
    op = rng.randrange(6)
    if op == 0:  # bit flips
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(frame))
            frame[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncation
        del frame[rng.randrange(len(frame)) :]
    elif op == 2:  # appended bytes
        frame += rng.randbytes(rng.randint(1, 8))
    elif op == 3:  # random byte overwrite
        frame[rng.randrange(len(frame))] = rng.randrange(256)
    elif op == 4:  # inserted bytes
        i = rng.randrange(len(frame) + 1)
        frame[i:i] = rng.randbytes(rng.randint(1, 4))
    else:  # deleted byte
        del frame[rng.randrange(len(frame))]
    return bytes(frame)


def _check_decode_contract(frame: bytes, tally: dict) -> None:
    try:
        message = decode(frame)
    except ProtocolError as exc:
        assert str(exc), frame
        tally["refused"] += 1
        return
    except Exception as exc:  # pragma: no cover - the assertion below reports it
        pytest.fail(f"decode({frame!r}) raised {type(exc).__name__}: {exc}")
    assert type(message) in MESSAGE_CLASSES, (frame, message)
    # Whatever decodes is a well-formed message: it survives its own round trip.
    again = decode(encode(message))
    assert again == message and type(again) is type(message)
    tally["decoded"] += 1


def test_fuzz_random_bytes() -> None:
    rng = random.Random(FUZZ_SEED)
    tally = {"decoded": 0, "refused": 0}
    for _ in range(20_000):
        if rng.random() < 0.5:
            frame = rng.randbytes(rng.randrange(0, 48))
        else:  # start with an array header so the fuzz gets past the first byte
            frame = (bytes([0x90 + rng.randrange(1, 8), rng.choice(_KINDS)])
                     + rng.randbytes(rng.randrange(0, 40)))
        _check_decode_contract(frame, tally)
    assert tally["refused"] > 15_000


def test_fuzz_structured_random_messages() -> None:
    rng = random.Random(FUZZ_SEED + 1)
    tally = {"decoded": 0, "refused": 0}
    for _ in range(10_000):
        _check_decode_contract(_structured_frame(rng), tally)
    assert tally["refused"] > 5_000
    assert tally["decoded"] > 0  # the grammar does hit valid messages now and then


def test_fuzz_mutations_of_valid_frames() -> None:
    rng = random.Random(FUZZ_SEED + 2)
    tally = {"decoded": 0, "refused": 0}
    for _ in range(20_000):
        _check_decode_contract(_mutated_frame(rng), tally)
    # Mutations hit both sides of the contract.
    assert tally["decoded"] > 1_000 and tally["refused"] > 5_000



def _wire_form(value: object) -> object:
    """`value` as decode sees it: through msgpack, arrays as tuples."""
    frame = msgpack.packb(value, datetime=False)
    return msgpack.unpackb(frame, use_list=False, raw=False, strict_map_key=True)


def _checkers_accept(checkers: tuple, fields: tuple) -> bool:
    try:
        for check, value in zip(checkers, fields):
            check(value)
    except ValueError:
        return False
    return True


def test_compiled_validators_accept_exactly_what_the_field_checkers_accept() -> None:
    """decode tests a message's fields with one function compiled from its checkers; were the
    two to disagree, a hostile frame could pass the kernel's checks."""
    rng = random.Random(FUZZ_SEED + 3)
    verdicts = {True: 0, False: 0}
    for message in ROUND_TRIP:
        _cls, checkers, valid = protocol._BY_KIND[_kind_of(type(message))]
        good = tuple(decode(encode(message)))
        for _ in range(200):
            fields = tuple(
                v if rng.random() < 0.7 else _wire_form(_random_value(rng)) for v in good
            )
            expected = _checkers_accept(checkers, fields)
            try:
                verdict = valid(fields)
            except ValueError:
                verdict = False
            assert verdict == expected, (type(message).__name__, fields)
            verdicts[expected] += 1
    assert verdicts[True] > 1_000 and verdicts[False] > 1_000


# -- the tables inside SessionList, ServerList, ProcessList and CensusReply (protocols 10, 14) --


def test_session_rows_and_censuses_round_trip() -> None:
    rows = [SessionRow(1, "echo", 0, "OPEN", 0, ()),
            SessionRow(I32_MAX, "s" * 80, 1, "CLOSING", 3, ((1, 255), (2**32 - 1, 0)),
                       U63_MAX, 2**32 - 1, 2**32 - 1, 255, -1, U63_MAX)]
    assert unpack_session_rows(pack_session_rows(rows)) == rows
    items = [CensusItem(5, 1, 1, 0, 0), CensusItem(6, 2, 7, 3, 1500)]
    assert unpack_census(pack_census(items)) == items


def test_server_and_process_rows_round_trip() -> None:
    servers = [SERVER_ROW,
               SERVER_ROW._replace(name="!p", exe="", direct=False, state="terminating")]
    assert unpack_server_rows(pack_server_rows(servers)) == servers
    processes = [PROCESS_ROW, PROCESS_ROW._replace(servers=(), inbox=False)]
    assert unpack_process_rows(pack_process_rows(processes)) == processes


_ROW = [1, "x", 0, "OPEN", 0, [], 0, 1, 2, 0, -1, 0]


def _session_row(index: int, value: object) -> bytes:
    row = list(_ROW)
    row[index] = value
    return msgpack.packb([row])


@pytest.mark.parametrize("data", [
    b"", b"\xc1", msgpack.packb({"a": 1}), msgpack.packb([[1, "x", 0, "OPEN", 0]]),
    _session_row(0, 0), _session_row(2, 2), _session_row(5, [1]), _session_row(4, -1),
    _session_row(6, -1), _session_row(7, "1"), _session_row(10, 256), _session_row(11, 2**63),
    msgpack.packb([_ROW] * 257), msgpack.packb(list(range(10**5))),
])
def test_a_malformed_session_table_is_a_protocol_error(data: bytes) -> None:
    assert unpack_session_rows(msgpack.packb([_ROW]))  # (the row varied is good)
    with pytest.raises(ProtocolError, match="SessionList.rows"):
        unpack_session_rows(data)


def test_activatable_rows_round_trip() -> None:
    rows = [("echo", "activatable"), ("s" * 80, "starting")]
    assert protocol.unpack_activatable(protocol.pack_activatable(rows)) == rows
    assert protocol.unpack_activatable(protocol.pack_activatable([])) == []


@pytest.mark.parametrize("data", [
    b"", b"\xc1", msgpack.packb({"a": 1}), msgpack.packb([["echo"]]),
    msgpack.packb([["echo", 1]]), msgpack.packb([[b"echo", "running"]]),
    msgpack.packb([["echo", "x" * 17]]), msgpack.packb([["n" * 257, "running"]]),
    msgpack.packb([["echo", "running"]] * 1025), msgpack.packb(7),
])
def test_a_malformed_activatable_table_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="ActivatableList.rows"):
        protocol.unpack_activatable(data)


def _varied(row: tuple[object, ...], index: int, value: object) -> bytes:
    fields = list(row)
    fields[index] = value
    return msgpack.packb([fields])


@pytest.mark.parametrize("data", [
    b"", b"\xc1", msgpack.packb({"a": 1}), msgpack.packb([list(SERVER_ROW)[:-1]]),
    _varied(SERVER_ROW, 0, "n" * (MAX_NAME + 1)), _varied(SERVER_ROW, 1, -1),
    _varied(SERVER_ROW, 3, [1, 0]), _varied(SERVER_ROW, 4, 3), _varied(SERVER_ROW, 5, 1),
    _varied(SERVER_ROW, 7, -1), _varied(SERVER_ROW, 10, "s" * 17),
    msgpack.packb([list(SERVER_ROW)] * 257),
])
def test_a_malformed_server_table_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="ServerList.rows"):
        unpack_server_rows(data)


@pytest.mark.parametrize("data", [
    b"", b"\xc1", msgpack.packb({"a": 1}), msgpack.packb([list(PROCESS_ROW)[:-1]]),
    _varied(PROCESS_ROW, 0, -1), _varied(PROCESS_ROW, 2, 5), _varied(PROCESS_ROW, 4, 0),
    _varied(PROCESS_ROW, 5, ["s"] * 65), _varied(PROCESS_ROW, 5, [1]),
    _varied(PROCESS_ROW, 7, -1), msgpack.packb([list(PROCESS_ROW)] * 257),
])
def test_a_malformed_process_table_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="ProcessList.rows"):
        unpack_process_rows(data)


@pytest.mark.parametrize("data", [
    b"\x01", b"\x00" * 24, b"\xff\xff\xff\xff" + b"\x00" * 20, b"\x01" + b"\x00" * 22 + b"\x80",
])
def test_a_malformed_census_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="CensusReply.counts"):
        unpack_census(data)


def test_an_error_text_utf8_cannot_encode_is_escaped_so_that_its_frame_encodes():
    text = "no file " + b"caf\xe9".decode("utf-8", "surrogateescape")
    assert protocol.error_text(text) == "no file caf\\udce9"
    assert protocol.error_text("café ✓") == "café ✓"
    frame = protocol.encode(protocol.Complete(1, -1, (), protocol.error_text(text)))
    assert protocol.decode(frame) == protocol.Complete(1, -1, (), "no file caf\\udce9")


def test_an_error_text_is_cut_to_the_bound_with_a_marker():
    assert protocol.error_text("short") == "short"
    exact = "x" * protocol.MAX_ERROR_TEXT
    assert protocol.error_text(exact) == exact
    cut = protocol.error_text(exact + "y")
    assert len(cut) == protocol.MAX_ERROR_TEXT and cut.endswith(protocol.TRUNCATED)
    assert cut.startswith("x" * (protocol.MAX_ERROR_TEXT - len(protocol.TRUNCATED)))
    assert decode(encode(Completed(1, -1, (), cut))).text == cut


def test_a_completion_without_text_decodes_with_an_empty_one():
    assert decode(pack(Kind.COMPLETED, 1, -1, [])) == Completed(1, -1, (), "")
    assert decode(pack(Kind.COMPLETE, 1, -1, [])) == Complete(1, -1, (), "")


def test_monitor_events_round_trip():
    event = Event(12.5, int(EventKind.COMPLETE), "echo", 4242, 7, 1, 3, -1, -5, 40, "no key")
    assert unpack_events(pack_events([event] * 3)) == [event] * 3
    assert unpack_events(pack_events([])) == []


_EVENT = list(Event(12.5, 5, "echo", 4242, 7, 1, 3, -1, -5, 40, "no key"))


@pytest.mark.parametrize("data", [
    msgpack.packb({"a": 1}),
    msgpack.packb(5),
    msgpack.packb([_EVENT[:10]]),  # an event too short
    msgpack.packb([_EVENT[:1] + [99] + _EVENT[2:]]),  # an unknown kind
    msgpack.packb([_EVENT[:3] + [-1] + _EVENT[4:]]),  # a pid out of range
    msgpack.packb([_EVENT[:10] + [[1, 2]]]),  # an array in an event
    msgpack.packb([_EVENT] * (protocol.MAX_EVENTS_FRAME + 1)),
    msgpack.packb([[[[0] * 8] * 8] * 8] * 8),  # arrays the count refuses
    b"\xc1\xff",
], ids=["map", "int", "short", "kind", "pid", "nested", "too-many", "array-bomb", "garbage"])
def test_anything_else_than_monitor_events_is_a_protocol_error_naming_them(data):
    with pytest.raises(ProtocolError, match="^events: "):
        unpack_events(data)


# -- batches ------------------------------------------------------------------------------------


def test_a_batch_carries_its_frames_in_order_and_no_frame_looks_like_one() -> None:
    frames = [encode(Completed(n, n, ())) for n in range(3)]
    frames.append(encode(Completed(9, 0, ((0, b"x" * 300),))))
    datagram = pack_batch(frames)
    assert datagram[0] == BATCH_MARK and unpack_batch(datagram) == frames
    # msgpack never begins a value with 0xc1: a frame is never mistaken for a batch.
    with pytest.raises(ProtocolError):
        decode(datagram)


@pytest.mark.parametrize("datagram, pattern", [
    (b"\xc1", "no frame"),
    (b"\xc1\x05\x00\x00\x00abc", "a frame of 5 bytes at offset 5, with 3 bytes left"),
    (b"\xc1\x00\x00\x00\x00", "a frame of 0 bytes"),
    (b"\xc1\x01\x00\x00\x00a\x01\x00", "2 bytes left at offset 6, not a length"),
    (b"\x93\x01\x02\x03", "does not begin with BATCH_MARK"),
], ids=["empty", "short", "zero-length", "cut-length", "not-a-batch"])
def test_a_malformed_batch_raises_protocol_error_naming_the_problem(datagram: bytes,
                                                                    pattern: str) -> None:
    with pytest.raises(ProtocolError, match=pattern):
        unpack_batch(datagram)
