"""A hypothesis state machine over a server's pure state (ipcfw.server.state), playing the
kernel: it sends connects, requests, cancels, disconnects and client deaths in any order, some
of them for sessions that do not exist; the plugin completes some requests at once, holds
others and completes them later, raises on some. After every step:

* nothing escapes ``receive`` (what the kernel sends is never the server's crash);
* each message the kernel gave is answered at most once, and a request or connect is answered
  exactly once by the time its session is disconnected;
* the state forgets a session, and every request it held, at its disconnect.

The same profiles as tests/kernel/test_kernel_properties.py (`ci` by default,
``HYPOTHESIS_PROFILE=long`` locally).
"""

from __future__ import annotations

import collections
import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from ipcfw.protocol import (
    Cancelled,
    Complete,
    Deliver,
    Disconnect,
    Negotiated,
    NewSession,
    Panic,
    PeerGone,
    PeerInfo,
    decode,
)
from ipcfw.server import CServer, CSession, RMessage
from ipcfw.server.overlay import Layers
from ipcfw.server.state import ServerState

settings.register_profile("ci", max_examples=150, stateful_step_count=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=3000, stateful_step_count=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

EComplete, EHold, ERaise, EPanic = 1, 2, 3, 4
CLIENTS = (1, 2)


class Session(CSession):
    def ServiceL(self, message: RMessage) -> None:
        function = message.Function()
        if function == EComplete:
            message.Complete(7)
        elif function == EHold:
            self.Server().held.append(message)
        elif function == ERaise:
            raise ValueError("the plugin's bug")
        else:
            message.Panic("PROPERTY", 1)


class Server(CServer):
    name = "property"
    session_class = Session

    def __init__(self) -> None:
        self.held: list[RMessage] = []


class Loop:
    def on_loop_thread(self) -> bool:
        return True

    def call_soon(self, fn: Any) -> None:
        fn()


class ServerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.server = Server()
        self.state = ServerState(Layers(self.server, Loop()), self.emitted, max_frame=1 << 20)
        self.answers: collections.Counter[int] = collections.Counter()
        self.given: dict[int, int | None] = {}  # msg_id -> its session's handle (None: dead)
        self.sessions: set[int] = set()
        self.next_msg = 1000
        for client in CLIENTS:
            self.state.receive(PeerInfo(client, 100 + client, 1000, 1000, "/bin/client"))

    def emitted(self, frame: bytes) -> None:
        message = decode(frame)
        if type(message) in (Complete, Negotiated, Panic):
            self.answers[message.msg_id] += 1
            assert self.answers[message.msg_id] == 1, f"answered twice: {message}"

    def msg_id(self) -> int:
        self.next_msg += 1
        return self.next_msg

    def receive(self, message: Any) -> None:
        assert self.state.receive(message) is None  # (only a deregistration ends it)

    # -- the kernel's messages ------------------------------------------------------------------

    @rule(handle=st.integers(1, 4), client=st.sampled_from(CLIENTS))
    def connect(self, handle: int, client: int) -> None:
        if handle in self.sessions:
            return  # (the kernel never reuses a live handle)
        msg_id = self.msg_id()
        self.given[msg_id] = handle
        self.receive(NewSession(msg_id, handle, (1, 0, 0), client, b""))
        assert self.answers[msg_id] == 1  # a connect is answered at once, either way
        self.sessions.add(handle)

    @rule(handle=st.integers(1, 5), function=st.sampled_from([EComplete, EHold, EHold, ERaise,
                                                               EPanic]),
          client=st.sampled_from(CLIENTS))
    def request(self, handle: int, function: int, client: int) -> None:
        msg_id = self.msg_id()
        self.given[msg_id] = handle
        self.receive(Deliver(msg_id, handle, function, (1,), client))
        if handle not in self.sessions:
            assert self.answers[msg_id] == 1  # refused at once (KErrBadHandle)

    @rule(data=st.data())
    def complete_a_held_one(self, data: st.DataObject) -> None:
        if not self.server.held:
            return
        message = self.server.held.pop(data.draw(st.integers(0, len(self.server.held) - 1)))
        if not message.IsNull():
            message.Complete(3)

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        waiting = [m for m, h in self.given.items() if h is not None and not self.answers[m]]
        if not waiting:
            return
        msg_id = data.draw(st.sampled_from(waiting))
        self.receive(Cancelled(msg_id, self.given[msg_id] or 0))
        # The kernel answered the client; the server's later Complete is dropped there. Here,
        # the message is no longer the plugin's to complete: IsNull.
        self.given[msg_id] = None

    @rule(handle=st.integers(1, 5))
    def disconnect(self, handle: int) -> None:
        msg_id = self.msg_id()
        self.receive(Disconnect(msg_id, handle))
        assert self.answers[msg_id] == 1  # the default Disconnect completes at once
        self.sessions.discard(handle)
        for given, owner in self.given.items():
            if owner == handle:
                self.given[given] = None  # the kernel answered what the session still held

    @rule(client=st.sampled_from(CLIENTS))
    def a_client_dies(self, client: int) -> None:
        self.receive(PeerGone(client))
        self.receive(PeerInfo(client, 200 + client, 1000, 1000, "/bin/again"))  # (a new one)

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def the_state_holds_only_live_sessions(self) -> None:
        assert set(self.state.sessions) == self.sessions
        stats = self.state.statistics()
        assert stats["sessions"] == len(self.sessions)

    def teardown(self) -> None:
        for handle in sorted(self.sessions):
            self.disconnect(handle)
        stats = self.state.statistics()
        assert stats["sessions"] == 0 and stats["in_service"] == 0, stats


TestServerStateMachine = ServerMachine.TestCase
