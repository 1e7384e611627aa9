"""The client side: RSession, TIpcArgs, TRequestStatus and User.

A client is any Python process that holds `RSession` handles. It needs no setup beyond a running
kernel (found through ``IPCFW_KERNEL`` or the default endpoint)::

    from ipcfw import RSession, TIpcArgs, TRequestStatus

    with RSession.connect("echo") as session:
        assert session.SendReceive(1, (42,)) == 42          # synchronous
        reply = bytearray(64)
        session.SendReceive(2, TIpcArgs(b"hello", reply))   # server writes into `reply`
        status = TRequestStatus()
        session.SendReceive(1, (7,), status)                # asynchronous
        assert status.Wait() == 7

Every method may be called from any thread; see `ipcfw._runtime` for how.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import types
import warnings
from typing import Any, Callable, Generator, Iterable, Iterator, Optional, Union

from .. import errors
from .runtime import Channel, Pending, Runtime
from ..naming import name_problem
from ..protocol import (
    I32_MAX,
    I32_MIN,
    EGlobalSharableSessions,
    ESharableSessions,
    EUnsharableSessions,
    TServerType,
    ERROR_STRING_FUNCTION,
    MAX_PAYLOAD,
    MAX_TOKEN,
    Cancel,
    Close,
    Completed,
    Connect,
    Connected,
    Mode,
    Open,
    Panicked,
    Request,
    Share,
    Shared,
    Stats,
    StatsReply,
    Terminate,
    TerminationReason,
    encode,
)
from ..version import TVersion, to_version

log = logging.getLogger("ipcfw.client")

__all__ = [
    "RSession", "TIpcArgs", "TRequestStatus", "User", "kernel_statistics", "terminate_server"
]

_SYNC, _ASYNC, _BLIND = int(Mode.SYNC), int(Mode.ASYNC), int(Mode.BLIND)  # (enum reads cost 0.1 us)
_ERROR_STRING_MAX = 1024  # bytes of an error description fetched from a server
Arg = Union[int, bytes, bytearray]


class TIpcArgs:
    """Up to four request arguments (Symbian ``TIpcArgs``).

    Each argument is one of:

    * an ``int``: a 32-bit signed integer (``RMessage.Int0()`` ...);
    * ``bytes``: a read-only descriptor (``ReadL``, ``GetDesLength``);
    * a ``bytearray``: a writable descriptor. Its length before the call is its max length; when
      the request completes it holds exactly what the server wrote (``WriteL``), and its length
      becomes offset + bytes written.

    Bad arguments raise ``TypeError`` or ``ValueError`` here, before anything is sent. A plain
    tuple is accepted wherever a TIpcArgs is::

        session.SendReceive(EWrite, TIpcArgs(3, b"data"))
        session.SendReceive(EWrite, (3, b"data"))
    """

    __slots__ = ("wire", "buffers")

    def __init__(self, *args: Arg) -> None:
        if len(args) > 4:
            raise ValueError(f"TIpcArgs takes at most 4 arguments, got {len(args)}")
        self.buffers: dict[int, bytearray] = {}
        self.wire: tuple = args  # plain ints and bytes go on the wire as they are
        for arg in args:
            kind = type(arg)
            if not (kind is bytes or (kind is int and I32_MIN <= arg <= I32_MAX)):
                self.wire = tuple(self._wire_arg(index, arg) for index, arg in enumerate(args))
                break

    def _wire_arg(self, index: int, arg: Arg) -> Any:
        if isinstance(arg, bytearray):
            self.buffers[index] = arg
            return (bytes(arg), len(arg))
        if isinstance(arg, bytes):
            return bytes(arg)
        if isinstance(arg, int):
            if not I32_MIN <= arg <= I32_MAX:
                raise ValueError(f"argument {index}: {arg} does not fit in a 32-bit signed int")
            return int(arg)
        raise TypeError(f"argument {index}: {type(arg).__name__} is not an int, bytes or bytearray")

    @classmethod
    def of(cls, args: Union["TIpcArgs", Iterable[Arg], None]) -> "TIpcArgs":
        if type(args) is tuple:
            return cls(*args)
        if isinstance(args, TIpcArgs):
            return args
        if args is None:
            return _NO_ARGS
        if isinstance(args, (bytes, bytearray, str, int)):
            raise TypeError(
                f"args must be a TIpcArgs or a tuple of arguments, not {type(args).__name__}"
            )
        return cls(*args)

    def __repr__(self) -> str:
        return f"TIpcArgs{self.wire!r}"


_NO_ARGS = TIpcArgs()


class TRequestStatus:
    """The status of an asynchronous request (Symbian ``TRequestStatus``).

    ``Int()`` is the raw value: ``KRequestPending`` until the request completes, then its
    completion value. Wait for it Symbian style (``Wait()`` returns the raw value, negative for an
    error), Python style (``result()`` and ``await status`` return it or raise the ``IpcError``
    for a negative one), or with ``add_done_callback``. ``User.WaitForRequest`` waits for the
    first of several. A status may be reused once its request has completed::

        status = TRequestStatus()
        session.SendReceive(EGetNotification, (), status)
        ...
        if status.Wait(timeout=5.0) == KErrNone:
            ...

    If the server panicked the client, ``Int()`` is ``KErrDied`` and ``result()`` raises
    ``ClientPanic``. Where ipcfw itself completes a request with an error, ``result()`` raises
    an ``IpcError`` whose message says why (for example ``Disconnected`` when the kernel
    stopped serving the thread).
    """

    __slots__ = ("_value", "_done", "_callbacks", "_error", "_channel", "_req_id")

    def __init__(self) -> None:
        self._value = errors.KRequestPending
        self._done = False
        # made on first use
        self._callbacks: Optional[list[Callable[["TRequestStatus"], None]]] = None
        # What result() raises, when more is known than the value (a panic, or why it failed).
        self._error: Optional[Exception] = None
        self._channel: Optional[Channel] = None  # where its answer arrives, once in use
        self._req_id = 0

    def Int(self) -> int:
        """The raw value: ``KRequestPending`` while pending, else the completion value."""
        return self._value

    def done(self) -> bool:
        return self._done

    def Wait(self, timeout: Optional[float] = None) -> int:
        """Block until the request completes and return its raw value.

        Raises ``TimeoutError`` if `timeout` seconds pass first (the request stays pending).
        """
        if not self._done:
            channel = self._channel
            if channel is None:
                raise RuntimeError("this TRequestStatus has not been given to a request")
            channel.runtime.wait((self,), timeout)
        return self._value

    def Cancel(self, timeout: Optional[float] = 5.0) -> int:
        """Cancel the pending request and return its final value, like Symbian's
        ``CActive::Cancel``: it waits until the request has completed.

        The value is ``KErrCancel``, unless the server completed the request first (then its
        value). Either way it completes exactly once, its message slot is freed, and the
        server's session is told (``CSession.Cancelled``). Cancelling a completed request
        returns its value and sends nothing.
        """
        if not self._done:
            channel = self._channel
            if channel is None:
                raise RuntimeError("this TRequestStatus has not been given to a request")
            channel.send(encode(Cancel(self._req_id)))
        return self.Wait(timeout)

    def result(self, timeout: Optional[float] = None) -> int:
        """Block until completion; return the value, or raise the error it completed with."""
        value = self.Wait(timeout)
        if self._error is not None:
            raise self._error
        return errors.check(value)

    def add_done_callback(self, fn: Callable[["TRequestStatus"], None]) -> None:
        """Call ``fn(status)`` once the request completes (at once if it already has).

        The callback runs on whichever thread processes the completion: a thread waiting for
        it, the thread that made the request when it next waits or makes a call (within a
        millisecond or so if it only sends async requests), or, if that thread is idle, the
        runtime's I/O thread within milliseconds. Keep callbacks short.
        """
        with _STATUS_LOCK:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        fn(self)

    def __await__(self) -> Generator[Any, None, int]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.add_done_callback(lambda _: loop.call_soon_threadsafe(_resolve, future))
        channel = self._channel
        if self._done or channel is None:
            yield from future.__await__()
        else:
            with _settled_by_loop(loop, channel):
                yield from future.__await__()
        return self.result(0)

    def _begin(self, channel: Channel, req_id: int) -> None:
        if self._channel is not None and not self._done:
            raise RuntimeError("this TRequestStatus is already in use by a pending request")
        self._req_id = req_id
        self._value = errors.KRequestPending
        self._error = None
        self._done = False
        self._channel = channel

    def _abandon(self) -> None:
        """The request could not be sent: the status is free again, still pending."""
        self._channel = None

    def _complete(self, value: int, error: Optional[Exception] = None) -> None:
        with _STATUS_LOCK:
            self._value = value
            self._error = error
            self._done = True
            callbacks, self._callbacks = self._callbacks, None
        for fn in callbacks or ():
            try:
                fn(self)
            except Exception:
                log.exception("a TRequestStatus callback raised")

    def __repr__(self) -> str:
        value = "KRequestPending" if self._value == errors.KRequestPending else self._value
        return f"<TRequestStatus {value}>"


# Guards TRequestStatus callback lists against a completion racing add_done_callback.
_STATUS_LOCK = threading.Lock()


@contextlib.contextmanager
def _settled_by_loop(loop: asyncio.AbstractEventLoop, channel: Channel) -> Iterator[None]:
    """While awaited, the event loop settles `channel` whenever its socket signals."""
    count = channel.loop_readers.get(loop, 0)
    if count == 0:
        loop.add_reader(channel.fd, channel.try_settle)
    channel.loop_readers[loop] = count + 1
    # Registered first, then settled: an answer that arrived behind a send which did not
    # settle is read now, and later sends settle (they see the loop among the readers).
    channel.try_settle()
    try:
        yield
    finally:
        count = channel.loop_readers.pop(loop) - 1
        if count:
            channel.loop_readers[loop] = count
        else:
            loop.remove_reader(channel.fd)


def _resolve(future: "asyncio.Future[None]") -> None:
    if not future.done():
        future.set_result(None)


class User:
    """Symbian's ``User`` class, for the calls that concern requests."""

    @staticmethod
    def WaitForRequest(
        *statuses: TRequestStatus, timeout: Optional[float] = None
    ) -> TRequestStatus:
        """Block until one of `statuses` completes; return the first completed one.

        Raises ``TimeoutError`` if none completes within `timeout` seconds.
        """
        if not statuses:
            raise TypeError("WaitForRequest needs at least one TRequestStatus")
        for status in statuses:
            if status.done():
                return status
        channel = next((s._channel for s in statuses if s._channel is not None), None)
        if channel is None:
            raise RuntimeError("none of these TRequestStatus objects has been given to a request")
        return channel.runtime.wait(statuses, timeout)


class _OnClassOrInstance:
    """A method that makes a new `RSession` when called on the class, and acts on the
    `RSession` it is called on otherwise.

    ``RSession.connect(...)`` and ``RSession.Open(token)`` return a new session; Symbian's
    ``Open`` is an instance method, so ``session.Open(token)`` (and ``session.connect(...)``)
    fill `session` instead, with the same checks as `RSession.CreateSession`. The function
    gets the class or the instance as its first argument.
    """

    def __init__(self, function: Callable[..., "RSession"]) -> None:
        self.__func__ = function
        functools.update_wrapper(self, function)

    def __get__(self, session: Optional["RSession"], owner: type) -> Callable[..., "RSession"]:
        return types.MethodType(self.__func__, owner if session is None else session)


def _session_of(target: Union[type, "RSession"]) -> "RSession":
    return target() if isinstance(target, type) else target


class RSession:
    """A client's handle to a session with a server (Symbian ``RSessionBase``).

    ::

        session = RSession()
        session.CreateSession("kv", TVersion(1, 0, 0), message_slots=4)
        try:
            session.SendReceive(ESet, (b"key", b"value"))
        finally:
            session.Close()

    or ``with RSession.connect("kv") as session: ...``. A session created by a thread belongs to
    that thread; requests on it from another thread are refused with
    ``ClientPanic("KERN-EXEC", 0)`` until it is shared with `ShareAuto` (every thread of the
    process) or `ShareProtected` (other processes too, through `RSession.Open`).

    One ``RSession`` holds one session at a time: connecting it again while it is connected
    raises ``ClientPanic("KERN-EXEC", 57)``, and while another thread is connecting it,
    ``ClientPanic("KERN-EXEC", 9)`` (as Symbian panics a second connect while one is
    outstanding). Use one ``RSession`` per session.
    """

    def __init__(self) -> None:
        self._handle = 0
        self._runtime: Optional[Runtime] = None
        self._owner: Optional[threading.Thread] = None  # unshared sessions are its creator's alone
        self._sharing = EUnsharableSessions  # or shared: ShareAuto, ShareProtected (by token)
        self._negotiation_reply = b""
        self._dead: Optional[BaseException] = None
        self._abort_callback: Optional[Callable[["RSession", errors.IpcError], None]] = None
        self._sync_calls: dict[int, Channel] = {}  # req_id -> channel, of sync calls in flight
        self._connecting: Optional[threading.Thread] = None  # the thread connecting it, meanwhile
        self._lock = threading.Lock()

    @_OnClassOrInstance
    def connect(
        target: Union[type["RSession"], "RSession"],
        name: str,
        version: tuple = TVersion(1, 0, 0),
        message_slots: int = -1,
        *,
        endpoint: Optional[str] = None,
        timeout: Optional[float] = None,
        payload: bytes = b"",
    ) -> "RSession":
        """Create and return a connected session (see `CreateSession`).

        Called on an ``RSession`` (``session.connect(name)``) it connects that one and returns
        it, raising as `CreateSession` does if it is connected or connecting.
        """
        session = _session_of(target)
        session.CreateSession(
            name, version, message_slots, endpoint=endpoint, timeout=timeout, payload=payload
        )
        return session

    def CreateSession(
        self,
        name: str,
        version: tuple = TVersion(1, 0, 0),
        message_slots: int = -1,
        *,
        endpoint: Optional[str] = None,
        timeout: Optional[float] = None,
        payload: bytes = b"",
        first_request: Optional[tuple] = None,
    ) -> Optional[int]:
        """Connect to the server registered as `name` (case-insensitive).

        `message_slots`: ``-1`` draws async slots from the kernel's pool, ``0`` allows only
        synchronous calls, ``1..255`` reserves that many for this session.

        `payload` (at most 256 bytes) is the negotiation payload the server's ``AcceptL`` sees;
        its answer is `NegotiationReply()` afterwards. `first_request` = ``(function, args)``
        is sent with the connect and served in the same round trip: its completion value is
        returned (or its error raised; the session stays connected either way). Without it,
        returns None.

        Raises ``NotFound`` if no server has that name, ``BadName`` for an invalid name,
        ``BadArgument`` for a bad slot count or a payload over 256 bytes, and whatever the
        server's ``AcceptL``, ``NewSessionL`` or ``CreateL`` raised (``NotSupported`` for a
        version it does not serve). Raises ``ClientPanic("KERN-EXEC", 57)`` if this
        ``RSession`` is connected already, ``ClientPanic("KERN-EXEC", 9)`` if another thread is
        connecting it; nothing is sent then.
        """
        self._begin_connect()
        try:
            return self._create_session(
                name, version, message_slots, endpoint, timeout, payload, first_request
            )
        finally:
            self._end_connect()

    def _create_session(
        self,
        name: str,
        version: tuple,
        message_slots: int,
        endpoint: Optional[str],
        timeout: Optional[float],
        payload: bytes,
        first_request: Optional[tuple],
    ) -> Optional[int]:
        version = to_version(version)
        problem = name_problem(name)
        if problem:
            raise errors.IpcError(errors.KErrBadName, problem)
        if type(message_slots) is not int:
            raise TypeError(f"message_slots must be an int, not {type(message_slots).__name__}")
        if not -1 <= message_slots <= 255:
            raise errors.IpcError(
                errors.KErrArgument, f"message_slots must be -1, 0 or 1..255, got {message_slots}"
            )
        if not isinstance(payload, bytes):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        if len(payload) > MAX_PAYLOAD:
            raise errors.IpcError(
                errors.KErrArgument,
                f"negotiation payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}",
            )
        first, first_args = self._first_request(first_request)
        runtime = Runtime.for_endpoint(endpoint)
        req_id = runtime.next_req_id()
        if first:
            first = (runtime.next_req_id(), *first)
        frame = encode(Connect(req_id, name, version, message_slots, payload, first))
        if first:
            reply, answer = runtime.channel().call_then(frame, req_id, first[0], timeout)
        else:
            reply, answer = runtime.channel().call(frame, req_id, timeout, connect=True), None
        if type(reply) is Panicked:
            raise errors.ClientPanic(reply.category, reply.reason)
        if type(reply) is not Connected:
            raise errors.IpcError(errors.KErrGeneral, f"unexpected reply to connect: {reply!r}")
        _check_connected(reply.result)
        self._attach(runtime, reply.handle, sharing=EUnsharableSessions)
        self._negotiation_reply = reply.payload
        if isinstance(answer, TimeoutError):
            raise TimeoutError(f"connected, but the first request had no answer within {timeout} s")
        return None if answer is None else self._finish(answer, first_args)

    def _begin_connect(self) -> None:
        """Mark this RSession as connecting, or raise the panic Symbian gives a second connect."""
        with self._lock:
            if self._handle:
                raise errors.ClientPanic(
                    "KERN-EXEC", 57,
                    f"this RSession is already connected (handle 0x{self._handle:x}): close it "
                    "first, or connect another RSession",
                )
            connecting = self._connecting
            if connecting is not None:
                raise errors.ClientPanic(
                    "KERN-EXEC", 9,
                    f"this RSession is already being connected, by thread {connecting.name!r}: "
                    "one RSession holds one session, so connect another RSession",
                )
            self._connecting = threading.current_thread()

    def _end_connect(self) -> None:
        with self._lock:
            self._connecting = None

    @staticmethod
    def _first_request(first_request: Optional[tuple]) -> tuple[tuple, "TIpcArgs"]:
        if first_request is None:
            return (), _NO_ARGS
        if not isinstance(first_request, tuple) or len(first_request) != 2:
            raise TypeError("first_request must be a (function, args) pair")
        function, args = first_request
        if type(function) is not int or not 0 <= function <= I32_MAX:
            raise ValueError(f"first_request function must be in 0..2**31-1, got {function!r}")
        ipc_args = TIpcArgs.of(args)
        return (function, ipc_args.wire), ipc_args

    def ErrorString(self, code: int) -> str:
        """A description of error `code`, asked along the chain (seed 000): the session's
        overlays for the codes they own, then its server, then ``ipcfw.errors.describe``."""
        buffer = bytearray(_ERROR_STRING_MAX)
        if self.SendReceive(ERROR_STRING_FUNCTION, (code, buffer)) > 0:
            return buffer.decode(errors="replace")
        return errors.describe(code)

    def NegotiationReply(self) -> bytes:
        """What the server's ``AcceptL`` answered to this session's connect (b"" if nothing)."""
        return self._negotiation_reply

    @_OnClassOrInstance
    def Open(
        target: Union[type["RSession"], "RSession"],
        token: bytes,
        *,
        endpoint: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> "RSession":
        """Attach to a session another process shared with `ShareProtected` (by its token).

        Returns a new `RSession` on the same server-side session, usable from any thread of
        this process. Raises ``PermissionDenied`` for a token that is unknown or whose session
        has ended, ``Overflow`` if 255 threads are attached to it already::

            token = session.ShareProtected()      # in the owning process
            shared = RSession.Open(token)         # in another process

        Called on an ``RSession`` (``shared.Open(token)``, as in Symbian) it attaches that one
        and returns it; like `CreateSession`, it raises ``ClientPanic("KERN-EXEC", 57)`` if
        that ``RSession`` is connected and ``ClientPanic("KERN-EXEC", 9)`` if another thread is
        connecting it.
        """
        session = _session_of(target)
        session._begin_connect()
        try:
            session._open(token, endpoint, timeout)
        finally:
            session._end_connect()
        return session

    def _open(self, token: bytes, endpoint: Optional[str], timeout: Optional[float]) -> None:
        if not isinstance(token, bytes):
            raise TypeError(f"token must be bytes, not {type(token).__name__}")
        if len(token) > MAX_TOKEN:
            raise ValueError(f"token of {len(token)} bytes is longer than any ipcfw token")
        runtime = Runtime.for_endpoint(endpoint)
        req_id = runtime.next_req_id()
        reply = runtime.channel().call(encode(Open(req_id, token)), req_id, timeout, connect=True)
        if type(reply) is not Connected:
            raise errors.IpcError(errors.KErrGeneral, f"unexpected reply to Open: {reply!r}")
        _check_connected(reply.result, also="255 threads are attached to the session, or ")
        self._attach(runtime, reply.handle, sharing=EGlobalSharableSessions)

    def ShareAuto(self) -> None:
        """Let every thread of this process use the session (Symbian ``ShareAuto``).

        The session then belongs to the process: it stays open when its creating thread ends,
        until it is closed or the process dies. Raises ``PermissionDenied`` if the server's
        ``sharing`` does not allow it (``EUnsharableSessions``).
        """
        self._share(ESharableSessions)

    def ShareProtected(self) -> bytes:
        """Let other processes attach to the session; returns the token they pass to `Open`.

        The token is 128 random bits, the same each time for one session, and useless once
        the session has ended. Raises ``PermissionDenied`` unless the server allows
        ``EGlobalSharableSessions``. Implies `ShareAuto`.
        """
        return self._share(EGlobalSharableSessions)

    def _share(self, mode: TServerType) -> bytes:
        runtime, handle = self._check_usable(0)
        req_id = runtime.next_req_id()
        reply = runtime.channel().call(encode(Share(req_id, handle, mode)), req_id)
        if type(reply) is Panicked:
            self._finish(reply, _NO_ARGS)
        if type(reply) is not Shared:
            raise errors.IpcError(errors.KErrGeneral, f"unexpected reply to Share: {reply!r}")
        errors.check(reply.result)
        self._sharing = max(self._sharing, mode)
        return reply.token

    def _attach(self, runtime: Runtime, handle: int, sharing: TServerType) -> None:
        self._runtime, self._handle, self._dead = runtime, handle, None
        self._owner = threading.current_thread()
        self._sharing = sharing
        runtime.register_session(handle, self)

    def Handle(self) -> int:
        """The kernel's handle for this session; 0 when not connected."""
        return self._handle

    def SendReceive(
        self,
        function: int,
        args: Union[TIpcArgs, Iterable[Arg], None] = (),
        status: Optional[TRequestStatus] = None,
        *,
        timeout: Optional[float] = None,
    ) -> Optional[int]:
        """Send a request to the server.

        Without `status` the call is synchronous: it returns the completion value (>= 0) or
        raises the ``IpcError`` subclass for a negative one. It never takes a message slot.

        With a `TRequestStatus` it is asynchronous: it returns None at once and the status
        completes later. With no free message slot it completes at once with
        ``KErrServerBusy``.
        """
        ipc_args = TIpcArgs.of(args)
        runtime, handle = self._check_usable(function)
        req_id = runtime.next_req_id()
        if status is None:
            frame = encode(Request(req_id, handle, function, ipc_args.wire, _SYNC))
            channel = runtime.channel()
            self._sync_calls[req_id] = channel  # so a Close from another thread can end it
            try:
                return self._finish(channel.call(frame, req_id, timeout), ipc_args)
            finally:
                self._sync_calls.pop(req_id, None)
        frame = encode(Request(req_id, handle, function, ipc_args.wire, _ASYNC))
        channel = runtime.channel()
        status._begin(channel, req_id)
        try:
            channel.send_async(frame, req_id, Pending(status, self, ipc_args.buffers, channel))
        except BaseException:
            status._abandon()
            raise
        return None

    def Send(self, function: int, args: Union[TIpcArgs, Iterable[Arg], None] = ()) -> None:
        """Send a blind request: the server gets it; its completion value is not returned.

        Takes a message slot until the server completes it. Returns once the kernel has queued
        the request; raises ``ServerBusy`` with no free slot, ``ServerTerminated`` if the server
        has gone. Writable descriptors are not written back.
        """
        ipc_args = TIpcArgs.of(args)
        runtime, handle = self._check_usable(function)
        req_id = runtime.next_req_id()
        frame = encode(Request(req_id, handle, function, ipc_args.wire, _BLIND))
        self._finish(runtime.channel().call(frame, req_id), _NO_ARGS)

    def Close(self) -> None:
        """Close the session. The server gets ``Disconnect`` once, after every earlier request.

        Requests still pending complete at once with ``KErrSessionClosed``. Closing a closed
        session does nothing.
        """
        owner = self._owner
        unshared = self._sharing == EUnsharableSessions
        owner_gone = unshared and owner is not None and not owner.is_alive()
        if self._handle and unshared and owner is not threading.current_thread() and not owner_gone:
            raise errors.ClientPanic(
                "KERN-EXEC", 0,
                "an unshared session can only be closed by the thread that created it",
            )
        with self._lock:
            runtime, handle = self._runtime, self._handle
            self._handle, self._runtime = 0, None
        if not handle:
            return
        runtime.forget_session(handle, self)
        for req_id in runtime.requests_of(self):
            runtime.complete(req_id, errors.KErrSessionClosed)
        for req_id, channel in list(self._sync_calls.items()):
            # Another thread waits in a sync call on this session: the kernel will not answer
            # it now, so it is answered here (its thread sees this within one wait slice).
            if req_id in channel.replies:
                channel.replies[req_id] = Completed(req_id, errors.KErrSessionClosed, ())
        # When the creating thread has ended, or the kernel stopped serving its channel
        # (Disconnected), the channel's end already closed the session.
        ended_with_channel = isinstance(self._dead, errors.Disconnected)
        if not runtime.kernel_dead and not owner_gone and not ended_with_channel:
            runtime.channel().send(encode(Close(handle)))

    def __enter__(self) -> "RSession":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.Close()

    def __del__(self) -> None:
        if self._handle:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)

    def __repr__(self) -> str:
        if not self._handle:
            return (
                "<RSession connecting>" if self._connecting is not None
                else "<RSession not connected>"
            )
        state = f" dead: {self._dead}" if self._dead else ""
        runtime = self._runtime  # (once: a Close on another thread may clear it meanwhile)
        pending = len(runtime.requests_of(self)) if runtime is not None else 0
        return f"<RSession 0x{self._handle:x} pending={pending}{state}>"

    # -- internals ---------------------------------------------------------------------------

    def _check_usable(self, function: int) -> tuple[Runtime, int]:
        if type(function) is not int:
            raise TypeError(f"function must be an int, not {type(function).__name__}")
        if not 0 <= function <= I32_MAX:
            raise ValueError(f"function must be in 0..2**31-1, got {function}")
        runtime, handle = self._runtime, self._handle
        if not handle or runtime is None:
            raise errors.ClientPanic("KERN-EXEC", 0, "the session is not connected")
        if self._dead is not None:
            raise self._dead
        return runtime, handle

    def _finish(self, reply: Any, ipc_args: TIpcArgs) -> int:
        if type(reply) is Panicked:
            panic = errors.ClientPanic(reply.category, reply.reason)
            if reply.session_dead and reply.handle == self._handle:
                self._lost(panic)
            raise panic
        if type(reply) is not Completed:
            raise errors.IpcError(errors.KErrGeneral, f"unexpected reply: {reply!r}")
        for index, data in reply.writes:
            buffer = ipc_args.buffers.get(index)
            if buffer is not None:
                buffer[:] = data
        return errors.check(reply.value)

    def _lost(self, error: BaseException) -> None:
        """The session died under us (server panic or death, kernel death)."""
        with self._lock:
            if self._dead is not None:
                return
            self._dead = error
            callback = self._abort_callback
        if callback is not None and isinstance(error, errors.IpcError):
            self._run_abort_callback(callback, error)

    def SetAbortCallback(
        self, callback: Optional[Callable[["RSession", errors.IpcError], None]]
    ) -> None:
        """Call ``callback(session, error)`` once, as soon as the session's server is gone.

        The RMC ``abort_session`` callback (seed 001): it fires promptly when the server dies or
        deregisters, or the kernel dies, whether or not a request is pending, so a client
        learns of the failure without waiting for its next call. It runs on the runtime's I/O
        thread; keep it short. If the server is gone already, it is called at once. A server
        panicking this client does not call it (the client's call raises ``ClientPanic``).
        ``None`` removes it.
        """
        with self._lock:
            self._abort_callback = callback
            dead = self._dead
        if callback is not None and isinstance(dead, errors.IpcError):
            self._run_abort_callback(callback, dead)

    def _run_abort_callback(self, callback: Callable, error: errors.IpcError) -> None:
        try:
            callback(self, error)
        except Exception:
            log.exception("an abort callback raised")


def _check_connected(code: int, also: str = "") -> None:
    """Raise the error a connect or Open was refused with; for KErrOverflow, say which limits
    it means (`also`: the other one an Open can meet)."""
    if code == errors.KErrOverflow:
        raise errors.IpcError(
            code,
            f"refused: {also}this process holds the kernel's limit of sessions (ipcfw kernel "
            "--sessions-per-process; close a session first), unless the server itself refused "
            "with KErrOverflow",
        )
    errors.check(code)


def terminate_server(
    name: str,
    reason: TerminationReason = TerminationReason.ADMINISTRATOR,
    *,
    endpoint: Optional[str] = None,
    timeout: Optional[float] = None,
) -> None:
    """End server `name`'s registration with `reason` (what ``ipcfw terminate`` does).

    The server's ``TerminateIndication`` is called; no new request reaches it; this returns
    once the messages it still held have been completed and its name is free. Raises
    ``NotFound`` if no server has that name, ``TimeoutError`` after `timeout` seconds.
    """
    runtime = Runtime.for_endpoint(endpoint)
    req_id = runtime.next_req_id()
    reply = runtime.channel().call(encode(Terminate(req_id, name, int(reason))), req_id, timeout)
    if type(reply) is not Completed:
        raise errors.IpcError(errors.KErrGeneral, f"unexpected reply to Terminate: {reply!r}")
    errors.check(reply.value)


def kernel_statistics(endpoint: Optional[str] = None, timeout: float = 5.0) -> dict[str, int]:
    """The kernel's counters: peers, processes, servers, sessions by state, messages, slots."""
    runtime = Runtime.for_endpoint(endpoint)
    req_id = runtime.next_req_id()
    reply = runtime.channel().call(encode(Stats(req_id)), req_id, timeout)
    if type(reply) is not StatsReply:
        raise errors.IpcError(errors.KErrGeneral, f"unexpected reply to Stats: {reply!r}")
    return dict(reply.counters)
