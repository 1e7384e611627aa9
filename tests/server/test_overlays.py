"""Overlays (seed 000): session middleware that manages a session, then hands it off."""

from __future__ import annotations

import signal
import threading
import time

import pytest

import ipcfw
from ipcfw import RSession, ServerHost
from conftest import wait_until
from plugins.overlays import EchoServer, LongWorkOverlay, RefusingServer, WorkOverlay
from servers.kv import EGet, ESet
from servers.login import ELogin, KErrLoginFailed, LoginOverlay

pytestmark = pytest.mark.usefixtures("data_path")  # each test on both data paths


def host(top) -> tuple[ServerHost, threading.Thread]:
    server_host = ServerHost(top)
    ready = threading.Event()
    thread = threading.Thread(target=server_host.run, args=(ready,), name="overlay-host")
    thread.start()
    assert ready.wait(10)
    return server_host, thread


def stop(server_host: ServerHost, thread: threading.Thread) -> None:
    server_host.stop()
    thread.join(10)
    assert not thread.is_alive()


def test_login_and_audit_stacked_over_kv_with_ipcfw_serve(kernel):
    server = kernel.serve("servers.kv:KvServer", "kv", "--overlay", "servers.login:LoginOverlay",
                          "--overlay", "servers.audit:AuditOverlay")  # returns once registered
    with RSession.connect("kv") as session:
        with pytest.raises(ipcfw.NotReady):  # the login overlay manages the session first
            session.SendReceive(ESet, (b"k", b"v"))
        with pytest.raises(ipcfw.IpcError) as wrong:
            session.SendReceive(ELogin, (b"guess",))
        assert wrong.value.code == KErrLoginFailed
        assert session.ErrorString(KErrLoginFailed) == "login: wrong secret"  # the overlay's
        assert session.ErrorString(-15).startswith("KErrServerTerminated (-15)")  # ipcfw's
        assert session.SendReceive(ELogin, (b"open sesame",)) == 0  # handed off to kv
        session.SendReceive(ESet, (b"colour", b"blue"))
        value = bytearray(16)
        assert session.SendReceive(EGet, (b"colour", value)) == 4 and value == bytearray(b"blue")
    assert "audit: session from pid" in server.log()


def test_a_long_task_on_the_overlays_thread_then_hand_off_in_order(kernel):
    server_host, thread = host(WorkOverlay(EchoServer()))
    try:
        with RSession.connect("layered") as session:
            # The overlay answers 1000 + Int0, the server Int0: Int0 stays below 1000 to tell
            # them apart however many calls the overlay's work lasts on a loaded machine.
            answers = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                answers.append(session.SendReceive(0, (len(answers) % 1000,)))
                if answers[-1] < 1000:
                    break
            overlay_part = [a for a in answers if a >= 1000]
            server_part = [a for a in answers if a < 1000]
            assert overlay_part and server_part  # first the overlay, then the server
            assert answers == overlay_part + server_part  # never interleaved: in order
            n = len(overlay_part)
            assert answers == [1000 + i % 1000 for i in range(n)] + [n % 1000]
            assert session.ErrorString(-2000) == "echo: its own error"  # the overlaid server's
    finally:
        stop(server_host, thread)
    assert server_host.overlays[0].events == ["handed off"]


def test_closing_the_session_stops_the_overlays_thread(kernel):
    server_host, thread = host(LongWorkOverlay(EchoServer()))
    try:
        session = RSession.connect("layered")
        assert session.SendReceive(0, (1,)) == 1001  # managed by the overlay
        session.Close()
        overlay = server_host.overlays[0]
        wait_until(lambda: overlay.events == ["stopped"], timeout=3, what="the overlay to stop")
        for work in overlay.threads:
            work.join(3)
            assert not work.is_alive()
        wait_until(lambda: kernel.statistics()["sessions"] == 0, what="nothing left")
    finally:
        stop(server_host, thread)


def test_a_client_dying_stops_the_overlays_thread(kernel):
    server_host, thread = host(LongWorkOverlay(EchoServer()))
    try:
        client = kernel.spawn_client(["-c", (
            "import time, ipcfw\n"
            "s = ipcfw.RSession.connect('layered'); print(s.SendReceive(0, (2,)), flush=True)\n"
            "time.sleep(60)\n"
        )])
        wait_until(lambda: "1002" in client.log(), what="the client to be managed")
        client.kill(signal.SIGKILL)
        overlay = server_host.overlays[0]
        wait_until(lambda: overlay.events == ["stopped"], timeout=3, what="the overlay to stop")
    finally:
        stop(server_host, thread)


def test_the_overlaid_server_refusing_the_session_fails_the_client(kernel):
    server_host, thread = host(LoginOverlay(RefusingServer(), secret=b"s"))
    try:
        with RSession.connect("layered") as session:
            assert session.SendReceive(ELogin, (b"s",)) == 0  # the login itself succeeds...
            with pytest.raises(ipcfw.PermissionDenied):  # ...then the server's refusal
                session.SendReceive(0, (1,))
    finally:
        stop(server_host, thread)
