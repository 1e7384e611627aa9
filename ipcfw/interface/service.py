"""The server's side of a typed interface: `InterfaceSession`, whose ``ServiceL`` decodes each
request, calls the method of the operation's name and completes the message with what it
returns; and `Deferred`, a result a method gives later, from any thread.

A method may return its value (completed at once), a `Deferred` (completed when it is resolved,
the Symbian pattern of holding a message), or an awaitable (an ``async def`` method): then
``ServiceL`` returns a coroutine that awaits it and completes the message with its result, and
the host runs that coroutine on its asyncio loop, as it runs an ``async def ServiceL``
(ipcfw.server.coroutines: the client's cancel and the session's end cancel it). Raising, at
any of these points, completes the message as a raising ``ServiceL`` does (``ServiceError``).
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import threading
import typing
from collections.abc import Awaitable
from typing import Any, ClassVar, Generic, TypeVar

from .. import errors
from ..server import CSession, RMessage
from ..server.plugin import text_of
from .proxy import Interface
from .spec import Call, InterfaceSpec, OperationSpec

__all__ = ["InterfaceSession", "Deferred"]

log = logging.getLogger("ipcfw.server")

I = TypeVar("I", bound=Interface)  # noqa: E741
T = TypeVar("T")

# The request the running method serves: set around a plain method's call, and inside an async
# method's coroutine (its task's context), so each sees its own.
_serving: contextvars.ContextVar[RMessage] = contextvars.ContextVar("ipcfw_interface_message")


class InterfaceSession(CSession, Generic[I]):
    """A session that serves a typed interface: one method per operation, by name::

        class KvSession(InterfaceSession[KeyValue]):
            def get(self, key: bytes) -> bytes:
                return self.Server().store[key]

    ``ServiceL`` reads the request's arguments as the interface declares them, calls the
    method and completes the message with its return value. An unknown function number is
    refused with ``KErrNotSupported`` naming it and the interface's functions; an argument of
    the wrong kind with ``KErrArgument`` naming the parameter, what it expects and what came.
    Raise ``IpcError`` for errors, as in any ``ServiceL``.

    Methods may be ``def`` or ``async def`` and may return a `Deferred` to answer later. The
    class is checked when it is created: every operation needs a method, with the interface's
    parameter names (TypeError otherwise). To serve functions outside the interface too (a
    subsession's, say), override ``ServiceL`` and call ``super().ServiceL(message)`` for the
    others.
    """

    #: The interface served (from ``InterfaceSession[TheInterface]``).
    interface: ClassVar[InterfaceSpec]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in cls.__dict__.get("__orig_bases__", ()):
            if typing.get_origin(base) is InterfaceSession:
                (definition,) = typing.get_args(base)
                if not (isinstance(definition, type) and issubclass(definition, Interface)
                        and definition is not Interface):
                    raise TypeError(f"{cls.__name__}: InterfaceSession[...] takes an Interface "
                                    f"subclass, not {definition!r}")
                cls.interface = definition.interface
        if getattr(cls, "interface", None) is None:
            raise TypeError(f"{cls.__name__}: say which interface it serves: class "
                            f"{cls.__name__}(InterfaceSession[YourInterface])")
        _check_methods(cls)

    def ServiceL(self, message: RMessage) -> Awaitable[None] | None:
        """Serve one request: decode, call the method, complete with its result (for an
        ``async def`` method, return the coroutine that does, which the host runs)."""
        spec = self.interface.operation(message.Function())
        call = spec.arguments(message)
        token = _serving.set(message)
        try:
            result = getattr(self, spec.name)(*call.values)
        finally:
            _serving.reset(token)
        if isinstance(result, Deferred):
            result.attach(message, spec, call)
            return None
        if inspect.isawaitable(result):
            return _complete_when_done(message, spec, call, result)
        spec.complete(message, call, result)
        return None

    def Message(self) -> RMessage:
        """The request the calling method serves, as an ``RMessage``: its ``Client()`` (who is
        calling), ``SecureId()``, ``Panic()``. Only from inside an operation's method (plain or
        ``async def``, not from a thread it started); RuntimeError elsewhere."""
        try:
            return _serving.get()
        except LookupError:
            raise RuntimeError("Message() is only available inside an operation's method, while "
                               "it serves a request") from None


async def _complete_when_done(message: RMessage, spec: OperationSpec, call: Call,
                              result: Awaitable[Any]) -> None:
    _serving.set(message)  # (in this coroutine's task: the method's coroutine runs in it)
    spec.complete(message, call, await result)


def _check_methods(cls: type[InterfaceSession[Any]]) -> None:
    problems = []
    for name, spec in cls.interface.named.items():
        if hasattr(InterfaceSession, name):
            problems.append(f"operation {name!r} would replace InterfaceSession.{name}")
            continue
        method = getattr(cls, name, None)
        if not callable(method):
            problems.append(f"no method {name}() for operation {spec.number}")
            continue
        declared = [parameter.name for parameter in spec.parameters]
        try:
            implemented = list(inspect.signature(method).parameters)[1:]
        except (TypeError, ValueError):
            continue  # a callable without a signature: trust it
        if implemented != declared:
            problems.append(f"{name}() takes ({', '.join(implemented)}); the interface "
                            f"declares ({', '.join(declared)})")
    if problems:
        raise TypeError(f"{cls.__name__} does not implement {cls.interface.name!r}: "
                        + "; ".join(problems))


class Deferred(Generic[T]):
    """A result an interface method gives later: return one, keep it, and call `resolve`
    (or `fail`) once, from any thread::

        def wait_for_event(self) -> int:
            waiter = Deferred[int]()
            self.Server().waiters.append(waiter)
            return waiter               # the request stays outstanding

        # later, on any thread:
        waiter.resolve(7)               # the client's call returns 7

    Resolving completes the request as returning the value would have (``bytearray``
    parameters the method kept are written back then); `fail` completes it with an error code.
    A second `resolve` or `fail` raises RuntimeError; after the client cancelled or closed,
    both are harmless.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outcome: tuple[Any, errors.IpcError | None] | None = None
        self._target: tuple[RMessage, OperationSpec, Call] | None = None

    def attach(self, message: RMessage, spec: OperationSpec, call: Call) -> None:
        """Bind the request the deferred result answers (the framework calls this when the
        method returns it)."""
        with self._lock:
            if self._target is not None:
                raise RuntimeError(f"this Deferred already answers {self._target[1].title}; "
                                   f"return a new one for each request")
            self._target = (message, spec, call)
            outcome = self._outcome
        if outcome is not None:
            self._finish(*outcome)

    def resolve(self, value: T) -> None:
        """Answer with `value`, as the method's return value."""
        self._settle(value, None)

    def fail(self, error: errors.IpcError) -> None:
        """Answer with `error`: its code and its text reach the client, as when a method
        raises it."""
        if not isinstance(error, errors.IpcError):
            raise TypeError(f"fail() takes an IpcError, not {type(error).__name__}")
        self._settle(None, error)

    def done(self) -> bool:
        """True once resolved or failed."""
        return self._outcome is not None

    def _settle(self, value: Any, error: errors.IpcError | None) -> None:
        with self._lock:
            if self._outcome is not None:
                raise RuntimeError("this Deferred was resolved or failed already")
            self._outcome = (value, error)
            attached = self._target is not None
        if attached:
            self._finish(value, error)

    def _finish(self, value: Any, error: errors.IpcError | None) -> None:
        assert self._target is not None
        message, spec, call = self._target
        if error is None:
            try:
                spec.complete(message, call, value)
                return
            except errors.IpcError as exc:  # a write that does not fit the caller's buffer
                log.info("%s: %s", spec.title, exc)
                error = exc
            except Exception as exc:  # a value the interface does not allow: the server's bug
                log.error("%s: Deferred.resolve was given a value the interface does not allow",
                          spec.title, exc_info=True)
                message.Complete(errors.IpcError(
                    errors.KErrGeneral, text_of(exc, f"Deferred.resolve ({spec.title})", None)))
                raise
        message.Complete(error)  # (its code and text, as a raising method's)

    def __repr__(self) -> str:
        state = "done" if self._outcome is not None else "pending"
        target = f" for {self._target[1].title}" if self._target is not None else ""
        return f"<Deferred{target} {state}>"
