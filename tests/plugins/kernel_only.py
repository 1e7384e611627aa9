"""The probe server, kept on the kernel path (``direct = False``)."""

from __future__ import annotations

from plugins.probe import ProbeServer


class KernelOnlyProbe(ProbeServer):
    direct = False
