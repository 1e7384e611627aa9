"""CObjectIx, the server-side index of subsession objects: pure, so tested without processes."""

from __future__ import annotations

import pytest

from ipcfw import BadHandle, CObjectIx, IpcError, KErrBadHandle, KErrNoMemory, NoMemory

MAX_OBJECTS = 0x8000


class Closable:
    """An object that records how often it was closed."""

    def __init__(self, name: str = "", log: list | None = None) -> None:
        self.name = name
        self.closed = 0
        self.log = log

    def Close(self) -> None:
        self.closed += 1
        if self.log is not None:
            self.log.append(self.name)


def test_handles_are_never_zero_and_name_their_objects():
    index = CObjectIx()
    objects = [Closable(str(i)) for i in range(100)]
    handles = [index.AddL(obj) for obj in objects]
    assert 0 not in handles
    assert len(set(handles)) == len(handles)
    assert all(0 < h < 2**31 for h in handles)  # fits the int of argument 3
    for handle, obj in zip(handles, objects):
        assert index.At(handle) is obj
        assert index.AtL(handle) is obj
    assert index.Count() == len(index) == 100
    assert list(index) == objects  # slot order


def test_handle_layout_is_instance_and_slot():
    index = CObjectIx()
    first, second = index.AddL(Closable()), index.AddL(Closable())
    assert first & 0x7FFF == 0 and second & 0x7FFF == 1  # slots
    assert first >> 16 == 1 and second >> 16 == 2  # instances count from 1


def test_remove_closes_the_object_and_its_handle_goes_stale():
    index = CObjectIx()
    obj = Closable()
    handle = index.AddL(obj)
    index.Remove(handle)
    assert obj.closed == 1
    assert index.At(handle) is None
    with pytest.raises(BadHandle) as raised:
        index.AtL(handle)
    assert raised.value.code == KErrBadHandle
    with pytest.raises(BadHandle):
        index.Remove(handle)
    assert obj.closed == 1
    assert index.Count() == 0


def test_a_reused_slot_gets_a_new_handle_and_the_old_one_stays_refused():
    index = CObjectIx()
    old = index.AddL(Closable("old"))
    index.Remove(old)
    new_obj = Closable("new")
    new = index.AddL(new_obj)
    assert new & 0x7FFF == old & 0x7FFF  # the same slot...
    assert new != old  # ...under another handle
    assert index.At(old) is None
    with pytest.raises(BadHandle):
        index.AtL(old)
    with pytest.raises(BadHandle):
        index.Remove(old)
    assert index.At(new) is new_obj and new_obj.closed == 0


def test_the_lowest_free_slot_is_used_first():
    index = CObjectIx()
    handles = [index.AddL(Closable()) for _ in range(5)]
    index.Remove(handles[3])
    index.Remove(handles[1])
    assert index.AddL(Closable()) & 0x7FFF == 1
    assert index.AddL(Closable()) & 0x7FFF == 3
    assert index.AddL(Closable()) & 0x7FFF == 5


def test_the_instance_counter_wraps_and_skips_zero():
    index = CObjectIx()
    seen = set()
    for _ in range(0x3FFF + 5):  # round the 14-bit counter once
        handle = index.AddL(Closable())
        seen.add(handle >> 16)
        assert handle != 0
        index.Remove(handle)
    assert 0 not in seen
    assert seen == set(range(1, 0x4000))


def test_a_full_index_refuses_with_no_memory():
    index = CObjectIx()
    handles = [index.AddL(i + 1) for i in range(MAX_OBJECTS)]
    assert len(set(handles)) == MAX_OBJECTS and 0 not in handles
    with pytest.raises(NoMemory) as raised:
        index.AddL("one too many")
    assert raised.value.code == KErrNoMemory
    assert index.Count() == MAX_OBJECTS
    index.Remove(handles[1234])
    handle = index.AddL("fits again")
    assert handle & 0x7FFF == 1234 and index.At(handle) == "fits again"


@pytest.mark.parametrize("bad", [0, -1, -(2**31), 1, 0x7FFF, 0x10000 | 0x8000, 2**31, 2**40,
                                 True, 1.0, "65536", b"\x00\x00\x01\x00", None])
def test_handles_it_did_not_hand_out_are_refused(bad):
    index = CObjectIx()
    handle = index.AddL(Closable())
    assert handle == 0x10000
    assert index.At(bad) is None
    with pytest.raises(BadHandle):
        index.AtL(bad)
    with pytest.raises(BadHandle):
        index.Remove(bad)
    assert index.At(handle) is not None and index.Count() == 1


def test_bits_outside_the_fields_are_refused():
    index = CObjectIx()
    handle = index.AddL(Closable())
    for extra in (0x8000, 0x4000_0000):  # Symbian's ENoClose bit; above the 14-bit instance
        assert index.At(handle | extra) is None


def test_objects_without_close_are_fine():
    index = CObjectIx()
    handle = index.AddL({"plain": "dict"})
    index.Remove(handle)
    index.AddL(42)
    index.CloseAll()
    assert index.Count() == 0


def test_none_is_not_an_object():
    with pytest.raises(TypeError):
        CObjectIx().AddL(None)


def test_close_all_closes_each_object_once_and_empties_the_index():
    index = CObjectIx()
    log: list[str] = []
    objects = [Closable(str(i), log) for i in range(10)]
    handles = [index.AddL(obj) for obj in objects]
    index.Remove(handles[4])
    index.CloseAll()
    assert [obj.closed for obj in objects] == [1] * 10
    assert sorted(log) == sorted(str(i) for i in range(10))
    assert index.Count() == 0 and list(index) == []
    assert all(index.At(h) is None for h in handles)
    index.CloseAll()  # nothing left: harmless
    assert [obj.closed for obj in objects] == [1] * 10
    # The index is usable afterwards, and its new handles are not the old ones.
    assert index.AddL(Closable()) not in handles


def test_close_all_closes_every_object_even_if_one_close_raises():
    class Failing(Closable):
        def Close(self) -> None:
            super().Close()
            raise RuntimeError(f"close {self.name} failed")

    index = CObjectIx()
    objects = [Closable("a"), Failing("b"), Closable("c"), Failing("d")]
    for obj in objects:
        index.AddL(obj)
    with pytest.raises(RuntimeError, match="close b failed"):
        index.CloseAll()
    assert [obj.closed for obj in objects] == [1, 1, 1, 1]
    assert index.Count() == 0


def test_remove_takes_the_object_out_even_if_close_raises():
    class Failing:
        def Close(self) -> None:
            raise IpcError(-2, "boom")

    index = CObjectIx()
    handle = index.AddL(Failing())
    with pytest.raises(IpcError):
        index.Remove(handle)
    assert index.At(handle) is None and index.Count() == 0

