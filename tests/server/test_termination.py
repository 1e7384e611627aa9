"""Termination with a reason and deregistration (seed 002)."""

from __future__ import annotations

import threading
import time

import pytest

import ipcfw
from ipcfw import RSession, ServerHost, TerminationReason, TRequestStatus
from conftest import wait_until
from plugins import terminable
from plugins.terminable import TerminableServer

pytestmark = pytest.mark.usefixtures("data_path")  # each test on both data paths


def test_termination_refuses_new_work_and_ends_if_the_server_dies(kernel):
    server = kernel.serve("plugins.terminable:TerminableServer", "terminable")
    session = RSession.connect("terminable")
    held = [TRequestStatus() for _ in range(3)]
    for tag, status in enumerate(held):
        session.SendReceive(terminable.EHold, (tag,), status)
    assert session.SendReceive(terminable.EEcho, (1,)) == 1
    done = threading.Event()
    admin = threading.Thread(target=lambda: (ipcfw.terminate_server("terminable"), done.set()))
    admin.start()
    wait_until(lambda: "ADMINISTRATOR" in server.log(), what="the termination indication")
    with pytest.raises(ipcfw.ServerTerminated):  # no new request is delivered
        session.SendReceive(terminable.EEcho, (2,))
    with pytest.raises(ipcfw.ServerTerminated):  # new connects are refused
        RSession.connect("terminable")
    assert not done.wait(0.3)  # termination waits for the outstanding messages
    assert all(s.Int() == ipcfw.KRequestPending for s in held)
    server.kill()  # a server that never completes them: its death ends the termination too
    admin.join(10)
    assert done.is_set()
    assert all(s.Wait(5) == ipcfw.KErrServerTerminated for s in held)
    session.Close()


def test_termination_waits_for_held_messages_and_frees_the_name(kernel):
    host = ServerHost(TerminableServer(), kernel.endpoint)
    host.server.host = host
    ready = threading.Event()
    loop = threading.Thread(target=host.run, args=(ready,), name="terminable-host")
    loop.start()
    assert ready.wait(10)
    session = RSession.connect("terminable")
    held = TRequestStatus()
    session.SendReceive(terminable.EHold, (7,), held)
    assert session.SendReceive(terminable.EEcho, (1,)) == 1
    finished: list[float] = []
    admin = threading.Thread(
        target=lambda: (ipcfw.terminate_server("terminable"), finished.append(time.monotonic()))
    )
    admin.start()
    wait_until(lambda: host.server.indications, what="the indication")
    reason, error = host.server.indications[0].split(",", 1)
    # no deadlock: a clear error
    assert reason == "ADMINISTRATOR" and "TerminateIndication" in error
    assert not finished
    completed_at = time.monotonic()
    host.server.held.pop(7).Complete(70)  # the held message completes after the indication...
    assert held.Wait(5) == 70  # ...and reaches its client
    admin.join(10)
    assert finished and finished[0] >= completed_at  # termination returned only after it
    loop.join(10)
    assert not loop.is_alive()  # the host stopped once deregistered
    assert len(host.server.indications) == 1
    wait_until(lambda: kernel.statistics()["servers"] == 0, what="the name to be free")
    with pytest.raises(ipcfw.ServerTerminated):
        session.SendReceive(terminable.EEcho, (2,))
    session.Close()


def test_a_server_deregisters_from_another_thread(kernel):
    host = ServerHost(TerminableServer(), kernel.endpoint)
    ready = threading.Event()
    loop = threading.Thread(target=host.run, args=(ready,))
    loop.start()
    assert ready.wait(10)
    with RSession.connect("terminable") as session:
        held = TRequestStatus()
        session.SendReceive(terminable.EHold, (1,), held)
        assert session.SendReceive(terminable.EEcho, (1,)) == 1
        with pytest.raises(TimeoutError):
            host.Deregister(timeout=0.2)  # one message is still outstanding
        host.server.held.pop(1).Complete(11)
        host.Deregister(timeout=5)
        assert held.Wait(5) == 11
    loop.join(10)
    assert not loop.is_alive()
    assert host.server.indications == []  # it asked itself: no indication


def test_terminating_a_server_with_nothing_outstanding_stops_its_host(kernel):
    server = kernel.serve("plugins.terminable:TerminableServer", "terminable")
    ipcfw.terminate_server("terminable", timeout=10)
    wait_until(lambda: not server.alive(), timeout=10, what="ipcfw serve to exit")
    assert server.popen.returncode == 0
    assert kernel.statistics()["servers"] == 0


def test_protected_servers_can_only_be_terminated_by_protserv(kernel):
    from ipcfw.kernel.state import KernelState, ProcessIdentity
    from ipcfw.protocol import Completed, Hello, Register, Role, Terminate, PROTOCOL_VERSION

    state = KernelState(kernel_pid=1, protserv_uids=frozenset({0}))
    admin = ProcessIdentity(10, 1.0, 1000, 1000, "/bin/admin")  # uid 1000: no ProtServ
    owner = ProcessIdentity(20, 1.0, 0, 0, "/bin/server")
    state.hello(b"admin", admin, Hello(Role.CHANNEL, PROTOCOL_VERSION))
    state.hello(b"srv", owner, Hello(Role.SERVER, PROTOCOL_VERSION))
    state.receive(b"srv", Register(1, "!system", 0, (1, 0, 0)))
    actions = state.receive(b"admin", Terminate(5, "!system", 3))
    assert [a.message for a in actions] == [Completed(5, ipcfw.KErrPermissionDenied, ())]
    assert state.statistics()["servers"] == 1


def test_a_client_cannot_pretend_to_be_the_server_deregistering(kernel):
    server = kernel.serve("plugins.terminable:TerminableServer", "terminable")
    with pytest.raises(ipcfw.BadArgument):
        ipcfw.terminate_server("terminable", TerminationReason.DEREGISTERED, timeout=5)
    assert server.alive() and kernel.statistics()["servers"] == 1
