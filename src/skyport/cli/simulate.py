"""``skyport simulate``: replay a workload through the scheduler's ``plan()`` and compare algorithms.

Runs entirely on this machine, without a core: it is a capacity-planning tool. The same workload goes
through each algorithm asked for, so the table compares like with like. The simulator is imported when
the command runs, so it costs every other ``skyport`` command nothing at start-up.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from skyport.cli.output import err_console, fail, print_json

if TYPE_CHECKING:
    from skyport.server.scheduler.snapshot import Algorithm
    from skyport.sim.engine import SimResult
    from skyport.sim.workload import Workload

console = Console()

ALGORITHMS: tuple[Algorithm, ...] = ("fcfs", "backfill", "fairshare")
_BY_NAME: dict[str, Algorithm] = {name: name for name in ALGORITHMS}
DEFAULT_JOBS = 1000
DEFAULT_NODES = 64
DEFAULT_CPUS_PER_NODE = 16
DEFAULT_HALF_LIFE_HOURS = 7 * 24.0


class AlgorithmChoice(StrEnum):
    fcfs = "fcfs"
    backfill = "backfill"
    fairshare = "fairshare"
    all = "all"


def _workload(
    source: str,
    jobs: int | None,
    nodes: int | None,
    cpus_per_node: int | None,
    seed: int,
    load: float,
    price: float,
) -> Workload:
    from skyport.sim.workload import (
        GiB,
        Machine,
        SwfError,
        SyntheticSpec,
        read_swf,
        swf_machine,
        swf_workload,
        synthetic,
    )

    if source == "synthetic":
        cpus = cpus_per_node or DEFAULT_CPUS_PER_NODE
        spec = SyntheticSpec(
            jobs=DEFAULT_JOBS if jobs is None else jobs,
            nodes=nodes or DEFAULT_NODES,
            cpus_per_node=cpus,
            mem_per_node=4 * GiB * cpus,
            seed=seed,
            load=load,
            price_per_node_hour=price,
        )
        return synthetic(spec)
    path = Path(source)
    if not path.is_file():
        fail(f"{source} is not a file", hint="give `synthetic` or the path of an SWF trace (.swf)")
    try:
        trace = read_swf(path)
        machine = swf_machine(trace, nodes=nodes, cpus_per_node=cpus_per_node)
    except (OSError, SwfError, ValueError) as exc:
        fail(f"cannot read {source}: {exc}", hint="the Standard Workload Format has 18 fields per line")
    machine = Machine(machine.nodes, machine.cpus_per_node, machine.mem_per_node, price)
    workload = swf_workload(trace, machine, limit=jobs, name=path.name)
    if not workload.jobs:
        fail(
            f"{source} has no job that can be replayed", hint="jobs need a known runtime and processor count"
        )
    return workload


def _describe(workload: Workload) -> dict[str, Any]:
    m = workload.machine
    return {
        "name": workload.name,
        "jobs": len(workload.jobs),
        "nodes": m.nodes,
        "cpus_per_node": m.cpus_per_node,
        "mem_per_node": m.mem_per_node,
        "price_per_node_hour": m.price_per_node_hour,
        "accounts": dict(workload.shares),
    }


def simulate_command(
    workload_source: Annotated[
        str,
        typer.Option(
            "--workload",
            "-w",
            metavar="synthetic|PATH.swf",
            help="A synthetic workload, or an SWF trace file",
        ),
    ] = "synthetic",
    algorithm: Annotated[
        AlgorithmChoice, typer.Option("--algorithm", "-a", help="Scheduling algorithm, or all of them")
    ] = AlgorithmChoice.all,
    jobs: Annotated[
        int | None,
        typer.Option(min=1, help=f"Jobs to generate (default {DEFAULT_JOBS}), or the first N of a trace"),
    ] = None,
    nodes: Annotated[
        int | None,
        typer.Option(min=1, help=f"Nodes (default {DEFAULT_NODES}; for a trace, its MaxNodes header)"),
    ] = None,
    cpus_per_node: Annotated[
        int | None,
        typer.Option(
            min=1, help=f"CPUs per node (default {DEFAULT_CPUS_PER_NODE}; for a trace, MaxProcs / MaxNodes)"
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the synthetic workload")] = 1,
    load: Annotated[
        float,
        typer.Option(min=0.01, help="Work offered by the synthetic workload, as a fraction of capacity"),
    ] = 0.85,
    half_life: Annotated[
        float, typer.Option(min=0.01, help="Half-life of account usage for fair-share, in hours")
    ] = DEFAULT_HALF_LIFE_HOURS,
    price: Annotated[float, typer.Option(min=0, help="Price per node-hour, for the cost row")] = 0.0,
    plot_path: Annotated[
        Path | None,
        typer.Option("--plot", metavar="PATH.png", help="Write wait-time CDFs and utilization over time"),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON")] = False,
) -> None:
    """Replay a workload through the scheduler with a virtual clock and compare the algorithms.

    Reports utilization, mean and p95 wait, bounded slowdown, fair-share deviation per account, cost and
    makespan. No core is needed.

    Example: [bold]skyport simulate[/bold]  (1000 synthetic jobs on 64 nodes, every algorithm)

    Example: [bold]skyport simulate --jobs 5000 --nodes 128 --seed 7 --plot sim.png[/bold]

    Example: [bold]skyport simulate --workload trace.swf --algorithm backfill --json[/bold]
    """
    from skyport.sim.engine import PlanError, simulate
    from skyport.sim.report import metrics, plot, table

    workload = _workload(workload_source, jobs, nodes, cpus_per_node, seed, load, price)
    chosen = ALGORITHMS if algorithm is AlgorithmChoice.all else (_BY_NAME[algorithm.value],)
    results: list[SimResult] = []
    for name in chosen:
        with err_console.status(f"simulating {len(workload.jobs)} jobs with {name}…"):
            try:
                results.append(simulate(workload, name, half_life=half_life * 3600))
            except PlanError as exc:
                fail(
                    f"the scheduler made an impossible plan with {name}: {exc}",
                    hint="this is a scheduler bug",
                )
    if plot_path is not None:
        try:
            plot(results, plot_path)
        except ImportError:
            fail("plots need matplotlib", hint="pip install 'skyport-wm[sim]'")
        except OSError as exc:
            fail(f"cannot write {plot_path}: {exc}")
    scores = [metrics(r) for r in results]
    if json_out:
        print_json(
            {
                "workload": _describe(workload),
                "results": {m.algorithm: m.to_json() for m in scores},
                "plot": None if plot_path is None else str(plot_path),
            }
        )
        return
    m = workload.machine
    title = (
        f"{workload.name}: {len(workload.jobs)} jobs on {m.nodes} nodes x {m.cpus_per_node} cpus"
        f" ({m.cpus} cpus)"
    )
    console.print(title)
    console.print(table(scores))
    if plot_path is not None:
        console.print(f"[green]✓[/green] plot written to {plot_path}")


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate_command)
