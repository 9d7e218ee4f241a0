"""The store: engines, transactions, and schema migrations.

A transaction is a plain function ``fn(conn, *args) -> T`` over a synchronous SQLAlchemy
:class:`~sqlalchemy.Connection`, run whole by :meth:`Store.read` or :meth:`Store.write`:

- SQLite: on the event loop, whole. SQLite is a library in this process; a transaction of the core (a
  group of submissions, a scheduling pass's snapshot or placements, a batch of job ends) takes tens of
  microseconds to a few milliseconds of CPU, most of it Python that holds the GIL anyway. Handing each to
  a thread and back cost more than that: two wake-ups across CPUs per transaction (on a virtual machine
  each costs tens of microseconds, and the handed-over work waits for the GIL on top), and the trivial
  jobs' end-to-end rate rose by a quarter without them (docs/performance.md, issue 2). What could block
  the loop for long is kept off it: commits do not checkpoint the WAL (``wal_autocheckpoint=0``); a
  checkpointer does it in a thread, beside the loop (:meth:`Store._checkpoint_forever`). Writes start with
  ``BEGIN IMMEDIATE``: SQLite has one writer and no ``SKIP LOCKED``, and two deferred transactions that
  read then write can both see the same queued jobs (see FIELD-NOTES).
- PostgreSQL: the same function, on asyncpg through SQLAlchemy's ``run_sync``; row locks do the rest.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool

MIGRATIONS = Path(__file__).parent / "migrations"
#: How often the checkpointer copies the WAL's committed pages into the database file, when there were
#: writes (SQLite's own automatic checkpoint would run inside a commit, on the event loop, fsync included).
CHECKPOINT_INTERVAL_S = 1.0


def _json_dumps(value: Any) -> str:
    """JSON columns' serializer: most of them hold an empty list or object most of the time (a job's
    labels, dependencies and nodes before it is placed), written without the encoder's ~2 us."""
    if isinstance(value, list | dict) and not value:
        return "[]" if isinstance(value, list) else "{}"
    return json.dumps(value)


def _json_loads(text: str) -> Any:
    """JSON columns' deserializer, the same shortcut (a fresh object each time: callers may change it)."""
    if text == "[]":
        return []
    if text == "{}":
        return {}
    return json.loads(text)


P = ParamSpec("P")
T = TypeVar("T")
Txn = Callable[Concatenate[Connection, P], T]


def _sqlite_engine(url: str, *, begin: str) -> Engine:
    engine = create_engine(
        url.replace("+aiosqlite", ""),
        poolclass=QueuePool,
        pool_size=1,  # transactions run one after the other, on the event loop
        max_overflow=0,
        # Every use ends in COMMIT or ROLLBACK (see _run), so the pool's extra rollback on return is waste.
        pool_reset_on_return=None,
        connect_args={"timeout": 30, "check_same_thread": False},
        json_serializer=_json_dumps,
        json_deserializer=_json_loads,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so that BEGIN is ours (SQLAlchemy docs,
        # "Serializable isolation / Savepoints / Transactional DDL" for pysqlite).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable against a crash of the core, fast
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's job, off the event loop
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Straight to the driver: through SQLAlchemy's statement execution, BEGIN was a quarter of what
        # an empty transaction costs (78 us), and every transaction runs it.
        driver = conn.connection.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        driver.execute(begin)

    return engine


def _run(engine: Engine, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
    with engine.connect() as conn, conn.begin():
        return fn(conn, *args, **kwargs)


class Store:
    """Owns the engines and runs transactions on them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self._async: AsyncEngine | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self._written = False  # since the last checkpoint
        if self.is_sqlite:
            self._writer = _sqlite_engine(url, begin="BEGIN IMMEDIATE")
            self._reader = _sqlite_engine(url, begin="BEGIN")
            self._checkpoints = _sqlite_engine(url, begin="BEGIN")
        else:
            self._async = create_async_engine(
                url,
                pool_size=10,
                max_overflow=10,
                pool_pre_ping=True,
                json_serializer=_json_dumps,
                json_deserializer=_json_loads,
            )

    @property
    def dialect(self) -> str:
        return "sqlite" if self.is_sqlite else self._engine_async().dialect.name

    def _engine_async(self) -> AsyncEngine:
        assert self._async is not None
        return self._async

    async def read(self, fn: Txn[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(conn, ...)`` in a read transaction (a consistent snapshot)."""
        if self.is_sqlite:
            return _run(self._reader, fn, args, kwargs)
        async with self._engine_async().connect() as conn, conn.begin():
            return await conn.run_sync(_bind(fn, args, kwargs))

    async def write(self, fn: Txn[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(conn, ...)`` in a write transaction: committed if it returns, rolled back if it raises."""
        if self.is_sqlite:
            self._written = True
            loop = asyncio.get_running_loop()
            if self._checkpointer is None or self._checkpointer.get_loop() is not loop:
                self._checkpointer = loop.create_task(self._checkpoint_forever(), name="store-checkpoint")
            return _run(self._writer, fn, args, kwargs)
        async with self._engine_async().begin() as conn:
            return await conn.run_sync(_bind(fn, args, kwargs))

    async def _checkpoint_forever(self) -> None:
        """Copy the WAL into the database file now and then, in a thread (it reads, writes and syncs the
        file: milliseconds the event loop must not wait for). PASSIVE: it never waits for a reader or the
        writer, and what it cannot copy yet, the next one does."""
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL_S)
            if self._written:
                self._written = False
                await asyncio.to_thread(self._checkpoint)

    def _checkpoint(self) -> None:
        connection = self._checkpoints.raw_connection()  # no BEGIN: a checkpoint runs outside one
        try:
            connection.cursor().execute("PRAGMA wal_checkpoint(PASSIVE)").close()
        finally:
            connection.close()

    async def migrate(self) -> None:
        """Bring the schema to the newest alembic revision (idempotent; safe at every start)."""
        await self.write(_upgrade)

    async def close(self) -> None:
        if self.is_sqlite:
            checkpointer, self._checkpointer = self._checkpointer, None
            if checkpointer is not None and checkpointer.get_loop() is asyncio.get_running_loop():
                checkpointer.cancel()
                await asyncio.gather(checkpointer, return_exceptions=True)
            await asyncio.to_thread(self._checkpoint)
            self._writer.dispose()
            self._reader.dispose()
            self._checkpoints.dispose()
        else:
            await self._engine_async().dispose()


def _bind(fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[Connection], T]:
    def bound(conn: Connection) -> T:
        return fn(conn, *args, **kwargs)

    return bound


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _upgrade(connection: Connection) -> None:
    command.upgrade(alembic_config(connection), "head")
