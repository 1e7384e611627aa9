"""A server whose NewSessionL takes a second: for connect timeouts."""

import time

from ipcfw import CServer, CSession


class SlowSession(CSession):
    def ServiceL(self, message):
        message.Complete(0)


class SlowServer(CServer):
    name = "slow"
    session_class = SlowSession

    def NewSessionL(self, version, message):
        time.sleep(1.0)
        return super().NewSessionL(version, message)
