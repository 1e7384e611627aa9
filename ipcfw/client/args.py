"""TIpcArgs: the arguments of one request, checked and turned into their wire form. Pure."""

from __future__ import annotations

from collections.abc import Iterable

from ..protocol import I32_MAX, I32_MIN, SHARED_OVER

__all__ = ["Arg", "Args", "NO_ARGS", "TIpcArgs", "SHARED_OVER"]

Arg = int | bytes | bytearray
WireArg = int | bytes | tuple[bytes, int]  # a writable descriptor: (contents, max length)


class TIpcArgs:
    """Up to four request arguments (Symbian ``TIpcArgs``).

    Each argument is one of:

    * an ``int``: a 32-bit signed integer (``RMessage.Int0()`` ...);
    * ``bytes``: a read-only descriptor (``ReadL``, ``GetDesLength``);
    * a ``bytearray``: a writable descriptor. Its length before the call is its max length; when
      the request completes it holds exactly what the server wrote (``WriteL``), and its length
      becomes offset + bytes written.

    Bad arguments raise ``TypeError`` or ``ValueError`` here, before anything is sent (a
    ``bool`` too: ``True`` is not silently sent as 1). A plain
    tuple is accepted wherever a TIpcArgs is::

        session.SendReceive(EWrite, TIpcArgs(3, b"data"))
        session.SendReceive(EWrite, (3, b"data"))
    """

    __slots__ = ("wire", "buffers", "limits", "large")

    def __init__(self, *args: Arg) -> None:
        if len(args) > 4:
            raise ValueError(f"TIpcArgs takes at most 4 arguments, got {len(args)}")
        self.buffers: dict[int, bytearray] = {}
        # index -> max length of each writable descriptor, as sent (its wire form's): a reply
        # may write no more, and only there (`state.writes_fit`).
        self.limits: dict[int, int] = {}
        # Some descriptor is of SHARED_OVER bytes or more: on a direct connection it goes in
        # shared memory, and such a bytearray is in `wire` as itself, not a copy.
        self.large = False
        # Plain ints and bytes go on the wire as they are (no copy on the hot path); anything
        # else (a bytearray, an int to check) has the loop below replace the whole tuple.
        self.wire: tuple[WireArg, ...] = args  # type: ignore[assignment]
        for arg in args:
            if not ((type(arg) is bytes and len(arg) < SHARED_OVER)
                    or (type(arg) is int and I32_MIN <= arg <= I32_MAX)):
                self.wire = tuple(self._wire_arg(index, arg) for index, arg in enumerate(args))
                break

    def _wire_arg(self, index: int, arg: Arg) -> WireArg:
        if isinstance(arg, bytearray):
            self.buffers[index] = arg
            self.limits[index] = len(arg)
            if len(arg) >= SHARED_OVER:
                self.large = True
                return (arg, len(arg))  # type: ignore[return-value]  # (msgpack sends it)
            return (bytes(arg), len(arg))
        if isinstance(arg, bytes):
            if len(arg) >= SHARED_OVER:
                self.large = True
            return bytes(arg)
        if isinstance(arg, bool):
            raise TypeError(f"argument {index}: {arg!r} is a bool, not an int; pass "
                            f"{int(arg)} if you mean the number (an int, bytes or bytearray)")
        if isinstance(arg, int):
            if not I32_MIN <= arg <= I32_MAX:
                raise ValueError(f"argument {index}: {arg} does not fit in a 32-bit signed int")
            return int(arg)
        raise TypeError(f"argument {index}: {type(arg).__name__} is not an int, bytes or bytearray")

    @classmethod
    def of(cls, args: TIpcArgs | Iterable[Arg] | None) -> TIpcArgs:
        if type(args) is tuple:
            return cls(*args)
        if isinstance(args, TIpcArgs):
            return args
        if args is None:
            return NO_ARGS
        if isinstance(args, (bytes, bytearray, str, int)):
            raise TypeError(
                f"args must be a TIpcArgs or a tuple of arguments, not {type(args).__name__}"
            )
        return cls(*args)

    def __repr__(self) -> str:
        return f"TIpcArgs{self.wire!r}"


NO_ARGS = TIpcArgs()
Args = TIpcArgs | Iterable[Arg] | None  # what a request's `args` may be
