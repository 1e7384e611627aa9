"""Progress of the bench's long steps on stderr, when stderr is a terminal (else nothing)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO


class Progress:
    """One status line, rewritten in place; `clear` removes it before the report."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()

    def say(self, text: str) -> None:
        if self.enabled:
            self.stream.write(f"\r\x1b[Kipcfw bench: {text}")
            self.stream.flush()

    def counter(self, what: str) -> Callable[[int, int], None]:
        """Say `what`, and return a function that says how far it got (done, total)."""
        self.say(what)
        return lambda done, total: self.say(f"{what}: {done:,}/{total:,}")

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
