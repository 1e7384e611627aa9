"""Capabilities and security policies: what a process holds, and what a server asks of it.

Symbian's platform security, as ipcfw has it. A **capability** is a name: one of Symbian's
(`CAPABILITIES`: ``ReadUserData``, ``ProtServ``, ...) or a custom one of your own
(``"com.example.Billing"``). The kernel grants capabilities to each process it admits; a
server never takes a client's word for them: ``RMessage.HasCapability`` reads what the kernel
sent about the client (see docs/security.md for who gets what).

A `TSecurityPolicy` is what one check asks (Symbian's ``TSecurityPolicy``): always pass,
always fail, all of up to 7 capabilities, or a secure id or a vendor id with up to 3
capabilities. `TSecurityPolicy.missing` says what a client lacks, in words for its error.

Pure: no I/O; the kernel and the server's policy (``ipcfw.server.policy``) use it alike.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "CAPABILITIES",
    "USER_CAPABILITIES",
    "MAX_CAPABILITY",
    "TSecurityPolicy",
    "capability_name",
    "capability_names",
]

#: Symbian's capabilities, by name.
CAPABILITIES = (
    "TCB", "CommDD", "PowerMgmt", "MultimediaDD", "ReadDeviceData", "WriteDeviceData", "DRM",
    "TrustedUI", "ProtServ", "DiskAdmin", "NetworkControl", "AllFiles", "SwEvent",
    "NetworkServices", "LocalServices", "ReadUserData", "WriteUserData", "Location",
    "SurroundingsDD", "UserEnvironment",
)
#: The capabilities Symbian lets a user grant an application: what the kernel grants every
#: process it admits, unless its configuration says otherwise.
USER_CAPABILITIES = frozenset({
    "LocalServices", "Location", "NetworkServices", "ReadUserData", "UserEnvironment",
    "WriteUserData",
})
#: Longest capability name.
MAX_CAPABILITY = 64
_CUSTOM = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
_BY_LOWER = {name.lower(): name for name in CAPABILITIES}


def capability_name(name: object) -> str:
    """`name` checked: a Symbian capability (spelt as Symbian does), or a custom name (a letter,
    then letters, digits, ``_ . -``; at most `MAX_CAPABILITY` characters). ValueError naming
    what is wrong, and the right spelling of a Symbian name in the wrong case."""
    if not isinstance(name, str):
        raise TypeError(f"a capability is a name (str), not {type(name).__name__}: {name!r}")
    if name in CAPABILITIES:
        return name
    known = _BY_LOWER.get(name.lower())
    if known is not None:
        raise ValueError(f"capability {name!r}: Symbian's is spelt {known!r}")
    if len(name) > MAX_CAPABILITY or not _CUSTOM.match(name):
        raise ValueError(f"capability {name!r}: a name is a letter, then letters, digits, "
                         f"'_', '.' or '-', at most {MAX_CAPABILITY} characters")
    return name


def capability_names(names: Iterable[object]) -> frozenset[str]:
    """`capability_name` of each of `names`, as a set."""
    if isinstance(names, str):
        raise TypeError(f"capabilities are a collection of names, not one str: {names!r}")
    return frozenset(capability_name(name) for name in names)


class PolicyKind(enum.Enum):
    PASS = "always pass"
    FAIL = "always fail"
    CAPABILITIES = "capabilities"
    SECURE_ID = "secure id"
    VENDOR_ID = "vendor id"


@dataclass(frozen=True)
class TSecurityPolicy:
    """One security check (Symbian's ``TSecurityPolicy``). Make it with
    ``TSecurityPolicy("ReadUserData", ...)`` (all of up to 7 capabilities),
    ``TSecurityPolicy.secure_id(sid, *caps)`` or ``.vendor_id(vid, *caps)`` (up to 3 more),
    ``TSecurityPolicy.always_pass()`` or ``.always_fail()``."""

    kind: PolicyKind
    capabilities: frozenset[str]
    identity: int | None

    def __init__(self, *capabilities: str, kind: PolicyKind = PolicyKind.CAPABILITIES,
                 identity: int | None = None) -> None:
        names = capability_names(capabilities)
        most = 7 if kind is PolicyKind.CAPABILITIES else 3
        if kind in (PolicyKind.PASS, PolicyKind.FAIL):
            most = 0
        if len(names) > most:
            raise ValueError(f"a {kind.value} policy takes at most {most} capabilities, "
                             f"not {len(names)}: {sorted(names)}")
        if (identity is None) != (kind not in (PolicyKind.SECURE_ID, PolicyKind.VENDOR_ID)):
            raise ValueError(f"a {kind.value} policy: make it with TSecurityPolicy.secure_id or "
                             ".vendor_id (an identity), or with capabilities alone")
        if identity is not None and (type(identity) is not int or not 0 <= identity < 2**32):
            raise ValueError(f"a {kind.value} is an unsigned 32-bit int, not {identity!r}")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "capabilities", names)
        object.__setattr__(self, "identity", identity)

    @classmethod
    def always_pass(cls) -> TSecurityPolicy:
        return cls(kind=PolicyKind.PASS)

    @classmethod
    def always_fail(cls) -> TSecurityPolicy:
        return cls(kind=PolicyKind.FAIL)

    @classmethod
    def secure_id(cls, sid: int, *capabilities: str) -> TSecurityPolicy:
        return cls(*capabilities, kind=PolicyKind.SECURE_ID, identity=sid)

    @classmethod
    def vendor_id(cls, vid: int, *capabilities: str) -> TSecurityPolicy:
        return cls(*capabilities, kind=PolicyKind.VENDOR_ID, identity=vid)

    def missing(self, capabilities: frozenset[str], secure_id: int, vendor_id: int) -> str | None:
        """What a process with `capabilities`, `secure_id` and `vendor_id` lacks to pass, in
        words ("capability WriteUserData"); None if it passes."""
        if self.kind is PolicyKind.PASS:
            return None
        if self.kind is PolicyKind.FAIL:
            return "nothing can pass this policy (always fail)"
        if self.kind is PolicyKind.SECURE_ID and secure_id != self.identity:
            return f"secure id {self.identity} (it has {secure_id})"
        if self.kind is PolicyKind.VENDOR_ID and vendor_id != self.identity:
            return f"vendor id {self.identity} (it has {vendor_id})"
        lacking = sorted(self.capabilities - capabilities)
        if not lacking:
            return None
        return ("capability " if len(lacking) == 1 else "capabilities ") + ", ".join(lacking)

    def __repr__(self) -> str:
        caps = ", ".join(repr(c) for c in sorted(self.capabilities))
        if self.kind is PolicyKind.PASS:
            return "TSecurityPolicy.always_pass()"
        if self.kind is PolicyKind.FAIL:
            return "TSecurityPolicy.always_fail()"
        if self.kind is PolicyKind.CAPABILITIES:
            return f"TSecurityPolicy({caps})"
        maker = "secure_id" if self.kind is PolicyKind.SECURE_ID else "vendor_id"
        return f"TSecurityPolicy.{maker}({self.identity}{', ' if caps else ''}{caps})"
