"""``kill -9`` of the core while jobs run and while submissions arrive: nothing accepted is lost.

After a restart every accepted job reaches a final state exactly once (one terminal event), with its
real exit status even when it ended while the core was down, and no job process is left running.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from skyport.client import ClientError
from skyport.models import JobSpec, JobState
from tests.support.core import CoreProcess, wait_for

pytestmark = pytest.mark.slow


def _job_processes(job_ids: set[str]) -> list[int]:
    """Live (non-zombie) processes whose environment names one of the jobs."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            continue
        for var in environ.split(b"\0"):
            if var.startswith(b"SKYPORT_JOB_ID=") and var.split(b"=", 1)[1].decode() in job_ids:
                found.append(int(pid))
    return found


def _terminal_events(core: CoreProcess, job_id: str) -> list[str]:
    with core.client() as c:
        return [e.to_state.value for e in c.events(job_id) if e.to_state.terminal]


@pytest.fixture
def crashable(tmp_path: Path) -> CoreProcess:
    core = CoreProcess(tmp_path / "home", env={"SKYPORT_LOCAL__CPUS": "16"})
    core.start()
    yield core
    core.cleanup()


def test_jobs_running_during_a_crash_end_exactly_once_with_their_real_status(crashable: CoreProcess) -> None:
    core = crashable
    marker = core.workroot / "release"
    # Each job waits for a file the test creates while the core is down, so they end during the outage.
    wait_then = f"while [ ! -e {marker} ]; do sleep 0.05; done; "
    specs = {
        "ok": JobSpec(name="ok", command=["sh", "-c", wait_then + "echo fine"]),
        "three": JobSpec(name="three", command=["sh", "-c", wait_then + "exit 3"]),
        "still-running": JobSpec(name="still", command=["sh", "-c", wait_then + "sleep 1; echo late"]),
    }
    with core.client() as c:
        ids = {key: c.submit(spec).id for key, spec in specs.items()}
        queued_later = c.submit(JobSpec(name="after", command=["echo", "queued before the crash"])).id
        wait_for(lambda: all(c.job(i).state is JobState.RUNNING for i in ids.values()), 20, "the jobs to run")

    core.kill()
    marker.touch()
    marker.chmod(0o644)
    # "ok" and "three" end while the core is down; "still-running" is alive when the core comes back.
    core.start()

    all_ids = {*ids.values(), queued_later}
    with core.client() as c:
        final = {i: c.wait(i, 30) for i in all_ids}
        assert all(j.state.terminal for j in final.values()), {i: j.state for i, j in final.items()}
        assert final[ids["ok"]].state is JobState.COMPLETED
        assert final[ids["three"]].state is JobState.FAILED
        assert final[ids["three"]].exit_code == 3
        assert final[ids["still-running"]].state is JobState.COMPLETED
        assert c.log(ids["still-running"]).decode() == "late\n"
        assert final[queued_later].state is JobState.COMPLETED
    for job_id in all_ids:
        assert len(_terminal_events(core, job_id)) == 1, job_id
    assert _job_processes(all_ids) == []


def test_submissions_acknowledged_before_a_crash_are_kept(crashable: CoreProcess) -> None:
    core = crashable
    acknowledged: list[str] = []
    stop = threading.Event()

    def submit_forever() -> None:
        with core.client() as c:
            while not stop.is_set():
                try:
                    acknowledged.append(c.submit(JobSpec(command=["true"])).id)
                except ClientError:
                    return  # the core died under us: what was acknowledged is what counts

    worker = threading.Thread(target=submit_forever)
    worker.start()
    wait_for(lambda: len(acknowledged) >= 30, 30, "some submissions to be acknowledged")
    core.kill()
    stop.set()
    worker.join(timeout=30)
    core.start()
    with core.client() as c:
        for job_id in acknowledged:
            job = c.wait(job_id, 30)
            assert job.state is JobState.COMPLETED, (job_id, job.state, job.state_details)
    for job_id in acknowledged[:10]:
        assert len(_terminal_events(core, job_id)) == 1


def test_a_job_running_through_a_crash_is_readopted_and_its_cancel_stops_it_all(
    crashable: CoreProcess,
) -> None:
    """A long job survives a crash, is re-adopted, and a cancel after the restart stops its whole group."""
    core = crashable
    with core.client() as c:
        job = c.submit(JobSpec(command=["sh", "-c", "sleep 300 & sleep 300; wait"]))
        wait_for(lambda: c.job(job.id).state is JobState.RUNNING, 20, "the job to run")
    core.kill()
    core.start()
    with core.client() as c:
        assert c.job(job.id).state is JobState.RUNNING  # re-adopted, not failed
        c.cancel(job.id)
        final = c.wait(job.id, 30)
    assert final.state is JobState.CANCELED
    assert _job_processes({job.id}) == []
    assert len(_terminal_events(core, job.id)) == 1
