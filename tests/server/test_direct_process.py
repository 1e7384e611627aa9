"""The direct path's server side with real sockets: a probe server process (``ipcfw serve``)
registered with a fake kernel (a raw ROUTER in a private directory, as in
tests/kernel/test_hostile.py), and raw SOCK_SEQPACKET connections from the test to the server's
direct socket (its path is in the Register the fake kernel receives).

The fake kernel plays the lead's part: PeerInfo, NewSession with a ticket, Disconnect. Every
wait is bounded, every process is stopped.
"""

from __future__ import annotations

import os
import signal
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from conftest import PYTHONPATH, ManagedProcess, wait_until
from ipcfw.errors import KErrCancel, KErrNone, KErrPermissionDenied, KErrServerBusy
from ipcfw.protocol import (
    PROTOCOL_VERSION,
    Attach,
    Cancel,
    Close,
    Complete,
    Completed,
    Disconnect,
    Hello,
    Message,
    Mode,
    Negotiated,
    NewSession,
    Panicked,
    PeerGone,
    PeerInfo,
    Register,
    Request,
    Welcome,
    decode,
    encode,
)
from plugins.probe import ECompleteHeldLater, EEcho, EHold, EPanic

pytestmark = pytest.mark.process

PROBE = "plugins.probe:ProbeServer"
SYNC, ASYNC, BLIND = int(Mode.SYNC), int(Mode.ASYNC), int(Mode.BLIND)
MAX_FRAME = 64 * 1024  # the fake kernel's frame limit: a direct frame over it is refused
WAIT = 10.0


class FakeKernel:
    """A raw ROUTER that plays the kernel for one server host."""

    def __init__(self, directory: Path) -> None:
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.linger = 0
        self.endpoint = f"ipc://{directory}/kernel"
        self.router.bind(self.endpoint)
        self.rid: bytes | None = None
        self.received: list[Message] = []

    def close(self) -> None:
        self.context.destroy(linger=0)

    def send(self, message: Message) -> None:
        assert self.rid is not None
        self.router.send_multipart([self.rid, encode(message)])

    def wait_for(self, what: str, match: Callable[[Message], bool],
                 timeout: float = WAIT) -> Message:
        deadline = time.monotonic() + timeout
        while True:
            for index, message in enumerate(self.received):
                if match(message):
                    return self.received.pop(index)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"the server sent no {what} within {timeout} s: {self.received[:5]}")
            if self.router.poll(int(remaining * 1000) + 1):
                rid, frame = self.router.recv_multipart()
                self.rid = rid
                self.received.append(decode(frame))

    def completion(self, msg_id: int, timeout: float = WAIT) -> Message:
        return self.wait_for(f"completion of {msg_id}",
                             lambda m: type(m) in (Complete, Negotiated) and m.msg_id == msg_id,
                             timeout)


class Hosted:
    """A probe server registered with a fake kernel; its direct socket is `direct`."""

    def __init__(self, plugin: str = PROBE) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="ipcfw-direct-"))
        os.chmod(self.directory, 0o700)
        self.fake = FakeKernel(self.directory)
        env = dict(os.environ, PYTHONPATH=PYTHONPATH)
        env.pop("IPCFW_KERNEL", None)
        self.server = ManagedProcess(
            [sys.executable, "-m", "ipcfw", "--log-level", "info", "serve", plugin,
             "--endpoint", self.fake.endpoint],
            self.directory / "serve.log", env,
        )
        self.sockets: list[socket.socket] = []
        self._msg_id = 100
        self._client = 0
        try:
            self.fake.wait_for("Hello", lambda m: type(m) is Hello)
            self.fake.send(Welcome(os.getpid(), MAX_FRAME, PROTOCOL_VERSION))
            register = self.fake.wait_for("Register", lambda m: type(m) is Register)
            assert isinstance(register, Register)
            self.direct = register.direct
            self.fake.send(Completed(register.req_id, KErrNone, ()))
            wait_until(lambda: "registered" in self.server.log() or not self.server.alive(),
                       what="the server to register")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.server.stop()
        self.fake.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def next_id(self) -> int:
        self._msg_id += 1
        return self._msg_id

    def session(self, handle: int, slots: int = 4, pid: int | None = None) -> bytes:
        """A session on the direct path for process `pid` (this one): its ticket."""
        self._client += 1
        ticket = os.urandom(16)
        self.fake.send(PeerInfo(self._client, pid or os.getpid(), os.getuid(), os.getgid(),
                                sys.executable))
        msg_id = self.next_id()
        self.fake.send(NewSession(msg_id, handle, (1, 0, 0), self._client, b"", ticket, slots))
        assert self.fake.completion(msg_id) == Negotiated(msg_id, KErrNone, b"")
        return ticket

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(WAIT)
        sock.connect(self.direct)
        self.sockets.append(sock)
        return sock

    def attached(self, handle: int, slots: int = 4) -> socket.socket:
        ticket = self.session(handle, slots)
        sock = self.connect()
        assert call(sock, Attach(1, ticket)) == Completed(1, handle, ())
        return sock


def call(sock: socket.socket, message: Message) -> Any:
    sock.send(encode(message))
    return receive(sock)


def receive(sock: socket.socket) -> Any:
    frame = sock.recv(1 << 20)
    return decode(frame) if frame else None


def ended(sock: socket.socket) -> bool:
    """True once the server closed `sock` (what it still had queued is read and dropped)."""
    try:
        while sock.recv(1 << 20):
            pass
    except (ConnectionResetError, TimeoutError):
        return False
    return True


@pytest.fixture
def hosted() -> Iterator[Hosted]:
    hosted = Hosted()
    try:
        yield hosted
    finally:
        hosted.close()


def test_the_direct_socket_is_private_in_the_kernels_directory(hosted):
    path = Path(hosted.direct)
    assert path.parent == hosted.directory and path.name.startswith("d-")
    assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
    hosted.server.stop()
    assert not path.exists()


def test_requests_cancel_blind_slots_close_and_disconnect(hosted):
    handle = 0x10
    sock = hosted.attached(handle, slots=2)
    assert call(sock, Request(2, handle, EEcho, (42,), SYNC)) == Completed(2, 42, ())
    sock.send(encode(Request(3, handle, EHold, (7,), ASYNC)))  # held: not answered
    assert call(sock, Cancel(3)) == Completed(3, KErrCancel, ())
    # blind: acknowledged at once, its own completion never sent
    assert call(sock, Request(4, handle, EEcho, (5,), BLIND)) == Completed(4, KErrNone, ())
    assert call(sock, Request(5, handle, EEcho, (6,), SYNC)) == Completed(5, 6, ())
    # two slots: a third async request is refused while two are held
    sock.send(encode(Request(6, handle, EHold, (8,), ASYNC)))
    sock.send(encode(Request(7, handle, EHold, (9,), ASYNC)))
    assert call(sock, Request(8, handle, EEcho, (1,), ASYNC)) == Completed(8, KErrServerBusy, ())
    assert call(sock, Cancel(6)) == Completed(6, KErrCancel, ())
    assert call(sock, Cancel(7)) == Completed(7, KErrCancel, ())
    # a request and Close on the direct connection, then the kernel's Disconnect: the request
    # is served before the Disconnect runs
    sock.send(encode(Request(9, handle, EEcho, (9,), SYNC)))
    sock.send(encode(Close(handle)))
    disconnect = hosted.next_id()
    hosted.fake.send(Disconnect(disconnect, handle))
    assert receive(sock) == Completed(9, 9, ())
    assert hosted.fake.completion(disconnect) == Complete(disconnect, KErrNone, ())
    assert call(sock, Request(10, handle, EEcho, (1,), SYNC)) == Panicked(
        10, handle, "KERN-EXEC", 0, 0
    )


def test_a_completion_from_another_thread_reaches_the_connection(hosted):
    sock = hosted.attached(0x11, slots=2)
    sock.send(encode(Request(3, 0x11, EHold, (7,), ASYNC)))
    assert call(sock, Request(4, 0x11, ECompleteHeldLater, (7, 99, 20), SYNC)) == Completed(
        4, 0, ()
    )
    assert receive(sock) == Completed(3, 99, ())


def test_a_panic_kills_the_session_on_the_direct_path(hosted):
    sock = hosted.attached(0x12)
    assert call(sock, Request(2, 0x12, EPanic, (5,), SYNC)) == Panicked(2, 0x12, "PROBE", 5, 1)
    assert call(sock, Request(3, 0x12, EEcho, (1,), SYNC)) == Panicked(3, 0x12, "PROBE", 5, 1)


def test_a_disconnect_without_close_runs_at_once_and_ends_the_session_there(hosted):
    # (a client that died, or a forked child holding the connection, never sends Close)
    sock = hosted.attached(0x13)
    sock.send(encode(Request(2, 0x13, EHold, (1,), ASYNC)))
    disconnect = hosted.next_id()
    hosted.fake.send(Disconnect(disconnect, 0x13))
    assert hosted.fake.completion(disconnect) == Complete(disconnect, KErrNone, ())
    assert call(sock, Request(3, 0x13, EEcho, (1,), SYNC)) == Panicked(
        3, 0x13, "KERN-EXEC", 0, 0
    )


def test_a_peer_gone_closes_the_client_processs_connections(hosted):
    sock = hosted.attached(0x14)
    assert call(sock, Request(2, 0x14, EEcho, (4,), SYNC)) == Completed(2, 4, ())
    hosted.fake.send(PeerGone(hosted._client))
    assert ended(sock)


_CHILD = """
import socket, sys
from ipcfw.protocol import Attach, decode, encode
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.settimeout(10)
sock.connect(sys.argv[1])
sock.send(encode(Attach(1, bytes.fromhex(sys.argv[2]))))
print(decode(sock.recv(65536)).value)
"""


def test_hostile_connections_are_refused_or_closed_and_others_are_served(hosted):
    good = hosted.attached(0x20)
    served = iter(range(100, 10_000))

    def still_served() -> None:
        req_id = next(served)
        assert call(good, Request(req_id, 0x20, EEcho, (req_id,), SYNC)) == Completed(
            req_id, req_id, ()
        )

    # garbage, a truncated frame, a frame over the limit: the connection is closed
    for frame in (b"\xc1 garbage", encode(Request(1, 0x20, EEcho, (1,), SYNC))[:-3],
                  b"\x00" * (MAX_FRAME + 100)):
        bad = hosted.connect()
        bad.send(frame)
        assert ended(bad)
        still_served()
    # another process's connection cannot use a ticket named for this one (and it stays valid)
    ticket = hosted.session(0x21)
    child = subprocess.run([sys.executable, "-c", _CHILD, hosted.direct, ticket.hex()],
                           env=dict(os.environ, PYTHONPATH=PYTHONPATH), capture_output=True,
                           text=True, timeout=30)
    assert child.stdout.strip() == str(KErrPermissionDenied), child.stderr
    mine = hosted.connect()
    assert call(mine, Attach(1, ticket)) == Completed(1, 0x21, ())
    # a replayed and a forged ticket: refused; the connection stays open, attached to nothing
    other = hosted.connect()
    assert call(other, Attach(2, ticket)) == Completed(2, KErrPermissionDenied, ())
    assert call(other, Attach(3, os.urandom(16))) == Completed(3, KErrPermissionDenied, ())
    assert call(other, Request(4, 0x21, EEcho, (1,), SYNC)) == Panicked(
        4, 0x21, "KERN-EXEC", 0, 0
    )
    still_served()
    # a message that is no client's: closed
    bad = hosted.connect()
    bad.send(encode(Completed(1, 0, ())))
    assert ended(bad)
    # a client that sends and never reads: closed once DIRECT_MAX_UNREAD answers wait for it
    # in the server (beyond those its socket's buffer holds)
    deaf = hosted.attached(0x22)
    deaf.settimeout(0.5)
    sent = 0
    with pytest.raises((BrokenPipeError, ConnectionResetError, TimeoutError)):
        for sent in range(1_000_000):
            deaf.send(encode(Request(sent, 0x22, EEcho, (1,), SYNC)))
    print("deaf client cut off after", sent, "requests")
    deaf.settimeout(WAIT)
    assert ended(deaf)
    still_served()
    assert hosted.server.alive()
    log = hosted.server.log()
    for kind in ("malformed frame", "frame over the limit", "unexpected message",
                 "Attach refused: ticket presented by another process",
                 "Attach refused: unknown or used ticket", "client does not read"):
        assert f"direct path: {kind}" in log, (kind, log)
    assert "Traceback" not in log, log


def test_a_server_with_direct_false_registers_without_a_socket():
    hosted = Hosted("plugins.kernel_only:KernelOnlyProbe")
    try:
        assert hosted.direct == ""
        assert not [p for p in hosted.directory.iterdir() if p.name.startswith("d-")]
        # the kernel path serves it as always
        ticket_ignored = os.urandom(16)
        hosted.fake.send(PeerInfo(1, os.getpid(), os.getuid(), os.getgid(), sys.executable))
        hosted.fake.send(NewSession(5, 0x30, (1, 0, 0), 1, b"", ticket_ignored, 1))
        assert hosted.fake.completion(5) == Negotiated(5, KErrNone, b"")
    finally:
        hosted.close()



def test_a_kernel_death_closes_the_direct_path_and_a_new_registration_opens_another(kernel):
    kernel.serve(PROBE, "probe")

    def sockets() -> list[Path]:
        return [p for p in kernel.workdir.iterdir() if p.name.startswith("d-")]

    (first,) = wait_until(sockets, what="the server's direct socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(WAIT)
        sock.connect(str(first))
        assert call(sock, Attach(1, os.urandom(16))) == Completed(1, KErrPermissionDenied, ())
        kernel.restart()
        assert receive(sock) is None  # the connection closed with the registration
    finally:
        sock.close()
    second = wait_until(lambda: [p for p in sockets() if p != first],
                        what="a new direct socket for the new registration")
    assert not first.exists() and len(second) == 1


def test_the_kernel_removes_the_direct_socket_of_a_killed_server(kernel):
    server = kernel.serve(PROBE, "probe")
    (path,) = wait_until(lambda: [p for p in kernel.workdir.iterdir() if p.name.startswith("d-")],
                         what="the server's direct socket")
    server.kill(signal.SIGKILL)  # it cannot remove its socket itself
    wait_until(lambda: not path.exists(), what="the kernel to remove the dead server's socket")
    assert (kernel.workdir / "kernel").exists()
