"""The ``openstack`` provisioner against a fake cloud that speaks the OpenStack APIs over real HTTP.

No compute emulator exists for OpenStack, so :class:`FakeCloud` replays recorded response bodies
(tests/data/openstack/responses.json: Keystone, Nova, Neutron and Glance as their API references show
them) with just enough state for servers and security groups to come and go. The provisioner runs
unpatched: openstacksdk reads a real ``clouds.yaml``, authenticates with an application credential,
discovers the services from the token's catalog and sends its requests to the fake, which records them.
The tests assert the request sequences, the bodies that matter (user data, metadata, group rules) and
how the cloud's errors (quota exceeded, no valid host) become partition states and job reasons.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from skyport.gates.cloud_common import CloudError
from skyport.gates.cloud_init import TOKEN_PATH, parse_user_data
from skyport.gates.openstack import OpenStackGate
from skyport.gates.provisioner import TAG_CORE, TAG_PARTITION, NodeBootstrap, PartitionRequest
from skyport.models import JobSpec, JobState
from tests.support.core import CoreProcess, wait_for

RECORDED = json.loads((Path(__file__).parent.parent / "data" / "openstack" / "responses.json").read_text())
CREDENTIAL_SECRET = "app-cred-secret-never-on-a-vm"


class FakeCloud:
    """A one-project OpenStack cloud on a free local port (see the module's docstring)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.servers: dict[str, dict[str, Any]] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        self.rules: list[dict[str, Any]] = []
        #: Injected behaviour: the next server creations fail with quota; new servers go to ERROR.
        self.quota_exceeded = False
        self.no_valid_host = False
        self.refuse_credentials = False
        self.lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def __enter__(self) -> FakeCloud:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()

    def clouds_yaml(self, path: Path) -> Path:
        path.write_text(
            "clouds:\n"
            "  lab:\n"
            "    auth_type: v3applicationcredential\n"
            "    auth:\n"
            f"      auth_url: {self.base}/identity/v3\n"
            "      application_credential_id: ac01\n"
            f"      application_credential_secret: {CREDENTIAL_SECRET}\n"
            "    region_name: RegionOne\n"
            "    interface: public\n"
            "    identity_api_version: 3\n"
        )
        return path

    def changes(self) -> list[tuple[str, str]]:
        """The requests that change something, in order (paths without ids)."""
        ids = re.compile(r"/[0-9a-f]{8}-[0-9a-f-]{27,}")
        return [(m, ids.sub("/{id}", p)) for m, p, _ in self.requests if m in ("POST", "PUT", "DELETE")]

    def bodies(self, method: str, path: str) -> list[Any]:
        return [b for m, p, b in self.requests if m == method and p == path]

    # -- HTTP ----------------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _do(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                url = urlsplit(self.path)
                cloud.requests.append((method, url.path, body))
                status, doc, headers = cloud.route(method, url.path, parse_qs(url.query), body)
                data = json.dumps(doc).replace("{base}", cloud.base).encode() if doc is not None else b""
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._do("GET")

            def do_POST(self) -> None:
                self._do("POST")

            def do_PUT(self) -> None:
                self._do("PUT")

            def do_DELETE(self) -> None:
                self._do("DELETE")

        return Handler

    def route(
        self, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any, dict[str, str]]:
        path = path.rstrip("/") or "/"
        with self.lock:
            return self._route(method, path, query, body)

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any, dict[str, str]]:
        key = (method, path)
        if key == ("POST", "/identity/v3/auth/tokens"):
            if self.refuse_credentials:
                return 401, RECORDED["unauthorized"], {}
            secret = body["auth"]["identity"]["application_credential"]["secret"]
            assert secret == CREDENTIAL_SECRET
            return 201, RECORDED["token"], {"X-Subject-Token": "gAAAA-token"}
        if key == ("GET", "/compute/v2.1"):
            return 200, RECORDED["compute_version"], {}
        if key == ("GET", "/compute"):
            return 200, RECORDED["compute_versions"], {}
        if key in (("GET", "/network"), ("GET", "/network/v2.0")):
            return 200, RECORDED["network_versions"], {}
        if key in (("GET", "/image"), ("GET", "/image/v2")):
            return 200, RECORDED["image_versions"], {}
        if key == ("GET", "/compute/v2.1/flavors/detail"):
            return 200, RECORDED["flavors"], {}
        if key == ("GET", "/compute/v2.1/limits"):
            return 200, RECORDED["limits"], {}
        if key in (("GET", "/compute/v2.1/servers/detail"), ("GET", "/compute/v2.1/servers")):
            listed = [dict(s) for s in self.servers.values()]
            self._tick()
            return 200, {"servers": listed}, {}
        if key == ("POST", "/compute/v2.1/servers"):
            return self._create_server(body["server"])
        if method == "DELETE" and path.startswith("/compute/v2.1/servers/"):
            server = self.servers.get(path.rsplit("/", 1)[1])
            if server is None:
                return 404, {"itemNotFound": {"code": 404, "message": "Instance could not be found."}}, {}
            server["OS-EXT-STS:task_state"] = "deleting"
            return 204, None, {}
        if key == ("GET", "/image/v2/images"):
            return 200, RECORDED["images"], {}
        if key == ("GET", "/network/v2.0/networks"):
            found = [n for n in RECORDED["networks"]["networks"] if _matches(n, query)]
            return 200, {"networks": found}, {}
        if key == ("GET", "/network/v2.0/security-groups"):
            found = [g for g in self.groups.values() if _matches(g, query)]
            return 200, {"security_groups": found}, {}
        if key == ("POST", "/network/v2.0/security-groups"):
            gid = str(uuid.uuid4())
            group = {
                "id": gid,
                "name": body["security_group"]["name"],
                "description": body["security_group"].get("description", ""),
                "project_id": "5f3e9d",
                "tenant_id": "5f3e9d",
                "tags": [],
                "stateful": True,
                # What Neutron gives every new group: egress only.
                "security_group_rules": [
                    {"id": str(uuid.uuid4()), "direction": "egress", "ethertype": e, "protocol": None}
                    for e in ("IPv4", "IPv6")
                ],
            }
            self.groups[gid] = group
            return 201, {"security_group": group}, {}
        match = re.fullmatch(r"/network/v2.0/security-groups/([^/]+)/tags", path)
        if method == "PUT" and match:
            self.groups[match.group(1)]["tags"] = list(body["tags"])
            return 200, {"tags": body["tags"]}, {}
        if key == ("POST", "/network/v2.0/security-group-rules"):
            rule = {"id": str(uuid.uuid4()), **body["security_group_rule"]}
            self.rules.append(rule)
            self.groups[rule["security_group_id"]]["security_group_rules"].append(rule)
            return 201, {"security_group_rule": rule}, {}
        match = re.fullmatch(r"/network/v2.0/security-groups/([^/]+)", path)
        if method == "DELETE" and match:
            if any(match.group(1) in str(s.get("security_groups")) for s in self.servers.values()):
                return 409, {"NeutronError": {"message": "Security Group in use."}}, {}
            self.groups.pop(match.group(1), None)
            return 204, None, {}
        return 404, {"error": f"the fake cloud has no {method} {path}"}, {}

    def _tick(self) -> None:
        """Nova moves on once a state has been seen: a building server boots, a deleted one goes."""
        for sid, server in list(self.servers.items()):
            if server["OS-EXT-STS:task_state"] == "deleting":
                del self.servers[sid]
            elif server["status"] == "BUILD":
                server["status"] = "ACTIVE"

    def _create_server(self, spec: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if self.quota_exceeded:
            return 403, RECORDED["quota_exceeded"], {}
        sid = str(uuid.uuid4())
        group_id = next(
            g["id"] for g in self.groups.values() if g["name"] == spec["security_groups"][0]["name"]
        )
        server = {
            "id": sid,
            "name": spec["name"],
            "status": "ERROR" if self.no_valid_host else "BUILD",
            "OS-EXT-STS:task_state": None,
            "OS-EXT-STS:vm_state": "building",
            "flavor": {"original_name": spec["flavorRef"]},
            "image": {"id": spec["imageRef"]},
            "metadata": spec.get("metadata", {}),
            "security_groups": [{"name": spec["security_groups"][0]["name"], "id": group_id}],
            "addresses": {
                "science-net": [
                    {"addr": f"10.0.0.{len(self.servers) + 10}", "version": 4, "OS-EXT-IPS:type": "fixed"}
                ]
            },
            "links": [],
        }
        if self.no_valid_host:
            server["fault"] = RECORDED["no_valid_host_fault"]
        self.servers[sid] = server
        return 202, {"server": {"id": sid, "links": [], "OS-DCF:diskConfig": "MANUAL", "adminPass": "x"}}, {}


def _matches(item: dict[str, Any], query: dict[str, list[str]]) -> bool:
    for key, values in query.items():
        if key in ("limit", "marker", "fields"):
            continue
        field = {"router:external": "router:external"}.get(key, key)
        if field in item and str(item[field]).lower() not in [v.lower() for v in values]:
            return False
    return True


@pytest.fixture
def cloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCloud]:
    with FakeCloud() as fake:
        monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(fake.clouds_yaml(tmp_path / "clouds.yaml")))
        for key in [
            k for k in __import__("os").environ if k.startswith("OS_") and k != "OS_CLIENT_CONFIG_FILE"
        ]:
            monkeypatch.delenv(key)
        yield fake


def _gate(**settings: Any) -> OpenStackGate:
    return OpenStackGate(
        "lab",
        {
            "name": "lab",
            "cloud": "lab",
            "prices": {"m1.small": 0.02, "m1.large": 0.09, "g1.a100": 3.1},
            "default_image": "ubuntu-24.04-skyport",
            **settings,
        },
    )


def _request(partition_id: str = "p1", nodes: int = 2, ports: list[int] | None = None) -> PartitionRequest:
    return PartitionRequest(
        partition_id=partition_id,
        name=f"sp-{partition_id}",
        flavor="2",
        image=None,
        nodes=[
            NodeBootstrap(f"sp-{partition_id}-{i}", "https://core:8443", "CA PEM", f"token-{i}")
            for i in range(nodes)
        ],
        ports=ports or [],
        tags={TAG_PARTITION: partition_id, TAG_CORE: "core-1"},
    )


async def test_the_catalog_has_priced_flavors_with_gpus_and_the_active_images(cloud: FakeCloud) -> None:
    gate = _gate(images=["debian-12"])
    try:
        catalog = await gate.catalog()
    finally:
        await gate.close()
    flavors = {f.id: f for f in catalog.flavors}
    assert sorted(flavors) == ["1", "2", "7"], "an unpriced flavor is not offered"
    assert flavors["7"].gpus == 2 and flavors["7"].name == "g1.a100 (2x a100)" and flavors["7"].price == 3.1
    large = flavors["2"]
    assert (large.cpus, large.mem, large.storage) == (4, 8 * 1024**3, 100 * 1024**3)
    assert sorted(i.name for i in catalog.images) == ["debian-12", "ubuntu-24.04-skyport"]


async def test_a_partition_is_a_closed_group_and_one_server_per_node_and_is_deleted_for_good(
    cloud: FakeCloud,
) -> None:
    gate = _gate()
    try:
        status = await gate.create_partition(_request(ports=[8888]))
        assert status.state == "creating" and [n.name for n in status.nodes] == ["sp-p1-0", "sp-p1-1"]
        assert cloud.changes() == [
            ("POST", "/identity/v3/auth/tokens"),
            ("POST", "/network/v2.0/security-groups"),
            ("PUT", "/network/v2.0/security-groups/{id}/tags"),
            ("POST", "/compute/v2.1/servers"),
            ("POST", "/compute/v2.1/servers"),
        ], "no rule: the group opens no inbound port (the remote does not expose ports)"
        group = next(iter(cloud.groups.values()))
        assert group["name"] == "skyport-p1" and f"{TAG_PARTITION}=p1" in group["tags"]
        assert [r["direction"] for r in group["security_group_rules"]] == ["egress", "egress"]
        for index, body in enumerate(cloud.bodies("POST", "/compute/v2.1/servers")):
            server = body["server"]
            assert (
                server["metadata"][TAG_PARTITION] == "p1"
                and server["metadata"]["skyport-node"] == f"sp-p1-{index}"
            )
            assert server["security_groups"] == [{"name": "skyport-p1"}] and server["flavorRef"] == "2"
            user_data = parse_user_data(base64.b64decode(server["user_data"]).decode())
            assert user_data["files"][TOKEN_PATH].strip() == f"token-{index}"
            assert CREDENTIAL_SECRET not in json.dumps(body), "no provider credential goes to a VM"

        before = len(cloud.changes())
        again = await gate.create_partition(_request(ports=[8888]))
        assert again.state == "creating" and len(cloud.changes()) == before, "creation is idempotent"

        ready = await gate.get_partition("p1")
        assert ready is not None and ready.state == "ready"
        assert [n.private_ip for n in ready.nodes] == ["10.0.0.10", "10.0.0.11"]
        assert [s.partition_id for s in await gate.list_partitions()] == ["p1"]

        await gate.delete_partition("p1")
        deleting = await gate.get_partition("p1")
        assert deleting is not None and deleting.state == "deleting"
        assert cloud.changes()[before:] == [("DELETE", "/compute/v2.1/servers/{id}")] * 2
        await gate.delete_partition("p1")
        assert cloud.changes()[-1] == ("DELETE", "/network/v2.0/security-groups/{id}")
        assert await gate.get_partition("p1") is None and await gate.list_partitions() == []
    finally:
        await gate.close()


async def test_exposed_ports_open_exactly_the_declared_ports(cloud: FakeCloud) -> None:
    gate = _gate(expose_ports=True, expose_cidrs=["192.0.2.0/24"])
    try:
        await gate.create_partition(_request(ports=[8888, 6006]))
    finally:
        await gate.close()
    rules = [(r["direction"], r["protocol"], r["port_range_min"], r["remote_ip_prefix"]) for r in cloud.rules]
    assert sorted(rules) == [
        ("ingress", "tcp", 6006, "192.0.2.0/24"),
        ("ingress", "tcp", 8888, "192.0.2.0/24"),
    ]


async def test_quota_exceeded_is_a_permanent_error_with_novas_words(cloud: FakeCloud) -> None:
    cloud.quota_exceeded = True
    gate = _gate()
    try:
        with pytest.raises(CloudError) as caught:
            await gate.create_partition(_request())
    finally:
        await gate.close()
    assert caught.value.reason == "quota" and not caught.value.transient
    assert str(caught.value) == "Quota exceeded for cores: Requested 4, but already used 20 of 20 cores"


async def test_no_valid_host_fails_the_partition_with_the_fault(cloud: FakeCloud) -> None:
    cloud.no_valid_host = True
    gate = _gate()
    try:
        await gate.create_partition(_request(nodes=1))
        status = await gate.get_partition("p1")
    finally:
        await gate.close()
    assert status is not None and status.state == "failed"
    assert status.message == "server sp-p1-0: No valid host was found. There are not enough hosts available."


async def test_the_check_reports_identity_roles_and_quota_and_creates_nothing(cloud: FakeCloud) -> None:
    gate = _gate()
    try:
        report = await gate.check()
    finally:
        await gate.close()
    assert report.ok and report.identity == "user skyport-core in project science", report
    items = {i.name: i for i in report.items}
    assert items["role member on the project"].detail == "roles: member, reader"
    assert items["compute: quota"].detail == "instances 5/10, cores 20/20, RAM MiB 40960/51200"
    assert items["network"].detail == "b8f9a1c2-4d5e-4f60-8a71-92b3c4d5e6f7", "the project's own network"
    assert cloud.changes() == [("POST", "/identity/v3/auth/tokens")]


async def test_refused_credentials_are_reported_by_the_check(cloud: FakeCloud) -> None:
    cloud.refuse_credentials = True
    gate = _gate()
    try:
        report = await gate.check()
    finally:
        await gate.close()
    assert not report.ok and report.items[0].name == "credentials"
    assert "refused the credentials" in report.items[0].detail


def test_provider_errors_fail_jobs_with_provision_failed_and_the_clouds_words(
    cloud: FakeCloud, tmp_path: Path
) -> None:
    """Through a real core: quota exceeded and no valid host each fail the job (``provision_failed``)
    with the cloud's own words, and whatever was made is deleted."""
    remote = {
        "kind": "openstack",
        "name": "lab",
        "cloud": "lab",
        "prices": {"m1.small": 0.02},
        "default_image": "debian-12",
        "backoff_s": 0.1,
        "attempts": 2,
        "idle_timeout_s": 0,
    }
    env = {
        "SKYPORT_REMOTES": json.dumps([remote]),
        "SKYPORT_LOCAL__ENABLED": "false",
        "OS_CLIENT_CONFIG_FILE": str(tmp_path / "clouds.yaml"),
    }
    core = CoreProcess(tmp_path / "home", env=env)
    try:
        core.start()
        c = core.client()
        assert [f.name for f in c.flavors()] == ["m1.small"]
        for fault, words in (
            ("quota_exceeded", "Quota exceeded for cores: Requested 4, but already used 20 of 20 cores"),
            ("no_valid_host", "No valid host was found. There are not enough hosts available."),
        ):
            cloud.quota_exceeded, cloud.no_valid_host = fault == "quota_exceeded", fault == "no_valid_host"
            job = c.submit(JobSpec(command=["true"], flavor="m1.small"))

            def ended(job_id: str = job.id) -> Any:
                found = c.job(job_id)
                return found if found.state.terminal else None

            done = wait_for(ended, 60, f"job to fail:\n{core.log()[-3000:]}")
            assert done.state is JobState.FAILED and done.reason == "provision_failed", done
            assert words in done.state_details, done.state_details
            wait_for(lambda: not cloud.servers and not cloud.groups, 30, "what was made to be deleted")
        assert CREDENTIAL_SECRET not in core.log()
    finally:
        core.cleanup()
