"""``ipcfw call NAME FUNCTION [ARG...]``: one request to a server from the command line, as
``busctl call`` or ``grpcurl`` make one; what the server answered is printed, or its error.

The words are read by `ipcfw.tools.callargs` (``42``, ``b:HEX``, ``s:TEXT``, ``out:N``; with
``--interface module:Class``, an operation's name and one word per parameter) before anything
is connected, so a bad word costs nothing and is named. Then one session, one ``SendReceive``
and a ``Close``. Exit status: 0 when the request completed with a value >= 0; 1 when it (or
the connect) completed with an error, which is printed with the server's text and what the
session's ``ErrorString`` says of the code, or the server panicked the client; 2 for a bad
word. Docs: docs/cli.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from .. import errors
from ..client import RSession
from ..interface import Interface
from ..interface.spec import OperationSpec
from ..version import TVersion
from .callargs import (
    Arg, BadArgument, Outcome, error_outcome, failed, format_outcome, operation_arguments,
    operation_outcome, panic_outcome, parse_arguments, parse_function, parse_version,
    request_outcome,
)
from .plugins import PluginError, load_plugin


class _Request:
    """What the words ask for: the function, its arguments, and the operation if any."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.operation: OperationSpec | None = None
        self.reply: bytearray | None = None
        version = None if args.server_version is None else parse_version(args.server_version)
        if args.interface is None:
            self.function = parse_function(args.function)
            self.wire: tuple[Arg, ...] = parse_arguments(args.arguments)
            self.version = version or TVersion(1, 0, 0)
            return
        interface_class: type[Interface] = load_plugin(args.interface, Interface, "interface")
        interface = interface_class.interface
        operation = interface.named.get(args.function)
        if operation is None:
            known = ", ".join(op.name for op in interface.operations.values()) or "none"
            raise BadArgument(f"interface {interface.name!r} has no operation "
                              f"{args.function!r} (it has: {known})")
        values = operation_arguments(operation, args.arguments)
        try:
            self.wire, self.reply = operation.request(tuple(values), {})
        except (TypeError, ValueError) as exc:
            raise BadArgument(str(exc)) from None
        self.operation, self.function = operation, operation.number
        self.version = version or interface.version

    def outcome(self, value: int) -> Outcome:
        if self.operation is None:
            return request_outcome(value, self.wire)
        returned = self.operation.result(value, self.reply)
        return operation_outcome(self.operation, returned, self.wire)


def run(args: argparse.Namespace) -> int:
    """Send the request the words ask for; print what came back. Returns the exit status."""
    try:
        request = _Request(args)
    except (BadArgument, PluginError) as exc:
        print(f"ipcfw call: {exc}", file=sys.stderr)
        return 2
    try:
        session = RSession.connect(args.name, request.version, endpoint=args.endpoint,
                                   timeout=args.timeout, path=args.path)
    except errors.IpcError as exc:
        return _show(args, error_outcome(exc, None))
    with session:
        try:
            value = session.SendReceive(request.function, request.wire, timeout=args.timeout)
        except errors.IpcError as exc:
            return _show(args, error_outcome(exc, _error_string(session, exc.code)))
        except errors.ClientPanic as exc:
            return _show(args, panic_outcome(exc))
        try:
            outcome = request.outcome(value)
        except TypeError as exc:  # the server answered what the interface does not say
            print(f"ipcfw call: {exc}", file=sys.stderr)
            return 1
    return _show(args, outcome)


def _error_string(session: RSession, code: int) -> str | None:
    """What the server (and its overlays) say of `code`; None if it cannot be asked."""
    try:
        return session.ErrorString(code)
    except (errors.IpcError, errors.ClientPanic, TimeoutError):
        return None


def _show(args: argparse.Namespace, outcome: Outcome) -> int:
    """Print `outcome` (an error on stderr, unless as JSON); its exit status."""
    bad = failed(outcome)
    if args.json:
        print(json.dumps(outcome, ensure_ascii=False))
    else:
        print(format_outcome(outcome), file=sys.stderr if bad else sys.stdout)
    return 1 if bad else 0
