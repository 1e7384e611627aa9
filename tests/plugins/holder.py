"""The dam server (tests/plugins/dam.py) on both data paths, as "holder": it holds requests
(EHold) until told to let them go (ERelease), so that ``ipcfw ps`` has outstanding messages
with an age to show (tests/test_ps.py)."""

from plugins.dam import DamServer, EEcho, EHold, ERelease

__all__ = ["HolderServer", "EEcho", "EHold", "ERelease"]


class HolderServer(DamServer):
    name = "holder"
    version = (1, 2, 3)
    direct = True
