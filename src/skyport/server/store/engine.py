"""The store: engines, transactions, and schema migrations.

A transaction is a plain function ``fn(conn, *args) -> T`` over a synchronous SQLAlchemy
:class:`~sqlalchemy.Connection`, run whole by :meth:`Store.read` or :meth:`Store.write`:

- SQLite: in a thread, so the event loop never blocks on the file, and in ONE hop per transaction (a
  driver that hops to a thread per statement makes every statement wait for the busy event loop). All
  writes go through one dedicated thread and start with ``BEGIN IMMEDIATE``: SQLite has one writer and no
  ``SKIP LOCKED``, and two deferred transactions that read then write can both see the same queued jobs
  (see FIELD-NOTES). Reads use a small pool of their own threads (WAL lets them run beside the writer).
- PostgreSQL: the same function, on asyncpg through SQLAlchemy's ``run_sync``; row locks do the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool

MIGRATIONS = Path(__file__).parent / "migrations"
READ_THREADS = 4

P = ParamSpec("P")
T = TypeVar("T")
Txn = Callable[Concatenate[Connection, P], T]


def _sqlite_engine(url: str, *, begin: str, pool_size: int) -> Engine:
    engine = create_engine(
        url.replace("+aiosqlite", ""),
        poolclass=QueuePool,
        pool_size=pool_size,
        max_overflow=0,
        # Every use ends in COMMIT or ROLLBACK (see _run), so the pool's extra rollback on return is waste.
        pool_reset_on_return=None,
        connect_args={"timeout": 30, "check_same_thread": False},
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
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(begin)

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
        if self.is_sqlite:
            self._writer = _sqlite_engine(url, begin="BEGIN IMMEDIATE", pool_size=1)
            self._reader = _sqlite_engine(url, begin="BEGIN", pool_size=READ_THREADS)
            self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="store-write")
            self._read_threads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="store-read")
        else:
            self._async = create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)

    @property
    def dialect(self) -> str:
        return "sqlite" if self.is_sqlite else self._engine_async().dialect.name

    def _engine_async(self) -> AsyncEngine:
        assert self._async is not None
        return self._async

    async def read(self, fn: Txn[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(conn, ...)`` in a read transaction (a consistent snapshot)."""
        if self.is_sqlite:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._read_threads, _run, self._reader, fn, args, kwargs)
        async with self._engine_async().connect() as conn, conn.begin():
            return await conn.run_sync(_bind(fn, args, kwargs))

    async def write(self, fn: Txn[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(conn, ...)`` in a write transaction: committed if it returns, rolled back if it raises."""
        if self.is_sqlite:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._write_thread, _run, self._writer, fn, args, kwargs)
        async with self._engine_async().begin() as conn:
            return await conn.run_sync(_bind(fn, args, kwargs))

    async def migrate(self) -> None:
        """Bring the schema to the newest alembic revision (idempotent; safe at every start)."""
        await self.write(_upgrade)

    async def close(self) -> None:
        if self.is_sqlite:
            self._write_thread.shutdown(wait=True)
            self._read_threads.shutdown(wait=True)
            self._writer.dispose()
            self._reader.dispose()
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
