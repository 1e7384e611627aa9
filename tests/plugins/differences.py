"""A server plugin for tests/test_symbian_differences.py: scenarios ported from Symbian's own
kernel tests (e32test), where ipcfw once differed from Symbian or still does, by design.

It records what happened to it (connects, server panics it saw) for the tests to read
(`EEvents`), and it can hold a connect in ``NewSessionL`` so that a test can make a second
connect overlap it:

* a client asking for build `GATED` makes ``NewSessionL`` create the file ``entered`` in the
  directory named by ``IPCFW_TEST_GATE``, then wait (at most `GATE_TIMEOUT` seconds) until the
  test creates the file ``open`` there;
* a client asking for build `SLOW` makes ``NewSessionL`` take `SLOW_SECONDS`.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

from ipcfw import (
    CServer,
    CSession,
    EGlobalSharableSessions,
    IpcError,
    KErrNone,
    KErrNotSupported,
    KErrTimedOut,
    RMessage,
    ServerPanic,
    TVersion,
)

EConnects = 1  # complete with how many GATED or SLOW connects reached NewSessionL
# WriteL(0, ALIAS_WRITE); write ReadL(1) into arg 2; if Int3(), WriteL(1, ALIAS_WRITE_1)
EAliased = 2
EOpenZero = 3  # write handle 0 into arg 3 (a subsession create) and complete with KErrNone
ECompleteThenPanic = 4  # Complete(Int0()), then Complete() and Panic() again: record both
EPanicThenComplete = 5  # Panic("DIFF", Int0()), then Panic() and Complete() again: record both
EEvents = 6  # write the recorded events (JSON) into writable arg 0
ESlowOpen = 7  # sleep SLOW_SECONDS, then open a subsession (NewSubSessionL) and complete
ESubSessions = 8  # complete with the number of subsessions open in this session

GATED = 7  # the build number of a connect held in NewSessionL until the test opens the gate
SLOW = 8  # the build number of a connect whose NewSessionL takes SLOW_SECONDS
GATE_TIMEOUT = 10.0
SLOW_SECONDS = 0.3
ALIAS_WRITE = b"written through 0"
ALIAS_WRITE_1 = b"through 1"


def recorded_events(session) -> list:
    """What the server recorded (EEvents), read through the client's `session`."""
    buffer = bytearray(1 << 16)
    session.SendReceive(EEvents, (buffer,))
    return json.loads(buffer)


class _SubSession:
    def Close(self) -> None:
        pass


class DifferencesSession(CSession):
    def ServiceL(self, message: RMessage) -> None:
        server: DifferencesServer = self.Server()
        function = message.Function()
        if function == EConnects:
            message.Complete(server.held_connects)
        elif function == EAliased:
            message.WriteL(0, ALIAS_WRITE)
            message.WriteL(2, message.ReadL(1))
            if message.Int3():
                message.WriteL(1, ALIAS_WRITE_1)
            message.Complete(message.GetDesLength(1))
        elif function == EOpenZero:
            message.WriteL(3, struct.pack("<i", 0))
            message.Complete(KErrNone)
        elif function == ECompleteThenPanic:
            message.Complete(message.Int0())
            server.attempt("complete-again", lambda: message.Complete(1))
            server.attempt("panic-after-complete", lambda: message.Panic("DIFF", 1))
        elif function == EPanicThenComplete:
            message.Panic("DIFF", message.Int0())
            server.attempt("panic-again", lambda: message.Panic("DIFF", 3))
            server.attempt("complete-after-panic", lambda: message.Complete(0))
        elif function == EEvents:
            data = json.dumps(server.events).encode()
            message.WriteL(0, data)
            message.Complete(len(data))
        elif function == ESlowOpen:
            time.sleep(SLOW_SECONDS)
            self.NewSubSessionL(message, _SubSession())
            message.Complete(KErrNone)
        elif function == ESubSessions:
            message.Complete(len(self.ObjectIx()))
        else:
            raise IpcError(KErrNotSupported, f"differences has no function {function}")


class DifferencesServer(CServer):
    name = "differences"
    version = TVersion(1, 0, 99)
    sharing = EGlobalSharableSessions
    session_class = DifferencesSession

    def __init__(self) -> None:
        self.events: list = []
        self.held_connects = 0

    def attempt(self, label: str, call) -> None:
        """Make a call that must raise ServerPanic; record what it raised (or that it did not)."""
        try:
            call()
        except ServerPanic as exc:
            self.events.append([label, exc.category, exc.reason, str(exc)])
        else:
            self.events.append([label, "no ServerPanic"])

    def NewSessionL(self, version: TVersion, message: RMessage) -> CSession:
        if version.build == GATED:
            self.held_connects += 1
            self._wait_at_gate()
        elif version.build == SLOW:
            self.held_connects += 1
            time.sleep(SLOW_SECONDS)
        return super().NewSessionL(version, message)

    @staticmethod
    def _wait_at_gate() -> None:
        gate = Path(os.environ["IPCFW_TEST_GATE"])
        (gate / "entered").touch()
        deadline = time.monotonic() + GATE_TIMEOUT
        while not (gate / "open").exists():
            if time.monotonic() > deadline:
                raise IpcError(
                    KErrTimedOut, f"nobody opened the gate in {gate} within {GATE_TIMEOUT} s"
                )
            time.sleep(0.005)
