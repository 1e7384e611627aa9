"""Peers over tcp in the kernel's state, without processes: a process on another host is who
its key's [[tcp.peer]] says, is admitted by its key (not by uid), is watched by its
connections (no pidfd), and every session it uses takes the kernel path."""

from __future__ import annotations

import pytest

from ipcfw import errors
from ipcfw.kernel.config import parse
from ipcfw.kernel.liveness import UnknownPeer, remote_identity
from ipcfw.kernel.state import Admission, ProcessIdentity, Send, Watch
from ipcfw.protocol import (
    PROTOCOL_VERSION,
    Admit,
    Completed,
    Connect,
    Connected,
    Hello,
    Join,
    Negotiated,
    Open,
    Path,
    PeerInfo,
    Register,
    Role,
    Share,
    Shared,
)

from kernel_world import CLI, SRV, new_state, numbered_tokens, sends, start_client

KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
CONFIG = parse(f"""
[tcp]
listen = "tcp://127.0.0.1:7707"
key = "/etc/ipcfw/kernel.key"

[[tcp.peer]]
name = "builder"
key = "{KEY}"
uid = 4242
gid = 77
capabilities = ["ReadDeviceData"]
""")
assert CONFIG.tcp is not None
LISTENER = CONFIG.tcp
SOCKET = "/run/ipcfw-test/d-0123456789ab"
REMOTE = remote_identity(LISTENER, "builder", Hello(Role.CHANNEL, PROTOCOL_VERSION, 31, 1_700_000))
R1, RIN = b"remote-chan", b"remote-inbox"


def world():
    state = new_state(new_token=numbered_tokens(), grants=CONFIG.capabilities,
                      admission=Admission(1000))  # (admits uid 1000 alone, over ipc)
    state.hello(b"srv", SRV, Hello(Role.SERVER, PROTOCOL_VERSION))
    state.receive(b"srv", Register(900, "Echo", 2, (1, 0, 0), SOCKET))
    return state


def remote_hello(state, rid: bytes = R1, role: Role = Role.CHANNEL) -> list:
    return state.hello(rid, REMOTE, Hello(role, PROTOCOL_VERSION, 31, 1_700_000))


def test_a_remote_identity_is_its_keys_as_configured_and_its_own_pid() -> None:
    assert REMOTE == ProcessIdentity(31, 1_700.0, 4242, 77, "", "builder")
    assert REMOTE.key == (31, 1_700.0, "builder")
    with pytest.raises(UnknownPeer, match="without an admitted key"):
        remote_identity(LISTENER, "stranger", Hello(Role.CHANNEL, PROTOCOL_VERSION))


def test_a_remote_peer_is_admitted_by_its_key_not_its_uid_and_is_not_watched_by_pid() -> None:
    state = world()
    actions = remote_hello(state)
    assert [type(a) for a in actions] == [Send]  # (no Watch: its heartbeats tell)
    assert actions[0].message.refusal == ""
    # A local process of uid 4242 is refused: the uid admits only the key's processes.
    local = ProcessIdentity(55, 1.0, 4242, 77, "/usr/bin/python3")
    refused = state.hello(b"local", local, Hello(Role.CHANNEL, PROTOCOL_VERSION))
    assert "uid 4242 (gid 77) is not admitted" in refused[0].message.refusal


def test_a_local_hello_is_the_transports_word_not_the_pid_it_claims() -> None:
    state = world()
    actions = state.hello(b"c", CLI, Hello(Role.CHANNEL, PROTOCOL_VERSION, 1, 42))
    assert Watch(CLI) in actions
    assert state.peers[b"c"].process.identity == CLI


def test_a_remote_server_may_not_offer_a_direct_socket() -> None:
    state = world()
    remote_hello(state, b"rsrv", Role.SERVER)
    assert state.receive(b"rsrv", Register(1, "Far", 0, (1, 0, 0), SOCKET + "x")) == [
        Send(b"rsrv", Completed(1, errors.KErrNotSupported, ()))]
    assert state.receive(b"rsrv", Register(2, "Far", 0, (1, 0, 0))) == [
        Send(b"rsrv", Completed(2, errors.KErrNone, ()))]


def test_a_remote_client_asking_for_the_direct_path_gets_the_kernel_path() -> None:
    state = world()
    remote_hello(state)
    remote_hello(state, RIN, Role.INBOX)
    actions = state.receive(R1, Connect(1, "Echo", (1, 0, 0), 4, b"", (), Path.DIRECT))
    info = sends(actions, b"srv", PeerInfo)[0]
    assert (info.uid, info.gid, info.exe) == (4242, 77, "")
    assert "ReadDeviceData" in info.capabilities.split()
    new = [a.message for a in actions if type(a) is Send and hasattr(a.message, "ticket")][0]
    assert new.ticket == b""
    assert state.statistics()["sessions_direct"] == 0
    answer = state.receive(b"srv", Negotiated(new.msg_id, errors.KErrNone, b""))
    assert answer == [Send(R1, Connected(1, errors.KErrNone, new.handle, b""))]


def shared_direct_session(state) -> tuple[int, bytes]:
    """A local client's direct session with Echo, shared (ShareAny): its handle and token."""
    start_client(state)
    actions = state.receive(b"chan-1a", Connect(1, "Echo", (1, 0, 0), 4, b"", (), Path.DIRECT))
    new = [a.message for a in actions if type(a) is Send and hasattr(a.message, "ticket")][0]
    state.receive(b"srv", Negotiated(new.msg_id, errors.KErrNone, b""))
    (shared,) = state.receive(b"chan-1a", Share(2, new.handle, 2))
    assert type(shared.message) is Shared
    return new.handle, shared.message.token


def test_a_remote_process_opening_a_shared_direct_session_is_not_sent_the_socket() -> None:
    state = world()
    handle, token = shared_direct_session(state)
    remote_hello(state)
    (opened,) = [a for a in state.receive(R1, Open(3, token)) if a.rid == R1]
    assert opened.message == Connected(3, errors.KErrNone, handle, b"", "")


def test_a_remote_process_joining_a_shared_direct_session_gets_no_ticket() -> None:
    # A Join is a thread's move to the direct path: for a process on another host the kernel
    # answers it as for a kernel-path session (no Admit, no ticket, no socket), whatever the
    # session's creator took (rule 16).
    state = world()
    handle, token = shared_direct_session(state)
    remote_hello(state)
    state.receive(R1, Open(3, token))
    admitted = state.statistics()["admitted"]
    joined = state.receive(R1, Join(4, handle))
    assert not sends(joined, b"srv", Admit)
    assert joined == [Send(R1, Connected(4, errors.KErrNone, handle, b""))]
    assert state.statistics()["admitted"] == admitted
