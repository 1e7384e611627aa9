"""Over tcp with CURVE: what does reaching the kernel as another host would cost a call?

A kernel of its own for this phase, listening on its Unix socket and on ``tcp://127.0.0.1``
with CURVE (keys made for the run, this process's key listed as a ``[[tcp.peer]]``), the
bench's echo server on the Unix socket, and this process as a client both ways: sync calls on
the kernel path over ipc, and over tcp (where every session takes the kernel path), in
interleaved chunks (the order alternating chunk by chunk, so that noise on a shared machine
hits both alike). The ratio is what tcp and CURVE's encryption add to the kernel path on one
host; a real network adds its own latency on top.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from ...client import RSession
from ...client.runtime import Runtime
from ...curve import KERNEL_KEY_VAR, KEY_VAR, generate
from ...testing import Stack
from .clients import IpcfwClient
from .measure import CHUNKS, percentile, time_sync
from .roles import STARTUP_TIMEOUT
from .systems import ECHO_PLUGIN

DEFAULT_REMOTE = 2_000
"""Sync calls per transport by default (``--remote``; 0 leaves the case out)."""
TRANSPORTS = ("ipc", "tcp+curve")


@dataclass(frozen=True)
class RemoteResult:
    calls: int
    """Sync calls per transport."""
    latency_us: dict[str, tuple[float, float]]
    """Transport -> (median, p99) in microseconds, on the kernel path."""
    ratio: float
    """The median over tcp with CURVE over the median over ipc."""


def measure_remote(workdir: Path, calls: int) -> RemoteResult:
    """Time `calls` sync calls to an echo server over each transport (see above)."""
    keys = workdir / "remote-keys"
    keys.mkdir(mode=0o700, exist_ok=True)
    kernel_key, own = generate(str(keys / "kernel.key")), generate(str(keys / "bench.key"))
    tcp = f"tcp://127.0.0.1:{_free_port()}"
    config = keys / "kernel.toml"
    config.write_text(f'[tcp]\nlisten = "{tcp}"\nkey = "{keys / "kernel.key"}"\n\n'
                      f'[[tcp.peer]]\nname = "bench"\nkey = "{own.public.decode()}"\n')
    saved = {name: os.environ.get(name) for name in (KEY_VAR, KERNEL_KEY_VAR)}
    os.environ[KEY_VAR], os.environ[KERNEL_KEY_VAR] = str(keys / "bench.key"), \
        kernel_key.public.decode()
    try:
        with Stack(timeout=STARTUP_TIMEOUT, kernel_options=["--config", str(config)]) as stack:
            stack.serve(ECHO_PLUGIN, name="remote-echo-server")
            clients = {"ipc": IpcfwClient(RSession.connect("echo", endpoint=stack.endpoint,
                                                            path="kernel")),
                       "tcp+curve": IpcfwClient(RSession.connect("echo", endpoint=tcp))}
            try:
                return _measure(clients, calls)
            finally:
                for client in clients.values():
                    client.close()
                Runtime.shutdown(tcp)  # (before the kernel stops: its end is no death)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _measure(clients: dict[str, IpcfwClient], calls: int) -> RemoteResult:
    latencies: dict[str, list[int]] = {name: [] for name in clients}
    for client in clients.values():
        time_sync(client, max(10, calls // 10))  # warm up
    per_chunk = max(1, calls // CHUNKS)
    for chunk in range(CHUNKS):
        for name in (TRANSPORTS if chunk % 2 == 0 else TRANSPORTS[::-1]):
            latencies[name] += time_sync(clients[name], per_chunk)
    medians = {}
    for name, measured in latencies.items():
        ordered = sorted(measured)
        medians[name] = (percentile(ordered, 50) / 1000, percentile(ordered, 99) / 1000)
    return RemoteResult(per_chunk * CHUNKS, medians,
                        medians["tcp+curve"][0] / medians["ipc"][0])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def format_remote(result: RemoteResult) -> str:
    """The report's section: the kernel path's sync median and p99 over ipc and over tcp."""
    lines = [f"Over tcp with CURVE (sync calls to echo on the kernel path, {result.calls:,} per "
             "transport, interleaved):",
             f"{'transport':<12}{'median (us)':>14}{'p99 (us)':>12}"]
    for name in TRANSPORTS:
        median, p99 = result.latency_us[name]
        lines.append(f"{name:<12}{median:>14.1f}{p99:>12.1f}")
    lines.append(f"tcp+curve / ipc: {result.ratio:.2f}x (127.0.0.1: no network latency)")
    return "\n".join(lines)
