"""A self-pipe that lets any thread (or a signal handler) wake a zmq.Poller loop."""

from __future__ import annotations

import os
import threading


class WakePipe:
    """Register `fd` in the loop's poller; `wake()` from anywhere makes it readable.

    Waking after `close()` is harmless: it does nothing.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Close and wake exclude each other, so a wake never writes to a reused fd number.
        # Reentrant: wake() may run in a signal handler that interrupted this thread.
        self._lock = threading.RLock()

    @property
    def fd(self) -> int:
        return self._read

    def wake(self) -> None:
        with self._lock:
            if self._write < 0:
                return  # closed: the loop has stopped
            try:
                os.write(self._write, b"x")
            except BlockingIOError:
                pass  # full: a wake is due anyway

    def drain(self) -> None:
        """Consume every pending wake (call from the loop when `fd` is readable)."""
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            if self._read >= 0:
                os.close(self._read)
                os.close(self._write)
                self._read = self._write = -1

    @property
    def closed(self) -> bool:
        return self._read < 0
