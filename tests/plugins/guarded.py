"""A CPolicyServer for the policy process tests: each function's range asks for something."""

from __future__ import annotations

import asyncio

from ipcfw import (
    ALWAYS_PASS,
    CUSTOM_CHECK,
    NOT_SUPPORTED,
    CPolicyServer,
    CSession,
    CustomResult,
    EPanicClient,
    RMessage,
    TPolicy,
    TPolicyElement,
    TSecurityPolicy,
)

EPing, ERead, EBilling, EPanicky, EAsyncCheck, ELast = 0, 1, 2, 3, 4, 5


class GuardedSession(CSession):
    def ServiceL(self, message: RMessage) -> None:
        message.Complete(100 + message.Function())


class GuardedServer(CPolicyServer):
    name = "guarded"
    session_class = GuardedSession
    policy = TPolicy([
        (EPing, ALWAYS_PASS),
        (ERead, TPolicyElement(TSecurityPolicy("ReadUserData"))),  # granted to every process
        (EBilling, TPolicyElement(TSecurityPolicy("com.example.Billing"))),  # granted to none
        (EPanicky, TPolicyElement(TSecurityPolicy("TCB"), EPanicClient)),
        (EAsyncCheck, CUSTOM_CHECK),
        (ELast, NOT_SUPPORTED),
    ])

    async def CustomSecurityCheckL(self, message: RMessage) -> CustomResult:
        await asyncio.sleep(0.05)  # (decided later: another session is served meanwhile)
        return CustomResult.EPass if message.Int0() == 1 else CustomResult.EFail
