"""ipcfw: the Symbian OS client-server model for Python processes, over ZeroMQ.

A kernel process owns every session handle; servers are plugins hosted in their own processes;
clients are any Python processes holding `RSession` handles. See docs/getting-started.md.
"""

from . import errors
from .client import (
    RSession,
    RSubSession,
    TIpcArgs,
    TRequestStatus,
    User,
    kernel_statistics,
    terminate_server,
    wait_for_server,
)
from .errors import *  # noqa: F401,F403  (the codes and exception classes: errors.__all__)
from .errors import __all__ as _error_names
from .interface import Deferred, Interface, InterfaceSession, Reply, operation
from .protocol import (
    EGlobalSharableSessions,
    ESharableSessions,
    EUnsharableSessions,
    TerminationReason,
    TServerType,
)
from .security import TSecurityPolicy
from .server import (
    ALWAYS_PASS,
    CUSTOM_CHECK,
    NOT_SUPPORTED,
    CPolicyServer,
    CustomResult,
    EFailClient,
    EPanicClient,
    EPassAndLog,
    TPolicy,
    TPolicyElement,
    ClientInfo,
    CObjectIx,
    COverlay,
    COverlaySession,
    CServer,
    CSession,
    RMessage,
    ServerHost,
    ServerPanic,
    serve,
)
from .version import QueryVersionSupported, TVersion

__version__ = "0.1.0"

__all__ = [
    "RSession",
    "RSubSession",
    "TIpcArgs",
    "TRequestStatus",
    "TVersion",
    "User",
    "kernel_statistics",
    "terminate_server",
    "wait_for_server",
    "TerminationReason",
    "CServer",
    "COverlay",
    "COverlaySession",
    "CPolicyServer",
    "TPolicy",
    "TPolicyElement",
    "TSecurityPolicy",
    "CustomResult",
    "ALWAYS_PASS",
    "NOT_SUPPORTED",
    "CUSTOM_CHECK",
    "EFailClient",
    "EPanicClient",
    "EPassAndLog",
    "CSession",
    "CObjectIx",
    "RMessage",
    "ClientInfo",
    "ServerHost",
    "ServerPanic",
    "serve",
    "TServerType",
    "EUnsharableSessions",
    "ESharableSessions",
    "EGlobalSharableSessions",
    "QueryVersionSupported",
    "Interface",
    "operation",
    "InterfaceSession",
    "Deferred",
    "Reply",
    "errors",
    *_error_names,
]
