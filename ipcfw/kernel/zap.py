"""Who may connect to the kernel's tcp listener: its ZAP handler's rules (ZeroMQ RFC 27).

libzmq asks the ZAP handler of the kernel's context about each CURVE handshake on the tcp
listener: a request of frames ``version, request id, domain, address, routing id, mechanism,
client key``. `answer` makes the reply ``version, request id, status code, status text, user
id, metadata``: 200 with the key's peer name as the user id (each frame from that connection
then carries it as ``User-Id``) if the configuration lists the key, else 400. Pure: the loop
reads the request from its ZAP socket and sends the reply back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

log = logging.getLogger("ipcfw.kernel")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks, in the listener's context
DOMAIN = "ipcfw"  # the tcp listener's ZAP domain
_VERSION = b"1.0"
_REFUSALS_LOGGED = 64  # distinct keys whose refusal is logged; the rest are only counted
_Z85 = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"


def z85(key: bytes) -> bytes:
    """A binary CURVE key (32 bytes) as the configuration writes it: z85 (ZeroMQ RFC 32)."""
    out = bytearray()
    for at in range(0, len(key) - len(key) % 4, 4):
        value = int.from_bytes(key[at:at + 4], "big")
        for power in (85**4, 85**3, 85**2, 85, 1):
            out.append(_Z85[value // power % 85])
    return bytes(out)


def error_reply(request: Sequence[bytes], text: str) -> list[bytes]:
    """The reply that refuses `request` for an error of the handler's own (500: internal)."""
    return [_VERSION, request[1] if len(request) > 1 else b"", b"500", text.encode(), b"", b""]


class ZapHandler:
    """The answers to a tcp listener's handshakes, and a log of the keys it refused.
    `names`: the name of each key admitted (z85), as the configuration's [[tcp.peer]]s say."""

    def __init__(self, names: Mapping[bytes, str]) -> None:
        self.names = names
        self.refused: dict[bytes, int] = {}  # z85 key -> refusals (the first few keys)
        self.refusals = 0

    def answer(self, request: Sequence[bytes]) -> list[bytes]:
        """The reply to one ZAP request."""
        if len(request) < 6 or request[0] != _VERSION:
            log.warning("malformed ZAP request from libzmq: %d frames", len(request))
            return error_reply(request, "malformed request")
        request_id, domain, address, mechanism = request[1], request[2], request[3], request[5]
        if domain != DOMAIN.encode() or mechanism != b"CURVE" or len(request) != 7 \
                or len(request[6]) != 32:
            return self._refuse(request_id, b"", address, "not a CURVE handshake on ipcfw's "
                                                         "tcp listener")
        key = z85(request[6])
        name = self.names.get(key)
        if name is None:
            return self._refuse(request_id, key, address, "its key is no [[tcp.peer]]'s")
        log.info("tcp peer %r (key %s) connected from %s", name, key.decode(),
                 address.decode(errors="replace"))
        return [_VERSION, request_id, b"200", b"OK", name.encode(), b""]

    def _refuse(self, request_id: bytes, key: bytes, address: bytes, why: str) -> list[bytes]:
        self.refusals += 1
        if key not in self.refused and len(self.refused) < _REFUSALS_LOGGED:
            log.warning("refused a tcp connection from %s with key %s: %s (further refusals "
                        "of this key are counted, not logged)", address.decode(errors="replace"),
                        key.decode() or "(none)", why)
        if key in self.refused or len(self.refused) < _REFUSALS_LOGGED:
            self.refused[key] = self.refused.get(key, 0) + 1
        return [_VERSION, request_id, b"400", why.encode(), b"", b""]
