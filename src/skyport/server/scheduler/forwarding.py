"""Jobs for remotes that schedule themselves (a Slurm cluster) are forwarded, not placed.

A Slurm cluster has its own scheduler, with its own queue, priorities, fair share and backfill over
nodes we do not own; two schedulers placing the same nodes would fight. So a job that asks for such a
remote (``#SWM remote <name>``) bypasses our placement: as soon as its dependencies allow, it gets a
:class:`~.snapshot.Forward` to one of the remote's partitions (named by the job's partition label, else
the remote's default), with no capacity accounting, and the remote's own scheduler decides where and
when it runs. The partition's nodes are recorded as the job's candidates until the provider says where
it started. Jobs that do not name the remote are never placed there (its nodes are not in the snapshot's
capacity), so our placement and the remote's never overlap.

Dependencies are the one thing decided here, and only partly: a dependency on a job that runs (or is
forwarded in this very pass) on the *same* remote is left to that remote (the gate passes it on as a
Slurm dependency), so a chain of jobs is submitted at once instead of one link per end. Any other unmet
dependency waits here (``Dependency``), and one that can never be met is a rejection, as for any job.

Pure: no I/O, no clock. Array throttles are the remote's business too (Slurm's ``%N``).
"""

from __future__ import annotations

from collections.abc import Sequence

from skyport.server.scheduler.dependencies import TERMINAL_STATES, dependency_verdict
from skyport.server.scheduler.snapshot import Forward, PendingJob, Plan, Rejection, Snapshot, Wait


def split_forwarded(snapshot: Snapshot) -> tuple[Plan, tuple[PendingJob, ...]]:
    """The decisions for jobs of self-scheduling remotes, and the jobs left for the ordinary pass."""
    remotes = snapshot.self_scheduling
    decided = Plan()
    if not remotes:
        return decided, snapshot.jobs
    mine = [j for j in snapshot.jobs if j.remote_id in remotes]
    if not mine:
        return decided, snapshot.jobs
    rest = tuple(j for j in snapshot.jobs if j.remote_id not in remotes)
    forwarded_now: set[str] = set()
    # Submission order: a dependency is decided (and forwarded) before the jobs that wait for it.
    for job in sorted(mine, key=lambda j: (j.seq, j.id)):
        if job.id in forwarded_now:
            continue
        assert job.remote_id is not None
        remote = remotes[job.remote_id]
        if job.after_ok or job.after_any:
            verdict, why = dependency_verdict(job, snapshot.dependency_states)
            if verdict == "reject":
                decided.rejections.append(Rejection(job.id, "dependency", why))
                continue
            if verdict == "wait" and not _left_to_remote(job, snapshot, forwarded_now):
                decided.waits.append(Wait(job.id, "Dependency", why))
                continue
        partition = dict(job.labels).get(remote.partition_label) or remote.default_partition
        node_ids = remote.partitions.get(partition) or tuple(
            sorted({n for ids in remote.partitions.values() for n in ids})
        )
        if not node_ids:
            decided.waits.append(
                Wait(job.id, "Resources", "Waiting for the remote's nodes to be known (is it reachable?)")
            )
            continue
        decided.forwards.append(Forward(job.id, job.remote_id, partition, node_ids))
        forwarded_now.add(job.id)
    return decided, rest


def _left_to_remote(job: PendingJob, snapshot: Snapshot, forwarded_now: set[str]) -> bool:
    """Is every unmet dependency a job on the same remote, already there or forwarded in this pass?"""
    states = snapshot.dependency_states
    unmet: Sequence[str] = [d for d in job.after_ok if states.get(d) != "completed"] + [
        d for d in job.after_any if states.get(d) not in TERMINAL_STATES
    ]
    for dep in unmet:
        if snapshot.dependency_remotes.get(dep) != job.remote_id:
            return False
        if states.get(dep) == "queued" and dep not in forwarded_now:
            return False
    return True
