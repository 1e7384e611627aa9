"""A typed interface served by ``async def`` methods, for tests: one operation sleeps, one
waits until it is cancelled (and counts the cancellations), one raises, one is plain ``def``."""

from __future__ import annotations

import asyncio

from ipcfw import CServer, Interface, InterfaceSession, IpcError, operation


class Sleeper(Interface, name="sleeper", version=(1, 0, 0)):
    @operation(1)
    def sleep_then(self, delay_ms: int, value: int) -> int: ...

    @operation(2)
    def shout(self, text: str) -> str: ...

    @operation(3)
    def fail(self, code: int) -> None: ...

    @operation(4)
    def wait_forever(self) -> None: ...

    @operation(5)
    def cancellations(self) -> int: ...

    @operation(6)
    def waiting(self) -> int: ...

    @operation(7)
    def caller_pid(self) -> int: ...


class SleeperSession(InterfaceSession[Sleeper]):
    async def sleep_then(self, delay_ms: int, value: int) -> int:
        await asyncio.sleep(delay_ms / 1000)
        return value

    async def shout(self, text: str) -> str:
        await asyncio.sleep(0)
        return text.upper()

    async def fail(self, code: int) -> None:
        await asyncio.sleep(0)
        raise IpcError(code, "failed on purpose")

    async def wait_forever(self) -> None:
        server = self.Server()
        server.waiting += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            server.cancellations += 1
            raise
        finally:
            server.waiting -= 1

    def cancellations(self) -> int:
        return int(self.Server().cancellations)

    def waiting(self) -> int:
        return int(self.Server().waiting)

    async def caller_pid(self) -> int:
        await asyncio.sleep(0)
        return self.Message().Client().pid


class SleeperServer(CServer):
    name = Sleeper.interface.name
    version = Sleeper.interface.version
    session_class = SleeperSession

    def __init__(self) -> None:
        self.cancellations = 0
        self.waiting = 0
