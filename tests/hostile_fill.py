"""A server plugin for tests/kernel/test_hostile.py: function 1 fills every writable descriptor
argument up to its max length (as a server that reads "as much as fits" would) and completes with
the number of bytes written."""

from __future__ import annotations

from ipcfw import CServer, CSession, IpcError, RMessage

EFill = 1


class FillSession(CSession):
    def ServiceL(self, message: RMessage) -> None:
        written = 0
        for index in range(4):
            try:
                length = message.GetDesMaxLength(index)
                message.WriteL(index, b"\xab" * length)
            except IpcError:
                continue  # an int or a read-only descriptor
            written += length
        message.Complete(written)


class FillServer(CServer):
    name = "fill"
    session_class = FillSession
