"""One thread's move of one shared direct session from the kernel path to the thread's direct
connection, without ever making a call wait for it. No I/O.

Theory of operation
-------------------
A thread other than the creator (after ``ShareAuto``, or in a process that ``Open``ed the
session) needs a ticket of its own before it can use its direct connection: the kernel's
answer to a ``Join``, sent once the server holds the ticket (the kernel's ``Admit``). That
takes a round trip through the kernel to the server's loop, which may be busy in a long
``ServiceL``; no call waits for it. The runtime (`ipcfw.client.runtime`) asks a `Joining` at
each call of the thread on the session what to do (`Joining.decide`), does it, and tells it
what happened; whoever reads an answer (the thread, a waiter, the I/O thread) records it here
(`joined`, `attach_answered`) and nothing more.

Rules this module keeps:

1. Until the thread switches, its calls on the session go on the kernel path. The first one
   never waits: the Join leaves right after the call's request (before it, for a synchronous
   call, which proves its own arrival by its answer).
2. A Join answered with a ticket: the thread's direct connection presents it (``Attach``,
   asynchronous: its answer is read like any other); without one (the server takes no direct
   connection, a kernel limit), or with a refused Attach, the thread keeps the kernel path for
   good. A refused Join (a handle not held, the 255 threads, a dead session) decides nothing:
   the kernel refuses the call itself, and the thread's next call asks again.
3. One thread's requests on a session reach the server in the order it made them, across the
   switch. The kernel passes a Join on to the server (as an ``Admit``) behind every request
   the thread sent through it before, and the server takes them in that order: so a Join's
   answer proves that every kernel-path request sent before it has reached the server. A
   request sent after the last Join is proved by its own answer (an asynchronous one once it
   completes; a blind one, ``Send``, never: the kernel acknowledges it), or by the server's
   answer to a later synchronous one (a value >= 0: the kernel itself answers a request only
   with an error), which the server took after it. So the thread switches once the session
   is attached on its connection and every kernel-path request since the last Join is proved;
   otherwise another Join is sent (after the next kernel-path request), whose answer proves
   them all. (A thread that never pauses its asynchronous or blind requests may stay on the
   kernel path for as long.)
4. A Join whose channel ended before its answer came (the kernel stopped serving it) is asked
   again on the thread's new channel.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Container

from ..protocol import Mode

_ASYNC, _BLIND = int(Mode.ASYNC), int(Mode.BLIND)


class Step(enum.Enum):
    """What the runtime does at a call of a thread that has not switched yet (`decide`)."""

    KERNEL = "kernel"  # this call takes the kernel path; the move goes on
    ATTACH = "attach"  # connect (if not yet) and send Attach with `ticket`; this call: kernel
    SWITCH = "switch"  # this call and every later one take the direct connection
    STAY = "stay"  # the kernel path for good (no ticket, or the Attach was refused)
    FORGET = "forget"  # the Join was refused: forget this move (the next call starts anew)


class Joining:
    """One thread's move of session `handle` to its direct connection (rules 1-4)."""

    __slots__ = ("handle", "join_id", "join_due", "answer", "ticket", "path", "attach_id",
                 "attach_result", "attached", "unproven", "blind", "covered", "covered_blind")

    def __init__(self, handle: int) -> None:
        self.handle = handle
        self.join_id = 0  # the Join in flight (0: none)
        self.join_due = True  # a Join is to be sent at the next chance (rule 1)
        # The answer to the Join in flight, (result, server socket, ticket): written by
        # whoever reads it (`joined`), taken by `decide` on the thread's next call.
        self.answer: tuple[int, str, bytes] | None = None
        self.ticket = b""  # from the first Join answered with one
        self.path = ""  # the server's socket, with it
        self.attach_id = 0  # the Attach in flight or answered (0: not sent yet)
        self.attach_result: int | None = None  # its answer, once read (`attach_answered`)
        self.attached = False
        # Asynchronous kernel-path requests sent since the last Join (rule 3), oldest first,
        # and whether a blind one was; and those sent before the Join in flight, which its
        # answer will prove.
        self.unproven: deque[int] = deque()
        self.blind = False
        self.covered: deque[int] = deque()
        self.covered_blind = False

    def __repr__(self) -> str:
        return (f"<Joining 0x{self.handle:x} join={self.join_id} attach={self.attach_id}"
                f"{' attached' if self.attached else ''} unproven={len(self.unproven)}"
                f"{' blind' if self.blind else ''}>")

    def why_staying(self) -> str:
        """Why `decide` said STAY, in words (for the log)."""
        if self.attach_result is not None:
            return f"the server refused its Attach ({self.attach_result})"
        if not self.ticket:
            return "the kernel gave it no ticket (the server took none)"
        return "no direct connection could be made"

    # -- what arrives (any thread) --------------------------------------------------------------

    def joined(self, result: int, path: str = "", ticket: bytes = b"") -> None:
        """The kernel answered the Join in flight: `result` < 0 if refused (or panicked)."""
        self.answer = (result, path, ticket)

    def attach_answered(self, value: int) -> None:
        """The server answered the Attach: the session's handle if it attached it."""
        self.attach_result = value

    # -- the thread's own calls ---------------------------------------------------------------

    def decide(self, pending: Container[int]) -> Step:
        """What the thread's call does now (rules 1-3). `pending`: the req_ids of the
        runtime's requests still pending (`ClientState.pending`)."""
        answer = self.answer
        if answer is not None:
            self.answer = None
            self.join_id = 0
            self.covered.clear()  # (proved, whatever the answer: the server had them first)
            self.covered_blind = False
            result, path, ticket = answer
            if result < 0:
                return Step.FORGET
            if not self.ticket:
                if not ticket:
                    return Step.STAY
                self.ticket, self.path = ticket, path
        if self.attach_result is not None and not self.attached:
            if self.attach_result != self.handle:
                return Step.STAY
            self.attached = True
        if self.ticket and not self.attach_id:
            return Step.ATTACH
        if not self.attached:
            return Step.KERNEL
        if not (self.blind or self.covered_blind or _pending(self.covered, pending)
                or _pending(self.unproven, pending)):
            return Step.SWITCH
        if not self.join_id:
            self.join_due = True  # a Join proves them (rule 3)
        return Step.KERNEL

    def join_now(self, mode: int) -> bool:
        """Whether to send a Join before the call's request (`mode`): the first one, for the
        ticket, when the call is synchronous (rule 1; its answer proves it, so a Join to prove
        requests waits until after an asynchronous or blind one). `join_sent` must follow."""
        return (self.join_due and not self.join_id and not self.ticket
                and mode != _ASYNC and mode != _BLIND)

    def sent(self, req_id: int, mode: int) -> bool:
        """The thread's call sent request `req_id` (`mode`) on the kernel path; a synchronous
        one has been answered by the server (a value >= 0: the kernel answers no request
        with one itself), which proves every earlier one (rule 3). Returns whether to send a
        Join now, after it (`join_sent` must follow if so)."""
        if mode == _ASYNC:
            self.unproven.append(req_id)
        elif mode == _BLIND:
            self.blind = True
        else:
            self.unproven.clear()
            self.blind = False
            self.covered.clear()
            self.covered_blind = False
            if self.ticket:
                self.join_due = False  # (proved: no Join needed for that)
        return self.join_due and not self.join_id

    def join_sent(self, req_id: int) -> None:
        """A Join `req_id` left, behind every kernel-path request of the thread so far."""
        self.join_id = req_id
        self.join_due = False
        self.covered, self.unproven = self.unproven, self.covered  # (which is empty)
        self.covered_blind, self.blind = self.blind, False

    def join_lost(self) -> None:
        """The Join in flight will not be answered (its channel ended): ask again (rule 4)."""
        if self.answer is None:
            self.join_id = 0
            self.join_due = True
            self.covered.extend(self.unproven)
            self.unproven, self.covered = self.covered, deque()
            self.blind = self.blind or self.covered_blind
            self.covered_blind = False

    def attach_sent(self, req_id: int) -> None:
        """The Attach `req_id` left on the thread's direct connection."""
        self.attach_id = req_id


def _pending(requests: deque[int], pending: Container[int]) -> bool:
    """Whether any of `requests` (oldest first) is still pending; drops those that are not:
    completed, each proved by its answer (rule 3)."""
    while requests and requests[0] not in pending:
        requests.popleft()
    return bool(requests)
