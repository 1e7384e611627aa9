"""Stopping child processes for sure: SIGTERM, one shared deadline, then SIGKILL."""

from __future__ import annotations

import subprocess
import time
from typing import Iterable


def stop_processes(processes: Iterable[subprocess.Popen], timeout: float) -> None:
    """Terminate every process still running, wait until `timeout` seconds have passed for all
    of them together, and kill (and reap) the ones still running then."""
    processes = list(processes)
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
