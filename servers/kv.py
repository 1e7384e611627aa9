"""The key-value store server: one dictionary shared by every session of the server.

This example shows the everyday shape of a Symbian-style server:

* the data lives on the server object (`KvServer.store`), so every client sees the same store;
  each session object holds nothing of its own;
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

Host it with ``ipcfw serve servers.kv:KvServer``; ``clients/kv_client.py`` shows a client.
"""

from __future__ import annotations

from ipcfw import CServer, CSession, IpcError, KErrNone, KErrNotFound, KErrNotSupported, RMessage, TVersion

ESet = 1
EGet = 2
EDelete = 3
ECount = 4
EValueLength = 5


class KvSession(CSession):
    """One client's session. It keeps no state: the store belongs to the server."""

    def ServiceL(self, message: RMessage) -> None:
        store = self.Server().store
        function = message.Function()

        if function == ESet:
            # ReadL raises KErrBadDescriptor for an int argument: the client gets that code.
            store[message.ReadL(0)] = message.ReadL(1)
            message.Complete(KErrNone)

        elif function == EGet:
            value = self._lookup(store, message.ReadL(0))
            # WriteL raises KErrOverflow when the value is longer than the client's buffer
            # (its max length). We let it propagate: the framework completes the message with
            # the code, and the client's SendReceive raises Overflow.
            message.WriteL(1, value)
            message.Complete(len(value))

        elif function == EDelete:
            key = message.ReadL(0)
            self._lookup(store, key)
            del store[key]
            message.Complete(KErrNone)

        elif function == ECount:
            message.Complete(len(store))

        elif function == EValueLength:
            message.Complete(len(self._lookup(store, message.ReadL(0))))

        else:
            raise IpcError(KErrNotSupported, f"kv has no function {function}")

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
        self.store: dict[bytes, bytes] = {}
