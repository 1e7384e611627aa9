"""The client runtime's I/O thread (`Inbox`, ``ipcfw-inbox``): it owns the inbox socket, where
the kernel sends notices (a session lost, a channel dropped), watches the kernel's pidfd, settles
channels whose owners are idle, and sends the kernel Closes that wait for direct ones. See
`ipcfw.client.runtime`'s docstring; the runtime is reached through `Served`, what this thread
needs of it. One thread, started and stopped (joined) by its runtime.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

import zmq

from .. import errors
from .._wakeup import WakePipe
from .._zmqflags import EVENTS, POLLIN
from ..protocol import Dropped, Message, ProtocolError, Role, SessionLost, decode
from ..transport import KernelWatch, discard, open_socket, routing_id
from .channel import hello
from .connection import AnyChannel

log = logging.getLogger("ipcfw.client")

IDLE = 0.005  # a channel untouched this long is settled by the I/O thread


class Served(Protocol):
    """What the I/O thread needs of its runtime (`ipcfw.client.runtime.Runtime`)."""

    context: zmq.Context[Any]
    endpoint: str
    kernel_dead: bool

    def all_channels(self) -> list[AnyChannel]: ...

    def closes_waiting(self) -> bool: ...

    def send_closes_due(self) -> None: ...

    def kernel_died(self, lost: tuple[int, str] | None = None) -> None: ...

    def session_lost(self, handle: int, error: BaseException) -> None: ...

    def channel_dropped(self, routing_id: bytes, waiting: int) -> None: ...

    def close_channels(self) -> None: ...


class Inbox:
    """The runtime's I/O thread: owns the inbox socket, watches the kernel, settles idle
    channels."""

    def __init__(self, runtime: Served) -> None:
        self.runtime = runtime
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._wakeup = WakePipe()
        self._stopping = False
        # True from before the thread looks for channels awaiting answers until its poll
        # returns, unless it found some (it then polls with a timeout): a channel's first
        # pending request wakes it only then (`Runtime.first_pending`).
        self.sleeps_for_good = False
        self.routing_id = b""  # the inbox socket's, once it is open
        self._thread = threading.Thread(target=self._main, name="ipcfw-inbox", daemon=True)

    def start_and_wait(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            # (once its socket is closed, the runtime may end its context: nothing is left)
            self._thread.join(timeout=2.0)
            self._wakeup.close()
            raise self._error

    def stop(self) -> None:
        if self._wakeup.closed:
            return
        self._stopping = True
        self._wakeup.wake()  # harmless if the thread already ended (kernel died)
        self._thread.join(timeout=2.0)
        self._wakeup.close()

    def wake(self) -> None:
        self._wakeup.wake()

    def _main(self) -> None:
        socket = None
        watch = None
        try:
            try:
                socket = open_socket(self.runtime.context, self.runtime.endpoint)
                self.routing_id = routing_id(socket)
                welcome = hello(socket, Role.INBOX, self.runtime.endpoint)
                watch = KernelWatch(socket, welcome)
            except BaseException as exc:  # reported to the thread that started us
                self._error = exc
                if socket is not None and watch is None:
                    discard(socket)
                return
            finally:
                self._ready.set()
            self._serve(socket, watch)
        finally:
            if socket is not None:
                socket.close(linger=0)
            if watch is not None:
                watch.close()

    def _serve(self, socket: zmq.Socket[bytes], watch: KernelWatch) -> None:
        kernel = watch.pollable
        while not self._stopping and not self.runtime.kernel_dead:
            poller = zmq.Poller()
            poller.register(socket, zmq.POLLIN)
            poller.register(kernel, zmq.POLLIN)
            poller.register(self._wakeup.fd, zmq.POLLIN)
            watched = self._unattended_channels()
            for channel in watched:
                poller.register(channel.fd, zmq.POLLIN)
            self.sleeps_for_good = True  # (before looking: see __init__)
            waiting = self.runtime.closes_waiting() or any(
                c.awaits_answers() for c in self.runtime.all_channels())
            self.sleeps_for_good = not waiting
            try:
                ready = dict(poller.poll(int(IDLE * 1000) if waiting else None))
            except zmq.ZMQError:
                continue  # a watched channel was closed under us (its thread ended): look again
            finally:
                self.sleeps_for_good = False
            if self._wakeup.fd in ready:
                self._wakeup.drain()
            if socket in ready:
                self._drain(socket)
            for channel in watched:
                channel.try_settle()
            if self.runtime.closes_waiting():
                self.runtime.send_closes_due()
            if kernel in ready and watch.gone():
                self._drain(socket)
                log.warning("the ipcfw kernel at %s has died", self.runtime.endpoint)
                self.runtime.kernel_died()
                return

    def _unattended_channels(self) -> list[AnyChannel]:
        now = time.monotonic()
        return [
            c for c in self.runtime.all_channels()
            if not c.closed and c.awaits_answers() and now - c.last_used > IDLE
        ]

    def _drain(self, socket: zmq.Socket[bytes]) -> None:
        while socket.get(EVENTS) & POLLIN:  # type: ignore[operator]  # (as in Channel._settle)
            raw = socket.recv()
            try:
                self._dispatch(decode(raw))
            except ProtocolError as exc:
                log.error("dropping a malformed frame from the kernel: %s", exc)
            except Exception:  # a user callback raised: keep serving everyone else
                log.exception("error while handling a kernel notice")

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, SessionLost):
            self.runtime.session_lost(message.handle, session_lost_error(message.code))
        elif isinstance(message, Dropped) and message.routing_id == self.routing_id:
            self._dropped(message.waiting)
        elif isinstance(message, Dropped):
            self.runtime.channel_dropped(message.routing_id, message.waiting)
        else:
            log.error("unexpected %s on the inbox", type(message).__name__)

    def _dropped(self, waiting: int) -> None:
        """The kernel stopped serving this inbox: the process can no longer learn of lost
        sessions, so the runtime ends. Closing its channels makes the kernel end its sessions."""
        log.error("the ipcfw kernel at %s stopped serving this process (%d notices waited unread "
                  "for it); its sessions have ended", self.runtime.endpoint, waiting)
        self.runtime.kernel_died((
            errors.KErrDisconnected,
            f"the ipcfw kernel at {self.runtime.endpoint} stopped serving this process: {waiting} "
            "notices waited unread for it; its sessions have ended",
        ))
        self.runtime.close_channels()


def session_lost_error(code: int) -> errors.IpcError:
    if code == errors.KErrDisconnected:
        return errors.IpcError(
            code,
            "the ipcfw kernel stopped serving the thread that created this session (it left "
            "too many answers unread), and closed the session",
        )
    return errors.IpcError(code)
