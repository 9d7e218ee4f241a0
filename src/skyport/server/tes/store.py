"""TES tasks in the store: the ``tes_tasks`` rows beside their jobs, listed with a stable cursor.

A task's state is its job's (DESIGN §3), so lists filter on the jobs' columns; :func:`state_condition`
is the one translation of a TES state into them, :func:`tes_state` the one the other way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, false, insert, not_, or_, select, update

from skyport.models import JobState
from skyport.models.job import ACTIVE_STATES
from skyport.server.store.jobs import decode_cursor, encode_cursor
from skyport.server.store.tables import events, jobs, remotes, tes_tasks, tokens
from skyport.server.tes.models import TesState
from skyport.server.tes.runner import EXECUTOR_FAILED

_NATIVE_TO_TES = {
    JobState.QUEUED: TesState.QUEUED,
    JobState.SCHEDULED: TesState.INITIALIZING,
    JobState.STAGING_IN: TesState.INITIALIZING,
    JobState.RUNNING: TesState.RUNNING,
    JobState.STAGING_OUT: TesState.RUNNING,
    JobState.COMPLETED: TesState.COMPLETE,
    JobState.CANCELED: TesState.CANCELED,
}


def tes_state(state: JobState, reason: str, exit_code: int | None, cancel_requested: bool) -> TesState:
    """DESIGN §3: a failure is the executor's when the runner said so, the system's otherwise."""
    if state is JobState.FAILED:
        executor = reason == "exit_code" and exit_code == EXECUTOR_FAILED
        return TesState.EXECUTOR_ERROR if executor else TesState.SYSTEM_ERROR
    if cancel_requested and state in ACTIVE_STATES:
        return TesState.CANCELING
    return _NATIVE_TO_TES.get(state, TesState.UNKNOWN)


def state_condition(state: TesState) -> Any:
    """The SQL condition on ``jobs`` that selects tasks in ``state`` (the inverse of :func:`tes_state`)."""
    active = [s.value for s in ACTIVE_STATES]
    executor_error = and_(
        jobs.c.state == JobState.FAILED.value,
        jobs.c.reason == "exit_code",
        jobs.c.exit_code == EXECUTOR_FAILED,
    )
    match state:
        case TesState.QUEUED:
            return jobs.c.state == JobState.QUEUED.value
        case TesState.INITIALIZING | TesState.RUNNING:
            native = (
                [JobState.SCHEDULED, JobState.STAGING_IN]
                if state is TesState.INITIALIZING
                else [JobState.RUNNING, JobState.STAGING_OUT]
            )
            return and_(jobs.c.state.in_([s.value for s in native]), jobs.c.cancel_requested.is_(False))
        case TesState.CANCELING:
            return and_(jobs.c.state.in_(active), jobs.c.cancel_requested.is_(True))
        case TesState.COMPLETE:
            return jobs.c.state == JobState.COMPLETED.value
        case TesState.CANCELED:
            return jobs.c.state == JobState.CANCELED.value
        case TesState.EXECUTOR_ERROR:
            return executor_error
        case TesState.SYSTEM_ERROR:
            return and_(jobs.c.state == JobState.FAILED.value, not_(executor_error))
        case _:
            return false()


@dataclass(frozen=True)
class NewTask:
    job_id: str
    owner_id: str
    name: str
    tags: dict[str, str]
    task: dict[str, Any]
    notes: list[str]
    created_at: datetime
    callback_url: str | None
    token_id: str | None


def insert_tasks(conn: Connection, new: Sequence[NewTask]) -> None:
    if not new:
        return
    conn.execute(
        insert(tes_tasks),
        [
            {
                "job_id": t.job_id,
                "owner_id": t.owner_id,
                "name": t.name,
                "tags": t.tags,
                "task": t.task,
                "notes": t.notes,
                "created_at": t.created_at,
                "callback_url": t.callback_url,
                "token_id": t.token_id,
                "callback_event_id": 0,
                "callback_done": t.callback_url is None,
            }
            for t in new
        ],
    )


@dataclass(frozen=True)
class TaskFilter:
    owner_id: str | None  # None: everyone's (administrators)
    name_prefix: str | None = None
    state: TesState | None = None
    tags: dict[str, str] = field(default_factory=dict)  # "" matches any value of the key


_MINIMAL_COLUMNS = (
    tes_tasks.c.seq,
    tes_tasks.c.job_id,
    jobs.c.state,
    jobs.c.reason,
    jobs.c.exit_code,
    jobs.c.cancel_requested,
)
_FULL_COLUMNS = (
    tes_tasks.c.task,
    tes_tasks.c.notes,
    tes_tasks.c.created_at,
    tes_tasks.c.tags,
    jobs.c.attempt,
    jobs.c.start_time,
    jobs.c.end_time,
    jobs.c.node_names,
    jobs.c.state_details,
    remotes.c.name.label("remote_name"),
)


def _select(full: bool) -> Any:
    if not full:
        return select(*_MINIMAL_COLUMNS).select_from(tes_tasks.join(jobs, jobs.c.id == tes_tasks.c.job_id))
    return select(*_MINIMAL_COLUMNS, *_FULL_COLUMNS).select_from(
        tes_tasks.join(jobs, jobs.c.id == tes_tasks.c.job_id).outerjoin(
            remotes, remotes.c.id == jobs.c.remote_id
        )
    )


def _like_prefix(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def list_tasks(
    conn: Connection, flt: TaskFilter, *, full: bool, limit: int, after: str | None
) -> tuple[list[Any], str | None]:
    """A page of task rows, newest first, and the next page's token (stable while tasks are added)."""
    query = _select(full)
    if flt.owner_id is not None:
        query = query.where(tes_tasks.c.owner_id == flt.owner_id)
    if flt.name_prefix:
        query = query.where(tes_tasks.c.name.like(_like_prefix(flt.name_prefix), escape="\\"))
    if flt.state is not None:
        query = query.where(state_condition(flt.state))
    for key, value in flt.tags.items():
        tag = tes_tasks.c.tags[key].as_string()
        query = query.where(tag.is_not(None) if value == "" else tag == value)
    if after is not None:
        query = query.where(tes_tasks.c.seq < decode_cursor(after))
    rows = list(conn.execute(query.order_by(tes_tasks.c.seq.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (encode_cursor(rows[-1].seq) if more and rows else None)


def get_task(conn: Connection, job_id: str, *, full: bool) -> Any:
    return conn.execute(_select(full).where(tes_tasks.c.job_id == job_id)).first()


def owner_of(conn: Connection, job_id: str) -> str | None:
    row = conn.execute(select(tes_tasks.c.owner_id).where(tes_tasks.c.job_id == job_id)).first()
    return None if row is None else str(row.owner_id)


def job_events(conn: Connection, job_id: str) -> list[Any]:
    return list(conn.execute(select(events).where(events.c.job_id == job_id).order_by(events.c.id)))


# -- callbacks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PendingCallback:
    """One state change of a task with a callback, not yet delivered."""

    job_id: str
    url: str
    token_id: str | None
    token_hash: str | None
    event_id: int
    time: datetime
    to_state: str
    reason: str
    message: str
    exit_code: int | None


def pending_callbacks(conn: Connection, *, limit: int) -> list[PendingCallback]:
    """Undelivered events of tasks with a callback, oldest first."""
    query = (
        select(
            tes_tasks.c.job_id,
            tes_tasks.c.callback_url,
            tes_tasks.c.token_id,
            tokens.c.secret_hash,
            events.c.id,
            events.c.time,
            events.c.from_state,
            events.c.to_state,
            events.c.reason,
            events.c.message,
            jobs.c.exit_code,
        )
        .select_from(
            tes_tasks.join(events, events.c.job_id == tes_tasks.c.job_id)
            .join(jobs, jobs.c.id == tes_tasks.c.job_id)
            .outerjoin(tokens, tokens.c.id == tes_tasks.c.token_id)
        )
        .where(
            tes_tasks.c.callback_done.is_(False),
            tes_tasks.c.callback_url.is_not(None),
            events.c.id > tes_tasks.c.callback_event_id,
            or_(
                events.c.from_state.is_(None),
                events.c.from_state != events.c.to_state,
                events.c.reason == "cancel_requested",
            ),
        )
        .order_by(events.c.id)
        .limit(limit)
    )
    return [
        PendingCallback(
            job_id=r.job_id,
            url=r.callback_url,
            token_id=r.token_id,
            token_hash=r.secret_hash,
            event_id=r.id,
            time=r.time,
            to_state=r.to_state,
            reason=r.reason,
            message=r.message,
            exit_code=r.exit_code,
        )
        for r in conn.execute(query)
    ]


def callback_delivered(conn: Connection, job_id: str, event_id: int, done: bool) -> None:
    conn.execute(
        update(tes_tasks)
        .where(tes_tasks.c.job_id == job_id, tes_tasks.c.callback_event_id < event_id)
        .values(callback_event_id=event_id, callback_done=done)
    )
