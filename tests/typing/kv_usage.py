"""A typed use of the kv server's interface, checked by mypy (pyproject.toml's [tool.mypy]
files): mypy sees each operation's parameters and return type on the proxy, its `send` (a
`Reply`) and its `call_async`. Not a test to run; tests/interface/test_typing.py runs mypy on
kv_misuse.py, next to it, and expects each of its errors."""

from __future__ import annotations

import asyncio

from ipcfw import Reply, TRequestStatus, User

from servers.kv import KeyValue
from servers.notifier import Notifier


def use(kv: KeyValue, notifier: Notifier) -> None:
    kv.put(b"colour", b"blue")
    value: bytes = kv.get(b"colour")
    count: int = kv.count()
    keys: list[bytes] = kv.keys(prefix=b"c")
    stored: int = kv.put_many({b"shape": b"round"})
    reply: Reply[bytes] = kv.get.send(b"colour")
    status: TRequestStatus = reply.status
    User.WaitForRequest(status, timeout=5.0)
    again: bytes = reply.result(5.0)
    payload = bytearray(64)
    event: int = notifier.wait_for_event(payload)
    waiting: Reply[int] = notifier.wait_for_event.send()
    print(value, count, keys, stored, again, event, waiting.done())


async def use_async(kv: KeyValue) -> int:
    value: bytes = await kv.get.call_async(b"colour")
    count: int = await kv.count.send()
    both = await asyncio.gather(kv.get.send(b"a"), kv.count.send())
    print(value, both)
    return count


def main() -> None:
    with KeyValue.connect() as kv, Notifier.connect(path="kernel") as notifier:
        use(kv, notifier)
        asyncio.run(use_async(kv))
