"""Every thread and process of a shared direct session goes direct, end to end: a real kernel,
a real server process (tests/plugins/probe.py), threads of this process and other client
processes.

What must hold: each thread that uses a ShareAuto'd or Open'ed direct session gets a ticket of
its own and its requests bypass the kernel (the kernel's `messages` does not count them while
the server holds them; `admitted` counts the tickets); the kernel still counts every thread as
attached, and a thread's end detaches it; the server's Disconnect follows every request every
thread sent before the Close; a sharing process killed with SIGKILL ends nothing for the
others; a ticket a thread got by Join serves only its own process, once, and a process that
holds no handle gets none; `ipcfw ps` lists every session with its path, holders and
outstanding messages.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from conftest import REPO, KernelFixture, wait_until
from ipcfw import KErrNone, KErrPermissionDenied, RSession, TRequestStatus
from ipcfw.client import kernel_sessions
from ipcfw.protocol import Attach, Path, decode, encode
from plugins.probe import ECompleteHeld, EEcho, EHold, recorded_events

PROBE = "plugins.probe:ProbeServer"
THREADS = 8


@pytest.fixture
def probe(kernel: KernelFixture) -> KernelFixture:
    kernel.serve(PROBE, "probe")
    return kernel


def shared_direct_session() -> RSession:
    session = RSession.connect("probe", (1, 0, 0), -1, path="direct")
    session.ShareAuto()
    return session


def until_direct(session: RSession) -> None:
    """Sync calls (EEcho) from this thread until its calls on `session` take its direct
    connection: its move there goes on in the background, one step per call."""
    deadline = time.monotonic() + 10
    while session._life.routes.get(threading.get_ident()) is None:
        assert session.SendReceive(EEcho, (0,)) == 0
        assert time.monotonic() < deadline, "the thread did not go direct within 10 s"


class Holding:
    """Threads that each use `session` (sync calls, then an async EHold with tag 100 + i held
    by the server) and stay alive until `release`."""

    def __init__(self, session: RSession, count: int,
                 before: Callable[[int], None] | None = None) -> None:
        self.session = session
        self.statuses = [TRequestStatus() for _ in range(count)]
        self.errors: list[BaseException] = []
        self._go_on = threading.Event()
        self._ready = threading.Barrier(count + 1)
        self._threads = [threading.Thread(target=self._run, args=(i, before), name=f"user-{i}")
                         for i in range(count)]
        for thread in self._threads:
            thread.start()
        self._ready.wait(30)

    def _run(self, i: int, before: Callable[[int], None] | None) -> None:
        try:
            assert [self.session.SendReceive(EEcho, (i * 10 + n,)) for n in range(3)] == [
                i * 10, i * 10 + 1, i * 10 + 2
            ]
            until_direct(self.session)
            if before is not None:
                before(i)
            self.session.SendReceive(EHold, (100 + i,), self.statuses[i])
        except BaseException as exc:  # reported to the test
            self.errors.append(exc)
        finally:
            self._ready.wait(30)
        self._go_on.wait(30)

    def release(self) -> None:
        self._go_on.set()
        for thread in self._threads:
            thread.join(30)
            assert not thread.is_alive()


def test_eight_threads_sharing_a_direct_session_all_go_direct(probe) -> None:
    session = shared_direct_session()
    handle = session.Handle()
    holding = Holding(session, THREADS)
    try:
        assert holding.errors == []
        wait_until(lambda: sum(e[:3] == ["service", handle, EHold] for e in
                               recorded_events(session)) == THREADS,
                   what="every thread's held request to reach the server")
        stats = probe.statistics()
        assert stats["messages"] == 0  # none of the 8 held requests crossed the kernel
        assert stats["admitted"] == THREADS  # a ticket each (the creator's came with Connected)
        assert stats["attached"] == THREADS + 1  # the kernel counts them all
        for i in range(THREADS):
            assert session.SendReceive(ECompleteHeld, (100 + i, 7 + i)) == 0
        assert [status.Wait(10) for status in holding.statuses] == [7 + i for i in range(
            THREADS)]
    finally:
        holding.release()
    # Each thread's end detached it, and closed its direct connection.
    wait_until(lambda: probe.statistics()["attached"] == 1, what="the threads to detach")
    assert session.SendReceive(EEcho, (5,)) == 5
    session.Close()
    wait_until(lambda: probe.statistics()["sessions"] == 0, what="the session to close")


def test_disconnect_comes_after_every_request_every_thread_sent(probe) -> None:
    session = shared_direct_session()
    handle = session.Handle()
    sent = threading.Barrier(4)
    close_done = threading.Event()

    def send_then_wait() -> None:
        # (On the direct path: a Close from another thread may overtake the kernel-path
        # requests of a thread still moving there, as on the kernel path: docs/sharing.md.)
        until_direct(session)
        statuses = [TRequestStatus() for _ in range(5)]
        for n, status in enumerate(statuses):
            session.SendReceive(EEcho, (n,), status)
        sent.wait(30)
        close_done.wait(30)  # alive until the Close

    threads = [threading.Thread(target=send_then_wait) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        sent.wait(30)
        session.Close()
    finally:
        close_done.set()
        for thread in threads:
            thread.join(30)
    with RSession.connect("probe") as observer:
        wait_until(lambda: ["disconnect", handle] in recorded_events(observer),
                   what="the Disconnect")
        events = [e[0] for e in recorded_events(observer) if e[1] == handle]
    assert events[-16:] == ["service"] * 15 + ["disconnect"]
    assert set(events[:-16]) == {"connect", "service"}
    assert probe.statistics()["admitted"] >= 3  # (and a Join may prove a thread's requests)


OPENER = r"""
import json, os, sys, threading, time
from ipcfw import RSession, TRequestStatus
from plugins.probe import EClient, EEcho, EHold
shared = RSession.Open(bytes.fromhex(sys.argv[1]))
assert [shared.SendReceive(EEcho, (n,)) for n in range(3)] == [0, 1, 2]
deadline = time.monotonic() + 10  # until this thread's calls go direct (its move: one step a call)
while shared._life.routes.get(threading.get_ident()) is None and time.monotonic() < deadline:
    shared.SendReceive(EEcho, (0,))
client = bytearray(1024)
shared.SendReceive(EClient, (client,))
print("client", json.loads(client)["pid"], os.getpid(), flush=True)
status = TRequestStatus()
shared.SendReceive(EHold, (77,), status)
print("held", flush=True)
print("done", status.Wait(30), flush=True)
sys.stdin.readline()  # until the test lets it go
shared.Close()
"""


@pytest.fixture
def opener(probe: KernelFixture) -> Iterator[Callable[[bytes], subprocess.Popen[str]]]:
    children: list[subprocess.Popen[str]] = []

    def start(token: bytes) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, "-c", OPENER, token.hex()], env=probe.env, cwd=str(REPO),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        children.append(child)
        assert child.stdout is not None
        seen, own = child.stdout.readline().split()[1:]
        assert seen == own  # the server's ClientInfo on its connection is its own process's
        assert child.stdout.readline() == "held\n"
        return child

    try:
        yield start
    finally:
        for child in children:
            child.kill()
            child.wait(10)


def test_a_process_that_opens_a_protected_direct_session_goes_direct(probe, opener) -> None:
    with RSession.connect("probe", (1, 0, 0), -1, path="direct") as session:
        handle = session.Handle()
        child = opener(session.ShareProtected())
        wait_until(lambda: ["service", handle, EHold] in recorded_events(session),
                   what="the other process's held request to reach the server")
        stats = probe.statistics()
        assert stats["messages"] == 0 and stats["admitted"] == 1
        assert session.SendReceive(ECompleteHeld, (77, 9)) == 0
        assert child.stdout is not None and child.stdout.readline() == "done 9\n"
        child.communicate("\n", timeout=30)
        assert child.returncode == 0
        assert session.SendReceive(EEcho, (3,)) == 3  # the creator's session lives on


def test_a_sigkilled_sharing_process_does_not_end_the_session_for_the_others(
    probe, opener
) -> None:
    with RSession.connect("probe", (1, 0, 0), -1, path="direct") as session:
        handle = session.Handle()
        child = opener(session.ShareProtected())
        wait_until(lambda: ["service", handle, EHold] in recorded_events(session),
                   what="the other process's held request to reach the server")
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        # Its direct connection's end cancels what it had in service; its holder is released.
        wait_until(lambda: ["cancelled", handle, EHold, 77] in recorded_events(session),
                   what="the killed process's held request to be cancelled")
        wait_until(lambda: [row.holders for row in kernel_sessions()] == [((os.getpid(), 1),)],
                   what="the killed process to be released")
        assert session.SendReceive(EEcho, (4,)) == 4
        assert ["disconnect", handle] not in recorded_events(session)


def test_ps_lists_every_session_with_its_path_holders_and_outstanding_messages(probe) -> None:
    direct = shared_direct_session()
    kernel_path = RSession.connect("probe", (1, 0, 0), 4, path="kernel")
    kernel_status = TRequestStatus()
    kernel_path.SendReceive(EHold, (200,), kernel_status)
    holding = Holding(direct, 2)
    try:
        wait_until(lambda: sum(e[:2] == ["service", direct.Handle()] and e[2] == EHold
                               for e in recorded_events(direct)) == 2,
                   what="both threads' held requests to reach the server")
        rows = {row.handle: row for row in kernel_sessions()}
        mine = os.getpid()
        assert (rows[direct.Handle()].path, rows[direct.Handle()].outstanding,
                rows[direct.Handle()].holders) == (Path.DIRECT, 2, ((mine, 3),))
        assert (rows[kernel_path.Handle()].path, rows[kernel_path.Handle()].outstanding,
                rows[kernel_path.Handle()].holders) == (Path.KERNEL, 1, ((mine, 1),))
        result = probe.client(["-m", "ipcfw", "ps", "--sessions"])
        assert result.returncode == 0, result.stderr
        table = result.stdout.splitlines()
        columns = table[0].split()
        assert columns[:4] == ["SESSION", "SERVER", "PATH", "STATE"]
        lines = {line.split()[0]: line.split() for line in table[1:]}
        for handle, path, outstanding, holders in (
                (direct.Handle(), "direct", "2", f"{mine}/3"),
                (kernel_path.Handle(), "kernel", "1", f"{mine}/1")):
            line = lines[f"0x{handle:x}"]
            assert line[1:4] == ["probe", path, "OPEN"] and line[-1] == holders
            assert line[columns.index("OUTSTANDING")] == outstanding
        for i in range(2):
            direct.SendReceive(ECompleteHeld, (100 + i, 0))
        kernel_path.SendReceive(ECompleteHeld, (200, 0))
        assert kernel_status.Wait(10) == KErrNone
    finally:
        holding.release()
        direct.Close()
        kernel_path.Close()


HOSTILE = r"""
import os, socket, sys
import zmq
from ipcfw.protocol import (PROTOCOL_VERSION, Attach, Hello, Join, Open, Role, decode,
                            encode)
handle, token = int(sys.argv[1]), bytes.fromhex(sys.argv[2])
context = zmq.Context()
channel = context.socket(zmq.DEALER)
channel.routing_id, channel.linger, channel.rcvtimeo = os.urandom(16), 0, 10_000
channel.connect(os.environ["IPCFW_KERNEL"])
channel.send(encode(Hello(int(Role.CHANNEL), PROTOCOL_VERSION)))
decode(channel.recv())


def ask(message):
    channel.send(encode(message))
    return decode(channel.recv())


refused = ask(Join(1, handle))  # holding nothing
print(type(refused).__name__, refused.category, refused.reason, flush=True)
opened = ask(Open(2, token))
assert opened.result == 0 and opened.direct and not opened.ticket, opened
joined = ask(Join(3, handle))
print(joined.direct, joined.ticket.hex(), flush=True)
sys.stdin.readline()  # the test presents the ticket from its own process first
raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
raw.settimeout(10)
raw.connect(joined.direct)
for req_id in (4, 5):  # the rightful process, then a replay
    raw.send(encode(Attach(req_id, joined.ticket)))
    print(decode(raw.recv(65536)).value, flush=True)
sys.stdin.readline()
"""


def test_a_joined_ticket_serves_only_its_process_once_and_a_non_holder_gets_none(probe) -> None:
    with RSession.connect("probe", (1, 0, 0), -1, path="direct") as session:
        handle = session.Handle()
        child = subprocess.Popen(
            [sys.executable, "-c", HOSTILE, str(handle), session.ShareProtected().hex()],
            env=probe.env, cwd=str(REPO), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdin is not None and child.stdout is not None
            assert child.stdout.readline().split() == ["Panicked", "KERN-EXEC", "0"]
            path, ticket = child.stdout.readline().split()
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:  # borrowed
                raw.settimeout(10)
                raw.connect(path)
                raw.send(encode(Attach(1, bytes.fromhex(ticket))))
                assert decode(raw.recv(65536)).value == KErrPermissionDenied
            child.stdin.write("\n")
            child.stdin.flush()
            assert int(child.stdout.readline()) == handle  # its own process, once
            assert int(child.stdout.readline()) == KErrPermissionDenied  # replayed
            child.communicate("\n", timeout=30)
        finally:
            child.kill()
            child.wait(10)
        assert session.SendReceive(EEcho, (6,)) == 6
