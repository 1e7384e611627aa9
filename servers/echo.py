"""The echo server: ints and descriptors straight back to the client.

Functions (the client's opcodes):

* ``EEchoInt`` (1): completes with ``Int0()``.
* ``EEchoDes`` (2): reads descriptor 0 and writes it into writable descriptor 1; completes with the
  number of bytes written.
* ``EDesLength`` (3): completes with the length of descriptor 0.
* ``EAdd`` (4): completes with ``Int0() + Int1()``.

Host it with ``ipcfw serve servers.echo:EchoServer``.
"""

from __future__ import annotations

from ipcfw import CServer, CSession, IpcError, KErrNotSupported, RMessage, TVersion

EEchoInt = 1
EEchoDes = 2
EDesLength = 3
EAdd = 4


class EchoSession(CSession):
    def ServiceL(self, message: RMessage) -> None:
        function = message.Function()
        if function == EEchoInt:
            message.Complete(message.Int0())
        elif function == EEchoDes:
            data = message.ReadL(0)
            message.WriteL(1, data)
            message.Complete(len(data))
        elif function == EDesLength:
            message.Complete(message.GetDesLength(0))
        elif function == EAdd:
            message.Complete(message.Int0() + message.Int1())
        else:
            raise IpcError(KErrNotSupported, f"echo has no function {function}")


class EchoServer(CServer):
    name = "echo"
    version = TVersion(1, 0, 0)
    session_class = EchoSession
