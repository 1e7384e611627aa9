"""Shared sessions: ShareAuto, ShareProtected/Open, the 255-thread limit, lifetimes."""

from __future__ import annotations

import json
import threading

import pytest

import ipcfw
from ipcfw import ClientPanic, RSession
from conftest import wait_until
from plugins import probe

pytestmark = pytest.mark.usefixtures("data_path")  # each test on both data paths

VERSION = (1, 2, 0)


@pytest.fixture
def probe_server(kernel):
    return kernel.serve("plugins.probe:ProbeServer", "probe")


events = probe.recorded_events


def run_in_thread(fn):
    result: list = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # reported to the test
            result.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    return result[0]


def test_share_auto_lets_every_thread_of_the_process_use_the_session(probe_server):
    with RSession.connect("probe", VERSION) as session:
        refused = run_in_thread(lambda: session.SendReceive(probe.EEcho, (1,)))
        assert isinstance(refused, ClientPanic) and refused.category == "KERN-EXEC"
        session.ShareAuto()
        assert run_in_thread(lambda: session.SendReceive(probe.EEcho, (2,))) == 2
        assert session.SendReceive(probe.EEcho, (3,)) == 3


def test_share_auto_session_outlives_its_creating_thread(kernel, probe_server):
    made: list[RSession] = []

    def create() -> None:
        session = RSession.connect("probe", VERSION)
        session.ShareAuto()
        made.append(session)

    run_in_thread(create)
    session = made[0]
    assert session.SendReceive(probe.EEcho, (4,)) == 4  # the thread ended; the process holds it
    session.Close()  # any thread of the process may close a shared session
    wait_until(lambda: kernel.statistics()["sessions"] == 0, what="the session to close")


def test_share_protected_attaches_another_process_to_the_same_session(kernel, probe_server):
    session = RSession.connect("probe", VERSION)
    token = session.ShareProtected()
    assert isinstance(token, bytes) and len(token) >= 16
    assert session.ShareProtected() == token
    script = (
        "import sys, ipcfw; from plugins import probe\n"
        "shared = ipcfw.RSession.Open(bytes.fromhex(sys.argv[1]))\n"
        "print(shared.Handle(), shared.SendReceive(probe.EEcho, (41,)))\n"
        "shared.Close()\n"
    )
    result = kernel.client(["-c", script, token.hex()])
    assert result.returncode == 0, result.stderr
    handle, value = map(int, result.stdout.split())
    assert handle == session.Handle() and value == 41
    served = [e for e in events(session) if e[0] == "service" and e[2] == probe.EEcho]
    assert served == [["service", session.Handle(), probe.EEcho]]  # the same CSession served it
    # The other process closed its handle: the session lives on for us, with no Disconnect.
    assert ["disconnect", session.Handle()] not in events(session)
    session.Close()
    result = kernel.client(["-c", script, token.hex()])
    assert result.returncode != 0 and "PermissionDenied" in result.stderr  # useless now


def test_tokens_cannot_be_guessed(kernel, probe_server):
    with RSession.connect("probe", VERSION) as session:
        token = session.ShareProtected()
        for guess in (b"", bytes(16), token[:-1] + bytes([token[-1] ^ 1])):
            with pytest.raises(ipcfw.PermissionDenied):
                RSession.Open(guess)


def test_the_servers_sharing_caps_what_a_client_may_ask(kernel):
    kernel.serve("plugins.sharing:UnsharableServer", "unsharable")
    kernel.serve("plugins.sharing:SharableServer", "sharable")
    with RSession.connect("unsharable") as session:
        with pytest.raises(ipcfw.PermissionDenied):
            session.ShareAuto()
        assert session.SendReceive(0, (5,)) == 5  # refused sharing leaves it usable
    with RSession.connect("sharable") as session:
        session.ShareAuto()
        with pytest.raises(ipcfw.PermissionDenied):
            session.ShareProtected()


def test_shared_session_ends_when_its_last_holder_closes_once(kernel, probe_server):
    owner = RSession.connect("probe", VERSION)
    handle = owner.Handle()
    token = owner.ShareProtected()
    other = kernel.spawn_client(["-c", (
        "import sys, ipcfw\n"
        "s = ipcfw.RSession.Open(bytes.fromhex(sys.argv[1])); print('open', flush=True)\n"
        "import time; time.sleep(60)\n"
    ), token.hex()])
    wait_until(lambda: "open" in other.log(), what="the other process to attach")
    owner.Close()
    with RSession.connect("probe", VERSION) as watcher:
        assert ["disconnect", handle] not in events(watcher)
        other.kill()  # the last holder dies
        wait_until(lambda: ["disconnect", handle] in events(watcher), what="Disconnect")
        assert events(watcher).count(["disconnect", handle]) == 1


def test_at_most_255_threads_attach_and_an_ended_thread_detaches(kernel, probe_server):
    session = RSession.connect("probe", VERSION)
    token = session.ShareProtected()  # this thread is attached: 1
    release = threading.Event()
    results: list = []

    def attach_and_hold(value: int) -> None:
        try:
            results.append(session.SendReceive(probe.EEcho, (value,)))
            release.wait(60)
            results.append(session.SendReceive(probe.EEcho, (value,)))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=attach_and_hold, args=(i,)) for i in range(127)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(results) == 127, timeout=30, what="127 threads to attach")
    assert kernel.statistics()["attached"] == 128
    script = (
        "import json, sys, threading, ipcfw\n"
        "shared = ipcfw.RSession.Open(bytes.fromhex(sys.argv[1]))  # attached: 129\n"
        "go, out = threading.Event(), {'first': 0, 'second': 0, 'errors': []}\n"
        "def work(i):\n"
        "    try:\n"
        "        shared.SendReceive(1, (i,)); out['first'] += 1; go.wait(60)\n"
        "        shared.SendReceive(1, (i,)); out['second'] += 1\n"
        "    except Exception as e: out['errors'].append(repr(e))\n"
        "ts = [threading.Thread(target=work, args=(i,)) for i in range(126)]\n"
        "[t.start() for t in ts]\n"
        "import time\n"
        "while out['first'] + len(out['errors']) < 126: time.sleep(0.01)\n"
        "def extra():\n"
        "    try: shared.SendReceive(1, (1,)); out['256th'] = 'accepted'\n"
        "    except ipcfw.Overflow: out['256th'] = 'Overflow'\n"
        "t = threading.Thread(target=extra); t.start(); t.join()\n"
        "go.set(); [t.join() for t in ts]\n"
        "print(json.dumps(out))\n"
        "shared.Close()\n"
    )
    result = kernel.client(["-c", script, token.hex()], timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["errors"] == [] and out["first"] == 126 and out["second"] == 126
    assert out["256th"] == "Overflow"
    wait_until(lambda: kernel.statistics()["attached"] == 128, what="the other process to detach")
    release.set()
    for thread in threads:
        thread.join(30)
    assert [r for r in results if not isinstance(r, int)] == []
    assert sorted(results) == sorted(list(range(127)) * 2)
    wait_until(lambda: kernel.statistics()["attached"] == 1, what="ended threads to detach")
    session.Close()


def test_no_head_of_line_blocking_with_out_of_order_completion(probe_server):
    session = RSession.connect("probe", VERSION)
    session.ShareAuto()
    failures: list = []

    def work(thread_id: int) -> None:
        try:
            for i in range(500):
                value = thread_id * 1000 + i
                if session.SendReceive(probe.EEchoShuffled, (value,)) != value:
                    failures.append((thread_id, i))
        except BaseException as exc:
            failures.append(repr(exc))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    session.Close()


FORGE = (
    "import sys, ipcfw\n"
    "from ipcfw.client.runtime import Runtime\n"
    "forged = ipcfw.RSession()\n"
    "forged._life.attach(Runtime.for_endpoint(), int(sys.argv[1]))  # not held here\n"
    "try:\n"
    "    forged.SendReceive(1, (9,))\n"
    "    print('accepted')\n"
    "except ipcfw.ClientPanic as e:\n"
    "    print(e.category, e.reason)\n"
)


def test_forged_stale_and_foreign_handles_are_refused(kernel, probe_server):
    with RSession.connect("probe", VERSION) as session:
        handle = session.Handle()
        stale = RSession.connect("probe", VERSION)
        stale_handle = stale.Handle()
        stale.Close()
        for candidate in (handle, stale_handle, 0x7FFF0000):  # another process's, stale, forged
            result = kernel.client(["-c", FORGE, str(candidate)])
            assert result.returncode == 0, result.stderr
            assert result.stdout.split() == ["KERN-EXEC", "0"]
        served = [e for e in events(session) if e[0] == "service" and e[2] == probe.EEcho]
        assert served == []  # nothing reached the server
        assert session.SendReceive(probe.EEcho, (8,)) == 8  # the rightful holder is unaffected
