"""The ``sim`` cloud's provisioner: catalog, quotas, failures, idempotence, restarts and clean deletion.

Its VMs here are a stand-in agent (a small Python program that takes the agent's options, starts a "job"
the way the real agent does — a wrapper in a session of its own, with a child — and waits), so these
tests need no core; tests/integration/test_sim_gate.py runs the real ``skyport agent`` against a core.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from skyport.gates.provisioner import (
    TAG_CORE,
    TAG_PARTITION,
    NodeBootstrap,
    PartitionRequest,
    PartitionStatus,
    ProvisionerError,
)
from skyport.gates.sim import SimGate, sim_inventory
from tests.support.core import until

#: The stand-in agent: records its argv, starts a wrapper (own session, named by the workroot like the
#: real one's control directory) whose child is the "job", and sleeps.
FAKE_AGENT = r"""
import os, subprocess, sys, time, json
args = sys.argv[1:]
opt = lambda name: args[args.index(name) + 1]
state = opt("--state-dir")
os.makedirs(state, exist_ok=True)
control = os.path.join(opt("--workroot"), ".control", "job1")
subprocess.Popen(["/bin/sh", "-c", "sleep 300 & wait", "wrapper", control], start_new_session=True)
with open(os.path.join(state, "started.json"), "w") as fh:
    json.dump({"argv": args, "token": open(opt("--token-file")).read().strip(), "env": dict(os.environ)}, fh)
while True:
    time.sleep(60)
"""


@pytest.fixture
def fake_agent(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_agent.py"
    script.write_text(FAKE_AGENT)
    return [sys.executable, str(script)]


def settings(tmp_path: Path, agent: list[str], **sim: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "state_dir": str(tmp_path / "sim"),
        "boot_latency_s": 0.1,
        "agent_command": agent,
        "workroot_parent": str(tmp_path / "roots"),
        "seed": 7,
    }
    return {"kind": "sim", "name": "cloud", "sim": {**base, **sim}}


def request(
    partition_id: str, nodes: int = 1, flavor: str = "small", image: str | None = None
) -> PartitionRequest:
    return PartitionRequest(
        partition_id=partition_id,
        name=f"skyport-{partition_id}",
        flavor=flavor,
        image=image,
        nodes=[
            NodeBootstrap(
                f"{partition_id}-n{i}", "https://127.0.0.1:1", "CA PEM", f"token-{partition_id}-{i}"
            )
            for i in range(nodes)
        ],
        tags={TAG_PARTITION: partition_id, TAG_CORE: "test-core"},
    )


@pytest.fixture
async def gates(tmp_path: Path) -> AsyncIterator[list[SimGate]]:
    """Gates a test makes; whatever they leave is deleted (and must then be gone)."""
    made: list[SimGate] = []
    yield made
    for gate in made:
        await gate.close()
    if made:
        cleaner = SimGate("cloud", {**settings(tmp_path, ["true"])})
        for status in await cleaner.list_partitions():
            await cleaner.delete_partition(status.partition_id)
        assert sim_inventory(cleaner.state_dir, netns=False).empty


def gate_of(gates: list[SimGate], tmp_path: Path, agent: list[str], **sim: Any) -> SimGate:
    gate = SimGate("cloud", settings(tmp_path, agent, **sim))
    gates.append(gate)
    return gate


async def ready(gate: SimGate, partition_id: str, timeout: float = 10.0) -> PartitionStatus:
    async def check() -> PartitionStatus | None:
        status = await gate.get_partition(partition_id)
        assert status is not None
        assert status.state != "failed", status.message
        return status if status.state == "ready" else None

    result: PartitionStatus = await until(check, timeout, f"partition {partition_id} to be ready")
    return result


def started(gate: SimGate, status: PartitionStatus, index: int = 0) -> dict[str, Any]:
    path = gate.state_dir / "vms" / status.nodes[index].provider_id / "agent" / "started.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


async def test_the_catalog_has_priced_flavors_and_images_and_can_be_replaced(tmp_path: Path) -> None:
    default = await SimGate("cloud", settings(tmp_path, ["true"])).catalog()
    assert {f.id for f in default.flavors} >= {"small", "medium", "large", "gpu"}
    assert all(f.price > 0 for f in default.flavors), "every flavor has a price"
    assert next(f for f in default.flavors if f.id == "gpu").gpus == 1
    assert default.images
    custom = SimGate(
        "cloud",
        settings(
            tmp_path,
            ["true"],
            flavors=[{"id": "tiny", "cpus": 1, "mem": "512MiB", "price": 0.001}],
            images=[{"id": "alpine", "name": "Alpine"}],
        ),
    )
    catalog = await custom.catalog()
    assert [(f.id, f.mem, f.price) for f in catalog.flavors] == [("tiny", 512 * 1024**2, 0.001)]
    assert [(i.id, i.name) for i in catalog.images] == [("alpine", "Alpine")]
    with pytest.raises(ValueError, match="sim settings are not valid"):
        SimGate("cloud", settings(tmp_path, ["true"], boot_latency_s=-1))


async def test_a_partition_boots_after_the_latency_with_its_token_handed_over_like_cloud_init(
    tmp_path: Path, fake_agent: list[str], gates: list[SimGate]
) -> None:
    gate = gate_of(gates, tmp_path, fake_agent, boot_latency_s=0.5)
    began = time.monotonic()
    status = await gate.create_partition(request("p1", nodes=2, flavor="medium"))
    assert status.state == "creating" and len(status.nodes) == 2
    assert not (gate.state_dir / "vms" / status.nodes[0].provider_id / "agent").exists(), "not booted yet"
    status = await ready(gate, "p1")
    assert time.monotonic() - began >= 0.5, "the agents start after the boot latency"
    assert [n.name for n in status.nodes] == ["p1-n0", "p1-n1"]
    assert status.tags[TAG_PARTITION] == "p1"
    for index in range(2):
        seen = await until(
            functools.partial(_started_or_none, gate, status, index), what="the agent to start"
        )
        argv = seen["argv"]
        assert seen["token"] == f"token-p1-{index}", "each node gets its own one-time token"
        assert argv[argv.index("--cpus") + 1] == "2" and argv[argv.index("--mem") + 1] == str(4 * 1024**3)
        assert argv[argv.index("--url") + 1] == "https://127.0.0.1:1"
        if os.geteuid() == 0:
            assert argv[argv.index("--default-user") + 1] == "nobody"
        user_data = argv[argv.index("--token-file") + 1]
        assert stat.S_IMODE(os.stat(user_data).st_mode) == 0o600, "the token is private to the VM"
        workroot = argv[argv.index("--workroot") + 1]
        assert stat.S_IMODE(os.stat(workroot).st_mode) == 0o711, "jobs running as nobody reach their dirs"
        assert "SKYPORT_HOME" not in seen["env"], "nothing of the core's environment reaches a VM"
    # per VM: the agent, the job's wrapper and the job
    await until(lambda: len(sim_inventory(gate.state_dir, netns=False).processes) == 6, what="six processes")


def _started_or_none(gate: SimGate, status: PartitionStatus, index: int) -> dict[str, Any] | None:
    try:
        return started(gate, status, index)
    except (OSError, ValueError):
        return None


async def test_create_is_idempotent_on_the_partition_id(
    tmp_path: Path, fake_agent: list[str], gates: list[SimGate]
) -> None:
    gate = gate_of(gates, tmp_path, fake_agent, max_instances=1)
    first = await gate.create_partition(request("same"))
    again = await gate.create_partition(request("same"))
    assert again.provider_id == first.provider_id, "the second call returns the first partition"
    await ready(gate, "same")
    again = await gate.create_partition(request("same"))
    assert again.state == "ready" and again.provider_id == first.provider_id
    assert len(await gate.list_partitions()) == 1


async def test_quotas_and_capacity_refuse_with_the_providers_words(
    tmp_path: Path, fake_agent: list[str], gates: list[SimGate]
) -> None:
    gate = gate_of(gates, tmp_path, fake_agent, max_instances=3, max_vcpus=4, capacity={"medium": 0})
    await gate.create_partition(request("a", nodes=2, flavor="small"))
    with pytest.raises(ProvisionerError, match=r"^QuotaExceeded: instance limit of 3") as exc:
        await gate.create_partition(request("b", nodes=2, flavor="small"))
    assert not exc.value.transient
    with pytest.raises(ProvisionerError, match=r"^QuotaExceeded: vCPU limit of 4"):
        await gate.create_partition(request("c", nodes=1, flavor="large"))
    with pytest.raises(ProvisionerError, match=r"^InsufficientInstanceCapacity: .*medium") as exc:
        await gate.create_partition(request("d", flavor="medium"))
    assert exc.value.transient, "capacity may come back"
    with pytest.raises(ProvisionerError, match=r"InvalidParameterValue: flavor 'huge'"):
        await gate.create_partition(request("e", flavor="huge"))
    with pytest.raises(ProvisionerError, match=r"InvalidAMIID.NotFound: image 'windows'"):
        await gate.create_partition(request("f", image="windows"))
    assert [s.partition_id for s in await gate.list_partitions()] == ["a"], "refused creates leave nothing"
    await gate.delete_partition("a")
    await gate.create_partition(request("b", nodes=2))  # the quota is free again


async def test_injected_failures_on_create_boot_and_delete(
    tmp_path: Path, fake_agent: list[str], gates: list[SimGate]
) -> None:
    gate = gate_of(gates, tmp_path, fake_agent, create_failure_rate=1.0)
    with pytest.raises(ProvisionerError, match=r"^InternalError: .*injected"):
        await gate.create_partition(request("x"))
    assert await gate.get_partition("x") is None
    await gate.close()

    gate = gate_of(gates, tmp_path, fake_agent, boot_failure_rate=1.0, delete_failure_rate=1.0)
    await gate.create_partition(request("y"))

    async def failed() -> PartitionStatus | None:
        status = await gate.get_partition("y")
        return status if status is not None and status.state == "failed" else None

    status = await until(failed, what="the boot to fail")
    assert status.message.startswith("InstanceBootFailure:")
    assert not (await gate.inventory()).processes, "a VM that did not boot runs nothing"
    with pytest.raises(ProvisionerError, match=r"^InternalError: .*delete") as exc:
        await gate.delete_partition("y")
    assert exc.value.transient, "a failed delete is worth retrying"
    assert await gate.get_partition("y") is not None, "nothing was deleted"


async def test_capacity_shortage_is_transient(
    tmp_path: Path, fake_agent: list[str], gates: list[SimGate]
) -> None:
    gate = gate_of(gates, tmp_path, fake_agent, capacity_failure_rate=1.0)
    with pytest.raises(ProvisionerError, match=r"^InsufficientInstanceCapacity:") as exc:
        await gate.create_partition(request("z"))
    assert exc.value.transient


async def test_seeded_failures_repeat(tmp_path: Path, fake_agent: list[str]) -> None:
    async def outcomes(seed: int, run: str) -> list[bool]:
        gate = SimGate(
            "cloud",
            settings(tmp_path / run, fake_agent, seed=seed, create_failure_rate=0.5, boot_latency_s=3600),
        )
        results = []
        for i in range(12):
            try:
                await gate.create_partition(request(f"s{i}"))
                results.append(True)
            except ProvisionerError:
                results.append(False)
        await gate.close()
        return results

    first = await outcomes(3, "one")
    assert first == await outcomes(3, "two"), "the same seed injects the same failures"
    assert True in first and False in first


async def test_a_new_gate_on_the_same_state_finds_partitions_and_finishes_their_boot(
    tmp_path: Path, fake_agent: list[str], gates: list[SimGate]
) -> None:
    old = gate_of(gates, tmp_path, fake_agent, boot_latency_s=0.05)
    await old.create_partition(request("up"))
    up = await ready(old, "up")
    slow = SimGate("cloud", settings(tmp_path, fake_agent, boot_latency_s=0.5))
    await slow.create_partition(request("booting"))
    await old.close()
    await slow.close()  # "the core dies" before the boot is due: nobody starts its agent

    new = gate_of(gates, tmp_path, fake_agent, boot_latency_s=0.5)
    listed = {s.partition_id: s for s in await new.list_partitions()}
    assert set(listed) == {"up", "booting"}
    assert listed["up"].state == "ready" and listed["up"].provider_id == up.provider_id
    booted = await ready(new, "booting")
    assert booted.nodes[0].name == "booting-n0"
    # the old VM's agent, wrapper and job still run, and the new VM's too
    await until(lambda: len(sim_inventory(new.state_dir, netns=False).processes) == 6, what="six processes")
    for partition_id in ("up", "booting"):
        await new.delete_partition(partition_id)
    assert sim_inventory(new.state_dir, netns=False).empty, "deleting from the new gate stops everything"


async def test_delete_kills_the_agent_and_its_jobs_even_when_they_were_orphaned(
    tmp_path: Path, fake_agent: list[str], gates: list[SimGate]
) -> None:
    gate = gate_of(gates, tmp_path, fake_agent)
    await gate.create_partition(request("d"))
    await ready(gate, "d")
    await until(lambda: len(sim_inventory(gate.state_dir, netns=False).processes) == 3, what="the VM's job")
    procs = (await gate.inventory()).processes
    # The agent dies on its own (kill -9): its job's wrapper is reparented and still runs.
    agent_pid = next(p.pid for p in procs if "--state-dir" in p.argv)
    os.kill(agent_pid, signal.SIGKILL)
    await until(
        lambda: len(sim_inventory(gate.state_dir, netns=False).processes) == 2, what="the agent to go"
    )
    await gate.delete_partition("d")
    assert await gate.get_partition("d") is None
    inventory = sim_inventory(gate.state_dir, netns=False)
    assert inventory.empty, inventory
    assert not list((tmp_path / "roots").iterdir()), "workroots are removed"
    await gate.delete_partition("d")  # deleting what is gone succeeds


async def test_a_vm_whose_agent_exits_fails_the_partition_with_the_agents_words(
    tmp_path: Path, gates: list[SimGate]
) -> None:
    script = tmp_path / "failing_agent.py"
    script.write_text("print('enrolment refused: the token is not valid', flush=True)\nraise SystemExit(3)\n")
    gate = gate_of(gates, tmp_path, [sys.executable, str(script)])
    await gate.create_partition(request("f"))

    async def failed() -> PartitionStatus | None:
        status = await gate.get_partition("f")
        return status if status is not None and status.state == "failed" else None

    status = await until(failed, what="the partition to fail")
    assert "stopped: its agent exited" in status.message
    assert "enrolment refused" in status.message
