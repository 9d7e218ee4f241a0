"""The ``azure`` provisioner through the Azure SDK's own transport abstraction, against recorded responses.

No compute emulator exists for Azure. The gate runs unpatched with the real azure-mgmt-compute and
azure-mgmt-network clients; only the bottom of azure-core's pipeline is swapped: a ``RequestsTransport``
whose requests session has a ``requests-mock`` adapter, answered by :class:`FakeARM` — Azure Resource
Manager with just enough state for VMs and network security groups to come and go, built from the
bodies Azure sends (tests/data/azure/responses.json). The tests assert the request sequences, the bodies
that matter (customData, NSG rules, spot), and how Azure's errors (quota exceeded, SKU not available,
allocation failed) and a spot eviction become errors and partition states the provisioning loop maps to
job reasons.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import requests_mock
from azure.core.credentials import AccessToken
from azure.core.pipeline.transport import RequestsTransport

from skyport.gates.azure import AzureGate, allowed
from skyport.gates.cloud_common import PREEMPTED, TAG_PREEMPTIBLE, CloudError
from skyport.gates.cloud_init import TOKEN_PATH, parse_user_data
from skyport.gates.provisioner import TAG_CORE, TAG_PARTITION, NodeBootstrap, PartitionRequest

RECORDED = json.loads((Path(__file__).parent.parent / "data" / "azure" / "responses.json").read_text())
SUB = "sub-1"
RG = "skyport"
SUBNET = (
    f"/subscriptions/{SUB}/resourceGroups/net/providers/Microsoft.Network/virtualNetworks/vnet/subnets/nodes"
)
ARM = f"https://management.azure.com/subscriptions/{SUB}"
RG_PATH = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers"


class FakeCredential:
    """An Azure identity that hands out a token with readable claims (as a service principal's)."""

    def __init__(self) -> None:
        claims = {"appid": "0c1d-skyport", "tid": "tenant-1", "oid": "a1b2c3"}
        payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        self.token = f"eyJhbGciOiJub25lIn0.{payload}.sig"

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self.token, int(time.time()) + 3600)


class FakeARM:
    """Azure Resource Manager for one resource group, and the retail prices API (see the docstring)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.vms: dict[str, dict[str, Any]] = {}
        self.nsgs: dict[str, dict[str, Any]] = {}
        #: Injected behaviour of the next VM creations.
        self.fault: str | None = None
        self.permissions: list[dict[str, Any]] = [
            {
                "actions": [
                    "Microsoft.Compute/virtualMachines/*",
                    "Microsoft.Compute/disks/delete",
                    "Microsoft.Network/networkSecurityGroups/*",
                    "Microsoft.Network/networkInterfaces/*",
                    "Microsoft.Network/publicIPAddresses/*",
                    "Microsoft.Network/virtualNetworks/subnets/join/action",
                ],
                "notActions": [],
            }
        ]
        self.adapter = requests_mock.Adapter()
        self.adapter.add_matcher(self._answer)

    def session(self) -> requests.Session:
        session = requests.Session()
        session.mount("https://", self.adapter)
        return session

    def changes(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, _ in self.requests if m in ("PUT", "DELETE", "POST")]

    def body(self, method: str, path: str) -> Any:
        return next(b for m, p, b in self.requests if m == method and p == path)

    def _answer(self, request: Any) -> requests.Response:
        url = urlsplit(request.url)
        body = json.loads(request.body) if request.body else None
        self.requests.append((request.method, url.path, body))
        status, doc = self._route(request.method, url.hostname or "", url.path, parse_qs(url.query), body)
        return requests_mock.create_response(
            request,
            status_code=status,
            json=doc,
            headers={"x-ms-request-id": "r1"} if doc is not None else {},
        )

    def _route(
        self, method: str, host: str, path: str, query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        if host == "prices.azure.com":
            if "$skip" in query:  # the NextPageLink of the first page
                return 200, RECORDED["retail_prices_page2"]
            assert "armRegionName eq 'westeurope'" in query["$filter"][0]
            return 200, RECORDED["retail_prices_page1"]
        vm = re.fullmatch(rf"{RG_PATH}/Microsoft.Compute/virtualMachines(?:/([^/]+))?", path)
        nsg = re.fullmatch(rf"{RG_PATH}/Microsoft.Network/networkSecurityGroups(?:/([^/]+))?", path)
        if vm and method == "GET" and not vm.group(1):
            listed = [json.loads(json.dumps(v)) for v in self.vms.values()]
            self._tick()
            return 200, {"value": listed}
        if vm and method == "PUT":
            return self._create_vm(vm.group(1), body)
        if vm and method == "DELETE":
            self.vms[vm.group(1)]["properties"]["provisioningState"] = "Deleting"
            return 202, None
        if nsg and method == "GET" and not nsg.group(1):
            return 200, {"value": list(self.nsgs.values())}
        if nsg and method == "PUT":
            name = nsg.group(1)
            self.nsgs[name] = {
                "id": f"{RG_PATH}/Microsoft.Network/networkSecurityGroups/{name}",
                "name": name,
                "location": body["location"],
                "tags": body["tags"],
                "properties": {**body["properties"], "provisioningState": "Succeeded"},
            }
            return 201, self.nsgs[name]
        if nsg and method == "DELETE":
            self.nsgs.pop(nsg.group(1), None)
            return 202, None
        if path == f"/subscriptions/{SUB}/providers/Microsoft.Compute/skus":
            return 200, RECORDED["resource_skus"]
        if path == f"/subscriptions/{SUB}/providers/Microsoft.Compute/locations/westeurope/usages":
            return 200, RECORDED["usages"]
        if path.endswith("/providers/Microsoft.Authorization/permissions"):
            return 200, {"value": self.permissions}
        if "/artifacttypes/vmimage/offers/ubuntu-24_04-lts/skus/server/versions" in path.lower():
            return 200, RECORDED["image_versions"]
        return 404, {"error": {"code": "NotFound", "message": f"the fake has no {method} {path}"}}

    def _create_vm(self, name: str, body: dict[str, Any]) -> tuple[int, Any]:
        if self.fault == "quota":
            return 409, RECORDED["quota_exceeded"]
        if self.fault == "sku":
            return 409, RECORDED["sku_not_available"]
        if self.fault == "forbidden":
            return 403, RECORDED["authorization_failed"]
        vm = {
            "id": f"{RG_PATH}/Microsoft.Compute/virtualMachines/{name}",
            "name": name,
            "type": "Microsoft.Compute/virtualMachines",
            "location": body["location"],
            "tags": body["tags"],
            "properties": {**body["properties"], "provisioningState": "Creating", "vmId": f"vm-{name}"},
        }
        vm["properties"]["osProfile"] = {
            k: v for k, v in body["properties"]["osProfile"].items() if k != "customData"
        }
        self.vms[name] = vm
        return 201, vm

    def _tick(self) -> None:
        """Azure moves on once a state has been seen."""
        for name, vm in list(self.vms.items()):
            props = vm["properties"]
            if props["provisioningState"] == "Deleting":
                del self.vms[name]
            elif props["provisioningState"] == "Creating" and self.fault == "allocation":
                props["provisioningState"] = "Failed"
                props["instanceView"] = {"statuses": [RECORDED["allocation_failed_status"]]}
            elif props["provisioningState"] == "Creating":
                props["provisioningState"] = "Succeeded"
                props["instanceView"] = {
                    "statuses": [
                        {"code": "ProvisioningState/succeeded", "level": "Info"},
                        {"code": "PowerState/running", "level": "Info"},
                    ]
                }

    def evict(self, name: str) -> None:
        self.vms[name]["properties"]["instanceView"]["statuses"][1]["code"] = "PowerState/deallocated"


@pytest.fixture
def arm() -> Iterator[FakeARM]:
    yield FakeARM()


def _gate(arm: FakeARM, home: Path | None = None, **settings: Any) -> AzureGate:
    values = {
        "name": "az",
        "subscription_id": SUB,
        "resource_group": RG,
        "location": "westeurope",
        "subnet_id": SUBNET,
        "default_image": "Canonical:ubuntu-24_04-lts:server:latest",
        "prices": {"Standard_NC24ads_A100_v4": 3.67},
        **settings,
    }
    return AzureGate(
        "az",
        values,
        home=home,
        credential=FakeCredential(),
        transport=RequestsTransport(session=arm.session()),
        prices_session=arm.session(),
    )


def _request(nodes: int = 2, ports: list[int] | None = None, **tags: str) -> PartitionRequest:
    return PartitionRequest(
        partition_id="p1",
        name="sp-p1",
        flavor="Standard_D2s_v5",
        image=None,
        nodes=[
            NodeBootstrap(f"sp-p1-{i}", "https://core:8443", "CA PEM", f"token-{i}") for i in range(nodes)
        ],
        ports=ports or [],
        tags={TAG_PARTITION: "p1", TAG_CORE: "core-1", **tags},
    )


async def test_the_catalog_prices_sizes_from_the_retail_prices_api_and_caches_them(
    arm: FakeARM, tmp_path: Path
) -> None:
    gate = _gate(arm, home=tmp_path)
    try:
        catalog = await gate.catalog()
    finally:
        await gate.close()
    flavors = {f.id: f for f in catalog.flavors}
    assert sorted(flavors) == ["Standard_D2s_v5", "Standard_D4s_v5", "Standard_NC24ads_A100_v4"]
    assert flavors["Standard_D2s_v5"].price == 0.096, "Linux pay-as-you-go: not Windows, spot or reserved"
    assert flavors["Standard_D4s_v5"].price == 0.192, "the second page of the API"
    a100 = flavors["Standard_NC24ads_A100_v4"]
    assert (a100.cpus, a100.mem, a100.gpus, a100.price) == (24, 220 * 1024**3, 1, 3.67), "the table wins"
    assert [i.id for i in catalog.images] == ["Canonical:ubuntu-24_04-lts:server:latest"]
    price_calls = sum(1 for m, p, _ in arm.requests if p == "/api/retail/prices")
    assert price_calls == 2

    cached = _gate(arm, home=tmp_path)  # a restarted core: prices from the cache file, no API call
    try:
        again = await cached.catalog()
    finally:
        await cached.close()
    assert {f.id: f.price for f in again.flavors} == {f.id: f.price for f in catalog.flavors}
    assert sum(1 for m, p, _ in arm.requests if p == "/api/retail/prices") == price_calls


async def test_stale_prices_are_served_at_once_and_refreshed_in_the_background(
    arm: FakeARM, tmp_path: Path
) -> None:
    cache = tmp_path / "cache" / "prices-azure-az.json"
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"at": 0, "value": {"Standard_D2s_v5": 0.5}}))  # from long ago
    gate = _gate(arm, home=tmp_path)
    try:
        first = await gate.catalog()
        assert {f.id: f.price for f in first.flavors}["Standard_D2s_v5"] == 0.5, "the stale price, at once"

        async def fresh() -> bool:
            catalog = await gate.catalog()  # never waits for the price API
            return {f.id: f.price for f in catalog.flavors}["Standard_D2s_v5"] == 0.096

        deadline = time.monotonic() + 10
        while not await fresh():
            assert time.monotonic() < deadline, "the background refresh never landed"
            await asyncio.sleep(0.05)  # polling a condition with a deadline
    finally:
        await gate.close()
    assert json.loads(cache.read_text())["value"]["Standard_D2s_v5"] == 0.096, "and the cache file is new"


async def test_a_partition_is_a_closed_nsg_and_one_vm_per_node_and_is_deleted_for_good(arm: FakeARM) -> None:
    gate = _gate(arm)
    try:
        status = await gate.create_partition(_request(ports=[8888]))
        assert status.state == "creating" and [n.name for n in status.nodes] == ["sp-p1-0", "sp-p1-1"]
        nsg_path = f"{RG_PATH}/Microsoft.Network/networkSecurityGroups/skyport-p1-nsg"
        vm_path = f"{RG_PATH}/Microsoft.Compute/virtualMachines/sp-p1-"
        assert arm.changes() == [("PUT", nsg_path), ("PUT", vm_path + "0"), ("PUT", vm_path + "1")]
        rules = arm.body("PUT", nsg_path)["properties"]["securityRules"]
        assert [(r["name"], r["properties"]["access"]) for r in rules] == [("deny-all-inbound", "Deny")], (
            "no port is open: the remote does not expose ports"
        )
        for index in range(2):
            vm = arm.body("PUT", vm_path + str(index))
            props = vm["properties"]
            assert vm["tags"][TAG_PARTITION] == "p1" and vm["tags"]["skyport-node"] == f"sp-p1-{index}"
            user_data = parse_user_data(base64.b64decode(props["osProfile"]["customData"]).decode())
            assert user_data["files"][TOKEN_PATH].strip() == f"token-{index}"
            nic = props["networkProfile"]["networkInterfaceConfigurations"][0]["properties"]
            assert (
                nic["networkSecurityGroup"]["id"].endswith("/skyport-p1-nsg")
                and nic["deleteOption"] == "Delete"
            )
            assert props["storageProfile"]["imageReference"] == {
                "publisher": "Canonical",
                "offer": "ubuntu-24_04-lts",
                "sku": "server",
                "version": "latest",
            }
            assert "identity" not in vm and "priority" not in props, "no managed identity; on-demand"
            assert props["osProfile"]["linuxConfiguration"]["disablePasswordAuthentication"] is True

        before = len(arm.changes())
        assert (await gate.create_partition(_request())).state == "creating"
        assert len(arm.changes()) == before, "creation is idempotent"
        ready = await gate.get_partition("p1")
        assert ready is not None and ready.state == "ready" and ready.message == "2 VM(s) running"
        assert [s.partition_id for s in await gate.list_partitions()] == ["p1"]

        await gate.delete_partition("p1")
        assert arm.changes()[before:] == [("DELETE", vm_path + "0"), ("DELETE", vm_path + "1")]
        deleting = await gate.get_partition("p1")
        assert deleting is not None and deleting.state == "deleting"
        await gate.delete_partition("p1")
        assert arm.changes()[-1] == ("DELETE", nsg_path)
        assert await gate.get_partition("p1") is None and not arm.vms and not arm.nsgs
    finally:
        await gate.close()


async def test_exposed_ports_are_the_only_inbound_rules_and_spot_when_the_job_allows_it(arm: FakeARM) -> None:
    gate = _gate(arm, expose_ports=True, expose_cidrs=["192.0.2.0/24"])
    try:
        await gate.create_partition(_request(nodes=1, ports=[8888], **{TAG_PREEMPTIBLE: "true"}))
        arm._tick()
        arm.evict("sp-p1-0")
        status = await gate.get_partition("p1")
    finally:
        await gate.close()
    nsg = next(iter(arm.nsgs.values()))
    rules = sorted(
        (r["properties"]["priority"], r["properties"]["access"], r["properties"]["destinationPortRange"])
        for r in nsg["properties"]["securityRules"]
    )
    assert rules == [(1000, "Allow", "8888"), (4096, "Deny", "*")]
    props = arm.body("PUT", f"{RG_PATH}/Microsoft.Compute/virtualMachines/sp-p1-0")["properties"]
    assert (props["priority"], props["evictionPolicy"], props["billingProfile"]) == (
        "Spot",
        "Deallocate",
        {"maxPrice": -1},
    )
    assert status is not None and status.state == "failed" and getattr(status, "reason", "") == PREEMPTED
    assert status.message == "preempted: Azure evicted spot VM sp-p1-0"


@pytest.mark.parametrize(
    ("fault", "reason", "transient", "words"),
    [
        (
            "quota",
            "quota",
            False,
            "OperationNotAllowed: Operation could not be completed as it results in exceeding",
        ),
        ("sku", "capacity", True, "SkuNotAvailable: The requested VM size for resource"),
        ("forbidden", "auth", False, "AuthorizationFailed: The client 'a1b2c3'"),
    ],
)
async def test_azure_errors_keep_azures_words_and_say_whether_retrying_helps(
    arm: FakeARM, fault: str, reason: str, transient: bool, words: str
) -> None:
    """Quota: the job fails at once (``provision_failed``); no capacity now: the loop retries with
    backoff (``attempts``) before it fails the job; permissions: fails at once."""
    arm.fault = fault
    gate = _gate(arm)
    try:
        with pytest.raises(CloudError) as caught:
            await gate.create_partition(_request(nodes=1))
    finally:
        await gate.close()
    assert caught.value.reason == reason and caught.value.transient is transient
    assert str(caught.value).startswith(words), str(caught.value)


async def test_allocation_failed_after_acceptance_fails_the_partition_with_azures_words(arm: FakeARM) -> None:
    arm.fault = "allocation"
    gate = _gate(arm)
    try:
        await gate.create_partition(_request(nodes=1))
        first = await gate.get_partition("p1")
        status = await gate.get_partition("p1")
    finally:
        await gate.close()
    assert first is not None and first.state == "creating", "Azure accepted the VM"
    assert status is not None and status.state == "failed" and getattr(status, "reason", "") == ""
    assert status.message.startswith(
        "VM sp-p1-0: AllocationFailed: Allocation failed. We do not have sufficient"
    )


async def test_the_check_verifies_role_actions_quota_and_image_reading_only(arm: FakeARM) -> None:
    gate = _gate(arm)
    try:
        report = await gate.check()
        assert report.ok and report.identity == "0c1d-skyport (tenant tenant-1)", report
        details = {i.name: i.detail for i in report.items}
        assert details["Microsoft.Compute/locations/usages/read (quota)"] == "regional vCPUs 8/10"
        assert details["default image"] == "Canonical:ubuntu-24_04-lts:server:latest"
        scopes = {p for m, p, _ in arm.requests if p.endswith("/permissions")}
        assert scopes == {
            f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Authorization/permissions",
            f"/subscriptions/{SUB}/resourceGroups/net/providers/Microsoft.Authorization/permissions",
        }, "the resource group's and the subnet's"
        assert arm.changes() == [], "the check changes nothing"

        arm.permissions[0]["notActions"] = ["Microsoft.Network/networkSecurityGroups/delete"]
        refused = await gate.check()
    finally:
        await gate.close()
    assert not refused.ok
    assert [i.name for i in refused.items if not i.ok] == ["Microsoft.Network/networkSecurityGroups/delete"]


def test_permission_wildcards_and_not_actions() -> None:
    rules = [{"actions": ["*"], "notActions": ["Microsoft.Authorization/*/Write"]}]  # Contributor
    assert allowed("Microsoft.Compute/virtualMachines/write", rules)
    assert not allowed("Microsoft.Authorization/roleAssignments/write", rules)
    assert not allowed(
        "Microsoft.Compute/virtualMachines/delete", [{"actions": ["*/read"], "notActions": []}]
    )
