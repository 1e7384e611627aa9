"""What each Python type of a typed interface becomes in a plain request, and back. Pure.

Theory of operation. A typed interface's operation is still one ``SendReceive``: a function
number, at most four arguments (each a 32-bit int or a descriptor) and a 32-bit completion
value. This module maps annotations onto that, one argument per parameter, in order:

* ``int`` is an int argument (32-bit signed); ``bool`` too (0 or 1);
* ``bytes`` is a read-only descriptor, as it is;
* ``bytearray`` is a writable descriptor: the caller's buffer (its length is the most the
  server may write), which the server method receives as a `Buffer` and may change;
* any other type that msgpack carries (``str``, ``float``, ``None``, ``list[...]``,
  ``tuple[...]``, ``dict[...]``, unions of them, ``Any``) is a read-only descriptor holding
  its msgpack encoding (`ipcfw.protocol.pack_value`).

``bytes | None`` and ``bytearray | None`` send None as the int 0 (Symbian's "no descriptor").
On the server, a descriptor parameter that got an int (or nothing) takes its default, if it
has one: a raw client may leave optional descriptors out.

The return value: ``None`` completes with 0; ``int`` (and ``bool``) completes with the value,
which must be 0..2**31-1 (a negative completion is an error code: raise ``IpcError`` for
errors). Anything else needs a channel back, so the client adds a writable descriptor after
the parameters (the *reply descriptor*, of the operation's ``reply`` bytes): ``bytes`` are
written into it as they are, any other value as msgpack, and the completion value is the
number of bytes written. A value longer than the caller's reply descriptor completes the
request with ``KErrOverflow`` and a message naming both sizes.

Checking. `Form.of` refuses an annotation it cannot carry, naming it, when the interface class
is created. `conform` checks a value against an annotation (and turns a msgpack list into the
tuple an annotation asks for); `Mismatch` says what was expected and what came.
"""

from __future__ import annotations

import enum
import types
import typing
from typing import Any, Union

from ..protocol import I32_MAX, I32_MIN

__all__ = ["Form", "Mismatch", "Buffer", "conform", "describe_type", "fits_int32", "NO_DEFAULT"]


class Form(enum.Enum):
    """How a parameter or a return value travels."""

    INT = "int"  # an int argument, or the completion value
    BOOL = "bool"  # as INT, 0 or 1
    BYTES = "bytes"  # a descriptor holding the bytes themselves
    BUFFER = "bytearray"  # a writable descriptor (parameters only)
    VALUE = "msgpack value"  # a descriptor holding the value's msgpack encoding
    NONE = "None"  # returns only: completes with 0

    @classmethod
    def of_parameter(cls, annotation: Any) -> tuple[Form, bool]:
        """The form of a parameter annotated `annotation`, and whether None may be passed (sent
        as the int 0). TypeError naming the annotation if it cannot be carried."""
        inner, optional = _without_none(annotation)
        if inner is bool:
            return (cls.BOOL, False) if not optional else (cls.VALUE, True)
        if inner is int and not optional:
            return cls.INT, False
        if inner is bytes:
            return cls.BYTES, optional
        if inner is bytearray:
            return cls.BUFFER, optional
        check_carried(annotation)
        return cls.VALUE, False

    @classmethod
    def of_return(cls, annotation: Any) -> Form:
        """The form of a return value annotated `annotation` (TypeError if it cannot be
        carried)."""
        if annotation is None or annotation is type(None):
            return cls.NONE
        if annotation is bool:
            return cls.BOOL
        if annotation is int:
            return cls.INT
        if annotation is bytes:
            return cls.BYTES
        check_carried(annotation)
        return cls.VALUE


class Buffer(bytearray):
    """A ``bytearray`` parameter as the server method receives it: the caller's content, and
    `max_length`, the most the caller's buffer holds. Whatever the method leaves in it is
    written back to the caller (``KErrOverflow`` if longer than `max_length`)."""

    max_length: int

    def __init__(self, content: bytes, max_length: int) -> None:
        super().__init__(content)
        self.max_length = max_length


class Mismatch(Exception):
    """A value does not match its annotation: `expected` and `got` say how."""

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(f"expected {expected}, got {got}")
        self.expected = expected
        self.got = got


NO_DEFAULT: Any = object()
"""The default of a parameter that has none."""

#: The leaf types a msgpack value may hold, and how an annotation names each.
_LEAVES: dict[Any, str] = {
    type(None): "None", bool: "bool", int: "int", float: "float", str: "str", bytes: "bytes",
}


def fits_int32(value: int) -> bool:
    return I32_MIN <= value <= I32_MAX


def _without_none(annotation: Any) -> tuple[Any, bool]:
    """(`annotation` without its None arm, whether it had one) for ``X | None``."""
    if _is_union(annotation):
        arms = [arm for arm in typing.get_args(annotation) if arm is not type(None)]
        if len(arms) == 1 and len(arms) < len(typing.get_args(annotation)):
            return arms[0], True
    return annotation, False


def _is_union(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin is Union or origin is types.UnionType


def check_carried(annotation: Any) -> None:
    """Raise TypeError naming the part of `annotation` msgpack cannot carry, if any."""
    if annotation is Any or annotation in _LEAVES or annotation is None:
        return
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if _is_union(annotation):
        for arm in args:
            check_carried(arm)
        return
    if origin in (list, dict, tuple) and args:
        for arg in args:
            if arg is not Ellipsis:
                check_carried(arg)
        return
    if annotation in (list, dict, tuple):
        return  # of anything
    raise TypeError(
        f"{describe_type(annotation)} cannot be carried: use int, bytes, bytearray, or a msgpack "
        f"value (None, bool, int, float, str, bytes, list, tuple, dict of those, or Any)"
    )


def describe_type(annotation: Any) -> str:
    """`annotation` as a user writes it: ``bytes``, ``list[str]``, ``int | None``."""
    if annotation is type(None) or annotation is None:
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    text = repr(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


def _describe_value(value: Any) -> str:
    if value is None or isinstance(value, (bool, int, float)):
        return f"{type(value).__name__} {value!r}"
    if isinstance(value, (bytes, bytearray, str)):
        shown = repr(value) if len(value) <= 20 else repr(value[:20])[:-1] + "..." + repr(value)[-1]
        return f"{type(value).__name__} {shown}"
    return type(value).__name__


def conform(annotation: Any, value: Any) -> Any:
    """`value` as `annotation` wants it, or Mismatch. Lists become tuples where a tuple is
    annotated (msgpack has only lists); a bytearray or memoryview becomes bytes where bytes are
    annotated; an int becomes a float where a float is; nothing else is converted."""
    if annotation is Any:
        return value
    if annotation is None or annotation is type(None):
        if value is None:
            return None
    elif annotation is bool or annotation is str:
        if type(value) is annotation:
            return value
    elif annotation is int:
        if type(value) is int:
            return value
    elif annotation is float:
        if type(value) in (float, int):
            return float(value)
    elif annotation is bytes:
        if type(value) in (bytes, bytearray, memoryview, Buffer):
            return bytes(value)
    elif _is_union(annotation):
        for arm in typing.get_args(annotation):
            try:
                return conform(arm, value)
            except Mismatch:
                pass
    else:
        return _conform_container(annotation, value)
    raise Mismatch(describe_type(annotation), _describe_value(value))


def _conform_container(annotation: Any, value: Any) -> Any:
    try:
        return _conform_items(annotation, value)
    except Mismatch as inner:
        if inner.expected == describe_type(annotation):
            raise
        raise Mismatch(describe_type(annotation),
                       f"{_describe_value(value)} holding {inner.got}") from None


def _conform_items(annotation: Any, value: Any) -> Any:
    origin = typing.get_origin(annotation) or annotation
    args = typing.get_args(annotation)
    expected = describe_type(annotation)
    if origin is list and type(value) in (list, tuple):
        return [conform(args[0], item) for item in value] if args else list(value)
    if origin is tuple and type(value) in (list, tuple):
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            return tuple(conform(args[0], item) for item in value) if args else tuple(value)
        if len(args) != len(value):
            raise Mismatch(expected, f"{len(value)} items")
        return tuple(conform(arg, item) for arg, item in zip(args, value))
    if origin is dict and type(value) is dict:
        if not args:
            return dict(value)
        return {conform(args[0], key): conform(args[1], item) for key, item in value.items()}
    raise Mismatch(expected, _describe_value(value))
