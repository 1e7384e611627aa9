"""The kernel's tables and every rule about handles, slots, sessions and servers. No I/O.

Theory of operation
-------------------
`KernelState` is the kernel's whole mind. The loop (`ipcfw.kernel.loop`) feeds it decoded
messages with the routing id they came from, peer and process deaths, and the identity of each
new process; every method returns a list of actions (`Send`, `Watch`, `Unwatch`) for the loop to
perform. Nothing here touches a socket, a clock, a thread or the OS, so the rules can be tested and
fuzzed by feeding messages and reading actions (tests/kernel/test_state_*.py).

Rules this module keeps:

1. A peer is a socket, introduced by its `Hello`; the loop vouches for its process identity
   (pid, create_time, uid, gid, exe) from the transport, never from anything the peer says.
   A peer is a client thread's CHANNEL, a client process's INBOX, or a SERVER.
2. A session handle is valid only for its holders: the creating channel while unshared, any
   channel of the creating process once shared (ShareAuto), and any channel of a process that
   opened it by token once protected (ShareProtected). Anyone else using it is panicked
   KERN-EXEC 0 and nothing reaches the server. A shared session lives until its last holder
   process closes it or dies; an unshared one also ends with its creating channel (thread).
   A channel is attached to a session by its first use; at most 255 are attached at once
   (KErrOverflow for the next), and a channel that goes away is detached.
3. Async requests and blind sends take a message slot: the session's own (N > 0), none (0: only
   sync calls), or the kernel-wide pool (-1). No slot: completed at once with KErrServerBusy.
   Sync requests never take a slot. More than 512 outstanding on one session: KErrOverflow.
   A slot is freed when its message completes, or when its session goes.
4. Limits per process (`KernelLimits`): a process holding `sessions_per_process` sessions gets
   KErrOverflow for the next connect or Open; one with `outstanding_per_process` requests
   outstanding gets KErrServerBusy for the next async request or send, KErrOverflow for the
   next sync one (which never gets KErrServerBusy). Nobody else is affected.
5. Every message reaches its server in the order the kernel received it, and is completed at
   most once; a completion for a message the kernel no longer holds (its client closed or died)
   is dropped silently.
6. A session's lifecycle is the table `_SESSION_TRANSITIONS`; an event not in it for the current
   state raises `KernelInvariantError` and changes nothing.
7. A server's registration can be terminated with a reason (Terminate from an administrator,
   Deregister from the server itself; seed 002). From then on no new request is delivered
   (KErrServerTerminated) and connects to the name fail with KErrServerTerminated;
   outstanding messages still complete and reach their clients. When none is left, every
   waiter gets its Completed, the name is released and the sessions end as if the server
   had died. A server that takes direct connections may still be serving requests the kernel
   cannot see: its registration ends only once the server has also deregistered (it does so
   after the indication, when its direct requests have ended), or died.
8. A peer that breaks the protocol (wrong role, unknown message id of its own server...) gets
   `PeerMisbehaved` raised before any table changes; the loop logs it once per kind and drops
   the message. Other peers are never affected.
9. Backpressure: when the loop finds a server not reading (`hold_back`), everything for that
   server is held back here, in order, instead of being sent; `release` lets it go in batches
   as the server reads again. Held requests keep their slots, so what is held is bounded by
   the slots and limits that bound every request; a request cancelled while held is simply
   never delivered (the server hears nothing of it).
10. A peer the loop stops serving (it left too many frames unread: `peer_dropped`) is forgotten
   as if its socket had closed, and told so with a `Dropped` notice: on its own socket, behind
   what it has not read, and for a client thread also on its process's inbox, with a
   SessionLost (KErrDisconnected) for each unshared session that ended with it.
11. The direct path: a session created with Connect.path DIRECT on a server with a socket
   gives its creator a one-time ticket, to the server first (NewSession) then to the client
   (Connected). Any other thread that may use it (a channel of a holder process) asks with
   `Join`: it is attached as by a request (the 255), and the server is sent `Admit` with a new
   ticket; only once the server completes it does the thread get the ticket (Connected), so the
   server always knows a ticket before anyone can present it. Requests that then go direct
   never reach the kernel; the kernel still decides who holds, counts holders and ends the
   session. An Open of a direct session names the server's socket (no ticket).
12. The session, server and process lists (`ListSessions`, `ListServers`, `ListProcesses`,
   for `ipcfw ps`; the pure `ipcfw.kernel.listing` makes them) are answered from the tables,
   a page at a time; when the page counts what servers taking direct connections hold, those
   servers are first asked (`Census`, one at a time per server) what is in service on their
   direct connections. A server's death answers
   for it. Every message the kernel holds has an age: `now` (set by the loop before each turn)
   when it was made; a census says how long its oldest has been in service, per session and
   client process; a list shows the oldest outstanding message's age of each row.
13. A channel may wait for a server name (`AwaitServer`, for start-up that cannot race): it is
   answered Completed(KErrNone) as soon as a server registers the name, at once if one is
   registered and not terminating. At most `MAX_AWAITS` waits per channel (KErrOverflow for the
   next): a client that gives up on one cancels it (`Cancel`, answered KErrCancel), and a
   channel's waits end with it, so the kernel's memory for waits stays bounded by its peers.
14. The monitor (`ipcfw monitor`, the pure `ipcfw.kernel.monitor`): a channel's `Monitor`
   watches a server name or every server. The kernel makes an event of each registration,
   connect, request, completion, disconnect and death concerning a watched server, after one
   test of the server record's `monitored` flag (of `monitor.active` for a client's death),
   stamped with `now`, which the loop sets at each turn. A watched server on the direct path
   is told to report the traffic of its direct connections (`Report`), and its `Traffic` is
   handed to the monitors as the kernel's own events are; a monitor is answered once those
   servers have begun. The batches go out once per loop turn (`monitor_batches`), within each
   monitor's credit; a monitor's buffer is bounded, and what it loses it is told.
15. Activation on demand (`ipcfw.kernel.activation`, whose rules `self.activations` keeps): a
   connect to a name that is not registered (or whose registration is ending) but has a
   service is held, not refused, and an `AwaitServer` for it waits; either starts the server
   (`Spawn`) once the name is free and no process of the service runs. The name's
   registration lets the held connects proceed as if just received; a start that fails
   (`service_exited`, `activation_tick`) answers them and the waits with its error. A server
   the kernel started that has no session for its `idle_exit` is terminated (reason IDLE).
16. A process on another host (over tcp: its identity's `host` is its key's peer name) was
   admitted by its key, so the uid admission does not apply to it; no pidfd watches it (its
   connections' heartbeats do: no `Watch`); and every session it uses takes the kernel path:
   its Connect asking for the direct path makes a kernel-path session, an Open of a direct
   session names no socket, a Join of one is answered without a ticket (the server is sent
   no Admit), and a Register naming a socket is refused (KErrNotSupported).
"""

from __future__ import annotations

import collections
import difflib
import enum
import itertools
import logging
import secrets
from typing import Any, NamedTuple
from collections.abc import Callable, Iterable

from .. import errors
from ..events import Event, EventKind, cut, summarize, unpack_events
from ..security import USER_CAPABILITIES
from ..naming import is_protected, lookup_key, name_problem, not_registered
from ..protocol import (
    Args,
    MAX_FRAME,
    PROTOCOL_VERSION,
    PeerGone,
    PeerInfo,
    Close,
    Complete,
    Completed,
    Connect,
    Connected,
    Deliver,
    Disconnect,
    Dropped,
    Hello,
    Message,
    Mode,
    Monitor,
    Report,
    Traffic,
    Deregister,
    Admit,
    AwaitServer,
    CensusReply,
    Join,
    ListProcesses,
    ListServers,
    ListSessions,
    ProtocolError,
    Negotiated,
    NewSession,
    Path,
    SessionPanicked,
    Open,
    Cancel,
    Cancelled,
    Panic,
    Panicked,
    Register,
    Request,
    Role,
    SessionLost,
    Share,
    Shared,
    Stats,
    Terminate,
    TerminationReason,
    TServerType,
    Terminating,
    StatsReply,
    Welcome,
    ListActivatable,
    ActivatableList,
    pack_activatable,
)
from .activation import MAX_HELD, Activations, Failure, Kill, Service, Spawn
from .listing import Listing, ListRequest, Lists
from .monitor import Monitors
from .tables import (
    MessageKind,
    MessageRecord,
    Peer,
    ProcessIdentity,
    ProcessKey,
    ProcessRecord,
    ServerRecord,
    SessionRecord,
    SessionState,
    SlotSource,
)

log = logging.getLogger("ipcfw.kernel")

_REFUSALS_LOGGED = 1024  # uids whose first refusal at Hello is logged (the rest are not)

#: Symbian's per-session limit on outstanding messages (KMaxMsgLimit).
MAX_OUTSTANDING = 512
#: The largest per-session slot count a client may ask for (the documented Symbian contract).
MAX_SESSION_SLOTS = 255
_HANDLE_LIMIT = 2**31 - 1
#: Room kept in a frame for a completion's fields around its descriptor writes.
_COMPLETION_OVERHEAD = 1024
#: At most this many threads (channels) attached to one session (seed 004, a project rule).
MAX_ATTACHED = 255
#: Bytes in a ShareProtected token (128 bits: unguessable).
TOKEN_BYTES = 16
#: `AwaitServer` waits one channel may have in the kernel at once (rule 13).
MAX_AWAITS = 16
#: Monitors one process may have at once (of the kernel's `Monitors.most`): one process cannot
#: take them all.
MONITORS_PER_PROCESS = 8


# -- actions ---------------------------------------------------------------------------------


class Admission(NamedTuple):
    """Who the kernel admits (its configuration's [admission]): its own uid, the `uids`, and
    any process whose (primary) gid is one of `gids`."""

    kernel_uid: int
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    def refusal(self, identity: ProcessIdentity) -> str | None:
        """Why `identity` is not admitted; None if it is."""
        uid, gid = identity.uid, identity.gid
        if uid == self.kernel_uid or uid in self.uids or gid in self.gids:
            return None
        admitted = ", ".join([f"uid {uid}" for uid in sorted({self.kernel_uid, *self.uids})]
                             + [f"gid {gid}" for gid in sorted(self.gids)])
        return (f"uid {identity.uid} (gid {identity.gid}) is not admitted: this kernel admits "
                f"{admitted} ([admission] in its configuration)")


class Send(NamedTuple):
    """Send `message` to the peer with routing id `rid`."""

    rid: bytes
    message: Message


class Watch(NamedTuple):
    """Start watching process `identity` for death; report it with `process_died(key)`."""

    identity: ProcessIdentity


class Unwatch(NamedTuple):
    """Stop watching the process with this key: it has no peers left."""

    key: ProcessKey


class RemoveSocket(NamedTuple):
    """A server's registration ended: remove its direct socket `path` from the kernel's
    directory, if it is there (a server killed with SIGKILL could not)."""

    path: str


Action = Send | Watch | Unwatch | RemoveSocket | Spawn | Kill


class PeerMisbehaved(Exception):
    """A peer broke the protocol. `kind` groups reports for rate-limited logging."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class KernelInvariantError(RuntimeError):
    """An illegal transition was attempted. This is a bug in ipcfw; please report it."""


# -- session lifecycle -----------------------------------------------------------------------


class SessionEvent(enum.Enum):
    CONNECT_OK = "CONNECT_OK"
    CONNECT_FAILED = "CONNECT_FAILED"
    CLIENT_CLOSED = "CLIENT_CLOSED"
    PANIC = "PANIC"
    DISCONNECT_DONE = "DISCONNECT_DONE"
    SERVER_DIED = "SERVER_DIED"


_S, _E = SessionState, SessionEvent
_REMOVED = None  # the session record is deleted
_SESSION_TRANSITIONS: dict[SessionState, dict[SessionEvent, SessionState | None]] = {
    _S.CONNECTING: {
        _E.CONNECT_OK: _S.OPEN,
        _E.CONNECT_FAILED: _REMOVED,
        _E.CLIENT_CLOSED: _S.ABANDONED,
        _E.PANIC: _REMOVED,
        _E.SERVER_DIED: _REMOVED,
    },
    _S.OPEN: {
        _E.CLIENT_CLOSED: _S.CLOSING,
        _E.PANIC: _S.PANICKED,
        _E.SERVER_DIED: _S.DEAD,
    },
    _S.ABANDONED: {
        _E.CONNECT_OK: _S.CLOSING,
        _E.CONNECT_FAILED: _REMOVED,
        _E.PANIC: _REMOVED,
        _E.SERVER_DIED: _REMOVED,
    },
    _S.CLOSING: {
        _E.DISCONNECT_DONE: _REMOVED,
        _E.SERVER_DIED: _REMOVED,
    },
    _S.PANICKED: {
        _E.DISCONNECT_DONE: _S.DEAD,
        _E.CLIENT_CLOSED: _S.CLOSING,
        _E.SERVER_DIED: _S.DEAD,
    },
    _S.DEAD: {
        _E.CLIENT_CLOSED: _REMOVED,
    },
}
#: States in which the kernel still forwards the session's requests to its server.
_DELIVERABLE = frozenset({_S.CONNECTING, _S.OPEN})
#: A connect refused with these, to a name with a service, is held while its server starts.
_ACTIVATING = frozenset({errors.KErrNotFound, errors.KErrServerTerminated})
#: States in which the client still holds the handle.
_HELD = frozenset({_S.CONNECTING, _S.OPEN, _S.PANICKED, _S.DEAD})


# Shared by every message without writable descriptors: never mutated.
_NO_WRITABLE: dict[int, int] = {}


def _writable_lengths(args: Args) -> dict[int, int]:
    """Arg index -> max length of each writable descriptor in `args`."""
    for arg in args:
        if type(arg) is tuple:
            return {i: a[1] for i, a in enumerate(args) if isinstance(a, tuple)}
    return _NO_WRITABLE


# The request path reads these several times per message; in CPython 3.11 each read of an enum
# member off its class is a descriptor call (~0.13 us), module globals are not.
_SYNC, _ASYNC, _BLIND = Mode.SYNC, Mode.ASYNC, Mode.BLIND
_UNSHARED, _PROTECTED = TServerType.EUnsharableSessions, TServerType.EGlobalSharableSessions
_CHANNEL = Role.CHANNEL
_REQUEST, _CONNECT = MessageKind.REQUEST, MessageKind.CONNECT
_NO_SLOT, _SESSION_SLOT, _POOL_SLOT = SlotSource.NONE, SlotSource.SESSION, SlotSource.POOL


class KernelState:
    """All of the kernel's tables, and the rules that change them.

    Every public method takes an input and returns the actions to perform, in order.
    """

    def __init__(
        self,
        *,
        kernel_pid: int = 0,
        pool_slots: int = 4096,
        protserv_uids: frozenset[int] = frozenset(),
        admission: Admission | None = None,
        grants: Callable[[int, int, str, str], frozenset[str]] | None = None,
        max_frame: int = MAX_FRAME,
        sessions_per_process: int = 10_000,
        outstanding_per_process: int = 100_000,
        connections_per_uid: int = 10_000,
        new_token: Callable[[], bytes] = lambda: secrets.token_bytes(TOKEN_BYTES),
        services: Iterable[Service] = (),
    ) -> None:
        self.kernel_pid = kernel_pid
        self.now: float = 0.0  # the loop's clock (seconds), set before each turn: message ages
        self.pool_slots = pool_slots
        self.sessions_per_process = sessions_per_process
        self.outstanding_per_process = outstanding_per_process
        self.connections_per_uid = connections_per_uid
        self.connections_of_uid: collections.Counter[int] = collections.Counter()
        self.protserv_uids = protserv_uids
        # Who may say Hello (None: everyone who reaches the socket, which is private to the
        # kernel's user unless the configuration opens it), and the capabilities of each.
        self.admission = admission
        self.refused_uids: set[int] = set()  # those whose refusal was logged
        self.grants = grants
        self.max_frame = max_frame
        self.new_token = new_token
        self.tokens: dict[bytes, int] = {}  # ShareProtected token -> handle
        # (channel rid, req_id) -> msg_id of an async request
        self.cancellable: dict[tuple[bytes | None, int], int] = {}
        self.terminating: set[ServerRecord] = set()  # servers whose registration is ending
        self.pool_used = 0
        self.peers: dict[bytes, Peer] = {}
        self.processes: dict[ProcessKey, ProcessRecord] = {}
        self.servers: dict[str, ServerRecord] = {}  # lookup key -> server
        self.server_of_peer: dict[bytes, ServerRecord] = {}
        self.sessions: dict[int, SessionRecord] = {}
        self.messages: dict[int, MessageRecord] = {}
        self._next_handle = 0
        self._msg_ids = itertools.count(1)
        self._held_keys = itertools.count(1)
        self.held_back: set[bytes] = set()  # servers whose messages are held back
        self.listings: list[Listing] = []  # session lists waiting for censuses
        self.lists = Lists(  # rule 12: reads these tables (never rebound)
            peers=self.peers, processes=self.processes, servers=self.servers,
            server_of_peer=self.server_of_peer, sessions=self.sessions, messages=self.messages,
        )
        # A server name's lookup key -> the (channel, req_id) waiting for it, in arrival order.
        self.awaits: dict[str, dict[tuple[bytes, int], None]] = {}
        self.admitted = 0  # tickets granted to threads by Join, ever
        self.monitor = Monitors()  # rule 14
        self._report_ids = itertools.count(1)
        self.activations = Activations(services)  # rule 15
        self._client_keys = itertools.count(1)
        self._dispatch: dict[type, Callable[[Peer, Any], list[Action]]] = {
            Register: self._register,
            Connect: self._connect,
            Request: self._request,
            Close: self._close,
            Share: self._share,
            Cancel: self._cancel,
            Terminate: self._terminate,
            Deregister: self._deregister,
            Open: self._open,
            Complete: self._complete,
            Negotiated: self._negotiated,
            SessionPanicked: self._session_panicked,
            Panic: self._panic,
            Stats: self._stats,
            Join: self._join,
            ListSessions: self._list,
            ListServers: self._list,
            ListProcesses: self._list,
            CensusReply: self._census_reply,
            AwaitServer: self._await_server,
            Monitor: self._monitor,
            Traffic: self._traffic,
            ListActivatable: self._list_activatable,
        }

    # -- inputs ------------------------------------------------------------------------------

    def hello(self, rid: bytes, identity: ProcessIdentity, message: Hello) -> list[Action]:
        """A new socket introduced itself; `identity` comes from the transport."""
        if rid in self.peers:
            raise PeerMisbehaved("duplicate hello", f"peer {rid.hex()} said Hello twice")
        welcome = Welcome(self.kernel_pid, self.max_frame, PROTOCOL_VERSION)
        if message.protocol != PROTOCOL_VERSION:
            # Not admitted; the Welcome tells the peer which protocol the kernel speaks.
            return [Send(rid, welcome)]
        refusal = (self.admission.refusal(identity)
                   if self.admission is not None and not identity.host else None)
        # (a remote peer was admitted by its key, at the CURVE handshake)
        if refusal is not None:
            if identity.uid not in self.refused_uids and len(self.refused_uids) < _REFUSALS_LOGGED:
                # (once per uid: a stranger saying Hello in a loop must not fill the log)
                self.refused_uids.add(identity.uid)
                log.warning("refused pid %d (uid %d, gid %d, %s): %s (further refusals of uid "
                            "%d are not logged)", identity.pid, identity.uid, identity.gid,
                            identity.exe or "unknown executable", refusal, identity.uid)
            return [Send(rid, welcome._replace(refusal=refusal,
                                               code=errors.KErrPermissionDenied))]
        if self.connections_of_uid[identity.uid] >= self.connections_per_uid:
            return [Send(rid, welcome._replace(code=errors.KErrOverflow, refusal=(
                f"uid {identity.uid} has {self.connections_per_uid} connections open, the most "
                f"this kernel allows one uid (its limit connections_per_uid)")))]
        role = Role(message.role)
        process = self.processes.get(identity.key)
        if role is Role.INBOX and process is not None and process.inbox is not None:
            raise PeerMisbehaved(
                "second inbox", f"pid {identity.pid} already has an inbox"
            )
        self.connections_of_uid[identity.uid] += 1  # (after the checks: see rule 8)
        actions: list[Action] = []
        if process is None:
            process = ProcessRecord(identity, next(self._client_keys))
            self.processes[identity.key] = process
            if not identity.host:  # (a remote one is watched by its connections' heartbeats)
                actions.append(Watch(identity))
        peer = Peer(rid, role, process)
        self.peers[rid] = peer
        process.peers.add(rid)
        if role is Role.INBOX:
            process.inbox = rid
        actions.append(Send(rid, welcome))
        return actions

    def knows(self, rid: bytes) -> bool:
        return rid in self.peers

    def receive(self, rid: bytes, message: Message) -> list[Action]:
        """A message from a peer that has said Hello."""
        peer = self.peers.get(rid)
        if peer is None:
            raise PeerMisbehaved("no hello", f"{type(message).__name__} before Hello")
        handler = self._dispatch.get(type(message))
        if handler is None:
            if type(message) is Hello:
                raise PeerMisbehaved(
                    "duplicate hello", f"pid {peer.process.identity.pid} said Hello twice"
                )
            raise PeerMisbehaved(
                "wrong direction", f"{type(message).__name__} is not sent to the kernel"
            )
        actions = handler(peer, message)
        if self.terminating:
            actions += self._finish_terminations()
        if self.held_back:
            return self._hold(actions)
        return actions

    def peer_gone(self, rid: bytes) -> list[Action]:
        """A peer's socket disconnected (its thread ended, or its process died)."""
        peer = self.peers.pop(rid, None)
        if peer is None:
            return []
        actions: list[Action] = []
        process = peer.process
        uid = process.identity.uid
        self.connections_of_uid[uid] -= 1
        if not self.connections_of_uid[uid]:
            del self.connections_of_uid[uid]
        process.peers.discard(rid)
        if process.inbox == rid:
            process.inbox = None
        server = self.server_of_peer.get(rid)
        if server is not None:
            if server.monitored:
                self._event(server, EventKind.DIED, process.identity.pid, detail="server")
            actions += self._server_died(server)
        if peer.awaits:
            self._forget_awaits(peer)
        if self.monitor.active:
            actions += self._monitors_gone(rid)
        if self.activations.held_per_channel:
            self.activations.drop_channel(rid)
        for handle in sorted(peer.attached):
            self._detach(self.sessions[handle], peer)
        for handle in sorted(peer.owned):  # unshared sessions end with their thread
            session = self.sessions.get(handle)
            if session is not None and session.held:
                if self.monitor.active:
                    self._lost_with(process, session)
                actions += self._client_closed(session)
        if self.terminating:
            actions += self._finish_terminations()
        if not process.peers:
            for handle in sorted(process.sessions):  # shared sessions end with their process
                session = self.sessions.get(handle)
                if session is not None and session.held:
                    if self.monitor.active:
                        self._lost_with(process, session)
                    actions += self._release_holder(session, process, everything=True)
            del self.processes[process.identity.key]
            if process.lost:
                self._client_died(process)
            for other in self.server_of_peer.values():
                if process.client_key in other.informed:  # so it can forget the ClientInfo
                    other.informed.discard(process.client_key)
                    actions.append(Send(other.rid, PeerGone(process.client_key)))
            actions.append(Unwatch(process.identity.key))
        return self._hold(actions) if self.held_back else actions

    def process_died(self, key: ProcessKey) -> list[Action]:
        """Every peer of the process is gone: it exited or was killed."""
        process = self.processes.get(key)
        if process is None:
            return []
        actions: list[Action] = []
        for rid in sorted(process.peers):
            actions += self.peer_gone(rid)  # (each holds back what it sends held-back servers)
        return actions

    def peer_dropped(self, rid: bytes, waiting: int) -> list[Action]:
        """The loop stopped serving a peer that left `waiting` frames unread: forget it as if
        it had gone, and tell it (and, for a client thread, its process) why."""
        peer = self.peers.get(rid)
        if peer is None:
            return []
        notice = Dropped(rid, waiting)
        ended = [h for h in sorted(peer.owned) if self.sessions[h].held]  # end with the thread
        inbox = peer.process.inbox if peer.role is Role.CHANNEL else None
        actions: list[Action] = [Send(rid, notice)]  # read once the peer reads again
        actions += self.peer_gone(rid)
        if inbox is not None and inbox in self.peers:
            actions.append(Send(inbox, notice))
            actions += [
                Send(inbox, SessionLost(handle, errors.KErrDisconnected)) for handle in ended
            ]
        return actions

    def hold_back(self, rid: bytes) -> bool:
        """The loop finds server `rid` not reading: hold back what it would be sent from now on.
        False if `rid` is not a server (nothing is held back for other peers)."""
        server = self.server_of_peer.get(rid)
        if server is None:
            return False
        if server.held is None:
            server.held = collections.OrderedDict()
            self.held_back.add(rid)
        return True

    def release(self, rid: bytes, most: int) -> list[Action]:
        """Server `rid` reads again: send up to `most` of what was held back for it, in order;
        once nothing is left, it is sent to directly again."""
        server = self.server_of_peer.get(rid)
        if server is None or server.held is None:
            return []
        held = server.held
        actions: list[Action] = []
        while held and len(actions) < most:
            actions.append(Send(rid, held.popitem(last=False)[1]))
        if not held:
            server.held = None
            self.held_back.discard(rid)
            actions += self._finish_termination_if_drained(server)
        return actions

    def holding(self, rid: bytes) -> bool:
        """Whether messages for `rid` are held back."""
        return rid in self.held_back

    def _hold(self, actions: list[Action]) -> list[Action]:
        """Take the Sends to held-back servers out of `actions` and queue them there."""
        kept: list[Action] = []
        for action in actions:
            if type(action) is Send and action.rid in self.held_back:
                message = action.message
                if isinstance(message, (Deliver, NewSession, Disconnect, Admit)):
                    key = message.msg_id
                else:
                    key = -next(self._held_keys)
                self.server_of_peer[action.rid].held[key] = message  # type: ignore[index]
            else:
                kept.append(action)
        return kept

    def statistics(self) -> dict[str, int]:
        """Counts of everything the kernel holds (for `ipcfw ps` and tests)."""
        counts = {
            "peers": len(self.peers),
            "processes": len(self.processes),
            "servers": len(self.servers),
            "sessions": len(self.sessions),
            "messages": len(self.messages),
            "pool_slots": self.pool_slots,
            "pool_used": self.pool_used,
            "attached": sum(len(s.attached) for s in self.sessions.values()),
            "tokens": len(self.tokens),
            "cancellable": len(self.cancellable),
            "held": sum(len(self.server_of_peer[rid].held or ()) for rid in self.held_back),
            "sessions_direct": sum(s.direct for s in self.sessions.values()),
            "admitted": self.admitted,
            "listings": len(self.listings),
            "awaits": sum(len(waiting) for waiting in self.awaits.values()),
        }
        for state in SessionState:
            counts[f"sessions_{state.value.lower()}"] = 0
        for session in self.sessions.values():
            counts[f"sessions_{session.state.value.lower()}"] += 1
        return counts

    # -- servers -----------------------------------------------------------------------------

    def _register(self, peer: Peer, message: Register) -> list[Action]:
        self._require_role(peer, Role.SERVER, message)
        code = self._registration_error(peer, message)
        if code:
            return [Send(peer.rid, Completed(message.req_id, code, ()))]
        server = ServerRecord(
            message.name, peer.rid, peer.process, message.sharing, message.version, message.direct,
            since=self.now,
        )
        key = lookup_key(message.name)
        self.servers[key] = server
        self.server_of_peer[peer.rid] = server
        actions: list[Action] = [Send(peer.rid, Completed(message.req_id, errors.KErrNone, ()))]
        if self.monitor.active and self.monitor.wants(key):
            self._event(server, EventKind.REGISTER, peer.process.identity.pid)
            actions += self._update_reporting()
        if key in self.awaits:
            actions += self._answer_awaits(key)
        if key in self.activations.by_key:
            for rid, connect in self.activations.registered(key, self.now):
                waiting = self.peers.get(rid)  # (held connects of a gone channel are dropped)
                if waiting is not None:
                    actions += self._connect(waiting, connect)
        return actions

    # -- waiting for a server name (rule 13) ---------------------------------------------------

    def _await_server(self, peer: Peer, message: AwaitServer) -> list[Action]:
        self._require_role(peer, Role.CHANNEL, message)
        req_id = message.req_id
        if req_id in peer.awaits:
            raise PeerMisbehaved(
                "duplicate await", f"pid {peer.process.identity.pid} reused req_id {req_id}"
            )
        code = errors.KErrBadName if name_problem(message.name) else None
        key = lookup_key(message.name)
        server = self.servers.get(key)
        if code is None and server is not None and server.terminating is None:
            code = errors.KErrNone
        if code is None and len(peer.awaits) >= MAX_AWAITS:
            code = errors.KErrOverflow
        if code is not None:
            return [Send(peer.rid, Completed(req_id, code, ()))]
        peer.awaits[req_id] = key
        self.awaits.setdefault(key, {})[(peer.rid, req_id)] = None
        if key in self.activations.by_key:
            return self._start_if_waited(key)
        return []

    def _answer_awaits(self, key: str) -> list[Action]:
        """Server name `key` is registered: answer everyone waiting for it."""
        actions: list[Action] = []
        for rid, req_id in self.awaits.pop(key):
            del self.peers[rid].awaits[req_id]
            actions.append(Send(rid, Completed(req_id, errors.KErrNone, ())))
        return actions

    def _cancel_await(self, peer: Peer, req_id: int) -> list[Action]:
        key = peer.awaits.pop(req_id, None)
        if key is None:
            return []  # answered already: the Cancel crossed it
        self._drop_await(key, peer.rid, req_id)
        return [Send(peer.rid, Completed(req_id, errors.KErrCancel, ()))]

    def _forget_awaits(self, peer: Peer) -> None:
        for req_id, key in peer.awaits.items():
            self._drop_await(key, peer.rid, req_id)
        peer.awaits.clear()

    def _drop_await(self, key: str, rid: bytes, req_id: int) -> None:
        waiting = self.awaits[key]
        del waiting[(rid, req_id)]
        if not waiting:
            del self.awaits[key]

    def _registration_error(self, peer: Peer, message: Register) -> int:
        if peer.rid in self.server_of_peer:
            return errors.KErrInUse
        if name_problem(message.name):
            return errors.KErrBadName
        if is_protected(message.name) and not self._holds_protserv(peer):
            return errors.KErrPermissionDenied
        if lookup_key(message.name) in self.servers:
            return errors.KErrAlreadyExists
        if message.direct and peer.process.identity.host:
            return errors.KErrNotSupported  # (a socket on another host: no client could reach it)
        if message.direct and any(s.direct == message.direct for s in self.servers.values()):
            # Another registration's socket: its clients would be sent there, and its end
            # would remove the other's socket (RemoveSocket).
            return errors.KErrInUse
        return errors.KErrNone

    def _server_died(self, server: ServerRecord) -> list[Action]:
        server.held = None  # (its requests are answered below, as the sessions end)
        self.held_back.discard(server.rid)
        del self.server_of_peer[server.rid]
        key = lookup_key(server.name)
        released = self.servers.get(key) is server
        if released:
            del self.servers[key]
        self.terminating.discard(server)
        actions: list[Action] = [
            Send(rid, Completed(req_id, errors.KErrNone, ())) for rid, req_id in server.waiters
            if rid in self.peers
        ]
        server.waiters.clear()
        if server.report_asked:  # the monitors waiting for it to report wait no more
            server.report_asked = 0
            actions += self._monitors_started(server.rid)
        for handle in sorted(server.sessions):
            actions += self._transition(self.sessions[handle], _E.SERVER_DIED)
        if server.direct:
            actions.append(RemoveSocket(server.direct))
        if released and key in self.activations.by_key:
            self.activations.released(key, self.now)
            actions += self._start_if_waited(key)  # connects that came while it ended
        return actions + self._census_done(server.rid)

    # -- sessions ----------------------------------------------------------------------------

    def _connect(self, peer: Peer, message: Connect) -> list[Action]:
        self._require_role(peer, Role.CHANNEL, message)
        code = self._connect_error(message) or self._session_limit_error(peer.process)
        if code in _ACTIVATING and self.activations:
            key = lookup_key(message.name)
            if key in self.activations.by_key:
                return self._hold_connect(peer, key, message)
        if code:
            text = self._connect_error_text(message.name, code)
            return [Send(peer.rid, Connected(message.req_id, code, 0, b"", text=text))]
        server = self.servers[lookup_key(message.name)]
        session = SessionRecord(self._new_handle(), server, peer, message.slots,
                                since=self.now, thread=message.thread)
        if message.path == Path.DIRECT and server.direct and not peer.process.identity.host:
            # The ticket goes to the server first (NewSession), then to the client (Connected):
            # the server knows it before anyone can present it.
            session.ticket, session.direct = self.new_token(), True
        self.sessions[session.handle] = session
        server.sessions.add(session.handle)
        if self.activations and len(server.sessions) == 1:
            key = lookup_key(server.name)
            if key in self.activations.by_key:
                self.activations.busy(key)
        peer.owned.add(session.handle)
        session.holders[peer.process] = 1
        peer.process.sessions.add(session.handle)
        self._attach(session, peer)
        record = self._new_message(session, MessageKind.CONNECT, message.req_id, reply_to=peer.rid)
        if server.monitored:
            self._event(server, EventKind.CONNECT, peer.process.identity.pid, session,
                        msg=record.msg_id, detail="version " + ".".join(map(str, message.version)))
        actions = self._inform(server, peer.process)
        actions.append(
            Send(
                server.rid,
                NewSession(
                    record.msg_id,
                    session.handle,
                    message.version,
                    peer.process.client_key,
                    message.payload,
                    session.ticket,
                    message.slots,
                ),
            )
        )
        if message.first:
            # Connect with first data (seed 003): delivered right behind the connect, so it
            # is served in the same round trip; a failed connect drops it with the session.
            req_id, function, args = message.first
            actions += self._request(
                peer, Request(req_id, session.handle, function, args, Mode.SYNC)
            )
        return actions

    def _connect_error_text(self, name: str, code: int) -> str:
        """What the client's error says of a refused connect to `name` (`code`): for an unknown
        name, the name and the closest registered ones (a typo, or the wrong case of a word);
        for a bad name, what is wrong with it; for a server whose registration is ending, why."""
        if code == errors.KErrBadName:
            return name_problem(name) or ""
        server = self.servers.get(lookup_key(name))
        if code == errors.KErrServerTerminated and server is not None:
            terminating = server.terminating
            reason = "" if terminating is None else TerminationReason(terminating).name
            return f"server {server.name!r} is ending its registration ({reason})"
        if code != errors.KErrNotFound:
            return ""
        close = difflib.get_close_matches(lookup_key(name), list(self.servers), n=3, cutoff=0.6)
        if not close:
            return (f"{not_registered(name)} (start it, or wait for it to "
                    f"register: {len(self.servers)} registered, none with a similar name)")
        names = ", ".join(repr(self.servers[key].name) for key in close)
        what = "name" if len(close) == 1 else "names"
        return f"{not_registered(name)}; the closest registered {what}: {names}"

    def _connect_error(self, message: Connect) -> int:
        if name_problem(message.name):
            return errors.KErrBadName
        if not -1 <= message.slots <= MAX_SESSION_SLOTS:
            return errors.KErrArgument
        server = self.servers.get(lookup_key(message.name))
        if server is None:
            return errors.KErrNotFound
        if server.terminating is not None:
            return errors.KErrServerTerminated
        return errors.KErrNone

    def _session_limit_error(self, process: ProcessRecord) -> int:
        if len(process.sessions) >= self.sessions_per_process:
            return errors.KErrOverflow
        return errors.KErrNone

    def _new_handle(self) -> int:
        # Handles count up and wrap, skipping 0 and live ones, so a stale handle is not
        # reissued until 2**31 sessions later.
        while True:
            self._next_handle = self._next_handle % _HANDLE_LIMIT + 1
            if self._next_handle not in self.sessions:
                return self._next_handle

    def _close(self, peer: Peer, message: Close) -> list[Action]:
        self._require_role(peer, Role.CHANNEL, message)
        session = self.sessions.get(message.handle)
        if session is None or not self._holds(peer, session):
            raise PeerMisbehaved(
                "close of a handle not held",
                f"handle 0x{message.handle:x} is not held by pid {peer.process.identity.pid}",
            )
        if session.sharing == _UNSHARED:
            return self._client_closed(session)
        return self._release_holder(session, peer.process, everything=False)

    def _release_holder(
        self, session: SessionRecord, process: ProcessRecord, everything: bool
    ) -> list[Action]:
        """`process` closes one of its handles to a shared session (or all: it died)."""
        remaining = 0 if everything else session.holders[process] - 1
        if remaining:
            session.holders[process] = remaining
            return []
        del session.holders[process]
        process.sessions.discard(session.handle)
        actions = self._answer_outstanding(session, errors.KErrSessionClosed, process)
        for rid in list(session.attached):
            peer = self.peers.get(rid)
            if peer is not None and peer.process is process:
                self._detach(session, peer)
        if session.holders:
            return actions
        return actions + self._client_closed(session)

    def _client_closed(self, session: SessionRecord) -> list[Action]:
        """The last holder let go: no answer will be delivered any more."""
        session.creator.owned.discard(session.handle)
        for process in session.holders:
            process.sessions.discard(session.handle)
        session.holders.clear()
        # Whatever is still outstanding will never be answered by the server: answer it now
        # (a request may have crossed the Close on another thread's socket; a client that
        # completed it locally drops the duplicate).
        actions = self._answer_outstanding(session, errors.KErrSessionClosed)
        for rid in list(session.attached):
            self._detach(session, self.peers[rid])  # attached peers are live: peer_gone detaches
        return actions + self._transition(session, _E.CLIENT_CLOSED)

    def _answer_outstanding(
        self, session: SessionRecord, code: int, process: ProcessRecord | None = None
    ) -> list[Action]:
        """Answer `code` to every request of the session still awaited (by `process`'s channels)."""
        actions: list[Action] = []
        for msg_id in sorted(session.messages):
            record = self.messages[msg_id]
            if record.reply_to is None or record.kind is not MessageKind.REQUEST:
                continue
            peer = self.peers.get(record.reply_to)
            if process is None or (peer is not None and peer.process is process):
                actions += self._answer(record, Completed(record.req_id, code, ()))
        return actions

    def _holds(self, peer: Peer, session: SessionRecord) -> bool:
        if not session.held:
            return False
        if session.sharing == _UNSHARED:
            return session.creator is peer
        return peer.process in session.holders

    def _attach(self, session: SessionRecord, peer: Peer) -> int:
        """Attach the channel to the session if it is not yet; KErrOverflow past 255."""
        if peer.rid in session.attached:
            return errors.KErrNone
        if len(session.attached) >= MAX_ATTACHED:
            return errors.KErrOverflow
        session.attached.add(peer.rid)
        peer.attached.add(session.handle)
        return errors.KErrNone

    def _detach(self, session: SessionRecord, peer: Peer) -> None:
        """The channel (thread) is gone or its process let go: answers to it are dropped."""
        session.attached.discard(peer.rid)
        peer.attached.discard(session.handle)
        for msg_id in session.messages:
            record = self.messages[msg_id]
            if record.reply_to == peer.rid:
                record.reply_to = None

    def _share(self, peer: Peer, message: Share) -> list[Action]:
        self._require_role(peer, Role.CHANNEL, message)
        session = self.sessions.get(message.handle)
        if session is None or not self._holds(peer, session):
            return [Send(peer.rid, Panicked(message.req_id, message.handle, "KERN-EXEC", 0, 0))]
        code = self._share_error(session, message.mode)
        if code:
            return [Send(peer.rid, Shared(message.req_id, code, b""))]
        if message.mode > session.sharing:
            session.sharing = message.mode
            session.creator.owned.discard(session.handle)  # now the process's, not the thread's
        if message.mode == _PROTECTED and session.token is None:
            session.token = self.new_token()
            self.tokens[session.token] = session.handle
        token = session.token if message.mode == _PROTECTED and session.token else b""
        return [Send(peer.rid, Shared(message.req_id, errors.KErrNone, token))]

    @staticmethod
    def _share_error(session: SessionRecord, mode: int) -> int:
        if session.panic is not None or not session.deliverable:
            return errors.KErrServerTerminated
        if session.state is _S.CONNECTING:
            return errors.KErrNotReady  # only a connected session can be shared
        if mode > session.server.sharing:
            return errors.KErrPermissionDenied
        return errors.KErrNone

    def _open(self, peer: Peer, message: Open) -> list[Action]:
        self._require_role(peer, Role.CHANNEL, message)
        handle = self.tokens.get(message.token)
        session = self.sessions.get(handle) if handle is not None else None
        if session is None or not session.held:
            # An unknown token and one whose session has ended look the same.
            return [Send(peer.rid, Connected(message.req_id, errors.KErrPermissionDenied, 0, b""))]
        if session.panic is not None or not session.deliverable:
            return [Send(peer.rid, Connected(message.req_id, errors.KErrServerTerminated, 0, b""))]
        code = errors.KErrNone
        if peer.process not in session.holders:
            code = self._session_limit_error(peer.process)
        code = code or self._attach(session, peer)
        if code:
            return [Send(peer.rid, Connected(message.req_id, code, 0, b""))]
        session.holders[peer.process] = session.holders.get(peer.process, 0) + 1
        peer.process.sessions.add(session.handle)
        # A direct session: the path names the server's socket, and each thread asks for its
        # own ticket with Join (no ticket here: the server must hold one before the client).
        # (a process on another host uses it through the kernel: the socket is not on its host)
        remote = peer.process.identity.host
        direct = session.server.direct if session.direct and not remote else ""
        return [Send(peer.rid, Connected(
            message.req_id, errors.KErrNone, session.handle, b"", direct
        ))]

    def _transition(self, session: SessionRecord, event: SessionEvent) -> list[Action]:
        """Move `session` along `_SESSION_TRANSITIONS`, performing the event's side effects."""
        table = _SESSION_TRANSITIONS[session.state]
        if event not in table:
            raise KernelInvariantError(
                f"can't handle {event.value} for session 0x{session.handle:x} "
                f"in state {session.state.value}"
            )
        new_state = table[event]
        actions: list[Action] = []
        if event is _E.SERVER_DIED:
            actions += self._fail_outstanding(session, errors.KErrServerTerminated)
            if new_state is _S.DEAD:
                actions += self._notify_lost(session, errors.KErrServerTerminated)
        if new_state in (_S.CLOSING, _S.PANICKED) and session.state is not _S.PANICKED:
            # PANICKED -> CLOSING: the Disconnect is already on its way; once only.
            actions += self._deliver_disconnect(session)
        if new_state is _REMOVED or new_state is _S.DEAD:
            self._release_server_side(session)
        if new_state is _REMOVED:
            self._remove(session)
        else:
            session.state = new_state
            session.held = new_state in _HELD
            session.deliverable = new_state in _DELIVERABLE
        return actions

    def _deliver_disconnect(self, session: SessionRecord) -> list[Action]:
        record = self._new_message(session, MessageKind.DISCONNECT, 0)
        if session.server.monitored:
            self._event(session.server, EventKind.DISCONNECT,
                        session.creator.process.identity.pid, session, msg=record.msg_id)
        return [Send(session.server.rid, Disconnect(record.msg_id, session.handle))]

    def _fail_outstanding(self, session: SessionRecord, code: int) -> list[Action]:
        actions: list[Action] = []
        for msg_id in sorted(session.messages):
            record = self.messages[msg_id]
            actions += self._answer(record, self._reply(record, code))
        return actions

    def _notify_lost(self, session: SessionRecord, code: int) -> list[Action]:
        return [
            Send(process.inbox, SessionLost(session.handle, code))
            for process in session.holders
            if process.inbox is not None
        ]

    def _release_server_side(self, session: SessionRecord) -> None:
        for msg_id in list(session.messages):
            self._free_message(self.messages[msg_id])
        server = session.server
        server.sessions.discard(session.handle)
        if self.activations and not server.sessions:
            key = lookup_key(server.name)
            if key in self.activations.by_key and self.servers.get(key) is server:
                self.activations.idle(key, self.now)

    def _remove(self, session: SessionRecord) -> None:
        self._release_server_side(session)
        session.creator.owned.discard(session.handle)
        for process in session.holders:
            process.sessions.discard(session.handle)
        for rid in list(session.attached):
            self._detach(session, self.peers[rid])
        if session.token is not None:
            del self.tokens[session.token]
        del self.sessions[session.handle]

    # -- messages ----------------------------------------------------------------------------

    def _request(self, peer: Peer, message: Request) -> list[Action]:
        self._require_role(peer, _CHANNEL, message)
        req_id, mode = message.req_id, message.mode
        reply_to = peer.rid  # every answer returns on the channel the request came from
        session = self.sessions.get(message.handle)
        if session is None or not self._holds(peer, session):
            return [Send(reply_to, Panicked(req_id, message.handle, "KERN-EXEC", 0, 0))]
        if session.panic is not None:
            return [Send(reply_to, Panicked(req_id, session.handle, *session.panic, 1))]
        writable = _writable_lengths(message.args)
        # (Refused for another reason, a request does not take one of the 255 places.)
        process = peer.process
        code = self._request_error(session, mode, writable, process) or self._attach(session, peer)
        if code:
            return [Send(reply_to, Completed(req_id, code, ()))]
        blind = mode == _BLIND
        record = self._new_message(
            session, _REQUEST, req_id, None if blind else reply_to, self._take_slot(session, mode),
            writable,
        )
        record.payer = process
        process.outstanding += 1
        if mode == _ASYNC:
            self.cancellable[(reply_to, req_id)] = record.msg_id
        server = session.server
        actions = self._inform(server, process)
        actions.append(Send(server.rid, Deliver(
            record.msg_id, session.handle, message.function, message.args, process.client_key
        )))
        if server.monitored:
            self._event(server, EventKind.REQUEST, process.identity.pid, session,
                        msg=record.msg_id, function=message.function,
                        detail=summarize(message.args))
        if blind:
            actions.append(Send(reply_to, Completed(req_id, errors.KErrNone, ())))
        return actions

    def _request_error(
        self, session: SessionRecord, mode: int, writable: dict[int, int], process: ProcessRecord
    ) -> int:
        if session.server.terminating is not None:
            return errors.KErrServerTerminated  # nothing new is delivered once it is ending
        if writable and sum(writable.values()) > self.max_frame - _COMPLETION_OVERHEAD:
            # The server could fill them all: its completion would exceed the frame limit,
            # which zmq enforces by dropping the server's connection.
            return errors.KErrArgument
        if not session.deliverable:
            return errors.KErrServerTerminated  # held, not panicked, not deliverable: DEAD
        if len(session.messages) >= MAX_OUTSTANDING:
            return errors.KErrOverflow
        if mode == _SYNC:
            if process.outstanding >= self.outstanding_per_process:
                return errors.KErrOverflow
        elif not self._slot_free(session) or process.outstanding >= self.outstanding_per_process:
            return errors.KErrServerBusy
        return errors.KErrNone

    def _slot_free(self, session: SessionRecord) -> bool:
        if session.slots > 0:
            return session.slots_used < session.slots
        if session.slots < 0:
            return self.pool_used < self.pool_slots
        return False

    def _take_slot(self, session: SessionRecord, mode: int) -> SlotSource:
        if mode == _SYNC:
            return _NO_SLOT
        if session.slots > 0:
            session.slots_used += 1
            return _SESSION_SLOT
        self.pool_used += 1
        return _POOL_SLOT

    def _new_message(
        self,
        session: SessionRecord,
        kind: MessageKind,
        req_id: int,
        reply_to: bytes | None = None,
        slot: SlotSource = _NO_SLOT,
        writable: dict[int, int] | None = None,
    ) -> MessageRecord:
        record = MessageRecord(
            next(self._msg_ids), kind, session, reply_to, reply_to, req_id, slot,
            writable or _NO_WRITABLE, None, b"", self.now,  # (positional: the hot path)
        )
        self.messages[record.msg_id] = record
        session.messages.add(record.msg_id)
        session.server.messages[record.msg_id] = record
        return record

    def _free_message(self, record: MessageRecord) -> None:
        msg_id, slot = record.msg_id, record.slot
        del self.messages[msg_id]
        session = record.session
        session.messages.discard(msg_id)
        server = session.server
        server.messages.pop(msg_id, None)
        if server.held:
            server.held.pop(msg_id, None)  # never delivered: the server will not hear of it
        payer = record.payer
        if payer is not None:
            payer.outstanding -= 1
        if slot is _NO_SLOT:
            return
        self.cancellable.pop((record.origin, record.req_id), None)
        if slot is _SESSION_SLOT:
            session.slots_used -= 1
        else:
            self.pool_used -= 1

    def _inform(self, server: ServerRecord, process: ProcessRecord) -> list[Action]:
        """A PeerInfo for `process`, if `server` has not had one yet."""
        if process.client_key in server.informed:
            return []
        server.informed.add(process.client_key)
        who = process.identity
        granted = " ".join(sorted(self.capabilities_of(who)))
        return [
            Send(
                server.rid,
                PeerInfo(process.client_key, who.pid, who.uid, who.gid, who.exe, granted),
            )
        ]

    def _holds_protserv(self, peer: Peer) -> bool:
        """Whether `peer`'s process may register (or terminate) a protected ``!name``."""
        return "ProtServ" in self.capabilities_of(peer.process.identity)

    def capabilities_of(self, identity: ProcessIdentity) -> frozenset[str]:
        """The capabilities the kernel grants a process: what `grants` says (the configuration:
        ipcfw.kernel.config), or else those a user grants an application
        (`USER_CAPABILITIES`); and ``ProtServ`` to the uids in `protserv_uids`."""
        granted = (self.grants(identity.uid, identity.gid, identity.exe, identity.host)
                   if self.grants is not None else USER_CAPABILITIES)
        if identity.uid in self.protserv_uids:
            return granted | {"ProtServ"}
        return granted

    def _own_message(self, peer: Peer, msg_id: int, message: Message) -> MessageRecord | None:
        server = self.server_of_peer.get(peer.rid)
        if server is None:
            raise PeerMisbehaved(
                "not a server", f"{type(message).__name__} from a peer that registered no server"
            )
        # A message the server no longer has outstanding was released when its client
        # closed or died: a late completion, dropped silently.
        return server.messages.get(msg_id)

    def _complete(self, peer: Peer, message: Complete) -> list[Action]:
        record = self._own_message(peer, message.msg_id, message)
        if record is None:
            return []
        value, writes, text = message.value, message.writes, message.text
        for index, data in writes:
            limit = record.writable.get(index)
            if limit is None or len(data) > limit:
                # The server library never sends this; a hostile server must not corrupt
                # the client's buffer, so the request fails instead.
                value, writes, text = errors.KErrBadDescriptor, (), ""
                break
        session = record.session
        self._free_message(record)
        kind = record.kind
        if session.server.monitored and kind is not MessageKind.ADMIT:
            self._completion_event(record, value, text)
        if kind is _REQUEST:
            if not session.deliverable:
                return []
            # (an error's text, what the server said happened, goes to the client as it is)
            return self._answer(record, Completed(record.req_id, value, writes, text))
        if kind is _CONNECT:
            return self._connect_done(record, value, text=text)
        if kind is MessageKind.ADMIT:
            return self._admitted(record, value)
        return self._transition(session, _E.DISCONNECT_DONE)

    def _negotiated(self, peer: Peer, message: Negotiated) -> list[Action]:
        record = self._own_message(peer, message.msg_id, message)
        if record is None:
            return []
        if record.kind is not MessageKind.CONNECT:
            raise PeerMisbehaved(
                "negotiated a request", f"message {message.msg_id} is not a connect"
            )
        self._free_message(record)
        if record.session.server.monitored:
            self._completion_event(record, message.value, "")
        return self._connect_done(record, message.value, message.payload)

    def _connect_done(
        self, record: MessageRecord, value: int, payload: bytes = b"", text: str = ""
    ) -> list[Action]:
        session = record.session
        if value < 0:
            actions = self._transition(session, _E.CONNECT_FAILED)
            return actions + self._answer(
                record, Connected(record.req_id, value, 0, b"", text=text)
            )
        actions = self._transition(session, _E.CONNECT_OK)
        direct = session.server.direct if session.direct else ""
        ticket, session.ticket = session.ticket, b""  # (one client learns it, once)
        return actions + self._answer(
            record,
            Connected(record.req_id, errors.KErrNone, session.handle, payload, direct, ticket),
        )

    def _session_panicked(self, peer: Peer, message: SessionPanicked) -> list[Action]:
        """The server panicked a client on the direct path: the session dies as for a Panic
        through the kernel (every holder learns it on its next request here)."""
        self._require_role(peer, Role.SERVER, message)
        session = self.sessions.get(message.handle)
        if session is None or session.server is not self.server_of_peer.get(peer.rid):
            raise PeerMisbehaved(
                "panic of another's session", f"session 0x{message.handle:x} is not this server's"
            )
        if session.state is not _S.OPEN:
            return []  # closing or dead already: the Disconnect is on its way
        panic = Panic(0, message.category, message.reason)
        actions: list[Action] = []
        for msg_id in sorted(session.messages):
            other = self.messages[msg_id]
            actions += self._answer(other, self._panicked(other, panic))
        session.panic = (message.category, message.reason)
        return actions + self._transition(session, _E.PANIC)

    def _panic(self, peer: Peer, message: Panic) -> list[Action]:
        record = self._own_message(peer, message.msg_id, message)
        if record is None:
            return []
        session = record.session
        self._free_message(record)
        if session.server.monitored and record.kind is not MessageKind.ADMIT:
            self._completion_event(record, errors.KErrDied,
                                   f"panicked the client: {message.category} {message.reason}")
        if record.kind is MessageKind.DISCONNECT:
            return self._transition(session, _E.DISCONNECT_DONE)
        if record.kind is MessageKind.CONNECT:
            # No server-side session exists yet: the connect fails with the panic.
            actions = self._transition(session, _E.PANIC)
            return actions + self._answer(record, self._panicked(record, message))
        if session.state is not _S.OPEN:
            # (A request panicked before its connect completed, by a non-standard server, or
            # one of a session already ending): its sender is still answered, once.
            return self._answer(record, self._panicked(record, message))
        actions = self._answer(record, self._panicked(record, message))
        for msg_id in sorted(session.messages):
            other = self.messages[msg_id]
            actions += self._answer(other, self._panicked(other, message))
        session.panic = (message.category, message.reason)
        return actions + self._transition(session, _E.PANIC)

    @staticmethod
    def _answer(record: MessageRecord, reply: Message) -> list[Action]:
        """Send `reply` to whoever waits for `record`, once; [] if nobody does any more."""
        rid = record.reply_to
        record.reply_to = None
        return [] if rid is None else [Send(rid, reply)]

    @staticmethod
    def _panicked(record: MessageRecord, message: Panic) -> Panicked:
        return Panicked(record.req_id, record.session.handle, message.category, message.reason, 1)

    def _reply(self, record: MessageRecord, code: int) -> Message:
        if record.kind is MessageKind.CONNECT or record.kind is MessageKind.ADMIT:
            return Connected(record.req_id, code, 0, b"")
        return Completed(record.req_id, code, ())

    # -- every thread on the direct path ------------------------------------------------------

    def _join(self, peer: Peer, message: Join) -> list[Action]:
        """A thread uses a session: attach its channel (as a request would, counted against
        the 255), and for a direct session ask the server to take a ticket for it (Admit);
        the thread gets the ticket once the server holds it (`_admitted`)."""
        self._require_role(peer, _CHANNEL, message)
        req_id, handle = message.req_id, message.handle
        session = self.sessions.get(handle)
        if session is None or not self._holds(peer, session):
            return [Send(peer.rid, Panicked(req_id, handle, "KERN-EXEC", 0, 0))]
        if session.panic is not None:
            return [Send(peer.rid, Panicked(req_id, handle, *session.panic, 1))]
        code = errors.KErrNone
        if session.server.terminating is not None or not session.deliverable:
            code = errors.KErrServerTerminated
        code = code or self._attach(session, peer)
        if code:
            return [Send(peer.rid, Connected(req_id, code, 0, b""))]
        process = peer.process
        if (not session.direct or session.state is not _S.OPEN
                or process.identity.host  # (rule 16: on another host, the kernel path)
                or len(session.messages) >= MAX_OUTSTANDING
                or process.outstanding >= self.outstanding_per_process):
            # (the limits bound what Joins can make the kernel and the server hold)
            return [Send(peer.rid, Connected(req_id, errors.KErrNone, handle, b""))]
        record = self._new_message(session, MessageKind.ADMIT, req_id, reply_to=peer.rid)
        record.ticket = self.new_token()
        record.payer = process
        process.outstanding += 1
        server = session.server
        actions = self._inform(server, peer.process)
        actions.append(Send(server.rid, Admit(
            record.msg_id, handle, peer.process.client_key, record.ticket
        )))
        return actions

    def _admitted(self, record: MessageRecord, value: int) -> list[Action]:
        session = record.session
        if value < 0 or not session.deliverable:
            # The thread uses the kernel path (which answers a closed or dead session).
            reply = Connected(record.req_id, errors.KErrNone, session.handle, b"")
        else:
            reply = Connected(record.req_id, errors.KErrNone, session.handle, b"",
                              session.server.direct, record.ticket)
            self.admitted += record.reply_to is not None  # (the thread may have gone meanwhile)
        return self._answer(record, reply)

    # -- the session, server and process lists (ipcfw ps; rule 12: ipcfw.kernel.listing) -----

    def _list(self, peer: Peer, message: ListRequest) -> list[Action]:
        frames = self.lists.ask(peer.rid, message, self.now, self.listings)
        return [Send(rid, reply) for rid, reply in frames]

    def _census_reply(self, peer: Peer, message: CensusReply) -> list[Action]:
        server = self.server_of_peer.get(peer.rid)
        if server is None:
            raise PeerMisbehaved(
                "not a server", "CensusReply from a peer that registered no server"
            )
        try:
            frames = self.lists.census(server, message.counts, self.now, self.listings)
        except ProtocolError as exc:
            raise PeerMisbehaved("bad census", str(exc)) from None
        return [Send(rid, reply) for rid, reply in frames]

    def _census_done(self, server_rid: bytes) -> list[Action]:
        """Server `server_rid` is gone: answer the lists it completes."""
        frames = self.lists.done(server_rid, self.now, self.listings)
        return [Send(rid, reply) for rid, reply in frames]

    def _cancel(self, peer: Peer, message: Cancel) -> list[Action]:
        """Complete the request with KErrCancel now, free its slot, and tell the server.

        A request already completed (or never async) is not found: nothing to do. The
        server's later Complete finds no message and is dropped. A Cancel of the channel's
        `AwaitServer` ends that wait instead (rule 13).
        """
        self._require_role(peer, Role.CHANNEL, message)
        msg_id = self.cancellable.get((peer.rid, message.req_id))
        if msg_id is None:
            if self.monitor.active and self.monitor.get(peer.rid, message.req_id):
                return self._stop_monitor(peer, message.req_id)
            return self._cancel_await(peer, message.req_id) if peer.awaits else []
        record = self.messages[msg_id]
        session = record.session
        held = session.server.held
        delivered = held is None or msg_id not in held
        self._free_message(record)
        if session.server.monitored:
            self._completion_event(record, errors.KErrCancel, "cancelled by the client")
        actions = self._answer(record, Completed(record.req_id, errors.KErrCancel, ()))
        if delivered:
            actions.append(Send(session.server.rid, Cancelled(msg_id, session.handle)))
        return actions

    # -- activation on demand (rule 15) --------------------------------------------------------

    def _hold_connect(self, peer: Peer, key: str, message: Connect) -> list[Action]:
        if not self.activations.can_hold(peer.rid):
            text = (f"this thread already has {MAX_HELD} connects waiting for servers to start "
                    "(the most the kernel holds for one)")
            return [Send(peer.rid, Connected(message.req_id, errors.KErrOverflow, 0, b"",
                                             text=text))]
        self.activations.hold(key, peer.rid, message)
        return self._start_if_waited(key)

    def _start_if_waited(self, key: str) -> list[Action]:
        """Start the server of `key` if someone waits for it and the name is free."""
        if key in self.servers or not (self.activations.by_key[key].held or key in self.awaits):
            return []
        refusal = self.activations.refusal(key, self.now)  # (it failed lately: rule 6)
        if refusal is not None:
            return self._fail_activation(key, refusal)
        return list(self.activations.want(key, self.now))

    def service_exited(self, name: str, status: str, tail: str) -> list[Action]:
        """The process the kernel started for service `name` (`Spawn`) exited: `status` says
        how ("exited with status 1", "was killed by SIGKILL"), `tail` is the end of its
        output. A start that failed answers what waited for it; else, if connects came while
        it stopped, a new one starts."""
        key = lookup_key(name)
        failure = self.activations.exited(key, status, tail, self.now)
        actions = self._fail_activation(key, failure) if failure is not None else []
        actions += self._start_if_waited(key)
        return self._hold(actions) if self.held_back else actions

    def _fail_activation(self, key: str, failure: Failure) -> list[Action]:
        code, text = failure.code, failure.text
        actions: list[Action] = [
            Send(rid, Connected(connect.req_id, code, 0, b"", text=text))
            for rid, connect in failure.held if rid in self.peers
        ]
        for rid, req_id in self.awaits.pop(key, {}):
            del self.peers[rid].awaits[req_id]
            actions.append(Send(rid, Completed(req_id, code, (), text)))
        return actions

    def activation_tick(self) -> list[Action]:
        """The time is `self.now`: kill servers that took too long to start or to stop, and
        tell idle ones to end (their registration is terminated, reason IDLE)."""
        kills, idle = self.activations.due(self.now)
        actions: list[Action] = list(kills)
        for key in idle:
            server = self.servers.get(key)
            if server is not None and server.terminating is None:
                actions += self._begin_termination(server, TerminationReason.IDLE, None)
        return self._hold(actions) if self.held_back else actions

    def next_activation_deadline(self) -> float | None:
        """When `activation_tick` next has something to do (on the `now` clock), or None."""
        return self.activations.next_deadline() if self.activations.timed else None

    def activatable(self) -> list[tuple[str, str]]:
        """(name, state) of each server the kernel can start, by name: state "activatable"
        (not running), "starting", "running" (also when a server it did not start has the
        name) or "stopping"."""
        return [
            (name, "running" if state == "activatable" and lookup_key(name) in self.servers
             else state)
            for name, state in self.activations.listing()
        ]

    def _list_activatable(self, peer: Peer, message: ListActivatable) -> list[Action]:
        rows = pack_activatable(self.activatable())
        return [Send(peer.rid, ActivatableList(message.req_id, rows))]

    # -- termination (seed 002) ---------------------------------------------------------------

    def _terminate(self, peer: Peer, message: Terminate) -> list[Action]:
        self._require_role(peer, Role.CHANNEL, message)
        server = self.servers.get(lookup_key(message.name))
        if server is None:
            return [Send(peer.rid, Completed(message.req_id, errors.KErrNotFound, ()))]
        if is_protected(server.name) and not self._holds_protserv(peer):
            return [Send(peer.rid, Completed(message.req_id, errors.KErrPermissionDenied, ()))]
        if message.reason == TerminationReason.DEREGISTERED:
            # Only the server itself deregisters (and so needs no indication).
            return [Send(peer.rid, Completed(message.req_id, errors.KErrArgument, ()))]
        return self._begin_termination(server, message.reason, (peer.rid, message.req_id))

    def _deregister(self, peer: Peer, message: Deregister) -> list[Action]:
        server = self.server_of_peer.get(peer.rid)
        if server is None:
            self._require_role(peer, Role.SERVER, message)
            # Its registration has ended already (a termination with nothing outstanding).
            return [Send(peer.rid, Completed(message.req_id, errors.KErrNone, ()))]
        server.deregistered = True
        return self._begin_termination(
            server, TerminationReason.DEREGISTERED, (peer.rid, message.req_id)
        )

    def _begin_termination(
        self, server: ServerRecord, reason: int, waiter: tuple[bytes, int] | None
    ) -> list[Action]:
        if waiter is not None:
            server.waiters.append(waiter)
        actions: list[Action] = []
        if server.terminating is None:
            server.terminating = reason
            self.terminating.add(server)
            if reason != TerminationReason.DEREGISTERED:
                actions.append(Send(server.rid, Terminating(reason)))  # the indication, once
        return actions + self._finish_termination_if_drained(server)

    def _finish_termination_if_drained(self, server: ServerRecord) -> list[Action]:
        """End the registration once no message of the server is outstanding, and nothing is
        held back for it (its Terminating notice may be), and, for a server taking direct
        connections, once it has deregistered too (rule 7)."""
        if server.terminating is None or server.messages or server.held:
            return []
        if server.direct and not server.deregistered:
            return []
        return self._server_died(server)  # answers the waiters, releases the name

    def _finish_terminations(self) -> list[Action]:
        actions: list[Action] = []
        for server in list(self.terminating):
            actions += self._finish_termination_if_drained(server)
        return actions

    # -- the monitor (rule 14) -------------------------------------------------------------------

    def _monitor(self, peer: Peer, message: Monitor) -> list[Action]:
        """Start a monitor, or give one more credit (the same req_id again)."""
        self._require_role(peer, _CHANNEL, message)
        req_id = message.req_id
        watcher = self.monitor.get(peer.rid, req_id)
        if watcher is not None:
            self.monitor.grant(watcher, message.credit)
            return []
        problem = name_problem(message.name) if message.name else ""
        if problem:
            return [Send(peer.rid, Completed(req_id, errors.KErrBadName, (), problem))]
        if not self._may_monitor(peer):
            return [Send(peer.rid, Completed(req_id, errors.KErrPermissionDenied, (), (
                "a monitor sees other processes' requests and their arguments: it takes the "
                "kernel's own uid, or the ReadDeviceData capability (docs/security.md)")))]
        if self.cancellable.get((peer.rid, req_id)) is not None or req_id in peer.awaits:
            raise PeerMisbehaved("duplicate monitor",
                                 f"pid {peer.process.identity.pid} reused req_id {req_id}")
        key = lookup_key(message.name) if message.name else ""
        mine = sum(1 for w in self.monitor.watchers.values() if w.rid in peer.process.peers)
        if mine >= MONITORS_PER_PROCESS:
            text = (f"this process has {MONITORS_PER_PROCESS} monitors already, the most one "
                    f"process may have (of the kernel's {self.monitor.most})")
            return [Send(peer.rid, Completed(req_id, errors.KErrOverflow, (), text))]
        watcher = self.monitor.add(peer.rid, req_id, key, message.credit)
        if watcher is None:
            text = f"the kernel has {self.monitor.most} monitors already"
            return [Send(peer.rid, Completed(req_id, errors.KErrOverflow, (), text))]
        actions = self._update_reporting()
        watcher.waiting = {server.rid for k, server in self.servers.items()
                           if server.report_asked and key in ("", k)}
        if watcher.started:
            actions.append(Send(peer.rid, Completed(req_id, errors.KErrNone, ())))
        return actions

    def _may_monitor(self, peer: Peer) -> bool:
        """Whether `peer`'s process may watch traffic: a process of the kernel's own uid, or
        one granted ReadDeviceData (a kernel admitting other users must not show them each
        other's requests)."""
        identity = peer.process.identity
        if self.admission is None or identity.uid == self.admission.kernel_uid:
            return True
        return "ReadDeviceData" in self.capabilities_of(identity)

    def _traffic(self, peer: Peer, message: Traffic) -> list[Action]:
        """A server's direct-path events (or its answer to a Report)."""
        server = self.server_of_peer.get(peer.rid)
        if server is None:
            raise PeerMisbehaved("not a server", "Traffic from a peer that registered no server")
        try:
            events = unpack_events(message.events)
        except ProtocolError as exc:
            raise PeerMisbehaved("bad traffic", str(exc)) from None
        actions: list[Action] = []
        if message.req_id and message.req_id == server.report_asked:
            server.report_asked = 0
            actions += self._monitors_started(server.rid)
        if not server.monitored:
            return actions  # (sent before it heard its Report(0))
        key = lookup_key(server.name)
        if message.lost:
            self.monitor.lose(key, message.lost)
        for event in events:
            self.monitor.record(key, event._replace(server=server.name, path=1))
        return actions

    def monitor_batches(self) -> list[Action]:
        """Each monitor's next batch of events, within its credit (the loop asks once a turn)."""
        return [Send(rid, batch) for rid, batch in self.monitor.batches() if rid in self.peers]

    def _stop_monitor(self, peer: Peer, req_id: int) -> list[Action]:
        watcher = self.monitor.get(peer.rid, req_id)
        assert watcher is not None  # (the caller found it)
        self.monitor.remove(watcher)
        return ([Send(peer.rid, Completed(req_id, errors.KErrCancel, ()))]
                + self._update_reporting())

    def _monitors_gone(self, rid: bytes) -> list[Action]:
        """Channel `rid` is gone: so are its monitors."""
        watchers = self.monitor.of_channel(rid)
        for watcher in watchers:
            self.monitor.remove(watcher)
        return self._update_reporting() if watchers else []

    def _monitors_started(self, server_rid: bytes) -> list[Action]:
        return [Send(w.rid, Completed(w.req_id, errors.KErrNone, ()))
                for w in self.monitor.server_reports(server_rid) if w.rid in self.peers]

    def _update_reporting(self) -> list[Action]:
        """Mark the servers some monitor watches; tell those on the direct path that begin or
        stop being watched to report their traffic, or to stop."""
        actions: list[Action] = []
        for key, server in self.servers.items():
            wanted = self.monitor.wants(key)
            server.monitored = wanted
            if server.direct and wanted != server.reporting:
                server.reporting = wanted
                req_id = next(self._report_ids) if wanted else 0
                server.report_asked = req_id
                if not wanted:
                    actions += self._monitors_started(server.rid)  # (none wait for it now)
                actions.append(Send(server.rid, Report(req_id, int(wanted))))
        return actions

    def _event(self, server: ServerRecord, kind: EventKind, pid: int,
               session: SessionRecord | None = None, *, msg: int = 0, function: int = -1,
               value: int = 0, micros: int = -1, detail: str = "") -> None:
        handle, path = (0, 0) if session is None else (session.handle, int(session.direct))
        self.monitor.record(lookup_key(server.name), Event(
            self.now, int(kind), server.name, pid, handle, path, msg, function, value, micros,
            detail,
        ))

    def _completion_event(self, record: MessageRecord, value: int, text: str) -> None:
        """The event of `record`'s end: a request's completion, a connect's answer."""
        session = record.session
        kind = EventKind.CONNECTED if record.kind is _CONNECT else EventKind.COMPLETE
        if record.kind is MessageKind.DISCONNECT:
            return  # (its DISCONNECT event was made when it was sent)
        payer = record.payer or session.creator.process
        micros = max(0, round((self.now - record.since) * 1e6))
        if kind is EventKind.CONNECTED and value >= 0:
            value = session.handle
        self._event(session.server, kind, payer.identity.pid, session, msg=record.msg_id,
                    value=value, micros=micros, detail=cut(text))

    def _lost_with(self, process: ProcessRecord, session: SessionRecord) -> None:
        """`session` ends because `process`'s thread or the process itself went."""
        if session.server.monitored:
            name = session.server.name
            process.lost[name] = process.lost.get(name, 0) + 1

    def _client_died(self, process: ProcessRecord) -> None:
        """Process `process` has no socket left, and sessions ended with its threads or with
        it: a DIED event for each watched server they were of."""
        for name, count in sorted(process.lost.items()):
            server = self.servers.get(lookup_key(name))
            if server is not None and server.monitored:
                what = "session" if count == 1 else "sessions"
                self._event(server, EventKind.DIED, process.identity.pid,
                            detail=f"client: {count} {what} ended with it")

    def _stats(self, peer: Peer, message: Stats) -> list[Action]:
        return [Send(peer.rid, StatsReply(message.req_id, self.statistics()))]

    # -- checks ------------------------------------------------------------------------------

    @staticmethod
    def _require_role(peer: Peer, role: Role, message: Message) -> None:
        if peer.role is not role:
            raise PeerMisbehaved(
                "wrong role",
                f"{type(message).__name__} from a {peer.role.name} peer (needs {role.name})",
            )
