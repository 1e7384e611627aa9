"""The direct path's traffic, as a server reports it to a monitor (``ipcfw monitor``). No I/O.

Theory of operation
-------------------
The kernel sees every connect, disconnect and death, and every request and completion of the
kernel path, but not the requests of the direct connections, which go straight to the server.
While a monitor watches this server, the kernel says so (`Report`, on), and `TrafficLog`
keeps an event for each direct request and completion (`ipcfw.events.Event`), stamped with
the host's clock (CLOCK_MONOTONIC: one clock for every process of the machine, so the kernel's
stamps and these compare). A completion's duration is its own request's, measured here. The
host sends what it holds to the kernel (`frame`: one `Traffic` of at most `MAX_EVENTS_FRAME`
events) when a frame's worth is waiting (`full`) and before its loop sleeps: at most one frame
a turn, and none between the calls of a client's burst, which the loop's spin serves without
sleeping. The kernel hands it to the monitors.

Rules this module keeps:

1. Off, it costs the direct path one test of `on` per request and per completion; nothing is
   kept. Reporting off drops what was kept.
2. Bounded: at most `buffer` events wait here; past it the oldest go, counted in `lost`, which
   the next `Traffic` carries, so the monitors know how many they lost.
3. Reporting on is answered at once (`answer`: a `Traffic` with the `Report`'s req_id): the
   kernel starts a monitor only then, so every direct request made after it is seen.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from .. import errors
from ..events import Event, EventKind, cut, pack_events, summarize
from ..protocol import (
    MAX_EVENTS_FRAME,
    Completed,
    MappedCompleted,
    Panicked,
    Path,
    ProtocolError,
    Traffic,
    decode,
    encode,
)

__all__ = ["TrafficLog", "TRAFFIC_BUFFER", "NOT_SEEN"]

#: Events a server keeps for the kernel at most (rule 2).
TRAFFIC_BUFFER = 4096
_DIRECT = int(Path.DIRECT)
NOT_SEEN = -1.0  # a request's stamp when it came while reporting was off


class TrafficLog:
    """The events of one registration's direct connections, while a monitor watches it.

    `clock` gives CLOCK_MONOTONIC seconds (the host's ``time.monotonic``); it is read only
    while reporting is on, for each request and completion.
    """

    def __init__(self, server: str, clock: Callable[[], float], *,
                 buffer: int = TRAFFIC_BUFFER) -> None:
        self.server = server
        self.clock = clock
        self.buffer = buffer
        self.on = False
        self.events: collections.deque[Event] = collections.deque()
        self.lost = 0

    def report(self, req_id: int, on: bool) -> bytes | None:
        """The kernel's Report: reporting on or off. The frame that answers it (rule 3), if
        any."""
        self.on = on
        if not on:
            self.events.clear()
            self.lost = 0
            return None
        return encode(Traffic(req_id, 0, pack_events([])))

    def request(self, pid: int, handle: int, req_id: int, function: int, args: Any) -> float:
        """A direct request: its event; returns its stamp (for its completion's duration)."""
        now = self.clock()
        self._keep(Event(now, int(EventKind.REQUEST), self.server, pid, handle, _DIRECT, req_id,
                         function, 0, -1, summarize(args)))
        return now

    def completion(self, pid: int, handle: int, req_id: int, since: float,
                   frame: bytes) -> None:
        """A direct request completed with `frame` (what its client is sent); `since` is its
        request's stamp (`NOT_SEEN` if it came before reporting began)."""
        now = self.clock()
        value, text = _outcome(frame)
        micros = -1 if since < 0 else max(0, round((now - since) * 1e6))
        self._keep(Event(now, int(EventKind.COMPLETE), self.server, pid, handle, _DIRECT, req_id,
                         -1, value, micros, cut(text)))

    def full(self) -> bool:
        """Whether a frame's worth of events waits (the host sends it in this turn)."""
        return len(self.events) >= MAX_EVENTS_FRAME

    def frame(self) -> bytes | None:
        """The next `Traffic` frame for the kernel, or None if nothing waits."""
        if not self.events and not self.lost:
            return None
        events = self.events
        batch = [events.popleft() for _ in range(min(len(events), MAX_EVENTS_FRAME))]
        frame = encode(Traffic(0, self.lost, pack_events(batch)))
        self.lost = 0
        return frame

    def _keep(self, event: Event) -> None:
        if len(self.events) >= self.buffer:
            self.events.popleft()
            self.lost += 1
        self.events.append(event)


def _outcome(frame: bytes) -> tuple[int, str]:
    """The value and text of a direct completion's frame."""
    try:
        answer = decode(frame)
    except ProtocolError:  # (our own frame: never)
        return 0, "an undecodable completion"
    if type(answer) is Completed or type(answer) is MappedCompleted:
        return answer.value, answer.text
    if type(answer) is Panicked:
        return errors.KErrDied, f"panicked the client: {answer.category} {answer.reason}"
    return 0, type(answer).__name__
