"""The scheduler loop: read a snapshot, ask the pure ``plan()``, record its decisions.

Woken by submissions and job ends, and on a timer. Placing a job (queued -> scheduled) is the intent the
execution loop acts on; both are recorded before anything is launched. Why each queued job waits, and
when it should start, is recorded too (without an event: it is not a state change).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Connection, bindparam, func, or_, select

from skyport.models import JobState
from skyport.models.job import ACTIVE_STATES
from skyport.server.clock import Clock
from skyport.server.lifecycle.wakeup import JobNotifier, Wakeup, run_passes
from skyport.server.metrics import Metrics
from skyport.server.scheduler import (
    AccountState,
    FlavorOffer,
    NodeCapacity,
    PendingJob,
    Plan,
    Policy,
    RunningJob,
    SelfScheduling,
    Snapshot,
    plan,
)
from skyport.server.settings import CloudRemoteSettings, SchedulerSettings
from skyport.server.store import infra as infra_store
from skyport.server.store import jobs as job_store
from skyport.server.store import partitions as partition_store
from skyport.server.store import users as user_store
from skyport.server.store.engine import Store
from skyport.server.store.tables import accounts, jobs, nodes, partitions

log = structlog.get_logger(__name__)

#: Queued jobs read per pass, from the head of the queue. A pass reads few (a page grows while whole
#: pages are placed); backfill looks this deep for jobs that fit the holes (Slurm's bf_max_job_test)
#: only when the head is blocked while capacity is left over, as Slurm's main scheduler looks at the
#: head on every event and its backfill pass deep only now and then: reading a thousand queued rows
#: on every pass, to place the few that fit, was the core's largest cost under a deep queue.
MIN_PAGE = 64
BACKFILL_DEPTH = 1024
#: What a pass reads first. Under a steady stream of short jobs a pass places the few whose CPUs were
#: freed since the last one (every 20 ms), and reading (and building) 64 queued jobs for them was the
#: scheduler's largest cost; a page that is placed whole grows at once (x4). After a pass that placed
#: more, the next one reads as many as it placed and one more (a second read of the queue's head in
#: every pass otherwise, once the first page proved too short).
FIRST_PAGE = 16
MAX_PAGE = 8192
#: Shortest time between two passes. Submissions arrive far faster than placements matter; one pass
#: per few milliseconds serves them all in batches instead of one pass per submission.
MIN_PASS_INTERVAL_S = 0.02
#: And at least this many times as long as the last pass took: the scheduler then takes at most a
#: quarter of the core's time. A pass has a fixed cost (the nodes and the jobs holding them are read
#: whatever it places: ~10 ms with 64 jobs running); with half of the core (a factor of 1) a steady
#: stream of submissions kept it running every 20 ms, placing a handful of jobs each time, and
#: scheduling was a third of the core's CPU per job (2,000 trivial jobs: 170-200 passes, 3.4-4.4 ms
#: of core CPU per job; with 3: 84-98 passes, 2.5-2.6 ms, and more jobs per second).
PASS_GAP_FACTOR = 3


@dataclass(frozen=True)
class ForwardingRemote:
    """A remote that schedules jobs itself (see :mod:`skyport.server.scheduler.forwarding`)."""

    name: str
    #: Its partition for jobs that name none, and the job label that names one.
    default_partition: str
    partition_label: str


def _self_scheduling(
    conn: Connection, node_rows: dict[str, Any], forwarding: dict[str, ForwardingRemote]
) -> dict[str, SelfScheduling]:
    """Each self-scheduling remote's partitions (by name) and their nodes: the targets of forwards."""
    if not forwarding:
        return {}
    names = {
        r.id: r.name
        for r in conn.execute(
            select(partitions.c.id, partitions.c.name).where(partitions.c.remote_id.in_(list(forwarding)))
        )
    }
    members: dict[str, dict[str, list[str]]] = {remote_id: defaultdict(list) for remote_id in forwarding}
    for node in node_rows.values():
        if node.remote_id in forwarding and node.partition_id in names:
            members[node.remote_id][names[node.partition_id]].append(node.id)
    return {
        remote_id: SelfScheduling(
            remote_id=remote_id,
            partitions={p: tuple(sorted(ids)) for p, ids in members[remote_id].items()},
            default_partition=remote.default_partition,
            partition_label=remote.partition_label,
        )
        for remote_id, remote in forwarding.items()
    }


@dataclass(frozen=True)
class _Read:
    snapshot: Snapshot
    node_rows: dict[str, Any]
    pending_rows: dict[str, Any]
    any_free: bool  # some node has a free CPU: a new job might start at once


# The queries of every pass, built once (see skyport.server.store.jobs._CURRENT_STATES for why).

# Nodes of elastic partitions count only once their partition serves jobs (in use or idle): while it
# boots, its nodes belong to the job it is being made for.
_UP_NODES = (
    select(
        nodes,
        partitions.c.static.label("static_partition"),
        partitions.c.flavor_id.label("partition_flavor"),
        accounts.c.name.label("partition_account"),
    )
    .outerjoin(partitions, partitions.c.id == nodes.c.partition_id)
    .outerjoin(accounts, accounts.c.id == partitions.c.account_id)
    .where(
        nodes.c.state_power == "up",
        nodes.c.state_alloc.in_(["idle", "busy"]),
        partitions.c.static.is_not(False)
        | partitions.c.state.in_(partition_store.SCHEDULABLE)
        | partitions.c.id.is_(None),
    )
)
_ACTIVE = (
    select(
        jobs.c.id,
        jobs.c.node_ids,
        jobs.c.cpus,
        jobs.c.mem,
        jobs.c.gpus,
        func.coalesce(jobs.c.start_time, jobs.c.scheduled_time),
        jobs.c.walltime,
        accounts.c.name,
        jobs.c.array_id,
        jobs.c.exclusive,
    )
    .join(accounts, accounts.c.id == jobs.c.account_id)
    .where(jobs.c.state.in_([s.value for s in ACTIVE_STATES]))
)
_ACTIVE_OUTSIDE = _ACTIVE.where(
    or_(jobs.c.remote_id.is_(None), jobs.c.remote_id.not_in(bindparam("skip", expanding=True)))
)


def _nodes_and_running(
    conn: Connection, now: datetime, skip_remotes: Sequence[str] = ()
) -> tuple[dict[str, Any], tuple[RunningJob, ...]]:
    """Nodes that are up, and the jobs holding them; ``skip_remotes``: self-scheduling remotes, whose
    jobs (maybe thousands waiting in Slurm) hold nothing our scheduler places."""
    node_rows = {r.id: r for r in conn.execute(_UP_NODES)}
    if skip_remotes:
        active = conn.execute(_ACTIVE_OUTSIDE, {"skip": list(skip_remotes)})
    else:
        active = conn.execute(_ACTIVE)
    # Unpacked, not read by name: every pass reads every running job, and a row's attribute lookups
    # were most of the time it took to make one.
    running = tuple(
        RunningJob(
            id=job_id,
            node_ids=tuple(node_ids),
            cpus=cpus,
            mem=mem,
            gpus=gpus,
            start_time=started or now,
            walltime=walltime,
            account=account,
            array_id=array_id,
            exclusive=exclusive,
        )
        for job_id, node_ids, cpus, mem, gpus, started, walltime, account, array_id, exclusive in active
    )
    return node_rows, running


def _capacity(node_rows: dict[str, Any], running: Sequence[RunningJob]) -> tuple[NodeCapacity, ...]:
    used: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for job in running:
        for node_id in job.node_ids:
            u = used[node_id]
            u[0] += job.cpus
            u[1] += job.mem
            u[2] += job.gpus
    return tuple(
        NodeCapacity(
            id=n.id,
            remote_id=n.remote_id,
            cpus=n.cpus,
            mem=n.mem,
            gpus=n.gpus,
            free_cpus=n.cpus - used[n.id][0],
            free_mem=n.mem - used[n.id][1],
            free_gpus=n.gpus - used[n.id][2],
            labels=tuple(sorted(n.labels.items())),
            storage=n.storage,
            free_storage=n.storage,
            partition_id=n.partition_id or "",
            flavor=None if n.static_partition in (None, True) else n.partition_flavor,
            account=None if n.static_partition in (None, True) else n.partition_account,
        )
        for n in node_rows.values()
    )


_QUEUED = (
    select(
        jobs.c.id,
        jobs.c.seq,
        jobs.c.priority,
        jobs.c.node_count,
        jobs.c.cpus,
        jobs.c.mem,
        jobs.c.gpus,
        jobs.c.walltime,
        jobs.c.submit_time,
        jobs.c.requested_remote_id,
        jobs.c.reason,
        jobs.c.labels,
        jobs.c.depends,
        jobs.c.depends_any,
        jobs.c.exclusive,
        jobs.c.estimated_start,
        jobs.c.array_id,
        jobs.c.array_throttle,
        jobs.c.flavor,
        jobs.c.account_id,
        accounts.c.name.label("account"),
    )
    .join(accounts, accounts.c.id == jobs.c.account_id)
    .where(jobs.c.state == JobState.QUEUED.value)
    .order_by(jobs.c.priority.desc(), jobs.c.seq.asc())
    .limit(bindparam("page"))
)
_DEPENDENCIES = select(jobs.c.id, jobs.c.state, jobs.c.remote_id, jobs.c.requested_remote_id).where(
    jobs.c.id.in_(bindparam("ids", expanding=True))
)


def _pending(conn: Connection, page: int) -> dict[str, Any]:
    return {r.id: r for r in conn.execute(_QUEUED, {"page": page})}


def _offers(conn: Connection, max_creating: dict[str, int]) -> tuple[FlavorOffer, ...]:
    """The flavors of remotes that create partitions, with how many each is creating now."""
    if not max_creating:  # no such remote: two queries a pass saved
        return ()
    creating = partition_store.creating_counts(conn)
    return tuple(
        FlavorOffer(
            remote_id=f.remote_id,
            flavor_id=f.id,
            name=f.name,
            cpus=f.cpus,
            mem=f.mem,
            gpus=f.gpus,
            storage=f.storage,
            price=f.price,
            max_creating=max_creating[f.remote_id],
            creating=creating.get(f.remote_id, 0),
        )
        for f in partition_store.flavor_rows(conn, list(max_creating))
    )


def _read_snapshot(
    conn: Connection,
    page: int,
    policy: Policy,
    now: datetime,
    half_life_s: float,
    max_creating: dict[str, int],
    forwarding: dict[str, ForwardingRemote] | None = None,
    max_page: int = MIN_PAGE,
) -> _Read:
    """What a pass plans with: ``page`` queued jobs from the head of the queue, more (up to
    ``max_page``) when more CPUs are free than that, and the nodes and jobs that hold them."""
    forwarding = forwarding or {}
    pending_rows = _pending(conn, page)
    if not pending_rows:
        # Nothing to place: the nodes and running jobs would be read for nothing. Passes without queued
        # jobs are frequent (every placement and start wakes the scheduler) and, with hundreds of jobs
        # running, that read was most of their cost.
        return _Read(Snapshot(jobs=(), nodes=(), policy=policy), {}, {}, False)
    node_rows, running = _nodes_and_running(conn, now, list(forwarding))
    # Nodes of self-scheduling remotes are shown, but their own scheduler places on them, never ours.
    capacity = _capacity({i: n for i, n in node_rows.items() if n.remote_id not in forwarding}, running)
    free_cpus = sum(max(0, n.free_cpus) for n in capacity)
    if len(pending_rows) == page and free_cpus >= page and page < max_page:
        # More CPUs are free than the page has jobs (a job takes one at least): read as many queued jobs
        # as could start, and one more, so that this pass fills them all instead of a page at a time.
        pending_rows = _pending(conn, min(max_page, free_cpus + 1))
    depends = {d for r in pending_rows.values() for d in (*r.depends, *r.depends_any)}
    dependency_rows = list(conn.execute(_DEPENDENCIES, {"ids": list(depends)})) if depends else []
    dependency_states = {r.id: r.state for r in dependency_rows}
    dependency_remotes = {
        r.id: r.remote_id or r.requested_remote_id
        for r in dependency_rows
        if r.remote_id or r.requested_remote_id
    }
    snapshot = Snapshot(
        jobs=tuple(
            PendingJob(
                id=job_id,
                priority=priority,
                seq=seq,
                nodes=node_count,
                cpus=cpus,
                mem=mem,
                gpus=gpus,
                submit_time=submit_time,
                remote_id=remote_id,
                labels=tuple(sorted(labels.items())),
                account=account,
                walltime=walltime,
                after_ok=tuple(depends),
                after_any=tuple(depends_any),
                exclusive=exclusive,
                array_id=array_id,
                array_throttle=array_throttle,
                flavor=flavor,
                current_reason=reason,
            )
            # unpacked in _QUEUED's order (see _nodes_and_running)
            for (
                job_id,
                seq,
                priority,
                node_count,
                cpus,
                mem,
                gpus,
                walltime,
                submit_time,
                remote_id,
                reason,
                labels,
                depends,
                depends_any,
                exclusive,
                _,  # estimated_start
                array_id,
                array_throttle,
                flavor,
                _,  # account_id
                account,
            ) in pending_rows.values()
        ),
        nodes=capacity,
        flavors=_offers(conn, max_creating),
        running=running,
        accounts={
            a.name: AccountState(
                name=a.name,
                share=a.share,
                usage=a.usage,
                budget_left=None if a.budget is None else a.budget - a.spend,
            )
            for a in user_store.account_usage(conn, now, half_life_s)
        },
        dependency_states=dependency_states,
        policy=policy,
        self_scheduling=_self_scheduling(conn, node_rows, forwarding),
        dependency_remotes=dependency_remotes,
    )
    return _Read(snapshot, node_rows, pending_rows, any(n.free_cpus > 0 for n in capacity))


def _record_plan(
    conn: Connection,
    changes: list[job_store.StateChange],
    waits: dict[tuple[str, str, datetime | None], list[str]],
    now: datetime,
    new_partitions: dict[str, partition_store.NewPartition] | None = None,
) -> list[job_store.StateChange]:
    applied = job_store.transition(conn, changes, now)
    # A partition's row is the intent the provisioning loop acts on: written with its job's placement,
    # only for jobs still queued when it commits.
    for change in applied:
        if new_partitions and change.job_id in new_partitions:
            new = new_partitions[change.job_id]
            spec = conn.execute(select(jobs.c.spec).where(jobs.c.id == change.job_id)).scalar_one()
            if spec.get("cloud_image"):
                new = dataclasses.replace(new, image=spec["cloud_image"])
            partition_store.insert_partition(conn, new, now)
    for (reason, message, estimated_start), ids in waits.items():
        job_store.set_wait_reason(conn, ids, reason, message, estimated_start)
    return applied


def policy_from(settings: SchedulerSettings) -> Policy:
    return Policy(
        algorithm=settings.algorithm,
        weight_priority=settings.weight_priority,
        weight_fairshare=settings.weight_fairshare,
        weight_age=settings.weight_age,
        max_age_hours=settings.max_age_hours,
        default_walltime=settings.default_walltime,
    )


class SchedulerLoop:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        metrics: Metrics,
        notifier: JobNotifier,
        settings: SchedulerSettings,
        *,
        interval_s: float,
        on_placed: Wakeup,
        cloud_remotes: dict[str, CloudRemoteSettings] | None = None,
        on_provision: Callable[[], None] = lambda: None,
    ) -> None:
        self.wakeup = Wakeup()
        #: remote id -> settings of the remotes that create partitions (filled by the core at start).
        self._cloud = cloud_remotes if cloud_remotes is not None else {}
        self._on_provision = on_provision
        self._forwarding: dict[str, ForwardingRemote] = {}
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._notifier = notifier
        self._settings = settings
        self._policy = policy_from(settings)
        self._algorithms_resolved = False  # scheduler.remote_algorithms names -> remote ids, once
        self._interval = interval_s
        self._on_placed = on_placed
        self._depth = MIN_PAGE if settings.algorithm == "fcfs" else BACKFILL_DEPTH
        self._page = FIRST_PAGE
        #: whether the last deep (backfill) look found nothing to place, and capacity has not changed
        #: since: another deep look would find nothing either
        self._deep_fruitless = False
        self._last_pass_s = 0.0
        # When the last pass could start nothing more: the head's priority, and whether any capacity
        # was left free (backfill could use it). None: not blocked.
        self._blocked_at: int | None = None
        self._free_capacity = True

    def attach_cloud(
        self, cloud_remotes: dict[str, CloudRemoteSettings], *, on_provision: Callable[[], None]
    ) -> None:
        """The remotes that create partitions (filled at start) and who to wake for a new partition."""
        self._cloud = cloud_remotes
        self._on_provision = on_provision

    def attach_self_scheduling(self, remotes: dict[str, ForwardingRemote]) -> None:
        """The remotes whose jobs are forwarded to their own scheduler (filled by the core at start)."""
        self._forwarding = remotes

    async def _resolve_remote_algorithms(self) -> None:
        """``scheduler.remote_algorithms`` names remotes; the planner works with their ids."""
        remotes = {r.name: r.id for r in await self._store.read(infra_store.list_remotes)}
        unknown = sorted(set(self._settings.remote_algorithms) - remotes.keys())
        if unknown:
            log.warning("scheduler.remote_algorithms names unknown remotes", remotes=unknown)
        chosen = tuple(
            sorted(
                (remotes[name], algo)
                for name, algo in self._settings.remote_algorithms.items()
                if name in remotes
            )
        )
        self._policy = dataclasses.replace(self._policy, remote_algorithms=chosen)

    def submitted(self, priority: int) -> None:
        """A job was queued. While the head of the queue is blocked and no capacity is free, only a
        job that outranks the head could change the plan; the timer and every end still run passes."""
        if self._blocked_at is None or self._free_capacity or priority > self._blocked_at:
            self.wakeup.ring()

    def capacity_changed(self) -> None:
        """A job ended or a node changed: the head may fit now."""
        self._blocked_at = None
        self._deep_fruitless = False
        self.wakeup.ring()

    async def run(self) -> None:
        await run_passes(self.pass_once, self._wait, "scheduler")

    async def _wait(self) -> None:
        # Rate limit, not synchronisation (see PASS_GAP_FACTOR): a deep queue (every pass reads and
        # plans up to BACKFILL_DEPTH jobs) or a stream of submissions costs at most a quarter of the
        # core while jobs end hundreds of times a second; each pass then places more of them.
        await asyncio.sleep(max(MIN_PASS_INTERVAL_S, PASS_GAP_FACTOR * self._last_pass_s))
        await self.wakeup.wait(self._interval)

    async def pass_once(self) -> Plan:
        started = self._clock.monotonic()
        now = self._clock.now()
        if self._settings.remote_algorithms and not self._algorithms_resolved:
            await self._resolve_remote_algorithms()
            self._algorithms_resolved = True
        max_creating = {remote_id: r.max_creating for remote_id, r in self._cloud.items()}
        read = await self._store.read(
            _read_snapshot,
            self._page,
            self._policy,
            now,
            self._settings.usage_half_life_s,
            max_creating,
            forwarding=self._forwarding,
            max_page=self._depth,
        )
        snapshot = read.snapshot
        if not snapshot.jobs:
            self._blocked_at = None
            self._last_pass_s = self._clock.monotonic() - started
            return Plan()
        decided = plan(snapshot, now)
        await self._record(decided, read.node_rows, read.pending_rows, now)
        blocked = next((w for w in decided.waits if w.reason in {"Resources", "Reservation"}), None)
        self._blocked_at = (
            None if blocked is None else next(j.priority for j in snapshot.jobs if j.id == blocked.job_id)
        )
        placed = {p.job_id for p in decided.placements}
        self._free_capacity = read.any_free and not placed
        self._next_page(snapshot, decided, blocked is not None)
        self._last_pass_s = self._clock.monotonic() - started
        self._metrics.scheduler_pass.observe(self._last_pass_s)
        if decided.placements or decided.forwards:
            self._on_placed.ring()
        if decided.provisions:
            self._on_provision()
        return decided

    def _next_page(self, snapshot: Snapshot, decided: Plan, blocked: bool) -> None:
        """How many queued jobs the next pass reads (see :data:`MIN_PAGE` and :data:`FIRST_PAGE`)."""
        page, deeper_queue = self._page, len(snapshot.jobs) >= self._page
        if page > FIRST_PAGE and page >= self._depth:  # this was a deep look
            self._deep_fruitless = not decided.placements
        if not decided.waits and deeper_queue and (decided.provisions or _capacity_left(snapshot, decided)):
            # the whole page went, to partitions being made or while CPUs are still free: more may go
            self._page = min(page * 4, MAX_PAGE)
            self.wakeup.ring()
        elif (
            blocked
            and deeper_queue
            and page < self._depth
            and not self._deep_fruitless
            and _capacity_left(snapshot, decided)
        ):  # the head waits while capacity is free: look deeper, at once, for jobs that fit the holes
            self._page = self._depth
            self.wakeup.ring()
        else:  # as many as the last pass placed, and one more: a steady stream is read in one query
            self._page = min(self._depth, max(FIRST_PAGE, len(decided.placements) + 1))

    async def _record(
        self, decided: Plan, node_rows: dict[str, Any], pending_rows: dict[str, Any], now: datetime
    ) -> None:
        changes = []
        for p in decided.placements:
            placed = [node_rows[n] for n in p.node_ids]
            changes.append(
                job_store.StateChange(
                    job_id=p.job_id,
                    to_state=JobState.SCHEDULED,
                    reason="placed",
                    message=f"Placed on {', '.join(n.name for n in placed)}",
                    from_states=frozenset({JobState.QUEUED}),
                    values={
                        "remote_id": placed[0].remote_id,
                        # On an elastic partition (kept warm, reused): its cost counts from now.
                        "partition_id": None
                        if placed[0].static_partition in (None, True)
                        else placed[0].partition_id,
                        "node_ids": [n.id for n in placed],
                        "node_names": [n.name for n in placed],
                        "node_ips": [n.ip or n.host for n in placed],
                        "scheduled_time": now,
                        "estimated_start": None,
                    },
                )
            )
        for f in decided.forwards:
            candidates = [node_rows[n] for n in f.node_ids]
            target = self._forwarding.get(f.remote_id)
            changes.append(
                job_store.StateChange(
                    job_id=f.job_id,
                    to_state=JobState.SCHEDULED,
                    reason="forwarded",
                    message=f"Forwarded to {target.name if target else f.remote_id}, partition {f.partition} "
                    f"({', '.join(n.name for n in candidates)}): its own scheduler places it",
                    from_states=frozenset({JobState.QUEUED}),
                    values={
                        "remote_id": f.remote_id,
                        "node_ids": [n.id for n in candidates],
                        "node_names": [n.name for n in candidates],
                        "node_ips": [n.ip or n.host for n in candidates],
                        "scheduled_time": now,
                        "estimated_start": None,
                    },
                )
            )
        for r in decided.rejections:
            changes.append(
                job_store.StateChange(
                    job_id=r.job_id,
                    to_state=JobState.FAILED,
                    reason=r.reason,
                    message=f"Cannot run: {r.message}",
                    from_states=frozenset({JobState.QUEUED}),
                    values={"end_time": now, "estimated_start": None},
                )
            )
        new_partitions: dict[str, partition_store.NewPartition] = {}
        for prov in decided.provisions:
            row = pending_rows[prov.job_id]
            remote = self._cloud.get(prov.remote_id)
            partition_id = str(uuid.uuid4())
            new_partitions[prov.job_id] = partition_store.NewPartition(
                id=partition_id,
                remote_id=prov.remote_id,
                name=f"sp-{partition_id[:8]}",
                flavor_id=prov.flavor_id,
                image=remote.default_image if remote else None,  # the job's cloud-image wins (below)
                account_id=row.account_id,
                job_id=prov.job_id,
                node_count=prov.nodes,
                price=prov.cost_per_hour / max(prov.nodes, 1),
            )
            remote_name = remote.name if remote else prov.remote_id
            changes.append(
                job_store.StateChange(
                    job_id=prov.job_id,
                    to_state=JobState.SCHEDULED,
                    reason="provisioning",
                    message=f"Requesting {prov.nodes} node(s) from {remote_name}",
                    from_states=frozenset({JobState.QUEUED}),
                    values={
                        "remote_id": prov.remote_id,
                        "partition_id": partition_id,
                        "scheduled_time": now,
                        "estimated_start": None,
                    },
                )
            )
        waits: dict[tuple[str, str, datetime | None], list[str]] = defaultdict(list)
        for w in decided.waits:
            row = pending_rows[w.job_id]
            if row.reason != w.reason or _moved(row.estimated_start, w.estimated_start):
                waits[(w.reason, w.message, w.estimated_start)].append(w.job_id)
        if not changes and not waits:
            return
        applied = await self._store.write(_record_plan, changes, waits, now, new_partitions)
        for change in applied:
            self._notifier.changed(change.job_id)
            if change.to_state is JobState.SCHEDULED and change.reason in ("placed", "forwarded"):
                waited = (now - pending_rows[change.job_id].submit_time).total_seconds()
                self._metrics.scheduling_latency.observe(max(0.0, waited))
            elif change.to_state.terminal:  # rejected (a provisioned job is neither: it waits on)
                self._metrics.finished.labels(state=change.to_state.value).inc()


def _capacity_left(snapshot: Snapshot, decided: Plan) -> bool:
    """Whether some CPU stays free after the pass's placements (roughly: summed over the nodes)."""
    jobs_by_id = {j.id: j for j in snapshot.jobs}
    free = sum(n.free_cpus for n in snapshot.nodes)
    used = sum(
        jobs_by_id[p.job_id].cpus * len(p.node_ids) for p in decided.placements if p.job_id in jobs_by_id
    )
    return free > used


def _moved(before: datetime | None, after: datetime | None) -> bool:
    """Whether an estimated start changed enough to be worth writing (a second or more)."""
    if before is None or after is None:
        return before is not after
    return abs((after - before).total_seconds()) >= 1.0
