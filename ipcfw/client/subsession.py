"""RSubSession: a handle to one object inside a server, reached through a session.

A session is one client's connection to a server; a subsession is something the client opened
within it: a file in a file server, a table or a cursor in a database. Symbian calls the client's
handle ``RSubSessionBase``. Opening one is a request like any other, with one convention: its
argument 3 is a 4-byte writable descriptor into which the server writes the new subsession's
handle (a server does this with ``CSession.NewSubSessionL``). Every later request on the
subsession goes through the session and carries that handle as the int in argument 3, which
leaves arguments 0 to 2 to the request itself::

    from ipcfw import EndOfFile, RSession, RSubSession
    from servers.kv import ECloseCursor, ECursorNext, EOpenCursor

    with RSession.connect("kv") as session:
        cursor = RSubSession()
        cursor.CreateSubSession(session, EOpenCursor, (b"user:",))
        try:
            while True:
                key = bytearray(256)                     # max length 256; holds the key after
                try:
                    cursor.SendReceive(ECursorNext, (key,))  # arg 3: the cursor's handle
                except EndOfFile:                        # KErrEof: no more keys
                    break
                print(bytes(key))
        finally:
            cursor.CloseSubSession(ECloseCursor)

or, closing it for you, ``with RSubSession.open(session, EOpenCursor, ECloseCursor,
(b"user:",)) as cursor: ...``.

A subsession lives inside its session: closing the session (or the client process ending)
closes every subsession the server holds for it, so the server releases their objects.
"""

from __future__ import annotations

import logging
import struct
import threading
import warnings
from typing import Any, cast, overload

from .. import errors
from .args import Arg, Args, TIpcArgs
from .session import RSession, death_of
from .state import SUBSESSION_WORDS, Hold
from .status import TRequestStatus

log = logging.getLogger("ipcfw.subsession")

__all__ = ["RSubSession"]

_HANDLE = struct.Struct("<i")  # Symbian's TPckgBuf<TInt>: the handle as 4 little-endian bytes


class RSubSession:
    """A client's handle to a subsession: an object a server holds for one of its sessions
    (Symbian ``RSubSessionBase``).

    ::

        cursor = RSubSession()
        cursor.CreateSubSession(session, EOpenCursor, (b"prefix",))
        cursor.SendReceive(ECursorNext, (key_buffer,))       # synchronous
        cursor.SendReceive(ECursorNext, (key_buffer,), status)  # asynchronous
        cursor.CloseSubSession(ECloseCursor)

    Requests take at most three arguments (0 to 2): argument 3 always carries the subsession's
    handle. They go through the session, so the session's rules hold: the same thread, the same
    order, the same message slots. ``SubSessionHandle()`` is 0 while the subsession is not open.

    A client class for a server's subsession usually subclasses this (as Symbian's ``RFile``
    derives from ``RSubSessionBase``) and offers one method per function. Passing
    ``close_function`` to the constructor, or opening with `open`, makes the object a context
    manager that closes the subsession on exit.
    """

    def __init__(self, close_function: int | None = None) -> None:
        # The handle, held through its session (ipcfw.client.state).
        self._hold: Hold[RSession] = Hold(SUBSESSION_WORDS, threading.Lock())
        self._close_function = close_function

    @classmethod
    def open(
        cls, session: RSession, create_function: int, close_function: int, args: Args = ()
    ) -> RSubSession:
        """Create a subsession (see `CreateSubSession`) that ``with`` closes with `close_function`::

            with RSubSession.open(session, EOpenTable, ECloseTable, (b"fruit",)) as table:
                table.SendReceive(ETableSet, (b"apple", b"red"))
        """
        subsession = cls()  # (a subclass's constructor may take no close_function)
        subsession._close_function = close_function
        subsession.CreateSubSession(session, create_function, args)
        return subsession

    def CreateSubSession(self, session: RSession, function: int, args: Args = ()) -> None:
        """Ask the server, through `session`, to open a subsession; block until it answers.

        `args` are arguments 0 to 2 of the request; argument 3 is a 4-byte writable descriptor
        for the server to write the handle into. Raises ``ValueError`` for a fourth argument
        (before anything is sent), whatever the server raised (its ``NewSubSessionL`` or its own
        checks), and ``IpcError(KErrBadHandle)`` if the server completed the request with success
        but left handle 0 in argument 3 (it wrote none, or wrote 0, which names no subsession;
        Symbian's ``CreateSubSession`` returns ``KErrNone`` then, with the subsession not open).
        Raises ``ClientPanic("KERN-EXEC", 57)`` if this subsession is already open (close it
        first), ``ClientPanic("KERN-EXEC", 9)`` if another thread is creating it.
        """
        if not isinstance(session, RSession):
            raise TypeError(f"CreateSubSession needs an RSession, not {type(session).__name__}")
        first = _first_three(args)
        self._hold.begin(threading.current_thread())
        try:
            self._create(session, function, first)
        finally:
            self._hold.end()

    def _create(self, session: RSession, function: int, first: list[Arg]) -> None:
        buffer = bytearray(_HANDLE.size)
        session.SendReceive(function, TIpcArgs(*first, buffer))
        if len(buffer) != _HANDLE.size:
            raise errors.IpcError(
                errors.KErrBadHandle,
                f"function {function} opened no subsession: the server wrote {len(buffer)} bytes "
                f"into argument 3, not a {_HANDLE.size}-byte handle",
            )
        (handle,) = _HANDLE.unpack(buffer)
        if handle == 0:
            raise errors.IpcError(
                errors.KErrBadHandle,
                f"function {function} completed with success but left handle 0 in argument 3: "
                "the server wrote no subsession handle, or wrote 0, which names none (a server "
                "opens a subsession with CSession.NewSubSessionL, whose handles are never 0)",
            )
        self._hold.attach(session, handle)

    @overload
    def SendReceive(
        self, function: int, args: Args = (), status: None = None, *,
        timeout: float | None = None,
    ) -> int: ...

    @overload
    def SendReceive(
        self, function: int, args: Args, status: TRequestStatus, *,
        timeout: float | None = None,
    ) -> None: ...

    def SendReceive(
        self,
        function: int,
        args: Args = (),
        status: TRequestStatus | None = None,
        *,
        timeout: float | None = None,
    ) -> int | None:
        """Send a request on the subsession: `args` (at most three) plus the handle as argument 3.

        Synchronous without `status` (returns the completion value or raises its ``IpcError``),
        asynchronous with one, exactly as ``RSession.SendReceive``. Raises ``ValueError`` for a
        fourth argument and ``ClientPanic("KERN-EXEC", 0)`` if the subsession is not open.
        """
        session, ipc_args = self._request(args)
        return session.SendReceive(function, ipc_args, status, timeout=timeout)

    def Send(self, function: int, args: Args = ()) -> None:
        """A blind request on the subsession (see ``RSession.Send``); the handle is argument 3."""
        session, ipc_args = self._request(args)
        session.Send(function, ipc_args)

    def CloseSubSession(self, function: int) -> None:
        """Ask the server to close the subsession with `function`, and forget the handle.

        Synchronous; the server's answer is ignored, as in Symbian, so this does not raise for
        an error the server returns, nor when the session is already closed or dead (its server
        gone, or the client panicked): the server has released the subsession's object then, or
        will when the session ends. Closing a subsession that is not open does nothing.
        """
        session, handle = self._hold.via, self._hold.handle
        if handle and session is not None:
            if not session.Handle():
                log.debug("subsession 0x%x: its session is already closed", handle)
            else:
                try:
                    session.SendReceive(function, (0, 0, 0, handle))
                except errors.IpcError as exc:
                    log.debug("subsession 0x%x: closing it gave %s (ignored)", handle, exc)
                except errors.ClientPanic as exc:
                    if death_of(session) is None:
                        raise  # refused (a thread that may not use the session): still open
                    log.debug("subsession 0x%x: its session is dead: %s", handle, exc)
        # Only now: a bad `function` (TypeError) or an interrupted wait leaves it open, to retry.
        self._hold.detach()

    def SubSessionHandle(self) -> int:
        """The server's handle for this subsession; 0 when it is not open."""
        return self._hold.handle

    def Session(self) -> RSession | None:
        """The session the subsession was opened in; None when it is not open."""
        return self._hold.via

    def __enter__(self) -> RSubSession:
        if self._close_function is None:
            raise TypeError(
                "this RSubSession does not know which function closes it: open it with "
                "RSubSession.open(session, create_function, close_function, args), or pass "
                "close_function to RSubSession()"
            )
        return self

    def __exit__(self, *exc_info: Any) -> None:
        assert self._close_function is not None  # checked by __enter__
        self.CloseSubSession(self._close_function)

    def __del__(self) -> None:
        if self._hold.handle:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)

    def __repr__(self) -> str:
        session, handle = self._hold.via, self._hold.handle
        if not handle:
            return f"<{type(self).__name__} not open>"
        return f"<{type(self).__name__} 0x{handle:x} in {session!r}>"

    # -- internals ---------------------------------------------------------------------------

    def _request(self, args: Args) -> tuple[RSession, TIpcArgs]:
        first = _first_three(args)
        session, handle = self._hold.usable()
        return session, TIpcArgs(*first, handle)


def _first_three(args: Args) -> list[Arg]:
    """Arguments 0 to 2 as a list of exactly three (0 for each one not given).

    The padding is invisible to the server: an argument not sent reads as 0 with ``IntN()``
    and is not a descriptor, exactly like an int 0.
    """
    ipc_args = TIpcArgs.of(args)
    if len(ipc_args.wire) > 3:
        raise ValueError(
            f"a subsession request takes at most 3 arguments (argument 3 carries the subsession "
            f"handle), got {len(ipc_args.wire)}"
        )
    first: list[Arg] = []
    for index, wire in enumerate(ipc_args.wire):
        buffer = ipc_args.buffers.get(index)  # a writable descriptor is passed on as given
        first.append(buffer if buffer is not None else cast(Arg, wire))  # (an int or bytes)
    return first + [0] * (3 - len(first))
