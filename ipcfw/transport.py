"""How a process reaches its kernel: a DEALER socket, over ipc or over tcp with CURVE.

Over ``ipc://`` the socket is plain: the kernel reads the peer's pid, uid and gid from the
connection, and a pidfd on the kernel's pid says when the kernel is gone.

Over ``tcp://`` (a kernel on another host, or one reached as if it were) the socket is a CURVE
client with this process's keypair and the kernel's public key (`ipcfw.curve.client_keys`).
Neither side's pid means anything to the other, so liveness is the connection's: ZeroMQ
heartbeats every `HEARTBEAT_INTERVAL` seconds, and a connection silent for
`HEARTBEAT_TIMEOUT` seconds is closed (the kernel does the same with each peer). A monitor on
the socket reports the handshake's failure (`exchange` turns it into a clear error) and the
connection's end (`KernelWatch`).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, cast

import psutil
import zmq
import zmq.utils.monitor

from . import curve, errors
from . import endpoint as endpoints
from .protocol import PROTOCOL_VERSION, Hello, Role, Welcome

__all__ = ["HEARTBEAT_INTERVAL", "HEARTBEAT_TIMEOUT", "KernelWatch", "discard", "exchange",
           "hello_message", "open_socket", "routing_id", "set_heartbeats", "stop_watching"]

HEARTBEAT_INTERVAL = 1.0
"""Seconds between ZeroMQ heartbeats on a tcp connection (both ways)."""
HEARTBEAT_TIMEOUT = 3.0
"""Seconds without a word from the other side after which a tcp connection is closed: the
peer (or the kernel) is then gone."""

_LINK_EVENTS = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)


def open_socket(context: zmq.Context[Any], endpoint: str, *, linger: int = 0
                ) -> zmq.Socket[bytes]:
    """A DEALER connected to the kernel at `endpoint`, with a random 128-bit routing id (every
    ipcfw peer's: DESIGN.md section 5); over tcp, a CURVE client with heartbeats, watched."""
    socket: zmq.Socket[bytes] = context.socket(zmq.DEALER)
    socket.routing_id = os.urandom(16)
    socket.linger = linger
    if endpoints.is_tcp(endpoint):
        try:
            keys, kernel_key = curve.client_keys(endpoint)
        except curve.CurveKeyError as exc:
            socket.close(linger=0)
            raise errors.IpcError(errors.KErrCouldNotConnect, str(exc)) from None
        socket.curve_publickey, socket.curve_secretkey = keys.public, keys.secret
        socket.curve_serverkey = kernel_key
        set_heartbeats(socket)
        socket.get_monitor_socket(_LINK_EVENTS)  # (kept by the socket: `_monitor_of`)
    socket.connect(endpoint)
    return socket


def routing_id(socket: zmq.Socket[bytes]) -> bytes:
    """The routing id `open_socket` gave `socket`."""
    return cast(bytes, socket.routing_id)


def set_heartbeats(socket: zmq.Socket[bytes]) -> None:
    """Heartbeats on a tcp socket: ping every `HEARTBEAT_INTERVAL`, close a connection silent
    for `HEARTBEAT_TIMEOUT`, and ask the other side to do the same."""
    socket.heartbeat_ivl = int(HEARTBEAT_INTERVAL * 1000)
    socket.heartbeat_timeout = int(HEARTBEAT_TIMEOUT * 1000)
    socket.heartbeat_ttl = int(HEARTBEAT_TIMEOUT * 1000)


@functools.cache
def _this_process(pid: int) -> tuple[int, int]:
    return pid, int(psutil.Process(pid).create_time() * 1000)


def hello_message(role: Role) -> Hello:
    """The Hello that opens a socket in `role`, naming this process (for a kernel over tcp)."""
    return Hello(int(role), PROTOCOL_VERSION, *_this_process(os.getpid()))


def exchange(socket: zmq.Socket[bytes], endpoint: str, frame: bytes, timeout: float) -> bool:
    """Send `frame` to the kernel on `socket`; whether its answer is waiting within `timeout`
    seconds (as ``socket.poll``). Over tcp a handshake the kernel refuses raises at once: this
    process's key not admitted (``PermissionDenied``), or the kernel key not the kernel's
    (``CouldNotConnect``); and the frame waits (within `timeout`) for a connection to go on,
    since ZeroMQ has none for a refused one: a blocking send would wait forever."""
    monitor = _monitor_of(socket)
    if monitor is None:
        socket.send(frame)
        return bool(socket.poll(max(0, int(timeout * 1000))))
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLOUT)
    poller.register(monitor, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    sent = False
    while True:
        ready = dict(poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))
        if ready.get(socket, 0) & (zmq.POLLIN if sent else zmq.POLLOUT):
            if sent:
                return True
            try:
                socket.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                continue  # (the connection went again meanwhile)
            sent = True
            poller.modify(socket, zmq.POLLIN)
        elif monitor in ready:
            _raise_on_refusal(monitor, endpoint)
        elif time.monotonic() >= deadline:
            return False


def _raise_on_refusal(monitor: zmq.Socket[bytes], endpoint: str) -> None:
    while True:
        try:
            event = zmq.utils.monitor.recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
        except zmq.Again:
            return
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            public = curve.client_keys(endpoint)[0].public.decode()
            raise errors.IpcError(errors.KErrPermissionDenied, (
                f"the kernel at {endpoint} refused this process's key {public} at the CURVE "
                f"handshake: its configuration lists no [[tcp.peer]] with that key "
                f"({curve.KEY_VAR} names this process's keypair)"))
        if event in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
            raise errors.IpcError(errors.KErrCouldNotConnect, (
                f"the CURVE handshake with {endpoint} failed: {curve.KERNEL_KEY_VAR} is not "
                "the public key of the kernel listening there (or it is no ipcfw kernel's "
                "tcp listener)"))


def _monitor_of(socket: zmq.Socket[bytes]) -> zmq.Socket[bytes] | None:
    """The link monitor `open_socket` gave a tcp socket; None over ipc. (pyzmq keeps one
    monitor per socket and hands the same one back.)"""
    if socket.get(zmq.MECHANISM) != zmq.CURVE:
        return None
    return socket.get_monitor_socket(_LINK_EVENTS)


def stop_watching(socket: zmq.Socket[bytes]) -> None:
    """Close a tcp socket's link monitor once its Hello is answered and nobody needs to know
    when its connection ends (a client thread's channel: its process's inbox watches)."""
    monitor = _monitor_of(socket)
    if monitor is not None:
        socket.disable_monitor()
        monitor.close(linger=0)


def discard(socket: zmq.Socket[bytes]) -> None:
    """Close a socket `open_socket` made whose Hello failed (refused, unanswered), with its
    link monitor over tcp: left open, that would hold a descriptor for as long as the
    context lives, one for each refused attempt."""
    stop_watching(socket)
    socket.close(linger=0)


class KernelWatch:
    """What tells a process its kernel is gone: a pidfd on the kernel's pid over ipc, the end
    of the socket's connection over tcp. Poll `pollable`; when it is ready, `gone()` says
    whether the kernel is."""

    def __init__(self, socket: zmq.Socket[bytes], welcome: Welcome) -> None:
        self._monitor = _monitor_of(socket)
        self._pidfd = -1 if self._monitor is not None else os.pidfd_open(welcome.kernel_pid)
        self.pollable: int | zmq.Socket[bytes] = (
            self._monitor if self._monitor is not None else self._pidfd)

    def gone(self) -> bool:
        """Call when `pollable` is ready: whether the kernel is gone (reading what made it
        ready)."""
        if self._monitor is None:
            return True
        events = 0  # (every event watched is the link's end: a disconnect, a failed handshake)
        while True:
            try:
                zmq.utils.monitor.recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return events > 0
            events += 1

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.close(linger=0)
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
