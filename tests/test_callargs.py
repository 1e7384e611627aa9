"""``ipcfw call``'s words and outcomes (ipcfw/tools/callargs.py), without processes: each word
form both ways, each bad word named, and what is printed for values, buffers and errors."""

from __future__ import annotations

import json

import pytest

from ipcfw import ClientPanic, IpcError, KErrNotFound, KErrNotSupported, TVersion
from ipcfw.errors import from_server
from ipcfw.tools.callargs import (
    MAX_OUT, BadArgument, error_outcome, failed, format_outcome, operation_arguments,
    operation_outcome, panic_outcome, parse_argument, parse_arguments, parse_function,
    parse_version, request_outcome, show_bytes,
)
from plugins.calls import Calls
from servers.kv import KeyValue

ARGUMENTS = [
    ("42", 42),
    ("-1", -1),
    ("0x2a", 42),
    ("2147483647", 2**31 - 1),
    ("-2147483648", -(2**31)),
    ("b:68656c6c6f", b"hello"),
    ("b:00 ff_10", b"\x00\xff\x10"),
    ("b:", b""),
    ("s:hello", b"hello"),
    ("s:", b""),
    ("s:h\u00e9", "h\u00e9".encode()),
    ("s:b:42", b"b:42"),
    ("out:0", bytearray(0)),
    ("out:16", bytearray(16)),
]


@pytest.mark.parametrize("word, expected", ARGUMENTS)
def test_each_argument_form(word, expected):
    value = parse_argument(word, 0)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("word, message", [
    ("", "argument 2 '': expected an int, b:HEX, s:TEXT or out:N"),
    ("hello", "argument 2 'hello': expected an int, b:HEX, s:TEXT or out:N"),
    ("2147483648", "argument 2 '2147483648': 2147483648 does not fit in a 32-bit signed int"),
    ("b:abc", "argument 2 'b:abc': b: takes an even number of hex digits"),
    ("b:zz", "argument 2 'b:zz': b: takes an even number of hex digits"),
    ("out:", "argument 2 'out:': out: takes a size in bytes"),
    ("out:-1", "argument 2 'out:-1': out: takes a size in bytes"),
    (f"out:{MAX_OUT + 1}", f"argument 2 'out:{MAX_OUT + 1}': out: takes a size in bytes, "
                           f"0..{MAX_OUT}"),
])
def test_a_bad_argument_is_named(word, message):
    with pytest.raises(BadArgument) as caught:
        parse_argument(word, 2)
    assert str(caught.value).startswith(message)


def test_at_most_four_arguments():
    assert parse_arguments(["1", "s:x", "out:2", "b:00"]) == (1, b"x", bytearray(2), b"\x00")
    with pytest.raises(BadArgument, match="5 arguments given; a request carries at most 4"):
        parse_arguments(["1"] * 5)


def test_function_and_version():
    assert parse_function("7") == 7 and parse_function("0x10") == 16
    for word in ("-1", "2147483647", "seven"):
        with pytest.raises(BadArgument, match=f"function '{word}'"):
            parse_function(word)
    assert parse_version("1.2.3") == TVersion(1, 2, 3)
    assert parse_version("1.2") == TVersion(1, 2, 0)
    for word in ("1", "1.x.0", "1.2.3.4", ""):
        with pytest.raises(BadArgument, match="expected MAJOR.MINOR.BUILD"):
            parse_version(word)
    with pytest.raises(BadArgument, match="major, minor 0..127"):
        parse_version("200.0.0")


def test_operation_words_are_read_by_the_parameters_types():
    named = Calls.interface.named
    assert operation_arguments(named["shout"], ["hello there"]) == ["hello there"]
    assert operation_arguments(named["total"], ["[1, 2]", "3"]) == [[1, 2], 3]
    assert operation_arguments(named["total"], ["[1, 2]"]) == [[1, 2]]  # (scale has a default)
    assert operation_arguments(named["fill"], ["out:3", "65", "TRUE"]) == [bytearray(3), 65, True]
    assert operation_arguments(named["fill"], ["out:3", "65", "0"]) == [bytearray(3), 65, False]
    assert operation_arguments(named["nothing"], []) == []
    assert operation_arguments(KeyValue.interface.named["put"], ["s:k", "b:00"]) == [b"k", b"\0"]


@pytest.mark.parametrize("operation, words, message", [
    ("total", ["[1,"], "calls.total: parameter 'numbers' (argument 0) '[1,': expected list[int] "
                       "as JSON"),
    ("total", ["[1]", "x"], "calls.total: parameter 'scale' (argument 1) 'x': expected an int"),
    ("fill", ["out:3", "65", "yes"], "calls.fill: parameter 'twice' (argument 2) 'yes': "
                                     "expected true or false"),
    ("fill", ["s:abc", "65"], "calls.fill: parameter 'buffer' (argument 0) 's:abc': expected a "
                              "writable buffer, as out:N"),
    ("total", [], "calls.total takes 1 to 2 arguments (numbers scale), got 0"),
    ("shout", ["a", "b"], "calls.shout takes 1 argument (text), got 2"),
    ("nothing", ["1"], "calls.nothing takes 0 arguments (none), got 1"),
])
def test_a_bad_operation_word_is_named(operation, words, message):
    with pytest.raises(BadArgument) as caught:
        operation_arguments(Calls.interface.named[operation], words)
    assert str(caught.value).startswith(message)


def test_bytes_are_shown_in_hex_and_as_text_when_printable():
    assert show_bytes(b"hi") == {"bytes": 2, "hex": "6869", "text": "hi"}
    assert show_bytes(b"") == {"bytes": 0, "hex": "", "text": ""}
    assert show_bytes(b"\x00\xff") == {"bytes": 2, "hex": "00ff"}
    assert show_bytes(b"a\nb") == {"bytes": 3, "hex": "610a62"}  # (a newline is not printable)
    assert show_bytes("\u00e9".encode()) == {"bytes": 2, "hex": "c3a9", "text": "\u00e9"}


def test_a_raw_outcome_shows_the_value_and_each_out_buffer():
    outcome = request_outcome(5, (1, b"in", bytearray(b"hello"), bytearray(b"\x01")))
    assert outcome == {"value": 5, "out": [
        {"argument": 2, "bytes": 5, "hex": "68656c6c6f", "text": "hello"},
        {"argument": 3, "bytes": 1, "hex": "01"},
    ]}
    assert json.loads(json.dumps(outcome)) == outcome
    assert format_outcome(outcome) == (
        "completed with 5\n"
        'argument 2: 5 bytes, hex 68656c6c6f, text "hello"\n'
        "argument 3: 1 bytes, hex 01"
    )
    assert format_outcome(request_outcome(0, (bytearray(),))) == (
        'completed with 0\nargument 0: 0 bytes, hex (none), text ""')


def test_an_operation_outcome_shows_what_it_returned():
    named = Calls.interface.named
    outcome = operation_outcome(named["total"], {"sum": 3, "count": 2}, [[1, 2], 1])
    assert format_outcome(outcome) == 'returned {"sum": 3, "count": 2}'
    outcome = operation_outcome(named["fill"], True, [bytearray(b"AA"), 65, True])
    assert format_outcome(outcome) == 'returned true\nargument 0 (buffer): 2 bytes, hex 4141, ' \
                                      'text "AA"'
    outcome = operation_outcome(KeyValue.interface.named["get"], b"\x00", [b"k"])
    assert format_outcome(outcome) == "returned 1 bytes, hex 00"
    outcome = operation_outcome(KeyValue.interface.named["keys"], [b"a", b"\xff"], [b""])
    assert outcome["returned"] == [{"bytes": 1, "hex": "61", "text": "a"},
                                   {"bytes": 1, "hex": "ff"}]
    outcome = operation_outcome(named["nothing"], None, [])
    assert format_outcome(outcome) == "returned null"


def test_an_error_outcome_names_the_error_and_gives_both_texts():
    outcome = error_outcome(from_server(KErrNotFound, "no key b'x'"), "KErrNotFound (-1): gone")
    assert outcome == {"error": {"code": -1, "name": "KErrNotFound", "text": "no key b'x'",
                                 "from_server": True, "error_string": "KErrNotFound (-1): gone"}}
    assert format_outcome(outcome) == ("error: KErrNotFound (-1)\n"
                                       "  from the server: no key b'x'\n"
                                       "  ErrorString: KErrNotFound (-1): gone")
    # A connect's error: the kernel's text, and no session to ask ErrorString.
    outcome = error_outcome(IpcError(KErrNotSupported, "version 9.0.0"), None)
    assert format_outcome(outcome) == "error: KErrNotSupported (-5)\n  version 9.0.0"
    assert format_outcome(error_outcome(IpcError(-4242), None)) == "error: error -4242"


def test_a_panic_outcome_names_the_category_and_reason():
    outcome = panic_outcome(ClientPanic("KERN-EXEC", 0, "handle 0x2a is not held"))
    assert failed(outcome) and failed(error_outcome(IpcError(-1), None))
    assert not failed(request_outcome(0, ()))
    assert format_outcome(outcome) == "panicked: KERN-EXEC 0\n  handle 0x2a is not held"
    assert format_outcome(panic_outcome(ClientPanic("PROBE", 7))) == "panicked: PROBE 7"
