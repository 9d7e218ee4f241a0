"""The store on both backends: schema, exactly-once transitions under concurrency, pagination, users."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from skyport.models import JobSpec, JobState
from skyport.server.store import jobs as job_store
from skyport.server.store import users as user_store
from skyport.server.store.engine import Store

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    s = Store(store_url)
    await s.migrate()
    try:
        yield s
    finally:
        await s.close()


async def _owner(store: Store, name: str = "alice") -> tuple[str, str]:
    async with store.write() as conn:
        user = await user_store.add_user(conn, name, admin=False, now=NOW)
        account = await user_store.account_id_by_name(conn, user_store.DEFAULT_ACCOUNT)
    assert account is not None
    return user.id, account


def _new(owner: str, account: str, at: datetime = NOW, **spec: object) -> job_store.NewJob:
    return job_store.NewJob(
        id=str(uuid.uuid4()),
        owner_id=owner,
        account_id=account,
        spec=JobSpec(command=["true"], **spec),  # type: ignore[arg-type]
        submit_time=at,
        walltime=None,
    )


async def test_migrations_are_idempotent(store: Store) -> None:
    await store.migrate()
    async with store.read() as conn:
        assert await job_store.count_by_state(conn) == {}


async def test_timestamps_come_back_as_utc(store: Store) -> None:
    owner, account = await _owner(store)
    local = NOW.astimezone(ZoneInfo("Asia/Tokyo"))
    job = _new(owner, account, at=local)
    async with store.write() as conn:
        await job_store.insert_jobs(conn, [job])
    async with store.read() as conn:
        got = await job_store.get_job(conn, job.id)
    assert got is not None
    assert got.submit_time == NOW
    assert got.submit_time.tzinfo is not None and got.submit_time.utcoffset() == timedelta(0)


async def test_a_state_change_happens_once_however_many_race_for_it(store: Store) -> None:
    """Ten concurrent writers try to finish the same running job; exactly one wins, with one event."""
    owner, account = await _owner(store)
    job = _new(owner, account)
    async with store.write() as conn:
        await job_store.insert_jobs(conn, [job])
        await job_store.transition(
            conn,
            [
                job_store.StateChange(
                    job.id, JobState.RUNNING, "started", "Running", frozenset({JobState.QUEUED})
                )
            ],
            NOW,
        )

    async def finish(code: int) -> int:
        async with store.write() as conn:
            change = job_store.StateChange(
                job.id,
                JobState.COMPLETED if code == 0 else JobState.FAILED,
                "exit_code",
                f"exit {code}",
                frozenset({JobState.RUNNING}),
                {"exit_code": code},
            )
            return len(await job_store.transition(conn, [change], NOW))

    applied = await asyncio.gather(*(finish(code) for code in range(10)))
    assert sum(applied) == 1
    async with store.read() as conn:
        events = await job_store.list_events(conn, job.id)
        final = await job_store.get_job(conn, job.id)
    assert [e.to_state for e in events] == [JobState.QUEUED, JobState.RUNNING, final.state if final else None]
    assert final is not None and final.exit_code == applied.index(1)


async def test_concurrent_placement_places_each_job_once(store: Store) -> None:
    """Two scheduler passes racing over the same queued jobs never place a job twice."""
    owner, account = await _owner(store)
    new = [_new(owner, account) for _ in range(50)]
    async with store.write() as conn:
        await job_store.insert_jobs(conn, new)

    async def place(node: str) -> list[str]:
        async with store.write() as conn:
            changes = [
                job_store.StateChange(
                    j.id,
                    JobState.SCHEDULED,
                    "placed",
                    f"on {node}",
                    frozenset({JobState.QUEUED}),
                    {"node_names": [node]},
                )
                for j in new
            ]
            return [c.job_id for c in await job_store.transition(conn, changes, NOW)]

    a, b = await asyncio.gather(place("n1"), place("n2"))
    assert sorted(a + b) == sorted(j.id for j in new)
    assert not set(a) & set(b)


async def test_pages_are_stable_while_jobs_are_added(store: Store) -> None:
    owner, account = await _owner(store)
    first = [_new(owner, account) for _ in range(25)]
    async with store.write() as conn:
        await job_store.insert_jobs(conn, first)
    flt = job_store.JobFilter(owner_id=owner)
    seen: list[str] = []
    after = None
    while True:
        async with store.read() as conn:
            page, after = await job_store.list_jobs(conn, flt, limit=10, after=after)
        seen += [j.id for j in page]
        async with store.write() as conn:  # newer jobs arrive between pages
            await job_store.insert_jobs(conn, [_new(owner, account)])
        if after is None:
            break
    assert seen == [j.id for j in reversed(first)]


async def test_a_forged_cursor_is_refused_with_a_message(store: Store) -> None:
    async with store.read() as conn:
        with pytest.raises(ValueError, match="cursor is not valid"):
            await job_store.list_jobs(conn, job_store.JobFilter(), limit=10, after="bm90IGEgY3Vyc29y")


async def test_filters_by_state_and_owner(store: Store) -> None:
    alice, account = await _owner(store, "alice")
    bob, _ = await _owner(store, "bob")
    mine, theirs = _new(alice, account), _new(bob, account)
    async with store.write() as conn:
        await job_store.insert_jobs(conn, [mine, theirs])
        await job_store.transition(
            conn,
            [
                job_store.StateChange(
                    theirs.id, JobState.CANCELED, "canceled", "x", frozenset({JobState.QUEUED})
                )
            ],
            NOW,
        )
    async with store.read() as conn:
        only_alice, _ = await job_store.list_jobs(conn, job_store.JobFilter(owner_id=alice), limit=10)
        canceled, _ = await job_store.list_jobs(
            conn, job_store.JobFilter(states=frozenset({JobState.CANCELED})), limit=10
        )
    assert [j.id for j in only_alice] == [mine.id]
    assert [j.id for j in canceled] == [theirs.id]


async def test_user_names_are_unique_and_certificates_revocable(store: Store) -> None:
    alice, _ = await _owner(store, "alice")
    async with store.write() as conn:
        with pytest.raises(user_store.AlreadyExists):
            await user_store.add_user(conn, "alice", admin=False, now=NOW)
    async with store.write() as conn:
        await user_store.record_certificate(
            conn,
            serial=12345,
            user_id=alice,
            fingerprint="ab" * 32,
            issued=NOW,
            expires=NOW + timedelta(days=1),
        )
    async with store.write() as conn:
        assert await user_store.revoke_user_certificates(conn, alice, NOW) == 1
    async with store.read() as conn:
        record = await user_store.get_certificate(conn, 12345)
    assert record is not None and record.revoked


async def test_a_failed_write_leaves_nothing(store: Store) -> None:
    owner, account = await _owner(store)
    job = _new(owner, account)
    with pytest.raises(RuntimeError):
        async with store.write() as conn:
            await job_store.insert_jobs(conn, [job])
            raise RuntimeError("crash in the middle of a transaction")
    async with store.read() as conn:
        assert await job_store.get_job(conn, job.id) is None
