"""The ``aws`` provisioner: partitions of EC2 instances, through boto3 (``pip install 'skyport-wm[aws]'``).

A partition is one security group and one instance per node, all tagged ``skyport-partition=<our id>``
and ``skyport-core=<core id>`` (and each instance ``skyport-node=<node name>``), so that everything of a
partition is found from our id alone — after a restart of the core too — and the garbage collector finds
whatever no live partition owns.

- **Create** (idempotent): the group is found by its tag or made (``skyport-<id>`` in the subnet's VPC),
  with no inbound rule at all; only when the remote has ``expose_ports`` are the job's declared ``in``
  ports opened (to ``expose_cidrs``), and only with ``internal_traffic`` may the partition's nodes reach
  each other. Then each node that has no instance yet gets one (``RunInstances`` with the node's own
  cloud-init user data, a client token derived from our id, IMDSv2 only, no instance profile: no AWS
  credential ever reaches a VM; spot when the job allows it and the remote's ``spot`` policy agrees).
- **Status**: from the instances' states; a spot instance AWS took back (``Server.SpotInstance*``) makes
  the partition ``failed`` with reason ``preempted``.
- **Delete**: terminate the instances; once every one is terminated, delete the group. The partition is
  gone (``get_partition`` is None) when no instance is left but terminated ones and the group is deleted.
- **Catalog**: ``DescribeInstanceTypes`` (vCPUs, memory, GPUs with model, instance storage) priced from
  the remote's ``prices``, else the AWS Price List API (``pricing``: cached in the home for
  ``price_cache_max_age_s``), else ``default_price``; unpriced types are not offered. Images: the AMIs of
  ``images`` and ``default_image`` (ids or names).

Credentials: boto3's chain on the core's host (``AWS_*`` variables, ``~/.aws`` with ``profile``, SSO, an
instance role); ``AWS_ENDPOINT_URL`` and ``endpoint_url`` reach another endpoint (moto in the tests).
Every call runs in the gate's thread pool under ``call_timeout_s``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

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
from skyport.server.settings import AWSRemoteSettings

log = structlog.get_logger(__name__)

MIB = 1024**2
GIB = 1024**3
#: The Price List API answers in these regions only.
PRICING_REGION = "us-east-1"
SPOT_REASONS = ("Server.SpotInstanceTermination", "Server.SpotInstanceShutdown")
USER_REASONS = ("Client.UserInitiatedShutdown",)

_QUOTA = {
    "InstanceLimitExceeded",
    "VcpuLimitExceeded",
    "MaxSpotInstanceCountExceeded",
    "AddressLimitExceeded",
    "SecurityGroupLimitExceeded",
    "RulesPerSecurityGroupLimitExceeded",
    "ResourceLimitExceeded",
}
_CAPACITY = {
    "InsufficientInstanceCapacity",
    "InsufficientHostCapacity",
    "InsufficientCapacity",
    "InsufficientFreeAddressesInSubnet",
    "InsufficientReservedInstanceCapacity",
    "SpotMaxPriceTooLow",
}
_THROTTLED = {
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "ServiceUnavailable",
    "Unavailable",
    "InternalError",
    "InternalFailure",
}
_AUTH = {
    "UnauthorizedOperation",
    "AuthFailure",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "AccessDenied",
    "AccessDeniedException",
    "OptInRequired",
}


def classify(exc: Exception, what: str) -> CloudError:
    """A boto3/botocore exception as a :class:`CloudError` with AWS's own code and words."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )
    from botocore.exceptions import ProfileNotFound as NoProfile

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        message = str(error.get("Message", "")).strip()[:500]
        text = f"{code}: {message}" if message else code
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _QUOTA:
            return CloudError(text, reason="quota")
        if code in _CAPACITY:
            return CloudError(text, reason="capacity")
        if code in _THROTTLED or status >= 500:
            return CloudError(f"{text} ({what})", reason="throttled")
        if code in _AUTH:
            return CloudError(f"{text} ({what})", reason="auth")
        if code.endswith((".NotFound", ".Malformed")):
            return CloudError(text, reason="not_found")
        return CloudError(text, reason="invalid")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, NoProfile)):
        return CloudError(
            f"no usable AWS credentials on the core's host: {exc} (set AWS_PROFILE or the remote's "
            "profile, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run the core with an instance role)",
            reason="auth",
        )
    if isinstance(exc, ConnectionError):
        return CloudError(f"cannot reach AWS for {what}: {exc}", reason="throttled")
    if isinstance(exc, BotoCoreError):
        return CloudError(f"{what}: {exc}", reason="provider", transient=True)
    return CloudError(f"{what}: {exc}", reason="provider")


def _tags(resource: Mapping[str, Any]) -> dict[str, str]:
    return {str(t["Key"]): str(t["Value"]) for t in resource.get("Tags") or []}


def _state(instance: Mapping[str, Any]) -> str:
    return str(instance.get("State", {}).get("Name", ""))


def _reason(instance: Mapping[str, Any]) -> tuple[str, str]:
    reason = instance.get("StateReason") or {}
    return str(reason.get("Code", "")), str(reason.get("Message", ""))


def partition_status(
    partition_id: str, instances: Sequence[Mapping[str, Any]], groups: Sequence[Mapping[str, Any]]
) -> CloudPartitionStatus | None:
    """Where a partition is, from its instances and security groups (None: nothing of it is left)."""
    live = [i for i in instances if _state(i) != "terminated"]
    if not live and not groups:
        return None
    tags: dict[str, str] = {}
    for resource in [*groups, *instances]:
        tags.update({k: v for k, v in _tags(resource).items() if k.startswith("skyport-")})
    tags.pop(TAG_NODE, None)
    ordered = sorted(instances, key=lambda i: _tags(i).get(TAG_NODE, ""))
    nodes = [
        ProvisionedNode(
            name=_tags(i).get(TAG_NODE, str(i.get("InstanceId", ""))),
            provider_id=str(i.get("InstanceId", "")),
            public_ip=str(i.get("PublicIpAddress") or ""),
            private_ip=str(i.get("PrivateIpAddress") or ""),
        )
        for i in ordered
        if _state(i) != "terminated"
    ]
    provider_id = str(groups[0].get("GroupId", "")) if groups else ""

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

    preempted = [i for i in instances if _reason(i)[0] in SPOT_REASONS]
    if preempted:
        code, text = _reason(preempted[0])
        name = _tags(preempted[0]).get(TAG_NODE, str(preempted[0].get("InstanceId")))
        return status(
            "failed", f"preempted: AWS took back the spot capacity of {name} ({text or code})", PREEMPTED
        )
    if not live:
        return status("deleting", "its instances are terminated; its security group is left")
    stopped = [
        i
        for i in instances
        if _state(i) in ("stopping", "stopped")
        or (_state(i) in ("shutting-down", "terminated") and _reason(i)[0] not in USER_REASONS)
    ]
    if stopped:
        code, text = _reason(stopped[0])
        name = _tags(stopped[0]).get(TAG_NODE, str(stopped[0].get("InstanceId")))
        return status(
            "failed", f"instance {name} is {_state(stopped[0])}: {text or code or 'no reason given'}"
        )
    if any(_state(i) in ("shutting-down", "terminated") for i in instances):
        return status("deleting", "its instances are being terminated")
    expected = node_count(tags, len(live))
    running = [i for i in live if _state(i) == "running"]
    if len(running) >= expected:
        return status("ready", f"{len(running)} instance(s) running")
    return status("creating", f"{len(running)} of {expected} instance(s) running")


def parse_price_list(items: Iterable[str]) -> dict[str, float]:
    """On-demand USD prices per hour by instance type, from the Price List API's JSON documents."""
    prices: dict[str, float] = {}
    for raw in items:
        doc = json.loads(raw) if isinstance(raw, str) else raw
        itype = doc.get("product", {}).get("attributes", {}).get("instanceType")
        if not itype:
            continue
        for offer in (doc.get("terms", {}).get("OnDemand") or {}).values():
            for dimension in (offer.get("priceDimensions") or {}).values():
                try:
                    usd = float(dimension.get("pricePerUnit", {}).get("USD", "nan"))
                except ValueError:
                    continue
                if usd > 0 and (itype not in prices or usd < prices[itype]):
                    prices[itype] = usd
    return prices


class AWSGate:
    """Provisioner for a ``kind = "aws"`` remote (see the module's docstring)."""

    kind = "aws"
    provides = ("provisioner",)

    def __init__(
        self,
        remote_name: str,
        settings: AWSRemoteSettings | Mapping[str, Any],
        *,
        home: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.remote_name = remote_name
        self.settings = (
            settings
            if isinstance(settings, AWSRemoteSettings)
            else AWSRemoteSettings.model_validate(settings)
        )
        s = self.settings
        self._session = boto3.session.Session(profile_name=s.profile, region_name=s.region)
        config = Config(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=min(30.0, s.call_timeout_s),
            user_agent_extra="skyport",
        )
        self._config = config
        self._ec2 = self._session.client("ec2", endpoint_url=s.endpoint_url, config=config)
        self._run = SDKRunner(f"aws-{remote_name}", s.threads, s.call_timeout_s)
        self._subnet: tuple[str, str] | None = None
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

    async def _ec2_call(self, operation: str, **params: Any) -> Any:
        method = getattr(self._ec2, operation)

        def call() -> Any:
            try:
                return method(**params)
            except Exception as exc:
                raise classify(exc, operation) from None

        return await self._run(operation, call)

    async def _paginate(self, operation: str, key: str, **params: Any) -> list[dict[str, Any]]:
        def call() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = []
            try:
                for page in self._ec2.get_paginator(operation).paginate(**params):
                    if key == "Instances":
                        for reservation in page.get("Reservations", []):
                            found.extend(reservation.get("Instances", []))
                    else:
                        found.extend(page.get(key, []))
            except Exception as exc:
                raise classify(exc, operation) from None
            return found

        return await self._run(operation, call)

    @staticmethod
    def _filter(partition_id: str | None) -> list[dict[str, Any]]:
        if partition_id is None:
            return [{"Name": "tag-key", "Values": [TAG_PARTITION]}]
        return [{"Name": f"tag:{TAG_PARTITION}", "Values": [partition_id]}]

    async def _instances(self, partition_id: str | None) -> list[dict[str, Any]]:
        return await self._paginate("describe_instances", "Instances", Filters=self._filter(partition_id))

    async def _groups(self, partition_id: str | None) -> list[dict[str, Any]]:
        return await self._paginate(
            "describe_security_groups", "SecurityGroups", Filters=self._filter(partition_id)
        )

    async def _subnet_and_vpc(self) -> tuple[str, str]:
        if self._subnet is None:
            if self.settings.subnet_id:
                found = await self._ec2_call("describe_subnets", SubnetIds=[self.settings.subnet_id])
            else:
                found = await self._ec2_call(
                    "describe_subnets", Filters=[{"Name": "default-for-az", "Values": ["true"]}]
                )
            subnets = sorted(found.get("Subnets", []), key=lambda s: str(s.get("AvailabilityZone", "")))
            if not subnets:
                raise CloudError(
                    f"region {self.settings.region} has no default subnet: set subnet_id on remote "
                    f"{self.remote_name}",
                    reason="invalid",
                )
            self._subnet = (str(subnets[0]["SubnetId"]), str(subnets[0]["VpcId"]))
        return self._subnet

    # -- catalog -------------------------------------------------------------------------------------

    def _load_prices_sync(self) -> dict[str, float]:
        client = self._session.client("pricing", region_name=PRICING_REGION, config=self._config)
        filters = [
            {"Type": "TERM_MATCH", "Field": field, "Value": value}
            for field, value in (
                ("regionCode", self.settings.region),
                ("operatingSystem", "Linux"),
                ("tenancy", "Shared"),
                ("preInstalledSw", "NA"),
                ("capacitystatus", "Used"),
                ("licenseModel", "No License required"),
            )
        ]
        queries = (
            [
                [*filters, {"Type": "TERM_MATCH", "Field": "instanceType", "Value": t}]
                for t in self.settings.flavors
            ]
            if self.settings.flavors
            else [filters]
        )
        prices: dict[str, float] = {}
        for query in queries:
            for page in client.get_paginator("get_products").paginate(ServiceCode="AmazonEC2", Filters=query):
                prices.update(parse_price_list(page.get("PriceList", [])))
        return prices

    async def _load_prices(self) -> dict[str, float]:
        if not self.settings.pricing:
            return {}

        def call() -> dict[str, float]:
            try:
                return self._load_prices_sync()
            except Exception as exc:
                raise classify(exc, "pricing:GetProducts") from None

        run = SDKRunner(f"aws-pricing-{self.remote_name}", 1, max(self._run.timeout_s, 300.0))
        try:
            return await run("pricing:GetProducts", call)
        finally:
            run.close()

    async def _api_prices(self) -> dict[str, float]:
        if not self.settings.pricing:
            return {}
        try:
            return await self._prices.get(wait_s=PRICE_WAIT_S)
        except CloudError as exc:
            log.warning(
                "AWS prices unavailable; using the price table", remote=self.remote_name, error=str(exc)
            )
            return {}

    async def _load_catalog(self) -> Catalog:
        s = self.settings
        params: dict[str, Any] = {"InstanceTypes": list(s.flavors)} if s.flavors else {}
        types = await self._paginate("describe_instance_types", "InstanceTypes", **params)
        prices = await self._api_prices()
        flavors: list[CatalogFlavor] = []
        for t in sorted(types, key=lambda t: str(t["InstanceType"])):
            itype = str(t["InstanceType"])
            price = price_for(itype, prices, s)
            if price is None:
                continue
            gpus = t.get("GpuInfo", {}).get("Gpus") or []
            count = sum(int(g.get("Count", 0)) for g in gpus)
            model = ", ".join(
                f"{g.get('Count', 0)}x {g.get('Manufacturer', '')} {g.get('Name', '')}".strip() for g in gpus
            )
            flavors.append(
                CatalogFlavor(
                    id=itype,
                    name=f"{itype} ({model})" if model else itype,
                    cpus=int(t.get("VCpuInfo", {}).get("DefaultVCpus", 0)),
                    mem=int(t.get("MemoryInfo", {}).get("SizeInMiB", 0)) * MIB,
                    gpus=count,
                    storage=int(t.get("InstanceStorageInfo", {}).get("TotalSizeInGB", 0)) * GIB
                    or (s.root_volume_gb or 0) * GIB,
                    price=price,
                )
            )
        if not flavors:
            log.warning("no priced instance type: set prices or default_price", remote=self.remote_name)
        return Catalog(flavors=flavors, images=await self._images())

    async def _images(self) -> list[CatalogImage]:
        wanted = [w for w in dict.fromkeys([*self.settings.images, self.settings.default_image or ""]) if w]
        if not wanted:
            return []
        ids = [w for w in wanted if w.startswith("ami-")]
        names = [w for w in wanted if not w.startswith("ami-")]
        found: list[dict[str, Any]] = []
        if ids:
            found += await self._paginate("describe_images", "Images", ImageIds=ids)
        if names:
            found += await self._paginate(
                "describe_images", "Images", Filters=[{"Name": "name", "Values": names}]
            )
        return [
            CatalogImage(
                id=str(i["ImageId"]),
                name=str(i.get("Name") or i["ImageId"]),
                comment=str(i.get("Description") or ""),
            )
            for i in found
        ]

    async def catalog(self) -> Catalog:
        return await self._catalog.get()

    async def _image(self, wanted: str) -> dict[str, Any]:
        if wanted.startswith("ami-"):
            found = await self._ec2_call("describe_images", ImageIds=[wanted])
        else:
            found = await self._ec2_call("describe_images", Filters=[{"Name": "name", "Values": [wanted]}])
        images = sorted(found.get("Images", []), key=lambda i: str(i.get("CreationDate", "")), reverse=True)
        if not images:
            raise CloudError(f"no image {wanted} in {self.settings.region}", reason="invalid")
        image: dict[str, Any] = images[0]
        return image

    # -- the provisioner protocol --------------------------------------------------------------------

    async def create_partition(self, request: PartitionRequest) -> PartitionStatus:
        s = self.settings
        image_name = request.image or s.default_image
        if not image_name:
            raise CloudError(
                f"remote {self.remote_name} has no default_image and the job names none", reason="invalid"
            )
        instances = await self._instances(request.partition_id)
        group_id = await self._ensure_group(request)
        have = {_tags(i).get(TAG_NODE) for i in instances}
        missing = [n for n in request.nodes if n.node_name not in have]
        if missing:
            image = await self._image(image_name)
            subnet_id, _ = await self._subnet_and_vpc()
            for node in missing:
                instances.append(
                    await self._run_instance(request, node.node_name, image, subnet_id, group_id)
                )
        tagged = [{**i, "Tags": i.get("Tags") or self._resource_tags(request, {})} for i in instances]
        status = partition_status(request.partition_id, tagged, [{"GroupId": group_id}])
        assert status is not None  # there is a group
        return status

    def _resource_tags(self, request: PartitionRequest, extra: Mapping[str, str]) -> list[dict[str, str]]:
        tags = {
            **request.tags,
            TAG_PARTITION: request.partition_id,
            TAG_NODES: str(len(request.nodes)),
            **extra,
        }
        return [{"Key": k, "Value": v} for k, v in tags.items()]

    async def _ensure_group(self, request: PartitionRequest) -> str:
        groups = await self._groups(request.partition_id)
        if groups:
            group_id = str(groups[0]["GroupId"])
            fresh = False
        else:
            _, vpc_id = await self._subnet_and_vpc()
            name = f"skyport-{request.partition_id}"
            try:
                made = await self._ec2_call(
                    "create_security_group",
                    GroupName=name,
                    Description=f"Sky Port partition {request.name}: no inbound port but declared ones",
                    VpcId=vpc_id,
                    TagSpecifications=[
                        {
                            "ResourceType": "security-group",
                            "Tags": self._resource_tags(request, {"Name": name}),
                        }
                    ],
                )
                group_id = str(made["GroupId"])
            except CloudError as exc:
                if not str(exc).startswith("InvalidGroup.Duplicate"):
                    raise
                found = await self._ec2_call(
                    "describe_security_groups",
                    Filters=[
                        {"Name": "group-name", "Values": [name]},
                        {"Name": "vpc-id", "Values": [vpc_id]},
                    ],
                )
                group_id = str(found["SecurityGroups"][0]["GroupId"])
            fresh = True
        permissions = self._ingress(request, group_id)
        if permissions and (fresh or not _has_ingress(groups[0] if groups else {}, permissions)):
            try:
                await self._ec2_call(
                    "authorize_security_group_ingress", GroupId=group_id, IpPermissions=permissions
                )
            except CloudError as exc:
                if not str(exc).startswith("InvalidPermission.Duplicate"):
                    raise
        return group_id

    def _ingress(self, request: PartitionRequest, group_id: str) -> list[dict[str, Any]]:
        s = self.settings
        permissions: list[dict[str, Any]] = []
        if s.expose_ports:
            for port in sorted(set(request.ports)):
                permissions.append(
                    {
                        "IpProtocol": "tcp",
                        "FromPort": port,
                        "ToPort": port,
                        "IpRanges": [
                            {"CidrIp": cidr, "Description": "a port the job declared"}
                            for cidr in s.expose_cidrs
                        ],
                    }
                )
        if s.internal_traffic:
            permissions.append({"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id}]})
        return permissions

    async def _run_instance(
        self,
        request: PartitionRequest,
        node_name: str,
        image: Mapping[str, Any],
        subnet_id: str,
        group_id: str,
    ) -> dict[str, Any]:
        s = self.settings
        node = next(n for n in request.nodes if n.node_name == node_name)
        params: dict[str, Any] = {
            "ImageId": image["ImageId"],
            "InstanceType": request.flavor,
            "MinCount": 1,
            "MaxCount": 1,
            "UserData": render_user_data(node, job_user=s.job_user, agent_install=s.agent_install),
            # AWS returns the instance it made for a token it has seen: a retried call makes no second VM.
            "ClientToken": f"{request.partition_id}/{node_name}"[:64],
            "NetworkInterfaces": [
                {
                    "DeviceIndex": 0,
                    "SubnetId": subnet_id,
                    "Groups": [group_id],
                    "AssociatePublicIpAddress": s.public_ip,
                    "DeleteOnTermination": True,
                }
            ],
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
            "InstanceInitiatedShutdownBehavior": "terminate",
            "TagSpecifications": [
                {
                    "ResourceType": kind,
                    "Tags": self._resource_tags(request, {TAG_NODE: node_name, "Name": node_name}),
                }
                for kind in ("instance", "volume")
            ],
        }
        if s.root_volume_gb and image.get("RootDeviceName"):
            params["BlockDeviceMappings"] = [
                {
                    "DeviceName": image["RootDeviceName"],
                    "Ebs": {"VolumeSize": s.root_volume_gb, "DeleteOnTermination": True},
                }
            ]
        if wants_spot(s.spot, request.tags):
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
            }
        made = await self._ec2_call("run_instances", **params)
        instance: dict[str, Any] = made["Instances"][0]
        log.info(
            "instance started",
            remote=self.remote_name,
            partition=request.partition_id,
            node=node_name,
            instance=instance.get("InstanceId"),
        )
        return instance

    async def get_partition(self, partition_id: str) -> PartitionStatus | None:
        instances = await self._instances(partition_id)
        groups = await self._groups(partition_id)
        return partition_status(partition_id, instances, groups)

    async def delete_partition(self, partition_id: str) -> None:
        instances = await self._instances(partition_id)
        alive = [str(i["InstanceId"]) for i in instances if _state(i) not in ("shutting-down", "terminated")]
        if alive:
            await self._ec2_call("terminate_instances", InstanceIds=alive)
            return
        if any(_state(i) == "shutting-down" for i in instances):
            return  # the group can go once its instances have
        for group in await self._groups(partition_id):
            try:
                await self._ec2_call("delete_security_group", GroupId=str(group["GroupId"]))
            except CloudError as exc:
                # Still referenced by an interface being released: the next call deletes it.
                if exc.reason != "not_found" and not str(exc).startswith("DependencyViolation"):
                    raise

    async def list_partitions(self) -> list[PartitionStatus]:
        instances = await self._instances(None)
        groups = await self._groups(None)
        by_partition: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
        for instance in instances:
            by_partition.setdefault(_tags(instance)[TAG_PARTITION], ([], []))[0].append(instance)
        for group in groups:
            by_partition.setdefault(_tags(group)[TAG_PARTITION], ([], []))[1].append(group)
        found: list[PartitionStatus] = []
        for partition_id, (its_instances, its_groups) in sorted(by_partition.items()):
            status = partition_status(partition_id, its_instances, its_groups)
            if status is not None:
                found.append(status)
        return found

    async def close(self) -> None:
        await self._prices.close()
        await self._catalog.close()
        self._run.close()

    # -- credentials check ---------------------------------------------------------------------------

    async def check(self) -> RemoteCheck:
        """Who the credentials are and whether they may do what the gate does, creating nothing: reads,
        then ``DryRun`` calls of every changing operation (AWS answers ``DryRunOperation`` when allowed)."""
        items: list[CheckItem] = []
        identity = ""
        sts = self._session.client("sts", config=self._config)
        try:
            who = await self._run("sts:GetCallerIdentity", lambda: _call(sts.get_caller_identity))
            identity = str(who.get("Arn", ""))
            items.append(
                CheckItem(name="credentials", ok=True, detail=f"{identity} (account {who.get('Account')})")
            )
        except CloudError as exc:
            items.append(CheckItem(name="credentials", ok=False, detail=str(exc)))
            return RemoteCheck.of(self.remote_name, self.kind, identity, items)

        async def read(name: str, operation: str, **params: Any) -> Any:
            try:
                result = await self._ec2_call(operation, **params)
                items.append(CheckItem(name=name, ok=True))
                return result
            except CloudError as exc:
                items.append(CheckItem(name=name, ok=False, detail=str(exc)))
                return None

        await read("ec2:DescribeInstances", "describe_instances", MaxResults=5)
        await read("ec2:DescribeSecurityGroups", "describe_security_groups", MaxResults=5)
        await read("ec2:DescribeInstanceTypes", "describe_instance_types", MaxResults=5)
        subnet_id = vpc_id = ""
        try:
            subnet_id, vpc_id = await self._subnet_and_vpc()
            items.append(CheckItem(name="ec2:DescribeSubnets", ok=True, detail=f"{subnet_id} in {vpc_id}"))
        except CloudError as exc:
            items.append(CheckItem(name="ec2:DescribeSubnets", ok=False, detail=str(exc)))
        image_id = ""
        if self.settings.default_image:
            try:
                image_id = str((await self._image(self.settings.default_image))["ImageId"])
                items.append(
                    CheckItem(name="ec2:DescribeImages", ok=True, detail=f"default image {image_id}")
                )
            except CloudError as exc:
                items.append(CheckItem(name="ec2:DescribeImages", ok=False, detail=str(exc)))
        else:
            items.append(
                CheckItem(
                    name="default_image", ok=False, detail="not set: jobs must name an image", required=False
                )
            )
        flavor = (self.settings.flavors or sorted(self.settings.prices) or ["t3.micro"])[0]
        dry_runs: list[tuple[str, str, dict[str, Any]]] = [
            (
                "ec2:RunInstances",
                "run_instances",
                {
                    "ImageId": image_id or "ami-00000000000000000",
                    "InstanceType": flavor,
                    "MinCount": 1,
                    "MaxCount": 1,
                    **({"SubnetId": subnet_id} if subnet_id else {}),
                },
            ),
            (
                "ec2:CreateSecurityGroup",
                "create_security_group",
                {
                    "GroupName": "skyport-check",
                    "Description": "check",
                    **({"VpcId": vpc_id} if vpc_id else {}),
                },
            ),
            (
                "ec2:CreateTags",
                "create_tags",
                {
                    "Resources": [subnet_id or "subnet-00000000"],
                    "Tags": [{"Key": "skyport-check", "Value": "1"}],
                },
            ),
            ("ec2:TerminateInstances", "terminate_instances", {"InstanceIds": ["i-00000000000000000"]}),
            ("ec2:DeleteSecurityGroup", "delete_security_group", {"GroupId": "sg-00000000000000000"}),
        ]
        if self.settings.expose_ports or self.settings.internal_traffic:
            dry_runs.append(
                (
                    "ec2:AuthorizeSecurityGroupIngress",
                    "authorize_security_group_ingress",
                    {
                        "GroupId": "sg-00000000000000000",
                        "IpPermissions": [
                            {
                                "IpProtocol": "tcp",
                                "FromPort": 1,
                                "ToPort": 1,
                                "IpRanges": [{"CidrIp": "127.0.0.1/32"}],
                            }
                        ],
                    },
                )
            )
        for name, operation, params in dry_runs:
            try:
                await self._ec2_call(operation, DryRun=True, **params)
                items.append(CheckItem(name=name, ok=False, detail="the dry run was not refused nor allowed"))
            except CloudError as exc:
                text = str(exc)
                if text.startswith("DryRunOperation"):
                    items.append(CheckItem(name=name, ok=True, detail="allowed (dry run)"))
                elif exc.reason == "auth":
                    items.append(CheckItem(name=name, ok=False, detail=text))
                else:
                    # Refused for another reason than permission (a made-up id): the permission was checked
                    # first by AWS, so it is there.
                    items.append(CheckItem(name=name, ok=True, detail=f"allowed ({text[:120]})"))
        if self.settings.pricing:
            try:
                prices = await self._load_prices()
                items.append(
                    CheckItem(
                        name="pricing:GetProducts",
                        ok=bool(prices),
                        detail=f"{len(prices)} price(s)",
                        required=False,
                    )
                )
            except CloudError as exc:
                items.append(
                    CheckItem(
                        name="pricing:GetProducts",
                        ok=False,
                        detail=f"{exc} (prices come from the remote's price table)",
                        required=False,
                    )
                )
        return RemoteCheck.of(self.remote_name, self.kind, identity, items)


def _call(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:
        raise classify(exc, getattr(fn, "__name__", "call")) from None


def _has_ingress(group: Mapping[str, Any], wanted: list[dict[str, Any]]) -> bool:
    have = {
        (p.get("IpProtocol"), p.get("FromPort"), p.get("ToPort")) for p in group.get("IpPermissions") or []
    }
    return all((p.get("IpProtocol"), p.get("FromPort"), p.get("ToPort")) in have for p in wanted)
