"""The spool's job directories are spread over subdirectories whatever the kind of job id."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from skyport.server.ids import IdSource
from skyport.server.spool import Spool


def test_time_ordered_ids_spread_over_many_subdirectories(tmp_path: Path) -> None:
    spool, ids = Spool(tmp_path), IdSource()
    start = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)
    made = [ids.new(start + timedelta(seconds=i)) for i in range(500)]  # ids of ~8 minutes
    shards = {spool.job_dir(job_id).parent for job_id in made}
    assert len(shards) > 100, "version 7 ids share their first digits: they must not decide the shard"
    assert all(spool.job_dir(job_id).name == job_id for job_id in made)


def test_a_job_made_with_a_random_id_keeps_its_directory(tmp_path: Path) -> None:
    """Jobs submitted before ids were time-ordered have their files under their first two digits."""
    job_id = "3f2b8c1e-9a4d-4e6f-8b2a-1c3d5e7f9a0b"
    assert Spool(tmp_path).job_dir(job_id) == tmp_path / "jobs" / "3f" / job_id
