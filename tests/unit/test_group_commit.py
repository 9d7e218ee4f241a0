"""Group commit: items that arrive together share a transaction; one item's failure stays its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, text

from skyport.server.store.batch import GroupCommit
from skyport.server.store.engine import Store


class CountingStore(Store):
    """A real SQLite store that counts its write transactions."""

    writes = 0

    async def write(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.writes += 1
        return await super().write(fn, *args, **kwargs)


def _insert(conn: Connection, item: int) -> int:
    if item < 0:
        raise ValueError(f"no negative items: {item}")
    conn.execute(text("INSERT INTO t (x) VALUES (:x)"), {"x": item})
    return item * 10


def _create(conn: Connection) -> None:
    conn.execute(text("CREATE TABLE t (x INTEGER)"))


def _rows(conn: Connection) -> list[int]:
    return sorted(r.x for r in conn.execute(text("SELECT x FROM t")))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CountingStore]:
    store = CountingStore(f"sqlite:///{tmp_path / 'db.sqlite'}")
    await store.write(_create)
    store.writes = 0
    yield store
    await store.close()


async def test_items_arriving_together_share_a_transaction(store: CountingStore) -> None:
    group = GroupCommit(store, _insert)
    assert await group.write(1) == 10  # alone: written on its own
    results = await asyncio.gather(*(group.write(n) for n in range(2, 12)))
    assert results == [n * 10 for n in range(2, 12)]
    assert store.writes <= 3  # the first alone, then the ten in one or two groups
    assert await store.read(_rows) == list(range(1, 12))


async def test_an_item_written_a_loop_turn_after_the_first_joins_its_group(store: CountingStore) -> None:
    """Requests of several clients reach the loop in successive polls, not in one turn: the group waits
    one turn of the loop before it is written, and takes in what came meanwhile."""
    group = GroupCommit(store, _insert)

    async def next_turn() -> int:
        await asyncio.sleep(0)
        return await group.write(2)

    assert await asyncio.gather(group.write(1), next_turn()) == [10, 20]
    assert store.writes == 1


async def test_a_failing_item_fails_alone(store: CountingStore) -> None:
    group = GroupCommit(store, _insert)
    outcomes = await asyncio.gather(*(group.write(n) for n in (1, 2, -3, 4)), return_exceptions=True)
    assert outcomes[:2] == [10, 20] and outcomes[3] == 40
    assert isinstance(outcomes[2], ValueError)
    assert await store.read(_rows) == [1, 2, 4]


async def test_groups_are_bounded(store: CountingStore) -> None:
    group = GroupCommit(store, _insert, max_group=3)
    assert await asyncio.gather(*(group.write(n) for n in range(7))) == [n * 10 for n in range(7)]
    assert store.writes == 3
    assert await store.read(_rows) == list(range(7))


def _insert_all(conn: Connection, items: list[int]) -> list[int]:
    if any(item < 0 for item in items):
        raise ValueError("no negative items")
    conn.execute(text("INSERT INTO t (x) VALUES (:x)"), [{"x": item} for item in items])
    return [item * 10 for item in items]


async def test_a_group_is_written_by_the_group_transaction_and_alone_if_it_fails(
    store: CountingStore,
) -> None:
    group = GroupCommit(store, _insert, group_txn=_insert_all)
    assert await asyncio.gather(*(group.write(n) for n in range(5))) == [n * 10 for n in range(5)]
    assert store.writes <= 2  # the first alone, then the other four together
    outcomes = await asyncio.gather(*(group.write(n) for n in (5, -6, 7)), return_exceptions=True)
    assert outcomes[0] == 50 and outcomes[2] == 70 and isinstance(outcomes[1], ValueError)
    assert await store.read(_rows) == [0, 1, 2, 3, 4, 5, 7]
