"""The requests an ``async def ServiceL`` is still serving: which coroutine serves which message.
No I/O.

A ``ServiceL`` that returns an awaitable (an ``async def ServiceL``, or an interface's ``async
def`` method) has not served its request when it returns: the host runs the awaitable on its
asyncio loop (`Spawn`), on the loop thread, beside the loop's own work. `Coroutines` keeps which
message each one serves, so that the rules below hold on both data paths:

1. The client's cancel of a message cancels its coroutine (after the message has been ended for
   the client, before the session's ``Cancelled`` is told).
2. The session's end (``Disconnect``: the client closed it, or died) cancels all its coroutines,
   before ``Disconnect`` runs; the registration's end cancels every one.
3. A coroutine that raises (anything but its own cancellation) fails its message as a sync
   ``ServiceL`` that raised does: ``ServiceError``, then the error's code unless the message has
   been completed.
4. A coroutine that returns leaves its message as it is: completed, or held for later, as after a
   sync ``ServiceL``.

A cancellation reaches the coroutine at its next ``await`` (asyncio's rule), so its clean-up runs
after ``Cancelled`` or ``Disconnect`` has.
"""

from __future__ import annotations

from typing import Any, Protocol
from collections.abc import Awaitable, Callable

from .message import RMessage
from .plugin import CSession, service_failed

__all__ = ["Coroutines", "Running", "Spawn"]


class Running(Protocol):
    """A coroutine the host runs (an ``asyncio.Task``)."""

    def cancel(self) -> Any:
        """Ask it to stop at its next ``await``."""


# spawn(awaitable, done) runs `awaitable` and returns it as `Running`; once it has ended it calls
# done(exception or None, cancelled), on the loop thread, never before spawn has returned.
Spawn = Callable[[Awaitable[Any], Callable[[BaseException | None, bool], None]], Running]


class Coroutines:
    """The coroutines serving messages, by session (see the module's rules)."""

    def __init__(self, spawn: Spawn | None) -> None:
        self._spawn = spawn
        self._tasks: dict[RMessage, Running] = {}
        # the messages of each session, by id(session): a running coroutine holds its session,
        # so the id is not reused while it is here
        self._of_session: dict[int, set[RMessage]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, session: CSession, message: RMessage, awaitable: Awaitable[Any]) -> None:
        """Run `awaitable`, what ``session.ServiceL(message)`` returned, to serve `message`."""
        if self._spawn is None:
            _close(awaitable)
            raise TypeError(
                f"{type(session).__name__}.ServiceL returned an awaitable, and this server's "
                "host runs no asyncio loop"
            )

        def done(exc: BaseException | None, cancelled: bool) -> None:
            self._forget(session, message)
            if isinstance(exc, Exception) and not cancelled:
                service_failed(session, message, exc)

        self._tasks[message] = self._spawn(awaitable, done)
        self._of_session.setdefault(id(session), set()).add(message)

    def cancel(self, message: RMessage) -> None:
        """The client cancelled `message`: stop the coroutine serving it, if one is (rule 1)."""
        task = self._tasks.get(message)
        if task is not None:
            task.cancel()

    def session_ended(self, session: CSession) -> None:
        """`session` ended: stop every coroutine serving one of its messages (rule 2)."""
        for message in self._of_session.get(id(session), ()):
            self._tasks[message].cancel()

    def end(self) -> None:
        """The registration ended: stop them all."""
        for task in self._tasks.values():
            task.cancel()

    def _forget(self, session: CSession, message: RMessage) -> None:
        self._tasks.pop(message, None)
        messages = self._of_session.get(id(session))
        if messages is not None:
            messages.discard(message)
            if not messages:
                del self._of_session[id(session)]


def _close(awaitable: Awaitable[Any]) -> None:
    """Close a coroutine that will never run (no "never awaited" warning for it)."""
    close = getattr(awaitable, "close", None)
    if callable(close):
        close()
