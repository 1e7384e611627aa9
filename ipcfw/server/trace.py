"""Debug logging of a server host's traffic: each connect, request and completion, on both
data paths (``ipcfw --log-level debug serve ...``).

Free when not enabled: the callers read `enabled()` once (a `ServerState`, a direct
connection) and call here only if it was true, so the hot path pays one attribute test.
"""

from __future__ import annotations

import logging

from ..protocol import ProtocolError, decode
from ..version import TVersion
from .message import ClientInfo, RMessage, ServerPanic

log = logging.getLogger("ipcfw.server.trace")


def enabled() -> bool:
    """Whether the traffic is logged (``ipcfw.server.trace`` at DEBUG)."""
    return log.isEnabledFor(logging.DEBUG)


def connect(server: str, handle: int, version: TVersion, client: ClientInfo | None) -> None:
    log.debug("server %r: connect of session 0x%x (version %s) from %s", server, handle,
              ".".join(map(str, version)), _who(client))


def request(server: str, message: RMessage, path: str) -> None:
    try:
        client: ClientInfo | None = message.Client()
    except ServerPanic:  # (no PeerInfo for it)
        client = None
    log.debug("server %r: %r from %s (%s path)", server, message, _who(client), path)


def completion(server: str, message: RMessage, frame: bytes) -> None:
    try:
        sent = decode(frame)
    except ProtocolError as exc:  # (our own frame: never, but a log line must not raise)
        sent = f"an undecodable frame ({exc})"  # type: ignore[assignment]
    log.debug("server %r: %r answered: %r", server, message, sent)


def _who(client: ClientInfo | None) -> str:
    return "an unknown client" if client is None else f"pid {client.pid}"
