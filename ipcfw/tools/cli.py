"""The ipcfw command: run a kernel, host a server plugin, run the demo or the benchmark.

    ipcfw kernel [--endpoint ipc:///path]        the kernel, in the foreground
    ipcfw serve package.module:ServerClass       host a server plugin
    ipcfw wait NAME [--timeout S]                until server NAME is registered (for scripts)
    ipcfw demo                                   kernel + example servers + example clients
    ipcfw bench                                  latency and throughput against bare pyzmq
    ipcfw ps [--sessions|--processes] [--json]   servers, sessions, processes (tools/ps.py)
    ipcfw call NAME FUNCTION [ARG...]            send one request, print the answer
    ipcfw terminate NAME                         end a server's registration

``--log-level`` (debug, info, warning, error) goes before or after the command; at ``debug``
the kernel and a server host log every connect, request and completion. Docs: docs/cli.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any
from collections.abc import Callable

from .. import __version__
from .. import endpoint as endpoints
from .. import errors
from ..protocol import Path
from . import logs
from .plugins import PluginError, load_plugin, one_line

if TYPE_CHECKING:
    from ..kernel.limits import KernelLimits
    from ..testing import ReadySignal

log = logging.getLogger("ipcfw.cli")

LOG_LEVELS = ("debug", "info", "warning", "error")
_DEFAULT_LOG_LEVEL = "info"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, bench_args = _split_bench_args(parser, argv)
    if bench_args is not None:
        args.bench_args = bench_args
    level = getattr(args, "log_level", None) or _DEFAULT_LOG_LEVEL
    try:
        logs.configure(level, args.log_format, args.log_file)
    except OSError as exc:
        print(f"ipcfw: --log-file: {exc}", file=sys.stderr)
        return 2
    if args.endpoint:
        args.endpoint = args.endpoint.strip()
    try:
        status: int = args.run(args)
        return status
    except endpoints.EndpointError as exc:
        print(f"ipcfw: {exc}", file=sys.stderr)
        return 2
    except errors.IpcError as exc:
        print(f"ipcfw: {exc}", file=sys.stderr)
        return 1
    except TimeoutError as exc:
        print(f"ipcfw: timed out: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """The ``ipcfw`` command's parser (`ipcfw.tools.clidoc` documents it)."""
    parser = argparse.ArgumentParser(prog="ipcfw", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"ipcfw {__version__}")
    _log_options(parser, _DEFAULT_LOG_LEVEL, "text", None)
    # Each command takes the log options too (after its name); given there, they win.
    common = argparse.ArgumentParser(add_help=False)
    _log_options(common, argparse.SUPPRESS, argparse.SUPPRESS, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str, **options: Any) -> argparse.ArgumentParser:
        """A command: its `help` is its line in ``ipcfw --help`` and its ``--help``'s text."""
        return commands.add_parser(name, help=help, description=help, parents=[common],
                                   **options)

    kernel = add("kernel", help="run the kernel in the foreground")
    _endpoint_option(kernel)
    _ready_fd_option(kernel, "listens")
    kernel.add_argument("--config", metavar="PATH",
                        help="the kernel's configuration file (TOML: admission, capability "
                             "grants, limits; docs/security.md); a limit given as an option "
                             "wins over the file's")
    kernel.add_argument("--check-config", metavar="PATH",
                        help="check the configuration file PATH, say what it sets, and exit "
                             "(status 0, or 2 naming the first mistake and its line)")
    _limit_options(kernel)
    kernel.add_argument("--services", metavar="DIR",
                        help="start servers on demand: DIR holds one NAME.toml per server name "
                             "(docs/getting-started.md#9-activation-on-demand)")
    kernel.set_defaults(run=_run_kernel)

    serve = add("serve", help="host a server plugin: package.module:ServerClass")
    serve.add_argument("plugin", help="module path and class, e.g. servers.echo:EchoServer")
    serve.add_argument("--overlay", action="append", default=[], metavar="MODULE:CLASS",
                       help="an overlay over the server"
                            " (repeatable: each one overlays the previous)")
    serve.add_argument("--no-reconnect", action="store_true",
                       help="exit (status 3) when the kernel dies or stops serving this server, "
                            "instead of registering again (the default for a server the kernel "
                            "started: $IPCFW_ACTIVATED is set)")
    serve.add_argument("--wait-kernel", type=_seconds, metavar="SECONDS",
                       help="wait up to SECONDS for the kernel to start (default: it must be "
                            "running)")
    _endpoint_option(serve)
    _ready_fd_option(serve, "is registered")
    serve.set_defaults(run=_run_serve)

    wait = add("wait", help="wait until a server name is registered (exit 0), for scripts")
    wait.add_argument("name", help="the server's name")
    wait.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                      help="give up after SECONDS, with exit status 1 (default %(default)s)")
    _endpoint_option(wait)
    wait.set_defaults(run=_run_wait)

    demo = add("demo", help="start a kernel and the example servers, run the example clients")
    demo.set_defaults(run=_run_demo, endpoint=None)

    bench = commands.add_parser(
        "bench", help="measure ipcfw against bare pyzmq (ipcfw bench --help for its options)",
        description="measure ipcfw against bare pyzmq", add_help=False,
    )
    bench.set_defaults(run=_run_bench, endpoint=None, bench_args=[])

    terminate = add(
        "terminate", help="end a server's registration (administrator); waits for its held messages"
    )
    terminate.add_argument("name", help="the server's name")
    terminate.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")
    _endpoint_option(terminate)
    terminate.set_defaults(run=_run_terminate)

    ps = add("ps", help="show the kernel's servers (and counters), sessions or processes")
    from .ps import add_arguments as ps_arguments

    ps_arguments(ps, _seconds)
    _endpoint_option(ps)
    ps.set_defaults(run=_run_ps)

    monitor = add("monitor", help="show connects, requests, completions, disconnects and deaths, "
                                  "live (Ctrl-C ends it)")
    monitor.add_argument("name", nargs="?", help="only this server (default: every server)")
    monitor.add_argument("--json", action="store_true", help="one JSON object per event")
    _endpoint_option(monitor)
    monitor.set_defaults(run=_run_monitor)
    call = add("call", help="send one request to a server and print its answer or its error")
    call.add_argument("name", help="the server's name")
    call.add_argument("function", help="the function number; with --interface, an operation's "
                                       "name")
    call.add_argument("arguments", nargs="*", metavar="ARG",
                      help="up to four: an int, b:HEX (bytes), s:TEXT (UTF-8 bytes) or out:N (a "
                           "writable buffer of N bytes, shown after the call); with --interface "
                           "one per parameter, read by its type")
    call.add_argument("--interface", metavar="MODULE:CLASS",
                      help="an ipcfw.Interface class: call an operation by name, its arguments "
                           "read by its parameters' types (str as it is, msgpack values as JSON)")
    call.add_argument("--version", dest="server_version", metavar="X.Y.Z",
                      help="the version to connect with (default: the interface's, else 1.0.0)")
    call.add_argument("--path", choices=[path.name.lower() for path in Path],
                      help="the session's data path (default: $IPCFW_PATH, else direct)")
    call.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                      help="give up on the connect, then on the answer, after SECONDS "
                           "(default %(default)s)")
    call.add_argument("--json", action="store_true",
                      help="print the outcome as one JSON object (an error too, on stdout)")
    _endpoint_option(call)
    call.set_defaults(run=_run_call)

    keygen = add("keygen", help="write a CURVE keypair (for a kernel's tcp listener or a peer "
                                "on another host) and print its public key")
    from .keygen import add_arguments as keygen_arguments

    keygen_arguments(keygen)
    keygen.set_defaults(run=_run_keygen, endpoint=None)
    return parser


def _split_bench_args(
    parser: argparse.ArgumentParser, argv: list[str]
) -> tuple[argparse.Namespace, list[str] | None]:
    """`ipcfw bench` hands every argument after `bench` to the benchmark's own parser."""
    at = 0
    while at < len(argv) and argv[at].startswith("-"):  # global options come first
        at += 1 if "=" in argv[at] or argv[at] in ("-h", "--help", "--version") else 2
    if argv[at : at + 1] == ["bench"]:
        return parser.parse_args(argv[: at + 1]), argv[at + 1 :]
    return parser.parse_args(argv), None


def _log_options(parser: argparse.ArgumentParser, level: str, form: str,
                 path: str | None) -> None:
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=level,
                        help=f"what to log (default {_DEFAULT_LOG_LEVEL}); debug logs every "
                             "connect, request and completion")
    parser.add_argument("--log-format", choices=logs.FORMATS, default=form,
                        help="text (default), or json: one object per line")
    parser.add_argument("--log-file", default=path, metavar="PATH",
                        help="append the log to PATH (default: stderr)")


def _seconds(text: str) -> float:
    """An argparse type: a number of seconds, at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _endpoint_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint",
        help=f"kernel endpoint (default: ${endpoints.ENV_VAR} or {endpoints.default_endpoint()})",
    )


def _ready_fd_option(parser: argparse.ArgumentParser, when: str) -> None:
    parser.add_argument(
        "--ready-fd", type=int, metavar="N",
        help=f"write READY on the inherited file descriptor N once it {when}, then close it "
             "(how ipcfw.testing waits for it)",
    )


_LIMIT_HELP = {
    "sessions_per_process": "sessions one process may hold (default %(default)s)",
    "outstanding_per_process": "requests one process may have outstanding (default %(default)s)",
    "pool_slots": "size of the kernel-wide message slot pool, for sessions with -1 slots "
                  "(default %(default)s)",
    "max_frame": "largest frame in bytes any peer may send (default %(default)s)",
    "receive_hwm": "frames the kernel queues from one peer before its sends wait "
                   "(default %(default)s)",
    "connections_per_uid": "connections one uid may have open: client threads, client "
                           "processes' inboxes, servers (default %(default)s)",
    "max_backlog": "frames left unread by one peer before the kernel stops serving it "
                   "(default: outstanding-per-process + sessions-per-process + 10000)",
}


def _limit_options(parser: argparse.ArgumentParser) -> None:
    from ..kernel.limits import KernelLimits

    defaults = KernelLimits()
    for name, text in _LIMIT_HELP.items():
        # (default None: an option not given leaves the configuration file's value)
        parser.add_argument("--" + name.replace("_", "-"), type=int, metavar="N",
                            help=text % {"default": getattr(defaults, name)})


def _limits_of(args: argparse.Namespace, base: KernelLimits) -> KernelLimits:
    given = {name: getattr(args, name) for name in _LIMIT_HELP if getattr(args, name) is not None}
    return dataclasses.replace(base, **given).check()


def _on_signals(stop: Callable[[], None]) -> None:
    from .systemd import stopping

    def handler(signum: int, frame: object) -> None:
        stopping()  # systemd: STOPPING=1 (nothing without $NOTIFY_SOCKET)
        stop()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def _ready_signal(args: argparse.Namespace, status: str) -> ReadySignal | None:
    """What tells the starter (``--ready-fd``) and systemd (``$NOTIFY_SOCKET``, with `status`)
    that this process is ready; None, after saying why, if that descriptor is not open."""
    from .systemd import ServiceReady

    try:
        return ServiceReady(args.ready_fd, status)
    except ValueError as exc:
        print(f"ipcfw: --ready-fd: {exc}", file=sys.stderr)
        return None


def _run_kernel(args: argparse.Namespace) -> int:
    from ..kernel import Kernel, KernelAlreadyRunning, ListenError

    from ..kernel.config import KernelConfig, read_config

    if args.check_config is not None:
        try:
            checked = read_config(args.check_config)
        except (OSError, ValueError) as exc:
            print(f"ipcfw: {exc}", file=sys.stderr)
            return 2
        print(f"{args.check_config}: ok: {checked.summary()}")
        return 0
    try:
        config = read_config(args.config) if args.config else KernelConfig()
        limits = _limits_of(args, config.limits)
    except (OSError, ValueError) as exc:
        print(f"ipcfw: {exc}", file=sys.stderr)
        return 2
    ready = _ready_signal(args, f"kernel at {endpoints.resolve(args.endpoint)}")
    if ready is None:
        return 2
    try:
        services = _services(args.services)
        kernel = Kernel(args.endpoint, limits=limits, config=config, services=services)
    except ValueError as exc:
        print(f"ipcfw: {exc}", file=sys.stderr)
        return 2
    _on_signals(kernel.stop)
    try:
        kernel.run(ready)
    except (KernelAlreadyRunning, ListenError) as exc:
        print(f"ipcfw: {exc}", file=sys.stderr)
        return 1
    return 0


def _services(directory: str | None) -> list[Any]:
    """The services of ``--services DIR`` (none without it); ValueError naming the file, the
    key and what was wrong."""
    if directory is None:
        return []
    from ..kernel.spawner import load_services

    return load_services(directory)


def _plugin_stack(args: argparse.Namespace) -> Any:
    """The server named by ``args.plugin``, under the overlays named by ``args.overlay``."""
    from ..server import COverlay, CServer

    server_class = load_plugin(args.plugin, CServer)
    overlay_classes = [load_plugin(spec, COverlay, "overlay") for spec in args.overlay]
    what, spec = "plugin", args.plugin
    try:
        top: Any = server_class()
        for spec, overlay in zip(args.overlay, overlay_classes):
            what = "overlay"
            top = overlay(top)
    except Exception as exc:  # (whatever the plugin's constructor raised)
        raise PluginError(f"cannot start {what} {spec!r}: {one_line(exc)}") from exc
    return top


def _run_serve(args: argparse.Namespace) -> int:
    from ..server import ServerHost

    try:
        top = _plugin_stack(args)
    except PluginError as exc:
        # One line; the traceback of what the plugin raised only when asked for (debug).
        log.debug("%s", exc, exc_info=exc.__cause__)
        print(f"ipcfw: {exc}", file=sys.stderr)
        return 2
    ready = _ready_signal(args, f"serving {args.plugin} at {endpoints.resolve(args.endpoint)}")
    if ready is None:
        return 2
    from ..kernel.spawner import ACTIVATED_ENV

    # A server its kernel started ends with that kernel: the next one starts its own.
    reconnect = not (args.no_reconnect or os.environ.get(ACTIVATED_ENV))
    host = ServerHost(top, args.endpoint, reconnect=reconnect, wait_kernel=args.wait_kernel)
    _on_signals(host.stop)
    try:
        host.run(ready)
    except errors.CouldNotConnect as exc:
        hint = "" if args.wait_kernel is not None else (
            "; or wait for it to start: ipcfw serve --wait-kernel SECONDS ...")
        print(f"ipcfw: {exc}{hint}", file=sys.stderr)
        return 1
    return 3 if host.kernel_died or host.dropped else 0


def _run_wait(args: argparse.Namespace) -> int:
    from ..client import wait_for_server

    wait_for_server(args.name, args.timeout, args.endpoint)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo()


def _run_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args.bench_args)


def _run_call(args: argparse.Namespace) -> int:
    from .call import run

    return run(args)


def _run_keygen(args: argparse.Namespace) -> int:
    from .keygen import run

    return run(args)


def _run_terminate(args: argparse.Namespace) -> int:
    from ..client import terminate_server

    terminate_server(args.name, endpoint=args.endpoint, timeout=args.timeout)
    print(f"server {args.name!r} terminated")
    return 0


def _run_monitor(args: argparse.Namespace) -> int:
    from . import monitor
    return monitor.run(args.name, args.endpoint, args.json)


def _run_ps(args: argparse.Namespace) -> int:
    from .ps import run

    return run(args)
