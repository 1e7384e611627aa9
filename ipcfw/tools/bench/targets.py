"""The targets of issue 11, each a ratio of two figures of the same run, and their verdicts.

A target is PASS or FAIL when measured, NOT MEASURED when one of its figures is missing (a
system left out or not started). A measurement that failed (a descriptor size the path cannot
carry) is a FAIL, with the error's text. ``--strict`` makes any FAIL exit 2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .crowd import GROWTH_TARGET
from .descriptors import DescriptorResult
from .fleet import FleetResult
from .measure import RunResult

SYNC_TARGET = 1.5
PIPELINED_TARGET = 0.5
DIRECT_SYNC_TARGET = 1.0
DIRECT_PIPELINED_TARGET = 1.0
FLEET_TARGET = 1.0
DESCRIPTOR_TARGET = 0.25
DESCRIPTOR_TARGET_SIZE = 16 << 20
BASELINE = "bare-forwarder"
MANAGERS = "managers"
"""The standard library's answer, which users compare ipcfw with."""
DIRECT = "ipcfw-direct"
"""ipcfw with the session on the direct path (its requests skip the kernel)."""
PINGPONG = "bare-pingpong"


@dataclass(frozen=True)
class Target:
    name: str
    text: str
    """What is compared, e.g. "ipcfw-direct sync median / managers'"."""
    limit: float
    at_most: bool
    """True: the ratio must be <= limit; False: >= limit."""
    ratio: float | None = None
    error: str | None = None
    """Why the measurement failed (then the target fails)."""

    @property
    def passed(self) -> bool | None:
        if self.error is not None:
            return False
        if self.ratio is None:
            return None
        return self.ratio <= self.limit if self.at_most else self.ratio >= self.limit

    def line(self) -> str:
        sign = "<=" if self.at_most else ">="
        head = f"target: {self.text} {sign} {self.limit:.2f}x: "
        if self.error is not None:
            return head + f"FAIL ({self.error})"
        if self.ratio is None:
            return head + "n/a  NOT MEASURED"
        return head + f"{self.ratio:.2f}x  {'PASS' if self.passed else 'FAIL'}"

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b else a / b


def _sync(results: dict[str, RunResult], name: str) -> float | None:
    return results[name].sync_median_us if name in results else None


def _pipelined(results: dict[str, RunResult], name: str) -> float | None:
    return results[name].pipelined_calls_per_s if name in results else None


def run_targets(results: dict[str, RunResult]) -> list[Target]:
    """The main table's targets: the kernel path against the bare forwarder, the direct path
    against managers and raw pyzmq."""
    return [
        Target("kernel_sync", f"ipcfw sync median / {BASELINE}'s", SYNC_TARGET, True,
               _ratio(_sync(results, "ipcfw"), _sync(results, BASELINE))),
        Target("kernel_pipelined", f"ipcfw pipelined / {BASELINE}'s", PIPELINED_TARGET, False,
               _ratio(_pipelined(results, "ipcfw"), _pipelined(results, BASELINE))),
        Target("direct_sync", f"{DIRECT} sync median / {MANAGERS}'", DIRECT_SYNC_TARGET, True,
               _ratio(_sync(results, DIRECT), _sync(results, MANAGERS))),
        Target("direct_pipelined", f"{DIRECT} pipelined / {PINGPONG}'s (raw pyzmq, direct)",
               DIRECT_PIPELINED_TARGET, False,
               _ratio(_pipelined(results, DIRECT), _pipelined(results, PINGPONG))),
    ]


def fleet_target(fleet: dict[str, FleetResult] | None, processes: int) -> Target:
    direct, managers = (fleet.get(n) if fleet else None for n in (DIRECT, MANAGERS))
    return Target("fleet", f"{processes} client processes, {DIRECT} aggregate / {MANAGERS}'",
                  FLEET_TARGET, False,
                  _ratio(None if direct is None else direct.calls_per_s,
                         None if managers is None else managers.calls_per_s))


def crowd_target(growth: float | None, small: int, large: int) -> Target:
    return Target("open_sessions", f"{DIRECT} sync median, {large:,} / {small:,} open sessions",
                  GROWTH_TARGET, True, growth)


def descriptor_target(results: list[DescriptorResult]) -> Target:
    size = DESCRIPTOR_TARGET_SIZE
    found = {r.path: r for r in results if r.size == size}
    text = f"{size >> 20} MiB descriptor round trip ({DIRECT}) / in-process copy, MB/s"
    direct, copy = found.get("direct"), found.get("copy")
    if direct is not None and direct.error is not None:
        return Target("descriptor", text, DESCRIPTOR_TARGET, False, error=direct.error)
    return Target("descriptor", text, DESCRIPTOR_TARGET, False,
                  _ratio(None if direct is None else direct.mb_per_s,
                         None if copy is None else copy.mb_per_s))


def references(results: dict[str, RunResult]) -> dict[str, float | None]:
    """Ratios printed for reference: ipcfw (the kernel path) against managers."""
    return {"kernel_managers_sync_ratio": _ratio(_sync(results, "ipcfw"),
                                                 _sync(results, MANAGERS))}
