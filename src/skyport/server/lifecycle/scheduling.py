"""The scheduler loop: read a snapshot, ask the pure ``plan()``, record its decisions.

Woken by submissions and job ends, and on a timer. Placing a job (queued -> scheduled) is the intent the
execution loop acts on; both are recorded before anything is launched.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Connection, select

from skyport.models import JobState
from skyport.models.job import ACTIVE_STATES
from skyport.server.clock import Clock
from skyport.server.lifecycle.wakeup import JobNotifier, Wakeup
from skyport.server.metrics import Metrics
from skyport.server.scheduler import NodeCapacity, PendingJob, Plan, Snapshot, plan
from skyport.server.store import jobs as job_store
from skyport.server.store.engine import Store
from skyport.server.store.tables import jobs, nodes

log = structlog.get_logger(__name__)

#: Queued jobs read per pass, from the head of the queue: few while the head is blocked (FCFS starts
#: nothing behind it, so reading further would only cost time), growing while whole pages get placed.
MIN_PAGE = 64
MAX_PAGE = 4096
#: Shortest time between two passes. Submissions arrive far faster than placements matter; one pass
#: per few milliseconds serves them all in batches instead of one pass per submission.
MIN_PASS_INTERVAL_S = 0.02


def _snapshot(conn: Connection, page: int) -> tuple[Snapshot, dict[str, Any], dict[str, Any]]:
    node_rows = {
        r.id: r
        for r in conn.execute(
            select(nodes).where(nodes.c.state_power == "up", nodes.c.state_alloc.in_(["idle", "busy"]))
        )
    }
    used: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    active = conn.execute(
        select(jobs.c.node_ids, jobs.c.cpus, jobs.c.mem, jobs.c.gpus).where(
            jobs.c.state.in_([s.value for s in ACTIVE_STATES])
        )
    )
    for row in active:
        for node_id in row.node_ids:
            u = used[node_id]
            u[0] += row.cpus
            u[1] += row.mem
            u[2] += row.gpus
    capacity = tuple(
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
        )
        for n in node_rows.values()
    )
    queued = conn.execute(
        select(
            jobs.c.id,
            jobs.c.seq,
            jobs.c.priority,
            jobs.c.node_count,
            jobs.c.cpus,
            jobs.c.mem,
            jobs.c.gpus,
            jobs.c.submit_time,
            jobs.c.requested_remote_id,
            jobs.c.reason,
            jobs.c.labels,
        )
        .where(jobs.c.state == JobState.QUEUED.value)
        .order_by(jobs.c.priority.desc(), jobs.c.seq.asc())
        .limit(page)
    )
    pending_rows = {r.id: r for r in queued}
    pending = tuple(
        PendingJob(
            id=r.id,
            priority=r.priority,
            seq=r.seq,
            nodes=r.node_count,
            cpus=r.cpus,
            mem=r.mem,
            gpus=r.gpus,
            submit_time=r.submit_time,
            remote_id=r.requested_remote_id,
            labels=tuple(sorted(r.labels.items())),
        )
        for r in pending_rows.values()
    )
    return Snapshot(jobs=pending, nodes=capacity), node_rows, pending_rows


def _record_plan(
    conn: Connection,
    changes: list[job_store.StateChange],
    waits: dict[tuple[str, str], list[str]],
    now: datetime,
) -> list[job_store.StateChange]:
    applied = job_store.transition(conn, changes, now)
    for (reason, message), ids in waits.items():
        job_store.set_wait_reason(conn, ids, reason, message)
    return applied


class SchedulerLoop:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        metrics: Metrics,
        notifier: JobNotifier,
        *,
        interval_s: float,
        on_placed: Wakeup,
    ) -> None:
        self.wakeup = Wakeup()
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._notifier = notifier
        self._interval = interval_s
        self._on_placed = on_placed
        self._page = MIN_PAGE
        # Priority of the job at the head of the queue when it could not start (None: not blocked).
        self._blocked_at: int | None = None

    def submitted(self, priority: int) -> None:
        """A job was queued. FCFS starts nothing behind a blocked head, so only a job that outranks
        the head can change the plan; the timer and every end still trigger passes."""
        if self._blocked_at is None or priority > self._blocked_at:
            self.wakeup.ring()

    def capacity_changed(self) -> None:
        """A job ended or a node changed: the head may fit now."""
        self._blocked_at = None
        self.wakeup.ring()

    async def run(self) -> None:
        while True:
            try:
                await self.pass_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler pass failed; retrying on the next wakeup")
            await asyncio.sleep(MIN_PASS_INTERVAL_S)  # rate limit, not synchronisation
            await self.wakeup.wait(self._interval)

    async def pass_once(self) -> Plan:
        started = self._clock.monotonic()
        snapshot, node_rows, pending_rows = await self._store.read(_snapshot, self._page)
        if not snapshot.jobs:
            return Plan()
        now = self._clock.now()
        decided = plan(snapshot, now)
        await self._record(decided, node_rows, pending_rows)
        head_waits = next((w for w in decided.waits if w.reason == "Resources"), None)
        self._blocked_at = (
            None
            if head_waits is None
            else next(j.priority for j in snapshot.jobs if j.id == head_waits.job_id)
        )
        if decided.waits or len(snapshot.jobs) < self._page:
            self._page = MIN_PAGE
        else:  # the whole page went: more may fit, look again at once with a larger page
            self._page = min(self._page * 4, MAX_PAGE)
            self.wakeup.ring()
        self._metrics.scheduler_pass.observe(self._clock.monotonic() - started)
        if decided.placements:
            self._on_placed.ring()
        return decided

    async def _record(self, decided: Plan, node_rows: dict[str, Any], pending_rows: dict[str, Any]) -> None:
        now = self._clock.now()
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
                        "node_ids": [n.id for n in placed],
                        "node_names": [n.name for n in placed],
                        "node_ips": [n.ip or n.host for n in placed],
                        "scheduled_time": now,
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
                    values={"end_time": now},
                )
            )
        waits: dict[tuple[str, str], list[str]] = defaultdict(list)
        for w in decided.waits:
            if pending_rows[w.job_id].reason != w.reason:
                waits[(w.reason, w.message)].append(w.job_id)
        if not changes and not waits:
            return
        applied = await self._store.write(_record_plan, changes, waits, now)
        for change in applied:
            self._notifier.changed(change.job_id)
            if change.to_state is JobState.SCHEDULED:
                waited = (now - pending_rows[change.job_id].submit_time).total_seconds()
                self._metrics.scheduling_latency.observe(max(0.0, waited))
            else:
                self._metrics.finished.labels(state=change.to_state.value).inc()
