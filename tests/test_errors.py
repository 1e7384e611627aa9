"""Tests of ipcfw.errors: codes, exceptions, helpers and the generated docs."""

from __future__ import annotations

import copy
import doctest
import pickle
from pathlib import Path

import pytest

import ipcfw.errors as errors
from ipcfw.errors import (
    ClientPanic,
    IpcError,
    KErrNone,
    KErrServerBusy,
    KErrServerTerminated,
    KRequestPending,
    ServerBusy,
    ServerTerminated,
    all_codes,
    check,
    describe,
    exception_class,
    name_of,
)

DOCS_ERRORS = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
SUBCLASS_RECORDS = [info for info in all_codes() if info.exception is not None]


def test_docs_page_matches_generator() -> None:
    page = DOCS_ERRORS.read_text(encoding="utf-8")
    generated, marker, hand_written = page.partition(errors.HAND_WRITTEN)
    assert generated == errors.render_markdown(), (
        "docs/errors.md is out of date; regenerate it with: "
        "python -m ipcfw.errors --update docs/errors.md"
    )
    assert marker and hand_written, "docs/errors.md lost its common mistakes"


def test_update_rewrites_the_generated_part_and_keeps_the_rest(tmp_path: Path) -> None:
    page = tmp_path / "errors.md"
    page.write_text("stale table\n" + errors.HAND_WRITTEN + "by hand\n", encoding="utf-8")
    assert errors.main(["--update", str(page)]) == 0
    assert page.read_text(encoding="utf-8") == (
        errors.render_markdown() + errors.HAND_WRITTEN + "by hand\n")


def test_an_error_from_the_server_says_so() -> None:
    error = errors.from_server(errors.KErrNotFound, "no key b'colour'")
    assert type(error) is errors.NotFound and error.from_server
    assert str(error) == "KErrNotFound (-1) from the server: no key b'colour'"
    assert str(errors.from_server(-1000, "own")) == "error -1000 from the server: own"
    plain = errors.from_server(errors.KErrNotFound, "")  # no text: as IpcError(code)
    assert not plain.from_server and str(plain) == str(IpcError(errors.KErrNotFound))
    copied = pickle.loads(pickle.dumps(error))
    assert type(copied) is errors.NotFound and copied.from_server and str(copied) == str(error)
    assert not IpcError(errors.KErrNotFound, "local").from_server


def test_docs_page_content() -> None:
    page = errors.render_markdown()
    assert page.startswith("# Error codes\n")
    assert "| code | name | exception | meaning |" in page
    assert "| -16 | `KErrServerBusy` | `ServerBusy` |" in page
    assert "KRequestPending" in page and "ClientPanic" in page
    assert "describe(" in page


def test_all_51_codes_in_order_with_names() -> None:
    records = all_codes()
    assert [info.code for info in records] == list(range(0, -51, -1))
    for info in records:
        assert info.name.startswith("KErr")
        assert getattr(errors, info.name) == info.code
        assert name_of(info.code) == info.name
        assert info.name in errors.__all__
        assert info.description and "|" not in info.description


def test_symbian_values() -> None:
    assert errors.KErrNone == 0
    assert errors.KErrNotFound == -1
    assert errors.KErrServerTerminated == -15
    assert errors.KErrServerBusy == -16
    assert errors.KErrSessionClosed == -45
    assert errors.KErrPermissionDenied == -46
    assert errors.KErrCorruptSurrogateFound == -50
    assert KRequestPending == -0x7FFFFFFF == -2147483647


def test_names_and_classes_are_unique() -> None:
    records = all_codes()
    names = [info.name for info in records]
    classes = [info.exception for info in SUBCLASS_RECORDS]
    assert len(set(names)) == len(names) == 51
    assert len(set(classes)) == len(classes) == 50
    assert records[0].exception is None


def test_describe() -> None:
    assert describe(-15).startswith("KErrServerTerminated (-15)")
    assert describe(-15) == (
        "KErrServerTerminated (-15): the server has terminated "
        "(crashed, was killed or deregistered)"
    )
    assert describe(KErrNone) == "KErrNone (0): no error"
    assert describe(KRequestPending) == (
        "KRequestPending (-2147483647): the request has not completed yet"
    )
    assert describe(-1000) == "unknown error code -1000"


def test_name_of() -> None:
    assert name_of(KErrServerBusy) == "KErrServerBusy"
    assert name_of(KRequestPending) == "KRequestPending"
    assert name_of(-1000) is None
    assert name_of(1) is None


def test_ipcerror_dispatches_to_subclass() -> None:
    e = IpcError(-16)
    assert type(e) is ServerBusy
    assert isinstance(e, IpcError)
    assert e.code == -16 == KErrServerBusy
    assert e.message == ""
    assert str(e) == describe(-16)

    e = IpcError(KErrServerTerminated, "server crashed")
    assert type(e) is ServerTerminated
    assert e.message == "server crashed"
    assert str(e) == describe(-15) + ": server crashed"
    assert IpcError(-15, message="m").message == "m"


@pytest.mark.parametrize("info", SUBCLASS_RECORDS, ids=lambda info: info.name)
def test_every_subclass_maps_back(info: errors.ErrorInfo) -> None:
    cls = info.exception
    assert cls is not None
    assert issubclass(cls, IpcError)
    assert cls.code == info.code
    assert exception_class(info.code) is cls
    assert type(IpcError(info.code)) is cls
    assert cls().code == info.code
    assert cls("detail").message == "detail"
    assert cls(info.code).code == info.code
    assert getattr(errors, cls.__name__) is cls
    assert cls.__name__ in errors.__all__
    assert cls.__module__ == "ipcfw.errors"
    assert cls.__qualname__ == cls.__name__
    assert cls.__doc__ is not None and cls.__doc__.startswith(f"{info.name} ({info.code})")
    assert str(cls()).startswith(f"{info.name} ({info.code})")


def test_subclass_names_do_not_shadow_builtins() -> None:
    import builtins

    for info in SUBCLASS_RECORDS:
        assert info.exception is not None
        assert not hasattr(builtins, info.exception.__name__), info.exception.__name__
    assert errors.IpcTimedOut.__bases__ == (IpcError,)
    assert errors.DivideByZeroError.__bases__ == (IpcError,)


def test_subclass_rejects_other_code() -> None:
    with pytest.raises(ValueError, match="-15"):
        ServerBusy(-15)


def test_unknown_codes() -> None:
    e = IpcError(-1000)
    assert type(e) is IpcError
    assert e.code == -1000
    assert str(e) == "unknown error code -1000"
    assert str(IpcError(-1000, "mine")) == "unknown error code -1000: mine"
    assert exception_class(-1000) is IpcError
    assert type(IpcError(KRequestPending)) is IpcError


@pytest.mark.parametrize("code", [0, 1, 16, 2**31])
def test_non_negative_code_is_value_error(code: int) -> None:
    with pytest.raises(ValueError, match=str(code)):
        IpcError(code)
    with pytest.raises(ValueError, match=str(code)):
        exception_class(code)


def test_bad_code_types() -> None:
    with pytest.raises(TypeError):
        IpcError()
    with pytest.raises(TypeError):
        IpcError("not a code")
    with pytest.raises(TypeError):
        IpcError(-1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "exc",
    [IpcError(-16), IpcError(-15, "gone"), ServerBusy(), ServerBusy("detail"),
     IpcError(-1000), IpcError(-1000, "own code")],
    ids=repr,
)
def test_ipcerror_pickle_and_copy(exc: IpcError) -> None:
    for clone in (pickle.loads(pickle.dumps(exc)), copy.copy(exc), copy.deepcopy(exc)):
        assert type(clone) is type(exc)
        assert clone.code == exc.code
        assert clone.message == exc.message
        assert str(clone) == str(exc)


def test_client_panic() -> None:
    panic = ClientPanic("KERN-EXEC", 0)
    assert panic.category == "KERN-EXEC"
    assert panic.reason == 0
    assert panic.message == ""
    assert str(panic) == "client panicked: KERN-EXEC 0"
    assert str(ClientPanic("MYSERVER", 3, "bad opcode")) == (
        "client panicked: MYSERVER 3: bad opcode"
    )
    assert not isinstance(panic, IpcError)


@pytest.mark.parametrize(
    "panic", [ClientPanic("KERN-EXEC", 0), ClientPanic("MYSERVER", 3, "bad opcode")], ids=repr
)
def test_client_panic_pickle(panic: ClientPanic) -> None:
    clone = pickle.loads(pickle.dumps(panic))
    assert type(clone) is ClientPanic
    assert (clone.category, clone.reason, clone.message) == (
        panic.category, panic.reason, panic.message
    )


def test_check() -> None:
    assert check(0) == 0
    assert check(42) == 42
    with pytest.raises(ServerBusy) as info:
        check(KErrServerBusy)
    assert info.value.code == KErrServerBusy
    with pytest.raises(IpcError) as unknown:
        check(-1000)
    assert type(unknown.value) is IpcError
    assert unknown.value.code == -1000


def test_all_lists_only_existing_names() -> None:
    assert len(set(errors.__all__)) == len(errors.__all__)
    for name in errors.__all__:
        assert hasattr(errors, name), name


def test_doctests() -> None:
    result = doctest.testmod(errors)
    assert result.attempted > 0
    assert result.failed == 0
