"""Where the kernel listens: the default endpoint, `IPCFW_KERNEL`, and the private runtime
directory.

The default endpoint is ``ipc://<runtime dir>/kernel`` where the runtime directory is
``$XDG_RUNTIME_DIR/ipcfw`` or, without XDG, ``/tmp/ipcfw-<uid>``. The directory is created 0700
and must be owned by the current user: the socket's directory is the security boundary (any
process that can connect can speak to the kernel), so a directory someone else prepared is
refused rather than used.
"""

from __future__ import annotations

import os
import stat

ENV_VAR = "IPCFW_KERNEL"
IPC_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1; zmq.IPC_PATH_MAX_LEN


class EndpointError(ValueError):
    """The endpoint cannot be used; the message says why and what to do."""


def runtime_dir() -> str:
    """The private directory that holds the default kernel socket (not created here)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "ipcfw")
    return f"/tmp/ipcfw-{os.getuid()}"


def default_endpoint() -> str:
    return f"ipc://{runtime_dir()}/kernel"


def resolve(endpoint: str | None = None) -> str:
    """The endpoint to use: the argument, else $IPCFW_KERNEL, else the default. A kernel on
    another host is ``tcp://HOST:PORT`` (reached with CURVE: `ipcfw.curve`)."""
    chosen = endpoint or os.environ.get(ENV_VAR) or default_endpoint()
    if is_tcp(chosen):
        tcp_address(chosen)  # validates
    else:
        ipc_path(chosen)
    return chosen


def is_tcp(endpoint: str) -> bool:
    """Whether `endpoint` is a kernel's tcp listener (on this host or another)."""
    return endpoint.startswith("tcp://")


def tcp_address(endpoint: str) -> tuple[str, int]:
    """(host, port) of a ``tcp://HOST:PORT`` endpoint; EndpointError for anything else."""
    host, colon, port = endpoint[len("tcp://"):].rpartition(":")
    if not endpoint.startswith("tcp://") or not colon or not host or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise EndpointError(
            f"endpoint {endpoint!r} is not tcp://HOST:PORT (a host name or address, and a port "
            "from 1 to 65535)")
    return host, int(port)


def ipc_path(endpoint: str) -> str:
    """The filesystem path of an ``ipc://`` endpoint; raise EndpointError for anything else."""
    if not endpoint.startswith("ipc://"):
        raise EndpointError(
            f"endpoint {endpoint!r} is not ipc://: a kernel listens on a Unix socket "
            "(ipc:///dir/name), where it reads each peer's credentials, and over tcp only with "
            "CURVE, as its configuration's [tcp] says"
        )
    path = endpoint[len("ipc://") :]
    if not path.startswith("/"):
        raise EndpointError(f"endpoint {endpoint!r} needs an absolute path (ipc:///dir/name)")
    if len(path) > IPC_PATH_MAX:
        raise EndpointError(
            f"endpoint path {path!r} has {len(path)} characters; ipc paths allow {IPC_PATH_MAX}"
        )
    return path


def in_kernel_dir(endpoint: str, path: str) -> bool:
    """Whether `path` (a server's direct socket, as the kernel named it) lies directly in the
    directory of the kernel's socket at `endpoint`: the private directory, the boundary."""
    if not os.path.isabs(path):
        return False
    directory = os.path.dirname(os.path.normpath(ipc_path(endpoint)))
    return os.path.dirname(os.path.normpath(path)) == directory


def ensure_private_dir(path: str, group: int | None = None) -> None:
    """Create `path` 0700 if missing; refuse one not owned by us or open to others. With a
    `group` (a kernel whose configuration admits others): the directory is that group's too,
    mode 3770 (set-group-id: the sockets made in it are the group's; sticky: only a file's
    owner, or the directory's, may remove or rename it, so no member of the group can put a
    socket of its own in the place of the kernel's or a server's), and still closed to
    everyone else."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise EndpointError(f"{path} exists and is not a directory")
    if info.st_uid != os.getuid():
        raise EndpointError(f"{path} is owned by uid {info.st_uid}, not by us ({os.getuid()})")
    if group is not None:
        try:
            os.chown(path, -1, group)
            os.chmod(path, 0o3770)
        except OSError as exc:
            raise EndpointError(
                f"cannot open {path} to group {group} ([admission] group): {exc.strerror}; "
                f"the kernel's uid {os.getuid()} must be a member of that group"
            ) from None
        return
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise EndpointError(
            f"{path} has mode {stat.S_IMODE(info.st_mode):o}; it must be private (0700)"
        )
