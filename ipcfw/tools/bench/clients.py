"""The clients the bench drives, one per system, and what a call is.

Every request carries the equivalent of an opcode and four 32-bit ints (`PAYLOAD`, 32 bytes,
for the bare systems; ``SendReceive(ECHO_INT, ECHO_ARGS)`` for ipcfw), and every reply echoes
it. A lost reply fails a step (`REPLY_TIMEOUT_MS`, `watchdog`) instead of hanging the bench.
"""

from __future__ import annotations

import gc
import queue
import signal
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing import connection
from typing import Protocol, TypeVar

import zmq

from ...client import RSession, TRequestStatus
from .roles import MANAGERS_AUTHKEY, AdderManager

WINDOW = 64
"""Requests in flight in the pipelined measurement."""

ECHO_INT = 1
"""The echo servers' opcode ``EEchoInt``: completes with ``Int0``."""
ECHO_ARGS = (42, 0, 0, 0)
ECHO_DES = 2
"""The echo servers' opcode ``EEchoDes``: writes descriptor 0 into descriptor 1, completes
with its length."""
PAYLOAD = struct.pack("<I4i", ECHO_INT, *ECHO_ARGS).ljust(32, b"\0")
"""The bare systems' request body: opcode + four int32, padded to 32 bytes."""

REPLY_TIMEOUT_MS = 10_000
STOP_TIMEOUT = 3.0
"""Seconds for closing a client, and for the bench's processes to exit after SIGTERM."""


class BenchError(Exception):
    """A bare system failed: the bench cannot produce a baseline."""


class WrongReply(Exception):
    """A system answered, but not with the echo of the request."""


class Stalled(Exception):
    """A step took longer than its budget: a lost reply or a hung call."""


@contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Raise Stalled in the main thread if the block runs longer than ``seconds``.

    Lost replies must not hang the bench; outside the main thread this does nothing.
    """
    def expire(signum: int, frame: object) -> None:
        raise Stalled(f"no progress within {seconds:.0f} s")

    try:
        previous = signal.signal(signal.SIGALRM, expire)
    except ValueError:
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def gc_paused() -> Iterator[None]:
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class Client(Protocol):
    expected: object
    """What ``call()`` must return."""
    pipelines: bool
    """Whether it can keep several calls in flight (a managers proxy cannot)."""

    def call(self) -> object:
        """One synchronous round trip; returns the reply."""

    def pipelined(self, n: int, window: int) -> None:
        """Complete ``n`` calls with up to ``window`` in flight."""

    def close(self) -> None: ...


T = TypeVar("T")


def pipeline(send: Callable[[T], object], request: T, receive: Callable[[], object], n: int,
             window: int) -> None:
    """Complete `n` calls of a socket-like client with up to `window` in flight: send
    `request` `window` times, then once more for each answer received."""
    issued = min(window, n)
    for _ in range(issued):
        send(request)
    for _ in range(n):
        receive()
        if issued < n:
            send(request)
            issued += 1


class BareClient:
    """A DEALER sending PAYLOAD; a missing reply raises BenchError instead of hanging."""

    expected: object = PAYLOAD
    pipelines = True

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        self._sock.rcvtimeo = REPLY_TIMEOUT_MS
        self._sock.connect(endpoint)

    def _recv(self) -> bytes:
        try:
            return self._sock.recv()
        except zmq.Again:
            raise BenchError(f"no reply within {REPLY_TIMEOUT_MS / 1000:.0f} s") from None

    def call(self) -> bytes:
        self._sock.send(PAYLOAD)
        return self._recv()

    def pipelined(self, n: int, window: int) -> None:
        pipeline(self._sock.send, PAYLOAD, self._recv, n, window)

    def close(self) -> None:
        self._sock.close(linger=0)


class IpcfwClient:
    """An ``RSession`` to the echo server; pipelining keeps TRequestStatus objects in a deque."""

    expected: object = ECHO_ARGS[0]
    pipelines = True

    def __init__(self, session: RSession) -> None:
        self.session = session

    def call(self) -> object:
        return self.session.SendReceive(ECHO_INT, ECHO_ARGS)

    def _issue(self) -> TRequestStatus:
        status = TRequestStatus()
        self.session.SendReceive(ECHO_INT, ECHO_ARGS, status)
        return status

    def pipelined(self, n: int, window: int) -> None:
        inflight = deque(self._issue() for _ in range(min(window, n)))
        issued = len(inflight)
        while inflight:
            value = inflight.popleft().Wait()
            if value != self.expected:
                raise WrongReply(
                    f"async EEchoInt completed with {value!r}, expected {self.expected!r}")
            if issued < n:
                inflight.append(self._issue())
                issued += 1

    def close(self) -> None:
        self.session.Close()


class ManagersClient:
    """A ``multiprocessing.managers`` proxy: ``adder.add(42, 0, 0, 0)``, one call at a time (a
    proxy call blocks until its answer: it cannot pipeline)."""

    expected: object = sum(ECHO_ARGS)
    pipelines = False

    def __init__(self, address: str) -> None:
        self._manager = AdderManager(address=address, authkey=MANAGERS_AUTHKEY)
        self._manager.connect()
        self._adder = self._manager.Adder()  # type: ignore[attr-defined]  # (registered)

    def call(self) -> object:
        return self._adder.add(*ECHO_ARGS)

    def pipelined(self, n: int, window: int) -> None:
        raise NotImplementedError("a managers proxy makes one call at a time")

    def close(self) -> None:
        del self._adder  # its decref is the proxy's last message to the server


class PipeClient:
    """A ``multiprocessing.connection`` (what ``multiprocessing.Pipe`` gives) sending the
    opcode and four ints as a tuple, pickled; the helper sends it back."""

    expected: object = (ECHO_INT, *ECHO_ARGS)
    pipelines = True

    def __init__(self, address: str) -> None:
        self._conn = connection.Client(address, family="AF_UNIX")

    # A blocking recv, as a user's would be (a poll with a timeout builds a selector per
    # call, several times the round trip); each step's watchdog bounds a lost reply.

    def call(self) -> object:
        self._conn.send(self.expected)
        return self._conn.recv()

    def pipelined(self, n: int, window: int) -> None:
        pipeline(self._conn.send, self.expected, self._conn.recv, n, window)

    def close(self) -> None:
        self._conn.close()


class SharedEcho:
    """``threads`` worker threads making sync calls on one ``ShareAuto``'d ``RSession``.

    The workers live as long as the case (each thread's first call opens its channel to the
    kernel, which then stays attached to the session); ``run`` hands each the same number of
    calls and waits for all of them.
    """

    def __init__(self, session: RSession, threads: int) -> None:
        self._session = session
        self._results: queue.SimpleQueue[list[int] | BaseException] = queue.SimpleQueue()
        self._orders: list[queue.SimpleQueue[int | None]] = [
            queue.SimpleQueue() for _ in range(threads)
        ]
        self._threads = [
            threading.Thread(target=self._work, args=(orders,), name=f"bench-shared-{i}",
                             daemon=True)
            for i, orders in enumerate(self._orders)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self, orders: queue.SimpleQueue[int | None]) -> None:
        clock, call, expected = time.perf_counter_ns, self._session.SendReceive, ECHO_ARGS[0]
        while (n := orders.get()) is not None:
            out = [0] * n
            try:
                for i in range(n):
                    t0 = clock()
                    value = call(ECHO_INT, ECHO_ARGS)
                    out[i] = clock() - t0
                    if value != expected:
                        raise WrongReply(f"EEchoInt on the shared session returned {value!r},"
                                         f" expected {expected!r}")
            except BaseException as exc:  # handed to the main thread, which reports it
                self._results.put(exc)
            else:
                self._results.put(out)

    def _next_result(self) -> list[int] | BaseException:
        while True:  # short waits: the watchdog's SIGALRM must get through to the main thread
            try:
                return self._results.get(timeout=0.1)
            except queue.Empty:
                continue

    def run(self, n: int) -> tuple[float, list[int]]:
        """Every thread makes ``n`` sync calls; returns (wall seconds, every call's latency in
        ns)."""
        with gc_paused():
            t0 = time.perf_counter()
            for orders in self._orders:
                orders.put(n)
            results = [self._next_result() for _ in self._orders]
            seconds = time.perf_counter() - t0
        latencies: list[int] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            latencies.extend(result)
        return seconds, latencies

    def close(self) -> None:
        """Stop the workers, then close the session (which also releases a worker stuck in a
        call)."""
        for orders in self._orders:
            orders.put(None)
        deadline = time.monotonic() + STOP_TIMEOUT
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._session.Close()
