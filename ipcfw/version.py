"""TVersion and Symbian's version rule."""

from __future__ import annotations

from typing import NamedTuple


class TVersion(NamedTuple):
    """A server interface version (Symbian ``TVersion``); plain ``(major, minor, build)``
    tuples are accepted wherever a TVersion is.

    ::

        TVersion(1, 2, 0) == (1, 2, 0)
    """

    major: int
    minor: int
    build: int = 0


def to_version(value: object, what: str = "version") -> TVersion:
    """A TVersion from a TVersion or tuple; TypeError/ValueError naming `what` otherwise."""
    if not isinstance(value, tuple) or not 2 <= len(value) <= 3:
        raise TypeError(f"{what} must be a (major, minor, build) tuple, got {value!r}")
    version = TVersion(*value)
    limits = (127, 127, 32767)  # Symbian packs a TVersion into int8, int8, int16
    for part, limit in zip(version, limits):
        if type(part) is not int or not 0 <= part <= limit:
            raise ValueError(
                f"{what} {tuple(version)} must have major, minor 0..127, build 0..32767"
            )
    return version


def QueryVersionSupported(server: TVersion, client: TVersion) -> bool:
    """True if a server at version `server` serves a client asking for `client`.

    Symbian's rule: supported iff ``client.major < server.major`` or (equal majors and
    ``client.minor <= server.minor``); the build number is ignored.
    """
    return client[0] < server[0] or (client[0] == server[0] and client[1] <= server[1])
