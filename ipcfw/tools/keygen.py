"""``ipcfw keygen PATH``: a CURVE keypair for a kernel, or for a peer on another host.

Writes PATH (the keypair, mode 0600) and PATH.pub (the public key, 0644), and prints the public
key: the kernel's goes to its peers (their ``IPCFW_KERNEL_KEY``), a peer's into the kernel's
configuration (a ``[[tcp.peer]]``'s ``key``). docs/security.md#other-hosts.
"""

from __future__ import annotations

import argparse
import sys

from ..curve import generate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="the keypair's file (PATH.pub gets the public key)")
    parser.add_argument("--force", action="store_true",
                        help="write over PATH and PATH.pub if they exist")


def run(args: argparse.Namespace) -> int:
    try:
        keys = generate(args.path, overwrite=args.force)
    except OSError as exc:
        print(f"ipcfw: {exc}", file=sys.stderr)
        return 2
    print(keys.public.decode())
    return 0
