"""First come, first served with resource fit: the scheduler of the core's first release.

Jobs are taken in order (priority, then submission). Each is placed on the first node(s) with enough
free cpus, memory and GPUs; several jobs share a node up to its capacity. When the job at the head
cannot start now, nothing behind it starts either (no backfill: that is the ``backfill`` algorithm's
job), so a large job is never starved by a stream of small ones. A job no node could ever hold is
rejected with a reason instead of waiting forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from skyport.server.scheduler.snapshot import (
    NodeCapacity,
    PendingJob,
    Placement,
    Plan,
    Rejection,
    Snapshot,
    Wait,
)


@dataclass
class _Free:
    node: NodeCapacity
    cpus: int
    mem: int
    gpus: int

    def fits(self, job: PendingJob) -> bool:
        return job.cpus <= self.cpus and job.mem <= self.mem and job.gpus <= self.gpus

    def take(self, job: PendingJob) -> None:
        self.cpus -= job.cpus
        self.mem -= job.mem
        self.gpus -= job.gpus


def _eligible(job: PendingJob, node: NodeCapacity) -> bool:
    if job.remote_id is not None and job.remote_id != node.remote_id:
        return False
    return not job.labels or set(job.labels) <= set(node.labels)


def _could_ever_fit(job: PendingJob, nodes: tuple[NodeCapacity, ...]) -> str | None:
    """None if enough nodes exist for the job when empty; else a message saying what is missing."""
    eligible = [n for n in nodes if _eligible(job, n)]
    if not eligible:
        return "no node matches the job's remote and labels"
    big_enough = [n for n in eligible if job.cpus <= n.cpus and job.mem <= n.mem and job.gpus <= n.gpus]
    if len(big_enough) >= job.nodes:
        return None
    largest = max(eligible, key=lambda n: (n.cpus, n.mem, n.gpus))
    return (
        f"the job asks for {job.nodes} node(s) with {job.cpus} cpus, {job.mem} bytes of memory and "
        f"{job.gpus} gpus each; {len(big_enough)} node(s) are that large (the largest has {largest.cpus} "
        f"cpus, {largest.mem} bytes, {largest.gpus} gpus)"
    )


def plan(snapshot: Snapshot, now: datetime) -> Plan:
    """Decide which pending jobs start now. Pure: the same snapshot always gives the same plan."""
    del now  # FCFS does not look at time; the signature is shared by all algorithms
    result = Plan()
    free = [_Free(n, n.free_cpus, n.free_mem, n.free_gpus) for n in snapshot.nodes]
    blocked = False
    for job in sorted(snapshot.jobs, key=lambda j: (-j.priority, j.seq)):
        problem = _could_ever_fit(job, snapshot.nodes)
        if problem is not None:
            result.rejections.append(Rejection(job.id, "unsatisfiable", problem))
            continue
        if blocked:
            result.waits.append(Wait(job.id, "Priority", "Waiting for jobs ahead of it in the queue"))
            continue
        chosen = [f for f in free if _eligible(job, f.node) and f.fits(job)][: job.nodes]
        if len(chosen) < job.nodes:
            blocked = True
            result.waits.append(Wait(job.id, "Resources", "Waiting for resources to become free"))
            continue
        for f in chosen:
            f.take(job)
        result.placements.append(Placement(job.id, tuple(f.node.id for f in chosen)))
    return result
