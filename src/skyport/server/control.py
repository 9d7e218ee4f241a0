"""What users do to existing jobs: cancel and requeue. Authorization is checked through ``auth``.

Queued and finished jobs change state here at once. A job that holds an allocation gets a request flag
and an event; the execution loop stops it and records the end (exactly once, through the state guard).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from skyport.models import ArrayJob, Job, JobState
from skyport.models.job import ACTIVE_STATES, TERMINAL_STATES
from skyport.server.auth import Principal, may_see_job
from skyport.server.clock import Clock
from skyport.server.lifecycle.wakeup import JobNotifier
from skyport.server.store import jobs as job_store
from skyport.server.store import users as user_store
from skyport.server.store.engine import Store


def _visible_row(conn: Connection, principal: Principal, job_id: str) -> Any:
    row = job_store.get_job_row(conn, job_id)
    if row is None:
        return None
    owner = user_store.get_user(conn, user_id=row.owner_id)
    return row if owner is not None and may_see_job(principal, owner.name) else None


def _cancel(conn: Connection, principal: Principal, job_id: str, now: datetime) -> bool:
    """Cancel a queued job now, or ask the execution loop to stop an active one. False: not visible."""
    row = _visible_row(conn, principal, job_id)
    if row is None:
        return False
    who = principal.user.name
    state = JobState(row.state)
    if state is JobState.QUEUED:
        change = job_store.StateChange(
            job_id,
            JobState.CANCELED,
            "canceled",
            f"Canceled by {who}",
            frozenset({JobState.QUEUED}),
            {"end_time": now, "canceled_by": who},
        )
        job_store.transition(conn, [change], now)
    elif state in ACTIVE_STATES and not row.cancel_requested:
        job_store.set_flags(conn, job_id, cancel_requested=True, canceled_by=who)
        job_store.add_event(
            conn, job_id, row.attempt, state, "cancel_requested", f"Cancel requested by {who}", now
        )
    return True


def _cancel_array(conn: Connection, principal: Principal, array_id: str, now: datetime) -> bool:
    """Cancel every task of an array job: the queued ones at once (one batch), the others on request."""
    array = job_store.get_array(conn, array_id)
    if array is None or not may_see_job(principal, array.owner):
        return False
    who = principal.user.name
    rows = job_store.rows_of_array(conn, array_id)
    queued = [
        job_store.StateChange(
            r.id,
            JobState.CANCELED,
            "canceled",
            f"Canceled by {who} (with its array)",
            frozenset({JobState.QUEUED}),
            {"end_time": now, "canceled_by": who},
        )
        for r in rows
        if r.state == JobState.QUEUED.value
    ]
    job_store.transition(conn, queued, now)
    for r in rows:
        state = JobState(r.state)
        if state in ACTIVE_STATES and not r.cancel_requested:
            job_store.set_flags(conn, r.id, cancel_requested=True, canceled_by=who)
            job_store.add_event(
                conn, r.id, r.attempt, state, "cancel_requested", f"Cancel requested by {who}", now
            )
    return True


def _requeue(conn: Connection, principal: Principal, job_id: str, now: datetime) -> bool:
    """Queue a finished job's next attempt now, or ask the execution loop to stop an active one first."""
    row = _visible_row(conn, principal, job_id)
    if row is None:
        return False
    who = principal.user.name
    state = JobState(row.state)
    if state in TERMINAL_STATES:
        change = job_store.StateChange(
            job_id,
            JobState.QUEUED,
            "requeued",
            f"Requeued by {who}: attempt {row.attempt + 1} is waiting to be scheduled",
            TERMINAL_STATES,
            job_store.requeue_values(row.attempt),
        )
        job_store.transition(conn, [change], now)
    elif state in ACTIVE_STATES and not row.requeue_requested:
        job_store.set_flags(conn, job_id, requeue_requested=True, canceled_by=who)
        job_store.add_event(
            conn, job_id, row.attempt, state, "requeue_requested", f"Requeue requested by {who}", now
        )
    return True


class JobControl:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        notifier: JobNotifier,
        *,
        on_change: Callable[[], None],
        on_flags: Callable[[], None],
    ) -> None:
        self._store = store
        self._clock = clock
        self._notifier = notifier
        self._on_change = on_change
        self._on_flags = on_flags  # the execution loop acts on cancel and requeue requests

    async def get(self, principal: Principal, job_id: str) -> Job | None:
        """The job if it exists and the principal may see it; None otherwise (the API says 404 for both)."""
        job = await self._store.read(job_store.get_job, job_id)
        return job if job is not None and may_see_job(principal, job.owner) else None

    async def cancel(self, principal: Principal, job_id: str) -> Job | None:
        return await self._act(_cancel, principal, job_id)

    async def cancel_array(self, principal: Principal, array_id: str) -> ArrayJob | None:
        if not await self._store.write(_cancel_array, principal, array_id, self._clock.now()):
            return None
        self._on_flags()
        self._on_change()
        return await self.get_array(principal, array_id)

    async def get_array(self, principal: Principal, array_id: str) -> ArrayJob | None:
        array = await self._store.read(job_store.get_array, array_id)
        return array if array is not None and may_see_job(principal, array.owner) else None

    async def requeue(self, principal: Principal, job_id: str) -> Job | None:
        return await self._act(_requeue, principal, job_id)

    async def _act(self, action: Any, principal: Principal, job_id: str) -> Job | None:
        if not await self._store.write(action, principal, job_id, self._clock.now()):
            return None
        self._notifier.changed(job_id)
        self._on_flags()
        self._on_change()
        return await self.get(principal, job_id)
