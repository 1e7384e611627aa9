"""CURVE keys: the identities of a kernel and its peers on other hosts (``tcp://``).

A keypair lives in one file, written by ``ipcfw keygen PATH`` (ZeroMQ's certificate format, so
``zmq.auth.load_certificate`` reads it too): ``PATH`` holds the public and the secret key, mode
0600, and ``PATH.pub`` the public key alone, to hand to whoever must know it. A secret file that
anyone but its owner may read is refused, as ssh refuses such a private key.

A process that reaches its kernel over tcp names its keys in its environment:

* ``IPCFW_KEY``: the file of its own keypair;
* ``IPCFW_KERNEL_KEY``: the kernel's public key, as its 40 z85 characters or the path of a file
  that holds it (the kernel's ``.pub``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import stat
import tempfile
from typing import NamedTuple

import zmq

__all__ = ["KERNEL_KEY_VAR", "KEY_VAR", "CurveKeyError", "Keypair", "client_keys", "generate",
           "is_public_key", "load_keypair", "load_public_key"]

KEY_VAR = "IPCFW_KEY"
KERNEL_KEY_VAR = "IPCFW_KERNEL_KEY"

_Z85_KEY = re.compile(rb"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_KEY_LINE = re.compile(rb'^\s*(public|secret)-key\s*=\s*"([^"]*)"\s*$')


class CurveKeyError(ValueError):
    """A key that cannot be used: missing, malformed, or readable by others."""


class Keypair(NamedTuple):
    public: bytes  # z85, 40 bytes
    secret: bytes


def is_public_key(value: str | bytes) -> bool:
    """Whether `value` is a key in z85 (40 characters of ZeroMQ's alphabet)."""
    raw = value.encode() if isinstance(value, str) else value
    return bool(_Z85_KEY.fullmatch(raw))


def generate(path: str, *, overwrite: bool = False) -> Keypair:
    """Write a new keypair to `path` (mode 0600) and its public key to `path`.pub (0644); the
    keypair. An existing file is kept (FileExistsError) unless `overwrite`."""
    if not overwrite:
        for name in (path, path + ".pub"):
            if os.path.lexists(name):
                raise FileExistsError(f"{name} exists: keep it, or write over it (--force)")
    public, secret = zmq.curve_keypair()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    for name, mode, keys, what in (
            (path, 0o600, {"public": public, "secret": secret}, "secret: keep it to yourself"),
            (path + ".pub", 0o644, {"public": public}, "public: give it to the other side")):
        text = (f"# an ipcfw CURVE key, written {when} by `ipcfw keygen` ({what})\n"
                "metadata\ncurve\n"
                + "".join(f'    {kind}-key = "{key.decode()}"\n' for kind, key in keys.items()))
        _write_new_file(name, mode, text, overwrite)
    return Keypair(public, secret)


def _write_new_file(name: str, mode: int, text: str, overwrite: bool) -> None:
    """Write `text` to a file of this process's user at `name`, with `mode` whatever the
    umask. It is always a new file: never an existing one written through (whose owner,
    perhaps another user, could then read the secret) nor a symbolic link's target; with
    `overwrite`, it is made beside `name` and renamed over it."""
    if overwrite:
        fd, written = tempfile.mkstemp(prefix=".ipcfw-keygen-",
                                       dir=os.path.dirname(os.path.abspath(name)))
    else:
        fd, written = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), name
    try:
        with os.fdopen(fd, "w", encoding="ascii") as file:
            os.fchmod(fd, mode)  # (the umask may have taken bits away)
            file.write(text)
        if written != name:
            os.replace(written, name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(written)
        raise


def load_keypair(path: str) -> Keypair:
    """The keypair in the file at `path` (`generate`'s); CurveKeyError if it cannot be read,
    holds no secret key, or is open to anyone but its owner."""
    try:
        info = os.stat(path)
        with open(path, "rb") as file:
            text = file.read(8192)
    except OSError as exc:
        raise CurveKeyError(f"cannot read the key file {path}: {exc.strerror}") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise CurveKeyError(
            f"the key file {path} has mode {stat.S_IMODE(info.st_mode):o}: a secret key must be "
            f"its owner's alone (chmod 600 {path})")
    keys = _keys_in(text)
    if "secret" not in keys or "public" not in keys:
        raise CurveKeyError(f"{path} holds no keypair (write one with `ipcfw keygen {path}`)")
    if zmq.curve_public(keys["secret"]) != keys["public"]:
        raise CurveKeyError(f"{path}: its public key is not the secret key's")
    return Keypair(keys["public"], keys["secret"])


def load_public_key(value: str) -> bytes:
    """A public key given as its 40 z85 characters, or as the path of a key file."""
    if is_public_key(value):
        return value.encode()
    try:
        with open(value, "rb") as file:
            keys = _keys_in(file.read(8192))
    except OSError as exc:
        raise CurveKeyError(
            f"{value!r} is neither a public key (40 z85 characters) nor a key file that can be "
            f"read ({exc.strerror})") from None
    if "public" not in keys:
        raise CurveKeyError(f"{value} holds no public key")
    return keys["public"]


def client_keys(endpoint: str) -> tuple[Keypair, bytes]:
    """This process's keypair and its kernel's public key, from `KEY_VAR` and
    `KERNEL_KEY_VAR`, to reach the kernel at `endpoint` (a tcp:// one)."""
    own, kernel = os.environ.get(KEY_VAR), os.environ.get(KERNEL_KEY_VAR)
    if not own or not kernel:
        missing = " and ".join(v for v, given in ((KEY_VAR, own), (KERNEL_KEY_VAR, kernel))
                               if not given)
        raise CurveKeyError(
            f"the kernel at {endpoint} is reached over tcp with CURVE: set {missing} ("
            f"{KEY_VAR}: this process's keypair file, from `ipcfw keygen`; {KERNEL_KEY_VAR}: "
            "the kernel's public key or its .pub file)")
    return load_keypair(own), load_public_key(kernel)


def _keys_in(text: bytes) -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    for line in text.splitlines():
        match = _KEY_LINE.match(line)
        if match and is_public_key(match.group(2)):
            keys[match.group(1).decode()] = match.group(2)
    return keys
