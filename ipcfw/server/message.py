"""RMessage: a request as the server sees it, and the one interface it completes through.

An `RMessage` is built by the server's state (`ipcfw.server.state`) for each connect, request
and disconnect the kernel delivers. The plugin reads its arguments and completes it exactly
once, from any thread. The message knows nothing of sockets or of the host: when it completes,
it hands the frame to send to its `Completer` (``completed(message, frame)``) and reads the
kernel's frame limit from it (``max_frame``); a request the plugin let go of without completing
it goes to ``forgotten(message)`` (below). That is the whole interface.

Exactly once, from any thread, without a lock: a message records who ended it (Complete, Panic,
or the client's cancel) in a one-entry dict with ``dict.setdefault``, which is atomic (one C call
on an int key: under the GIL, or the dict's own lock in a free-threaded build). The first caller
stores its token and wins; every later caller reads the winner's. This keeps the pure state
free of `threading`, and costs less than a lock on the hot path.

Forgotten messages: a request the plugin neither completed nor kept (no reference to it is
left) would leave its client waiting forever. The tables of requests in service hold them
weakly (`InService`), so that such a message is finalized; its ``__del__`` hands it to its
completer's ``forgotten``, which completes it later on the loop thread (a finalizer runs on
any thread, at any point of the loop's own work: it must do no I/O itself). The message is
alive again for that while (a finalizer may resurrect its object), and runs ``__del__`` once.
"""

from __future__ import annotations

import logging
import reprlib
import weakref
from typing import Any, NamedTuple, Protocol

from .. import errors
from ..protocol import (
    I32_MAX,
    I32_MIN,
    MAX_CATEGORY,
    MAX_FRAME,
    Complete,
    Completed,
    MappedCompleted,
    Negotiated,
    Panic,
    Panicked,
    encode,
    error_text,
)
from ..security import capability_name
from .mapped import MappedArgs, MappedDescriptor

log = logging.getLogger("ipcfw.server")

__all__ = ["ClientInfo", "ServerPanic", "RMessage", "Completer", "MessageKind", "InService"]

# The functions at the end of this module are the framework's own side of a message (the
# server's state and the overlays use them); they are not in __all__ and not for plugins.


class ClientInfo(NamedTuple):
    """Who sent a message, as the kernel saw it from the transport (never self-reported), and
    the capabilities the kernel grants that process (see ipcfw.security)."""

    pid: int
    uid: int
    gid: int
    exe: str
    capabilities: frozenset[str] = frozenset()


class ServerPanic(Exception):
    """The server code misused the framework (Symbian panics the server thread).

    Raised, for example, by completing a message twice (``USER 70``). It is a bug in the server;
    nothing is sent to the client for the offending call.
    """

    def __init__(self, category: str, reason: int, message: str = "") -> None:
        super().__init__(f"server panic {category} {reason}" + (f": {message}" if message else ""))
        self.category = category
        self.reason = reason


class Completer(Protocol):
    """What an `RMessage` needs from whatever completes it: the server's state, or a test's
    recorder. Nothing else of the host is reachable from a message.

    Attributes:
        max_frame: the largest frame the kernel accepts; a completion over it is replaced by
            one with ``KErrOverflow``.
    """

    max_frame: int

    def completed(self, message: RMessage, frame: bytes) -> None:
        """`message` was completed (once: the message guarantees it) and `frame` is its
        completion. Called on whichever thread completed it; it must not block."""

    def forgotten(self, message: RMessage) -> None:
        """The plugin let go of request `message` without completing it (called by its
        finalizer: on any thread, possibly in the middle of the loop's own work). Complete it
        later, on the loop thread; do no I/O here."""


class InService:
    """A table of requests in service by id (a session's on the kernel path, a direct
    connection's), holding them weakly: a request the plugin let go of without completing it
    is finalized (see the module's docstring), not kept alive by the table. An entry leaves
    when its request ends (``pop``), even if its message was collected first.

    `handle`: the session whose requests it holds (0 for a direct connection's, whose
    messages know their session's handle themselves).
    """

    __slots__ = ("_refs", "handle")

    def __init__(self, handle: int = 0) -> None:
        self._refs: dict[int, weakref.ref[RMessage]] = {}
        self.handle = handle

    def __setitem__(self, key: int, message: RMessage) -> None:
        self._refs[key] = weakref.ref(message)

    def get(self, key: int) -> RMessage | None:
        ref = self._refs.get(key)
        return None if ref is None else ref()

    def pop(self, key: int, default: None = None) -> RMessage | None:
        ref = self._refs.pop(key, None)  # atomic: any thread
        return None if ref is None else ref()

    def __contains__(self, key: object) -> bool:
        return key in self._refs

    def __len__(self) -> int:
        return len(self._refs)

    def items(self) -> list[tuple[int, RMessage]]:
        """A snapshot of the entries whose message is alive (other threads end them
        meanwhile: see `client.state.snapshot` for why ``dict.copy``)."""
        return [(key, message) for key, ref in self._refs.copy().items()
                if (message := ref()) is not None]

    def values(self) -> list[RMessage]:
        """A snapshot of the messages alive, as `items`."""
        return [message for ref in self._refs.copy().values() if (message := ref()) is not None]

    def clear(self) -> None:
        self._refs.clear()

    def __repr__(self) -> str:
        return f"<InService handle=0x{self.handle:x} {len(self._refs)} requests>"


class MessageKind:
    """What a message is: a connect, a request, or a disconnect."""

    CONNECT = "connect"
    REQUEST = "request"
    DISCONNECT = "disconnect"


class _Discard:
    """The completer of a stand-in message: its completion goes nowhere."""

    max_frame = MAX_FRAME

    def completed(self, message: RMessage, frame: bytes) -> None:
        log.debug("dropping the completion of stand-in %r", message)

    def forgotten(self, message: RMessage) -> None:
        """(A stand-in is never in service.)"""


_DISCARD = _Discard()
_REPR = reprlib.Repr()  # a completion value named in an error, shortened
_REPR.maxstring = _REPR.maxother = 60
_CANCEL = "Cancel"  # who ended a message the client cancelled


class RMessage:
    """A request as the server sees it (Symbian ``RMessage2``).

    It carries the function number and four arguments, and is completed exactly once, by
    ``Complete(value)`` or ``Panic(category, reason)``, from any thread.
    """

    __slots__ = (
        "_completer", "_msg_id", "_kind", "_function", "_args", "_session", "_client",
        "_content", "_end", "_held_in", "__weakref__",
    )

    def __init__(self, completer: Completer, msg_id: int, kind: str, function: int,
                 args: tuple[Any, ...], session: Any, client: ClientInfo | None,
                 held_in: InService | None = None) -> None:
        self._completer = completer
        self._msg_id = msg_id
        self._kind = kind
        self._function = function
        self._args = args
        self._session = session
        self._client = client
        self._content: dict[int, bytearray] | None = None  # index -> buffer, once WriteL was called
        # {0: (who,)} once ended, `who` being "Complete", "Panic" or "Cancel" (see the module)
        self._end: dict[int, tuple[str]] = {}
        # Its session's table of requests in service, which it leaves when it is ended.
        self._held_in = held_in

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
        if self._kind != MessageKind.REQUEST:
            raise ServerPanic("KERN-EXEC", 44, f"a {self._kind} message has no arguments")
        arg = self._args[index] if index < len(self._args) else 0
        if type(arg) is int:
            raise errors.IpcError(errors.KErrBadDescriptor, f"argument {index} is not a descriptor")
        return arg

    def _current(self, index: int) -> bytes:
        if self._content is not None and index in self._content:
            return bytes(self._content[index])
        arg = self._descriptor(index)
        content: bytes = arg if type(arg) is bytes else arg[0]  # (content, max length)
        return content

    def GetDesLength(self, index: int) -> int:
        """Length of descriptor argument `index`; ``BadDescriptor`` if it is an int."""
        arg = self._descriptor(index)
        if type(arg) is MappedDescriptor:
            return arg.length
        return len(self._current(index))

    def GetDesMaxLength(self, index: int) -> int:
        """Max length of descriptor argument `index` (its length, if read-only)."""
        arg = self._descriptor(index)
        if type(arg) is MappedDescriptor:
            return arg.max_length
        return len(arg) if type(arg) is bytes else int(arg[1])

    def ReadL(self, index: int, offset: int = 0) -> bytes:
        """The content of descriptor argument `index`, from `offset`."""
        if type(offset) is not int or offset < 0:
            raise errors.IpcError(errors.KErrArgument, f"offset must be >= 0, got {offset!r}")
        arg = self._descriptor(index)
        if type(arg) is MappedDescriptor:  # (in the client's shared memory: only what is read)
            return arg.read(offset)
        return self._current(index)[offset:]

    def WriteL(self, index: int, data: bytes, offset: int = 0) -> None:
        """Write `data` at `offset` into the client's writable descriptor `index`.

        The client's ``bytearray`` then holds its first `offset` bytes followed by `data` (its
        length becomes ``offset + len(data)``), when the request completes. Raises
        ``BadDescriptor`` for an int or read-only argument, ``Overflow`` past its max length.
        """
        arg = self._descriptor(index)
        mapped = type(arg) is MappedDescriptor
        if type(arg) is bytes or (mapped and not arg.writable):
            raise errors.IpcError(errors.KErrBadDescriptor, f"argument {index} is read-only")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"WriteL data must be bytes-like, not {type(data).__name__}")
        if type(offset) is not int or offset < 0:
            raise errors.IpcError(errors.KErrArgument, f"offset must be >= 0, got {offset!r}")
        limit = arg.max_length if mapped else arg[1]
        if offset + len(data) > limit:
            raise errors.IpcError(
                errors.KErrOverflow,
                f"writing {len(data)} bytes at offset {offset} overflows argument {index} "
                f"(max length {limit})",
            )
        if mapped:  # straight into the client's shared memory; the completion says its length
            arg.write(data, offset)
            return
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
        """The client's secure identity (Symbian's SID): its uid, which the transport vouches
        for (see docs/security.md)."""
        return self.Client().uid

    def VendorId(self) -> int:
        """The client's vendor identity (Symbian's VID): its gid, which the transport vouches
        for (see docs/security.md)."""
        return self.Client().gid

    def HasCapability(self, capability: str, diagnostic: str | None = None) -> bool:
        """True if the kernel grants the client's process `capability` (a Symbian name such as
        ``"ReadUserData"``, or a custom one). When it does not and `diagnostic` is given, the
        refusal is logged (warning) with it, the client and the capability."""
        held = capability_name(capability) in self.Client().capabilities
        if not held and diagnostic is not None:
            client = self.Client()
            log.warning("%s: pid %d (%s) lacks capability %s", diagnostic, client.pid,
                        client.exe or "unknown executable", capability)
        return held

    def Session(self) -> Any:
        """The `CSession` this message belongs to (None for a connect message)."""
        return self._session

    # -- completion --------------------------------------------------------------------------

    def IsNull(self) -> bool:
        """True once the message has been completed (or panicked)."""
        return bool(self._end)

    def Complete(self, value: int | errors.IpcError) -> None:
        """Complete the message with `value`: an int (>= 0 success, < 0 an error code) or an
        ``IpcError``, whose code and text reach the client (its exception then reads
        ``KErrNotFound (-1) from the server: no key b'colour'``). Any thread::

            message.Complete(len(data))
            message.Complete(IpcError(KErrNotFound, f"no key {key!r}"))

        Raises ``TypeError`` for anything else (a ``bool``, a ``str``, None) and ``ValueError``
        for an int outside 32 bits, naming the value; the message stays pending then.
        Raises ``ServerPanic("USER", 70)`` if the message was already completed or panicked
        (Symbian's ``ETMesCompletion``); nothing is sent twice.
        """
        text = ""
        if type(value) is not int:
            value, text = completion_of(value)
        elif not I32_MIN <= value <= I32_MAX:
            raise ValueError(f"Complete({value}): a completion value is a 32-bit signed int "
                             f"({I32_MIN}..{I32_MAX})")
        if self._claim("Complete"):  # (False: cancelled by the client, who has its answer)
            self._send_completion(value, text)

    def _send_completion(self, value: int, text: str = "") -> None:
        writes: tuple[tuple[int, bytes], ...] = ()
        if self._content:
            writes = tuple((i, bytes(b)) for i, b in sorted(self._content.items()))
        frame = self._completion_frame(value, writes, error_text(text))
        if len(frame) > self._completer.max_frame:
            log.error("completion of %r is %d bytes, over the kernel's limit; completing with "
                      "KErrOverflow instead", self, len(frame))
            frame = self._completion_frame(errors.KErrOverflow, (), (
                f"the server's answer to function {self._function} ({len(frame)} bytes) is over "
                f"the {self._completer.max_frame}-byte frame limit"))
        self._completer.completed(self, frame)

    def _completion_frame(self, value: int, writes: tuple[tuple[int, bytes], ...],
                          text: str) -> bytes:
        """The frame that completes this message with `value`, `writes` and `text` (the
        kernel's ``Complete``; a direct message's is the client's ``Completed``)."""
        return encode(Complete(self._msg_id, value, writes, text))

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
        self._completer.completed(self, self._panic_frame(category[:MAX_CATEGORY], reason))

    def _panic_frame(self, category: str, reason: int) -> bytes:
        return encode(Panic(self._msg_id, category, reason))

    def IsCancelled(self) -> bool:
        """True if the client cancelled this message (it was completed for the client)."""
        return self._end.get(0, ("",))[0] == _CANCEL

    def _claim(self, by: str) -> bool:
        """End the message `by` Complete or Panic; False if the client cancelled it (send
        nothing). Raises the server panic Symbian gives for a message already completed."""
        winner = self._end_by(by)
        if winner is None:
            return True
        if winner == _CANCEL:
            return False
        raise self._already_completed(by, winner)

    def _end_by(self, by: str) -> str | None:
        """End the message `by` Complete, Panic or Cancel, if nothing has ended it: None then,
        else who had. Exactly one caller wins, from any thread: ``dict.setdefault`` with an int
        key is atomic (the state is pure, so it has no lock to take)."""
        token = (by,)  # a new tuple per call: `is` tells this caller from any other
        winner = self._end.setdefault(0, token)
        if winner is not token:
            return winner[0]
        self._out_of_service()
        return None

    def _already_completed(self, by: str, ended_by: str) -> ServerPanic:
        # Symbian nulls a message's handle when it completes: Complete() on a null handle is
        # USER 70; Panic() hands the null handle to the kernel, which answers KERN-EXEC 44.
        what = f"{by}() on message {self._msg_id} (function {self._function})"
        was = "completed" if ended_by == "Complete" else "completed by Panic()"
        if by == "Panic":
            return ServerPanic("KERN-EXEC", 44, f"{what}, which was already {was}: only a "
                                                "pending message can panic its client")
        return ServerPanic("USER", 70, f"{what}, which was already {was}: a message is "
                                       "completed once")

    def _out_of_service(self) -> None:
        if self._held_in is not None:
            self._held_in.pop(self._msg_id, None)

    def __del__(self) -> None:
        # A request in service that nobody completed and nobody holds (see the module).
        if not self._end and self._held_in is not None:
            self._completer.forgotten(self)

    def __repr__(self) -> str:
        state = "completed" if self._end else "pending"
        return f"<RMessage {self._msg_id} {self._kind} function={self._function} {state}>"


class DirectMessage(RMessage):
    """A request that came on a direct connection (client -> server, no kernel between them).

    For the plugin it is an `RMessage` like any other. Its completion is the frame the client
    reads: ``Completed(req_id, value, writes)``, or ``Panicked(req_id, handle, category, reason,
    1)``; `msg_id` is the client's req_id. `handle` and `mode` are what the direct rules
    (`ipcfw.server.direct`) need when it ends (its slot, a blind answer dropped), and `panic` is
    set to (category, reason) when ``Panic`` ended it; `since` is the direct rules' clock when
    they took it (its age in ``ipcfw ps``). Not for plugins.
    """

    __slots__ = ("handle", "mode", "panic", "mapped", "since", "stamp")

    def __init__(self, completer: Completer, req_id: int, function: int, args: tuple[Any, ...],
                 session: Any, client: ClientInfo | None, held_in: InService | None,
                 handle: int, mode: int) -> None:
        super().__init__(completer, req_id, MessageKind.REQUEST, function, args, session, client,
                         held_in)
        self.handle = handle
        self.mode = mode
        self.panic: tuple[str, int] | None = None
        self.since = 0.0
        self.stamp = -1.0  # when it came, on the host's clock, if a monitor watched (traffic)
        # Its descriptors in shared memory (ipcfw.server.mapped), released when it ends.
        self.mapped: MappedArgs | None = args if type(args) is MappedArgs else None

    @property
    def req_id(self) -> int:
        """The client's id of this request on its connection."""
        return self._msg_id

    def _completion_frame(self, value: int, writes: tuple[tuple[int, bytes], ...],
                          text: str) -> bytes:
        mapped = self.mapped
        if mapped is None:
            return encode(Completed(self._msg_id, value, writes, text))
        # A MappedRequest's answer, even an error: it tells the client its memory is free.
        lengths: list[tuple[int, bytes | int]] = list(writes)
        lengths += [(i, arg.length) for i, arg in enumerate(mapped)
                    if type(arg) is MappedDescriptor and arg.written]
        return encode(MappedCompleted(self._msg_id, value, tuple(sorted(lengths)), text))

    def _out_of_service(self) -> None:
        super()._out_of_service()
        if self.mapped is not None:
            self.mapped.release()

    def _panic_frame(self, category: str, reason: int) -> bytes:
        self.panic = (category, reason)
        return encode(Panicked(self._msg_id, self.handle, category, reason, 1))


def completion_of(value: object) -> tuple[int, str]:
    """The code and text a completion `value` that is not a plain int stands for: an `IpcError`
    (its code and message) or an int subclass (an IntEnum). TypeError or ValueError, naming the
    value, for anything else: a bool (``Complete(True)`` is a bug, not 1), a str, None, an int
    outside 32 bits."""
    if isinstance(value, errors.IpcError):
        return value.code, value.message
    if isinstance(value, bool):
        raise TypeError(f"Complete({value!r}): a bool is not a completion value; complete with "
                        "an int (KErrNone, a count) or an IpcError")
    if isinstance(value, int):
        if not I32_MIN <= value <= I32_MAX:
            raise ValueError(f"Complete({value}): a completion value is a 32-bit signed int "
                             f"({I32_MIN}..{I32_MAX})")
        return int(value), ""
    raise TypeError(f"Complete({_REPR.repr(value)}): a completion value is an int (>= 0 success, "
                    f"< 0 an error code) or an IpcError, not {type(value).__name__}")


# -- the framework's side of a message (not for plugins) ------------------------------------------


def stand_in_message(kind: str, client: ClientInfo | None) -> RMessage:
    """A message the kernel never sent, whose completion goes nowhere (an overlay's hand-off
    gives one to the next layer's ``NewSessionL`` as its connect message)."""
    return RMessage(_DISCARD, 0, kind, -1 if kind == MessageKind.CONNECT else -2, (), None, client)


def accept_connect(message: RMessage, reply: bytes) -> None:
    """Accept the connect `message` is: the kernel gets the negotiation `reply`."""
    if message._claim("Complete"):
        frame = encode(Negotiated(message._msg_id, errors.KErrNone, reply))
        message._completer.completed(message, frame)


def cancel_by_client(message: RMessage) -> bool:
    """The kernel says the client cancelled `message`. True if it was still pending here (it is
    ended now: a later ``Complete()`` is silently dropped), False if it had been completed
    already (the kernel dropped that completion, or will)."""
    return message._end_by(_CANCEL) is None


def complete_unless_ended(message: RMessage, value: int, text: str = "") -> None:
    """Complete `message` with `value` (and, for an error, `text`: what happened) unless it has
    been ended already: the framework's own fallback (a ``ServiceL`` or ``Disconnect`` that
    raised), which must neither panic nor send twice when another thread completed the message
    meanwhile."""
    if message._end_by("Complete") is None:
        message._send_completion(value, text)


#: The code a request the server let go of without completing it is completed with (see
#: docs/failures.md): a bug in the server, as an exception in ``ServiceL`` is.
FORGOTTEN_CODE = errors.KErrGeneral


def complete_forgotten(message: RMessage) -> None:
    """Complete `message`, which the plugin let go of without completing it (`forgotten`),
    with `FORGOTTEN_CODE` and a text that says so (a disconnect: with KErrNone, which frees
    the session); log it with its session and function. On the loop thread."""
    if message._end:
        return  # (the client cancelled it meanwhile)
    held_in = message._held_in
    handle = getattr(message, "handle", None) or (held_in.handle if held_in is not None else 0)
    if message._kind == MessageKind.DISCONNECT:
        log.error("the server's Disconnect let go of the disconnect message of session 0x%x "
                  "without completing it: completing it, which frees the session", handle)
        complete_unless_ended(message, errors.KErrNone)
        return
    log.error("the server let go of message %d (function %d) of session 0x%x without "
              "completing it: its client gets %s", message._msg_id, message._function, handle,
              errors.name_of(FORGOTTEN_CODE))
    complete_unless_ended(message, FORGOTTEN_CODE, (
        f"the server dropped the request without completing it (function {message._function}); "
        "see the server's log"))


def route_to(message: RMessage, session: Any) -> None:
    """Make `session` the one ``message.Session()`` returns (the layer an overlaid session's
    request goes to)."""
    message._session = session
