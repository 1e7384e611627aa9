"""The echo servers ipcfw is measured against: ``EEchoInt`` (1) completes with ``Int0()``;
``EEchoDes`` (2) reads descriptor 0 whole, writes it into descriptor 1 (a writable one at least
as long) and completes with its length.

``EchoServer`` registers as ``echo`` with unsharable sessions, as the example
``servers.echo.EchoServer`` does, and answers the bench's request (opcode 1 with four ints) the
same way; ``SharedEchoServer`` registers as ``echo-shared`` and allows ``ShareAuto``, for the
shared-session case. They live in the package so that the bench runs from an installed ipcfw:
``ipcfw serve ipcfw.tools.bench.echo:EchoServer``.
"""

from __future__ import annotations

from ...errors import IpcError, KErrNotSupported
from ...protocol import ESharableSessions
from ...server import CServer, CSession, RMessage
from ...version import TVersion
from .clients import ECHO_DES, ECHO_INT

SHARED_SERVER = "echo-shared"
"""The name ``SharedEchoServer`` registers."""


class EchoSession(CSession):
    def ServiceL(self, message: RMessage) -> None:
        function = message.Function()
        if function == ECHO_INT:
            message.Complete(message.Int0())
        elif function == ECHO_DES:
            data = message.ReadL(0)
            message.WriteL(1, data)
            message.Complete(len(data))
        else:
            raise IpcError(KErrNotSupported, f"the bench's echo has no function {function}")


class EchoServer(CServer):
    """``echo``: unsharable sessions."""

    name = "echo"
    version = TVersion(1, 0, 0)
    session_class = EchoSession


class SharedEchoServer(EchoServer):
    """``echo-shared``: the same sessions, which ``ShareAuto`` may share."""

    name = SHARED_SERVER
    sharing = ESharableSessions
