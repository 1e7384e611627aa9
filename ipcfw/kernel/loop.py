"""The kernel process: one ROUTER socket, a plain `zmq.Poller` loop, and nothing else.

Theory of operation
-------------------
The loop receives frames, decodes them, asks `KernelState` what to do, and does it. It holds no
rule about handles, slots or sessions; those live in `state.py`. Its own jobs are the ones that
need the OS:

* identity: a new routing id must open with Hello; the loop identifies its process from the
  frame's ``Peer-Address`` (SO_PEERCRED) and checks every later frame from that routing id
  carries the same address, so a peer can never speak as another;
* liveness: pidfds and the ROUTER's monitor socket become `process_died` / `peer_gone` inputs;
* delivery without loss: the ROUTER is MANDATORY with no high-water mark; a send that would block
  goes to a per-peer backlog, flushed in order, and a send to a vanished peer is that peer's death;
* hostility: a malformed frame or a protocol violation is dropped and reported once per kind
  (then counted), never allowed to raise out of the loop.

The kernel binds only ``ipc://`` endpoints, in a private 0700 directory, and takes an `flock`
beside the socket so a second kernel on the same endpoint refuses to start instead of silently
stealing the path.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import os
import threading
from typing import Iterable, Optional

import zmq
import zmq.utils.monitor

from .. import endpoint as endpoints
from .._zmqflags import NOBLOCK, RCVMORE, SNDMORE
from ..protocol import MAX_FRAME, Hello, ProtocolError, decode, encode
from .liveness import ProcessWatcher, UnknownPeer, identify
from .state import (
    Action,
    KernelInvariantError,
    KernelState,
    PeerMisbehaved,
    Send,
    Unwatch,
    Watch,
)

log = logging.getLogger("ipcfw.kernel")

_DRAIN_BATCH = 512  # frames per socket per loop turn, so no source can starve another
_SEND_HWM = 10_000  # frames queued in libzmq per peer before the kernel's backlog takes over
_BACKLOG_LIMIT = 100_000  # frames waiting for one peer before it is treated as gone


class KernelAlreadyRunning(RuntimeError):
    """Another kernel holds the lock for this endpoint."""


class _Reporter:
    """Logs the first problem of each kind with its detail, then only counts that kind."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def report(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        if self.counts[kind] == 1:
            log.warning("rejected %s: %s (further ones are counted, not logged)", kind, detail)

    def log_summary(self) -> None:
        for kind, count in sorted(self.counts.items()):
            if count > 1:
                log.warning("rejected %d frames in all for %s", count, kind)


class _EndpointLock:
    """An exclusive flock on ``<socket>.lock``: one kernel per endpoint."""

    def __init__(self, socket_path: str) -> None:
        self.path = socket_path + ".lock"
        self._file = open(self.path, "w")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise KernelAlreadyRunning(
                f"a kernel is already running on ipc://{socket_path} (lock {self.path} is held)"
            ) from None

    def release(self) -> None:
        self._file.close()


class Kernel:
    """The kernel: binds `endpoint` and brokers every session until `stop()` is called.

    ::

        kernel = Kernel("ipc:///tmp/ipcfw-demo/kernel")
        kernel.run()          # blocks; stop() from a signal handler or another thread
    """

    def __init__(
        self,
        endpoint: Optional[str] = None,
        *,
        pool_slots: int = 4096,
        protserv_uids: Iterable[int] = (),
    ) -> None:
        self.endpoint = endpoints.resolve(endpoint)
        self.socket_path = endpoints.ipc_path(self.endpoint)
        self.state = KernelState(
            kernel_pid=os.getpid(),
            pool_slots=pool_slots,
            protserv_uids=frozenset(protserv_uids),
        )
        self._stop = threading.Event()
        self._reporter = _Reporter()
        self._watcher = ProcessWatcher()
        self._backlog: dict[bytes, collections.deque] = {}
        self._address_of: dict[bytes, str] = {}
        self._rid_of_fd: dict[int, bytes] = {}
        self._gone: list[bytes] = []

    def stop(self) -> None:
        """Ask the loop to finish; safe from signal handlers and other threads."""
        self._stop.set()

    def run(self, ready: Optional[threading.Event] = None) -> None:
        """Bind, serve until stopped, then remove the socket file. Blocks."""
        endpoints.ensure_private_dir(os.path.dirname(self.socket_path))
        lock = _EndpointLock(self.socket_path)
        context = zmq.Context()
        try:
            self._router = self._bind(context)
            self._monitor = self._router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            log.info("kernel %d listening on %s", os.getpid(), self.endpoint)
            if ready is not None:
                ready.set()
            self._serve()
        finally:
            self._reporter.log_summary()
            self._watcher.close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
            context.destroy(linger=0)
            lock.release()
            log.info("kernel %d stopped", os.getpid())

    def _bind(self, context: zmq.Context) -> zmq.Socket:
        router = context.socket(zmq.ROUTER)
        router.router_mandatory = 1  # EHOSTUNREACH / Again, never a silent drop
        router.router_handover = 0  # a live routing id cannot be taken over
        # MANDATORY makes a full peer raise Again instead of dropping; the frames then wait in
        # a per-peer backlog (bounded: a peer that never reads is cut off).
        router.sndhwm = _SEND_HWM
        router.maxmsgsize = MAX_FRAME + 4096  # last-resort guard; clients check sizes first
        router.linger = 0
        old_umask = os.umask(0o077)
        try:
            router.bind(self.endpoint)
        finally:
            os.umask(old_umask)
        return router

    # -- the loop ----------------------------------------------------------------------------

    def _serve(self) -> None:
        self._poller = zmq.Poller()
        self._poller.register(self._router, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        while not self._stop.is_set():
            timeout = 5 if self._backlog else 200
            for source, _ in self._poller.poll(timeout):
                try:
                    if source is self._router:
                        self._drain_router()
                    elif source is self._monitor:
                        self._drain_monitor()
                    else:
                        self._process_exited(source)
                except Exception:  # a bug or an exhausted resource must not end the kernel
                    log.exception("kernel loop error (the event was dropped; serving on)")
            if self._backlog:
                self._flush_backlog()

    def _drain_router(self) -> None:
        # One zmq.Again per batch costs less than a getsockopt(EVENTS) per message.
        router = self._router
        for _ in range(_DRAIN_BATCH):
            try:
                rid = router.recv(NOBLOCK)
            except zmq.Again:
                return
            body = router.recv(copy=False)  # a Frame: its metadata carries Peer-Address
            if body.more:
                self._discard_rest(body)
            else:
                self._on_frame(rid, body)

    def _discard_rest(self, body: zmq.Frame) -> None:
        extra = 1
        while self._router.get(RCVMORE):
            self._router.recv()
            extra += 1
        self._reporter.report("frame count", f"expected one frame per message, got {extra + 1} from pid {_pid_in(body)}")

    def _on_frame(self, rid: bytes, body: zmq.Frame) -> None:
        try:
            message = decode(body.bytes)
        except ProtocolError as exc:
            self._reporter.report("malformed frame", f"from pid {_pid_in(body)}: {exc}")
            return
        try:
            known = self._address_of.get(rid)
            if known is None:
                actions = self._introduce(rid, body, message)
            elif body.get("Peer-Address") != known:
                raise PeerMisbehaved("routing id reuse", f"routing id {rid.hex()} now from {_pid_in(body)}")
            else:
                actions = self.state.receive(rid, message)
        except PeerMisbehaved as exc:
            self._reporter.report(exc.kind, exc.detail)
            return
        except UnknownPeer as exc:
            self._reporter.report("unidentified peer", str(exc))
            return
        except KernelInvariantError:
            log.exception("kernel invariant broken handling %s; the message was dropped", type(message).__name__)
            return
        self._perform(actions)

    def _introduce(self, rid: bytes, body: zmq.Frame, message: object) -> list[Action]:
        if type(message) is not Hello:
            raise PeerMisbehaved("no hello", f"{type(message).__name__} before Hello from pid {_pid_in(body)}")
        # The fd of a closed connection can be reused by this new one: settle earlier
        # disconnects first so they are not mistaken for this peer's.
        self._drain_monitor()
        address = body.get("Peer-Address")
        identity = identify(address)
        actions = self.state.hello(rid, identity, message)
        if self.state.knows(rid):  # (not when refused, e.g. for its protocol version)
            self._address_of[rid] = address
            self._rid_of_fd[int(body.get("__fd"))] = rid
        return actions

    def _drain_monitor(self) -> None:
        while True:
            try:
                event = zmq.utils.monitor.recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                rid = self._rid_of_fd.pop(int(event["value"]), None)
                if rid is not None:
                    self._peer_gone(rid)

    def _process_exited(self, fd: int) -> None:
        key = self._watcher.key_of(fd)
        if key is not None:
            self._perform(self.state.process_died(key))
            self._forget_departed()

    def _peer_gone(self, rid: bytes) -> None:
        self._perform(self.state.peer_gone(rid))
        self._forget_departed()

    def _forget_departed(self) -> None:
        for rid in [r for r in self._address_of if not self.state.knows(r)]:
            del self._address_of[rid]
            self._backlog.pop(rid, None)

    # -- actions -----------------------------------------------------------------------------

    def _perform(self, actions: list[Action]) -> None:
        for action in actions:
            if type(action) is Send:
                self._send(action.rid, encode(action.message))
            elif type(action) is Watch:
                self._watch(action)
            elif type(action) is Unwatch:
                fd = self._watcher.unwatch(action.key)
                if fd is not None:
                    self._poller.unregister(fd)
        while self._gone:
            self._peer_gone(self._gone.pop())

    def _watch(self, action: Watch) -> None:
        fd = self._watcher.watch(action.identity)
        if fd is None:
            self._perform(self.state.process_died(action.identity.key))
        elif fd >= 0:  # (-1: no fd to spare; the monitor socket still reports its sockets)
            self._poller.register(fd, zmq.POLLIN)

    def _send(self, rid: bytes, frame: bytes) -> None:
        queue = self._backlog.get(rid)
        if queue is not None:
            if len(queue) >= _BACKLOG_LIMIT:
                self._reporter.report("peer not reading", f"{len(queue)} frames wait for {rid.hex()}")
                queue.clear()
                self._gone.append(rid)  # it holds nothing anyone waits for any more
                return
            queue.append(frame)  # keep order behind what is already waiting
            return
        try:
            self._send_now(rid, frame)
        except zmq.Again:
            self._backlog[rid] = collections.deque([frame])
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self._gone.append(rid)

    def _send_now(self, rid: bytes, frame: bytes) -> None:
        # Again or EHOSTUNREACH is raised on the routing frame, before anything is queued.
        self._router.send(rid, SNDMORE | NOBLOCK)
        self._router.send(frame, NOBLOCK)

    def _flush_backlog(self) -> None:
        for rid in list(self._backlog):
            queue = self._backlog[rid]
            while queue:
                try:
                    self._send_now(rid, queue[0])
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:
                    if exc.errno != zmq.EHOSTUNREACH:
                        raise
                    queue.clear()
                    self._gone.append(rid)
                    break
                queue.popleft()
            if not queue:
                del self._backlog[rid]
        while self._gone:
            self._peer_gone(self._gone.pop())


def _pid_in(frame: zmq.Frame) -> str:
    try:
        return frame.get("Peer-Address").rsplit(":", 1)[-1]
    except (zmq.ZMQError, AttributeError):
        return "?"
