"""Example client programs for the example servers in ``servers/``.

Each module is a small runnable program. The kv and notifier clients call their servers through
typed interfaces (``KeyValue.connect()``, ``Notifier.connect()``: proxies with one method per
operation, docs/interfaces.md); the echo client is a thin raw client class in the style of
Symbian's R-classes (``RKvSession`` and friends): one `RSession` inside, one method per server
function. Either way, errors are raised as ``IpcError`` subclasses::

    python clients/echo_client.py        # needs a kernel and `ipcfw serve servers.echo:EchoServer`
    python clients/kv_client.py          # ... servers.kv:KvServer
    python clients/notifier_client.py    # ... servers.notifier:NotifierServer

The kernel is found through ``IPCFW_KERNEL`` (or the default endpoint). ``ipcfw demo`` starts a
kernel and the servers and runs these clients for you.

Every module exposes ``run(out=print, endpoint=None) -> str`` (the walkthrough: prints what it
does through `out`, returns a one-line summary, raises on failure) and ``main() -> int`` (the
program: exit status 0 on success, 1 with a clear message on stderr on failure).

The same files are installed by the wheel as ``ipcfw.examples.clients`` (beside
``ipcfw.examples.servers``), so each client imports its server's names from whichever layout it
was loaded in: ``python -m ipcfw.examples.clients.kv_client`` runs one from an installed wheel.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from ipcfw import ClientPanic, Interface, IpcError, NotFound, RSession
from ipcfw.endpoint import EndpointError

Out = Callable[[str], None]
SERVERS = "ipcfw.examples.servers" if __name__ == "ipcfw.examples.clients" else "servers"
"""The example servers' package, for the plugin specs the clients' messages name: ``servers``
in a checkout (beside this package), ``ipcfw.examples.servers`` in an installed wheel."""
I = TypeVar("I", bound=Interface)  # noqa: E741


class ExampleFailed(Exception):
    """An example found something wrong, or could not start; the message says what."""


class ExampleClient:
    """The frame every example client class shares: one `RSession` to `SERVER` inside.

    Subclasses set `SERVER` (the server's name) and `PLUGIN` (how to host it, for the message
    when it is not running), and add one method per server function.
    """

    SERVER = ""
    PLUGIN = ""

    def __init__(self) -> None:
        self._session: RSession | None = None

    @classmethod
    def connect(cls, endpoint: str | None = None):
        client = cls()
        client.Connect(endpoint)
        return client

    def Connect(self, endpoint: str | None = None) -> None:
        self._session = connect_session(self.SERVER, self.PLUGIN, endpoint)

    def Close(self) -> None:
        if self._session is not None:
            self._session.Close()
            self._session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.Close()


def connect_session(name: str, plugin: str, endpoint: str | None = None) -> RSession:
    """Connect to server `name`; if none is registered, say how to start it (`plugin`)."""
    try:
        return RSession.connect(name, endpoint=endpoint)
    except NotFound:
        raise _not_running(name, plugin) from None


def connect_proxy(interface: type[I], plugin: str, endpoint: str | None = None) -> I:
    """A proxy of `interface` connected to its server; if none is registered, say how to start
    it (`plugin`)."""
    try:
        return interface.connect(endpoint=endpoint)
    except NotFound:
        raise _not_running(interface.interface.name, plugin) from None


def _not_running(name: str, plugin: str) -> ExampleFailed:
    return ExampleFailed(
        f"no server named {name!r} is running; start it with `ipcfw serve {plugin}`"
    )


def check(condition: bool, what: str) -> None:
    """Fail the example with `what` unless `condition` holds (unlike assert, never stripped)."""
    if not condition:
        raise ExampleFailed(what)


def run_main(program: str, run: Callable[[Out], str]) -> int:
    """Run a walkthrough as a program: 0 on success, 1 with a message on stderr on failure."""
    try:
        summary = run(print)
    except ExampleFailed as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return 1
    except EndpointError as exc:  # IPCFW_KERNEL is not a usable endpoint
        print(f"{program}: {exc}", file=sys.stderr)
        return 1
    except (IpcError, ClientPanic, TimeoutError) as exc:
        print(f"{program}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"{program}: ok ({summary})")
    return 0
