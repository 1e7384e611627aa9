"""The monitor's event records (``ipcfw monitor``): what they hold, and how a request's
arguments are summed up in one. Pure.

Theory of operation
-------------------
An `Event` is one thing that happened to a server's sessions: a registration, a connect and
its answer, a request and its completion, a disconnect, a process's death. The kernel makes
the events of everything it sees (every connect, disconnect and death, and the requests and
completions of the kernel path); a server taking direct connections makes those of its direct
requests and completions while a monitor watches it (`ipcfw.protocol.Report`), and sends them
to the kernel in `Traffic` frames. The kernel hands them to the monitors in `MonitorEvents`
frames. Both carry the events as one bin field, `ipcfw.protocol.pack_events`, read back under
limits of its own by `unpack_events` (the frame decoder's limits allow no array longer than a
message); `Event` and `EventKind` live in `ipcfw.protocol` with them, and are re-exported here.

Times are CLOCK_MONOTONIC seconds, one clock for every process of a Linux machine, so the
kernel's stamps and a server's compare. A completion's `micros` is its request's time to
completion: the kernel's on the kernel path (from its loop turns), the server's on the direct
path.

`summarize` is the argument summary of a request: ints shown, each descriptor as its kind and
length and a few leading bytes, so that a request's shape can be seen without copying it.
"""

from __future__ import annotations

from typing import Any

from .protocol import MAX_DETAIL, Event, EventKind, pack_events, unpack_events

__all__ = ["EventKind", "Event", "pack_events", "unpack_events", "summarize", "cut",
           "LEAD_BYTES", "MAX_DETAIL"]

#: Leading bytes of a descriptor shown in a request's summary.
LEAD_BYTES = 8
_PRINTABLE = frozenset(range(0x20, 0x7F))


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
