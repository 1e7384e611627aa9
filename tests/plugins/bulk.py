"""A server plugin for large descriptors (shared memory on the direct path): each function
reads or writes its descriptors with `ReadL`/`WriteL` at offsets given as ints."""

from __future__ import annotations

import os
import zlib

from ipcfw import CServer, CSession, IpcError, KErrNotSupported, RMessage, TVersion

ECopy = 1  # WriteL(1, ReadL(0, offset=Int2), offset=Int3); complete with GetDesLength(1)
ECrc = 2  # complete with crc32(ReadL(Int1, offset=Int2)) & 0x7fffffff
ELengths = 3  # complete with GetDesLength(Int1) (Int2 == 0) or GetDesMaxLength(Int1)
EReverse = 4  # WriteL(0, ReadL(0)[::-1]): an in-out descriptor; complete with its length
EFill = 5  # WriteL(0, bytes([Int1]) * Int2, offset=Int3); complete with GetDesLength(0)
EHold = 6  # keep the message (tag Int1)
ECompleteHeld = 7  # WriteL(0, ReadL(1)) into the held message Int0 (its arg 0), complete it
EFds = 8  # complete with the number of this process's open file descriptors
ETryAfter = 9  # complete, then try ReadL(0) and record the error code it raised (0: none)
ELastError = 10  # complete with minus the code the last ETryAfter recorded


class BulkSession(CSession):
    def ServiceL(self, message: RMessage) -> None:
        server: BulkServer = self.Server()
        function = message.Function()
        if function == ECopy:
            message.WriteL(1, message.ReadL(0, message.Int2()), message.Int3())
            message.Complete(message.GetDesLength(1))
        elif function == ECrc:
            data = message.ReadL(message.Int1(), message.Int2())
            message.Complete(zlib.crc32(data) & 0x7FFFFFFF)
        elif function == ELengths:
            index = message.Int1()
            if message.Int2() == 0:
                message.Complete(message.GetDesLength(index))
            else:
                message.Complete(message.GetDesMaxLength(index))
        elif function == EReverse:
            message.WriteL(0, message.ReadL(0)[::-1])
            message.Complete(message.GetDesLength(0))
        elif function == EFill:
            message.WriteL(0, bytes([message.Int1()]) * message.Int2(), message.Int3())
            message.Complete(message.GetDesLength(0))
        elif function == EHold:
            server.held[message.Int1()] = message
        elif function == ECompleteHeld:
            held = server.held.pop(message.Int0())
            held.WriteL(0, message.ReadL(1))
            held.Complete(held.GetDesLength(0))
            message.Complete(0)
        elif function == EFds:
            message.Complete(len(os.listdir("/proc/self/fd")))
        elif function == ETryAfter:
            message.Complete(0)
            try:
                message.ReadL(0)
                server.last_error = 0
            except IpcError as exc:
                server.last_error = exc.code
        elif function == ELastError:
            message.Complete(-server.last_error)
        else:
            raise IpcError(KErrNotSupported, f"bulk has no function {function}")


class BulkServer(CServer):
    name = "bulk"
    version = TVersion(1, 0, 0)
    session_class = BulkSession

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[int, RMessage] = {}
        self.last_error = 0
