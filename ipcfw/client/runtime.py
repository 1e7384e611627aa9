"""The client runtime of one process: its sockets, its I/O thread, and waiting.

This module holds the `Runtime` (the process's channels and connections, each thread's route
and move to the direct path, waiting, deaths, fork); a thread's channel to the kernel is
`ipcfw.client.channel`'s, a direct connection `ipcfw.client.connection`'s, the I/O thread
`ipcfw.client.inbox`'s. This docstring says how they work together.

The tables and rules it applies (pending requests, completion exactly once, descriptor
write-back, the lifecycle of sessions) are `ipcfw.client.state`'s, which does no I/O; the runtime
feeds it what arrives and carries out what it decides, from whichever thread is at hand.

Theory of operation
-------------------
A Python thread hand-off costs 10-20 us and contends for the GIL, so the runtime lets the thread
that needs an answer fetch it itself, and keeps its own I/O thread off the hot path.

* Each thread that makes a call gets its own DEALER socket, its **channel**. Every request leaves
  on the calling thread's channel, so the requests of one thread reach the kernel, and the
  server, in the order they were made; every answer, synchronous or not, comes back on it.
* A channel's socket is only ever used under the channel's lock. zmq sockets must never be used
  by two threads at once, but may pass between threads across a full memory barrier, which the
  lock is. So whichever thread needs progress can **settle** a channel: take its lock, read every
  frame waiting, complete the requests they answer, release. A synchronous call holds its
  channel's lock from send to reply: one send, one receive, no hand-off. ``Wait()`` settles the
  status's channel and sleeps on the channel's file descriptor (`zmq.FD`) between settles.
* zmq's FD is edge-like: it only signals new activity, and any use of the socket may consume the
  signal. A settle ends by finding the socket empty, which re-arms it. So whoever holds the lock
  settles before releasing it, with one exception: an async send settles only if some other
  thread or event loop may be asleep on the channel's FD (`Channel.watchers`), or if the
  channel has not been settled for `SETTLE_INTERVAL`. A pipelining thread then reads its
  answers in batches when it waits, instead of probing the socket after every send (each probe
  is a getsockopt and two system calls); only the owner thread sends async requests on its
  channel, and it is not asleep while it sends.
* The process's I/O thread (``ipcfw-inbox``) owns the **inbox** socket, where the kernel sends
  notices (a session lost because its server died), and polls a pidfd on the kernel, so a dead
  kernel is noticed in milliseconds. It also settles channels whose requests nobody is waiting
  for (so ``add_done_callback`` fires) once their owner has been idle for `IDLE` seconds.
* When a thread ends, its channel closes at once (the kernel sees it and disconnects the
  thread's unshared sessions); its requests still pending complete locally with KErrDied.
* If the kernel stops serving a channel (it left the kernel's `max_backlog` answers unread, for
  example while the process was stopped), the kernel forgets it, closes its unshared sessions
  and says so twice: on the inbox at once, and on the channel itself behind the answers already
  queued for it. The inbox's notice marks the channel dropped: the thread's next call gets a new
  channel, the thread's lost sessions fail every call, and the I/O thread reads the old channel
  up to the kernel's notice. Requests answered before it complete with their answers; the rest
  then complete with KErrDisconnected, naming why.

Direct connections (the direct data path)
----------------------------------------
A session created with ``path="direct"`` whose Connected carries a ticket is attached (Attach)
to a **direct connection** of the creating thread: a SOCK_SEQPACKET socket to the server's
process (`DirectChannel`, over `ipcfw.client.direct.DirectSocket`), one per thread per server
socket, made on first use and reused by every session of that server the thread uses. Any
other thread that uses the session (ShareAuto, or a thread of another process after Open)
asks the kernel for a ticket of its own with its first call (`Runtime.join`: Join, answered
once the server holds the ticket) and attaches the session to its own direct connection,
its calls taking the kernel path meanwhile: none waits for that, and the thread switches
once its kernel-path requests are known to have reached the server
(`ipcfw.client.joining`). The
session's requests from each such thread go on that thread's connection; everything else
(Connect, Share, Open, Join, Close) goes to the kernel. A direct
connection follows the channel's rules: used only under its lock, settled by whoever needs
progress, its requests in the same pending table, waited for by the same `Runtime.wait`, its
file descriptor in the same pollers (level triggered: a frame waiting keeps it readable). A
synchronous call spins on a non-blocking receive before it sleeps (`direct.SPIN`: waking a
sleeping thread costs more than the round trip). Its ends: the thread's end closes it (its
requests complete with KErrDied); the server closing it (its death, or too many answers left
unread) completes its requests with KErrServerTerminated, and later calls on it raise
ServerTerminated; the kernel's death closes them all. A Close says Close(handle) on the
session's direct connections before the kernel's Close, so that the server's Disconnect follows
every request sent before it; a Close or Cancel from any thread is sent without the
connection's lock (one datagram: atomic), or, if the socket is full, queued for its owner or
the I/O thread. A connection is made only to a socket in the kernel's directory; if it cannot
be made or the Attach fails, the session stays on the kernel path (logged at debug). A forked
child closes the direct connections it inherited, sending nothing.

Routing ids are random 128-bit values: the kernel never trusts them as identity (it reads the
process credentials the transport gives it), but a random id cannot collide with libzmq's own.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Container, Iterable, Sequence

import zmq

from .. import endpoint as endpoints
from ..kernelprobe import kernel_socket_exists
from .. import errors
from ..protocol import Attach, Close, Completed, Join, Panicked, encode
from .channel import SLICE, Channel, W, Waitable
from .connection import AnyChannel, DirectChannel, DirectConnectionClosed
from .inbox import Inbox
from .joining import Joining, Step
from .state import UNDECIDED, ClientState, Pending, SessionLife, log_once

__all__ = [
    "ATTACH_TIMEOUT", "AnyChannel", "Channel", "DirectChannel", "DirectConnectionClosed",
    "Pending", "Runtime", "Waitable",
]

log = logging.getLogger("ipcfw.client")

ATTACH_TIMEOUT = 5.0  # seconds to connect to a server's socket and attach, if the connect had none


class _ThreadSentinel:
    """Lives in a thread's local storage: when the thread ends, its channel and its direct
    connections (server socket path -> connection) are retired, and the routes it chose for
    direct sessions are forgotten (its ident may be reused by a later thread)."""

    def __init__(self, runtime: Runtime, channel: Channel) -> None:
        self.runtime = weakref.ref(runtime)
        self.channel = channel
        self.thread = threading.get_ident()
        self.direct: dict[str, DirectChannel] = {}
        self.routes: list[tuple[weakref.ref[SessionLife[Runtime]], DirectChannel | None]] = []
        self._prune_at = _ROUTES_KEPT
        # Session handle -> the thread's move of it to the direct path, while under way.
        self.joining: dict[int, Joining] = {}

    def route(self, life: SessionLife[Runtime], direct: DirectChannel | None) -> None:
        """This thread's calls on `life`'s session take `direct` (None: the kernel path)."""
        life.set_route(self.thread, direct)
        self.routes.append((weakref.ref(life), direct))
        if len(self.routes) > self._prune_at:
            # Keep only the routes still in use (a closed session forgot them): a thread that
            # opens and closes sessions for ever keeps as many as it holds, not one per session.
            self.routes = [(ref, d) for ref, d in self.routes if _still_routes(ref, self.thread, d)]
            self._prune_at = max(_ROUTES_KEPT, 2 * len(self.routes))

    def prune_joining(self, held: Container[int]) -> None:
        """Forget the moves of sessions no longer `held` (closed while under way)."""
        for handle in [h for h in self.joining if h not in held]:
            del self.joining[handle]

    def __del__(self) -> None:
        for ref, direct in self.routes:
            life = ref()
            if life is not None:
                life.forget_route(self.thread, direct)
        runtime = self.runtime()
        if runtime is not None:
            for channel in list(self.direct.values()):
                runtime.retire_direct(channel, _thread_ended)
            runtime.retire(self.channel)


_ROUTES_KEPT = 64  # a thread's sentinel keeps this many routes before it drops unused ones


def _still_routes(ref: weakref.ref[SessionLife[Runtime]], thread: int,
                  direct: DirectChannel | None) -> bool:
    life = ref()
    return life is not None and life.routes.get(thread, UNDECIDED) is direct


def _attach_answered(joining: Joining, value: int, _error: BaseException | None) -> None:
    joining.attach_answered(value)  # (a Pending's completion: see Runtime._attach_joined)


def _thread_ended() -> errors.IpcError:
    return errors.IpcError(errors.KErrDied, "the thread that made the request has ended")


class Runtime:
    """Per process and per kernel endpoint: the inbox thread, the channels, and the state
    (`ClientState`: pending requests, the holders of each session)."""

    _lock = threading.Lock()
    _instances: dict[tuple[int, str], Runtime] = {}

    @classmethod
    def for_endpoint(cls, endpoint: str | None = None) -> Runtime:
        """The live runtime for `endpoint` in this process, started on first use."""
        resolved = endpoints.resolve(endpoint)
        key = (os.getpid(), resolved)  # a forked child gets runtimes of its own
        with cls._lock:
            runtime = cls._instances.get(key)
            if runtime is None or runtime.kernel_dead:
                if runtime is not None:
                    runtime.close()  # its kernel died: a new one may be listening now
                runtime = cls(resolved)
                cls._instances[key] = runtime
            return runtime

    @classmethod
    def shutdown(cls, endpoint: str | None = None) -> None:
        """Stop this process's runtime for `endpoint`; its sessions become unusable."""
        key = (os.getpid(), endpoints.resolve(endpoint))
        with cls._lock:
            runtime = cls._instances.pop(key, None)
        if runtime is not None:
            runtime.close()

    @classmethod
    def shutdown_all(cls) -> None:
        """Stop every runtime of this process (at interpreter exit)."""
        with cls._lock:
            runtimes = [r for (pid, _), r in cls._instances.items() if pid == os.getpid()]
            cls._instances.clear()
        for runtime in runtimes:
            runtime.close()

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._pid = os.getpid()  # (a forked child's copy is not its: `forked`)
        if not kernel_socket_exists(endpoint):
            raise errors.IpcError(
                errors.KErrCouldNotConnect,
                f"no ipcfw kernel at {endpoint} (start one with `ipcfw kernel`)",
            )
        self.context = zmq.Context()
        self.context.linger = 1000  # let a last Close reach the kernel when a thread ends
        # The runtime can no longer talk to its kernel: it died, or stopped serving this
        # process's inbox. `_gone_reason` says which (code, message), for `kernel_gone_error`.
        self.kernel_dead = False
        self._gone_reason: tuple[int, str] | None = None
        self._closed = False
        # pending requests, session holders
        self.state: ClientState[AnyChannel] = ClientState(threading.Lock())
        self.channels: set[Channel] = set()
        self.direct_channels: set[DirectChannel] = set()  # every thread's direct connections
        self.completions = threading.Condition()  # for waiters who cannot settle themselves
        self.blocked_waiters = 0
        self._req_ids = itertools.count(1)
        self._local = threading.local()
        # Kernel Closes waiting for direct Closes queued on full sockets (`close_session`):
        # sent by the I/O thread.
        self._closes_later: list[tuple[list[threading.Event], Channel, bytes]] = []
        self._later_lock = threading.Lock()
        self._inbox = Inbox(self)
        try:
            self._inbox.start_and_wait()
        except BaseException:
            # Refused (or no kernel answered): nothing of this runtime may stay open, or each
            # attempt of a process that tries again would leave a context behind.
            self.context.destroy(linger=0)
            raise

    def forked(self) -> None:
        """In a forked child (`_after_fork_in_child`): nothing of this runtime, the parent's,
        may be used. Its channels' zmq sockets belong to the parent's context, whose I/O
        threads did not survive the fork (a send or a receive on one hangs): they are left
        alone. Its direct connections are the parent's: closed, sending nothing. From now on
        a call on one of the parent's sessions raises KErrDisconnected saying so; a Close of
        one only forgets it, sending nothing (the parent still holds it, and the kernel never
        counted the child); a wait for a request the parent made completes it with that
        error. The child's own sessions use a runtime of its own (`for_endpoint` keys them by
        pid). Takes no lock: fresh ones replace those a vanished thread may have held."""
        self._gone_reason = (
            errors.KErrDisconnected,
            f"this session belongs to the parent process (pid {self._pid}), whose client "
            "runtime a forked child cannot use: connect (or Open) a session of its own",
        )
        self.kernel_dead = True
        self.completions = threading.Condition()
        self._later_lock = threading.Lock()
        self._closes_later = []
        for channel in list(self.channels):
            channel.forked()
        for direct in list(self.direct_channels):
            direct.forked()
        self.direct_channels.clear()

    def _fail_inherited(self) -> None:
        """In a forked child, on a thread that waits: the parent's pending requests complete
        with the fork's error (`forked`), not in the fork handler, where no callback may run."""
        for req_id in list(self.state.pending):
            error = self.kernel_gone_error()
            self.complete(req_id, error.code, (), error)

    def next_req_id(self) -> int:
        return next(self._req_ids)

    def channel(self) -> Channel:
        """The calling thread's channel, created on first use."""
        if self.kernel_dead:
            raise self.kernel_gone_error()
        if self._closed:
            raise errors.IpcError(
                errors.KErrDisconnected, f"the client runtime for {self.endpoint} was shut down"
            )
        return self._sentinel().channel

    def _sentinel(self) -> _ThreadSentinel:
        """The calling thread's sentinel, with its channel (created on first use)."""
        sentinel = getattr(self._local, "sentinel", None)
        if sentinel is None:
            channel = Channel(self)
            self.channels.add(channel)
            sentinel = self._local.sentinel = _ThreadSentinel(self, channel)
        elif sentinel.channel.dropped is not None:
            # The kernel stopped serving the old one: the I/O thread reads it to its end.
            old, sentinel.channel = sentinel.channel, Channel(self)
            self.channels.add(sentinel.channel)
            with old.lock:
                old.replaced = True
                self._close_if_finished(old)
        return sentinel

    def attach_direct(
        self, path: str, ticket: bytes, handle: int, timeout: float | None
    ) -> DirectChannel | None:
        """Attach session `handle` to the calling thread's direct connection to the server
        socket `path` (made on first use), with the `ticket` its Connected carried. Returns
        the connection, or None if it cannot be made or the Attach fails: the session then
        stays on the kernel path (logged at debug)."""
        wait = ATTACH_TIMEOUT if timeout is None else min(timeout, ATTACH_TIMEOUT)
        try:
            channel = self._direct_channel(path, wait)
        except OSError as exc:
            log.debug("no direct connection to %s (%s): session 0x%x stays on the kernel "
                      "path", path, exc, handle)
            return None
        req_id = self.next_req_id()
        try:
            reply = channel.call(encode(Attach(req_id, ticket)), req_id, wait)
        except TimeoutError:
            # It may attach later: its Close must then reach the server (rule 6).
            self.state.attach_direct(handle, channel)
            log.debug("the server at %s did not answer Attach within %s s: session 0x%x stays "
                      "on the kernel path", path, wait, handle)
            return None
        except errors.IpcError as exc:
            log.debug("Attach to %s failed (%s): session 0x%x stays on the kernel path",
                      path, exc, handle)
            return None
        if type(reply) is Completed and reply.value == handle:
            self.state.attach_direct(handle, channel)
            return channel
        log.debug("the server at %s refused Attach (%r): session 0x%x stays on the kernel path",
                  path, reply, handle)
        return None

    def _direct_channel(self, path: str, timeout: float) -> DirectChannel:
        """The calling thread's direct connection to the server socket `path`, made now if it
        has none (within `timeout` seconds; 0: only if it can be made at once). Raises OSError
        if it cannot be made (BlockingIOError: not at once), or if `path` is not in the
        kernel's directory."""
        if not endpoints.in_kernel_dir(self.endpoint, path):
            raise OSError(f"the server socket {path!r} is not in the kernel's directory")
        sentinel = self._sentinel()
        channel = sentinel.direct.get(path)
        if channel is None or channel.closed:
            channel = DirectChannel(self, path, sentinel.channel.max_frame, timeout)
            sentinel.direct[path] = channel
            self.direct_channels.add(channel)
        return channel

    def route(self, life: SessionLife[Runtime], direct: DirectChannel | None) -> None:
        """The calling thread's calls on `life`'s session take `direct` (None: the kernel
        path) from now on, until the thread ends."""
        self._sentinel().route(life, direct)

    def join(self, life: SessionLife[Runtime], handle: int, mode: int) -> DirectChannel | None:
        """A call (`mode`) of the calling thread on direct session `handle` (held by `life`)
        whose route is not decided yet: the connection to send it on, or None for the kernel
        path. Never waits for the kernel or the server: the thread's move to its direct
        connection (`ipcfw.client.joining`: Join, Attach, then the switch once its earlier
        requests are proved to have arrived) goes on in the background, one step at each
        call; a call that took the kernel path must then tell `sent_joining`. A thread that
        cannot go direct keeps the kernel path (logged at debug)."""
        sentinel = self._sentinel()
        joining = sentinel.joining.get(handle)
        if joining is None:
            existing = sentinel.direct.get(life.direct_path)
            if existing is not None and not existing.closed and self.state.is_attached(
                    existing, handle):
                sentinel.route(life, existing)  # (another RSession of this process, same handle)
                return existing
            joining = sentinel.joining[handle] = Joining(handle)
            if len(sentinel.joining) > _ROUTES_KEPT:
                sentinel.prune_joining(self.state.sessions)
        elif (joining.join_id and joining.answer is None
              and joining.join_id not in sentinel.channel.joins):
            joining.join_lost()  # sent on a channel the kernel dropped since: ask again
        if joining.join_id:
            sentinel.channel.try_settle()  # (its answer may be waiting)
        if joining.attach_id and not joining.attached:
            direct = sentinel.direct.get(joining.path)
            if direct is not None:
                direct.try_settle()
        step = joining.decide(self.state.pending)
        if step is Step.ATTACH:
            step = self._attach_joined(joining)
        if step is Step.SWITCH:
            del sentinel.joining[handle]
            direct = sentinel.direct.get(joining.path)
            if direct is not None and not direct.closed:
                sentinel.route(life, direct)
                return direct
            step = Step.STAY
        if step is Step.STAY:
            del sentinel.joining[handle]
            direct = sentinel.direct.get(joining.path)
            if joining.attach_id and direct is not None:
                self.state.detach_direct(handle, direct)  # (refused: not attached there)
            log.debug("session 0x%x stays on the kernel path for this thread: %s", handle,
                      joining.why_staying())
            sentinel.route(life, None)
            return None
        if step is Step.FORGET:
            del sentinel.joining[handle]
            return None  # (the kernel refuses the call as it refused the Join)
        if joining.join_now(mode):
            self._send_join(sentinel.channel, joining)
        return None

    def attach_later(self, handle: int, path: str, ticket: bytes) -> None:
        """The calling thread created direct session `handle` without attaching it (an async
        connect, which never waits for the server's loop): its first calls take the kernel
        path while its direct connection presents `ticket` to the server socket `path` in the
        background, and it switches as another thread does after its Join (`join`)."""
        joining = Joining(handle)
        joining.joined(errors.KErrNone, path, ticket)  # (the ticket the Connected brought)
        joining.join_due = False  # (a Join only if one is needed to prove earlier requests)
        self._sentinel().joining[handle] = joining

    def sent_joining(self, handle: int, req_id: int, mode: int) -> None:
        """The calling thread sent request `req_id` (`mode`; a synchronous one: answered with
        a value >= 0) on the kernel path while it moves session `handle` to its direct
        connection (`join` returned None): a Join follows it if one is due."""
        sentinel = self._sentinel()
        joining = sentinel.joining.get(handle)
        if joining is not None and joining.sent(req_id, mode):
            self._send_join(sentinel.channel, joining)

    def _send_join(self, channel: Channel, joining: Joining) -> None:
        req_id = self.next_req_id()
        channel.send_join(encode(Join(req_id, joining.handle)), req_id, joining)
        joining.join_sent(req_id)

    def _attach_joined(self, joining: Joining) -> Step:
        """Present the ticket a Join brought on the thread's direct connection (made now if
        it can be at once: else at a later call), without waiting for the answer. Returns
        what the call does: KERNEL (the move goes on), or STAY if the connection failed."""
        handle = joining.handle
        try:
            direct = self._direct_channel(joining.path, 0.0)
        except BlockingIOError:
            return Step.KERNEL  # the server's backlog of connections is full: at a later call
        except OSError as exc:
            log.debug("no direct connection to %s (%s)", joining.path, exc)
            return Step.STAY
        req_id = self.next_req_id()
        pending: Pending[AnyChannel] = Pending(joining, _attach_answered, None, {}, direct)
        self.state.attach_direct(handle, direct)  # (it may attach: a Close must reach it)
        try:
            direct.send_async(encode(Attach(req_id, joining.ticket)), req_id, pending)
        except errors.IpcError as exc:
            log.debug("Attach to %s failed (%s)", joining.path, exc)
            self.state.detach_direct(handle, direct)
            return Step.STAY
        joining.attach_sent(req_id)
        return Step.KERNEL

    def retire_direct(
        self, channel: DirectChannel, error: Callable[[], errors.IpcError]
    ) -> None:
        """A direct connection ends (its thread ended, its server closed it, the kernel died):
        answers already read are delivered, its requests still pending complete with a new
        `error()`, and it closes."""
        if not channel.ended:
            channel.try_settle()
        _handles, requests = self.state.connection_ended(channel)
        for req_id in requests:
            failure = error()
            self.complete(req_id, failure.code, (), failure)
        self.direct_channels.discard(channel)
        channel.close()

    def kernel_gone_error(self) -> errors.IpcError:
        """The error of a call this runtime can no longer make (a new one each time)."""
        if self._gone_reason is not None:
            return errors.IpcError(*self._gone_reason)
        return errors.IpcError(
            errors.KErrServerTerminated, f"the ipcfw kernel at {self.endpoint} has gone"
        )

    # -- pending requests --------------------------------------------------------------------

    def all_channels(self) -> list[AnyChannel]:
        """Every channel and direct connection, taken at once (other threads change them)."""
        return [*list(self.channels), *list(self.direct_channels)]

    def nudge(self) -> None:
        """Wake the I/O thread (it settles the channels left to it, and sends their outbox)."""
        self._inbox.wake()

    def first_pending(self) -> None:
        """A channel has its first pending request: wake the I/O thread if it sleeps with no
        timeout (it settles channels left idle), not otherwise: a wake-up costs the writer a
        syscall and the I/O thread a turn for the GIL, on every burst of requests."""
        if self._inbox.sleeps_for_good:
            self._inbox.wake()

    def complete(
        self, req_id: int, value: int, writes: Sequence[tuple[int, bytes]] = (),
        error: BaseException | None = None, *, on: DirectChannel | None = None,
    ) -> bool:
        """Complete a pending async request, once; a late or unknown completion is dropped
        (False). `on`: the direct connection the answer came on; a request sent elsewhere is
        not completed (False).

        Any thread may call it (settling, Close, a dead kernel): it never waits for socket I/O.
        """
        pending = self.state.take(req_id) if on is None else self.state.take_on(req_id, on)
        if pending is None:
            return False  # completed already (or, `on`, not sent there)
        channel = pending.channel
        # Counted down before the callbacks run: one may send again on this channel, and must
        # then see the count it would see had the completion come first (send_async's nudge).
        with channel.count_lock:
            channel.pending -= 1
            channel.owed -= pending.owed
        pending.complete(value, writes, error)
        if self.blocked_waiters:
            with self.completions:
                self.completions.notify_all()
        return True

    def panicked(self, reply: Panicked, on: DirectChannel | None = None) -> None:
        """A panic (from the kernel, or, `on`, from a direct connection: it may then only end
        a session attached to that connection, and only a request sent on it)."""
        panic = errors.ClientPanic(reply.category, reply.reason)
        if reply.session_dead:
            if on is None or self.state.is_attached(on, reply.handle):
                self.session_lost(reply.handle, panic)
            else:
                log_once("foreign-panic", "ignoring a panic from the server at %s of a session "
                         "not attached to its connection", on.path)
        self.complete(reply.req_id, errors.KErrDied, (), panic, on=on)

    def session_lost(self, handle: int, error: BaseException) -> None:
        """Every RSession of this process on `handle` is dead (server death or panic)."""
        for abort in self.state.session_lost(handle, error):
            abort.run()

    def attach_session(self, life: SessionLife[Runtime]) -> None:
        """An RSession holds `life.handle` now (its connect or Open succeeded): it learns of
        the session's loss from now on. `close_session` undoes it."""
        self.state.register(life)

    def requests_pending(self, life: SessionLife[Runtime]) -> int:
        """How many async requests of the RSession holding `life` are still pending."""
        return len(self.state.requests_of(life))

    def close_session(self, life: SessionLife[Runtime], handle: int, owner_gone: bool) -> None:
        """An RSession let go of `handle` (its Close): its requests still pending and its sync
        calls in flight on other threads complete with KErrSessionClosed; every direct
        connection attached to the handle is told, then the kernel, unless it ended the
        session already (it is gone, or, `owner_gone`, the unshared session's thread ended,
        and its channel's end closed the session)."""
        closing = self.state.close(life, handle, ended=self.kernel_dead or owner_gone)
        for req_id in closing.requests:
            self.complete(req_id, errors.KErrSessionClosed)
        for channel, answer in closing.answers:
            channel.end_call(answer.req_id, answer)  # (before the Close below waits for its lock)
        queued: list[threading.Event] = []
        if closing.direct:
            frame = encode(Close(handle))
            for direct in closing.direct:  # before the kernel's: Disconnect follows them all
                sent = direct.send(frame)  # (never waits for the connection's owner)
                if sent is not None:
                    queued.append(sent)
        if closing.tell_kernel:
            channel, frame = self.channel(), encode(Close(handle))
            if queued:  # a full socket: the kernel's Close follows once the direct ones left
                with self._later_lock:
                    self._closes_later.append((queued, channel, frame))
                self.nudge()  # (the I/O thread sends it: `send_closes_due`)
            else:
                channel.send(frame)

    def closes_waiting(self) -> bool:
        """Whether a kernel Close waits for direct ones to leave (`close_session`)."""
        return bool(self._closes_later)

    def send_closes_due(self) -> None:
        """On the I/O thread: send each kernel Close whose direct Closes have left (or whose
        connections have gone), on the closing thread's channel, without waiting for its lock
        (a Close it cannot send now waits for the next turn). If that thread has ended
        meanwhile (its channel with it), another channel of the process carries it: any thread
        of a holding process may close a shared handle (an unshared one ended with its
        thread's channel)."""
        with self._later_lock:
            waiting, self._closes_later = self._closes_later, []
        if self.kernel_dead or self._closed:
            return
        still: list[tuple[list[threading.Event], Channel, bytes]] = []
        for queued, channel, frame in waiting:
            if not all(sent.is_set() for sent in queued) or not self._send_unwaiting(
                    channel, frame):
                still.append((queued, channel, frame))
        if still:
            with self._later_lock:
                self._closes_later[:0] = still  # (in order, before any added meanwhile)

    def _send_unwaiting(self, channel: Channel, frame: bytes) -> bool:
        """Send `frame` on `channel`, or, if it has closed, on another live channel, if its
        lock is free; False if none was (try again later)."""
        if channel.closed or channel.dropped is not None:
            others = [c for c in list(self.channels) if not c.closed and c.dropped is None]
            if not others:
                channel = self.channel()  # (the I/O thread's own, made now)
            else:
                channel = others[0]
        if not channel.lock.acquire(blocking=False):
            return False
        try:
            channel.send(frame)
        finally:
            channel.lock.release()
        return True

    def wait(self, waits: Sequence[tuple[W, AnyChannel | None]], timeout: float | None) -> W:
        """Block until one of the statuses in `waits` completes and return it; settle their
        channels (each status's, None if it has none) meanwhile.

        Raises TimeoutError after `timeout` seconds.
        """
        if self._pid != os.getpid():
            self._fail_inherited()
        channels = {channel for _, channel in waits if channel is not None}
        # Watch before the first settle: a send on these channels from now on settles after
        # itself, so it cannot leave an answer unread behind a consumed FD signal.
        _add_watchers(channels, 1)
        try:
            return self._wait(waits, channels, timeout)
        finally:
            _add_watchers(channels, -1)

    def _wait(
        self, waits: Sequence[tuple[W, AnyChannel | None]], channels: set[AnyChannel],
        timeout: float | None,
    ) -> W:
        deadline = None if timeout is None else time.monotonic() + timeout
        poller: zmq.Poller | None = None
        while True:
            busy = False
            for status, channel in waits:
                if status.done():
                    return status
                if channel is not None and not channel.try_settle():
                    busy = True
            for status, _ in waits:
                if status.done():
                    return status
            remaining = SLICE if deadline is None else min(SLICE, deadline - time.monotonic())
            if remaining <= 0:
                raise TimeoutError(f"request still pending after {timeout} s")
            if busy:
                self._sleep_on_completions(waits, remaining)  # another thread settles for us
            else:
                poller = poller or _fd_poller(channels)
                poller.poll(int(remaining * 1000))

    def _sleep_on_completions(
        self, waits: Sequence[tuple[Waitable, AnyChannel | None]], seconds: float
    ) -> None:
        with self.completions:
            self.blocked_waiters += 1
            try:
                # (Checked again once counted: a completion just before went unnotified.)
                self.completions.wait_for(lambda: any(s.done() for s, _ in waits), seconds)
            finally:
                self.blocked_waiters -= 1

    # -- lifecycle ---------------------------------------------------------------------------

    def retire(self, channel: Channel) -> None:
        """The channel's thread ended: its socket closes now, which tells the kernel (its
        unshared sessions are disconnected), and requests still pending on it complete
        locally with KErrDied, as a thread's requests die with it in Symbian. (Answers that
        reached the channel before that are delivered first.)"""
        channel.try_settle()
        for req_id in self.state.requests_on(channel):
            self.complete(req_id, errors.KErrDied)
        self.channels.discard(channel)
        channel.close()

    def channel_dropped(self, routing_id: bytes, waiting: int) -> None:
        """The kernel stopped serving the channel with this routing id (its inbox notice)."""
        for channel in list(self.channels):
            if channel.routing_id == routing_id and channel.dropped is None:
                channel.dropped = (
                    f"the ipcfw kernel stopped serving this thread's channel: {waiting} answers "
                    "waited unread for it (the kernel's max_backlog)"
                )
                self.nudge()  # the I/O thread reads it up to the kernel's own notice

    def channel_ended(self, channel: Channel, waiting: int) -> None:
        """The kernel's notice was read from `channel`: no answer can follow it. Its requests
        still pending complete with KErrDisconnected; the channel closes if its thread has
        moved on to a new one. Called with the channel's lock held."""
        if channel.dropped is None:  # (the channel's notice overtook the inbox's)
            self.channel_dropped(channel.routing_id, waiting)
        channel.ended = True
        for req_id in self.state.requests_on(channel):
            self.complete(req_id, errors.KErrDisconnected, (), channel.dropped_error())
        self._close_if_finished(channel)

    def _close_if_finished(self, channel: Channel) -> None:
        """Close a dropped channel that has ended and been replaced. Call with its lock held."""
        if channel.ended and channel.replaced and not channel.closed:
            self.channels.discard(channel)
            channel.closed = True
            channel.socket.close()

    def kernel_died(self, lost: tuple[int, str] | None = None) -> None:
        """The kernel has gone (or, with `lost`, a code and message, stopped serving this
        process): every session is lost and every pending request fails with that error; the
        next call starts a new runtime."""
        self._gone_reason = lost
        self.kernel_dead = True
        for abort in self.state.every_session_lost(self.kernel_gone_error):
            abort.run()
        for req_id in list(self.state.pending):
            error = self.kernel_gone_error()
            self.complete(req_id, error.code, (), error)
        for direct in list(self.direct_channels):
            self.retire_direct(direct, self.kernel_gone_error)

    def close(self) -> None:
        """Stop the inbox thread and close every idle channel (tests, interpreter exit)."""
        self._closed = True
        self._inbox.stop()
        for req_id in list(self.state.pending):
            self.complete(req_id, errors.KErrDisconnected)
        self.close_channels()

    def close_channels(self) -> None:
        for direct in list(self.direct_channels):
            self.direct_channels.discard(direct)
            if direct.lock.acquire(timeout=1.0):  # a thread may still be in a call
                direct.close()
                direct.lock.release()
        for channel in list(self.channels):
            if channel.lock.acquire(timeout=1.0):  # a thread may still be in a call
                channel.closed = True
                if not channel.inherited:
                    channel.socket.close()
                channel.lock.release()
        self.channels.clear()


def _fd_poller(channels: set[AnyChannel]) -> zmq.Poller:
    if len(channels) == 1:
        return next(iter(channels)).poller
    poller = zmq.Poller()
    for channel in channels:
        poller.register(channel.fd, zmq.POLLIN)
    return poller


def _add_watchers(channels: Iterable[AnyChannel], delta: int) -> None:
    for channel in channels:
        with channel.count_lock:
            channel.watchers += delta


def _after_fork_in_child() -> None:
    """A forked child must not speak on its parent's direct connections (the server checked
    the parent's pid at Attach), nor keep them open once the parent has gone."""
    for runtime in list(Runtime._instances.values()):  # (no lock: see DirectChannel.forked)
        runtime.forked()


atexit.register(Runtime.shutdown_all)
os.register_at_fork(after_in_child=_after_fork_in_child)
