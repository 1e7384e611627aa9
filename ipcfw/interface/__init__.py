"""Typed interfaces: one Python class declares a server's name, version and operations; from
it come a client proxy with real methods and a server session that dispatches to methods.
The wire stays plain ``SendReceive``. See docs/interfaces.md.
"""

from .codec import Buffer
from .proxy import BoundOperation, Interface, Operation, Reply, operation
from .service import Deferred, InterfaceSession
from .spec import DEFAULT_REPLY, InterfaceSpec, OperationSpec

__all__ = [
    "Interface", "operation", "InterfaceSession", "Deferred", "Reply", "BoundOperation",
    "Operation", "Buffer", "InterfaceSpec", "OperationSpec", "DEFAULT_REPLY",
]
