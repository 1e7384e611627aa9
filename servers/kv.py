"""The key-value store server: one dictionary shared by every session of the server.

This example shows the everyday shape of a Symbian-style server:

* the data lives on the server object (`KvServer.store`), so every client sees the same store;
  a session holds only the subsessions its client opened (cursors, table handles), in its
  object index (``CSession.ObjectIx()``), which the framework empties when the session ends;
* every function reads its arguments, does its work and completes the message at once, on the
  loop thread, so the store needs no lock (``ServiceL`` is only ever called on that thread);
* errors are not completed by hand: raising ``IpcError(code)`` (or letting ``ReadL``/``WriteL``
  raise) completes the message with that code, and the client's call raises the matching
  exception (``NotFound``, ``Overflow``, ...).

Functions (the client's opcodes; import them from here, the single source of truth):

* ``ESet`` (1): key = descriptor 0, value = descriptor 1. Completes with ``KErrNone``.
* ``EGet`` (2): key = descriptor 0; the value is written into writable descriptor 1. Completes
  with the value's length; ``KErrNotFound`` if the key is missing; ``KErrOverflow`` if the
  client's buffer is shorter than the value (nothing is written then).
* ``EDelete`` (3): key = descriptor 0. Completes with ``KErrNone``; ``KErrNotFound`` if missing.
* ``ECount`` (4): completes with the number of keys.
* ``EValueLength`` (5): key = descriptor 0. Completes with the value's length, so a client can
  size its buffer before ``EGet``; ``KErrNotFound`` if missing.

A key or value that is an int instead of a descriptor fails with ``KErrBadDescriptor``.

Subsessions (the client opens them with ``ipcfw.RSubSession``; every request on one carries its
handle in argument 3, and a handle that is not one of the session's open subsessions of the
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
  * ``EOpenCursors`` (9): a plain session request: completes with the number of cursors open
    in the whole server, all sessions together (closing a session closes its cursors).

* A **table** is a named store of its own, shared by every session that opens the same name.

  * ``EOpenTable`` (10): table name = descriptor 0 (not empty: ``KErrBadName``).
  * ``ETableSet`` (11), ``ETableGet`` (12), ``ETableDelete`` (13), ``ETableCount`` (14): as
    ``ESet``, ``EGet``, ``EDelete`` and ``ECount``, in the table.
  * ``ECloseTable`` (15): closes the table handle (the table's data stays).

Host it with ``ipcfw serve servers.kv:KvServer``; ``clients/kv_client.py`` shows a client.
"""

from __future__ import annotations

from typing import TypeVar

from ipcfw import (
    BadDescriptor,
    CServer,
    CSession,
    IpcError,
    KErrBadHandle,
    KErrBadName,
    KErrEof,
    KErrNone,
    KErrNotFound,
    KErrNotSupported,
    KErrOverflow,
    RMessage,
    TVersion,
)

ESet = 1
EGet = 2
EDelete = 3
ECount = 4
EValueLength = 5
EOpenCursor = 6
ECursorNext = 7
ECloseCursor = 8
EOpenCursors = 9
EOpenTable = 10
ETableSet = 11
ETableGet = 12
ETableDelete = 13
ETableCount = 14
ECloseTable = 15

# A table function does what the store function does, in the table.
_TABLE_FUNCTIONS = {ETableSet: ESet, ETableGet: EGet, ETableDelete: EDelete, ETableCount: ECount}

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


class KvSession(CSession):
    """One client's session. The store belongs to the server; the session's only state is its
    open subsessions, which `NewSubSessionL` keeps in its object index."""

    def ServiceL(self, message: RMessage) -> None:
        store = self.Server().store
        function = message.Function()

        if function in (ESet, EGet, EDelete, ECount):
            self._dict_request(message, function, store)

        elif function == EValueLength:
            message.Complete(len(self._lookup(store, message.ReadL(0))))

        # -- cursors ---------------------------------------------------------------------------

        elif function == EOpenCursor:
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

        elif function == EOpenCursors:
            message.Complete(self.Server().open_cursors)

        # -- tables ----------------------------------------------------------------------------

        elif function == EOpenTable:
            name = message.ReadL(0)
            if not name:
                raise IpcError(KErrBadName, "a table name may not be empty")
            data = self.Server().tables.setdefault(name, {})
            self.NewSubSessionL(message, KvTable(data))
            message.Complete(KErrNone)

        elif function in _TABLE_FUNCTIONS:
            data = self._subsession(message, KvTable).data
            self._dict_request(message, _TABLE_FUNCTIONS[function], data)

        elif function == ECloseTable:
            self._subsession(message, KvTable)
            self.CloseSubSessionL(message)
            message.Complete(KErrNone)

        else:
            raise IpcError(KErrNotSupported, f"kv has no function {function}")

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

    def _dict_request(self, message: RMessage, function: int, data: dict[bytes, bytes]) -> None:
        """ESet, EGet, EDelete or ECount on `data`: the store, or a table's."""
        if function == ESet:
            # ReadL raises KErrBadDescriptor for an int argument: the client gets that code.
            data[message.ReadL(0)] = message.ReadL(1)
            message.Complete(KErrNone)
        elif function == EGet:
            value = self._lookup(data, message.ReadL(0))
            # WriteL raises KErrOverflow when the value is longer than the client's buffer
            # (its max length). We let it propagate: the framework completes the message with
            # the code, and the client's SendReceive raises Overflow.
            message.WriteL(1, value)
            message.Complete(len(value))
        elif function == EDelete:
            key = message.ReadL(0)
            self._lookup(data, key)
            del data[key]
            message.Complete(KErrNone)
        else:
            message.Complete(len(data))

    @staticmethod
    def _lookup(store: dict[bytes, bytes], key: bytes) -> bytes:
        """The value stored under `key`; leaves with KErrNotFound if there is none."""
        try:
            return store[key]
        except KeyError:
            raise IpcError(KErrNotFound, f"no key {key!r}") from None


class KvServer(CServer):
    name = "kv"
    version = TVersion(1, 0, 0)
    session_class = KvSession

    def __init__(self) -> None:
        # Shared by all sessions. Only touched from ServiceL, i.e. from the loop thread: no lock.
        # (Cursors are also closed on that thread, when their session ends.)
        self.store: dict[bytes, bytes] = {}
        self.tables: dict[bytes, dict[bytes, bytes]] = {}
        self.open_cursors = 0


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
