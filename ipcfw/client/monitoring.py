"""Watching a kernel's traffic from Python: `Monitor` and `monitor()` (what ``ipcfw monitor``
uses).

A monitor is a channel of its own (a DEALER socket to the kernel, said Hello as a client
thread's) on which it sends one `Monitor` request; the kernel answers once it has started
(once the servers on the direct path it concerns report their traffic), then sends batches of
events (`MonitorEvents`) as long as the monitor has credit, which it grants again as it reads
them. A monitor that stops reading loses events (the kernel's buffer for it is bounded), never
slows anyone: the first event after a loss says how many were lost (`MonitorEvent.lost`).
It is not tied to the process's `Runtime`: it may be used from any one thread at a time.
"""

from __future__ import annotations

import time
from typing import NamedTuple
from collections.abc import Iterator

import zmq

from .. import endpoint as endpoints
from .. import errors
from .._zmqflags import NOBLOCK
from ..events import EventKind, unpack_events
from ..protocol import (
    MONITOR_CREDIT,
    Cancel,
    Completed,
    Dropped,
    Monitor as MonitorRequest,
    MonitorEvents,
    Path,
    ProtocolError,
    Role,
    decode,
    encode,
)
from ..transport import KernelWatch, open_socket
from .channel import hello

__all__ = ["Monitor", "MonitorEvent", "monitor"]

_REQ_ID = 1  # the one request on a monitor's channel
_START_TIMEOUT = 10.0


class MonitorEvent(NamedTuple):
    """One event (see docs/cli.md, ``ipcfw monitor``).

    `time` is the wall-clock time it happened (``time.time()``'s scale, from the CLOCK_MONOTONIC
    stamp of the kernel or, for a direct request or completion, of the server); `kind` one of
    "register", "connect", "connected", "request", "complete", "disconnect", "died"; `path`
    "kernel" or "direct"; `pid` the client's process (the server's for "register" and a
    server's "died"); `msg` matches a request with its completion; `function` is a request's
    (-1 otherwise); `value` a completion's (a connect's: the handle, or the error); `micros` a
    completion's time since its request, in microseconds (-1: unknown); `detail` a request's
    argument summary, a completion's error text, who died; `lost` how many events this monitor
    lost just before this one (its buffer in the kernel or the server was full)."""

    time: float
    kind: str
    server: str
    pid: int
    handle: int
    path: str
    msg: int
    function: int
    value: int
    micros: int
    detail: str
    lost: int = 0


_KIND_NAMES = {int(kind): kind.name.lower() for kind in EventKind}
_PATH_NAMES = {int(path): path.name.lower() for path in Path}


class Monitor:
    """A live view of what happens to server `name` (None: every server) in the kernel at
    `endpoint` (default: ``IPCFW_KERNEL``, else the default endpoint)::

        with Monitor("echo") as watch:
            for event in watch.read(timeout=1.0):
                print(event.kind, event.handle, event.function, event.value)

    It has started when the constructor returns: what anyone does from then on is seen.
    Raises `IpcError` if it cannot start (``BadName``, ``Overflow``: too many monitors; or
    ``CouldNotConnect`` with no kernel).
    """

    def __init__(self, name: str | None = None, endpoint: str | None = None) -> None:
        self.name = name or ""
        self.endpoint = endpoints.resolve(endpoint)
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._socket: zmq.Socket[bytes] = open_socket(self._context, self.endpoint)
        self._watch: KernelWatch | None = None
        self._poller = zmq.Poller()
        self._read = 0  # batches read since credit was last granted
        self._pending: list[MonitorEvent] = []
        self.closed = False
        try:
            welcome = hello(self._socket, Role.CHANNEL, self.endpoint)
            self._watch = KernelWatch(self._socket, welcome)
            self._poller.register(self._socket, zmq.POLLIN)
            self._poller.register(self._watch.pollable, zmq.POLLIN)
            # (the offset of the wall clock from CLOCK_MONOTONIC, to show times people read)
            self._offset = time.time() - time.monotonic()
            self._socket.send(encode(MonitorRequest(_REQ_ID, self.name, MONITOR_CREDIT)))
            self._await_start()
        except BaseException:
            self.close()
            raise

    def _await_start(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._socket.poll(int(left * 1000)):
                raise errors.IpcError(errors.KErrTimedOut,
                                      f"the kernel at {self.endpoint} did not start the monitor")
            reply = decode(self._socket.recv())
            if type(reply) is Completed and reply.req_id == _REQ_ID:
                if reply.value < 0:
                    raise errors.IpcError(reply.value, reply.text or f"monitor of {self.name!r}")
                return
            if type(reply) is MonitorEvents:  # (none come before the answer; kept if they do)
                self._pending += self._unpack(reply)

    def read(self, timeout: float | None = None) -> list[MonitorEvent]:
        """The events that have come, waiting up to `timeout` seconds (None: forever) for the
        first; [] if none came. Raises `IpcError` once the kernel has gone or stopped serving
        this monitor."""
        if self.closed:
            raise errors.IpcError(errors.KErrSessionClosed, "the monitor is closed")
        if self._pending:
            events, self._pending = self._pending, []
            return sorted(events + self._drain(), key=_time_of)
        ready = dict(self._poller.poll(None if timeout is None else int(timeout * 1000)))
        events = self._drain() if ready else []
        if self._watch is not None and self._watch.pollable in ready and not events \
                and self._watch.gone():
            raise errors.IpcError(errors.KErrServerTerminated,
                                  f"the ipcfw kernel at {self.endpoint} has gone")
        # In time order: a server's direct events reach the kernel at the end of its loop's
        # turn, after the kernel's own events of the same moment may have been sent.
        events.sort(key=_time_of)
        return events

    def __iter__(self) -> Iterator[MonitorEvent]:
        """Every event, as it comes, until the monitor is closed or the kernel goes."""
        while not self.closed:
            yield from self.read(None)

    def _drain(self) -> list[MonitorEvent]:
        events: list[MonitorEvent] = []
        while True:
            try:
                raw = self._socket.recv(NOBLOCK)
            except zmq.Again:
                break
            try:
                reply = decode(raw)
            except ProtocolError:
                continue
            if type(reply) is MonitorEvents:
                events += self._unpack(reply)
                self._read += 1
            elif type(reply) is Dropped:
                raise errors.IpcError(errors.KErrDisconnected,
                                      "the kernel stopped serving this monitor")
        if self._read >= MONITOR_CREDIT // 2:  # credit back for what was read, in one frame
            self._socket.send(encode(MonitorRequest(_REQ_ID, self.name, self._read)))
            self._read = 0
        return events

    def _unpack(self, batch: MonitorEvents) -> list[MonitorEvent]:
        try:
            raw = unpack_events(batch.events)
        except ProtocolError as exc:
            raise errors.IpcError(errors.KErrCorrupt, f"a monitor batch: {exc}") from None
        offset = self._offset
        events = [
            MonitorEvent(e.time + offset, _KIND_NAMES[e.kind], e.server, e.pid, e.handle,
                         _PATH_NAMES[e.path], e.msg, e.function, e.value, e.micros, e.detail)
            for e in raw
        ]
        if batch.lost:
            if events:
                events[0] = events[0]._replace(lost=batch.lost)
            else:  # (a loss and no event yet: the loss alone, as an event of its own)
                events = [MonitorEvent(time.time(), "lost", self.name, 0, 0, "kernel", 0, -1, 0,
                                       -1, f"{batch.lost} events lost", batch.lost)]
        return events

    def close(self) -> None:
        """Stop monitoring (the kernel forgets the monitor with its channel)."""
        if self.closed:
            return
        self.closed = True
        try:
            self._socket.send(encode(Cancel(_REQ_ID)), NOBLOCK)
        except zmq.ZMQError:
            pass
        if self._watch is not None:
            self._watch.close()
        self._context.destroy(linger=0)  # (the socket, and over tcp its link monitor)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _time_of(event: MonitorEvent) -> float:
    return event.time


def monitor(name: str | None = None, endpoint: str | None = None) -> Iterator[MonitorEvent]:
    """Yield every event of server `name` (None: every server), live, until the generator is
    closed (``break``, ``close()``) or the kernel goes. See `Monitor`."""
    with Monitor(name, endpoint) as watch:
        yield from watch
