"""Accept or reject before a session exists, negotiation payloads, connect with first data."""

from __future__ import annotations

import json
import os

import pytest

import ipcfw
from ipcfw import RSession
from plugins import gate

pytestmark = pytest.mark.usefixtures("data_path")  # each test on both data paths


@pytest.fixture
def gate_server(kernel):
    return kernel.serve("plugins.gate:GateServer", "gate")


def test_accept_sees_the_client_and_answers_the_negotiation(gate_server):
    with RSession.connect("gate", (1, 0, 3), payload=b"open sesame") as session:
        assert session.NegotiationReply() == f"welcome {os.getpid()}".encode()
        buffer = bytearray(512)
        session.SendReceive(gate.ELastAccept, (buffer,))
        seen = json.loads(buffer)
    assert seen == {"pid": os.getpid(), "version": [1, 0, 3], "payload": "open sesame"}


def test_a_reject_raises_in_create_session_and_new_session_is_never_called(kernel, gate_server):
    with pytest.raises(ipcfw.PermissionDenied):
        RSession.connect("gate", payload=b"guess")
    assert kernel.statistics()["sessions"] == 0
    with RSession.connect("gate", payload=b"open sesame") as session:
        assert session.SendReceive(gate.ENewSessions) == 1  # only this accepted one


def test_payload_over_256_bytes_is_refused_before_sending(gate_server):
    with pytest.raises(ipcfw.BadArgument):
        RSession.connect("gate", payload=b"x" * 257)
    with pytest.raises(TypeError):
        RSession.connect("gate", payload="open sesame")


def test_connect_carries_the_first_request(kernel, gate_server):
    session = RSession()
    value = session.CreateSession("gate", payload=b"open sesame", first_request=(gate.EEcho, (77,)))
    assert value == 77
    assert session.SendReceive(gate.EEcho, (78,)) == 78
    session.Close()
    rejected = RSession()
    with pytest.raises(ipcfw.PermissionDenied):  # a rejected connect drops its first request
        rejected.CreateSession("gate", payload=b"no", first_request=(gate.EEcho, (1,)))
    assert kernel.statistics()["messages"] == 0
    # The first request reached the host behind the refused connect, and was expected there:
    # an ordinary refusal is not reported as a request for an unknown session.
    with RSession.connect("gate", payload=b"open sesame") as session:  # (the host has read it)
        session.SendReceive(gate.EEcho, (1,))
    assert "unknown session" not in gate_server.log()
