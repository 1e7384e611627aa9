"""CPolicyServer and TSecurityPolicy, without processes: a policy declared as data is checked
against what the kernel said of the client (PeerInfo) before ServiceL, for requests and for
the connect; a malformed policy raises where it is written.

The same checks through a real kernel, on both data paths: test_policy_process.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ipcfw import errors
from ipcfw.protocol import Complete, Deliver, NewSession, Panic, PeerInfo, decode
from ipcfw.security import USER_CAPABILITIES, TSecurityPolicy, capability_name
from ipcfw.server import (
    ALWAYS_PASS,
    CUSTOM_CHECK,
    NOT_SUPPORTED,
    CPolicyServer,
    CSession,
    CustomResult,
    EPanicClient,
    EPassAndLog,
    RMessage,
    TPolicy,
    TPolicyElement,
)
from ipcfw.server.overlay import Layers
from ipcfw.server.state import ServerState

HANDLE = 0x31
CLIENT = 5
UID, GID = 1000, 100
EOpen, ERead, EWrite, EAdmin, ECustom, ELast = 0, 1, 2, 3, 4, 5


class Served(CSession):
    def ServiceL(self, message: RMessage) -> None:
        self.Server().served.append(message.Function())
        message.Complete(100 + message.Function())


class Guarded(CPolicyServer):
    name = "guarded"
    session_class = Served
    policy = TPolicy(
        on_connect=ALWAYS_PASS,
        ranges=[
            (EOpen, ALWAYS_PASS),
            (ERead, TPolicyElement(TSecurityPolicy("ReadUserData"))),
            (EWrite, TPolicyElement(TSecurityPolicy("WriteUserData", "com.example.Write"))),
            (EAdmin, TPolicyElement(TSecurityPolicy.secure_id(0), EPanicClient)),
            (ECustom, CUSTOM_CHECK),
            (ELast, NOT_SUPPORTED),
        ],
    )

    def __init__(self) -> None:
        self.served: list[int] = []
        self.verdict: Any = CustomResult.EPass

    def CustomSecurityCheckL(self, message: RMessage) -> Any:
        return self.verdict


class Harness:
    def __init__(self, server: CPolicyServer, capabilities: frozenset[str]) -> None:
        class Loop:
            def on_loop_thread(self) -> bool:
                return True

            def call_soon(self, fn: Any) -> None:
                fn()

        self.sent: list[Any] = []
        self.tasks: list[Any] = []
        self.state = ServerState(Layers(server, Loop()), lambda f: self.sent.append(decode(f)),
                                 max_frame=1 << 20, spawn=self._spawn)
        self.state.receive(PeerInfo(CLIENT, 4242, UID, GID, "/usr/bin/client",
                                    " ".join(sorted(capabilities))))
        self.msg_id = 10

    def _spawn(self, awaitable: Any, done: Any) -> Any:
        self.tasks.append((awaitable, done))
        return asyncio.Future(loop=asyncio.new_event_loop())  # (only .cancel() is used)

    def run_tasks(self) -> None:
        tasks, self.tasks = self.tasks, []
        for awaitable, done in tasks:
            try:
                awaitable.send(None)
            except StopIteration:
                done(None, False)
            except Exception as exc:
                done(exc, False)

    def connect(self) -> Any:
        self.msg_id += 1
        self.state.receive(NewSession(self.msg_id, HANDLE, (1, 0, 0), CLIENT, b""))
        return self.sent.pop()

    def call(self, function: int) -> Any:
        self.msg_id += 1
        self.state.receive(Deliver(self.msg_id, HANDLE, function, (), CLIENT))
        return self.sent.pop() if self.sent else None


def harness(capabilities: frozenset[str] = USER_CAPABILITIES,
            server: CPolicyServer | None = None) -> tuple[Harness, Any]:
    server = server or Guarded()
    h = Harness(server, capabilities)
    assert h.connect().value == errors.KErrNone
    return h, server


def test_a_request_whose_client_holds_what_its_range_needs_is_served() -> None:
    h, server = harness(USER_CAPABILITIES | {"com.example.Write"})
    assert h.call(EOpen).value == 100 + EOpen
    assert h.call(ERead).value == 100 + ERead
    assert h.call(EWrite).value == 100 + EWrite
    assert server.served == [EOpen, ERead, EWrite]


def test_a_missing_capability_fails_the_request_naming_it_and_serves_nothing() -> None:
    h, server = harness(frozenset({"ReadUserData", "WriteUserData"}))
    reply = h.call(EWrite)
    assert reply == Complete(reply.msg_id, errors.KErrPermissionDenied, (), (
        "function 2 of server 'guarded' needs capability com.example.Write, which pid 4242 "
        "(/usr/bin/client, uid 1000) does not hold"))
    assert server.served == []


def test_a_not_supported_range_and_the_numbers_past_the_last_range() -> None:
    h, server = harness()
    for function in (ELast, 1000, 2**31 - 2):
        reply = h.call(function)
        assert reply.value == errors.KErrNotSupported
        assert f"does not support function {function} (its policy says so)" in reply.text
    assert server.served == []


def test_a_panic_client_element_panics_the_client_with_e32user_cbase_103() -> None:
    h, server = harness()
    reply = h.call(EAdmin)  # secure id 0 (root) only
    assert type(reply) is Panic and (reply.category, reply.reason) == ("E32USER-CBase", 103)
    assert server.served == []


def test_pass_and_log_serves_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    class Lenient(Guarded):
        policy = TPolicy([(0, TPolicyElement(TSecurityPolicy("TCB"), EPassAndLog))])

    h, server = harness(server=Lenient())
    assert h.call(7).value == 107
    assert "needs capability TCB" in caplog.text and "EPassAndLog" in caplog.text


def test_a_custom_check_decides_at_once_or_later() -> None:
    h, server = harness()
    assert h.call(ECustom).value == 100 + ECustom
    server.verdict = CustomResult.EFail
    assert h.call(ECustom).value == errors.KErrPermissionDenied

    async def later(verdict: CustomResult) -> CustomResult:
        return verdict

    server.verdict = later(CustomResult.EPass)
    assert h.call(ECustom) is None  # held while the check runs
    h.run_tasks()
    assert h.sent.pop().value == 100 + ECustom
    server.verdict = later(CustomResult.EFail)
    assert h.call(ECustom) is None
    h.run_tasks()
    assert h.sent.pop().value == errors.KErrPermissionDenied
    server.verdict = "yes"  # not a CustomResult: the server's bug, the client told
    reply = h.call(ECustom)
    assert reply.value == errors.KErrGeneral and "TypeError" in reply.text


def test_the_connect_policy_refuses_before_accept_l() -> None:
    class Closed(Guarded):
        policy = TPolicy([(0, ALWAYS_PASS)],
                         on_connect=TPolicyElement(TSecurityPolicy("ProtServ")))

        def AcceptL(self, client: Any, version: Any, payload: bytes) -> None:
            raise AssertionError("AcceptL runs only after the connect policy passed")

    h = Harness(Closed(), USER_CAPABILITIES)
    reply = h.connect()
    assert reply.value == errors.KErrPermissionDenied
    assert "connect to server 'guarded' needs capability ProtServ" in reply.text


def test_has_capability_vendor_id_and_secure_id_read_the_kernels_word() -> None:
    seen: dict[str, Any] = {}

    class Looking(CSession):
        def ServiceL(self, message: RMessage) -> None:
            seen.update(read=message.HasCapability("ReadUserData"),
                        tcb=message.HasCapability("TCB", diagnostic="looking"),
                        sid=message.SecureId(), vid=message.VendorId())
            message.Complete(0)

    class Open(Guarded):
        session_class = Looking
        policy = TPolicy([(0, ALWAYS_PASS)])

    h, _ = harness(server=Open())
    h.call(1)
    assert seen == {"read": True, "tcb": False, "sid": UID, "vid": GID}


@pytest.mark.parametrize("ranges, error", [
    ([], "at least one range"),
    ([(1, ALWAYS_PASS)], "range 0 must begin at function 0, not 1"),
    ([(0, ALWAYS_PASS), (5, NOT_SUPPORTED), (3, ALWAYS_PASS)],
     "range 2 begins at 3, not after range 1's 5"),
    ([(0, ALWAYS_PASS), (0, NOT_SUPPORTED)], "range 1 begins at 0, not after range 0's 0"),
    ([(0, TSecurityPolicy("ReadUserData"))], "wrap the TSecurityPolicy in TPolicyElement"),
    ([(0, "pass")], "an element is ALWAYS_PASS, NOT_SUPPORTED, CUSTOM_CHECK or a TPolicyElement"),
    ([(-1, ALWAYS_PASS)], "an int in 0..2\\*\\*31-1, not -1"),
    ([0], "a \\(first function number, element\\) pair"),
], ids=["empty", "not-at-0", "unsorted", "repeated", "bare-policy", "bad-element",
        "negative", "not-a-pair"])
def test_a_malformed_policy_raises_at_class_creation(ranges: Any, error: str) -> None:
    with pytest.raises((ValueError, TypeError), match=error):
        class Bad(CPolicyServer):
            policy = TPolicy(ranges)


def test_a_policy_server_without_a_policy_is_refused_at_class_creation() -> None:
    with pytest.raises(TypeError, match="declares `policy = TPolicy"):
        class Forgot(CPolicyServer):
            name = "forgot"


@pytest.mark.parametrize("make, error", [
    (lambda: TSecurityPolicy(*["ReadUserData", "WriteUserData", "TCB", "CommDD", "DRM",
                               "AllFiles", "SwEvent", "Location"]),
     "at most 7 capabilities, not 8"),
    (lambda: TSecurityPolicy.secure_id(5, "TCB", "DRM", "AllFiles", "SwEvent"),
     "at most 3 capabilities, not 4"),
    (lambda: TSecurityPolicy("readuserdata"), "Symbian's is spelt 'ReadUserData'"),
    (lambda: TSecurityPolicy("two words"), "a name is a letter, then letters"),
    (lambda: TSecurityPolicy.vendor_id(-1), "unsigned 32-bit int, not -1"),
    (lambda: TPolicyElement(TSecurityPolicy("TCB"), 7), "a failure action is EFailClient"),
], ids=["eight-capabilities", "sid-and-four", "wrong-case", "bad-name", "bad-vid",
        "bad-action"])
def test_a_malformed_security_policy_raises_naming_the_problem(make: Any, error: str) -> None:
    with pytest.raises((ValueError, TypeError), match=error):
        make()


def test_what_a_security_policy_says_is_missing() -> None:
    caps = frozenset({"ReadUserData"})
    assert TSecurityPolicy("ReadUserData").missing(caps, 1000, 100) is None
    assert TSecurityPolicy("ReadUserData", "TCB", "DRM").missing(caps, 1000, 100) == \
        "capabilities DRM, TCB"
    assert TSecurityPolicy.secure_id(0).missing(caps, 1000, 100) == "secure id 0 (it has 1000)"
    assert TSecurityPolicy.vendor_id(100, "ReadUserData").missing(caps, 1000, 100) is None
    assert TSecurityPolicy.always_fail().missing(caps, 0, 0) is not None
    assert TSecurityPolicy.always_pass().missing(frozenset(), 0, 0) is None
    assert capability_name("com.example.Billing") == "com.example.Billing"


def test_the_kv_examples_policy_lets_a_reader_read_and_not_write() -> None:
    from servers.kv import EDelete, ECount, EGet, EKeys, EPutMany, ESet, ETableSet, KvServer

    h, server = harness(frozenset({"ReadUserData"}), server=KvServer())
    for function in (ESet, EDelete, ETableSet, EPutMany):
        reply = h.call(function)
        assert reply.value == errors.KErrPermissionDenied
        assert "needs capability WriteUserData" in reply.text
    for function in (EGet, ECount, EKeys):  # let through to the server (whose answer differs)
        assert h.call(function).value != errors.KErrPermissionDenied
    assert h.call(0).value == errors.KErrNotSupported


def test_an_overlays_requests_are_not_the_servers_policy_to_check() -> None:
    from ipcfw import COverlay, COverlaySession

    class Login(COverlaySession):
        def ServiceL(self, message: RMessage) -> None:
            message.Complete(1000 + message.Function())
            if message.Function() == 9:
                self.HandOff()

    class LoginOverlay(COverlay):
        def NewSessionL(self, version: Any, message: RMessage) -> Login:
            return Login()

    server = Guarded()
    h = Harness(LoginOverlay(server), frozenset())  # holds no capability at all
    assert h.connect().value == errors.KErrNone
    assert h.call(ELast + 50).value == 1000 + ELast + 50  # the overlay's: not checked
    assert h.call(9).value == 1009  # handed off: from now on the server's policy applies
    assert h.call(ERead).value == errors.KErrPermissionDenied
    assert h.call(ELast + 50).value == errors.KErrNotSupported
    assert server.served == []
