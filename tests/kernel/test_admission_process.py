"""Admission through a real kernel: a kernel whose configuration opens its directory to a group
admits the uids and gids it lists, and a process of another user, in the group or not, gets
``PermissionDenied`` with the reason at once: never a hang or a silent retry. The other users
are child processes that drop to them (setuid), so these tests need root; without it they skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import PYTHONPATH, REPO
from ipcfw import KErrPermissionDenied, RSession
from ipcfw.testing import Stack

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(os.geteuid() != 0, reason="changing a child's uid needs root"),
]

GROUP = 4100  # the group the kernel's directory is opened to
MEMBER = 4101  # a uid the configuration admits by name
OUTSIDER = 4102  # a uid it does not admit

# Run as root, then drop to argv's uid and gid, then connect. Everything is imported first: the
# interpreter's own files may not be readable by the user it drops to.
CHILD = """
import os, sys
import ipcfw, ipcfw.client, ipcfw.client.runtime, ipcfw.client.inbox, ipcfw.client.connection
import ipcfw.client.direct, ipcfw.client.shm, ipcfw.kernelprobe, json, errno, array, mmap
uid, gid, endpoint = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
try:
    with ipcfw.RSession.connect("echo", endpoint=endpoint, path="kernel") as session:
        print("served", session.SendReceive(1, (5,)), flush=True)
except ipcfw.IpcError as error:
    print("refused", error.code, error, flush=True)
"""

CONFIG = f"""
[admission]
group = {GROUP}
uids = [{MEMBER}]
"""


@pytest.fixture
def stack() -> Iterator[Stack]:
    top = Path(tempfile.mkdtemp(prefix="ipcfw-admit-"))
    top.chmod(0o711)  # (others may pass through it to the kernel's directory, if it lets them)
    config = top / "kernel.toml"
    config.write_text(CONFIG)
    config.chmod(0o644)
    (top / "k").mkdir(mode=0o700)  # (the kernel opens it to the group)
    with Stack(top / "k", kernel_options=["--config", str(config)],
               env={"PYTHONPATH": PYTHONPATH}, cwd=str(REPO)) as running:
        running.serve("servers.echo:EchoServer")
        yield running
    for path in sorted(top.rglob("*"), reverse=True):
        path.unlink() if not path.is_dir() else path.rmdir()
    top.rmdir()


def as_user(stack: Stack, uid: int, gid: int) -> str:
    started = time.monotonic()
    child = subprocess.run([sys.executable, "-c", CHILD, str(uid), str(gid), stack.endpoint],
                           capture_output=True, text=True, timeout=30,
                           env={**os.environ, "PYTHONPATH": PYTHONPATH})
    assert child.returncode == 0, child.stderr
    assert time.monotonic() - started < 10  # refused at once, not after retries
    return child.stdout.strip()


def test_the_kernels_directory_is_opened_to_its_group_and_no_one_else(stack: Stack) -> None:
    directory = os.stat(os.path.dirname(stack.endpoint[len("ipc://"):]))
    assert (directory.st_mode & 0o7777, directory.st_gid) == (0o2770, GROUP)
    socket = os.stat(stack.endpoint[len("ipc://"):])
    assert (socket.st_mode & 0o777, socket.st_gid) == (0o770, GROUP)


def test_an_admitted_uid_in_the_group_is_served(stack: Stack) -> None:
    assert as_user(stack, MEMBER, GROUP) == "served 5"


def test_a_uid_in_the_group_but_not_admitted_is_refused_at_hello_with_the_reason(
        stack: Stack) -> None:
    answer = as_user(stack, OUTSIDER, GROUP)
    assert answer.startswith(f"refused {KErrPermissionDenied} ")
    assert f"uid {OUTSIDER} (gid {GROUP}) is not admitted: this kernel admits uid 0, " \
           f"uid {MEMBER}" in answer


def test_a_user_outside_the_group_is_refused_at_the_directory(stack: Stack) -> None:
    answer = as_user(stack, OUTSIDER, OUTSIDER)
    assert answer.startswith(f"refused {KErrPermissionDenied} ")
    assert f"does not admit this process (uid {OUTSIDER}, gid {OUTSIDER})" in answer


def test_the_kernels_own_user_is_still_served(stack: Stack) -> None:
    with RSession.connect("echo", endpoint=stack.endpoint) as session:
        assert session.SendReceive(1, (9,)) == 9
