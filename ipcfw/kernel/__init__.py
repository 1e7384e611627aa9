"""The kernel: the broker process that owns every session handle.

`state` holds the tables and rules (no I/O), `loop` the zmq loop around them, `liveness` the
process identity and death signals.
"""

from .loop import Kernel, KernelAlreadyRunning, ListenError
from .state import KernelState

__all__ = ["Kernel", "KernelAlreadyRunning", "KernelState", "ListenError"]
