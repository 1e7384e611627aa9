"""Example client for the echo server: sync calls, a writable descriptor, async requests.

Run it from the repository root, with a kernel and the echo server running::

    ipcfw kernel &
    ipcfw serve servers.echo:EchoServer &
    python clients/echo_client.py
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `servers` and `clients` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ipcfw import TIpcArgs, TRequestStatus, User  # noqa: E402

if __package__ == "ipcfw.examples.clients":  # installed: the wheel's ipcfw.examples
    from . import ExampleClient, Out, SERVERS, check, run_main
    from ..servers.echo import EAdd, EDesLength, EEchoDes, EEchoInt
else:  # a checkout: clients/ and servers/ side by side at its top
    from clients import ExampleClient, Out, SERVERS, check, run_main  # noqa: E402
    from servers.echo import EAdd, EDesLength, EEchoDes, EEchoInt  # noqa: E402


class EchoClient(ExampleClient):
    """The echo server's client API: one session, one method per server function.

    ::

        with EchoClient.connect() as echo:
            echo.EchoInt(42)          # -> 42
            echo.EchoDes(b"hello")    # -> b"hello"
    """

    SERVER = "echo"
    PLUGIN = f"{SERVERS}.echo:EchoServer"

    # -- synchronous calls: return the completion value or raise its IpcError -------------------

    def EchoInt(self, value: int) -> int:
        return self._session.SendReceive(EEchoInt, TIpcArgs(value))

    def Add(self, a: int, b: int) -> int:
        return self._session.SendReceive(EAdd, TIpcArgs(a, b))

    def DesLength(self, data: bytes) -> int:
        return self._session.SendReceive(EDesLength, TIpcArgs(data))

    def EchoDes(self, data: bytes) -> bytes:
        # A bytearray is a writable descriptor: its length is the max length the server may
        # write; after the call it holds exactly what the server wrote.
        reply = bytearray(len(data))
        self._session.SendReceive(EEchoDes, TIpcArgs(data, reply))
        return bytes(reply)

    # -- asynchronous: returns at once, `status` completes later ---------------------------------

    def EchoIntAsync(self, value: int, status: TRequestStatus) -> None:
        self._session.SendReceive(EEchoInt, TIpcArgs(value), status)


def run(out: Out = print, endpoint: str | None = None) -> str:
    """The walkthrough; returns a one-line summary, raises on failure."""
    with EchoClient.connect(endpoint) as echo:
        value = echo.EchoInt(42)
        check(value == 42, f"EEchoInt(42) returned {value}")
        out(f"EEchoInt(42)          -> {value}")

        total = echo.Add(2, 3)
        check(total == 5, f"EAdd(2, 3) returned {total}")
        out(f"EAdd(2, 3)            -> {total}")

        echoed = echo.EchoDes(b"hello")
        check(echoed == b"hello", f"EEchoDes(b'hello') wrote {echoed!r}")
        out(f"EEchoDes(b'hello')    -> {echoed!r}  (written into our bytearray by the server)")

        # Several asynchronous requests in flight at once, each with its own TRequestStatus.
        statuses = [TRequestStatus() for _ in range(3)]
        for number, status in enumerate(statuses, start=1):
            echo.EchoIntAsync(number * 100, status)
        first = User.WaitForRequest(*statuses, timeout=5.0)
        values = [status.Wait(timeout=5.0) for status in statuses]
        check(values == [100, 200, 300], f"async EEchoInt completed with {values}")
        out(f"3 async EEchoInt      -> {values}  (first done: {first.Int()})")

    return f"sync 42 -> {value}, descriptor {echoed!r} echoed"


def main() -> int:
    return run_main("echo_client", run)


if __name__ == "__main__":
    sys.exit(main())
