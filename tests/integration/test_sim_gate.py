"""The ``sim`` cloud with real ``skyport agent`` VMs enrolling against a real core (over mutual TLS).

The core has an ``agent``-kind remote; the tests make bootstrap tokens for it as the provisioning loop
would, give them to the sim, and watch the VMs come up as nodes (``skyport nodes``), run a job, survive a
new SimGate on the same state and a ``kill -9`` of the core, and leave nothing behind when deleted.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from skyport.gates.provisioner import (
    TAG_CORE,
    TAG_PARTITION,
    NodeBootstrap,
    PartitionRequest,
    PartitionStatus,
)
from skyport.gates.sim import SimGate, sim_inventory
from skyport.models import JobState
from tests.support.core import VENV_BIN, CoreProcess, until

REMOTE = "simcloud"


@pytest.fixture
def core(tmp_path: Path) -> Iterator[CoreProcess]:
    remotes = [{"kind": "agent", "name": REMOTE, "heartbeat_timeout_s": 30}]
    process = CoreProcess(
        tmp_path / "home", env={"SKYPORT_REMOTES": json.dumps(remotes), "SKYPORT_LOCAL__ENABLED": "false"}
    )
    process.start()
    try:
        yield process
    finally:
        process.cleanup()


def sim_settings(tmp_path: Path, **sim: Any) -> dict[str, Any]:
    values = {"state_dir": str(tmp_path / "sim"), "boot_latency_s": 0.2, "agent_heartbeat_s": 0.5, **sim}
    return {"kind": "sim", "name": "cloud", "sim": values}


@pytest.fixture
async def sim(tmp_path: Path) -> Any:
    gate = SimGate("cloud", sim_settings(tmp_path))
    try:
        yield gate
    finally:
        await gate.close()
        cleaner = SimGate("cloud", sim_settings(tmp_path))
        for status in await cleaner.list_partitions():
            await cleaner.delete_partition(status.partition_id)
        assert sim_inventory(cleaner.state_dir, netns=False).empty


async def make_request(
    core: CoreProcess, partition_id: str, nodes: int, flavor: str = "small"
) -> PartitionRequest:
    """What the provisioning loop sends: one fresh bootstrap token per node, the core's URL and CA."""
    client = core.client()
    ca_pem = (core.home / "ca" / "ca.pem").read_text()
    boots = []
    for index in range(nodes):
        name = f"{partition_id}-{index}"
        token = (await asyncio.to_thread(client.bootstrap_token, REMOTE, name))["token"]
        boots.append(NodeBootstrap(name, core.url, ca_pem, token))
    return PartitionRequest(
        partition_id=partition_id,
        name=f"skyport-{partition_id}",
        flavor=flavor,
        image=None,
        nodes=boots,
        tags={TAG_PARTITION: partition_id, TAG_CORE: "it"},
    )


async def ready(gate: SimGate, partition_id: str) -> PartitionStatus:
    async def check() -> PartitionStatus | None:
        status = await gate.get_partition(partition_id)
        assert status is not None and status.state != "failed", status
        return status if status.state == "ready" else None

    result: PartitionStatus = await until(check, 20, f"partition {partition_id} to be ready")
    return result


def nodes_up(core: CoreProcess, names: list[str]) -> bool:
    up = {n.name for n in core.client().nodes() if n.state_power == "up"}
    return set(names) <= up


def niceness(pid: int) -> tuple[list[int], int | None]:
    """The niceness of each thread of ``pid``, and of its session's autogroup (None: no autogroups)."""
    threads = [os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{pid}/task")]
    autogroup = Path(f"/proc/{pid}/autogroup")
    return threads, int(autogroup.read_text().split()[-1]) if autogroup.exists() else None


def cli_nodes(core: CoreProcess) -> str:
    env = {**os.environ, "SKYPORT_HOME": str(core.home), "SKYPORT_URL": core.url}
    done = subprocess.run(
        [str(VENV_BIN / "skyport"), "nodes", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_sim_vms_enrol_run_a_job_and_leave_nothing_when_deleted(
    core: CoreProcess, sim: SimGate
) -> None:
    request = await make_request(core, "p1", nodes=2, flavor="medium")
    status = await sim.create_partition(request)
    assert status.state == "creating"
    status = await ready(sim, "p1")
    names = [n.name for n in status.nodes]
    assert names == ["p1-0", "p1-1"]
    await until(lambda: nodes_up(core, names), 30, "the VMs to enrol and come up")
    listed = await asyncio.to_thread(cli_nodes, core)
    assert "p1-0" in listed and "p1-1" in listed, "the VMs are nodes in `skyport nodes`"
    node = next(n for n in core.client().nodes() if n.name == "p1-0")
    assert node.cpus == 2, "a VM offers its flavor's CPUs"

    client = core.client()
    done = client.submit(script="#!/bin/sh\necho hello from $SKYPORT_NODES\n")
    running = client.submit(script="#!/bin/sh\nsleep 300\n")

    def state(job_id: str) -> JobState:
        return core.client().job(job_id).state

    await until(lambda: state(done.id).terminal, 60, "the job on a sim VM to end")
    assert state(done.id) is JobState.COMPLETED
    assert core.client().job(done.id).node_names[0] in names
    await until(lambda: state(running.id) is JobState.RUNNING, 60, "the long job to run on a VM")
    procs = sim_inventory(sim.state_dir, netns=False).processes
    assert any("sleep" in p.argv for p in procs), "the job runs inside a VM's process tree"

    await sim.delete_partition("p1")
    assert await sim.get_partition("p1") is None
    left = sim_inventory(sim.state_dir, netns=False)
    assert left.empty, f"nothing leaked: {left}"


async def test_vms_survive_a_new_gate_and_a_killed_core(
    core: CoreProcess, sim: SimGate, tmp_path: Path
) -> None:
    request = await make_request(core, "p2", nodes=1)
    first = await sim.create_partition(request)
    await ready(sim, "p2")
    await until(lambda: nodes_up(core, ["p2-0"]), 30, "the VM to come up")
    await sim.close()

    core.kill()  # kill -9: the VMs' agents run on in their own sessions
    core.start()
    again = SimGate("cloud", sim_settings(tmp_path))
    try:
        listed = await again.list_partitions()
        assert [(s.partition_id, s.state, s.provider_id) for s in listed] == [
            ("p2", "ready", first.provider_id)
        ]
        again_create = await again.create_partition(request)
        assert again_create.provider_id == first.provider_id, "creating again is a no-op"
        await until(lambda: nodes_up(core, ["p2-0"]), 30, "the VM to reconnect to the restarted core")
        await again.delete_partition("p2")
        assert sim_inventory(again.state_dir, netns=False).empty
        assert await again.list_partitions() == []
    finally:
        await again.close()


async def test_a_refused_token_fails_the_partition_with_the_agents_words(
    core: CoreProcess, sim: SimGate
) -> None:
    request = await make_request(core, "p3", nodes=1)
    bad = PartitionRequest(
        partition_id="p3",
        name="skyport-p3",
        flavor="small",
        image=None,
        nodes=[NodeBootstrap("p3-0", core.url, request.nodes[0].ca_pem, "not-a-token")],
    )
    await sim.create_partition(bad)

    async def failed() -> PartitionStatus | None:
        status = await sim.get_partition("p3")
        return status if status is not None and status.state == "failed" else None

    status = await until(failed, 30, "the VM's agent to give up")
    assert "its agent exited" in status.message and "p3-0" in status.message
    await sim.delete_partition("p3")


async def test_vms_agents_run_at_the_niceness_asked_for(core: CoreProcess, tmp_path: Path) -> None:
    """``agent_nice``: every thread of the VMs' agent process (a pool of two here) runs at that niceness,
    and so does its session where the kernel shares the CPU between sessions first (autogroups), so that
    the simulated VMs yield the CPU to the core on the same machine."""
    gate = SimGate("cloud", sim_settings(tmp_path, agent_nice=7, agents_per_process=2))
    try:
        await gate.create_partition(await make_request(core, "p5", nodes=2))
        await ready(gate, "p5")
        await until(lambda: nodes_up(core, ["p5-0", "p5-1"]), 30, "the VMs to come up")
        pools = [p for p in sim_inventory(gate.state_dir, netns=False).processes if "agent-pool" in p.argv]
        assert len(pools) == 1, pools
        threads, session = niceness(pools[0].pid)
        assert len(threads) > 1, "the pool has threads besides its main one"
        assert set(threads) == {7}, threads
        assert session in {None, 7}, f"the session's niceness (autogroup): {session}"
        await gate.delete_partition("p5")
        left = gate.state_dir
        await until(lambda: sim_inventory(left, netns=False).empty, 30, "the pool to exit once idle")
    finally:
        await gate.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
async def test_vms_in_their_own_network_namespaces(tmp_path: Path) -> None:
    """Each VM in a namespace of its own, reaching the core over the sim's bridge; all removed at delete."""
    from skyport.gates.sim import free_subnet

    settings = sim_settings(tmp_path, netns=True, netns_subnet=str(free_subnet()))
    gate = SimGate("cloud", settings)
    remotes = [{"kind": "agent", "name": REMOTE, "heartbeat_timeout_s": 30}]
    core: CoreProcess | None = None
    try:
        gateway = await gate.ensure_network()  # the core listens on the bridge, so the VMs reach it
        core = await asyncio.to_thread(
            CoreProcess,
            tmp_path / "home",
            {"SKYPORT_REMOTES": json.dumps(remotes), "SKYPORT_LOCAL__ENABLED": "false"},
            host=gateway,
        )
        await asyncio.to_thread(core.start)
        status = await gate.create_partition(await make_request(core, "n1", nodes=2))
        status = await ready(gate, "n1")
        addresses = [n.private_ip for n in status.nodes]
        assert len(set(addresses)) == 2 and gateway not in addresses, "each VM has its own address"
        await until(lambda: nodes_up(core, ["n1-0", "n1-1"]), 30, "the VMs to enrol from their namespaces")
        inventory = await gate.inventory()
        assert len(inventory.namespaces) == 2 and inventory.bridge
        await gate.delete_partition("n1")
        await gate.remove_network()
        left = sim_inventory(gate.state_dir)
        assert left.empty, f"no namespace, bridge or process is left: {left}"
    finally:
        await gate.close()
        cleaner = SimGate("cloud", settings)
        for leftover in await cleaner.list_partitions():
            await cleaner.delete_partition(leftover.partition_id)
        await cleaner.remove_network()
        if core is not None:
            core.cleanup()
