"""Workloads for the simulator: a synthetic generator and a reader of the Standard Workload Format.

Both produce a :class:`Workload`: a machine (identical nodes) and jobs with a submit time, a size, the
runtime they will actually have and the walltime their user asked for. Times are whole seconds from the
start of the workload, so simultaneous events really are simultaneous and results are exact.

The synthetic generator draws everything from one ``random.Random(seed)``: the same spec always gives the
same jobs. The SWF reader follows the Parallel Workloads Archive's definition
(https://www.cs.huji.ac.il/labs/parallel/workload/swf.html): 18 whitespace-separated fields per job, ``;``
header comments (``; MaxNodes: 128``), and -1 for "unknown".
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class Machine:
    """Identical nodes: the capacity a workload is replayed on."""

    nodes: int
    cpus_per_node: int
    mem_per_node: int
    #: What a node costs per hour (0: no cost is reported).
    price_per_node_hour: float = 0.0

    @property
    def cpus(self) -> int:
        return self.nodes * self.cpus_per_node


@dataclass(frozen=True)
class SimJob:
    """One job of a workload, with what the scheduler is told and what will really happen."""

    id: str
    submit: int  # seconds from the start of the workload
    runtime: int  # seconds it really runs (unknown to the scheduler)
    walltime: int  # seconds its user asked for; it is killed when it runs that long
    nodes: int
    cpus: int  # per node
    mem: int  # bytes per node
    account: str = "default"

    @property
    def total_cpus(self) -> int:
        return self.nodes * self.cpus


@dataclass(frozen=True)
class Workload:
    name: str
    machine: Machine
    jobs: tuple[SimJob, ...]  # in submission order
    #: Fair-share weight of each account (compared as fractions of their sum).
    shares: Mapping[str, float] = field(default_factory=dict)


# --- synthetic --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobClass:
    """A kind of job: how often it comes and the ranges its size and runtime are drawn from.

    Node counts and runtimes are drawn log-uniformly (small values more often, as in real traces); cpus
    per node as people ask for them (a power of two, or the whole node), memory as a quarter, half or all
    of the node's memory per cpu. Ranges are capped at the machine's size.
    """

    name: str
    weight: float
    min_nodes: int
    max_nodes: int
    min_cpus: int  # per node
    max_cpus: int | None  # per node; None: the whole node
    min_runtime: int
    max_runtime: int


@dataclass(frozen=True)
class AccountSpec:
    """An account: its fair-share weight, and how much of the submitted work is its (``activity``)."""

    name: str
    share: float
    activity: float


DEFAULT_ACCOUNTS = (
    AccountSpec("physics", share=4.0, activity=2.0),
    AccountSpec("chemistry", share=2.0, activity=3.0),
    AccountSpec("biology", share=1.0, activity=1.0),
    AccountSpec("students", share=1.0, activity=4.0),
)


def default_classes(nodes: int) -> tuple[JobClass, ...]:
    """Many short single-node jobs, some medium parallel ones and a few wide long ones."""
    return (
        JobClass("serial", 0.6, 1, 1, 1, None, 60, 3600),
        JobClass("parallel", 0.3, 2, max(2, nodes // 8), 1, None, 600, 4 * 3600),
        JobClass("wide", 0.1, max(2, nodes // 4), max(2, nodes // 2), 1, None, 3600, 8 * 3600),
    )


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of a synthetic workload. The same spec (seed included) always gives the same jobs."""

    jobs: int = 1000
    nodes: int = 64
    cpus_per_node: int = 16
    mem_per_node: int = 64 * GiB
    seed: int = 1
    #: Jobs per second (Poisson arrivals). None: chosen so the work offered is ``load`` x the capacity.
    arrival_rate: float | None = None
    load: float = 0.9
    #: None: :func:`default_classes` for the machine.
    classes: tuple[JobClass, ...] | None = None
    accounts: tuple[AccountSpec, ...] = DEFAULT_ACCOUNTS
    #: Users overestimate: walltime = runtime x uniform(1, this), rounded up to a minute.
    overestimate: float = 3.0
    #: Some users underestimate: this share of jobs asks for less than it needs and is killed.
    underestimate_fraction: float = 0.02
    price_per_node_hour: float = 0.0

    def machine(self) -> Machine:
        return Machine(self.nodes, self.cpus_per_node, self.mem_per_node, self.price_per_node_hour)


def _log_uniform_int(rng: random.Random, lo: int, hi: int) -> int:
    if hi <= lo:
        return lo
    return min(hi, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))


def _round_request(rng: random.Random, lo: int, hi: int) -> int:
    """A cpu count as people ask for them: a power of two in [lo, hi], or hi (the whole node)."""
    choices = [c for c in (1 << k for k in range(hi.bit_length())) if lo <= c <= hi]
    if hi not in choices:
        choices.append(hi)
    return rng.choice(choices)


def _walltime(rng: random.Random, runtime: int, spec: SyntheticSpec) -> int:
    if rng.random() < spec.underestimate_fraction:
        return max(1, int(runtime * rng.uniform(0.3, 0.9)))
    asked = runtime * rng.uniform(1.0, max(1.0, spec.overestimate))
    return max(runtime, 60 * math.ceil(asked / 60))


def _check_spec(spec: SyntheticSpec) -> None:
    if spec.jobs < 0 or spec.nodes < 1 or spec.cpus_per_node < 1:
        raise ValueError("a synthetic workload needs jobs >= 0, nodes >= 1 and cpus per node >= 1")
    if spec.arrival_rate is not None and spec.arrival_rate <= 0:
        raise ValueError("the arrival rate must be positive")
    if spec.arrival_rate is None and spec.load <= 0:
        raise ValueError("the load must be positive")
    if not spec.accounts or any(a.share <= 0 or a.activity < 0 for a in spec.accounts):
        raise ValueError("accounts need a positive share and a non-negative activity")
    if sum(a.activity for a in spec.accounts) <= 0:
        raise ValueError("at least one account must submit jobs (activity > 0)")
    for c in spec.classes or ():
        if not (c.weight >= 0 and 1 <= c.min_nodes <= c.max_nodes and 1 <= c.min_runtime <= c.max_runtime):
            raise ValueError(f"job class {c.name!r}: ranges must be 1 <= min <= max and the weight >= 0")
        if c.min_cpus < 1 or (c.max_cpus is not None and c.max_cpus < c.min_cpus):
            raise ValueError(f"job class {c.name!r}: cpus must be 1 <= min <= max")


def synthetic(spec: SyntheticSpec) -> Workload:
    """Generate a workload: sizes and runtimes per job class, accounts by activity, Poisson arrivals."""
    _check_spec(spec)
    rng = random.Random(spec.seed)
    machine = spec.machine()
    classes = spec.classes or default_classes(spec.nodes)
    mem_per_cpu = spec.mem_per_node // spec.cpus_per_node
    drafts: list[tuple[int, int, int, int, int, str]] = []  # runtime, walltime, nodes, cpus, mem, account
    for _ in range(spec.jobs):
        kind = rng.choices(classes, weights=[c.weight for c in classes])[0]
        nodes = _log_uniform_int(rng, min(kind.min_nodes, spec.nodes), min(kind.max_nodes, spec.nodes))
        top = spec.cpus_per_node if kind.max_cpus is None else min(kind.max_cpus, spec.cpus_per_node)
        cpus = _round_request(rng, min(kind.min_cpus, top), top)
        mem = min(spec.mem_per_node, cpus * mem_per_cpu // rng.choice((4, 2, 1)))
        runtime = _log_uniform_int(rng, kind.min_runtime, kind.max_runtime)
        account = rng.choices(spec.accounts, weights=[a.activity for a in spec.accounts])[0].name
        drafts.append((runtime, _walltime(rng, runtime, spec), nodes, cpus, mem, account))
    if spec.arrival_rate is not None:
        rate = spec.arrival_rate
    else:
        work = sum(d[0] * d[2] * d[3] for d in drafts) / max(1, len(drafts))  # cpu-seconds per job
        rate = spec.load * machine.cpus / max(work, 1.0)
    jobs: list[SimJob] = []
    clock = 0.0
    for index, (runtime, walltime, nodes, cpus, mem, account) in enumerate(drafts):
        jobs.append(SimJob(f"j{index + 1}", int(clock), runtime, walltime, nodes, cpus, mem, account))
        clock += rng.expovariate(rate)
    return Workload(
        name=f"synthetic(jobs={spec.jobs}, seed={spec.seed})",
        machine=machine,
        jobs=tuple(jobs),
        shares={a.name: a.share for a in spec.accounts},
    )


# --- Standard Workload Format ------------------------------------------------------------------------------


class SwfError(ValueError):
    """A line of an SWF file that does not follow the format."""


@dataclass(frozen=True)
class SwfRecord:
    """One job line of an SWF file, field by field; None where the trace says -1 (unknown).

    Memory fields are kilobytes per processor, times are seconds, as the format defines them.
    """

    job: int
    submit: int | None
    wait: int | None
    run: int | None
    allocated_procs: int | None
    avg_cpu: float | None
    used_mem: float | None
    requested_procs: int | None
    requested_time: int | None
    requested_mem: float | None
    status: int | None
    user: int | None
    group: int | None
    executable: int | None
    queue: int | None
    partition: int | None
    preceding_job: int | None
    think_time: int | None


_FLOAT_FIELDS = {"avg_cpu", "used_mem", "requested_mem"}
_FIELDS = [f.name for f in fields(SwfRecord)]


@dataclass(frozen=True)
class SwfTrace:
    """An SWF file: its header (``; Key: value`` comments, keys as written) and its job records."""

    header: Mapping[str, str]
    records: tuple[SwfRecord, ...]

    def header_int(self, key: str) -> int | None:
        """A numeric header value (``MaxNodes``, ``MaxProcs``, ...), or None if absent or not a number."""
        for name, value in self.header.items():
            if name.lower() == key.lower():
                try:
                    number = int(float(value.split()[0]))
                except (ValueError, IndexError):
                    return None
                return number if number > 0 else None
        return None


def _value(token: str, name: str, line_no: int) -> int | float | None:
    try:
        number = float(token)
    except ValueError:
        raise SwfError(f"line {line_no}: field {name!r} is not a number: {token!r}") from None
    if number < 0:  # -1 is "unknown"; some traces use other negative values for it as well
        return None
    return number if name in _FLOAT_FIELDS else int(number)


def parse_swf(lines: Iterable[str]) -> SwfTrace:
    """Parse SWF text: header comments, then one job per line (blank lines are skipped)."""
    header: dict[str, str] = {}
    records: list[SwfRecord] = []
    for line_no, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith(";"):
            key, colon, value = line[1:].partition(":")
            if colon and key.strip() and " " not in key.strip():
                header.setdefault(key.strip(), value.strip())
            continue
        tokens = line.split()
        if len(tokens) != len(_FIELDS):
            raise SwfError(f"line {line_no}: expected {len(_FIELDS)} fields, found {len(tokens)}")
        values = [_value(token, name, line_no) for token, name in zip(tokens, _FIELDS, strict=True)]
        if values[0] is None:
            raise SwfError(f"line {line_no}: the job number is unknown")
        records.append(SwfRecord(*values))  # type: ignore[arg-type]  # types follow _FLOAT_FIELDS
    return SwfTrace(header, tuple(records))


def read_swf(path: Path) -> SwfTrace:
    with path.open(encoding="utf-8", errors="replace") as handle:
        return parse_swf(handle)


def swf_machine(
    trace: SwfTrace,
    *,
    nodes: int | None = None,
    cpus_per_node: int | None = None,
    mem_per_node: int | None = None,
) -> Machine:
    """The machine a trace ran on: from the arguments, else its ``MaxNodes``/``MaxProcs`` header lines,
    else just large enough for its largest job (one processor per node when nothing says otherwise)."""
    max_nodes, max_procs = trace.header_int("MaxNodes"), trace.header_int("MaxProcs")
    if cpus_per_node is None:
        cpus_per_node = max(1, max_procs // max_nodes) if max_nodes and max_procs else 1
    if nodes is None:
        if max_nodes:
            nodes = max_nodes
        elif max_procs:
            nodes = math.ceil(max_procs / cpus_per_node)
        else:
            largest = max((_procs(r) or 1 for r in trace.records), default=1)
            nodes = math.ceil(largest / cpus_per_node)
    if nodes < 1 or cpus_per_node < 1:
        raise ValueError("the machine needs at least one node and one cpu per node")
    return Machine(nodes, cpus_per_node, mem_per_node or 4 * GiB * cpus_per_node)


def _procs(record: SwfRecord) -> int | None:
    return record.requested_procs or record.allocated_procs


def swf_workload(
    trace: SwfTrace,
    machine: Machine,
    *,
    account_by: Literal["group", "user"] = "group",
    limit: int | None = None,
    name: str = "swf",
) -> Workload:
    """Turn trace records into jobs on ``machine``.

    Processors become nodes x cpus: within one node if they fit, else spread evenly over as few nodes as
    hold them. Walltime is the requested time (the actual runtime when the trace does not say). Memory
    (kilobytes per processor) is capped at a node's. Accounts are the group (or user) ids; all get the
    same share. Records whose runtime or processor count is unknown cannot be replayed and are skipped.
    """
    jobs: list[SimJob] = []
    usable = [r for r in trace.records if r.run is not None and _procs(r) and r.submit is not None]
    start = min((r.submit or 0 for r in usable), default=0)
    for record in usable[:limit] if limit is not None else usable:
        procs = _procs(record) or 1
        nodes = math.ceil(procs / machine.cpus_per_node)
        cpus = math.ceil(procs / nodes)
        runtime = record.run or 0
        walltime = record.requested_time if record.requested_time else max(runtime, 1)
        kb = record.requested_mem if record.requested_mem is not None else record.used_mem
        mem = min(machine.mem_per_node, int((kb or 0) * 1024 * cpus))
        owner = record.group if account_by == "group" else record.user
        account = "default" if owner is None else f"{account_by[0]}{owner}"
        submit = (record.submit or 0) - start
        jobs.append(SimJob(f"j{record.job}", submit, runtime, walltime, nodes, cpus, mem, account))
    jobs.sort(key=lambda j: j.submit)  # stable: trace order among equal submit times
    shares = {job.account: 1.0 for job in jobs}
    return Workload(name=name, machine=machine, jobs=tuple(jobs), shares=dict(sorted(shares.items())))
