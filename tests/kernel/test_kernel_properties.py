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

Two of the names have a service (activation, ipcfw.kernel.activation): connects and waits for
them are held while the machine, playing the spawner, has the started process say Hello and
register, exit (with or without having registered, before or after its death is seen), or
not register in time (the clock passes its start timeout and a tick kills it); the clock
advances, so idle servers are told to end, and ended ones that linger are killed. Also:

* a service is started at most once at a time (no Spawn while a process of it runs), and not
  again before its restart delay after failed starts (rule 6);
* a Kill names a process that runs, once; it dies of it;
* a failed start answers what waited for it with KErrTimedOut if it was killed for taking too
  long, KErrNotFound if it exited; nothing is held for a channel that went, nor for a name
  that is served; a starting process always has its kill timed, within its start timeout;
* after a tick, the next deadline is never in the past; a server is told to end for being
  idle only if it was started for a service with an idle exit and has no session;
* at the end every process started has exited, and activation holds nothing and times nothing.

The budget: the `ci` profile (the default) runs in seconds; `HYPOTHESIS_PROFILE=long` runs for
minutes, locally. (tests/kernel/test_state_fuzz.py is a seeded random walk over more kinds.)
"""

from __future__ import annotations

import collections
import re
from typing import Any

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from ipcfw import errors
from ipcfw.kernel.activation import RESTART_DELAY_MOST, STOP_GRACE, Kill, Phase, Service, Spawn
from ipcfw.kernel.state import KernelState, PeerMisbehaved, ProcessIdentity, Send
from ipcfw.naming import lookup_key
from ipcfw.protocol import (
    PROTOCOL_VERSION,
    AwaitServer,
    Cancel,
    Close,
    Complete,
    Completed,
    Connect,
    Connected,
    Deliver,
    Deregister,
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
    Terminating,
    TerminationReason,
)

# (the hypothesis profiles, ci and long: tests/conftest.py)

NAMES = ("alpha", "beta")
#: Names the kernel starts a server for: one that ends when idle, one that runs until it ends.
SERVICES = {
    "gamma": Service("gamma", ("serve", "gamma"), "/services/gamma.toml", start_timeout=10.0,
                     idle_exit=3.0),
    "delta": Service("delta", ("serve", "delta"), "/services/delta.toml", start_timeout=20.0),
}
ALL_NAMES = NAMES + tuple(SERVICES)
REFUSED = re.compile(r"server '(\w+)' is not started again")
CLIENTS = 3
ANSWERS = (Completed, Connected, Panicked)


def restart_delay(failures: int) -> float:
    """Rule 6 as documented: 1 s after a failed start, doubling with each one in a row, at
    most RESTART_DELAY_MOST."""
    return min(2.0 ** (failures - 1), RESTART_DELAY_MOST)


class Client:
    def __init__(self, pid: int) -> None:
        self.identity = ProcessIdentity(pid, float(pid), 1000, 1000, f"/bin/c{pid}")
        self.rid = b"c%015d" % pid
        self.alive = True
        self.handles: set[int] = set()
        self.waiting: dict[int, str] = {}  # req_id -> what it is ("connect", "request", "await")
        self.service_waits: set[int] = set()  # those of `waiting` held for a service's start
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
        self.registered: bool | None = None  # its Register's answer (None: not yet answered)
        self.deregistered = False  # it sent Deregister


class Started:
    """A process the kernel started for a service (a Spawn), as the machine (the spawner)
    plays it: it may say Hello and register, and it exits when the machine says."""

    def __init__(self, name: str, pid: int, now: float) -> None:
        self.name = name
        self.pid = pid
        self.started = now
        self.server: Server | None = None  # once it said Hello
        self.registered = False  # its name was registered while it ran, before any Kill
        # Who registered it: the process itself, or anyone (a launcher's child: rule 2).
        self.registrant: Server | None = None
        self.killed = False


def code_of(answer: Any) -> int:
    """The error code (or KErrNone) of an answer to a client."""
    return int(answer.result if type(answer) is Connected else answer.value)


class KernelMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clients: list[Client] = []
        self.servers: dict[str, Server] = {}
        self.next_pid = 100
        self.next_req = 1
        self.answered: collections.Counter[tuple[bytes, int]] = collections.Counter()
        self.given_ids: collections.Counter[tuple[bytes, int]] = collections.Counter()
        self.state = KernelState(kernel_pid=1, pool_slots=8, services=SERVICES.values())
        self.started: dict[str, Started] = {}  # service name -> its process while it runs
        self.failures = dict.fromkeys(SERVICES, 0)  # failed starts in a row (rule 6)
        self.retry_at = dict.fromkeys(SERVICES, 0.0)
        self.answers: list[Any] = []  # the answers to clients of the last `apply`
        self.busy: set[str] = set()  # the names served with sessions, before the last tick

    # -- applying the kernel's actions ---------------------------------------------------------

    def apply(self, actions: list[Any]) -> None:
        by_rid = {c.rid: c for c in self.clients} | {s.rid: s for s in self.all_servers()}
        self.answers = []
        for action in actions:
            if type(action) is Spawn:
                self.spawned(action.service)
                continue
            if type(action) is Kill:
                self.kill(action.key)
                continue
            if type(action) is not Send:
                continue  # (Watch, Unwatch)
            peer, message = by_rid.get(action.rid), action.message
            if isinstance(peer, Client) and self.monitor_frame(peer, message):
                continue
            if isinstance(peer, Client) and type(message) in ANSWERS:
                key = (peer.rid, message.req_id)
                self.answered[key] += 1
                assert self.answered[key] == 1, f"answered twice: {message}"
                self.answers.append(message)
                refused = REFUSED.match(getattr(message, "text", ""))
                if refused is not None:  # (rule 6: only within its restart delay)
                    name = refused.group(1)
                    assert name not in self.started and self.state.now < self.retry_at[name], (
                        f"{name} refused at {self.state.now}, retry at {self.retry_at[name]}")
                kind = peer.waiting.pop(message.req_id, None)
                peer.service_waits.discard(message.req_id)
                peer.cancellable.discard(message.req_id)
                if kind == "connect" and type(message) is Connected and message.result == 0:
                    peer.handles.add(message.handle)
            elif isinstance(peer, Server) and type(message) in (NewSession, Deliver, Disconnect):
                key = (peer.rid, message.msg_id)
                self.given_ids[key] += 1
                assert self.given_ids[key] == 1, f"given twice: {message}"
                peer.given[message.msg_id] = message
            elif isinstance(peer, Server) and type(message) is Completed and message.req_id == 1:
                assert peer.registered is None, f"a Register answered twice: {message}"
                peer.registered = message.value == errors.KErrNone
                if peer.registered:
                    self.name_registered(peer)
            elif isinstance(peer, Server) and type(message) is Terminating:
                if message.reason == TerminationReason.IDLE:
                    self.told_to_end_idle(peer)

    # -- the spawner, played ---------------------------------------------------------------------

    def all_servers(self) -> list[Server]:
        """The servers the rules started, and those the kernel started that said Hello."""
        started = [p.server for p in self.started.values() if p.server is not None]
        return list(self.servers.values()) + started

    def spawned(self, service: Service) -> None:
        name = service.name
        assert name not in self.started, f"{name} started again while its process runs"
        assert self.state.now >= self.retry_at[name], (
            f"{name} started again at {self.state.now}, before {self.retry_at[name]} "
            f"({self.failures[name]} failed starts in a row)")
        self.started[name] = Started(name, self.new_pid(), self.state.now)

    def kill(self, key: str) -> None:
        process = self.started.get(next(n for n in SERVICES if lookup_key(n) == key))
        assert process is not None, f"Kill for {key}, whose process does not run"
        assert not process.killed, f"{key} killed twice"
        process.killed = True

    def name_registered(self, server: Server) -> None:
        """`server` registered its name: if the kernel's process for it starts, it started
        (whoever registered it: rule 2)."""
        process = self.started.get(server.name)
        if process is not None and not process.killed and not process.registered:
            process.registered = True
            process.registrant = server
            self.failures[server.name] = 0

    def told_to_end_idle(self, server: Server) -> None:
        process = self.started.get(server.name)
        assert process is not None and process.registrant is server, (
            f"{server.name}: told to end for being idle, but it is not the service's server")
        assert SERVICES[server.name].idle_exit is not None, f"{server.name} has no idle exit"
        assert server.name not in self.busy, f"{server.name} told to end for being idle, busy"

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

    @rule(name=st.sampled_from(ALL_NAMES))
    def start_server(self, name: str) -> None:
        """A server the kernel did not start registers a name (one with a service too)."""
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

    @rule(data=st.data(), name=st.sampled_from(ALL_NAMES), slots=st.sampled_from([-1, 0, 1, 2]),
          answer=st.sampled_from(["accept", "accept", "refuse", "later"]))
    def connect(self, data: st.DataObject, name: str, slots: int, answer: str) -> None:
        """A client connects; its server accepts or refuses at once, or later (a connect to a
        service's name may be held while its server starts)."""
        if not self.living():
            return
        client = data.draw(st.sampled_from(self.living()))
        req_id = self.next_req = self.next_req + 1
        client.waiting[req_id] = "connect"
        if name in SERVICES:
            client.service_waits.add(req_id)
        self.send(client.rid, Connect(req_id, name, (1, 0, 0), slots, b""))
        if answer != "later":
            self.answer_newest(type_=NewSession, refuse=answer == "refuse")

    def answer_newest(self, type_: type, refuse: bool) -> None:
        """The server that was just given a `type_` completes it at once."""
        for server in self.all_servers():
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
            servers = [s for s in self.all_servers() if s.alive and s.given]
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

    @rule(data=st.data(), name=st.sampled_from(tuple(SERVICES)))
    def await_a_service(self, data: st.DataObject, name: str) -> None:
        """A client waits for a service's name (AwaitServer), which starts its server."""
        if not self.living():
            return
        client = data.draw(st.sampled_from(self.living()))
        req_id = self.next_req = self.next_req + 1
        client.waiting[req_id] = "await"
        client.service_waits.add(req_id)
        client.cancellable.add(req_id)
        self.send(client.rid, AwaitServer(req_id, name))

    @precondition(lambda self: any(p.server is None for p in self.started.values()))
    @rule(data=st.data())
    def a_started_process_registers(self, data: st.DataObject) -> None:
        """A process the kernel started says Hello and registers its name (refused if
        another server has it)."""
        process = data.draw(st.sampled_from(
            [p for _, p in sorted(self.started.items()) if p.server is None]))
        name = process.name
        server = process.server = Server(name, process.pid)
        self.apply(self.state.hello(server.rid, server.identity,
                                    Hello(int(Role.SERVER), PROTOCOL_VERSION)))
        self.send(server.rid, Register(1, name, 0, (1, 0, 0)))

    @precondition(lambda self: self.started)
    @rule(data=st.data(), seen_first=st.booleans(), status=st.integers(0, 2))
    def a_started_process_exits(self, data: st.DataObject, seen_first: bool, status: int
                                ) -> None:
        """A process the kernel started exits (of its Kill, if it was killed): its death
        seen by the kernel's watch before or after the spawner reports the exit."""
        self.exits(data.draw(st.sampled_from(sorted(self.started))), seen_first, status)

    def exits(self, name: str, seen_first: bool, status: int) -> None:
        process = self.started[name]
        server = process.server
        dies = server is not None and server.alive
        if dies and seen_first:
            self.a_started_server_dies(process)
        del self.started[name]
        how = "was killed by SIGKILL" if process.killed else f"exited with status {status}"
        self.apply(self.state.service_exited(name, how, "its output"))
        failed = [a for a in self.answers if code_of(a) < 0]
        if not process.registered:  # a failed start (rule 4), counted (rule 6)
            self.failures[name] += 1
            self.retry_at[name] = self.state.now + restart_delay(self.failures[name])
            code = errors.KErrTimedOut if process.killed else errors.KErrNotFound
            said = "did not register within" if process.killed else "before it registered"
            assert all(code_of(a) == code and said in a.text and not REFUSED.match(a.text)
                       for a in failed), (code, failed)
        else:
            assert not failed, f"a start that succeeded failed: {failed}"
        if dies and not seen_first:
            self.a_started_server_dies(process)

    @precondition(lambda self: any(
        p.server is not None and p.server.registered and not p.server.deregistered
        for p in self.started.values()))
    @rule(data=st.data())
    def a_started_server_deregisters(self, data: st.DataObject) -> None:
        """A server the kernel started ends its registration, and lingers (once its
        registration has ended, it is killed if it has not exited within the grace)."""
        server = data.draw(st.sampled_from(
            [p.server for _, p in sorted(self.started.items()) if p.server is not None
             and p.server.registered and not p.server.deregistered]))
        server.deregistered = True
        self.send(server.rid, Deregister(2))

    def a_started_server_dies(self, process: Started) -> None:
        assert process.server is not None
        process.server.alive = False
        process.server.given.clear()
        self.apply(self.state.process_died(process.server.identity.key))

    @precondition(lambda self: self.started or self.state.next_activation_deadline() is not None
                  or any(at > self.state.now for at in self.retry_at.values()))
    @rule(step=st.sampled_from([0.5, 1.0, 2.0, 4.0, "deadline"]))
    def time_passes(self, step: float | str) -> None:
        """The clock advances (to the next deadline, or by `step` seconds); the loop ticks."""
        deadline = self.state.next_activation_deadline()
        if step == "deadline":
            if deadline is None:
                return
            self.state.now = max(self.state.now, deadline)
        else:
            assert isinstance(step, float)
            self.state.now += step
        self.busy = {s.name for s in self.state.servers.values() if s.sessions}
        self.apply(self.state.activation_tick())
        after = self.state.next_activation_deadline()
        assert after is None or after > self.state.now, (after, self.state.now)

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
        """(Connects and waits for a service's name wait for its server to start.)"""
        if not any(s.alive for s in self.all_servers()):
            for client in self.living():
                pending = set(client.waiting) - client.service_waits
                assert not pending, f"pending with no server alive: {client.waiting}"

    @invariant()
    def a_service_is_where_its_process_is(self) -> None:
        """(`activatable()`, what ``ipcfw ps`` shows, and the failed starts in a row (rule
        6), against the machine's own account.)"""
        for name, where in self.state.activatable():
            activation = self.state.activations.get(lookup_key(name))
            assert activation is not None and activation.failures == self.failures[name], (
                name, activation, self.failures[name])
            process = self.started.get(name)
            if process is None:
                assert where in ("activatable", "running"), (name, where)  # (running: not its)
            elif not process.registered:
                assert where == "starting", (name, where)
            else:
                assert where in ("running", "stopping"), (name, where)
                record = self.state.servers.get(lookup_key(name))
                # (running: while the name is registered; once that ends, stopping)
                assert where == "stopping" or record is not None, (name, where)
                if where == "stopping" and record is not None and process.registrant is not None:
                    # (its registration ends: told to end, it does not serve new sessions)
                    assert record.rid != process.registrant.rid or record.terminating, record

    @invariant()
    def every_timer_is_counted_in_the_next_deadline(self) -> None:
        """A process told to end (or whose registration ended) has its kill timed, and the
        next deadline is never later than any timer."""
        deadline = self.state.next_activation_deadline()
        for activation in self.state.activations.by_key.values():
            if activation.phase is Phase.STOPPING and not activation.killed:
                assert activation.deadline is not None, activation
            timers = [activation.deadline]
            if activation.idle_since is not None and activation.service.idle_exit is not None:
                timers.append(activation.idle_since + activation.service.idle_exit)
            for timer in timers:
                if timer is not None:
                    assert deadline is not None and deadline <= timer, (deadline, activation)
            if activation.phase is Phase.STOPPING and activation.deadline is not None:
                assert activation.deadline <= self.state.now + STOP_GRACE, activation

    @invariant()
    def an_idle_timer_runs_only_while_the_server_has_no_session(self) -> None:
        for key, activation in self.state.activations.by_key.items():
            server = self.state.servers.get(key)
            if activation.idle_since is not None and server is not None:
                assert not server.sessions, (activation, server.sessions)

    @invariant()
    def nothing_is_held_for_a_gone_channel(self) -> None:
        living = {c.rid for c in self.living()}
        activations = self.state.activations
        held = collections.Counter(
            rid for a in activations.by_key.values() for rid, _ in a.held
        )
        assert held == collections.Counter(activations.held_per_channel), (
            held, activations.held_per_channel)
        assert set(held) <= living, f"held for gone channels: {set(held) - living}"
        waiting = {rid for waits in self.state.awaits.values() for rid, _ in waits}
        assert waiting <= living, f"waits of gone channels: {waiting - living}"

    @invariant()
    def nothing_is_held_for_a_name_that_is_served(self) -> None:
        for key, activation in self.state.activations.by_key.items():
            if activation.held or self.state.awaits.get(key):
                server = self.state.servers.get(key)
                assert server is None or server.terminating is not None, (key, server)
                # (a process that will serve them runs: it starts, or its registration ends)
                assert activation.phase is not Phase.ACTIVATABLE, (key, activation)

    @invariant()
    def a_starting_process_has_its_kill_timed(self) -> None:
        deadline = self.state.next_activation_deadline()
        for name, process in self.started.items():
            if not process.registered and not process.killed:
                latest = process.started + SERVICES[name].start_timeout
                assert deadline is not None and deadline <= latest, (name, deadline, latest)

    def teardown(self) -> None:
        for name in list(self.servers):
            self.a_server_dies(name)
        for _ in range(4):  # (an exit after a registration may start the service again)
            for name in list(self.started):
                self.exits(name, seen_first=False, status=1)
        assert not self.started, f"started again and again: {list(self.started)}"
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
        activations = self.state.activations
        assert not activations.held_per_channel and not activations.timed
        assert self.state.next_activation_deadline() is None and not self.state.awaits
        for activation in activations.by_key.values():
            assert activation.phase is Phase.ACTIVATABLE and not activation.held, activation


TestKernelStateMachine = KernelMachine.TestCase
# With activation the machine has more to reach (an idle server with a session, a lingering
# one...): at least 600 examples (the ci profile's 200 would be ~4 s; these are ~10 s).
TestKernelStateMachine.settings = settings(
    max_examples=max(settings.default.max_examples, 600)
)
# A failure is shrunk to its shortest steps, which takes minutes, not the run's seconds: the
# global 60 s would cut it short and report a timeout instead of the steps.
TestKernelStateMachine = pytest.mark.timeout(300)(TestKernelStateMachine)
