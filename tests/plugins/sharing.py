"""Echo servers with each sharing limit, for the sharing tests."""

from ipcfw import CServer, CSession, EGlobalSharableSessions, ESharableSessions, EUnsharableSessions


class Echo(CSession):
    def ServiceL(self, message):
        message.Complete(message.Int0())


class UnsharableServer(CServer):
    name = "unsharable"
    sharing = EUnsharableSessions
    session_class = Echo


class SharableServer(CServer):
    name = "sharable"
    sharing = ESharableSessions
    session_class = Echo


class GlobalServer(CServer):
    name = "global"
    sharing = EGlobalSharableSessions
    session_class = Echo
