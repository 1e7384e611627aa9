"""The fake world the kernel-state tests build: process identities, routing ids, and helpers
that say Hello, register servers, connect clients and pick actions apart.

Used by the tests/kernel/test_state_*.py files (no processes, sockets, clocks or sleeps:
STYLE.md 2.14, h11's ``test_state.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable


from ipcfw import errors
from ipcfw.kernel.state import KernelState, ProcessIdentity, Send
from ipcfw.protocol import (
    PeerGone,
    PROTOCOL_VERSION,
    Complete,
    Completed,
    Connect,
    Connected,
    Deliver,
    Hello,
    Mode,
    NewSession,
    Panicked,
    Register,
    Request,
    Role,
)

KPID = 4000
CHANNEL, INBOX, SERVER = Role.CHANNEL, Role.INBOX, Role.SERVER
SYNC, ASYNC, BLIND = Mode.SYNC, Mode.ASYNC, Mode.BLIND
ANSWERS = (Completed, Connected, Panicked)


def ident(pid: int, uid: int = 1000) -> ProcessIdentity:
    """A fake process identity, as the loop would build it from the transport."""
    return ProcessIdentity(pid, 1_700_000_000.0 + pid / 8, uid, uid + 1, f"/usr/bin/proc{pid}")


SRV = ident(100)
SRV2 = ident(110)
CLI = ident(200)
CLI2 = ident(300)

S1, S2 = b"srv-1", b"srv-2"
C1, C1B, IN1 = b"chan-1a", b"chan-1b", b"inbox-1"
C2, IN2 = b"chan-2", b"inbox-2"


# -- helpers -----------------------------------------------------------------------------------


def new_state(**kwargs: object) -> KernelState:
    return KernelState(kernel_pid=KPID, **kwargs)


def hello(state: KernelState, rid: bytes, role: Role, identity: ProcessIdentity) -> list:
    return state.hello(rid, identity, Hello(role, PROTOCOL_VERSION))


def sends(actions: Iterable, rid: bytes | None = None, cls: type | None = None) -> list:
    """The messages of the Send actions (to `rid`, of type `cls`, when given), in order.

    PeerGone notices (bookkeeping for the servers' ClientInfo tables) are left out unless
    asked for with `cls=PeerGone`: test_peer_gone_* checks them.
    """
    return [
        a.message
        for a in actions
        if type(a) is Send
        and (rid is None or a.rid == rid)
        and (type(a.message) is cls if cls is not None else type(a.message) is not PeerGone)
    ]


def one(actions: Iterable, rid: bytes, cls: type):
    """The single message of type `cls` sent to `rid`; fails if there are none or several."""
    found = sends(actions, rid, cls)
    assert len(found) == 1, f"expected one {cls.__name__} to {rid!r}, got {found} in {actions}"
    return found[0]


def targets(actions: Iterable) -> list:
    return [a.rid for a in actions if type(a) is Send]


def start_server(
    state: KernelState, rid: bytes = S1, identity: ProcessIdentity = SRV, name: str = "Echo",
    sharing: int = 0, version: tuple[int, int, int] = (1, 0, 0), direct: str = "",
) -> bytes:
    hello(state, rid, SERVER, identity)
    assert register(state, rid, name, sharing=sharing, version=version,
                    direct=direct) == errors.KErrNone
    return rid


def register(state: KernelState, rid: bytes, name: str, req_id: int = 900, sharing: int = 0,
             version: tuple[int, int, int] = (1, 0, 0), direct: str = "") -> int:
    actions = state.receive(rid, Register(req_id, name, sharing, version, direct))
    assert len(actions) == 1
    reply = one(actions, rid, Completed)
    assert reply.req_id == req_id and reply.writes == ()
    return reply.value


def start_client(
    state: KernelState,
    identity: ProcessIdentity = CLI,
    chan: bytes = C1,
    inbox: bytes | None = IN1,
) -> None:
    hello(state, chan, CHANNEL, identity)
    if inbox is not None:
        hello(state, inbox, INBOX, identity)


def begin_connect(
    state: KernelState, chan: bytes, req_id: int, name: str = "Echo", slots: int = -1
) -> tuple[list, NewSession]:
    actions = state.receive(chan, Connect(req_id, name, (1, 0, 0), slots, b"hi"))
    return actions, sends(actions, cls=NewSession)[0]


def open_session(
    state: KernelState, chan: bytes = C1, server: bytes = S1, name: str = "Echo",
    slots: int = -1, req_id: int = 1,
) -> int:
    """Connect and have the server accept; return the handle."""
    _, new = begin_connect(state, chan, req_id, name, slots)
    actions = state.receive(server, Complete(new.msg_id, errors.KErrNone, ()))
    assert actions == [Send(chan, Connected(req_id, errors.KErrNone, new.handle, b""))]
    return new.handle


def request(
    state: KernelState, chan: bytes, handle: int, req_id: int, mode: Mode = SYNC,
    function: int = 1, args: tuple = (),
) -> list:
    return state.receive(chan, Request(req_id, handle, function, args, mode))


def deliver(actions: Iterable, server: bytes = S1) -> Deliver:
    return one(actions, server, Deliver)


def snapshot(state: KernelState) -> tuple:
    """Everything a rule could change, as comparable plain data."""
    return (
        state.statistics(),
        state.pool_used,
        state._next_handle,
        repr(state._msg_ids),
        repr(state._client_keys),
        sorted((rid, p.role, p.process.identity, tuple(sorted(p.owned)), tuple(sorted(p.attached)))
               for rid, p in state.peers.items()),
        sorted((k, tuple(sorted(p.peers)), p.inbox, tuple(sorted(p.sessions)))
               for k, p in state.processes.items()),
        sorted((k, s.rid, tuple(sorted(s.sessions)), tuple(sorted(s.messages)),
                tuple(sorted(s.informed)))
               for k, s in state.servers.items()),
        sorted(state.server_of_peer),
        sorted((h, s.state.value, s.slots, s.slots_used, tuple(sorted(s.messages)), s.panic,
                s.creator.rid, s.sharing,
                tuple(sorted((p.identity.key, n) for p, n in s.holders.items())),
                tuple(sorted(s.attached)), s.token)
               for h, s in state.sessions.items()),
        sorted(state.tokens.items()),
        sorted((m, r.kind.value, r.reply_to, r.req_id, r.slot.value,
                tuple(sorted(r.writable.items())))
               for m, r in state.messages.items()),
    )


BASELINE_KEYS = ("sessions", "messages", "pool_used")


def counts(state: KernelState) -> dict:
    stats = state.statistics()
    return {key: stats[key] for key in BASELINE_KEYS}


ZERO = {"sessions": 0, "messages": 0, "pool_used": 0}


def echo_world() -> KernelState:
    """A kernel with server "Echo" on S1 (process SRV) and a client (CLI) with C1 and IN1."""
    state = new_state()
    start_server(state)
    start_client(state)
    return state


def numbered_tokens(prefix: bytes = b"tok") -> Callable[[], bytes]:
    """A deterministic `new_token`: tok-000001, tok-000002, ... (16 bytes, like the real ones)."""
    numbers = itertools.count(1)
    return lambda: prefix + b"-%0*d" % (15 - len(prefix), next(numbers))
