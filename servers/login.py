"""The login overlay: a session must log in before it reaches the server underneath.

The client's first request must be ``ELogin`` with the secret in argument 0. A wrong secret
completes with ``KErrLoginFailed``, an error code this overlay owns (ask
``RSession.ErrorString(KErrLoginFailed)``); any other request before logging in gets
``KErrNotReady``. The right secret completes with 0 and hands the session to the server::

    IPCFW_LOGIN_SECRET=s3cret ipcfw serve servers.kv:KvServer --overlay servers.login:LoginOverlay
"""

from __future__ import annotations

import hmac
import os

from ipcfw import COverlay, COverlaySession, IpcError, KErrNotReady, RMessage, TVersion

ELogin = 100  # argument 0: the secret (bytes)
KErrLoginFailed = -1000  # this overlay's own error code


class LoginSession(COverlaySession):
    def ServiceL(self, message: RMessage) -> None:
        if message.Function() != ELogin:
            raise IpcError(KErrNotReady, "log in first")
        secret = self.Overlay().secret
        if not hmac.compare_digest(message.ReadL(0), secret):
            raise IpcError(KErrLoginFailed)
        message.Complete(0)
        self.HandOff()


class LoginOverlay(COverlay):
    error_strings = {KErrLoginFailed: "login: wrong secret"}

    def __init__(self, overlaid, secret: bytes | None = None) -> None:
        super().__init__(overlaid)
        self.secret = (
            secret if secret is not None
            else os.environ.get("IPCFW_LOGIN_SECRET", "open sesame").encode()
        )

    def NewSessionL(self, version: TVersion, message: RMessage) -> LoginSession:
        return LoginSession()
