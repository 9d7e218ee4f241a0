"""Agents on separate hosts (network namespaces of the test's own making) reaching the core over a bridge."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from skyport.models import JobState
from tests.support.agent import AgentProcess
from tests.support.core import CoreProcess, wait_for
from tests.support.hosts import Host, HostNetwork

REMOTE = "lab"
HEARTBEAT_TIMEOUT_S = 6


@pytest.fixture
def network() -> Iterator[HostNetwork]:
    with HostNetwork() as net:
        yield net


@pytest.fixture
def bridged_core(network: HostNetwork, tmp_path: Path) -> Iterator[CoreProcess]:
    remotes = [{"kind": "agent", "name": REMOTE, "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S}]
    env = {"SKYPORT_REMOTES": json.dumps(remotes), "SKYPORT_LOCAL__ENABLED": "false"}
    core = CoreProcess(tmp_path / "home", env=env, host=network.gateway)
    core.start()
    try:
        yield core
    finally:
        core.cleanup()


def _start_agent(core: CoreProcess, host: Host, tmp_path: Path) -> AgentProcess:
    agent = AgentProcess(core, REMOTE, host.name, tmp_path / f"agent-{host.name}", netns=host.netns)
    agent.start()
    wait_for(
        lambda: any(n.name == host.name and n.state_power == "up" for n in core.client().nodes()),
        30,
        f"{host.name} to enrol and come up:\n{agent.log()}",
    )
    return agent


def _ended(core: CoreProcess, job_id: str) -> JobState:
    def ended() -> JobState | None:
        state = core.client().job(job_id).state
        return state if state.terminal else None

    return JobState(wait_for(ended, 60, f"job {job_id} to end"))


def test_jobs_run_on_agents_in_their_own_hosts(
    network: HostNetwork, bridged_core: CoreProcess, tmp_path: Path
) -> None:
    hosts = [network.add_host("alpha"), network.add_host("beta")]
    agents = [_start_agent(bridged_core, h, tmp_path) for h in hosts]
    try:
        c = bridged_core.client()
        nodes = {n.name: n for n in c.nodes()}
        assert {nodes[h.name].ip for h in hosts} == {h.address for h in hosts}, (
            "each node connected from its host"
        )
        # Each task needs a whole 2-CPU node, and both are queued by one submission (an array), so one
        # scheduler pass places them together: on different hosts.
        script = "#!/bin/sh\n#SWM cpus 2\n#SWM array 1-2\nip -4 -o addr show | grep -v ' lo '\n"
        array = c.submit(script=script)
        jobs = [j.id for j in c.jobs(array=array.array_id).items]
        assert len(jobs) == len(hosts)
        for job_id in jobs:
            assert _ended(bridged_core, job_id) is JobState.COMPLETED
        seen = {}
        for job_id in jobs:
            node = c.job(job_id).node_names[0]
            seen[node] = c.log(job_id).decode()
        for host in hosts:
            assert host.address in seen[host.name], f"the job on {host.name} ran in that host's network"
    finally:
        for agent in agents:
            agent.cleanup()


def test_an_agent_cut_off_from_the_network_reconnects_and_its_job_is_not_lost(
    network: HostNetwork, bridged_core: CoreProcess, tmp_path: Path
) -> None:
    host = network.add_host("gamma")
    agent = _start_agent(bridged_core, host, tmp_path)
    try:
        c = bridged_core.client()
        job = c.submit(script="#!/bin/sh\necho before\nwhile [ ! -f go ]; do sleep 0.1; done\necho after\n")
        wait_for(lambda: c.log(job.id) == b"before\n", 30, "the job to start")
        inner = next(
            line.split(":")[1].strip().split("@")[0]
            for line in host.run(
                ["ip", "-o", "link", "show"], capture_output=True, text=True
            ).stdout.splitlines()
            if "lo:" not in line
        )
        assert (
            host.run(["ip", "link", "set", inner, "down"]).returncode == 0
        )  # the host drops off the network
        workdir = next(agent.workroot.glob(f"{job.id}.*"))
        (workdir / "go").touch()  # the job ends while its node cannot reach the core
        wait_for(lambda: (workdir / "stdout.log").read_bytes() == b"before\nafter\n", 10, "the job to finish")
        wait_for(
            lambda: "retrying" in agent.log(), HEARTBEAT_TIMEOUT_S - 1, "the agent to notice it is cut off"
        )
        assert c.job(job.id).state is JobState.RUNNING, "the core does not know yet"
        assert (
            host.run(["ip", "link", "set", inner, "up"]).returncode == 0
        )  # back within the heartbeat timeout
        assert _ended(bridged_core, job.id) is JobState.COMPLETED
        assert c.log(job.id) == b"before\nafter\n"
        assert agent.log().count("connected to the core") >= 2, "it really reconnected"
    finally:
        agent.cleanup()
