"""Adaptive spinning: whether a thread about to sleep for a peer's next frame spins first.

Waking a thread that slept in the kernel costs more than a whole round trip to a peer that
answers at once, so the direct path's waiters (a client thread waiting for its answer, a server
loop waiting for a client's next request) spin on a non-blocking read for up to `SPIN` seconds
before they sleep. With more busy processes than cores (eight clients and a server on two) the
frame comes late, and the spin only burns the core the peer needs: a spin that ends without a
frame makes the next ones be skipped, twice as many after each further miss (up to
`SKIP_MOST`), and one that caught a frame starts over; so does a skipped wait whose frame came
within `SPIN` anyway (a spin would have caught it), so that a burst of load on the machine
does not leave the spin off once it is over.
"""

from __future__ import annotations

__all__ = ["AdaptiveSpin", "SKIP_MOST", "SPIN"]

# How long a wait spins before it sleeps. Measured here (a forked echo peer with ipcfw's codec,
# 3,000 calls per setting, two runs): round trip median with no spin 104-130 us, 20 us spin
# 67-98 us, 50 us spin 27 us, 100 us spin 27 us, 200 us spin 27 us; with a peer spending 30 us
# per request (about what a ServerState and a small ServiceL cost), 50 us spin 93-146 us, 100
# us spin 58-60 us, 150 us spin 58-59 us. Through RSession (a fake server in another process,
# 5,000 calls, on a loaded machine, where sleeping threads wake fast): no spin 32-34 us, 50 us
# 57-60 us, 100 us 31-35 us, 200 us 30-32 us. 100 us covers a real server's answer; a slower
# answer costs at most 100 us of one core's time before the thread sleeps.
SPIN = 100e-6
# The most waits skipped without a spin after misses: a loaded machine wastes at most one spin
# in this many (+1) waits; an idle one learns again within as many.
SKIP_MOST = 63


class AdaptiveSpin:
    """Whether a wait spins first: after a spin that ended without a frame, the next waits do
    not spin, one after the first miss, 3 after a second in a row, then 7, ... up to
    `SKIP_MOST`; a frame caught by a spin, or that a spin would have caught, starts it over."""

    __slots__ = ("misses", "skip")

    def __init__(self) -> None:
        self.misses = 0  # spins in a row that ended without a frame
        self.skip = 0  # waits still to make without a spin

    def now(self) -> bool:
        """Should this wait spin? (Counts a skipped one.)"""
        if self.skip:
            self.skip -= 1
            return False
        return True

    def caught(self) -> None:
        """The spin caught a frame."""
        self.misses = self.skip = 0

    def slept(self, waited: float) -> None:
        """A wait that did not spin slept `waited` seconds until its frame came."""
        if waited < SPIN:
            self.misses = self.skip = 0

    def missed(self) -> None:
        """The spin ended without a frame."""
        self.misses += 1
        self.skip = min(SKIP_MOST, (1 << min(self.misses, 16)) - 1)
