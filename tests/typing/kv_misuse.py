"""Misuses of the kv interface that mypy must refuse: tests/interface/test_typing.py runs mypy
on this file and expects, on each line whose comment says "error:" and a text, an error whose
message holds that text, and no other error. Never run."""

from __future__ import annotations

from servers.kv import KeyValue


def misuse(kv: KeyValue) -> None:
    kv.get("colour")  # error: incompatible type "str"; expected "bytes"
    kv.put(b"colour")  # error: Missing positional argument "value"
    text: str = kv.get(b"colour")  # error: (expression has type "bytes", variable has type "str")
    kv.count.send(1)  # error: Too many arguments for "send"
    kv.keys(prefix="c")  # error: Argument "prefix" to "__call__" of "BoundOperation"
    kv.no_such_operation()  # error: "KeyValue" has no attribute "no_such_operation"
    print(text)
