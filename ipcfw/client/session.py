"""RSession: a client's handle to a session with a server; terminate_server.

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

Every method may be called from any thread; see `ipcfw.client.runtime` for how. The rules
of a session's lifecycle are in `ipcfw.client.state`.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import types
import warnings
from typing import Any, overload
from collections.abc import Callable

from .. import errors
from ..naming import name_problem, not_registered
from ..protocol import (
    ERROR_STRING_FUNCTION,
    I32_MAX,
    MAX_PAYLOAD,
    MAX_TOKEN,
    Message,
    Completed,
    Connect,
    Connected,
    EGlobalSharableSessions,
    ESharableSessions,
    EUnsharableSessions,
    Mode,
    Open,
    Panicked,
    Path,
    Request,
    Share,
    Shared,
    Terminate,
    TerminationReason,
    TServerType,
    encode,
)
from ..version import TVersion, to_version
from .args import NO_ARGS, Args, TIpcArgs
from . import shm
from .runtime import AnyChannel, DirectChannel, Runtime
from .state import UNDECIDED, Pending, SessionLife
from .status import TRequestStatus, abandon_request, begin_request, complete_request
from . import aio
from .waiting import wait_for_server, wait_for_server_async

log = logging.getLogger("ipcfw.client")

__all__ = ["RSession", "terminate_server"]

_SYNC, _ASYNC, _BLIND = int(Mode.SYNC), int(Mode.ASYNC), int(Mode.BLIND)  # (enum reads cost 0.1 us)
_PATHS = {"kernel": int(Path.KERNEL), "direct": int(Path.DIRECT)}  # CreateSession's `path`
#: The environment variable naming the data path of sessions created without ``path=``.
PATH_VAR = "IPCFW_PATH"
_get_ident = threading.get_ident
_ERROR_STRING_MAX = 1024  # bytes of an error description fetched from a server


class _OnClassOrInstance:
    """A method that makes a new `RSession` when called on the class, and acts on the
    `RSession` it is called on otherwise.

    ``RSession.connect(...)`` and ``RSession.Open(token)`` return a new session; Symbian's
    ``Open`` is an instance method, so ``session.Open(token)`` (and ``session.connect(...)``)
    fill `session` instead, with the same checks as `RSession.CreateSession`. The function
    gets the class or the instance as its first argument.
    """

    def __init__(self, function: Callable[..., RSession]) -> None:
        self.__func__ = function
        # (A descriptor, not a callable, so typeshed's signature does not fit; it wraps alike.)
        functools.update_wrapper(self, function)  # type: ignore[arg-type]

    def __get__(self, session: RSession | None, owner: type) -> Callable[..., RSession]:
        return types.MethodType(self.__func__, owner if session is None else session)


def _session_of(target: type | RSession) -> RSession:
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
        # The handle, held through a runtime, and how the session ended (ipcfw.client.state).
        self._life: SessionLife[Runtime] = SessionLife(self, threading.Lock())
        self._owner: threading.Thread | None = None  # unshared sessions are its creator's alone
        self._sharing = EUnsharableSessions  # or shared: ShareAuto, ShareProtected (by token)
        self._negotiation_reply = b""

    @_OnClassOrInstance
    def connect(
        target: type[RSession] | RSession,
        name: str,
        version: tuple[int, ...] = TVersion(1, 0, 0),
        message_slots: int = -1,
        *,
        endpoint: str | None = None,
        timeout: float | None = None,
        payload: bytes = b"",
        path: str | None = None,
        wait: float | None = None,
    ) -> RSession:
        """Create and return a connected session (see `CreateSession`).

        With `wait` (seconds), first wait for the kernel and for a server registered as `name`
        (see `CreateSession`), so that a client started beside them cannot race them::

            with RSession.connect("echo", wait=10) as session: ...

        Called on an ``RSession`` (``session.connect(name)``) it connects that one and returns
        it, raising as `CreateSession` does if it is connected or connecting.
        """
        session = _session_of(target)
        session.CreateSession(
            name, version, message_slots, endpoint=endpoint, timeout=timeout, payload=payload,
            path=path, wait=wait,
        )
        return session

    @classmethod
    async def connect_async(
        cls,
        name: str,
        version: tuple[int, ...] = TVersion(1, 0, 0),
        message_slots: int = -1,
        *,
        endpoint: str | None = None,
        timeout: float | None = None,
        payload: bytes = b"",
        path: str | None = None,
        wait: float | None = None,
    ) -> RSession:
        """`connect` for a coroutine: a new session, connected without blocking the event
        loop. The kernel's answer (and, with `wait`, the kernel's and the server's appearance)
        is awaited; on the direct path the session's first calls take the kernel path while
        this thread's direct connection attaches in the background. The session belongs to
        the calling thread, the loop's, as `connect`'s does. Cancelling the awaiting task (or
        `timeout` running out) leaves no session behind: one the kernel creates after all is
        closed at once. Raises as `CreateSession` does."""
        session = cls()
        wire_path = _wire_path(path)
        _check_wait(wait)
        session._life.begin(threading.current_thread())
        try:
            await session._create_session_async(
                name, version, message_slots, endpoint, timeout, payload, wire_path, wait)
        finally:
            session._life.end()
        return session

    async def _create_session_async(
        self, name: str, version: tuple[int, ...], message_slots: int, endpoint: str | None,
        timeout: float | None, payload: bytes, path: int, wait: float | None,
    ) -> None:
        runtime = Runtime.for_endpoint(endpoint) if wait is None else None
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            if deadline is not None:
                await wait_for_server_async(name, max(0.0, deadline - time.monotonic()),
                                            endpoint)
                runtime = Runtime.for_endpoint(endpoint)
            assert runtime is not None
            frame, req_id, _, _ = self._connect_frame(
                runtime, name, version, message_slots, payload, None, path)
            try:
                reply = await aio.call(runtime.channel(), frame, req_id, timeout, connect=True)
                self._connected(runtime, reply, attach_later=True)
                return
            except (errors.NotFound, errors.CouldNotConnect, errors.ServerTerminated) as exc:
                # (as CreateSession: the server went between the wait and the connect)
                if (deadline is None or self._life.handle or time.monotonic() >= deadline
                        or _refused_by_server(exc, name)):
                    raise

    def CreateSession(
        self,
        name: str,
        version: tuple[int, ...] = TVersion(1, 0, 0),
        message_slots: int = -1,
        *,
        endpoint: str | None = None,
        timeout: float | None = None,
        payload: bytes = b"",
        first_request: tuple[int, Args] | None = None,
        path: str | None = None,
        wait: float | None = None,
    ) -> int | None:
        """Connect to the server registered as `name` (case-insensitive).

        `message_slots`: ``-1`` draws async slots from the kernel's pool, ``0`` allows only
        synchronous calls, ``1..255`` reserves that many for this session.

        `payload` (at most 256 bytes) is the negotiation payload the server's ``AcceptL`` sees;
        its answer is `NegotiationReply()` afterwards. `first_request` = ``(function, args)``
        is sent with the connect and served in the same round trip: its completion value is
        returned (or its error raised; the session stays connected either way). Without it,
        returns None.

        `path` is the session's data path: ``"direct"`` (the default) sends the requests of
        each thread that uses the session (the creating thread, every thread of the process
        after `ShareAuto`, every thread of another process after `Open`) on a direct
        connection from that thread to the server's process, if the server takes them (its
        ``direct`` attribute) and the connection can be made; otherwise through the kernel.
        ``"kernel"`` sends every request through the kernel. Everything else (sharing,
        Close, deaths, errors) is the same on both paths. Without `path`, the ``IPCFW_PATH``
        environment variable (``kernel`` or ``direct``) chooses, if set.

        `wait` (seconds; None, the default, does not wait) waits first for a kernel to answer
        at the endpoint and for a server to register `name` (the kernel says when: see
        `ipcfw.wait_for_server`), then connects; if that server goes before the connect
        reaches it, or the kernel dies, it waits again, within the same `wait`. It then raises
        ``CouldNotConnect`` ("no ipcfw kernel at ADDRESS after waiting S s") or ``NotFound``
        ("no server NAME registered ... after waiting S s"). `timeout` still bounds the
        connect's own answer.

        Raises ``NotFound`` if no server has that name, ``BadName`` for an invalid name,
        ``BadArgument`` for a bad slot count or a payload over 256 bytes, and whatever the
        server's ``AcceptL``, ``NewSessionL`` or ``CreateL`` raised (``NotSupported`` for a
        version it does not serve). Raises ``ClientPanic("KERN-EXEC", 57)`` if this
        ``RSession`` is connected already, ``ClientPanic("KERN-EXEC", 9)`` if another thread is
        connecting it; nothing is sent then. Raises ``ValueError`` for a `path` (or an
        ``IPCFW_PATH``) other than ``"kernel"`` or ``"direct"``.
        """
        wire_path = _wire_path(path)
        _check_wait(wait)
        self._life.begin(threading.current_thread())
        try:
            if wait is None:
                return self._create_session(
                    name, version, message_slots, endpoint, timeout, payload, first_request,
                    wire_path,
                )
            deadline = time.monotonic() + wait
            while True:
                wait_for_server(name, max(0.0, deadline - time.monotonic()), endpoint)
                try:
                    return self._create_session(
                        name, version, message_slots, endpoint, timeout, payload,
                        first_request, wire_path,
                    )
                except (errors.NotFound, errors.CouldNotConnect, errors.ServerTerminated) as exc:
                    # The server went (or the kernel died) between the wait and the connect:
                    # wait again for what is left of `wait` (not once connected: a first
                    # request's error is the caller's; nor for the server's own NotFound).
                    if (self._life.handle or time.monotonic() >= deadline
                            or _refused_by_server(exc, name)):
                        raise
        finally:
            self._life.end()

    def _create_session(
        self,
        name: str,
        version: tuple[int, ...],
        message_slots: int,
        endpoint: str | None,
        timeout: float | None,
        payload: bytes,
        first_request: tuple[int, Args] | None,
        path: int,
    ) -> int | None:
        runtime = Runtime.for_endpoint(endpoint)
        frame, req_id, then_id, first_args = self._connect_frame(
            runtime, name, version, message_slots, payload, first_request, path)
        if then_id:
            reply, answer = runtime.channel().call_then(frame, req_id, then_id, timeout)
        else:
            reply, answer = runtime.channel().call(frame, req_id, timeout, connect=True), None
        self._connected(runtime, reply, attach_timeout=timeout)
        if isinstance(answer, TimeoutError):
            raise TimeoutError(f"connected, but the first request had no answer within {timeout} s")
        if answer is None:
            return None
        return self._life.finish(answer, first_args.buffers, first_args.limits)

    def _connect_frame(
        self, runtime: Runtime, name: str, version: tuple[int, ...], message_slots: int,
        payload: bytes, first_request: tuple[int, Args] | None, path: int,
    ) -> tuple[bytes, int, int, TIpcArgs]:
        """The Connect to send, its req_id and its first request's (0: none), and the first
        request's arguments; raises what is wrong with the arguments, before anything is sent."""
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
        req_id = runtime.next_req_id()
        then_id = runtime.next_req_id() if first else 0
        first = (then_id, *first) if first else ()
        frame = encode(Connect(req_id, name, version, message_slots, payload, first, path,
                               threading.get_native_id()))
        return frame, req_id, then_id, first_args

    def _connected(self, runtime: Runtime, reply: Message, *,
                   attach_timeout: float | None = None, attach_later: bool = False) -> None:
        """Hold the session the kernel's answer to a Connect gives (or raise its refusal). On
        the direct path, the creating thread attaches it to its direct connection now
        (within `attach_timeout`), or, `attach_later`, at its first calls, which take the
        kernel path meanwhile (as another thread's do: `Runtime.join`)."""
        if type(reply) is Panicked:
            raise errors.ClientPanic(reply.category, reply.reason)
        if type(reply) is not Connected:
            raise errors.IpcError(errors.KErrGeneral, f"unexpected reply to connect: {reply!r}")
        _check_connected(reply.result, text=reply.text)
        direct_path = reply.direct if reply.ticket else ""
        if direct_path and attach_later:
            runtime.attach_later(reply.handle, direct_path, reply.ticket)
            self._attach(runtime, reply.handle, sharing=EUnsharableSessions,
                         direct_path=direct_path, route=False)
        else:
            direct = None
            if direct_path:
                direct = runtime.attach_direct(direct_path, reply.ticket, reply.handle,
                                               attach_timeout)
            self._attach(runtime, reply.handle, sharing=EUnsharableSessions,
                         direct_path=direct_path, direct=direct)
        self._negotiation_reply = reply.payload

    @staticmethod
    def _first_request(
        first_request: tuple[int, Args] | None
    ) -> tuple[tuple[object, ...], TIpcArgs]:
        if first_request is None:
            return (), NO_ARGS
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
        target: type[RSession] | RSession,
        token: bytes,
        *,
        endpoint: str | None = None,
        timeout: float | None = None,
    ) -> RSession:
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
        session._life.begin(threading.current_thread())
        try:
            session._open(token, endpoint, timeout)
        finally:
            session._life.end()
        return session

    def _open(self, token: bytes, endpoint: str | None, timeout: float | None) -> None:
        if not isinstance(token, bytes):
            raise TypeError(f"token must be bytes, not {type(token).__name__}")
        if len(token) > MAX_TOKEN:
            raise ValueError(f"token of {len(token)} bytes is longer than any ipcfw token")
        runtime = Runtime.for_endpoint(endpoint)
        req_id = runtime.next_req_id()
        reply = runtime.channel().call(encode(Open(req_id, token)), req_id, timeout, connect=True)
        if type(reply) is not Connected:
            raise errors.IpcError(errors.KErrGeneral, f"unexpected reply to Open: {reply!r}")
        _check_connected(reply.result, also="255 threads are attached to the session, or ",
                         text=reply.text)
        self._attach(runtime, reply.handle, sharing=EGlobalSharableSessions,
                     direct_path=reply.direct)

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
            self._life.finish(reply, NO_ARGS.buffers)  # (raises the panic)
        if type(reply) is not Shared:
            raise errors.IpcError(errors.KErrGeneral, f"unexpected reply to Share: {reply!r}")
        errors.check(reply.result)
        self._sharing = max(self._sharing, mode)
        return reply.token

    def _attach(
        self, runtime: Runtime, handle: int, sharing: TServerType, direct_path: str = "",
        direct: DirectChannel | None = None, route: bool = True,
    ) -> None:
        """Hold `handle` now. `direct_path`: the server's socket, for a session on the direct
        path: each thread's first call attaches it on that thread's direct connection, the
        creating thread's at connect (`direct`, or None if that could not be made), unless
        not `route` (an async connect: at its first calls)."""
        life = self._life
        life.attach(runtime, handle, direct_path)
        if direct_path and sharing == EUnsharableSessions and route:
            runtime.route(life, direct)  # the creating thread's route
        self._owner = threading.current_thread()
        self._sharing = sharing
        runtime.attach_session(life)

    def Handle(self) -> int:
        """The kernel's handle for this session; 0 when not connected."""
        return self._life.handle

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
        life = self._life
        # (The kernel path pays one attribute read here, not a call: ~5 ns, not ~50; the direct
        # path a dict lookup, once the thread's route is decided.)
        direct = None if not life.direct_path else life.routes.get(_get_ident(), UNDECIDED)
        joining = direct is UNDECIDED  # (the thread's move to its direct connection)
        if joining:
            direct = runtime.join(life, handle, _SYNC if status is None else _ASYNC)
        if direct is not None and ipc_args.large:
            return self._send_mapped(direct, req_id, handle, function, ipc_args, status, timeout)
        if status is None:
            frame = encode(Request(req_id, handle, function, ipc_args.wire, _SYNC))
            channel: AnyChannel = runtime.channel() if direct is None else direct
            life.sync_calls[req_id] = channel  # so a Close from another thread can end it
            try:
                value = life.finish(
                    channel.call(frame, req_id, timeout), ipc_args.buffers, ipc_args.limits
                )
            finally:
                life.sync_calls.pop(req_id, None)
            if joining and direct is None:
                runtime.sent_joining(handle, req_id, _SYNC)  # (answered by the server)
            return value
        frame = encode(Request(req_id, handle, function, ipc_args.wire, _ASYNC))
        channel = runtime.channel() if direct is None else direct
        begin_request(status, channel, req_id)
        pending: Pending[AnyChannel] = Pending(
            status, complete_request, life, ipc_args.buffers, channel, ipc_args.limits
        )
        try:
            channel.send_async(frame, req_id, pending)
        except BaseException:
            abandon_request(status)
            raise
        if joining and direct is None:
            runtime.sent_joining(handle, req_id, _ASYNC)
        return None

    def Send(self, function: int, args: Args = ()) -> None:
        """Send a blind request: the server gets it; its completion value is not returned.

        Takes a message slot until the server completes it. Returns once the kernel (on the
        direct path, the server) has queued the request; raises ``ServerBusy`` with no free
        slot, ``ServerTerminated`` if the server has gone. Writable descriptors are not
        written back.
        """
        ipc_args = TIpcArgs.of(args)
        runtime, handle = self._check_usable(function)
        req_id = runtime.next_req_id()
        life = self._life
        direct = None if not life.direct_path else life.routes.get(_get_ident(), UNDECIDED)
        joining = direct is UNDECIDED  # (the thread's move to its direct connection)
        if joining:
            direct = runtime.join(life, handle, _BLIND)
        if direct is not None and ipc_args.large:
            self._send_mapped(direct, req_id, handle, function, ipc_args, None, None, _BLIND)
            return
        frame = encode(Request(req_id, handle, function, ipc_args.wire, _BLIND))
        channel: AnyChannel = runtime.channel() if direct is None else direct
        reply = channel.call(frame, req_id)
        if joining and direct is None:
            runtime.sent_joining(handle, req_id, _BLIND)
        life.finish(reply, NO_ARGS.buffers)

    def _send_mapped(
        self, channel: DirectChannel, req_id: int, handle: int, function: int,
        ipc_args: TIpcArgs, status: TRequestStatus | None, timeout: float | None,
        mode: int = _SYNC,
    ) -> int | None:
        """`SendReceive` or `Send` (`mode`) on a direct connection, for arguments with a large
        descriptor: in shared memory (`ipcfw.client.shm`)."""
        with channel.lock:  # (the notice leaves, or is queued, before any MappedRequest)
            pool, notice = shm.pool_of(channel)
            if notice is not None:
                channel.send(notice)
        call = shm.MappedCall(pool, ipc_args)
        life = self._life
        if status is None:
            if mode == _SYNC:
                life.sync_calls[req_id] = channel  # so a Close from another thread can end it
            reply: Any = None
            try:
                reply = channel.call(call.frame(req_id, handle, function, mode), req_id, timeout,
                                     fds=call.fds)
            finally:
                reply = call.finish(reply, ipc_args.buffers, ipc_args.limits)
                life.sync_calls.pop(req_id, None)
            if mode != _SYNC:
                life.finish(reply, NO_ARGS.buffers)
                return None
            return life.finish(reply, ipc_args.buffers, ipc_args.limits)
        frame = call.frame(req_id, handle, function, _ASYNC)
        begin_request(status, channel, req_id)
        pending = shm.MappedPending(
            status, complete_request, life, ipc_args.buffers, channel, ipc_args.limits
        )
        pending.call = call
        try:
            channel.send_async(frame, req_id, pending, fds=call.fds)
        except BaseException:
            abandon_request(status)
            call.finish(None)
            raise
        return None

    def Close(self) -> None:
        """Close the session. The server gets ``Disconnect`` once, after every earlier request.

        Requests still pending complete at once with ``KErrSessionClosed``. Closing a closed
        session does nothing.
        """
        owner = self._owner
        unshared = self._sharing == EUnsharableSessions
        owner_gone = unshared and owner is not None and not owner.is_alive()
        current = threading.current_thread()
        if self._life.handle and unshared and owner is not current and not owner_gone:
            raise errors.ClientPanic(
                "KERN-EXEC", 0,
                "an unshared session can only be closed by the thread that created it",
            )
        runtime, handle = self._life.detach()
        if handle and runtime is not None:
            runtime.close_session(self._life, handle, owner_gone)

    def __enter__(self) -> RSession:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.Close()

    def __del__(self) -> None:
        if self._life.handle:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)

    def __repr__(self) -> str:
        life = self._life
        runtime, handle = life.via, life.handle  # (once: a Close on another thread may clear it)
        if not handle:
            return "<RSession connecting>" if life.busy is not None else "<RSession not connected>"
        state = f" dead: {life.dead}" if life.dead else ""
        pending = runtime.requests_pending(life) if runtime is not None else 0
        return f"<RSession 0x{handle:x} pending={pending}{state}>"

    def SetAbortCallback(
        self, callback: Callable[[RSession, errors.IpcError], None] | None
    ) -> None:
        """Call ``callback(session, error)`` once, as soon as the session's server is gone.

        The RMC ``abort_session`` callback (seed 001): it fires promptly when the server dies or
        deregisters, or the kernel dies, whether or not a request is pending, so a client
        learns of the failure without waiting for its next call. It runs on the runtime's I/O
        thread; keep it short. If the server is gone already, it is called at once. A server
        panicking this client does not call it (the client's call raises ``ClientPanic``).
        ``None`` removes it.
        """
        abort = self._life.set_abort_callback(callback)
        if abort is not None:
            abort.run()

    # -- internals ---------------------------------------------------------------------------

    def _check_usable(self, function: int) -> tuple[Runtime, int]:
        if type(function) is not int:
            raise TypeError(f"function must be an int, not {type(function).__name__}")
        if not 0 <= function <= I32_MAX:
            raise ValueError(f"function must be in 0..2**31-1, got {function}")
        return self._life.usable()


def death_of(session: RSession) -> BaseException | None:
    """(ipcfw's own, for RSubSession) Why the session died under `session` (its server
    died or panicked this client, or the kernel went), or None while it lives: the error
    every later call on it raises."""
    return session._life.dead


def _check_wait(wait: object) -> None:
    if wait is not None and (type(wait) not in (int, float) or not wait >= 0):  # type: ignore[operator]
        raise ValueError(f"wait must be a number of seconds >= 0, got {wait!r}")


def _wire_path(path: str | None) -> int:
    """`path` (or, if None, $IPCFW_PATH, else "direct") as the protocol's `Path`."""
    if path is None:
        chosen = os.environ.get(PATH_VAR) or "direct"
        wire_path = _PATHS.get(chosen)
        if wire_path is None:
            raise ValueError(f"{PATH_VAR} must be 'kernel' or 'direct', got {chosen!r}")
        return wire_path
    wire_path = _PATHS.get(path) if isinstance(path, str) else None
    if wire_path is None:
        raise ValueError(f"path must be 'kernel' or 'direct', got {path!r}")
    return wire_path


def _refused_by_server(exc: errors.IpcError, name: str) -> bool:
    """Whether a connect's `NotFound` came from the server (its ``NewSessionL`` refused), not
    from the kernel (no server registered as `name`)."""
    return type(exc) is errors.NotFound and not exc.message.startswith(not_registered(name))


def _check_connected(code: int, also: str = "", text: str = "") -> None:
    """Raise the error a connect or Open was refused with: with `text`, the refusal's own (the
    server's, or the kernel's); for KErrOverflow without, say which limits it means (`also`:
    the other one an Open can meet)."""
    if code < 0 and text:
        raise errors.IpcError(code, text)
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
    endpoint: str | None = None,
    timeout: float | None = None,
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

