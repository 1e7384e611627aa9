"""Errors that say what happened, end to end (issue #12, items 2 and 3): a real kernel, the
errant server (tests/plugins/errant.py) and this process as its client, on both data paths.

Each test shows what a client sees of one of the server's mistakes, or its own: the server's
text, an exception's type and where its traceback is, a bad completion value, a request the
server let go of, an unknown function, version or name. `SAID` holds each message as Python
prints the exception (``module.Class: str``); docs/errors.md's "Common mistakes" quote them
(a ```` ```text mistake=KEY ```` block each), and `test_the_docs_quote_the_real_messages`
checks that the quotes are these."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

import ipcfw
from ipcfw import RSession, TRequestStatus, TVersion
from ipcfw.client.args import SHARED_OVER
from ipcfw.protocol import MAX_ERROR_TEXT, TRUNCATED
from conftest import REPO, wait_until
from plugins import errant

pytestmark = pytest.mark.usefixtures("data_path")  # each test on both data paths

VERSION = TVersion(1, 2, 0)
TIMEOUT = 10.0

SAID = {
    "with-text": "ipcfw.errors.NotFound: KErrNotFound (-1) from the server: no key b'colour'",
    "bare-code": "ipcfw.errors.NotFound: KErrNotFound (-1): the item was not found (when "
                 "connecting: no server is registered under that name)",
    "other-exception": "ipcfw.errors.General: KErrGeneral (-2) from the server: "
                       "ZeroDivisionError in the server's ServiceL (function 2); the traceback "
                       "is in the server's log",
    "other-exception-text": "ipcfw.errors.General: KErrGeneral (-2) from the server: "
                            "ZeroDivisionError in the server's ServiceL (function 2): integer "
                            "division or modulo by zero; the traceback is in the server's log",
    "forgotten": "ipcfw.errors.General: KErrGeneral (-2) from the server: the server dropped "
                 "the request without completing it (function 5); see the server's log",
    "complete-bool": "TypeError: Complete(True): a bool is not a completion value; complete "
                     "with an int (KErrNone, a count) or an IpcError",
    "complete-str": "TypeError: Complete('ok'): a completion value is an int (>= 0 success, "
                    "< 0 an error code) or an IpcError, not str",
    "complete-big": "ValueError: Complete(1099511627776): a completion value is a 32-bit signed "
                    "int (-2147483648..2147483647)",
    "unknown-function": "ipcfw.errors.NotSupported: KErrNotSupported (-5) from the server: "
                        "server 'errant' does not support function 99 (ErrantSession.ServiceL "
                        "refused it): check the function number the client sends, and that "
                        "client and server use the same interface version",
    "wrong-version": "ipcfw.errors.NotSupported: KErrNotSupported (-5): the operation is not "
                     "supported (e.g. a function number the server does not serve, or a "
                     "version it does not support): server 'errant' serves version 1.2.0; the "
                     "client asked for 1.3.0",
    "unknown-name": "ipcfw.errors.NotFound: KErrNotFound (-1): the item was not found (when "
                    "connecting: no server is registered under that name): no server is "
                    "registered under 'errand'; the closest registered name: 'errant'",
    "bool-argument": "TypeError: argument 0: True is a bool, not an int; pass 1 if you mean "
                     "the number (an int, bytes or bytearray)",
}


def said(exc: BaseException) -> str:
    """`exc` as the last line of its traceback reads."""
    kind = type(exc)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    return f"{name}: {exc}"


@pytest.fixture
def errant_server(kernel):
    return kernel.serve("plugins.errant:ErrantServer", "errant")


def connect(name: str = "errant") -> RSession:
    return RSession.connect(name, VERSION, timeout=TIMEOUT)


def test_the_docs_quote_the_real_messages():
    page = (REPO / "docs" / "errors.md").read_text(encoding="utf-8")
    quoted = dict(re.findall(r"^```text mistake=(\S+)\n(.*?)\n```$", page, re.M | re.S))
    assert quoted == SAID


def test_an_ipcerror_raised_by_serviceL_reaches_the_client_with_its_text(errant_server):
    with connect() as session:
        with pytest.raises(ipcfw.NotFound) as caught:
            session.SendReceive(errant.ERaiseText)
        assert said(caught.value) == SAID["with-text"]
        assert caught.value.from_server and caught.value.message == "no key b'colour'"
        status = TRequestStatus()
        session.SendReceive(errant.ERaiseText, (), status)
        assert status.Wait(TIMEOUT) == ipcfw.KErrNotFound  # the raw value, Symbian style
        with pytest.raises(ipcfw.NotFound) as caught:
            status.result(0)
        assert said(caught.value) == SAID["with-text"]

        async def awaited() -> None:
            status = TRequestStatus()
            session.SendReceive(errant.ERaiseText, (), status)
            with pytest.raises(ipcfw.NotFound) as caught:
                await asyncio.wait_for(status, TIMEOUT)
            assert said(caught.value) == SAID["with-text"]

        asyncio.run(awaited())
        with pytest.raises(ipcfw.NotFound) as caught:  # a code alone: its description
            session.SendReceive(errant.EBareCode)
        assert said(caught.value) == SAID["bare-code"] and not caught.value.from_server


def test_complete_with_an_ipcerror_sends_its_text(errant_server):
    with connect() as session:
        with pytest.raises(ipcfw.BadArgument) as caught:
            session.SendReceive(errant.ECompleteError)
    assert str(caught.value) == (
        "KErrArgument (-6) from the server: the count must be positive, got -3")


def test_another_exception_names_its_type_and_says_the_detail_is_in_the_log(errant_server):
    with connect() as session:
        with pytest.raises(ipcfw.General) as caught:
            session.SendReceive(errant.ERaiseOther, (0,))
        assert said(caught.value) == SAID["other-exception"]
        with pytest.raises(ipcfw.NotFound):  # the server goes on serving
            session.SendReceive(errant.ERaiseText)
    wait_until(lambda: "ZeroDivisionError: integer division or modulo by zero"
               in errant_server.log(), what="the traceback in the server's log")


def test_a_server_may_send_its_exceptions_text(kernel):
    kernel.serve("plugins.errant:TellingServer", "telling")
    with connect("telling") as session:
        with pytest.raises(ipcfw.General) as caught:
            session.SendReceive(errant.ERaiseOther, (0,))
    assert said(caught.value) == SAID["other-exception-text"]


@pytest.mark.parametrize("index, key", [(0, "complete-bool"), (1, "complete-str"),
                                        (2, "complete-big")])
def test_a_bad_completion_value_raises_in_the_server_naming_it(errant_server, index, key):
    # The server's code catches what Complete raised and completes with it: that the client
    # reads the server's own error shows it was raised at the call, naming the value.
    with connect() as session:
        with pytest.raises(ipcfw.BadArgument) as caught:
            session.SendReceive(errant.ECompleteBad, (index,))
    assert caught.value.message == SAID[key]


def test_a_long_text_is_cut_with_a_marker(errant_server):
    with connect() as session:
        with pytest.raises(ipcfw.BadArgument) as caught:
            session.SendReceive(errant.ELongText)
    assert len(caught.value.message) == MAX_ERROR_TEXT
    assert caught.value.message.endswith(TRUNCATED)


@pytest.mark.parametrize("function", [errant.ENotUtf8, errant.ECompleteNotUtf8])
def test_a_text_that_is_not_utf8_reaches_the_client_escaped(errant_server, function):
    # (a lone surrogate, as os.fsdecode makes of a file name: msgpack cannot encode it)
    with connect() as session:
        with pytest.raises(ipcfw.NotFound) as caught:
            session.SendReceive(function, timeout=TIMEOUT)
        assert caught.value.message.endswith("no file caf\\udce9.txt")
        with pytest.raises(ipcfw.BadArgument):  # the server goes on
            session.SendReceive(errant.ECompleteError, timeout=TIMEOUT)


def test_an_error_with_a_large_descriptor_keeps_its_text(errant_server):
    # (on the direct path, a descriptor this large travels in shared memory: MappedCompleted)
    for size in (16, SHARED_OVER + 1):
        with connect() as session:
            with pytest.raises(ipcfw.NotFound) as caught:
                session.SendReceive(errant.ERaiseIntoBuffer, (bytearray(size),))
            status = TRequestStatus()
            session.SendReceive(errant.ERaiseIntoBuffer, (bytearray(size),), status)
            status.Wait(TIMEOUT)
            with pytest.raises(ipcfw.NotFound) as async_caught:
                status.result(0)
        assert str(caught.value) == str(async_caught.value) == (
            "KErrNotFound (-1) from the server: no such record")


def test_an_unknown_function_is_named_with_the_fix(errant_server):
    with connect() as session:
        with pytest.raises(ipcfw.NotSupported) as caught:
            session.SendReceive(99)
    assert said(caught.value) == SAID["unknown-function"]


def test_a_version_not_served_shows_both_versions(kernel, errant_server):
    with pytest.raises(ipcfw.NotSupported) as caught:
        RSession.connect("errant", (1, 3, 0), timeout=TIMEOUT)
    assert said(caught.value) == SAID["wrong-version"]
    assert kernel.statistics()["sessions"] == 0


def test_an_unknown_name_repeats_it_and_lists_the_closest(kernel, errant_server):
    with pytest.raises(ipcfw.NotFound) as caught:
        connect("errand")
    assert said(caught.value) == SAID["unknown-name"]
    with pytest.raises(ipcfw.NotFound) as caught:
        connect("kv")
    assert caught.value.message == (
        "no server is registered under 'kv' (start it, or wait for it to register: 1 "
        "registered, none with a similar name)")


def test_a_servers_not_found_is_not_waited_out_by_connect_wait(kernel):
    # connect(wait=) waits again when the kernel says the name is not registered (the server
    # went between the wait and the connect), not when the server itself refused with NotFound.
    kernel.serve("plugins.errant:RefusingServer", "refusing")
    started = time.monotonic()
    with pytest.raises(ipcfw.NotFound, match="no table 'orders'"):
        RSession.connect("refusing", VERSION, wait=5, timeout=TIMEOUT)
    assert time.monotonic() - started < 2.5


def test_a_servers_not_found_is_not_waited_out_by_connect_async_wait(kernel):
    kernel.serve("plugins.errant:RefusingServer", "refusing")

    async def main() -> None:
        await RSession.connect_async("refusing", VERSION, wait=5, timeout=TIMEOUT)

    started = time.monotonic()
    with pytest.raises(ipcfw.NotFound, match="no table 'orders'"):
        asyncio.run(asyncio.wait_for(main(), 10))
    assert time.monotonic() - started < 2.5


def test_a_bool_argument_is_refused_before_sending(errant_server):
    with connect() as session:
        with pytest.raises(TypeError) as caught:
            session.SendReceive(errant.ECompleteKept, (True,))
    assert said(caught.value) == SAID["bool-argument"]


# -- forgotten completions ----------------------------------------------------------------------


def test_a_request_the_server_let_go_of_fails_instead_of_hanging(errant_server):
    with connect() as session:
        handle = session.Handle()
        with pytest.raises(ipcfw.General) as caught:
            session.SendReceive(errant.EForget)  # (before: waited forever)
        assert said(caught.value) == SAID["forgotten"]
        status = TRequestStatus()
        session.SendReceive(errant.EForget, (), status)
        assert status.Wait(TIMEOUT) == ipcfw.KErrGeneral
        with pytest.raises(ipcfw.General) as caught:
            status.result(0)
        assert said(caught.value) == SAID["forgotten"]
        # the server goes on serving, and a message it keeps is not taken for forgotten
        kept = TRequestStatus()
        session.SendReceive(errant.EKeep, (), kept)
        assert session.SendReceive(errant.ECompleteKept, (3,)) == 0
        assert kept.Wait(TIMEOUT) == 3
        # let go of on another thread: its finalizer runs there, the completion on the loop
        with pytest.raises(ipcfw.General) as caught:
            session.SendReceive(errant.EForgetOnThread)
        assert said(caught.value) == SAID["forgotten"].replace("function 5", "function 11")
        # let go of by an async ServiceL, once its coroutine has returned
        with pytest.raises(ipcfw.General) as caught:
            session.SendReceive(errant.EForgetAsync)
        assert said(caught.value) == SAID["forgotten"].replace("function 5", "function 12")
    wait_until(lambda: errant_server.log().count("let go of message") == 4,
               what="four reports in the server's log")
    lines = [line for line in errant_server.log().splitlines() if "let go of message" in line]
    assert [f"(function {n}) of session 0x{handle:x} without completing it: its client gets "
            "KErrGeneral" in line for n, line in zip((5, 5, 11, 12), lines)] == [True] * 4
