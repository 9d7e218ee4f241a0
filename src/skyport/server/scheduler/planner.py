"""Incremental scheduling: one cluster state kept between passes, fed with deltas.

A full pass over a large site costs two things: building the per-node state (node classes, free-capacity
buckets, the sorted release timeline of every running job) and deciding every queued job. Between two
passes only a few jobs were submitted or ended, so a :class:`Planner` keeps the first and updates it in
place (``started``, ``ended``: O(nodes touched x log events)), and an incremental pass decides only the
*head page* of the queue: the ``page_size`` jobs first in the order the store's index keeps them
(``priority`` descending, then ``seq``), the same page the core's scheduler loop reads. Jobs further
back keep the decision of the last full pass (``plan(now, full=True)``, run on a timer) until the page
reaches them; since the page follows the ``priority`` directive, not the computed priority, a job that
fair share or age would lift into the head waits for that full pass (Slurm's ``bf_max_job_test`` makes
the same trade). A pass places jobs in the kept state and rolls that back when it returns: a plan is
only a proposal until the caller reports what it did (``apply``).

Exactness: ``planner.plan(now)`` is *equal* to ``plan(planner.snapshot(), now)`` (and with
``full=True`` to the plan of the whole queue), because the kept state is ordered only by node index and
by sorted events, so a state updated by deltas makes exactly the choices of one built from the snapshot
(its skip-ahead bounds may be looser, which changes only speed). The tests check this after random
sequences of deltas.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime

from skyport.server.scheduler.algorithms import check_algorithm, run_pass
from skyport.server.scheduler.resources import ClusterState
from skyport.server.scheduler.snapshot import (
    AccountState,
    FlavorOffer,
    NodeCapacity,
    PendingJob,
    Plan,
    Policy,
    RunningJob,
    Snapshot,
)

#: Order of the queue's head page: the store's index order (priority descending, seq), then id.
QueueKey = tuple[int, int, str]


def _queue_key(job: PendingJob) -> QueueKey:
    return (-job.priority, job.seq, job.id)


class Planner:
    """Keeps the cluster state and the queue between passes (see the module docstring)."""

    def __init__(self, snapshot: Snapshot, *, page_size: int = 1024) -> None:
        check_algorithm(snapshot.policy)
        self.page_size = page_size
        self._policy = snapshot.policy
        self._flavors: tuple[FlavorOffer, ...] = tuple(snapshot.flavors)
        self._accounts: Mapping[str, AccountState] = snapshot.accounts
        self._dependency_states: Mapping[str, str] = snapshot.dependency_states
        self._state = ClusterState(snapshot.nodes, snapshot.running, snapshot.policy.default_walltime)
        self._queue: dict[str, PendingJob] = {}
        for job in snapshot.jobs:
            self._queue.setdefault(job.id, job)
        self._keys: list[QueueKey] = sorted(_queue_key(j) for j in self._queue.values())

    # --- deltas -------------------------------------------------------------------------------

    def submit(self, jobs: Iterable[PendingJob]) -> None:
        """Jobs joined the queue."""
        for job in jobs:
            if job.id in self._queue:
                continue
            self._queue[job.id] = job
            insort(self._keys, _queue_key(job))

    def withdraw(self, job_ids: Iterable[str]) -> None:
        """Jobs left the queue (started, provisioned, rejected, canceled)."""
        for job_id in job_ids:
            job = self._queue.pop(job_id, None)
            if job is not None:
                del self._keys[bisect_left(self._keys, _queue_key(job))]

    def started(self, jobs: Iterable[RunningJob]) -> None:
        """Jobs now hold resources on their nodes."""
        for job in jobs:
            self._state.start(job)

    def ended(self, job_ids: Iterable[str]) -> None:
        """Running jobs ended and released their nodes."""
        for job_id in job_ids:
            self._state.end(job_id)

    def set_nodes(self, nodes: Iterable[NodeCapacity]) -> None:
        """The set of nodes changed (nodes up or down, partitions created or deleted): rebuild."""
        self._rebuild(tuple(nodes))

    def update(
        self,
        *,
        policy: Policy | None = None,
        flavors: Sequence[FlavorOffer] | None = None,
        accounts: Mapping[str, AccountState] | None = None,
        dependency_states: Mapping[str, str] | None = None,
    ) -> None:
        """New policy, offers, account states or dependency states for the next passes."""
        if flavors is not None:
            self._flavors = tuple(flavors)
        if accounts is not None:
            self._accounts = accounts
        if dependency_states is not None:
            self._dependency_states = dependency_states
        if policy is not None:
            check_algorithm(policy)
            rebuild = policy.default_walltime != self._policy.default_walltime
            self._policy = policy
            if rebuild:  # the release times of running jobs without a walltime moved
                self._rebuild(tuple(self._current_nodes()))

    def apply(self, decided: Plan, now: datetime) -> None:
        """Record that a plan was carried out: placed jobs run from ``now``; placed, provisioned and
        rejected jobs leave the queue (a provisioned job holds no node until its partition exists)."""
        started = []
        for p in decided.placements:
            job = self._queue.get(p.job_id)
            if job is None:
                continue
            started.append(
                RunningJob(
                    id=job.id,
                    node_ids=p.node_ids,
                    cpus=job.cpus,
                    mem=job.mem,
                    gpus=job.gpus,
                    start_time=now,
                    walltime=job.walltime,
                    account=job.account,
                    array_id=job.array_id,
                    exclusive=job.exclusive,
                    storage=job.storage,
                )
            )
        self.started(started)
        self.withdraw(p.job_id for p in decided.placements)
        self.withdraw(p.job_id for p in decided.provisions)
        self.withdraw(r.job_id for r in decided.rejections)

    # --- passes -------------------------------------------------------------------------------

    def head(self) -> tuple[PendingJob, ...]:
        """The page an incremental pass decides."""
        return tuple(self._queue[k[2]] for k in self._keys[: self.page_size])

    def queued(self) -> tuple[PendingJob, ...]:
        return tuple(self._queue[k[2]] for k in self._keys)

    def plan(self, now: datetime, *, full: bool = False) -> Plan:
        """Decide the head page (or, ``full``, the whole queue); equal to ``plan(self.snapshot(full))``."""
        jobs = self.queued() if full else self.head()
        return run_pass(
            self._state,
            jobs,
            self._flavors,
            self._accounts,
            self._dependency_states,
            self._policy,
            now,
            undo=True,
        )

    def snapshot(self, *, full: bool = False) -> Snapshot:
        """The snapshot the pure ``plan()`` would need to decide exactly what :meth:`plan` decides."""
        return Snapshot(
            jobs=self.queued() if full else self.head(),
            nodes=tuple(self._current_nodes()),
            running=tuple(sorted(self._state.running.values(), key=lambda r: r.id)),
            flavors=self._flavors,
            accounts=self._accounts,
            dependency_states=self._dependency_states,
            policy=self._policy,
        )

    # --- internals ----------------------------------------------------------------------------

    def _current_nodes(self) -> list[NodeCapacity]:
        out = []
        for node, free in zip(self._state.nodes, self._state.reported, strict=True):
            if (node.free_cpus, node.free_mem, node.free_gpus, node.free_storage) == tuple(free):
                out.append(node)
            else:
                out.append(
                    replace(
                        node, free_cpus=free[0], free_mem=free[1], free_gpus=free[2], free_storage=free[3]
                    )
                )
        return out

    def _rebuild(self, nodes: tuple[NodeCapacity, ...]) -> None:
        running = tuple(self._state.running.values())
        self._state = ClusterState(nodes, running, self._policy.default_walltime)
