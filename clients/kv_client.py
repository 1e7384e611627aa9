"""Example client for the key-value server: a thin client class, a cursor subsession, and
idiomatic error handling.

Run it from the repository root, with a kernel and the kv server running::

    ipcfw kernel &
    ipcfw serve servers.kv:KvServer &
    python clients/kv_client.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from collections.abc import Iterator

if __package__ in (None, ""):  # run as a script: make `servers` and `clients` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ipcfw import EndOfFile, NotFound, Overflow, RSession, RSubSession, TIpcArgs, TRequestStatus  # noqa: E402

from clients import ExampleClient, Out, check, run_main  # noqa: E402
from servers.kv import (  # noqa: E402
    ECloseCursor,
    ECount,
    ECursorNext,
    EDelete,
    EGet,
    EOpenCursor,
    ESet,
    EValueLength,
)

Key = bytes | str


def _bytes(data: Key) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


class KvClient(ExampleClient):
    """The kv server's client API (a Symbian R-class: a session plus one method per function).

    ::

        with KvClient.connect() as kv:
            kv.Set("colour", "blue")
            kv.Get("colour")            # -> b"blue"
            kv.Get("missing")           # raises ipcfw.NotFound

    Keys and values are bytes; a str is encoded as UTF-8.
    """

    SERVER = "kv"
    PLUGIN = "servers.kv:KvServer"

    def Session(self) -> RSession:
        """The session inside (a subsession such as `RKvCursor` is opened through it)."""
        return self._session

    # -- one method per server function ---------------------------------------------------------

    def Set(self, key: Key, value: Key) -> None:
        self._session.SendReceive(ESet, TIpcArgs(_bytes(key), _bytes(value)))

    def GetInto(self, key: Key, buffer: bytearray) -> int:
        """Read the value into `buffer` (a writable descriptor; its length is the max length).

        Returns the value's length; `buffer` then holds exactly the value. Raises ``NotFound``
        for a missing key, ``Overflow`` if `buffer` is too short (it is left unchanged).
        """
        return self._session.SendReceive(EGet, TIpcArgs(_bytes(key), buffer))

    def Delete(self, key: Key) -> None:
        self._session.SendReceive(EDelete, TIpcArgs(_bytes(key)))

    def Count(self) -> int:
        return self._session.SendReceive(ECount)

    def ValueLength(self, key: Key) -> int:
        return self._session.SendReceive(EValueLength, TIpcArgs(_bytes(key)))

    def CountAsync(self, status: TRequestStatus) -> None:
        """Asynchronous ``ECount``: returns at once; `status` completes with the count."""
        self._session.SendReceive(ECount, (), status)

    def OpenCursor(self, prefix: Key = b"") -> RKvCursor:
        """A cursor over the keys starting with `prefix` (see `RKvCursor`)."""
        cursor = RKvCursor()
        cursor.Open(self, prefix)
        return cursor

    # -- conveniences built on them ---------------------------------------------------------------

    def Get(self, key: Key) -> bytes:
        """The value of `key` (raises ``NotFound``): size the buffer first, then read.

        Another client may make the value longer between the two calls; then the read
        overflows and we size again.
        """
        while True:
            buffer = bytearray(self.ValueLength(key))
            try:
                self.GetInto(key, buffer)
                return bytes(buffer)
            except Overflow:
                continue


class RKvCursor(RSubSession):
    """A cursor over the store's keys: a subsession of a `KvClient`'s session (as Symbian's
    ``RFile`` is a subsession of an ``RFs``).

    ::

        with kv.OpenCursor("user:") as cursor:
            for key, value in cursor:
                ...

    The cursor walks the keys present when it was opened, in sorted order. Closing the
    `KvClient` closes its cursors too, in the server.
    """

    def __init__(self) -> None:
        super().__init__(close_function=ECloseCursor)  # so that `with` closes it

    def Open(self, kv: KvClient, prefix: Key = b"") -> None:
        self.CreateSubSession(kv.Session(), EOpenCursor, TIpcArgs(_bytes(prefix)))

    def Next(self) -> tuple[bytes, bytes] | None:
        """The next (key, value), or None after the last key.

        The server writes nothing and stays put when a buffer is too short (``Overflow``), so
        we retry with larger ones.
        """
        key_size, value_size = 64, 256
        while True:
            key, value = bytearray(key_size), bytearray(value_size)
            try:
                self.SendReceive(ECursorNext, TIpcArgs(key, value))  # argument 3: the handle
                return bytes(key), bytes(value)
            except EndOfFile:  # KErrEof: no more keys
                return None
            except Overflow:
                key_size, value_size = key_size * 4, value_size * 4

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        while (item := self.Next()) is not None:
            yield item

    def Close(self) -> None:
        self.CloseSubSession(ECloseCursor)


def run(out: Out = print, endpoint: str | None = None) -> str:
    """The walkthrough; returns a one-line summary, raises on failure.

    The store is shared by every client of the server, so the walkthrough removes its own keys
    at the start (left by an interrupted run) and at the end, and checks counts relative to the
    count it found.
    """
    entries = {"colour": "blue", "shape": "round", "size": "large"}
    with KvClient.connect(endpoint) as kv:
        for key in entries:
            try:
                kv.Delete(key)
            except NotFound:
                pass
        before = kv.Count()

        for key, value in entries.items():
            kv.Set(key, value)
        count = kv.Count()
        check(count == before + len(entries),
              f"ECount gave {count}, expected {before + len(entries)}")
        out(f"ESet x{len(entries)}               -> ECount = {count}")

        # A cursor is a subsession: opened, used and closed through the session.
        with kv.OpenCursor("s") as cursor:
            found = [key for key, _ in cursor]
        check({b"shape", b"size"} <= set(found) and all(key.startswith(b"s") for key in found),
              f"the cursor over prefix 's' gave {found}")
        out(f"cursor on prefix 's'  -> {[key.decode() for key in found]}"
            "  (ECursorNext until KErrEof)")

        colour = kv.Get("colour")
        check(colour == b"blue", f"EGet('colour') returned {colour!r}")
        out(f"EGet('colour')        -> {colour!r}  (EValueLength sized the buffer: {len(colour)})")

        # A buffer shorter than the value: the server's WriteL overflows and the call fails.
        small = bytearray(2)
        try:
            kv.GetInto("shape", small)
            check(False, "EGet into a too-short buffer succeeded")
        except Overflow:
            out(f"EGet('shape') into a {len(small)}-byte buffer -> KErrOverflow")

        try:
            kv.Get("no-such-key")
            check(False, "EGet of a missing key succeeded")
        except NotFound:
            out("EGet('no-such-key')   -> KErrNotFound")

        kv.Delete("shape")
        status = TRequestStatus()
        kv.CountAsync(status)  # asynchronous, completed by the server like any other request
        after_delete = status.Wait(timeout=5.0)
        check(after_delete == count - 1, f"async ECount gave {after_delete}, expected {count - 1}")
        out(f"EDelete('shape')      -> async ECount = {after_delete}")

        for key in ("colour", "size"):
            kv.Delete(key)
        check(kv.Count() == before, "the store did not return to its starting count")

    return f"{len(entries)} keys set, 'colour' = {colour.decode()!r}, missing key -> KErrNotFound"


def main() -> int:
    return run_main("kv_client", run)


if __name__ == "__main__":
    sys.exit(main())
