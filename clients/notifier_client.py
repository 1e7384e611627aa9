"""Example client for the notifier server, through its typed interface (`Notifier`): held
requests, ``await``, and the cancel idiom.

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

from ipcfw import Cancelled, KErrCancel  # noqa: E402

if __package__ == "ipcfw.examples.clients":  # installed: the wheel's ipcfw.examples
    from . import Out, SERVERS, check, connect_proxy, run_main
    from ..servers.notifier import Notifier
else:  # a checkout: clients/ and servers/ side by side at its top
    from clients import Out, SERVERS, check, connect_proxy, run_main  # noqa: E402
    from servers.notifier import Notifier  # noqa: E402

PLUGIN = f"{SERVERS}.notifier:NotifierServer"
TIMEOUT = 5.0  # seconds; an example must never hang


async def _walkthrough(out: Out, endpoint: str | None) -> str:
    with connect_proxy(Notifier, PLUGIN, endpoint) as alice, \
            connect_proxy(Notifier, PLUGIN, endpoint) as bob, \
            connect_proxy(Notifier, PLUGIN, endpoint) as publisher:
        # 1. Two sessions wait; a third publishes once; both wake, from the publisher thread.
        #    `send` returns a Reply at once; the requests leave this thread in order, so both
        #    waits are held before the publish.
        alice_payload, bob_payload = bytearray(64), bytearray(64)
        alice_wait = alice.wait_for_event.send(alice_payload)
        bob_wait = bob.wait_for_event.send(bob_payload)
        woken = publisher.publish(7, b"door opened")
        values = await asyncio.wait_for(asyncio.gather(alice_wait, bob_wait), TIMEOUT)
        check(woken >= 2, f"publish woke {woken} waits, expected at least 2")
        check(values == [7, 7], f"the waits completed with {values}")
        check(alice_payload == bob_payload == b"door opened",
              f"payloads {bytes(alice_payload)!r}, {bytes(bob_payload)!r}")
        out(f"publish(7)            -> woke {woken} waits: values {values}, "
            f"payload {bytes(alice_payload)!r}")

        # 2. A delayed publish: the server's timer thread answers the waits later, while its
        #    loop thread keeps answering other requests meanwhile. call_async is a coroutine.
        alice_task = asyncio.ensure_future(alice.wait_for_event.call_async())
        bob_wait = bob.wait_for_event.send()
        await asyncio.sleep(0)  # let alice's task send its request
        publisher.publish_after(200, 8)
        held = publisher.waiter_count()  # served at once, while the two waits are still held
        check(not alice_task.done() and held >= 2,
              f"{held} waits held, alice done={alice_task.done()}")
        values = await asyncio.wait_for(asyncio.gather(alice_task, bob_wait), TIMEOUT)
        check(values == [8, 8], f"the delayed waits completed with {values}")
        out(f"publish_after(200 ms) -> waiter_count() answered {held} meanwhile; waits got "
            f"{values}")

        # 3. The cancel idiom: the held wait fails with KErrCancel.
        alice_wait = alice.wait_for_event.send()
        alice.cancel_wait()
        try:
            await asyncio.wait_for(alice_wait, TIMEOUT)
            check(False, "a cancelled wait completed successfully")
        except Cancelled:
            pass
        status = alice_wait.status.Int()
        check(status == KErrCancel, f"cancelled wait has status {status}")
        out(f"cancel_wait()         -> the wait completed with {status} (KErrCancel)")

    return f"{woken} waiters woken by one publish, from the server's publisher thread"


def run(out: Out = print, endpoint: str | None = None) -> str:
    """The walkthrough; returns a one-line summary, raises on failure."""
    return asyncio.run(_walkthrough(out, endpoint))


def main() -> int:
    return run_main("notifier_client", run)


if __name__ == "__main__":
    sys.exit(main())
