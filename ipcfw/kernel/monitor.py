"""Who monitors what (``ipcfw monitor``), and each monitor's bounded buffer of events. No I/O.

Theory of operation
-------------------
A monitor is a channel's `Monitor(req_id, name, credit)`: it watches one server name (its
lookup key) or, with "", every server. `KernelState` makes the events (`ipcfw.events.Event`)
of what it sees and gives them here with `record`, after one cheap test: a server record's
`monitored` flag (set for the servers some monitor watches), or `Monitors.active` for what
concerns no single server. Nobody monitoring, that test is all the kernel pays.

Rules this module keeps:

1. Bounded. Each monitor buffers at most `buffer` events. When it is full, the oldest event
   goes and the monitor's `lost` count grows; the next batch it is sent carries that count,
   so the monitor knows how many it lost, and where (before that batch's events). A monitor
   that falls behind costs the kernel its buffer, nothing more: it never makes the kernel
   hold frames for it or drop it, nor slows anyone else.
2. Credit. The kernel sends a monitor a batch (`MonitorEvents`, at most `MAX_EVENTS_FRAME`
   events) only while it has credit: each batch takes one, and the monitor grants more
   (`Monitor` again with its req_id) as it reads them, at most `MONITOR_CREDIT` owed. So the
   frames on their way to a monitor are bounded by its credit, whatever it reads.
3. One batch per monitor per loop turn (`batches`, which the loop asks for once per turn):
   events made while the loop handles a burst of frames travel together.
4. Start. A monitor of servers on the direct path starts once each of those servers has said
   it reports its direct traffic (`waiting`); its answer (Completed) waits for that, so what
   the monitor's user does after it started is seen, on either path. Until then its events
   are buffered, not sent.
5. At most `most` monitors at once in the kernel (KErrOverflow for the next); a monitor ends
   with its `Cancel` or its channel.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from ..events import Event, pack_events
from ..protocol import MAX_EVENTS_FRAME, MONITOR_CREDIT, MonitorEvents

__all__ = ["Monitors", "Watcher", "MONITOR_BUFFER", "MAX_MONITORS"]

#: Events one monitor may have waiting in the kernel; past it the oldest are lost (rule 1).
MONITOR_BUFFER = 4096
#: Monitors the kernel keeps at once (rule 5).
MAX_MONITORS = 64


@dataclass(eq=False)
class Watcher:
    """One monitor: the channel `rid` that asked with `req_id`, for server key `key` ("": all)."""

    rid: bytes
    req_id: int
    key: str
    events: collections.deque[Event]
    credit: int
    lost: int = 0
    waiting: set[bytes] = field(default_factory=set)  # direct servers yet to say they report

    @property
    def started(self) -> bool:
        return not self.waiting


class Monitors:
    """Every monitor of one kernel (see the module's rules)."""

    def __init__(self, *, buffer: int = MONITOR_BUFFER, most: int = MAX_MONITORS) -> None:
        self.buffer = buffer
        self.most = most
        self.active = False  # any monitor at all: the one test where no server is concerned
        self.watchers: dict[tuple[bytes, int], Watcher] = {}
        self._of_key: dict[str, list[Watcher]] = {}  # server key ("": all) -> its watchers

    # -- who watches what -------------------------------------------------------------------

    def add(self, rid: bytes, req_id: int, key: str, credit: int) -> Watcher | None:
        """A new monitor; None if the kernel has `most` already (rule 5)."""
        if len(self.watchers) >= self.most:
            return None
        watcher = Watcher(rid, req_id, key, collections.deque(), min(credit, MONITOR_CREDIT))
        self.watchers[(rid, req_id)] = watcher
        self._of_key.setdefault(key, []).append(watcher)
        self.active = True
        return watcher

    def get(self, rid: bytes, req_id: int) -> Watcher | None:
        return self.watchers.get((rid, req_id))

    def grant(self, watcher: Watcher, credit: int) -> None:
        """The monitor read batches: it may be sent `credit` more (rule 2)."""
        watcher.credit = min(watcher.credit + credit, MONITOR_CREDIT)

    def remove(self, watcher: Watcher) -> None:
        del self.watchers[(watcher.rid, watcher.req_id)]
        same = self._of_key[watcher.key]
        same.remove(watcher)
        if not same:
            del self._of_key[watcher.key]
        self.active = bool(self.watchers)

    def of_channel(self, rid: bytes) -> list[Watcher]:
        """The monitors channel `rid` has."""
        return [w for (owner, _), w in self.watchers.items() if owner == rid]

    def wants(self, key: str) -> bool:
        """Whether some monitor watches server key `key`."""
        return "" in self._of_key or key in self._of_key

    def watching(self, key: str) -> list[Watcher]:
        """The monitors that watch server key `key`."""
        return self._of_key.get("", []) + self._of_key.get(key, [])

    # -- events -----------------------------------------------------------------------------

    def record(self, key: str, event: Event) -> None:
        """`event` happened to server key `key` ("" for none: it goes to the monitors of every
        server only)."""
        for watcher in self._of_key.get("", ()):
            self._keep(watcher, event)
        if key:
            for watcher in self._of_key.get(key, ()):
                self._keep(watcher, event)

    def lose(self, key: str, count: int) -> None:
        """`count` events of server key `key` were lost before they reached the kernel."""
        for watcher in self.watching(key):
            watcher.lost += count

    def _keep(self, watcher: Watcher, event: Event) -> None:
        events = watcher.events
        if len(events) >= self.buffer:
            events.popleft()
            watcher.lost += 1
        events.append(event)

    def server_reports(self, rid: bytes) -> list[Watcher]:
        """Direct server `rid` reports its traffic (or is gone): the monitors this starts."""
        started = []
        for watcher in self.watchers.values():
            if rid in watcher.waiting:
                watcher.waiting.discard(rid)
                if not watcher.waiting:
                    started.append(watcher)
        return started

    def batches(self) -> list[tuple[bytes, MonitorEvents]]:
        """For each started monitor with events (or losses) and credit, its next batch, and
        the channel to send it to (rule 3)."""
        out = []
        for watcher in self.watchers.values():
            if (watcher.events or watcher.lost) and watcher.credit and not watcher.waiting:
                events = watcher.events
                batch = [events.popleft() for _ in range(min(len(events), MAX_EVENTS_FRAME))]
                out.append((watcher.rid,
                            MonitorEvents(watcher.req_id, watcher.lost, pack_events(batch))))
                watcher.lost = 0
                watcher.credit -= 1
        return out

    def pending(self) -> bool:
        """Whether some monitor has a batch to be sent now."""
        return any((w.events or w.lost) and w.credit and not w.waiting
                   for w in self.watchers.values())
