"""What a simulation run is worth: metrics, a side-by-side table, JSON and a plot.

Definitions (all over the jobs that ran, killed ones included, unless said otherwise):

- makespan: from the first submission to the last end;
- utilization: busy cpu-seconds / (the machine's cpus x makespan);
- wait: start - submit; mean and p95 (nearest rank: the smallest wait at least 95% of jobs do not exceed);
- bounded slowdown: max(1, (wait + run) / max(run, 10 s)), so very short jobs do not dominate the mean;
- fair-share deviation of an account: |its fraction of the usage - its fraction of the shares|, where the
  usage is the decayed usage ``plan()`` sees, averaged over time (weighted by how long each value held,
  from the first moment anything was used). Over a whole run that drains its queue, every account's
  final share of the work is just its share of the demand, whatever the algorithm; averaging over time
  shows how closely the scheduler kept accounts to their shares while they competed. The final fraction
  of the work is reported too (``usage_fraction``);
- cost: node-hours x the machine's price per node-hour.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from skyport.sim.engine import JobRecord, SimResult

#: Runs shorter than this count as this long in the bounded slowdown.
SLOWDOWN_BOUND_S = 10


@dataclass(frozen=True)
class AccountMetrics:
    share_fraction: float  # its share over the sum of shares
    usage_fraction: float  # its fraction of all busy cpu-seconds of the run
    deviation: float  # time-averaged |decayed usage fraction - share fraction|


@dataclass(frozen=True)
class Metrics:
    algorithm: str
    jobs: int
    completed: int
    killed: int
    rejected: int
    unstarted: int
    makespan_s: int
    utilization: float
    mean_wait_s: float
    p95_wait_s: float
    mean_bounded_slowdown: float
    accounts: dict[str, AccountMetrics]
    max_fairshare_deviation: float
    cost: float
    plan_calls: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(fraction * len(ordered)) - 1)])


def bounded_slowdown(record: JobRecord) -> float:
    wait = record.wait or 0
    return max(1.0, (wait + record.run) / max(record.run, SLOWDOWN_BOUND_S))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _deviations(result: SimResult, share_fractions: Sequence[float]) -> list[float]:
    """Time-weighted mean of |decayed usage fraction - share fraction| per account (in ``accounts`` order)."""
    totals = [0.0] * len(share_fractions)
    weight = 0.0
    for (t0, used), (t1, _) in itertools.pairwise(result.usage):
        everyone = sum(used)
        if t1 <= t0 or everyone <= 0:
            continue
        for i, (u, target) in enumerate(zip(used, share_fractions, strict=True)):
            totals[i] += (t1 - t0) * abs(u / everyone - target)
        weight += t1 - t0
    return [t / weight if weight else 0.0 for t in totals]


def _accounts(result: SimResult, ran: Sequence[JobRecord], busy: float) -> dict[str, AccountMetrics]:
    names = result.accounts or tuple(sorted({*result.workload.shares, *(r.job.account for r in ran)}))
    shares = [result.workload.shares.get(name, 1.0) for name in names]
    total_share = sum(shares)
    fractions = [share / total_share if total_share else 0.0 for share in shares]
    worked = dict.fromkeys(names, 0.0)
    for r in ran:
        worked[r.job.account] += r.job.total_cpus * r.run
    deviations = _deviations(result, fractions) if result.usage else [0.0] * len(names)
    return {
        name: AccountMetrics(fraction, worked[name] / busy if busy else 0.0, deviation)
        for name, fraction, deviation in sorted(zip(names, fractions, deviations, strict=True))
    }


def metrics(result: SimResult) -> Metrics:
    machine = result.workload.machine
    records = result.records
    ran = [r for r in records if r.start is not None]
    first_submit = min((r.job.submit for r in records), default=0)
    makespan = max((r.end for r in ran), default=first_submit) - first_submit
    busy = sum(r.job.total_cpus * r.run for r in ran)
    accounts = _accounts(result, ran, busy)
    waits = [float(r.wait) for r in ran if r.wait is not None]
    node_hours = sum(r.job.nodes * r.run for r in ran) / 3600
    outcomes = [r.outcome for r in records]
    return Metrics(
        algorithm=result.algorithm,
        jobs=len(records),
        completed=outcomes.count("completed"),
        killed=outcomes.count("killed"),
        rejected=outcomes.count("rejected"),
        unstarted=outcomes.count("unstarted"),
        makespan_s=makespan,
        utilization=busy / (machine.cpus * makespan) if makespan else 0.0,
        mean_wait_s=_mean(waits),
        p95_wait_s=percentile(waits, 0.95),
        mean_bounded_slowdown=_mean([bounded_slowdown(r) for r in ran]),
        accounts=accounts,
        max_fairshare_deviation=max((a.deviation for a in accounts.values()), default=0.0),
        cost=node_hours * machine.price_per_node_hour,
        plan_calls=result.plan_calls,
    )


# --- the table ---------------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


#: (label, value, text, higher is better) for each row of the table.
_ROWS: tuple[tuple[str, str, str, bool | None], ...] = (
    ("utilization", "utilization", "pct", True),
    ("mean wait", "mean_wait_s", "duration", False),
    ("p95 wait", "p95_wait_s", "duration", False),
    ("mean bounded slowdown", "mean_bounded_slowdown", "float", False),
    ("max fair-share deviation", "max_fairshare_deviation", "float", False),
    ("makespan", "makespan_s", "duration", False),
    ("cost", "cost", "money", False),
    ("completed", "completed", "int", None),
    ("killed at walltime", "killed", "int", None),
    ("rejected", "rejected", "int", None),
    ("never started", "unstarted", "int", None),
    ("plan() calls", "plan_calls", "int", None),
)


def _text(value: float, style: str) -> str:
    if style == "pct":
        return f"{100 * value:.1f}%"
    if style == "duration":
        return _duration(value)
    if style == "float":
        return f"{value:.3f}"
    if style == "money":
        return f"{value:,.2f}"
    return f"{value:.0f}"


def table(results: Sequence[Metrics], title: str = "") -> Table:
    """Algorithms as columns, metrics as rows; the best value of a row in bold when they differ."""
    grid = Table(title=title or None, title_justify="left")
    grid.add_column("metric")
    for m in results:
        grid.add_column(m.algorithm, justify="right")
    for label, attr, style, higher in _ROWS:
        values = [float(getattr(m, attr)) for m in results]
        texts = [_text(v, style) for v in values]
        best = (max if higher else min)(values) if higher is not None and len(set(texts)) > 1 else None
        grid.add_row(
            label, *(f"[bold]{t}[/bold]" if v == best else t for v, t in zip(values, texts, strict=True))
        )
    accounts = sorted({name for m in results for name in m.accounts})
    for name in accounts:
        grid.add_row(
            f"  {name} (share {_share(results, name):.0%})",
            *(f"{m.accounts[name].deviation:.3f}" if name in m.accounts else "-" for m in results),
            style="dim",
        )
    return grid


def _share(results: Sequence[Metrics], account: str) -> float:
    return next((m.accounts[account].share_fraction for m in results if account in m.accounts), 0.0)


# --- the plot ----------------------------------------------------------------------------------------------


def utilization_series(result: SimResult, bins: int = 200) -> tuple[list[float], list[float]]:
    """Time-weighted utilization in ``bins`` equal slices of the run: (slice middles in hours, fractions)."""
    points = result.busy
    if not points:
        return [], []
    start, stop = points[0][0], points[-1][0]
    if stop <= start:
        return [start / 3600], [points[0][1] / result.workload.machine.cpus]
    width = (stop - start) / bins
    area = [0.0] * bins
    for (t0, cpus), (t1, _) in itertools.pairwise(
        points
    ):  # spread each step [t0, t1) over the slices it covers
        first, last = int((t0 - start) / width), min(bins - 1, int((t1 - start) / width))
        for i in range(min(first, bins - 1), last + 1):
            lo = max(t0, start + i * width)
            hi = t1 if i == bins - 1 else min(t1, start + (i + 1) * width)
            if hi > lo:
                area[i] += cpus * (hi - lo)
    capacity = result.workload.machine.cpus * width
    middles = [(start + (i + 0.5) * width) / 3600 for i in range(bins)]
    return middles, [a / capacity for a in area]


def plot(results: Sequence[SimResult], path: Path) -> None:
    """Write one PNG: the wait-time CDF of each algorithm, and utilization over time.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend), so it works without
    a display and leaves no state behind.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    waits_ax, util_ax = figure.subplots(1, 2)
    for result, style in zip(results, itertools.cycle(("-", "--", ":", "-.")), strict=False):
        waits = sorted((r.wait or 0) / 3600 for r in result.records if r.start is not None)
        if waits:
            fractions = [(i + 1) / len(waits) for i in range(len(waits))]
            waits_ax.step(waits, fractions, where="post", label=result.algorithm, linestyle=style)
        hours, fractions_busy = utilization_series(result, bins=100)
        util_ax.plot(hours, [100 * f for f in fractions_busy], label=result.algorithm, linestyle=style)
    waits_ax.set(title="Wait time CDF", xlabel="wait (hours, log above 0.1)", ylabel="fraction of jobs")
    waits_ax.set_xscale("symlog", linthresh=0.1)
    waits_ax.set_ylim(0, 1.02)
    util_ax.set(title="Utilization over time", xlabel="time (hours)", ylabel="cpus busy (%)", ylim=(0, 102))
    for ax in (waits_ax, util_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    name = results[0].workload.name if results else ""
    figure.suptitle(f"skyport simulate: {name}")
    figure.savefig(path, format="png", dpi=110)
