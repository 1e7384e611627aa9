"""The client side: the API a client program uses (`RSession`, `RSubSession`, `TIpcArgs`,
`TRequestStatus`, `User`), and the runtime that carries its requests (`runtime`)."""

from .session import RSession, TIpcArgs, TRequestStatus, User, kernel_statistics, terminate_server
from .subsession import RSubSession

__all__ = [
    "RSession", "RSubSession", "TIpcArgs", "TRequestStatus", "User", "kernel_statistics",
    "terminate_server",
]
