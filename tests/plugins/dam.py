"""A server that holds requests back and lets them all go at once, to pile answers up on a
client."""

import threading

from ipcfw import CServer, CSession

EEcho = 1  # complete with Int0, now
EHold = 2  # hold the request; it completes with its Int0 when released
ERelease = 3  # complete at once; then, Int0 ms later, complete every held request


class DamSession(CSession):
    def ServiceL(self, message):
        server = self.Server()
        function = message.Function()
        if function == EEcho:
            message.Complete(message.Int0())
        elif function == EHold:
            server.held.append(message)
        elif function == ERelease:
            message.Complete(len(server.held))
            held, server.held = server.held, []
            threading.Timer(message.Int0() / 1000, _release, (held,)).start()


def _release(held):
    for message in held:
        message.Complete(message.Int0())


class DamServer(CServer):
    name = "dam"
    session_class = DamSession
    # Its tests (test_slow_peers.py) are about the kernel's queues and limits: every request
    # goes through the kernel. The direct path's own bounds are in test_direct_port.py.
    direct = False

    def __init__(self):
        self.held = []
