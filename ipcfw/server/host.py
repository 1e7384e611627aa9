"""The host: runs one server plugin in this process, around the server's state.

`ServerHost` is the thin loop: it owns the DEALER socket to the kernel, the wake-up pipe, the
outbox of completions made on other threads, registration, and reconnecting to a new kernel.
Every rule about sessions and messages is in `ipcfw.server.state.ServerState`, which the host
feeds with decoded messages; one state per registration (per kernel), so the completion of a
message from a kernel that died is never sent to the next one.

Threads: `ServiceL` and every state method run on the loop thread (the one that called `run()`).
A message completed on another thread reaches the state's `completed`, whose `emit` appends the
frame to the outbox of its registration and wakes the loop; a registration that has ended has
its own outbox, which nobody sends, so no lock is needed between them.

The direct path: one `ipcfw.server.port.DirectPort` per registration, whose sockets the loop
polls beside the kernel's (see that module).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import select
import signal
import threading
import time
from typing import Any
from collections.abc import Awaitable, Callable

import zmq

from .. import endpoint as endpoints
from .. import errors
from .._spin import SPIN, AdaptiveSpin
from .._wakeup import WakePipe
from .._zmqflags import NOBLOCK
from ..kernelprobe import kernel_socket_exists, no_kernel_error, wait_for_kernel, welcome_error
from ..transport import KernelWatch, exchange, hello_message, open_socket, routing_id
from ..protocol import (
    Completed,
    ProtocolError,
    Register,
    Role,
    Welcome,
    decode,
    encode,
)
from ..version import to_version
from .aioloop import MirroredPoller, Readiness, awaited
from .overlay import COverlay, Layers
from .plugin import CServer
from .port import DirectPort
from .state import Outcome, ServerState

log = logging.getLogger("ipcfw.server")

__all__ = ["ServerHost", "serve"]

_REGISTER_TIMEOUT = 5.0
_COROUTINES_END = 2.0  # seconds the coroutines of async ServiceLs get to end when the host stops


class ServerHost:
    """Hosts one `CServer` in this process: registers it and runs its loop.

    ``run()`` blocks until `stop()` is called (from any thread or a signal handler) or the
    kernel goes away. ``ServiceL`` runs on the thread that called ``run()``. With
    `wait_kernel` (seconds) it first waits that long at most for a kernel to answer on the
    endpoint (what ``ipcfw serve --wait-kernel`` uses); without it, a kernel must be there.

    With ``reconnect=True`` (what ``ipcfw serve`` uses) a kernel's death does not end the host:
    the sessions it had are dropped (their subsession objects closed), and the host waits for a
    kernel on the same endpoint and registers the server's name again. The same happens when
    the kernel stops serving the host because it left too many frames unread (a `Dropped`
    notice: the process was stopped, or its loop blocked, for too long); without reconnect,
    ``run()`` returns with ``host.dropped`` set.

    Attributes:
        server: the hosted `CServer`; overlays: the `COverlay` objects over it, outermost first.
        state: the `ServerState` of the current (or last) registration, None before the first;
            its ``statistics()`` and ``in_service(handle)`` show the sessions and messages.
    """

    def __init__(
        self, server: CServer | COverlay, endpoint: str | None = None, *, reconnect: bool = False,
        wait_kernel: float | None = None,
    ) -> None:
        if not isinstance(server, (CServer, COverlay)):
            raise TypeError(
                f"serve() needs a CServer (or a COverlay over one), got {type(server).__name__}"
            )
        self.layers = Layers(server, self)
        self.overlays, self.server = self.layers.overlays, self.layers.server
        self.endpoint = endpoints.resolve(endpoint)
        self.state: ServerState | None = None
        self._outbox: collections.deque[bytes] = collections.deque()
        self._calls: collections.deque[Callable[[], None]] = collections.deque()  # call_soon
        self._wakeup = WakePipe()
        self._stopping = False
        self._loop_thread: int | None = None
        # The current (or last) registration's state and the event set when it ends, read and
        # written together: a Deregister racing a reconnect must wait on its own registration.
        self._registration: tuple[ServerState, threading.Event] | None = None
        self._deregister_asked = False  # by Deregister(): a kernel dying meanwhile ends the host
        self.kernel_died = False
        self.dropped = False  # the kernel stopped serving this registration (Dropped)
        self.reconnect = reconnect
        self.wait_kernel = wait_kernel
        self._port: DirectPort | None = None
        self._asyncio: asyncio.AbstractEventLoop | None = None  # for async ServiceLs: _spawn
        self._readiness: Readiness | None = None  # what `_serve_async` awaits, while it runs

    def stop(self) -> None:
        """Ask the loop to finish. Safe from any thread and from signal handlers."""
        self._stopping = True
        self._wakeup.wake()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn()` on the loop thread, soon (from any thread)."""
        self._calls.append(fn)
        self._wakeup.wake()

    def on_loop_thread(self) -> bool:
        """True when called on the loop thread, where ``ServiceL`` runs."""
        return threading.get_ident() == self._loop_thread

    def Deregister(self, timeout: float | None = None) -> None:
        """End this server's registration: no new requests; returns once every message still
        outstanding has been completed (seed 002), then the host stops.

        Call it from another thread than the loop (the loop must go on completing the
        outstanding messages); from the loop thread, including from ``TerminateIndication``,
        it raises ``RuntimeError`` instead of deadlocking. Raises ``TimeoutError`` if
        `timeout` seconds pass first.
        """
        registration = self._registration
        if self.on_loop_thread():
            where = ("TerminateIndication" if registration is not None
                     and registration[0].in_indication else "the server's loop thread")
            raise RuntimeError(
                f"Deregister() called from {where}: it waits for the loop to complete the "
                "outstanding messages, so it must be called from another thread"
            )
        if self._loop_thread is None or registration is None:
            raise RuntimeError("the server is not running")
        state, ended = registration
        self._deregister_asked = True  # (before the loop runs it: see run())
        self.call_soon(state.deregister)
        if not ended.wait(timeout):
            raise TimeoutError(f"outstanding messages still pending after {timeout} s")
        if self.dropped:
            raise errors.IpcError(errors.KErrDisconnected, "the kernel stopped serving this server "
                                  "during Deregister (it left too many frames unread)")
        if not state.deregistered:
            raise errors.IpcError(errors.KErrServerTerminated, "the kernel died during Deregister")

    def run(self, ready: threading.Event | None = None) -> None:
        """Register the server and serve until stopped. Raises the kernel's refusal (e.g.
        ``AlreadyExists``) or ``CouldNotConnect`` if no kernel answers (within `wait_kernel`
        seconds, if given), saying where it looked and how to start one."""
        try:
            if not self._kernel_found():
                return  # stopped while waiting
            self._run_with_kernel(ready)
            while self.reconnect and (self.kernel_died or self.dropped) and not self._stopping:
                why = "the kernel died" if self.kernel_died else "the kernel stopped serving it"
                self._end_registration(why)
                if self._deregister_asked or (self.state is not None and self.state.deregistering):
                    # it was ending anyway: no new registration
                    log.warning("server %r stops: %s while it deregistered", self.server.name, why)
                    return
                if self.kernel_died and not self._await_kernel():
                    return  # stopped while waiting
                self.kernel_died = self.dropped = False
                self._run_with_kernel(None)
        finally:
            self._wakeup.close()  # later completions (of held messages) are dropped
            self._close_asyncio()

    def _run_with_kernel(self, ready: threading.Event | None) -> None:
        context = zmq.Context()
        try:
            self._run_registered(context, ready)
        finally:
            if self._port is not None:
                self._port.close()  # the registration's direct connections end with it
            self._loop_thread = None
            context.destroy(linger=1000)
            if self._registration is not None:
                self._registration[1].set()  # a waiter learns whether it completed
            if self.state is not None and self.state.deregistered:
                self._end_registration("the server deregistered")  # its sessions end here too

    def _run_registered(self, context: zmq.Context[Any], ready: threading.Event | None) -> None:
        self._socket = open_socket(context, self.endpoint, linger=1000)
        port = self._port = DirectPort(self.server.name, self.on_loop_thread, self._wakeup.wake)
        if self.server.direct and not endpoints.is_tcp(self.endpoint):
            # (over tcp every session takes the kernel path: the clients may be on any host)
            port.open(os.path.dirname(endpoints.ipc_path(self.endpoint)))
        welcome, max_frame = self._register(port.path)
        outbox: collections.deque[bytes] = collections.deque()  # this registration's
        self._outbox = outbox
        self.state = ServerState(self.layers, lambda frame: self._emit(outbox, frame),
                                 max_frame=max_frame, routing_id=routing_id(self._socket),
                                 direct=port if port.path else None, spawn=self._spawn,
                                 defer=self.call_soon, clock=time.monotonic)
        port.rules = self.state.direct
        port.max_frame = max_frame
        self._registration = (self.state, threading.Event())
        self._loop_thread = threading.get_ident()
        log.info("server %r registered with kernel %d at %s", self.server.name,
                 welcome.kernel_pid, self.endpoint)
        if ready is not None:
            ready.set()
        self._serve(KernelWatch(self._socket, welcome))

    def _emit(self, outbox: collections.deque[bytes], frame: bytes) -> None:
        """Send a frame of the registration whose outbox is `outbox`: directly on the loop
        thread, else through that outbox (sent only while it is the current one)."""
        if threading.get_ident() == self._loop_thread:
            self._socket.send(frame)
            if self._readiness is not None:
                # (a coroutine's completion, while `_serve_async` awaits readiness: zmq's fd
                # may have been reset by this send with a frame already waiting)
                self._readiness.look_again()
        else:
            outbox.append(frame)
            self._wakeup.wake()  # does nothing once the host has stopped: the frame is dropped

    def _end_registration(self, why: str) -> None:
        """The registration ended (kernel death, deregistration): every session ends."""
        if self.state is None or self.state.ended:
            return
        ended = self.state.end()
        if ended:
            log.warning("server %r ended %d sessions: %s", self.server.name, ended, why)

    def _kernel_found(self) -> bool:
        """Before the first registration: True once a kernel is there (waiting `wait_kernel`
        seconds for one, if set), False if stopped meanwhile; raises ``CouldNotConnect`` with
        what to do if none is."""
        if self.wait_kernel is None:
            if not kernel_socket_exists(self.endpoint):
                raise no_kernel_error(self.endpoint)
            return True
        if self._await_kernel(self.wait_kernel):
            return True
        if self._stopping:
            return False
        raise no_kernel_error(self.endpoint, self.wait_kernel)

    def _await_kernel(self, timeout: float | None = None) -> bool:
        """Wait until a kernel answers on our endpoint; False if stopped meanwhile or after
        `timeout` seconds (None: no limit)."""
        log.info("server %r waits for a kernel at %s", self.server.name, self.endpoint)
        return wait_for_kernel(self.endpoint, timeout, self._pause)

    def _pause(self, seconds: float) -> bool:
        """Sleep `seconds`, or less if woken (`stop`); False once stopping."""
        if not self._stopping:
            select.select([self._wakeup.fd], [], [], seconds)
            self._wakeup.drain()
        return not self._stopping

    # -- setup -------------------------------------------------------------------------------

    def _register(self, direct: str) -> tuple[Welcome, int]:
        """Say Hello and register the server's name, with the socket for direct connections
        (or ""): (the kernel's Welcome, its frame limit)."""
        welcome = self._exchange(hello_message(Role.SERVER), Welcome)
        refused = welcome_error(welcome, self.endpoint, "server")
        if refused is not None:
            raise refused
        version = to_version(self.server.version, f"{type(self.server).__name__}.version")
        reply = self._exchange(
            Register(1, self.server.name, int(self.server.sharing), version, direct), Completed
        )
        if reply.value < 0:
            raise errors.IpcError(reply.value, f"registering server name {self.server.name!r}")
        return welcome, welcome.max_frame

    def _exchange(self, message: Any, expected: type) -> Any:
        if not exchange(self._socket, self.endpoint, encode(message), _REGISTER_TIMEOUT):
            raise no_kernel_error(self.endpoint, _REGISTER_TIMEOUT)
        reply = decode(self._socket.recv())
        if type(reply) is not expected:
            raise errors.IpcError(errors.KErrGeneral, f"kernel answered {reply!r}")
        return reply

    # -- the loop ----------------------------------------------------------------------------

    def _serve(self, kernel: KernelWatch) -> None:
        poller = MirroredPoller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wakeup.fd, zmq.POLLIN)
        poller.register(kernel.pollable, zmq.POLLIN)
        port = self._port
        assert port is not None  # (made before the registration)
        port.watch(poller)
        try:
            self._serve_sync(poller, kernel, port)
            if self._asyncio is not None and not self._loop_ended():
                # an async ServiceL began: go on with its coroutines beside the loop's work
                self._asyncio.run_until_complete(self._serve_async(poller, kernel, port))
            if not self.dropped:
                self._flush_outbox()  # completions made before stop() still reach their clients
        finally:
            kernel.close()

    def _loop_ended(self) -> bool:
        return self._stopping or self.dropped or self.kernel_died

    def _serve_sync(self, poller: zmq.Poller, kernel: KernelWatch, port: DirectPort) -> None:
        """The loop, until it ends or a ``ServiceL`` returns an awaitable (`_spawn`)."""
        spin = AdaptiveSpin()
        served_direct = False
        while not self._loop_ended() and self._asyncio is None:
            # After a turn that served a direct connection, its client's next request is
            # likely to come at once: spin for it rather than sleep (see ipcfw._spin).
            ready = _spin_for(poller, spin) if served_direct and spin.now() else None
            if ready is None:
                if port.rules is not None and port.rules.traffic.on:
                    self._send_traffic()  # before sleeping: the monitors see it now
                ready = dict(poller.poll(port.timeout))
            served_direct = self._turn(ready, kernel, port)

    async def _serve_async(self, poller: MirroredPoller, kernel: KernelWatch,
                           port: DirectPort) -> None:
        """The loop as a coroutine on the host's asyncio loop, beside the coroutines of async
        ``ServiceL``s: asyncio wakes it when one of the poller's sockets is ready, and the
        poller itself (polled without waiting) says which."""
        readiness = self._readiness = Readiness(asyncio.get_running_loop())
        poller.mirror_to(readiness)
        spin = AdaptiveSpin()
        served_direct = False
        try:
            while not self._loop_ended():
                ready = dict(poller.poll(0))
                if not ready and served_direct and spin.now():
                    ready = await _spin_among_coroutines(poller, spin) or {}
                if not ready and port.rules is not None and port.rules.traffic.on:
                    self._send_traffic()  # before sleeping: the monitors see it now
                if ready or not await readiness.wait(port.timeout):
                    # (with nothing ready: the port's timers)
                    served_direct = self._turn(ready, kernel, port)
                await asyncio.sleep(0)  # the coroutines' turn
        finally:
            self._readiness = None
            poller.mirror_to(None)
            readiness.close()

    def _turn(self, ready: dict[Any, int], kernel: KernelWatch, port: DirectPort) -> bool:
        """Serve what `ready` holds (or, for the port, its timers); True if that included a
        direct connection."""
        if self.state is not None and self.state.direct is not None:
            self.state.direct.now = time.monotonic()  # (the rules stamp requests with it)
        if self._wakeup.fd in ready:
            self._flush_outbox()
        if self._socket in ready:
            self._drain()
        served_direct = bool(port.path) and (len(ready) > 1 or self._socket not in ready)
        if served_direct:
            port.serve(ready)  # (not when the kernel socket alone is ready: its hot path)
        if kernel.pollable in ready and kernel.gone():
            log.error("the ipcfw kernel has died; server %r stops", self.server.name)
            self.kernel_died = True
        elif port.rules is not None and port.rules.traffic.full():
            self._send_traffic()  # a frame's worth: at most one a turn
        return served_direct

    def _send_traffic(self) -> None:
        """What a monitor sees of the direct path, to the kernel: sent when a frame's worth
        is waiting, and before the loop sleeps (a client's burst of calls is one frame)."""
        state = self.state
        frame = state.traffic_frame() if state is not None else None
        if frame is not None:
            self._emit(self._outbox, frame)

    def _close_asyncio(self) -> None:
        """The host has stopped: cancel the coroutines still running (their registration has
        ended, so nothing they complete is sent), let them finish, and close the loop."""
        loop, self._asyncio = self._asyncio, None
        if loop is None:
            return
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.wait(tasks, timeout=_COROUTINES_END))
        loop.close()

    def _spawn(self, awaitable: Awaitable[Any],
               done: Callable[[BaseException | None, bool], None]) -> asyncio.Task[Any]:
        """Run an async ``ServiceL``'s awaitable on the host's asyncio loop (made on the first
        one: a server with none never has one); `done` is called on the loop thread when it
        has ended (see ipcfw.server.coroutines)."""
        if self._asyncio is None:
            self._asyncio = asyncio.new_event_loop()
        task = self._asyncio.create_task(awaited(awaitable))
        task.add_done_callback(
            lambda t: done(None, True) if t.cancelled() else done(t.exception(), False)
        )
        return task

    def _drain(self) -> None:
        socket, state = self._socket, self.state
        assert state is not None  # (set before the loop starts)
        for _ in range(256):
            try:
                raw = socket.recv(NOBLOCK)
            except zmq.Again:  # once per batch: cheaper than a getsockopt(EVENTS) per frame
                return
            try:
                message = decode(raw)
            except ProtocolError as exc:
                state.report("malformed frame", str(exc))
                continue
            outcome = state.receive(message)
            if outcome is not None:
                self._registration_over(state, outcome)
                if self.dropped:
                    return  # nothing the kernel sent after its notice is meant for us

    def _registration_over(self, state: ServerState, outcome: Outcome) -> None:
        if outcome is Outcome.DEREGISTERED:
            if self._registration is not None:
                self._registration[1].set()  # Deregister() returns
            self.stop()
            return
        self.dropped = True
        then = "it registers again" if self.reconnect else "it stops"
        log.error(
            "the ipcfw kernel stopped serving server %r: %d frames waited unread for it (the "
            "kernel's max_backlog; was this process stopped or its loop blocked?); %s",
            self.server.name, state.dropped.waiting if state.dropped else 0, then,
        )

    def _flush_outbox(self) -> None:
        self._wakeup.drain()
        while self._calls:
            try:
                self._calls.popleft()()
            except Exception:
                log.exception("a call on the loop raised")
        outbox = self._outbox
        while outbox:
            self._socket.send(outbox.popleft())
        if self._port is not None:
            self._port.flush()


async def _spin_among_coroutines(poller: zmq.Poller,
                                 spin: AdaptiveSpin) -> dict[Any, int] | None:
    """`_spin_for` on the asyncio loop: between looks, the coroutines run (one of them is
    likely about to complete the request whose client will send the next one)."""
    perf = time.perf_counter
    spin_end = perf() + SPIN
    while perf() < spin_end:
        ready = poller.poll(0)
        if ready:
            spin.caught()
            return dict(ready)
        await asyncio.sleep(0)
    spin.missed()
    return None


def _spin_for(poller: zmq.Poller, spin: AdaptiveSpin) -> dict[Any, int] | None:
    """Poll without sleeping for up to `SPIN` seconds: what is ready, or None (learnt)."""
    perf = time.perf_counter
    spin_end = perf() + SPIN
    while perf() < spin_end:
        ready = poller.poll(0)
        if ready:
            spin.caught()
            return dict(ready)
    spin.missed()
    return None


def serve(server: CServer | COverlay, endpoint: str | None = None,
          ready: threading.Event | None = None) -> ServerHost:
    """Host `server` on this thread until the host is stopped; returns the stopped host.

    Called on the main thread, SIGINT and SIGTERM stop the host cleanly for the duration.
    """
    host = ServerHost(server, endpoint)
    if threading.current_thread() is not threading.main_thread():
        host.run(ready)
        return host
    previous = {signum: signal.signal(signum, lambda *_: host.stop())
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        host.run(ready)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return host
