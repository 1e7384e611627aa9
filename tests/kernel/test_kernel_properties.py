"""A hypothesis state machine over the kernel's pure state (ipcfw.kernel.state): clients and
servers in several processes say Hello, register, connect, send requests of every mode, cancel,
close, complete (or refuse) what they are given, watch them with monitors (started, read,
stopped), and die at any point. After every step:

* nothing escapes but the documented `PeerMisbehaved`;
* no request, connect or kernel message is answered twice; every one a living client made is
  answered once its server has died or answered it;
* slot counts are never negative, nor over a session's own slots;
* a monitor is never sent more batches than the credit it gave, and its start and its stop
  are answered once each;
* once every peer is gone, every table is empty (monitors too).

The budget: the `ci` profile (the default) runs in seconds; `HYPOTHESIS_PROFILE=long` runs for
minutes, locally. (tests/kernel/test_state_fuzz.py is a seeded random walk over more kinds.)
"""

from __future__ import annotations

import collections
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from ipcfw import errors
from ipcfw.kernel.state import KernelState, PeerMisbehaved, ProcessIdentity, Send
from ipcfw.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Close,
    Complete,
    Completed,
    Connect,
    Connected,
    Deliver,
    Disconnect,
    Hello,
    MONITOR_CREDIT,
    Mode,
    Monitor,
    MonitorEvents,
    NewSession,
    Panicked,
    Register,
    Request,
    Role,
)

# (the hypothesis profiles, ci and long: tests/conftest.py)

NAMES = ("alpha", "beta")
CLIENTS = 3
ANSWERS = (Completed, Connected, Panicked)


class Client:
    def __init__(self, pid: int) -> None:
        self.identity = ProcessIdentity(pid, float(pid), 1000, 1000, f"/bin/c{pid}")
        self.rid = b"c%015d" % pid
        self.alive = True
        self.handles: set[int] = set()
        self.waiting: dict[int, str] = {}  # req_id -> what it is ("connect", "request")
        self.cancellable: set[int] = set()
        self.monitors: dict[int, int] = {}  # a running monitor's req_id -> the credit it has
        self.stopping: set[int] = set()  # monitors it asked to stop (Cancel), not yet answered


class Server:
    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.identity = ProcessIdentity(pid, float(pid), 1000, 1000, f"/bin/s{pid}")
        self.rid = b"s%015d" % pid
        self.alive = True
        self.given: dict[int, Any] = {}  # msg_id -> what the kernel gave it, not yet completed


class KernelMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = KernelState(kernel_pid=1, pool_slots=8)
        self.clients: list[Client] = []
        self.servers: dict[str, Server] = {}
        self.next_pid = 100
        self.next_req = 1
        self.answered: collections.Counter[tuple[bytes, int]] = collections.Counter()
        self.given_ids: collections.Counter[tuple[bytes, int]] = collections.Counter()

    # -- applying the kernel's actions ---------------------------------------------------------

    def apply(self, actions: list[Any]) -> None:
        by_rid = {c.rid: c for c in self.clients} | {s.rid: s for s in self.servers.values()}
        for action in actions:
            if type(action) is not Send:
                continue
            peer, message = by_rid.get(action.rid), action.message
            if isinstance(peer, Client) and self.monitor_frame(peer, message):
                continue
            if isinstance(peer, Client) and type(message) in ANSWERS:
                key = (peer.rid, message.req_id)
                self.answered[key] += 1
                assert self.answered[key] == 1, f"answered twice: {message}"
                kind = peer.waiting.pop(message.req_id, None)
                peer.cancellable.discard(message.req_id)
                if kind == "connect" and type(message) is Connected and message.result == 0:
                    peer.handles.add(message.handle)
            elif isinstance(peer, Server) and type(message) in (NewSession, Deliver, Disconnect):
                key = (peer.rid, message.msg_id)
                self.given_ids[key] += 1
                assert self.given_ids[key] == 1, f"given twice: {message}"
                peer.given[message.msg_id] = message

    def monitor_frame(self, client: Client, message: Any) -> bool:
        """A frame for one of `client`'s monitors, checked; False if it is not one."""
        if type(message) is MonitorEvents:
            assert message.req_id in client.monitors, f"events for no monitor: {message}"
            client.monitors[message.req_id] -= 1
            assert client.monitors[message.req_id] >= 0, "a batch beyond the monitor's credit"
            return True
        if type(message) is not Completed:
            return False
        if message.req_id in client.stopping:  # the answer to its Cancel
            assert message.value == errors.KErrCancel, message
            client.stopping.discard(message.req_id)
            client.monitors.pop(message.req_id, None)
            return True
        if message.req_id in client.monitors and message.value != errors.KErrNone:
            del client.monitors[message.req_id]  # refused (too many monitors)
            return True
        return message.req_id in client.monitors  # started

    def send(self, rid: bytes, message: Any) -> None:
        try:
            self.apply(self.state.receive(rid, message))
        except PeerMisbehaved:
            pass  # documented: the loop logs it and drops the frame

    def new_pid(self) -> int:
        self.next_pid += 1
        return self.next_pid

    def living(self) -> list[Client]:
        return [c for c in self.clients if c.alive]

    # -- rules ---------------------------------------------------------------------------------

    @initialize(slots=st.sampled_from([-1, 1, 2]))
    def a_world(self, slots: int) -> None:
        """Both servers, and two clients with a session each, to begin with (the rules start,
        connect and kill more)."""
        for name in NAMES:
            self.start_server(name)
        for name in NAMES:
            self.start_client()
            client = self.clients[-1]
            req_id = self.next_req = self.next_req + 1
            client.waiting[req_id] = "connect"
            self.send(client.rid, Connect(req_id, name, (1, 0, 0), slots, b""))
            self.answer_newest(type_=NewSession, refuse=False)
            assert client.handles, "the first session was not opened"

    @rule(name=st.sampled_from(NAMES))
    def start_server(self, name: str) -> None:
        if name in self.servers and self.servers[name].alive:
            return
        server = Server(name, self.new_pid())
        self.servers[name] = server
        self.apply(self.state.hello(server.rid, server.identity,
                                    Hello(int(Role.SERVER), PROTOCOL_VERSION)))
        self.send(server.rid, Register(1, name, 0, (1, 0, 0)))

    @precondition(lambda self: len(self.clients) < CLIENTS)
    @rule()
    def start_client(self) -> None:
        client = Client(self.new_pid())
        self.clients.append(client)
        self.apply(self.state.hello(client.rid, client.identity,
                                    Hello(int(Role.CHANNEL), PROTOCOL_VERSION)))

    @rule(data=st.data(), name=st.sampled_from(NAMES), slots=st.sampled_from([-1, 0, 1, 2]),
          answer=st.sampled_from(["accept", "accept", "refuse", "later"]))
    def connect(self, data: st.DataObject, name: str, slots: int, answer: str) -> None:
        """A client connects; its server accepts or refuses at once, or later."""
        if not self.living():
            return
        client = data.draw(st.sampled_from(self.living()))
        req_id = self.next_req = self.next_req + 1
        client.waiting[req_id] = "connect"
        self.send(client.rid, Connect(req_id, name, (1, 0, 0), slots, b""))
        if answer != "later":
            self.answer_newest(type_=NewSession, refuse=answer == "refuse")

    def answer_newest(self, type_: type, refuse: bool) -> None:
        """The server that was just given a `type_` completes it at once."""
        for server in self.servers.values():
            newest = [m for m, given in server.given.items() if type(given) is type_]
            if server.alive and newest:
                msg_id = max(newest)
                del server.given[msg_id]
                value = errors.KErrPermissionDenied if refuse else errors.KErrNone
                self.send(server.rid, Complete(msg_id, value, ()))
                return

    @rule(data=st.data(), mode=st.sampled_from(list(Mode)),
          answer=st.sampled_from(["now", "later", "later", "cancelled", "crossed"]))
    def request(self, data: st.DataObject, mode: Mode, answer: str) -> None:
        """A client sends a request; its server completes it at once, or later (or never); or
        the client cancels it at once, and the server completes it after that (crossed)."""
        clients = [c for c in self.living() if c.handles]
        if not clients:
            return
        client = data.draw(st.sampled_from(clients))
        handle = data.draw(st.sampled_from(sorted(client.handles)))
        req_id = self.next_req = self.next_req + 1
        if mode is not Mode.BLIND:
            client.waiting[req_id] = "request"
        if mode is Mode.ASYNC:
            client.cancellable.add(req_id)
        self.send(client.rid, Request(req_id, handle, 1, (req_id,), int(mode)))
        if answer in ("cancelled", "crossed"):
            self.send(client.rid, Cancel(req_id))
        if answer in ("now", "crossed"):
            self.answer_newest(type_=Deliver, refuse=False)

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        clients = [c for c in self.living() if c.cancellable]
        if not clients:
            return
        client = data.draw(st.sampled_from(clients))
        self.send(client.rid, Cancel(data.draw(st.sampled_from(sorted(client.cancellable)))))

    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        clients = [c for c in self.living() if c.handles]
        if not clients:
            return
        client = data.draw(st.sampled_from(clients))
        handle = data.draw(st.sampled_from(sorted(client.handles)))
        client.handles.discard(handle)
        self.send(client.rid, Close(handle))

    @rule(data=st.data(), refuse=st.booleans(), most=st.integers(1, 4))
    def server_completes(self, data: st.DataObject, refuse: bool, most: int) -> None:
        """A server completes up to `most` of what it was given, in any order (refusing a
        connect or failing a request when `refuse`)."""
        for _ in range(most):
            servers = [s for s in self.servers.values() if s.alive and s.given]
            if not servers:
                return
            server = data.draw(st.sampled_from(servers))
            msg_id = data.draw(st.sampled_from(sorted(server.given)))
            given = server.given.pop(msg_id)
            value = errors.KErrNone
            if refuse and type(given) is not Disconnect:
                value = errors.KErrPermissionDenied
            self.send(server.rid, Complete(msg_id, value, ()))

    @rule(data=st.data(), name=st.sampled_from(("", *NAMES)), credit=st.integers(0, 3))
    def start_a_monitor(self, data: st.DataObject, name: str, credit: int) -> None:
        if not self.living():
            return
        client = data.draw(st.sampled_from(self.living()))
        req_id = self.next_req = self.next_req + 1
        client.monitors[req_id] = min(credit, MONITOR_CREDIT)
        self.send(client.rid, Monitor(req_id, name, credit))

    @rule(data=st.data(), credit=st.integers(1, 80), stop=st.booleans())
    def a_monitor_reads_or_stops(self, data: st.DataObject, credit: int, stop: bool) -> None:
        clients = [c for c in self.living() if set(c.monitors) - c.stopping]
        if not clients:
            return
        client = data.draw(st.sampled_from(clients))
        req_id = data.draw(st.sampled_from(sorted(set(client.monitors) - client.stopping)))
        if stop:
            client.stopping.add(req_id)
            self.send(client.rid, Cancel(req_id))
        else:
            client.monitors[req_id] = min(client.monitors[req_id] + credit, MONITOR_CREDIT)
            self.send(client.rid, Monitor(req_id, "", credit))

    @rule()
    def a_turn_of_the_loop(self) -> None:
        """The loop's end of a turn: each monitor's batch, within its credit."""
        self.apply(self.state.monitor_batches())

    @rule(data=st.data())
    def a_client_dies(self, data: st.DataObject) -> None:
        if not self.living():
            return
        client = data.draw(st.sampled_from(self.living()))
        client.alive = False
        client.waiting.clear()
        self.apply(self.state.process_died(client.identity.key))

    @rule(name=st.sampled_from(NAMES))
    def a_server_dies(self, name: str) -> None:
        server = self.servers.get(name)
        if server is None or not server.alive:
            return
        server.alive = False
        server.given.clear()
        self.apply(self.state.process_died(server.identity.key))

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def slots_are_never_negative_nor_over(self) -> None:
        assert 0 <= self.state.pool_used <= self.state.pool_slots
        for session in self.state.sessions.values():
            assert session.slots_used >= 0
            if session.slots > 0:
                assert session.slots_used <= session.slots

    @invariant()
    def nothing_is_waiting_on_a_dead_server(self) -> None:
        if not any(s.alive for s in self.servers.values()):
            for client in self.living():
                assert not client.waiting, f"pending with no server alive: {client.waiting}"

    def teardown(self) -> None:
        for name in list(self.servers):
            self.a_server_dies(name)
        for client in self.living():
            assert not client.waiting, f"never answered: {client.waiting}"
        for client in self.living():
            client.alive = False
            self.apply(self.state.process_died(client.identity.key))
        stats = self.state.statistics()
        assert not self.state.peers and not self.state.processes and not self.state.servers
        assert not self.state.sessions and not self.state.messages and not self.state.cancellable
        assert self.state.pool_used == 0 and not self.state.tokens, stats
        assert not self.state.monitor.watchers and not self.state.monitor.active
        assert not self.state.connections_of_uid, self.state.connections_of_uid


TestKernelStateMachine = KernelMachine.TestCase
