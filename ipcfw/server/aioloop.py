"""The server host's loop under asyncio (once an ``async def ServiceL`` has started one): the
loop's `zmq.Poller`, mirrored into asyncio's readers and writers, so that the loop can sleep in
asyncio beside the coroutines and still ask the poller what is ready.

The poller stays the one source of truth (it asks zmq, which knows a zmq socket's state better
than its edge-triggered fd); asyncio only wakes the loop to ask it. `MirroredPoller` keeps
asyncio watching exactly what it polls, as the direct port adds and removes connections;
`Readiness` is what the loop awaits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import zmq

__all__ = ["MirroredPoller", "Readiness", "awaited"]


async def awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


class MirroredPoller(zmq.Poller):
    """The loop's poller, which can also keep a `Readiness` watching what it polls: the direct
    port registers and unregisters its connections as they come and go (unregistering before
    it closes one, so asyncio never watches a closed or reused fd)."""

    def __init__(self) -> None:
        super().__init__()
        self._mirror: Readiness | None = None

    def mirror_to(self, mirror: Readiness | None) -> None:
        self._mirror = mirror
        if mirror is not None:
            for sock, flags in self.sockets:
                mirror.watch(sock, flags)

    def register(self, socket: Any, flags: int = zmq.POLLIN | zmq.POLLOUT) -> None:
        super().register(socket, flags)  # (flags 0 unregisters, through our unregister)
        if flags and self._mirror is not None:
            self._mirror.watch(socket, flags)

    def unregister(self, socket: Any) -> None:
        super().unregister(socket)
        if self._mirror is not None:
            self._mirror.unwatch(socket)


class Readiness:
    """Wakes the host's loop (``ServerHost._serve_async``) when a socket it polls may be
    ready: asyncio's readers and writers over the same sockets as the poller's
    (`MirroredPoller.mirror_to`).

    A zmq socket's fd is edge-triggered: a send or receive on it outside of the poller's turn
    (a coroutine completing its message) may consume the edge of a frame that came meanwhile,
    leaving the fd quiet with the frame unread; whoever does that calls `look_again`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._watched: dict[Any, int] = {}  # socket or fd -> the zmq flags watched
        self._woken: asyncio.Future[bool] | None = None

    async def wait(self, timeout_ms: int | None) -> bool:
        """Wait until a watched socket may be ready (True) or `timeout_ms` passed (False)."""
        woken = self._woken = self._loop.create_future()
        timer = (None if timeout_ms is None
                 else self._loop.call_later(timeout_ms / 1000, _resolve, woken, False))
        try:
            return bool(await woken)
        finally:
            self._woken = None
            if timer is not None:
                timer.cancel()

    def _wake(self) -> None:
        if self._woken is not None:
            _resolve(self._woken, True)

    def look_again(self) -> None:
        """A watched zmq socket was used outside of the poller's turn: wake the loop so that
        its poller (which asks zmq, not the fd) looks at it again."""
        self._wake()

    def watch(self, sock: Any, flags: int) -> None:
        if sock in self._watched:
            self.unwatch(sock)
        if flags & zmq.POLLIN:
            self._loop.add_reader(sock, self._wake)
        if flags & zmq.POLLOUT:
            self._loop.add_writer(sock, self._wake)
        self._watched[sock] = flags

    def unwatch(self, sock: Any) -> None:
        flags = self._watched.pop(sock, 0)
        if flags & zmq.POLLIN:
            self._loop.remove_reader(sock)
        if flags & zmq.POLLOUT:
            self._loop.remove_writer(sock)

    def close(self) -> None:
        for sock in list(self._watched):
            self.unwatch(sock)


def _resolve(future: asyncio.Future[bool], woken: bool) -> None:
    if not future.done():
        future.set_result(woken)

