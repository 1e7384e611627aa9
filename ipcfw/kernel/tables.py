"""The kernel's records: a process, a peer (socket), a server, a session, a message. No I/O.

Theory of operation
-------------------
`ipcfw.kernel.state.KernelState` owns the tables of these records and is the only one that
changes them by its rules; they are defined here, apart from those rules, so that the other
pure modules that read the tables (`ipcfw.kernel.listing`, the session, server and process
lists) can name their types without importing the state.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field
from typing import NamedTuple

from ..protocol import Message, Role, Version

__all__ = [
    "ProcessKey", "ProcessIdentity", "SessionState", "MessageKind", "SlotSource",
    "ProcessRecord", "Peer", "ServerRecord", "SessionRecord", "MessageRecord",
]


#: A process's identity across pid reuse: (pid, creation time, host: "" on this one).
ProcessKey = tuple[int, float, str]


class ProcessIdentity(NamedTuple):
    """Who a process is, as the transport and the OS say (never the peer itself).

    A process on another host (over tcp) has the `host` its CURVE key is named in the
    configuration; its uid and gid are those the configuration gives that key, its `exe` is
    "", and its pid and creation time are its own word (they tell its sockets apart from
    those of the key's other processes, nothing more).
    """

    pid: int
    create_time: float
    uid: int
    gid: int
    exe: str
    host: str = ""

    @property
    def key(self) -> ProcessKey:
        return (self.pid, self.create_time, self.host)


class SessionState(enum.Enum):
    """Where a session is in its lifecycle (rule 6 of `ipcfw.kernel.state`)."""

    CONNECTING = "CONNECTING"  # client holds; server runs NewSessionL / CreateL
    OPEN = "OPEN"  # client holds; server holds a CSession
    ABANDONED = "ABANDONED"  # client gone while the server was still connecting
    CLOSING = "CLOSING"  # client gone; Disconnect delivered, not yet completed
    PANICKED = "PANICKED"  # server panicked the client; Disconnect delivered; client holds
    DEAD = "DEAD"  # server side gone (died, or disconnected after a panic); client holds

    def __repr__(self) -> str:
        return self.value


class MessageKind(enum.Enum):
    """What a message the kernel holds for a server is."""

    CONNECT = "CONNECT"
    REQUEST = "REQUEST"
    DISCONNECT = "DISCONNECT"
    ADMIT = "ADMIT"  # a thread's ticket for the direct path, until the server holds it


class SlotSource(enum.Enum):
    """Where a message's slot came from (rule 3 of the state)."""

    NONE = "none"  # sync request, connect, disconnect
    SESSION = "session"  # the session's own slots
    POOL = "pool"  # the kernel-wide pool


@dataclass(eq=False)
class ProcessRecord:
    """A process with peers: its identity, sockets, sessions and counts."""

    identity: ProcessIdentity
    client_key: int
    peers: set[bytes] = field(default_factory=set)  # routing ids
    inbox: bytes | None = None
    sessions: set[int] = field(default_factory=set)  # handles this process holds
    outstanding: int = 0  # its requests not yet completed
    # Per server name, its sessions that ended because this process's threads or the process
    # itself went, not by a Close (counted while a monitor watches: rule 14's DIED events).
    lost: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class Peer:
    """One socket of a process: a client thread's channel, its inbox, or a server."""

    rid: bytes
    role: Role
    process: ProcessRecord
    owned: set[int] = field(default_factory=set)  # unshared handles this channel created
    attached: set[int] = field(default_factory=set)  # handles this channel has used
    awaits: dict[int, str] = field(default_factory=dict)  # AwaitServer req_id -> name's key


@dataclass(eq=False)
class ServerRecord:
    """A registration of a server name, by its server's socket."""

    name: str
    rid: bytes
    process: ProcessRecord
    sharing: int
    version: Version
    direct: str = ""  # the socket where it takes direct connections ("": none)
    sessions: set[int] = field(default_factory=set)
    messages: dict[int, MessageRecord] = field(default_factory=dict)
    informed: set[int] = field(default_factory=set)  # client keys this server has a PeerInfo for
    terminating: int | None = None  # the TerminationReason once termination began
    deregistered: bool = False  # the server sent Deregister (its direct requests have ended)
    waiters: list[tuple[bytes, int]] = field(default_factory=list)  # answered when it has ended
    # While the server is not reading: what it is sent, in order, keyed by msg_id for the
    # messages of the kernel's tables (so a freed one is taken out) and by a negative number
    # for the others. None while it reads.
    held: collections.OrderedDict[int, Message] | None = None
    since: float = 0.0  # the kernel's `now` when it registered
    # Messages in service on its direct connections, per (session, client pid), as its last
    # CensusReply said: (count, slots used, the kernel's `now` when the oldest began); and
    # whether a Census is on its way to it.
    census: dict[tuple[int, int], tuple[int, int, float]] = field(default_factory=dict)
    census_asked: bool = False
    # A monitor watches it (rule 14): its events are made. On the direct path, whether it
    # was told to report its traffic, and the req_id of that Report until it answered (0).
    monitored: bool = False
    reporting: bool = False
    report_asked: int = 0


@dataclass(eq=False)
class SessionRecord:
    """A session: its server, who holds it and what is outstanding on it."""

    handle: int
    server: ServerRecord
    creator: Peer  # the channel that created it: the only holder while unshared
    slots: int  # -1 pool, 0 none, N own
    state: SessionState = SessionState.CONNECTING
    # Cached from `state` by `_transition` (the hot path tests them; enum hashing is slow).
    held: bool = True  # state in _HELD
    deliverable: bool = True  # state in _DELIVERABLE
    sharing: int = 0
    slots_used: int = 0
    messages: set[int] = field(default_factory=set)  # msg_ids outstanding
    panic: tuple[str, int] | None = None  # (category, reason), once the server panicked it
    holders: dict[ProcessRecord, int] = field(default_factory=dict)  # -> its Open count
    attached: set[bytes] = field(default_factory=set)  # routing ids of channels attached
    token: bytes | None = None  # set by ShareProtected; Open(token) attaches a process
    # On the direct path: the creator's one-time ticket, until the Connected that carries it.
    ticket: bytes = b""
    direct: bool = False  # its threads' requests go on direct connections to the server
    since: float = 0.0  # the kernel's `now` when it was created
    thread: int = 0  # the creating thread's native id, as its Connect said (0: not said)

    def __repr__(self) -> str:
        return (
            f"<session 0x{self.handle:x} {self.state!r} server={self.server.name!r} "
            f"sharing={self.sharing} holders={len(self.holders)} attached={len(self.attached)} "
            f"outstanding={len(self.messages)}>"
        )


@dataclass(eq=False, slots=True)
class MessageRecord:
    """A message the kernel holds until its server completes it."""

    msg_id: int
    kind: MessageKind
    session: SessionRecord
    reply_to: bytes | None  # the channel that gets the answer; None once nobody waits
    origin: bytes | None  # the channel that sent it (kept when reply_to is cleared)
    req_id: int
    slot: SlotSource
    writable: dict[int, int]  # arg index -> max length
    payer: ProcessRecord | None = None  # a request's process: it counts towards its limit
    ticket: bytes = b""  # an ADMIT's: the client gets it once the server holds it
    since: float = 0.0  # the kernel's `now` when it was made
