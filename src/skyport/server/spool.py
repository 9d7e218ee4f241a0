"""Where the core keeps each job's files: uploaded inputs, returned outputs, per-attempt gate files."""

from __future__ import annotations

import shutil
from pathlib import Path


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id[:2] / job_id

    def inputs(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "inputs"

    def outputs(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "outputs"

    def attempt(self, job_id: str, attempt: int) -> Path:
        return self.job_dir(job_id) / f"attempt-{attempt}"

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
