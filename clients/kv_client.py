"""Example client for the key-value server: its typed interface (`KeyValue`), a raw cursor
subsession over the same session, and idiomatic error handling.

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

from ipcfw import EndOfFile, NotFound, Overflow, RSubSession, TIpcArgs  # noqa: E402

if __package__ == "ipcfw.examples.clients":  # installed: the wheel's ipcfw.examples
    from . import Out, SERVERS, check, connect_proxy, run_main
    from ..servers.kv import ECloseCursor, ECount, ECursorNext, EOpenCursor, KeyValue
else:  # a checkout: clients/ and servers/ side by side at its top
    from clients import Out, SERVERS, check, connect_proxy, run_main  # noqa: E402
    from servers.kv import ECloseCursor, ECount, ECursorNext, EOpenCursor, KeyValue  # noqa: E402

PLUGIN = f"{SERVERS}.kv:KvServer"


class RKvCursor(RSubSession):
    """A cursor over the store's keys: a raw subsession of a `KeyValue` proxy's session (as
    Symbian's ``RFile`` is a subsession of an ``RFs``).

    ::

        with RKvCursor.open_on(kv, b"user:") as cursor:
            for key, value in cursor:
                ...

    The cursor walks the keys present when it was opened, in sorted order. Closing the proxy
    closes its cursors too, in the server.
    """

    def __init__(self) -> None:
        super().__init__(close_function=ECloseCursor)  # so that `with` closes it

    @classmethod
    def open_on(cls, kv: KeyValue, prefix: bytes = b"") -> RKvCursor:
        cursor = cls()
        cursor.Open(kv, prefix)
        return cursor

    def Open(self, kv: KeyValue, prefix: bytes = b"") -> None:
        """Open the cursor on `kv`'s session, over the keys starting with `prefix`."""
        self.CreateSubSession(kv.session, EOpenCursor, TIpcArgs(prefix))

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
    entries = {b"colour": b"blue", b"shape": b"round", b"size": b"large"}
    with connect_proxy(KeyValue, PLUGIN, endpoint) as kv:
        for key in [*entries, b"big"]:
            try:
                kv.delete(key)
            except NotFound:
                pass
        before = kv.count()

        # A dict is a msgpack value: one request carries all three entries.
        count = kv.put_many(entries)
        check(count == before + len(entries),
              f"put_many gave {count}, expected {before + len(entries)}")
        out(f"put_many(3 entries)   -> count() = {count}")

        # The same session, raw: the wire is plain SendReceive with the interface's numbers.
        raw = kv.session.SendReceive(ECount)
        check(raw == count, f"SendReceive(ECount) gave {raw}, count() {count}")
        out(f"SendReceive(ECount)   -> {raw}  (the same operation, raw)")

        # A cursor is a raw subsession: opened, used and closed through the proxy's session.
        with RKvCursor.open_on(kv, b"s") as cursor:
            found = [key for key, _ in cursor]
        check({b"shape", b"size"} <= set(found) and all(key.startswith(b"s") for key in found),
              f"the cursor over prefix 's' gave {found}")
        out(f"cursor on prefix 's'  -> {[key.decode() for key in found]}"
            "  (ECursorNext until KErrEof)")

        keys = kv.keys(b"s")
        check(keys == sorted(found), f"keys(b's') gave {keys}, the cursor {found}")
        out(f"keys(b's')            -> {keys}  (a list, as msgpack in the reply descriptor)")

        colour = kv.get(b"colour")
        check(colour == b"blue", f"get(b'colour') returned {colour!r}")
        out(f"get(b'colour')        -> {colour!r}")

        # A value longer than get's reply descriptor: the server refuses to write it.
        kv.put(b"big", bytes(5000))
        try:
            kv.get(b"big")
            check(False, "get of a 5000-byte value into a 4096-byte reply succeeded")
        except Overflow:
            out("get(b'big') of 5000 bytes -> KErrOverflow  (the reply descriptor holds 4096)")
        kv.delete(b"big")

        try:
            kv.get(b"no-such-key")
            check(False, "get of a missing key succeeded")
        except NotFound:
            out("get(b'no-such-key')   -> KErrNotFound")

        kv.delete(b"shape")
        reply = kv.count.send()  # asynchronous: a Reply at once, its value later
        after_delete = reply.result(timeout=5.0)
        check(after_delete == count - 1, f"async count() gave {after_delete}, "
              f"expected {count - 1}")
        out(f"delete(b'shape')      -> async count() = {after_delete}")

        for key in (b"colour", b"size"):
            kv.delete(key)
        check(kv.count() == before, "the store did not return to its starting count")

    return f"{len(entries)} keys set, 'colour' = {colour.decode()!r}, missing key -> KErrNotFound"


def main() -> int:
    return run_main("kv_client", run)


if __name__ == "__main__":
    sys.exit(main())
