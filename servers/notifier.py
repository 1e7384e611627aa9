"""The notifier server: hold a client's request, complete it later from another thread.

This is the Symbian "notification" pattern. A client sends ``EWaitForEvent`` asynchronously (with
a `TRequestStatus`); the server does not complete it in ``ServiceL`` but keeps the `RMessage`.
When some client publishes an event, the waiting messages are completed from a separate thread
(a publisher thread, or a timer thread), while the server's loop thread goes on serving other
requests. ``RMessage.Complete`` may be called from any thread; a message is owned by exactly one
party at a time (the table of waiters, or the publisher that took it from there), so it is never
completed twice.

Functions (the client's opcodes; import them from here, the single source of truth):

* ``EWaitForEvent`` (1): held until the next event is published, then completes with the event's
  value (an int >= 0). If argument 0 is a writable descriptor, the event's payload is written into
  it first (``KErrOverflow`` instead if the payload does not fit). One wait per session at a
  time: a second one completes at once with ``KErrInUse``.
* ``EPublish`` (2): value = int 0 (>= 0), payload = descriptor 1 (optional). Takes every wait
  held at this moment, by every session, completes with the number of waits taken, and then
  completes those waits from a new publisher thread. A wait sent after the publish waits for the
  next event.
* ``ECancelWait`` (3): the Symbian cancel idiom. Completes this session's held wait with
  ``KErrCancel`` (if there is one), then completes itself with ``KErrNone``.
* ``EPublishAfter`` (4): delay in ms = int 0 (0..``MAX_DELAY_MS``), value = int 1, payload =
  descriptor 2 (optional). Completes at once; after the delay a timer thread publishes the event
  to the waits held at that moment.
* ``EWaiterCount`` (5): completes with the number of waits held right now.

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
    BadDescriptor,
    CServer,
    CSession,
    IpcError,
    KErrArgument,
    KErrCancel,
    KErrInUse,
    KErrNone,
    KErrNotSupported,
    RMessage,
    TVersion,
)

log = logging.getLogger("servers.notifier")

EWaitForEvent = 1
EPublish = 2
ECancelWait = 3
EPublishAfter = 4
EWaiterCount = 5

MAX_DELAY_MS = 5000
"""The longest delay ``EPublishAfter`` accepts: timer threads stay short-lived."""


class Waiter:
    """A held ``EWaitForEvent`` message, and whether the client gave a buffer for the payload."""

    __slots__ = ("message", "wants_payload")

    def __init__(self, message: RMessage) -> None:
        self.message = message
        try:
            message.GetDesMaxLength(0)  # raises BadDescriptor if argument 0 is an int
            self.wants_payload = True
        except BadDescriptor:
            self.wants_payload = False

    def deliver(self, value: int, payload: bytes) -> None:
        """Complete the wait with the event. Called on a publisher or timer thread."""
        if self.wants_payload:
            try:
                self.message.WriteL(0, payload)
            except IpcError as exc:  # KErrOverflow: the client's buffer is too short
                self.message.Complete(exc.code)
                return
        self.message.Complete(value)


class NotifierSession(CSession):
    def ServiceL(self, message: RMessage) -> None:
        server: NotifierServer = self.Server()
        function = message.Function()

        if function == EWaitForEvent:
            # Not completed here: the server keeps it until an event is published.
            server.hold(self, Waiter(message))

        elif function == EPublish:
            value, payload = _event_value(message.Int0()), _optional_descriptor(message, 1)
            waiters = server.take_waiters()
            # Complete the publish first, then hand the waits to a publisher thread: the loop
            # thread is free again at once, and the waits complete from that other thread.
            message.Complete(len(waiters))
            server.run_later("publish", 0.0, lambda: _deliver_all(waiters, value, payload))

        elif function == ECancelWait:
            # Symbian's cancel idiom: complete the outstanding request with KErrCancel, then the
            # cancel request itself. Cancelling when nothing is held is harmless.
            waiter = server.release(self)
            if waiter is not None:
                waiter.message.Complete(KErrCancel)
            message.Complete(KErrNone)

        elif function == EPublishAfter:
            delay_ms = message.Int0()
            if not 0 <= delay_ms <= MAX_DELAY_MS:
                raise IpcError(KErrArgument, f"delay must be 0..{MAX_DELAY_MS} ms, got {delay_ms}")
            value, payload = _event_value(message.Int1()), _optional_descriptor(message, 2)
            message.Complete(KErrNone)
            # The waits are taken when the timer fires, not now: a wait sent meanwhile gets it.
            server.run_later(
                "timer", delay_ms / 1000,
                lambda: _deliver_all(server.take_waiters(), value, payload),
            )

        elif function == EWaiterCount:
            message.Complete(server.waiter_count())

        else:
            raise IpcError(KErrNotSupported, f"notifier has no function {function}")

    def Disconnect(self, message: RMessage) -> None:
        # Complete what we still hold (a late completion for a closed session is dropped by the
        # kernel, so this is harmless), then the disconnect: the kernel frees the session.
        waiter = self.Server().release(self)
        if waiter is not None:
            waiter.message.Complete(KErrCancel)
        message.Complete(KErrNone)


class NotifierServer(CServer):
    name = "notifier"
    version = TVersion(1, 0, 0)
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


def _event_value(value: int) -> int:
    # Waiters complete with this value; a negative one would reach them as an error code.
    if value < 0:
        raise IpcError(KErrArgument, f"an event value must be >= 0, got {value}")
    return value


def _optional_descriptor(message: RMessage, index: int) -> bytes:
    """Descriptor argument `index`, or b"" if the client sent an int (or nothing) there."""
    try:
        return message.ReadL(index)
    except BadDescriptor:
        return b""
