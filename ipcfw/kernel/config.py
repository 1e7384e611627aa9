"""The kernel's configuration file: admission, capability grants, limits and the tcp listener,
from TOML.

    ipcfw kernel --config /etc/ipcfw/kernel.toml
    ipcfw kernel --check-config /etc/ipcfw/kernel.toml

Every key is documented in docs/security.md; an unknown key or a bad value is a
`ConfigError` naming the file, the line and the key, raised before the kernel starts. `parse`
is pure (the text in, the configuration out); `read_config` reads a file and parses it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .. import endpoint as endpoints
from ..curve import is_public_key
from ..security import USER_CAPABILITIES, capability_names
from .limits import KernelLimits

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover (Python 3.10)
    import tomli as tomllib

__all__ = ["ConfigError", "Grant", "KernelConfig", "RemotePeer", "TcpListener", "parse",
           "read_config"]

NOBODY = 65534
"""The uid and gid of a remote peer whose [[tcp.peer]] gives none."""


class ConfigError(ValueError):
    """A configuration that cannot be used: the message names the file, line and key."""


@dataclass(frozen=True)
class Grant:
    """Capabilities for the processes that match every selector given (uid, gid, exe)."""

    capabilities: frozenset[str]
    uid: int | None = None
    gid: int | None = None
    exe: str | None = None

    def matches(self, uid: int, gid: int, exe: str) -> bool:
        return ((self.uid is None or self.uid == uid) and (self.gid is None or self.gid == gid)
                and (self.exe is None or self.exe == exe))


@dataclass(frozen=True)
class RemotePeer:
    """A key the tcp listener admits ([[tcp.peer]]): the processes that hold it are `name`'s,
    treated as `uid` and `gid`, and hold `capabilities` besides the defaults and the grants."""

    name: str
    key: bytes  # z85
    uid: int = NOBODY
    gid: int = NOBODY
    capabilities: frozenset[str] = frozenset()


@dataclass(frozen=True)
class TcpListener:
    """[tcp]: where the kernel also listens, with CURVE, and whom it admits there."""

    listen: str  # tcp://HOST:PORT
    key_file: str  # the kernel's keypair (`ipcfw keygen`)
    peers: tuple[RemotePeer, ...] = ()

    def peer_named(self, name: str) -> RemotePeer | None:
        return next((peer for peer in self.peers if peer.name == name), None)


@dataclass(frozen=True)
class KernelConfig:
    """What a configuration file says (each part's default: what the kernel does without)."""

    admit_uids: frozenset[int] = frozenset()  # besides the kernel's own uid
    admit_gids: frozenset[int] = frozenset()
    group: int | None = None  # the group that may reach the kernel's directory (None: private)
    default_capabilities: frozenset[str] = USER_CAPABILITIES
    grants: tuple[Grant, ...] = ()
    limits: KernelLimits = field(default_factory=KernelLimits)
    tcp: TcpListener | None = None

    def summary(self) -> str:
        """What the configuration sets, in one line (``ipcfw kernel --check-config``)."""
        admits = ", ".join(["the kernel's own uid"] + [f"uid {u}" for u in sorted(self.admit_uids)]
                           + [f"gid {g}" for g in sorted(self.admit_gids)])
        group = f"; directory open to gid {self.group}" if self.group is not None else ""
        changed = {f.name: getattr(self.limits, f.name) for f in fields(self.limits)
                   if getattr(self.limits, f.name) != getattr(_DEFAULT_LIMITS, f.name)}
        limits = ", ".join(f"{k} {v}" for k, v in changed.items()) or "the defaults"
        tcp = ("" if self.tcp is None else
               f"; listens on {self.tcp.listen} with CURVE for {len(self.tcp.peers)} key"
               f"{'s' if len(self.tcp.peers) != 1 else ''}")
        return (f"admits {admits}{group}; default capabilities "
                f"{' '.join(sorted(self.default_capabilities)) or 'none'}; {len(self.grants)} "
                f"grant{'s' if len(self.grants) != 1 else ''}; limits: {limits}{tcp}")

    def capabilities(self, uid: int, gid: int, exe: str, host: str = "") -> frozenset[str]:
        """What a process with these credentials holds: the defaults, every matching grant,
        and for a process on another `host` (a [[tcp.peer]]'s name) that peer's."""
        held = self.default_capabilities
        for grant in self.grants:
            if grant.matches(uid, gid, exe):
                held = held | grant.capabilities
        if host and self.tcp is not None:
            peer = self.tcp.peer_named(host)
            if peer is not None:
                held = held | peer.capabilities
        return held


# -- reading -----------------------------------------------------------------------------------

_DEFAULT_LIMITS = KernelLimits()


def read_config(path: str) -> KernelConfig:
    """`parse` the file at `path` (OSError if it cannot be read)."""
    with open(path, encoding="utf-8") as file:
        return parse(file.read(), path)


_TOP = {"admission", "capabilities", "grant", "limits", "tcp"}
_TCP = {"listen", "key", "peer"}
_PEER = {"name", "key", "uid", "gid", "capabilities"}
_PEER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ADMISSION = {"uids", "gids", "group"}
_CAPABILITIES = {"default"}
_GRANT = {"uid", "gid", "exe", "capabilities"}
_LIMITS = {f.name for f in fields(KernelLimits)}


def parse(text: str, source: str = "<config>") -> KernelConfig:
    """The configuration `text` says (read from `source`, named in errors); ConfigError for an
    unknown key, a value of the wrong type, or a limit out of range, naming where."""
    where = _Locator(text, source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    _known(data, _TOP, "", where)
    admission = _table(data, "admission", where)
    _known(admission, _ADMISSION, "admission", where)
    capabilities = _table(data, "capabilities", where)
    _known(capabilities, _CAPABILITIES, "capabilities", where)
    limits = _table(data, "limits", where)
    _known(limits, _LIMITS, "limits", where)
    grants = data.get("grant", [])
    if not isinstance(grants, list):
        raise where.error("grant", "", "is an array of tables: write each as [[grant]]")
    return KernelConfig(
        admit_uids=_ids(admission, "uids", "admission", where),
        admit_gids=_ids(admission, "gids", "admission", where),
        group=_group(admission, where),
        default_capabilities=_capabilities(capabilities, "default", "capabilities", where,
                                           USER_CAPABILITIES),
        grants=tuple(_grant(grant, index, where) for index, grant in enumerate(grants)),
        limits=_limits(limits, where),
        tcp=_tcp(data, where),
    )


class _Locator:
    """Finds the line of a key in the file's text, for error messages (tomllib gives none)."""

    def __init__(self, text: str, source: str) -> None:
        self.lines = text.splitlines()
        self.source = source

    def line_of(self, table: str, key: str, index: int = 0) -> int | None:
        header = re.compile(r"^\s*\[\[?\s*" + re.escape(table) + r"\s*\]\]?\s*(#.*)?$")
        assignment = re.compile(r"^\s*" + re.escape(key) + r"\s*=")
        in_table, seen = table == "", -1
        for number, line in enumerate(self.lines, 1):
            stripped = line.strip()
            if stripped.startswith("["):
                in_table = bool(header.match(line))
                if in_table:
                    seen += 1
                continue
            if in_table and (seen == index or table == "") and assignment.match(line):
                return number
        if not key:  # the table itself
            for number, line in enumerate(self.lines, 1):
                if header.match(line):
                    return number
        return None

    def error(self, table: str, key: str, problem: str, index: int = 0) -> ConfigError:
        name = ".".join(part for part in (table, key) if part)
        line = self.line_of(table, key, index) if key else self.line_of(table, "", index)
        at = f"{self.source}:{line}" if line else self.source
        return ConfigError(f"{at}: {name} {problem}")


def _known(table: Mapping[str, Any], allowed: set[str], name: str, where: _Locator,
           index: int = 0) -> None:
    for key in table:
        if key not in allowed:
            raise where.error(name, key, f"is not a key of the configuration (the keys of "
                                         f"{'[' + name + ']' if name else 'the file'} are: "
                                         f"{', '.join(sorted(allowed))})", index)


def _table(data: Mapping[str, Any], name: str, where: _Locator) -> Mapping[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise where.error("", name, "is a table: write it as [" + name + "]")
    return table


def _ids(table: Mapping[str, Any], key: str, name: str, where: _Locator) -> frozenset[int]:
    values = table.get(key, [])
    if not isinstance(values, list) or not all(
            type(v) is int and 0 <= v < 2**32 for v in values):
        raise where.error(name, key, f"is a list of numeric ids (0..2**32-1), not {values!r}")
    return frozenset(values)


def _group(admission: Mapping[str, Any], where: _Locator) -> int | None:
    if "group" not in admission:
        return None
    if not _is_id(admission["group"]):
        raise where.error("admission", "group", f"is a numeric gid, not {admission['group']!r}")
    return int(admission["group"])


def _capabilities(table: Mapping[str, Any], key: str, name: str, where: _Locator,
                  default: frozenset[str], index: int = 0) -> frozenset[str]:
    if key not in table:
        return default
    values = table[key]
    if not isinstance(values, list):
        raise where.error(name, key, f"is a list of capability names, not {values!r}", index)
    try:
        return capability_names(values)
    except (TypeError, ValueError) as exc:
        raise where.error(name, key, f"has a bad name: {exc}", index) from None


def _grant(grant: object, index: int, where: _Locator) -> Grant:
    if not isinstance(grant, dict):
        raise where.error("grant", "", "is an array of tables: write each as [[grant]]")
    _known(grant, _GRANT, "grant", where, index)
    if "capabilities" not in grant:
        raise where.error("grant", "", f"number {index + 1} grants nothing: give it "
                                       "capabilities = [...]", index)
    selectors: dict[str, Any] = {}
    for key, check, what in (("uid", _is_id, "a numeric uid"), ("gid", _is_id, "a numeric gid"),
                             ("exe", _is_path, "an absolute executable path")):
        if key in grant:
            if not check(grant[key]):
                raise where.error("grant", key, f"is {what}, not {grant[key]!r}", index)
            selectors[key] = grant[key]
    if not selectors:
        raise where.error("grant", "", f"number {index + 1} says to whom: give it a uid, gid "
                                       "or exe (a grant to everyone is [capabilities] default)",
                          index)
    return Grant(_capabilities(grant, "capabilities", "grant", where, frozenset(), index),
                 **selectors)


def _tcp(data: Mapping[str, Any], where: _Locator) -> TcpListener | None:
    if "tcp" not in data:
        return None
    tcp = _table(data, "tcp", where)
    _known(tcp, _TCP, "tcp", where)
    for key in ("listen", "key"):
        if key not in tcp:
            raise where.error("tcp", "", f"needs {key} = ... (see docs/security.md)")
    listen = tcp["listen"]
    try:
        endpoints.tcp_address(listen if isinstance(listen, str) else "")
    except endpoints.EndpointError:
        raise where.error("tcp", "listen", f"is tcp://HOST:PORT (an address of this host, or * "
                                           f"for all, and a port), not {listen!r}") from None
    if not _is_path(tcp["key"]):
        raise where.error("tcp", "key", "is the absolute path of the kernel's keypair file "
                                        f"(`ipcfw keygen PATH`), not {tcp['key']!r}")
    peers = tcp.get("peer", [])
    if not isinstance(peers, list):
        raise where.error("tcp.peer", "", "is an array of tables: write each as [[tcp.peer]]")
    parsed = tuple(_peer(peer, index, where) for index, peer in enumerate(peers))
    for index, peer in enumerate(parsed):
        if any(other.name == peer.name for other in parsed[:index]):
            raise where.error("tcp.peer", "name", f"{peer.name!r} names two peers", index)
        if any(other.key == peer.key for other in parsed[:index]):
            raise where.error("tcp.peer", "key", "is another peer's key too", index)
    return TcpListener(listen, tcp["key"], parsed)


def _peer(peer: object, index: int, where: _Locator) -> RemotePeer:
    if not isinstance(peer, dict):
        raise where.error("tcp.peer", "", "is an array of tables: write each as [[tcp.peer]]")
    _known(peer, _PEER, "tcp.peer", where, index)
    for key in ("name", "key"):
        if key not in peer:
            raise where.error("tcp.peer", "", f"number {index + 1} needs {key} = ...", index)
    name, key = peer["name"], peer["key"]
    if not isinstance(name, str) or not _PEER_NAME.fullmatch(name):
        raise where.error("tcp.peer", "name", "is a name of letters, digits, '_', '.' and '-' "
                                              f"(at most 64), not {name!r}", index)
    if not isinstance(key, str) or not is_public_key(key):
        raise where.error("tcp.peer", "key", "is a public key: its 40 z85 characters, as "
                                             f"`ipcfw keygen` prints it; not {key!r}", index)
    ids = {}
    for id_key in ("uid", "gid"):
        if id_key in peer:
            if not _is_id(peer[id_key]):
                raise where.error("tcp.peer", id_key, f"is a numeric id, not {peer[id_key]!r}",
                                  index)
            ids[id_key] = peer[id_key]
    capabilities = _capabilities(peer, "capabilities", "tcp.peer", where, frozenset(), index)
    return RemotePeer(name, key.encode(), capabilities=capabilities, **ids)


def _is_id(value: object) -> bool:
    return type(value) is int and 0 <= value < 2**32


def _is_path(value: object) -> bool:
    return isinstance(value, str) and value.startswith("/")


def _limits(table: Mapping[str, Any], where: _Locator) -> KernelLimits:
    for key, value in table.items():
        if type(value) is not int:
            raise where.error("limits", key, f"is a whole number, not {value!r}")
    limits = KernelLimits(**table)
    try:
        limits.check()  # (checked, not resolved: an option may still change one, and the
        return limits   # backlog derived from them is resolved after that)
    except ValueError as exc:
        key = next((k for k in table if k in str(exc)), "")
        raise where.error("limits", key, f"is out of range: {exc}") from None


