"""Hostile input, with real processes: a flooding peer against the kernel, bad arguments in the
client library, and a garbage-sending "kernel" against a server host (DESIGN.md section 3, last
bullet: bad input gets a clear error or a client panic, never a crash, and never a lost or
duplicated completion for anyone else).

The garbage itself is in tests/hostile_frames.py, the flooding process is tests/hostile_flood.py
(its raw sockets are reused here), and tests/hostile_fill.py is a server that fills every writable
descriptor to its max length.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from collections.abc import Callable

import pytest
import zmq

from conftest import PYTHONPATH, TESTS, KernelFixture, ManagedProcess, wait_until
from hostile_fill import EFill
from hostile_flood import Flood, RawPeer
from hostile_frames import NOT_SERVER_BOUND, SERVER_BOUND, malformed_frames
from ipcfw import (
    BadArgument,
    BadName,
    ClientPanic,
    RSession,
    TRequestStatus,
)
from ipcfw.client import shm as client_shm
from ipcfw.errors import (
    KErrArgument,
    KErrBadHandle,
    KErrDied,
    KErrNone,
    KErrNotSupported,
    KErrPermissionDenied,
)
from ipcfw.protocol import (
    Negotiated,
    PROTOCOL_VERSION,
    MAX_FRAME,
    MAX_PAYLOAD,
    Complete,
    Completed,
    Connect,
    Connected,
    Deliver,
    Disconnect,
    Hello,
    Message,
    Mode,
    NewSession,
    PeerInfo,
    ProtocolError,
    Register,
    Request,
    Role,
    Stats,
    StatsReply,
    Welcome,
    decode,
    encode,
)
from plugins.probe import EClient, EEcho, EEvents, ETryWrite

PROBE = "plugins.probe:ProbeServer"


# -- 1. a flooding peer against the kernel -------------------------------------------------------


class GoodClient(threading.Thread):
    """A well-behaved client thread: sync, async and descriptor calls on its own session, checked,
    until told to finish (then `rounds_after` more rounds). Failures are collected, not raised."""

    def __init__(self, rounds_after: int = 100) -> None:
        super().__init__(name="good-client")
        self.rounds_after = rounds_after
        self.handle = 0
        self.connected = threading.Event()
        self.finish = threading.Event()
        self.calls = 0
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            with RSession.connect("probe") as session:
                self.handle = session.Handle()
                self.connected.set()
                number, after = 0, 0
                while after < self.rounds_after:
                    number += 1
                    self._round(session, number)
                    self.calls += 3
                    after += self.finish.is_set()
        except BaseException:
            self.errors.append(traceback.format_exc())
        finally:
            self.connected.set()

    @staticmethod
    def _round(session: RSession, number: int) -> None:
        assert session.SendReceive(EEcho, (number,), timeout=10) == number
        status = TRequestStatus()
        session.SendReceive(EEcho, (number + 1_000_000,), status)
        assert status.result(timeout=10) == number + 1_000_000
        buffer = bytearray(b"zz" + bytes(6))
        assert session.SendReceive(ETryWrite, (b"abcd", buffer, 2), timeout=10) == 0
        assert buffer == b"zzabcd"


_REJECTED = re.compile(
    r"rejected (?P<kind>[^:]+): (?P<detail>.+) \(further ones are counted, not logged\)$"
)


def test_kernel_survives_a_hostile_flood_and_serves_others(kernel: KernelFixture) -> None:
    kernel.serve(PROBE, "probe")
    client = GoodClient()
    client.start()
    try:
        assert client.connected.wait(10) and client.handle, (
            f"good client did not connect: {client.errors}"
        )
        wait_until(lambda: client.calls >= 30 or client.errors,
                   what="the good client's first calls")
        flood = kernel.spawn_client(
            [str(TESTS / "hostile_flood.py"), kernel.endpoint, str(client.handle)], label="flood"
        )
        # The flood's first frames are valid messages before Hello: their rejection marks its start.
        wait_until(lambda: "rejected no hello" in kernel.process.log() or not flood.alive(),
                   what="the flood to start")
        calls_at_start = client.calls
        wait_until(lambda: not flood.alive() or client.errors, timeout=40,
                   what="the flood to finish")
        calls_during_flood = client.calls - calls_at_start
    finally:
        client.finish.set()
        client.join(timeout=30)
    assert not client.is_alive(), "the good client is stuck"
    assert not client.errors, "the good client failed:\n" + "\n".join(client.errors)
    assert calls_during_flood > 0, "the good client made no call while the flood ran"

    flood.stop()
    output = flood.log()
    assert flood.popen.returncode == 0, f"the flood found problems:\n{output[-5000:]}"
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["sent"] >= 2000 and not summary["problems"], summary
    # Every refusal, of async requests too, came back on the requesting channel; none to the inbox.
    assert summary["channel: KERN-EXEC panics"] == 40 * 4 * 3 + 1
    assert summary["channel: KERN-EXEC panics of async requests"] == 40 * 4
    assert summary["inbox: unexpected"] == []
    assert summary["holds overflowed"] == 88

    assert kernel.process.alive(), f"the kernel died:\n{kernel.process.log()}"
    # Everything the flood created is gone once it has exited and the probe has completed the
    # Disconnects: its sessions (one holding 512 messages), its server, its process.
    expected = {"sessions": 0, "messages": 0, "pool_used": 0, "servers": 1, "processes": 2}

    def settled() -> bool:
        stats = kernel.statistics()
        return {name: stats[name] for name in expected} == expected

    wait_until(settled, what=f"kernel statistics to settle at {expected}")

    log = kernel.process.log()
    assert "Traceback" not in log and "invariant" not in log, log[-5000:]
    lines = [line for line in log.splitlines() if "rejected" in line]
    assert len(lines) <= 20, "\n".join(lines)
    kinds = collections.Counter()
    for line in lines:
        match = _REJECTED.search(line)
        assert match, f"a rejection that does not name its kind and reason: {line}"
        assert match["detail"].strip(), line
        kinds[match["kind"]] += 1
    assert all(count == 1 for count in kinds.values()), kinds
    # The flood reached each of these checks (each is logged once, then counted).
    for kind in ("malformed frame", "frame count", "no hello", "wrong direction", "wrong role",
                 "not a server", "close of a handle not held", "second inbox"):
        assert kind in kinds, f"no rejection of kind {kind!r} in:\n" + "\n".join(lines)
    # An async request from a process without an inbox is no violation: it is answered on its
    # channel.
    assert "async without inbox" not in kinds, kinds


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_misusing_another_threads_session_leaves_its_owner_unaffected(
    kernel: KernelFixture, mode: str
) -> None:
    kernel.serve(PROBE, "probe")
    with RSession.connect("probe") as session:
        assert session.SendReceive(EEcho, (1,), timeout=10) == 1
        outcome: list[object] = []

        def intruder() -> None:
            try:
                if mode == "sync":
                    session.SendReceive(EEcho, (2,), timeout=10)
                else:
                    status = TRequestStatus()
                    session.SendReceive(EEcho, (2,), status)
                    outcome.append(status.Wait(timeout=10))
                    status.result(0)
            except ClientPanic as exc:
                outcome.append((exc.category, exc.reason))

        thread = threading.Thread(target=intruder, name="intruder")
        thread.start()
        thread.join(timeout=15)
        expected = [("KERN-EXEC", 0)] if mode == "sync" else [KErrDied, ("KERN-EXEC", 0)]
        assert outcome == expected  # the intruder is panicked, as it should be ...
        assert session.SendReceive(EEcho, (3,), timeout=10) == 3  # ... and the owner is not


def test_writable_max_lengths_cannot_disconnect_a_server(kernel: KernelFixture) -> None:
    # Once a bug: a server that filled such descriptors sent a completion over the kernel's
    # MAXMSGSIZE, libzmq dropped its connection without a word, and the kernel deregistered it and
    # failed every client with KErrServerTerminated. The kernel now refuses the request itself.
    kernel.serve("hostile_fill:FillServer", "fill")
    flood = Flood(kernel.endpoint)
    try:
        with RSession.connect("fill") as bystander:
            assert bystander.SendReceive(EFill, (bytearray(10),), timeout=10) == 10
            raw = RawPeer(flood, "raw client")
            raw.hello(Role.CHANNEL)
            raw.send_message(Connect(1, "fill", (1, 0, 0), -1, b""))
            connected = raw.reply_to(1, Connected)
            assert connected is not None and connected.result == KErrNone, flood.problems
            # A 60-byte frame declaring two writable descriptors of MAX_FRAME bytes each.
            raw.send_message(Request(2, connected.handle, EFill,
                                     ((b"", MAX_FRAME), (b"", MAX_FRAME)), int(Mode.SYNC)))
            reply = raw.wait_for("the answer to the request",
                                 lambda m: getattr(m, "req_id", None) == 2)
            assert reply is not None, flood.problems
            # A clear refusal for the offender, on its channel (the kernel checks the max
            # lengths) ...
            assert reply == Completed(2, KErrArgument, ()), reply
            # ... and the server keeps its name and its other clients.
            assert bystander.SendReceive(EFill, (bytearray(10),), timeout=10) == 10
            assert kernel.statistics()["servers"] == 1
    finally:
        flood.close()


# -- 2. bad arguments never leave the client ---------------------------------------------------


def _request_cases() -> list[tuple[str, object, object, type, str]]:
    """(label, function, args, exception, pattern the message must contain)."""
    return [
        ("str argument", EEcho, ("text",), TypeError, r"argument 0: str"),
        ("float argument", EEcho, (1, 2.5), TypeError, r"argument 1: float"),
        ("None argument", EEcho, (None,), TypeError, r"argument 0: NoneType"),
        ("list argument", EEcho, ([1],), TypeError, r"argument 0: list"),
        ("dict argument", EEcho, ({},), TypeError, r"argument 0: dict"),
        ("memoryview argument", EEcho, (memoryview(b"x"),), TypeError, r"argument 0: memoryview"),
        ("5 arguments", EEcho, (1, 2, 3, 4, 5), ValueError, r"at most 4 arguments, got 5"),
        ("int 2**31", EEcho, (2**31,), ValueError, r"argument 0: 2147483648"),
        ("int -2**31-1", EEcho, (0, -(2**31) - 1), ValueError, r"argument 1: -2147483649"),
        ("args a str", EEcho, "abc", TypeError, r"args must be"),
        ("args an int", EEcho, 5, TypeError, r"args must be"),
        ("function -1", -1, (), ValueError, r"function must be in 0\.\.2\*\*31-1, got -1"),
        ("function 2**31", 2**31, (), ValueError, r"function .* got 2147483648"),
        ("function '1'", "1", (), TypeError, r"function must be an int, not str"),
        ("function 1.0", 1.0, (), TypeError, r"function must be an int, not float"),
        # (On the direct path a descriptor is not in the frame: its limit is MAX_MAPPED, which
        # the test lowers to MAX_FRAME so as not to allocate a GiB.)
        ("oversized request", EEcho, (b"\0" * (MAX_FRAME + 1),), ValueError,
         rf"request of \d+ bytes exceeds the kernel's limit of {MAX_FRAME} bytes"
         rf"|larger than a direct connection carries \({MAX_FRAME} bytes\)"),
    ]


def _connect_cases() -> list[tuple[str, dict, type, str]]:
    """(label, CreateSession keyword arguments, exception, pattern)."""
    return [
        ("message_slots 256", {"message_slots": 256}, BadArgument, r"message_slots .* got 256"),
        ("message_slots -2", {"message_slots": -2}, BadArgument, r"message_slots .* got -2"),
        ("message_slots '1'", {"message_slots": "1"}, TypeError, r"message_slots must be an int"),
        ("name with *", {"name": "pro*be"}, BadName, r"'pro\*be' contains '\*'"),
        ("empty name", {"name": ""}, BadName, r"server name must be 1\.\.80 characters, got 0"),
        ("81-character name", {"name": "p" * 81}, BadName, r"got 81"),
        ("name not a str", {"name": 5}, BadName, r"must be a str, not int"),
        ("version of 4 parts", {"version": (1, 2, 3, 4)}, TypeError, r"version must be"),
        ("version major 128", {"version": (128, 0, 0)}, ValueError, r"version \(128, 0, 0\)"),
        ("version part a str", {"version": (1, "0", 0)}, ValueError, r"version \(1, '0', 0\)"),
    ]


def _events(session: RSession) -> list:
    buffer = bytearray(1 << 20)
    length = session.SendReceive(EEvents, (buffer,), timeout=10)
    assert len(buffer) == length
    return json.loads(bytes(buffer))


def _raises(call: Callable[[], object], exception: type, pattern: str) -> str | None:
    """None if `call` raises `exception` with `pattern` in its message, else what went wrong."""
    try:
        call()
    except exception as exc:
        if re.search(pattern, str(exc)):
            return None
        return f"raised {type(exc).__name__}({str(exc)!r}), not matching {pattern!r}"
    except BaseException as exc:  # noqa: BLE001 - reported as a failure of the case
        return f"raised {type(exc).__name__}({exc!r}), expected {exception.__name__}"
    return f"raised nothing, expected {exception.__name__}"


def test_bad_arguments_are_refused_before_anything_is_sent(
    kernel: KernelFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_shm, "MAX_MAPPED", MAX_FRAME)
    kernel.serve(PROBE, "probe")
    with RSession.connect("probe") as session:
        handle = session.Handle()
        before = _events(session)
        stats_before = kernel.statistics()
        failures = []
        for label, function, args, exception, pattern in _request_cases():
            status = TRequestStatus()
            for way, call in (
                ("SendReceive", lambda: session.SendReceive(function, args, timeout=10)),
                ("SendReceive async", lambda: session.SendReceive(function, args, status)),
                ("Send", lambda: session.Send(function, args)),
            ):
                problem = _raises(call, exception, pattern)
                if problem:
                    failures.append(f"{way} with {label}: {problem}")
        for label, overrides, exception, pattern in _connect_cases():
            arguments = {"name": "probe", "version": (1, 0, 0), "message_slots": -1, **overrides}
            rejected = RSession()
            problem = _raises(lambda: rejected.CreateSession(**arguments), exception, pattern)
            if problem:
                failures.append(f"CreateSession with {label}: {problem}")
            if rejected.Handle():
                failures.append(
                    f"CreateSession with {label}: the session got handle {rejected.Handle()}"
                )
                rejected.Close()
        assert not failures, "\n".join(failures)

        # Nothing reached the server (no connect, no request: only this EEvents call is new),
        # and the kernel holds nothing new.
        after = _events(session)
        assert after == before + [["service", handle, EEvents]]
        stats_after = kernel.statistics()
        for name in ("sessions", "messages", "pool_used", "peers", "processes"):
            assert stats_after[name] == stats_before[name], (name, stats_before, stats_after)
        assert "pending=0" in repr(session)
        assert session.SendReceive(EEcho, (5,), timeout=10) == 5


# -- 3. a garbage-sending "kernel" against a real server host ------------------------------------


class FakeKernel:
    """A raw ROUTER in a private directory that plays the kernel for one server host."""

    def __init__(self, directory: Path) -> None:
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.router_mandatory = 1
        self.router.linger = 0
        self.endpoint = f"ipc://{directory}/fake-kernel"
        self.router.bind(self.endpoint)
        self.rid: bytes | None = None
        self.received: list[Message] = []
        self.undecodable: list[str] = []

    def close(self) -> None:
        self.context.destroy(linger=0)

    def send(self, *frames: bytes) -> None:
        self.router.send_multipart([self.rid, *frames])

    def send_message(self, message: Message) -> None:
        self.send(encode(message))

    def drain(self, timeout_ms: int = 0) -> None:
        if not self.router.poll(timeout_ms):
            return
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if self.rid is None:
                self.rid = frames[0]
            if frames[0] != self.rid or len(frames) != 2:
                self.undecodable.append(f"from {frames[0].hex()}: {len(frames) - 1} frames")
                continue
            try:
                self.received.append(decode(frames[1]))
            except ProtocolError as exc:
                self.undecodable.append(str(exc))

    def wait_for(
        self, what: str, match: Callable[[Message], bool], timeout: float = 10.0
    ) -> Message:
        """Claim the first received message that matches; fail the test at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            for index, message in enumerate(self.received):
                if match(message):
                    return self.received.pop(index)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(
                    f"the server sent no {what} within {timeout} s; got {self.received[:5]!r}"
                )
            self.drain(int(remaining * 1000) + 1)

    def completion(self, msg_id: int) -> Complete:
        """The server's answer to message `msg_id` (a connect is answered by Negotiated)."""
        return self.wait_for(f"Complete for message {msg_id}",
                             lambda m: type(m) in (Complete, Negotiated) and m.msg_id == msg_id)


def _nonsense(rng: random.Random, msg_id: int) -> tuple[Message, int | None]:
    """A structurally valid kernel->server message that makes no sense here, and the completion
    value the server owes for it (None: owes nothing)."""
    choice = rng.randrange(20)
    if choice == 0:
        return (
            NewSession(msg_id, 0x30000 + msg_id, (127, 127, 32767), 99, b"\0" * MAX_PAYLOAD),
            KErrNotSupported,
        )
    if choice == 1:
        return NewSession(msg_id, 0x30000 + msg_id, (1, 3, 0), 2**63 - 1, b""), KErrNotSupported
    if choice == 2:
        return NewSession(msg_id, 0x30000 + msg_id, (1, 2, 99), 1, b""), KErrPermissionDenied
    if choice < 8:
        return Deliver(msg_id, 0x10000 + msg_id, EEcho, (msg_id,), 7), KErrBadHandle
    if choice < 11:
        return (
            Deliver(msg_id, 2**31 - 1, 99, ((b"", 16), b"ro", 2**31 - 1), 2**63 - 1),
            KErrBadHandle,
        )
    if choice < 16:
        return Disconnect(msg_id, 0x20000 + msg_id), KErrNone
    return PeerInfo(2**63 - 1, 2**32 - 1, 0, 0, "x" * 4096), None


class HostedProbe:
    """A probe server process registered with a `FakeKernel`; after the ``with`` block, the
    server is stopped and `returncode` and `log` are set."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="ipcfw-fake-"))
        os.chmod(self.directory, 0o700)
        self.fake = FakeKernel(self.directory)
        env = dict(os.environ, PYTHONPATH=PYTHONPATH)
        env.pop("IPCFW_KERNEL", None)
        self.server = ManagedProcess(
            [sys.executable, "-m", "ipcfw", "--log-level", "info", "serve", PROBE,
             "--endpoint", self.fake.endpoint],
            self.directory / "serve.log", env,
        )
        self.returncode: int | None = None
        self.log = ""

    def __enter__(self) -> HostedProbe:
        try:
            hello = self.fake.wait_for("Hello", lambda m: type(m) is Hello)
            assert hello.role == Role.SERVER
            # The server watches the kernel's pid: give it ours, which outlives it.
            self.fake.send_message(Welcome(os.getpid(), MAX_FRAME, PROTOCOL_VERSION))
            register = self.fake.wait_for("Register", lambda m: type(m) is Register)
            assert register.name == "probe"
            self.fake.send_message(Completed(register.req_id, KErrNone, ()))
            wait_until(lambda: ("server 'probe' registered" in self.server.log()
                                or not self.server.alive()),
                       what="the server to register")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.returncode = self.server.stop()
        self.fake.close()
        self.log = self.server.log()
        shutil.rmtree(self.directory, ignore_errors=True)

    def answered_or_dead(self, msg_id: int) -> Complete | None:
        """The server's Complete for `msg_id`, or None once the server has died."""
        def answer() -> Complete | None:
            self.fake.drain()
            return next(
                (m for m in self.fake.received if type(m) is Complete and m.msg_id == msg_id), None
            )

        wait_until(lambda: answer() or not self.server.alive(),
                   what=f"the server to answer message {msg_id} or die")
        return answer()


@pytest.mark.process  # a real server host, against a fake kernel
def test_server_survives_garbage_from_its_kernel() -> None:
    with HostedProbe() as hosted:
        fake, server = hosted.fake, hosted.server
        rng = random.Random(0x5E12FE12)
        owed: dict[int, int] = {}
        refusals = 0
        msg_id = 1000
        garbage = malformed_frames(rng, 2000, SERVER_BOUND, NOT_SERVER_BOUND)
        for index, (_, frames) in enumerate(garbage):
            fake.send(*frames)
            if index % 8 == 0:
                msg_id += 1
                message, value = _nonsense(rng, msg_id)
                fake.send_message(message)
                if value is not None:
                    owed[msg_id] = value
                    refusals += type(message) is NewSession
            if index % 100 == 0:
                fake.drain()
        fake.send(b"\xc1" * (MAX_FRAME + 8192))  # frames over the kernel's limit
        # A valid Deliver over the kernel's limit: the server has no limit of its own to apply
        # (the kernel's is the guard), so it is answered like any other for an unknown handle.
        fake.send(encode(Deliver(1, 1, EEcho, (b"\0" * (MAX_FRAME + 8192),), 1)))
        owed[1] = KErrBadHandle

        for pending_id, value in owed.items():
            reply = fake.completion(pending_id)
            assert (reply.value, reply.writes) == (value, ()), (pending_id, reply)

        # A real session still works: PeerInfo, NewSession, requests, Disconnect.
        fake.send_message(PeerInfo(1, os.getpid(), os.getuid(), os.getgid(), sys.executable))
        fake.send_message(NewSession(5000, 77, (1, 0, 0), 1, b""))
        assert fake.completion(5000) == Negotiated(5000, KErrNone, b"")  # an accepted connect
        fake.send_message(Deliver(5001, 77, EEcho, (42,), 1))
        assert fake.completion(5001) == Complete(5001, 42, ())
        fake.send_message(Deliver(5002, 77, EClient, ((b"", 4096),), 1))
        reply = fake.completion(5002)
        assert reply.value > 0 and json.loads(reply.writes[0][1])["pid"] == os.getpid(), reply
        fake.send_message(Disconnect(5003, 77))
        assert fake.completion(5003) == Complete(5003, KErrNone, ())

        # The server answers in order, so by now every answer it sent has arrived: exactly one
        # completion per message that owed one, nothing else.
        fake.drain()
        assert not fake.received, f"unexpected messages from the server: {fake.received[:5]!r}"
        assert not fake.undecodable, fake.undecodable[:5]
        assert server.alive(), server.log()[-5000:]
    returncode, log = hosted.returncode, hosted.log
    assert returncode == 0, log[-5000:]

    assert "Traceback" not in log, log[-5000:]
    dropped = [line for line in log.splitlines() if " dropped " in line]
    kinds = collections.Counter(re.search(r"dropped (.+?): ", line)[1] for line in dropped)
    assert all(count == 1 for count in kinds.values()), kinds
    assert set(kinds) == {
        "malformed frame", "unexpected message", "request for an unknown session"
    }, dropped
    # Apart from one "connect refused" per refused NewSession (a connect is logged, like in any
    # server), the log stays short: it does not grow with the garbage.
    lines = log.splitlines()
    assert sum("refused" in line for line in lines) == refusals
    assert len(lines) - refusals <= 10, "\n".join(lines)


# -- 4. frames nested about 1000 deep ------------------------------------------------------------

_DEPTH_BOMB = b"\x91" * 1000 + b"\x01"  # 1,001 bytes: one int inside 1000 one-item arrays
# decode() once formatted its error with a plain repr() of the decoded value, which raised
# RecursionError at this depth (under msgpack's own limit) and ended the receiving process.


def test_kernel_survives_a_frame_nested_1000_deep(kernel: KernelFixture) -> None:
    flood = Flood(kernel.endpoint)
    try:
        peer = RawPeer(flood, "nester")
        peer.hello(Role.CHANNEL)
        peer.send(_DEPTH_BOMB)
        peer.send_message(Stats(7))

        def answered_or_dead() -> bool:
            peer.drain()
            return any(type(m) is StatsReply for m in peer.received) or not kernel.process.alive()

        wait_until(answered_or_dead, what="the kernel to answer Stats or die")
        assert kernel.process.alive(), kernel.process.log()[-3000:]
    finally:
        flood.close()


@pytest.mark.process  # a real server host, against a fake kernel
def test_server_survives_a_frame_nested_1000_deep() -> None:
    with HostedProbe() as hosted:
        hosted.fake.send(_DEPTH_BOMB)
        hosted.fake.send_message(Deliver(1, 1, EEcho, (1,), 1))  # unknown handle: KErrBadHandle
        reply = hosted.answered_or_dead(1)
        assert reply == Complete(1, KErrBadHandle, ()), hosted.server.log()[-3000:]
