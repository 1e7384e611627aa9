"""mypy sees a typed interface's proxy: tests/typing/kv_usage.py is clean (it is in
pyproject.toml's [tool.mypy] files, and checked here too), and each misuse in
tests/typing/kv_misuse.py is an error, with the message its marker names."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = [pytest.mark.process, pytest.mark.timeout(300)]

_MARKER = re.compile(r"#\s*error:\s*(.+)$")


def _mypy(path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--show-error-codes", path],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )


def test_the_typed_sample_is_clean() -> None:
    result = _mypy("tests/typing/kv_usage.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_misuse_is_a_type_error() -> None:
    path = "tests/typing/kv_misuse.py"
    expected = {
        number: match.group(1).strip()
        for number, line in enumerate((REPO / path).read_text().splitlines(), start=1)
        if (match := _MARKER.search(line))
    }
    assert len(expected) >= 5
    result = _mypy(path)
    found: dict[int, str] = {}
    for line in result.stdout.splitlines():
        match = re.match(rf"{re.escape(path)}:(\d+): error: (.*)", line)
        if match:
            found[int(match.group(1))] = match.group(2)
    assert found.keys() == expected.keys(), result.stdout + result.stderr
    for number, text in expected.items():
        assert text in found[number], f"line {number}: {found[number]!r} lacks {text!r}"
