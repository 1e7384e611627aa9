"""The ipcfw wire protocol: every message kind, and the codec between messages and frames.

Theory of operation
-------------------
Every ipcfw peer (a client thread's channel, a client process's inbox, a server) holds one zmq
DEALER socket connected to the kernel's ROUTER. Every message is exactly **one frame**: a msgpack
array whose first item is the message's `Kind` and whose other items are the fields of the
message's class, in order. One frame per message keeps the hot path to one send and one receive
per hop (each extra zmq frame costs about 1 us per side in pyzmq).

This module is the only place where message kinds exist. It does no I/O: `encode(message)`
returns the frame to send and `decode(frame)` returns a message or raises `ProtocolError`, naming
the field and the value that were wrong (or what it refused to read: see "Bounded decoding").
`decode` never raises anything else, whatever the bytes, and never builds much more than the
frame: the kernel and the servers rely on that to survive hostile peers.

Field checks here are structural (types, 32-bit ranges, sizes). Whether a handle is held, a slot
is free or a name is valid is the kernel's business, not the codec's.

Arguments (`TIpcArgs` on the wire) are a tuple of at most four items, each one of:

* an int, a 32-bit signed integer;
* bytes, a read-only descriptor (`ReadL`, `GetDesLength`);
* a pair ``(bytes, max_length)``, a writable descriptor: its current content and its max length.

A completion carries ``writes``: pairs ``(index, content)`` giving the final content of each
writable descriptor the server wrote, which the client copies into its `bytearray`.

Bounded decoding
----------------
msgpack makes a Python object of every array, map, str, bin, ext and large int it reads, and by
default allows as many as the frame has bytes: one 15 MiB frame of empty maps (a byte each, a
64-byte dict each) took the kernel to 1.3 GB and stalled it for seconds. So `decode` asks msgpack
for no more than the protocol can hold, and msgpack refuses the rest as it reads, at the header,
before building it:

* no array longer than the longest message (`_MAX_ARRAY_LEN`, 9: a kind and Connect's eight
  fields; arguments and writes hold at most 4 items, versions 3, writable descriptors 2);
* no map (``max_map_len=0``, and a hook refuses empty ones), except the counters of a
  StatsReply (below), and no ext type (``max_ext_len=0``, and a hook for empty ones);
* no str longer than the longest string field in UTF-8 (`_MAX_STR_BYTES`, 16 KiB). A bin (a
  descriptor) is bounded by its frame alone: it costs its own bytes, and the transport bounds
  the frame (the kernel's ``MAXMSGSIZE``; a server decodes whatever its kernel sends).

Length limits do not bound the number of objects: a tree of 8-item arrays with cached leaves
(small ints, ``()``) makes a 64-byte tuple of every two bytes. So, above `_SMALL_FRAME` bytes,
a ``list_hook`` also counts the arrays msgpack finishes and refuses the ninth (`_MAX_ARRAYS`:
Connect with a first request of four writable descriptors has eight, the most of any message:
itself, its version, the request, its arguments, four descriptors). msgpack finishes arrays
innermost first, so it holds at most those eight plus the arrays it has started, 1024 deep at
most (its own limit) with 8 items each: under 1 MiB at worst, whatever the frame's size.

Counting costs a Python call per array: about 0.4 us a frame, a third of the hot path's 1.2 us
decode. The hot path's frames are small, and a frame of at most `_SMALL_FRAME` (4 KiB) bytes is
bounded whatever it holds (at worst 0.12 MiB, 0.3 ms, measured), so those are decoded with the
length limits only: the typical Request or Completed decodes 0.04 us slower than without limits.

A StatsReply (kernel -> peer) carries the one map. A frame these limits refuse that begins as
`encode` begins a StatsReply (a fixarray, then kind 25) is read again, its counters entry by
entry, each key and value under the same limits, and `decode` builds their dict itself: msgpack
would hold a map nested in a map open with all its entries (255 entries, 1024 deep).

Measured with tests/hostile_decoding.py (the tracemalloc peak of `decode` as a multiple of the
frame's size, for the worst frames of up to 15 MiB): before, up to 81 (1.2 GiB and 5.8 s for the
15 MiB of empty maps); now at most 1.08 for frames of megabytes (the copy msgpack's Unpacker
takes of a StatsReply; 1.0 for a frame holding one big bin, nothing for one refused at a header),
and under 1 MiB, the open arrays above, for any frame (0.12 MiB for one of 4 KiB).
"""

from __future__ import annotations

import enum
import re
import reprlib
import struct
from typing import Any, NamedTuple
from collections.abc import Callable, Iterable

import msgpack

__all__ = [
    "PROTOCOL_VERSION",
    "ERROR_STRING_FUNCTION",
    "MAX_FRAME",
    "MAX_NAME",
    "MAX_PAYLOAD",
    "MAX_CATEGORY",
    "MAX_ERROR_TEXT",
    "TRUNCATED",
    "error_text",
    "DIRECT_MAX_UNREAD",
    "DIRECT_MAX_UNREAD_BYTES",
    "DIRECT_ANSWER_OVERHEAD",
    "direct_unread_bytes",
    "ProtocolError",
    "Kind",
    "Role",
    "Mode",
    "Path",
    "Attach",
    "SessionPanicked",
    "Join",
    "Admit",
    "ListSessions",
    "AwaitServer",
    "ListActivatable",
    "ActivatableList",
    "pack_activatable",
    "unpack_activatable",
    "SessionList",
    "SessionRow",
    "ListServers",
    "ServerList",
    "ServerRow",
    "ListProcesses",
    "ProcessList",
    "ProcessRow",
    "Census",
    "CensusReply",
    "CensusItem",
    "pack_session_rows",
    "unpack_session_rows",
    "pack_server_rows",
    "unpack_server_rows",
    "pack_process_rows",
    "unpack_process_rows",
    "pack_census",
    "unpack_census",
    "pack_value",
    "unpack_value",
    "SESSIONS_PAGE",
    "ACTIVATABLE_ROWS",
    "SERVERS_PAGE",
    "PROCESSES_PAGE",
    "ROW_HOLDERS",
    "ROW_SERVERS",
    "Message",
    "Hello",
    "Welcome",
    "Register",
    "Connect",
    "Negotiated",
    "Request",
    "Close",
    "Share",
    "Open",
    "Shared",
    "Cancel",
    "Cancelled",
    "Terminate",
    "Deregister",
    "Terminating",
    "PeerGone",
    "Dropped",
    "TerminationReason",
    "TServerType",
    "EUnsharableSessions",
    "ESharableSessions",
    "EGlobalSharableSessions",
    "I32_MIN",
    "I32_MAX",
    "Complete",
    "Panic",
    "Stats",
    "Connected",
    "Completed",
    "Panicked",
    "SessionLost",
    "StatsReply",
    "NewSession",
    "Deliver",
    "Disconnect",
    "PeerInfo",
    "encode",
    "decode",
    "check_args",
    "check_mapped_args",
    "MAX_MAPPED",
    "SHARED_OVER",
    "mapped_capacity",
    "MAX_MAPPED_FDS",
    "SharedMemory",
    "MappedRequest",
    "MappedCompleted",
    "BATCH_MARK",
    "BATCH_BYTES",
    "pack_batch",
    "unpack_batch",
    "Monitor",
    "MonitorEvents",
    "Report",
    "Traffic",
    "MONITOR_CREDIT",
    "MAX_EVENTS_FRAME",
    "MAX_DETAIL",
    "Event",
    "EventKind",
    "pack_events",
    "unpack_events",
]

PROTOCOL_VERSION = 20  # 2: answers on channel; 3: sharing; 4: cancel; 5: negotiation;
#                        6: terminate; 7: PeerGone; 8: Dropped; 9: the direct path;
#                        10: every thread direct (Join, Admit), the session list (ListSessions);
#                        11: shared memory on the direct path; 12: AwaitServer;
#                        13: error text on completions; 14: the server and process lists
#                        (ListServers, ListProcesses), message ages (SessionRow, CensusReply),
#                        Connect.thread; 15: the monitor (Monitor, MonitorEvents, Report,
#                        Traffic); 16: activation (ListActivatable, ActivatableList,
#                        TerminationReason.IDLE); 17: batches of frames (BATCH_MARK);
#                        18: capabilities (PeerInfo.capabilities); 19: admission
#                        (Welcome.refusal, Welcome.code); 20: peers over tcp (Hello.pid,
#                        Hello.started)

#: Largest frame any peer may send; the kernel's MAXMSGSIZE guard sits just above it, and
#: clients refuse bigger requests themselves (a zmq MAXMSGSIZE drop is silent).
MAX_FRAME = 16 * 1024 * 1024
#: Longest server name the codec accepts; the kernel's naming rule (80 characters) is stricter.
MAX_NAME = 256
#: Largest connect negotiation payload (seed 003's limit).
MAX_PAYLOAD = 256
#: Longest panic category (Symbian truncates to 16 characters; so do we, before sending).
MAX_CATEGORY = 16
#: Longest error text on a completion (`Complete.text` ...): a longer one is cut to this many
#: characters by `error_text`, its end replaced by `TRUNCATED`.
MAX_ERROR_TEXT = 1024
#: What ends an error text `error_text` shortened.
TRUNCATED = "... [truncated]"
#: Longest ShareProtected token.
MAX_TOKEN = 64
#: Longest executable path in a PeerInfo.
MAX_PATH = 4096
#: Longest list of capability names in a PeerInfo (names of at most 64 characters).
MAX_CAPABILITIES = 4096
#: Largest descriptor in shared memory on a direct connection (`MappedRequest`).
MAX_MAPPED = 1 << 30
#: Descriptors of at least this many bytes go through shared memory on a direct connection
#: (`ipcfw.client.shm`): below it, the frame's copy costs less than a memfd's handling, and
#: above, the copy into the socket grows with the size (see docs/protocol.md, measured there).
SHARED_OVER = 64 * 1024


def mapped_capacity(size: int) -> int:
    """The size of the memfd that carries a descriptor of `size` bytes: a power of two, so
    that memfds are reused across nearby sizes. A server refuses a larger one (it would map
    memory the descriptor does not need)."""
    return 1 << (max(size, SHARED_OVER) - 1).bit_length()


def error_text(text: str) -> str:
    """`text` as a completion carries it: at most `MAX_ERROR_TEXT` characters, a longer one cut
    and ended with `TRUNCATED` (so that the reader knows there was more); a character UTF-8
    cannot encode (a lone surrogate, as ``os.fsdecode`` makes of a name that is not UTF-8)
    written as its escape (``\\udce9``), since a frame carries only UTF-8."""
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode()
    if len(text) <= MAX_ERROR_TEXT:
        return text
    return text[: MAX_ERROR_TEXT - len(TRUNCATED)] + TRUNCATED
#: Most file descriptors one frame on a direct connection carries: one per argument.
MAX_MAPPED_FDS = 4
#: Answers a server queues for a direct connection that does not read them before it closes
#: the connection; a client keeps fewer asynchronous requests pending on one, so that a paused
#: client within that limit is never cut off (the kernel path's --outstanding-per-process).
DIRECT_MAX_UNREAD = 100_000
#: Bytes of answers a server queues for a direct connection that does not read them before it
#: closes the connection (at most 4 of the kernel's frames: `direct_unread_bytes`); a client
#: keeps fewer owed on one (its pending asynchronous requests' writable descriptors carried in
#: the frame, each answer counted with `DIRECT_ANSWER_OVERHEAD`), as for DIRECT_MAX_UNREAD.
DIRECT_MAX_UNREAD_BYTES = 64 << 20
#: Bytes an answer on a direct connection may take beyond what it writes: its header, a
#: write's or a panic's fields (a Completed of 4 empty writes is 33 bytes, a Panicked 39), and
#: an error text of MAX_ERROR_TEXT characters (4 bytes each at most, in UTF-8).
DIRECT_ANSWER_OVERHEAD = 64 + 4 * MAX_ERROR_TEXT


def direct_unread_bytes(max_frame: int) -> int:
    """The bytes a direct connection may leave unread before its server closes it, with the
    kernel's frame limit `max_frame` (what server and client both apply)."""
    return min(4 * max_frame, DIRECT_MAX_UNREAD_BYTES)

#: The range of a 32-bit signed int: every argument int, completion value and panic reason.
I32_MIN, I32_MAX = -(2**31), 2**31 - 1
_U63_MAX = 2**63 - 1

#: A function number the server host answers itself (ServiceL never sees it): the description
#: of error code Int0, asked along the session's overlays and server, written into argument 1.
ERROR_STRING_FUNCTION = I32_MAX


class ProtocolError(Exception):
    """A frame that is not a valid ipcfw message. The message names what was wrong."""


class Kind(enum.IntEnum):
    """The first item of every frame."""

    # client or server -> kernel
    HELLO = 1
    REGISTER = 2
    CONNECT = 3
    REQUEST = 4
    CLOSE = 5
    COMPLETE = 6
    PANIC = 7
    NEGOTIATED = 13
    STATS = 8
    SHARE = 9
    OPEN = 10
    CANCEL = 12
    TERMINATE = 14
    DEREGISTER = 15
    # client -> server, on a direct connection (also: REQUEST, CANCEL, CLOSE)
    ATTACH = 16
    # server -> kernel, for a session on the direct path
    SESSION_PANICKED = 17
    CENSUS_REPLY = 50  # (11 is left unused)
    # channel -> kernel: a ticket for this thread's direct connection
    JOIN = 18
    # any peer -> kernel: the session, server and process lists
    LIST_SESSIONS = 19
    LIST_SERVERS = 28
    LIST_PROCESSES = 52
    # channel -> kernel: answer when a server name is registered
    AWAIT_SERVER = 51
    # any peer -> kernel: the servers the kernel can start (activation)
    LIST_ACTIVATABLE = 33
    # kernel -> client
    WELCOME = 20
    CONNECTED = 21
    COMPLETED = 22
    PANICKED = 23
    SESSION_LOST = 24
    STATS_REPLY = 25
    SHARED = 26
    SESSION_LIST = 27
    ACTIVATABLE_LIST = 56
    SERVER_LIST = 29
    PROCESS_LIST = 53
    # kernel -> any peer
    DROPPED = 30
    # the monitor: channel -> kernel, then kernel -> channel
    MONITOR = 31
    MONITOR_EVENTS = 32
    # the monitor's direct-path traffic: kernel -> server, then server -> kernel
    REPORT = 54
    TRAFFIC = 55
    # kernel -> server
    NEW_SESSION = 40
    DELIVER = 41
    DISCONNECT = 42
    PEER_INFO = 43
    CANCELLED = 45
    TERMINATING = 46
    PEER_GONE = 47
    ADMIT = 48
    CENSUS = 49
    # on a direct connection, shared memory: client -> server, then server -> client
    SHARED_MEMORY = 60
    MAPPED_REQUEST = 61
    MAPPED_COMPLETED = 62


class TerminationReason(enum.IntEnum):
    """Why a server's registration ends (seed 002's session termination reasons)."""

    SHUTDOWN = 1  # the kernel is shutting down
    REPLACED = 2  # another instance takes the name over
    ADMINISTRATOR = 3  # an administrator asked (`ipcfw terminate`)
    POLICY = 4  # a security policy revoked it
    DEREGISTERED = 5  # the server asked itself (ServerHost.Deregister)
    IDLE = 6  # the kernel started it (activation) and it had no session for its idle_exit


class TServerType(enum.IntEnum):
    """How far a server's sessions may be shared (Symbian ``CServer2::TServerType``): its
    ``CServer.sharing``, and the mode of a Share (``ShareAuto`` 1, ``ShareProtected`` 2)."""

    EUnsharableSessions = 0  # only the thread that created a session uses it
    ESharableSessions = 1  # any thread of its process (RSession.ShareAuto)
    EGlobalSharableSessions = 2  # other processes too (RSession.ShareProtected, RSession.Open)


EUnsharableSessions = TServerType.EUnsharableSessions
ESharableSessions = TServerType.ESharableSessions
EGlobalSharableSessions = TServerType.EGlobalSharableSessions


class Role(enum.IntEnum):
    """What a peer socket is for, declared in its Hello."""

    CHANNEL = 1  # one client thread: sends requests, receives every answer to them
    INBOX = 2  # one client process: receives notices (SessionLost)
    SERVER = 3  # one server host: receives deliveries, sends completions


class Mode(enum.IntEnum):
    """How a Request is answered."""

    SYNC = 0  # reply on the sending channel; takes no message slot
    ASYNC = 1  # reply on the sending channel too; takes a slot
    BLIND = 2  # the kernel acknowledges on the channel once queued; the server's answer is dropped


class Path(enum.IntEnum):
    """A session's data path: how its requests reach the server."""

    KERNEL = 0  # through the kernel, on the client thread's channel
    DIRECT = 1  # on a direct connection from the client thread to the server's process


# -- field checkers --------------------------------------------------------------------------
# Each takes the raw decoded value and returns it unchanged, or raises ValueError
# with a phrase describing what was expected; `decode` adds the message and field names.
# A simple checker also carries `expression`, the same test as a Python expression over `{v}`,
# from which `_compile_validator` builds one fast test per message kind.

Checker = Callable[[Any], Any]

#: A request's arguments on the wire: each an int, read-only bytes, or a writable descriptor
#: (its content, its max length).
Args = tuple[int | bytes | tuple[bytes, int], ...]
#: What a server wrote into a request's writable descriptors: (argument index, content) pairs.
Writes = tuple[tuple[int, bytes], ...]
#: A version on the wire: (major, minor, build).
Version = tuple[int, int, int]


def _int_in(low: int, high: int, what: str) -> Checker:
    def check(value: Any) -> int:
        if type(value) is not int or not low <= value <= high:
            raise ValueError(f"expected {what}")
        return value

    check.expression = f"type({{v}}) is int and {low} <= {{v}} <= {high}"  # type: ignore[attr-defined]
    return check


def _bytes_upto(limit: int) -> Checker:
    def check(value: Any) -> bytes:
        if type(value) is not bytes or len(value) > limit:
            raise ValueError(f"expected bytes of at most {limit}")
        return value

    check.expression = f"type({{v}}) is bytes and len({{v}}) <= {limit}"  # type: ignore[attr-defined]
    return check


def _str_upto(limit: int) -> Checker:
    def check(value: Any) -> str:
        if type(value) is not str or len(value) > limit:
            raise ValueError(f"expected a string of at most {limit} characters")
        return value

    check.expression = f"type({{v}}) is str and len({{v}}) <= {limit}"  # type: ignore[attr-defined]
    return check


def _version(value: Any) -> tuple[int, int, int]:
    if type(value) is not tuple or len(value) != 3:
        raise ValueError("expected a (major, minor, build) triple")
    major, minor, build = value
    for part, limit in ((major, 127), (minor, 127), (build, 32767)):
        if type(part) is not int or not 0 <= part <= limit:
            raise ValueError("expected a version with major, minor 0..127 and build 0..32767")
    return value


_i32 = _int_in(I32_MIN, I32_MAX, "a 32-bit signed int")
_u63 = _int_in(0, _U63_MAX, "an unsigned 63-bit int")
_u32 = _int_in(0, 2**32 - 1, "an unsigned 32-bit int")
_handle = _int_in(1, I32_MAX, "a handle in 1..2**31-1")
_function = _int_in(0, I32_MAX, "a function number in 0..2**31-1")
_sharing = _int_in(min(TServerType), max(TServerType), "a sharing mode 0..2")
_role = _int_in(min(Role), max(Role), "a role")
_mode = _int_in(min(Mode), max(Mode), "a mode")
_path = _int_in(min(Path), max(Path), "a data path 0..1")
_u16 = _int_in(0, 0xFFFF, "an unsigned 16-bit int")
_reason = _int_in(min(TerminationReason), max(TerminationReason), "a termination reason")
_text = _str_upto(MAX_ERROR_TEXT)


def check_args(value: Any) -> Args:
    """Check a wire argument tuple; raise ValueError saying what is wrong."""
    if type(value) is not tuple or len(value) > 4:
        raise ValueError("expected a tuple of at most 4 arguments")
    for index, arg in enumerate(value):
        kind = type(arg)
        if kind is int:
            if not I32_MIN <= arg <= I32_MAX:
                raise ValueError(f"argument {index}: int {arg} is outside 32 bits")
        elif kind is tuple:
            if (
                len(arg) != 2
                or type(arg[0]) is not bytes
                or type(arg[1]) is not int
                or not len(arg[0]) <= arg[1] <= MAX_FRAME
            ):
                raise ValueError(f"argument {index}: malformed writable descriptor")
        elif kind is not bytes:
            raise ValueError(f"argument {index}: {kind.__name__} is not int, bytes or a pair")
    return value


def check_mapped_args(value: Any) -> Args:
    """Check the arguments of a `MappedRequest`: as `check_args`, and also descriptors in
    shared memory, each ``(fd_index, length, writable)``: the index (0..3) of its file
    descriptor among those the frame carries, its length (a writable one's is its max length,
    as a bytearray's is), and 0 for a read-only descriptor, 1 for a writable one, 2 for a
    writable one whose content is all zeros and was not copied into the memory (the server
    reads zeros until it writes)."""
    if type(value) is not tuple or len(value) > 4:
        raise ValueError("expected a tuple of at most 4 arguments")
    plain = []
    for index, arg in enumerate(value):
        if type(arg) is tuple and len(arg) == 3:
            fd_index, length, writable = arg
            if (
                type(fd_index) is not int or not 0 <= fd_index < MAX_MAPPED_FDS
                or type(length) is not int or not 0 <= length <= MAX_MAPPED
                or type(writable) is not int or writable not in (0, 1, 2)
            ):
                raise ValueError(f"argument {index}: malformed shared-memory descriptor")
        else:
            plain.append(arg)
    check_args(tuple(plain))
    return value


def _mapped_writes(value: Any) -> tuple[tuple[int, bytes | int], ...]:
    return _checked_writes(value, _is_write_or_length, "bytes or a length")  # type: ignore[no-any-return]


def _is_write_or_length(data: Any) -> bool:
    return type(data) is bytes or (type(data) is int and 0 <= data <= MAX_MAPPED)


def _first(value: Any) -> tuple[Any, ...]:
    if value == ():
        return ()
    if type(value) is not tuple or len(value) != 3:
        raise ValueError("expected () or a (req_id, function, args) first request")
    _u63(value[0])
    _function(value[1])
    check_args(value[2])
    return value


def _writes(value: Any) -> Writes:
    return _checked_writes(value, _is_bytes, "bytes")  # type: ignore[no-any-return]


def _is_bytes(data: Any) -> bool:
    return type(data) is bytes


def _checked_writes(value: Any, data_ok: Callable[[Any], bool], what: str) -> Any:
    """`value` if it is a tuple of at most 4 (index 0..3, data) pairs whose data `data_ok`."""
    if type(value) is not tuple or len(value) > 4:
        raise ValueError(f"expected a tuple of at most 4 (index, {what}) writes")
    for item in value:
        if (
            type(item) is not tuple
            or len(item) != 2
            or type(item[0]) is not int
            or not 0 <= item[0] <= 3
            or not data_ok(item[1])
        ):
            raise ValueError(f"expected (index 0..3, {what}) pairs")
    return value


#: Most counters a StatsReply carries (the one map in the protocol).
_MAX_COUNTERS = 256


def _counters(value: Any) -> dict[str, int]:
    if type(value) is not dict or len(value) > _MAX_COUNTERS:
        raise ValueError(f"expected a map of at most {_MAX_COUNTERS} counters")
    for key, count in value.items():
        if type(key) is not str or type(count) is not int:
            raise ValueError("expected str -> int counters")
    return value


# -- messages --------------------------------------------------------------------------------


class Hello(NamedTuple):
    """Peer -> kernel, first message of every socket. The kernel answers Welcome.

    `pid` and `started` (the process's start time, in ms since the epoch) say which process the
    socket is of. Over ipc the kernel reads both from the socket and ignores these; over tcp
    they are the peer's word, trusted only to tell apart the processes of one key.
    """

    role: int
    protocol: int
    pid: int = 0
    started: int = 0


class Register(NamedTuple):
    """Server -> kernel: register a server name. Answered by Completed(req_id, code).

    `direct` is the path of the Unix socket where the server takes direct connections, or ""
    (the server takes none: every session uses the kernel path).
    """

    req_id: int
    name: str
    sharing: int
    version: Version
    direct: str = ""


class Connect(NamedTuple):
    """Channel -> kernel: create a session with a named server. Answered by Connected.

    `payload` is the negotiation payload the server's ``AcceptL`` sees (seed 003). `first` is
    ``()`` or ``(req_id, function, args)``: a first request, delivered right after the
    session's creation and answered by Completed(req_id) on the same channel. `path` asks for
    the session's data path (`Path`): DIRECT is granted when the server takes direct
    connections, and the Connected answer then carries the server's socket and a ticket.
    """

    req_id: int
    name: str
    version: Version
    slots: int
    payload: bytes
    first: tuple[Any, ...] = ()
    path: int = 0
    thread: int = 0


class Request(NamedTuple):
    """Channel -> kernel: a message for the session's server (SendReceive or Send)."""

    req_id: int
    handle: int
    function: int
    args: Args
    mode: int


class Close(NamedTuple):
    """Channel -> kernel: close a session handle. Not answered."""

    handle: int


class Negotiated(NamedTuple):
    """Server -> kernel: complete a connect message with the server's negotiation reply."""

    msg_id: int
    value: int
    payload: bytes


class Complete(NamedTuple):
    """Server -> kernel: complete a delivered message with a value and descriptor writes, and,
    for an error, what happened (`text`, at most `MAX_ERROR_TEXT` characters; the kernel passes
    it on in the client's Completed or Connected)."""

    msg_id: int
    value: int
    writes: Writes
    text: str = ""


class Panic(NamedTuple):
    """Server -> kernel: panic the client that sent this message (RMessage.Panic)."""

    msg_id: int
    category: str
    reason: int


class Share(NamedTuple):
    """Channel -> kernel: ShareAuto (mode 1) or ShareProtected (mode 2). Answered by Shared."""

    req_id: int
    handle: int
    mode: int


class Open(NamedTuple):
    """Channel -> kernel: attach this process to a protected session. Answered by Connected."""

    req_id: int
    token: bytes


class Cancel(NamedTuple):
    """Channel -> kernel: cancel this channel's pending async request `req_id`. Not answered
    itself: the request completes (with KErrCancel, unless the server completed it first)."""

    req_id: int


class Attach(NamedTuple):
    """Client -> server, on a direct connection: use the session of this one-time ticket (from
    Connected) on this connection. Answered by Completed(req_id, handle), or Completed(req_id,
    KErrPermissionDenied) for a ticket that is unknown, used, or presented by another process.

    After it, the connection carries the session's Requests, Cancels and a Close (the client
    is done with the session on this connection), and the server's Completed and Panicked.
    """

    req_id: int
    ticket: bytes


class SharedMemory(NamedTuple):
    """Client -> server, on a direct connection: frames from now on may carry file
    descriptors (SCM_RIGHTS): the shared memory of `MappedRequest` descriptors. Sent once,
    before the connection's first MappedRequest; not answered. (The server reads a connection
    with its ancillary data only after it: receiving it costs ~1.7 us a frame.)"""


class MappedRequest(NamedTuple):
    """Client -> server, on a direct connection: a `Request` some of whose descriptors are in
    shared memory (see `check_mapped_args`): memfds, sent with the frame (SCM_RIGHTS), one per
    such descriptor, in the order of their `fd_index`. Answered as a Request is, and, once
    the server has completed it, by `MappedCompleted` (never Completed): from then on the
    server no longer touches the memory."""

    req_id: int
    handle: int
    function: int
    args: Args
    mode: int


class MappedCompleted(NamedTuple):
    """Server -> client, on a direct connection: the completion of a `MappedRequest`. Each
    write is ``(index, content)`` for a descriptor sent in the frame, or ``(index, length)``
    for one in shared memory: the server wrote its first `length` bytes there."""

    req_id: int
    value: int
    writes: tuple[tuple[int, bytes | int], ...]
    text: str = ""


class SessionPanicked(NamedTuple):
    """Server -> kernel: the server panicked the client of session `handle` on the direct path.
    The session dies as for a Panic through the kernel: its requests there are answered
    Panicked, and the server gets its Disconnect. Not answered."""

    handle: int
    category: str
    reason: int


class Join(NamedTuple):
    """Channel -> kernel: this thread uses session `handle` (attach on first use); for a
    session on the direct path, ask for a one-time ticket for this thread's direct connection.
    Answered by Connected(req_id, result, handle, b"", direct, ticket): `direct` and `ticket`
    empty when the session is on the kernel path, or the server could not take the ticket;
    Panicked(req_id, handle, "KERN-EXEC", 0, 0) for a handle the channel does not hold."""

    req_id: int
    handle: int


class Admit(NamedTuple):
    """Kernel -> server: a thread of process `client` (its PeerInfo) will present `ticket`
    (`Attach`) for session `handle` on a direct connection. The server answers
    Complete(msg_id, KErrNone) once it holds the ticket (the kernel passes it to the client only
    then), or Complete(msg_id, code < 0) if it cannot take it."""

    msg_id: int
    handle: int
    client: int
    ticket: bytes


class ListSessions(NamedTuple):
    """Any peer -> kernel: list the sessions whose handle is above `after`, in handle order,
    at most `SESSIONS_PAGE`. Answered by SessionList."""

    req_id: int
    after: int


class AwaitServer(NamedTuple):
    """Channel -> kernel: answer Completed(req_id, KErrNone) once a server is registered as
    `name` (at once if one is, and its registration is not ending). KErrBadName for an invalid
    name; KErrOverflow if the channel has as many waiting as the kernel allows one channel
    (``ipcfw.kernel.state.MAX_AWAITS``). A `Cancel(req_id)` ends the wait: Completed(req_id,
    KErrCancel). The wait also ends with its channel."""

    req_id: int
    name: str


class ListActivatable(NamedTuple):
    """Any peer -> kernel: list the servers the kernel can start (its service files, ``ipcfw
    kernel --services DIR``). Answered by ActivatableList."""

    req_id: int


class ActivatableList(NamedTuple):
    """Kernel -> peer: `rows` is `pack_activatable` of (name, state) for each service, by name;
    state is "activatable" (not running), "starting", "running" or "stopping"."""

    req_id: int
    rows: bytes


class SessionList(NamedTuple):
    """Kernel -> peer: a page of the session list. `rows` is `pack_session_rows` of at most
    `SESSIONS_PAGE` `SessionRow`s; `next` is the `after` of the next page, 0 after the last."""

    req_id: int
    next: int
    rows: bytes


class SessionRow(NamedTuple):
    """One session, as `ipcfw ps --sessions` shows it: its handle, server, data path (`Path`),
    state (the kernel's, e.g. "OPEN"), outstanding messages (through the kernel, and, for a
    direct session, what its server reported in service on its direct connections), holders:
    (pid, threads attached) for each process holding it, at most `ROW_HOLDERS`; `oldest`, the
    milliseconds its oldest outstanding message has been outstanding (0 with none); its
    creator's pid and native thread id (0: not said); its message slots in use and its slots
    (-1: the kernel's pool, 0: sync calls only); and its age in milliseconds."""

    handle: int
    server: str
    path: int
    state: str
    outstanding: int
    holders: tuple[tuple[int, int], ...]
    oldest: int = 0
    creator_pid: int = 0
    creator_thread: int = 0
    slots_used: int = 0
    slots: int = 0
    age: int = 0


class ListServers(NamedTuple):
    """Any peer -> kernel: list the servers whose name's lookup key (`ipcfw.naming.lookup_key`)
    sorts after `after` ("" first), in that order, at most `SERVERS_PAGE`. Answered by
    ServerList."""

    req_id: int
    after: str


class ServerList(NamedTuple):
    """Kernel -> peer: a page of the server list. `rows` is `pack_server_rows` of at most
    `SERVERS_PAGE` `ServerRow`s; `next` is the `after` of the next page, "" after the last."""

    req_id: int
    next: str
    rows: bytes


class ServerRow(NamedTuple):
    """One server, as `ipcfw ps` shows it: name, its process (pid, executable as the kernel
    read it, "" if it could not), version, sharing (`TServerType`), whether it takes direct
    connections, its sessions, its outstanding messages (both paths) and the milliseconds the
    oldest has been outstanding (0 with none), its registration's age in milliseconds, and its
    state: "running", or "terminating" once its registration is ending."""

    name: str
    pid: int
    exe: str
    version: Version
    sharing: int
    direct: bool
    sessions: int
    outstanding: int
    oldest: int
    up: int
    state: str


class ListProcesses(NamedTuple):
    """Any peer -> kernel: list the peer processes whose pid is above `after` (0 first), in
    pid order, at most `PROCESSES_PAGE`. Answered by ProcessList."""

    req_id: int
    after: int


class ProcessList(NamedTuple):
    """Kernel -> peer: a page of the process list. `rows` is `pack_process_rows` of at most
    `PROCESSES_PAGE` `ProcessRow`s; `next` is the `after` of the next page, 0 after the last."""

    req_id: int
    next: int
    rows: bytes


class ProcessRow(NamedTuple):
    """One peer process, as `ipcfw ps --processes` shows it: pid, uid, executable (as the
    kernel read it), its client threads' channels, whether it has an inbox, the servers it
    hosts (at most `ROW_SERVERS` names), the sessions it holds, and its requests outstanding
    (through the kernel, and in service on direct connections)."""

    pid: int
    uid: int
    exe: str
    channels: int
    inbox: bool
    servers: tuple[str, ...]
    sessions: int
    outstanding: int


class Census(NamedTuple):
    """Kernel -> server: report the messages in service of your direct sessions (CensusReply)."""

    req_id: int


class CensusReply(NamedTuple):
    """Server -> kernel, answers Census: `counts` is `pack_census` of a `CensusItem` for each
    (direct session, client process) with messages in service on its direct connections."""

    req_id: int
    counts: bytes


#: The most batches a monitor may be owed at once (`Monitor.credit`): what the kernel sends it
#: beyond what it has read is bounded by this many frames.
MONITOR_CREDIT = 64
#: The most event records in one MonitorEvents or Traffic frame (`ipcfw.events`).
MAX_EVENTS_FRAME = 256


class Monitor(NamedTuple):
    """Channel -> kernel: stream what happens to server `name` ("" for every server):
    connects, requests, completions, disconnects, deaths, on both data paths. Answered
    Completed(req_id, KErrNone) once started (once the direct servers it concerns report their
    traffic), then MonitorEvents(req_id, ...) batches; KErrBadName for an invalid name,
    KErrOverflow past the kernel's monitors. `credit` is how many more batches the kernel may
    send (at most `MONITOR_CREDIT` owed): the same req_id again grants more as the monitor reads
    them. `Cancel(req_id)` stops it (Completed(req_id, KErrCancel)); it also ends with its
    channel."""

    req_id: int
    name: str
    credit: int


class MonitorEvents(NamedTuple):
    """Kernel -> channel: a batch of monitor `req_id`'s events (`ipcfw.events.pack_events`),
    and how many events it lost (its buffer was full) since the last batch, before these."""

    req_id: int
    lost: int
    events: bytes


class Report(NamedTuple):
    """Kernel -> server: report the requests and completions of your direct connections
    (`on` 1: a monitor watches you) or stop (0). Reporting on is answered at once with
    Traffic(req_id, 0, b"")."""

    req_id: int
    on: int


class Traffic(NamedTuple):
    """Server -> kernel: events of its direct connections (`ipcfw.events.pack_events`, at most
    `MAX_EVENTS_FRAME`), and how many it lost since its last Traffic (its buffer was full);
    `req_id` is that of the Report this answers, 0 otherwise."""

    req_id: int
    lost: int
    events: bytes


class CensusItem(NamedTuple):
    """What a server has in service on its direct connections for one session and one client
    process (the connections' SO_PEERCRED pid): how many messages, how many of them take a
    message slot (async and blind ones), and the milliseconds the oldest has been in
    service."""

    handle: int
    pid: int
    messages: int
    slots_used: int
    oldest: int


class Stats(NamedTuple):
    """Any peer -> kernel: ask for the kernel's counters. Answered by StatsReply."""

    req_id: int


class Welcome(NamedTuple):
    """Kernel -> peer: the answer to Hello. A peer whose Hello named another protocol version
    gets a Welcome naming the kernel's, and is not admitted; one the kernel refuses gets a
    Welcome whose `refusal` says why (empty: admitted) and `code` the error (KErrPermissionDenied
    for admission, KErrOverflow for a limit)."""

    kernel_pid: int
    max_frame: int
    protocol: int
    refusal: str = ""
    code: int = 0


class Connected(NamedTuple):
    """Kernel -> channel: the result of Connect; `handle` is 0 when `result` is an error.

    For a session on the direct path, `direct` is the server's socket and `ticket` the
    one-time ticket that attaches the session to a direct connection (`Attach`); both are
    empty on the kernel path. `text` says why a connect failed, when the server (its
    ``NewSessionL`` raised an ``IpcError`` with a message) or the kernel (an unknown name: the
    closest registered names) had more to say than the code.
    """

    req_id: int
    result: int
    handle: int
    payload: bytes
    direct: str = ""
    ticket: bytes = b""
    text: str = ""


class Completed(NamedTuple):
    """Kernel -> client (or server -> client, on a direct connection): a request's completion
    value and descriptor writes, and the server's `text` saying what happened, if it gave one
    (empty otherwise, and in the kernel's own answers)."""

    req_id: int
    value: int
    writes: Writes
    text: str = ""


class Panicked(NamedTuple):
    """Kernel -> client: the request's sender was panicked.

    `session_dead` is 1 when the server panicked the client (the session is dead for every
    holder) and 0 when the kernel refused a handle the sender does not hold (KERN-EXEC 0: the
    handle's rightful holders are unaffected).
    """

    req_id: int
    handle: int
    category: str
    reason: int
    session_dead: int


class Shared(NamedTuple):
    """Kernel -> channel: the result of Share; `token` is the session's, for mode 2."""

    req_id: int
    result: int
    token: bytes


class SessionLost(NamedTuple):
    """Kernel -> inbox: a session of this process ended without its Close (e.g. server died)."""

    handle: int
    code: int


class StatsReply(NamedTuple):
    """Kernel -> peer: the kernel's counters."""

    req_id: int
    counters: dict[str, int]


class NewSession(NamedTuple):
    """Kernel -> server: a client asks for a session (NewSessionL, CreateL).

    For a session on the direct path, `ticket` is what the client will present (`Attach`) on
    a direct connection from the process PeerInfo named for `client`, and `slots` the
    session's message slots (the server counts those of its direct requests); the ticket is
    empty on the kernel path.
    """

    msg_id: int
    handle: int
    version: Version
    client: int
    payload: bytes
    ticket: bytes = b""
    slots: int = 0


class Deliver(NamedTuple):
    """Kernel -> server: a request for ServiceL."""

    msg_id: int
    handle: int
    function: int
    args: Args
    client: int


class Disconnect(NamedTuple):
    """Kernel -> server: the session's last holder closed it or died."""

    msg_id: int
    handle: int


class Terminate(NamedTuple):
    """Channel -> kernel: end server `name`'s registration with `reason`. Answered by
    Completed(req_id) once its outstanding messages have completed."""

    req_id: int
    name: str
    reason: int


class Deregister(NamedTuple):
    """Server -> kernel: end my registration. Answered by Completed(req_id) once my
    outstanding messages have completed."""

    req_id: int


class Terminating(NamedTuple):
    """Kernel -> server: your registration is ending (the termination indication)."""

    reason: int


class PeerGone(NamedTuple):
    """Kernel -> server: client key `client` (a process it had a PeerInfo for) has ended."""

    client: int


class Dropped(NamedTuple):
    """Kernel -> peer: the kernel has stopped serving socket `routing_id`, because `waiting`
    frames waited for it unread (the kernel's backlog limit). Sent on that socket itself,
    behind what it has not read yet, and, for a client thread's channel, on its process's inbox
    too. The kernel forgets the socket: its later frames are ignored."""

    routing_id: bytes
    waiting: int


class Cancelled(NamedTuple):
    """Kernel -> server: the client cancelled message `msg_id`; it has been completed for it."""

    msg_id: int
    handle: int


class PeerInfo(NamedTuple):
    """Kernel -> server: who client key `client` is, sent before its first message, and the
    capabilities the kernel grants it (names separated by spaces: see ipcfw.security)."""

    client: int
    pid: int
    uid: int
    gid: int
    exe: str
    capabilities: str = ""


Message = (
    Hello | Register | Connect | Negotiated | Request | Close | Share | Open | Complete | Panic |
    Stats | Welcome | Connected | Completed | Panicked | Shared | SessionLost | StatsReply |
    NewSession | Deliver | Disconnect | PeerInfo | PeerGone | Dropped | Cancel | Cancelled |
    Terminate | Deregister | Terminating | Attach | SessionPanicked | Join | Admit |
    ListSessions | SessionList | Census | CensusReply | SharedMemory | MappedRequest |
    MappedCompleted | AwaitServer | ListServers | ServerList | ListProcesses | ProcessList |
    Monitor | MonitorEvents | Report | Traffic | ListActivatable | ActivatableList
)

_SCHEMA: dict[type, tuple[Kind, tuple[Checker, ...]]] = {
    Hello: (Kind.HELLO, (_role, _u16, _u32, _u63)),
    Register: (
        Kind.REGISTER, (_u63, _str_upto(MAX_NAME), _sharing, _version, _str_upto(MAX_PATH))
    ),
    Connect: (
        Kind.CONNECT,
        (_u63, _str_upto(MAX_NAME), _version, _i32, _bytes_upto(MAX_PAYLOAD), _first, _path,
         _u32),
    ),
    Negotiated: (Kind.NEGOTIATED, (_u63, _i32, _bytes_upto(MAX_PAYLOAD))),
    Request: (Kind.REQUEST, (_u63, _handle, _function, check_args, _mode)),
    Close: (Kind.CLOSE, (_handle,)),
    Complete: (Kind.COMPLETE, (_u63, _i32, _writes, _text)),
    Panic: (Kind.PANIC, (_u63, _str_upto(MAX_CATEGORY), _i32)),
    Share: (Kind.SHARE, (_u63, _handle, _int_in(1, 2, "a sharing mode 1..2"))),
    Open: (Kind.OPEN, (_u63, _bytes_upto(MAX_TOKEN))),
    Cancel: (Kind.CANCEL, (_u63,)),
    Stats: (Kind.STATS, (_u63,)),
    Welcome: (Kind.WELCOME, (_u32, _u63, _u16, _str_upto(MAX_ERROR_TEXT), _i32)),
    Connected: (
        Kind.CONNECTED,
        (_u63, _i32, _int_in(0, I32_MAX, "a handle"), _bytes_upto(MAX_PAYLOAD),
         _str_upto(MAX_PATH), _bytes_upto(MAX_TOKEN), _text),
    ),
    Completed: (Kind.COMPLETED, (_u63, _i32, _writes, _text)),
    Panicked: (
        Kind.PANICKED, (_u63, _handle, _str_upto(MAX_CATEGORY), _i32, _int_in(0, 1, "0 or 1"))
    ),
    Shared: (Kind.SHARED, (_u63, _i32, _bytes_upto(MAX_TOKEN))),
    SessionLost: (Kind.SESSION_LOST, (_handle, _i32)),
    StatsReply: (Kind.STATS_REPLY, (_u63, _counters)),
    NewSession: (
        Kind.NEW_SESSION,
        (_u63, _handle, _version, _u63, _bytes_upto(MAX_PAYLOAD), _bytes_upto(MAX_TOKEN),
         _int_in(-1, 255, "message slots -1..255")),
    ),
    Deliver: (Kind.DELIVER, (_u63, _handle, _function, check_args, _u63)),
    Disconnect: (Kind.DISCONNECT, (_u63, _handle)),
    Cancelled: (Kind.CANCELLED, (_u63, _handle)),
    Terminate: (Kind.TERMINATE, (_u63, _str_upto(MAX_NAME), _reason)),
    Deregister: (Kind.DEREGISTER, (_u63,)),
    Terminating: (Kind.TERMINATING, (_reason,)),
    PeerGone: (Kind.PEER_GONE, (_u63,)),
    Dropped: (Kind.DROPPED, (_bytes_upto(255), _u63)),
    PeerInfo: (Kind.PEER_INFO, (_u63, _u32, _u32, _u32, _str_upto(MAX_PATH),
                                _str_upto(MAX_CAPABILITIES))),
    Attach: (Kind.ATTACH, (_u63, _bytes_upto(MAX_TOKEN))),
    SessionPanicked: (Kind.SESSION_PANICKED, (_handle, _str_upto(MAX_CATEGORY), _i32)),
    Join: (Kind.JOIN, (_u63, _handle)),
    Admit: (Kind.ADMIT, (_u63, _handle, _u63, _bytes_upto(MAX_TOKEN))),
    ListSessions: (Kind.LIST_SESSIONS, (_u63, _int_in(0, I32_MAX, "a handle or 0"))),
    SessionList: (
        Kind.SESSION_LIST, (_u63, _int_in(0, I32_MAX, "a handle or 0"), _bytes_upto(MAX_FRAME))
    ),
    AwaitServer: (Kind.AWAIT_SERVER, (_u63, _str_upto(MAX_NAME))),
    ListActivatable: (Kind.LIST_ACTIVATABLE, (_u63,)),
    ActivatableList: (Kind.ACTIVATABLE_LIST, (_u63, _bytes_upto(MAX_FRAME))),
    ListServers: (Kind.LIST_SERVERS, (_u63, _str_upto(MAX_NAME))),
    ServerList: (Kind.SERVER_LIST, (_u63, _str_upto(MAX_NAME), _bytes_upto(MAX_FRAME))),
    ListProcesses: (Kind.LIST_PROCESSES, (_u63, _u32)),
    ProcessList: (Kind.PROCESS_LIST, (_u63, _u32, _bytes_upto(MAX_FRAME))),
    Census: (Kind.CENSUS, (_u63,)),
    CensusReply: (Kind.CENSUS_REPLY, (_u63, _bytes_upto(MAX_FRAME))),
    SharedMemory: (Kind.SHARED_MEMORY, ()),
    MappedRequest: (Kind.MAPPED_REQUEST, (_u63, _handle, _function, check_mapped_args, _mode)),
    MappedCompleted: (Kind.MAPPED_COMPLETED, (_u63, _i32, _mapped_writes, _text)),
    Monitor: (
        Kind.MONITOR,
        (_u63, _str_upto(MAX_NAME), _int_in(0, MONITOR_CREDIT, f"a credit 0..{MONITOR_CREDIT}")),
    ),
    MonitorEvents: (Kind.MONITOR_EVENTS, (_u63, _u63, _bytes_upto(MAX_FRAME))),
    Report: (Kind.REPORT, (_u63, _int_in(0, 1, "0 or 1"))),
    Traffic: (Kind.TRAFFIC, (_u63, _u63, _bytes_upto(MAX_FRAME))),
}


def _compile_validator(
    cls: type, checkers: tuple[Checker, ...]
) -> Callable[[tuple[Any, ...]], bool]:
    """One function testing all of a message's fields at once, built from its checkers.

    Calling the checkers one by one costs a Python call per field, more than unpacking the
    frame; so, as `dataclasses` does for ``__init__``, the tests are joined into one expression
    and compiled once. The result is True when every field passes; False, or a ValueError from
    a checker without an `expression`, otherwise (`decode` then asks the checkers which field
    failed, and why).
    """
    names = [f"v{i}" for i in range(len(checkers))]
    tests, scope = [], {}
    for name, check in zip(names, checkers):
        expression = getattr(check, "expression", None)
        if expression is None:
            scope[f"check_{name}"] = check
            expression = f"check_{name}({{v}}) is not None"  # raises ValueError when wrong
        tests.append("(" + expression.format(v=name) + ")")
    unpack = f"{', '.join(names)}, = fields" if names else "pass"
    source = f"def valid(fields):\n    {unpack}\n    return {' and '.join(tests) or 'True'}\n"
    exec(compile(source, f"<ipcfw.protocol validator of {cls.__name__}>", "exec"), scope)
    return scope["valid"]


_KIND_OF: dict[type, int] = {cls: int(kind) for cls, (kind, _) in _SCHEMA.items()}
_BY_KIND: dict[int, tuple[type, tuple[Checker, ...], Callable[[tuple[Any, ...]], bool]]] = {
    int(kind): (cls, checkers, _compile_validator(cls, checkers))
    for cls, (kind, checkers) in _SCHEMA.items()
}


def encode(message: Message) -> bytes:
    """Return the one frame that carries `message`. Raises KeyError for a non-message."""
    frame: bytes = msgpack.packb((_KIND_OF[type(message)], *message))
    return frame


# -- the tables inside SessionList, ServerList, ProcessList and CensusReply -------------------
# Their many items would break the limits every frame is decoded under (arrays of at most 9),
# so each travels as one bin field, read here under limits of its own: only the peer that asked
# for the table (`ipcfw ps`, the kernel) unpacks it.

#: Most rows in a SessionList page.
SESSIONS_PAGE = 256
#: Most rows in a ServerList page.
SERVERS_PAGE = 256
#: Most rows in a ProcessList page.
PROCESSES_PAGE = 256
#: Most holding processes listed in a SessionRow (the rest are left out).
ROW_HOLDERS = 64
#: Most server names listed in a ProcessRow (the rest are left out).
ROW_SERVERS = 64
_CENSUS_ITEM = struct.Struct("<IIIIQ")  # handle, client pid, messages, slots used, oldest (ms)
_U63_MS = 2**63 - 1


def pack_census(items: Iterable[CensusItem]) -> bytes:
    """The bytes of a CensusReply: `CensusItem`s, 24 bytes each (little-endian u32 handle,
    pid, messages and slots used, u64 milliseconds)."""
    return b"".join(_CENSUS_ITEM.pack(*item) for item in items)


def unpack_census(data: bytes) -> list[CensusItem]:
    """Read `pack_census`'s bytes; ProtocolError for anything else."""
    if len(data) % _CENSUS_ITEM.size:
        raise ProtocolError(f"CensusReply.counts: {len(data)} bytes is not a whole number of "
                            f"{_CENSUS_ITEM.size}-byte items (handle, pid, messages, slots used, "
                            "oldest)")
    items = [CensusItem(*fields) for fields in _CENSUS_ITEM.iter_unpack(data)]
    for item in items:
        if not 1 <= item.handle <= I32_MAX:
            raise ProtocolError("CensusReply.counts: a handle outside 1..2**31-1")
        if item.oldest > _U63_MS:
            raise ProtocolError("CensusReply.counts: an age beyond 2**63-1 ms")
    return items


def pack_session_rows(rows: list[SessionRow]) -> bytes:
    """The bytes of a SessionList: a msgpack array of rows, each ``[handle, server, path,
    state, outstanding, [pid, threads, pid, threads, ...], oldest, creator_pid, creator_thread,
    slots_used, slots, age]``."""
    packed: bytes = msgpack.packb([
        (row.handle, row.server, row.path, row.state, row.outstanding,
         [n for holder in row.holders[:ROW_HOLDERS] for n in holder], *row[6:])
        for row in rows[:SESSIONS_PAGE]
    ])
    return packed


def _unpack_table(data: bytes, field: str, page: int, inner: int) -> tuple[Any, ...]:
    """The rows of a table's bin field (`field` names it in errors): an array of at most `page`
    rows, no array in them longer than `inner` or `page`, no map, no ext, no long str."""
    try:
        items = _unpackb(
            data, use_list=False, max_array_len=max(page, inner), max_map_len=0, max_ext_len=0,
            max_str_len=_MAX_STR_BYTES, object_hook=_refuse_map, ext_hook=_refuse_ext,
        )
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"{field}: {_unpack_error(exc)}") from None
    if type(items) is not tuple or len(items) > page:
        raise ProtocolError(f"{field}: not an array of at most {page} rows: {_show(items)}")
    return items


def _row_error(field: str, exc: Exception, item: Any) -> ProtocolError:
    return ProtocolError(f"{field}: {exc}, got {_show(item)}")


def unpack_session_rows(data: bytes) -> list[SessionRow]:
    """Read `pack_session_rows`'s bytes, under limits (at most `SESSIONS_PAGE` rows of
    `ROW_HOLDERS` holders; no map, no ext); ProtocolError for anything else."""
    rows = []
    for item in _unpack_table(data, "SessionList.rows", SESSIONS_PAGE, 2 * ROW_HOLDERS):
        try:
            (handle, server, path, state, outstanding, flat, oldest, creator_pid,
             creator_thread, slots_used, slots, age) = item
            _handle(handle)
            _str_upto(MAX_NAME)(server)
            _path(path)
            _str_upto(16)(state)
            for n in (outstanding, oldest, age):
                _u63(n)
            for n in (creator_pid, creator_thread, slots_used):
                _u32(n)
            _int_in(-1, 255, "message slots -1..255")(slots)
            if type(flat) is not tuple or len(flat) % 2 or len(flat) > 2 * ROW_HOLDERS:
                raise ValueError("expected (pid, threads) pairs")
            for n in flat:
                _u32(n)
        except (TypeError, ValueError) as exc:
            raise _row_error("SessionList.rows", exc, item) from None
        holders = tuple(zip(flat[::2], flat[1::2]))
        rows.append(SessionRow(handle, server, path, state, outstanding, holders, oldest,
                               creator_pid, creator_thread, slots_used, slots, age))
    return rows


# -- the events inside MonitorEvents and Traffic (``ipcfw monitor``; see ipcfw.events) --------

#: The longest `Event.detail`, in characters (a longer one is cut, ending with "...").
MAX_DETAIL = 200


class EventKind(enum.IntEnum):
    """What an `Event` reports."""

    REGISTER = 1  # a server registered its name (pid: the server's)
    CONNECT = 2  # a client asked for a session (handle: the one it will have)
    CONNECTED = 3  # the connect's answer: value (a handle or an error), micros
    REQUEST = 4  # a request: function, detail (the argument summary)
    COMPLETE = 5  # a request's completion: value, micros, detail (the error's text, a panic)
    DISCONNECT = 6  # the session ended: its last holder closed it, or died
    DIED = 7  # a process ended: a client that had sessions of the server, or the server


class Event(NamedTuple):
    """One event. `msg` matches a request to its completion (for one server and path);
    `function` is -1, `value` 0 and `micros` -1 where they do not apply."""

    time: float  # CLOCK_MONOTONIC seconds
    kind: int  # EventKind
    server: str
    pid: int  # the client's process (the server's, for REGISTER and a server's DIED)
    handle: int  # the session's, 0 for none
    path: int  # protocol.Path: 0 kernel, 1 direct
    msg: int
    function: int
    value: int
    micros: int
    detail: str


_EVENT_KINDS = frozenset(int(kind) for kind in EventKind)
_EVENT_FIELDS = 11


def pack_events(events: list[Event]) -> bytes:
    """The bytes of a MonitorEvents or Traffic frame's events: a msgpack array of arrays."""
    packed: bytes = msgpack.packb([tuple(event) for event in events[:MAX_EVENTS_FRAME]])
    return packed


def unpack_events(data: bytes) -> list[Event]:
    """Read `pack_events`'s bytes, under limits (at most `MAX_EVENTS_FRAME` events of the
    fields above, no array in them, strings at most `MAX_NAME` and `MAX_DETAIL` characters);
    ProtocolError naming what was wrong for anything else."""
    try:
        items = _unpackb(
            data, use_list=False, max_array_len=MAX_EVENTS_FRAME, max_map_len=0, max_ext_len=0,
            max_str_len=4 * max(MAX_NAME, MAX_DETAIL), object_hook=_refuse_map,
            ext_hook=_refuse_ext, list_hook=_array_counter(MAX_EVENTS_FRAME + 1),
        )
    except ProtocolError as exc:
        raise ProtocolError(f"events: {exc}") from None
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"events: not a packed array of events ({exc})") from None
    if type(items) is not tuple:
        raise ProtocolError("events: not an array of events")
    return [_event(item) for item in items]


def _event(item: Any) -> Event:
    if type(item) is not tuple or len(item) != _EVENT_FIELDS:
        raise ProtocolError(
            f"events: an event is an array of {_EVENT_FIELDS} fields, got {_show(item)}"
        )
    time, kind, server, pid, handle, path, msg, function, value, micros, detail = item
    problem = (
        "time" if type(time) is not float and type(time) is not int else
        "kind" if type(kind) is not int or kind not in _EVENT_KINDS else
        "server" if type(server) is not str or len(server) > MAX_NAME else
        "pid" if type(pid) is not int or not 0 <= pid < 2**32 else
        "handle" if type(handle) is not int or not 0 <= handle < 2**31 else
        "path" if path not in (0, 1) or type(path) is not int else
        "msg" if type(msg) is not int or not 0 <= msg < 2**63 else
        "function" if type(function) is not int or not -1 <= function < 2**31 else
        "value" if type(value) is not int or not -(2**31) <= value < 2**31 else
        "micros" if type(micros) is not int or not -1 <= micros < 2**63 else
        "detail" if type(detail) is not str or len(detail) > MAX_DETAIL else
        ""
    )
    if problem:
        raise ProtocolError(f"events: bad {problem} in {_show(item)}")
    return Event(float(time), kind, server, pid, handle, path, msg, function, value, micros,
                 detail)


#: Most rows an ActivatableList holds (a kernel takes at most this many service files).
ACTIVATABLE_ROWS = 1024


def pack_activatable(rows: list[tuple[str, str]]) -> bytes:
    """The bytes of an ActivatableList: a msgpack array of ``[name, state]`` rows."""
    packed: bytes = msgpack.packb([list(row) for row in rows[:ACTIVATABLE_ROWS]])
    return packed


def unpack_activatable(data: bytes) -> list[tuple[str, str]]:
    """Read `pack_activatable`'s bytes, under limits (at most `ACTIVATABLE_ROWS` rows of two
    strings; no map, no ext); ProtocolError for anything else."""
    rows = []
    for item in _unpack_table(data, "ActivatableList.rows", ACTIVATABLE_ROWS, 2):
        try:
            name, state = item
            _str_upto(MAX_NAME)(name)
            _str_upto(16)(state)
        except (TypeError, ValueError) as exc:
            raise _row_error("ActivatableList.rows", exc, item) from None
        rows.append((name, state))
    return rows


def pack_server_rows(rows: list[ServerRow]) -> bytes:
    """The bytes of a ServerList: a msgpack array of rows, each a `ServerRow`'s fields in order
    (the version as a [major, minor, build] array, `direct` as a bool)."""
    packed: bytes = msgpack.packb([tuple(row) for row in rows[:SERVERS_PAGE]])
    return packed


def unpack_server_rows(data: bytes) -> list[ServerRow]:
    """Read `pack_server_rows`'s bytes, under limits (at most `SERVERS_PAGE` rows; no map, no
    ext); ProtocolError for anything else."""
    rows = []
    for item in _unpack_table(data, "ServerList.rows", SERVERS_PAGE, len(ServerRow._fields)):
        try:
            row = ServerRow(*item)
            _str_upto(MAX_NAME)(row.name)
            _u32(row.pid)
            _str_upto(MAX_PATH)(row.exe)
            _version(row.version)
            _sharing(row.sharing)
            if type(row.direct) is not bool:
                raise ValueError("expected a bool for direct")
            for n in (row.sessions, row.outstanding, row.oldest, row.up):
                _u63(n)
            _str_upto(16)(row.state)
        except (TypeError, ValueError) as exc:
            raise _row_error("ServerList.rows", exc, item) from None
        rows.append(row)
    return rows


def pack_process_rows(rows: list[ProcessRow]) -> bytes:
    """The bytes of a ProcessList: a msgpack array of rows, each a `ProcessRow`'s fields in
    order (`servers` an array of at most `ROW_SERVERS` names, `inbox` a bool)."""
    packed: bytes = msgpack.packb([
        (*row[:5], row.servers[:ROW_SERVERS], *row[6:]) for row in rows[:PROCESSES_PAGE]
    ])
    return packed


def unpack_process_rows(data: bytes) -> list[ProcessRow]:
    """Read `pack_process_rows`'s bytes, under limits (at most `PROCESSES_PAGE` rows of
    `ROW_SERVERS` server names; no map, no ext); ProtocolError for anything else."""
    rows = []
    for item in _unpack_table(data, "ProcessList.rows", PROCESSES_PAGE, ROW_SERVERS):
        try:
            row = ProcessRow(*item)
            _u32(row.pid)
            _u32(row.uid)
            _str_upto(MAX_PATH)(row.exe)
            _u32(row.channels)
            if type(row.inbox) is not bool:
                raise ValueError("expected a bool for inbox")
            if type(row.servers) is not tuple or len(row.servers) > ROW_SERVERS:
                raise ValueError(f"expected at most {ROW_SERVERS} server names")
            for name in row.servers:
                _str_upto(MAX_NAME)(name)
            _u63(row.sessions)
            _u63(row.outstanding)
        except (TypeError, ValueError) as exc:
            raise _row_error("ProcessList.rows", exc, item) from None
        rows.append(row)
    return rows


# -- batches: several frames in one datagram of a direct connection ---------------------------
# A server that serves several requests of one connection in a turn of its loop answers them
# in one datagram: one send and one receive for the lot, instead of one each (the system calls
# were most of a pipelined call's cost). A datagram that begins with BATCH_MARK is a batch: a
# sequence of (u32 little-endian length, frame); any other datagram is one frame.

#: The first byte of a batch: 0xc1, the one byte msgpack never uses, so no frame begins with it.
BATCH_MARK = 0xC1
#: Largest batch a server sends (frames that would pass it go in the next one; a larger frame
#: alone): well under a connection's send buffer (a buffer too small for one, as a small
#: net.core.wmem_max makes, gets the batch's frames one by one).
BATCH_BYTES = 32 * 1024
_BATCH_LENGTH = struct.Struct("<I")
_BATCH_HEADER = bytes([BATCH_MARK])


def pack_batch(frames: list[bytes]) -> bytes:
    """One datagram carrying `frames`, in order (see `unpack_batch`)."""
    pack = _BATCH_LENGTH.pack
    return _BATCH_HEADER + b"".join(pack(len(frame)) + frame for frame in frames)


def unpack_batch(datagram: bytes) -> list[bytes]:
    """The frames of a datagram `pack_batch` made; ProtocolError naming what is wrong for
    anything else (a length past the end, an empty frame, no frame at all)."""
    if datagram[:1] != _BATCH_HEADER:
        raise ProtocolError("batch: does not begin with BATCH_MARK (0xc1)")
    frames, at, end = [], 1, len(datagram)
    unpack_from, size = _BATCH_LENGTH.unpack_from, _BATCH_LENGTH.size
    while at < end:
        if at + size > end:
            raise ProtocolError(f"batch: {end - at} bytes left at offset {at}, not a length")
        (length,) = unpack_from(datagram, at)
        at += size
        if not 0 < length <= end - at:
            raise ProtocolError(f"batch: a frame of {length} bytes at offset {at}, "
                                f"with {end - at} bytes left")
        frames.append(datagram[at:at + length])
        at += length
    if not frames:
        raise ProtocolError("batch: no frame in it")
    return frames


def pack_value(value: Any) -> bytes:
    """The msgpack bytes of `value`, a typed interface's value carried in a descriptor
    (`ipcfw.interface`): None, bool, int (64-bit), float, str, bytes, and lists, tuples and
    dicts of them. TypeError naming the type for anything else; a tuple comes back a list."""
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True, strict_types=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"cannot be carried as a msgpack value: {exc}") from None
    return packed


def unpack_value(data: bytes) -> Any:
    """Read `pack_value`'s bytes; ProtocolError for anything else (trailing bytes, an ext type,
    an unhashable map key). Nothing in it is larger than `data` itself."""
    try:
        return _unpackb(data, raw=False, strict_map_key=False, ext_hook=_refuse_ext)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise _unpack_error(exc) from None


# -- bounded decoding (see the module docstring) ----------------------------------------------

#: The longest array in any message: the kind and the most fields (Connect's six).
_MAX_ARRAY_LEN = 1 + max(len(checkers) for _, checkers in _SCHEMA.values())
#: The most arrays in any message: Connect with a first request of four writable descriptors.
_MAX_ARRAYS = 8
#: The longest string field, in UTF-8 bytes (at most 4 per character).
_MAX_STR_BYTES = 4 * max(MAX_NAME, MAX_CATEGORY, MAX_PATH)
#: Frames up to this size are decoded without counting arrays: see the module docstring.
_SMALL_FRAME = 4096

_NO_MAP = "where the protocol has none (only StatsReply.counters is a map)"
_unpackb = msgpack.unpackb


def _refuse_map(value: dict[Any, Any]) -> dict[Any, Any]:
    raise ProtocolError(f"a map, {_NO_MAP}")


def _refuse_ext(code: int, data: bytes) -> object:
    raise ProtocolError(f"ext type {code}, where the protocol has none")


def decode(frame: bytes | memoryview) -> Message:
    """Return the message carried by `frame`, or raise ProtocolError naming what was wrong."""
    try:
        if len(frame) <= _SMALL_FRAME:
            # No str can exceed its limit here (the frame is shorter). Here and below, msgpack's
            # defaults give strs as str (raw=False) and bins up to the frame's length.
            items = _unpackb(
                frame, use_list=False, max_array_len=_MAX_ARRAY_LEN, max_map_len=0, max_ext_len=0,
                object_hook=_refuse_map, ext_hook=_refuse_ext,
            )
        else:
            items = _unpack_counted(frame)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        items = _unpack_stats_reply(frame, exc)
    if type(items) is not tuple or not items or type(items[0]) is not int:
        raise ProtocolError(f"frame is not a [kind, ...] array: {_show(items)}")
    entry = _BY_KIND.get(items[0])
    if entry is None:
        raise ProtocolError(f"unknown message kind {items[0]}")
    cls, checkers, valid = entry
    fields = items[1:]
    if len(fields) != len(checkers):
        fields = _with_defaults(cls, checkers, fields)
    try:
        if valid(fields):
            # what NamedTuple._make does, without the length check
            return tuple.__new__(cls, fields)
    except ValueError:
        pass
    raise _field_error(cls, checkers, fields)


def _unpack_counted(frame: bytes | memoryview) -> Any:
    """Unpack `frame` under every limit, counting arrays."""
    return _unpackb(
        frame, use_list=False, max_array_len=_MAX_ARRAY_LEN, max_map_len=0,
        max_str_len=_MAX_STR_BYTES,
        max_ext_len=0, list_hook=_array_counter(), object_hook=_refuse_map, ext_hook=_refuse_ext,
    )


def _array_counter(most: int = 0) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    """A list_hook refusing the array past `most` (default `_MAX_ARRAYS`). msgpack calls it as
    it finishes each array, innermost first: once it refuses, nothing more is built."""
    most = most or _MAX_ARRAYS
    arrays_left = most

    def count_array(array: tuple[Any, ...]) -> tuple[Any, ...]:
        nonlocal arrays_left
        arrays_left -= 1
        if arrays_left < 0:
            raise ProtocolError(f"more than {most} arrays, where no message has more")
        return array

    return count_array


def _unpack_stats_reply(frame: bytes | memoryview, failure: Exception) -> Any:
    """Unpack a frame the limits refused if it is a StatsReply, the one message with a map;
    otherwise, or if it fails again, raise the ProtocolError naming the failure.

    msgpack builds a map's dict as it reads the entries, so maps nested in maps are all held
    open: 1024 deep, 255 entries each, that is 7 times the frame. So the counters are read entry
    by entry, each key and value under the same limits as any other frame (no map), and their
    dict is built here."""
    # As encode writes it: a fixarray (0x90-0x9f), then the kind as a positive fixint.
    if not (isinstance(frame, (bytes, bytearray, memoryview)) and len(frame) > 1
            and frame[0] & 0xF0 == 0x90 and frame[1] == Kind.STATS_REPLY):
        raise _unpack_error(failure) from None
    unpacker = msgpack.Unpacker(
        use_list=False, max_buffer_size=len(frame), max_array_len=_MAX_ARRAY_LEN, max_map_len=0,
        max_str_len=_MAX_STR_BYTES, max_ext_len=0,
        list_hook=_array_counter(), object_hook=_refuse_map, ext_hook=_refuse_ext,
    )
    try:
        unpacker.feed(frame)
        size = unpacker.read_array_header()
        if size > _MAX_ARRAY_LEN:
            raise ProtocolError(f"array of {size} items exceeds the protocol's {_MAX_ARRAY_LEN}")
        items = []
        for index in range(size):
            if (index == 2 and unpacker.tell() < len(frame)
                    and frame[unpacker.tell()] in _MAP_HEADERS):
                items.append(_read_counters(unpacker))
            else:
                items.append(unpacker.unpack())
        if unpacker.tell() != len(frame):
            raise ProtocolError("not a msgpack frame (extra data after the message)")
    except Exception as exc:
        raise _unpack_error(exc) from None
    return tuple(items)


#: The first byte of a msgpack map: fixmap, map16, map32.
_MAP_HEADERS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}


def _read_counters(unpacker: msgpack.Unpacker) -> dict[str, int]:
    entries = unpacker.read_map_header()
    if entries > _MAX_COUNTERS:
        raise ProtocolError(f"map of {entries} entries exceeds the protocol's {_MAX_COUNTERS}")
    counters = {}
    for _ in range(entries):
        key = unpacker.unpack()
        counters[key] = unpacker.unpack()  # a key of the wrong type fails the field's check
    return counters


_LIMIT_ERROR = re.compile(r"(\d+) exceeds max_(str|array|map|ext)_len\(\d+\)")


def _unpack_error(exc: Exception) -> ProtocolError:
    """The ProtocolError for a frame msgpack refused: a limit, named with the protocol's reason,
    or anything else as "not a msgpack frame"."""
    if isinstance(exc, ProtocolError):  # a hook's refusal
        return exc
    match = _LIMIT_ERROR.fullmatch(str(exc)) if type(exc) is ValueError else None
    if match is None:
        return ProtocolError(f"not a msgpack frame ({type(exc).__name__}: {exc})")
    size, kind = int(match[1]), match[2]
    if kind == "array":
        return ProtocolError(f"array of {size} items exceeds the protocol's {_MAX_ARRAY_LEN}")
    if kind == "map":
        return ProtocolError(f"a map of {size} {'entry' if size == 1 else 'entries'}, {_NO_MAP}")
    if kind == "str":
        return ProtocolError(f"str of {size} bytes exceeds the protocol's {_MAX_STR_BYTES}")
    return ProtocolError("an ext type, where the protocol has none")


def _with_defaults(
    cls: Any, checkers: tuple[Checker, ...], fields: tuple[Any, ...]
) -> tuple[Any, ...]:
    """Fill trailing fields that have defaults (added by later protocol versions)."""
    missing = cls._fields[len(fields):]
    if len(fields) > len(checkers) or not all(name in cls._field_defaults for name in missing):
        raise ProtocolError(f"{cls.__name__} needs {len(checkers)} fields, got {len(fields)}")
    return fields + tuple(cls._field_defaults[name] for name in missing)


def _field_error(
    cls: Any, checkers: tuple[Checker, ...], fields: tuple[Any, ...]
) -> ProtocolError:
    """The error naming the first field its checker refuses, and why."""
    for name, check, value in zip(cls._fields, checkers, fields):
        try:
            check(value)
        except ValueError as exc:
            return ProtocolError(f"{cls.__name__}.{name}: {exc}, got {_show(value)}")
    # Only reached if a checker's expression and its code disagree: a bug here, not the peer's.
    return ProtocolError(f"{cls.__name__}: a field checker is inconsistent")  # pragma: no cover


_REPR = reprlib.Repr()
_REPR.maxlevel = 3  # a hostile frame can nest 1000 deep: never recurse into it
_REPR.maxstring = _REPR.maxother = 40


def _show(value: Any) -> str:
    return _REPR.repr(value)
