"""The executable the kernel names for a process (ClientInfo.exe, and what `[[grant]] exe`
matches) is the one /proc says it runs, never its argv[0], which the process writes itself:
even for another user's process, whose /proc/PID/exe the kernel may not read (it then names
none). The other users are child processes that drop to them (setuid), so these tests need
root; without it they skip."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import PYTHONPATH

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(os.geteuid() != 0, reason="changing a child's uid needs root"),
]

KERNEL_USER, OTHER_USER = 4201, 4202
CLAIMED = "/usr/bin/env"  # an executable file it does not run: what it claims in its argv[0]
RUNS = "/usr/bin/sleep"  # what it runs

# Run as root, drop to argv's uid, then identify the pid in argv as the kernel's loop does.
IDENTIFIER = """
import os, sys
import psutil
from ipcfw.kernel.liveness import identify
uid, pid, other = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
print(repr(identify(f"host:{other}:{other}:{pid}").exe), flush=True)
"""


def test_another_users_process_cannot_name_its_executable_through_its_argv() -> None:
    # The impostor runs RUNS, as OTHER_USER, with argv[0] set to CLAIMED.
    impostor = subprocess.Popen([CLAIMED, "60"], executable=RUNS, user=OTHER_USER,
                                group=OTHER_USER, extra_groups=[])
    try:
        named = subprocess.run(
            [sys.executable, "-c", IDENTIFIER, str(KERNEL_USER), str(impostor.pid),
             str(OTHER_USER)],
            capture_output=True, text=True, timeout=30,
            env={**os.environ, "PYTHONPATH": PYTHONPATH},
        )
        assert named.returncode == 0, named.stderr
        assert named.stdout.strip() == "''"  # (not 'CLAIMED': its own word)
    finally:
        impostor.kill()
        impostor.wait(10)


def test_a_process_the_kernel_may_read_is_named_by_its_executable() -> None:
    from ipcfw.kernel.liveness import identify

    impostor = subprocess.Popen([CLAIMED, "60"], executable=RUNS)
    try:
        exe = identify(f"host:{os.getuid()}:{os.getgid()}:{impostor.pid}").exe
        assert exe == RUNS
    finally:
        impostor.kill()
        impostor.wait(10)
