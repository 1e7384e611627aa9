"""CPolicyServer through a real kernel, on both data paths: the server checks what the kernel
granted the client (every process of the kernel's user holds the user capabilities), never
what the client says. Pure tests of the same rules: test_policy.py."""

from __future__ import annotations

import pytest

from ipcfw import ClientPanic, IpcError, KErrNotSupported, KErrPermissionDenied, RSession
from plugins.guarded import EAsyncCheck, EBilling, ELast, EPanicky, EPing, ERead

pytestmark = pytest.mark.usefixtures("data_path")


@pytest.fixture
def guarded(kernel):
    return kernel.serve("plugins.guarded:GuardedServer", "guarded")


def test_a_policy_is_checked_before_service_l_on_either_path(guarded) -> None:
    with RSession.connect("guarded", (1, 0, 0), 4) as session:
        assert session.SendReceive(EPing, ()) == 100 + EPing
        assert session.SendReceive(ERead, ()) == 100 + ERead  # a user capability: granted
        with pytest.raises(IpcError) as info:
            session.SendReceive(EBilling, ())
        assert info.value.code == KErrPermissionDenied
        assert "needs capability com.example.Billing, which pid" in str(info.value)
        with pytest.raises(IpcError) as info:
            session.SendReceive(ELast + 7, ())
        assert info.value.code == KErrNotSupported
        assert session.SendReceive(EAsyncCheck, (1,)) == 100 + EAsyncCheck  # decided later
        with pytest.raises(IpcError) as info:
            session.SendReceive(EAsyncCheck, (0,))
        assert info.value.code == KErrPermissionDenied
        assert session.SendReceive(EPing, ()) == 100 + EPing  # nothing lost meanwhile


def test_a_panic_client_element_panics_the_client(guarded) -> None:
    with RSession.connect("guarded", (1, 0, 0), 4) as session:
        with pytest.raises(ClientPanic) as info:
            session.SendReceive(EPanicky, ())
        assert (info.value.category, info.value.reason) == ("E32USER-CBase", 103)
    with RSession.connect("guarded", (1, 0, 0), 4) as other:  # the server is still there
        assert other.SendReceive(EPing, ()) == 100 + EPing
