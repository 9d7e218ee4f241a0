"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from skyport.server.store.engine import Store
from tests.support.core import CoreProcess
from tests.support.postgres import PostgresServer


@pytest.fixture
def core(tmp_path: Path) -> Iterator[CoreProcess]:
    """A running core of its own (real uvicorn, real mTLS, SQLite, local gate), stopped afterwards."""
    process = CoreProcess(tmp_path / "home")
    process.start()
    try:
        yield process
    finally:
        process.cleanup()


@pytest.fixture(scope="module")
def shared_core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoreProcess]:
    """One core for a whole test module, for tests that only read or add their own jobs."""
    process = CoreProcess(tmp_path_factory.mktemp("core") / "home")
    process.start()
    try:
        yield process
    finally:
        process.cleanup()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session (started only if a test asks for it)."""
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database on each backend the store supports."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database()


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """A migrated store on each backend (see ``store_url``), closed afterwards."""
    s = Store(store_url)
    await s.migrate()
    try:
        yield s
    finally:
        await s.close()
