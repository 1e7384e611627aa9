"""Telling systemd how a service is doing (``Type=notify`` units), with no dependency: the
``sd_notify`` protocol is one datagram of ``KEY=value`` lines to the Unix socket named by
``$NOTIFY_SOCKET`` (a path, or an abstract name written with a leading ``@``).

``ipcfw kernel`` and ``ipcfw serve`` send ``READY=1`` once they serve (the kernel listens; the
server has registered its name) and ``STOPPING=1`` when asked to stop. Without
``$NOTIFY_SOCKET`` (not started by systemd) nothing is sent. See docs/deploy.md.
"""

from __future__ import annotations

import logging
import os
import socket

from ..testing import ReadySignal

log = logging.getLogger("ipcfw.systemd")

__all__ = ["notify", "stopping", "ServiceReady"]

NOTIFY_VAR = "NOTIFY_SOCKET"


def notify(*lines: str) -> bool:
    """Send `lines` (``"READY=1"``, ``"STATUS=..."``) to systemd; False if not asked to (no
    ``$NOTIFY_SOCKET``) or if it could not be sent (logged: a unit waiting for READY=1 then
    times out, which is the error to look for)."""
    address = os.environ.get(NOTIFY_VAR)
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
    except OSError as exc:
        log.warning("could not notify systemd at %s=%s: %s", NOTIFY_VAR,
                    os.environ.get(NOTIFY_VAR), exc)
        return False
    return True


class ServiceReady(ReadySignal):
    """The readiness of ``ipcfw kernel`` or ``ipcfw serve``: the starter's ``--ready-fd`` (if
    any), and systemd's ``READY=1`` with `status`, once."""

    def __init__(self, fd: int | None, status: str) -> None:
        super().__init__(fd)
        self._status: str | None = status

    def set(self) -> None:
        super().set()
        status, self._status = self._status, None
        if status is not None:
            notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def stopping() -> None:
    """Tell systemd this service is stopping (from a signal handler too: one send)."""
    notify("STOPPING=1")
