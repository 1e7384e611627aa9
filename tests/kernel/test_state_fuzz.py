"""A seeded random-operation fuzz of ipcfw.kernel.state: the tables' invariants hold after every
step, and a simple model of the sessions agrees with the state.

No processes, sockets, clocks or sleeps: see kernel_world.py for the fake world.
"""

from __future__ import annotations

import collections
import itertools
import random

import pytest

from ipcfw import errors
from ipcfw.kernel import state as kstate
from ipcfw.kernel.listing import MAX_LISTINGS
from ipcfw.kernel.state import (
    MAX_OUTSTANDING,
    KernelState,
    MessageKind,
    PeerMisbehaved,
    Send,
    SessionState,
    SlotSource,
)
from ipcfw.protocol import (
    MAX_FRAME,
    Admit,
    Census,
    CensusReply,
    Join,
    ListProcesses,
    ListServers,
    ListSessions,
    ProcessList,
    ServerList,
    SessionList,
    unpack_process_rows,
    unpack_server_rows,
    pack_census,
    CensusItem,
    unpack_session_rows,
    PROTOCOL_VERSION,
    Close,
    Complete,
    Connect,
    Connected,
    Deliver,
    Disconnect,
    Hello,
    NewSession,
    Open,
    Panic,
    Panicked,
    Register,
    Role,
    SessionLost,
    Share,
    Shared,
    Stats,
    StatsReply,
    Welcome,
    decode,
    encode,
)

from kernel_world import (
    numbered_tokens,
    KPID,
    CHANNEL,
    INBOX,
    SERVER,
    SYNC,
    ASYNC,
    BLIND,
    ANSWERS,
    ident,
    CLI,
    C1,
    hello,
    sends,
    request,
    snapshot,
)


# -- fuzz --------------------------------------------------------------------------------------


def census_item(handle: int, pid: int, messages: int, oldest: int) -> CensusItem:
    return CensusItem(handle, pid, messages, messages // 2, oldest)


class Fuzz:
    """A seeded random mix of every input, with a model of what each peer may legitimately know.

    Operations are either legitimate (what a correct client or server library could send: they
    must never raise) or hostile (forged handles and message ids, wrong roles, duplicate hellos:
    they may raise `PeerMisbehaved`, and then must have changed nothing).

    Sharing is modelled per process: `held` is what each channel may use on its own (unshared
    sessions it created), `shared` what every channel of a process may use (ShareAuto'd,
    ShareProtected or opened by token), with the number of opens the process must close.
    """

    IDENTITIES = [ident(500 + i, uid=1000 + i % 2) for i in range(6)]
    NAMES = ["Echo", "echo", "KV", "Notifier", "!prot", "bad*name", ""]

    def __init__(self, seed: int, pool_slots: int = 6) -> None:
        self.rng = random.Random(seed)
        self.flow_rng = random.Random(-seed)
        # The direct path's inputs (Join, ListSessions, CensusReply, and whether a server takes
        # direct connections and a connect asks for them) draw on a stream of their own too.
        self.direct_rng = random.Random(seed + 10**6)
        self.join_reqs: set[int] = set()  # req_ids of every Join
        self.legit_joins: set[int] = set()  # ... that a correct client sent
        self.list_reqs: set[int] = set()  # req_ids of every ListSessions
        self.state = KernelState(kernel_pid=1, pool_slots=pool_slots,
                                 protserv_uids=frozenset({1001}),
                                 new_token=numbered_tokens(b"fz"))
        self.rids = (b"p%d" % i for i in itertools.count())
        self.peers: dict[bytes, tuple[Role, tuple]] = {}  # the test's view of live peers
        self.inbox_of: dict[tuple, bytes] = {}
        self.departed: list[bytes] = []
        self.legit: dict[int, tuple] = {}  # req_id -> (channel, handle, mode) of real requests
        self.closed: set[tuple] = set()  # (process key, handle) a client closed (its last open of)
        self.servers: dict[bytes, str] = {}  # peers that registered a name -> the name
        self.held: dict[bytes, set] = collections.defaultdict(set)  # channel -> unshared handles
        # process key -> {handle: opens} of the shared sessions the process holds
        self.shared: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
        self.tokens: dict[int, bytes] = {}  # handle -> its ShareProtected token, as seen
        self.share_reqs: dict[int, tuple] = {}  # req_id -> (channel, handle, mode) of each Share
        self.open_reqs: dict[int, bytes] = {}  # req_id -> the token of each Open
        self.legit_shares: set[int] = set()  # req_ids of Shares and Opens a correct client sent
        # server -> {msg id: the NewSession, Deliver or Disconnect it was sent}
        self.pending: dict[bytes, dict] = collections.defaultdict(dict)
        self.req_ids = itertools.count(1)
        self.requests: dict[int, bytes] = {}  # req_id -> the channel (or server) its answer goes to
        self.registrations: set[int] = set()  # the req_ids of Registers (answered to a server)
        self.answers: collections.Counter = collections.Counter()
        # (process, handle) -> SessionLost notices
        self.lost: collections.Counter = collections.Counter()
        self.counts: collections.Counter = collections.Counter()

    # -- bookkeeping ---------------------------------------------------------------------------

    def absorb(self, actions: list, live: set) -> None:
        """Check the Sends of one input and learn from them what each peer now knows."""
        for action in actions:
            if type(action) is not Send:
                continue
            rid, message = action
            # The kernel only ever emits messages the codec accepts, to peers it knows.
            assert decode(encode(message)) == message, message
            assert rid in live, f"send to {rid!r}, not a peer: {message}"
            kind = type(message)
            role, key = self.peers[rid] if rid in self.peers else (None, None)
            if kind in ANSWERS:
                # Every answer goes to the channel the request came from, and only once.
                assert message.req_id in self.requests, f"answer to no request: {message}"
                self.answers[message.req_id] += 1
                assert self.answers[message.req_id] == 1, f"req {message.req_id} answered twice"
                assert rid == self.requests[message.req_id], (rid, message)
                assert role is (SERVER if message.req_id in self.registrations else CHANNEL), (
                    rid, role, message
                )
                if kind is Panicked and message.category == "KERN-EXEC":
                    # A handle the client rightly holds is never refused as not held.
                    assert (message.req_id not in self.legit
                            and message.req_id not in self.legit_shares
                            and message.req_id not in self.legit_joins), message
                if kind is Connected and message.req_id in self.join_reqs:
                    # a Join attaches the thread; it holds nothing more than before
                    assert message.result != 0 or message.handle != 0, message
                    if message.ticket:
                        assert message.result == 0 and message.direct, message
                        self.counts["join with a ticket"] += 1
                elif kind is Connected and message.req_id in self.open_reqs:
                    self.absorb_open(key, message)
                elif kind is Connected and message.result == 0:
                    # else shared before it was connected
                    if message.handle not in self.shared[key]:
                        self.held[rid].add(message.handle)
            elif kind is Shared:
                assert message.req_id in self.share_reqs, f"Shared for no Share: {message}"
                self.answers[message.req_id] += 1
                assert self.answers[message.req_id] == 1, f"req {message.req_id} answered twice"
                assert role is CHANNEL and rid == self.share_reqs[message.req_id][0], (rid, message)
                self.absorb_shared(rid, key, message)
            elif kind is SessionLost:
                # Only to the inbox of the process holding the session, once per session.
                assert role is INBOX and self.inbox_of.get(key) == rid, (rid, message)
                assert message.handle in self.shared.get(key, ()) or any(
                    message.handle in self.held.get(c, ()) for c, (r, k) in self.peers.items()
                    if r is CHANNEL and k == key
                ), (rid, message)
                self.lost[key, message.handle] += 1
                assert self.lost[key, message.handle] == 1, (
                    f"session {message.handle} lost twice to {key}"
                )
                if message.handle in self.shared.get(key, ()):
                    self.counts["SessionLost of a shared session"] += 1
            elif kind in (NewSession, Deliver, Disconnect, Admit):
                assert rid in self.servers
                self.pending[rid][message.msg_id] = message
            elif kind in (SessionList, ServerList, ProcessList):
                assert message.req_id in self.list_reqs, message
                self.answers[message.req_id] += 1
                assert self.answers[message.req_id] == 1, f"req {message.req_id} answered twice"
                assert rid == self.requests[message.req_id], (rid, message)
                if kind is SessionList:
                    keys = [r.handle for r in unpack_session_rows(message.rows)]
                elif kind is ServerList:
                    keys = [r.name.casefold() for r in unpack_server_rows(message.rows)]
                else:
                    keys = [r.pid for r in unpack_process_rows(message.rows)]
                    assert all(r.outstanding >= 0 for r in unpack_process_rows(message.rows))
                assert keys == sorted(keys)
            elif kind is Census:
                assert rid in self.servers
            # never an answer to a request: only its own Hello and Stats, and notices
            if role is INBOX:
                assert kind in (Welcome, StatsReply, SessionLost, SessionList, ServerList,
                                ProcessList), (rid, message)
            self.counts[kind.__name__] += 1

    def absorb_shared(self, rid: bytes, key: tuple, message: Shared) -> None:
        _, handle, mode = self.share_reqs[message.req_id]
        if message.result != 0:
            assert message.token == b"", message
            self.counts["share refused"] += 1
            if message.result == errors.KErrNotReady:
                self.counts["share while connecting"] += 1
            return
        self.counts["share ok"] += 1
        # Only a session its client knows as connected can be shared (a hostile Share of a
        # connecting one is refused): never one the model has not seen Connected.
        assert any(handle in hs for hs in self.held.values()) or any(
            handle in opens for opens in self.shared.values()
        ), f"session {handle} shared before it was connected"
        # Shared: the process's now (with the one open the creator's Connect made), not the
        # thread's.
        self.held[rid].discard(handle)
        if handle not in self.shared[key]:
            self.shared[key][handle] = 1
        if mode == 1:
            assert message.token == b"", message
            return
        assert len(message.token) == kstate.TOKEN_BYTES, message
        # The same token each time; never another session's.
        assert self.tokens.setdefault(handle, message.token) == message.token, (handle, message)
        assert [h for h, t in self.tokens.items() if t == message.token] == [handle]

    def absorb_open(self, key: tuple, message: Connected) -> None:
        token = self.open_reqs[message.req_id]
        if message.result != 0:
            assert message.handle == 0
            self.counts["open refused"] += 1
            return
        # Only a real token opens, and it opens its own session.
        assert self.tokens.get(message.handle) == token, (message, token)
        self.shared[key][message.handle] += 1
        self.counts["open ok"] += 1

    def closing(self, rid: bytes, handle: int) -> None:
        """Channel `rid` closes `handle` (one open of it, if it is its process's)."""
        key = self.peers[rid][1]
        opens = self.shared.get(key)
        if opens and opens[handle] > 0:
            opens[handle] -= 1
            if opens[handle]:
                self.counts["close shared, not the last open"] += 1
                return
            del opens[handle]
            self.counts["close shared, the last open"] += 1
        self.held[rid].discard(handle)
        self.closed.add((key, handle))

    def forget(self, rid: bytes) -> None:
        role, key = self.peers.pop(rid)
        if self.inbox_of.get(key) == rid:
            del self.inbox_of[key]
        self.servers.pop(rid, None)
        self.pending.pop(rid, None)
        self.held.pop(rid, None)
        if not any(k == key for _, k in self.peers.values()):
            self.shared.pop(key, None)  # the process is gone, and every open of it

    def usable(self) -> list:
        """(channel, handle) pairs a correct client could use: its own, and its process's."""
        return sorted(
            (rid, handle)
            for rid, (role, key) in self.peers.items() if role is CHANNEL
            for handle in self.held.get(rid, set()) | set(self.shared.get(key, ()))
        )

    def pick(self, role: Role | None = None) -> bytes | None:
        rids = sorted(r for r, (ro, _) in self.peers.items() if role is None or ro is role)
        return self.rng.choice(rids) if rids else None

    def new_req(self, rid: bytes) -> int:
        req_id = next(self.req_ids)
        self.requests[req_id] = rid
        return req_id

    def new_registration(self, rid: bytes) -> int:
        req_id = 10**12 + next(self.req_ids)
        self.requests[req_id] = rid
        self.registrations.add(req_id)
        return req_id

    def args(self) -> tuple:
        rng = self.rng
        out = []
        for _ in range(rng.randrange(5)):
            kind = rng.randrange(3)
            if kind == 0:
                out.append(rng.choice([0, -1, 2**31 - 1, -(2**31)]))
            elif kind == 1:
                out.append(rng.randbytes(rng.randrange(4)))
            else:
                content = rng.randbytes(rng.randrange(3))
                out.append((content, len(content) + rng.randrange(4)))
        return tuple(out)

    def writes(self, message: tuple | None = None) -> tuple:
        """What a server writes back: mostly legal for `message`, sometimes not (a hostile
        server)."""
        rng = self.rng
        if rng.random() < 0.15 or type(message) is not Deliver and rng.random() < 0.3:
            return tuple((rng.randrange(4), rng.randbytes(rng.randrange(6)))
                         for _ in range(rng.randrange(3)))
        if type(message) is not Deliver:
            return ()
        return tuple(
            (i, rng.randbytes(rng.randint(0, a[1])))
            for i, a in enumerate(message.args)
            if type(a) is tuple and rng.random() < 0.7
        )

    # -- operations ----------------------------------------------------------------------------

    def step(self) -> None:
        rng = self.rng
        op = rng.choices(
            ["hello", "register", "connect", "request", "complete", "panic", "close",
             "hostile", "stats", "peer_gone", "process_died", "share", "open"],
            weights=[5, 3, 8, 40, 28, 2, 3, 5, 1, 1.5, 0.5, 4, 4],
        )[0]
        # Backpressure, now and then before the operation, draws on a random stream of its own,
        # so that the operations above stay the same sequence.
        flow = self.flow_rng.random()
        if flow < 0.04:
            self.run("hold_back" if flow < 0.008 else "release")
        direct = self.direct_rng.random()
        if direct < 0.1:
            self.run(["join", "join", "join", "list", "census"][int(direct * 50)])
        self.run(op)

    def run(self, op: str) -> None:
        live_before = set(self.state.peers)
        expect_misbehaviour, call = getattr(self, "op_" + op)()
        if call is None:
            return
        before = snapshot(self.state) if expect_misbehaviour else None
        try:
            actions = call()
        except PeerMisbehaved:
            assert expect_misbehaviour, f"unexpected PeerMisbehaved in {op}"
            assert snapshot(self.state) == before, (
                f"{op} raised PeerMisbehaved after changing state"
            )
            self.counts["misbehaved"] += 1
            return
        # Sends go to peers that were there before the input (or that it introduced).
        self.absorb(actions, live_before | set(self.state.peers))
        for rid in self.departed:  # forgotten after absorbing: a dying server's last Sends
            self.forget(rid)
        self.departed.clear()
        self.counts[op] += 1

    def op_hello(self):
        rng = self.rng
        if self.peers and rng.random() < 0.1:  # a duplicate hello
            rid = self.pick()
            return True, lambda: hello(self.state, rid, CHANNEL, self.IDENTITIES[0])
        # Processes 0-1 mostly host servers, 2-5 mostly run clients; any may be both.
        index = rng.randrange(len(self.IDENTITIES))
        identity = self.IDENTITIES[index]
        if index < 2:
            role = rng.choice([SERVER, SERVER, SERVER, CHANNEL])
        else:
            role = rng.choice([CHANNEL, CHANNEL, INBOX, INBOX, SERVER])
        rid = next(self.rids)
        second_inbox = role is INBOX and identity.key in self.inbox_of

        def call():
            actions = hello(self.state, rid, role, identity)
            self.peers[rid] = (role, identity.key)
            if role is INBOX:
                self.inbox_of[identity.key] = rid
            return actions

        return second_inbox, call

    def op_hold_back(self):
        """The loop finds a server not reading: what it is sent is held back from now on."""
        servers = sorted(r for r, (role, _) in self.peers.items() if role is SERVER)
        if not servers:
            return False, None
        rid = self.flow_rng.choice(servers)

        def call():
            assert self.state.hold_back(rid) == (rid in self.state.server_of_peer)
            return []

        return False, call

    def op_release(self):
        """A held-back server reads again: a few of its held messages are let go."""
        held = sorted(self.state.held_back)
        if not held:
            return False, None
        rid, most = self.flow_rng.choice(held), self.flow_rng.randint(1, 6)
        return False, lambda: self.state.release(rid, most)

    def op_register(self):
        unregistered = sorted(
            r for r, (ro, _) in self.peers.items() if ro is SERVER and r not in self.servers
        )
        if unregistered and self.rng.random() < 0.8:
            rid = self.rng.choice(unregistered)
        else:
            rid = self.pick(SERVER) if self.rng.random() < 0.9 else self.pick()
        if rid is None:
            return False, None
        name = self.rng.choice(self.NAMES)
        not_server = self.peers[rid][0] is not SERVER
        req_id = self.new_registration(rid)

        sharing = self.rng.choice([0, 1, 2, 2, 2])
        direct = "/run/fz/d-%d" % len(self.servers) if self.direct_rng.random() < 0.6 else ""

        def call():
            actions = self.state.receive(rid, Register(req_id, name, sharing, (1, 0, 0), direct))
            # registered already: KErrInUse, held back with the rest
            if rid in self.state.held_back:
                assert sends(actions) == []
                return actions
            (reply,) = sends(actions)
            if reply.value == 0:
                self.servers[rid] = name
            return actions

        return not_server, call

    def op_connect(self):
        rid = self.pick(CHANNEL)
        if rid is None:
            return False, None
        live = sorted(self.servers.values())
        name = self.rng.choice(
            live if live and self.rng.random() < 0.85 else self.NAMES + ["Nobody"]
        )
        slots = self.rng.choice([-1, -1, 0, 1, 2, 3, -2, 256])
        req_id = self.new_req(rid)
        path = self.direct_rng.choice([0, 1, 1])
        return False, lambda: self.state.receive(
            rid, Connect(req_id, name, (1, 0, 0), slots, b"", (), path)
        )

    def op_request(self):
        usable = self.usable()
        if not usable:
            return False, None
        rid, handle = self.rng.choice(usable)
        if handle not in self.held.get(rid, ()):
            self.counts["request on a shared session"] += 1
        mode = self.rng.choice([SYNC, BLIND, ASYNC, ASYNC])  # async needs no inbox
        req_id = self.new_req(rid)
        self.legit[req_id] = (rid, handle, mode)
        if mode == ASYNC and self.peers[rid][1] not in self.inbox_of:
            self.counts["async without an inbox"] += 1
        args = self.args()
        function = self.rng.randrange(50)
        return False, lambda: request(self.state, rid, handle, req_id, mode, function, args)

    def op_complete(self):
        servers = sorted(r for r in self.servers if self.pending.get(r))
        if not servers:
            return False, None
        rid = self.rng.choice(servers)
        ids = sorted(self.pending[rid])
        # Servers mostly answer in order; some hold messages and answer later.
        msg_id = ids[0] if self.rng.random() < 0.5 else self.rng.choice(ids)
        message = self.pending[rid][msg_id]
        if self.rng.random() < 0.9:
            del self.pending[rid][msg_id]  # else: a duplicate completion later
        value = self.rng.choice([0, 0, 0, 1, 42, -1, -5, -(2**31)])
        return False, lambda: self.state.receive(rid, Complete(msg_id, value, self.writes(message)))

    def op_panic(self):
        servers = sorted(r for r in self.servers if self.pending.get(r))
        if not servers:
            return False, None
        rid = self.rng.choice(servers)
        msg_id = self.rng.choice(sorted(self.pending[rid]))
        del self.pending[rid][msg_id]
        return False, lambda: self.state.receive(rid, Panic(msg_id, "Fuzz", self.rng.randrange(3)))

    def op_close(self):
        usable = self.usable()
        if not usable:
            return False, None
        rid, handle = self.rng.choice(usable)
        self.closing(rid, handle)
        return False, lambda: self.state.receive(rid, Close(handle))

    def op_share(self):
        usable = self.usable()
        if not usable:
            return False, None
        rid, handle = self.rng.choice(usable)
        mode = self.rng.choice([1, 2, 2])
        req_id = self.new_req(rid)
        self.share_reqs[req_id] = (rid, handle, mode)
        self.legit_shares.add(req_id)
        return False, lambda: self.state.receive(rid, Share(req_id, handle, mode))

    def op_open(self):
        rid = self.pick(CHANNEL)
        if rid is None:
            return False, None
        live = sorted({h for opens in self.shared.values() for h in opens} & self.tokens.keys())
        if live and self.rng.random() < 0.8:
            token = self.tokens[self.rng.choice(live)]
        elif self.tokens and self.rng.random() < 0.5:
            token = self.tokens[self.rng.choice(sorted(self.tokens))]  # perhaps of an ended session
        else:
            token = self.rng.choice(
                [b"", b"fz-000000000001", self.rng.randbytes(kstate.TOKEN_BYTES)]
            )
        req_id = self.new_req(rid)
        self.open_reqs[req_id] = token
        self.legit_shares.add(req_id)
        return False, lambda: self.state.receive(rid, Open(req_id, token))

    def op_hostile(self):
        """Forged handles and message ids, wrong roles, strangers."""
        rng = self.rng
        state = self.state
        top_handle = state._next_handle + 2
        top_msg = int(repr(state._msg_ids)[6:-1]) + 2
        rid = self.pick()
        kind = rng.randrange(7)
        if rid is None or kind == 0:
            return True, lambda: state.receive(b"stranger", Stats(1))
        role, key = self.peers[rid]
        handle = rng.randint(1, top_handle)
        if kind == 1:  # a request with any handle, from any peer, in any mode
            mode = rng.choice([SYNC, ASYNC, BLIND])
            req_id = self.new_req(rid)
            return role is not CHANNEL, lambda: request(state, rid, handle, req_id, mode)
        if kind == 2:  # a completion or panic of any message id, from any peer
            message = rng.choice([Complete(rng.randint(0, top_msg), 0, self.writes()),
                                  Panic(rng.randint(0, top_msg), "H", 0)])
            return rid not in self.servers, lambda: state.receive(rid, message)
        if kind == 3:  # a close of any handle

            def call():
                actions = state.receive(rid, Close(handle))
                self.closing(rid, handle)
                return actions

            return True, call
        if kind == 4:  # a connect or register from any role
            message = rng.choice([Connect(self.new_req(rid), "Echo", (1, 0, 0), -1, b""),
                                  Register(self.new_registration(rid), "Zed", 0, (1, 0, 0))])
            wrong = role is not (CHANNEL if type(message) is Connect else SERVER)

            def call():
                actions = state.receive(rid, message)
                # (a server held back is registered already: its KErrInUse is held back too)
                if type(message) is Register and sends(actions) and sends(actions)[0].value == 0:
                    self.servers[rid] = message.name
                return actions

            return wrong, call
        if kind == 5:  # a Share of any handle, or an Open of any token, from any peer
            req_id = self.new_req(rid)
            if rng.random() < 0.5:
                mode = rng.choice([1, 2])
                self.share_reqs[req_id] = (rid, handle, mode)
                message = Share(req_id, handle, mode)
            else:
                token = rng.choice([b"", b"fz-%013d" % rng.randrange(20), *self.tokens.values()])
                self.open_reqs[req_id] = token
                message = Open(req_id, token)
            return role is not CHANNEL, lambda: state.receive(rid, message)
        # a duplicate hello
        return True, lambda: hello(state, rid, INBOX, self.IDENTITIES[1])

    def op_join(self):
        """A thread's first use of a session (a direct one: its ticket), or a forged one."""
        rng = self.direct_rng
        usable = self.usable()
        if usable and rng.random() < 0.8:
            rid, handle = rng.choice(usable)
            req_id = self.new_req(rid)
            self.legit_joins.add(req_id)
        else:
            rid = self.pick()
            if rid is None:
                return False, None
            handle = rng.randint(1, self.state._next_handle + 2)
            req_id = self.new_req(rid)
        self.join_reqs.add(req_id)
        return self.peers[rid][0] is not CHANNEL, lambda: self.state.receive(
            rid, Join(req_id, handle)
        )

    def op_list(self):
        rid = self.pick()
        if rid is None:
            return False, None
        req_id = self.new_req(rid)
        self.list_reqs.add(req_id)
        after = self.direct_rng.choice([0, 0, 1, self.state._next_handle])
        # (which list: from the req_id, so that the runs' other choices stay as they were)
        message = [
            ListSessions(req_id, after), ListServers(req_id, ["", "echo", "z"][after % 3]),
            ListProcesses(req_id, [0, 502, 10**6][after % 3]),
        ][req_id % 3]
        return False, lambda: self.state.receive(rid, message)

    def op_census(self):
        """A server's CensusReply (asked for or not), or one from a peer that is no server."""
        rng = self.direct_rng
        rid = self.pick(SERVER) if rng.random() < 0.9 else self.pick()
        if rid is None:
            return False, None
        handles = range(1, self.state._next_handle + 2)
        counts = b"\x01" if rng.random() < 0.05 else pack_census(
            [census_item(h, rng.choice(self.IDENTITIES).pid, rng.randrange(4), rng.randrange(10**4))
             for h in rng.sample(handles, min(3, len(handles)))]
        )
        bad = rid not in self.servers or counts == b"\x01"
        return bad, lambda: self.state.receive(rid, CensusReply(0, counts))

    def op_stats(self):
        rid = self.pick()
        if rid is None:
            return False, None
        return False, lambda: self.state.receive(rid, Stats(2 * 10**12))

    def op_peer_gone(self):
        roll = self.rng.random()
        rid = self.pick(SERVER) if roll < 0.15 else self.pick() if roll < 0.95 else b"unknown"
        rid = rid or b"unknown"

        def call():
            actions = self.state.peer_gone(rid)
            if rid in self.peers:
                self.departed.append(rid)
            return actions

        return False, call

    def op_process_died(self):
        key = self.rng.choice(self.IDENTITIES).key

        def call():
            actions = self.state.process_died(key)
            self.departed += [r for r, (_, k) in self.peers.items() if k == key]
            return actions

        return False, call

    # -- the end of a run ----------------------------------------------------------------------

    def drain(self) -> None:
        """Every live server reads what was held back for it, and completes everything it was
        sent, until nothing is left."""
        while True:
            for rid in sorted(self.state.held_back):
                live = set(self.state.peers)
                self.absorb(self.state.release(rid, 1_000_000), live)
            work = [
                (rid, m) for rid in sorted(self.servers) for m in sorted(self.pending.get(rid, ()))
            ]
            if not work:
                return
            for rid, msg_id in work:
                del self.pending[rid][msg_id]
                live = set(self.state.peers)
                self.absorb(self.state.receive(rid, Complete(msg_id, 0, ())), live)
                check_invariants(self.state)

    def unanswered(self) -> list:
        """Real requests whose requester still waits and never got an answer."""
        lost = []
        for req_id, (chan, handle, mode) in self.legit.items():
            if (self.answers[req_id] or chan not in self.peers
                    or (self.peers[chan][1], handle) in self.closed):
                continue  # answered, or nobody left to hear, or completed locally on Close
            lost.append(req_id)
        return lost

    def kill_everything(self) -> None:
        for key in sorted(self.state.processes):
            live = set(self.state.peers)
            self.departed += [r for r, (_, k) in self.peers.items() if k == key]
            self.absorb(self.state.process_died(key), live)
            for rid in self.departed:
                self.forget(rid)
            self.departed.clear()
            check_invariants(self.state)


def check_invariants(state: KernelState) -> None:
    """The tables agree with each other (run after every fuzz step)."""
    slots_used = collections.Counter()
    pool = 0
    for msg_id, record in state.messages.items():
        session = record.session
        assert record.msg_id == msg_id
        assert state.sessions.get(session.handle) is session, f"message {msg_id} of a gone session"
        assert msg_id in session.messages
        assert session.server.messages.get(msg_id) is record
        if record.slot is SlotSource.SESSION:
            slots_used[session.handle] += 1
        elif record.slot is SlotSource.POOL:
            pool += 1
    assert state.pool_used == pool and 0 <= pool <= state.pool_slots
    for handle, session in state.sessions.items():
        assert session.handle == handle
        assert session.messages <= state.messages.keys()
        assert session.slots_used == slots_used[handle]
        assert session.slots_used <= max(session.slots, 0)
        assert len(session.messages) <= MAX_OUTSTANDING + 1
        server = session.server
        if session.state is SessionState.DEAD:
            assert handle not in server.sessions
        else:
            # A live session's server is registered and alive.
            assert state.server_of_peer.get(server.rid) is server, (
                f"{session!r} has a missing server"
            )
            assert server.rid in state.peers
            assert handle in server.sessions
        creator = session.creator
        if session.state in kstate._HELD:
            assert session.holders, f"{session!r} held by nobody"
            for process, opens in session.holders.items():
                assert (handle in process.sessions
                        and state.processes.get(process.identity.key) is process)
                assert opens >= 1, f"{session!r}: {opens} opens"
            if session.sharing == 0:
                assert state.peers.get(creator.rid) is creator, (
                    f"{session!r} held by a gone channel"
                )
                assert handle in creator.owned
                assert session.holders == {creator.process: 1}, (
                    f"{session!r} unshared, other holders"
                )
                assert session.attached <= {creator.rid}, (
                    f"{session!r} unshared, other channels attached"
                )
            else:
                assert handle not in creator.owned
            for rid in session.attached:
                # Every attached channel is a live peer, of a process that holds the session.
                peer = state.peers.get(rid)
                assert peer is not None, f"{session!r} attached to a gone channel"
                assert handle in peer.attached and peer.role is CHANNEL
                assert peer.process in session.holders, f"{session!r} attached to a non-holder"
            assert len(session.attached) <= kstate.MAX_ATTACHED
        else:
            assert handle not in creator.owned
            assert not session.attached and not session.holders
        assert session.sharing in (0, 1, 2) and session.sharing <= server.sharing
        # A token exactly when ShareProtected, and the token finds this session.
        assert (session.token is not None) == (session.sharing == 2), (
            f"{session!r} token {session.token!r}"
        )
        if session.token is not None:
            assert state.tokens.get(session.token) == handle
    for token, handle in state.tokens.items():
        assert handle in state.sessions and state.sessions[handle].token == token, (
            f"stale token {token!r}"
        )
    for key, server in state.servers.items():
        assert key == server.name.casefold()
        assert state.server_of_peer[server.rid] is server
        for handle in server.sessions:
            assert state.sessions[handle].server is server
        assert server.messages.keys() <= state.messages.keys()
    for rid, server in state.server_of_peer.items():
        assert server.rid == rid and rid in state.peers
        assert state.servers.get(server.name.casefold()) is server
    for rid, peer in state.peers.items():
        assert peer.rid == rid
        assert state.processes.get(peer.process.identity.key) is peer.process
        assert rid in peer.process.peers
        for handle in peer.owned:
            session = state.sessions.get(handle)
            assert (session is not None and session.creator is peer and session.sharing == 0
                    and session.held)
        for handle in peer.attached:
            assert handle in state.sessions and rid in state.sessions[handle].attached
    for key, process in state.processes.items():
        assert process.peers and all(state.peers[r].process is process for r in process.peers)
        assert process.inbox is None or state.peers[process.inbox].role is INBOX
        for handle in process.sessions:
            session = state.sessions.get(handle)
            assert session is not None and session.held and process in session.holders
    stats = state.statistics()
    assert stats["sessions"] == len(state.sessions) == sum(
        stats[f"sessions_{s.value.lower()}"] for s in SessionState
    )
    assert stats["messages"] == len(state.messages) and stats["pool_used"] == state.pool_used
    assert stats["peers"] == len(state.peers) and stats["processes"] == len(state.processes)
    assert stats["tokens"] == len(state.tokens)
    assert stats["attached"] == sum(len(s.attached) for s in state.sessions.values())
    # A session list waits only for live servers that have a Census on its way.
    assert len(state.listings) <= MAX_LISTINGS
    for listing in state.listings:
        assert listing.waiting
        for rid in listing.waiting:
            server = state.server_of_peer.get(rid)
            assert server is not None and server.census_asked, listing


def check_model(fuzz: Fuzz) -> None:
    """What the fuzz's clients believe they hold is what the kernel says they hold."""
    state = fuzz.state
    for key, opens in fuzz.shared.items():
        process = state.processes.get(key)
        for handle, n in opens.items():
            assert process is not None, f"{key} holds {handle} but is gone"
            session = state.sessions.get(handle)
            assert session is not None and session.held and session.sharing > 0, (
                key, handle, session
            )
            assert session.holders.get(process) == n, (key, handle, n, session.holders.get(process))
    for rid, handles in fuzz.held.items():
        for handle in handles:
            session = state.sessions.get(handle)
            assert session is not None and session.held and session.sharing == 0, (
                rid, handle, session
            )
            assert session.creator.rid == rid
    for handle, session in state.sessions.items():
        if not session.held:
            continue
        if session.sharing:
            for process, n in session.holders.items():
                assert fuzz.shared.get(process.identity.key, {}).get(handle) == n, (
                    session, process.identity
                )
        elif session.state is not SessionState.CONNECTING:
            assert handle in fuzz.held.get(session.creator.rid, ()), session


def check_liveness(state: KernelState) -> None:
    """Every session not yet removed is waiting on exactly the message that will move it on."""
    for session in state.sessions.values():
        kinds = collections.Counter(state.messages[m].kind for m in session.messages)
        if session.state in (SessionState.CONNECTING, SessionState.ABANDONED):
            assert kinds[MessageKind.CONNECT] == 1, f"{session!r} waits for no connect"
        else:
            assert kinds[MessageKind.CONNECT] == 0
        if session.state in (SessionState.CLOSING, SessionState.PANICKED):
            assert kinds[MessageKind.DISCONNECT] == 1, (
                f"{session!r}: {kinds[MessageKind.DISCONNECT]} disconnects"
            )
        else:
            assert kinds[MessageKind.DISCONNECT] == 0


def run_fuzz(seed: int, steps: int, liveness: bool = False) -> Fuzz:
    fuzz = Fuzz(seed)
    for step in range(steps):
        try:
            fuzz.step()
            check_invariants(fuzz.state)
            check_model(fuzz)
            fuzz.counts.update(f"state {s.state.value}" for s in fuzz.state.sessions.values())
            if liveness:
                check_liveness(fuzz.state)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}, step {step}: {exc}") from exc
    return fuzz


@pytest.mark.parametrize("seed", [1, 2, 4])
def test_fuzz_random_operations_keep_the_tables_consistent(seed: int) -> None:
    fuzz = run_fuzz(seed, 3000)
    # The run exercised the paths it claims to.
    c = fuzz.counts
    for name in ("hello", "register", "connect", "request", "complete", "panic", "close",
                 "hostile", "peer_gone", "process_died", "misbehaved", "Deliver", "Disconnect",
                 "Panicked", "Connected", "NewSession", "PeerInfo", "SessionLost", "StatsReply",
                 "async without an inbox", *(f"state {s.value}" for s in SessionState),
                 "share", "open", "Shared", "share ok", "share refused", "open ok", "open refused",
                 "request on a shared session", "close shared, the last open",
                 "close shared, not the last open", "hold_back", "release",
                 "join", "list", "census", "Admit", "Census", "SessionList", "ServerList",
                 "ProcessList",
                 "join with a ticket"):
        assert c[name] > 0, (name, dict(c))
    assert sum(fuzz.answers.values()) > 300 and len(fuzz.legit) > 300
    # Every Share and Open a correct client sent was answered, once.
    assert all(fuzz.answers[r] == 1 for r in fuzz.legit_shares)
    # Once every server has completed everything, nothing is outstanding and no real request
    # whose requester still waits is left unanswered.
    fuzz.drain()
    assert fuzz.unanswered() == []
    stats = fuzz.state.statistics()
    assert stats["messages"] == 0 and stats["pool_used"] == 0
    # Quiescent sessions are open or dead (ABANDONED leftovers are the known _panic bug).
    assert (stats["sessions_connecting"] == stats["sessions_closing"]
            == stats["sessions_panicked"] == 0)
    # When every process dies, the kernel forgets everything.
    fuzz.kill_everything()
    stats = fuzz.state.statistics()
    assert stats.pop("admitted") == c["join with a ticket"]  # (a count of tickets ever given)
    fresh = KernelState(pool_slots=fuzz.state.pool_slots).statistics()
    fresh.pop("admitted")
    assert stats == fresh
    assert not fuzz.state.servers and not fuzz.state.server_of_peer


def test_fuzz_liveness_every_session_can_still_be_removed() -> None:
    for seed in (3, 5):
        fuzz = run_fuzz(seed, 3000, liveness=True)
        # A rarer path (a server dies under a session held by several processes), covered here.
        assert fuzz.counts["SessionLost of a shared session"] > 0, dict(fuzz.counts)


def test_a_hello_of_another_protocol_version_is_told_and_not_admitted() -> None:
    state = KernelState(kernel_pid=KPID)
    actions = state.hello(C1, CLI, Hello(CHANNEL, PROTOCOL_VERSION + 1))
    assert actions == [Send(C1, Welcome(KPID, MAX_FRAME, PROTOCOL_VERSION))]
    assert not state.knows(C1)
    assert state.statistics()["processes"] == 0
