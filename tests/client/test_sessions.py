"""The model end to end: a real kernel, a real server process (tests/plugins/probe.py), and
this test process (plus client subprocesses) as clients."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading

import pytest

import ipcfw
from ipcfw import (
    ClientPanic,
    IpcError,
    KErrCancel,
    KErrNone,
    KErrServerBusy,
    KErrSessionClosed,
    KRequestPending,
    RSession,
    TIpcArgs,
    TRequestStatus,
    TVersion,
    User,
)
from conftest import wait_until
from plugins import probe

pytestmark = pytest.mark.usefixtures("data_path")  # each test on both data paths

VERSION = TVersion(1, 2, 0)


@pytest.fixture
def probe_server(kernel):
    return kernel.serve("plugins.probe:ProbeServer", "probe")


def connect(**kwargs) -> RSession:
    return RSession.connect("probe", kwargs.pop("version", VERSION), **kwargs)


def events() -> list:
    """What the probe server recorded, read through a session of its own."""
    with connect() as session:
        return probe.recorded_events(session)


def events_of(handle: int) -> list:
    return [e for e in events() if len(e) > 1 and e[1] == handle]


# -- names ---------------------------------------------------------------------------------


def test_missing_name_raises_not_found(kernel):
    with pytest.raises(ipcfw.NotFound) as caught:
        RSession.connect("nobody-here")
    assert caught.value.code == ipcfw.KErrNotFound


def test_lookup_is_case_insensitive(probe_server):
    with RSession.connect("PrObE", VERSION) as session:
        assert session.SendReceive(probe.EEcho, (5,)) == 5


@pytest.mark.parametrize("name", ["a*b", "what?", "a:b", "", "x" * 81, "tab\there"])
def test_bad_names_are_refused_before_sending(kernel, name):
    with pytest.raises(ipcfw.BadName):
        RSession.connect(name)


def test_live_name_cannot_be_registered_twice(kernel, probe_server):
    second = kernel.serve("plugins.probe:ProbeServer")
    wait_until(lambda: not second.alive(), what="the duplicate server to exit")
    assert second.popen.returncode == 1
    assert "KErrAlreadyExists" in second.log()
    with connect() as session:  # the first instance is untouched
        assert session.SendReceive(probe.EEcho, (1,)) == 1


def test_name_is_free_again_after_the_server_stops(kernel, probe_server):
    probe_server.stop()
    wait_until(lambda: kernel.statistics()["servers"] == 0, what="the name to be released")
    kernel.serve("plugins.probe:ProbeServer", "probe")
    with connect() as session:
        assert session.SendReceive(probe.EEcho, (2,)) == 2


# -- connect -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [(1, 2, 0), (1, 0, 0), (0, 9, 9), (1, 2, 500)])
def test_supported_versions_connect(probe_server, version):
    with RSession.connect("probe", version) as session:
        assert session.SendReceive(probe.EEcho, (3,)) == 3


@pytest.mark.parametrize("version", [(1, 3, 0), (2, 0, 0)])
def test_unsupported_version_raises_not_supported(kernel, probe_server, version):
    with pytest.raises(ipcfw.NotSupported):
        RSession.connect("probe", version)
    assert kernel.statistics()["sessions"] == 0


def test_new_session_refusal_and_create_failure_leave_no_session(kernel, probe_server):
    with pytest.raises(ipcfw.PermissionDenied):
        RSession.connect("probe", (1, 0, probe.REJECT_BUILD))
    with pytest.raises(ipcfw.General):
        RSession.connect("probe", (1, 0, probe.FAIL_CREATE_BUILD))
    assert kernel.statistics()["sessions"] == 0


@pytest.mark.parametrize("slots", [-2, 256, 1000])
def test_bad_slot_counts_raise_bad_argument(probe_server, slots):
    with pytest.raises(ipcfw.BadArgument):
        connect(message_slots=slots)


def test_close_disconnects_once_after_every_earlier_message(kernel, probe_server):
    session = connect()
    handle = session.Handle()
    held = TRequestStatus()
    session.SendReceive(probe.EHold, (1,), held)
    statuses = [TRequestStatus() for _ in range(20)]
    for i, status in enumerate(statuses):
        session.SendReceive(probe.EEcho, (i,), status)
    session.Close()
    assert held.Int() == KErrSessionClosed  # completed locally, at once
    session.Close()  # a second Close does nothing
    wait_until(lambda: ["disconnect", handle] in events(), what="Disconnect")
    mine = events_of(handle)
    assert mine[-1] == ["disconnect", handle]
    assert mine.count(["disconnect", handle]) == 1
    assert [e[2] for e in mine if e[0] == "service"] == [probe.EHold] + [probe.EEcho] * 20
    wait_until(lambda: kernel.statistics()["sessions"] == 0, what="the session to be freed")


# -- SendReceive ---------------------------------------------------------------------------


@pytest.mark.smoke
def test_sync_call_returns_value_and_raises_for_negative(probe_server):
    with connect() as session:
        assert session.SendReceive(probe.EEcho, (123456,)) == 123456
        assert session.SendReceive(probe.EEcho) == 0  # missing args read as 0
        with pytest.raises(ipcfw.InUse) as caught:
            session.SendReceive(probe.ERaiseIpc, (ipcfw.KErrInUse,))
        assert caught.value.code == ipcfw.KErrInUse


@pytest.mark.smoke
def test_async_status_int_wait_result(probe_server):
    with connect() as session:
        status = TRequestStatus()
        session.SendReceive(probe.EHold, (9,), status)
        assert status.Int() == KRequestPending
        with pytest.raises(TimeoutError):
            status.Wait(0.05)
        session.SendReceive(probe.ECompleteHeld, (9, 77))
        assert status.Wait(5) == 77
        assert status.Int() == 77
        assert status.result() == 77
        session.SendReceive(probe.ERaiseIpc, (ipcfw.KErrLocked,), status)
        assert status.Wait(5) == ipcfw.KErrLocked
        with pytest.raises(ipcfw.Locked):
            status.result()


def test_await_and_done_callback(probe_server):
    with connect() as session:
        seen: list[int] = []

        async def main() -> int:
            status = TRequestStatus()
            status.add_done_callback(lambda s: seen.append(s.Int()))
            session.SendReceive(probe.EEcho, (31,), status)
            return await status

        assert asyncio.run(asyncio.wait_for(main(), 10)) == 31
        assert seen == [31]


def test_wait_for_request_returns_the_first_completed(probe_server):
    with connect() as session:
        held, quick = TRequestStatus(), TRequestStatus()
        session.SendReceive(probe.EHold, (4,), held)
        session.SendReceive(probe.EEcho, (8,), quick)
        assert User.WaitForRequest(held, quick, timeout=5) is quick
        assert held.Int() == KRequestPending
        session.SendReceive(probe.ECompleteHeld, (4, KErrCancel))
        assert User.WaitForRequest(held, timeout=5) is held
        assert held.Int() == KErrCancel


def test_blind_send_reaches_the_server(probe_server):
    with connect() as session:
        session.Send(probe.EEcho, (55,))
        handle = session.Handle()
        wait_until(lambda: ["service", handle, probe.EEcho] in events(), what="the blind message")


def test_requests_on_one_session_arrive_in_order(probe_server):
    with connect() as session:
        statuses = []
        for i in range(300):
            if i % 3 == 0:
                assert session.SendReceive(probe.EEcho, (i,)) == i
            else:
                status = TRequestStatus()
                session.SendReceive(probe.ESleep if i % 7 == 0 else probe.EEcho,
                                    (0, i) if i % 7 == 0 else (i,), status)
                statuses.append((i, status))
        for i, status in statuses:
            assert status.Wait(10) == i
        functions = [e[2] for e in events_of(session.Handle()) if e[0] == "service"]
    expected = [probe.ESleep if i % 7 == 0 and i % 3 else probe.EEcho for i in range(300)]
    assert functions == expected


# -- arguments and descriptors -------------------------------------------------------------


@pytest.mark.parametrize(
    "args, error",
    [
        ((2**31,), ValueError),
        ((-(2**31) - 1,), ValueError),
        (("text",), TypeError),
        ((1.5,), TypeError),
        ((None,), TypeError),
        ((1, 2, 3, 4, 5), ValueError),
    ],
)
def test_bad_arguments_raise_before_sending(kernel, probe_server, args, error):
    with connect() as session:
        with pytest.raises(error):
            session.SendReceive(probe.EEcho, args)
        with pytest.raises(ValueError):
            session.SendReceive(-1)
        handle = session.Handle()
        assert [e for e in events_of(handle) if e[0] == "service"] == []
        # (the events() session's own Disconnect may still be in flight)
        wait_until(lambda: kernel.statistics()["messages"] == 0, what="no outstanding messages")


def test_int_edges_pass_through(probe_server):
    with connect() as session:
        assert session.SendReceive(probe.EEcho, (2**31 - 1,)) == 2**31 - 1
        with pytest.raises(IpcError) as caught:
            session.SendReceive(probe.EEcho, (-(2**31),))
        assert caught.value.code == -(2**31)


@pytest.mark.smoke
def test_read_and_write_descriptors(probe_server):
    with connect() as session:
        buffer = bytearray(b"0123456789")
        assert session.SendReceive(probe.ETryWrite, TIpcArgs(b"abc", buffer, 3)) == 0
        assert buffer == bytearray(b"012abc")  # length is now offset + written
        assert session.SendReceive(probe.ETryRead, (0, b"hello")) == 5
        assert session.SendReceive(probe.EDesInfo, (bytearray(10),)) == 10 * 1000 + 10
        assert session.SendReceive(probe.EDesInfo, (b"abc",)) == 3 * 1000 + 3


def test_descriptor_errors_go_to_the_server_not_the_client(probe_server):
    with connect() as session:
        small = bytearray(b"xy")
        # The probe completes with minus the error code its WriteL/ReadL raised.
        assert session.SendReceive(probe.ETryWrite, (b"too long", small, 0)) == -ipcfw.KErrOverflow
        assert small == bytearray(b"xy")  # untouched
        assert session.SendReceive(probe.ETryWrite, (b"a", 7, 0)) == -ipcfw.KErrBadDescriptor
        assert (session.SendReceive(probe.ETryWrite, (b"a", b"read-only", 0))
                == -ipcfw.KErrBadDescriptor)
        assert session.SendReceive(probe.ETryRead, (0, 7)) == -ipcfw.KErrBadDescriptor
        assert session.SendReceive(probe.EEcho, (1,)) == 1  # the session is fine


def test_async_write_reaches_the_buffer_at_completion(probe_server):
    with connect() as session:
        buffer = bytearray(8)
        status = TRequestStatus()
        session.SendReceive(probe.ETryWrite, (b"async", buffer, 1), status)
        assert status.Wait(5) == 0
        assert buffer == bytearray(b"\x00async")


# -- held messages, slots ------------------------------------------------------------------


def test_held_message_completed_later_from_another_thread(probe_server):
    with connect() as holder, connect() as other:
        status = TRequestStatus()
        holder.SendReceive(probe.EHold, (1,), status)
        holder.SendReceive(probe.ECompleteHeldLater, (1, 99, 300))
        for i in range(50):  # the server keeps serving other sessions meanwhile
            assert other.SendReceive(probe.EEcho, (i,)) == i
        assert status.Wait(5) == 99


def test_message_slots_bound_async_requests(kernel, probe_server):
    with connect(message_slots=2) as session:
        first, second, third = TRequestStatus(), TRequestStatus(), TRequestStatus()
        session.SendReceive(probe.EHold, (1,), first)
        session.SendReceive(probe.EHold, (2,), second)
        session.SendReceive(probe.EHold, (3,), third)
        assert third.Wait(5) == KErrServerBusy
        with pytest.raises(ipcfw.ServerBusy):
            session.Send(probe.EEcho, (1,))
        assert session.SendReceive(probe.EEcho, (4,)) == 4  # sync never needs a slot
        session.SendReceive(probe.ECompleteHeld, (1, 0))
        assert first.Wait(5) == KErrNone
        again = TRequestStatus()  # the freed slot is usable at once
        session.SendReceive(probe.EEcho, (5,), again)
        assert again.Wait(5) == 5
        session.SendReceive(probe.ECompleteHeld, (2, 0))
        assert second.Wait(5) == KErrNone


def test_zero_slots_allow_only_sync_calls(probe_server):
    with connect(message_slots=0) as session:
        status = TRequestStatus()
        session.SendReceive(probe.EEcho, (1,), status)
        assert status.Wait(5) == KErrServerBusy
        assert session.SendReceive(probe.EEcho, (2,)) == 2


# -- panics and failures in the server -----------------------------------------------------


def test_panic_kills_the_session_and_disconnects_the_server(probe_server):
    session = connect()
    handle = session.Handle()
    with pytest.raises(ClientPanic) as caught:
        session.SendReceive(probe.EPanic, (7,))
    assert (caught.value.category, caught.value.reason) == ("PROBE", 7)
    with pytest.raises(ClientPanic):
        session.SendReceive(probe.EEcho, (1,))
    wait_until(lambda: ["disconnect", handle] in events(), what="Disconnect after the panic")
    session.Close()


def test_service_raising_completes_with_general_and_server_goes_on(probe_server):
    with connect() as session:
        with pytest.raises(ipcfw.General):
            session.SendReceive(probe.ERaise)
        assert session.SendReceive(probe.EEcho, (6,)) == 6
    log = probe_server.log()
    assert "Traceback" in log and "probe raised on purpose" in log


def test_completing_twice_raises_in_the_server_and_sends_once(probe_server):
    with connect() as session:
        assert session.SendReceive(probe.ECompleteTwice) == 1
        statuses = [TRequestStatus() for _ in range(10)]
        for i, status in enumerate(statuses):
            session.SendReceive(probe.EEcho, (i,), status)
        assert [s.Wait(5) for s in statuses] == list(range(10))
        second = [e for e in events() if e[0] == "second-complete"]
    assert second and second[0][1] == "ServerPanic" and "USER 70" in second[0][2]


# -- threads and identity ------------------------------------------------------------------


def test_eight_threads_with_their_own_sessions(probe_server):
    failures: list[str] = []

    def work(base: int) -> None:
        try:
            with connect() as session:
                for i in range(5000):
                    value = base + i
                    if session.SendReceive(probe.EEcho, (value,)) != value:
                        failures.append(f"{value}")
        except Exception as exc:  # reported below
            failures.append(repr(exc))

    threads = [threading.Thread(target=work, args=(n * 100_000,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads)
    assert failures == []


def test_unshared_session_used_from_another_thread_is_refused(probe_server):
    with connect() as session:
        caught: list[BaseException] = []

        def use() -> None:
            try:
                session.SendReceive(probe.EEcho, (1,))
            except BaseException as exc:
                caught.append(exc)

        thread = threading.Thread(target=use)
        thread.start()
        thread.join(10)
        assert len(caught) == 1 and isinstance(caught[0], ClientPanic)
        assert (caught[0].category, caught[0].reason) == ("KERN-EXEC", 0)
        assert session.SendReceive(probe.EEcho, (2,)) == 2  # the holder is unaffected


def test_client_reports_the_real_pid_uid_and_exe(kernel, probe_server):
    with connect() as session:
        buffer = bytearray(4096)
        session.SendReceive(probe.EClient, (buffer,))
        info = json.loads(buffer)
    assert info["pid"] == os.getpid()
    assert info["uid"] == os.getuid() and info["gid"] == os.getgid()
    assert os.path.realpath(info["exe"]) == os.path.realpath(sys.executable)
    # and what the kernel grants it: the user capabilities (docs/security.md)
    assert info["capabilities"] == sorted(ipcfw.security.USER_CAPABILITIES)
    script = (
        "import json, ipcfw; from plugins import probe\n"
        "s = ipcfw.RSession.connect('probe', (1, 2, 0)); b = bytearray(4096)\n"
        "s.SendReceive(probe.EClient, (b,)); print(json.loads(b)['pid']); s.Close()\n"
    )
    result = kernel.client(["-c", script])
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) != os.getpid()  # each process is seen as itself


def test_nothing_the_client_sends_can_claim_a_pid():
    from ipcfw import protocol

    for message in (protocol.Connect, protocol.Request, protocol.Close):
        assert not {"pid", "uid", "gid", "exe"} & set(message._fields)
    # Hello's pid is read only from a peer over tcp, which has no credentials the kernel can
    # read; over ipc the kernel ignores it (tests/kernel/test_state_remote.py).
    assert not {"uid", "gid", "exe"} & set(protocol.Hello._fields)
