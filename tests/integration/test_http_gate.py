"""The ``http`` gate driving ``skyport gate serve`` (serving the ``sim`` cloud) over mutual TLS, end to end.

HTTPGate -> HTTPS (the core's admin certificate) -> ``skyport gate serve`` -> SimGate -> ``skyport agent``
VMs that enrol with a real core. Also: the gate refuses callers it does not know, carries the provider's
words and transience back, survives a ``kill -9``, and the old gate conventions (errors as HTTP 200 with
an ``error`` key) are understood.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from skyport.gates.http import HTTPGate
from skyport.gates.provisioner import (
    TAG_CORE,
    TAG_PARTITION,
    NodeBootstrap,
    PartitionRequest,
    PartitionStatus,
    ProvisionerError,
)
from skyport.gates.sim import sim_inventory
from tests.support.core import VENV_BIN, CoreProcess, until, wait_for

AGENT_REMOTE = "simcloud"


class GateProcess:
    """``skyport gate serve --remote cloud`` on the core's home, with a sim remote of its own."""

    def __init__(self, core: CoreProcess, sim: dict[str, Any]) -> None:
        self.core = core
        self.state_dir = Path(sim["state_dir"])
        remotes = [{"kind": "sim", "name": "cloud", "sim": sim}]
        self.env = {**os.environ, "SKYPORT_HOME": str(core.home), "SKYPORT_REMOTES": json.dumps(remotes)}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log_path = core.home / "gate.log"

    def start(self) -> None:
        ready = self.core.home / "run" / "gate-cloud.json"
        ready.unlink(missing_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed with it
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "skyport"), "gate", "serve", "--remote", "cloud", "--port", "0"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

        def _ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the gate exited: {self.log_path.read_text(errors='replace')}")
            return ready.exists()

        wait_for(_ready, 30, "the gate to listen")
        self.url = json.loads(ready.read_text())["url"]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def core(tmp_path: Path) -> Iterator[CoreProcess]:
    remotes = [{"kind": "agent", "name": AGENT_REMOTE, "heartbeat_timeout_s": 30}]
    process = CoreProcess(
        tmp_path / "home", env={"SKYPORT_REMOTES": json.dumps(remotes), "SKYPORT_LOCAL__ENABLED": "false"}
    )
    process.start()
    try:
        yield process
    finally:
        process.cleanup()


@pytest.fixture
def gate(core: CoreProcess, tmp_path: Path) -> Iterator[GateProcess]:
    sim = {
        "state_dir": str(tmp_path / "sim"),
        "boot_latency_s": 0.2,
        "agent_heartbeat_s": 0.5,
        "max_instances": 2,
    }
    process = GateProcess(core, sim)
    process.start()
    try:
        yield process
    finally:
        process.stop()
        left = sim_inventory(process.state_dir, netns=False)
        if not left.empty:  # a failed test: clean up with the sim itself, then fail loudly
            from skyport.gates.sim import SimGate

            async def clean() -> None:
                sim_gate = SimGate("cloud", {"kind": "sim", "name": "cloud", "sim": sim})
                for status in await sim_gate.list_partitions():
                    await sim_gate.delete_partition(status.partition_id)

            asyncio.run(clean())
            raise AssertionError(f"the sim was left with {left}")


def http_gate(core: CoreProcess, gate: GateProcess, user: str = "admin", **extra: Any) -> HTTPGate:
    bundle = core.home / "users" / user
    settings = {
        "kind": "http",
        "name": "viagate",
        "url": gate.url,
        "provider": "sim",
        "ca_file": str(core.home / "ca" / "ca.pem"),
        "cert_file": str(bundle / "cert.pem"),
        "key_file": str(bundle / "key.pem"),
        "timeout_s": 20,
        **extra,
    }
    return HTTPGate("viagate", settings)


async def make_request(core: CoreProcess, partition_id: str, nodes: int) -> PartitionRequest:
    client = core.client()
    ca_pem = (core.home / "ca" / "ca.pem").read_text()
    boots = []
    for index in range(nodes):
        name = f"{partition_id}-{index}"
        token = (await asyncio.to_thread(client.bootstrap_token, AGENT_REMOTE, name))["token"]
        boots.append(NodeBootstrap(name, core.url, ca_pem, token))
    return PartitionRequest(
        partition_id=partition_id,
        name=f"skyport-{partition_id}",
        flavor="medium",
        image="debian-12",
        nodes=boots,
        tags={TAG_PARTITION: partition_id, TAG_CORE: "it"},
    )


async def test_http_gate_drives_the_sim_through_gate_serve(core: CoreProcess, gate: GateProcess) -> None:
    remote = http_gate(core, gate)
    try:
        catalog = await remote.catalog()
        medium = next(f for f in catalog.flavors if f.id == "medium")
        assert (medium.cpus, medium.mem, medium.price) == (2, 4 * 1024**3, 0.05), "the catalog crosses intact"
        assert "debian-12" in {i.id for i in catalog.images}

        request = await make_request(core, "h1", nodes=2)
        created = await remote.create_partition(request)
        assert created.state == "creating" and created.partition_id == "h1"

        async def is_ready() -> PartitionStatus | None:
            status = await remote.get_partition("h1")
            assert status is not None and status.state != "failed", status
            return status if status.state == "ready" else None

        status: PartitionStatus = await until(is_ready, 30, "the partition to be ready through the gate")
        assert [n.name for n in status.nodes] == ["h1-0", "h1-1"]
        assert status.tags[TAG_PARTITION] == "h1"

        def up() -> bool:
            return {"h1-0", "h1-1"} <= {n.name for n in core.client().nodes() if n.state_power == "up"}

        await until(up, 30, "the gate's VMs to enrol with the core")
        again = await remote.create_partition(request)
        assert again.provider_id == status.provider_id, "creation is idempotent across the wire"

        # The provider's own words come back, and whether to retry.
        with pytest.raises(ProvisionerError, match="QuotaExceeded: instance limit of 2") as exc:
            await remote.create_partition(await make_request(core, "h2", nodes=1))
        assert not exc.value.transient

        # kill -9 the gate: a new one finds the partition and its VMs, which never stopped.
        gate.kill()
        with pytest.raises(ProvisionerError) as down:
            await remote.get_partition("h1")
        assert down.value.transient, "an unreachable gate is worth retrying"
        gate.start()
        await remote.close()
        remote = http_gate(core, gate)
        listed = await remote.list_partitions()
        assert [(s.partition_id, s.state) for s in listed] == [("h1", "ready")]

        await remote.delete_partition("h1")
        assert await remote.get_partition("h1") is None
        assert sim_inventory(gate.state_dir, netns=False).empty, "nothing leaked"
        await remote.delete_partition("h1")  # gone already: still fine
    finally:
        await remote.close()


async def test_the_gate_admits_only_the_allowed_certificates(core: CoreProcess, gate: GateProcess) -> None:
    await asyncio.to_thread(core.add_user, "mallory")
    stranger = http_gate(core, gate, user="mallory")
    try:
        with pytest.raises(ProvisionerError, match="mallory may not use this gate") as exc:
            await stranger.catalog()
        assert not exc.value.transient
    finally:
        await stranger.close()
    # Without a client certificate the TLS handshake itself is refused.
    anonymous = HTTPGate(
        "anon",
        {
            "kind": "http",
            "name": "anon",
            "url": gate.url,
            "provider": "sim",
            "ca_file": str(core.home / "ca" / "ca.pem"),
        },
    )
    try:
        with pytest.raises(ProvisionerError, match="cannot reach the gate"):
            await anonymous.catalog()
    finally:
        await anonymous.close()


async def test_original_gate_conventions_are_understood() -> None:
    """Errors as HTTP 200 with an ``error`` key (a traceback list, even), a body with an empty pem_data,
    partitions named after our id, and the original Azure ids in delete paths."""
    seen: list[tuple[str, str, bytes]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, request.content))
        path = request.url.path
        if path == "/azure/flavors":
            return httpx.Response(200, json={"error": ["Traceback ...", "Exception: No subscription ID\n"]})
        if path == "/azure/partitions/skyport-p9" and request.method == "GET":
            return httpx.Response(
                200,
                json={
                    "id": "/subscriptions/s/resourceGroups/skyport-p9-resource-group",
                    "name": "skyport-p9",
                    "status": "updating",
                    "master_private_ip": "10.0.0.4",
                },
            )
        if request.method == "DELETE":
            return httpx.Response(200, json={"result": "Deletion started"})
        if path == "/azure/partitions":
            return httpx.Response(
                200,
                json={
                    "partitions": [
                        {"id": "x", "name": "skyport-p9-resource-group", "status": "succeeded"},
                        {"id": "y", "name": "someone-elses", "status": "succeeded"},
                    ]
                },
            )
        return httpx.Response(404, json={"detail": "Partition not found"})

    remote = HTTPGate(
        "azure",
        {
            "kind": "http",
            "name": "azure",
            "url": "https://gate.invalid",
            "provider": "azure",
            "location": "eastus",
        },
        transport=httpx.MockTransport(answer),
    )
    try:
        with pytest.raises(ProvisionerError, match=r"^Exception: No subscription ID$"):
            await remote.catalog()
        assert json.loads(seen[0][2]) == {"pem_data": ""}, "an empty pem_data, never a key"
        status = await remote.get_partition("p9")
        assert status is not None and status.state == "creating" and status.nodes[0].private_ip == "10.0.0.4"
        assert [s.partition_id for s in await remote.list_partitions()] == ["p9"], "only our partitions"
        await remote.delete_partition("p9")
        assert ("DELETE", "/azure/partitions//subscriptions/s/resourceGroups/skyport-p9-resource-group") in [
            (m, p) for m, p, _ in seen
        ]
        assert await remote.get_partition("gone") is None
    finally:
        await remote.close()
