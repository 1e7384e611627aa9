"""Other hosts over tcp with CURVE, with real processes: a kernel that also listens on
tcp://127.0.0.1, a server "host" (alice) and a client "host" (bob), each with its own keypair
from `ipcfw keygen`, and local processes beside them on the kernel's Unix socket.

What must hold (docs/security.md#other-hosts): a listed key is served, with the identity and
capabilities the configuration gives it; an unlisted key, a wrong kernel key or no keys at all
fail at once with an error saying which; sessions over tcp take the kernel path; a frozen peer
(SIGSTOP: its socket stays open) is noticed by heartbeats within `HEARTBEAT_TIMEOUT` and a
little, a killed one at once; remote peers learn of the kernel's death.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import PYTHONPATH, REPO, wait_until
from ipcfw import IpcError, KErrOverflow, KErrServerTerminated, RSession, TRequestStatus
from ipcfw.client.channel import HELLO_TIMEOUT
from ipcfw.client.runtime import Runtime
from ipcfw.curve import generate
from ipcfw.testing import Process, Stack
from ipcfw.transport import HEARTBEAT_TIMEOUT
from plugins.probe import EClient, EEcho, EHold, recorded_events

pytestmark = pytest.mark.process

ALICE_UID, BOB_UID = 4242, 4343
SLACK = 3.0  # seconds beyond the heartbeat timeout a loaded machine may take to tell

# A client on "another host": connects over tcp with the keys in its environment, runs the
# calls argv[2] names, prints one JSON line of results (or the error), then waits for stdin to
# close (so a test can hold its session open, or freeze it).
REMOTE_CLIENT = """
import json, sys
import ipcfw
from ipcfw import IpcError, RSession
name, calls = sys.argv[1], sys.argv[2].split(",")
try:
    session = RSession.connect(name, ipcfw.TVersion(1, 0, 0), path="direct")
    out = {}
    for call in calls:
        if call == "echo":
            out["echo"] = session.SendReceive(1, (41,))
        elif call == "client":
            buffer = bytearray(4096)
            length = session.SendReceive(10, (buffer,))
            out["client"] = json.loads(bytes(buffer[:length]))
        elif call == "stats":
            out["stats"] = ipcfw.kernel_statistics()
        elif call == "hold":
            session.Send(2, (7,))
            out["held"] = True
    print(json.dumps(out), flush=True)
except IpcError as error:
    print(json.dumps({"error": error.code, "text": str(error)}), flush=True)
sys.stdin.read()
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Hosts:
    """A kernel with a tcp listener, and the keys of alice, bob and mallory (not listed)."""

    def __init__(self, stack: Stack, keys: Path, tcp: str) -> None:
        self.stack, self.keys, self.tcp = stack, keys, tcp

    def env(self, who: str, kernel_key: str = "kernel") -> dict[str, str]:
        return {"IPCFW_KERNEL": self.tcp, "IPCFW_KEY": str(self.keys / f"{who}.key"),
                "IPCFW_KERNEL_KEY": str(self.keys / f"{kernel_key}.key.pub")}

    def serve_remote(self, plugin: str = "plugins.probe:ProbeServer", *args: str) -> Process:
        argv = self.stack.ipcfw_argv("serve", plugin, "--endpoint", self.tcp, *args)
        server = self.stack.spawn(argv, "alice", ready=True, env=self.env("alice"))
        self.stack.servers.append(server)
        self.stack.wait_ready(server)
        return server

    def remote_client(self, calls: str, who: str = "bob", name: str = "probe",
                      **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", REMOTE_CLIENT, name, calls], cwd=str(REPO), text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": PYTHONPATH, **self.env(who), **env})

    def script_result(self, script: str, who: str, *args: str) -> dict:
        """What a Python `script` run with `who`'s keys prints (one JSON line), within 45 s."""
        child = subprocess.Popen(
            [sys.executable, "-c", script, *args], cwd=str(REPO), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": PYTHONPATH, **self.env(who)})
        try:
            out, err = child.communicate(timeout=45)
        finally:
            child.kill()
            child.wait(10)
        assert child.returncode == 0, err
        return dict(json.loads(out))

    def remote_result(self, calls: str, who: str = "bob", name: str = "probe",
                      **env: str) -> dict:
        child = self.remote_client(calls, who, name, **env)
        try:
            out, err = child.communicate("", timeout=30)
        finally:
            child.kill()
        assert child.returncode == 0, err
        return dict(json.loads(out))


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    with started_hosts(tmp_path) as started:
        yield started


@contextlib.contextmanager
def started_hosts(tmp_path: Path, limits: str = "") -> Iterator[Hosts]:
    """A kernel listening on tcp for alice's and bob's keys (with `limits`, the lines of a
    [limits] table, if given)."""
    keys = tmp_path / "keys"
    keys.mkdir()
    public = {who: generate(str(keys / f"{who}.key")).public.decode()
              for who in ("kernel", "alice", "bob", "mallory")}
    tcp = f"tcp://127.0.0.1:{free_port()}"
    config = tmp_path / "kernel.toml"
    config.write_text((f"[limits]\n{limits}\n" if limits else "") + f"""
[tcp]
listen = "{tcp}"
key = "{keys / 'kernel.key'}"

[[tcp.peer]]
name = "alice"
key = "{public['alice']}"
uid = {ALICE_UID}

[[tcp.peer]]
name = "bob"
key = "{public['bob']}"
uid = {BOB_UID}
gid = 77
capabilities = ["ReadDeviceData", "com.example.Remote"]
""")
    with Stack(kernel_options=["--config", str(config)], env={"PYTHONPATH": PYTHONPATH},
               cwd=str(REPO)) as stack:
        yield Hosts(stack, keys, tcp)


def test_a_remote_server_serves_remote_and_local_clients(hosts: Hosts) -> None:
    hosts.serve_remote()
    result = hosts.remote_result("echo,client")
    assert result["echo"] == 41
    client = result["client"]
    # What the configuration gives bob's key, never bob's word (but its pid, which only
    # tells its processes apart).
    assert (client["uid"], client["gid"], client["exe"]) == (BOB_UID, 77, "")
    assert {"ReadDeviceData", "com.example.Remote", "ReadUserData"} <= set(client["capabilities"])
    assert "ProtServ" not in client["capabilities"]
    with RSession.connect("probe", endpoint=hosts.stack.endpoint) as local:  # (ipc)
        assert local.SendReceive(EEcho, (5,)) == 5
        buffer = bytearray(4096)
        length = local.SendReceive(EClient, (buffer,))
        assert json.loads(bytes(buffer[:length]))["pid"] == os.getpid()


def test_a_remote_client_of_a_local_server_takes_the_kernel_path(hosts: Hosts) -> None:
    hosts.stack.serve("plugins.probe:ProbeServer")  # local, takes direct connections
    result = hosts.remote_result("echo,stats")
    assert result["echo"] == 41
    assert result["stats"]["sessions"] == 1
    assert result["stats"]["sessions_direct"] == 0  # (it asked for the direct path)


def test_a_key_the_kernel_does_not_list_is_refused_at_once_with_the_reason(
        hosts: Hosts) -> None:
    hosts.serve_remote()
    started = time.monotonic()
    result = hosts.remote_result("echo", who="mallory")
    assert time.monotonic() - started < 10  # (not a silent retry until some timeout)
    mallory = (hosts.keys / "mallory.key.pub").read_text()
    assert result["error"] == -46  # KErrPermissionDenied
    assert "refused this process's key" in result["text"]
    assert mallory.split('"')[1] in result["text"]


def test_a_wrong_kernel_key_or_no_keys_fail_with_what_to_do(hosts: Hosts) -> None:
    hosts.serve_remote()
    wrong = hosts.remote_result("echo", IPCFW_KERNEL_KEY=str(hosts.keys / "bob.key.pub"))
    assert "IPCFW_KERNEL_KEY is not the public key of the kernel" in wrong["text"]
    none = hosts.remote_result("echo", IPCFW_KEY="")
    assert "set IPCFW_KEY" in none["text"] and "ipcfw keygen" in none["text"]
    (hosts.keys / "bob.key").chmod(0o644)
    loose = hosts.remote_result("echo")
    assert "chmod 600" in loose["text"]


def test_a_frozen_remote_client_is_noticed_by_heartbeats(hosts: Hosts) -> None:
    hosts.stack.serve("plugins.probe:ProbeServer")
    bob = hosts.remote_client("hold")
    try:
        assert bob.stdout is not None
        assert json.loads(bob.stdout.readline()) == {"held": True}
        with RSession.connect("probe", endpoint=hosts.stack.endpoint) as local:
            wait_until(lambda: any(e[0] == "service" and e[2] == EHold
                                   for e in recorded_events(local)), timeout=10)
            os.kill(bob.pid, signal.SIGSTOP)  # its sockets stay open: only silence tells
            frozen = time.monotonic()
            wait_until(lambda: sum(e[0] == "disconnect" for e in recorded_events(local)) == 1,
                       timeout=HEARTBEAT_TIMEOUT + SLACK + 5)
            noticed = time.monotonic() - frozen
            assert noticed < HEARTBEAT_TIMEOUT + SLACK, noticed
            assert local.SendReceive(EEcho, (3,)) == 3  # (and nobody else is disturbed)
    finally:
        os.kill(bob.pid, signal.SIGKILL)
        bob.wait(10)


def test_a_remote_server_killed_or_frozen_fails_its_clients_requests(hosts: Hosts) -> None:
    for stop in (signal.SIGKILL, signal.SIGSTOP):
        server = hosts.serve_remote()
        with RSession.connect("probe", endpoint=hosts.stack.endpoint) as local:
            status = TRequestStatus()
            local.SendReceive(EHold, (1,), status)
            wait_until(lambda: hosts.stack.statistics()["messages"] >= 1, timeout=10)
            os.kill(server.popen.pid, stop)
            stopped = time.monotonic()
            assert status.Wait(timeout=HEARTBEAT_TIMEOUT + SLACK + 5) == KErrServerTerminated
            assert time.monotonic() - stopped < HEARTBEAT_TIMEOUT + SLACK
        server.kill()
        server.popen.wait(10)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_remote_peers_learn_that_the_kernel_died(hosts: Hosts, stop: signal.Signals) -> None:
    server = hosts.serve_remote("plugins.probe:ProbeServer", "--no-reconnect")
    bob = hosts.remote_client("echo")
    try:
        assert bob.stdout is not None
        assert json.loads(bob.stdout.readline()) == {"echo": 41}
        assert hosts.stack.kernel is not None
        hosts.stack.kernel.kill(stop)  # (frozen: no pid to watch over tcp, only heartbeats)
        stopped = time.monotonic()
        assert server.popen.wait(HEARTBEAT_TIMEOUT + SLACK + 5) == 3  # (--no-reconnect)
        assert time.monotonic() - stopped < HEARTBEAT_TIMEOUT + SLACK
        assert "the ipcfw kernel has died" in server.log_path.read_text()
    finally:
        bob.kill()
        bob.wait(10)


def test_a_refused_channel_leaves_no_descriptor_behind(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Over tcp each socket has a link monitor (a socket of its own, with a descriptor): a
    # channel whose Hello the kernel refuses must close it too, or each refused thread of a
    # long-lived client leaves one open for as long as the process runs.
    with started_hosts(tmp_path, "connections_per_uid = 2") as hosts:
        hosts.stack.serve("plugins.probe:ProbeServer")
        for name, value in hosts.env("bob").items():
            monkeypatch.setenv(name, value)
        try:
            session = RSession.connect("probe", endpoint=hosts.tcp, path="kernel")  # 2 open
            session.ShareAuto()
            codes: list[int] = []

            def another_thread() -> None:
                try:
                    session.SendReceive(EEcho, (1,))
                except IpcError as error:
                    codes.append(error.code)

            def refused_threads(count: int) -> None:
                for _ in range(count):
                    thread = threading.Thread(target=another_thread)
                    thread.start()
                    thread.join(10)

            refused_threads(2)  # (whatever a first refusal makes once)
            before = len(os.listdir("/proc/self/fd"))
            refused_threads(20)
            assert codes == [KErrOverflow] * 22  # (connections_per_uid)
            # (ZeroMQ's I/O thread closes a closed socket's connection soon after: wait for
            # it; about one a thread stayed open for good, before)
            wait_until(lambda: len(os.listdir("/proc/self/fd")) <= before + 2, timeout=5,
                       what="the refused channels' descriptors closed")
        finally:
            Runtime.shutdown(hosts.tcp)


def test_a_remote_client_notices_a_frozen_kernel_by_heartbeats(
        hosts: Hosts, monkeypatch: pytest.MonkeyPatch) -> None:
    # A frozen kernel's pid stays alive (a pidfd on it would never fire, as on another host
    # there is none to open): only the connection's silence tells a remote client's inbox,
    # which fails the requests waiting.
    hosts.stack.serve("plugins.probe:ProbeServer")
    for name, value in hosts.env("bob").items():
        monkeypatch.setenv(name, value)
    assert hosts.stack.kernel is not None
    try:
        session = RSession.connect("probe", endpoint=hosts.tcp)
        status = TRequestStatus()
        session.SendReceive(EHold, (1,), status)
        wait_until(lambda: hosts.stack.statistics()["messages"] >= 1, timeout=10)
        hosts.stack.kernel.kill(signal.SIGSTOP)
        frozen = time.monotonic()
        assert status.Wait(timeout=HEARTBEAT_TIMEOUT + SLACK + 5) == KErrServerTerminated
        assert time.monotonic() - frozen < HEARTBEAT_TIMEOUT + SLACK
    finally:
        Runtime.shutdown(hosts.tcp)
        hosts.stack.kernel.kill()


# Hellos said at every moment of a refused key's handshake (a thread slower or faster than
# it), each on a new socket: prints the codes they failed with, and the slowest's time.
HELLOS_THROUGH_A_REFUSAL = """
import json, sys, time
import zmq
from ipcfw import IpcError
from ipcfw.client.channel import hello
from ipcfw.protocol import Role
from ipcfw.transport import discard, open_socket
context = zmq.Context()
codes, slowest = set(), 0.0
for delay in range(0, 150, 2):
    socket = open_socket(context, sys.argv[1])
    time.sleep(delay / 1000)
    started = time.monotonic()
    try:
        hello(socket, Role.CHANNEL, sys.argv[1])
    except IpcError as error:
        codes.add(error.code)
    slowest = max(slowest, time.monotonic() - started)
    discard(socket)
print(json.dumps({"codes": sorted(codes), "slowest": slowest}), flush=True)
context.destroy(linger=0)
"""


def test_a_refused_hello_fails_at_once_whenever_it_is_said(hosts: Hosts) -> None:
    # The Hello was sent with a blocking send: said at the wrong moment of the refusal
    # (within the first ~100 ms), it waited forever for a connection to go on.
    result = hosts.script_result(HELLOS_THROUGH_A_REFUSAL, "mallory", hosts.tcp)
    assert result["codes"] == [-46]  # KErrPermissionDenied, every time
    assert result["slowest"] < HELLO_TIMEOUT  # (at once, never the timeout)


# A process on "another host" whose key the kernel refuses, trying again and again: what each
# attempt leaves open (before any garbage collection), then a collection.
REFUSED_AGAIN = """
import gc, json, os, time
import ipcfw
from ipcfw import IpcError, RSession
def attempt():
    try:
        RSession.connect("probe", ipcfw.TVersion(1, 0, 0))
    except IpcError as error:
        return error.code
codes = [attempt() for _ in range(3)]
gc.collect()
before = len(os.listdir("/proc/self/fd"))
codes += [attempt() for _ in range(10)]
for _ in range(50):  # (ZeroMQ's I/O threads close what was closed soon after)
    left = len(os.listdir("/proc/self/fd")) - before
    if left <= 2:
        break
    time.sleep(0.1)
gc.collect()
print(json.dumps({"codes": codes, "left": left}), flush=True)
"""


def test_a_refused_process_trying_again_leaves_nothing_open_and_does_not_hang(
        hosts: Hosts) -> None:
    # Each refused attempt's link monitor, inbox pipe and context must be closed with it: left
    # to the garbage collector, the context's destruction waited for a monitor socket the
    # same collection had already forgotten, and the process hung there, holding the GIL.
    hosts.stack.serve("plugins.probe:ProbeServer")
    result = hosts.script_result(REFUSED_AGAIN, "mallory")
    assert result["codes"] == [-46] * 13  # KErrPermissionDenied, each time
    assert result["left"] <= 2, result  # (about 4 a time, before)


def test_a_kernel_whose_key_file_others_may_read_does_not_start(tmp_path: Path) -> None:
    generate(str(tmp_path / "kernel.key"))
    (tmp_path / "kernel.key").chmod(0o640)
    config = tmp_path / "kernel.toml"
    config.write_text(f'[tcp]\nlisten = "tcp://127.0.0.1:{free_port()}"\n'
                      f'key = "{tmp_path / "kernel.key"}"\n')
    run = subprocess.run(
        [sys.executable, "-m", "ipcfw", "kernel", "--config", str(config), "--endpoint",
         f"ipc://{tmp_path}/k/kernel"], capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": PYTHONPATH})
    assert run.returncode == 2
    assert "mode 640" in run.stderr and "chmod 600" in run.stderr


def test_keygen_writes_a_private_keypair_and_a_public_key(tmp_path: Path) -> None:
    path = tmp_path / "me.key"
    run = subprocess.run([sys.executable, "-m", "ipcfw", "keygen", str(path)],
                         capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": PYTHONPATH})
    assert run.returncode == 0, run.stderr
    public = run.stdout.strip()
    assert len(public) == 40
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "me.key.pub").stat().st_mode & 0o777 == 0o644
    assert public in (tmp_path / "me.key.pub").read_text()
    assert "secret-key" not in (tmp_path / "me.key.pub").read_text()
    again = subprocess.run([sys.executable, "-m", "ipcfw", "keygen", str(path)],
                           capture_output=True, text=True, timeout=30,
                           env={**os.environ, "PYTHONPATH": PYTHONPATH})
    assert again.returncode == 2 and "exists" in again.stderr
    assert public in (tmp_path / "me.key.pub").read_text()  # (kept)


def test_a_zap_handler_error_refuses_that_handshake_and_the_next_is_answered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ipcfw.kernel import Kernel
    from ipcfw.kernel.config import parse
    from ipcfw.kernel.zap import ZapHandler
    from ipcfw.kernelprobe import kernel_answers

    public = {who: generate(str(tmp_path / f"{who}.key")).public.decode()
              for who in ("kernel", "bob")}
    tcp = f"tcp://127.0.0.1:{free_port()}"
    config = parse(f'[tcp]\nlisten = "{tcp}"\nkey = "{tmp_path / "kernel.key"}"\n'
                   f'[[tcp.peer]]\nname = "bob"\nkey = "{public["bob"]}"\n')
    answer, calls = ZapHandler.answer, []

    def broken_once(handler: ZapHandler, request: list[bytes]) -> list[bytes]:
        calls.append(request)
        if len(calls) == 1:
            raise RuntimeError("a bug in the handler")
        return answer(handler, request)

    monkeypatch.setattr(ZapHandler, "answer", broken_once)
    monkeypatch.setenv("IPCFW_KEY", str(tmp_path / "bob.key"))
    monkeypatch.setenv("IPCFW_KERNEL_KEY", public["kernel"])
    (tmp_path / "k").mkdir(mode=0o700)
    kernel = Kernel(f"ipc://{tmp_path}/k/kernel", config=config)
    ready = threading.Event()
    thread = threading.Thread(target=kernel.run, args=(ready,), daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        with pytest.raises(IpcError):
            kernel_answers(tcp, timeout=5)  # (the failing handler's answer: refused)
        assert kernel_answers(tcp, timeout=5)  # the kernel still decides handshakes
        assert len(calls) >= 2
    finally:
        kernel.stop()
        thread.join(10)
