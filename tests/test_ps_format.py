"""``ipcfw ps``'s views, from rows to text and JSON, without processes (ipcfw.tools.ps)."""

from __future__ import annotations

import json

import pytest

from ipcfw.kernel import KernelState
from ipcfw.protocol import ProcessRow, ServerRow, SessionRow
from ipcfw.tools import ps
from ipcfw.tools.cli import main

SERVERS = [
    ServerRow("echo", 101, "/usr/bin/python3", (1, 0, 0), 0, True, 2, 0, 0, 65_000, "running"),
    ServerRow("kv", 102, "", (2, 1, 7), 2, False, 1, 3, 4_200, 7_400_000, "terminating"),
]
SESSIONS = [
    SessionRow(1, "kv", 0, "OPEN", 3, ((200, 2), (201, 1)), 4_200, 200, 2001, 2, 4, 9_000),
    SessionRow(0x2a, "echo", 1, "OPEN", 0, (), 0, 200, 0, 0, -1, 800),
    SessionRow(0x2b, "echo", 1, "CLOSING", 1, ((200, 1),), 999, 200, 2002, 0, 0, 1_500),
]
PROCESSES = [
    ProcessRow(101, 1000, "/usr/bin/python3", 0, False, ("echo",), 0, 0),
    ProcessRow(200, 1000, "/usr/bin/python3", 2, True, (), 3, 4),
    ProcessRow(300, 1001, "", 1, True, ("a", "b"), 1, 0),
]


def lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


@pytest.mark.parametrize("ms, shown", [
    (0, "0ms"), (999, "999ms"), (1_000, "1.0s"), (59_949, "59.9s"), (60_000, "1m00s"),
    (3_599_999, "59m59s"), (3_600_000, "1h00m"), (86_399_000, "23h59m"), (90_000_000, "1d01h"),
])
def test_ages_read_at_a_glance(ms: int, shown: str) -> None:
    assert ps.format_age(ms) == shown


def test_the_server_table_has_a_line_per_server_with_its_state() -> None:
    table = lines(ps.format_servers(SERVERS))
    assert table[0] == ["SERVER", "PID", "VERSION", "SHARING", "DIRECT", "SESSIONS",
                        "OUTSTANDING", "OLDEST", "UP", "STATE", "EXECUTABLE"]
    assert table[1] == ["echo", "101", "1.0.0", "unsharable", "yes", "2", "0", "-", "1m05s",
                        "running", "/usr/bin/python3"]
    assert table[2] == ["kv", "102", "2.1.7", "global", "no", "1", "3", "4.2s", "2h03m",
                        "terminating", "?"]
    assert ps.format_servers([]) == "no server is registered"


def test_the_session_table_shows_creator_slots_and_the_oldest_message() -> None:
    table = ps.format_sessions(SESSIONS).splitlines()
    assert table[0].split() == ["SESSION", "SERVER", "PATH", "STATE", "CREATOR", "SLOTS",
                                "OUTSTANDING", "OLDEST", "AGE", "HOLDERS", "(pid/threads)"]
    assert table[1].split() == ["0x1", "kv", "kernel", "OPEN", "200/2001", "2/4", "3", "4.2s",
                                "9.0s", "200/2", "201/1"]
    assert table[2].split() == ["0x2a", "echo", "direct", "OPEN", "200/?", "0/pool", "0", "-",
                                "800ms", "-"]
    assert table[3].split()[5] == "0/sync"
    assert table[1].index("4.2s") == table[2].index("-  ") == table[0].index("OLDEST")  # aligned
    assert ps.format_sessions([]) == "no session is open"


def test_the_process_table_names_each_role() -> None:
    table = lines(ps.format_processes(PROCESSES))
    assert table[0] == ["PID", "UID", "ROLES", "CHANNELS", "SESSIONS", "OUTSTANDING",
                        "EXECUTABLE"]
    assert table[1] == ["101", "1000", "server", "echo", "0", "0", "0", "/usr/bin/python3"]
    assert table[2] == ["200", "1000", "client", "2", "3", "4", "/usr/bin/python3"]
    assert table[3] == ["300", "1001", "client,", "server", "a,", "server", "b", "1", "1", "0",
                        "?"]


def test_older_than_keeps_rows_holding_a_message_longer_than_the_threshold() -> None:
    assert [row.handle for row in ps.older_than(SESSIONS, 1.0)] == [1]
    assert [row.handle for row in ps.older_than(SESSIONS, 0.5)] == [1, 0x2b]
    assert [row.name for row in ps.older_than(SERVERS, 0)] == ["kv"]
    assert ps.older_than(SESSIONS, 4.2) == []  # (longer than, not as long as)


def test_the_json_shapes_are_stable() -> None:
    server = ps.server_json(SERVERS[1])
    assert server == {
        "name": "kv", "pid": 102, "exe": "", "version": [2, 1, 7], "sharing": "global",
        "direct": False, "sessions": 1, "outstanding": 3, "oldest_ms": 4200,
        "up_ms": 7_400_000, "state": "terminating",
    }
    assert ps.server_json(SERVERS[0])["oldest_ms"] is None
    assert ps.session_json(SESSIONS[0]) == {
        "handle": 1, "server": "kv", "path": "kernel", "state": "OPEN",
        "creator": {"pid": 200, "thread": 2001},
        "holders": [{"pid": 200, "threads": 2}, {"pid": 201, "threads": 1}],
        "slots_used": 2, "slots": 4, "outstanding": 3, "oldest_ms": 4200, "age_ms": 9000,
    }
    second = ps.session_json(SESSIONS[1])
    assert second["slots"] == "pool" and second["creator"]["thread"] is None
    assert ps.process_json(PROCESSES[2]) == {
        "pid": 300, "uid": 1001, "exe": "", "roles": ["client", "server a", "server b"],
        "channels": 1, "inbox": True, "servers": ["a", "b"], "sessions": 1, "outstanding": 0,
    }
    for row in (server, second, ps.process_json(PROCESSES[0])):
        assert json.loads(json.dumps(row)) == row


def test_the_summary_line_names_the_main_counters_and_says_where_the_rest_are() -> None:
    counters = KernelState().statistics()
    counters.update(processes=1, peers=3, servers=1, sessions=2, sessions_open=2,
                    sessions_direct=1, messages=1, pool_used=1)
    assert ps.format_summary(counters) == (
        "kernel: 1 process (3 sockets), 1 server, 2 sessions (2 open, 1 direct), 1 message "
        "outstanding through it, pool slots 1/4096 used; all 21 counters: ipcfw ps --counters"
    )
    every = lines(ps.format_counters(counters))
    assert [name for name, _ in every] == list(counters)  # none unreachable
    assert dict(every)["peers"] == "3"


@pytest.mark.parametrize("argv, message", [
    (["--older-than", "x"], "expected a number of seconds, got 'x'"),
    (["--older-than", "-1"], "seconds >= 0, got '-1'"),
    (["--sessions", "--processes"], "not allowed with"),
])
def test_bad_options_are_refused_by_name(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["ps", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_older_than_does_not_go_with_processes(capsys) -> None:
    assert main(["ps", "--processes", "--older-than", "1"]) == 2  # (no kernel is asked)
    assert "--older-than lists servers and sessions" in capsys.readouterr().err
