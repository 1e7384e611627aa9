"""A server that gets things wrong on purpose, one way per function: what its client sees of
each mistake (tests/test_error_text.py, and the quoted messages of docs/errors.md)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any
from collections.abc import Awaitable

from ipcfw import CServer, CSession, IpcError, KErrArgument, KErrNotFound, TVersion
from ipcfw.protocol import MAX_ERROR_TEXT

ERaiseText = 1  # raise IpcError(KErrNotFound, "no key b'colour'")
ERaiseOther = 2  # 1 / 0
ECompleteError = 3  # message.Complete(IpcError(KErrArgument, ...))
ECompleteBad = 4  # message.Complete(BAD_VALUES[Int0]): the server catches what it raises
EForget = 5  # return without completing or keeping the message
ELongText = 6  # an error text longer than MAX_ERROR_TEXT
ERaiseIntoBuffer = 7  # write into argument 0, then raise with text (large: shared memory)
EKeep = 8  # keep the message (completed by ECompleteKept)
ECompleteKept = 9  # complete the kept message with Int0
EBareCode = 10  # raise IpcError(KErrNotFound): a code, no text
EForgetOnThread = 11  # hand the message to a thread, which lets go of it without completing it
EForgetAsync = 12  # an async ServiceL (a coroutine) that returns without completing the message
ENotUtf8 = 13  # raise IpcError(KErrNotFound, a text with a file name that is not UTF-8)
ECompleteNotUtf8 = 14  # message.Complete(IpcError(...)) with that text

# A file name as os.fsdecode gives it for bytes that are not UTF-8 (a lone surrogate).
NOT_UTF8 = "no file " + b"caf\xe9.txt".decode("utf-8", "surrogateescape")
# Any other function: CSession's default ServiceL refuses it (KErrNotSupported).

# What ECompleteBad completes with, by Int0.
BAD_VALUES: tuple[Any, ...] = (True, "ok", 2**40, None)


class ErrantSession(CSession):
    def CreateL(self) -> None:
        self.kept: list[Any] = []

    def ServiceL(self, message: Any) -> Awaitable[None] | None:
        function = message.Function()
        if function == EForgetAsync:
            return self.forget_later(message)
        if function == ERaiseText:
            raise IpcError(KErrNotFound, "no key b'colour'")
        if function == ERaiseOther:
            message.Complete(1 // message.Int0())  # Int0 == 0: ZeroDivisionError
        elif function == ECompleteError:
            message.Complete(IpcError(KErrArgument, "the count must be positive, got -3"))
        elif function == ECompleteBad:
            try:
                message.Complete(BAD_VALUES[message.Int0()])
            except (TypeError, ValueError) as exc:  # what the server's code sees at the call
                message.Complete(IpcError(KErrArgument, f"{type(exc).__name__}: {exc}"))
        elif function == EForget:
            pass  # forgotten: neither completed nor kept
        elif function == ELongText:
            raise IpcError(KErrArgument, "x" * (2 * MAX_ERROR_TEXT))
        elif function == ERaiseIntoBuffer:
            message.WriteL(0, b"partial")
            raise IpcError(KErrNotFound, "no such record")
        elif function == EKeep:
            self.kept.append(message)
        elif function == EForgetOnThread:
            # (the thread drops its arguments as it ends: the message is finalized there)
            threading.Thread(target=lambda message: None, args=(message,),
                             name="errant-forgetter").start()
        elif function == ENotUtf8:
            raise IpcError(KErrNotFound, NOT_UTF8)
        elif function == ECompleteNotUtf8:
            message.Complete(IpcError(KErrNotFound, NOT_UTF8))
        elif function == EBareCode:
            raise IpcError(KErrNotFound)
        elif function == ECompleteKept:
            self.kept.pop().Complete(message.Int0())
            message.Complete(0)
        else:
            return super().ServiceL(message)
        return None

    async def forget_later(self, message: Any) -> None:
        await asyncio.sleep(0)  # served on the host's asyncio loop, then let go of


class ErrantServer(CServer):
    name = "errant"
    version = TVersion(1, 2, 0)
    session_class = ErrantSession


class RefusingServer(ErrantServer):
    """Refuses every connect with NotFound, as a server with no such table would."""

    name = "refusing"

    def NewSessionL(self, version: Any, message: Any) -> Any:
        raise IpcError(KErrNotFound, "no table 'orders'")


class TellingServer(ErrantServer):
    """The same, sending the text of its exceptions to its clients."""

    name = "telling"
    send_exception_text = True
