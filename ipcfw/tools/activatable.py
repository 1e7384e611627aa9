"""``ipcfw ps``'s list of the servers the kernel can start (``ipcfw kernel --services DIR``)."""

from __future__ import annotations

from .. import errors
from ..client.runtime import Runtime
from ..protocol import ActivatableList, ListActivatable, encode, unpack_activatable


def kernel_activatable(endpoint: str | None = None,
                       timeout: float = 5.0) -> list[tuple[str, str]]:
    """(name, state) of each server the kernel at `endpoint` can start, by name; state is
    "activatable" (not running), "starting", "running" or "stopping"."""
    runtime = Runtime.for_endpoint(endpoint)
    req_id = runtime.next_req_id()
    reply = runtime.channel().call(encode(ListActivatable(req_id)), req_id, timeout)
    if type(reply) is not ActivatableList:
        raise errors.IpcError(errors.KErrGeneral,
                              f"unexpected reply to ListActivatable: {reply!r}")
    return unpack_activatable(reply.rows)


def format_activatable(rows: list[tuple[str, str]]) -> str:
    """The section of ``ipcfw ps``: one line per service, its name and state."""
    table = [("ACTIVATABLE", "STATE"), *rows]
    width = max(len(name) for name, _ in table)
    return "\n".join(f"{name:<{width}}  {state}" for name, state in table)
