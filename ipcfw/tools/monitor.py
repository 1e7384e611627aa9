"""``ipcfw monitor [NAME] [--json]``: the kernel's traffic, live, one line per event (like
``dbus-monitor``), until Ctrl-C.

The formatting (`format_event`, `json_event`) is pure and tested without processes; `run`
is the thin part: a `ipcfw.client.Monitor`, and a line per event it reads.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import TextIO

from .. import errors
from ..client.monitoring import Monitor, MonitorEvent

__all__ = ["format_event", "json_event", "run", "HEADER", "Reorder"]

#: The first line ``ipcfw monitor`` prints (without --json).
HEADER = f"{'TIME':<15}  {'PID':>7}  {'SERVER':<12}  {'SESSION':<7}  {'PATH':<6}  EVENT"


def format_event(event: MonitorEvent, local: bool = True) -> str:
    """One line: time (local, to the microsecond), pid, server, session handle, data path, and
    what happened::

        14:03:07.123456    4321  echo          0x1      direct  request #7 fn 2 (des[5]'hello')
        14:03:07.123501    4321  echo          0x1      direct  complete #7 = 5 in 45 us
    """
    stamp = time.localtime(event.time) if local else time.gmtime(event.time)
    when = time.strftime("%H:%M:%S", stamp) + f".{int(event.time % 1 * 1e6):06d}"
    handle, path = (f"0x{event.handle:x}", event.path) if event.handle else ("-", "-")
    line = (f"{when:<15}  {event.pid:>7}  {event.server:<12}  {handle:<7}  {path:<6}  "
            f"{_what(event)}")
    if event.lost:
        line = f"({event.lost} events lost before this one)\n" + line
    return line


def _what(event: MonitorEvent) -> str:
    kind = event.kind
    if kind == "request":
        return f"request #{event.msg} fn {event.function} ({event.detail})"
    if kind == "complete":
        return f"complete #{event.msg} = {_value(event.value)}{_took(event)}{_text(event)}"
    if kind == "connect":
        return f"connect #{event.msg} {event.detail}".rstrip()
    if kind == "connected":
        value = "ok" if event.value >= 0 else _value(event.value)
        return f"connected #{event.msg} {value}{_took(event)}{_text(event)}"
    if kind == "died":
        return f"died ({event.detail})" if event.detail else "died"
    return f"{kind} {event.detail}".rstrip()


def _value(value: int) -> str:
    name = errors.name_of(value) if value < 0 else None
    return f"{value} {name}" if name else str(value)


def _took(event: MonitorEvent) -> str:
    return f" in {event.micros} us" if event.micros >= 0 else ""


def _text(event: MonitorEvent) -> str:
    return f": {event.detail}" if event.detail else ""


class Reorder:
    """Puts events from several sources back in time order before they are shown.

    A server's direct-path events reach the kernel at the end of the server's loop turn, so
    the kernel's own events of the same moment (a disconnect right after the last request)
    may reach a monitor first. Events are held `delay` seconds after their time (on the
    wall clock), then released in time order: what comes later than that is shown as it
    comes."""

    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay
        self._held: list[MonitorEvent] = []

    def add(self, events: list[MonitorEvent]) -> None:
        self._held += events

    def ready(self, now: float) -> list[MonitorEvent]:
        """The events held at least `delay` before `now` (wall-clock seconds), in time order."""
        self._held.sort(key=_time_of)
        cut = now - self.delay
        count = 0
        while count < len(self._held) and self._held[count].time <= cut:
            count += 1
        out, self._held = self._held[:count], self._held[count:]
        return out

    def rest(self) -> list[MonitorEvent]:
        """Every event still held, in time order."""
        out, self._held = sorted(self._held, key=_time_of), []
        return out


def _time_of(event: MonitorEvent) -> float:
    return event.time


def json_event(event: MonitorEvent) -> str:
    """One JSON object per line: the event's fields (`MonitorEvent`), time as seconds since
    the epoch."""
    return json.dumps(event._asdict(), separators=(",", ":"))


def run(name: str | None, endpoint: str | None, as_json: bool,
        out: TextIO = sys.stdout) -> int:
    """Print every event until Ctrl-C or SIGTERM (status 0); `IpcError` if the monitor cannot
    start or the kernel goes (``ipcfw`` prints it, status 1)."""
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    def show(events: list[MonitorEvent]) -> None:
        for event in events:
            print(json_event(event) if as_json else format_event(event), file=out)
        out.flush()

    previous = signal.signal(signal.SIGTERM, stop)
    order = Reorder()
    try:
        with Monitor(name, endpoint) as watch:
            if not as_json:
                print(HEADER, file=out, flush=True)
            while not stopping:
                order.add(watch.read(timeout=order.delay))
                show(order.ready(time.time()))
    except KeyboardInterrupt:
        pass  # (Ctrl-C: the monitor is closed, and that is all)
    finally:
        signal.signal(signal.SIGTERM, previous)
        show(order.rest())
    return 0
