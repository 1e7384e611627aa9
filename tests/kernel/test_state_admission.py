"""Admission and capability grants in the kernel's state, without processes: who may say
Hello (the kernel's own uid, the configured uids and gids), the refusal a stranger reads, and
the capabilities each admitted process's PeerInfo carries."""

from __future__ import annotations

import logging

import pytest

from ipcfw import errors
from ipcfw.kernel.config import parse
from ipcfw.kernel.state import Admission, PeerMisbehaved, ProcessIdentity, Send
from ipcfw.protocol import (
    Connect,
    PeerInfo,
    Register,
    Role,
    Terminate,
    TerminationReason,
    Welcome,
)

from kernel_world import KPID, hello, new_state

CONFIG = parse("""
[admission]
uids = [1001]
gids = [2000]

[[grant]]
uid = 1001
capabilities = ["com.example.Billing"]
""")


def identity(pid: int, uid: int, gid: int, exe: str = "/usr/bin/python3") -> ProcessIdentity:
    return ProcessIdentity(pid, 1.0, uid, gid, exe)


def state():
    return new_state(admission=Admission(1000, CONFIG.admit_uids, CONFIG.admit_gids),
                     grants=CONFIG.capabilities)


def test_the_kernels_user_the_configured_uids_and_gids_are_admitted() -> None:
    ks = state()
    for rid, who in ((b"a" * 16, identity(10, 1000, 1000)), (b"b" * 16, identity(11, 1001, 5)),
                     (b"c" * 16, identity(12, 4242, 2000))):
        (reply,) = [a for a in hello(ks, rid, Role.CHANNEL, who) if type(a) is Send]
        assert reply.message.refusal == "" and ks.knows(rid)


def test_a_stranger_is_refused_at_hello_with_the_reason_and_never_known() -> None:
    ks = state()
    actions = hello(ks, b"x" * 16, Role.CHANNEL, identity(13, 4242, 4242))
    assert actions == [Send(b"x" * 16, Welcome(KPID, ks.max_frame, actions[0].message.protocol,
                                                "uid 4242 (gid 4242) is not admitted: this kernel "
                                                "admits uid 1000, uid 1001, gid 2000 ([admission] "
                                                "in its configuration)",
                                                errors.KErrPermissionDenied))]
    assert not ks.knows(b"x" * 16) and not ks.processes


def test_each_process_is_granted_the_defaults_and_its_grants() -> None:
    ks = state()
    hello(ks, b"s" * 16, Role.SERVER, identity(20, 1000, 1000))
    ks.receive(b"s" * 16, Register(1, "billing", 0, (1, 0, 0)))
    hello(ks, b"p" * 16, Role.CHANNEL, identity(21, 1001, 1001))
    actions = ks.receive(b"p" * 16, Connect(1, "billing", (1, 0, 0), 4, b""))
    (info,) = [a.message for a in actions if type(a.message) is PeerInfo]
    assert set(info.capabilities.split()) == CONFIG.default_capabilities | {"com.example.Billing"}
    hello(ks, b"q" * 16, Role.CHANNEL, identity(22, 1000, 1000))
    actions = ks.receive(b"q" * 16, Connect(1, "billing", (1, 0, 0), 4, b""))
    (info,) = [a.message for a in actions if type(a.message) is PeerInfo]
    assert "com.example.Billing" not in info.capabilities.split()


def test_a_uid_past_its_connections_is_refused_with_overflow_until_one_goes() -> None:
    ks = new_state(connections_per_uid=2)
    me = identity(30, 1000, 1000)
    hello(ks, b"1" * 16, Role.CHANNEL, me)
    hello(ks, b"2" * 16, Role.INBOX, me)
    (refused,) = hello(ks, b"3" * 16, Role.CHANNEL, identity(31, 1000, 1000))
    assert refused.message.code == errors.KErrOverflow and not ks.knows(b"3" * 16)
    assert refused.message.refusal == ("uid 1000 has 2 connections open, the most this kernel "
                                       "allows one uid (its limit connections_per_uid)")
    other = hello(ks, b"4" * 16, Role.CHANNEL, identity(32, 1001, 1001))  # another uid: its own
    assert ks.knows(b"4" * 16) and other
    ks.peer_gone(b"1" * 16)
    hello(ks, b"5" * 16, Role.CHANNEL, identity(31, 1000, 1000))
    assert ks.knows(b"5" * 16)


def test_a_hello_refused_as_a_second_inbox_does_not_count_against_its_uid() -> None:
    ks = new_state(connections_per_uid=2)
    me = identity(40, 1000, 1000)
    hello(ks, b"1" * 16, Role.INBOX, me)
    for _ in range(3):  # each refused (misbehaved): none is a connection the uid holds
        with pytest.raises(PeerMisbehaved, match="already has an inbox"):
            hello(ks, b"2" * 16, Role.INBOX, me)
    assert ks.connections_of_uid[1000] == 1
    hello(ks, b"3" * 16, Role.CHANNEL, me)
    assert ks.knows(b"3" * 16)
    ks.peer_gone(b"1" * 16)
    ks.peer_gone(b"3" * 16)
    assert not ks.connections_of_uid


def test_protserv_granted_by_the_configuration_lets_a_uid_register_and_end_a_protected_name(
) -> None:
    # (the configuration's grants were sent to servers in PeerInfo, but the kernel's own checks
    # of ProtServ read only protserv_uids: a [[grant]] of ProtServ did nothing for `!` names)
    ADMINISTRATOR = int(TerminationReason.ADMINISTRATOR)
    config = parse('[[grant]]\nuid = 1001\ncapabilities = ["ProtServ"]\n')
    ks = new_state(grants=config.capabilities)
    hello(ks, b"s" * 16, Role.SERVER, identity(50, 1000, 1000))
    refused = ks.receive(b"s" * 16, Register(1, "!billing", 0, (1, 0, 0)))
    assert [a.message.value for a in refused] == [errors.KErrPermissionDenied]
    hello(ks, b"t" * 16, Role.SERVER, identity(51, 1001, 1001))
    registered = ks.receive(b"t" * 16, Register(2, "!billing", 0, (1, 0, 0)))
    assert [a.message.value for a in registered] == [errors.KErrNone]
    hello(ks, b"u" * 16, Role.CHANNEL, identity(52, 1000, 1000))  # no ProtServ: may not end it
    (denied,) = ks.receive(b"u" * 16, Terminate(3, "!billing", ADMINISTRATOR))
    assert denied.message.value == errors.KErrPermissionDenied
    hello(ks, b"v" * 16, Role.CHANNEL, identity(53, 1001, 1001))
    ended = ks.receive(b"v" * 16, Terminate(4, "!billing", ADMINISTRATOR))
    assert errors.KErrPermissionDenied not in [getattr(a.message, "value", None) for a in ended]


def test_a_stranger_saying_hello_in_a_loop_is_logged_once(caplog) -> None:
    ks = state()
    with caplog.at_level(logging.WARNING, logger="ipcfw.kernel"):
        for n in range(5):
            (refused,) = hello(ks, b"x" * 16, Role.CHANNEL, identity(60 + n, 4242, 4242))
            assert refused.message.code == errors.KErrPermissionDenied  # each one refused
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "refused pid 60 (uid 4242, gid 4242, /usr/bin/python3)"]
def test_a_protected_name_needs_protserv_granted_by_configuration_or_by_uid() -> None:
    config = parse('[[grant]]\nuid = 1001\ncapabilities = ["ProtServ"]\n')
    ks = new_state(grants=config.capabilities, protserv_uids=frozenset({1002}))
    for pid, uid, expected in ((40, 1000, errors.KErrPermissionDenied), (41, 1001, 0),
                               (42, 1002, 0)):
        rid = b"%016d" % pid
        hello(ks, rid, Role.SERVER, identity(pid, uid, uid))
        (reply,) = [a.message for a in ks.receive(rid, Register(1, f"!guarded{pid}", 0,
                                                                 (1, 0, 0)))]
        assert reply.value == expected, (uid, reply)


def test_only_the_kernels_user_or_read_device_data_may_monitor() -> None:
    from ipcfw.protocol import Completed, Monitor

    config = parse('[admission]\nuids = [1001, 1002]\n'
                   '[[grant]]\nuid = 1002\ncapabilities = ["ReadDeviceData"]\n')
    ks = new_state(admission=Admission(1000, config.admit_uids, config.admit_gids),
                   grants=config.capabilities)
    for pid, uid, allowed in ((50, 1000, True), (51, 1001, False), (52, 1002, True)):
        rid = b"%016d" % pid
        hello(ks, rid, Role.CHANNEL, identity(pid, uid, uid))
        answers = [a.message for a in ks.receive(rid, Monitor(1, "", 4))
                   if type(a.message) is Completed]
        if allowed:
            assert all(a.value == 0 for a in answers), (uid, answers)
        else:
            assert [a.value for a in answers] == [errors.KErrPermissionDenied]
            assert "ReadDeviceData" in answers[0].text
