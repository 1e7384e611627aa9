"""The audit overlay: logs every session's start and hand-off, and hands off at once.

    ipcfw serve servers.kv:KvServer --overlay servers.audit:AuditOverlay
"""

from __future__ import annotations

import logging

from ipcfw import COverlay, RMessage, TVersion

log = logging.getLogger("servers.audit")


class AuditOverlay(COverlay):
    def NewSessionL(self, version: TVersion, message: RMessage) -> None:
        client = message.Client()
        log.info("audit: session from pid %d (uid %d, %s) asking version %s; handed off",
                 client.pid, client.uid, client.exe, tuple(version))
        return None  # hand off at once
