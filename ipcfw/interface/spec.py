"""An interface's operations, checked when the interface class is created, and how one call of
an operation maps onto one plain request and back, on both sides. Pure.

`OperationSpec` is one operation: its function number, its parameters (each with its `Form`
and argument index, see `ipcfw.interface.codec`), its return and the reply descriptor's size.
Its four methods are the whole mapping:

* client: `request` (the call's arguments -> the request's arguments, and the reply buffer),
  `result` (the completion value and the reply buffer -> the returned value);
* server: `arguments` (an ``RMessage`` -> the method's arguments, or ``KErrArgument`` naming
  the parameter), `complete` (the method's return -> writes and the completion).

`InterfaceSpec` is an interface: its name, version and operations, looked up by number
(``KErrNotSupported`` naming the function and the ones there are) or by name.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, Protocol

from .. import errors
from ..naming import name_problem
from ..protocol import ERROR_STRING_FUNCTION, I32_MAX, ProtocolError, pack_value, unpack_value
from ..version import TVersion
from .codec import NO_DEFAULT, Buffer, Form, Mismatch, conform, describe_type, fits_int32

__all__ = [
    "DEFAULT_REPLY", "RESERVED", "MAX_ARGS", "Parameter", "OperationSpec", "InterfaceSpec",
    "Call", "MessageLike", "build_operation", "build_interface",
]

#: The reply descriptor's size when an operation does not say (``operation(n, reply=...)``).
DEFAULT_REPLY = 4096
#: Names an operation may not take: the proxy's own attributes.
RESERVED = frozenset({"interface", "session", "connect", "Close"})
#: The most arguments a request carries (Symbian's ``TIpcArgs``).
MAX_ARGS = 4


class MessageLike(Protocol):
    """What the server side reads from a request: an ``RMessage``."""

    def Function(self) -> int: ...
    def Int0(self) -> int: ...
    def Int1(self) -> int: ...
    def Int2(self) -> int: ...
    def Int3(self) -> int: ...
    def GetDesMaxLength(self, index: int) -> int: ...
    def ReadL(self, index: int, offset: int = 0) -> bytes: ...
    def WriteL(self, index: int, data: bytes, offset: int = 0) -> None: ...
    def Complete(self, value: int) -> None: ...


class Parameter(NamedTuple):
    """One parameter: its `argument` index, `form`, whether None may be passed (`optional`),
    and its `default` (`NO_DEFAULT` if it has none)."""

    name: str
    argument: int
    annotation: Any
    form: Form
    optional: bool
    default: Any

    def where(self, title: str) -> str:
        return f"{title}: parameter {self.name!r} (argument {self.argument})"


class Call(NamedTuple):
    """A request decoded on the server: the method's arguments, and each writable descriptor's
    `Buffer` with the content it arrived with (written back if the method changed it)."""

    values: list[Any]
    buffers: list[tuple[Parameter, Buffer, bytes]]


class OperationSpec:
    """One operation of an interface (see the module docstring)."""

    def __init__(self, interface: str, number: int, name: str, parameters: list[Parameter],
                 returns: Any, reply: int, signature: inspect.Signature) -> None:
        self.interface = interface
        self.number = number
        self.name = name
        self.parameters = parameters
        self.returns = returns
        self.return_form = Form.of_return(returns)
        self.reply = reply
        #: The argument index of the reply descriptor; None when the completion value suffices.
        self.reply_index: int | None = (
            len(parameters) if self.return_form in (Form.BYTES, Form.VALUE) else None
        )
        self.signature = signature
        # Every parameter may be passed by position: a call with all of them so needs no binding.
        self.positional = all(
            p.kind is p.POSITIONAL_OR_KEYWORD for p in signature.parameters.values()
        )

    @property
    def title(self) -> str:
        """``interface.operation``, as messages name it."""
        return f"{self.interface}.{self.name}"

    def __repr__(self) -> str:
        return f"<operation {self.number} {self.title}{self.signature}>"

    # -- the client's side ---------------------------------------------------------------------

    def request(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]
                ) -> tuple[tuple[int | bytes | bytearray, ...], bytearray | None]:
        """The request's arguments for a call with `args` and `kwargs`, and the reply buffer
        (None if the operation has none). TypeError or ValueError naming the parameter."""
        if kwargs or len(args) != len(self.parameters) or not self.positional:
            try:
                bound = self.signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{self.title}(): {exc}") from None
            bound.apply_defaults()
            args = tuple(bound.arguments[parameter.name] for parameter in self.parameters)
        wire: list[int | bytes | bytearray] = [
            self._argument(parameter, value) for parameter, value in zip(self.parameters, args)
        ]
        reply = None
        if self.reply_index is not None:
            reply = bytearray(self.reply)
            wire.append(reply)
        return tuple(wire), reply

    def _argument(self, parameter: Parameter, value: Any) -> int | bytes | bytearray:
        form = parameter.form
        if form is Form.BYTES and type(value) is bytes:  # (the common case, first)
            return value
        if value is None and parameter.optional:
            return 0
        if form is Form.BUFFER:
            if isinstance(value, bytearray):
                return value
        elif form is Form.BOOL:
            if type(value) is bool:
                return int(value)
        elif form is Form.INT:
            if type(value) is int:
                if not fits_int32(value):
                    raise ValueError(f"{parameter.where(self.title + '()')}: {value} does not "
                                     f"fit in a 32-bit signed int")
                return value
        else:
            try:
                conformed = conform(parameter.annotation, value)
            except Mismatch as exc:
                raise TypeError(f"{parameter.where(self.title + '()')}: {exc}") from None
            return conformed if form is Form.BYTES else pack_value(conformed)
        raise TypeError(f"{parameter.where(self.title + '()')}: expected "
                        f"{describe_type(parameter.annotation)}, got {type(value).__name__}")

    def result(self, value: int, reply: bytearray | None) -> Any:
        """What the call returns, from the completion `value` (>= 0) and the reply buffer."""
        form = self.return_form
        if form is Form.NONE:
            return None
        if form is Form.INT:
            return value
        if form is Form.BOOL:
            return bool(value)
        assert reply is not None
        if form is Form.BYTES:
            return bytes(reply)
        try:
            return conform(self.returns, unpack_value(bytes(reply)))
        except (Mismatch, ProtocolError) as exc:
            raise TypeError(
                f"{self.title} answered what its interface does not say ({exc}): are the "
                f"client's and the server's definitions of {self.interface!r} the same?"
            ) from None

    # -- the server's side ---------------------------------------------------------------------

    def arguments(self, message: MessageLike) -> Call:
        """The method's arguments, read from `message`; ``IpcError(KErrArgument)`` naming the
        parameter, what it expects and what came."""
        values: list[Any] = []
        buffers: list[tuple[Parameter, Buffer, bytes]] = []
        for parameter in self.parameters:
            value = self._read(message, parameter)
            if type(value) is Buffer:
                buffers.append((parameter, value, bytes(value)))
            values.append(value)
        if self.reply_index is not None and _max_length(message, self.reply_index) is None:
            raise errors.IpcError(
                errors.KErrArgument,
                f"{self.title}: argument {self.reply_index} must be a writable descriptor for "
                f"the reply ({describe_type(self.returns)}), got an int",
            )
        return Call(values, buffers)

    def _read(self, message: MessageLike, parameter: Parameter) -> Any:
        index, form = parameter.argument, parameter.form
        if form is Form.INT or form is Form.BOOL:
            try:
                value = _int(message, index)
            except errors.IpcError:  # (only a descriptor raises: no exception on the way)
                raise _bad(self.title, parameter, "a descriptor") from None
            if form is Form.BOOL:
                if value not in (0, 1):
                    raise _bad(self.title, parameter, f"the int {value}")
                return bool(value)
            return value
        max_length = _max_length(message, index)
        if max_length is None:  # an int where a descriptor belongs: not sent, or None
            if parameter.optional:
                return None
            if parameter.default is not NO_DEFAULT:
                return parameter.default
            raise _bad(self.title, parameter, f"the int {_int(message, index)}")
        data = message.ReadL(index)
        if form is Form.BYTES:
            return data
        if form is Form.BUFFER:
            return Buffer(data, max_length)
        try:
            return conform(parameter.annotation, unpack_value(data))
        except ProtocolError as exc:
            raise _bad(self.title, parameter, f"bytes that are no msgpack value ({exc})") from None
        except Mismatch as exc:
            raise _bad(self.title, parameter, exc.got) from None

    def complete(self, message: MessageLike, call: Call, value: Any) -> None:
        """Write back the changed buffers and the reply, then complete `message` with the
        method's return `value`. TypeError or ValueError if `value` is not what the interface
        says (a bug in the server); ``KErrOverflow`` if a write does not fit the caller's
        descriptor."""
        completion = self._completion(value)
        for parameter, buffer, original in call.buffers:
            if bytes(buffer) != original:
                if len(buffer) > buffer.max_length:
                    raise errors.IpcError(
                        errors.KErrOverflow,
                        f"{parameter.where(self.title)}: the server left {len(buffer)} bytes "
                        f"in a bytearray of at most {buffer.max_length}",
                    )
                message.WriteL(parameter.argument, bytes(buffer))
        if isinstance(completion, bytes):
            assert self.reply_index is not None
            limit = message.GetDesMaxLength(self.reply_index)
            if len(completion) > limit:
                raise errors.IpcError(
                    errors.KErrOverflow,
                    f"{self.title}: the reply is {len(completion)} bytes, over the caller's "
                    f"{limit}-byte reply descriptor (the proxy's size is operation("
                    f"{self.number}, reply={self.reply}))",
                )
            message.WriteL(self.reply_index, completion)
            message.Complete(len(completion))
        else:
            message.Complete(completion)

    def _completion(self, value: Any) -> int | bytes:
        """The completion value, or the bytes for the reply descriptor."""
        form = self.return_form
        if type(value) is int and form is Form.INT and 0 <= value <= I32_MAX:
            return value  # (the common cases, first)
        if type(value) is bytes and form is Form.BYTES:
            return value
        try:
            conformed = conform(self.returns, value)
        except Mismatch as exc:
            raise TypeError(f"{self.title} returned {exc.got}; its interface says "
                            f"{exc.expected}") from None
        if form is Form.NONE:
            return 0
        if form is Form.BOOL:
            return int(conformed)
        if form is Form.INT:
            if not 0 <= conformed <= I32_MAX:
                raise ValueError(
                    f"{self.title} returned {conformed}: an int result must be 0..2**31-1 "
                    f"(raise IpcError for an error)"
                )
            return int(conformed)
        if form is Form.BYTES:
            return bytes(conformed)
        return pack_value(conformed)


class InterfaceSpec(NamedTuple):
    """An interface: its `name` (the server's name), `version`, and its operations by number
    and by name."""

    name: str
    version: TVersion
    operations: dict[int, OperationSpec]
    named: dict[str, OperationSpec]

    def operation(self, number: int) -> OperationSpec:
        """The operation with function `number`; ``IpcError(KErrNotSupported)`` naming it and
        the functions the interface has."""
        spec = self.operations.get(number)
        if spec is None:
            known = ", ".join(f"{n} {op.name}" for n, op in sorted(self.operations.items()))
            raise errors.IpcError(
                errors.KErrNotSupported,
                f"interface {self.name!r} {'.'.join(map(str, self.version))} has no function "
                f"{number} (it has: {known or 'none'})",
            )
        return spec


def build_operation(interface: str, number: int, function: Callable[..., Any],
                    reply: int = DEFAULT_REPLY) -> OperationSpec:
    """The operation `function` declares (``def name(self, param: type, ...) -> type``), or
    TypeError naming what is wrong with it."""
    name = getattr(function, "__name__", repr(function))
    title = f"{interface}.{name}"
    if type(number) is not int or not 0 <= number < ERROR_STRING_FUNCTION:
        raise TypeError(f"{title}: the function number must be an int "
                        f"0..{ERROR_STRING_FUNCTION - 1}, got {number!r}")
    if type(reply) is not int or reply < 1:
        raise TypeError(f"{title}: reply must be a positive number of bytes, got {reply!r}")
    if name.startswith("_") or name in RESERVED:
        raise TypeError(f"{title}: an operation may not be called {name!r} (reserved: "
                        f"{', '.join(sorted(RESERVED))}, and names starting with '_')")
    if inspect.iscoroutinefunction(function):
        raise TypeError(f"{title}: declare operations with def; a server may implement them "
                        f"with async def")
    try:
        hints = typing.get_type_hints(function)
    except Exception as exc:
        raise TypeError(f"{title}: its annotations cannot be read ({type(exc).__name__}: "
                        f"{exc})") from None
    signature = inspect.signature(function)
    listed = list(signature.parameters.values())[1:]  # without self
    parameters = []
    for index, param in enumerate(listed):
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise TypeError(f"{title}: parameter {param.name!r} is {param.kind.description}; "
                            f"operations take named parameters only")
        if param.name not in hints:
            raise TypeError(f"{title}: parameter {param.name!r} has no annotation (int, bytes, "
                            f"bytearray or a msgpack value type)")
        try:
            form, optional = Form.of_parameter(hints[param.name])
        except TypeError as exc:
            raise TypeError(f"{title}: parameter {param.name!r}: {exc}") from None
        default = NO_DEFAULT if param.default is param.empty else param.default
        parameters.append(Parameter(param.name, index, hints[param.name], form, optional, default))
    if "return" not in hints:
        raise TypeError(f"{title}: no return annotation (-> None, int, bytes or a msgpack value "
                        f"type)")
    try:
        spec = OperationSpec(interface, number, name, parameters, hints["return"], reply,
                             signature.replace(parameters=listed))
    except TypeError as exc:
        raise TypeError(f"{title}: the return type: {exc}") from None
    used = len(parameters) + (spec.reply_index is not None)
    if used > MAX_ARGS:
        raise TypeError(
            f"{title}: {used} arguments ({len(parameters)} parameters"
            f"{' and the reply descriptor' if spec.reply_index is not None else ''}); a request "
            f"carries at most {MAX_ARGS}: put several values in one msgpack parameter"
        )
    return spec


def build_interface(name: str, version: TVersion, operations: Iterable[OperationSpec]
                    ) -> InterfaceSpec:
    """The interface of `operations` (a later one replaces an earlier one of the same name, as
    a subclass's method does); TypeError for a bad name or two operations with one number."""
    problem = name_problem(name)
    if problem is not None:
        raise TypeError(f"interface name {name!r}: {problem}")
    by_name = {spec.name: spec for spec in operations}
    by_number: dict[int, OperationSpec] = {}
    for spec in by_name.values():
        other = by_number.setdefault(spec.number, spec)
        if other is not spec:
            raise TypeError(f"interface {name!r}: {other.name} and {spec.name} both have "
                            f"function number {spec.number}")
    return InterfaceSpec(name, version, dict(sorted(by_number.items())), by_name)


def _max_length(message: MessageLike, index: int) -> int | None:
    """Argument `index`'s max length, or None if it is an int (or was not sent)."""
    try:
        return message.GetDesMaxLength(index)
    except errors.IpcError as exc:
        if exc.code == errors.KErrBadDescriptor:
            return None
        raise


def _int(message: MessageLike, index: int) -> int:
    read: Callable[[], int] = getattr(message, _INT_READERS[index])
    return read()


_INT_READERS = ("Int0", "Int1", "Int2", "Int3")


def _bad(title: str, parameter: Parameter, got: str) -> errors.IpcError:
    return errors.IpcError(
        errors.KErrArgument,
        f"{parameter.where(title)} expects {describe_type(parameter.annotation)}, got {got}",
    )
