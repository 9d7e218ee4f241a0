"""What the scheduler sees and what it decides. Plain data: no I/O, no store, no clock reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class PendingJob:
    id: str
    priority: int
    seq: int  # submission order: ties broken first come, first served
    nodes: int
    cpus: int
    mem: int
    gpus: int
    submit_time: datetime
    remote_id: str | None = None  # None: any remote may take it
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class NodeCapacity:
    """A node that is up, with what is free on it right now."""

    id: str
    remote_id: str
    cpus: int  # total
    mem: int
    gpus: int
    free_cpus: int
    free_mem: int
    free_gpus: int
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Snapshot:
    jobs: tuple[PendingJob, ...]
    nodes: tuple[NodeCapacity, ...]


@dataclass(frozen=True)
class Placement:
    job_id: str
    node_ids: tuple[str, ...]


@dataclass(frozen=True)
class Rejection:
    """A job that can never run with the capacity that exists: it fails with this reason."""

    job_id: str
    reason: str
    message: str


@dataclass(frozen=True)
class Wait:
    """A job that stays queued, and why (shown to its owner)."""

    job_id: str
    reason: str
    message: str


@dataclass
class Plan:
    placements: list[Placement] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    waits: list[Wait] = field(default_factory=list)
