"""The kernel's ZAP handler, without processes: a listed key is admitted under its name, and
anything else refused (and logged once per key)."""

from __future__ import annotations

import logging
import os

import pytest
import zmq.utils.z85

from ipcfw.kernel.zap import DOMAIN, ZapHandler, z85

KEY = os.urandom(32)


def request(key: bytes = KEY, domain: bytes = DOMAIN.encode(), mechanism: bytes = b"CURVE",
            request_id: bytes = b"7") -> list[bytes]:
    return [b"1.0", request_id, domain, b"10.0.0.9", b"rid", mechanism, key]


def test_z85_is_zeromqs() -> None:
    for _ in range(50):
        key = os.urandom(32)
        assert z85(key) == zmq.utils.z85.encode(key)


def test_a_listed_key_is_admitted_under_its_name() -> None:
    handler = ZapHandler({z85(KEY): "builder"})
    assert handler.answer(request()) == [b"1.0", b"7", b"200", b"OK", b"builder", b""]


@pytest.mark.parametrize("changed", [
    {"key": os.urandom(32)}, {"domain": b"other"}, {"mechanism": b"PLAIN"}, {"key": b"short"},
])
def test_anything_else_is_refused(changed: dict) -> None:
    handler = ZapHandler({z85(KEY): "builder"})
    reply = handler.answer(request(**changed))
    assert reply[:3] == [b"1.0", b"7", b"400"] and reply[4] == b""
    assert handler.refusals == 1


def test_a_malformed_request_is_answered_not_raised() -> None:
    assert ZapHandler({}).answer([b"0.9"])[2] == b"500"


def test_refusals_are_logged_once_per_key(caplog: pytest.LogCaptureFixture) -> None:
    handler = ZapHandler({})
    with caplog.at_level(logging.WARNING, "ipcfw.kernel"):
        for _ in range(5):
            handler.answer(request())
    assert len(caplog.records) == 1 and z85(KEY).decode() in caplog.text
    assert handler.refusals == 5 and handler.refused == {z85(KEY): 5}
