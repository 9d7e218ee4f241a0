"""Elastic capacity on the ``sim`` cloud: partitions made for jobs, reused while warm, always deleted.

Every test ends by proving that the sim holds nothing any more: no partition, no VM process.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from skyport.gates.sim import sim_inventory
from skyport.models import JobSpec, JobState
from tests.support.core import CoreProcess, wait_for

REMOTE = "cloud"


def _core(tmp_path: Path, sim: dict[str, Any], **remote: Any) -> CoreProcess:
    settings = {
        "kind": "sim",
        "name": REMOTE,
        "idle_timeout_s": 0,
        "heartbeat_timeout_s": 10,
        "backoff_s": 0.2,
        "sim": {"boot_latency_s": 0.2, "agent_heartbeat_s": 0.5, **sim},
        **remote,
    }
    env = {"SKYPORT_REMOTES": json.dumps([settings]), "SKYPORT_LOCAL__ENABLED": "false"}
    core = CoreProcess(tmp_path / "home", env=env)
    core.start()
    return core


@pytest.fixture
def make_core(tmp_path: Path) -> Iterator[Callable[..., CoreProcess]]:
    made: list[CoreProcess] = []

    def make(sim: dict[str, Any] | None = None, **remote: Any) -> CoreProcess:
        made.append(_core(tmp_path, sim or {}, **remote))
        return made[-1]

    yield make
    for core in made:
        core.cleanup()


def _inventory_empty(core: CoreProcess) -> bool:
    return sim_inventory(core.home / "sim" / REMOTE, netns=False).empty


def _ended(core: CoreProcess, job_id: str, timeout: float = 60) -> JobState:
    def ended() -> JobState | None:
        state = core.client().job(job_id).state
        return state if state.terminal else None

    return JobState(wait_for(ended, timeout, f"job {job_id} to end:\n{core.log()[-3000:]}"))


def test_a_cloud_job_gets_a_partition_runs_there_and_the_partition_goes_away(
    make_core: Callable[..., CoreProcess],
) -> None:
    core = make_core()
    c = core.client()
    flavors = {f.name: f for f in c.flavors()}
    assert {"small", "medium", "large", "gpu"} <= flavors.keys(), "the sim's catalog is the core's"
    job = c.submit(script="#!/bin/sh\n#SWM flavor small\necho on $SKYPORT_NODES\n")
    assert _ended(core, job.id) is JobState.COMPLETED
    done = c.job(job.id)
    assert done.remote == REMOTE and done.node_names and done.node_names[0].startswith("sp-")
    assert c.log(job.id).decode().strip() == f"on {done.node_names[0]}"
    reasons = [e.reason for e in c.events(job.id)]
    assert reasons[:2] == ["submitted", "provisioning"] and "placed" in reasons, reasons
    assert done.cost > 0, "the job pays for its node-time (price x node-hours, boot included)"
    costs = c.costs()
    assert any(j.id == job.id and j.cost == pytest.approx(done.cost) for j in costs.jobs)
    assert sum(a.spend for a in costs.accounts) >= done.cost
    wait_for(lambda: _inventory_empty(core), 30, "the idle partition to be deleted")
    wait_for(lambda: not c.nodes(), 10, "its node to be forgotten")


def test_a_warm_partition_is_reused_by_the_next_job_of_the_same_account_and_flavor(
    make_core: Callable[..., CoreProcess],
) -> None:
    # Warm for 10 s: long enough for the second job, short enough to see the partition go afterwards
    # (a partition left warm when the test ends would leave its VM's agent running).
    core = make_core(idle_timeout_s=10)
    c = core.client()
    first = c.submit(script="#!/bin/sh\n#SWM flavor small\ntrue\n")
    assert _ended(core, first.id) is JobState.COMPLETED
    second = c.submit(script="#!/bin/sh\n#SWM flavor small\ntrue\n")
    assert _ended(core, second.id) is JobState.COMPLETED
    assert c.job(second.id).node_names == c.job(first.id).node_names, "the same VM served both"
    assert "provisioning" not in [e.reason for e in c.events(second.id)]
    assert len(sim_inventory(core.home / "sim" / REMOTE, netns=False).partitions) == 1
    wait_for(lambda: _inventory_empty(core), 40, "the idle partition to be deleted after its idle timeout")


def test_a_failed_create_fails_the_job_with_the_providers_words_and_leaves_nothing(
    make_core: Callable[..., CoreProcess],
) -> None:
    core = make_core({"max_instances": 0})
    c = core.client()
    job = c.submit(script="#!/bin/sh\n#SWM flavor small\ntrue\n")
    assert _ended(core, job.id) is JobState.FAILED
    done = c.job(job.id)
    assert done.reason == "provision_failed" and "QuotaExceeded" in done.state_details, done.state_details
    wait_for(lambda: _inventory_empty(core), 30, "nothing to be left at the provider")


def test_cancel_while_the_partition_boots_deletes_it(make_core: Callable[..., CoreProcess]) -> None:
    core = make_core({"boot_latency_s": 30})
    c = core.client()
    job = c.submit(script="#!/bin/sh\n#SWM flavor small\ntrue\n")
    wait_for(lambda: not _inventory_empty(core), 30, "the partition to be asked for")
    c.cancel(job.id)
    assert _ended(core, job.id) is JobState.CANCELED
    wait_for(lambda: _inventory_empty(core), 30, "the half-made partition to be deleted")


def test_a_core_killed_while_a_partition_boots_resumes_it(make_core: Callable[..., CoreProcess]) -> None:
    core = make_core({"boot_latency_s": 2})
    c = core.client()
    job = c.submit(script="#!/bin/sh\n#SWM flavor small\necho survived\n")
    wait_for(lambda: not _inventory_empty(core), 30, "the partition to be asked for")
    core.kill()
    core.start(same_port=True)
    c = core.client()
    assert _ended(core, job.id) is JobState.COMPLETED
    assert c.log(job.id) == b"survived\n"
    wait_for(lambda: _inventory_empty(core), 30, "the partition to be deleted after the restart")


def test_vms_may_share_an_agent_process_yet_stay_separate_nodes(
    make_core: Callable[..., CoreProcess],
) -> None:
    core = make_core({"agents_per_process": 8})
    c = core.client()
    jobs = [c.submit(script="#!/bin/sh\n#SWM flavor small\necho $SKYPORT_NODES\n").id for _ in range(3)]
    for job_id in jobs:
        assert _ended(core, job_id) is JobState.COMPLETED
    nodes = {c.job(j).node_names[0] for j in jobs}
    assert len(nodes) == 3, "three VMs, three enrolled nodes, one process"
    assert {c.log(j).decode().strip() for j in jobs} == nodes
    assert len(list((core.home / "sim" / REMOTE / "pools").iterdir())) == 1, "their agents shared a process"
    wait_for(lambda: _inventory_empty(core), 30, "the VMs and their shared agent process to be gone")


def test_a_preempted_spot_partition_requeues_its_job_which_runs_again(
    make_core: Callable[..., CoreProcess],
) -> None:
    core = make_core({"preempt_after_s": 1.0}, check_interval_s=0.5)
    c = core.client()
    script = (
        "#!/bin/sh\n"
        'if [ "$SKYPORT_ATTEMPT" = 1 ]; then echo first; sleep 120; fi\n'  # the spot VM goes meanwhile
        "echo again\n"
    )
    job = c.submit(JobSpec(script=script, flavor="small", preemptible=True))
    assert _ended(core, job.id, timeout=90) is JobState.COMPLETED
    done = c.job(job.id)
    assert done.attempt == 2 and c.log(job.id) == b"again\n"
    reasons = [e.reason for e in c.events(job.id)]
    assert "preempted" in reasons and "node_lost" not in reasons, reasons
    wait_for(lambda: _inventory_empty(core), 30, "the partitions to be gone")
