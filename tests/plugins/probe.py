"""A server plugin for tests: each function exercises one part of the server API and the
server records what happened to it (connects, requests, disconnects) for the tests to read."""

from __future__ import annotations

import json
import threading
import time

from ipcfw import (
    CServer,
    CSession,
    EGlobalSharableSessions,
    IpcError,
    KErrNotFound,
    KErrNotSupported,
    KErrPermissionDenied,
    RMessage,
    TVersion,
)

EEcho = 1  # complete with Int0
EHold = 2  # keep the message under tag Int0
ECompleteHeld = 3  # complete the held tag Int0 with Int1, now
ECompleteHeldLater = 4  # complete the held tag Int0 with Int1 from another thread after Int2 ms
EPanic = 5  # panic the client: category "PROBE", reason Int0
ERaise = 6  # raise ValueError
ERaiseIpc = 7  # raise IpcError(Int0)
ECompleteTwice = 8  # complete with 1, then again with 2
EEvents = 9  # write the recorded events (JSON) into writable arg 0
EClient = 10  # write message.Client() (JSON) into writable arg 0
ETryWrite = 11  # WriteL(1, ReadL(0), offset=Int2); complete with 0, or -code of the error seen
ETryRead = 12  # complete with len(ReadL(1)), or -code of the error seen
ESleep = 13  # sleep Int0 ms, then complete with Int1
EDesInfo = 14  # complete with GetDesLength(0) * 1000 + GetDesMaxLength(0)
EEchoShuffled = 15  # complete with Int0, out of order: held in batches, latest first
ERecord = 16  # record ["arg", handle, Int0] (the order requests arrive in), complete with Int0

REJECT_BUILD = 99  # NewSessionL refuses clients asking for build 99 with KErrPermissionDenied
FAIL_CREATE_BUILD = 98  # CreateL raises ValueError for build 98


def recorded_events(session) -> list:
    """What the probe server recorded (EEvents), read through the client's `session`."""
    buffer = bytearray(1 << 18)
    session.SendReceive(EEvents, (buffer,))
    return json.loads(buffer)


class ProbeSession(CSession):
    def CreateL(self) -> None:
        server = self.Server()
        if server.last_version.build == FAIL_CREATE_BUILD:
            raise ValueError("CreateL failed on purpose")
        server.record("connect", self._handle)

    def ServiceL(self, message: RMessage) -> None:
        server: ProbeServer = self.Server()
        function = message.Function()
        server.record("service", self._handle, function)
        handler = _HANDLERS.get(function)
        if handler is None:
            raise IpcError(KErrNotSupported, f"probe has no function {function}")
        handler(server, message)

    def Cancelled(self, message: RMessage) -> None:
        self.Server().record("cancelled", self._handle, message.Function(), message.Int0())

    def Disconnect(self, message: RMessage) -> None:
        self.Server().record("disconnect", self._handle)
        message.Complete(0)


def _echo(server: ProbeServer, message: RMessage) -> None:
    message.Complete(message.Int0())


def _hold(server: ProbeServer, message: RMessage) -> None:
    server.held[message.Int0()] = message


def _complete_held(server: ProbeServer, message: RMessage) -> None:
    held = server.held.pop(message.Int0(), None)
    if held is None:
        message.Complete(KErrNotFound)
        return
    held.Complete(message.Int1())
    message.Complete(0)


def _complete_held_later(server: ProbeServer, message: RMessage) -> None:
    held = server.held.pop(message.Int0(), None)
    if held is None:
        message.Complete(KErrNotFound)
        return
    value, delay = message.Int1(), message.Int2() / 1000

    def later() -> None:
        time.sleep(delay)
        held.Complete(value)

    thread = threading.Thread(target=later, name="probe-later")
    server.threads.append(thread)
    thread.start()
    message.Complete(0)


def _panic(server: ProbeServer, message: RMessage) -> None:
    message.Panic("PROBE", message.Int0())


def _raise(server: ProbeServer, message: RMessage) -> None:
    raise ValueError("probe raised on purpose")


def _raise_ipc(server: ProbeServer, message: RMessage) -> None:
    raise IpcError(message.Int0(), "probe left on purpose")


def _complete_twice(server: ProbeServer, message: RMessage) -> None:
    message.Complete(1)
    try:
        message.Complete(2)
    except Exception as exc:  # the ServerPanic the framework must raise
        server.record("second-complete", type(exc).__name__, str(exc))
        raise


def _events(server: ProbeServer, message: RMessage) -> None:
    data = json.dumps(server.events).encode()
    message.WriteL(0, data)
    message.Complete(len(data))


def _client(server: ProbeServer, message: RMessage) -> None:
    client = message.Client()
    data = json.dumps({**client._asdict(), "capabilities": sorted(client.capabilities)}).encode()
    message.WriteL(0, data)
    message.Complete(len(data))


def _try(message: RMessage, operation) -> None:
    try:
        result = operation()
    except IpcError as exc:
        message.Complete(-exc.code)  # positive: the server saw the error, the client did not
        return
    message.Complete(result or 0)


def _try_write(server: ProbeServer, message: RMessage) -> None:
    _try(message, lambda: message.WriteL(1, message.ReadL(0), message.Int2()))


def _try_read(server: ProbeServer, message: RMessage) -> None:
    _try(message, lambda: len(message.ReadL(1)))


def _sleep(server: ProbeServer, message: RMessage) -> None:
    time.sleep(message.Int0() / 1000)
    message.Complete(message.Int1())


def _echo_shuffled(server: ProbeServer, message: RMessage) -> None:
    with server.shuffle_lock:
        server.shuffled.append(message)
        if len(server.shuffled) < 8:
            server.ensure_flusher()
            return
        batch, server.shuffled = server.shuffled, []
    for held in reversed(batch):
        held.Complete(held.Int0())


def _record(server: ProbeServer, message: RMessage) -> None:
    server.record("arg", message.Session()._handle, message.Int0())
    message.Complete(message.Int0())


def _des_info(server: ProbeServer, message: RMessage) -> None:
    message.Complete(message.GetDesLength(0) * 1000 + message.GetDesMaxLength(0))


_HANDLERS = {
    EEcho: _echo,
    EHold: _hold,
    ECompleteHeld: _complete_held,
    ECompleteHeldLater: _complete_held_later,
    EPanic: _panic,
    ERaise: _raise,
    ERaiseIpc: _raise_ipc,
    ECompleteTwice: _complete_twice,
    EEvents: _events,
    EClient: _client,
    ETryWrite: _try_write,
    ETryRead: _try_read,
    ESleep: _sleep,
    EDesInfo: _des_info,
    EEchoShuffled: _echo_shuffled,
    ERecord: _record,
}


class ProbeServer(CServer):
    name = "probe"
    version = TVersion(1, 2, 0)
    sharing = EGlobalSharableSessions
    session_class = ProbeSession

    def __init__(self) -> None:
        self.events: list = []
        self.held: dict[int, RMessage] = {}
        self.threads: list[threading.Thread] = []
        self.last_version = TVersion(0, 0, 0)
        self.shuffled: list[RMessage] = []
        self.shuffle_lock = threading.Lock()
        self.flusher: threading.Thread | None = None

    def ensure_flusher(self) -> None:
        """Completes what EEchoShuffled holds when no full batch comes (from another thread)."""
        if self.flusher is None:
            self.flusher = threading.Thread(
                target=self._flush_shuffled, name="probe-flusher", daemon=True
            )
            self.flusher.start()

    def _flush_shuffled(self) -> None:
        while True:
            time.sleep(0.005)
            with self.shuffle_lock:
                batch, self.shuffled = self.shuffled, []
            for held in reversed(batch):
                held.Complete(held.Int0())

    def record(self, *event: object) -> None:
        self.events.append(list(event))

    def NewSessionL(self, version: TVersion, message: RMessage) -> CSession:
        self.last_version = version
        if version.build == REJECT_BUILD:
            raise IpcError(KErrPermissionDenied, "probe refuses build 99")
        return super().NewSessionL(version, message)


class KernelPathProbeServer(ProbeServer):
    """The probe, taking no direct connections: every session uses the kernel path."""

    name = "probe-kernel-path"
    direct = False
