"""Where the core keeps each job's files: uploaded inputs, returned outputs, per-attempt gate files."""

from __future__ import annotations

import shutil
from pathlib import Path


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / _shard(job_id) / job_id

    def inputs(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "inputs"

    def outputs(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "outputs"

    def attempt(self, job_id: str, attempt: int) -> Path:
        return self.job_dir(job_id) / f"attempt-{attempt}"

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)


def _shard(job_id: str) -> str:
    """The subdirectory of ``jobs/`` a job's directory is in: two hex digits of the id's random part.

    Job ids are version 7 UUIDs (:mod:`skyport.server.ids`), which begin with their creation time: their
    first digits are the same for years, so they are sharded by their last two. Ids of jobs made before
    (random version 4 UUIDs) keep the shard they were made with, their first two.
    """
    return job_id[-2:] if job_id[14:15] == "7" else job_id[:2]
