"""Unpredictable zmq auto routing ids for the kernel's ROUTER (DESIGN.md section 5, identity).

A peer that connects without a routing id of its own gets one from libzmq's ROUTER: ``0x00``
and a 32-bit counter (router.cpp, `identify_peer`). The counter starts at libzmq's
`generate_random()`, two calls of the C library's `rand()`, which libzmq (4.3.5) never seeds: in
a fresh process, the first ROUTER's first auto id is the same every time (``b"\\x00k\\x8bEg"``
with glibc, whose unseeded `rand()` starts 0x6b8b4567). libzmq asserts that an auto id is not
already taken (`add_out_pipe`: "Assertion failed: ok (src/socket_base.cpp:2113)"), so a peer that
claims that id, followed by any peer without one, aborted the kernel: any process that may
connect (even one the kernel then refuses at Hello: libzmq takes the id at the handshake) could
kill it in two connects.

`seed_auto_ids()` seeds `rand()` from the OS's random source just before the kernel makes each
ROUTER, so its counter starts where no other process can know. What is left is guessing: a
process that holds N connections on guessed ids while M peers connect without one aborts the
kernel with a chance of about N * M / 2**32 (1,000 and 1,000: 1 in 4,000), and it must be able
to connect to the kernel at all (the socket's directory keeps others out; over tcp, CURVE).
ipcfw's own peers always set a random 128-bit routing id, so they never take an auto id.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("ipcfw.kernel")


def seed_auto_ids() -> bool:
    """Seed the C library's `rand()` (libzmq's source for its ROUTER's first auto routing id)
    with 32 random bits; False, with a warning, where there is no `srand` to call."""
    try:
        srand = ctypes.CDLL(None).srand
    except (OSError, AttributeError):
        log.warning("cannot seed the C library's rand(): zmq's auto routing ids stay "
                    "predictable, and a peer that claims the next one can abort the kernel")
        return False
    srand.argtypes = [ctypes.c_uint]
    srand.restype = None
    srand(int.from_bytes(os.urandom(4), "little"))
    return True
