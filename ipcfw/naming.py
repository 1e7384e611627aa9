"""Server names: the syntax rule (DESIGN.md section 3) and the case-insensitive lookup key.

A server name is 1..80 printable ASCII characters (0x20..0x7e) without ``*``, ``?`` or ``:``.
Names are unique and looked up case-insensitively. A name starting with ``!`` is protected:
only a process the kernel's configuration grants ``ProtServ`` may register it.
"""

from __future__ import annotations

MAX_SERVER_NAME = 80
PROTECTED_PREFIX = "!"
_FORBIDDEN = frozenset("*?:")


def name_problem(name: object) -> str | None:
    """Return why `name` is not a valid server name, or None if it is valid."""
    if not isinstance(name, str):
        return f"a server name must be a str, not {type(name).__name__}"
    if not 1 <= len(name) <= MAX_SERVER_NAME:
        return f"a server name must be 1..{MAX_SERVER_NAME} characters, got {len(name)}"
    for char in name:
        if not " " <= char <= "~" or char in _FORBIDDEN:
            return f"server name {name!r} contains {char!r} (printable ASCII without * ? :)"
    return None


def not_registered(name: str) -> str:
    """How the kernel's refusal of a connect to an unregistered `name` begins (its text goes
    on with the closest registered names): what tells a client that the kernel refused, not
    the server (``RSession.connect(wait=)`` waits again only then)."""
    return f"no server is registered under {name!r}"


def lookup_key(name: str) -> str:
    """The key under which `name` is registered and found (case-insensitive)."""
    return name.casefold()


def is_protected(name: str) -> bool:
    return name.startswith(PROTECTED_PREFIX)
