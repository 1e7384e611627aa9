"""ipcfw.kernelprobe: the back-off of a wait for a kernel, its deadline and its stop, with no
kernel and no process (a missing socket file is answered at once, without a socket)."""

from __future__ import annotations

import itertools
import time

import ipcfw
from ipcfw.kernelprobe import delays, kernel_answers, no_kernel_error, wait_for_kernel

NOWHERE = "ipc:///tmp/ipcfw-no-such-dir-for-kernelprobe/kernel"


def test_delays_double_from_10_ms_to_a_quarter_second():
    assert list(itertools.islice(delays(), 8)) == [0.01, 0.02, 0.04, 0.08, 0.16, 0.25, 0.25, 0.25]
    assert list(itertools.islice(delays(1, 3), 4)) == [1, 2, 3, 3]


def test_no_socket_file_is_no_kernel_at_once():
    started = time.monotonic()
    assert kernel_answers(NOWHERE, timeout=5) is False
    assert time.monotonic() - started < 1


def test_a_wait_backs_off_until_its_deadline():
    pauses: list[float] = []

    def pause(seconds: float) -> bool:
        pauses.append(seconds)
        time.sleep(seconds)
        return True

    started = time.monotonic()
    assert wait_for_kernel(NOWHERE, 0.2, pause) is False
    assert 0.2 <= time.monotonic() - started < 1.5
    # backing off, not spinning (the last pause is what was left of the wait: a loaded machine
    # that sleeps late leaves less, so only the first three are exact)
    assert pauses[:3] == [0.01, 0.02, 0.04]
    assert all(0 < later <= 2 * earlier for earlier, later in zip(pauses, pauses[1:]))
    assert len(pauses) <= 6 and all(p <= 0.25 for p in pauses)


def test_a_wait_ends_when_its_pause_says_stop():
    pauses: list[float] = []
    assert wait_for_kernel(NOWHERE, None, lambda s: pauses.append(s) or len(pauses) < 3) is False
    assert pauses == [0.01, 0.02, 0.04]


def test_the_error_names_the_endpoint_the_wait_and_what_to_do():
    error = no_kernel_error(NOWHERE, 2.5)
    assert isinstance(error, ipcfw.CouldNotConnect)
    assert f"no ipcfw kernel at {NOWHERE} after waiting 2.5 s" in str(error)
    assert "`ipcfw kernel`" in str(error) and "IPCFW_KERNEL" in str(error)
    assert "after waiting" not in str(no_kernel_error(NOWHERE))
