"""An ``async def ServiceL`` server for tests: requests await gates, sleeps and threads, and the
server records what its coroutines did (started, finished, cancelled) for the tests to read."""

from __future__ import annotations

import asyncio
import json

from ipcfw import CServer, CSession, IpcError, KErrNotSupported, RMessage, TVersion

EWait = 1  # await gate Int0 (opened by EOpen), then complete with Int1
EOpen = 2  # open gate Int0; complete with 0
ERaise = 3  # await a turn of the loop, then raise ValueError
EEvents = 4  # write the recorded events (JSON) into writable arg 0
EFromThread = 5  # complete with Int0 from a thread of the loop's executor
EStart = 6  # record ("start", Int0), await a turn of the loop, complete with Int0


def recorded_events(session) -> list:
    buffer = bytearray(1 << 16)
    session.SendReceive(EEvents, (buffer,))
    return json.loads(buffer)


class AioSession(CSession):
    async def ServiceL(self, message: RMessage) -> None:
        server: AioServer = self.Server()
        function = message.Function()
        if function == EWait:
            await self._wait(server, message)
        elif function == EOpen:
            server.gate(message.Int0()).set()
            message.Complete(0)
        elif function == ERaise:
            await asyncio.sleep(0)
            raise ValueError("aio raised on purpose")
        elif function == EEvents:
            message.WriteL(0, json.dumps(server.events).encode())
            message.Complete(0)
        elif function == EFromThread:
            await asyncio.get_running_loop().run_in_executor(None, message.Complete, message.Int0())
        elif function == EStart:
            server.events.append(["start", message.Int0()])
            await asyncio.sleep(0)
            message.Complete(message.Int0())
        else:
            raise IpcError(KErrNotSupported, f"aio has no function {function}")

    async def _wait(self, server: AioServer, message: RMessage) -> None:
        tag = message.Int0()
        try:
            await server.gate(tag).wait()
        except asyncio.CancelledError:
            server.events.append(["cancelled", tag])
            raise
        message.Complete(message.Int1())


class AioServer(CServer):
    name = "aio"
    version = TVersion(1, 0, 0)
    session_class = AioSession

    def __init__(self) -> None:
        self.events: list[list[object]] = []
        self._gates: dict[int, asyncio.Event] = {}

    def gate(self, tag: int) -> asyncio.Event:
        return self._gates.setdefault(tag, asyncio.Event())
