"""Adaptive spinning: whether a thread about to sleep for a peer's next frame spins first.

Waking a thread that slept in the kernel costs more than a whole round trip to a peer that
answers at once, so the direct path's waiters (a client thread waiting for its answer, a server
loop waiting for a client's next request) spin on a non-blocking read for up to `SPIN` seconds
before they sleep. With more busy processes than cores (eight clients and a server on two, or
other work on the machine) the frame comes late, and the spin only burns the core the peer
needs. So each waiter keeps a score, a moving average of how often its spins caught their
frame: it spins while the score is at least one half, and otherwise only every `PROBE`-th wait,
to learn when the machine is free again. (A waiter that slept cannot tell: the sleep itself
gave its core to the peer.)
"""

from __future__ import annotations

__all__ = ["AdaptiveSpin", "PROBE", "SPIN"]

# How long a wait spins before it sleeps. Measured here (a forked echo peer with ipcfw's codec,
# 3,000 calls per setting, two runs): round trip median with no spin 104-130 us, 20 us spin
# 67-98 us, 50 us spin 27 us, 100 us spin 27 us, 200 us spin 27 us; with a peer spending 30 us
# per request (about what a ServerState and a small ServiceL cost), 50 us spin 93-146 us, 100
# us spin 58-60 us, 150 us spin 58-59 us. 100 us covers a real server's answer; a slower
# answer costs at most 100 us of one core's time before the thread sleeps.
SPIN = 100e-6
# While spins mostly miss, one wait in this many spins (a probe): at most SPIN / PROBE of a
# core per wait is spent on a loaded machine.
PROBE = 16
_WEIGHT = 0.125  # of the newest outcome in the score: about the last eight spins count


class AdaptiveSpin:
    """Whether a wait spins first (see the module): spin while at least half of the recent
    spins caught their frame, else only every `PROBE`-th wait."""

    __slots__ = ("score", "waits")

    def __init__(self) -> None:
        self.score = 1.0  # moving average of the spins' outcomes: 1 caught, 0 missed
        self.waits = 0  # waits since the score fell below one half

    def now(self) -> bool:
        """Should this wait spin?"""
        if self.score >= 0.5:
            return True
        self.waits += 1
        return self.waits % PROBE == 0

    def caught(self) -> None:
        """The spin caught its frame."""
        self.score += (1.0 - self.score) * _WEIGHT

    def missed(self) -> None:
        """The spin ended without a frame."""
        self.score -= self.score * _WEIGHT
