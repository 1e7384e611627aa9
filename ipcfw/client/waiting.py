"""Waiting for a server name to be registered: ``RSession.connect(name, wait=S)`` and
``ipcfw wait NAME``.

First the kernel (`ipcfw.kernelprobe.wait_for_kernel`, which polls: there is nobody to ask yet),
then the name: the kernel is asked to answer once `name` is registered (`AwaitServer`, kernel
rule 13), so a waiting client sends one message and hears the moment the server registers,
instead of asking again and again. If the wait times out, it is cancelled (`Cancel`), so the
kernel holds nothing for it. If the kernel dies meanwhile, the wait starts again with the next
kernel on the endpoint, until the deadline.
"""

from __future__ import annotations

import asyncio
import threading
import time

from .. import endpoint as endpoints
from .. import errors
from ..kernelprobe import LEAST_ANSWER, no_kernel_error, wait_for_kernel
from ..naming import name_problem
from ..protocol import AwaitServer, Cancel, Completed, Message, encode
from . import aio
from .channel import Channel
from .runtime import Runtime

__all__ = ["wait_for_server", "wait_for_server_async"]


def wait_for_server(name: str, timeout: float | None, endpoint: str | None = None) -> None:
    """Return once a server is registered as `name` with the kernel at `endpoint` (default:
    ``IPCFW_KERNEL``, else the default endpoint), waiting for the kernel to start if need be.

    `timeout` is in seconds (None: no limit). Raises ``CouldNotConnect`` if no kernel answered
    within it, ``NotFound`` if the kernel did but no server registered `name`; each message
    names what was missing and how long it waited. Raises ``BadName`` for an invalid name.
    """
    resolved, deadline = _begin(name, timeout, endpoint)
    while True:
        if not wait_for_kernel(resolved, _remaining(deadline)):
            raise no_kernel_error(resolved, timeout)
        runtime = None
        try:
            runtime = Runtime.for_endpoint(resolved)
            if _answered(_await_name(runtime, name, deadline)):
                return
        except errors.IpcError:
            _kernel_went_or_raise(runtime, deadline)
            continue  # the kernel died meanwhile: wait for the next one
        raise _not_registered(name, resolved, timeout)


async def wait_for_server_async(name: str, timeout: float | None,
                                endpoint: str | None = None) -> None:
    """`wait_for_server` for a coroutine: the same wait, without blocking the event loop (the
    look for a kernel runs on a thread of the loop's executor; the kernel's answer is
    awaited). Cancelling the awaiting task ends the wait."""
    resolved, deadline = _begin(name, timeout, endpoint)
    loop = asyncio.get_running_loop()
    while True:
        stop = threading.Event()  # (set if the task is cancelled: the look ends at once)
        try:
            found = await loop.run_in_executor(
                None, wait_for_kernel, resolved, _remaining(deadline),
                lambda seconds: not stop.wait(seconds))
        finally:
            stop.set()
        if not found:
            raise no_kernel_error(resolved, timeout)
        runtime = None
        try:
            runtime = Runtime.for_endpoint(resolved)
            channel, req_id, frame, limit = _await_request(runtime, name, deadline)
            try:
                reply = await aio.call(channel, frame, req_id, limit)
            except TimeoutError:
                reply = None
                channel.send(encode(Cancel(req_id)))
            if _answered(reply):
                return
        except errors.IpcError:
            _kernel_went_or_raise(runtime, deadline)
            continue
        raise _not_registered(name, resolved, timeout)


def _begin(name: str, timeout: float | None, endpoint: str | None) -> tuple[str, float | None]:
    """Check the arguments: the endpoint to wait at, and the deadline."""
    problem = name_problem(name)
    if problem:
        raise errors.IpcError(errors.KErrBadName, problem)
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be at least 0, got {timeout}")
    resolved = endpoints.resolve(endpoint)
    return resolved, None if timeout is None else time.monotonic() + timeout


def _await_request(runtime: Runtime, name: str,
                   deadline: float | None) -> tuple[Channel, int, bytes, float | None]:
    """The thread's channel, and an `AwaitServer` for `name` to send on it (its req_id and
    frame), with how long to wait for its answer."""
    req_id = runtime.next_req_id()
    # (a registered name is answered at once, but not instantly: give the answer its time)
    limit = None if deadline is None else max(_remaining(deadline) or 0.0, LEAST_ANSWER)
    return runtime.channel(), req_id, encode(AwaitServer(req_id, name)), limit


def _await_name(runtime: Runtime, name: str, deadline: float | None) -> Message | None:
    """Ask the kernel to answer once `name` is registered: its answer, or None if `deadline`
    comes first (the wait is then cancelled)."""
    channel, req_id, frame, limit = _await_request(runtime, name, deadline)
    try:
        return channel.call(frame, req_id, limit)
    except TimeoutError:
        channel.send(encode(Cancel(req_id)))  # (its answer, KErrCancel, is dropped on arrival)
        return None


def _answered(reply: Message | None) -> bool:
    """Whether the kernel's answer to an `AwaitServer` says the name is registered (False:
    no answer in time); raises the kernel's refusal."""
    if reply is None:
        return False
    if type(reply) is not Completed:
        raise errors.IpcError(errors.KErrGeneral, f"unexpected reply to AwaitServer: {reply!r}")
    if reply.value < 0:  # (a failed activation says why: the server's status and output)
        raise errors.IpcError(reply.value, reply.text) if reply.text else errors.IpcError(
            reply.value)
    return True


def _kernel_went_or_raise(runtime: Runtime | None, deadline: float | None) -> None:
    """An IpcError ended a wait: go on if the kernel died (and time is left), else re-raise
    it. Call in an ``except`` block."""
    kernel_went = runtime is None or runtime.kernel_dead
    if not kernel_went or _remaining(deadline) == 0.0:
        raise


def _not_registered(name: str, endpoint: str, timeout: float | None) -> errors.IpcError:
    return errors.IpcError(
        errors.KErrNotFound,
        f"no server {name!r} registered with the ipcfw kernel at {endpoint} after waiting "
        f"{timeout:.3g} s (is its `ipcfw serve` running, with the same {endpoints.ENV_VAR}?)",
    )


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
