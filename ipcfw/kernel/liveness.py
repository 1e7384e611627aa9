"""Process identity and death, turned into inputs for the kernel's state.

Two signals tell the kernel a peer is gone:

* a pidfd per peer process (`os.pidfd_open`), polled with the ROUTER: it becomes readable about
  a millisecond after the process exits or is SIGKILLed, and it is immune to pid reuse;
* the ROUTER's monitor socket: `EVENT_DISCONNECTED` carries the fd of the connection that closed,
  which the loop maps back to a routing id (a client thread's socket closing when it ends).

`identify` builds a `ProcessIdentity` from the transport's ``Peer-Address`` (SO_PEERCRED:
``host:uid:gid:pid``), never from anything the peer says, and keys it by ``(pid, create_time)``.

A peer over tcp has no credentials the kernel can read: `remote_identity` gives it those the
configuration gives its CURVE key (named by the kernel's ZAP handler in ``User-Id``). Only the
pid and start time, which tell that key's processes apart, are the peer's word. No pidfd
watches it: its connections' heartbeats do.
"""

from __future__ import annotations

import logging
import os

import psutil

from ..protocol import Hello
from .config import TcpListener
from .tables import ProcessIdentity, ProcessKey

log = logging.getLogger(__name__)


class UnknownPeer(Exception):
    """The transport gave no usable credentials, or the process is already gone."""


def parse_peer_address(address: str | None) -> tuple[int, int, int]:
    """(uid, gid, pid) from an ipc ``Peer-Address`` of the form ``host:uid:gid:pid``."""
    parts = (address or "").split(":")
    if len(parts) != 4:
        raise UnknownPeer(f"peer address {address!r} carries no credentials (not ipc://?)")
    try:
        return int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        raise UnknownPeer(f"peer address {address!r} is malformed") from None


def identify(address: str | None) -> ProcessIdentity:
    """The identity of the process behind a connection, from its ``Peer-Address``."""
    uid, gid, pid = parse_peer_address(address)
    try:
        process = psutil.Process(pid)
        create_time = process.create_time()
    except psutil.Error as exc:
        raise UnknownPeer(f"pid {pid} vanished before it could be identified ({exc})") from None
    except OSError as exc:  # EMFILE and friends: refuse the peer, keep the kernel
        raise UnknownPeer(f"pid {pid} could not be identified ({exc})") from None
    return ProcessIdentity(pid, create_time, uid, gid, executable(pid))


def remote_identity(listener: TcpListener, user_id: str | None, hello: Hello) -> ProcessIdentity:
    """The identity of a process over tcp whose key the ZAP handler named `user_id`."""
    peer = listener.peer_named(user_id or "")
    if peer is None:
        raise UnknownPeer(f"a tcp connection without an admitted key (User-Id {user_id!r})")
    return ProcessIdentity(hello.pid, hello.started / 1000, peer.uid, peer.gid, "", peer.name)


def executable(pid: int) -> str:
    """The executable `pid` runs, as /proc/PID/exe says; "" if this process may not read it (a
    process of another user, to a kernel without the privilege) or it has none (a zombie).
    Never guessed from the process's argv[0], as ``psutil.Process.exe`` does when it may not
    read the link: the process writes its argv itself, and capabilities are granted by it."""
    try:
        path = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""
    if path.endswith(" (deleted)") and not os.path.exists(path):
        path = path[: -len(" (deleted)")]  # (replaced since it started: the path it ran)
    return path


class ProcessWatcher:
    """One pidfd per watched process; the loop polls `fds()` and reports readable ones."""

    def __init__(self) -> None:
        self._fd_of: dict[ProcessKey, int] = {}
        self._key_of: dict[int, ProcessKey] = {}

    def watch(self, identity: ProcessIdentity) -> int | None:
        """Open a pidfd for `identity`; return it, or None if the process is already gone."""
        try:
            fd = os.pidfd_open(identity.pid)
        except ProcessLookupError:
            return None
        except OSError as exc:  # out of file descriptors: unwatched, the monitor still sees it
            log.error("cannot watch pid %d: %s", identity.pid, exc)
            return -1
        if not _same_process(identity):
            os.close(fd)  # the pid was reused between identification and now
            return None
        self._fd_of[identity.key] = fd
        self._key_of[fd] = identity.key
        return fd

    def unwatch(self, key: ProcessKey) -> int | None:
        """Stop watching; return the fd that was closed (for the poller), if any."""
        fd = self._fd_of.pop(key, None)
        if fd is not None:
            del self._key_of[fd]
            os.close(fd)
        return fd

    def key_of(self, fd: int) -> ProcessKey | None:
        return self._key_of.get(fd)

    def close(self) -> None:
        for key in list(self._fd_of):
            self.unwatch(key)


def _same_process(identity: ProcessIdentity) -> bool:
    try:
        return psutil.Process(identity.pid).create_time() == identity.create_time
    except (psutil.Error, OSError):
        return False
