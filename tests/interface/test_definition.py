"""Typed interfaces without processes: definitions checked when the class is created, the
values' codec, and one operation mapped onto a request and back on both sides, the server's
with real `RMessage`s whose completions are recorded (ipcfw.interface.codec, .spec, .service).
"""

from __future__ import annotations

from typing import Any

import pytest

from ipcfw import (
    BadArgument,
    Deferred,
    Interface,
    InterfaceSession,
    IpcError,
    KErrArgument,
    KErrCancel,
    KErrGeneral,
    KErrNotSupported,
    KErrOverflow,
    NotSupported,
    Overflow,
    operation,
)
from ipcfw.interface import Buffer
from ipcfw.interface.codec import Mismatch, conform
from ipcfw.protocol import Complete, decode, pack_value
from ipcfw.server import RMessage
from ipcfw.server.message import MessageKind


class Shop(Interface, name="shop", version=(2, 1, 0)):
    @operation(1)
    def price(self, item: bytes) -> int: ...

    @operation(2)
    def describe(self, item: bytes) -> bytes: ...

    @operation(3, reply=64)
    def basket(self, items: dict[str, int], note: str | None = None) -> list[tuple[str, float]]:
        ...

    @operation(4)
    def label(self, item: bytes, into: bytearray) -> None: ...

    @operation(5)
    def open(self, flag: bool) -> bool: ...

    @operation(6)
    def log(self, text: bytes = b"", extra: bytearray | None = None) -> None: ...


class Recorder:
    max_frame = 1 << 24

    def __init__(self) -> None:
        self.completions: list[Complete] = []

    def completed(self, message: RMessage, frame: bytes) -> None:
        completion = decode(frame)
        assert isinstance(completion, Complete)
        self.completions.append(completion)


def message(function: int, *args: Any) -> tuple[RMessage, Recorder]:
    """A request as the server receives it; a bytearray becomes a writable descriptor."""
    recorder = Recorder()
    wire = tuple((bytes(a), len(a)) if isinstance(a, bytearray) else a for a in args)
    return RMessage(recorder, 1, MessageKind.REQUEST, function, wire, None, None), recorder


def _define(body: str, **names: Any) -> type:
    namespace: dict[str, Any] = {"Interface": Interface, "operation": operation, "Any": Any,
                                 **names}
    exec(f"class X(Interface, name='x'):\n{body}", namespace)
    return namespace["X"]  # type: ignore[no-any-return]


# -- definitions are checked when the class is created -----------------------------------------


def test_the_definition_is_read_from_the_class() -> None:
    spec = Shop.interface
    assert (spec.name, spec.version) == ("shop", (2, 1, 0))
    assert list(spec.operations) == [1, 2, 3, 4, 5, 6]
    assert Shop.basket.spec is spec.operations[3]
    assert spec.operations[2].reply_index == 1 and spec.operations[3].reply_index == 2
    assert spec.operations[1].reply_index is None and spec.operations[4].reply_index is None
    assert [p.name for p in spec.operations[3].parameters] == ["items", "note"]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (" @operation(1)\n def a(self) -> None: ...\n @operation(1)\n def b(self) -> None: ...",
         "a and b both have function number 1"),
        (" @operation(1)\n def a(self, key) -> None: ...",
         "x.a: parameter 'key' has no annotation"),
        (" @operation(1)\n def a(self, key: bytes): ...", "x.a: no return annotation"),
        (" @operation(1)\n def a(self, when: set[int]) -> None: ...",
         "x.a: parameter 'when': set[int] cannot be carried"),
        (" @operation(1)\n def a(self) -> object: ...",
         "x.a: the return type: object cannot be carried"),
        (" @operation(1)\n def a(self, x: list[complex]) -> None: ...",
         "complex cannot be carried"),
        (" @operation(1)\n def a(self, a: int, b: int, c: int, d: int) -> str: ...",
         "x.a: 5 arguments (4 parameters and the reply descriptor)"),
        (" @operation(1)\n def a(self, *rest: int) -> None: ...", "operations take named"),
        (" @operation(1)\n async def a(self) -> None: ...", "declare operations with def"),
        (" @operation(1)\n def session(self) -> None: ...", "may not be called 'session'"),
        (" @operation(-1)\n def a(self) -> None: ...", "function number must be an int"),
        (" @operation(True)\n def a(self) -> None: ...", "function number must be an int"),
        (" @operation(1, reply=0)\n def a(self) -> bytes: ...", "reply must be a positive"),
        (" @operation(1)\n def a(self) -> Missing: ...", "annotations cannot be read"),
    ],
)
def test_a_bad_definition_is_refused_naming_what_is_wrong(body: str, error: str) -> None:
    with pytest.raises(TypeError, match=error.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        _define(body)


def test_an_interface_needs_a_valid_name() -> None:
    with pytest.raises(TypeError, match="an interface needs a name"):
        class Nameless(Interface):
            pass
    with pytest.raises(TypeError, match="interface name 'a:b'"):
        class BadName(Interface, name="a:b"):
            pass


def test_a_later_version_adds_operations_and_keeps_the_name() -> None:
    class Shop22(Shop, version=(2, 2, 0)):
        @operation(7)
        def stock(self, item: bytes) -> int: ...

    assert Shop22.interface.name == "shop" and Shop22.interface.version == (2, 2, 0)
    assert list(Shop22.interface.operations) == [1, 2, 3, 4, 5, 6, 7]
    assert Shop.interface.operations.keys() == {1, 2, 3, 4, 5, 6}
    with pytest.raises(TypeError, match="price and stock both have function number 1"):
        class Clash(Shop):
            @operation(1)
            def stock(self, item: bytes) -> int: ...


def test_a_session_must_implement_every_operation_with_its_parameter_names() -> None:
    with pytest.raises(TypeError) as raised:
        class Partial(InterfaceSession[Shop]):
            def price(self, thing: bytes) -> int:
                return 1

    text = str(raised.value)
    assert "Partial does not implement 'shop'" in text
    assert "price() takes (thing); the interface declares (item)" in text
    assert "no method describe() for operation 2" in text
    with pytest.raises(TypeError, match="say which interface it serves"):
        class Unsaid(InterfaceSession):  # type: ignore[type-arg]
            pass
    with pytest.raises(TypeError, match="takes an Interface subclass"):
        class NotAnInterface(InterfaceSession[int]):  # type: ignore[type-var]
            pass


# -- the codec -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("annotation", "value", "expected"),
    [
        (int, 3, 3), (float, 3, 3.0), (bytes, bytearray(b"ab"), b"ab"), (str | None, None, None),
        (tuple[int, str], [1, "a"], (1, "a")), (tuple[int, ...], [1, 2], (1, 2)),
        (dict[bytes, list[int]], {b"k": [1]}, {b"k": [1]}), (Any, {1: 2}, {1: 2}),
        (list, [1, "x"], [1, "x"]),
    ],
)
def test_conform_accepts_and_converts(annotation: Any, value: Any, expected: Any) -> None:
    assert conform(annotation, value) == expected
    assert type(conform(annotation, value)) is type(expected)


@pytest.mark.parametrize(
    ("annotation", "value", "message"),
    [
        (int, True, "expected int, got bool True"),
        (int, "3", "expected int, got str '3'"),
        (bytes, "text", "expected bytes, got str 'text'"),
        (tuple[int, int], [1], "expected tuple[int, int], got 1 items"),
        (list[bytes], [b"a", "b"], "expected list[bytes], got list holding str 'b'"),
        (dict[str, int], {"a": "b"}, "expected dict[str, int], got dict holding str 'b'"),
        (int | None, 1.5, "expected int | None, got float 1.5"),
    ],
)
def test_conform_refuses_naming_expected_and_got(annotation: Any, value: Any,
                                                 message: str) -> None:
    with pytest.raises(Mismatch) as raised:
        conform(annotation, value)
    assert str(raised.value) == message


# -- the client's side: a call becomes a request -----------------------------------------------


def test_arguments_become_ints_descriptors_and_msgpack_values() -> None:
    spec = Shop.interface.operations
    assert spec[1].request((b"pear",), {}) == ((b"pear",), None)
    wire, reply = spec[3].request(({"pear": 2},), {})
    assert wire[:2] == (pack_value({"pear": 2}), pack_value(None))  # a msgpack value
    assert wire[2] is reply and reply == bytearray(64)
    into = bytearray(8)
    assert spec[4].request((b"x",), {"into": into})[0][1] is into  # the caller's own buffer
    assert spec[5].request((True,), {})[0] == (1,)
    assert spec[6].request((), {})[0] == (b"", 0)


@pytest.mark.parametrize(
    ("number", "args", "error", "message"),
    [
        (1, ("pear",), TypeError,
         "shop.price(): parameter 'item' (argument 0): expected bytes, got str 'pear'"),
        (1, (), TypeError, "shop.price(): missing a required argument: 'item'"),
        (4, (b"x", b"not a buffer"), TypeError,
         "shop.label(): parameter 'into' (argument 1): expected bytearray, got bytes"),
        (5, (1,), TypeError, "shop.open(): parameter 'flag' (argument 0): expected bool, got int"),
        (3, ({"pear": "two"},), TypeError,
         "parameter 'items' (argument 0): expected dict[str, int], got dict holding str 'two'"),
    ],
)
def test_a_bad_argument_is_refused_before_anything_is_sent(number: int, args: tuple[Any, ...],
                                                          error: type, message: str) -> None:
    with pytest.raises(error) as raised:
        Shop.interface.operations[number].request(args, {})
    assert message in str(raised.value)


def test_an_int_out_of_range_is_refused() -> None:
    class Counter(Interface, name="counter"):
        @operation(1)
        def add(self, amount: int) -> int: ...

    with pytest.raises(ValueError, match=r"'amount' \(argument 0\): 4294967296 does not fit"):
        Counter.interface.operations[1].request((2**32,), {})


def test_results_are_decoded_by_the_return_type() -> None:
    spec = Shop.interface.operations
    assert spec[1].result(12, None) == 12
    assert spec[2].result(3, bytearray(b"red")) == b"red"
    assert spec[3].result(0, bytearray(pack_value([["a", 1]]))) == [("a", 1.0)]
    assert spec[5].result(1, None) is True
    with pytest.raises(TypeError, match="shop.basket answered what its interface does not say"):
        spec[3].result(0, bytearray(pack_value({"not": "a list"})))


# -- the server's side: a request becomes a call, the return a completion ----------------------


class ShopSession(InterfaceSession[Shop]):
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.answer: Any = None

    def price(self, item: bytes) -> int:
        self.calls.append(("price", item))
        return int(self.answer)

    def describe(self, item: bytes) -> bytes:
        return bytes(self.answer)

    def basket(self, items: dict[str, int], note: str | None) -> list[tuple[str, float]]:
        self.calls.append(("basket", items, note))
        return self.answer  # type: ignore[no-any-return]

    def label(self, item: bytes, into: bytearray) -> None:
        assert isinstance(into, Buffer)
        self.calls.append(("label", into.max_length))
        into[:] = self.answer

    def open(self, flag: bool) -> bool:
        return not flag

    def log(self, text: bytes, extra: bytearray | None) -> None:
        self.calls.append(("log", text, extra))


def _serve(session: InterfaceSession[Any], function: int, *args: Any) -> Complete:
    msg, recorder = message(function, *args)
    try:
        session.ServiceL(msg)
    except IpcError as exc:
        msg.Complete(exc.code)
    (completion,) = recorder.completions
    return completion


def test_dispatch_decodes_calls_and_completes_with_the_return_value() -> None:
    session = ShopSession()
    session.answer = 42
    assert _serve(session, 1, b"pear") == Complete(1, 42, ())
    session.answer = b"ripe"
    assert _serve(session, 2, b"pear", bytearray(10)) == Complete(1, 4, ((1, b"ripe"),))
    session.answer = [("pear", 2)]
    completion = _serve(session, 3, pack_value({"pear": 2}), 0, bytearray(64))
    assert completion.writes == ((2, pack_value([("pear", 2.0)])),)
    assert completion.value == len(completion.writes[0][1])
    assert session.calls[-1] == ("basket", {"pear": 2}, None)
    assert _serve(session, 5, 1) == Complete(1, 0, ())


def test_a_bytearray_parameter_is_written_back_only_if_changed() -> None:
    session = ShopSession()
    session.answer = b"fits"
    assert _serve(session, 4, b"x", bytearray(10)) == Complete(1, 0, ((1, b"fits"),))
    session.answer = b"\0" * 10
    assert _serve(session, 4, b"x", bytearray(10)) == Complete(1, 0, ())
    assert session.calls[-1] == ("label", 10)


def test_what_does_not_fit_the_callers_descriptor_is_an_overflow_naming_both_sizes() -> None:
    session = ShopSession()
    session.answer = b"a long label"
    msg, _ = message(4, b"x", bytearray(3))
    with pytest.raises(Overflow, match=r"shop.label: parameter 'into' \(argument 1\): the server "
                                       r"left 12 bytes in a bytearray of at most 3"):
        session.ServiceL(msg)
    session.answer = b"x" * 20
    msg, _ = message(2, b"pear", bytearray(16))
    with pytest.raises(Overflow, match=r"shop.describe: the reply is 20 bytes, over the caller's "
                                       r"16-byte reply descriptor"):
        session.ServiceL(msg)


@pytest.mark.parametrize(
    ("function", "args", "text"),
    [
        (1, (7,), "shop.price: parameter 'item' (argument 0) expects bytes, got the int 7"),
        (5, (b"yes",), "shop.open: parameter 'flag' (argument 0) expects bool, got a descriptor"),
        (5, (2,), "shop.open: parameter 'flag' (argument 0) expects bool, got the int 2"),
        (3, (b"\xc1",), "parameter 'items' (argument 0) expects dict[str, int], got bytes that "
                        "are no msgpack value"),
        (3, (pack_value([1]),), "parameter 'items' (argument 0) expects dict[str, int], got "
                                "list"),
        (2, (b"pear",), "shop.describe: argument 1 must be a writable descriptor for the reply "
                        "(bytes), got an int"),
    ],
)
def test_a_bad_argument_is_kerrargument_naming_the_parameter(function: int,
                                                             args: tuple[Any, ...],
                                                             text: str) -> None:
    msg, _ = message(function, *args)
    with pytest.raises(BadArgument) as raised:
        ShopSession().ServiceL(msg)
    assert raised.value.code == KErrArgument
    assert text in str(raised.value)


def test_a_missing_descriptor_with_a_default_takes_it() -> None:
    session = ShopSession()
    assert _serve(session, 6) == Complete(1, 0, ())
    assert session.calls[-1] == ("log", b"", None)


def test_an_unknown_function_is_not_supported_naming_it_and_the_known_ones() -> None:
    msg, _ = message(99)
    with pytest.raises(NotSupported) as raised:
        ShopSession().ServiceL(msg)
    assert raised.value.code == KErrNotSupported
    assert "interface 'shop' 2.1.0 has no function 99 (it has: 1 price, 2 describe" in str(
        raised.value)


def test_a_return_value_the_interface_does_not_say_is_a_server_bug() -> None:
    session = ShopSession()
    session.answer = -1
    with pytest.raises(ValueError, match=r"shop.price returned -1: an int result must be "
                                         r"0..2\*\*31-1 \(raise IpcError for an error\)"):
        session.ServiceL(message(1, b"pear")[0])
    session.answer = {"not": "a list"}
    with pytest.raises(TypeError, match="shop.basket returned dict; its interface says "
                                        r"list\[tuple\[str, float\]\]"):
        session.ServiceL(message(3, pack_value({}), 0, bytearray(64))[0])


def test_a_raw_session_can_serve_other_functions_and_hand_the_rest_on() -> None:
    class Mixed(ShopSession):
        def ServiceL(self, message: RMessage) -> Any:
            if message.Function() == 50:
                message.Complete(500)
                return None
            return super().ServiceL(message)

    session = Mixed()
    session.answer = 5
    assert _serve(session, 50) == Complete(1, 500, ())
    assert _serve(session, 1, b"pear") == Complete(1, 5, ())


# -- Deferred: answered later, from any thread ------------------------------------------------


class Later(Interface, name="later"):
    @operation(1)
    def wait(self, payload: bytearray | None = None) -> int: ...

    @operation(2)
    def text(self) -> str: ...


class LaterSession(InterfaceSession[Later]):
    def __init__(self) -> None:
        self.held: list[tuple[Deferred[Any], Any]] = []

    def wait(self, payload: bytearray | None) -> Deferred[int]:
        deferred: Deferred[int] = Deferred()
        self.held.append((deferred, payload))
        return deferred

    def text(self) -> Deferred[str]:
        deferred: Deferred[str] = Deferred()
        deferred.resolve("done already")  # resolved before the framework has it
        return deferred


def test_a_deferred_result_completes_when_resolved() -> None:
    session = LaterSession()
    msg, recorder = message(1, bytearray(8))
    assert session.ServiceL(msg) is None
    assert recorder.completions == [] and not msg.IsNull()
    deferred, payload = session.held[0]
    payload[:] = b"event"
    deferred.resolve(3)
    assert recorder.completions == [Complete(1, 3, ((0, b"event"),))]
    assert deferred.done()
    with pytest.raises(RuntimeError, match="resolved or failed already"):
        deferred.resolve(4)


def test_a_deferred_resolved_before_it_is_returned_completes_at_once() -> None:
    msg, recorder = message(2, bytearray(32))
    LaterSession().ServiceL(msg)
    assert recorder.completions == [Complete(1, 13, ((0, pack_value("done already")),))]


def test_a_deferred_fails_with_an_error_and_an_overflow_completes_as_one() -> None:
    session = LaterSession()
    msg, recorder = message(1)
    session.ServiceL(msg)
    session.held[0][0].fail(IpcError(KErrCancel, "the publisher went away"))
    assert recorder.completions == [Complete(1, KErrCancel, (), "the publisher went away")]
    msg, recorder = message(1, bytearray(2))
    session.ServiceL(msg)
    deferred, payload = session.held[1]
    payload[:] = b"too long"
    deferred.resolve(1)  # the payload does not fit: the caller gets KErrOverflow, saying so
    assert recorder.completions == [Complete(1, KErrOverflow, (), (
        "later.wait: parameter 'payload' (argument 0): the server left 8 bytes in a bytearray "
        "of at most 2"))]
    with pytest.raises(TypeError, match="fail\\(\\) takes an IpcError"):
        Deferred().fail(ValueError("no"))  # type: ignore[arg-type]


def test_a_deferred_resolved_with_a_bad_value_completes_with_kerrgeneral_and_raises() -> None:
    session = LaterSession()
    msg, recorder = message(1)
    session.ServiceL(msg)
    with pytest.raises(TypeError, match="later.wait returned str"):
        session.held[0][0].resolve("not an int")
    assert recorder.completions == [Complete(1, KErrGeneral, (), (
        "TypeError in the server's Deferred.resolve (later.wait); the traceback is in the "
        "server's log"))]


def test_async_methods_return_an_awaitable_that_completes_the_message() -> None:
    import asyncio

    class AsyncLater(InterfaceSession[Later]):
        async def wait(self, payload: bytearray | None) -> int:
            await asyncio.sleep(0)
            return 9

        async def text(self) -> str:
            return "async"

    msg, recorder = message(1)
    awaitable = AsyncLater().ServiceL(msg)
    assert recorder.completions == []
    asyncio.run(awaitable)
    assert recorder.completions == [Complete(1, 9, ())]


def test_a_method_sees_the_request_it_serves() -> None:
    import asyncio

    seen: list[RMessage] = []

    class Watching(InterfaceSession[Later]):
        def wait(self, payload: bytearray | None) -> int:
            seen.append(self.Message())
            return 1

        async def text(self) -> str:
            await asyncio.sleep(0)
            seen.append(self.Message())
            return "x"

    session = Watching()
    plain, _ = message(1)
    session.ServiceL(plain)
    awaited, _ = message(2, bytearray(8))
    awaitable = session.ServiceL(awaited)
    assert awaitable is not None
    asyncio.run(awaitable)  # type: ignore[arg-type]
    assert seen == [plain, awaited]
    with pytest.raises(RuntimeError, match="only available inside an operation's method"):
        session.Message()


def test_an_operation_may_not_replace_the_sessions_own_methods() -> None:
    class Clashing(Interface, name="clash"):
        @operation(1)
        def Message(self) -> None: ...

    with pytest.raises(TypeError, match="operation 'Message' would replace "
                                        "InterfaceSession.Message"):
        class ClashSession(InterfaceSession[Clashing]):
            pass
