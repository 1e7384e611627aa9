"""The rules of a thread's move to its direct connection (ipcfw.client.joining), with no
process, socket or thread: the steps a `Joining` decides, call after call, as answers come.
"""

from __future__ import annotations

from ipcfw.client.joining import Joining, Step
from ipcfw.protocol import Mode

HANDLE = 0x42
SYNC, ASYNC, BLIND = int(Mode.SYNC), int(Mode.ASYNC), int(Mode.BLIND)


def attached(pending: set[int], *, first: int = ASYNC) -> Joining:
    """A move whose first call (`first`, req_id 1) went on the kernel path and whose Join
    (req_id 2) and Attach (req_id 3) were answered."""
    joining = Joining(HANDLE)
    assert joining.decide(pending) is Step.KERNEL
    if joining.join_now(first):
        joining.join_sent(2)
        assert not joining.sent(1, first)
    else:
        assert joining.sent(1, first)
        joining.join_sent(2)
    joining.joined(0, "/k/d-1", b"ticket")
    assert joining.decide(pending) is Step.ATTACH
    joining.attach_sent(3)
    assert joining.decide(pending) is Step.KERNEL  # (no answer yet)
    joining.attach_answered(HANDLE)
    return joining


def test_the_first_call_goes_on_the_kernel_path_and_the_join_follows_its_request() -> None:
    joining = Joining(HANDLE)
    assert joining.decide(set()) is Step.KERNEL
    assert not joining.join_now(ASYNC)  # not before an asynchronous request...
    assert joining.sent(1, ASYNC)  # ...after it, so that its answer proves it
    joining.join_sent(2)
    assert joining.decide({1}) is Step.KERNEL  # no answer yet: the kernel path, no new Join
    assert not joining.sent(4, ASYNC)


def test_a_synchronous_first_call_sends_the_join_before_it() -> None:
    joining = Joining(HANDLE)
    assert joining.decide(set()) is Step.KERNEL
    assert joining.join_now(SYNC)


def test_the_thread_switches_once_attached_when_every_earlier_request_is_proved() -> None:
    joining = attached({1})  # request 1, still pending, went before the Join: proved by it
    assert joining.decide({1}) is Step.SWITCH


def test_an_async_request_after_the_join_holds_the_switch_until_it_completes() -> None:
    joining = Joining(HANDLE)
    joining.decide(set())
    joining.sent(1, ASYNC)
    joining.join_sent(2)
    joining.sent(5, ASYNC)  # after the Join: not proved by its answer
    joining.joined(0, "/k/d-1", b"ticket")
    assert joining.decide({5}) is Step.ATTACH
    joining.attach_sent(3)
    joining.attach_answered(HANDLE)
    assert joining.decide({5}) is Step.KERNEL  # 5 may still be on its way to the server
    assert joining.sent(6, ASYNC)  # a Join to prove them follows the next request
    joining.join_sent(7)
    assert joining.decide({5, 6}) is Step.KERNEL  # (until its answer)
    joining.joined(0, "/k/d-1", b"ticket-2")
    assert joining.decide({5, 6}) is Step.SWITCH  # its answer proves 5 and 6


def test_a_completed_async_request_proves_itself() -> None:
    joining = attached(set())
    joining.sent(5, ASYNC)
    assert joining.decide({5}) is Step.KERNEL
    assert joining.decide(set()) is Step.SWITCH  # 5 completed


def test_a_blind_request_is_proved_only_by_a_later_join_or_synchronous_answer() -> None:
    joining = attached(set())
    joining.sent(5, BLIND)  # the kernel's acknowledgement proves nothing
    assert joining.decide(set()) is Step.KERNEL
    assert not joining.join_now(SYNC)  # (a synchronous call proves it by its answer)
    assert not joining.sent(6, SYNC)  # answered by the server: 5 arrived before it
    assert joining.decide(set()) is Step.SWITCH


def test_no_ticket_keeps_the_kernel_path_and_a_refused_attach_too() -> None:
    joining = Joining(HANDLE)
    joining.decide(set())
    joining.sent(1, ASYNC)
    joining.join_sent(2)
    joining.joined(0)  # answered without a ticket: the server takes none
    assert joining.decide(set()) is Step.STAY
    assert "no ticket" in joining.why_staying()
    refused = attached(set())
    refused.attach_result = -46  # (KErrPermissionDenied, instead of the handle)
    refused.attached = False
    assert refused.decide(set()) is Step.STAY
    assert "refused its Attach" in refused.why_staying()


def test_a_refused_join_is_forgotten_and_a_lost_one_asked_again() -> None:
    joining = Joining(HANDLE)
    joining.decide(set())
    joining.sent(1, ASYNC)
    joining.join_sent(2)
    joining.joined(-9)  # KErrOverflow: the 255 threads
    assert joining.decide(set()) is Step.FORGET
    lost = Joining(HANDLE)
    lost.decide(set())
    lost.sent(1, ASYNC)
    lost.join_sent(2)
    lost.join_lost()  # its channel was dropped before the answer
    assert lost.decide(set()) is Step.KERNEL
    assert lost.sent(4, ASYNC)  # asked again, after the next request
