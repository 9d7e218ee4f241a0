"""The store on both backends: schema, exactly-once transitions under concurrency, pagination, users."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Connection, insert, select

from skyport.models import JobSpec, JobState
from skyport.server.lifecycle.execution import _apply_group
from skyport.server.store import jobs as job_store
from skyport.server.store import users as user_store
from skyport.server.store.engine import Store
from skyport.server.store.prepared import PreparedInsert
from skyport.server.store.tables import events, jobs

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _add_owner(conn: Connection, name: str) -> tuple[str, str | None]:
    user = user_store.add_user(conn, name, admin=False, now=NOW)
    return user.id, user_store.account_id_by_name(conn, user_store.DEFAULT_ACCOUNT)


async def _owner(store: Store, name: str = "alice") -> tuple[str, str]:
    user_id, account = await store.write(_add_owner, name)
    assert account is not None
    return user_id, account


def _new(owner: str, account: str, at: datetime = NOW) -> job_store.NewJob:
    return job_store.NewJob(
        id=str(uuid.uuid4()),
        owner_id=owner,
        account_id=account,
        spec=JobSpec(command=["true"]),
        submit_time=at,
        walltime=None,
    )


def _change(job_id: str, to: JobState, frm: JobState, **values: object) -> job_store.StateChange:
    return job_store.StateChange(job_id, to, "test", f"to {to.value}", frozenset({frm}), values)


async def test_migrations_are_idempotent(store: Store) -> None:
    await store.migrate()
    assert await store.read(job_store.count_by_state) == {}


def _schema_differences(conn: Connection) -> list[object]:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from skyport.server.store.tables import metadata

    return list(compare_metadata(MigrationContext.configure(conn), metadata))


async def test_the_migrations_build_exactly_the_declared_schema(store: Store) -> None:
    """A column added to the tables but forgotten in a migration would only fail on a real database."""
    assert await store.read(_schema_differences) == []


async def test_timestamps_come_back_as_utc(store: Store) -> None:
    owner, account = await _owner(store)
    job = _new(owner, account, at=NOW.astimezone(ZoneInfo("Asia/Tokyo")))
    await store.write(job_store.insert_jobs, [job])
    got = await store.read(job_store.get_job, job.id)
    assert got is not None
    assert got.submit_time == NOW
    assert got.submit_time.utcoffset() == timedelta(0)


async def test_a_state_change_happens_once_however_many_race_for_it(store: Store) -> None:
    """Ten concurrent writers try to finish the same running job; exactly one wins, with one event."""
    owner, account = await _owner(store)
    job = _new(owner, account)
    await store.write(job_store.insert_jobs, [job])
    await store.write(job_store.transition, [_change(job.id, JobState.RUNNING, JobState.QUEUED)], NOW)

    async def finish(code: int) -> int:
        to = JobState.COMPLETED if code == 0 else JobState.FAILED
        change = _change(job.id, to, JobState.RUNNING, exit_code=code)
        return len(await store.write(job_store.transition, [change], NOW))

    applied = await asyncio.gather(*(finish(code) for code in range(10)))
    assert sum(applied) == 1
    events = await store.read(job_store.list_events, job.id)
    final = await store.read(job_store.get_job, job.id)
    assert final is not None
    assert [e.to_state for e in events] == [JobState.QUEUED, JobState.RUNNING, final.state]
    assert final.exit_code == applied.index(1)


async def test_concurrent_placement_places_each_job_once(store: Store) -> None:
    """Two scheduler passes racing over the same queued jobs never place a job twice."""
    owner, account = await _owner(store)
    new = [_new(owner, account) for _ in range(50)]
    await store.write(job_store.insert_jobs, new)

    async def place(node: str) -> list[str]:
        changes = [_change(j.id, JobState.SCHEDULED, JobState.QUEUED, node_names=[node]) for j in new]
        return [c.job_id for c in await store.write(job_store.transition, changes, NOW)]

    a, b = await asyncio.gather(place("n1"), place("n2"))
    assert sorted(a + b) == sorted(j.id for j in new)
    assert not set(a) & set(b)


async def test_writes_grouped_in_one_transaction_each_learn_their_own_applied_changes(store: Store) -> None:
    """The execution loop's group commit: three writes in one transaction, in their order; a change
    whose job moved on already (by an earlier write of the same group) is not applied, and each write
    gets back only its own applied changes."""
    owner, account = await _owner(store)
    a, b = _new(owner, account), _new(owner, account)
    await store.write(job_store.insert_jobs, [a, b])
    first = [_change(j.id, JobState.RUNNING, JobState.QUEUED) for j in (a, b)]
    second = [_change(a.id, JobState.COMPLETED, JobState.RUNNING, exit_code=0)]
    late = [_change(a.id, JobState.FAILED, JobState.RUNNING, exit_code=1)]  # a completed already
    applied = await store.write(
        _apply_group, [(first, NOW), (second, NOW), (late, NOW + timedelta(seconds=1))], 3600.0
    )
    assert applied == [first, second, []]
    events = await store.read(job_store.list_events, a.id)
    assert [e.to_state for e in events] == [JobState.QUEUED, JobState.RUNNING, JobState.COMPLETED]
    assert all(e.time == NOW + timedelta(seconds=1) for e in events[1:])  # the group's latest time


async def test_pages_are_stable_while_jobs_are_added(store: Store) -> None:
    owner, account = await _owner(store)
    first = [_new(owner, account) for _ in range(25)]
    await store.write(job_store.insert_jobs, first)
    flt = job_store.JobFilter(owner_id=owner)
    seen: list[str] = []
    after = None
    while True:
        page, after = await store.read(job_store.list_jobs, flt, limit=10, after=after)
        seen += [j.id for j in page]
        await store.write(job_store.insert_jobs, [_new(owner, account)])  # newer jobs arrive between pages
        if after is None:
            break
    assert seen == [j.id for j in reversed(first)]


async def test_a_forged_cursor_is_refused_with_a_message(store: Store) -> None:
    with pytest.raises(ValueError, match="cursor is not valid"):
        await store.read(job_store.list_jobs, job_store.JobFilter(), limit=10, after="bm90IGEgY3Vyc29y")


async def test_filters_by_state_and_owner(store: Store) -> None:
    alice, account = await _owner(store, "alice")
    bob, _ = await _owner(store, "bob")
    mine, theirs = _new(alice, account), _new(bob, account)
    await store.write(job_store.insert_jobs, [mine, theirs])
    await store.write(job_store.transition, [_change(theirs.id, JobState.CANCELED, JobState.QUEUED)], NOW)
    only_alice, _ = await store.read(job_store.list_jobs, job_store.JobFilter(owner_id=alice), limit=10)
    canceled, _ = await store.read(
        job_store.list_jobs, job_store.JobFilter(states=frozenset({JobState.CANCELED})), limit=10
    )
    assert [j.id for j in only_alice] == [mine.id]
    assert [j.id for j in canceled] == [theirs.id]


async def test_user_names_are_unique_and_certificates_revocable(store: Store) -> None:
    alice, _ = await _owner(store, "alice")
    with pytest.raises(user_store.AlreadyExists):
        await store.write(user_store.add_user, "alice", admin=False, now=NOW)
    await store.write(
        user_store.record_certificate,
        serial=12345,
        user_id=alice,
        fingerprint="ab" * 32,
        issued=NOW,
        expires=NOW + timedelta(days=1),
    )
    assert await store.write(user_store.revoke_user_certificates, alice, NOW) == 1
    record = await store.read(user_store.get_certificate, 12345)
    assert record is not None and record.revoked


async def test_a_failed_write_leaves_nothing(store: Store) -> None:
    owner, account = await _owner(store)
    job = _new(owner, account)

    def insert_then_crash(conn: Connection) -> None:
        job_store.insert_jobs(conn, [job])
        raise RuntimeError("crash in the middle of a transaction")

    with pytest.raises(RuntimeError):
        await store.write(insert_then_crash)
    assert await store.read(job_store.get_job, job.id) is None


def _stored_like_sqlalchemy(conn: Connection, job: job_store.NewJob) -> list[tuple[str, object, object]]:
    """The job's row as insert_jobs wrote it, against the same values written by SQLAlchemy's own
    insert: (column, ours, SQLAlchemy's) for every column that differs, beyond the keys."""
    twin = {**job_store._row_values(job), "id": str(uuid.uuid4())}
    conn.execute(insert(jobs), [twin])
    ours = conn.execute(select(jobs).where(jobs.c.id == job.id)).one()._mapping
    theirs = conn.execute(select(jobs).where(jobs.c.id == twin["id"])).one()._mapping
    return [(k, ours[k], theirs[k]) for k in ours if k not in {"id", "seq"} and ours[k] != theirs[k]]


async def test_a_submission_is_stored_as_sqlalchemy_would_store_it(store: Store) -> None:
    """insert_jobs hands the driver pre-processed rows (PreparedInsert): every column must come back
    exactly as through SQLAlchemy's insert, JSON, timestamps and booleans included."""
    owner, account = await _owner(store)
    spec = JobSpec(
        command=["python", "-c", "print('é')"],
        name="typed",
        cpus=3,
        mem=2**33,
        labels={"zone": "a/b"},
        depends=[str(uuid.uuid4())],
        exclusive=True,
        env={"A": "1"},
    )
    job = job_store.NewJob(
        id=str(uuid.uuid4()),
        owner_id=owner,
        account_id=account,
        spec=spec,
        submit_time=NOW.astimezone(ZoneInfo("Asia/Tokyo")),
        walltime=600,
    )
    await store.write(job_store.insert_jobs, [job])
    assert await store.write(_stored_like_sqlalchemy, job) == []
    events = await store.read(job_store.list_events, job.id)
    assert [(e.to_state, e.reason, e.time) for e in events] == [(JobState.QUEUED, "submitted", NOW)]


async def test_a_prepared_insert_refuses_rows_with_columns_it_does_not_write(store: Store) -> None:
    """A column added to the rows but not to the statement would be dropped silently: it is refused."""
    prepared = PreparedInsert(events, ("job_id", "attempt", "time", "from_state", "to_state", "reason"))
    row = {"job_id": "x", "attempt": 1, "time": NOW, "from_state": None, "to_state": "queued"}
    with pytest.raises(ValueError, match="message"):
        await store.write(prepared.execute, [{**row, "reason": "r", "message": "m"}])


async def test_a_prepared_insert_stores_each_rows_own_values(store: Store) -> None:
    """A value shared by every row is bound once for all of them; rows whose values differ keep theirs."""
    owner, account = await _owner(store)
    job = _new(owner, account)
    await store.write(job_store.insert_jobs, [job])
    prepared = PreparedInsert(
        events, ("job_id", "attempt", "time", "from_state", "to_state", "reason", "message")
    )
    later = NOW + timedelta(seconds=5)
    times = {"shared": [NOW, NOW, NOW], "mixed": [NOW, later, NOW]}
    for reason, at in times.items():
        rows = [
            {"job_id": job.id, "attempt": 1, "time": t, "from_state": None, "to_state": "queued"} for t in at
        ]
        await store.write(prepared.execute, [{**row, "reason": reason, "message": "m"} for row in rows])
    stored = await store.read(job_store.list_events, job.id)
    for reason, at in times.items():
        assert [e.time for e in stored if e.reason == reason] == at


def _queue_index_and_plan(conn: Connection) -> tuple[str, list[str]]:
    """The queue index's definition, and (SQLite) the plan of the scheduler's read of the queue head."""
    if conn.dialect.name == "sqlite":
        sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'ix_jobs_queue'").scalar_one()
        head = (
            select(jobs.c.id)
            .where(jobs.c.state == "queued")
            .order_by(jobs.c.priority.desc(), jobs.c.seq.asc())
            .limit(16)
            .compile(conn, compile_kwargs={"literal_binds": True})
        )
        plan = [row[3] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {head}")]
        return sql, plan
    sql = conn.exec_driver_sql(
        "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_jobs_queue'"
    ).scalar_one()
    return sql, []


async def test_the_queue_head_is_read_in_index_order_without_sorting_the_queue(store: Store) -> None:
    """Batch migrations on SQLite recreate indexes without their DESC (0008): then every scheduling
    pass sorted all queued jobs of the head's priority to return a page of them."""
    definition, plan = await store.read(_queue_index_and_plan)
    assert "priority DESC" in definition
    assert not [step for step in plan if "TEMP B-TREE" in step]


def _partial_indexes(conn: Connection) -> tuple[dict[str, str], list[str]]:
    """The jobs' partition and array index definitions, and (SQLite) the plans of lookups by them."""
    names = ("ix_jobs_partition_id", "ix_jobs_array_id")
    if conn.dialect.name == "sqlite":
        rows = conn.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE name IN (?, ?)", names).all()
        plans = [
            row[3]
            for query in (
                "SELECT id FROM jobs WHERE partition_id IN ('a', 'b')",
                "SELECT id FROM jobs WHERE array_id = 'a'",
            )
            for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {query}")
        ]
        return {name: sql for name, sql in rows}, plans
    rows = conn.exec_driver_sql(
        "SELECT indexname, indexdef FROM pg_indexes WHERE indexname IN "
        "('ix_jobs_partition_id', 'ix_jobs_array_id')"
    ).all()
    return {name: sql for name, sql in rows}, []


async def test_the_partition_and_array_indexes_hold_only_jobs_that_have_one(store: Store) -> None:
    """Most jobs have neither (0009): every submission and placement wrote both indexes for NULLs."""
    definitions, plans = await store.read(_partial_indexes)
    assert len(definitions) == 2
    for name, definition in definitions.items():
        assert "IS NOT NULL" in definition, name
    for plan in plans:  # the lookups still use them
        assert "USING INDEX ix_jobs_" in plan or "USING COVERING INDEX ix_jobs_" in plan, plan
