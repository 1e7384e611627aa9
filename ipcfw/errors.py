"""Error codes and exceptions of ipcfw: the one place where error codes are defined.

ipcfw follows Symbian OS: a request completes with an integer.  Zero or a
positive value means success; a negative value is an error code such as
``KErrServerTerminated`` (-15).  This module holds Symbian's codes 0..-50
under their original names and values, plus ``KRequestPending``, the value
of a request that has not completed yet.  No other module defines a code
number; import them from here::

    from ipcfw.errors import KErrNotFound, KErrServerBusy

When a request completes with a negative value, the client raises the
matching subclass of :class:`IpcError` (see :func:`check`).  Catch a specific
error by its class, or any error by the base class and read ``.code``::

    from ipcfw import errors

    try:
        value = session.get_value()  # a method of your client session class
    except errors.ServerBusy:
        ...  # no free message slot: retry later
    except errors.IpcError as e:
        print(e.code, errors.describe(e.code))

``IpcError(code)`` builds the exception for a code: ``IpcError(-16)`` returns
a :class:`ServerBusy`, and a code this module does not know (such as a
server's own code) gives a plain :class:`IpcError`.  Each subclass can also
be raised directly: ``raise ServerBusy("queue full")``.

A :class:`ClientPanic` is different: it reports that the server panicked the
client for misusing the protocol, which is a bug in the client rather than
an error to handle, so it is not an :class:`IpcError`.

The Markdown error table in ``docs/errors.md`` is generated from this module
so it cannot drift (the page's last part, its common mistakes, is written by hand and
kept)::

    python -m ipcfw.errors --update docs/errors.md
"""

from __future__ import annotations

import argparse
import sys
from typing import NamedTuple, TypeVar, cast
from collections.abc import Sequence

__all__ = [
    # Codes.
    "KErrNone", "KErrNotFound", "KErrGeneral", "KErrCancel", "KErrNoMemory",
    "KErrNotSupported", "KErrArgument", "KErrTotalLossOfPrecision",
    "KErrBadHandle", "KErrOverflow", "KErrUnderflow", "KErrAlreadyExists",
    "KErrPathNotFound", "KErrDied", "KErrInUse", "KErrServerTerminated",
    "KErrServerBusy", "KErrCompletion", "KErrNotReady", "KErrUnknown",
    "KErrCorrupt", "KErrAccessDenied", "KErrLocked", "KErrWrite",
    "KErrDisMounted", "KErrEof", "KErrDiskFull", "KErrBadDriver",
    "KErrBadName", "KErrCommsLineFail", "KErrCommsFrame", "KErrCommsOverrun",
    "KErrCommsParity", "KErrTimedOut", "KErrCouldNotConnect",
    "KErrCouldNotDisconnect", "KErrDisconnected", "KErrBadLibraryEntryPoint",
    "KErrBadDescriptor", "KErrAbort", "KErrTooBig", "KErrDivideByZero",
    "KErrBadPower", "KErrDirFull", "KErrHardwareNotAvailable",
    "KErrSessionClosed", "KErrPermissionDenied", "KErrExtensionNotSupported",
    "KErrCommsBreak", "KErrNoSecureTime", "KErrCorruptSurrogateFound",
    "KRequestPending",
    # Exceptions.
    "IpcError", "ClientPanic",
    "NotFound", "General", "Cancelled", "NoMemory", "NotSupported",
    "BadArgument", "TotalLossOfPrecision", "BadHandle", "Overflow",
    "Underflow", "AlreadyExists", "PathNotFound", "Died", "InUse",
    "ServerTerminated", "ServerBusy", "Completion", "NotReady", "UnknownError",
    "Corrupt", "AccessDenied", "Locked", "WriteError", "DisMounted",
    "EndOfFile", "DiskFull", "BadDriver", "BadName", "CommsLineFail",
    "CommsFrame", "CommsOverrun", "CommsParity", "IpcTimedOut",
    "CouldNotConnect", "CouldNotDisconnect", "Disconnected",
    "BadLibraryEntryPoint", "BadDescriptor", "Aborted", "TooBig",
    "DivideByZeroError", "BadPower", "DirFull", "HardwareNotAvailable",
    "SessionClosed", "PermissionDenied", "ExtensionNotSupported",
    "CommsBreak", "NoSecureTime", "CorruptSurrogateFound",
    # Lookups.
    "describe", "name_of",
]
# The table and its machinery (ErrorInfo, all_codes, exception_class, check, from_server,
# render_markdown, HAND_WRITTEN, main)
# are public here but left out of `__all__`: ``ipcfw`` re-exports the codes, the exceptions and
# the lookups (``from .errors import *``), not these helpers.

# --- Codes (Symbian OS names and values) -----------------------------------

KErrNone: int = 0
KErrNotFound: int = -1
KErrGeneral: int = -2
KErrCancel: int = -3
KErrNoMemory: int = -4
KErrNotSupported: int = -5
KErrArgument: int = -6
KErrTotalLossOfPrecision: int = -7
KErrBadHandle: int = -8
KErrOverflow: int = -9
KErrUnderflow: int = -10
KErrAlreadyExists: int = -11
KErrPathNotFound: int = -12
KErrDied: int = -13
KErrInUse: int = -14
KErrServerTerminated: int = -15
KErrServerBusy: int = -16
KErrCompletion: int = -17
KErrNotReady: int = -18
KErrUnknown: int = -19
KErrCorrupt: int = -20
KErrAccessDenied: int = -21
KErrLocked: int = -22
KErrWrite: int = -23
KErrDisMounted: int = -24
KErrEof: int = -25
KErrDiskFull: int = -26
KErrBadDriver: int = -27
KErrBadName: int = -28
KErrCommsLineFail: int = -29
KErrCommsFrame: int = -30
KErrCommsOverrun: int = -31
KErrCommsParity: int = -32
KErrTimedOut: int = -33
KErrCouldNotConnect: int = -34
KErrCouldNotDisconnect: int = -35
KErrDisconnected: int = -36
KErrBadLibraryEntryPoint: int = -37
KErrBadDescriptor: int = -38
KErrAbort: int = -39
KErrTooBig: int = -40
KErrDivideByZero: int = -41
KErrBadPower: int = -42
KErrDirFull: int = -43
KErrHardwareNotAvailable: int = -44
KErrSessionClosed: int = -45
KErrPermissionDenied: int = -46
KErrExtensionNotSupported: int = -47
KErrCommsBreak: int = -48
KErrNoSecureTime: int = -49
KErrCorruptSurrogateFound: int = -50

#: The status of a request that has not completed yet.  Not an error code:
#: a client never sees it as a completion value.
KRequestPending: int = -0x7FFFFFFF


# --- Exceptions --------------------------------------------------------------

_E = TypeVar("_E", bound="IpcError")


class IpcError(Exception):
    """A request completed with a negative (error) code.

    ``IpcError(code, message="")`` returns an instance of the subclass for
    ``code`` (``IpcError(-15)`` is a :class:`ServerTerminated`), or a plain
    ``IpcError`` for a code this module does not know.  A subclass may be
    raised without a code: ``ServerBusy("queue full")``.

    An error a server completed a request with carries the server's text, if it gave one
    (``raise IpcError(KErrNotFound, "no key b'colour'")`` in its ``ServiceL``), and says that
    it came from the server: ``KErrNotFound (-1) from the server: no key b'colour'``.

    Attributes:
        code: the negative error code.
        message: optional detail text ("" if none).
        from_server: True when the text is the server's (`from_server`); False for an error
            raised in this process, or one the server gave without text.
    """

    code: int  # Class attribute on the subclasses, instance attribute always.
    message: str
    from_server: bool = False

    def __new__(cls: type[_E], code: int | str | None = None, message: str = "") -> _E:
        if cls is IpcError:
            # Called on the base class: dispatch to the subclass for the code.
            target = _CLASS_BY_CODE.get(_require_code(code), IpcError)
            return cast(_E, super().__new__(target))
        return super().__new__(cls)

    def __init__(self, code: int | str | None = None, message: str = "") -> None:
        fixed: int | None = getattr(type(self), "code", None)
        if fixed is not None and isinstance(code, str):
            if message:
                raise TypeError(f"{type(self).__name__}() takes one message, got two")
            message = code
            code = fixed
        elif fixed is not None and code is None:
            code = fixed
        code = _require_code(code)
        if fixed is not None and code != fixed:
            raise ValueError(f"{type(self).__name__} has code {fixed}, not {code}")
        # args holds exactly what the constructor needs, so that the default
        # BaseException.__reduce__ pickles and copies instances correctly.
        super().__init__(*((code, message) if message else (code,)))
        self.code = code
        self.message = message

    def __str__(self) -> str:
        if self.from_server and self.message:
            name = name_of(self.code)
            what = f"{name} ({self.code})" if name else f"error {self.code}"
            return f"{what} from the server: {self.message}"
        text = describe(self.code)
        return f"{text}: {self.message}" if self.message else text


def from_server(code: int, text: str) -> IpcError:
    """The error a server completed a request with: code `code`, and `text`, what the server
    said happened ("" if it said nothing: then the error is as ``IpcError(code)``).

    >>> str(from_server(-1, "no key b'colour'"))
    "KErrNotFound (-1) from the server: no key b'colour'"
    """
    error = IpcError(code, text)
    error.from_server = bool(text)
    return error


def _require_code(code: object) -> int:
    """Return ``code`` if it is a valid error code, else raise."""
    if code is None:
        raise TypeError("IpcError() needs an error code")
    if not isinstance(code, int) or isinstance(code, bool):
        raise TypeError(f"error code must be an int, not {type(code).__name__}")
    if code >= 0:
        raise ValueError(f"error code must be negative, got {code}")
    return code


class ClientPanic(Exception):
    """The server panicked the client: a bug in the client, not an error code.

    In Symbian OS a panic terminates the offending client thread; ipcfw raises
    this exception instead.  It is deliberately not an :class:`IpcError`, so
    ``except IpcError`` does not swallow it.

    Attributes:
        category: panic category, e.g. ``"KERN-EXEC"`` or a server's own.
        reason: panic reason number within the category.
        message: optional detail text ("" if none).
    """

    def __init__(self, category: str, reason: int, message: str = "") -> None:
        super().__init__(*((category, reason, message) if message else (category, reason)))
        self.category = category
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        text = f"client panicked: {self.category} {self.reason}"
        return f"{text}: {self.message}" if self.message else text


# One subclass per code -1..-50.  Their codes and docstrings are filled in from
# _TABLE below, so each class statement stays a single line.
class NotFound(IpcError): ...
class General(IpcError): ...
class Cancelled(IpcError): ...
class NoMemory(IpcError): ...
class NotSupported(IpcError): ...
class BadArgument(IpcError): ...
class TotalLossOfPrecision(IpcError): ...
class BadHandle(IpcError): ...
class Overflow(IpcError): ...
class Underflow(IpcError): ...
class AlreadyExists(IpcError): ...
class PathNotFound(IpcError): ...
class Died(IpcError): ...
class InUse(IpcError): ...
class ServerTerminated(IpcError): ...
class ServerBusy(IpcError): ...
class Completion(IpcError): ...
class NotReady(IpcError): ...
class UnknownError(IpcError): ...
class Corrupt(IpcError): ...
class AccessDenied(IpcError): ...
class Locked(IpcError): ...
class WriteError(IpcError): ...
class DisMounted(IpcError): ...
class EndOfFile(IpcError): ...
class DiskFull(IpcError): ...
class BadDriver(IpcError): ...
class BadName(IpcError): ...
class CommsLineFail(IpcError): ...
class CommsFrame(IpcError): ...
class CommsOverrun(IpcError): ...
class CommsParity(IpcError): ...
class IpcTimedOut(IpcError): ...
class CouldNotConnect(IpcError): ...
class CouldNotDisconnect(IpcError): ...
class Disconnected(IpcError): ...
class BadLibraryEntryPoint(IpcError): ...
class BadDescriptor(IpcError): ...
class Aborted(IpcError): ...
class TooBig(IpcError): ...
class DivideByZeroError(IpcError): ...
class BadPower(IpcError): ...
class DirFull(IpcError): ...
class HardwareNotAvailable(IpcError): ...
class SessionClosed(IpcError): ...
class PermissionDenied(IpcError): ...
class ExtensionNotSupported(IpcError): ...
class CommsBreak(IpcError): ...
class NoSecureTime(IpcError): ...
class CorruptSurrogateFound(IpcError): ...


# --- The table ---------------------------------------------------------------


class ErrorInfo(NamedTuple):
    """One error code: its Symbian name, value, meaning and exception class."""

    name: str
    code: int
    description: str
    exception: type[IpcError] | None  # None for KErrNone and KRequestPending.


_I = ErrorInfo
_TABLE: tuple[ErrorInfo, ...] = (
    _I("KErrNone", KErrNone, "no error", None),
    _I("KErrNotFound", KErrNotFound,
       "the item was not found (when connecting: no server is registered under that name)",
       NotFound),
    _I("KErrGeneral", KErrGeneral, "an uncategorised error occurred", General),
    _I("KErrCancel", KErrCancel, "the operation was cancelled", Cancelled),
    _I("KErrNoMemory", KErrNoMemory, "a memory allocation failed", NoMemory),
    _I("KErrNotSupported", KErrNotSupported,
       "the operation is not supported (e.g. a function number the server does not serve, or "
       "a version it does not support)",
       NotSupported),
    _I("KErrArgument", KErrArgument, "an argument is out of range", BadArgument),
    _I("KErrTotalLossOfPrecision", KErrTotalLossOfPrecision,
       "a real-number conversion lost all precision", TotalLossOfPrecision),
    _I("KErrBadHandle", KErrBadHandle, "the handle is invalid", BadHandle),
    _I(
        "KErrOverflow",
        KErrOverflow,
        "an overflow occurred (e.g. a write past a descriptor's maximum length, too many "
        "outstanding messages, too many attached threads, or too many sessions in one process)",
        Overflow,
    ),
    _I("KErrUnderflow", KErrUnderflow, "an underflow occurred", Underflow),
    _I("KErrAlreadyExists", KErrAlreadyExists,
       "the object already exists (e.g. a server with that name is already registered)",
       AlreadyExists),
    _I("KErrPathNotFound", KErrPathNotFound, "the path was not found", PathNotFound),
    _I("KErrDied", KErrDied, "the handle refers to a thread that has died", Died),
    _I("KErrInUse", KErrInUse, "the resource is in exclusive use", InUse),
    _I("KErrServerTerminated", KErrServerTerminated,
       "the server has terminated (crashed, was killed or deregistered)", ServerTerminated),
    _I("KErrServerBusy", KErrServerBusy,
       "no free message slot for an asynchronous request", ServerBusy),
    _I("KErrCompletion", KErrCompletion,
       "the operation is complete (not necessarily an error)", Completion),
    _I("KErrNotReady", KErrNotReady, "the resource is not ready", NotReady),
    _I("KErrUnknown", KErrUnknown, "the device is of an unknown type", UnknownError),
    _I("KErrCorrupt", KErrCorrupt, "the data is corrupt", Corrupt),
    _I("KErrAccessDenied", KErrAccessDenied, "access was denied", AccessDenied),
    _I("KErrLocked", KErrLocked, "the resource is locked", Locked),
    _I("KErrWrite", KErrWrite, "a write did not complete", WriteError),
    _I("KErrDisMounted", KErrDisMounted, "the volume was dismounted", DisMounted),
    _I("KErrEof", KErrEof, "the end of the file was reached", EndOfFile),
    _I("KErrDiskFull", KErrDiskFull, "the disk is full", DiskFull),
    _I("KErrBadDriver", KErrBadDriver, "the driver is invalid or of the wrong type", BadDriver),
    _I("KErrBadName", KErrBadName, "the name does not conform to the required syntax", BadName),
    _I("KErrCommsLineFail", KErrCommsLineFail, "the communications line failed", CommsLineFail),
    _I("KErrCommsFrame", KErrCommsFrame, "a communications frame error occurred", CommsFrame),
    _I("KErrCommsOverrun", KErrCommsOverrun, "a communications overrun occurred", CommsOverrun),
    _I("KErrCommsParity", KErrCommsParity, "a communications parity error occurred", CommsParity),
    _I("KErrTimedOut", KErrTimedOut, "the operation timed out", IpcTimedOut),
    _I("KErrCouldNotConnect", KErrCouldNotConnect,
       "the connection could not be made", CouldNotConnect),
    _I("KErrCouldNotDisconnect", KErrCouldNotDisconnect,
       "the disconnection could not be made", CouldNotDisconnect),
    _I(
        "KErrDisconnected",
        KErrDisconnected,
        "a required session has been disconnected (e.g. the ipcfw kernel stopped serving a "
        "thread that left its answers unread)",
        Disconnected,
    ),
    _I("KErrBadLibraryEntryPoint", KErrBadLibraryEntryPoint,
       "a library entry point is not of the required type", BadLibraryEntryPoint),
    _I("KErrBadDescriptor", KErrBadDescriptor,
       "an argument is not a descriptor, or not a suitable one", BadDescriptor),
    _I("KErrAbort", KErrAbort, "the operation was aborted", Aborted),
    _I("KErrTooBig", KErrTooBig, "a number is too big", TooBig),
    _I("KErrDivideByZero", KErrDivideByZero, "a division by zero was attempted", DivideByZeroError),
    _I("KErrBadPower", KErrBadPower, "there is not enough power", BadPower),
    _I("KErrDirFull", KErrDirFull, "the directory is full", DirFull),
    _I("KErrHardwareNotAvailable", KErrHardwareNotAvailable,
       "the hardware is not available", HardwareNotAvailable),
    _I("KErrSessionClosed", KErrSessionClosed,
       "the request was still pending when its session was closed", SessionClosed),
    _I("KErrPermissionDenied", KErrPermissionDenied,
       "permission was denied (a potential security violation)", PermissionDenied),
    _I("KErrExtensionNotSupported", KErrExtensionNotSupported,
       "the extension is not supported", ExtensionNotSupported),
    _I("KErrCommsBreak", KErrCommsBreak, "a communications break occurred", CommsBreak),
    _I("KErrNoSecureTime", KErrNoSecureTime, "no trusted time source is available", NoSecureTime),
    _I("KErrCorruptSurrogateFound", KErrCorruptSurrogateFound,
       "a corrupt UTF-16 surrogate pair was found", CorruptSurrogateFound),
)
_PENDING = _I("KRequestPending", KRequestPending, "the request has not completed yet", None)
del _I

_INFO_BY_CODE: dict[int, ErrorInfo] = {info.code: info for info in (*_TABLE, _PENDING)}
_CLASS_BY_CODE: dict[int, type[IpcError]] = {}
for _info in _TABLE:
    if _info.exception is not None:
        _info.exception.code = _info.code
        _info.exception.__doc__ = f"{_info.name} ({_info.code}): {_info.description}."
        _CLASS_BY_CODE[_info.code] = _info.exception
del _info


# --- Functions ---------------------------------------------------------------


def all_codes() -> tuple[ErrorInfo, ...]:
    """Return the records of codes 0, -1, ..., -50, in that order.

    ``KRequestPending`` is not included: it is a request status, not a result.
    """
    return _TABLE


def name_of(code: int) -> str | None:
    """Return the Symbian name of ``code`` (e.g. ``"KErrServerBusy"``), or None."""
    info = _INFO_BY_CODE.get(code)
    return info.name if info else None


def describe(code: int) -> str:
    """Return a one-line human description of ``code``.

    >>> describe(-16)
    'KErrServerBusy (-16): no free message slot for an asynchronous request'
    >>> describe(-1000)
    'unknown error code -1000'
    """
    info = _INFO_BY_CODE.get(code)
    if info is not None:
        return f"{info.name} ({info.code}): {info.description}"
    if code > 0:
        return f"{code}: success (a positive completion value)"
    return f"unknown error code {code}"


def exception_class(code: int) -> type[IpcError]:
    """Return the exception class raised for error ``code``.

    Unknown negative codes map to :class:`IpcError` itself; a code >= 0 is
    not an error and raises ValueError.
    """
    return _CLASS_BY_CODE.get(_require_code(code), IpcError)


def check(value: int) -> int:
    """Return a completion ``value`` if it is >= 0, else raise its IpcError.

    >>> check(3)
    3
    >>> check(KErrServerBusy)
    Traceback (most recent call last):
    ...
    ipcfw.errors.ServerBusy: KErrServerBusy (-16): no free message slot for an asynchronous request
    """
    if value >= 0:
        return value
    raise IpcError(value)


# --- Documentation generator -------------------------------------------------

_MARKDOWN_INTRO = """\
# Error codes

<!-- Generated by `python -m ipcfw.errors --update docs/errors.md` down to "Common mistakes":
edit ipcfw/errors.py, not this part. The common mistakes are written by hand. -->

ipcfw uses the error codes of Symbian OS, with their original names and
values, all defined in `ipcfw.errors`.  A request completes with an
integer: zero or a positive value means success, a negative value is one of
the error codes below.  When a request completes with a negative value, the
client raises the matching subclass of `ipcfw.errors.IpcError`.  Catch a
specific error by its class, or any error by the base class and read
`.code`:

```python
from ipcfw import errors

try:
    value = session.get_value()  # a method of your client session class
except errors.ServerBusy:
    ...  # no free message slot: retry later
except errors.IpcError as e:
    print(e.code, errors.describe(e.code))
```

`errors.describe(code)` returns a one-line description such as
`KErrServerBusy (-16): no free message slot for an asynchronous request`,
and `errors.name_of(code)` the Symbian name.  `IpcError(code)` builds the
exception for a code (`IpcError(-16)` is a `ServerBusy`); a code not listed
here, such as a server's own code, gives a plain `IpcError` with that
`.code`.  Servers report errors by completing a message with one of these
codes (or their own negative codes).

A server may say what happened as well: an `IpcError(code, "text")` raised
by its `ServiceL`, or passed to `message.Complete(...)`, reaches the client
with its text, and the client's exception says that it came from the
server: `KErrNotFound (-1) from the server: no key b'colour'` (its
`.message` is the text, its `.from_server` is True).  Any other exception a
server raises reaches the client as `KErrGeneral`, naming the exception's
type (see [Common mistakes](#common-mistakes)).

| code | name | exception | meaning |
|-----:|------|-----------|---------|
"""

_MARKDOWN_OUTRO = """
## KRequestPending

`KRequestPending` ({pending}) is not an error: it is the status of a request
that has not completed yet.  A client never receives it as a result.

## ClientPanic

`ipcfw.errors.ClientPanic` reports that the server panicked the client for
misusing the protocol (in Symbian OS, `RMessagePtr2::Panic`), for example by
sending a bad descriptor.  It carries a `.category` (such as `KERN-EXEC` or a
server's own category) and a `.reason` number, and reads like
`client panicked: KERN-EXEC 0`.  In Symbian OS a panic terminates the
offending client thread; ipcfw raises `ClientPanic` instead.  A panic means a
bug in the client, so `ClientPanic` is deliberately not an `IpcError`:
`except IpcError` does not swallow it.
"""


#: Where the hand-written part of docs/errors.md begins.
HAND_WRITTEN = "\n## Common mistakes\n"


def render_markdown() -> str:
    """Return the generated part of the Markdown page ``docs/errors.md``, from the table (the
    page goes on with its hand-written part, from `HAND_WRITTEN` on)."""
    rows = []
    for info in _TABLE:
        exc = f"`{info.exception.__name__}`" if info.exception else "(none)"
        meaning = info.description.replace("|", "\\|")
        rows.append(f"| {info.code} | `{info.name}` | {exc} | {meaning} |\n")
    return _MARKDOWN_INTRO + "".join(rows) + _MARKDOWN_OUTRO.format(pending=KRequestPending)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ipcfw.errors``: list the codes, print the generated part of docs/errors.md
    (``--markdown``), or rewrite it in place (``--update docs/errors.md``)."""
    parser = argparse.ArgumentParser(
        prog="python -m ipcfw.errors",
        description="List ipcfw's error codes.",
    )
    parser.add_argument(
        "--markdown", action="store_true",
        help="print the generated part of the Markdown page docs/errors.md",
    )
    parser.add_argument(
        "--update", metavar="PATH",
        help="rewrite the generated part of PATH (docs/errors.md), keeping its hand-written "
             "part (from its \"## Common mistakes\" heading on)",
    )
    args = parser.parse_args(argv)
    if args.update:
        with open(args.update, encoding="utf-8") as page:
            _, marker, kept = page.read().partition(HAND_WRITTEN)
        with open(args.update, "w", encoding="utf-8") as page:
            page.write(render_markdown() + marker + kept)
    elif args.markdown:
        sys.stdout.write(render_markdown())
    else:
        for info in (*_TABLE, _PENDING):
            print(describe(info.code))
    return 0


if __name__ == "__main__":
    sys.exit(main())
