"""The key-value store server: one dictionary shared by every session of the server.

Its interface is `KeyValue`, a typed interface (docs/interfaces.md): the one definition that the
server (`KvSession`, an ``InterfaceSession[KeyValue]``) and its clients (``KeyValue.connect()``,
a proxy) share. The subsessions (cursors, tables) stay raw Symbian-style functions, served by
the same session: ``KvSession.ServiceL`` takes those and hands the others to the interface.

This example shows the everyday shape of a Symbian-style server:

* the data lives on the server object (`KvServer.store`), so every client sees the same store;
  a session holds only the subsessions its client opened (cursors, table handles), in its
  object index (``CSession.ObjectIx()``), which the framework empties when the session ends;
* every operation does its work and answers at once, on the loop thread, so the store needs
  no lock (``ServiceL`` is only ever called on that thread);
* errors are raised, not completed by hand: raising ``IpcError(code)`` completes the message
  with that code, and the client's call raises the matching exception (``NotFound``, ...).

The operations (`KeyValue`; the raw opcodes ``ESet`` ... are their function numbers, for raw
clients: the wire is plain ``SendReceive``):

* ``put(key, value)`` (``ESet``, 1): key = descriptor 0, value = descriptor 1.
* ``get(key) -> bytes`` (``EGet``, 2): key = descriptor 0; the value is written into writable
  descriptor 1 (the proxy's reply descriptor, 4096 bytes) and the completion value is its
  length; ``KErrNotFound`` if the key is missing; ``KErrOverflow`` if descriptor 1 is shorter
  than the value (nothing is written then).
* ``delete(key)`` (``EDelete``, 3): ``KErrNotFound`` if missing.
* ``count() -> int`` (``ECount``, 4): the number of keys.
* ``value_length(key) -> int`` (``EValueLength``, 5): the value's length, so that a raw client
  can size its buffer before ``EGet``; ``KErrNotFound`` if missing.
* ``open_cursors() -> int`` (``EOpenCursors``, 9): the number of cursors open in the whole
  server, all sessions together (closing a session closes its cursors).
* ``keys(prefix=b"") -> list[bytes]`` (``EKeys``, 16): the keys starting with `prefix`, sorted;
  a msgpack value, in a 16 KiB reply descriptor.
* ``put_many(entries: dict[bytes, bytes]) -> int`` (``EPutMany``, 17): store every entry (a
  msgpack map in descriptor 0); returns the number of keys afterwards.

A key or value of the wrong kind (an int instead of a descriptor) fails with ``KErrArgument``
naming the parameter. The server is a ``CPolicyServer`` (`KV_POLICY`): reads need the
``ReadUserData`` capability, writes ``WriteUserData`` (docs/security.md).

Subsessions (raw; the client opens them with ``ipcfw.RSubSession``; every request on one carries
its handle in argument 3, and a handle that is not one of the session's open subsessions of the
right kind fails with ``KErrBadHandle``):

* A **cursor** walks the keys of the store as they were when it was opened, in sorted order.

  * ``EOpenCursor`` (6): optional key prefix = descriptor 0 (only keys starting with it). Opens
    the cursor: its handle is written into argument 3.
  * ``ECursorNext`` (7): the next key is written into writable descriptor 0 and, if argument 1
    is a writable descriptor, its current value into that. Completes with the key's length, or
    ``KErrEof`` after the last key. Keys deleted since the cursor was opened are skipped. If a
    buffer is too short, ``KErrOverflow``: nothing is written and the cursor stays put, so the
    client can retry with larger buffers.
  * ``ECloseCursor`` (8): closes the cursor.

* A **table** is a named store of its own, shared by every session that opens the same name.

  * ``EOpenTable`` (10): table name = descriptor 0 (not empty: ``KErrBadName``).
  * ``ETableSet`` (11), ``ETableGet`` (12), ``ETableDelete`` (13), ``ETableCount`` (14): as
    ``ESet``, ``EGet``, ``EDelete`` and ``ECount``, in the table (a key or value that is an
    int fails with ``KErrBadDescriptor`` there).
  * ``ECloseTable`` (15): closes the table handle (the table's data stays).

Host it with ``ipcfw serve servers.kv:KvServer``; ``clients/kv_client.py`` shows a client.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from ipcfw import (
    NOT_SUPPORTED,
    BadDescriptor,
    CPolicyServer,
    Interface,
    InterfaceSession,
    IpcError,
    KErrBadHandle,
    KErrBadName,
    KErrEof,
    KErrNone,
    KErrNotFound,
    KErrOverflow,
    RMessage,
    TPolicy,
    TPolicyElement,
    TSecurityPolicy,
    operation,
)


class KeyValue(Interface, name="kv", version=(1, 0, 0)):
    """The key-value store's interface: what a client calls, what the server implements.

    ::

        with KeyValue.connect() as kv:
            kv.put(b"colour", b"blue")
            kv.get(b"colour")           # -> b"blue"
            kv.get(b"missing")          # raises ipcfw.NotFound
    """

    @operation(1)
    def put(self, key: bytes, value: bytes) -> None:
        """Store `value` under `key`."""

    @operation(2)
    def get(self, key: bytes) -> bytes:
        """The value of `key` (``NotFound`` if missing; ``Overflow`` over 4096 bytes)."""

    @operation(3)
    def delete(self, key: bytes) -> None:
        """Remove `key` (``NotFound`` if missing)."""

    @operation(4)
    def count(self) -> int:
        """The number of keys."""

    @operation(5)
    def value_length(self, key: bytes) -> int:
        """The length of `key`'s value (``NotFound`` if missing)."""

    @operation(9)
    def open_cursors(self) -> int:
        """The cursors open in the whole server."""

    @operation(16, reply=16384)
    def keys(self, prefix: bytes = b"") -> list[bytes]:
        """The keys starting with `prefix`, sorted."""

    @operation(17)
    def put_many(self, entries: dict[bytes, bytes]) -> int:
        """Store every entry; the number of keys afterwards."""


# The raw opcodes, for raw clients and the subsession functions: the interface's numbers.
ESet = KeyValue.put.number
EGet = KeyValue.get.number
EDelete = KeyValue.delete.number
ECount = KeyValue.count.number
EValueLength = KeyValue.value_length.number
EOpenCursors = KeyValue.open_cursors.number
EKeys = KeyValue.keys.number
EPutMany = KeyValue.put_many.number
EOpenCursor = 6
ECursorNext = 7
ECloseCursor = 8
EOpenTable = 10
ETableSet = 11
ETableGet = 12
ETableDelete = 13
ETableCount = 14
ECloseTable = 15

_SUBSESSION_FUNCTIONS = frozenset(
    {EOpenCursor, ECursorNext, ECloseCursor, EOpenTable, ETableSet, ETableGet, ETableDelete,
     ETableCount, ECloseTable}
)

T = TypeVar("T")


class KvCursor:
    """A cursor subsession: a snapshot of the store's sorted keys and a position in it.

    The server counts the cursors open (`KvServer.open_cursors`); `Close` is called once, by
    ``CloseSubSessionL`` or when the session ends.
    """

    def __init__(self, server: KvServer, store: dict[bytes, bytes], prefix: bytes) -> None:
        self.server = server
        self.store = store
        self.keys = sorted(key for key in store if key.startswith(prefix))
        self.position = 0
        server.open_cursors += 1

    def Close(self) -> None:
        self.server.open_cursors -= 1


class KvTable:
    """A table subsession: a handle to one of the server's named tables."""

    def __init__(self, data: dict[bytes, bytes]) -> None:
        self.data = data


class KvSession(InterfaceSession[KeyValue]):
    """One client's session. The store belongs to the server; the session's only state is its
    open subsessions, which `NewSubSessionL` keeps in its object index.

    The interface's operations are its methods; the subsession functions are served raw, here.
    """

    # -- the interface (each method's arguments decoded, its return encoded, by the base) -------

    def put(self, key: bytes, value: bytes) -> None:
        self.Server().store[key] = value

    def get(self, key: bytes) -> bytes:
        # A value longer than the caller's reply descriptor: KErrOverflow, nothing written.
        return _lookup(self.Server().store, key)

    def delete(self, key: bytes) -> None:
        store = self.Server().store
        _lookup(store, key)
        del store[key]

    def count(self) -> int:
        return len(self.Server().store)

    def value_length(self, key: bytes) -> int:
        return len(_lookup(self.Server().store, key))

    def open_cursors(self) -> int:
        return int(self.Server().open_cursors)

    def keys(self, prefix: bytes) -> list[bytes]:
        return sorted(key for key in self.Server().store if key.startswith(prefix))

    def put_many(self, entries: dict[bytes, bytes]) -> int:
        store = self.Server().store
        store.update(entries)
        return len(store)

    # -- the raw subsession functions ---------------------------------------------------------

    def ServiceL(self, message: RMessage) -> Awaitable[None] | None:
        function = message.Function()
        if function not in _SUBSESSION_FUNCTIONS:
            return super().ServiceL(message)  # the interface's operations
        store = self.Server().store

        # -- cursors ---------------------------------------------------------------------------

        if function == EOpenCursor:
            prefix = _optional_descriptor(message, 0)
            # The handle goes into the client's argument 3; if that fails, the cursor is closed.
            self.NewSubSessionL(message, KvCursor(self.Server(), store, prefix or b""))
            message.Complete(KErrNone)

        elif function == ECursorNext:
            self._cursor_next(message, self._subsession(message, KvCursor))

        elif function == ECloseCursor:
            self._subsession(message, KvCursor)  # a table's handle is not a cursor's
            self.CloseSubSessionL(message)  # removes it and calls KvCursor.Close
            message.Complete(KErrNone)

        # -- tables ----------------------------------------------------------------------------

        elif function == EOpenTable:
            name = message.ReadL(0)
            if not name:
                raise IpcError(KErrBadName, "a table name may not be empty")
            data = self.Server().tables.setdefault(name, {})
            self.NewSubSessionL(message, KvTable(data))
            message.Complete(KErrNone)

        elif function == ECloseTable:
            self._subsession(message, KvTable)
            self.CloseSubSessionL(message)
            message.Complete(KErrNone)

        else:  # a table function
            self._table_request(message, function, self._subsession(message, KvTable).data)
        return None

    def _subsession(self, message: RMessage, kind: type[T]) -> T:
        """The subsession object of `message` (argument 3), which must be a `kind`."""
        obj = self.SubSessionL(message)  # KErrBadHandle for a closed or made-up handle
        if not isinstance(obj, kind):
            raise IpcError(KErrBadHandle, f"handle 0x{message.Int3():x} is not a {kind.__name__}")
        return obj

    def _cursor_next(self, message: RMessage, cursor: KvCursor) -> None:
        while cursor.position < len(cursor.keys):
            key = cursor.keys[cursor.position]
            value = cursor.store.get(key)
            if value is None:  # deleted since the cursor was opened
                cursor.position += 1
                continue
            want_value = _optional_descriptor(message, 1) is not None
            # Check both buffers first, so that an overflow writes nothing and keeps the place.
            if message.GetDesMaxLength(0) < len(key) or (
                want_value and message.GetDesMaxLength(1) < len(value)
            ):
                raise IpcError(KErrOverflow, "a buffer is too short for the next key or value")
            message.WriteL(0, key)
            if want_value:
                message.WriteL(1, value)
            cursor.position += 1
            message.Complete(len(key))
            return
        message.Complete(KErrEof)

    def _table_request(self, message: RMessage, function: int, data: dict[bytes, bytes]
                       ) -> None:
        """ETableSet, ETableGet, ETableDelete or ETableCount on a table's `data`."""
        if function == ETableSet:
            # ReadL raises KErrBadDescriptor for an int argument: the client gets that code.
            data[message.ReadL(0)] = message.ReadL(1)
            message.Complete(KErrNone)
        elif function == ETableGet:
            value = _lookup(data, message.ReadL(0))
            # WriteL raises KErrOverflow when the value is longer than the client's buffer
            # (its max length). We let it propagate: the framework completes the message with
            # the code, and the client's SendReceive raises Overflow.
            message.WriteL(1, value)
            message.Complete(len(value))
        elif function == ETableDelete:
            key = message.ReadL(0)
            _lookup(data, key)
            del data[key]
            message.Complete(KErrNone)
        else:
            message.Complete(len(data))



# Who may do what (docs/security.md): reading needs ReadUserData, writing WriteUserData (both
# are granted to every process of the kernel's user); function 0 and those past the last are
# not supported. Checked before ServiceL, on both data paths.
_READ = TPolicyElement(TSecurityPolicy("ReadUserData"))
_WRITE = TPolicyElement(TSecurityPolicy("WriteUserData"))
KV_POLICY = TPolicy([
    (0, NOT_SUPPORTED),
    (ESet, _WRITE),          # 1 put
    (EGet, _READ),           # 2 get
    (EDelete, _WRITE),       # 3 delete
    (ECount, _READ),         # 4-10: count, value_length, the cursors, open_cursors, open a table
    (ETableSet, _WRITE),     # 11
    (ETableGet, _READ),      # 12
    (ETableDelete, _WRITE),  # 13
    (ETableCount, _READ),    # 14-16: a table's count, close a table, keys
    (EPutMany, _WRITE),      # 17
    (EPutMany + 1, NOT_SUPPORTED),
])


class KvServer(CPolicyServer):
    name = KeyValue.interface.name
    version = KeyValue.interface.version
    session_class = KvSession
    policy = KV_POLICY

    def __init__(self) -> None:
        # Shared by all sessions. Only touched from ServiceL, i.e. from the loop thread: no lock.
        # (Cursors are also closed on that thread, when their session ends.)
        self.store: dict[bytes, bytes] = {}
        self.tables: dict[bytes, dict[bytes, bytes]] = {}
        self.open_cursors = 0


def _lookup(store: dict[bytes, bytes], key: bytes) -> bytes:
    """The value stored under `key`; leaves with KErrNotFound if there is none."""
    try:
        return store[key]
    except KeyError:
        raise IpcError(KErrNotFound, f"no key {key!r}") from None


def _optional_descriptor(message: RMessage, index: int) -> bytes | None:
    """Descriptor argument `index`, or None if the client did not send it (or sent int 0).

    Any other int fails with ``KErrBadDescriptor``, as a missing descriptor would.
    """
    try:
        return message.ReadL(index)
    except BadDescriptor:
        if (message.Int0, message.Int1, message.Int2, message.Int3)[index]() != 0:
            raise
        return None
