"""The notifier server: hold a client's request, complete it later from another thread.

This is the Symbian "notification" pattern. A client calls ``wait_for_event`` asynchronously
(``notifier.wait_for_event.send()``, or ``await notifier.wait_for_event.call_async()``); the
server does not answer at once but returns a `Deferred` and keeps it. When some client
publishes an event, the waiting requests are resolved from a separate thread (a publisher
thread, or a timer thread), while the server's loop thread goes on serving other requests. A
deferred result may be resolved from any thread; each is owned by exactly one party at a time
(the table of waiters, or the publisher that took it from there), so it is never resolved
twice.

Its interface is `Notifier` (docs/interfaces.md); the raw opcodes (``EWaitForEvent`` ...) are
its function numbers, for raw clients:

* ``wait_for_event(payload=None) -> int`` (``EWaitForEvent``, 1): held until the next event is
  published, then returns the event's value (an int >= 0). If `payload` (argument 0) is a
  bytearray, the event's payload is written into it first (``KErrOverflow`` instead if it does
  not fit). One wait per session at a time: a second one fails at once with ``KErrInUse``.
* ``publish(value, payload=b"") -> int`` (``EPublish``, 2): value = int 0 (>= 0), payload =
  descriptor 1. Takes every wait held at this moment, by every session, returns the number of
  waits taken, and then answers those waits from a new publisher thread. A wait sent after
  the publish waits for the next event.
* ``cancel_wait()`` (``ECancelWait``, 3): the Symbian cancel idiom. Completes this session's
  held wait with ``KErrCancel`` (if there is one), then itself.
* ``publish_after(delay_ms, value, payload=b"")`` (``EPublishAfter``, 4): delay = int 0
  (0..``MAX_DELAY_MS``). Returns at once; after the delay a timer thread publishes the event
  to the waits held at that moment.
* ``waiter_count() -> int`` (``EWaiterCount``, 5): the number of waits held right now.

When the client cancels its wait (``Reply.status.Cancel()``, or the task awaiting it is
cancelled), the session's ``Cancelled`` lets it go: the session may wait again at once.

When a session closes with a wait still held, ``Disconnect`` completes that wait with
``KErrCancel`` (harmless: the client has already completed it locally with ``KErrSessionClosed``)
before completing the disconnect itself.

Threads: each publish runs on a short-lived thread named ``notifier-publish-N``, each delayed
publish on a `threading.Timer` named ``notifier-timer-N``; they end by themselves (a delay is at
most ``MAX_DELAY_MS``). The host has no stop hook for servers, so whoever hosts the server from
Python may call `NotifierServer.shutdown()` after the host's ``run()`` returns, to cancel pending
timers and join the threads.

Host it with ``ipcfw serve servers.notifier:NotifierServer``; ``clients/notifier_client.py`` shows
a client.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable

from ipcfw import (
    CServer,
    Deferred,
    Interface,
    InterfaceSession,
    IpcError,
    KErrArgument,
    KErrCancel,
    KErrInUse,
    KErrNone,
    RMessage,
    operation,
)

log = logging.getLogger("servers.notifier")

MAX_DELAY_MS = 5000
"""The longest delay ``publish_after`` accepts: timer threads stay short-lived."""


class Notifier(Interface, name="notifier", version=(1, 0, 0)):
    """The notifier's interface.

    ::

        with Notifier.connect() as notifier:
            payload = bytearray(64)
            waiting = notifier.wait_for_event.send(payload)     # a Reply, at once
            ...
            value = await waiting       # payload now holds the event's payload
    """

    @operation(1)
    def wait_for_event(self, payload: bytearray | None = None) -> int:
        """The next event's value; `payload`, if given, receives its payload."""

    @operation(2)
    def publish(self, value: int, payload: bytes = b"") -> int:
        """Publish an event (`value` >= 0); returns how many waits it wakes."""

    @operation(3)
    def cancel_wait(self) -> None:
        """Cancel this session's wait: it fails with ``Cancelled`` (KErrCancel)."""

    @operation(4)
    def publish_after(self, delay_ms: int, value: int, payload: bytes = b"") -> None:
        """Have the server's timer thread publish an event after `delay_ms`."""

    @operation(5)
    def waiter_count(self) -> int:
        """The number of waits held right now, by every session."""


EWaitForEvent = Notifier.wait_for_event.number
EPublish = Notifier.publish.number
ECancelWait = Notifier.cancel_wait.number
EPublishAfter = Notifier.publish_after.number
EWaiterCount = Notifier.waiter_count.number


class Waiter:
    """A held wait: its deferred result, and the client's buffer for the payload (or None)."""

    __slots__ = ("deferred", "payload")

    def __init__(self, payload: bytearray | None) -> None:
        self.deferred: Deferred[int] = Deferred()
        self.payload = payload

    def deliver(self, value: int, payload: bytes) -> None:
        """Answer the wait with the event. Called on a publisher or timer thread."""
        if self.payload is not None:
            self.payload[:] = payload  # written back (or KErrOverflow) when resolved
        self.deferred.resolve(value)

    def cancel(self) -> None:
        self.deferred.fail(IpcError(KErrCancel))


class NotifierSession(InterfaceSession[Notifier]):
    def wait_for_event(self, payload: bytearray | None) -> Deferred[int]:
        # Not answered here: the server keeps it until an event is published.
        waiter = Waiter(payload)
        self.Server().hold(self, waiter)
        return waiter.deferred

    def publish(self, value: int, payload: bytes) -> int:
        _check_event_value(value)
        server: NotifierServer = self.Server()
        waiters = server.take_waiters()
        # Hand the waits to a publisher thread, which answers them while the loop thread
        # answers this publish and goes on serving.
        server.run_later("publish", 0.0, lambda: _deliver_all(waiters, value, payload))
        return len(waiters)

    def cancel_wait(self) -> None:
        # Symbian's cancel idiom: complete the outstanding request with KErrCancel, then the
        # cancel request itself. Cancelling when nothing is held is harmless.
        waiter = self.Server().release(self)
        if waiter is not None:
            waiter.cancel()

    def publish_after(self, delay_ms: int, value: int, payload: bytes) -> None:
        if not 0 <= delay_ms <= MAX_DELAY_MS:
            raise IpcError(KErrArgument, f"delay must be 0..{MAX_DELAY_MS} ms, got {delay_ms}")
        _check_event_value(value)
        server: NotifierServer = self.Server()
        # The waits are taken when the timer fires, not now: a wait sent meanwhile gets it.
        server.run_later(
            "timer", delay_ms / 1000,
            lambda: _deliver_all(server.take_waiters(), value, payload),
        )

    def waiter_count(self) -> int:
        return int(self.Server().waiter_count())

    def Cancelled(self, message: RMessage) -> None:
        # The client cancelled its wait (Cancel(), or the task awaiting it was cancelled): it
        # has its KErrCancel; let the wait go, so that this session may wait again. (The only
        # request a notifier session holds is its wait.)
        self.Server().release(self)

    def Disconnect(self, message: RMessage) -> None:
        # Cancel what we still hold (a late completion for a closed session is dropped by the
        # kernel, so this is harmless), then complete the disconnect: the kernel frees the
        # session.
        waiter = self.Server().release(self)
        if waiter is not None:
            waiter.cancel()
        message.Complete(KErrNone)


class NotifierServer(CServer):
    name = Notifier.interface.name
    version = Notifier.interface.version
    session_class = NotifierSession
    def __init__(self) -> None:
        # The loop thread and the publisher/timer threads all touch these: guard them.
        self._lock = threading.Lock()
        self._waiters: dict[NotifierSession, Waiter] = {}
        self._threads: set[threading.Thread] = set()
        self._serial = itertools.count(1)

    # -- the table of held waits (any thread) --------------------------------------------------

    def hold(self, session: NotifierSession, waiter: Waiter) -> None:
        with self._lock:
            if session in self._waiters:
                raise IpcError(KErrInUse, "this session is already waiting for an event")
            self._waiters[session] = waiter

    def release(self, session: NotifierSession) -> Waiter | None:
        """Take `session`'s held wait out of the table (None if it holds none)."""
        with self._lock:
            return self._waiters.pop(session, None)

    def take_waiters(self) -> list[Waiter]:
        """Take every held wait out of the table: the caller now owns them."""
        with self._lock:
            waiters = list(self._waiters.values())
            self._waiters.clear()
        return waiters

    def waiter_count(self) -> int:
        with self._lock:
            return len(self._waiters)

    # -- threads ----------------------------------------------------------------------------

    def run_later(self, kind: str, delay: float, job: Callable[[], None]) -> None:
        """Run `job` on a new named thread, after `delay` seconds (a Timer) or at once."""
        name = f"notifier-{kind}-{next(self._serial)}"

        def body() -> None:
            try:
                job()
            except Exception:
                log.exception("%s failed", name)
            finally:
                with self._lock:
                    self._threads.discard(thread)

        thread: threading.Thread
        if delay > 0:
            thread = threading.Timer(delay, body)
            thread.name = name
        else:
            thread = threading.Thread(target=body, name=name)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel pending timers and join every thread this server started."""
        with self._lock:
            threads = list(self._threads)
            self._threads.clear()
        for thread in threads:
            if isinstance(thread, threading.Timer):
                thread.cancel()
        for thread in threads:
            thread.join(timeout)


def _deliver_all(waiters: list[Waiter], value: int, payload: bytes) -> None:
    for waiter in waiters:
        waiter.deliver(value, payload)


def _check_event_value(value: int) -> None:
    # Waiters complete with this value; a negative one would reach them as an error code.
    if value < 0:
        raise IpcError(KErrArgument, f"an event value must be >= 0, got {value}")
