"""The direct data path end to end: a real kernel, a real server process (tests/plugins/probe.py),
and RSession(path="direct") in this process.

What must hold: the kernel grants the path and still owns the session; requests of the creating
thread bypass the kernel (its `messages` count does not see them); the answers, panics, cancels,
blind sends and the Disconnect after a Close are what the kernel path gives; a server's death
is seen at once; and a socket that holds no valid ticket gets nothing through.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from conftest import KernelFixture, wait_until
from ipcfw import (
    ClientPanic,
    IpcError,
    KErrCancel,
    KErrNone,
    KErrPermissionDenied,
    KErrServerTerminated,
    RSession,
    TRequestStatus,
)
from ipcfw.protocol import (
    PROTOCOL_VERSION,
    Attach,
    Completed,
    Connect,
    Connected,
    Hello,
    Path,
    Request,
    Role,
    Welcome,
    decode,
    encode,
)
from plugins.probe import ECompleteHeld, EEcho, EHold, EPanic, recorded_events

PROBE = "plugins.probe:ProbeServer"


@pytest.fixture
def probe(kernel: KernelFixture) -> KernelFixture:
    kernel.serve(PROBE, "probe")
    return kernel


def direct_session() -> RSession:
    return RSession.connect("probe", (1, 0, 0), 4, path="direct")


def test_a_direct_session_bypasses_the_kernel_and_answers_as_the_kernel_path(probe) -> None:
    with direct_session() as session:
        assert probe.statistics()["sessions_direct"] == 1
        assert session.SendReceive(EEcho, (42,)) == 42
        status = TRequestStatus()
        session.SendReceive(EHold, (7,), status)  # held by the server: outstanding
        wait_until(lambda: ["service", session.Handle(), EHold] in recorded_events(session),
                   what="the held request to reach the server")
        assert probe.statistics()["messages"] == 0  # the kernel never saw it
        assert session.SendReceive(ECompleteHeld, (7, 99)) == 0
        assert status.Wait(10) == 99


def test_the_same_session_on_the_kernel_path_counts_in_the_kernel(probe) -> None:
    # The contrast to the test above: the observation it rests on can fail.
    with RSession.connect("probe", (1, 0, 0), 4, path="kernel") as session:
        assert probe.statistics()["sessions_direct"] == 0
        status = TRequestStatus()
        session.SendReceive(EHold, (7,), status)
        wait_until(lambda: probe.statistics()["messages"] == 1, what="the kernel to count it")
        session.SendReceive(ECompleteHeld, (7, 5))
        assert status.Wait(10) == 5


def test_async_callbacks_await_and_wait_for_request_work_on_the_direct_path(probe) -> None:
    with direct_session() as session:
        done = threading.Event()
        first, second = TRequestStatus(), TRequestStatus()
        session.SendReceive(EEcho, (1,), first)
        first.add_done_callback(lambda status: done.set())
        assert done.wait(10) and first.Int() == 1
        session.SendReceive(EEcho, (2,), second)

        async def awaited() -> int:
            return await second

        assert asyncio.run(asyncio.wait_for(awaited(), 10)) == 2


def test_cancel_send_and_panic_on_the_direct_path(probe) -> None:
    with direct_session() as session:
        held = TRequestStatus()
        session.SendReceive(EHold, (3,), held)
        assert held.Cancel(10) == KErrCancel
        wait_until(lambda: any(e[0] == "cancelled" for e in recorded_events(session)),
                   what="the server to be told of the cancel")
        session.Send(EEcho, (5,))  # blind: returns once the server has it
        with pytest.raises(ClientPanic) as info:
            session.SendReceive(EPanic, (12,))
        assert (info.value.category, info.value.reason) == ("PROBE", 12)
        with pytest.raises(ClientPanic):
            session.SendReceive(EEcho, (1,))  # the session is dead
        # As on the kernel path, the server gets its Disconnect at once (the kernel was told).
        handle = session.Handle()
        with RSession.connect("probe") as observer:
            wait_until(lambda: ["disconnect", handle] in recorded_events(observer),
                       what="the Disconnect after the panic")


def test_disconnect_comes_after_every_request_sent_before_the_close(probe) -> None:
    session = direct_session()
    handle = session.Handle()
    statuses = [TRequestStatus() for _ in range(3)]
    for i, status in enumerate(statuses):
        session.SendReceive(EEcho, (i,), status)
    session.Close()
    with RSession.connect("probe") as observer:
        wait_until(lambda: ["disconnect", handle] in recorded_events(observer),
                   what="the Disconnect")
        events = [e for e in recorded_events(observer) if e[1] == handle]
    assert [e[0] for e in events] == ["connect", "service", "service", "service", "disconnect"]


def test_a_server_killed_is_seen_at_once_on_the_direct_path(probe) -> None:
    server = probe.children[-1]
    session = direct_session()
    try:
        pending = TRequestStatus()
        session.SendReceive(EHold, (1,), pending)
        started = time.monotonic()
        server.kill(signal.SIGKILL)
        assert pending.Wait(5) == KErrServerTerminated
        assert time.monotonic() - started < 2.0
        with pytest.raises(IpcError) as info:
            session.SendReceive(EEcho, (1,))
        assert info.value.code == KErrServerTerminated
    finally:
        session.Close()


def test_a_server_that_takes_no_direct_connections_serves_on_the_kernel_path(kernel) -> None:
    kernel.serve("plugins.probe:KernelPathProbeServer", "probe-kernel-path")
    with RSession.connect("probe-kernel-path", (1, 0, 0), 4, path="direct") as session:
        assert session.SendReceive(EEcho, (9,)) == 9
        assert kernel.statistics()["sessions_direct"] == 0


def test_a_bad_path_is_refused_before_anything_is_sent(probe) -> None:
    with pytest.raises(ValueError, match="path"):
        RSession.connect("probe", path="fast")


# -- a socket without a valid ticket gets nothing through ----------------------------------------


@contextlib.contextmanager
def raw_direct_session(kernel: KernelFixture) -> Iterator[tuple[str, bytes, int]]:
    """A direct session created through a raw channel of this process, its ticket not yet
    presented: (the server's socket, the ticket, the handle). The channel stays open meanwhile
    (its end would close the session)."""
    context = zmq.Context()
    try:
        channel = context.socket(zmq.DEALER)
        channel.routing_id = os.urandom(16)
        channel.linger = 0
        channel.rcvtimeo = 10_000
        channel.connect(kernel.endpoint)
        channel.send(encode(Hello(int(Role.CHANNEL), PROTOCOL_VERSION)))
        assert type(decode(channel.recv())) is Welcome
        channel.send(encode(Connect(1, "probe", (1, 0, 0), 4, b"", (), Path.DIRECT)))
        reply = decode(channel.recv())
        assert type(reply) is Connected and reply.result == KErrNone and reply.ticket, reply
        yield reply.direct, reply.ticket, reply.handle
    finally:
        context.destroy(linger=0)


def _attach(path: str, ticket: bytes) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:
        raw.settimeout(10)
        raw.connect(path)
        raw.send(encode(Attach(1, ticket)))
        reply = decode(raw.recv(65536))
        assert type(reply) is Completed and reply.req_id == 1, reply
        return reply.value


def test_forged_replayed_and_borrowed_tickets_get_nothing_through(probe) -> None:
    with raw_direct_session(probe) as (path, ticket, handle):
        assert _attach(path, os.urandom(16)) == KErrPermissionDenied  # forged
        # Borrowed: another process presents this process's ticket.
        borrowed = subprocess.run(
            [sys.executable, "-c", _PRESENT_TICKET, path, ticket.hex()],
            capture_output=True, text=True, timeout=30, env=probe.env,
        )
        assert borrowed.stdout.strip() == str(KErrPermissionDenied), borrowed.stderr
        assert _attach(path, ticket) == handle  # the rightful process, once
        assert _attach(path, ticket) == KErrPermissionDenied  # replayed


def test_requests_on_a_connection_without_attach_are_kern_exec_0(probe) -> None:
    with raw_direct_session(probe) as (path, _, handle), socket.socket(
        socket.AF_UNIX, socket.SOCK_SEQPACKET
    ) as raw:
        raw.settimeout(10)
        raw.connect(path)
        raw.send(encode(Request(5, handle, EEcho, (1,), 0)))
        reply = decode(raw.recv(65536))
    assert (type(reply).__name__, reply.category, reply.reason) == ("Panicked", "KERN-EXEC", 0)


def test_garbage_on_a_direct_connection_closes_it_and_others_are_served(probe) -> None:
    with direct_session() as session, raw_direct_session(probe) as (path, _, _):
        for frame in (b"", b"\xc1", b"\x93\x01", os.urandom(300)):
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:
                raw.settimeout(10)
                raw.connect(path)
                raw.send(frame)
                assert raw.recv(65536) == b""  # closed by the server
        assert session.SendReceive(EEcho, (77,)) == 77


_PRESENT_TICKET = """
import socket, sys
from ipcfw.protocol import Attach, decode, encode
raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
raw.settimeout(10)
raw.connect(sys.argv[1])
raw.send(encode(Attach(1, bytes.fromhex(sys.argv[2]))))
print(decode(raw.recv(65536)).value)
"""


FORKING_CLIENT = r"""
import os, sys, time
from ipcfw import IpcError, RSession
session = RSession.connect("probe", (1, 0, 0), 4, path="direct")
assert session.SendReceive(1, (5,)) == 5
print(session.Handle(), flush=True)
if os.fork() == 0:
    time.sleep(float(sys.argv[1]))  # the parent has died by now, without a Close
    try:
        print("served", session.SendReceive(1, (77,), timeout=2), file=sys.stderr, flush=True)
    except IpcError as exc:
        print("refused", exc.code, exc, file=sys.stderr, flush=True)
    os._exit(0)
os._exit(0)
"""


def test_a_forked_child_cannot_use_or_keep_open_the_parents_direct_connection(probe) -> None:
    child_sleeps = 4.0
    client = subprocess.Popen(
        [sys.executable, "-c", FORKING_CLIENT, str(child_sleeps)], env=probe.env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert client.stdout is not None and client.stderr is not None
        handle = int(client.stdout.readline())
        client.wait(10)  # the parent is dead; its child lives on
        started = time.monotonic()
        with RSession.connect("probe") as observer:
            wait_until(lambda: ["disconnect", handle] in recorded_events(observer),
                       child_sleeps - 1.5)
        assert time.monotonic() - started < child_sleeps - 1.0  # not the child's exit
        # (stderr closes when the child exits)
        assert client.stderr.read().split()[:2] == ["refused", str(-36)]
    finally:
        client.kill()


FORK_USES_PARENTS_SESSION = r"""
import os, sys
from ipcfw import IpcError, RSession, TRequestStatus
path = sys.argv[1]
session = RSession.connect("probe", (1, 0, 0), 4, path=path)
held = TRequestStatus()
session.SendReceive(2, (1,), held)  # EHold, tag 1: pending in the parent
assert session.SendReceive(1, (5,)) == 5
pid = os.fork()
if pid == 0:
    seen = []
    try:
        session.SendReceive(1, (6,), timeout=2)
    except IpcError as exc:
        seen.append(f"call {exc.code}")
    seen.append(f"held {held.Wait(2)}")
    session.Close()  # only forgets it: the parent holds it
    seen.append("closed")
    with RSession.connect("probe", path=path) as own:
        seen.append(f"own {own.SendReceive(1, (7,), timeout=5)}")
    print(" ".join(seen), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print("parent", session.SendReceive(1, (8,), timeout=5), flush=True)
session.Close()
"""


@pytest.mark.parametrize("path", ["kernel", "direct"])
def test_a_forked_child_gets_a_clear_error_from_the_parents_session_and_its_close_returns(
    probe, path: str
) -> None:
    # (Before: the child's Close, and its calls, hung on the parent's zmq sockets.)
    done = subprocess.run(
        [sys.executable, "-c", FORK_USES_PARENTS_SESSION, path], env=probe.env,
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["call -36 held -36 closed own 7", "parent 8"]
