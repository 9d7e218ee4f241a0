"""The original Python terminal, ``swmclient`` 0.1.8 from PyPI, unchanged, against our core over real mTLS.

Every call of ``swmclient.api.SwmApi`` is driven against a real ``skyport server`` with the files an original
user has in ``~/.swm`` (``cert.pem``, ``key.pem``, ``ca-chain-cert.pem``), and what it parses is checked
against the contract (``shared/reference/swm-contract.md``): one-letter states, no None fields, ISO-8601 UTC
times, lists where lists are expected, the plain-text replies of submit, cancel and requeue.
"""

from __future__ import annotations

import asyncio
import io
import re
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attr
import httpx
import pytest
from sqlalchemy import Connection, insert
from swmclient.api import SwmApi
from swmclient.generated.models.job import Job as SwmJob
from swmclient.generated.types import Unset

from skyport.client import Client
from skyport.models import JobState
from skyport.server.settings import Settings
from skyport.server.store import infra as infra_store
from skyport.server.store.engine import Store
from skyport.server.store.tables import flavors, images
from tests.support.core import CoreProcess, wait_for

SWM_STATES = {"R", "Q", "W", "F", "E", "T", "C"}
ISO_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|\+00:00)")
UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
JOB_TIMEOUT_S = 30.0

HELLO_SCRIPT = """\
#!/bin/sh
#SWM name swm-hello
#SWM comment submitted by swmclient
echo "hello from a swmclient job"
echo "this line goes to stderr" >&2
sleep 1.5
"""


# ---------------------------------------------------------------------------------------------------
# A cloud catalog (a remote with flavors and images), so the list calls have something to parse.


@dataclass(frozen=True)
class Catalog:
    remote_name: str
    remote_id: str
    flavor_name: str
    cloud_image_name: str
    container_image_name: str


def seed_catalog(core: CoreProcess) -> Catalog:
    """Write a cloud remote with one flavor, one VM image and one container image into the core's store.

    The core has no API to declare a cloud catalog yet; the rows are what a cloud gate would record.
    """

    def write_rows(conn: Connection) -> str:
        remote_id = infra_store.ensure_remote(
            conn,
            name="test-cloud",
            kind="openstack",
            server="cloud.example.org",
            settings={},
            now=datetime.now(UTC),
        )
        conn.execute(
            insert(flavors),
            {
                "id": str(uuid.uuid4()),
                "remote_id": remote_id,
                "name": "m1.test",
                "cpus": 4,
                "mem": 8 * 1024**3,
                "gpus": 1,
                "storage": 40 * 1024**3,
                "price": 0.25,
            },
        )
        conn.execute(
            insert(images),
            [
                {
                    "id": str(uuid.uuid4()),
                    "remote_id": remote_id,
                    "name": "ubuntu-22.04",
                    "kind": "cloud",
                    "comment": "a VM image",
                },
                {
                    "id": str(uuid.uuid4()),
                    "remote_id": None,
                    "name": "jupyter/base-notebook",
                    "kind": "container",
                    "comment": "",
                },
            ],
        )
        return remote_id

    async def seed() -> str:
        store = Store(Settings(home=core.home).store_url)
        try:
            return await store.write(write_rows)
        finally:
            await store.close()

    remote_id = asyncio.run(seed())
    return Catalog("test-cloud", remote_id, "m1.test", "ubuntu-22.04", "jupyter/base-notebook")


# ---------------------------------------------------------------------------------------------------
# Fixtures


@dataclass
class Terminal:
    """One original user: their ``~/.swm`` files, the original API object, and our client for checks."""

    swm_dir: Path
    api: SwmApi
    native: Client

    @property
    def key(self) -> Path:
        return self.swm_dir / "key.pem"

    @property
    def cert(self) -> Path:
        return self.swm_dir / "cert.pem"

    @property
    def ca(self) -> Path:
        return self.swm_dir / "ca-chain-cert.pem"

    def raw(self, url: str) -> httpx.Client:
        """A bare HTTPS client with the same files, for wire-level checks."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        return httpx.Client(base_url=url, verify=context, timeout=10)


@pytest.fixture(scope="module")
def catalog(shared_core: CoreProcess) -> Catalog:
    return seed_catalog(shared_core)


@pytest.fixture(scope="module")
def alice(shared_core: CoreProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Terminal]:
    swm_dir = tmp_path_factory.mktemp("alice-home") / ".swm"
    shared_core.add_user("alice", swm_dir=swm_dir)
    api = SwmApi(
        url=shared_core.url,
        key_file=str(swm_dir / "key.pem"),
        cert_file=str(swm_dir / "cert.pem"),
        ca_file=str(swm_dir / "ca-chain-cert.pem"),
    )
    with shared_core.client("alice") as native:
        yield Terminal(swm_dir, api, native)


def submit(api: SwmApi, script: str) -> str:
    reply = api.submit_job(io.BytesIO(script.encode()))
    assert reply is not None, "the core refused a valid job script"
    text: str = reply.payload.read().decode()
    return text


def wait_ended(native: Client, job_id: str) -> None:
    job = native.wait(job_id, timeout=JOB_TIMEOUT_S)
    assert job.state.terminal, f"job {job_id} did not end in {JOB_TIMEOUT_S}s: {job.state}"


@pytest.fixture(scope="module")
def finished_job(alice: Terminal) -> str:
    """A job submitted through swmclient that printed to stdout and stderr and ran for 1.5 s."""
    job_id = submit(alice.api, HELLO_SCRIPT)
    wait_ended(alice.native, job_id)
    return job_id


# ---------------------------------------------------------------------------------------------------
# Checks of the parsed models


def assert_no_missing_fields(model: Any) -> None:
    """Every attribute the generated model declares was sent, and none is None."""
    for field in attr.fields(type(model)):
        if field.name == "additional_properties":
            continue
        value = getattr(model, field.name)
        assert value is not None, f"{type(model).__name__}.{field.name} is None"
        assert not isinstance(value, Unset), f"{type(model).__name__}.{field.name} was not sent"


def assert_resources(resources: Any, required: set[str]) -> dict[str, int]:
    assert isinstance(resources, list)
    counts: dict[str, int] = {}
    for resource in resources:
        assert_no_missing_fields(resource)
        assert isinstance(resource.name, str) and resource.name
        assert isinstance(resource.count, int) and resource.count >= 0, resource
        counts[resource.name] = resource.count
    assert required <= counts.keys(), f"missing resources {required - counts.keys()} in {counts}"
    return counts


def parse_utc(text: str) -> datetime:
    assert ISO_UTC.fullmatch(text), f"{text!r} is not an ISO-8601 UTC timestamp"
    parsed = datetime.fromisoformat(text)
    offset = parsed.utcoffset()
    assert offset is not None and offset.total_seconds() == 0
    return parsed


def assert_valid_job(job: Any) -> None:
    """``job``: a parsed swmclient Job (typed Any: its fields are ``X | Unset`` until checked)."""
    assert_no_missing_fields(job)
    assert UUID_TEXT.fullmatch(job.id)
    assert job.state.value in SWM_STATES
    assert isinstance(job.state_details, str)
    parse_utc(job.submit_time)
    for value in (job.start_time, job.end_time):
        assert value == "" or parse_utc(value)
    assert isinstance(job.duration, int) and job.duration >= 0
    assert isinstance(job.exitcode, int) and isinstance(job.signal, int)
    assert isinstance(job.node_names, list) and all(isinstance(n, str) for n in job.node_names)
    assert isinstance(job.node_ips, list) and all(isinstance(ip, str) for ip in job.node_ips)
    assert isinstance(job.remote_id, str) and isinstance(job.flavor_id, str)
    assert_resources(job.request, {"cpus", "mem", "storage", "gpus"})
    assert_resources(job.resources, set())
    assert isinstance(job.comment, str)


# ---------------------------------------------------------------------------------------------------
# Jobs


def test_submit_job_replies_with_the_job_id_alone(alice: Terminal) -> None:
    reply = alice.api.submit_job(io.BytesIO(b"#!/bin/sh\n#SWM name id-only\necho hi\n"))
    assert reply is not None
    text = reply.payload.read().decode()
    assert UUID_TEXT.fullmatch(text), f"the reply is not a bare job id: {text!r}"
    assert alice.native.job(text).name == "id-only"


def test_job_that_ran_has_its_stdout_and_stderr(alice: Terminal, finished_job: str) -> None:
    job = alice.native.job(finished_job)
    assert (job.state, job.exit_code) == (JobState.COMPLETED, 0), job.state_details
    stdout = alice.api.get_job_stdout(finished_job)
    stderr = alice.api.get_job_stderr(finished_job)
    assert stdout is not None and stderr is not None
    assert stdout.payload.read() == b"hello from a swmclient job\n"
    assert stderr.payload.read() == b"this line goes to stderr\n"


def test_get_job_parses_a_finished_job_completely(alice: Terminal, finished_job: str) -> None:
    parsed = alice.api.get_job(finished_job)
    assert isinstance(parsed, SwmJob)
    job: Any = parsed  # its fields are typed ``X | Unset``; assert_valid_job checks they were all sent
    assert_valid_job(job)
    assert (job.id, job.name, job.comment) == (finished_job, "swm-hello", "submitted by swmclient")
    assert job.state.value == "F" and job.exitcode == 0 and job.signal == 0, job.state_details
    start, end = parse_utc(job.start_time), parse_utc(job.end_time)
    assert parse_utc(job.submit_time) <= start <= end
    # start and end are when the core recorded them, each a few ms after the fact: the job sleeps
    # longer than the second asked for, so that the whole-second duration cannot round down to 0
    assert job.duration >= 1, "the job slept for 1.5 s: duration is the time it actually ran"
    assert abs(job.duration - (end - start).total_seconds()) <= 1.5
    assert job.node_names and job.node_ips, "a job that ran has the nodes it ran on"
    request = assert_resources(job.request, {"cpus", "mem", "storage", "gpus"})
    assert request["cpus"] == 1
    assert assert_resources(job.resources, {"cpus"})["cpus"] == 1


def test_get_jobs_lists_the_callers_jobs_with_valid_fields(alice: Terminal, finished_job: str) -> None:
    jobs = alice.api.get_jobs()
    assert isinstance(jobs, list)
    assert finished_job in {j.id for j in jobs}
    for job in jobs:
        assert_valid_job(job)


def test_cancel_job_replies_canceled_and_stops_a_running_job(alice: Terminal) -> None:
    job_id = submit(alice.api, "#!/bin/sh\n#SWM name long\nsleep 60\n")

    def started() -> str | None:
        job = alice.api.get_job(job_id)
        state = job.state.value if job is not None else None
        return state if state in {"R", "F", "E", "C"} else None

    assert wait_for(started, JOB_TIMEOUT_S, "the job to start") == "R"
    assert alice.api.cancel_job(job_id) == f"Canceled: {job_id}\nNot found: ".encode()
    wait_ended(alice.native, job_id)
    job = alice.api.get_job(job_id)
    assert job is not None and job.state.value == "C"
    assert job.end_time and parse_utc(job.end_time)


def test_requeue_job_replies_requeued_and_runs_the_job_again(alice: Terminal) -> None:
    job_id = submit(alice.api, "#!/bin/sh\n#SWM name again\necho again\n")
    wait_ended(alice.native, job_id)
    assert alice.api.requeue_job(job_id) == f"Requeued: {job_id}\nNot found: ".encode()
    assert alice.native.job(job_id).attempt == 2
    wait_ended(alice.native, job_id)
    job = alice.api.get_job(job_id)
    assert job is not None and job.state.value == "F" and job.exitcode == 0, job.state_details
    stdout = alice.api.get_job_stdout(job_id)
    assert stdout is not None and stdout.payload.read() == b"again\n"


def test_unknown_job_ids_are_not_found(alice: Terminal) -> None:
    unknown = str(uuid.uuid4())
    for job_id in (unknown, "not-a-job-id"):
        assert alice.api.get_job(job_id) is None
        assert alice.api.get_job_stdout(job_id) is None
        assert alice.api.get_job_stderr(job_id) is None
    assert alice.api.cancel_job(unknown) == f"Canceled: \nNot found: {unknown}".encode()
    assert alice.api.requeue_job(unknown) == f"Requeued: \nNot found: {unknown}".encode()


def test_bad_script_is_a_400_the_client_reads_as_none(alice: Terminal, shared_core: CoreProcess) -> None:
    script = b"#!/bin/sh\n#SWM name bad\n#SWM walltime forever\necho hi\n"
    assert alice.api.submit_job(io.BytesIO(script)) is None
    with alice.raw(shared_core.url) as http:
        reply = http.post("/user/job", files={"script_content": (None, script)})
    assert reply.status_code == 400
    assert "line 3" in reply.text and "walltime" in reply.text


# ---------------------------------------------------------------------------------------------------
# Nodes, flavors, images, remotes


def test_get_nodes_parses_the_nodes(alice: Terminal) -> None:
    nodes = alice.api.get_nodes()
    assert isinstance(nodes, list) and nodes
    assert {n.name for n in nodes} == {n.name for n in alice.native.nodes()}
    for node in nodes:
        assert_no_missing_fields(node)
        assert node.state_power.value in {"up", "down"}
        assert node.state_alloc.value in {"idle", "stopped", "offline", "busy", "maint"}
        assert isinstance(node.api_port, int) and isinstance(node.roles, list)
        counts = assert_resources(node.resources, {"cpus", "mem"})
        assert counts["cpus"] >= 1 and counts["mem"] > 0


def test_get_flavors_parses_flavors_with_resources_and_price(alice: Terminal, catalog: Catalog) -> None:
    flavor_list = alice.api.get_flavors()
    assert isinstance(flavor_list, list)
    remote_ids = {r.id for r in alice.api.get_remote_sites() or []}
    for flavor in flavor_list:
        assert_no_missing_fields(flavor)
        assert flavor.remote_id == "" or flavor.remote_id in remote_ids
        assert isinstance(flavor.price, int | float)
        assert_resources(flavor.resources, {"cpus", "mem"})
    (flavor,) = [f for f in flavor_list if f.name == catalog.flavor_name]
    assert flavor.remote_id == catalog.remote_id and flavor.price == 0.25
    counts = assert_resources(flavor.resources, {"cpus", "mem", "storage", "gpus"})
    assert counts == {"cpus": 4, "mem": 8 * 1024**3, "storage": 40 * 1024**3, "gpus": 1}


def test_get_images_parses_images(alice: Terminal, catalog: Catalog) -> None:
    image_list = alice.api.get_images()
    assert isinstance(image_list, list)
    remotes_with_flavors = {f.remote_id for f in alice.api.get_flavors() or []}
    for image in image_list:
        assert_no_missing_fields(image)
        assert image.kind in {"cloud", "container"}
        assert image.remote_id == "" or image.remote_id in remotes_with_flavors
    by_name = {i.name: i for i in image_list}
    assert (by_name[catalog.cloud_image_name].kind, by_name[catalog.cloud_image_name].remote_id) == (
        "cloud",
        catalog.remote_id,
    )
    assert by_name[catalog.container_image_name].kind == "container"
    assert by_name[catalog.container_image_name].remote_id == ""


def test_get_remote_sites_parses_remotes(alice: Terminal, catalog: Catalog) -> None:
    remotes = alice.api.get_remote_sites()
    assert isinstance(remotes, list)
    for remote in remotes:
        assert_no_missing_fields(remote)
        assert isinstance(remote.port, int)
    names = {r.name: r for r in remotes}
    assert "local" in names
    assert names[catalog.remote_name].id == catalog.remote_id
    assert len({r.id for r in remotes}) == len(remotes)


# ---------------------------------------------------------------------------------------------------
# The wire, as the clients see it


def _nulls(value: Any, where: str = "$") -> list[str]:
    if value is None:
        return [where]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _nulls(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in _nulls(v, f"{where}[{i}]")]
    return []


JOB_KEYS = {
    "id", "name", "state", "state_details", "submit_time", "start_time", "end_time", "duration", "exitcode",
    "signal", "node_names", "node_ips", "remote_id", "flavor_id", "request", "resources", "comment",
}  # fmt: skip
LIST_KEYS = {
    "/user/node": {"id", "name", "host", "api_port", "state_power", "state_alloc", "resources", "roles"},
    "/user/flavor": {"id", "name", "remote_id", "resources", "price"},
    "/user/image": {"id", "name", "remote_id", "kind", "comment"},
    "/user/remote": {
        "id", "name", "account_id", "server", "port", "kind", "default_image_id", "default_flavor_id",
    },
    "/user/job": JOB_KEYS,
}  # fmt: skip


def test_user_api_version(alice: Terminal, shared_core: CoreProcess) -> None:
    with alice.raw(shared_core.url) as http:
        reply = http.get("/user", headers={"Authorization": "Bearer swm", "Accept": "application/json"})
    assert reply.status_code == 200 and reply.json() == {"api_version": 1}


@pytest.mark.parametrize("path", sorted(LIST_KEYS))
def test_lists_are_top_level_arrays_with_every_field_and_no_null(
    path: str, alice: Terminal, shared_core: CoreProcess, catalog: Catalog, finished_job: str
) -> None:
    with alice.raw(shared_core.url) as http:
        reply = http.get(path)
        limited = http.get(path, params={"limit": 1})
    assert reply.status_code == 200 and limited.status_code == 200
    items = reply.json()
    assert isinstance(items, list) and items
    assert _nulls(items) == []
    for item in items:
        assert item.keys() >= LIST_KEYS[path], f"missing {LIST_KEYS[path] - item.keys()}"
    assert isinstance(limited.json(), list) and len(limited.json()) == 1


def test_single_job_has_every_field_and_no_null(
    alice: Terminal, shared_core: CoreProcess, finished_job: str
) -> None:
    with alice.raw(shared_core.url) as http:
        reply = http.get(f"/user/job/{finished_job}")
    assert reply.status_code == 200
    body = reply.json()
    assert body.keys() >= JOB_KEYS and _nulls(body) == []
    for resource in body["request"]:
        assert {"name", "count"} <= resource.keys() and isinstance(resource["count"], int)
