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
from ipcfw import IpcError, KErrPermissionDenied, RSession
from ipcfw.kernelprobe import kernel_socket_exists
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
    assert (directory.st_mode & 0o7777, directory.st_gid) == (0o3770, GROUP)
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


# A child run as root that drops to argv's uid and gid; argv[3] is a path. (What it imports,
# it imports first: the interpreter's files may not be readable by the user it drops to.)
DROP = """
import os, socket, sys, time
uid, gid, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
"""

# As a member of the group the kernel is not admitting: try to take the kernel's socket file's
# place (unlink it or rename it away), as a process that then binds its own would.
REPLACER = DROP + """
try:
    os.rename(path, path + ".old")
except PermissionError:
    print("denied", flush=True)
else:
    os.rename(path + ".old", path)  # (put back: the unlink is tried on it next)
    print("renamed", flush=True)
try:
    os.unlink(path)
except PermissionError:
    print("denied", flush=True)
else:
    print("unlinked", flush=True)
"""


def test_a_group_member_cannot_remove_or_rename_the_kernels_socket(stack: Stack) -> None:
    # (2770 alone let any member of the group, admitted or not, unlink the kernel's socket and
    # bind its own in its place: a kernel of its own, granting any capability it liked; the
    # sticky bit leaves a file's removal to its owner and the directory's)
    path = stack.endpoint[len("ipc://"):]
    child = subprocess.run([sys.executable, "-c", REPLACER, str(OUTSIDER), str(GROUP), path],
                           capture_output=True, text=True, timeout=30)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["denied", "denied"]
    assert os.path.exists(path)
    with RSession.connect("echo", endpoint=stack.endpoint) as session:
        assert session.SendReceive(1, (3,)) == 3


# As a member of the group: bind a socket where the kernel's was, and keep it open.
SQUATTER = DROP + """
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
os.umask(0o007)
listener.bind(path)
listener.listen()
print("bound", flush=True)
time.sleep(60)
"""


def test_a_socket_a_group_member_put_in_the_kernels_place_is_not_taken_for_the_kernel(
        stack: Stack) -> None:
    # (while the kernel is down, its socket's name is free: a member of the group may bind
    # its own there; clients and servers must not take it for the kernel, which would let it
    # answer their Hello and grant itself any capability)
    path = stack.endpoint[len("ipc://"):]
    assert stack.kernel is not None
    stack.kernel.stop()
    assert not os.path.exists(path)
    squatter = subprocess.Popen([sys.executable, "-c", SQUATTER, str(OUTSIDER), str(GROUP), path],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == "bound\n"
        with pytest.raises(IpcError) as refused:
            kernel_socket_exists(stack.endpoint)
        assert refused.value.code == KErrPermissionDenied
        assert f"{path} belongs to uid {OUTSIDER}, not to the kernel's user (uid 0, " in str(
            refused.value)
        with pytest.raises(IpcError, match="not to the kernel's user"):
            RSession.connect("echo", endpoint=stack.endpoint)
    finally:
        squatter.kill()
        squatter.wait(10)


# As a user not in GROUP: open a kernel's directory to it, as `ipcfw kernel` does with its
# configuration's [admission] group.
OPENER = "from ipcfw.endpoint import EndpointError, ensure_private_dir\n" + DROP + """
try:
    ensure_private_dir(path, int(sys.argv[4]))
except EndpointError as error:
    print("refused", error, flush=True)
else:
    print("opened", flush=True)
"""


def test_a_group_the_kernels_user_is_not_in_is_refused_with_what_to_do() -> None:
    # (chown raised a bare PermissionError: a traceback from `ipcfw kernel`, not its "ipcfw:"
    # line and status 2)
    top = Path(tempfile.mkdtemp(prefix="ipcfw-group-"))
    path = top / "k"
    try:
        top.chmod(0o777)  # (the child's user makes its directory in it)
        child = subprocess.run([sys.executable, "-c", OPENER, str(OUTSIDER), str(OUTSIDER),
                                str(path), str(GROUP)],
                               capture_output=True, text=True, timeout=30,
                               env={**os.environ, "PYTHONPATH": PYTHONPATH})
    finally:
        if path.exists():
            path.rmdir()
        top.rmdir()
    assert child.returncode == 0, child.stderr
    assert child.stdout.startswith(
        f"refused cannot open {path} to group {GROUP} ([admission] group): ")
    assert f"uid {OUTSIDER} must be a member of that group" in child.stdout
