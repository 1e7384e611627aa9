"""A server that records its termination indication and tries to deregister from inside it."""

import threading

from ipcfw import CServer, CSession, IpcError, KErrNotSupported

EHold = 1  # hold the message under tag Int0
ECompleteHeld = 2  # complete held tag Int0 with Int1 (from another thread, like real work)
EEcho = 3  # complete with Int0
EIndications = 4  # write "reason,error" lines of the indications seen into writable arg 0


class TerminableSession(CSession):
    def ServiceL(self, message):
        server = self.Server()
        function = message.Function()
        if function == EHold:
            server.held[message.Int0()] = message
        elif function == ECompleteHeld:
            held = server.held.pop(message.Int0())
            threading.Thread(target=held.Complete, args=(message.Int1(),)).start()
            message.Complete(0)
        elif function == EEcho:
            message.Complete(message.Int0())
        elif function == EIndications:
            data = "\n".join(server.indications).encode()
            message.WriteL(0, data)
            message.Complete(len(data))
        else:
            raise IpcError(KErrNotSupported)


class TerminableServer(CServer):
    name = "terminable"
    session_class = TerminableSession
    host = None  # set by whoever hosts it in-process

    def __init__(self):
        self.held = {}
        self.indications = []

    def TerminateIndication(self, reason):
        error = ""
        if self.host is not None:
            try:
                self.host.Deregister(timeout=1)
            except RuntimeError as exc:
                error = str(exc)
        self.indications.append(f"{reason.name},{error}")
