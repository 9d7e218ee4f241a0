"""Jobs and their events in the store.

Every state change goes through :func:`transition`, which updates the job only if it is still in one of
the expected states and writes the event in the same transaction. That guard is what makes each final
state happen exactly once, whoever races (an exit, a cancel, a restarted core re-adopting the job).
"""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update

from skyport.models import ArrayJob, Event, Job, JobSpec, JobState
from skyport.server.store import partitions as partition_store
from skyport.server.store.prepared import PreparedInsert, PreparedStatement
from skyport.server.store.tables import accounts, arrays, events, job_files, jobs, remotes, users


@dataclass(frozen=True)
class NewArray:
    """An array job: one submission whose tasks are jobs of their own."""

    id: str
    owner_id: str
    name: str
    range: str
    size: int
    throttle: int | None
    submit_time: datetime


@dataclass(frozen=True)
class NewJob:
    """A validated submission (or one task of an array), ready to be written."""

    id: str
    owner_id: str
    account_id: str
    spec: JobSpec
    submit_time: datetime
    walltime: int | None
    remote_id: str | None = None
    input_files: Sequence[tuple[str, int, str]] = ()  # (name, size, sha256)
    array: NewArray | None = None
    array_index: int | None = None


@dataclass(frozen=True)
class StateChange:
    """One job's move to a new state, with what to record alongside."""

    job_id: str
    to_state: JobState
    reason: str
    message: str
    from_states: frozenset[JobState]
    values: Mapping[str, Any] = field(default_factory=dict)


def _row_values(job: NewJob) -> dict[str, Any]:
    spec = job.spec
    return {
        "id": job.id,
        "owner_id": job.owner_id,
        "account_id": job.account_id,
        "name": spec.name,
        "state": JobState.QUEUED.value,
        "reason": "submitted",
        "state_details": "Waiting to be scheduled",
        "attempt": 1,
        "spec": spec.model_dump(mode="json", exclude_defaults=True),
        "priority": spec.priority,
        "cpus": spec.cpus,
        "mem": spec.mem,
        "gpus": spec.gpus,
        "node_count": spec.nodes,
        "walltime": job.walltime,
        "labels": spec.labels,
        "depends": spec.depends,
        "depends_any": spec.depends_any,
        "exclusive": spec.exclusive,
        "flavor": spec.flavor,
        "array_id": job.array.id if job.array else None,
        "array_index": job.array_index,
        "array_throttle": job.array.throttle if job.array else None,
        "requested_remote_id": job.remote_id,
        "remote_id": None,
        "node_ids": [],
        "node_names": [],
        "node_ips": [],
        "handle": None,
        "cancel_requested": False,
        "requeue_requested": False,
        "submit_time": job.submit_time,
        "updated_at": job.submit_time,
    }


_JOB_COLUMNS = (
    *("id", "owner_id", "account_id", "name", "state", "reason", "state_details", "attempt", "spec"),
    *("priority", "cpus", "mem", "gpus", "node_count", "walltime", "labels", "depends", "depends_any"),
    *("exclusive", "flavor", "array_id", "array_index", "array_throttle", "requested_remote_id"),
    *("remote_id", "node_ids", "node_names", "node_ips", "handle", "cancel_requested"),
    *("requeue_requested", "submit_time", "updated_at"),
)
_insert_job_rows = PreparedInsert(jobs, _JOB_COLUMNS)
_insert_events = PreparedInsert(
    events, ("job_id", "attempt", "time", "from_state", "to_state", "reason", "message")
)


def insert_jobs(conn: Connection, new_jobs: Sequence[NewJob]) -> None:
    """Write accepted submissions (one transaction for many: group commit) with their first event."""
    if not new_jobs:
        return
    new_arrays = {j.array.id: j.array for j in new_jobs if j.array is not None}
    if new_arrays:
        conn.execute(insert(arrays), [vars(a) for a in new_arrays.values()])
    _insert_job_rows.execute(conn, [_row_values(j) for j in new_jobs])
    _insert_events.execute(
        conn,
        [
            {
                "job_id": j.id,
                "attempt": 1,
                "time": j.submit_time,
                "from_state": None,
                "to_state": JobState.QUEUED.value,
                "reason": "submitted",
                "message": "Waiting to be scheduled",
            }
            for j in new_jobs
        ],
    )
    files = [
        {"job_id": j.id, "kind": "input", "name": name, "size": size, "sha256": sha}
        for j in new_jobs
        for name, size, sha in j.input_files
    ]
    if files:
        conn.execute(insert(job_files), files)


# The hot paths' queries are built once, with bound parameters. SQLAlchemy caches a statement's
# compiled form but not the statement: one built per call is constructed and walked for its cache key
# on every execution, which for these small queries cost more than running them (the transitions'
# read: 260 us built per call, 80 us prebuilt, on an empty table).

#: The current state of jobs about to change (locked on PostgreSQL: see :func:`transition`).
_CURRENT_STATES = (
    select(jobs.c.id, jobs.c.state, jobs.c.attempt, jobs.c.partition_id)
    .where(jobs.c.id.in_(bindparam("ids", expanding=True)))
    .with_for_update()
)


def transition(conn: Connection, changes: Sequence[StateChange], now: datetime) -> list[StateChange]:
    """Apply each change whose job is still in an expected state; return the ones applied.

    Each applied change writes its event. A change whose guard fails is skipped: another actor got
    there first, and the event log shows what it did. The current states are read with the rows locked
    (PostgreSQL; SQLite's single writer is exclusive anyway), so every change decided here applies, and
    changes of the same shape are written with one ``executemany``.
    """
    if not changes:
        return []
    read = conn.execute(_CURRENT_STATES, {"ids": list({c.job_id for c in changes})}).all()
    current = {r.id: (JobState(r.state), r.attempt) for r in read}
    on_partitions = {r.id for r in read if r.partition_id is not None}
    applied: list[StateChange] = []
    rows: list[tuple[str, str, dict[str, Any]]] = []  # (job id, from state, new values)
    event_rows: list[dict[str, Any]] = []
    for change in changes:
        if change.job_id not in current:
            continue
        state, attempt = current[change.job_id]
        if state not in change.from_states:
            continue
        values = {
            "state": change.to_state.value,
            "reason": change.reason,
            "state_details": change.message,
            "updated_at": now,
            **change.values,
        }
        current[change.job_id] = (change.to_state, values.get("attempt", attempt))
        applied.append(change)
        rows.append((change.job_id, state.value, values))
        event_rows.append(
            {
                "job_id": change.job_id,
                "attempt": values.get("attempt", attempt),
                "time": now,
                "from_state": state.value,
                "to_state": change.to_state.value,
                "reason": change.reason,
                "message": change.message,
            }
        )
    ending = [
        c.job_id
        for c in applied
        if (c.to_state.terminal or c.to_state is JobState.QUEUED) and c.job_id in on_partitions
    ]
    if ending:  # elastic capacity costs money; before the rows change: a requeue clears the partition
        partition_store.charge_jobs(conn, ending, now)
    _write_rows(conn, rows)
    _insert_events.execute(conn, event_rows)
    return applied


def _write_rows(conn: Connection, rows: list[tuple[str, str, dict[str, Any]]]) -> None:
    """UPDATE the jobs, one executemany per set of columns (one statement each when a job repeats)."""
    if len({job_id for job_id, _, _ in rows}) < len(rows):  # a job changes twice: keep the order
        for job_id, from_state, values in rows:
            conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == from_state).values(**values))
        return
    shapes: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for job_id, from_state, values in rows:
        bound = {f"v_{k}": v for k, v in values.items()}
        shapes[tuple(sorted(values))].append({"b_id": job_id, "b_from": from_state, **bound})
    for columns, params in shapes.items():
        count = _state_update(columns).execute(conn, params)
        # Cannot happen with the rows locked; never hide it. (asyncpg reports no count: -1.)
        if count not in (-1, len(params)):
            raise RuntimeError(f"state change raced: {count} of {len(params)} jobs updated")


#: The state changes' UPDATEs, one per set of columns changed (a few dozen shapes in all).
_state_updates: dict[tuple[str, ...], PreparedStatement] = {}


def _state_update(columns: tuple[str, ...]) -> PreparedStatement:
    prepared = _state_updates.get(columns)
    if prepared is None:
        statement = (
            update(jobs)
            .where(jobs.c.id == bindparam("b_id"), jobs.c.state == bindparam("b_from"))
            .values({c: bindparam(f"v_{c}", type_=jobs.c[c].type) for c in columns})
        )
        prepared = PreparedStatement(statement, ["b_id", "b_from", *(f"v_{c}" for c in columns)])
        _state_updates[columns] = prepared
    return prepared


def owners_of(conn: Connection, job_ids: Sequence[str]) -> dict[str, str]:
    """Job id -> owner's user id, for the jobs that exist."""
    rows = conn.execute(select(jobs.c.id, jobs.c.owner_id).where(jobs.c.id.in_(job_ids)))
    return {r.id: r.owner_id for r in rows}


_STARTED = select(jobs.c.id, jobs.c.account_id, jobs.c.cpus, jobs.c.node_count, jobs.c.start_time).where(
    jobs.c.id.in_(bindparam("ids", expanding=True)), jobs.c.start_time.is_not(None)
)


def cpu_seconds_used(conn: Connection, job_ids: Sequence[str], now: datetime) -> dict[str, tuple[str, float]]:
    """For jobs that started: job id -> (account id, CPU-seconds used until ``now``)."""
    rows = conn.execute(_STARTED, {"ids": list(job_ids)})
    return {
        r.id: (r.account_id, r.cpus * r.node_count * max(0.0, (now - r.start_time).total_seconds()))
        for r in rows
    }


def requeue_values(attempt: int) -> dict[str, Any]:
    """Column values that start attempt ``attempt + 1`` of a job from scratch."""
    return {
        "attempt": attempt + 1,
        "remote_id": None,
        "partition_id": None,
        "node_ids": [],
        "node_names": [],
        "node_ips": [],
        "handle": None,
        "cancel_requested": False,
        "requeue_requested": False,
        "canceled_by": None,
        "scheduled_time": None,
        "estimated_start": None,
        "start_time": None,
        "end_time": None,
        "exit_code": None,
        "signal": None,
    }


_SET_WAIT_REASON = (
    update(jobs)
    .where(jobs.c.id.in_(bindparam("ids", expanding=True)), jobs.c.state == JobState.QUEUED.value)
    .values(
        reason=bindparam("w_reason"),
        state_details=bindparam("w_message"),
        estimated_start=bindparam("w_start", type_=jobs.c.estimated_start.type),
    )
)


def set_wait_reason(
    conn: Connection, job_ids: Sequence[str], reason: str, message: str, estimated_start: datetime | None
) -> None:
    """Why queued jobs wait and when they should start (not a state change, so no event)."""
    conn.execute(
        _SET_WAIT_REASON,
        {"ids": list(job_ids), "w_reason": reason, "w_message": message, "w_start": estimated_start},
    )


def set_flags(conn: Connection, job_id: str, **values: Any) -> bool:
    result = conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))
    return bool(result.rowcount)


def add_event(
    conn: Connection,
    job_id: str,
    attempt: int,
    state: JobState,
    reason: str,
    message: str,
    now: datetime,
) -> None:
    """An event that is not a state change (e.g. a cancel request), also shown as ``state_details``."""
    _insert_events.execute(
        conn,
        [
            {
                "job_id": job_id,
                "attempt": attempt,
                "time": now,
                "from_state": state.value,
                "to_state": state.value,
                "reason": reason,
                "message": message,
            }
        ],
    )
    conn.execute(update(jobs).where(jobs.c.id == job_id).values(state_details=message, updated_at=now))


def _job_select() -> Any:
    return (
        select(
            jobs,
            users.c.name.label("owner_name"),
            accounts.c.name.label("account_name"),
            remotes.c.name.label("remote_name"),
        )
        .join(users, users.c.id == jobs.c.owner_id)
        .join(accounts, accounts.c.id == jobs.c.account_id)
        .outerjoin(remotes, remotes.c.id == jobs.c.remote_id)
    )


def job_from_row(row: Any) -> Job:
    return Job(
        id=row.id,
        owner=row.owner_name,
        account=row.account_name,
        name=row.name,
        state=JobState(row.state),
        reason=row.reason,
        state_details=row.state_details,
        attempt=row.attempt,
        remote=row.remote_name or "",
        remote_id=row.remote_id or "",
        node_names=row.node_names,
        node_ips=row.node_ips,
        submit_time=row.submit_time,
        start_time=row.start_time,
        end_time=row.end_time,
        exit_code=row.exit_code,
        signal=row.signal,
        estimated_start=row.estimated_start,
        array_id=row.array_id or "",
        array_index=row.array_index,
        cancel_requested=row.cancel_requested,
        cost=row.cost,
        spec=JobSpec.model_validate(row.spec),
    )


def get_job(conn: Connection, job_id: str) -> Job | None:
    row = (conn.execute(_job_select().where(jobs.c.id == job_id))).first()
    return job_from_row(row) if row else None


def get_job_row(conn: Connection, job_id: str) -> Any:
    """The raw row, for the loops that need internal columns (handle, owner id, flags)."""
    return (conn.execute(select(jobs).where(jobs.c.id == job_id))).first()


@dataclass(frozen=True)
class JobFilter:
    owner_id: str | None = None  # None: all users (admins)
    states: frozenset[JobState] = frozenset()
    name: str | None = None
    owner_name: str | None = None
    array_id: str | None = None  # only the tasks of this array
    in_arrays: bool | None = None  # False: jobs that are not array tasks; True: only tasks


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"seq": seq}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """Raises ValueError with a message fit for a 400 when the cursor was not made by us."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        seq = json.loads(base64.urlsafe_b64decode(padded.encode()))["seq"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError("the page cursor is not valid: pass the 'next' value of a previous page") from exc
    if not isinstance(seq, int):
        raise ValueError("the page cursor is not valid: pass the 'next' value of a previous page")
    return seq


def list_jobs(
    conn: Connection, flt: JobFilter, *, limit: int, after: str | None = None, newest_first: bool = True
) -> tuple[list[Job], str | None]:
    """A page of jobs and the cursor of the next page. Stable while jobs are added (cursor on ``seq``)."""
    query = _job_select()
    if flt.owner_id is not None:
        query = query.where(jobs.c.owner_id == flt.owner_id)
    if flt.states:
        query = query.where(jobs.c.state.in_([s.value for s in flt.states]))
    if flt.name is not None:
        query = query.where(jobs.c.name == flt.name)
    if flt.owner_name is not None:
        query = query.where(users.c.name == flt.owner_name)
    if flt.array_id is not None:
        query = query.where(jobs.c.array_id == flt.array_id)
    if flt.in_arrays is not None:
        query = query.where(jobs.c.array_id.is_not(None) if flt.in_arrays else jobs.c.array_id.is_(None))
    if after is not None:
        seq = decode_cursor(after)
        query = query.where(jobs.c.seq < seq if newest_first else jobs.c.seq > seq)
    query = query.order_by(jobs.c.seq.desc() if newest_first else jobs.c.seq.asc()).limit(limit + 1)
    rows = (conn.execute(query)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return [job_from_row(r) for r in rows], (encode_cursor(rows[-1].seq) if more and rows else None)


def list_events(conn: Connection, job_id: str, after_id: int = 0) -> list[Event]:
    rows = (
        conn.execute(
            select(events).where(events.c.job_id == job_id, events.c.id > after_id).order_by(events.c.id)
        )
    ).all()
    return [
        Event(
            id=r.id,
            job_id=r.job_id,
            time=r.time,
            attempt=r.attempt,
            from_state=JobState(r.from_state) if r.from_state else None,
            to_state=JobState(r.to_state),
            reason=r.reason,
            message=r.message,
        )
        for r in rows
    ]


def count_by_state(conn: Connection) -> dict[str, int]:
    rows = (conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state))).all()
    return {r[0]: r[1] for r in rows}


def rows_with_owner(
    conn: Connection,
    states: Iterable[JobState],
    *,
    flagged_only: bool = False,
    limit: int | None = None,
) -> list[Any]:
    """Raw job rows (plus ``owner_name``) in the given states, in scheduling order.

    ``flagged_only``: just those with a pending cancel or requeue request.
    """
    query = (
        select(jobs, users.c.name.label("owner_name"))
        .join(users, users.c.id == jobs.c.owner_id)
        .where(jobs.c.state.in_([s.value for s in states]))
        .order_by(jobs.c.priority.desc(), jobs.c.seq.asc())
    )
    if flagged_only:
        query = query.where(jobs.c.cancel_requested.is_(True) | jobs.c.requeue_requested.is_(True))
    if limit is not None:
        query = query.limit(limit)
    return list(conn.execute(query).all())


_QUEUE_ORDER = (jobs.c.priority.desc(), jobs.c.seq.asc())
_LAUNCH_CANDIDATES = (
    select(jobs.c.id, jobs.c.node_ids, jobs.c.cancel_requested, jobs.c.requeue_requested)
    .where(jobs.c.state.in_(bindparam("states", expanding=True)), jobs.c.handle.is_(None))
    .order_by(*_QUEUE_ORDER)
    .limit(bindparam("n"))
)
#: What the execution loop reads of a job it launches (the whole row was a third of the read's cost).
_TO_LAUNCH = (
    select(
        *(jobs.c[name] for name in ("id", "state", "reason", "state_details", "attempt", "spec")),
        *(jobs.c[name] for name in ("walltime", "array_id", "array_index", "remote_id", "node_ids")),
        *(jobs.c[name] for name in ("node_names", "handle", "start_time", "exit_code", "signal")),
        *(jobs.c[name] for name in ("cancel_requested", "requeue_requested", "canceled_by")),
        users.c.name.label("owner_name"),
    )
    .join(users, users.c.id == jobs.c.owner_id)
    .where(jobs.c.id.in_(bindparam("ids", expanding=True)))
    .order_by(*_QUEUE_ORDER)
)


def rows_to_launch(
    conn: Connection,
    states: Iterable[JobState],
    *,
    limit: int,
    skip: Callable[[str], bool] = lambda job_id: False,
) -> list[Any]:
    """Job rows (the columns of :data:`_TO_LAUNCH`) in ``states`` not yet handed to a gate (no handle: a
    self-scheduling gate's submitted jobs stay ``scheduled`` with one), in scheduling order — only those
    there is something to do for: placed on nodes, or with a cancel or requeue request.

    Jobs still waiting for an elastic partition (no nodes yet) are left out after reading a few of
    their columns: when hundreds wait for their VMs, reading all of their rows (the spec and the other
    JSON columns decoded) on every pass of the execution loop was most of the pass's cost, for rows it
    skips. So are the rows the caller tells to ``skip`` (those it is launching already).
    """
    candidates = conn.execute(_LAUNCH_CANDIDATES, {"states": [s.value for s in states], "n": limit})
    ids = [
        r.id
        for r in candidates
        if (r.node_ids or r.cancel_requested or r.requeue_requested) and not skip(r.id)
    ]
    if not ids:
        return []
    return list(conn.execute(_TO_LAUNCH, {"ids": ids}).all())


def list_files(conn: Connection, job_id: str, kind: str) -> list[tuple[str, int, str]]:
    rows = (
        conn.execute(
            select(job_files.c.name, job_files.c.size, job_files.c.sha256)
            .where(job_files.c.job_id == job_id, job_files.c.kind == kind)
            .order_by(job_files.c.name)
        )
    ).all()
    return [(r.name, r.size, r.sha256) for r in rows]


def replace_files(conn: Connection, job_id: str, kind: str, files: Sequence[tuple[str, int, str]]) -> None:
    conn.execute(delete(job_files).where(job_files.c.job_id == job_id, job_files.c.kind == kind))
    if files:
        conn.execute(
            insert(job_files),
            [{"job_id": job_id, "kind": kind, "name": n, "size": s, "sha256": h} for n, s, h in files],
        )


def _array_from(row: Any, counts: dict[str, int]) -> ArrayJob:
    return ArrayJob(
        id=row.id,
        name=row.name,
        owner=row.owner_name,
        range=row.range,
        size=row.size,
        throttle=row.throttle,
        submit_time=row.submit_time,
        states={JobState(s): n for s, n in counts.items()},
    )


def _array_counts(conn: Connection, array_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    rows = conn.execute(
        select(jobs.c.array_id, jobs.c.state, func.count())
        .where(jobs.c.array_id.in_(array_ids))
        .group_by(jobs.c.array_id, jobs.c.state)
    )
    for array_id, state, n in rows:
        counts[array_id][state] = n
    return counts


def get_array(conn: Connection, array_id: str) -> ArrayJob | None:
    row = conn.execute(
        select(arrays, users.c.name.label("owner_name"))
        .join(users, users.c.id == arrays.c.owner_id)
        .where(arrays.c.id == array_id)
    ).first()
    return _array_from(row, _array_counts(conn, [array_id])[array_id]) if row else None


def list_arrays(conn: Connection, owner_id: str | None, *, limit: int) -> list[ArrayJob]:
    """The newest array jobs (an owner's, or everyone's), with their tasks counted by state."""
    query = select(arrays, users.c.name.label("owner_name")).join(users, users.c.id == arrays.c.owner_id)
    if owner_id is not None:
        query = query.where(arrays.c.owner_id == owner_id)
    rows = list(conn.execute(query.order_by(arrays.c.submit_time.desc(), arrays.c.id).limit(limit)))
    counts = _array_counts(conn, [r.id for r in rows])
    return [_array_from(r, counts[r.id]) for r in rows]


def rows_of_array(conn: Connection, array_id: str) -> list[Any]:
    """The task rows of an array job (id, state, attempt, cancel_requested)."""
    query = select(jobs.c.id, jobs.c.state, jobs.c.attempt, jobs.c.cancel_requested).where(
        jobs.c.array_id == array_id
    )
    return list(conn.execute(query))


def running_with_ports(conn: Connection, remote_ids: list[str]) -> list[Any]:
    """Running jobs on the given remotes whose spec declares ports (id, spec, handle, node_ips, remote)."""
    if not remote_ids:
        return []
    rows = conn.execute(
        select(jobs.c.id, jobs.c.spec, jobs.c.handle, jobs.c.node_ips, jobs.c.remote_id).where(
            jobs.c.state == JobState.RUNNING.value, jobs.c.remote_id.in_(remote_ids)
        )
    )
    return [r for r in rows if r.spec.get("ports")]


def set_first_node_ip(conn: Connection, job_id: str, ip: str) -> None:
    """Make ``ip`` the job's ``node_ips[0]`` (the address clients use to reach it)."""
    row = conn.execute(select(jobs.c.node_ips).where(jobs.c.id == job_id)).first()
    if row is not None and (not row.node_ips or row.node_ips[0] != ip):
        rest = [a for a in (row.node_ips or []) if a != ip]
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(node_ips=[ip, *rest]))


def costs(
    conn: Connection, *, owner_id: str | None, account: str | None, since: datetime | None, limit: int
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Spend per account (total, and of jobs that ended since ``since``) and the costliest jobs.

    ``owner_id``: only that user's jobs and their accounts (None: everyone's, for administrators).
    """
    job_query = (
        select(
            jobs.c.id,
            jobs.c.name,
            jobs.c.cost,
            jobs.c.state,
            jobs.c.end_time,
            users.c.name.label("owner"),
            accounts.c.name.label("account"),
            remotes.c.name.label("remote"),
            jobs.c.flavor,
        )
        .join(users, users.c.id == jobs.c.owner_id)
        .join(accounts, accounts.c.id == jobs.c.account_id)
        .outerjoin(remotes, remotes.c.id == jobs.c.remote_id)
        .where(jobs.c.cost > 0)
    )
    if owner_id is not None:
        job_query = job_query.where(jobs.c.owner_id == owner_id)
    if account is not None:
        job_query = job_query.where(accounts.c.name == account)
    if since is not None:
        job_query = job_query.where(jobs.c.end_time >= since)
    job_rows = list(conn.execute(job_query.order_by(jobs.c.cost.desc()).limit(limit)))
    period = select(accounts.c.name, func.coalesce(func.sum(jobs.c.cost), 0.0).label("cost")).join(
        jobs, jobs.c.account_id == accounts.c.id
    )
    if since is not None:
        period = period.where(jobs.c.end_time >= since)
    if owner_id is not None:
        period = period.where(jobs.c.owner_id == owner_id)
    in_period = {r.name: float(r.cost) for r in conn.execute(period.group_by(accounts.c.name))}
    account_query = select(accounts.c.name, accounts.c.spend, accounts.c.budget).order_by(accounts.c.name)
    if account is not None:
        account_query = account_query.where(accounts.c.name == account)
    summary = [
        {
            "account": r.name,
            "spend": r.spend,
            "budget": r.budget,
            "budget_left": None if r.budget is None else r.budget - r.spend,
            "jobs_cost": in_period.get(r.name, 0.0),
        }
        for r in conn.execute(account_query)
        if owner_id is None or r.name in in_period
    ]
    return summary, job_rows
