"""A server that accepts or rejects connects by their negotiation payload (seed 003)."""

import json

from ipcfw import CServer, CSession, IpcError, KErrPermissionDenied

EEcho = 1  # complete with Int0
ENewSessions = 2  # complete with how many times NewSessionL ran
ELastAccept = 3  # write what the last AcceptL saw (JSON) into writable arg 0


class GateSession(CSession):
    def ServiceL(self, message):
        server = self.Server()
        if message.Function() == EEcho:
            message.Complete(message.Int0())
        elif message.Function() == ENewSessions:
            message.Complete(server.new_sessions)
        else:
            data = json.dumps(server.last_accept).encode()
            message.WriteL(0, data)
            message.Complete(len(data))


class GateServer(CServer):
    name = "gate"
    session_class = GateSession

    def __init__(self):
        self.new_sessions = 0
        self.last_accept = {}

    def AcceptL(self, client, version, payload):
        self.last_accept = {
            "pid": client.pid, "version": list(version), "payload": payload.decode()
        }
        if payload != b"open sesame":
            raise IpcError(KErrPermissionDenied, "wrong secret")
        return b"welcome " + str(client.pid).encode()

    def NewSessionL(self, version, message):
        self.new_sessions += 1
        return super().NewSessionL(version, message)
