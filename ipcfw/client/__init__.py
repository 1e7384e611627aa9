"""The client side: the API a client program uses (`RSession`, `RSubSession`, `TIpcArgs`,
`TRequestStatus`, `User`); its rules, with no I/O (`state`: pending requests, completion,
descriptor write-back, session lifecycle); and the runtime that carries its requests
(`runtime`: sockets, the I/O thread, waiting)."""

from .args import TIpcArgs
from .introspect import kernel_processes, kernel_servers, kernel_sessions, kernel_statistics
from .monitoring import Monitor, MonitorEvent, monitor
from .session import RSession, terminate_server
from .status import TRequestStatus, User
from .subsession import RSubSession
from .waiting import wait_for_server

__all__ = [
    "RSession", "RSubSession", "TIpcArgs", "TRequestStatus", "User", "kernel_statistics",
    "kernel_sessions", "kernel_servers", "kernel_processes", "terminate_server",
    "wait_for_server", "Monitor", "MonitorEvent", "monitor",
]
