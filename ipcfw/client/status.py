"""TRequestStatus and User: the status of an asynchronous request, and waiting for it.

A status is completed once, by the runtime (`ipcfw.client.runtime`), from whichever thread reads
its answer; its waiters settle its channel themselves, or sleep until another thread has (see the
runtime's docstring). RSession starts a request with `begin_request` and the runtime completes it
with `complete_request`: functions of ipcfw's own, not methods, so that a client program sees
none of them on a status and cannot complete a request twice.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any
from collections.abc import Callable, Generator

from .. import errors
from ..protocol import Cancel, encode
from .aio import settled_by_loop
from .runtime import AnyChannel

log = logging.getLogger("ipcfw.client")

__all__ = ["TRequestStatus", "User"]


class TRequestStatus:
    """The status of an asynchronous request (Symbian ``TRequestStatus``).

    ``Int()`` is the raw value: ``KRequestPending`` until the request completes, then its
    completion value. Wait for it Symbian style (``Wait()`` returns the raw value, negative for an
    error), Python style (``result()`` and ``await status`` return it or raise the ``IpcError``
    for a negative one), or with ``add_done_callback``. ``User.WaitForRequest`` waits for the
    first of several. Cancelling the task that awaits it (``asyncio.wait_for`` timing out, for
    one) cancels the request. A status may be reused once its request has completed::

        status = TRequestStatus()
        session.SendReceive(EGetNotification, (), status)
        ...
        if status.Wait(timeout=5.0) == KErrNone:
            ...

    If the server panicked the client, ``Int()`` is ``KErrDied`` and ``result()`` raises
    ``ClientPanic``. Where ipcfw itself completes a request with an error, ``result()`` raises
    an ``IpcError`` whose message says why (for example ``Disconnected`` when the kernel
    stopped serving the thread).
    """

    __slots__ = ("_value", "_done", "_callbacks", "_error", "_channel", "_req_id")

    def __init__(self) -> None:
        self._value = errors.KRequestPending
        self._done = False
        # made on first use
        self._callbacks: list[Callable[[TRequestStatus], None]] | None = None
        # What result() raises, when more is known than the value (a panic, or why it failed).
        self._error: BaseException | None = None
        self._channel: AnyChannel | None = None  # where its answer arrives, once in use
        self._req_id = 0

    def Int(self) -> int:
        """The raw value: ``KRequestPending`` while pending, else the completion value."""
        return self._value

    def done(self) -> bool:
        return self._done

    def Wait(self, timeout: float | None = None) -> int:
        """Block until the request completes and return its raw value.

        Raises ``TimeoutError`` if `timeout` seconds pass first (the request stays pending).
        """
        if not self._done:
            channel = self._channel
            if channel is None:
                raise RuntimeError("this TRequestStatus has not been given to a request")
            channel.runtime.wait([(self, channel)], timeout)
        return self._value

    def Cancel(self, timeout: float | None = 5.0) -> int:
        """Cancel the pending request and return its final value, like Symbian's
        ``CActive::Cancel``: it waits until the request has completed.

        The value is ``KErrCancel``, unless the server completed the request first (then its
        value). Either way it completes exactly once, its message slot is freed, and the
        server's session is told (``CSession.Cancelled``). Cancelling a completed request
        returns its value and sends nothing.

        On a thread running an asyncio event loop it never waits (the loop would stop): it
        asks for the cancel and returns ``Int()`` as it is then, ``KRequestPending`` unless the
        request had completed; ``await status`` gives the final value.
        """
        if not self._done:
            self._ask_cancel()
            if _running_loop() is not None:
                return self._value
        return self.Wait(timeout)

    def _ask_cancel(self) -> None:
        channel = self._channel
        if channel is None:
            raise RuntimeError("this TRequestStatus has not been given to a request")
        channel.send(encode(Cancel(self._req_id)))

    def result(self, timeout: float | None = None) -> int:
        """Block until completion; return the value, or raise the error it completed with."""
        value = self.Wait(timeout)
        if self._error is not None:
            raise self._error
        return errors.check(value)

    def add_done_callback(self, fn: Callable[[TRequestStatus], None]) -> None:
        """Call ``fn(status)`` once the request completes (at once if it already has).

        The callback runs on whichever thread processes the completion: a thread waiting for
        it, the thread that made the request when it next waits or makes a call (within a
        millisecond or so if it only sends async requests), or, if that thread is idle, the
        runtime's I/O thread within milliseconds. Keep callbacks short.
        """
        with _STATUS_LOCK:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        fn(self)

    def __await__(self) -> Generator[Any, None, int]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def resolve(_status: TRequestStatus) -> None:
            loop.call_soon_threadsafe(_resolve, future)

        self.add_done_callback(resolve)
        channel = self._channel
        try:
            if self._done or channel is None:
                yield from future.__await__()
            else:
                with settled_by_loop(loop, channel):
                    yield from future.__await__()
        except asyncio.CancelledError:
            # The awaiting task was cancelled (asyncio.wait_for timing out, for one): so is the
            # request, without waiting. Its KErrCancel arrives later and frees its slot.
            if not self._done and self._channel is not None:
                self._ask_cancel()
            raise
        return self.result(0)

    def __repr__(self) -> str:
        value = "KRequestPending" if self._value == errors.KRequestPending else self._value
        return f"<TRequestStatus {value}>"


# Guards TRequestStatus callback lists against a completion racing add_done_callback.
_STATUS_LOCK = threading.Lock()


# -- for ipcfw itself: RSession starts a request, the runtime completes it ----------------------
# (Functions, not methods: they are no part of what a client program calls. A status completed
# twice would break exactly-once.)


def begin_request(status: TRequestStatus, channel: AnyChannel, req_id: int) -> None:
    """`status` is given to request `req_id`, answered on `channel` (RuntimeError if it is
    in use by a request still pending)."""
    if status._channel is not None and not status._done:
        raise RuntimeError("this TRequestStatus is already in use by a pending request")
    status._req_id = req_id
    status._value = errors.KRequestPending
    status._error = None
    status._done = False
    status._channel = channel


def abandon_request(status: TRequestStatus) -> None:
    """The request begun by `begin_request` could not be sent: `status` is free again, still
    pending."""
    status._channel = None


def complete_request(status: TRequestStatus, value: int, error: BaseException | None) -> None:
    """The request completed with `value` (`error`: what `result()` raises, when more is
    known than the value); run the callbacks. Called once per request, by the one thread that
    took it from the runtime's table (`ClientState.take`, through `Pending.complete`)."""
    with _STATUS_LOCK:
        status._value = value
        status._error = error
        status._done = True
        callbacks, status._callbacks = status._callbacks, None
    for fn in callbacks or ():
        try:
            fn(status)
        except Exception:
            log.exception("a TRequestStatus callback raised")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class User:
    """Symbian's ``User`` class, for the calls that concern requests."""

    @staticmethod
    def WaitForRequest(
        *statuses: TRequestStatus, timeout: float | None = None
    ) -> TRequestStatus:
        """Block until one of `statuses` completes; return the first completed one.

        Raises ``TimeoutError`` if none completes within `timeout` seconds.
        """
        if not statuses:
            raise TypeError("WaitForRequest needs at least one TRequestStatus")
        for status in statuses:
            if status.done():
                return status
        waits = [(s, s._channel) for s in statuses]
        channel = next((c for _, c in waits if c is not None), None)
        if channel is None:
            raise RuntimeError("none of these TRequestStatus objects has been given to a request")
        return channel.runtime.wait(waits, timeout)
