"""Running ipcfw as a service: systemd's readiness protocol (``$NOTIFY_SOCKET``) from
``ipcfw kernel`` and ``ipcfw serve``, and the log options (``--log-format json``,
``--log-file``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from ipcfw import testing
from ipcfw.tools import systemd
from conftest import PYTHONPATH, REPO, ManagedProcess, wait_until


def _listen(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(15)
    return sock


def _message(sock: socket.socket) -> dict[str, str]:
    """One sd_notify datagram, as its KEY=value lines."""
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


@pytest.mark.process
def test_kernel_and_server_tell_systemd_when_ready_and_when_stopping(tmp_path):
    notify = _listen(str(tmp_path / "notify"))
    with notify, testing.Stack(env={"NOTIFY_SOCKET": str(tmp_path / "notify"),
                                    "PYTHONPATH": PYTHONPATH}, cwd=str(REPO)) as stack:
        ready = _message(notify)  # the Stack returned once the kernel listened
        assert ready == {"READY": "1", "STATUS": f"kernel at {stack.endpoint}",
                         "MAINPID": str(stack.kernel.pid)}
        server = stack.serve("servers.echo:EchoServer")
        ready = _message(notify)
        assert ready["READY"] == "1" and ready["MAINPID"] == str(server.pid)
        assert ready["STATUS"] == f"serving servers.echo:EchoServer at {stack.endpoint}"
        server.popen.send_signal(signal.SIGTERM)
        assert _message(notify) == {"STOPPING": "1"}
        assert server.popen.wait(10) == 0


def test_notify_reaches_an_abstract_socket_and_does_nothing_without_one(monkeypatch):
    name = f"ipcfw-test-{os.getpid()}"
    with _listen("\0" + name) as notify:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1", "STATUS=fine")
        assert _message(notify) == {"READY": "1", "STATUS": "fine"}
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not systemd.notify("READY=1")


def test_notify_to_a_socket_that_is_gone_is_logged_not_raised(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    assert not systemd.notify("READY=1")
    assert "could not notify systemd at NOTIFY_SOCKET=" in caplog.text


@pytest.mark.process
@pytest.mark.parametrize("where", ["before", "after"])
def test_log_format_json_to_a_file(tmp_path, where):
    log_file = tmp_path / "kernel.log"
    options = ["--log-format", "json", "--log-file", str(log_file)]
    command = ["kernel", "--endpoint", f"ipc://{tmp_path}/kernel"]
    argv = [sys.executable, "-m", "ipcfw",
            *(options + command if where == "before" else command + options)]
    kernel = ManagedProcess(argv, tmp_path / "stderr.log", dict(os.environ, PYTHONPATH=PYTHONPATH))
    try:
        wait_until(lambda: (tmp_path / "kernel").exists(), what="the kernel to listen")
        kernel.popen.send_signal(signal.SIGTERM)
        assert kernel.popen.wait(10) == 0
    finally:
        kernel.stop()
    entries = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert entries and all(
        set(e) >= {"time", "level", "logger", "pid", "message"} for e in entries)
    assert {e["pid"] for e in entries} == {kernel.pid}
    assert any(e["level"] == "INFO" and e["logger"].startswith("ipcfw") for e in entries)
    assert entries[0]["time"].endswith("+00:00")
    assert kernel.log() == ""  # nothing went to stderr


@pytest.mark.process
def test_a_log_file_that_cannot_be_opened_is_refused_clearly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ipcfw", "--log-file", str(tmp_path / "no" / "such.log"), "ps"],
        capture_output=True, text=True, timeout=30, env=dict(os.environ, PYTHONPATH=PYTHONPATH))
    assert result.returncode == 2
    assert result.stderr.startswith("ipcfw: --log-file: ") and "No such file" in result.stderr
