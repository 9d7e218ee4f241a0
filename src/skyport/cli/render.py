"""How ``skyport`` shows things to a person: tables that fit the terminal, colored states, human units.

Everything from the core is wrapped in :class:`~rich.text.Text`, never parsed as markup, so a job named
``[red]x`` prints as written. Columns marked ``shrink`` give up width first (their cells end in "…");
the others keep theirs for as long as the terminal allows.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rich.console import Group, JustifyMethod, RenderableType
from rich.table import Table
from rich.text import Text

from skyport.models import Account, ArrayJob, Costs, Event, Flavor, Image, Job, JobState, Node, Remote

STATE_STYLES: dict[str, str] = {
    JobState.QUEUED: "yellow",
    JobState.SCHEDULED: "cyan",
    JobState.STAGING_IN: "cyan",
    JobState.RUNNING: "bold blue",
    JobState.STAGING_OUT: "cyan",
    JobState.COMPLETED: "green",
    JobState.FAILED: "bold red",
    JobState.CANCELED: "magenta",
    "idle": "green",
    "busy": "blue",
    "offline": "red",
    "maint": "yellow",
    "stopped": "dim",
    "down": "red",
}


@dataclass(frozen=True)
class Column:
    header: str
    shrink: bool = False
    justify: JustifyMethod = "left"


def state(value: str) -> Text:
    return Text(value, style=STATE_STYLES.get(value, ""))


def size(count: int) -> str:
    """Bytes in binary units: ``512 MiB``, ``3.5 GiB``; ``-`` for nothing."""
    if count <= 0:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{int(value)} {unit}" if unit == "B" or value >= 100 else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float | None) -> str:
    """``45s``, ``3m05s``, ``2h03m``, ``4d02h``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02}h"
    if hours:
        return f"{hours}h{minutes:02}m"
    if minutes:
        return f"{minutes}m{secs:02}s"
    return f"{secs}s"


def when(moment: datetime | None, *, full: bool = False) -> str:
    """Local time: the clock alone for today, the date too otherwise (always with ``full``)."""
    if moment is None:
        return "-"
    local = moment.astimezone()
    if full:
        return local.strftime("%Y-%m-%d %H:%M:%S %Z")
    if local.date() == datetime.now().astimezone().date():
        return local.strftime("%H:%M:%S")
    return local.strftime("%Y-%m-%d %H:%M")


def exit_status(job: Job) -> str:
    if job.signal is not None:
        return f"sig {job.signal}"
    return "-" if job.exit_code is None else str(job.exit_code)


def elapsed(job: Job) -> str:
    return duration(job.duration) if job.start_time else "-"


def outcome(job: Job) -> str:
    """One line on how a job ended (or where it is): ``failed (exit code 3) after 2s: <details>``."""
    text = job.state.value
    if job.signal is not None:
        text += f" (signal {job.signal})"
    elif job.exit_code is not None:
        text += f" (exit code {job.exit_code})"
    if job.start_time:
        text += f" after {duration(job.duration)}"
    return f"{text}: {job.state_details}" if job.state_details else text


def table(columns: Sequence[Column], rows: Iterable[Sequence[object]]) -> Table:
    """A borderless table; cells stay on one line, shrinkable columns are cut first when space runs out."""
    out = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for column in columns:
        # A wrapable column is what rich narrows first; the cells themselves never wrap (see _cell).
        out.add_column(column.header, no_wrap=not column.shrink, overflow="ellipsis", justify=column.justify)
    for row in rows:
        out.add_row(*(_cell(value) for value in row))
    return out


def _cell(value: object) -> Text:
    text = value.copy() if isinstance(value, Text) else Text(str(value))
    text.no_wrap = True
    text.overflow = "ellipsis"
    return text


def jobs(items: Sequence[Job]) -> Table:
    columns = [
        Column("ID", shrink=True),
        Column("NAME", shrink=True),
        Column("USER", shrink=True),
        Column("STATE"),
        Column("NODES", shrink=True),
        Column("SUBMITTED"),
        Column("TIME", justify="right"),
        Column("EXIT", justify="right"),
    ]
    rows = (
        [
            j.id,
            j.name if j.array_index is None else f"{j.name}[{j.array_index}]",
            j.owner,
            state(j.state),
            ",".join(j.node_names) or "-",
            when(j.submit_time),
            elapsed(j),
            exit_status(j),
        ]
        for j in items
    )
    return table(columns, rows)


def _fields(pairs: Iterable[tuple[str, str | Text | None]]) -> Table:
    """Label/value lines; values wrap (never cut), so ids and commands show in full."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for label, value in pairs:
        if value not in (None, "", "-"):
            grid.add_row(label, value if isinstance(value, Text) else Text(str(value)))
    return grid


def job(item: Job) -> Table:
    spec = item.spec
    status = state(item.state)
    if item.state_details:
        status.append(f"  {item.state_details}", style="")
    payload = shlex.join(spec.command) if spec.command else _first_lines(spec.script or "")
    return _fields(
        [
            ("id", item.id),
            ("name", item.name),
            ("owner", f"{item.owner} (account {item.account})"),
            ("state", status),
            ("reason", item.reason),
            ("expected start", when(item.estimated_start, full=True) if item.estimated_start else None),
            ("depends on", ", ".join(spec.depends)),
            ("attempt", str(item.attempt) if item.attempt > 1 else None),
            ("exit", exit_status(item)),
            ("cancel", "requested" if item.cancel_requested and not item.state.terminal else None),
            ("nodes", ", ".join(item.node_names)),
            ("remote", item.remote),
            ("submitted", when(item.submit_time, full=True)),
            ("started", when(item.start_time, full=True)),
            ("ended", when(item.end_time, full=True)),
            ("run time", elapsed(item)),
            ("command" if spec.command else "script", payload),
            ("resources", _resources(item)),
            ("walltime", duration(spec.walltime) if spec.walltime else None),
            ("image", spec.container_image),
            ("env", " ".join(f"{k}={v}" for k, v in spec.env.items())),
            ("inputs", " ".join(spec.input_files)),
            ("outputs", " ".join(spec.output_files)),
            ("comment", spec.comment),
        ]
    )


def _first_lines(script: str, count: int = 6) -> str:
    lines = script.rstrip("\n").split("\n")
    more = f"\n… ({len(lines) - count} more lines)" if len(lines) > count else ""
    return "\n".join(lines[:count]) + more


def _resources(item: Job) -> str:
    spec = item.spec
    parts = [f"{spec.nodes} node(s)" if spec.nodes > 1 else "", f"{spec.cpus} cpu(s)"]
    parts += [f"{size(spec.mem)} mem" if spec.mem else "", f"{spec.gpus} gpu(s)" if spec.gpus else ""]
    return ", ".join(p for p in parts if p)


def events(items: Sequence[Event]) -> Table:
    columns = [
        Column("TIME"),
        Column("TRY", justify="right"),
        Column("STATE"),
        Column("REASON", shrink=True),
        Column("MESSAGE", shrink=True),
    ]
    rows = (
        [
            when(e.time),
            str(e.attempt),
            _transition(e),
            e.reason,
            e.message,
        ]
        for e in items
    )
    return table(columns, rows)


def _transition(event: Event) -> Text:
    if event.from_state is None or event.from_state == event.to_state:
        return state(event.to_state)
    return Text.assemble(state(event.from_state), " → ", state(event.to_state))


def nodes(items: Sequence[Node]) -> Table:
    columns = [
        Column("NAME", shrink=True),
        Column("STATE"),
        Column("CPUS", justify="right"),
        Column("MEM (used/all)", justify="right"),
        Column("GPUS", justify="right"),
        Column("ADDRESS", shrink=True),
        Column("LABELS", shrink=True),
    ]
    rows = (
        [
            n.name,
            state("down") if n.state_power == "down" else state(n.state_alloc),
            f"{n.alloc_cpus}/{n.cpus}",
            f"{size(n.alloc_mem) if n.alloc_mem else 0} / {size(n.mem)}",
            f"{n.alloc_gpus}/{n.gpus}" if n.gpus else "-",
            n.ip or n.host,
            ",".join(f"{k}={v}" for k, v in n.labels.items()) or "-",
        ]
        for n in items
    )
    return table(columns, rows)


def flavors(items: Sequence[Flavor]) -> Table:
    columns = [
        Column("NAME", shrink=True),
        Column("CPUS", justify="right"),
        Column("MEM", justify="right"),
        Column("GPUS", justify="right"),
        Column("STORAGE", justify="right"),
        Column("PRICE/H", justify="right"),
        Column("REMOTE", shrink=True),
    ]
    rows = (
        [f.name, str(f.cpus), size(f.mem), str(f.gpus), size(f.storage), f"{f.price:.4g}", f.remote_id]
        for f in items
    )
    return table(columns, rows)


def images(items: Sequence[Image]) -> Table:
    columns = [
        Column("NAME", shrink=True),
        Column("KIND"),
        Column("REMOTE", shrink=True),
        Column("COMMENT", shrink=True),
    ]
    return table(columns, ([i.name, i.kind, i.remote_id or "-", i.comment or "-"] for i in items))


def remotes(items: Sequence[Remote]) -> Table:
    columns = [
        Column("NAME", shrink=True),
        Column("KIND"),
        Column("SERVER", shrink=True),
        Column("ACCOUNT", shrink=True),
        Column("ID", shrink=True),
    ]
    rows = (
        [r.name, r.kind, f"{r.server}:{r.port}" if r.port else r.server or "-", r.account or "-", r.id]
        for r in items
    )
    return table(columns, rows)


def outputs(items: Sequence[dict[str, Any]]) -> Table:
    columns = [Column("FILE", shrink=True), Column("SIZE", justify="right"), Column("SAVED AS", shrink=True)]
    return table(columns, ([str(o["name"]), size(int(o["size"])), str(o.get("path", ""))] for o in items))


def empty(what: str) -> RenderableType:
    return Text(f"no {what}", style="dim")


def counts(array: ArrayJob) -> str:
    """``3 running, 10 queued, 87 completed``: the tasks of an array by state, in lifecycle order."""
    order = list(JobState)
    parts = [
        f"{n} {s.value}" for s, n in sorted(array.states.items(), key=lambda kv: order.index(kv[0])) if n
    ]
    return ", ".join(parts) or "no tasks"


def arrays(items: Sequence[ArrayJob]) -> Table:
    columns = [
        Column("ARRAY", shrink=True),
        Column("NAME", shrink=True),
        Column("USER", shrink=True),
        Column("TASKS", justify="right"),
        Column("STATES", shrink=True),
        Column("SUBMITTED"),
    ]
    rows = (
        [a.id, f"{a.name}[{a.range}]", a.owner, str(a.size), counts(a), when(a.submit_time)] for a in items
    )
    return table(columns, rows)


def array(item: ArrayJob) -> Table:
    return _fields(
        [
            ("array", item.id),
            ("name", item.name),
            ("owner", item.owner),
            ("tasks", f"{item.size} ({item.range})"),
            ("at once", str(item.throttle) if item.throttle else None),
            ("states", counts(item)),
            ("submitted", when(item.submit_time, full=True)),
            ("list them", f"skyport jobs --array {item.id}"),
        ]
    )


def accounts(items: Sequence[Account]) -> Table:
    columns = [
        Column("ACCOUNT", shrink=True),
        Column("SHARE", justify="right"),
        Column("USAGE (CPU-h)", justify="right"),
        Column("BUDGET", justify="right"),
        Column("MEMBERS", shrink=True),
    ]
    rows = (
        [
            a.name,
            f"{a.share:g}",
            f"{a.usage / 3600:,.1f}",
            "-" if a.budget is None else f"{a.budget:,.2f}",
            ", ".join(a.members) or "-",
        ]
        for a in items
    )
    return table(columns, rows)


def costs(data: Costs) -> Group:
    """Spend per account, then the costliest jobs."""
    account_columns = [
        Column("ACCOUNT", shrink=True),
        Column("SPEND", justify="right"),
        Column("IN PERIOD", justify="right"),
        Column("BUDGET", justify="right"),
        Column("LEFT", justify="right"),
    ]
    account_rows = (
        [
            a.account,
            f"{a.spend:,.2f}",
            f"{a.jobs_cost:,.2f}",
            "-" if a.budget is None else f"{a.budget:,.2f}",
            "-" if a.budget_left is None else f"{a.budget_left:,.2f}",
        ]
        for a in data.accounts
    )
    job_columns = [
        Column("JOB", shrink=True),
        Column("NAME", shrink=True),
        Column("OWNER", shrink=True),
        Column("ACCOUNT", shrink=True),
        Column("REMOTE", shrink=True),
        Column("FLAVOR", shrink=True),
        Column("STATE"),
        Column("COST", justify="right"),
    ]
    job_rows = (
        [
            j.id,
            j.name or "-",
            j.owner,
            j.account,
            j.remote or "-",
            j.flavor or "-",
            state(j.state),
            f"{j.cost:,.4f}",
        ]
        for j in data.jobs
    )
    parts: list[RenderableType] = [table(account_columns, account_rows)]
    if data.jobs:
        parts.append(table(job_columns, job_rows))
    return Group(*parts)
