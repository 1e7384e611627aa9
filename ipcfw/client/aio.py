"""The client runtime under asyncio: an event loop that settles a channel while a coroutine
awaits an answer on it, and a call (a request and its answer) awaited instead of blocking.

A channel's answers are read by whoever settles it (`ipcfw.client.runtime`). While a coroutine
awaits one, its loop settles the channel itself whenever the channel's socket signals
(`settled_by_loop`): so the answer is read on the loop's thread, with no hand-off, when nothing
else reads it first; if another thread does, it hands the answer over with
``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from .. import errors
from ..protocol import Message
from .channel import SLICE, Channel
from .connection import AnyChannel

__all__ = ["settled_by_loop", "call"]


@contextlib.contextmanager
def settled_by_loop(loop: asyncio.AbstractEventLoop, channel: AnyChannel) -> Iterator[None]:
    """While it is entered, `loop` settles `channel` whenever the channel's socket signals
    (one reader per loop and channel, however many coroutines await on it)."""
    count = channel.loop_readers.get(loop, 0)
    if count == 0:
        loop.add_reader(channel.fd, channel.try_settle)
    channel.loop_readers[loop] = count + 1
    # Registered first, then settled: an answer that arrived behind a send which did not
    # settle is read now, and later sends settle (they see the loop among the readers).
    channel.try_settle()
    try:
        yield
    finally:
        count = channel.loop_readers.pop(loop) - 1
        if count:
            channel.loop_readers[loop] = count
        else:
            loop.remove_reader(channel.fd)


async def call(channel: Channel, frame: bytes, req_id: int, timeout: float | None, *,
               connect: bool = False) -> Message:
    """`Channel.call` for a coroutine: send `frame` and return the answer carrying `req_id`,
    awaited on the running loop. Raises TimeoutError after `timeout` seconds, and the error of
    a channel the kernel stopped serving or a kernel that died; if the wait ends without the
    answer (timed out, or the task cancelled), a `connect` that succeeds later is closed."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[Message] = loop.create_future()

    def answered(reply: Message) -> None:  # (on whichever thread read it)
        loop.call_soon_threadsafe(_resolve, answer, reply)

    channel.send_awaited(frame, req_id, answered)
    deadline = None if timeout is None else loop.time() + timeout
    try:
        with settled_by_loop(loop, channel):
            while not answer.done():
                # Each slice, as a blocked call does: has the kernel gone meanwhile?
                wait = SLICE if deadline is None else min(SLICE, deadline - loop.time())
                if wait <= 0:
                    raise TimeoutError(f"no reply within {timeout} s")
                await asyncio.wait((answer,), timeout=wait)
                if not answer.done():
                    _check_alive(channel)
        return answer.result()
    except BaseException:
        channel.forget_awaited(req_id, connect=connect)
        raise


def _check_alive(channel: Channel) -> None:
    if channel.runtime.kernel_dead:
        raise channel.runtime.kernel_gone_error()
    if channel.ended or channel.closed:
        raise channel.dropped_error() if channel.dropped else errors.IpcError(
            errors.KErrDisconnected, "the channel to the kernel was closed")


def _resolve(future: asyncio.Future[Message], reply: Message) -> None:
    if not future.done():
        future.set_result(reply)
