"""The monitor's event records (``ipcfw monitor``): what they hold, and their codec. Pure.

Theory of operation
-------------------
An `Event` is one thing that happened to a server's sessions: a registration, a connect and
its answer, a request and its completion, a disconnect, a process's death. The kernel makes
the events of everything it sees (every connect, disconnect and death, and the requests and
completions of the kernel path); a server taking direct connections makes those of its direct
requests and completions while a monitor watches it (`ipcfw.protocol.Report`), and sends them
to the kernel in `Traffic` frames. The kernel hands them to the monitors in `MonitorEvents`
frames. Both carry the events as one bin field, `pack_events`, read back under limits of its
own by `unpack_events` (the frame decoder's limits allow no array longer than a message).

Times are CLOCK_MONOTONIC seconds, one clock for every process of a Linux machine, so the
kernel's stamps and a server's compare. A completion's `micros` is its request's time to
completion: the kernel's on the kernel path (from its loop turns), the server's on the direct
path.

`summarize` is the argument summary of a request: ints shown, each descriptor as its kind and
length and a few leading bytes, so that a request's shape can be seen without copying it.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import msgpack

from .protocol import MAX_EVENTS_FRAME, MAX_NAME, ProtocolError

__all__ = ["EventKind", "Event", "pack_events", "unpack_events", "summarize", "LEAD_BYTES",
           "MAX_DETAIL"]

#: Leading bytes of a descriptor shown in a request's summary.
LEAD_BYTES = 8
#: The longest `Event.detail`, in characters (a longer one is cut, ending with "...").
MAX_DETAIL = 200
_FIELDS = 11
_PRINTABLE = frozenset(range(0x20, 0x7F))


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


def summarize(args: Any) -> str:
    """A request's arguments in a few characters: ``7, des[5]'hello', out[0/64]``: an int as
    it is; a read-only descriptor as ``des[length]``, a writable one as ``out[length/max]``,
    one in shared memory as ``shm[length]``, each followed by its first `LEAD_BYTES` bytes
    (as text when they are printable ASCII, else in hex) and "..." when there are more."""
    parts = []
    for arg in args:
        kind = type(arg)
        if kind is int:
            parts.append(str(arg))
        elif kind is bytes:
            parts.append(f"des[{len(arg)}]{_lead(arg)}")
        elif kind is tuple and len(arg) == 2:
            data, most = arg
            parts.append(f"out[{len(data)}/{most}]{_lead(data)}")
        else:  # a descriptor in shared memory (ipcfw.server.mapped), or what the server holds
            length = getattr(arg, "length", None)
            parts.append(f"shm[{length}]" if type(length) is int else kind.__name__)
    return cut(", ".join(parts))


def cut(text: str) -> str:
    """`text`, at most `MAX_DETAIL` characters long."""
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


def _lead(data: bytes) -> str:
    if not data:
        return ""
    lead = data[:LEAD_BYTES]
    more = "..." if len(data) > LEAD_BYTES else ""
    if all(byte in _PRINTABLE for byte in lead):
        return f"'{lead.decode('ascii')}'{more}"
    return f"0x{lead.hex()}{more}"


def pack_events(events: list[Event]) -> bytes:
    """The bytes of a MonitorEvents or Traffic frame's events: a msgpack array of arrays."""
    packed: bytes = msgpack.packb([tuple(event) for event in events[:MAX_EVENTS_FRAME]])
    return packed


def _refuse(*_: Any) -> Any:
    raise ProtocolError("a map or an ext type, where the events have none")


def unpack_events(data: bytes) -> list[Event]:
    """Read `pack_events`'s bytes, under limits (at most `MAX_EVENTS_FRAME` events of the
    fields above, strings at most `MAX_NAME` and `MAX_DETAIL` characters); ProtocolError
    naming what was wrong for anything else."""
    try:
        items = msgpack.unpackb(
            data, use_list=False, max_array_len=MAX_EVENTS_FRAME, max_map_len=0, max_ext_len=0,
            max_str_len=4 * max(MAX_NAME, MAX_DETAIL), object_hook=_refuse, ext_hook=_refuse,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"events: not a packed array of events ({exc})") from None
    if type(items) is not tuple:
        raise ProtocolError("events: not an array of events")
    return [_event(item) for item in items]


def _event(item: Any) -> Event:
    if type(item) is not tuple or len(item) != _FIELDS:
        raise ProtocolError(f"events: an event is an array of {_FIELDS} fields, got {item!r:.80}")
    time, kind, server, pid, handle, path, msg, function, value, micros, detail = item
    problem = (
        "time" if type(time) is not float and type(time) is not int else
        "kind" if type(kind) is not int or kind not in _KINDS else
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
        raise ProtocolError(f"events: bad {problem} in {item!r:.120}")
    return Event(float(time), kind, server, pid, handle, path, msg, function, value, micros,
                 detail)


_KINDS = frozenset(int(kind) for kind in EventKind)
