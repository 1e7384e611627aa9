"""CPolicyServer: a server's security policy as data, checked before each request's ServiceL.

Symbian's ``CPolicyServer``. A server declares, per range of function numbers, what a client
must hold for its requests to reach ``ServiceL``; the check reads what the kernel vouched for
(``RMessage.HasCapability``, ``SecureId``, ``VendorId``), never the client's word. ::

    class KvServer(CPolicyServer):
        policy = TPolicy(
            on_connect=ALWAYS_PASS,
            ranges=[
                (0, NOT_SUPPORTED),                                   # 0
                (EGet, TPolicyElement(TSecurityPolicy("ReadUserData"))),   # EGet ... ESet-1
                (ESet, TPolicyElement(TSecurityPolicy("WriteUserData"))),  # ESet ... ELast
                (ELast + 1, NOT_SUPPORTED),                           # the rest
            ],
        )

`ranges` are (first function number, element) pairs, ascending from 0: each range runs to the
next one's first number, the last to 2**31-1, so every function number has exactly one
element (a gap cannot be written). An element is `ALWAYS_PASS`, `NOT_SUPPORTED`
(``KErrNotSupported``), `CUSTOM_CHECK` (``CPolicyServer.CustomSecurityCheckL`` decides, at
once or later: an ``async def`` one), or a `TPolicyElement`: a `TSecurityPolicy` and the
action when it fails: `EFailClient` (``KErrPermissionDenied``, its text saying what was
missing), `EPanicClient` (the client panics ``E32USER-CBase 103``), `EPassAndLog` (served,
with a warning in the server's log: for rolling a policy out), or a negative number of your
own, handed to ``CustomFailureActionL``. `on_connect` applies the same way to a connect,
before ``AcceptL``. A disconnect is never checked, nor ``RSession.ErrorString``.

A malformed policy raises ``ValueError`` (or ``TypeError``) where it is written: at class
creation. The decision (`decide`) is pure; `PolicyGate` applies it to a message.
"""

from __future__ import annotations

import bisect
import enum
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .. import errors
from ..protocol import I32_MAX
from ..security import TSecurityPolicy
from .message import RMessage
from .plugin import CServer, CSession

log = logging.getLogger("ipcfw.server.policy")

__all__ = [
    "ALWAYS_PASS",
    "CUSTOM_CHECK",
    "CPolicyServer",
    "CustomResult",
    "EFailClient",
    "EPanicClient",
    "EPassAndLog",
    "NOT_SUPPORTED",
    "TPolicy",
    "TPolicyElement",
]

#: Failure actions of a `TPolicyElement` (Symbian's ``TFailureAction``; `EPassAndLog` is ours).
EFailClient = 0
EPanicClient = 1
EPassAndLog = 2
#: Symbian's panic for `EPanicClient`.
POLICY_PANIC = ("E32USER-CBase", 103)


class Special(enum.Enum):
    """The elements that are not a check: Symbian's ``EAlwaysPass``, ``ENotSupported``,
    ``ECustomCheck``."""

    ALWAYS_PASS = "always pass"
    NOT_SUPPORTED = "not supported"
    CUSTOM_CHECK = "custom check"

    def __repr__(self) -> str:
        return self.name


ALWAYS_PASS = Special.ALWAYS_PASS
NOT_SUPPORTED = Special.NOT_SUPPORTED
CUSTOM_CHECK = Special.CUSTOM_CHECK


class CustomResult(enum.Enum):
    """What ``CustomSecurityCheckL`` decides (Symbian's ``TCustomResult``; its ``EAsync`` is an
    ``async def`` check here)."""

    EPass = 0
    EFail = 1


@dataclass(frozen=True)
class TPolicyElement:
    """A check and what to do when it fails (Symbian's ``TPolicyElement``)."""

    policy: TSecurityPolicy
    action: int = EFailClient

    def __post_init__(self) -> None:
        if not isinstance(self.policy, TSecurityPolicy):
            raise TypeError(f"TPolicyElement takes a TSecurityPolicy, not {self.policy!r}")
        if type(self.action) is not int or self.action > EPassAndLog:
            raise ValueError(f"a failure action is EFailClient, EPanicClient, EPassAndLog or a "
                             f"negative number of your own (CustomFailureActionL), not "
                             f"{self.action!r}")


Element = Special | TPolicyElement


class TPolicy:
    """A server's policy (Symbian's ``TPolicy``): see the module's documentation."""

    def __init__(self, ranges: Sequence[tuple[int, Element]],
                 on_connect: Element = ALWAYS_PASS) -> None:
        self.on_connect = _element(on_connect, "on_connect")
        if not ranges:
            raise ValueError("a policy needs at least one range, the first from 0")
        firsts: list[int] = []
        elements: list[Element] = []
        for index, item in enumerate(ranges):
            try:
                first, element = item
            except (TypeError, ValueError):
                raise TypeError(f"range {index}: a (first function number, element) pair, "
                                f"not {item!r}") from None
            if type(first) is not int or not 0 <= first <= I32_MAX:
                raise ValueError(f"range {index}: its first function number must be an int "
                                 f"in 0..2**31-1, not {first!r}")
            if index == 0 and first != 0:
                raise ValueError(f"range 0 must begin at function 0, not {first}: the "
                                 f"numbers below it would have no policy")
            if firsts and first <= firsts[-1]:
                raise ValueError(f"range {index} begins at {first}, not after range "
                                 f"{index - 1}'s {firsts[-1]}: ranges go in ascending order")
            firsts.append(first)
            elements.append(_element(element, f"range {index}"))
        self.firsts = tuple(firsts)
        self.elements = tuple(elements)

    def element(self, function: int) -> Element:
        """The element for `function` (a request's function number, >= 0)."""
        return self.elements[bisect.bisect_right(self.firsts, function) - 1]

    def __repr__(self) -> str:
        ranges = ", ".join(f"({f}, {e!r})" for f, e in zip(self.firsts, self.elements))
        return f"TPolicy(ranges=[{ranges}], on_connect={self.on_connect!r})"


def _element(element: object, where: str) -> Element:
    if isinstance(element, (Special, TPolicyElement)):
        return element
    if isinstance(element, TSecurityPolicy):
        raise TypeError(f"{where}: wrap the TSecurityPolicy in TPolicyElement(policy, action), "
                        f"which says what to do when it fails")
    raise TypeError(f"{where}: an element is ALWAYS_PASS, NOT_SUPPORTED, CUSTOM_CHECK or a "
                    f"TPolicyElement, not {element!r}")


class CPolicyServer(CServer):
    """A server whose requests are checked against `policy` before ``ServiceL`` (Symbian's
    ``CPolicyServer``): see the module's documentation."""

    policy: ClassVar[TPolicy]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        policy = cls.__dict__.get("policy", getattr(cls, "policy", None))
        if not isinstance(policy, TPolicy):
            raise TypeError(f"{cls.__name__}: a CPolicyServer declares `policy = TPolicy(...)`, "
                            f"not {policy!r}")

    def CustomSecurityCheckL(self, message: RMessage
                             ) -> CustomResult | Awaitable[CustomResult]:
        """Decide a `CUSTOM_CHECK` range's request (or a connect, for `on_connect`): return
        ``CustomResult.EPass`` or ``EFail``; or, to decide later (Symbian's ``EAsync``), be an
        ``async def`` that returns one: the request stays held meanwhile (a cancel or the
        client's death cancels the check). A failure is answered ``KErrPermissionDenied``;
        raise an ``IpcError`` for another code. The default fails (Symbian's panics)."""
        log.error("%s declares CUSTOM_CHECK but does not override CustomSecurityCheckL",
                  type(self).__name__)
        return CustomResult.EFail

    def CustomFailureActionL(self, message: RMessage, action: int, missing: str) -> None:
        """A check whose element's action is negative (yours) failed: act on `message` (which
        you must complete or panic); `missing` says what the client lacked. The default
        completes it with ``KErrPermissionDenied``."""
        message.Complete(errors.IpcError(errors.KErrPermissionDenied, missing))


# -- the decision -----------------------------------------------------------------------------


class Verdict(enum.Enum):
    PASS = "pass"
    NOT_SUPPORTED = "not supported"
    CUSTOM = "custom"
    FAIL = "fail"


def decide(element: Element, message: RMessage) -> tuple[Verdict, str]:
    """What `element` says of `message`'s client: (verdict, what it lacks, for FAIL)."""
    if element is ALWAYS_PASS:
        return Verdict.PASS, ""
    if element is NOT_SUPPORTED:
        return Verdict.NOT_SUPPORTED, ""
    if element is CUSTOM_CHECK:
        return Verdict.CUSTOM, ""
    assert isinstance(element, TPolicyElement)
    client = message.Client()
    missing = element.policy.missing(client.capabilities, message.SecureId(), message.VendorId())
    return (Verdict.PASS, "") if missing is None else (Verdict.FAIL, missing)


class PolicyGate:
    """A `CPolicyServer`'s policy applied to its messages, by the server's state.

    `serve(session, message)` serves a request that passed; `start(session, message,
    awaitable)` runs a coroutine as an async ``ServiceL``'s (for an async custom check)."""

    def __init__(self, server: CPolicyServer,
                 start: Callable[[CSession, RMessage, Awaitable[Any]], None]) -> None:
        self.server = server
        self._start = start

    def admits_connect(self, message: RMessage) -> None:
        """Check a connect against `on_connect`; raise ``IpcError(KErrPermissionDenied)`` (or
        what a custom check raised) to refuse it. A custom check must decide at once here."""
        verdict, missing = decide(self.server.policy.on_connect, message)
        if verdict is Verdict.CUSTOM:
            result = self.server.CustomSecurityCheckL(message)
            if inspect.isawaitable(result):
                _close(result)
                raise TypeError(f"{type(self.server).__name__}.CustomSecurityCheckL must decide "
                                "a connect at once (an async check is for requests)")
            verdict, missing = _custom(result, "the server's custom check on connect")
        if verdict is Verdict.NOT_SUPPORTED:
            raise errors.IpcError(errors.KErrNotSupported,
                                  f"server {self.server.name!r} takes no connects (its policy)")
        if verdict is Verdict.FAIL:
            raise errors.IpcError(errors.KErrPermissionDenied,
                                  self._denial(message, "connect to", missing))

    def admits(self, session: CSession, message: RMessage,
               serve: Callable[[CSession, RMessage], None]) -> bool:
        """True: serve `message` now. False: the gate has dealt with it (answered, panicked,
        or a custom check decides later and then calls `serve`)."""
        function = message.Function()
        element = self.server.policy.element(function)
        verdict, missing = decide(element, message)
        if verdict is Verdict.PASS:
            return True
        if verdict is Verdict.CUSTOM:
            result = self.server.CustomSecurityCheckL(message)
            if inspect.isawaitable(result):
                self._start(session, message, self._decide_later(session, message, result,
                                                                 serve))
                return False
            verdict, missing = _custom(result, "the server's custom check")
            if verdict is Verdict.PASS:
                return True
        if verdict is Verdict.NOT_SUPPORTED:
            message.Complete(errors.IpcError(errors.KErrNotSupported, (
                f"server {self.server.name!r} does not support function {function} (its "
                "policy says so): check the function number the client sends")))
            return False
        return self._failed(element, message, missing)

    async def _decide_later(self, session: CSession, message: RMessage,
                            pending: Awaitable[CustomResult],
                            serve: Callable[[CSession, RMessage], None]) -> None:
        verdict, missing = _custom(await pending, "the server's custom check")
        if verdict is Verdict.PASS:
            served = session.ServiceL(message)
            if served is not None and inspect.isawaitable(served):
                await served
        elif not message.IsNull():
            self._failed(CUSTOM_CHECK, message, missing)

    def _failed(self, element: Element, message: RMessage, missing: str) -> bool:
        action = element.action if isinstance(element, TPolicyElement) else EFailClient
        text = self._denial(message, f"function {message.Function()} of", missing)
        if action == EPassAndLog:
            log.warning("%s (passed: the policy's action is EPassAndLog)", text)
            return True
        if action == EFailClient:
            log.info("%s", text)
            message.Complete(errors.IpcError(errors.KErrPermissionDenied, text))
        elif action == EPanicClient:
            log.warning("%s: panicking the client %s %d", text, *POLICY_PANIC)
            message.Panic(*POLICY_PANIC)
        else:
            self.server.CustomFailureActionL(message, action, text)
        return False

    def _denial(self, message: RMessage, what: str, missing: str) -> str:
        client = message.Client()
        return (f"{what} server {self.server.name!r} needs {missing}, which pid {client.pid} "
                f"({client.exe or 'unknown executable'}, uid {client.uid}) does not hold")


def _custom(result: object, where: str) -> tuple[Verdict, str]:
    if result is CustomResult.EPass:
        return Verdict.PASS, ""
    if result is CustomResult.EFail:
        return Verdict.FAIL, "what its custom security check asks"
    raise TypeError(f"{where} must return CustomResult.EPass or EFail, not {result!r}")


def _close(awaitable: object) -> None:
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()
