"""Chaos: cloud jobs on a flaky ``sim`` while the core is killed (-9) and restarted at random moments.

What must hold whatever happens: every job ends in a final state exactly once, with a reason, and the
provider holds nothing afterwards (every VM deleted).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from skyport.gates.sim import sim_inventory
from skyport.models import TERMINAL_STATES
from tests.support.core import CoreProcess, wait_for

REMOTE = "flaky"
JOBS = 50
RESTARTS = 5
SEED = int(os.environ.get("SKYPORT_CHAOS_SEED", "20261123"))


@pytest.fixture
def flaky_core(tmp_path: Path) -> Iterator[CoreProcess]:
    remote = {
        "kind": "sim",
        "name": REMOTE,
        "idle_timeout_s": 0,
        "heartbeat_timeout_s": 20,
        "backoff_s": 0.2,
        "attempts": 3,
        "sim": {
            "boot_latency_s": 1.0,
            "boot_jitter_s": 2.0,
            "agent_heartbeat_s": 1.0,
            "create_failure_rate": 0.1,
            "boot_failure_rate": 0.1,
            "delete_failure_rate": 0.1,
            "capacity_failure_rate": 0.1,
            "seed": SEED,
        },
    }
    env = {"SKYPORT_REMOTES": json.dumps([remote]), "SKYPORT_LOCAL__ENABLED": "false"}
    core = CoreProcess(tmp_path / "home", env=env)
    core.start()
    try:
        yield core
    finally:
        core.cleanup()


@pytest.mark.slow
def test_every_job_ends_exactly_once_and_nothing_leaks_through_kills_and_provider_failures(
    flaky_core: CoreProcess,
) -> None:
    chaos = random.Random(SEED)
    c = flaky_core.client()
    jobs = [
        c.submit(script=f"#!/bin/sh\n#SWM flavor small\n#SWM name chaos-{i}\nsleep 1\n").id
        for i in range(JOBS)
    ]
    for _ in range(RESTARTS):
        # The chaos itself: kill at a random moment (not a wait for anything), then come back.
        time.sleep(chaos.uniform(1.0, 6.0))
        flaky_core.kill()
        flaky_core.start(same_port=True)
    c = flaky_core.client()

    def all_ended() -> bool:
        return all(c.job(j).state in TERMINAL_STATES for j in jobs)

    wait_for(all_ended, 300, f"all {JOBS} jobs to end (seed {SEED})", interval=1.0)
    outcomes: dict[str, int] = {}
    for job_id in jobs:
        job = c.job(job_id)
        ends = [e for e in c.events(job_id) if e.to_state in TERMINAL_STATES]
        assert len(ends) == 1, f"job {job_id} ended {len(ends)} times: {[e.reason for e in ends]}"
        assert job.reason and job.state_details, f"job {job_id} ended without a reason"
        outcomes[f"{job.state.value}:{job.reason}"] = outcomes.get(f"{job.state.value}:{job.reason}", 0) + 1
    assert outcomes.get("completed:exit_code", 0) > JOBS // 2, outcomes  # most get through the failures
    state_dir = flaky_core.home / "sim" / REMOTE
    wait_for(
        lambda: sim_inventory(state_dir, netns=False).empty,
        120,
        f"the sim to hold nothing (outcomes {outcomes}, seed {SEED})",
        interval=0.5,
    )
