"""The kernel's configuration file (ipcfw.kernel.config), without processes: what each key
does, and the error for each kind of mistake, naming the file, the line and the key."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import PYTHONPATH
from ipcfw.kernel.config import ConfigError, Grant, KernelConfig, parse
from ipcfw.security import USER_CAPABILITIES

EXAMPLE = """\
# who may connect, besides the kernel's own uid
[admission]
uids = [1001]
gids = [2000]

[capabilities]
default = ["ReadUserData", "WriteUserData", "LocalServices"]

[[grant]]
uid = 1001
capabilities = ["ProtServ"]

[[grant]]
exe = "/usr/bin/billing"
gid = 2000
capabilities = ["com.example.Billing", "NetworkServices"]

[limits]
sessions_per_process = 500
max_frame = 65536
"""


def test_a_full_configuration_is_read() -> None:
    config = parse(EXAMPLE, "kernel.toml")
    assert config.admit_uids == {1001} and config.admit_gids == {2000}
    assert config.default_capabilities == {"ReadUserData", "WriteUserData", "LocalServices"}
    assert config.grants == (
        Grant(frozenset({"ProtServ"}), uid=1001),
        Grant(frozenset({"com.example.Billing", "NetworkServices"}), gid=2000,
              exe="/usr/bin/billing"),
    )
    assert config.limits.sessions_per_process == 500 and config.limits.max_frame == 65536
    assert config.limits.check().max_backlog == 100_000 + 500 + 10_000  # derived from them


def test_capabilities_are_the_defaults_and_every_matching_grant() -> None:
    config = parse(EXAMPLE)
    assert config.capabilities(1000, 1000, "/usr/bin/python3") == config.default_capabilities
    assert "ProtServ" in config.capabilities(1001, 1000, "/usr/bin/python3")
    billing = config.capabilities(1000, 2000, "/usr/bin/billing")
    assert {"com.example.Billing", "NetworkServices"} <= billing and "ProtServ" not in billing
    assert "com.example.Billing" not in config.capabilities(1000, 2001, "/usr/bin/billing")


def test_an_empty_file_is_the_kernels_defaults() -> None:
    config = parse("")
    assert config == KernelConfig()
    assert config.capabilities(1, 2, "/x") == USER_CAPABILITIES


TCP = '[tcp]\nlisten = "tcp://*:7707"\nkey = "/etc/ipcfw/kernel.key"'
PEER = "\n[[tcp.peer]]"
KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"


def test_a_tcp_listener_and_its_peers_are_read() -> None:
    config = parse(f'{TCP}{PEER}\nname = "builder"\nkey = "{KEY}"\nuid = 4242\n'
                   'capabilities = ["ReadDeviceData"]\n')
    assert config.tcp is not None and config.tcp.listen == "tcp://*:7707"
    (peer,) = config.tcp.peers
    assert (peer.name, peer.key, peer.uid, peer.gid) == ("builder", KEY.encode(), 4242, 65534)
    held = config.capabilities(4242, 65534, "", "builder")
    assert held == config.default_capabilities | {"ReadDeviceData"}
    assert "ReadDeviceData" not in config.capabilities(4242, 65534, "/usr/bin/python3")
    assert "listens on tcp://*:7707 with CURVE for 1 key" in config.summary()


@pytest.mark.parametrize("text, error", [
    ("[limits]\nsessions = 5\n",
     "kernel.toml:2: limits.sessions is not a key of the configuration (the keys of [limits] "
     "are: connections_per_uid, max_backlog, max_frame, outstanding_per_process, pool_slots, "
     "receive_hwm, sessions_per_process)"),
    ("colour = 1\n", "kernel.toml:1: colour is not a key of the configuration"),
    ("[admission]\n\nuids = [1, -2]\n",
     "kernel.toml:3: admission.uids is a list of numeric ids (0..2**32-1), not [1, -2]"),
    ("[admission]\nuids = 1000\n", "kernel.toml:2: admission.uids is a list of numeric ids"),
    ("[capabilities]\ndefault = [\"readuserdata\"]\n",
     "kernel.toml:2: capabilities.default has a bad name: capability 'readuserdata': "
     "Symbian's is spelt 'ReadUserData'"),
    ("[[grant]]\nuid = 5\ncapabilities = [\"TCB\"]\n[[grant]]\nuid = \"me\"\n"
     "capabilities = [\"TCB\"]\n",
     "kernel.toml:5: grant.uid is a numeric uid, not 'me'"),
    ("[[grant]]\ncapabilities = [\"TCB\"]\n",
     "kernel.toml:1: grant number 1 says to whom: give it a uid, gid or exe"),
    ("[[grant]]\nuid = 5\n", "kernel.toml:1: grant number 1 grants nothing"),
    ("[[grant]]\nexe = \"python3\"\ncapabilities = []\n",
     "kernel.toml:2: grant.exe is an absolute executable path, not 'python3'"),
    ("[[grant]]\nuid = 5\npid = 7\ncapabilities = []\n",
     "kernel.toml:3: grant.pid is not a key of the configuration"),
    ("[limits]\nmax_frame = 10\n", "kernel.toml:2: limits.max_frame is out of range"),
    ("[limits]\npool_slots = \"many\"\n",
     "kernel.toml:2: limits.pool_slots is a whole number, not 'many'"),
    ("[limits\n", "kernel.toml: not valid TOML"),
    ("limits = 3\n", "kernel.toml:1: limits is a table: write it as [limits]"),
    ('[tcp]\nlisten = "tcp://*:7707"\n', "kernel.toml:1: tcp needs key = ..."),
    ('[tcp]\nlisten = "ipc:///tmp/k"\nkey = "/k"\n',
     "kernel.toml:2: tcp.listen is tcp://HOST:PORT"),
    ('[tcp]\nlisten = "tcp://*:1"\nkey = "kernel.key"\n',
     "kernel.toml:3: tcp.key is the absolute path of the kernel's keypair file"),
    (f'{TCP}{PEER}\nname = "build host"\nkey = "{KEY}"\n',
     "kernel.toml:5: tcp.peer.name is a name of letters, digits"),
    (f'{TCP}{PEER}\nname = "b"\nkey = "not a key"\n',
     "kernel.toml:6: tcp.peer.key is a public key: its 40 z85 characters"),
    (f'{TCP}{PEER}\nname = "b"\nkey = "{KEY}"\n{PEER}\nname = "c"\nkey = "{KEY}"\n',
     "kernel.toml:10: tcp.peer.key is another peer's key too"),
    (f'{TCP}{PEER}\nname = "b"\nkey = "{KEY}"\nuid = -1\n',
     "kernel.toml:7: tcp.peer.uid is a numeric id, not -1"),
    (f'{TCP}{PEER}\nname = "b"\nkey = "{KEY}"\nport = 1\n',
     "kernel.toml:7: tcp.peer.port is not a key of the configuration"),
    (f'{TCP}{PEER}\nkey = "{KEY}"\n', "kernel.toml:4: tcp.peer number 1 needs name = ..."),
], ids=["unknown-limit", "unknown-top", "negative-uid", "uids-not-a-list", "misspelt-capability",
        "second-grant-bad-uid", "grant-to-nobody", "grant-of-nothing", "relative-exe",
        "unknown-grant-key", "limit-out-of-range", "limit-not-int", "bad-toml",
        "table-not-a-table", "tcp-without-key", "tcp-not-tcp", "tcp-relative-key",
        "peer-bad-name", "peer-bad-key", "peer-key-twice", "peer-bad-uid", "peer-unknown-key",
        "peer-without-name"])
def test_each_mistake_names_the_file_line_and_key(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, "kernel.toml")
    assert str(info.value).startswith(error), str(info.value)


# -- ipcfw kernel --check-config / --config ----------------------------------------------------


def _ipcfw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ipcfw", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": PYTHONPATH})


@pytest.mark.process
def test_check_config_says_what_a_file_sets_or_its_first_mistake(tmp_path) -> None:
    good = tmp_path / "kernel.toml"
    good.write_text(EXAMPLE)
    checked = _ipcfw("kernel", "--check-config", str(good))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == (
        f"{good}: ok: admits the kernel's own uid, uid 1001, gid 2000; default capabilities "
        "LocalServices ReadUserData WriteUserData; 2 grants; limits: sessions_per_process 500, "
        "max_frame 65536\n")
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\n\nsesions_per_process = 5\n")
    refused = _ipcfw("kernel", "--check-config", str(bad))
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith(f"ipcfw: {bad}:3: limits.sesions_per_process is not a key")


@pytest.mark.process
def test_a_kernel_with_a_bad_config_does_not_start(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[admission]\nuids = [\"root\"]\n")
    refused = _ipcfw("kernel", "--config", str(bad), "--endpoint", f"ipc://{tmp_path}/k/kernel")
    assert refused.returncode == 2
    assert f"{bad}:2: admission.uids is a list of numeric ids" in refused.stderr
    assert not (tmp_path / "k").exists()  # stopped before it made anything
