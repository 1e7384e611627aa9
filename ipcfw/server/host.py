"""The server side: CServer, CSession, RMessage, and the loop that hosts a server.

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
"""

from __future__ import annotations

import collections
import logging
import os
import select
import signal
import struct
import threading
from typing import Any, ClassVar, NamedTuple, Optional

import zmq

from .. import endpoint as endpoints
from .. import errors
from .._wakeup import WakePipe
from .objectix import CObjectIx
from .._zmqflags import NOBLOCK
from ..protocol import (
    I32_MAX,
    I32_MIN,
    EGlobalSharableSessions,
    ESharableSessions,
    EUnsharableSessions,
    TServerType,
    ERROR_STRING_FUNCTION,
    MAX_CATEGORY,
    Deregister,
    Terminating,
    TerminationReason,
    MAX_PAYLOAD,
    Negotiated,
    Cancelled,
    MAX_FRAME,
    PROTOCOL_VERSION,
    Complete,
    Completed,
    Deliver,
    Disconnect,
    Dropped,
    Hello,
    NewSession,
    Panic,
    PeerGone,
    PeerInfo,
    ProtocolError,
    Register,
    Role,
    Welcome,
    decode,
    encode,
)
from ..version import QueryVersionSupported, TVersion, to_version

log = logging.getLogger("ipcfw.server")

__all__ = [
    "EUnsharableSessions",
    "ESharableSessions",
    "EGlobalSharableSessions",
    "TServerType",
    "ClientInfo",
    "CServer",
    "CSession",
    "RMessage",
    "ServerPanic",
    "ServerHost",
    "serve",
]

_REGISTER_TIMEOUT = 5.0
_DEREGISTER_REQ = 2  # the request id of Deregister (Register used 1)
_KERNEL_RETRY = 0.2  # seconds between looks for a new kernel after the old one died
_REFUSED_KEPT = 256  # handles of refused connects remembered, for a first request behind one


class ClientInfo(NamedTuple):
    """Who sent a message, as the kernel saw it from the transport (never self-reported)."""

    pid: int
    uid: int
    gid: int
    exe: str


class ServerPanic(Exception):
    """The server code misused the framework (Symbian panics the server thread).

    Raised, for example, by completing a message twice (``USER 70``). It is a bug in the server;
    nothing is sent to the client for the offending call.
    """

    def __init__(self, category: str, reason: int, message: str = "") -> None:
        super().__init__(f"server panic {category} {reason}" + (f": {message}" if message else ""))
        self.category = category
        self.reason = reason


class CServer:
    """A server plugin (Symbian ``CServer2``). Subclass it and set the class attributes.

    Attributes:
        name: the name clients connect to (1..80 printable ASCII characters, no ``*?:``).
        version: the interface version served; clients asking for a newer one are refused.
        sharing: the most sharing a session may ask for (``EUnsharableSessions`` ...).
        session_class: the `CSession` subclass the default `NewSessionL` creates.
    """

    name: ClassVar[str] = ""
    version: ClassVar[TVersion] = TVersion(1, 0, 0)
    sharing: ClassVar[TServerType] = EUnsharableSessions
    session_class: ClassVar[Optional[type]] = None
    error_strings: ClassVar[dict[int, str]] = {}

    def ErrorString(self, code: int) -> Optional[str]:
        """The description of an error code this server owns (`error_strings`), else None.
        Clients read it with ``RSession.ErrorString(code)``."""
        return self.error_strings.get(code)

    def AcceptL(
        self, client: Optional["ClientInfo"], version: TVersion, payload: bytes
    ) -> Optional[bytes]:
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

    def NewSessionL(self, version: TVersion, message: "RMessage") -> "CSession":
        """Create the session object for a new client.

        The default applies Symbian's version rule (raise ``IpcError(KErrNotSupported)`` if
        `version` is not served) and returns ``self.session_class()``. Override to choose a class
        per client or to refuse a client; any exception fails the connect with its code.
        """
        if not QueryVersionSupported(to_version(self.version), version):
            raise errors.IpcError(
                errors.KErrNotSupported,
                f"{self.name} serves version {tuple(self.version)}, client asked {tuple(version)}",
            )
        if self.session_class is None:
            raise NotImplementedError(
                f"{type(self).__name__} sets no session_class and does not override NewSessionL"
            )
        return self.session_class()


class CSession:
    """One client's session with a server (Symbian ``CSession2``). Subclass it.

    ``ServiceL(message)`` is called for each request, in the order the client sent them, on the
    host's loop thread. It completes the message now, or keeps it and completes it later (from
    any thread). Raising completes the message through ``ServiceError``.

    Subsessions (the client's ``RSubSession``) are objects in the session's `ObjectIx`:
    `NewSubSessionL` opens one, `SubSessionL` finds it, `CloseSubSessionL` closes it, and the
    ones left open are closed when the session ends.
    """

    _server: CServer
    _handle: int

    def CreateL(self) -> None:
        """Second-phase construction, after NewSessionL; raising fails the connect."""

    def ServiceL(self, message: "RMessage") -> None:
        """Handle one request. The default refuses every function with KErrNotSupported."""
        raise errors.IpcError(errors.KErrNotSupported, f"function {message.Function()}")

    def ServiceError(self, message: "RMessage", error: errors.IpcError) -> None:
        """Called when ServiceL raised; the default completes the message with the error's code."""
        if not message.IsNull():
            message.Complete(error.code)

    def Cancelled(self, message: "RMessage") -> None:
        """The client cancelled `message`, which this session still holds. The default does
        nothing.

        The kernel has completed it for the client (``KErrCancel``) and freed its slot;
        `message.IsNull()` is now True and a later ``Complete()`` is silently dropped.
        Override to stop the work behind it. (The Symbian idiom, a cancel function of your own
        whose ``ServiceL`` completes the held message with ``KErrCancel``, works too.)
        """

    def Disconnect(self, message: "RMessage") -> None:
        """The client closed the session or died. The default completes `message` at once.

        Override to release resources (complete messages you still hold, for example), then
        complete `message`, now or later; the kernel frees the session when you do.
        """
        message.Complete(errors.KErrNone)

    def Server(self) -> CServer:
        """The server that owns this session."""
        return self._server

    # -- subsessions (the client's RSubSession) ----------------------------------------------

    _object_ix: Optional[CObjectIx] = None

    def ObjectIx(self) -> CObjectIx:
        """This session's index of subsession objects, created on first use.

        The host closes every object left in it when the session ends (after `Disconnect`
        returns), so a subsession's object is released even if its client never closes it.
        """
        if self._object_ix is None:
            self._object_ix = CObjectIx()
        return self._object_ix

    def NewSubSessionL(self, message: "RMessage", obj: Any) -> int:
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

    def SubSessionL(self, message: "RMessage") -> Any:
        """The object of the subsession `message` is for (its handle is argument 3).

        Raises ``IpcError(KErrBadHandle)`` if argument 3 is not the handle of an open
        subsession of this session (closed, made up, or a descriptor).
        """
        return self.ObjectIx().AtL(_subsession_handle(message))

    def CloseSubSessionL(self, message: "RMessage") -> None:
        """Close the subsession `message` is for: remove its object and call its ``Close()``.

        Raises ``IpcError(KErrBadHandle)`` as `SubSessionL` does. Completing `message` is still
        up to you.
        """
        self.ObjectIx().Remove(_subsession_handle(message))


def _subsession_handle(message: "RMessage") -> int:
    try:
        return message.Int3()
    except errors.IpcError:
        raise errors.IpcError(
            errors.KErrBadHandle, "argument 3 is a descriptor, not a subsession handle"
        ) from None


class _MessageKind:
    CONNECT = "connect"
    REQUEST = "request"
    DISCONNECT = "disconnect"


class RMessage:
    """A request as the server sees it (Symbian ``RMessage2``).

    It carries the function number and four arguments, and is completed exactly once, by
    ``Complete(value)`` or ``Panic(category, reason)``, from any thread.
    """

    __slots__ = (
        "_host", "_msg_id", "_kind", "_function", "_args", "_session", "_client", "_content",
        "_done", "_ended_by", "_cancelled", "_generation", "_held_in", "__weakref__",
    )

    def __init__(self, host: "ServerHost", msg_id: int, kind: str, function: int, args: tuple,
                 session: Optional[CSession], client: Optional[ClientInfo]) -> None:
        self._host = host
        self._msg_id = msg_id
        self._kind = kind
        self._function = function
        self._args = args
        self._session = session
        self._client = client
        self._content: Optional[dict] = None  # index -> bytearray, once WriteL was called
        self._done = False
        self._ended_by = ""  # "Complete" or "Panic", once it was completed
        self._cancelled = False  # the client cancelled it: completing it is a no-op
        self._generation = host._generation  # which registration (kernel) it came from
        self._held_in: Optional[dict] = None  # its session's requests in service, while in it

    # -- what was sent -----------------------------------------------------------------------

    def Function(self) -> int:
        """The function number (opcode) the client sent; -1 for connect, -2 for disconnect."""
        return self._function

    def Int0(self) -> int:
        return self._int(0)

    def Int1(self) -> int:
        return self._int(1)

    def Int2(self) -> int:
        return self._int(2)

    def Int3(self) -> int:
        return self._int(3)

    def _int(self, index: int) -> int:
        if index >= len(self._args):
            return 0  # unspecified arguments read as 0, as in Symbian
        arg = self._args[index]
        if type(arg) is not int:
            raise errors.IpcError(
                errors.KErrArgument, f"argument {index} is a descriptor, not an int"
            )
        return arg

    def _descriptor(self, index: int) -> Any:
        if type(index) is not int or not 0 <= index <= 3:
            raise errors.IpcError(
                errors.KErrArgument, f"argument index must be 0..3, got {index!r}"
            )
        if self._kind != _MessageKind.REQUEST:
            raise ServerPanic("KERN-EXEC", 44, f"a {self._kind} message has no arguments")
        arg = self._args[index] if index < len(self._args) else 0
        if type(arg) is int:
            raise errors.IpcError(errors.KErrBadDescriptor, f"argument {index} is not a descriptor")
        return arg

    def _current(self, index: int) -> bytes:
        if self._content is not None and index in self._content:
            return bytes(self._content[index])
        arg = self._descriptor(index)
        return arg if type(arg) is bytes else arg[0]

    def GetDesLength(self, index: int) -> int:
        """Length of descriptor argument `index`; ``BadDescriptor`` if it is an int."""
        return len(self._current(index))

    def GetDesMaxLength(self, index: int) -> int:
        """Max length of descriptor argument `index` (its length, if read-only)."""
        arg = self._descriptor(index)
        return len(arg) if type(arg) is bytes else arg[1]

    def ReadL(self, index: int, offset: int = 0) -> bytes:
        """The content of descriptor argument `index`, from `offset`."""
        if type(offset) is not int or offset < 0:
            raise errors.IpcError(errors.KErrArgument, f"offset must be >= 0, got {offset!r}")
        return self._current(index)[offset:]

    def WriteL(self, index: int, data: bytes, offset: int = 0) -> None:
        """Write `data` at `offset` into the client's writable descriptor `index`.

        The client's ``bytearray`` then holds its first `offset` bytes followed by `data` (its
        length becomes ``offset + len(data)``), when the request completes. Raises
        ``BadDescriptor`` for an int or read-only argument, ``Overflow`` past its max length.
        """
        arg = self._descriptor(index)
        if type(arg) is bytes:
            raise errors.IpcError(errors.KErrBadDescriptor, f"argument {index} is read-only")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"WriteL data must be bytes-like, not {type(data).__name__}")
        if type(offset) is not int or offset < 0:
            raise errors.IpcError(errors.KErrArgument, f"offset must be >= 0, got {offset!r}")
        if offset + len(data) > arg[1]:
            raise errors.IpcError(
                errors.KErrOverflow,
                f"writing {len(data)} bytes at offset {offset} overflows argument {index} "
                f"(max length {arg[1]})",
            )
        if self._content is None:
            self._content = {}
        buffer = self._content.setdefault(index, bytearray(arg[0]))
        if len(buffer) < offset:
            buffer.extend(bytes(offset - len(buffer)))
        buffer[offset:] = data

    # -- who sent it -------------------------------------------------------------------------

    def Client(self) -> ClientInfo:
        """The sending process: pid, uid, gid and executable, as the kernel saw them."""
        if self._client is None:
            raise ServerPanic("KERN-EXEC", 44, "this message has no client")
        return self._client

    def SecureId(self) -> int:
        """The client's secure identity: its uid, which the transport vouches for."""
        return self.Client().uid

    def Session(self) -> Optional[CSession]:
        """The session this message belongs to (None for a connect message)."""
        return self._session

    # -- completion --------------------------------------------------------------------------

    def IsNull(self) -> bool:
        """True once the message has been completed (or panicked)."""
        return self._done

    def Complete(self, value: int) -> None:
        """Complete the message with `value` (>= 0 success, < 0 an error code). Any thread.

        Raises ``ServerPanic("USER", 70)`` if the message was already completed or panicked
        (Symbian's ``ETMesCompletion``); nothing is sent twice.
        """
        if type(value) is not int:
            if isinstance(value, errors.IpcError):
                value = value.code
            elif isinstance(value, int):
                value = int(value)
            else:
                raise TypeError(f"completion value must be an int, not {type(value).__name__}")
        if not I32_MIN <= value <= I32_MAX:
            raise ValueError(f"completion value {value} does not fit in 32 bits")
        writes = ()
        if self._content:
            writes = tuple((i, bytes(b)) for i, b in sorted(self._content.items()))
        if not self._claim():
            return  # cancelled by the client: the kernel completed it already
        frame = encode(Complete(self._msg_id, value, writes))
        if len(frame) > self._host.max_frame:
            log.error("completion of %r is %d bytes, over the kernel's limit; completing with "
                      "KErrOverflow instead", self, len(frame))
            frame = encode(Complete(self._msg_id, errors.KErrOverflow, ()))
        self._host._completed(self, frame)

    def Panic(self, category: str, reason: int) -> None:
        """Panic the client: its call raises ``ClientPanic(category, reason)``, its session dies
        and this server gets ``Disconnect``. `category` is truncated to 16 characters.

        This completes the message. Raises ``ServerPanic("KERN-EXEC", 44)`` if the message was
        already completed or panicked (Symbian's ``EBadMessageHandle``: a completed message's
        handle is null); nothing is sent then, and the client keeps its session.
        """
        if not isinstance(category, str):
            raise TypeError(f"panic category must be a str, not {type(category).__name__}")
        if type(reason) is not int or not I32_MIN <= reason <= I32_MAX:
            raise ValueError(f"panic reason must be a 32-bit int, got {reason!r}")
        if not self._claim("Panic"):
            return
        self._host._completed(self, encode(Panic(self._msg_id, category[:MAX_CATEGORY], reason)))

    def _claim(self, by: str = "Complete") -> bool:
        """Mark the message completed `by` Complete or Panic; False if the client cancelled it
        (send nothing). Raises the server panic Symbian gives for a message already completed."""
        with self._host._completion_lock:
            if self._cancelled:
                return False
            if self._done:
                raise self._already_completed(by)
            self._done = True
            self._ended_by = by
        self._out_of_service()
        return True

    def _already_completed(self, by: str) -> ServerPanic:
        # Symbian nulls a message's handle when it completes: Complete() on a null handle is
        # USER 70; Panic() hands the null handle to the kernel, which answers KERN-EXEC 44.
        what = f"{by}() on message {self._msg_id} (function {self._function})"
        was = "completed" if self._ended_by == "Complete" else "completed by Panic()"
        if by == "Panic":
            return ServerPanic("KERN-EXEC", 44, f"{what}, which was already {was}: only a "
                                                "pending message can panic its client")
        return ServerPanic("USER", 70, f"{what}, which was already {was}: a message is "
                                       "completed once")

    def _cancel(self) -> bool:
        """The client cancelled it; True if it was still pending here."""
        with self._host._completion_lock:
            if self._done:
                return False
            self._done = self._cancelled = True
        self._out_of_service()
        return True

    def _out_of_service(self) -> None:
        # Its own session's table: a new kernel's session may reuse the handle and the msg_id.
        if self._held_in is not None:
            self._held_in.pop(self._msg_id, None)

    def IsCancelled(self) -> bool:
        """True if the client cancelled this message (it was completed for the client)."""
        return self._cancelled

    def __repr__(self) -> str:
        state = "completed" if self._done else "pending"
        return f"<RMessage {self._msg_id} {self._kind} function={self._function} {state}>"


class ServerHost:
    """Hosts one `CServer` in this process: registers it and runs its loop.

    ``run()`` blocks until `stop()` is called (from any thread or a signal handler) or the
    kernel goes away. ``ServiceL`` runs on the thread that called ``run()``.

    With ``reconnect=True`` (what ``ipcfw serve`` uses) a kernel's death does not end the host:
    the sessions it had are dropped (their subsession objects closed), and the host waits for a
    kernel on the same endpoint and registers the server's name again. The same happens when
    the kernel stops serving the host because it left too many frames unread (a `Dropped`
    notice: the process was stopped, or its loop blocked, for too long); without reconnect,
    ``run()`` returns with ``host.dropped`` set.
    """

    def __init__(
        self, server: Any, endpoint: Optional[str] = None, *, reconnect: bool = False
    ) -> None:
        from .overlay import COverlay, layers_of

        if not isinstance(server, (CServer, COverlay)):
            raise TypeError(
                f"serve() needs a CServer (or a COverlay over one), got {type(server).__name__}"
            )
        self.overlays, self.server = layers_of(server)  # the overlays from the outermost in
        self.endpoint = endpoints.resolve(endpoint)
        self.sessions: dict[int, CSession] = {}
        self.clients: dict[int, ClientInfo] = {}
        # Per session handle, its delivered requests not yet completed (in ServiceL, or held),
        # by msg_id, so a Cancel can find them. A request leaves when it completes; the
        # session's table goes when the session is disconnected.
        self._in_service: dict[int, dict[int, RMessage]] = {}
        self._completion_lock = threading.Lock()
        self._outbox: collections.deque[bytes] = collections.deque()
        self._outbox_lock = threading.Lock()
        self._calls: collections.deque = collections.deque()  # call_soon
        self._wakeup = WakePipe()
        self._stopping = False
        self._loop_thread: Optional[int] = None
        self._problems: collections.Counter[str] = collections.Counter()
        # Handles of connects just refused: a first request sent with one still arrives.
        self._refused: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.kernel_died = False
        self.dropped = False  # the kernel stopped serving this registration (Dropped)
        self._indicated = False
        self._in_indication = False
        self._deregistration_done = False
        self._generation = 0  # +1 per kernel: messages of a dead kernel are never answered
        self._deregistered: Optional[threading.Event] = None
        self.reconnect = reconnect
        self.max_frame = MAX_FRAME

    def stop(self) -> None:
        """Ask the loop to finish. Safe from any thread and from signal handlers."""
        self._stopping = True
        self._wake()

    def run(self, ready: Optional[threading.Event] = None) -> None:
        """Register the server and serve until stopped. Raises the kernel's refusal (e.g.
        ``AlreadyExists``) or ``CouldNotConnect`` if no kernel answers."""
        try:
            self._run_with_kernel(ready)
            while self.reconnect and (self.kernel_died or self.dropped) and not self._stopping:
                why = "the kernel died" if self.kernel_died else "the kernel stopped serving it"
                self._forget_sessions(why)
                if self._deregistered is not None:  # it was ending anyway: no new registration
                    log.warning("server %r stops: %s while it deregistered", self.server.name, why)
                    return
                if self.kernel_died and not self._await_kernel():
                    return  # stopped while waiting
                self.kernel_died = self.dropped = False
                self._indicated, self._deregistered = False, None
                self._run_with_kernel(None)
        finally:
            self._wakeup.close()  # later completions (of held messages) are dropped

    def _run_with_kernel(self, ready: Optional[threading.Event]) -> None:
        context = zmq.Context()
        try:
            self._run_registered(context, ready)
        finally:
            self._loop_thread = None
            context.destroy(linger=1000)
            if self._deregistered is not None:
                self._deregistered.set()  # a waiter learns whether it completed
            if self._deregistration_done:
                self._forget_sessions("the server deregistered")  # its sessions end here too

    def _run_registered(self, context: zmq.Context, ready: Optional[threading.Event]) -> None:
        self._socket = context.socket(zmq.DEALER)
        self._socket.routing_id = os.urandom(16)
        self._socket.linger = 1000
        self._socket.connect(self.endpoint)
        kernel_pid = self._register()
        self._loop_thread = threading.get_ident()
        log.info("server %r registered with kernel %d", self.server.name, kernel_pid)
        if ready is not None:
            ready.set()
        self._serve(kernel_pid)

    def _forget_sessions(self, why: str) -> None:
        """The registration ended (kernel death, deregistration): every session ends. Each gets
        its Disconnect (whose completion, like that of any message of that registration, goes
        nowhere) and loses its subsessions."""
        sessions, self.sessions = self.sessions, {}
        self.clients.clear()
        self._refused.clear()  # (a new kernel numbers its handles anew)
        self._in_service.clear()
        with self._outbox_lock:
            self._outbox.clear()
            old_generation = self._generation
            self._generation += 1
        for handle, session in sessions.items():
            message = RMessage(self, 0, _MessageKind.DISCONNECT, -2, (), session, None)
            message._generation = old_generation
            try:
                session.Disconnect(message)
            except Exception:
                log.exception("Disconnect of a session of the dead kernel raised")
            _close_subsessions(session)
        if sessions:
            log.warning("server %r ended %d sessions: %s", self.server.name, len(sessions), why)

    def _await_kernel(self) -> bool:
        """Wait until a kernel answers on our endpoint; False if stopped meanwhile."""
        path = endpoints.ipc_path(self.endpoint)
        log.info("server %r waits for a kernel at %s", self.server.name, self.endpoint)
        while not self._stopping:
            if os.path.exists(path) and self._kernel_answers():
                return True
            select.select([self._wakeup.fd], [], [], _KERNEL_RETRY)
            self._wakeup.drain()
        return False

    def _kernel_answers(self) -> bool:
        context = zmq.Context()
        try:
            probe = context.socket(zmq.DEALER)
            probe.routing_id = os.urandom(16)
            probe.linger = 0
            probe.connect(self.endpoint)
            probe.send(encode(Hello(int(Role.SERVER), PROTOCOL_VERSION)))
            return bool(probe.poll(int(_KERNEL_RETRY * 1000)))
        finally:
            context.destroy(linger=0)

    # -- setup -------------------------------------------------------------------------------

    def _register(self) -> int:
        welcome = self._exchange(Hello(int(Role.SERVER), PROTOCOL_VERSION), Welcome)
        if welcome.protocol != PROTOCOL_VERSION:
            raise errors.IpcError(
                errors.KErrNotSupported,
                f"the kernel speaks ipcfw protocol {welcome.protocol}, this server "
                f"{PROTOCOL_VERSION}: run a kernel from the same ipcfw version",
            )
        self.max_frame = welcome.max_frame
        version = to_version(self.server.version, f"{type(self.server).__name__}.version")
        reply = self._exchange(
            Register(1, self.server.name, int(self.server.sharing), version), Completed
        )
        if reply.value < 0:
            raise errors.IpcError(reply.value, f"registering server name {self.server.name!r}")
        return welcome.kernel_pid

    def _exchange(self, message: Any, expected: type) -> Any:
        self._socket.send(encode(message))
        if not self._socket.poll(int(_REGISTER_TIMEOUT * 1000)):
            raise errors.IpcError(
                errors.KErrCouldNotConnect, f"no ipcfw kernel answered at {self.endpoint}"
            )
        reply = decode(self._socket.recv())
        if type(reply) is not expected:
            raise errors.IpcError(errors.KErrGeneral, f"kernel answered {reply!r}")
        return reply

    # -- the loop ----------------------------------------------------------------------------

    def _serve(self, kernel_pid: int) -> None:
        kernel_fd = os.pidfd_open(kernel_pid)
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wakeup.fd, zmq.POLLIN)
        poller.register(kernel_fd, zmq.POLLIN)
        try:
            while not self._stopping and not self.dropped:
                ready = dict(poller.poll())
                if self._wakeup.fd in ready:
                    self._flush_outbox()
                if self._socket in ready:
                    self._drain()
                if kernel_fd in ready:
                    log.error("the ipcfw kernel has died; server %r stops", self.server.name)
                    self.kernel_died = True
                    return
            if not self.dropped:
                self._flush_outbox()  # completions made before stop() still reach their clients
        finally:
            os.close(kernel_fd)

    def _drain(self) -> None:
        socket = self._socket
        for _ in range(256):
            try:
                raw = socket.recv(NOBLOCK)
            except zmq.Again:  # once per batch: cheaper than a getsockopt(EVENTS) per frame
                return
            try:
                message = decode(raw)
            except ProtocolError as exc:
                self._report("malformed frame", str(exc))
                continue
            handler = self._handlers.get(type(message))
            if handler is None:
                self._report(
                    "unexpected message", f"{type(message).__name__} is not sent to servers"
                )
                continue
            handler(self, message)
            if self.dropped:
                return  # nothing the kernel sent after its notice is meant for us

    def _report(self, kind: str, detail: str) -> None:
        self._problems[kind] += 1
        if self._problems[kind] == 1:
            log.warning("server %r dropped %s: %s (further ones are counted, not logged)",
                        self.server.name, kind, detail)

    def _on_peer_info(self, info: PeerInfo) -> None:
        self.clients[info.client] = ClientInfo(info.pid, info.uid, info.gid, info.exe)

    def _on_peer_gone(self, notice: PeerGone) -> None:
        self.clients.pop(notice.client, None)  # messages already built keep their ClientInfo

    def _on_new_session(self, request: NewSession) -> None:
        client = self.clients.get(request.client)
        message = RMessage(self, request.msg_id, _MessageKind.CONNECT, -1, (), None, client)
        try:
            version = TVersion(*request.version)
            reply = _negotiation_reply(self.server.AcceptL(client, version, request.payload))
            if self.overlays:
                session = _LayeredSession(self, request.handle, version, client)
                session.start(message)
            else:
                session = self.open_layer(0, version, message, request.handle)[1]
            if message.IsNull():
                raise ServerPanic(
                    "CServer", 2, "NewSessionL or CreateL completed the connect message"
                )
        except Exception as exc:
            code = _code_of(exc)
            log.info("connect to %r refused: %s", self.server.name, exc,
                     exc_info=not isinstance(exc, errors.IpcError))
            if not message.IsNull():
                message.Complete(code)
            self._refused[request.handle] = None  # its first request, if any, comes next
            if len(self._refused) > _REFUSED_KEPT:
                self._refused.popitem(last=False)
            return
        self.sessions[request.handle] = session
        self._in_service[request.handle] = {}
        if message._claim():
            self._completed(message, encode(Negotiated(request.msg_id, errors.KErrNone, reply)))

    def open_layer(
        self, start: int, version: TVersion, message: "RMessage", handle: int
    ) -> tuple[int, CSession]:
        """The session of the first layer from `start` (overlays outermost first, then the
        server) that takes the session: (its index, its CSession, CreateL done)."""
        for index in range(start, len(self.overlays) + 1):
            layer = self.overlays[index] if index < len(self.overlays) else self.server
            session = layer.NewSessionL(version, message)
            if session is None and index < len(self.overlays):
                continue  # this overlay hands off at once
            if not isinstance(session, CSession):
                raise TypeError(
                    f"{type(layer).__name__}.NewSessionL returned {type(session).__name__}"
                )
            session._server = layer
            session._handle = handle
            session.CreateL()
            return index, session
        raise AssertionError("unreachable: the server is the last layer")

    def call_soon(self, fn: Any) -> None:
        """Run `fn()` on the loop thread, soon (from any thread)."""
        self._calls.append(fn)
        self._wake()

    def _on_deliver(self, request: Deliver) -> None:
        session = self.sessions.get(request.handle)
        message = RMessage(self, request.msg_id, _MessageKind.REQUEST, request.function,
                           request.args, session, self.clients.get(request.client))
        if session is None:
            if request.handle in self._refused:
                del self._refused[request.handle]  # a refused connect's first request: expected
            else:
                self._report("request for an unknown session", f"handle 0x{request.handle:x}")
            message.Complete(errors.KErrBadHandle)
            return
        if request.function == ERROR_STRING_FUNCTION:
            try:
                self._error_string(message)
            except Exception as exc:  # bad arguments, or a layer's ErrorString raising
                log.info("ErrorString request failed: %s", exc,
                         exc_info=not isinstance(exc, errors.IpcError))
                if not message.IsNull():
                    message.Complete(_code_of(exc))
            return
        message._held_in = held = self._in_service[request.handle]
        held[request.msg_id] = message
        try:
            session.ServiceL(message)
        except Exception as exc:
            self._service_failed(session, message, exc)

    def _service_failed(self, session: CSession, message: RMessage, exc: Exception) -> None:
        if isinstance(exc, errors.IpcError):
            log.info("ServiceL(function %d) left with %s", message.Function(), exc, exc_info=True)
            error = exc
        else:
            log.error("ServiceL(function %d) raised", message.Function(), exc_info=True)
            error = errors.IpcError(errors.KErrGeneral, f"{type(exc).__name__}: {exc}")
            error.__cause__ = exc
        try:
            session.ServiceError(message, error)
        except Exception:
            log.exception("ServiceError raised")
        if not message.IsNull():
            message.Complete(error.code)

    def _on_disconnect(self, request: Disconnect) -> None:
        session = self.sessions.pop(request.handle, None)
        # The kernel has answered what the session still held: a Cancel now finds nothing.
        self._in_service.pop(request.handle, None)
        message = RMessage(self, request.msg_id, _MessageKind.DISCONNECT, -2, (), session, None)
        if session is None:
            message.Complete(errors.KErrNone)
            return
        try:
            session.Disconnect(message)
        except Exception:
            log.exception("Disconnect raised; completing the disconnect anyway")
            if not message.IsNull():
                message.Complete(errors.KErrNone)
        finally:
            # The session's subsessions end with it, whatever an overriding Disconnect did.
            _close_subsessions(session)

    def _on_terminating(self, notice: Terminating) -> None:
        if self._indicated:
            return
        self._indicated = True
        log.warning("server %r: the kernel ends its registration (%s)",
                    self.server.name, TerminationReason(notice.reason).name)
        self._in_indication = True
        try:
            self.server.TerminateIndication(TerminationReason(notice.reason))
        except Exception:
            log.exception("TerminateIndication raised")
        finally:
            self._in_indication = False
        # Deregister ourselves (without waiting here): the host stops once the kernel says
        # every outstanding message has completed.
        if self._begin_deregistration():
            self._socket.send(encode(Deregister(_DEREGISTER_REQ)))

    def _begin_deregistration(self) -> bool:
        """Create the deregistration event once; True for the caller that must send it."""
        with self._completion_lock:
            if self._deregistered is not None:
                return False
            self._deregistered = threading.Event()
            return True

    def _on_completed(self, reply: Completed) -> None:
        if reply.req_id == _DEREGISTER_REQ and self._deregistered is not None:
            self._deregistration_done = True
            self._deregistered.set()
            self.stop()

    def Deregister(self, timeout: Optional[float] = None) -> None:
        """End this server's registration: no new requests; returns once every message still
        outstanding has been completed (seed 002), then the host stops.

        Call it from another thread than the loop (the loop must go on completing the
        outstanding messages); from the loop thread, including from ``TerminateIndication``,
        it raises ``RuntimeError`` instead of deadlocking. Raises ``TimeoutError`` if
        `timeout` seconds pass first.
        """
        if threading.get_ident() == self._loop_thread:
            where = "TerminateIndication" if self._in_indication else "the server's loop thread"
            raise RuntimeError(
                f"Deregister() called from {where}: it waits for the loop to complete the "
                "outstanding messages, so it must be called from another thread"
            )
        if self._loop_thread is None:
            raise RuntimeError("the server is not running")
        if self._begin_deregistration():
            self._outbox.append(encode(Deregister(_DEREGISTER_REQ)))
            self._wake()
        if not self._deregistered.wait(timeout):
            raise TimeoutError(f"outstanding messages still pending after {timeout} s")
        if self.dropped:
            raise errors.IpcError(errors.KErrDisconnected, "the kernel stopped serving this server "
                                  "during Deregister (it left too many frames unread)")
        if not self._deregistration_done:
            raise errors.IpcError(errors.KErrServerTerminated, "the kernel died during Deregister")

    def _on_dropped(self, notice: Dropped) -> None:
        if notice.routing_id != self._socket.routing_id:
            self._report("Dropped notice for another socket", notice.routing_id.hex())
            return
        self.dropped = True
        then = "it registers again" if self.reconnect else "it stops"
        log.error(
            "the ipcfw kernel stopped serving server %r: %d frames waited unread for it (the "
            "kernel's max_backlog; was this process stopped or its loop blocked?); %s",
            self.server.name, notice.waiting, then,
        )

    def _on_cancelled(self, request: Cancelled) -> None:
        message = self._in_service.get(request.handle, {}).get(request.msg_id)
        if message is None or not message._cancel():
            return  # completed already: the kernel dropped our completion, or will
        session = message.Session()
        try:
            session.Cancelled(message)
        except Exception:
            log.exception("Cancelled raised")

    _handlers = {
        Terminating: _on_terminating,
        Completed: _on_completed,
        PeerInfo: _on_peer_info,
        PeerGone: _on_peer_gone,
        Cancelled: _on_cancelled,
        Dropped: _on_dropped,
        NewSession: _on_new_session,
        Deliver: _on_deliver,
        Disconnect: _on_disconnect,
    }

    # -- completions -------------------------------------------------------------------------

    def _completed(self, message: RMessage, frame: bytes) -> None:
        """Send a completion: directly on the loop thread, else via the outbox."""
        if threading.get_ident() == self._loop_thread:
            if self._current(message):
                self._socket.send(frame)
            return
        with self._outbox_lock:  # against _forget_sessions clearing the outbox meanwhile
            if not self._current(message):
                return
            self._outbox.append(frame)
        self._wake()

    def _current(self, message: RMessage) -> bool:
        if message._generation == self._generation:
            return True
        # From a kernel that died: the new one numbers its messages anew, so sending this
        # would complete somebody else's request.
        log.debug("dropping the completion of %r: its kernel has gone", message)
        return False

    def _wake(self) -> None:
        self._wakeup.wake()  # does nothing once the host has stopped: the completion is dropped

    def _error_string(self, message: "RMessage") -> None:
        """Answer ``RSession.ErrorString``: the overlays, outermost first, then the server."""
        code = message.Int0()
        text = None
        for layer in [*self.overlays, self.server]:
            text = layer.ErrorString(code)
            if text:
                break
        data = (text or "").encode()[: message.GetDesMaxLength(1)]
        if data:
            message.WriteL(1, data)
        message.Complete(len(data))

    def _flush_outbox(self) -> None:
        self._wakeup.drain()
        while self._calls:
            try:
                self._calls.popleft()()
            except Exception:
                log.exception("a call on the loop raised")
        while self._outbox:
            self._socket.send(self._outbox.popleft())


class _LayeredSession(CSession):
    """A session of a server with overlays: requests go to the layer managing it now.

    Host-internal. `current` is the managing overlay's `COverlaySession` until it hands off,
    then the next layer's session, down to the server's. Hand-offs happen on the loop thread,
    between two requests, so none is lost or reordered.
    """

    def __init__(
        self, host: "ServerHost", handle: int, version: TVersion, client: Optional[ClientInfo]
    ) -> None:
        self._host = host
        self._handle = handle
        self._version = version
        self._client = client
        self.index = -1
        self.current: Optional[CSession] = None
        self.failed: Optional[int] = None  # the code the overlaid layer refused the session with
        self._servicing = False
        self._handoff_pending = False

    @property
    def _object_ix(self) -> Optional[CObjectIx]:  # the current layer's subsessions
        return None if self.current is None else self.current._object_ix

    def start(self, connect: "RMessage") -> None:
        self._enter(*self._host.open_layer(0, self._version, connect, self._handle))

    def _enter(self, index: int, session: CSession) -> None:
        self.index, self.current = index, session
        session._layered = self  # type: ignore[attr-defined]  # (only overlays' sessions use it)

    def hand_off_from(self, session: CSession) -> None:
        if session is not self.current:
            return  # a second HandOff, or one from a layer already left: nothing to do
        if threading.get_ident() != self._host._loop_thread:
            self._host.call_soon(lambda: self.hand_off_from(session))
        elif self._servicing:
            self._handoff_pending = True  # right after this request, before the next one
        else:
            self._hand_off()

    def _hand_off(self) -> None:
        self._handoff_pending = False
        connect = RMessage(self._host, 0, _MessageKind.CONNECT, -1, (), None, self._client)
        connect._cancelled = True  # a stand-in: nothing about it is sent to the kernel
        _close_subsessions(self.current)  # the overlay's own subsessions end with its part
        try:
            self._enter(
                *self._host.open_layer(self.index + 1, self._version, connect, self._handle)
            )
        except Exception as exc:
            self.failed = _code_of(exc)
            self.current = None
            log.info("the layer under %r refused the session: %s",
                     self._host.overlays[self.index], exc,
                     exc_info=not isinstance(exc, errors.IpcError))

    def ServiceL(self, message: "RMessage") -> None:
        if self.failed is not None:
            raise errors.IpcError(self.failed, "the overlaid server refused this session")
        current = self.current
        message._session = current
        self._servicing = True
        try:
            current.ServiceL(message)
        except Exception as exc:
            self._host._service_failed(current, message, exc)
        finally:
            self._servicing = False
            if self._handoff_pending:
                self._hand_off()

    def Cancelled(self, message: "RMessage") -> None:
        if self.current is not None:
            self.current.Cancelled(message)

    def Disconnect(self, message: "RMessage") -> None:
        current = self.current
        if current is None:
            message.Complete(errors.KErrNone)
            return
        if self.index < len(self._host.overlays):
            current.Stop()  # an overlay still manages it: ask it to stop
        try:
            current.Disconnect(message)
        finally:
            _close_subsessions(current)
            self.current = None  # a HandOff that comes after this is ignored


def _negotiation_reply(reply: object) -> bytes:
    if reply is None:
        return b""
    if not isinstance(reply, bytes):
        raise TypeError(f"AcceptL must return bytes or None, not {type(reply).__name__}")
    if len(reply) > MAX_PAYLOAD:
        raise ValueError(f"AcceptL's reply of {len(reply)} bytes exceeds {MAX_PAYLOAD}")
    return reply


def _close_subsessions(session: CSession) -> None:
    if session._object_ix is not None:
        try:
            session._object_ix.CloseAll()
        except Exception:
            log.exception("closing a subsession object of a closed session raised")


def _code_of(exc: BaseException) -> int:
    return exc.code if isinstance(exc, errors.IpcError) else errors.KErrGeneral


def serve(server: CServer, endpoint: Optional[str] = None,
          ready: Optional[threading.Event] = None) -> ServerHost:
    """Host `server` on this thread until the host is stopped; returns the stopped host.

    Called on the main thread, SIGINT and SIGTERM stop the host cleanly for the duration.
    """
    host = ServerHost(server, endpoint)
    if threading.current_thread() is not threading.main_thread():
        host.run(ready)
        return host
    previous = {signum: signal.signal(signum, lambda *_: host.stop())
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        host.run(ready)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return host
