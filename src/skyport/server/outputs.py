"""Reading what jobs wrote: stdout/stderr (by offset, tail, or followed live) and returned files."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

from skyport.gates.base import ExecutorGate
from skyport.models import Job
from skyport.server.lifecycle.wakeup import JobNotifier
from skyport.server.spool import Spool
from skyport.server.store import jobs as job_store
from skyport.server.store.engine import Store

READ_CHUNK = 256 * 1024
#: How long a follower waits for more output before looking again; a job's end wakes it at once.
FOLLOW_POLL_S = 0.5


def _read(path: Path, offset: int, limit: int | None) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read() if limit is None else f.read(limit)
    except FileNotFoundError:
        return b""


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


class JobOutputs:
    def __init__(
        self, store: Store, spool: Spool, gates: dict[str, ExecutorGate], notifier: JobNotifier
    ) -> None:
        self._store = store
        self._spool = spool
        self._gates = gates
        self._notifier = notifier

    async def log_path(self, job_id: str, stream: str) -> Path | None:
        row = await self._store.read(job_store.get_job_row, job_id)
        if row is None or not row.handle:
            return None
        gate = self._gates.get(row.remote_id)
        return gate.log_path(row.handle, stream) if gate else None

    async def read(self, job: Job, stream: str, *, offset: int = 0, tail: int | None = None) -> bytes | None:
        """Bytes of the log from ``offset`` (or its last ``tail`` bytes); None if it does not exist."""
        path = await self.log_path(job.id, stream)
        if path is None or not path.exists():
            return None
        if tail is not None:
            offset = max(0, await asyncio.to_thread(_size, path) - tail)
        return await asyncio.to_thread(_read, path, offset, None)

    async def follow(self, job: Job, stream: str, *, offset: int = 0) -> AsyncIterator[bytes]:
        """Yield the log as it grows, until the job has ended and everything is sent."""
        while True:
            path = await self.log_path(job.id, stream)
            if path is not None:
                while chunk := await asyncio.to_thread(_read, path, offset, READ_CHUNK):
                    offset += len(chunk)
                    yield chunk
            current = await self._store.read(job_store.get_job, job.id)
            if current is None or current.state.terminal:
                if path is not None and (rest := await asyncio.to_thread(_read, path, offset, None)):
                    yield rest
                return
            await self._notifier.wait(job.id, FOLLOW_POLL_S)

    async def output_files(self, job_id: str) -> list[tuple[str, int, str]]:
        return await self._store.read(job_store.list_files, job_id, "output")

    def output_path(self, job_id: str, name: str) -> Path:
        return self._spool.outputs(job_id) / name
