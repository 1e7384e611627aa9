"""A typed interface's definition and its client proxy: `Interface`, `operation`, and what an
operation is on a proxy (`BoundOperation`) and what it returns when sent (`Reply`).

An interface class is both: its class body declares the operations (with `operation`, read by
`ipcfw.interface.spec` when the class is created), and an instance of it is a proxy over one
`RSession`, whose operations are methods that send plain requests. mypy sees each operation
with its declared parameters and return type, through `Operation`'s generic parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, ClassVar, Concatenate, Generic, ParamSpec, TypeVar, overload

from ..client import RSession, TRequestStatus
from ..version import TVersion, to_version
from .spec import DEFAULT_REPLY, InterfaceSpec, OperationSpec, build_interface, build_operation

__all__ = ["Interface", "operation", "Operation", "BoundOperation", "Reply"]

P = ParamSpec("P")
R = TypeVar("R")
I = TypeVar("I", bound="Interface")  # noqa: E741


def operation(number: int, *, reply: int = DEFAULT_REPLY
              ) -> Callable[[Callable[Concatenate[Any, P], R]], Operation[P, R]]:
    """Declare an operation of an `Interface`, with its function number::

        class KeyValue(Interface, name="kv", version=(1, 0, 0)):
            @operation(2, reply=65536)
            def get(self, key: bytes) -> bytes: ...

    The method's annotations say how each parameter and the return value travel (see
    docs/interfaces.md); its body is never run. `reply` is the size in bytes of the writable
    descriptor the proxy adds for a return value other than None, int or bool: the most the
    server may answer (``KErrOverflow`` beyond).
    """

    def declare(function: Callable[Concatenate[Any, P], R]) -> Operation[P, R]:
        return Operation(number, function, reply)

    return declare


class Operation(Generic[P, R]):
    """An operation declared in an interface class (what `operation` returns).

    On the class (``KeyValue.get``) it is this declaration, with its `spec` once the class
    exists; on a proxy (``kv.get``) a `BoundOperation` that sends it.
    """

    def __init__(self, number: int, function: Callable[Concatenate[Any, P], R], reply: int
                 ) -> None:
        self.number = number
        self.function = function
        self.reply = reply
        self.__doc__ = function.__doc__
        self.spec: OperationSpec | None = None  # set by the interface class

    @overload
    def __get__(self, proxy: None, owner: type) -> Operation[P, R]: ...

    @overload
    def __get__(self, proxy: Interface, owner: type) -> BoundOperation[P, R]: ...

    def __get__(self, proxy: Interface | None, owner: type
                ) -> Operation[P, R] | BoundOperation[P, R]:
        if proxy is None:
            return self
        name = self.function.__name__
        spec = type(proxy).interface.named[name]
        bound: BoundOperation[P, R] = BoundOperation(proxy.session, spec)
        vars(proxy)[name] = bound  # found there from now on, without this call
        return bound

    def __repr__(self) -> str:
        return repr(self.spec) if self.spec is not None else f"<operation {self.number}>"


class BoundOperation(Generic[P, R]):
    """An operation of a connected proxy: call it, `send` it, or await `call_async`.

    * ``kv.get(b"colour")`` sends the request and waits for its answer (synchronous);
    * ``kv.get.send(b"colour")`` sends it and returns a `Reply` at once (asynchronous; it takes
      a message slot until the server answers);
    * ``await kv.get.call_async(b"colour")`` sends it and awaits the answer.

    Arguments are checked before anything is sent: TypeError or ValueError naming the
    parameter. A negative completion raises its ``IpcError`` as ``SendReceive`` does.
    """

    __slots__ = ("session", "spec")

    def __init__(self, session: RSession, spec: OperationSpec) -> None:
        self.session = session
        self.spec = spec

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        wire, reply = self.spec.request(args, kwargs)
        value = self.session.SendReceive(self.spec.number, wire)
        result: R = self.spec.result(value, reply)
        return result

    def send(self, *args: P.args, **kwargs: P.kwargs) -> Reply[R]:
        """Send the request and return at once; the `Reply` gives the answer later."""
        wire, reply = self.spec.request(args, kwargs)
        status = TRequestStatus()
        self.session.SendReceive(self.spec.number, wire, status)
        return Reply(status, self.spec, reply)

    async def call_async(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Send the request and await its answer."""
        return await self.send(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.spec!r} on {self.session!r}>"


class Reply(Generic[R]):
    """The answer to come of an operation sent with ``send``.

    `status` is its `TRequestStatus` (for ``User.WaitForRequest``, ``Int()``, ``Cancel()``);
    `result(timeout)` waits and returns the operation's value (or raises its ``IpcError``),
    and ``await reply`` does the same in a coroutine.
    """

    __slots__ = ("status", "spec", "reply")

    def __init__(self, status: TRequestStatus, spec: OperationSpec, reply: bytearray | None
                 ) -> None:
        self.status = status
        self.spec = spec
        self.reply = reply

    def done(self) -> bool:
        """True once the server has answered (or the request failed)."""
        return self.status.done()

    def result(self, timeout: float | None = None) -> R:
        """The operation's value; raises its ``IpcError``, or TimeoutError after `timeout`
        seconds (the request stays outstanding)."""
        value: R = self.spec.result(self.status.result(timeout), self.reply)
        return value

    def __await__(self) -> Generator[Any, None, R]:
        value = yield from self.status.__await__()
        result: R = self.spec.result(value, self.reply)
        return result

    def __repr__(self) -> str:
        return f"<Reply of {self.spec.title} {self.status!r}>"


class Interface:
    """The base of a typed interface: a server's name, version and operations, in one class::

        class KeyValue(Interface, name="kv", version=(1, 0, 0)):
            @operation(1)
            def put(self, key: bytes, value: bytes) -> None: ...

            @operation(2)
            def get(self, key: bytes) -> bytes: ...

    The class is checked when it is created (TypeError for two operations with one number, a
    missing annotation, a type that cannot be carried, more than four arguments). An instance
    is a proxy over one session: ``kv = KeyValue.connect()``, then ``kv.get(b"colour")``. A
    server implements it with ``InterfaceSession[KeyValue]``.

    A subclass may add operations (a later version of the interface) and keeps the name,
    unless it gives another.
    """

    #: The interface's name, version and operations (set for each subclass).
    interface: ClassVar[InterfaceSpec]

    def __init_subclass__(cls, *, name: str | None = None,
                          version: tuple[int, ...] | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        inherited = getattr(cls, "interface", None)
        if name is None:
            if inherited is None:
                raise TypeError(f"{cls.__name__}: an interface needs a name: class "
                                f"{cls.__name__}(Interface, name=..., version=(1, 0, 0))")
            name = inherited.name
        if version is None:
            version = inherited.version if inherited is not None else TVersion(1, 0, 0)
        declared = [
            (attribute, value) for attribute in dir(cls)
            if isinstance(value := getattr(cls, attribute, None), Operation)
        ]
        specs = []
        for attribute, declaration in declared:
            if attribute != declaration.function.__name__:
                raise TypeError(f"{cls.__name__}.{attribute}: an operation's attribute must "
                                f"be its method's name ({declaration.function.__name__})")
            specs.append(build_operation(name, declaration.number, declaration.function,
                                         declaration.reply))
        try:
            cls.interface = build_interface(name, to_version(version), specs)
        except ValueError as exc:
            raise TypeError(f"{cls.__name__}: {exc}") from None
        for attribute, declaration in declared:
            if attribute in vars(cls):
                declaration.spec = cls.interface.named[attribute]

    def __init__(self, session: RSession) -> None:
        """A proxy over `session`, a connected ``RSession`` to a server of this interface."""
        self.session = session

    @classmethod
    def connect(cls: type[I], message_slots: int = -1, *, endpoint: str | None = None,
                timeout: float | None = None, path: str | None = None,
                wait: float | None = None) -> I:
        """Connect to the server of this interface's name, asking for its version, and return
        a proxy; the options and errors are ``RSession.connect``'s (``NotFound``,
        ``NotSupported`` for a server too old; with `wait`, first wait that many seconds for
        the kernel and the server)."""
        spec = cls.interface
        session = RSession.connect(spec.name, spec.version, message_slots, endpoint=endpoint,
                                   timeout=timeout, path=path, wait=wait)
        return cls(session)

    @classmethod
    async def connect_async(cls: type[I], message_slots: int = -1, *,
                            endpoint: str | None = None, timeout: float | None = None,
                            path: str | None = None, wait: float | None = None) -> I:
        """`connect` for a coroutine (``RSession.connect_async``): the loop is not blocked
        while the kernel and the server answer."""
        spec = cls.interface
        session = await RSession.connect_async(spec.name, spec.version, message_slots,
                                               endpoint=endpoint, timeout=timeout, path=path,
                                               wait=wait)
        return cls(session)

    def Close(self) -> None:
        """Close the session (``RSession.Close``)."""
        self.session.Close()

    def __enter__(self: I) -> I:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.Close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} proxy on {self.session!r}>"
