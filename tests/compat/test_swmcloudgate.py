"""The original Sky Port cloud gate, ``swmcloudgate==0.1.8`` from PyPI, in its mocked mode, driven by our
``http`` gate over mutual TLS.

The gate runs from its own venv (``.venv-swmcloudgate``, made by scripts/setup.sh: it pins fastapi 0.63
and pydantic 1) under uvicorn, with its settings in ``$HOME/.swm/cloud-gate.yaml`` (Azure credentials
must be present, even mocked) and ``SWM_TEST_CONFIG`` naming a JSON list of canned provider answers
(``sizes``, ``images``, ``resource_groups`` per provider). Only its Azure router works mocked (the
OpenStack one fails without a cloud). What the mock does not do: report a status for the partitions it
"creates" (hence ``missing_status = "ready"``), and forget a deleted one (it keeps listing it, so our
gate reports it ``deleting``).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from skyport.gates.http import HTTPGate
from skyport.gates.provisioner import TAG_CORE, TAG_PARTITION, NodeBootstrap, PartitionRequest
from tests.support.core import VENV_BIN, CoreProcess, wait_for

GATE_VENV = Path(__file__).resolve().parents[2] / ".venv-swmcloudgate"
pytestmark = pytest.mark.skipif(
    not (GATE_VENV / "bin" / "uvicorn").exists(), reason="no .venv-swmcloudgate: run scripts/setup.sh"
)

SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
IMAGE_ID = (
    f"/Subscriptions/{SUBSCRIPTION}/Providers/Microsoft.Compute/Locations/test/Publishers/canonical"
    "/ArtifactTypes/VMImage/Offers/ubuntu/Skus/22_04-lts/Versions/1.2"
)
RESPONSES = [
    {
        "provider": "azure",
        "requests": {
            "sizes": [
                {"name": "Standard_D2s", "number_of_cores": 2, "memory_in_mb": 8192,
                 "resource_disk_size_in_mb": 16384, "price": 0.096},
                {"name": "Standard_NC6", "number_of_cores": 6, "memory_in_mb": 57344,
                 "resource_disk_size_in_mb": 344064, "price": 0.9},
            ],
            "images": [
                {"id": IMAGE_ID, "name": "ubuntu-22.04",
                 "extra": {"location": "test", "publisher": "canonical", "offer": "ubuntu",
                           "skus": "22_04-lts", "version": "1.2"}},
            ],
            "resource_groups": [],
        },
    }
]  # fmt: skip
GATE_SETTINGS = f"""\
version: 1
base:
  cache_expire: 7200000
  cache_dir: "~/.swm/cache"
providers:
  azure:
    api_credentials:
      subscription_id: "{SUBSCRIPTION}"
      tenant_id: "00000000-0000-0000-0000-000000000001"
      app_id: "00000000-0000-0000-0000-000000000002"
    vm_image:
      publisher: "canonical"
      offer: "ubuntu"
      skus: "22_04-lts"
"""


@dataclass
class Gate:
    url: str
    log: Path


@pytest.fixture
def home_core(tmp_path: Path) -> Iterator[CoreProcess]:
    """A core's home (CA, certificates); started by the test that needs it."""
    core = CoreProcess(tmp_path / "home", env={"SKYPORT_LOCAL__ENABLED": "false"})
    try:
        yield core
    finally:
        core.cleanup()


@pytest.fixture
def gate(home_core: CoreProcess, tmp_path: Path) -> Iterator[Gate]:
    """swmcloudgate, mocked, on a socket we bound (port from the OS), requiring client certificates."""
    gate_home = tmp_path / "gate-home"
    (gate_home / ".swm").mkdir(parents=True)
    (gate_home / ".swm" / "cloud-gate.yaml").write_text(GATE_SETTINGS)
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps(RESPONSES))
    home = home_core.home
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    log = tmp_path / "swmcloudgate.log"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(gate_home),
        "SWM_TEST_CONFIG": str(responses),
    }
    argv = [
        str(GATE_VENV / "bin" / "uvicorn"),
        "swmcloudgate.main:app",
        "--fd",
        str(sock.fileno()),
        "--ssl-certfile",
        str(home / "server" / "cert.pem"),
        "--ssl-keyfile",
        str(home / "server" / "key.pem"),
        "--ssl-ca-certs",
        str(home / "ca" / "ca.pem"),
        "--ssl-cert-reqs",
        "2",  # ssl.CERT_REQUIRED: mutual TLS
    ]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, env=env, cwd=gate_home, stdout=out, stderr=subprocess.STDOUT, pass_fds=(sock.fileno(),)
        )
    sock.close()
    try:
        wait_for(
            lambda: (
                "Application startup complete" in log.read_text(errors="replace") or proc.poll() is not None
            ),
            60,
            "swmcloudgate to start",
        )
        assert proc.poll() is None, log.read_text(errors="replace")
        yield Gate(url=f"https://localhost:{port}", log=log)
    finally:
        # The core first: the gate's old uvicorn waits, on SIGTERM, for the connections the core holds.
        home_core.cleanup()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def remote_settings(core: CoreProcess, gate: Gate) -> dict[str, Any]:
    admin = core.home / "users" / "admin"
    return {
        "kind": "http",
        "name": "azure-mock",
        "url": gate.url,
        "provider": "azure",
        "location": "test",
        "ca_file": str(core.home / "ca" / "ca.pem"),
        "cert_file": str(admin / "cert.pem"),
        "key_file": str(admin / "key.pem"),
        "timeout_s": 20,
        "missing_status": "ready",
    }


async def test_flavors_images_and_a_partition_through_the_original_gate(
    home_core: CoreProcess, gate: Gate
) -> None:
    remote = HTTPGate("azure-mock", remote_settings(home_core, gate))
    try:
        catalog = await remote.catalog()
        flavors = {f.name: f for f in catalog.flavors}
        assert set(flavors) == {"Standard_D2s", "Standard_NC6"}
        d2s = flavors["Standard_D2s"]
        assert (d2s.cpus, d2s.mem, d2s.storage, d2s.price) == (2, 8192 * 1024**2, 16384 * 1024**2, 0.096)
        assert [(i.id, i.name) for i in catalog.images] == [(IMAGE_ID, "ubuntu-22.04")]

        request = PartitionRequest(
            partition_id="6b0f5a0e-2f7e-4d49-9d0b-4f0e5b1c2a33",
            name="skyport-6b0f5a0e",
            flavor=d2s.id,
            image=IMAGE_ID,
            nodes=[
                NodeBootstrap("n0", "https://core:8443", "CA", "tok0"),
                NodeBootstrap("n1", "https://core:8443", "CA", "tok1"),
            ],
            ports=[22, 8888],
            tags={TAG_PARTITION: "6b0f5a0e-2f7e-4d49-9d0b-4f0e5b1c2a33", TAG_CORE: "core-1"},
        )
        created = await remote.create_partition(request)
        assert created.state == "creating"
        assert created.provider_id.endswith(
            "/resourceGroups/skyport-6b0f5a0e-2f7e-4d49-9d0b-4f0e5b1c2a33-resource-group"
        )
        text = gate.log.read_text(errors="replace")
        assert "POST /azure/partitions" in text and "200" in text

        found = await remote.get_partition(request.partition_id)
        assert found is not None and found.state == "ready", found
        again = await remote.create_partition(request)
        assert again.provider_id == created.provider_id, "we look before we create: no second partition"
        listed = await remote.list_partitions()
        assert [s.partition_id for s in listed] == [request.partition_id]

        await remote.delete_partition(request.partition_id)
        assert "DELETE /azure/partitions//subscriptions/" in gate.log.read_text(errors="replace")
        after = await remote.get_partition(request.partition_id)
        assert after is not None and after.state == "deleting", "the mock keeps it; we know we deleted it"
    finally:
        await remote.close()


def _until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    return wait_for(predicate, timeout, what, interval=0.2)


async def test_the_original_gates_catalog_becomes_sky_port_flavors_and_images(
    home_core: CoreProcess, gate: Gate
) -> None:
    home_core.env["SKYPORT_REMOTES"] = json.dumps([remote_settings(home_core, gate)])
    await asyncio.to_thread(home_core.start)
    env = {**os.environ, "SKYPORT_HOME": str(home_core.home), "SKYPORT_URL": home_core.url}

    def cli(*args: str) -> str:
        done = subprocess.run(
            [str(VENV_BIN / "skyport"), *args], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def flavors() -> str | None:
        out = cli("flavors", "--json")
        return out if "Standard_D2s" in out else None

    started = time.monotonic()
    out = await asyncio.to_thread(_until, flavors, 60, "the gate's flavors in `skyport flavors`")
    assert "Standard_NC6" in out and time.monotonic() - started < 60
    images = await asyncio.to_thread(cli, "images", "--json")
    assert "ubuntu-22.04" in images
