"""Typed interfaces against a real kernel and real server processes, on both data paths: the
proxy's three ways of calling (sync, ``send`` with a `Reply`, ``call_async``), msgpack values
both ways, the errors, and a raw client and an interface client on one server (servers/kv.py's
`KeyValue`, servers/notifier.py's `Notifier`)."""

from __future__ import annotations

import asyncio

import pytest

from conftest import wait_until
from ipcfw import (
    BadArgument,
    Cancelled,
    Interface,
    KErrCancel,
    NotFound,
    NotSupported,
    Overflow,
    Reply,
    RSession,
    TRequestStatus,
    User,
    operation,
)
from servers.kv import ECount, EGet, EKeys, EPutMany, ESet, EValueLength, KeyValue
from servers.notifier import Notifier

pytestmark = pytest.mark.usefixtures("data_path")  # each test on both data paths

TIMEOUT = 5.0


@pytest.fixture
def notifier(kernel):
    kernel.serve("servers.notifier:NotifierServer", "notifier")
    return kernel


def test_the_proxy_calls_operations_as_methods(kv):
    with KeyValue.connect() as kv_proxy:
        assert kv_proxy.put(b"colour", b"blue") is None
        assert kv_proxy.get(b"colour") == b"blue"
        assert kv_proxy.count() == 1
        assert kv_proxy.value_length(b"colour") == 4
        assert kv_proxy.put_many({b"shape": b"round", b"size": b"large"}) == 3
        assert kv_proxy.keys() == [b"colour", b"shape", b"size"]
        assert kv_proxy.keys(prefix=b"s") == [b"shape", b"size"]
        kv_proxy.delete(b"shape")
        with pytest.raises(NotFound):
            kv_proxy.get(b"shape")
        with pytest.raises(NotFound):
            kv_proxy.delete(b"shape")
        assert kv_proxy.count() == 2


def test_send_returns_a_reply_and_call_async_awaits_it(kv):
    with KeyValue.connect() as kv_proxy:
        kv_proxy.put_many({b"a": b"1", b"b": b"22"})
        replies = [kv_proxy.get.send(b"a"), kv_proxy.keys.send(), kv_proxy.count.send(),
                   kv_proxy.get.send(b"missing")]
        assert all(isinstance(reply, Reply) for reply in replies)
        assert isinstance(replies[0].status, TRequestStatus)
        assert User.WaitForRequest(*(r.status for r in replies), timeout=TIMEOUT) is not None
        assert replies[0].result(TIMEOUT) == b"1"
        assert replies[1].result(TIMEOUT) == [b"a", b"b"]
        assert replies[2].result(TIMEOUT) == 2
        with pytest.raises(NotFound):
            replies[3].result(TIMEOUT)

        async def main() -> tuple[bytes, int, list[bytes]]:
            value = await kv_proxy.get.call_async(b"b")
            count, keys = await asyncio.gather(kv_proxy.count.send(), kv_proxy.keys.send(b"a"))
            return value, count, keys

        assert asyncio.run(asyncio.wait_for(main(), TIMEOUT)) == (b"22", 2, [b"a"])


def test_a_raw_client_and_an_interface_client_share_one_server(kv):
    with KeyValue.connect() as kv_proxy, RSession.connect("kv") as raw:
        raw.SendReceive(ESet, (b"from raw", b"value one"))
        assert kv_proxy.get(b"from raw") == b"value one"
        kv_proxy.put(b"from proxy", b"two")
        buffer = bytearray(16)
        assert raw.SendReceive(EGet, (b"from proxy", buffer)) == 3 and buffer == b"two"
        assert raw.SendReceive(EValueLength, (b"from raw",)) == 9
        assert raw.SendReceive(ECount) == kv_proxy.count() == 2
        # A msgpack value by hand, as the interface carries it, both ways.
        from ipcfw.protocol import pack_value, unpack_value
        assert raw.SendReceive(EPutMany, (pack_value({b"k": b"v"}),)) == 3
        reply = bytearray(64)
        written = raw.SendReceive(EKeys, (b"from", reply))
        assert written == len(reply) and unpack_value(bytes(reply)) == [b"from proxy", b"from raw"]
        # And the proxy's session is an RSession like any other.
        assert kv_proxy.session.SendReceive(ECount) == 3


def test_bad_arguments_are_refused_before_sending_or_by_the_server(kv):
    with KeyValue.connect() as kv_proxy, RSession.connect("kv") as raw:
        with pytest.raises(TypeError, match=r"kv.put\(\): parameter 'key' \(argument 0\): "
                                            r"expected bytes, got str"):
            kv_proxy.put("colour", b"blue")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="kv.get\\(\\): missing a required argument: 'key'"):
            kv_proxy.get()  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="expected dict\\[bytes, bytes\\], got dict holding"):
            kv_proxy.put_many({b"k": 1})  # type: ignore[dict-item]
        # A raw client that sends the wrong kind gets KErrArgument (the server's log names the
        # parameter); the server and both sessions go on.
        with pytest.raises(BadArgument):
            raw.SendReceive(ESet, (1, b"value"))
        with pytest.raises(BadArgument):
            raw.SendReceive(EPutMany, (b"\xc1 not msgpack",))
        with pytest.raises(BadArgument):
            raw.SendReceive(EGet, (b"key",))  # no reply descriptor
        with pytest.raises(NotSupported):
            raw.SendReceive(99)
        assert kv_proxy.count() == 0


def test_a_reply_larger_than_the_reply_descriptor_is_an_overflow(kv):
    with KeyValue.connect() as kv_proxy:
        kv_proxy.put(b"big", bytes(5000))  # get's reply descriptor holds 4096 bytes
        with pytest.raises(Overflow):
            kv_proxy.get(b"big")
        kv_proxy.put(b"big", bytes(4096))
        assert kv_proxy.get(b"big") == bytes(4096)


def test_a_newer_interface_version_is_refused_by_an_older_server(kv):
    class KeyValue11(KeyValue, version=(1, 1, 0)):
        @operation(30)
        def clear(self) -> None: ...

    with pytest.raises(NotSupported):
        KeyValue11.connect()
    with KeyValue.connect() as kv_proxy:  # 1.0 is served
        assert kv_proxy.count() == 0


def test_an_interface_with_the_wrong_signature_gets_clear_errors(kv):
    class Wrong(Interface, name="kv"):
        @operation(4)
        def count(self) -> str: ...  # the server answers an int, with no reply descriptor

        @operation(40)
        def missing(self) -> None: ...

    with Wrong.connect() as wrong:
        with pytest.raises(NotSupported):
            wrong.missing()
        with pytest.raises(TypeError, match="kv.count answered what its interface does not say"):
            wrong.count()


def test_deferred_results_and_bytearray_parameters_through_the_notifier(notifier):
    with Notifier.connect() as alice, Notifier.connect() as bob, \
            Notifier.connect() as publisher:
        payload = bytearray(32)
        alice_wait = alice.wait_for_event.send(payload)
        bob_wait = bob.wait_for_event.send()
        wait_until(lambda: publisher.waiter_count() == 2, timeout=TIMEOUT, what="2 held waits")
        assert not alice_wait.done()
        assert publisher.publish(5, b"news") == 2
        assert alice_wait.result(TIMEOUT) == 5 and payload == b"news"
        assert bob_wait.result(TIMEOUT) == 5

        small = bytearray(2)
        waiting = alice.wait_for_event.send(small)
        wait_until(lambda: publisher.waiter_count() == 1, timeout=TIMEOUT, what="a held wait")
        publisher.publish(6, b"too long for it")
        # (a Deferred's failure reaches the client with its text, as a method's raise does)
        with pytest.raises(Overflow, match="in a bytearray of at most 2"):
            waiting.result(TIMEOUT)
        assert small == bytearray(2)

        async def cancelled() -> int:
            waiting = alice.wait_for_event.send()
            await asyncio.sleep(0.05)
            alice.cancel_wait()
            try:
                await waiting
            except Cancelled:
                return waiting.status.Int()
            return 0

        assert asyncio.run(asyncio.wait_for(cancelled(), TIMEOUT)) == KErrCancel
        with pytest.raises(BadArgument):
            publisher.publish(-1)
        assert publisher.waiter_count() == 0


# A client that holds a wait and never returns: killed with SIGKILL by the test.
_HOLDER = """
import time
from servers.notifier import Notifier
notifier = Notifier.connect()
notifier.wait_for_event.send(bytearray(16))
print("waiting", flush=True)
time.sleep(60)
"""


def test_a_killed_clients_deferred_wait_is_released_and_the_server_goes_on(notifier):
    holder = notifier.spawn_client(["-c", _HOLDER], label="holder")
    with Notifier.connect() as observer:
        wait_until(lambda: observer.waiter_count() == 1, timeout=TIMEOUT,
                   what="the holder's wait to be held")
        holder.kill()  # SIGKILL: Disconnect fails its Deferred
        wait_until(lambda: observer.waiter_count() == 0, timeout=TIMEOUT,
                   what="the killed client's wait to be released")
        waiting = observer.wait_for_event.send()
        wait_until(lambda: observer.waiter_count() == 1, timeout=TIMEOUT, what="a new wait")
        assert observer.publish(3) == 1
        assert waiting.result(TIMEOUT) == 3
    wait_until(lambda: notifier.statistics()["sessions"] == 0, timeout=TIMEOUT,
               what="every session to end")


def test_a_wait_the_client_cancelled_is_released_so_the_session_can_wait_again(notifier):
    # The client's cancel (status.Cancel(), or the task awaiting it cancelled by wait_for)
    # reaches the session's Cancelled hook: the notifier lets the wait go, or its next wait
    # would be refused with KErrInUse ("already waiting").
    with Notifier.connect() as waiter, Notifier.connect() as publisher:
        first = waiter.wait_for_event.send()
        wait_until(lambda: publisher.waiter_count() == 1, timeout=TIMEOUT, what="a held wait")
        assert first.status.Cancel(TIMEOUT) == KErrCancel
        wait_until(lambda: publisher.waiter_count() == 0, timeout=TIMEOUT,
                   what="the cancelled wait to be released")

        async def timed_out() -> None:
            await asyncio.wait_for(waiter.wait_for_event.call_async(), 0.05)

        with pytest.raises(asyncio.TimeoutError):
            asyncio.run(timed_out())
        wait_until(lambda: publisher.waiter_count() == 0, timeout=TIMEOUT,
                   what="the timed-out wait to be released")
        again = waiter.wait_for_event.send()
        wait_until(lambda: publisher.waiter_count() == 1, timeout=TIMEOUT, what="a new wait")
        assert publisher.publish(4) == 1
        assert again.result(TIMEOUT) == 4


def test_connect_waits_for_the_server_to_register(kernel):
    import threading

    outcome: list[object] = []

    def connect_and_call() -> None:
        try:
            with KeyValue.connect(wait=TIMEOUT * 2) as kv_proxy:
                outcome.append(kv_proxy.count())
        except Exception as exc:  # reported by the assertion below
            outcome.append(exc)

    waiter = threading.Thread(target=connect_and_call)
    waiter.start()
    wait_until(lambda: kernel.statistics()["awaits"] == 1, timeout=TIMEOUT,
               what="the proxy's connect to wait for 'kv'")
    kernel.serve("servers.kv:KvServer", "kv")
    waiter.join(TIMEOUT * 2)
    assert outcome == [0]


def test_a_proxy_connects_from_a_coroutine_and_awaits_its_calls(kv):
    async def main() -> bytes:
        with await KeyValue.connect_async(wait=5) as store:
            await store.put.call_async(b"colour", b"blue")
            return await store.get.call_async(b"colour")

    assert asyncio.run(asyncio.wait_for(main(), 10)) == b"blue"
