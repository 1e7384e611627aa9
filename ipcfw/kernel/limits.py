"""The kernel's limits: what one process may hold, and what the kernel accepts from any peer.

Every limit refuses only the process that reaches it, with an error that names the limit; no
other peer is affected. `ipcfw kernel` takes each as an option (``ipcfw kernel --help``), and
docs/failures.md explains what a client or server sees when it reaches one.

The defaults are chosen so that the last line of defence, the backlog cut-off, is never reached
by a client that keeps within the other limits, however long it is paused: every frame the
kernel sends to a client's thread answers a request of that thread, so a thread can have at most
`outstanding_per_process` answers waiting, and a process's inbox at most one notice per session
it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ..protocol import MAX_FRAME

#: Room for the frames a peer has in flight beyond its outstanding requests (its connects,
#: sync calls, closes and notices) before the backlog cut-off counts it as not reading.
_BACKLOG_SLACK = 10_000
#: The smallest frame limit: room for every message's fields, and some descriptor bytes.
_LEAST_FRAME = 4096


@dataclass(frozen=True)
class KernelLimits:
    """The kernel's configurable limits. Each is a positive int; see `check()`."""

    #: Sessions one process may hold at once (created or opened); the next connect or Open
    #: fails with KErrOverflow.
    sessions_per_process: int = 10_000
    #: Requests one process may have outstanding at once, synchronous ones included; the next
    #: completes at once with KErrServerBusy (KErrOverflow for a synchronous one).
    outstanding_per_process: int = 100_000
    #: The kernel-wide pool of message slots, for sessions created with message_slots=-1.
    pool_slots: int = 4096
    #: The largest frame any peer may send (at most the protocol's MAX_FRAME). Clients learn it
    #: at connect and refuse larger requests themselves; zmq drops a peer that sends more.
    max_frame: int = MAX_FRAME
    #: Frames the kernel's socket queues from one peer before that peer's sends wait (zmq's
    #: receive high-water mark); at most this many times max_frame bytes per peer.
    receive_hwm: int = 1000
    #: Connections one uid may have open at once (each client thread's channel, each client
    #: process's inbox, each server): the next Hello of that uid is refused with KErrOverflow.
    connections_per_uid: int = 10_000
    #: Frames waiting for one peer that is not reading before the kernel stops serving it
    #: (tells it, with a Dropped notice, and forgets it). 0: `least_backlog()`, derived from the
    #: limits above; a smaller value may cut off a paused client that keeps within them.
    max_backlog: int = 0

    def check(self) -> KernelLimits:
        """Return the limits with `max_backlog` resolved; raise ValueError naming a bad one."""
        for field in fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value < (0 if field.name == "max_backlog" else 1):
                raise ValueError(f"kernel limit {field.name} must be a positive int, got {value!r}")
        if not _LEAST_FRAME <= self.max_frame <= MAX_FRAME:
            raise ValueError(
                f"kernel limit max_frame must be in {_LEAST_FRAME}..{MAX_FRAME}, "
                f"got {self.max_frame}"
            )
        if self.max_backlog == 0:
            return replace(self, max_backlog=self.least_backlog())
        return self

    def least_backlog(self) -> int:
        """The smallest cut-off that never drops a client keeping within its limits."""
        return self.outstanding_per_process + self.sessions_per_process + _BACKLOG_SLACK

