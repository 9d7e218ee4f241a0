"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.core import CoreProcess


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
