"""Servers and overlays for the overlay tests."""

import threading
import time

from ipcfw import COverlay, COverlaySession, CServer, CSession, IpcError, KErrPermissionDenied


class Echo(CSession):
    def ServiceL(self, message):
        message.Complete(message.Int0())


class EchoServer(CServer):
    name = "layered"
    session_class = Echo
    error_strings = {-2000: "echo: its own error"}


class RefusingServer(EchoServer):
    def NewSessionL(self, version, message):
        raise IpcError(KErrPermissionDenied, "not for you")


class WorkSession(COverlaySession):
    """Works on its own thread for `work_seconds`, then hands off; answers 1000 + Int0 meanwhile."""

    def CreateL(self):
        self.thread = threading.Thread(target=self._work, name="overlay-work")
        self.Overlay().threads.append(self.thread)
        self.thread.start()

    def _work(self):
        overlay = self.Overlay()
        deadline = time.monotonic() + overlay.work_seconds
        while time.monotonic() < deadline:
            if self.stopping.wait(0.01):
                overlay.events.append("stopped")
                return
        overlay.events.append("handed off")
        self.HandOff()

    def ServiceL(self, message):
        message.Complete(1000 + message.Int0())


class WorkOverlay(COverlay):
    work_seconds = 0.3

    def __init__(self, overlaid):
        super().__init__(overlaid)
        self.threads = []
        self.events = []

    def NewSessionL(self, version, message):
        return WorkSession()


class LongWorkOverlay(WorkOverlay):
    work_seconds = 30.0


class QuickWorkOverlay(WorkOverlay):
    """Hands each session off soon."""

    work_seconds = 0.05
