"""CObjectIx: a server's index of subsession objects, keyed by handles that are never 0.

A server that offers subsessions (an open file, a table, a cursor) keeps one object per
subsession and gives the client a handle to it. The client sends the handle back as argument 3
of every later request on the subsession (see `ipcfw.subsession.RSubSession`). A handle is a
number a client may get wrong, keep after closing, or make up, so the index must refuse any
handle it did not hand out for an object it still holds. Symbian's ``CObjectIx`` does this, and
this class follows it::

    index = CObjectIx()
    handle = index.AddL(cursor)     # never 0: 0 means "no subsession"
    index.AtL(handle)               # -> cursor
    index.Remove(handle)            # removes it and calls cursor.Close()
    index.At(handle)                # -> None: the handle is stale now
    index.AtL(handle)               # raises BadHandle (KErrBadHandle)

A handle is ``(instance << 16) | index``: `index` (15 bits) is the object's slot, `instance` (14
bits) a counter bumped by every `AddL` that skips 0. So no handle is 0, and a slot used again
gets a handle different from the one its earlier object had (until the counter has gone round
its 16383 values, as in Symbian). At most 0x8000 objects are held at once.

`CSession` keeps one index per session (``CSession.ObjectIx()``) and closes what is left in it
when the session ends; ``CSession.NewSubSessionL``, ``SubSessionL`` and ``CloseSubSessionL`` are
the usual way in. The class itself does no I/O and takes no lock: use it from one thread (a
server's loop thread, where ``ServiceL`` runs).
"""

from __future__ import annotations

import heapq
from typing import Any
from collections.abc import Iterator

from .. import errors

__all__ = ["CObjectIx"]

_INDEX_BITS = 15
_INDEX_MASK = (1 << _INDEX_BITS) - 1  # 0x7FFF
_MAX_OBJECTS = 1 << _INDEX_BITS  # 0x8000
_INSTANCE_SHIFT = 16
_INSTANCE_MASK = (1 << 14) - 1  # 0x3FFF


class CObjectIx:
    """An index of objects, each under a handle that is never 0 (Symbian ``CObjectIx``).

    * ``AddL(obj)`` stores `obj` and returns its handle; ``IpcError(KErrNoMemory)`` when the
      index already holds 0x8000 objects.
    * ``At(handle)`` is the object or None; ``AtL(handle)`` the object, or raises
      ``IpcError(KErrBadHandle)``. A handle that is not a current one (0, stale, made up, not an
      int) is refused.
    * ``Remove(handle)`` takes the object out and calls its ``Close()``, if it has one.
    * ``CloseAll()`` does that for every object: a session calls it when it ends.

    ``len(index)`` is ``Count()``; iterating yields the objects in slot order.
    """

    def __init__(self) -> None:
        self._slots: list[tuple[int, Any] | None] = []  # slot -> (instance, object) or None
        self._free: list[int] = []  # a heap of the empty slots in _slots
        self._instance = 0  # the instance of the last handle handed out
        self._count = 0

    def AddL(self, obj: Any) -> int:
        """Store `obj`; return its new handle (never 0). The lowest free slot is used.

        Raises ``IpcError(KErrNoMemory)`` if the index is full (0x8000 objects), ``TypeError``
        for None (which `At` uses to say "no object").
        """
        if obj is None:
            raise TypeError("CObjectIx cannot hold None")
        if self._free:
            slot = heapq.heappop(self._free)
        elif len(self._slots) < _MAX_OBJECTS:
            slot = len(self._slots)
            self._slots.append(None)
        else:
            raise errors.IpcError(
                errors.KErrNoMemory, f"the object index is full ({_MAX_OBJECTS} objects)"
            )
        self._instance = self._instance % _INSTANCE_MASK + 1  # 1..0x3FFF, never 0
        self._slots[slot] = (self._instance, obj)
        self._count += 1
        return (self._instance << _INSTANCE_SHIFT) | slot

    def At(self, handle: int) -> Any | None:
        """The object `handle` refers to, or None if it refers to none now."""
        slot = self._slot_of(handle)
        return None if slot is None else self._slots[slot][1]  # type: ignore[index]

    def AtL(self, handle: int) -> Any:
        """The object `handle` refers to; raises ``IpcError(KErrBadHandle)`` if none."""
        slot = self._slot_of(handle)
        if slot is None:
            raise errors.IpcError(errors.KErrBadHandle, f"no object has handle {_show(handle)}")
        return self._slots[slot][1]  # type: ignore[index]

    def Remove(self, handle: int) -> None:
        """Take the object out of the index, then call its ``Close()`` if it has one.

        Raises ``IpcError(KErrBadHandle)`` if `handle` refers to no object (Symbian panics the
        server, E32USER-CBase 37). If ``Close()`` raises, the object is out of the index anyway
        and the exception propagates.
        """
        slot = self._slot_of(handle)
        if slot is None:
            raise errors.IpcError(errors.KErrBadHandle, f"no object has handle {_show(handle)}")
        obj = self._take(slot)
        _close(obj)

    def CloseAll(self) -> None:
        """Remove every object and close each once (a session does this when it ends).

        Every object is closed even if one's ``Close()`` raises; the first such exception is
        raised afterwards.
        """
        objects = [entry[1] for entry in self._slots if entry is not None]
        self._slots.clear()
        self._free.clear()
        self._count = 0
        first: BaseException | None = None
        for obj in objects:
            try:
                _close(obj)
            except Exception as exc:
                if first is None:
                    first = exc
        if first is not None:
            raise first

    def Count(self) -> int:
        """The number of objects held."""
        return self._count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Any]:
        return iter([entry[1] for entry in self._slots if entry is not None])

    def __repr__(self) -> str:
        return f"<CObjectIx {self._count} objects>"

    # -- internals ---------------------------------------------------------------------------

    def _slot_of(self, handle: object) -> int | None:
        """The slot `handle` names, if it is a current handle; else None."""
        if type(handle) is not int or handle <= 0:
            return None
        slot, instance = handle & _INDEX_MASK, handle >> _INSTANCE_SHIFT
        if handle != (instance << _INSTANCE_SHIFT) | slot or not 0 < instance <= _INSTANCE_MASK:
            return None  # bits outside the index and instance fields (e.g. Symbian's ENoClose)
        if slot >= len(self._slots):
            return None
        entry = self._slots[slot]
        if entry is None or entry[0] != instance:
            return None
        return slot

    def _take(self, slot: int) -> Any:
        entry = self._slots[slot]
        assert entry is not None
        self._slots[slot] = None
        self._count -= 1
        heapq.heappush(self._free, slot)
        return entry[1]


def _close(obj: Any) -> None:
    close = getattr(obj, "Close", None)
    if callable(close):
        close()


def _show(handle: object) -> str:
    return f"0x{handle:x}" if type(handle) is int and handle >= 0 else repr(handle)
