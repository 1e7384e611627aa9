"""The bench's second part, after the interleaved run: what needs the whole stack at once or a
long time (client processes, descriptors, open sessions, memory, a monitor attached, churn).

Each phase runs under a watchdog; one that fails is reported as NOT MEASURED with its error,
and the bench goes on with the next. They run in this order: the client processes first (the
stack is as the main run left it), the churn last (it is the longest).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .churn import ChurnResult, churn
from ...testing import Stack
from .clients import STOP_TIMEOUT, IpcfwClient, watchdog
from .crowd import Crowd, CrowdResult, measure_crowd
from .descriptors import SIZES, DescriptorBench, DescriptorResult
from .fleet import SYSTEMS, Fleet, FleetResult
from .measure import System
from .memory import ConnectionCost, per_connection
from .monitored import MonitoredResult, measure_monitored
from .progress import Progress
from .remote import RemoteResult, measure_remote
from .roles import STARTUP_TIMEOUT
from .systems import Processes, managers_address
from .targets import DIRECT, MANAGERS

log = logging.getLogger(__name__)

ECHO = "echo"
PHASE_BUDGET_S = 120.0
"""A phase's watchdog, plus its own share (`_budget`)."""
SETTLE_TIMEOUT = 30.0
"""Seconds the kernel has to close the sessions a phase closed."""


@dataclass
class Extras:
    fleet: dict[str, FleetResult] | None = None
    descriptors: list[DescriptorResult] = field(default_factory=list)
    crowd: CrowdResult | None = None
    connections: ConnectionCost | None = None
    churn: ChurnResult | None = None
    monitored: MonitoredResult | None = None
    remote: RemoteResult | None = None
    failed: dict[str, str] = field(default_factory=dict)
    """Phase name -> why it was not measured."""


@dataclass
class Context:
    """What the phases need from the main run's stack."""

    processes: Processes
    stack: Stack
    workdir: Path
    direct: IpcfwClient
    pids: dict[str, int]
    """The kernel ("broker") and the echo server ("server")."""
    managers_pid: int
    progress: Progress


def run_phases(ctx: Context, args: argparse.Namespace) -> Extras:
    extras = Extras()
    phases: list[tuple[str, int, float, Callable[[], None]]] = [
        ("client processes", args.fleet, 2 * args.fleet_seconds + args.fleet,
         lambda: _fleet(ctx, args, extras)),
        ("descriptors", args.descriptor_mib, 0.5 * args.descriptor_mib,
         lambda: _descriptors(extras, args.descriptor_mib)),
        ("open sessions", args.open_sessions, args.open_sessions / 200,
         lambda: _crowd(ctx, args, extras)),
        ("memory per connection", args.connections, args.connections,
         lambda: _connections(ctx, args, extras)),
        ("monitor attached", args.monitored, args.monitored / 500,
         lambda: _monitored(args, extras)),
        ("churn", args.churn, args.churn / 200, lambda: _churn(ctx, args, extras)),
        ("over tcp", args.remote, args.remote / 500, lambda: _remote(ctx, args, extras)),
    ]
    for name, count, budget, phase in phases:
        if not count:
            continue
        ctx.progress.say(name)
        try:
            with watchdog(PHASE_BUDGET_S + budget):
                phase()
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # this phase is not measured; the others may still be
            log.debug("bench phase %s failed", name, exc_info=True)
            extras.failed[name] = f"{type(exc).__name__}: {exc}"
    ctx.progress.clear()
    return extras


def _fleet(ctx: Context, args: argparse.Namespace, extras: Extras) -> None:
    targets = {name: ctx.stack.endpoint if path else managers_address(ctx.workdir)
               for name, path in SYSTEMS.items()}
    fleet = Fleet(lambda name, argv: ctx.processes.spawn(name, argv, ready=True), ctx.workdir,
                  targets, args.fleet)
    try:
        fleet.connect(STARTUP_TIMEOUT + args.fleet)
        extras.fleet = fleet.measure(args.fleet_seconds, {
            DIRECT: {"server": ctx.pids["server"]}, "ipcfw": ctx.pids,
            MANAGERS: {"server": ctx.managers_pid}})
    finally:
        fleet.close()
        fleet.stop(STOP_TIMEOUT)


def _descriptors(extras: Extras, budget_mib: int) -> None:
    extras.descriptors = DescriptorBench(ECHO, SIZES, budget_mib).run(PHASE_BUDGET_S)


def _crowd(ctx: Context, args: argparse.Namespace, extras: Extras) -> None:
    crowd = Crowd(ECHO, ctx.stack.statistics, ctx.progress.counter("open sessions"),
                  SETTLE_TIMEOUT)
    extras.crowd = measure_crowd(ctx.direct, crowd, ctx.pids, args.open_sessions // 10,
                                 args.open_sessions, args.sync)


def _connections(ctx: Context, args: argparse.Namespace, extras: Extras) -> None:
    extras.connections = per_connection(ECHO, ctx.pids, args.connections, SETTLE_TIMEOUT)


def _monitored(args: argparse.Namespace, extras: Extras) -> None:
    extras.monitored = measure_monitored(ECHO, args.monitored)


def _remote(ctx: Context, args: argparse.Namespace, extras: Extras) -> None:
    extras.remote = measure_remote(ctx.workdir, args.remote)


def _churn(ctx: Context, args: argparse.Namespace, extras: Extras) -> None:
    extras.churn = churn(ECHO, ctx.stack.statistics, ctx.pids, args.churn,
                         ctx.progress.counter("churn"), SETTLE_TIMEOUT)


def direct_context(processes: Processes, workdir: Path, systems: list[System],
                   progress: Progress) -> Context | None:
    """The phases' context, or None when the direct system is not running."""
    by_name = {s.name: s for s in systems}
    direct, kernel_path, managers = (by_name.get(n) for n in (DIRECT, "ipcfw", MANAGERS))
    stack = processes.stack
    if (direct is None or direct.error is not None or kernel_path is None or managers is None
            or stack is None or not isinstance(direct.client, IpcfwClient)):
        return None
    return Context(processes, stack, workdir, direct.client, kernel_path.pids,
                   managers.pids["server"], progress)
