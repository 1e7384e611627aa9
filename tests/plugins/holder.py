"""A server that holds requests until told to let them go: outstanding messages with an age,
for ``ipcfw ps`` (tests/test_ps.py), on either data path."""

from ipcfw import CServer, CSession

EEcho = 1  # complete with Int0, now
EHold = 2  # hold the request (not completed) until a release
ERelease = 3  # complete every held request with 0, then this one with how many there were


class HolderSession(CSession):
    def ServiceL(self, message):
        server = self.Server()
        function = message.Function()
        if function == EEcho:
            message.Complete(message.Int0())
        elif function == EHold:
            server.held.append(message)
        elif function == ERelease:
            held, server.held = server.held, []
            for request in held:
                request.Complete(0)
            message.Complete(len(held))


class HolderServer(CServer):
    name = "holder"
    version = (1, 2, 3)
    session_class = HolderSession

    def __init__(self):
        self.held = []
