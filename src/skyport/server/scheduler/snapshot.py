"""What the scheduler sees and what it decides. Plain data: no I/O, no store, no clock reads.

The core's scheduler loop builds a :class:`Snapshot` from the store; the simulator builds one from a
workload and a virtual clock. ``plan(snapshot, now)`` turns it into a :class:`Plan`. Everything here is
immutable and hashable-free of surprises, so the same snapshot always gives the same plan.

Units: sizes in bytes, durations in seconds, prices per node-hour, times timezone-aware UTC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

Algorithm = Literal["fcfs", "backfill", "fairshare"]


@dataclass(frozen=True)
class PendingJob:
    """A queued job (or one task of an array job) waiting to be placed."""

    id: str
    priority: int  # the job's own ``priority`` directive
    seq: int  # submission order: ties broken first come, first served
    nodes: int
    cpus: int  # per node
    mem: int  # per node
    gpus: int  # per node
    submit_time: datetime
    remote_id: str | None = None  # None: any remote may take it
    labels: tuple[tuple[str, str], ...] = ()
    account: str = "default"
    #: Seconds it may run; None: the policy's ``default_walltime``.
    walltime: int | None = None
    storage: int = 0  # per node
    #: Whole nodes: no other job shares them while it runs.
    exclusive: bool = False
    #: Job ids that must have completed successfully (``#SWM depends``).
    after_ok: tuple[str, ...] = ()
    #: Job ids that must have ended, however (after any end).
    after_any: tuple[str, ...] = ()
    #: For a task of an array job: the array's id and how many of its tasks may run at once.
    array_id: str | None = None
    array_throttle: int | None = None
    #: A flavor the job asks for by name (elastic capacity), or None.
    flavor: str | None = None
    #: The reason it was waiting for at the last pass ("" for none): lets the loop skip unchanged ones.
    current_reason: str = ""


@dataclass(frozen=True)
class RunningJob:
    """A job that holds resources now (scheduled, staging or running)."""

    id: str
    node_ids: tuple[str, ...]
    cpus: int  # per node
    mem: int
    gpus: int
    start_time: datetime
    #: Seconds it may run; None: the policy's ``default_walltime``. Its end is expected by then.
    walltime: int | None = None
    account: str = "default"
    array_id: str | None = None
    exclusive: bool = False
    storage: int = 0


@dataclass(frozen=True)
class NodeCapacity:
    """A node that is up. ``free_*`` is what no running job holds now."""

    id: str
    remote_id: str
    cpus: int  # total
    mem: int
    gpus: int
    free_cpus: int
    free_mem: int
    free_gpus: int
    labels: tuple[tuple[str, str], ...] = ()
    storage: int = 0
    free_storage: int = 0
    #: Set for nodes of an elastic partition: which flavor it was made of and which account owns it.
    partition_id: str = ""
    flavor: str | None = None
    account: str | None = None


@dataclass(frozen=True)
class FlavorOffer:
    """Elastic capacity: a flavor of a remote that can create partitions for jobs."""

    remote_id: str
    flavor_id: str
    name: str
    cpus: int
    mem: int
    gpus: int
    storage: int
    price: float  # per node-hour
    #: How many partitions the remote may be creating at once, and how many it is creating now.
    max_creating: int = 10
    creating: int = 0


@dataclass(frozen=True)
class AccountState:
    name: str
    #: Fair-share target (any positive weight; shares are compared as fractions of their sum).
    share: float = 1.0
    #: Recent use, decayed by the policy's half-life, in CPU-seconds.
    usage: float = 0.0
    #: What is left of the budget (same unit as prices x hours), or None for no budget.
    budget_left: float | None = None


@dataclass(frozen=True)
class Policy:
    algorithm: Algorithm = "backfill"
    weight_priority: float = 1.0
    weight_fairshare: float = 1000.0
    weight_age: float = 1.0  # per hour waited
    max_age_hours: float = 168.0
    #: Walltime assumed for jobs (running or pending) that gave none.
    default_walltime: int = 3600
    #: Remotes (by id) that use another algorithm for the jobs that name them, e.g. a lab's hosts run
    #: ``fcfs`` while the rest is backfilled. Their jobs are planned first, against that remote's nodes.
    remote_algorithms: tuple[tuple[str, Algorithm], ...] = ()


@dataclass(frozen=True)
class SelfScheduling:
    """A remote that schedules jobs itself (a Slurm cluster): its jobs are forwarded, not placed.

    Its nodes are shown as Sky Port nodes (grouped by the provider's partitions) but are not in
    :attr:`Snapshot.nodes`: no other job is placed on them, and forwarded jobs hold no capacity here.
    """

    remote_id: str
    #: Partition name -> the ids of its nodes (a forwarded job's candidates; the provider picks).
    partitions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: The partition of jobs whose labels name none.
    default_partition: str = ""
    #: The job label naming a partition (e.g. ``slurm.partition``).
    partition_label: str = "partition"


@dataclass(frozen=True)
class Snapshot:
    jobs: tuple[PendingJob, ...]
    nodes: tuple[NodeCapacity, ...]
    running: tuple[RunningJob, ...] = ()
    flavors: tuple[FlavorOffer, ...] = ()
    accounts: Mapping[str, AccountState] = field(default_factory=dict)
    #: Current state of every job some pending job depends on (``completed``, ``failed``, ...);
    #: a dependency missing from here does not exist.
    dependency_states: Mapping[str, str] = field(default_factory=dict)
    policy: Policy = field(default_factory=Policy)
    #: Remotes that schedule jobs themselves, by id (see :mod:`.forwarding`).
    self_scheduling: Mapping[str, SelfScheduling] = field(default_factory=dict)
    #: The remote of each dependency that has one (where it runs, or the remote it asked for).
    dependency_remotes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Placement:
    """Start the job now on these existing nodes."""

    job_id: str
    node_ids: tuple[str, ...]


@dataclass(frozen=True)
class Forward:
    """Hand the job to a self-scheduling remote now, on one of its partitions (it decides the rest)."""

    job_id: str
    remote_id: str
    partition: str
    node_ids: tuple[str, ...]


@dataclass(frozen=True)
class Provision:
    """Create an elastic partition of ``nodes`` nodes of this flavor for the job."""

    job_id: str
    remote_id: str
    flavor_id: str
    nodes: int
    cost_per_hour: float


@dataclass(frozen=True)
class Rejection:
    """A job that can never run (impossible size, a dependency that can no longer be met): it fails."""

    job_id: str
    reason: str
    message: str


@dataclass(frozen=True)
class Wait:
    """A job that stays queued, why (``Resources``, ``Priority``, ``Dependency``, ``Budget``,
    ``Reservation``, ``ArrayThrottle``, ``ProvisionLimit``), and when it is expected to start if known."""

    job_id: str
    reason: str
    message: str
    estimated_start: datetime | None = None


@dataclass
class Plan:
    placements: list[Placement] = field(default_factory=list)
    provisions: list[Provision] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    waits: list[Wait] = field(default_factory=list)
    forwards: list[Forward] = field(default_factory=list)
