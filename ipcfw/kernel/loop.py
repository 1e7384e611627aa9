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
* delivery without loss: the ROUTER is MANDATORY; a send that would block goes to a per-peer
  backlog, flushed in order, and a send to a vanished peer is that peer's death;
* backpressure: once `_HOLD_AT` frames wait for a server, the state holds its messages back
  (`KernelState.hold_back`) and the loop lets them go in batches as the server reads again
  (`release`), so a paused server's backlog stays small whatever is sent to it;
* the backlog cut-off: a peer that leaves `KernelLimits.max_backlog` frames unread is no longer
  served (`KernelState.peer_dropped`): its backlog is cleared, it is told with a `Dropped` notice
  queued behind what it has not read, and its later frames are ignored until its socket closes.
  The limits make this the last resort: a client within its limits never reaches it;
* hostility: a malformed frame or a protocol violation is dropped and reported once per kind
  (then counted), never allowed to raise out of the loop;
* other hosts (the configuration's ``[tcp]``): a second ROUTER listens on tcp with CURVE only.
  The kernel's own ZAP handler (`ZapHandler`, its socket polled here like the others) admits
  the keys the configuration lists and names each connection's peer (``User-Id``); such a
  peer's identity is that name's (`remote_identity`), its liveness its connections' (ZeroMQ
  heartbeats close a silent one, which the tcp ROUTER's monitor reports), and its sessions
  take the kernel path. A routing id belongs to one ROUTER: frames go back on the one the
  peer came by;
* activation (``--services DIR``): the state's `Spawn` and `Kill` go to the `Spawner`, whose
  pidfds and output pipes the poller watches; a process's exit goes back to the state
  (`service_exited`), and the poll's timeout is cut to the state's next activation deadline
  (a start or stop taking too long, an idle server), when `activation_tick` runs. The kernel
  stops what it started when it stops.

The kernel's endpoint is an ``ipc://`` one, in a private 0700 directory, and it takes an `flock`
beside the socket so a second kernel on the same endpoint refuses to start instead of silently
stealing the path; it listens on tcp only as its configuration says, and only with CURVE.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import os
import re
import reprlib
import stat
import threading
import time
from typing import cast
from collections.abc import Callable, Iterable

import zmq
import zmq.utils.monitor

from .. import curve
from .. import endpoint as endpoints
from .._zmqflags import EVENTS, NOBLOCK, RCVMORE, SNDMORE
from ..naming import lookup_key
from ..protocol import Hello, ProtocolError, decode, encode
from ..transport import set_heartbeats
from .activation import Kill, Service, Spawn
from .autoids import seed_auto_ids
from .config import KernelConfig
from .limits import KernelLimits
from .liveness import ProcessWatcher, UnknownPeer, identify, remote_identity
from .spawner import Exit, Spawner
from .state import (
    Action,
    Admission,
    KernelInvariantError,
    KernelState,
    PeerMisbehaved,
    RemoveSocket,
    Send,
    Unwatch,
    Watch,
)
from .zap import DOMAIN, ZAP_ENDPOINT, ZapHandler, error_reply

log = logging.getLogger("ipcfw.kernel")

_DIRECT_SOCKET = re.compile(r"d-[0-9a-f]+")  # a server's direct socket (ipcfw.server.port)
_DRAIN_BATCH = 512  # frames per socket per loop turn, so no source can starve another
_NOTICE_EVERY = 16  # messages between the router's looks for newly busy peers: see drain_router
_COPY_UPTO = 65_536  # frames up to this size are copied out of zmq to be decoded
_TRACE_REPR = reprlib.Repr()  # the debug log's messages: long ones cut in the middle
_TRACE_REPR.maxother = 400
_SEND_HWM = 10_000  # frames queued in libzmq per peer before the kernel's backlog takes over
_HOLD_AT = 1_000  # frames in a server's backlog before the state holds its messages back
_RELEASE = 1_000  # held messages let go at once when the server's backlog has emptied


class KernelAlreadyRunning(RuntimeError):
    """Another kernel holds the lock for this endpoint."""


class ListenError(RuntimeError):
    """The kernel cannot listen where its configuration says (a tcp address in use...)."""


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

    `services` (``ipcfw.kernel.spawner.load_services(DIR)``, what ``--services DIR`` reads)
    are the servers it starts on demand; it stops those it started when `run` returns.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        limits: KernelLimits | None = None,
        protserv_uids: Iterable[int] = (),
        services: Iterable[Service] = (),
        config: KernelConfig | None = None,
    ) -> None:
        self.endpoint = endpoints.resolve(endpoint)
        self.socket_path = endpoints.ipc_path(self.endpoint)
        self.config = config or KernelConfig()
        self.limits = (limits or self.config.limits).check()
        if self.limits.max_backlog < self.limits.least_backlog():
            log.warning(
                "max_backlog %d is below %d (outstanding + sessions per process + slack): a "
                "paused client that keeps within its limits may be cut off",
                self.limits.max_backlog, self.limits.least_backlog(),
            )
        self.state = KernelState(
            kernel_pid=os.getpid(),
            pool_slots=self.limits.pool_slots,
            max_frame=self.limits.max_frame,
            sessions_per_process=self.limits.sessions_per_process,
            outstanding_per_process=self.limits.outstanding_per_process,
            connections_per_uid=self.limits.connections_per_uid,
            protserv_uids=frozenset(protserv_uids),
            services=services,
            admission=Admission(os.getuid(), self.config.admit_uids, self.config.admit_gids),
            grants=self.config.capabilities,
        )
        # [tcp]: the kernel's keypair (read now: a bad key file stops the kernel before it
        # starts) and its ZAP handler.
        self._tcp_keys = (curve.load_keypair(self.config.tcp.key_file)
                          if self.config.tcp is not None else None)
        self._zap_handler = ZapHandler({peer.key: peer.name for peer in self.config.tcp.peers}
                                       if self.config.tcp is not None else {})
        self._tcp: zmq.Socket[bytes] | None = None  # the [tcp] listener and its ZAP socket
        self._zap: zmq.Socket[bytes] | None = None
        self._remote: dict[bytes, str] = {}  # routing id of a peer over tcp -> its key's name
        self._monitors: list[zmq.Socket[bytes]] = []
        self._spawner = Spawner(self.endpoint, self._watch_fd, self._unwatch_fd)
        self._stop = threading.Event()
        self._reporter = _Reporter()
        self._watcher = ProcessWatcher()
        self._backlog: dict[bytes, collections.deque[bytes]] = {}
        self._address_of: dict[bytes, str] = {}
        self._rid_of_fd: dict[int, bytes] = {}
        self._gone: list[bytes] = []
        self._cut: dict[bytes, int] = {}  # peers past the backlog limit -> frames they left unread
        self._dropped: set[bytes] = set()  # peers no longer served, until their socket closes
        # Whether every message in and out is logged (at DEBUG): read once in run(), so the
        # hot path pays a bool test per frame when it is not.
        self._trace = False

    def stop(self) -> None:
        """Ask the loop to finish; safe from signal handlers and other threads."""
        self._stop.set()

    def run(self, ready: threading.Event | None = None) -> None:
        """Bind, serve until stopped, then remove the socket file. Blocks."""
        endpoints.ensure_private_dir(os.path.dirname(self.socket_path), self.config.group)
        lock = _EndpointLock(self.socket_path)
        context = zmq.Context()
        try:
            self._router = self._bind(context)
            self._monitors = [self._router.get_monitor_socket(zmq.EVENT_DISCONNECTED)]
            log.info("kernel %d listening on %s", os.getpid(), self.endpoint)
            if self._tcp_keys is not None:
                self._listen_tcp(context)
            self._trace = log.isEnabledFor(logging.DEBUG)
            if ready is not None:
                ready.set()
            self._serve()
        finally:
            self._spawner.stop_all()  # the servers it started end with it
            self._reporter.log_summary()
            self._watcher.close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
            context.destroy(linger=0)
            lock.release()
            log.info("kernel %d stopped", os.getpid())

    def _bind(self, context: zmq.Context[zmq.Socket[bytes]]) -> zmq.Socket[bytes]:
        router = self._router_socket(context)
        # The socket file: the kernel's user's alone, or its configured group's too.
        old_umask = os.umask(0o077 if self.config.group is None else 0o007)
        try:
            router.bind(self.endpoint)
        finally:
            os.umask(old_umask)
        return router

    def _listen_tcp(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        """The [tcp] listener: CURVE only, every handshake asked of the kernel's ZAP handler
        (bound first: libzmq refuses CURVE handshakes while nobody answers there)."""
        assert self.config.tcp is not None and self._tcp_keys is not None
        self._zap = zap = context.socket(zmq.REP)
        zap.bind(ZAP_ENDPOINT)
        tcp = self._router_socket(context)
        tcp.curve_server = True
        tcp.curve_secretkey = self._tcp_keys.secret
        tcp.zap_domain = DOMAIN.encode()
        tcp.zap_enforce_domain = True
        set_heartbeats(tcp)  # a silent peer's connection is closed: its end is reported
        try:
            tcp.bind(self.config.tcp.listen)
        except zmq.ZMQError as exc:
            raise ListenError(f"cannot listen on {self.config.tcp.listen} ([tcp] listen): "
                              f"{exc}") from None
        self._tcp = tcp
        self._monitors.append(tcp.get_monitor_socket(zmq.EVENT_DISCONNECTED))
        log.info("kernel %d listening on %s with CURVE (public key %s) for %d keys",
                 os.getpid(), self.config.tcp.listen, self._tcp_keys.public.decode(),
                 len(self.config.tcp.peers))

    def _router_socket(self, context: zmq.Context[zmq.Socket[bytes]]) -> zmq.Socket[bytes]:
        seed_auto_ids()  # so this ROUTER's auto routing ids start where no one knows: autoids.py
        router: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
        router.router_mandatory = 1  # EHOSTUNREACH / Again, never a silent drop
        router.router_handover = 0  # a live routing id cannot be taken over
        # MANDATORY makes a full peer raise Again instead of dropping; the frames then wait in
        # a per-peer backlog (bounded: a peer that never reads is cut off).
        router.sndhwm = _SEND_HWM
        router.rcvhwm = self.limits.receive_hwm  # frames queued per peer: bounds their memory
        router.maxmsgsize = self.limits.max_frame + 4096  # last-resort guard; clients check first
        router.linger = 0
        return router

    # -- the loop ----------------------------------------------------------------------------

    def _serve(self) -> None:
        self._poller = zmq.Poller()
        self._poller.register(self._router, zmq.POLLIN)
        for monitor in self._monitors:
            self._poller.register(monitor, zmq.POLLIN)
        if self._tcp is not None:
            self._poller.register(self._tcp, zmq.POLLIN)
            assert self._zap is not None
            self._poller.register(self._zap, zmq.POLLIN)
        state = self.state
        while not self._stop.is_set():
            timeout = 5 if self._backlog or state.held_back else 200
            if state.activations.timed:
                state.now = time.monotonic()
                timeout = self._activation_timeout(timeout)
            ready = self._poller.poll(timeout)
            state.now = time.monotonic()  # the turn's clock (message ages, monitor stamps)
            for source, _ in ready:
                try:
                    if source is self._router:
                        self._drain_router(self._router)
                    elif source in self._monitors:
                        self._drain_monitors()
                    elif self._tcp is not None and source is self._tcp:
                        self._drain_router(self._tcp)
                    elif self._zap is not None and source is self._zap:
                        self._answer_zap(self._zap)
                    elif self._spawner.owns(source):
                        self._service_ready(source)
                    else:
                        self._process_exited(source)
                except Exception:  # a bug or an exhausted resource must not end the kernel
                    log.exception("kernel loop error (the event was dropped; serving on)")
            if self._backlog or state.held_back:
                try:
                    self._flush_backlog()
                except Exception:  # (it runs the state's rules too: release, drop)
                    log.exception("kernel loop error flushing backlogs (serving on)")
            if state.monitor.active:  # each monitor's batch of this turn's events
                try:
                    self._perform(state.monitor_batches())
                except Exception:
                    log.exception("kernel loop error sending monitor events (serving on)")

    def _activation_timeout(self, timeout: int) -> int:
        """Run the state's activation deadlines that are due; the poll timeout (ms) that ends
        at the next one."""
        deadline = self.state.next_activation_deadline()
        if deadline is not None and deadline <= self.state.now:
            try:
                self._perform(self.state.activation_tick())
            except Exception:
                log.exception("kernel loop error in activation (serving on)")
            deadline = self.state.next_activation_deadline()
        if deadline is None:
            return timeout
        return max(1, min(timeout, int((deadline - self.state.now) * 1000) + 1))

    def _service_ready(self, fd: int) -> None:
        exit_ = self._spawner.ready(fd)
        if exit_ is not None:
            self._service_exited(exit_)

    def _service_exited(self, exit_: Exit) -> None:
        self._perform(self.state.service_exited(exit_.name, exit_.status, exit_.tail))

    def _spawn(self, action: Spawn) -> None:
        failed = self._spawner.spawn(lookup_key(action.service.name), action.service)
        if failed is not None:
            self._service_exited(failed)

    def _watch_fd(self, fd: int) -> None:
        self._poller.register(fd, zmq.POLLIN)

    def _unwatch_fd(self, fd: int) -> None:
        self._poller.unregister(fd)

    def _drain_router(self, router: zmq.Socket[bytes]) -> None:
        drain_router(router, self._on_frame, self._discard_rest)

    def _answer_zap(self, zap: zmq.Socket[bytes]) -> None:
        while True:
            try:
                request = zap.recv_multipart(NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = self._zap_handler.answer(request)
            except Exception:  # a REP socket must answer, or no later handshake is decided
                log.exception("ZAP handler error (the handshake is refused)")
                reply = error_reply(request, "internal error")
            zap.send_multipart(reply)

    def _discard_rest(self, router: zmq.Socket[bytes], body: zmq.Frame) -> None:
        extra = 1
        while router.get(RCVMORE):
            router.recv()
            extra += 1
        self._reporter.report(
            "frame count",
            f"expected one frame per message, got {extra + 1} from pid {_pid_in(body)}",
        )

    def _on_frame(self, rid: bytes, body: zmq.Frame, router: zmq.Socket[bytes]) -> None:
        try:
            # A large frame is decoded in place (a copy would double what it costs the kernel);
            # a small one as bytes, which pyzmq makes faster than a memoryview.
            message = decode(body.bytes if len(body) <= _COPY_UPTO else body.buffer)
        except ProtocolError as exc:
            self._reporter.report("malformed frame", f"from pid {_pid_in(body)}: {exc}")
            return
        try:
            known = self._address_of.get(rid)
            if known is None:
                if rid in self._dropped:
                    detail = f"{type(message).__name__} from pid {_pid_in(body)}"
                    self._reporter.report("frame from a dropped peer", detail)
                    return
                actions = self._introduce(rid, body, message, router)
            elif body.get("Peer-Address") != known or (
                    router is not self._router and self._remote.get(rid) != body.get("User-Id")):
                # (over tcp the address is only a host's: two keys' peers on one host differ
                # by the key's name the ZAP handler gave them)
                raise PeerMisbehaved(
                    "routing id reuse", f"routing id {rid.hex()} now from {_pid_in(body)}"
                )
            else:
                if self._trace:
                    log.debug("from %s: %s", self._peer_name(rid), _TRACE_REPR.repr(message))
                actions = self.state.receive(rid, message)
        except PeerMisbehaved as exc:
            self._reporter.report(exc.kind, exc.detail)
            return
        except UnknownPeer as exc:
            self._reporter.report("unidentified peer", str(exc))
            return
        except KernelInvariantError:
            log.exception(
                "kernel invariant broken handling %s; the message was dropped",
                type(message).__name__,
            )
            return
        self._perform(actions)

    def _introduce(self, rid: bytes, body: zmq.Frame, message: object,
                   router: zmq.Socket[bytes]) -> list[Action]:
        if type(message) is not Hello:
            raise PeerMisbehaved(
                "no hello", f"{type(message).__name__} before Hello from pid {_pid_in(body)}"
            )
        # The fd of a closed connection can be reused by this new one: settle earlier
        # disconnects first so they are not mistaken for this peer's.
        self._drain_monitors()
        address = _peer_address(body)
        remote = router is self._tcp
        if remote:
            assert self.config.tcp is not None
            user = str(body.get("User-Id"))
            identity = remote_identity(self.config.tcp, user, message)
        else:
            identity = identify(address)
        actions = self.state.hello(rid, identity, message)
        if self.state.knows(rid):  # (not when refused, e.g. for its protocol version)
            self._address_of[rid] = address
            self._rid_of_fd[int(body.get("__fd"))] = rid
            if remote:
                self._remote[rid] = user
        elif remote:  # (its Welcome, refusing it, goes back the way it came)
            self._remote[rid] = user
            self._perform(actions)
            del self._remote[rid]
            return []
        return actions

    def _drain_monitors(self) -> None:
        for monitor in self._monitors:
            self._drain_monitor(monitor)

    def _drain_monitor(self, monitor: zmq.Socket[bytes]) -> None:
        while True:
            try:
                event = zmq.utils.monitor.recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                rid = self._rid_of_fd.pop(int(event["value"]), None)
                if rid in self._dropped:
                    self._dropped.discard(rid)
                    self._backlog.pop(rid, None)  # its farewell, if still unread
                    self._remote.pop(rid, None)
                elif rid is not None:
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
            if rid not in self._dropped:  # (a dropped one's notice still goes its way)
                self._backlog.pop(rid, None)
                self._remote.pop(rid, None)

    def _drop(self, rid: bytes, waiting: int) -> None:
        """Stop serving a peer that is not reading; it is told, behind what it has not read."""
        peer = self.state.peers.get(rid)
        if peer is None:
            return
        log.warning(
            "stopped serving the %s socket %s of pid %d: %d frames waited unread for it "
            "(max_backlog); it is told so, and forgotten",
            peer.role.name.lower(), rid.hex(), peer.process.identity.pid, waiting,
        )
        self._backlog[rid] = collections.deque()  # cleared: only the notice goes after zmq's queue
        self._dropped.add(rid)
        self._perform(self.state.peer_dropped(rid, waiting))
        self._forget_departed()

    # -- actions -----------------------------------------------------------------------------

    def _perform(self, actions: list[Action]) -> None:
        if self._trace:
            for action in actions:
                if type(action) is Send:
                    log.debug("to %s: %s", self._peer_name(action.rid),
                              _TRACE_REPR.repr(action.message))
        for action in actions:
            if type(action) is Send:
                self._send(action.rid, encode(action.message))
            elif type(action) is Watch:
                self._watch(action)
            elif type(action) is Unwatch:
                fd = self._watcher.unwatch(action.key)
                if fd is not None:
                    self._poller.unregister(fd)
            elif type(action) is RemoveSocket:
                self._remove_socket(action.path)
            elif type(action) is Spawn:
                self._spawn(action)
            elif type(action) is Kill:
                self._spawner.kill(action.key)
        self._settle_departures()

    def _peer_name(self, rid: bytes) -> str:
        """A peer as the debug log names it: its pid and role."""
        peer = self.state.peers.get(rid)
        if peer is None:
            return f"peer {rid.hex()[:8]}"
        return f"pid {peer.process.identity.pid} {peer.role.name.lower()}"

    def _remove_socket(self, path: str) -> None:
        """Remove a server's direct socket, only if it is one: a socket named like the ones
        servers make (``d-<hex>``), in this kernel's own directory. (The path is the server's
        word: anything else is left alone.)"""
        directory, name = os.path.split(path)
        if directory != os.path.dirname(self.socket_path) or not _DIRECT_SOCKET.fullmatch(name):
            return
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except OSError:
            pass  # gone already: the server removed it as it stopped

    def _settle_departures(self) -> None:
        """Forget the peers found gone, and stop serving those past the backlog limit."""
        while self._gone or self._cut:
            if self._gone:
                self._peer_gone(self._gone.pop())
            else:
                self._drop(*self._cut.popitem())

    def _watch(self, action: Watch) -> None:
        fd = self._watcher.watch(action.identity)
        if fd is None:
            self._perform(self.state.process_died(action.identity.key))
        elif fd >= 0:  # (-1: no fd to spare; the monitor socket still reports its sockets)
            self._poller.register(fd, zmq.POLLIN)

    def _send(self, rid: bytes, frame: bytes) -> None:
        queue = self._backlog.get(rid)
        if queue is not None:
            if rid in self._cut or len(queue) >= self.limits.max_backlog:
                self._cut.setdefault(rid, len(queue))  # dropped once this turn's actions are done
                return
            queue.append(frame)  # keep order behind what is already waiting
            if len(queue) >= _HOLD_AT and not self.state.holding(rid):
                self.state.hold_back(rid)  # (nothing is held back for a peer that is no server)
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
        router = self._router if not self._remote or rid not in self._remote else self._tcp
        assert router is not None
        router.send(rid, SNDMORE | NOBLOCK)
        router.send(frame, NOBLOCK)

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
        for rid in list(self.state.held_back):
            if rid not in self._backlog:  # it has read all we sent: let more go
                self._perform(self.state.release(rid, _RELEASE))
        self._settle_departures()


def drain_router(
    router: zmq.Socket[bytes],
    on_frame: Callable[[bytes, zmq.Frame, zmq.Socket[bytes]], None],
    on_more: Callable[[zmq.Socket[bytes], zmq.Frame], None],
) -> None:
    """Receive up to `_DRAIN_BATCH` messages from one of the kernel's ROUTERs, each a routing id
    and a body: `on_frame(rid, body, router)` for a one-frame body, `on_more(router, body)` for
    the first frame of a longer one (which must take the rest).

    One zmq.Again per batch costs less than a getsockopt(EVENTS) per message. But one every
    `_NOTICE_EVERY` messages is what lets a peer that was idle take its turn at once: libzmq's
    ROUTER round-robins only over the peers it knows to have frames, and learns that an idle
    one has sent some only when it processes its commands, which recv does once per 100 frame
    parts (50 messages here). Under a flood (10-20 us a message) that made an idle peer's
    request, and a server's completion, wait up to 50 of the flood's messages (1 ms) per hop.
    """
    for count in range(1, _DRAIN_BATCH + 1):
        if not count % _NOTICE_EVERY:
            router.get(EVENTS)
        try:
            rid = router.recv(NOBLOCK)
        except zmq.Again:
            return
        body = router.recv(copy=False)  # a Frame: its metadata carries Peer-Address
        if body.more:
            on_more(router, body)
        else:
            on_frame(rid, body, router)


def _peer_address(frame: zmq.Frame) -> str:
    """The transport's Peer-Address of the frame's sender ("ipc:PID:UID:GID" here)."""
    return cast(str, frame.get("Peer-Address"))


def _pid_in(frame: zmq.Frame) -> str:
    try:
        return _peer_address(frame).rsplit(":", 1)[-1]
    except (zmq.ZMQError, AttributeError):
        return "?"
