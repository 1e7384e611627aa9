"""Whether a kernel listens at an endpoint, and waiting until one does: start-up that cannot race.

A client (``RSession.connect(..., wait=S)``, ``ipcfw wait``) and a server host (``ipcfw serve
--wait-kernel S``, and a host registering again after its kernel died) may start before the
kernel. They wait here: the kernel's socket file must exist and a Hello on it must be answered
(a socket file left by a kernel that was killed exists, but nobody answers). Nothing here can
ask the kernel to say when it is up (there is no kernel to ask), so the wait polls, backing off
(`delays`: 10 ms, doubling, then every 250 ms): a kernel that starts is found within a quarter
of a second, and a waiter that waits long costs a stat() four times a second.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import zmq

from . import endpoint as endpoints
from . import errors
from .protocol import PROTOCOL_VERSION, Role, Welcome, encode
from .transport import exchange, hello_message, open_socket

__all__ = ["LEAST_ANSWER", "delays", "kernel_answers", "kernel_socket_exists", "no_kernel_error",
           "wait_for_kernel", "welcome_error"]

FIRST_DELAY = 0.01
"""Seconds before the second look for a kernel; each later one waits twice as long..."""
MOST_DELAY = 0.25
"""... up to this."""
HELLO_WAIT = 1.0
"""Seconds a Hello waits for the kernel's Welcome, at most, before the next look."""
LEAST_ANSWER = 0.25
"""Seconds a kernel that is there gets to answer, even at the end of a wait: a wait of 0 looks
once, and still finds a running kernel on a loaded machine (a round trip is not instant)."""


def delays(first: float = FIRST_DELAY, most: float = MOST_DELAY) -> Iterator[float]:
    """The pauses between looks: `first`, doubling, then `most` for ever."""
    delay = first
    while True:
        yield delay
        delay = min(2 * delay, most)


def kernel_socket_exists(endpoint: str) -> bool:
    """Whether the socket file of a kernel at `endpoint` exists. ``PermissionDenied`` if this
    process may not reach it (a kernel of another user, whose configuration does not open its
    directory to this one): not mistaken for a kernel that is not there. ``PermissionDenied``
    too for a socket file that is not the kernel's user's (the directory's owner): in a
    directory opened to a group, a member of it may bind its own where the kernel's was. A tcp
    endpoint has no file: True (`kernel_answers` finds out)."""
    if endpoints.is_tcp(endpoint):
        return True
    path = endpoints.ipc_path(endpoint)
    try:
        owner = os.stat(path).st_uid
    except FileNotFoundError:
        return False
    except PermissionError:
        raise _not_admitted(endpoint, os.path.dirname(path)) from None
    if not os.access(path, os.R_OK | os.W_OK):
        raise _not_admitted(endpoint, path)
    kernel_user = os.stat(os.path.dirname(path)).st_uid  # (ensure_private_dir: the kernel's)
    if owner != kernel_user:
        raise errors.IpcError(errors.KErrPermissionDenied, (
            f"{path} belongs to uid {owner}, not to the kernel's user (uid {kernel_user}, who "
            "owns its directory): not a kernel's socket; the kernel's user should remove it"))
    return True


def _not_admitted(endpoint: str, what: str) -> errors.IpcError:
    return errors.IpcError(errors.KErrPermissionDenied, (
        f"the kernel at {endpoint} does not admit this process (uid {os.getuid()}, gid "
        f"{os.getgid()}): it may not reach {what}. A kernel admits its own user; others only "
        "if its configuration says so ([admission] in docs/security.md)"))


def welcome_error(welcome: Welcome, endpoint: str, who: str) -> errors.IpcError | None:
    """Why the kernel at `endpoint` did not admit this peer (`who`: "client", "server") by its
    `Welcome`: another protocol version (``NotSupported``, naming both), or its refusal
    (``PermissionDenied``, ``Overflow``: the kernel's reason); None if it admitted it."""
    if welcome.protocol != PROTOCOL_VERSION:
        return errors.IpcError(
            errors.KErrNotSupported,
            f"the kernel at {endpoint} speaks ipcfw protocol {welcome.protocol}, this {who} "
            f"{PROTOCOL_VERSION}: run a kernel from the same ipcfw version",
        )
    if welcome.refusal:
        return errors.IpcError(welcome.code or errors.KErrPermissionDenied,
                               f"the kernel at {endpoint} refused this {who}: {welcome.refusal}")
    return None


def kernel_answers(endpoint: str, timeout: float = HELLO_WAIT) -> bool:
    """Whether a kernel answers a Hello at `endpoint` within `timeout` seconds (False at once
    if its socket file does not exist; PermissionDenied if this process may not reach it, or
    if a kernel over tcp refuses its key)."""
    if not kernel_socket_exists(endpoint):
        return False
    context = zmq.Context()
    try:
        probe = open_socket(context, endpoint)
        return exchange(probe, endpoint, encode(hello_message(Role.SERVER)), max(0.001, timeout))
    finally:
        context.destroy(linger=0)


def wait_for_kernel(
    endpoint: str,
    timeout: float | None,
    pause: Callable[[float], bool] | None = None,
) -> bool:
    """Return True once a kernel answers at `endpoint`; False after `timeout` seconds (None:
    no limit), or as soon as `pause(seconds)` (which sleeps; default `time.sleep`) returns
    False (the waiter was stopped)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for delay in delays():
        remaining = None if deadline is None else deadline - time.monotonic()
        hello_wait = (HELLO_WAIT if remaining is None
                      else min(HELLO_WAIT, max(remaining, LEAST_ANSWER)))
        if kernel_answers(endpoint, hello_wait):
            return True
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        nap = delay if remaining is None else min(delay, remaining)
        if pause is None:
            time.sleep(nap)
        elif not pause(nap):
            return False
    return False  # (unreachable: delays() never ends)


def no_kernel_error(endpoint: str, waited: float | None = None) -> errors.IpcError:
    """``CouldNotConnect`` for a kernel that is not there: where it was looked for, how long,
    and how to start one or point at another."""
    when = f" after waiting {waited:.3g} s" if waited else ""
    return errors.IpcError(
        errors.KErrCouldNotConnect,
        f"no ipcfw kernel at {endpoint}{when}: start one with `ipcfw kernel`, or set "
        f"{endpoints.ENV_VAR} to the endpoint of a running one",
    )
