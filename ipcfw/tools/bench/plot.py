"""``ipcfw bench --plot FILE``: the comparison as a picture, drawn from the same record that
``--json`` writes (so ``--from-json`` can draw an earlier run without measuring again).

Four panels: the sync round trip (median, with the 99th percentile as a whisker), pipelined
calls/s, the client processes' aggregate calls/s, and descriptor round trips in MB/s by size
beside the in-process copy. Each panel says which target it shows and its verdict. Needs
matplotlib (the ``plot`` extra: ``pip install 'ipcfw[plot]'``); `require` says so clearly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["PlotUnavailable", "require", "plot", "load"]

_IPCFW, _OTHER = "#4c72b0", "#999999"
INSTALL_HINT = "pip install 'ipcfw[plot]'  (or: pip install matplotlib)"
FORMATS = (".svg", ".png", ".pdf")


class PlotUnavailable(RuntimeError):
    """Plotting cannot be done here (matplotlib is missing, or the file type is unknown)."""


def require(path: str) -> None:
    """Check, before a run of minutes, that `path` can be drawn: a known file type, and
    matplotlib importable."""
    if Path(path).suffix.lower() not in FORMATS:
        raise PlotUnavailable(
            f"--plot {path}: the file must end in {', '.join(FORMATS)} (its type is the format)"
        )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(
            f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from None


def load(path: str) -> dict[str, Any]:
    """A record written by ``ipcfw bench --json``."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PlotUnavailable(f"--from-json {path}: {exc}") from None
    if not isinstance(record, dict) or "results" not in record:
        raise PlotUnavailable(f"--from-json {path}: not a record of `ipcfw bench --json`")
    return record


def plot(record: dict[str, Any], path: str) -> None:
    """Draw `record` (what ``--json`` writes) into `path`."""
    require(path)
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: searchable, smaller
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    targets = record.get("targets", {})
    _sync(axes[0][0], record.get("results", {}), targets)
    _pipelined(axes[0][1], record.get("results", {}), targets)
    _fleet(axes[1][0], record.get("fleet"), targets)
    _descriptors(axes[1][1], record.get("descriptors", []), targets)
    env = record.get("environment", {})
    figure.suptitle(f"ipcfw bench: {env.get('python', '?')}, pyzmq {env.get('pyzmq', '?')}, "
                    f"{env.get('cpu_affinity') or env.get('cpu_count', '?')} CPUs, "
                    f"{env.get('platform', '?')}")
    figure.savefig(path)
    pyplot.close(figure)


def _verdicts(targets: dict[str, Any], *names: str) -> str:
    """The targets called `names` (``Target.record()``s), a line each: what, ratio, verdict."""
    lines = []
    for name in names:
        target = targets.get(name)
        if target is None:
            continue
        sign = "<=" if target["at_most"] else ">="
        ratio = target["ratio"]
        verdict = {True: "PASS", False: "FAIL", None: "NOT MEASURED"}[target["passed"]]
        shown = "n/a" if ratio is None else f"{ratio:.2f}x"
        lines.append(f"{target['text']} {sign} {target['limit']:.2f}x: {shown} {verdict}")
    return "\n".join(lines)


def _bars(axis: Any, names: list[str], values: list[float], title: str, unit: str,
          note: str) -> None:
    """Horizontal bars, ipcfw's in blue, each labelled with its value; the targets' verdicts
    go under the axis, where they hide nothing."""
    axis.barh(names, values, color=[_IPCFW if n.startswith("ipcfw") else _OTHER for n in names])
    axis.invert_yaxis()
    axis.set_title(title)
    axis.set_xlabel(f"{unit}\n{note}" if note else unit, fontsize=8)
    for y, value in enumerate(values):
        axis.annotate(f"{value:,.0f}", (value, y), xytext=(4, 0), textcoords="offset points",
                      va="center", fontsize=8)


def _sync(axis: Any, results: dict[str, Any], targets: dict[str, Any]) -> None:
    names = list(results)
    medians = [results[n]["sync_median_us"] for n in names]
    _bars(axis, names, medians, "sync round trip (median; | the p99)", "microseconds, log scale",
          _verdicts(targets, "kernel_sync", "direct_sync"))
    axis.plot([results[n]["sync_p99_us"] for n in names], names, "|", color="black",
              markersize=12)
    axis.set_xscale("log")


def _pipelined(axis: Any, results: dict[str, Any], targets: dict[str, Any]) -> None:
    names = [n for n in results if results[n].get("pipelined_calls_per_s")]
    rates = [results[n]["pipelined_calls_per_s"] for n in names]
    _bars(axis, names, rates, "pipelined (64 in flight)", "calls/s",
          _verdicts(targets, "kernel_pipelined", "direct_pipelined"))


def _fleet(axis: Any, fleet: dict[str, Any] | None, targets: dict[str, Any]) -> None:
    if not fleet:
        _empty(axis, "client processes: not measured")
        return
    names = list(fleet)
    rates = [fleet[n]["calls_per_s"] for n in names]
    processes = next(iter(fleet.values()))["processes"]
    _bars(axis, names, rates, f"{processes} client processes, aggregate", "calls/s",
          _verdicts(targets, "fleet"))


def _descriptors(axis: Any, rows: list[dict[str, Any]], targets: dict[str, Any]) -> None:
    if not rows:
        _empty(axis, "descriptors: not measured")
        return
    for path in dict.fromkeys(r["path"] for r in rows):
        points = [(r["size"], r["mb_per_s"]) for r in rows
                  if r["path"] == path and r["mb_per_s"] is not None]
        if points:
            sizes, rates = zip(*points)
            axis.plot(sizes, rates, marker="o", label=path)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_title("descriptor round trips")
    axis.set_ylabel("MB/s")
    axis.legend(fontsize=8)
    note = _verdicts(targets, "descriptor")
    axis.set_xlabel(f"bytes\n{note}" if note else "bytes", fontsize=8)


def _empty(axis: Any, text: str) -> None:
    axis.text(0.5, 0.5, text, ha="center", va="center", transform=axis.transAxes)
    axis.set_axis_off()
