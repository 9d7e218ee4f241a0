"""Array jobs (one submission, N tasks, a throttle), dependencies, and why queued jobs wait."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from skyport.client import ApiError
from skyport.models import JobSpec, JobState
from tests.support.core import CoreProcess, wait_for

TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoreProcess]:
    """A core whose node has 4 CPUs, so that throttles (not capacity) limit the arrays below."""
    process = CoreProcess(tmp_path_factory.mktemp("arrays") / "home", env={"SKYPORT_LOCAL__CPUS": "4"})
    process.start()
    try:
        yield process
    finally:
        process.cleanup()


def _overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    most = open_now = 0
    for _, delta in edges:
        open_now += delta
        most = max(most, open_now)
    return most


def test_an_array_runs_each_task_once_with_its_index_and_at_most_its_throttle_at_once(
    core: CoreProcess,
) -> None:
    script = (
        "#!/bin/sh\n#SWM name squares\n#SWM array 1-6%2\n"
        "sleep 0.3\necho $((SKYPORT_ARRAY_INDEX * SKYPORT_ARRAY_INDEX))\n"
    )
    with core.client() as c:
        first = c.submit(script=script)
        assert first.array_id
        wait_for(lambda: c.array(first.array_id).done, TIMEOUT_S, "the array's tasks to end")
        array = c.array(first.array_id)
        tasks = c.jobs(array=first.array_id, limit=100).items
        outputs = {t.array_index: c.log(t.id).decode().strip() for t in tasks}
        plain = c.jobs(tasks=False, limit=100).items
    assert array.size == 6 and array.throttle == 2
    assert array.states == {JobState.COMPLETED: 6}
    assert outputs == {i: str(i * i) for i in range(1, 7)}
    intervals = [
        (t.start_time.timestamp(), t.end_time.timestamp()) for t in tasks if t.start_time and t.end_time
    ]
    assert len(intervals) == 6
    assert _overlap(intervals) <= 2
    assert all(j.array_id != first.array_id for j in plain)  # listed as one array, not six jobs


def test_canceling_an_array_cancels_every_task(core: CoreProcess) -> None:
    with core.client() as c:
        first = c.submit(JobSpec(name="long", command=["sleep", "300"], array="1-10%1"))
        wait_for(lambda: c.array(first.array_id).states.get(JobState.RUNNING), TIMEOUT_S, "one task to run")
        c.cancel_array(first.array_id)
        wait_for(lambda: c.array(first.array_id).done, TIMEOUT_S, "every task to end")
        array = c.array(first.array_id)
    assert array.states == {JobState.CANCELED: 10}


def test_a_job_starts_only_after_the_job_it_depends_on_completed(core: CoreProcess) -> None:
    with core.client() as c:
        first = c.submit(JobSpec(name="first", command=["sleep", "1"]))
        second = c.submit(JobSpec(name="second", command=["true"], depends=[first.id]))
        waiting = c.job(second.id)
        done_first, done_second = c.wait(first.id, TIMEOUT_S), c.wait(second.id, TIMEOUT_S)
    if waiting.state is JobState.QUEUED:
        assert waiting.reason in {"Dependency", "submitted"}
    assert done_first.state is JobState.COMPLETED and done_second.state is JobState.COMPLETED
    assert done_first.end_time is not None and done_second.start_time is not None
    assert done_second.start_time >= done_first.end_time


def test_a_job_whose_dependency_failed_fails_with_that_reason(core: CoreProcess) -> None:
    with core.client() as c:
        failing = c.submit(JobSpec(name="fails", command=["sh", "-c", "exit 1"]))
        dependent = c.submit(JobSpec(name="never", command=["true"], depends=[failing.id]))
        assert c.wait(failing.id, TIMEOUT_S).state is JobState.FAILED
        final = c.wait(dependent.id, TIMEOUT_S)
    assert final.state is JobState.FAILED
    assert final.reason == "dependency"
    assert failing.id in final.state_details
    assert final.start_time is None


def test_a_dependency_on_an_unknown_job_is_refused(core: CoreProcess) -> None:
    with core.client() as c, pytest.raises(ApiError) as refused:
        c.submit(JobSpec(command=["true"], depends=["00000000-0000-4000-8000-000000000000"]))
    assert refused.value.status == 400
    assert "unknown job" in str(refused.value)


def test_a_queued_job_says_why_it_waits_and_when_it_should_start(core: CoreProcess, tmp_path: Path) -> None:
    """Fill the node with a job of known walltime: the next whole-node job waits for resources and
    expects to start when that walltime ends."""
    with core.client() as c:
        blocker = c.submit(JobSpec(name="blocker", command=["sleep", "300"], cpus=4, walltime=120))
        wait_for(lambda: c.job(blocker.id).state is JobState.RUNNING, TIMEOUT_S, "the blocker to run")
        waiting = c.submit(JobSpec(name="next", command=["true"], cpus=4, walltime=60))
        queued = wait_for(
            lambda: (j := c.job(waiting.id)).reason in {"Resources", "Reservation"} and j,
            TIMEOUT_S,
            "a reason",
        )
        started = c.job(blocker.id).start_time
        c.cancel(blocker.id)
        c.cancel(waiting.id)
    assert queued.state is JobState.QUEUED
    assert queued.estimated_start is not None and started is not None
    expected = (queued.estimated_start - started).total_seconds()
    assert 110 <= expected <= 130  # the blocker's start + its 120 s walltime


def test_a_job_after_any_end_runs_even_when_the_job_it_waits_for_failed(core: CoreProcess) -> None:
    with core.client() as c:
        failing = c.submit(JobSpec(name="fails-first", command=["sh", "-c", "sleep 0.5; exit 2"]))
        cleanup = c.submit(
            script=f"#!/bin/sh\n#SWM name cleanup\n#SWM depends-any {failing.id}\necho cleaning\n"
        )
        first, after = c.wait(failing.id, TIMEOUT_S), c.wait(cleanup.id, TIMEOUT_S)
        output = c.log(cleanup.id).decode()
    assert first.state is JobState.FAILED
    assert after.state is JobState.COMPLETED and output == "cleaning\n"
    assert first.end_time is not None and after.start_time is not None
    assert after.start_time >= first.end_time


def test_an_exclusive_job_has_its_node_to_itself(core: CoreProcess) -> None:
    """On a 4-CPU node, a 1-CPU exclusive job keeps a 1-CPU job waiting until it ends, and itself waits
    for the node to be empty. (``small`` declares a short walltime: the exclusive job's reservation then
    starts before ``after`` could end, so backfill may not start ``after`` early.)"""
    with core.client() as c:
        small = c.submit(JobSpec(name="small", command=["sleep", "1"], walltime=60))
        whole = c.submit(script="#!/bin/sh\n#SWM name whole\n#SWM exclusive\nsleep 1\n")
        after = c.submit(JobSpec(name="after", command=["true"]))
        jobs = {j.name: c.wait(j.id, TIMEOUT_S) for j in (small, whole, after)}
    assert all(j.state is JobState.COMPLETED for j in jobs.values())
    assert jobs["whole"].spec.exclusive
    assert jobs["whole"].start_time is not None and jobs["small"].end_time is not None
    assert jobs["whole"].start_time >= jobs["small"].end_time
    assert jobs["after"].start_time is not None and jobs["whole"].end_time is not None
    assert jobs["after"].start_time >= jobs["whole"].end_time
