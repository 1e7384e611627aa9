"""The plugin API a server is written against: CServer and CSession (Symbian's CServer2 and
CSession2), and the few rules the framework applies around them.

A server plugin is a `CServer` subclass with a name, and a `CSession` subclass whose `ServiceL`
handles each request. The host (``ipcfw serve package.module:ServerClass`` or `serve(server)`)
registers the name with the kernel and runs `ServiceL` on its loop thread::

    from ipcfw import CServer, CSession, KErrNotSupported, IpcError

    class EchoSession(CSession):
        def ServiceL(self, message):
            if message.Function() == 1:
                message.Complete(message.Int0())
            else:
                raise IpcError(KErrNotSupported)

    class EchoServer(CServer):
        name = "echo"
        session_class = EchoSession

A message may be completed later, from any thread, while the loop serves other requests: keep the
`RMessage` and call ``Complete()`` when the answer is ready.

The functions at the end (`start_session`, `service_failed`, `close_subsessions`, `code_of`) are
the framework's side of the API: the server's state and the overlays' layering both use them, so
each rule exists once. Plugins do not call them.
"""

from __future__ import annotations

import logging
import struct
from typing import Any, ClassVar
from collections.abc import Awaitable

from .. import errors
from ..protocol import EUnsharableSessions, TerminationReason, TServerType
from ..version import QueryVersionSupported, TVersion, to_version
from .message import ClientInfo, RMessage, complete_unless_ended
from .objectix import CObjectIx

log = logging.getLogger("ipcfw.server")

__all__ = ["CServer", "CSession"]


class CServer:
    """A server plugin (Symbian ``CServer2``). Subclass it and set the class attributes.

    Attributes:
        name: the name clients connect to (1..80 printable ASCII characters, no ``*?:``).
        version: the interface version served; clients asking for a newer one are refused.
        sharing: the most sharing a session may ask for (``EUnsharableSessions`` ...).
        session_class: the `CSession` subclass the default `NewSessionL` creates.
        direct: whether the host takes direct connections (True, the default): a client that
            asks for the direct path (``path="direct"``) then sends its session's requests
            straight to this process on a Unix socket, not through the kernel. The plugin
            sees no difference. False keeps every session of this server on the kernel path.
        send_exception_text: what the client learns of an exception other than an
            ``IpcError`` raised by ``ServiceL`` (or ``NewSessionL``, ``CreateL``, ``AcceptL``).
            False (the default): its type and where it was raised (``ZeroDivisionError in the
            server's ServiceL (function 3); see the server's log``), the traceback staying in
            the server's log. True: its text too, which may show any client the server's
            internals (paths, keys, other clients' data): turn it on for servers whose
            clients you trust, or while debugging.
    """

    name: ClassVar[str] = ""
    version: ClassVar[TVersion] = TVersion(1, 0, 0)
    sharing: ClassVar[TServerType] = EUnsharableSessions
    session_class: ClassVar[type | None] = None
    direct: ClassVar[bool] = True
    send_exception_text: ClassVar[bool] = False
    error_strings: ClassVar[dict[int, str]] = {}

    def ErrorString(self, code: int) -> str | None:
        """The description of an error code this server owns (`error_strings`), else None.
        Clients read it with ``RSession.ErrorString(code)``."""
        return self.error_strings.get(code)

    def AcceptL(
        self, client: ClientInfo | None, version: TVersion, payload: bytes
    ) -> bytes | None:
        """Accept or reject a connect before any session exists (seed 003's condition function).

        `client` is who connects (pid, uid, gid, exe, from the transport), `version` what it
        asked for, `payload` the negotiation payload it sent (at most 256 bytes). Raise an
        ``IpcError`` to reject: the client's ``CreateSession`` raises that error and
        `NewSessionL` is never called. Return bytes (at most 256) to answer the negotiation:
        the client reads them with ``RSession.NegotiationReply()``. The default accepts
        everyone and answers nothing.
        """
        return None

    def TerminateIndication(self, reason: TerminationReason) -> None:
        """The kernel is ending this server's registration (seed 002's termination indication).

        Called once, on the host's loop thread. From now on no new request is delivered and
        new connects fail with ``ServerTerminated``; complete the messages you still hold (they
        reach their clients). The registration ends when none is left. Do not call
        ``ServerHost.Deregister`` from here (it would wait for this very thread): it raises.
        The default does nothing.
        """

    def NewSessionL(self, version: TVersion, message: RMessage) -> CSession:
        """Create the session object for a new client.

        The default applies Symbian's version rule (raise ``IpcError(KErrNotSupported)`` if
        `version` is not served) and returns ``self.session_class()``. Override to choose a class
        per client or to refuse a client; any exception fails the connect with its code.
        """
        if not QueryVersionSupported(to_version(self.version), version):
            served = ".".join(map(str, self.version))
            raise errors.IpcError(
                errors.KErrNotSupported,
                f"server {self.name!r} serves version {served}; the client asked for "
                f"{'.'.join(map(str, version))}",
            )
        if self.session_class is None:
            raise NotImplementedError(
                f"{type(self).__name__} sets no session_class and does not override NewSessionL"
            )
        session: CSession = self.session_class()
        return session


class CSession:
    """One client's session with a server (Symbian ``CSession2``). Subclass it.

    ``ServiceL(message)`` is called for each request, in the order the client sent them, on the
    host's loop thread. It completes the message now, or keeps it and completes it later (from
    any thread). Raising completes the message through ``ServiceError``.

    ``ServiceL`` may be ``async def``: the host then runs it on its asyncio loop (on the same
    thread), so a session awaiting I/O does not stop the others. Coroutines start in the order
    their requests came; after their first ``await`` they interleave (docs/asyncio.md). The
    client's cancel, or the session's end, cancels the coroutine.

    Subsessions (the client's ``RSubSession``) are objects in the session's `ObjectIx`:
    `NewSubSessionL` opens one, `SubSessionL` finds it, `CloseSubSessionL` closes it, and the
    ones left open are closed when the session ends.
    """

    _server: Any  # the CServer (or, for an overlay's session, the COverlay) it belongs to
    _handle: int  # the kernel's handle of the session

    def CreateL(self) -> None:
        """Second-phase construction, after NewSessionL; raising fails the connect."""

    def ServiceL(self, message: RMessage) -> Awaitable[None] | None:
        """Handle one request (or return an awaitable that does: an ``async def ServiceL``).
        The default refuses every function with KErrNotSupported (the client's error names the
        function: see `service_failed`)."""
        raise errors.IpcError(errors.KErrNotSupported)

    def ServiceError(self, message: RMessage, error: errors.IpcError) -> None:
        """Called when ServiceL raised; the default completes the message with the error's code
        and text (unless it was completed already: by another thread, for example). For an
        exception other than an ``IpcError``, `error` is a ``General`` whose text names its
        type (see ``CServer.send_exception_text``) and whose ``__cause__`` is the exception."""
        complete_unless_ended(message, error.code, error.message)

    def Cancelled(self, message: RMessage) -> None:
        """The client cancelled `message`, which this session still holds. The default does
        nothing.

        The kernel has completed it for the client (``KErrCancel``) and freed its slot;
        `message.IsNull()` is now True and a later ``Complete()`` is silently dropped.
        Override to stop the work behind it. (The Symbian idiom, a cancel function of your own
        whose ``ServiceL`` completes the held message with ``KErrCancel``, works too.)
        """

    def Disconnect(self, message: RMessage) -> None:
        """The client closed the session or died. The default completes `message` at once.

        Override to release resources (complete messages you still hold, for example), then
        complete `message`, now or later; the kernel frees the session when you do.
        """
        message.Complete(errors.KErrNone)

    def Server(self) -> CServer:
        """The server that owns this session."""
        server: CServer = self._server
        return server

    # -- subsessions (the client's RSubSession) ----------------------------------------------

    _object_ix: CObjectIx | None = None

    def ObjectIx(self) -> CObjectIx:
        """This session's index of subsession objects, created on first use.

        The host closes every object left in it when the session ends (after `Disconnect`
        returns), so a subsession's object is released even if its client never closes it.
        """
        if self._object_ix is None:
            self._object_ix = CObjectIx()
        return self._object_ix

    def NewSubSessionL(self, message: RMessage, obj: Any) -> int:
        """Open a subsession on `obj`: add it to `ObjectIx()` and write its handle into the
        client's argument 3 (the 4-byte descriptor ``RSubSession.CreateSubSession`` sends).
        Returns the handle; completing `message` is still up to you::

            def ServiceL(self, message):
                if message.Function() == EOpenCursor:
                    self.NewSubSessionL(message, Cursor(...))
                    message.Complete(KErrNone)

        If the write fails (argument 3 is not a writable descriptor of 4 bytes or more:
        ``BadDescriptor``, ``Overflow``), `obj` is removed (and closed) again and the error
        propagates.
        """
        index = self.ObjectIx()
        handle = index.AddL(obj)
        try:
            message.WriteL(3, struct.pack("<i", handle))
        except BaseException:
            try:
                index.Remove(handle)
            except Exception:
                log.exception("closing subsession object %r after a failed open raised", obj)
            raise
        return handle

    def SubSessionL(self, message: RMessage) -> Any:
        """The object of the subsession `message` is for (its handle is argument 3).

        Raises ``IpcError(KErrBadHandle)`` if argument 3 is not the handle of an open
        subsession of this session (closed, made up, or a descriptor).
        """
        return self.ObjectIx().AtL(_subsession_handle(message))

    def CloseSubSessionL(self, message: RMessage) -> None:
        """Close the subsession `message` is for: remove its object and call its ``Close()``.

        Raises ``IpcError(KErrBadHandle)`` as `SubSessionL` does. Completing `message` is still
        up to you.
        """
        self.ObjectIx().Remove(_subsession_handle(message))


def _subsession_handle(message: RMessage) -> int:
    try:
        return message.Int3()
    except errors.IpcError:
        raise errors.IpcError(
            errors.KErrBadHandle, "argument 3 is a descriptor, not a subsession handle"
        ) from None


def start_session(layer: Any, session: object, handle: int) -> CSession:
    """Bind `session`, what `layer`'s ``NewSessionL`` returned, to `layer` and to the kernel's
    `handle`, and run its ``CreateL`` (the second phase of Symbian's two-phase construction)."""
    if not isinstance(session, CSession):
        raise TypeError(f"{type(layer).__name__}.NewSessionL returned {type(session).__name__}")
    session._server = layer
    session._handle = handle
    session.CreateL()
    return session


def service_failed(session: CSession, message: RMessage, exc: Exception) -> None:
    """`session.ServiceL(message)` raised `exc`: log it, let ``ServiceError`` answer, and
    complete the message with the error's code and text if that did not.

    The text the client gets: an ``IpcError``'s own message; for a bare ``KErrNotSupported``,
    the function it refused and what to check; for any other exception, its type (and its
    text, if the server's ``send_exception_text`` says so) and that the traceback is in the
    server's log."""
    function = message.Function()
    server = _server_under(getattr(session, "_server", None))  # (None: a session not started)
    if isinstance(exc, errors.IpcError):
        log.info("ServiceL(function %d) left with %s", function, exc, exc_info=True)
        error = exc
        if exc.code == errors.KErrNotSupported and not exc.message:
            error = errors.IpcError(errors.KErrNotSupported, (
                f"server {getattr(server, 'name', '')!r} does not support function {function} "
                f"({type(session).__name__}.ServiceL refused it): check the function number "
                "the client sends, and that client and server use the same interface version"))
            error.__cause__ = exc
    else:
        log.error("ServiceL(function %d) raised", function, exc_info=True)
        error = errors.IpcError(errors.KErrGeneral,
                                text_of(exc, f"ServiceL (function {function})", server))
        error.__cause__ = exc
    try:
        session.ServiceError(message, error)
    except Exception:
        log.exception("ServiceError raised")
    complete_unless_ended(message, error.code, error.message)


def _server_under(layer: object) -> CServer | None:
    """The `CServer` at the bottom of `layer` (a server, or an overlay over one): the name a
    client knows, and whose ``send_exception_text`` applies to its overlays too."""
    while layer is not None and not isinstance(layer, CServer):
        layer = getattr(layer, "overlaid", None)
    return layer


def text_of(exc: BaseException, where: str, server: object) -> str:
    """The text a client gets for `exc`, raised in the server's `where` (``"ServiceL (function
    3)"``, ``"NewSessionL"``): an `IpcError`'s message; for anything else its type, its own
    text if `server`'s ``send_exception_text`` allows it, and where the traceback is."""
    if isinstance(exc, errors.IpcError):
        return exc.message
    detail = f": {exc}" if getattr(server, "send_exception_text", False) and str(exc) else ""
    return (f"{type(exc).__name__} in the server's {where}{detail}; the traceback is in the "
            "server's log")


def close_subsessions(session: CSession) -> None:
    """Close every subsession object `session` still holds (the session, or its part, ended)."""
    if session._object_ix is not None:
        try:
            session._object_ix.CloseAll()
        except Exception:
            log.exception("closing a subsession object of a closed session raised")


def code_of(exc: BaseException) -> int:
    """The completion code for an exception: an `IpcError`'s own, else ``KErrGeneral``."""
    return exc.code if isinstance(exc, errors.IpcError) else errors.KErrGeneral
