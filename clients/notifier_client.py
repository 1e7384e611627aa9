"""Example client for the notifier server: held requests, ``await``, and the cancel idiom.

Run it from the repository root, with a kernel and the notifier server running::

    ipcfw kernel &
    ipcfw serve servers.notifier:NotifierServer &
    python clients/notifier_client.py
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `servers` and `clients` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ipcfw import Cancelled, KErrCancel, TIpcArgs, TRequestStatus  # noqa: E402

from clients import ExampleClient, Out, check, run_main  # noqa: E402
from servers.notifier import (  # noqa: E402
    ECancelWait,
    EPublish,
    EPublishAfter,
    EWaitForEvent,
    EWaiterCount,
)

TIMEOUT = 5.0  # seconds; an example must never hang


class NotifierClient(ExampleClient):
    """The notifier server's client API.

    ``WaitForEvent`` sends the request at once and returns its `TRequestStatus`, which can be
    waited for (``status.Wait()``) or awaited (``await status``)::

        with NotifierClient.connect() as notifier:
            payload = bytearray(64)
            status = notifier.WaitForEvent(payload)
            value = await status          # payload now holds the event's payload
    """

    SERVER = "notifier"
    PLUGIN = "servers.notifier:NotifierServer"

    def WaitForEvent(self, payload: bytearray | None = None,
                     status: TRequestStatus | None = None) -> TRequestStatus:
        """Ask to be told of the next event. Returns at once; the status completes with the
        event's value, and `payload` (if given) receives the event's payload."""
        status = status if status is not None else TRequestStatus()
        args = TIpcArgs(payload) if payload is not None else TIpcArgs()
        self._session.SendReceive(EWaitForEvent, args, status)
        return status

    def CancelWait(self) -> None:
        """Cancel the outstanding wait: it completes with KErrCancel."""
        self._session.SendReceive(ECancelWait)

    def Publish(self, value: int, payload: bytes = b"") -> int:
        """Publish an event; returns how many waits it wakes (they complete from the server's
        publisher thread)."""
        return self._session.SendReceive(EPublish, TIpcArgs(value, payload))

    def PublishAfter(self, delay_ms: int, value: int, payload: bytes = b"") -> None:
        """Have the server's timer thread publish an event after `delay_ms`."""
        self._session.SendReceive(EPublishAfter, TIpcArgs(delay_ms, value, payload))

    def WaiterCount(self) -> int:
        return self._session.SendReceive(EWaiterCount)


async def _walkthrough(out: Out, endpoint: str | None) -> str:
    with NotifierClient.connect(endpoint) as alice, NotifierClient.connect(endpoint) as bob, \
            NotifierClient.connect(endpoint) as publisher:
        # 1. Two sessions wait; a third publishes once; both wake, from the publisher thread.
        #    The requests leave this thread in order, so both waits are held before the publish.
        alice_payload, bob_payload = bytearray(64), bytearray(64)
        alice_wait = alice.WaitForEvent(alice_payload)
        bob_wait = bob.WaitForEvent(bob_payload)
        woken = publisher.Publish(7, b"door opened")
        values = await asyncio.wait_for(asyncio.gather(alice_wait, bob_wait), TIMEOUT)
        check(woken >= 2, f"EPublish woke {woken} waits, expected at least 2")
        check(values == [7, 7], f"the waits completed with {values}")
        check(alice_payload == bob_payload == b"door opened",
              f"payloads {bytes(alice_payload)!r}, {bytes(bob_payload)!r}")
        out(f"EPublish(7)           -> woke {woken} waits: values {values}, "
            f"payload {bytes(alice_payload)!r}")

        # 2. A delayed publish: the server's timer thread completes the waits later, while its
        #    loop thread keeps answering other requests meanwhile.
        alice_wait = alice.WaitForEvent()
        bob_wait = bob.WaitForEvent()
        publisher.PublishAfter(200, 8)
        held = publisher.WaiterCount()  # served at once, while the two waits are still held
        check(not alice_wait.done() and held >= 2,
              f"{held} waits held, alice done={alice_wait.done()}")
        values = await asyncio.wait_for(asyncio.gather(alice_wait, bob_wait), TIMEOUT)
        check(values == [8, 8], f"the delayed waits completed with {values}")
        out(f"EPublishAfter(200 ms) -> EWaiterCount answered {held} meanwhile; waits got {values}")

        # 3. The cancel idiom: the held wait completes with KErrCancel.
        alice_wait = alice.WaitForEvent()
        alice.CancelWait()
        try:
            await asyncio.wait_for(alice_wait, TIMEOUT)
            check(False, "a cancelled wait completed successfully")
        except Cancelled:
            pass
        check(alice_wait.Int() == KErrCancel, f"cancelled wait has status {alice_wait.Int()}")
        out(f"ECancelWait           -> the wait completed with {alice_wait.Int()} (KErrCancel)")

    return f"{woken} waiters woken by one publish, from the server's publisher thread"


def run(out: Out = print, endpoint: str | None = None) -> str:
    """The walkthrough; returns a one-line summary, raises on failure."""
    return asyncio.run(_walkthrough(out, endpoint))


def main() -> int:
    return run_main("notifier_client", run)


if __name__ == "__main__":
    sys.exit(main())
