"""A typed interface whose parameters and returns take every form ``ipcfw call --interface``
reads and prints: a str, msgpack values (a list, a dict), a bool, a writable buffer."""

from __future__ import annotations

from ipcfw import CServer, Interface, InterfaceSession, IpcError, KErrArgument, operation
from ipcfw.interface import Buffer


class Calls(Interface, name="calls", version=(1, 2, 0)):
    @operation(1)
    def shout(self, text: str) -> str: ...

    @operation(2)
    def total(self, numbers: list[int], scale: int = 1) -> dict[str, int]: ...

    @operation(3)
    def fill(self, buffer: bytearray, byte: int, twice: bool = False) -> bool: ...

    @operation(4)
    def nothing(self) -> None: ...


class CallsSession(InterfaceSession[Calls]):
    def shout(self, text: str) -> str:
        return text.upper()

    def total(self, numbers: list[int], scale: int = 1) -> dict[str, int]:
        if not numbers:
            raise IpcError(KErrArgument, "no numbers to add")
        return {"sum": sum(numbers) * scale, "count": len(numbers)}

    def fill(self, buffer: Buffer, byte: int, twice: bool = False) -> bool:
        length = buffer.max_length // (1 if twice else 2)
        buffer[:] = bytes([byte]) * length
        return twice

    def nothing(self) -> None:
        return None


class CallsServer(CServer):
    name = Calls.interface.name
    version = Calls.interface.version
    session_class = CallsSession
