"""``ipcfw call`` as a user runs it, against the echo and kv examples and a typed test interface
(tests/plugins/calls.py), on both data paths: values and out buffers printed, errors with the
server's text and ErrorString (exit 1), bad words named before anything is sent (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import HOME, PYTHONPATH

pytestmark = pytest.mark.usefixtures("data_path")  # each test on both data paths

CALL_TIMEOUT = 30.0
KV = "servers.kv:KeyValue"
CALLS = "plugins.calls:Calls"


def call(kernel, *words: str) -> subprocess.CompletedProcess:
    return kernel.client(["-m", "ipcfw", "call", *words], timeout=CALL_TIMEOUT)


@pytest.mark.smoke
def test_a_raw_request_prints_its_value_and_what_the_server_wrote(echo):
    result = call(echo, "echo", "2", "s:hello", "out:16")
    assert result.returncode == 0, result.stderr
    assert result.stdout == 'completed with 5\nargument 1: 5 bytes, hex 68656c6c6f, text "hello"\n'
    assert result.stderr == ""

    result = call(echo, "echo", "4", "40", "0x2", "--path", "kernel")
    assert (result.returncode, result.stdout) == (0, "completed with 42\n"), result.stderr

    result = call(echo, "echo", "2", "b:00ff", "out:4", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "value": 2, "out": [{"argument": 1, "bytes": 2, "hex": "00ff"}],  # (no text: unprintable)
    }


def test_an_error_completion_prints_its_name_the_server_text_and_error_string(echo):
    result = call(echo, "echo", "99")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "error: KErrNotSupported (-5)"
    assert lines[1] == "  from the server: echo has no function 99"
    assert lines[2].startswith("  ErrorString: KErrNotSupported (-5): ")

    result = call(echo, "echo", "2", "s:too long", "out:2", "--json")
    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert error["name"] == "KErrOverflow" and error["code"] == -9 and error["from_server"]
    assert "overflows argument 1 (max length 2)" in error["text"]


@pytest.mark.parametrize("words, named", [
    (["1", "b:zz"], "argument 0 'b:zz': b: takes an even number of hex digits"),
    (["1", "99999999999"], "argument 0 '99999999999': 99999999999 does not fit in a 32-bit"),
    (["2", "s:x", "out:lots"], "argument 1 'out:lots': out: takes a size in bytes"),
    (["one"], "function 'one': expected a function number"),
    (["1", "1", "2", "3", "4", "5"], "5 arguments given; a request carries at most 4"),
    (["1", "--version", "1.x"], "--version '1.x': expected MAJOR.MINOR.BUILD"),
])
@pytest.mark.process
def test_a_bad_word_is_named_before_anything_is_connected(tmp_path, words, named):
    # The endpoint has no kernel: the words are read, and refused, before a connect is tried.
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, IPCFW_KERNEL=f"ipc://{tmp_path}/no-kernel")
    result = subprocess.run([sys.executable, "-m", "ipcfw", "call", "echo", *words], env=env,
                            cwd=str(HOME), capture_output=True, text=True, timeout=CALL_TIMEOUT)
    assert result.returncode == 2
    assert result.stderr.startswith(f"ipcfw call: {named}"), result.stderr
    assert "Traceback" not in result.stderr


def test_a_panic_says_so(kernel):
    kernel.serve("plugins.probe:ProbeServer", "probe")
    result = call(kernel, "probe", "5", "7", "--version", "1.2.0")  # EPanic: "PROBE" 7
    assert (result.returncode, result.stderr) == (1, "panicked: PROBE 7\n"), result.stdout
    result = call(kernel, "probe", "5", "7", "--version", "1.2.0", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout) == {"panic": {"category": "PROBE", "reason": 7,
                                                   "text": ""}}


def test_connect_failures_say_why(echo):
    result = call(echo, "nosuch", "1")
    assert result.returncode == 1
    assert result.stderr.startswith("error: KErrNotFound (-1)\n  no server is registered under "
                                    "'nosuch'"), result.stderr
    result = call(echo, "echo", "1", "2", "--version", "9.0.0")
    assert result.returncode == 1
    assert result.stderr.startswith("error: KErrNotSupported (-5)"), result.stderr


def test_an_interface_operation_by_name(kv):
    result = call(kv, "kv", "put", "s:colour", "s:blue", "--interface", KV)
    assert (result.returncode, result.stdout) == (0, "returned null\n"), result.stderr
    result = call(kv, "kv", "get", "s:colour", "--interface", KV)
    assert result.returncode == 0, result.stderr
    assert result.stdout == 'returned 4 bytes, hex 626c7565, text "blue"\n'
    result = call(kv, "kv", "keys", "--interface", KV, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "operation": "kv.keys", "returns": "msgpack value", "out": [],
        "returned": [{"bytes": 6, "hex": "636f6c6f7572", "text": "colour"}],
    }


def test_an_interface_operation_error_and_bad_words(kv):
    result = call(kv, "kv", "get", "s:nope", "--interface", KV)
    assert result.returncode == 1
    assert result.stderr.splitlines()[:2] == ["error: KErrNotFound (-1)",
                                              "  from the server: no key b'nope'"]

    for words, named in [
        (["get", "12"], "kv.get: parameter 'key' (argument 0) '12': expected bytes, as b:HEX or "
                        "s:TEXT"),
        (["get"], "kv.get takes 1 argument (key), got 0"),
        (["frob"], "interface 'kv' has no operation 'frob' (it has: put, get, delete, count"),
    ]:
        result = call(kv, "kv", *words, "--interface", KV)
        assert result.returncode == 2
        assert result.stderr.startswith(f"ipcfw call: {named}"), result.stderr

    result = call(kv, "kv", "get", "s:k", "--interface", "servers.kv:Nope")
    assert result.returncode == 2
    assert "cannot load interface 'servers.kv:Nope': module 'servers.kv' has no 'Nope'" in \
        result.stderr
    result = call(kv, "kv", "get", "s:k", "--interface", "servers.kv")
    assert result.returncode == 2
    assert "interface 'servers.kv' must look like package.module:InterfaceClass" in result.stderr
    result = call(kv, "kv", "get", "s:k", "--interface", "servers.kv:KvServer")
    assert result.returncode == 2
    assert "KvServer is not a subclass of ipcfw.Interface" in result.stderr


def test_interface_arguments_are_read_by_their_types(kernel):
    kernel.serve("plugins.calls:CallsServer", "calls")
    result = call(kernel, "calls", "shout", "hello there", "--interface", CALLS)
    assert (result.returncode, result.stdout) == (0, 'returned "HELLO THERE"\n'), result.stderr

    result = call(kernel, "calls", "total", "[1, 2, 3]", "10", "--interface", CALLS, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["returned"] == {"sum": 60, "count": 3}

    result = call(kernel, "calls", "fill", "out:4", "0x41", "true", "--interface", CALLS)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ('returned true\n'
                             'argument 0 (buffer): 4 bytes, hex 41414141, text "AAAA"\n')

    result = call(kernel, "calls", "total", "[]", "--interface", CALLS)
    assert result.returncode == 1
    assert "  from the server: no numbers to add" in result.stderr

    result = call(kernel, "calls", "total", "[1, 2", "--interface", CALLS)
    assert result.returncode == 2
    assert result.stderr.startswith("ipcfw call: calls.total: parameter 'numbers' (argument 0) "
                                    "'[1, 2': expected list[int] as JSON"), result.stderr
    result = call(kernel, "calls", "total", '["a"]', "--interface", CALLS)
    assert result.returncode == 2
    assert result.stderr.startswith("ipcfw call: calls.total(): parameter 'numbers' "
                                    "(argument 0): "), result.stderr
