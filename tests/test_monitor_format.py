"""Tests of what ``ipcfw monitor`` prints (ipcfw.tools.monitor) and of a request's argument
summary (ipcfw.events.summarize): pure, no processes."""

from __future__ import annotations

import json
import time

from ipcfw import errors
from ipcfw.client import MonitorEvent
from ipcfw.events import MAX_DETAIL, summarize
from ipcfw.tools.monitor import HEADER, Reorder, format_event, json_event

# 2026-12-05 14:03:07.123456 UTC
WHEN = time.mktime((2026, 12, 5, 14, 3, 7, 0, 0, -1)) + 0.123456


def ev(kind: str, **fields: object) -> MonitorEvent:
    base = dict(time=WHEN, kind=kind, server="echo", pid=4321, handle=1, path="direct", msg=7,
                function=-1, value=0, micros=-1, detail="", lost=0)
    base.update(fields)
    return MonitorEvent(**base)  # type: ignore[arg-type]


def test_a_summary_shows_ints_and_each_descriptors_kind_length_and_first_bytes():
    assert summarize((7, -1)) == "7, -1"
    assert summarize((b"hello",)) == "des[5]'hello'"
    assert summarize((b"\x00\x01\xff",)) == "des[3]0x0001ff"
    assert summarize((b"abcdefghij",)) == "des[10]'abcdefgh'..."
    assert summarize(((b"", 64), (b"ab", 8))) == "out[0/64], out[2/8]'ab'"
    assert summarize(()) == ""

    class Mapped:  # (a descriptor in shared memory, as the server holds it)
        length = 1 << 20

    assert summarize((Mapped(),)) == "shm[1048576]"
    assert len(summarize((b"x" * 50,) * 4 + (1,) * 100)) <= MAX_DETAIL


def test_each_event_is_one_line_of_time_pid_server_session_path_and_what_happened():
    assert HEADER.split() == ["TIME", "PID", "SERVER", "SESSION", "PATH", "EVENT"]
    line = format_event(ev("request", function=2, detail="des[5]'hello'"))
    assert line == ("14:03:07.123456     4321  echo          0x1      direct  "
                    "request #7 fn 2 (des[5]'hello')")
    assert format_event(ev("complete", value=5, micros=45)).endswith("complete #7 = 5 in 45 us")
    failed = ev("complete", value=errors.KErrNotFound, micros=3, detail="no such key")
    assert format_event(failed).endswith("complete #7 = -1 KErrNotFound in 3 us: no such key")
    assert format_event(ev("connect", detail="version 1.0.0")).endswith(
        "connect #7 version 1.0.0")
    assert format_event(ev("connected", value=1, micros=500)).endswith("connected #7 ok in 500 us")
    assert format_event(ev("disconnect")).endswith("direct  disconnect")
    died = format_event(ev("died", handle=0, detail="server"))
    assert died.endswith("echo          -        -       died (server)")


def test_a_loss_is_said_on_the_line_before_the_event_that_follows_it():
    first, second = format_event(ev("disconnect", lost=12)).splitlines()
    assert first == "(12 events lost before this one)" and second.endswith("disconnect")


def test_json_lines_carry_every_field():
    event = ev("complete", value=5, micros=45)
    assert json.loads(json_event(event)) == event._asdict()
    assert "\n" not in json_event(event)


def test_events_are_held_briefly_and_released_in_time_order():
    order = Reorder(delay=0.05)
    order.add([ev("disconnect", time=10.030), ev("request", time=10.010)])
    assert order.ready(10.060) == [ev("request", time=10.010)]
    order.add([ev("complete", time=10.020)])  # a server's, late
    assert [e.kind for e in order.ready(10.100)] == ["complete", "disconnect"]
    order.add([ev("died", time=10.200)])
    assert order.ready(10.210) == [] and [e.kind for e in order.rest()] == ["died"]
