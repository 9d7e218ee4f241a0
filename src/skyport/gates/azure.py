"""The ``azure`` provisioner: partitions of Azure VMs, through the Azure SDK
(``pip install 'skyport-wm[azure]'``: azure-identity, azure-mgmt-compute, azure-mgmt-network).

Everything lives in one existing resource group (``resource_group``), so the remote's role can be scoped
to it. A partition is one network security group ``skyport-<our id>-nsg`` and one VM per node (named
after the node), all tagged ``skyport-partition=<id>``, ``skyport-core=<core id>``; each VM makes its own
network interface (and public IP with ``public_ip``) with ``deleteOption: Delete``, and its OS disk too,
so deleting a VM leaves nothing of it behind.

- **Create** (idempotent: found by name and tag first): the NSG denies every inbound connection
  (``deny-all-inbound`` at priority 4096 overrides Azure's default rules that let the virtual network
  in); only the job's declared ``in`` ports are allowed (from ``expose_cidrs``) when the remote has
  ``expose_ports``, and the virtual network with ``internal_traffic``. Each VM gets its node's
  cloud-init as ``customData``, an admin account whose only SSH key is thrown away at once (Azure wants
  one; nobody can log in), no managed identity: no Azure credential reaches a VM. Spot (``priority
  Spot``, evicted by deallocation, up to the on-demand price) when the job allows it and ``spot`` agrees.
- **Status**: from the VMs' provisioning and power states (one list call, with instance views); a spot
  VM Azure deallocated makes the partition ``failed`` with reason ``preempted``; a failed provisioning
  carries Azure's code and words (``AllocationFailed: ...``).
- **Delete**: delete the VMs; once none is left, the NSG. Gone (None) when neither exists.
- **Catalog**: the VM sizes offered in ``location`` (resource SKUs: vCPUs, memory, GPUs, temporary
  disk; sizes restricted for the subscription left out), priced by ``prices``, else the public retail
  prices API (Linux, pay-as-you-go; cached in the home for ``price_cache_max_age_s``), else
  ``default_price``. Images: ``images`` and ``default_image``, as URNs (``publisher:offer:sku:version``)
  or resource ids of custom or gallery images.

Credentials: Azure identity on the core's host (``credential``: environment, workload identity, managed
identity, Azure CLI; ``default`` tries them in that order). Every call runs in the gate's thread pool
under ``call_timeout_s``; no call waits for a long-running operation (our state machine polls).
"""

from __future__ import annotations

import base64
import fnmatch
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import structlog

from skyport.gates.cloud_common import (
    PREEMPTED,
    PRICE_WAIT_S,
    TAG_NODE,
    TAG_NODES,
    Cached,
    CheckItem,
    CloudError,
    CloudPartitionStatus,
    RemoteCheck,
    SDKRunner,
    node_count,
    price_cache_path,
    price_for,
    wants_spot,
)
from skyport.gates.cloud_init import render_user_data
from skyport.gates.provisioner import (
    TAG_PARTITION,
    Catalog,
    CatalogFlavor,
    CatalogImage,
    PartitionRequest,
    PartitionStatus,
    ProvisionedNode,
)
from skyport.server.settings import AzureRemoteSettings

log = structlog.get_logger(__name__)

MIB = 1024**2
GIB = 1024**3
RETAIL_PRICES_URL = "https://prices.azure.com/api/retail/prices"
ADMIN_USER = "skyportadmin"
NSG_SUFFIX = "-nsg"

_QUOTA = {"QuotaExceeded", "PublicIPCountLimitReached", "ResourceQuotaExceeded", "SubscriptionQuotaExceeded"}
_CAPACITY = {
    "AllocationFailed",
    "ZonalAllocationFailed",
    "OverconstrainedAllocationRequest",
    "OverconstrainedZonalAllocationRequest",
    "SkuNotAvailable",
    "SpotCapacityNotAvailable",
}
_AUTH = {
    "AuthorizationFailed",
    "LinkedAuthorizationFailed",
    "InvalidAuthenticationToken",
    "AuthenticationFailed",
}

#: What the remote does, as Azure RBAC actions (``skyport remotes check`` verifies them).
REQUIRED_ACTIONS = (
    "Microsoft.Compute/virtualMachines/read",
    "Microsoft.Compute/virtualMachines/write",
    "Microsoft.Compute/virtualMachines/delete",
    "Microsoft.Compute/disks/delete",
    "Microsoft.Network/networkSecurityGroups/read",
    "Microsoft.Network/networkSecurityGroups/write",
    "Microsoft.Network/networkSecurityGroups/delete",
    "Microsoft.Network/networkSecurityGroups/join/action",
    "Microsoft.Network/networkInterfaces/write",
    "Microsoft.Network/networkInterfaces/delete",
    "Microsoft.Network/networkInterfaces/join/action",
)
PUBLIC_IP_ACTIONS = (
    "Microsoft.Network/publicIPAddresses/write",
    "Microsoft.Network/publicIPAddresses/delete",
    "Microsoft.Network/publicIPAddresses/join/action",
)
SUBNET_ACTIONS = ("Microsoft.Network/virtualNetworks/subnets/join/action",)


def classify(exc: Exception, what: str) -> CloudError:
    """An azure-core/azure-identity exception as a :class:`CloudError` with Azure's code and words."""
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
        ServiceRequestError,
        ServiceResponseError,
    )

    if isinstance(exc, CloudError):
        return exc
    if isinstance(exc, ClientAuthenticationError) and getattr(exc, "status_code", None) is None:
        return CloudError(f"no usable Azure credential on the core's host: {_first_line(exc)}", reason="auth")
    if isinstance(exc, HttpResponseError):
        error = getattr(exc, "error", None)
        code = str(getattr(error, "code", None) or "")
        message = str(getattr(error, "message", None) or exc.message or exc.reason or "")
        message = message.strip()[:500]
        text = f"{code}: {message}" if code else message
        status = int(exc.status_code or 0)
        if code in _QUOTA or (code == "OperationNotAllowed" and "quota" in message.lower()):
            return CloudError(text, reason="quota")
        if code in _CAPACITY:
            return CloudError(text, reason="capacity")
        if status == 429 or status >= 500:
            return CloudError(f"{text} ({what})", reason="throttled")
        if code in _AUTH or status in (401, 403):
            return CloudError(f"{text} ({what})", reason="auth")
        if isinstance(exc, ResourceNotFoundError) or status == 404:
            return CloudError(text, reason="not_found")
        return CloudError(text, reason="invalid")
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return CloudError(f"cannot reach Azure for {what}: {_first_line(exc)}", reason="throttled")
    return CloudError(f"{what}: {_first_line(exc)}", reason="provider")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]


def _props(resource: Mapping[str, Any]) -> dict[str, Any]:
    props: dict[str, Any] = resource.get("properties") or {}
    return props


def _statuses(vm: Mapping[str, Any]) -> list[dict[str, Any]]:
    view = _props(vm).get("instanceView") or {}
    return list(view.get("statuses") or [])


def _power(vm: Mapping[str, Any]) -> str:
    for status in _statuses(vm):
        code = str(status.get("code", ""))
        if code.startswith("PowerState/"):
            return code.removeprefix("PowerState/")
    return ""


def _failure(vm: Mapping[str, Any]) -> str:
    for status in _statuses(vm):
        code = str(status.get("code", ""))
        if code.startswith("ProvisioningState/failed"):
            reason = code.removeprefix("ProvisioningState/failed/") or "failed"
            return f"{reason}: {status.get('message') or status.get('displayStatus') or ''}".strip()
    return "provisioning failed"


def partition_status(
    partition_id: str, vms: Sequence[Mapping[str, Any]], groups: Sequence[Mapping[str, Any]]
) -> CloudPartitionStatus | None:
    """Where a partition is, from its VMs (with instance views) and NSGs (None: nothing is left)."""
    if not vms and not groups:
        return None
    tags: dict[str, str] = {}
    for resource in [*groups, *vms]:
        tags.update({k: v for k, v in (resource.get("tags") or {}).items() if k.startswith("skyport-")})
    tags.pop(TAG_NODE, None)
    ordered = sorted(vms, key=lambda v: str((v.get("tags") or {}).get(TAG_NODE, v.get("name"))))
    nodes = [
        ProvisionedNode(
            name=str((v.get("tags") or {}).get(TAG_NODE, v.get("name"))), provider_id=str(v.get("id", ""))
        )
        for v in ordered
    ]
    provider_id = str(groups[0].get("id", "")) if groups else ""

    def status(state: Any, message: str, reason: str = "") -> CloudPartitionStatus:
        return CloudPartitionStatus(
            partition_id=partition_id,
            state=state,
            provider_id=provider_id,
            message=message,
            nodes=nodes,
            tags=tags,
            reason=reason,
        )

    if not vms:
        return status("deleting", "its VMs are deleted; its network security group is left")
    for vm in ordered:
        name = str(vm.get("name"))
        spot = str(_props(vm).get("priority", "")).lower() == "spot"
        if (
            spot
            and _power(vm) in ("deallocated", "deallocating")
            and _props(vm).get("provisioningState") != "Deleting"
        ):
            return status("failed", f"preempted: Azure evicted spot VM {name}", PREEMPTED)
    if any(_props(v).get("provisioningState") == "Deleting" for v in vms):
        return status("deleting", "its VMs are being deleted")
    for vm in ordered:
        if _props(vm).get("provisioningState") == "Failed":
            return status("failed", f"VM {vm.get('name')}: {_failure(vm)}")
        if _power(vm) in ("stopped", "stopping", "deallocated", "deallocating"):
            return status("failed", f"VM {vm.get('name')} is {_power(vm)}")
    expected = node_count(tags, len(vms))
    running = [v for v in vms if _props(v).get("provisioningState") == "Succeeded" and _power(v) == "running"]
    if len(running) >= expected:
        return status("ready", f"{len(running)} VM(s) running")
    return status("creating", f"{len(running)} of {expected} VM(s) running")


def image_reference(image: str) -> dict[str, str]:
    """``publisher:offer:sku:version`` (a marketplace URN) or a resource id, as an ``imageReference``."""
    if image.startswith("/"):
        return {"id": image}
    parts = image.split(":")
    if len(parts) != 4:
        raise CloudError(
            f"image {image!r} is neither publisher:offer:sku:version nor a resource id", reason="invalid"
        )
    return dict(zip(("publisher", "offer", "sku", "version"), parts, strict=True))


def parse_retail_prices(items: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Linux pay-as-you-go prices per hour by VM size, from retail prices API items."""
    prices: dict[str, float] = {}
    for item in items:
        sku = str(item.get("armSkuName") or "")
        name = f"{item.get('skuName', '')} {item.get('productName', '')}"
        if (
            not sku
            or item.get("type") != "Consumption"
            or "windows" in name.lower()
            or "spot" in name.lower()
            or "low priority" in name.lower()
            or item.get("unitOfMeasure") != "1 Hour"
        ):
            continue
        price = float(item.get("retailPrice") or 0)
        if price > 0 and (sku not in prices or price < prices[sku]):
            prices[sku] = price
    return prices


def _throwaway_ssh_key() -> str:
    """An SSH public key whose private half is never kept: Azure requires a login; nobody gets one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return public.decode() + " skyport-no-login"


def _as_dict(resource: Any) -> dict[str, Any]:
    if isinstance(resource, dict):
        return resource
    data: dict[str, Any] = resource.as_dict()
    return data


class AzureGate:
    """Provisioner for a ``kind = "azure"`` remote (see the module's docstring).

    ``credential`` and ``transport`` replace Azure identity and the network (tests use azure-core's
    transport abstraction with recorded responses).
    """

    kind = "azure"
    provides = ("provisioner",)

    def __init__(
        self,
        remote_name: str,
        settings: AzureRemoteSettings | Mapping[str, Any],
        *,
        home: Path | None = None,
        clock: Callable[[], float] = time.time,
        credential: Any = None,
        transport: Any = None,
        prices_session: Any = None,
    ) -> None:
        self.remote_name = remote_name
        self.settings = (
            settings
            if isinstance(settings, AzureRemoteSettings)
            else AzureRemoteSettings.model_validate(settings)
        )
        s = self.settings
        self._credential = credential
        self._transport = transport
        self._prices_session = prices_session
        self._clients: tuple[Any, Any] | None = None
        self._lock = threading.Lock()
        self._run = SDKRunner(f"azure-{remote_name}", s.threads, s.call_timeout_s)
        self._prices: Cached[dict[str, float]] = Cached(
            f"prices of {remote_name}",
            self._load_prices,
            s.price_cache_max_age_s,
            path=price_cache_path(home, self.kind, remote_name),
            encode=dict,
            decode=lambda doc: {str(k): float(v) for k, v in doc.items()},
            clock=clock,
        )
        self._catalog: Cached[Catalog] = Cached(
            f"catalog of {remote_name}", self._load_catalog, s.catalog_max_age_s, clock=clock
        )
        self._prices.on_update = self._catalog.invalidate

    # -- plumbing ------------------------------------------------------------------------------------

    def _make_credential(self) -> Any:
        from azure import identity

        s = self.settings
        if s.credential == "environment":
            return identity.EnvironmentCredential()
        if s.credential == "workload_identity":
            return identity.WorkloadIdentityCredential()
        if s.credential == "managed_identity":
            return identity.ManagedIdentityCredential(client_id=s.managed_identity_client_id)
        if s.credential == "cli":
            return identity.AzureCliCredential()
        return identity.DefaultAzureCredential(
            managed_identity_client_id=s.managed_identity_client_id,
            exclude_interactive_browser_credential=True,
            exclude_visual_studio_code_credential=True,
            exclude_powershell_credential=True,
        )

    def _sdk(self) -> tuple[Any, Any]:
        """(compute, network) clients, made on first use (in a worker thread)."""
        with self._lock:
            if self._clients is None:
                from azure.mgmt.compute import ComputeManagementClient
                from azure.mgmt.network import NetworkManagementClient

                s = self.settings
                if self._credential is None:
                    self._credential = self._make_credential()
                options: dict[str, Any] = {"base_url": s.resource_manager_url, "retry_total": 2}
                if self._transport is not None:
                    options["transport"] = self._transport
                self._clients = (
                    ComputeManagementClient(self._credential, s.subscription_id, **options),
                    NetworkManagementClient(self._credential, s.subscription_id, **options),
                )
            return self._clients

    async def _call(self, what: str, fn: Callable[[Any, Any], Any]) -> Any:
        def call() -> Any:
            try:
                compute, network = self._sdk()
                return fn(compute, network)
            except Exception as exc:
                raise classify(exc, what) from None

        return await self._run(what, call)

    def _is_ours(self, resource: Mapping[str, Any], partition_id: str | None) -> bool:
        tags = resource.get("tags") or {}
        return TAG_PARTITION in tags and (partition_id is None or tags[TAG_PARTITION] == partition_id)

    async def _vms(self, partition_id: str | None) -> list[dict[str, Any]]:
        rg = self.settings.resource_group

        def listing(compute: Any, network: Any) -> list[dict[str, Any]]:
            found = [_as_dict(v) for v in compute.virtual_machines.list(rg, expand="instanceView")]
            return [v for v in found if self._is_ours(v, partition_id)]

        vms: list[dict[str, Any]] = await self._call("list VMs", listing)
        return vms

    async def _groups(self, partition_id: str | None) -> list[dict[str, Any]]:
        rg = self.settings.resource_group

        def listing(compute: Any, network: Any) -> list[dict[str, Any]]:
            found = [_as_dict(g) for g in network.network_security_groups.list(rg)]
            return [g for g in found if self._is_ours(g, partition_id)]

        groups: list[dict[str, Any]] = await self._call("list network security groups", listing)
        return groups

    # -- catalog -------------------------------------------------------------------------------------

    def _load_prices_sync(self) -> dict[str, float]:
        import requests

        s = self.settings
        query = " and ".join(
            (
                "serviceName eq 'Virtual Machines'",
                f"armRegionName eq '{s.location}'",
                "priceType eq 'Consumption'",
            )
        )
        if s.flavors:
            query += " and (" + " or ".join(f"armSkuName eq '{f}'" for f in s.flavors) + ")"
        session = self._prices_session or requests.Session()
        url: str | None = f"{RETAIL_PRICES_URL}?api-version=2023-01-01-preview&$filter={quote(query)}"
        items: list[dict[str, Any]] = []
        pages = 0
        while url and pages < 500:
            response = session.get(url, timeout=30)
            response.raise_for_status()
            doc = response.json()
            items += doc.get("Items") or []
            url = doc.get("NextPageLink")
            pages += 1
        return parse_retail_prices(items)

    async def _load_prices(self) -> dict[str, float]:
        if not self.settings.retail_prices:
            return {}

        def call() -> dict[str, float]:
            try:
                return self._load_prices_sync()
            except Exception as exc:
                raise CloudError(
                    f"the Azure retail prices API: {_first_line(exc)}", reason="throttled"
                ) from None

        run = SDKRunner(f"azure-prices-{self.remote_name}", 1, max(self._run.timeout_s, 600.0))
        try:
            return await run("retail prices", call)
        finally:
            run.close()

    async def _load_catalog(self) -> Catalog:
        s = self.settings
        location = s.location.lower()

        def skus(compute: Any, network: Any) -> list[dict[str, Any]]:
            return [_as_dict(x) for x in compute.resource_skus.list(filter=f"location eq '{s.location}'")]

        raw: list[dict[str, Any]] = await self._call("list VM sizes", skus)
        try:
            prices = await self._prices.get(wait_s=PRICE_WAIT_S) if s.retail_prices else {}
        except CloudError as exc:
            log.warning(
                "Azure prices unavailable; using the price table", remote=self.remote_name, error=str(exc)
            )
            prices = {}
        flavors: list[CatalogFlavor] = []
        for sku in sorted(raw, key=lambda x: str(x.get("name"))):
            name = str(sku.get("name", ""))
            if sku.get("resourceType") != "virtualMachines" or (s.flavors and name not in s.flavors):
                continue
            if location not in [str(loc).lower() for loc in sku.get("locations") or []]:
                continue
            if any(
                r.get("reasonCode") == "NotAvailableForSubscription" for r in sku.get("restrictions") or []
            ):
                continue
            price = price_for(name, prices, s)
            if price is None:
                continue
            caps = {str(c.get("name")): str(c.get("value")) for c in sku.get("capabilities") or []}
            flavors.append(
                CatalogFlavor(
                    id=name,
                    name=name,
                    cpus=int(float(caps.get("vCPUs", "0"))),
                    mem=int(float(caps.get("MemoryGB", "0")) * GIB),
                    gpus=int(float(caps.get("GPUs", "0"))),
                    storage=int(float(caps.get("MaxResourceVolumeMB", "0"))) * MIB,
                    price=price,
                )
            )
        images = [
            CatalogImage(id=i, name=i.rsplit("/", 1)[-1] if i.startswith("/") else i)
            for i in dict.fromkeys([*s.images, s.default_image or ""])
            if i
        ]
        return Catalog(flavors=flavors, images=images)

    async def catalog(self) -> Catalog:
        return await self._catalog.get()

    # -- the provisioner protocol --------------------------------------------------------------------

    def _nsg_name(self, partition_id: str) -> str:
        return f"skyport-{partition_id}{NSG_SUFFIX}"

    def _tags(self, request: PartitionRequest, **extra: str) -> dict[str, str]:
        return {
            **request.tags,
            TAG_PARTITION: request.partition_id,
            TAG_NODES: str(len(request.nodes)),
            **extra,
        }

    async def create_partition(self, request: PartitionRequest) -> PartitionStatus:
        s = self.settings
        image = request.image or s.default_image
        if not image:
            raise CloudError(
                f"remote {self.remote_name} has no default_image and the job names none", reason="invalid"
            )
        reference = image_reference(image)
        vms = await self._vms(request.partition_id)
        groups = await self._groups(request.partition_id)
        group = groups[0] if groups else await self._create_nsg(request)
        have = {(v.get("tags") or {}).get(TAG_NODE) for v in vms}
        for node in request.nodes:
            if node.node_name in have:
                continue
            body = self._vm_body(request, node.node_name, reference, str(group["id"]))

            create = partial(_create_vm, rg=s.resource_group, name=node.node_name, body=body)
            made: dict[str, Any] = await self._call(f"create VM {node.node_name}", create)
            log.info("VM created", remote=self.remote_name, partition=request.partition_id, vm=node.node_name)
            vms.append({**made, "tags": made.get("tags") or body["tags"]})
        status = partition_status(request.partition_id, vms, [group])
        assert status is not None
        return status

    async def _create_nsg(self, request: PartitionRequest) -> dict[str, Any]:
        s = self.settings
        rules: list[dict[str, Any]] = [
            {
                "name": "deny-all-inbound",
                "properties": {
                    "priority": 4096,
                    "direction": "Inbound",
                    "access": "Deny",
                    "protocol": "*",
                    "sourceAddressPrefix": "*",
                    "sourcePortRange": "*",
                    "destinationAddressPrefix": "*",
                    "destinationPortRange": "*",
                    "description": "Sky Port: no inbound connection but declared ports",
                },
            }
        ]
        if s.expose_ports:
            for index, port in enumerate(sorted(set(request.ports))):
                rules.append(
                    {
                        "name": f"job-port-{port}",
                        "properties": {
                            "priority": 1000 + index,
                            "direction": "Inbound",
                            "access": "Allow",
                            "protocol": "Tcp",
                            "sourceAddressPrefixes": list(s.expose_cidrs),
                            "sourcePortRange": "*",
                            "destinationAddressPrefix": "*",
                            "destinationPortRange": str(port),
                            "description": "a port the job declared",
                        },
                    }
                )
        if s.internal_traffic:
            rules.append(
                {
                    "name": "virtual-network",
                    "properties": {
                        "priority": 3000,
                        "direction": "Inbound",
                        "access": "Allow",
                        "protocol": "*",
                        "sourceAddressPrefix": "VirtualNetwork",
                        "sourcePortRange": "*",
                        "destinationAddressPrefix": "VirtualNetwork",
                        "destinationPortRange": "*",
                    },
                }
            )
        body = {"location": s.location, "tags": self._tags(request), "properties": {"securityRules": rules}}
        name = self._nsg_name(request.partition_id)

        def create(compute: Any, network: Any) -> dict[str, Any]:
            poller = network.network_security_groups.begin_create_or_update(
                s.resource_group, name, body, polling=False
            )
            return _as_dict(poller.result())

        made: dict[str, Any] = await self._call(f"create network security group {name}", create)
        return {**made, "tags": made.get("tags") or body["tags"]}

    def _vm_body(
        self, request: PartitionRequest, node_name: str, image: dict[str, str], nsg_id: str
    ) -> dict[str, Any]:
        s = self.settings
        node = next(n for n in request.nodes if n.node_name == node_name)
        user_data = render_user_data(node, job_user=s.job_user, agent_install=s.agent_install)
        ip_config: dict[str, Any] = {"subnet": {"id": s.subnet_id}, "primary": True}
        if s.public_ip:
            ip_config["publicIPAddressConfiguration"] = {
                "name": f"{node_name}-ip",
                "sku": {"name": "Standard"},
                "properties": {"deleteOption": "Delete", "publicIPAllocationMethod": "Static"},
            }
        properties: dict[str, Any] = {
            "hardwareProfile": {"vmSize": request.flavor},
            "storageProfile": {
                "imageReference": image,
                "osDisk": {"createOption": "FromImage", "deleteOption": "Delete"},
            },
            "osProfile": {
                "computerName": node_name,
                "adminUsername": ADMIN_USER,
                "customData": base64.b64encode(user_data.encode()).decode(),
                "linuxConfiguration": {
                    "disablePasswordAuthentication": True,
                    "ssh": {
                        "publicKeys": [
                            {
                                "path": f"/home/{ADMIN_USER}/.ssh/authorized_keys",
                                "keyData": _throwaway_ssh_key(),
                            }
                        ]
                    },
                },
            },
            "networkProfile": {
                "networkApiVersion": "2020-11-01",
                "networkInterfaceConfigurations": [
                    {
                        "name": f"{node_name}-nic",
                        "properties": {
                            "primary": True,
                            "deleteOption": "Delete",
                            "networkSecurityGroup": {"id": nsg_id},
                            "ipConfigurations": [{"name": "ipconfig", "properties": ip_config}],
                        },
                    }
                ],
            },
        }
        if wants_spot(s.spot, request.tags):
            properties.update(priority="Spot", evictionPolicy="Deallocate", billingProfile={"maxPrice": -1})
        return {
            "location": s.location,
            "tags": self._tags(request, **{TAG_NODE: node_name}),
            "properties": properties,
        }

    async def get_partition(self, partition_id: str) -> PartitionStatus | None:
        return partition_status(partition_id, await self._vms(partition_id), await self._groups(partition_id))

    async def delete_partition(self, partition_id: str) -> None:
        rg = self.settings.resource_group
        vms = await self._vms(partition_id)
        for vm in vms:
            if _props(vm).get("provisioningState") == "Deleting":
                continue
            name = str(vm["name"])
            await self._call(f"delete VM {name}", partial(_delete_vm, rg=rg, name=name))
        if vms:
            return  # the NSG goes once Azure has removed the VMs and their interfaces
        for group in await self._groups(partition_id):
            name = str(group["name"])
            try:
                await self._call(
                    f"delete network security group {name}", partial(_delete_nsg, rg=rg, name=name)
                )
            except CloudError as exc:  # still in use by an interface being deleted: the next call
                if exc.reason not in ("invalid", "not_found"):
                    raise

    async def list_partitions(self) -> list[PartitionStatus]:
        vms = await self._vms(None)
        groups = await self._groups(None)
        by_partition: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
        for vm in vms:
            by_partition.setdefault(vm["tags"][TAG_PARTITION], ([], []))[0].append(vm)
        for group in groups:
            by_partition.setdefault(group["tags"][TAG_PARTITION], ([], []))[1].append(group)
        found: list[PartitionStatus] = []
        for partition_id, (its_vms, its_groups) in sorted(by_partition.items()):
            status = partition_status(partition_id, its_vms, its_groups)
            if status is not None:
                found.append(status)
        return found

    async def close(self) -> None:
        await self._prices.close()
        await self._catalog.close()
        self._run.close()
        if self._clients is not None:
            for client in self._clients:
                client.close()
            self._clients = None

    # -- credentials check ---------------------------------------------------------------------------

    async def check(self) -> RemoteCheck:
        """Who the credentials are and whether their roles allow what the remote does (Azure's
        permissions API at the resource group and subnet scopes), the regional vCPU quota, the VM
        sizes and the default image — reading only."""
        s = self.settings
        items: list[CheckItem] = []
        try:
            identity = await self._call("get a token", lambda compute, network: _who(self._credential))
            items.append(CheckItem(name="credentials", ok=True, detail=identity))
        except CloudError as exc:
            items.append(CheckItem(name="credentials", ok=False, detail=str(exc)))
            return RemoteCheck.of(self.remote_name, self.kind, "", items)

        def permissions(scope: str) -> Callable[[Any, Any], list[dict[str, Any]]]:
            def call(compute: Any, network: Any) -> list[dict[str, Any]]:
                from azure.core.rest import HttpRequest

                base = s.resource_manager_url.rstrip("/")
                url = f"{base}{scope}/providers/Microsoft.Authorization/permissions"
                response = compute.send_request(HttpRequest("GET", url, params={"api-version": "2022-04-01"}))
                response.raise_for_status()
                value: list[dict[str, Any]] = response.json().get("value", [])
                return value

            return call

        rg_scope = f"/subscriptions/{s.subscription_id}/resourceGroups/{s.resource_group}"
        wanted = [(rg_scope, a) for a in REQUIRED_ACTIONS + (PUBLIC_IP_ACTIONS if s.public_ip else ())]
        subnet_scope = s.subnet_id.split("/providers/")[0] if "/providers/" in s.subnet_id else rg_scope
        wanted += [(subnet_scope, a) for a in SUBNET_ACTIONS]
        granted: dict[str, list[dict[str, Any]] | None] = {}
        for scope in dict.fromkeys(scope for scope, _ in wanted):
            try:
                granted[scope] = await self._call(f"read permissions on {scope}", permissions(scope))
            except CloudError as exc:
                granted[scope] = None
                items.append(CheckItem(name=f"permissions on {scope}", ok=False, detail=str(exc)))
        for scope, action in wanted:
            rules = granted.get(scope)
            if rules is not None:
                ok = allowed(action, rules)
                items.append(CheckItem(name=action, ok=ok, detail="" if ok else f"not granted on {scope}"))

        def usage(compute: Any, network: Any) -> str:
            for item in compute.usage.list(s.location):
                data = _as_dict(item)
                if data.get("name", {}).get("value") == "cores":
                    return f"regional vCPUs {data.get('currentValue')}/{data.get('limit')}"
            return "no regional vCPU quota reported"

        def sizes(compute: Any, network: Any) -> str:
            found = compute.resource_skus.list(filter=f"location eq '{s.location}'")
            return f"{sum(1 for _ in found)} SKUs"

        for name, fn in (
            ("Microsoft.Compute/locations/usages/read (quota)", usage),
            ("Microsoft.Compute/skus/read", sizes),
        ):
            try:
                items.append(CheckItem(name=name, ok=True, detail=await self._call(name, fn)))
            except CloudError as exc:
                items.append(CheckItem(name=name, ok=False, detail=str(exc)))
        if s.default_image and not s.default_image.startswith("/"):
            try:
                ref = image_reference(s.default_image)

                def versions(compute: Any, network: Any) -> int:
                    return len(
                        compute.virtual_machine_images.list(
                            s.location, ref["publisher"], ref["offer"], ref["sku"], top=1
                        )
                    )

                found = await self._call("find the default image", versions)
                items.append(CheckItem(name="default image", ok=found > 0, detail=s.default_image))
            except CloudError as exc:
                items.append(CheckItem(name="default image", ok=False, detail=str(exc)))
        return RemoteCheck.of(self.remote_name, self.kind, items[0].detail, items)


def allowed(action: str, rules: Sequence[Mapping[str, Any]]) -> bool:
    """Whether Azure permission rules (``actions`` minus ``notActions``, with wildcards) allow ``action``."""

    def match(pattern: str) -> bool:
        return fnmatch.fnmatchcase(action.lower(), str(pattern).lower())

    return any(
        any(match(p) for p in rule.get("actions") or [])
        and not any(match(p) for p in rule.get("notActions") or [])
        for rule in rules
    )


def _who(credential: Any) -> str:
    """Who a token is for, from its (unverified) claims: shown to the operator, never trusted."""
    token = credential.get_token("https://management.azure.com/.default").token
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return "a token without readable claims"
    who = claims.get("upn") or claims.get("unique_name") or claims.get("appid") or claims.get("oid") or "?"
    return f"{who} (tenant {claims.get('tid', '?')})"


def _create_vm(compute: Any, network: Any, rg: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
    return _as_dict(compute.virtual_machines.begin_create_or_update(rg, name, body, polling=False).result())


def _delete_vm(compute: Any, network: Any, rg: str, name: str) -> None:
    compute.virtual_machines.begin_delete(rg, name, polling=False).result()


def _delete_nsg(compute: Any, network: Any, rg: str, name: str) -> None:
    network.network_security_groups.begin_delete(rg, name, polling=False).result()
