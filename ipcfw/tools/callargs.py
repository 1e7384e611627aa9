"""``ipcfw call``'s words: its command-line arguments turned into a request's, and what came back
turned into what it prints. Pure: ``ipcfw.tools.call`` does the connecting and the sending.

A raw request's arguments (at most four, as ``TIpcArgs``) are written

* ``42``, ``-1``, ``0x2a``: a 32-bit signed int;
* ``b:68656c6c6f``: a read-only descriptor of those bytes (hex, spaces and ``_`` allowed);
* ``s:hello``: a read-only descriptor of the UTF-8 encoding of the text;
* ``out:16``: a writable descriptor of at most 16 bytes, whose content the command prints.

An operation of a typed interface (``--interface module:Class``, docs/interfaces.md) takes one
word per parameter, read by the parameter's type: an ``int`` as above; a ``bool`` as ``true``,
``false``, ``1`` or ``0``; ``bytes`` as ``b:HEX`` or ``s:TEXT``; a ``bytearray`` as ``out:N``; a
``str`` as the word itself; any other msgpack value as JSON (``'["a", 1]'``, ``null``).

What the command prints is one `Outcome` dict, the same for ``--json`` (as it is) and for
people (`format_outcome`): ``{"value": 5, "out": [...]}`` for a raw request, ``{"returned":
...}`` for an operation, ``{"error": {...}}`` for an error completion, ``{"panic": {...}}``
when the client was panicked. Bytes are shown as
``{"bytes": N, "hex": "...", "text": "..."}`` (``text`` only when they are printable UTF-8).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .. import errors
from ..interface.codec import NO_DEFAULT, Form, describe_type
from ..interface.spec import MAX_ARGS, OperationSpec
from ..protocol import I32_MAX, I32_MIN, MAX_FRAME
from ..version import TVersion, to_version

__all__ = [
    "MAX_OUT", "BadArgument", "Arg", "Outcome", "parse_argument", "parse_arguments",
    "parse_function", "parse_version", "operation_arguments", "parse_int", "show_bytes", "jsonable",
    "request_outcome", "operation_outcome", "error_outcome", "panic_outcome", "failed",
    "format_outcome",
]

MAX_OUT = MAX_FRAME
"""The largest ``out:N`` buffer, in bytes."""

Arg = int | bytes | bytearray
Outcome = dict[str, Any]

_SYNTAX = "an int, b:HEX, s:TEXT or out:N"


class BadArgument(ValueError):
    """A word of the command line that cannot become a request's argument; the message names
    it (its position or parameter, the word, and what was expected)."""


# -- the request ----------------------------------------------------------------------------------


def parse_int(word: str, what: str) -> int:
    """`word` as a 32-bit signed int (decimal, or 0x/0o/0b); BadArgument naming `what`."""
    try:
        value = int(word, 0)
    except ValueError:
        raise BadArgument(f"{what} {word!r}: expected {_SYNTAX}") from None
    if not I32_MIN <= value <= I32_MAX:
        raise BadArgument(f"{what} {word!r}: {value} does not fit in a 32-bit signed int")
    return value


def _parse_bytes(word: str, what: str) -> bytes | None:
    """`word`'s bytes if it is ``b:HEX`` or ``s:TEXT``; None if it is neither."""
    if word.startswith("b:"):
        digits = word[2:].replace(" ", "").replace("_", "")
        try:
            return bytes.fromhex(digits)
        except ValueError:
            raise BadArgument(f"{what} {word!r}: b: takes an even number of hex digits "
                              f"(e.g. b:00ff)") from None
    if word.startswith("s:"):
        return word[2:].encode("utf-8", errors="surrogateescape")
    return None


def _parse_out(word: str, what: str) -> bytearray | None:
    """A writable buffer of N bytes if `word` is ``out:N``; None if it is not."""
    if not word.startswith("out:"):
        return None
    size = word[4:]
    if not size.isdigit() or int(size) > MAX_OUT:
        raise BadArgument(f"{what} {word!r}: out: takes a size in bytes, 0..{MAX_OUT} "
                          f"(e.g. out:64)")
    return bytearray(int(size))


def parse_argument(word: str, index: int) -> Arg:
    """Request argument `index` (0-3) from its word: see the module docstring."""
    what = f"argument {index}"
    data = _parse_bytes(word, what)
    if data is not None:
        return data
    out = _parse_out(word, what)
    if out is not None:
        return out
    return parse_int(word, what)


def parse_arguments(words: Sequence[str]) -> tuple[Arg, ...]:
    """A raw request's arguments (at most four) from their words."""
    if len(words) > MAX_ARGS:
        raise BadArgument(f"{len(words)} arguments given; a request carries at most {MAX_ARGS}")
    return tuple(parse_argument(word, index) for index, word in enumerate(words))


def parse_function(word: str) -> int:
    """A raw request's function number, 0..2**31-2 (the last is the ErrorString request's)."""
    try:
        value = int(word, 0)
    except ValueError:
        raise BadArgument(f"function {word!r}: expected a function number (or, with "
                          f"--interface, an operation's name)") from None
    if not 0 <= value < I32_MAX:
        raise BadArgument(f"function {word!r}: a function number is 0..{I32_MAX - 1}")
    return value


def parse_version(word: str) -> TVersion:
    """``--version X.Y.Z`` (or ``X.Y``) as a TVersion."""
    try:
        return to_version(tuple(int(part) for part in word.split(".")), "--version")
    except ValueError as exc:
        if "must have" in str(exc):
            raise BadArgument(str(exc)) from None
        raise BadArgument(f"--version {word!r}: expected MAJOR.MINOR.BUILD, e.g. 1.0.0") from None
    except TypeError:
        raise BadArgument(f"--version {word!r}: expected MAJOR.MINOR.BUILD, e.g. 1.0.0") from None


def operation_arguments(spec: OperationSpec, words: Sequence[str]) -> list[Any]:
    """The Python arguments of a call of `spec`, one per word, read by each parameter's type
    (see the module docstring). Whether they fit the types is `OperationSpec.request`'s to say
    (the caller turns its TypeError and ValueError into BadArgument)."""
    parameters = spec.parameters
    required = sum(1 for p in parameters if p.default is NO_DEFAULT and not p.optional)
    if not required <= len(words) <= len(parameters):
        names = " ".join(p.name for p in parameters) or "none"
        count = str(len(parameters)) if required == len(parameters) else \
            f"{required} to {len(parameters)}"
        raise BadArgument(f"{spec.title} takes {count} argument"
                          f"{'' if count == '1' else 's'} ({names}), got {len(words)}")
    return [_operation_argument(spec, parameter, word)
            for parameter, word in zip(parameters, words)]


def _operation_argument(spec: OperationSpec, parameter: Any, word: str) -> Any:
    what = parameter.where(spec.title)
    form = parameter.form
    if form is Form.INT:
        return parse_int(word, what)
    if form is Form.BOOL:
        lowered = word.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise BadArgument(f"{what} {word!r}: expected true or false")
        return lowered in ("true", "1")
    if form is Form.BYTES:
        data = _parse_bytes(word, what)
        if data is None:
            raise BadArgument(f"{what} {word!r}: expected bytes, as b:HEX or s:TEXT")
        return data
    if form is Form.BUFFER:
        out = _parse_out(word, what)
        if out is None:
            raise BadArgument(f"{what} {word!r}: expected a writable buffer, as out:N")
        return out
    if parameter.annotation is str:
        return word
    try:
        return json.loads(word)
    except ValueError:
        raise BadArgument(f"{what} {word!r}: expected {describe_type(parameter.annotation)} "
                          f"as JSON (e.g. '\"text\"', 3, null, '[1, 2]')") from None


# -- what came back -------------------------------------------------------------------------------


def show_bytes(data: bytes) -> dict[str, Any]:
    """`data` for people and for JSON: its length, its hex, and its text if it is printable."""
    shown: dict[str, Any] = {"bytes": len(data), "hex": data.hex()}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return shown
    if text.isprintable():
        shown["text"] = text
    return shown


def jsonable(value: Any) -> Any:
    """`value` (an operation's return: None, bool, int, float, str, bytes, and lists, tuples
    and dicts of them) with its bytes shown by `show_bytes` and its dict keys as text."""
    if isinstance(value, (bytes, bytearray)):
        return show_bytes(bytes(value))
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, dict):
        return {key if isinstance(key, str) else json.dumps(jsonable(key)): jsonable(item)
                for key, item in value.items()}
    return value


def _outs(args: Sequence[Any], names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    return [
        {"argument": index, **({"name": names[index]} if names else {}),
         **show_bytes(bytes(arg))}
        for index, arg in enumerate(args) if isinstance(arg, bytearray)
    ]


def request_outcome(value: int, args: Sequence[Arg]) -> Outcome:
    """A raw request that completed with `value` (>= 0): the value, and what each writable
    argument holds now."""
    return {"value": value, "out": _outs(args)}


def operation_outcome(spec: OperationSpec, returned: Any, args: Sequence[Any]) -> Outcome:
    """An operation of `spec` that returned `returned`: it, and what each ``bytearray``
    parameter holds now (`args`: the call's arguments, in the parameters' order)."""
    names = [p.name for p in spec.parameters]
    return {"operation": spec.title, "returns": spec.return_form.value,
            "returned": jsonable(returned), "out": _outs(args[:len(names)], names)}


def error_outcome(error: errors.IpcError, error_string: str | None) -> Outcome:
    """A request (or a connect) that completed with `error`: its code and name, its text and
    whether the server gave it, and what the session's ``ErrorString`` said of the code (None
    when there was no session to ask)."""
    return {"error": {
        "code": error.code, "name": errors.name_of(error.code), "text": error.message,
        "from_server": error.from_server, "error_string": error_string,
    }}


def panic_outcome(panic: errors.ClientPanic) -> Outcome:
    """A request for which the server (or the kernel, ``KERN-EXEC``) panicked the client."""
    return {"panic": {"category": panic.category, "reason": panic.reason,
                      "text": panic.message}}


def failed(outcome: Outcome) -> bool:
    """True if `outcome` is an error or a panic (exit status 1), not an answer."""
    return "error" in outcome or "panic" in outcome


def format_outcome(outcome: Outcome) -> str:
    """`outcome` for people, one fact a line."""
    if "panic" in outcome:
        panic = outcome["panic"]
        text = f"\n  {panic['text']}" if panic["text"] else ""
        return f"panicked: {panic['category']} {panic['reason']}{text}"
    if "error" in outcome:
        error = outcome["error"]
        what = f"{error['name']} ({error['code']})" if error["name"] else f"error {error['code']}"
        lines = [f"error: {what}"]
        if error["text"]:
            lines.append(f"  {'from the server: ' if error['from_server'] else ''}"
                         f"{error['text']}")
        if error["error_string"] is not None:
            lines.append(f"  ErrorString: {error['error_string']}")
        return "\n".join(lines)
    if "returned" in outcome:
        returned = outcome["returned"]
        shown = _show_shown(returned) if outcome["returns"] == Form.BYTES.value else \
            json.dumps(returned, ensure_ascii=False)
        lines = [f"returned {shown}"]
    else:
        lines = [f"completed with {outcome['value']}"]
    for out in outcome["out"]:
        name = f" ({out['name']})" if "name" in out else ""
        lines.append(f"argument {out['argument']}{name}: {_show_shown(out)}")
    return "\n".join(lines)


def _show_shown(shown: dict[str, Any]) -> str:
    text = f", text {json.dumps(shown['text'], ensure_ascii=False)}" if "text" in shown else ""
    return f"{shown['bytes']} bytes, hex {shown['hex'] or '(none)'}{text}"
