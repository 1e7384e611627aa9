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

import time

from .. import endpoint as endpoints
from .. import errors
from ..kernelprobe import LEAST_ANSWER, no_kernel_error, wait_for_kernel
from ..naming import name_problem
from ..protocol import AwaitServer, Cancel, Completed, encode
from .runtime import Runtime

__all__ = ["wait_for_server"]


def wait_for_server(name: str, timeout: float | None, endpoint: str | None = None) -> None:
    """Return once a server is registered as `name` with the kernel at `endpoint` (default:
    ``IPCFW_KERNEL``, else the default endpoint), waiting for the kernel to start if need be.

    `timeout` is in seconds (None: no limit). Raises ``CouldNotConnect`` if no kernel answered
    within it, ``NotFound`` if the kernel did but no server registered `name`; each message
    names what was missing and how long it waited. Raises ``BadName`` for an invalid name.
    """
    problem = name_problem(name)
    if problem:
        raise errors.IpcError(errors.KErrBadName, problem)
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be at least 0, got {timeout}")
    resolved = endpoints.resolve(endpoint)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if not wait_for_kernel(resolved, _remaining(deadline)):
            raise no_kernel_error(resolved, timeout)
        runtime = None
        try:
            runtime = Runtime.for_endpoint(resolved)
            if _await_name(runtime, name, deadline):
                return
        except errors.IpcError:
            kernel_went = runtime is None or runtime.kernel_dead
            if not kernel_went or _remaining(deadline) == 0.0:
                raise
            continue  # the kernel died meanwhile: wait for the next one
        raise errors.IpcError(
            errors.KErrNotFound,
            f"no server {name!r} registered with the ipcfw kernel at {resolved} after waiting "
            f"{timeout:.3g} s (is its `ipcfw serve` running, with the same {endpoints.ENV_VAR}?)",
        )


def _await_name(runtime: Runtime, name: str, deadline: float | None) -> bool:
    """Ask the kernel to answer once `name` is registered; False if `deadline` comes first
    (the wait is then cancelled)."""
    channel = runtime.channel()
    req_id = runtime.next_req_id()
    # (a registered name is answered at once, but not instantly: give the answer its time)
    timeout = None if deadline is None else max(_remaining(deadline) or 0.0, LEAST_ANSWER)
    try:
        reply = channel.call(encode(AwaitServer(req_id, name)), req_id, timeout)
    except TimeoutError:
        channel.send(encode(Cancel(req_id)))  # (its answer, KErrCancel, is dropped on arrival)
        return False
    if type(reply) is not Completed:
        raise errors.IpcError(errors.KErrGeneral, f"unexpected reply to AwaitServer: {reply!r}")
    errors.check(reply.value)
    return True


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
