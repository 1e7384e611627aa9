"""Tests of ipcfw.server.port (`DirectPort`) in this process: real SOCK_SEQPACKET sockets, no
other process. A `ServerState` over a small plugin owns the rules; the test plays the loop
(polling, calling `serve` and `flush`) and the clients (raw sockets connected to the port).
The bounds: descriptors, connections per process, time to Attach, bytes unread; and what a
Disconnect or a PeerGone does to the connections.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from ipcfw import errors
from ipcfw.protocol import (
    DIRECT_MAX_UNREAD,
    Attach,
    Close,
    Complete,
    Completed,
    Disconnect,
    Mode,
    NewSession,
    PeerGone,
    PeerInfo,
    Request,
    decode,
    encode,
    unpack_batch,
)
from ipcfw.server import ClientInfo, CServer, CSession, RMessage
from ipcfw.server import port as ports
from ipcfw.server.message import DirectMessage
from ipcfw.server.overlay import Layers
from ipcfw.server.port import DIRECT_PER_PID, DirectPort
from ipcfw.server.state import ServerState
from ipcfw.version import TVersion

MAX_FRAME = 4096
SYNC, ASYNC = int(Mode.SYNC), int(Mode.ASYNC)
CLIENT = 3


class Echo(CSession):
    def ServiceL(self, message: RMessage) -> None:
        self.Server().events.append(("service", message.Int0()))
        if message.Function() == 1:
            message.Complete(message.Int0())
        else:
            self.Server().held.append(message)

    def Cancelled(self, message: RMessage) -> None:
        self.Server().events.append(("cancelled", message.Int0()))

    def Disconnect(self, message: RMessage) -> None:
        self.Server().events.append(("disconnect",))
        message.Complete(errors.KErrNone)


class EchoServer(CServer):
    name = "port-test"
    version = TVersion(1, 0, 0)
    session_class = Echo

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.held: list[RMessage] = []

    def AcceptL(self, client: ClientInfo | None, version: TVersion, payload: bytes) -> None:
        return None


class Loop:
    def on_loop_thread(self) -> bool:
        return True

    def call_soon(self, fn: Any) -> None:
        fn()


class Setup:
    """A port with its rules (a ServerState's), polled by the test."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="ipcfw-port-")
        self.loop_thread = threading.get_ident()
        self.wakes = 0
        self.port = DirectPort("port-test", self.on_loop_thread, self.wake)
        self.port.open(self.directory)
        assert self.port.path
        self.kernel: list[Any] = []
        self.server = EchoServer()
        self.state = ServerState(Layers(self.server, Loop()), lambda f: self.kernel.append(
            decode(f)), max_frame=MAX_FRAME, direct=self.port)
        self.port.rules = self.state.direct
        self.port.max_frame = MAX_FRAME
        self.poller = zmq.Poller()
        # (the host polls its kernel socket and wake-up pipe beside the port's: never nothing)
        self.pipe = os.pipe()
        self.poller.register(self.pipe[0], zmq.POLLIN)
        self.port.watch(self.poller)
        self.sockets: list[socket.socket] = []
        self.state.receive(PeerInfo(CLIENT, os.getpid(), os.getuid(), os.getgid(), "x"))

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self.loop_thread

    def wake(self) -> None:
        self.wakes += 1

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.port.close()
        for fd in self.pipe:
            os.close(fd)
        shutil.rmtree(self.directory, ignore_errors=True)

    def turn(self, timeout: int = 0) -> None:
        self.port.serve(dict(self.poller.poll(timeout)))

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(5)
        sock.connect(self.port.path)
        self.sockets.append(sock)
        return sock

    def attached(self, handle: int, slots: int = 4) -> socket.socket:
        ticket = os.urandom(16)
        self.state.receive(NewSession(1, handle, (1, 0, 0), CLIENT, b"", ticket, slots))
        sock = self.connect()
        sock.send(encode(Attach(1, ticket)))
        self.turn()  # accepted
        self.turn(1000)  # read
        assert decode(sock.recv(MAX_FRAME)) == Completed(1, handle, ())
        self.kernel.clear()
        return sock


@pytest.fixture
def setup() -> Iterator[Setup]:
    setup = Setup()
    try:
        yield setup
    finally:
        setup.close()


def closed(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        while sock.recv(1 << 16):
            pass
    except (TimeoutError, BlockingIOError):
        return False
    except ConnectionResetError:
        return True
    return True


def turns_without_descriptors(setup, headroom: int) -> int:
    """Turn the port's loop for 0.3 s with every file descriptor taken (the soft limit set just
    above those open, `headroom` more, then filled); return how many turns it made."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fill: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(int(f) for f in os.listdir("/proc/self/fd"))
                                                + headroom, hard))
    try:
        try:
            while True:
                fill.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        turns, start = 0, time.monotonic()
        while time.monotonic() - start < 0.3:
            setup.turn(100 if setup.port.timeout is None else min(100, setup.port.timeout))
            turns += 1
    finally:
        for fd in fill:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return turns


def test_out_of_descriptors_does_not_spin_and_sheds_the_waiting_connections(setup):
    clients = [setup.connect() for _ in range(10)]
    turns = turns_without_descriptors(setup, headroom=4)
    assert turns < 20, f"{turns} turns in 0.3 s: the loop spins"
    assert all(closed(client) for client in clients)  # shed, not left in the backlog
    assert setup.port.rules is not None
    assert setup.port.rules.problems["out of file descriptors"] == 10
    # descriptors back: connections are accepted again
    setup.attached(0x40)


def test_without_a_spare_descriptor_the_listener_rests(setup):
    os.close(setup.port._spare)  # type: ignore[arg-type]
    setup.port._spare = None
    setup.connect()
    turns = turns_without_descriptors(setup, headroom=2)
    assert turns < 20, f"{turns} turns in 0.3 s: the loop spins"


def test_the_connection_cap_follows_the_descriptor_limit():
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert ports.connection_cap() < soft


def test_a_process_has_at_most_its_share_of_connections(setup):
    socks = [setup.connect() for _ in range(DIRECT_PER_PID + 1)]
    setup.turn()
    assert len(setup.port._links) == DIRECT_PER_PID
    assert closed(socks[-1]) and not closed(socks[0])


def test_a_connection_that_does_not_attach_in_time_is_closed(setup, monkeypatch):
    monkeypatch.setattr(ports, "ATTACH_WITHIN", 0.05)
    idle = setup.connect()
    good = setup.attached(0x41)
    assert setup.port.timeout is not None  # the loop wakes the port then
    time.sleep(0.06)
    setup.turn(setup.port.timeout)
    assert closed(idle) and not closed(good)
    assert setup.port.timeout is None


def test_a_client_that_does_not_read_is_bounded_in_bytes(setup):
    sock = setup.attached(0x42)
    link = next(iter(setup.port._links.values()))
    connection = link.connection
    frame = encode(Completed(9, 0, ((0, b"x" * (MAX_FRAME - 64)),)))
    most = 0
    for _ in range(DIRECT_MAX_UNREAD + 10_000):
        setup.port.send(connection, frame)
        if link.closing:
            break
        most = max(most, link.queued)
    assert link.closing, "never closed"
    assert most <= setup.port.outbox_bytes < DIRECT_MAX_UNREAD * len(frame)
    assert sock is not None


def test_completions_after_the_registration_ended_are_dropped(setup):
    setup.attached(0x43)
    connection = next(iter(setup.port._links.values())).connection
    message = DirectMessage(connection, 5, 2, (), None, None, None, 0x43, ASYNC)
    setup.state.end()
    thread = threading.Thread(target=setup.port.post,
                              args=(connection, message, encode(Completed(5, 0, ()))))
    thread.start()
    thread.join()
    assert not setup.port._outbox and setup.wakes == 0


def test_a_disconnect_reads_the_connection_first(setup):
    sock = setup.attached(0x44)
    sock.send(encode(Request(2, 0x44, 1, (7,), SYNC)))
    sock.send(encode(Close(0x44)))
    setup.state.receive(Disconnect(50, 0x44))  # before the loop read the connection
    assert setup.server.events == [("service", 7), ("disconnect",)]
    assert decode(sock.recv(MAX_FRAME)) == Completed(2, 7, ())
    assert setup.kernel == [Complete(50, errors.KErrNone, ())]


def test_a_peer_gone_closes_the_processs_connections(setup):
    sock = setup.attached(0x45)
    sock.send(encode(Request(2, 0x45, 2, (1,), ASYNC)))  # held
    setup.turn()
    setup.state.receive(PeerGone(CLIENT))
    setup.port.flush()  # (the wake-up the port asked for)
    assert setup.wakes and closed(sock)
    assert setup.server.events == [("service", 1), ("cancelled", 1)]
    assert not setup.port._links


def test_an_attach_read_late_because_the_loop_was_busy_still_counts(setup, monkeypatch):
    monkeypatch.setattr(ports, "ATTACH_WITHIN", 0.05)
    ticket = os.urandom(16)
    setup.state.receive(NewSession(1, 0x46, (1, 0, 0), CLIENT, b"", ticket, 1))
    sock = setup.connect()
    setup.turn()  # accepted
    sock.send(encode(Attach(1, ticket)))
    time.sleep(0.06)  # the loop was busy past the deadline
    setup.turn(100)
    assert decode(sock.recv(MAX_FRAME)) == Completed(1, 0x46, ())
    assert not closed(sock)


def test_what_a_client_sent_before_it_hung_up_is_still_served(setup):
    # A client thread that ends right after its requests: the first answer finds its end
    # closed (EPIPE), and the requests behind it are still read and served, to the end of file.
    sock = setup.attached(0x51)
    for n in range(5):
        sock.send(encode(Request(10 + n, 0x51, 1, (n,), SYNC)))
    sock.close()
    setup.sockets.remove(sock)
    for _ in range(3):
        setup.turn(100)
        setup.port.flush()
    assert setup.server.events == [("service", n) for n in range(5)]
    assert setup.port.rules is not None and setup.port.rules.attached(0x51) == 0  # it ended


def test_the_answers_to_requests_read_in_one_turn_go_in_one_datagram(setup):
    sock = setup.attached(0x47, slots=8)
    for n in range(5):
        sock.send(encode(Request(10 + n, 0x47, 1, (n,), ASYNC)))
    setup.turn(1000)
    datagram = sock.recv(MAX_FRAME)
    assert [decode(frame) for frame in unpack_batch(datagram)] == [
        Completed(10 + n, n, ()) for n in range(5)
    ]
    sock.send(encode(Request(20, 0x47, 1, (9,), SYNC)))  # one answer: a plain frame
    setup.turn(1000)
    assert decode(sock.recv(MAX_FRAME)) == Completed(20, 9, ())


def test_a_batch_holds_a_few_answers_so_the_client_gets_the_first_ones_early(setup):
    sock = setup.attached(0x49, slots=64)
    for n in range(40):
        sock.send(encode(Request(100 + n, 0x49, 1, (n,), ASYNC)))
    setup.turn(1000)
    sizes = [len(unpack_batch(sock.recv(MAX_FRAME))) for _ in range(3)]
    assert sizes == [ports.BATCH_FRAMES, ports.BATCH_FRAMES, 40 - 2 * ports.BATCH_FRAMES]


def test_answers_gathered_before_a_bad_frame_are_sent_before_the_connection_closes(setup):
    sock = setup.attached(0x48, slots=8)
    sock.send(encode(Request(10, 0x48, 1, (1,), ASYNC)))
    sock.send(encode(Request(11, 0x48, 1, (2,), ASYNC)))
    sock.send(b"\x93not a frame")
    setup.turn(1000)
    datagram = sock.recv(MAX_FRAME)
    assert [decode(frame) for frame in unpack_batch(datagram)] == [
        Completed(10, 1, ()), Completed(11, 2, ())
    ]
    assert closed(sock)

