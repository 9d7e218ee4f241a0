"""The ``openstack`` provisioner: partitions of Nova servers, through openstacksdk
(``pip install 'skyport-wm[openstack]'``).

A partition is one Neutron security group ``skyport-<our id>`` (tagged ``skyport-partition=<id>`` and
``skyport-core=<core id>``) and one server per node, whose metadata carries the same keys and
``skyport-node=<node name>``; everything of a partition is found from our id alone, after a restart of
the core too, and the garbage collector finds what no live partition owns.

- **Create** (idempotent): the group is found by name or made; Neutron gives a new group its egress
  rules and no ingress rule, and we add none — except the job's declared ``in`` ports (to
  ``expose_cidrs``) when the remote has ``expose_ports``, and traffic between the partition's nodes with
  ``internal_traffic``. Then each node without a server gets one, with its own cloud-init user data.
- **Status**: ``BUILD`` -> creating, all ``ACTIVE`` -> ready, ``ERROR`` -> failed with Nova's fault text
  (e.g. ``No valid host was found``: no capacity), a server being deleted -> deleting.
- **Delete**: delete the servers; once none is left, the group. Gone (None) when neither is there.
- **Catalog**: the flavors (vCPUs, RAM, disk + ephemeral, GPUs from the ``pci_passthrough:alias`` or
  ``resources:VGPU`` extra specs) priced by the remote's ``prices`` table (OpenStack has no price API)
  or ``default_price``; the active images of ``images`` and ``default_image`` (all when none is named).

OpenStack has no preemptible servers in its standard APIs: every partition is on-demand.

Credentials: the ``clouds.yaml`` entry named by ``cloud`` (or ``OS_*`` variables), read by openstacksdk
on the core's host; an application credential restricted to the project is the least privilege. Every
call runs in the gate's thread pool under ``call_timeout_s``.
"""

from __future__ import annotations

import base64
import ipaddress
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import structlog

from skyport.gates.cloud_common import (
    TAG_NODE,
    TAG_NODES,
    Cached,
    CheckItem,
    CloudError,
    CloudPartitionStatus,
    RemoteCheck,
    SDKRunner,
    node_count,
    price_for,
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
from skyport.server.settings import OpenStackRemoteSettings

log = structlog.get_logger(__name__)

MIB = 1024**2
GIB = 1024**3
GROUP_PREFIX = "skyport-"
#: Roles a project member has; one of them is all the remote needs.
MEMBER_ROLES = ("member", "_member_")


def classify(exc: Exception, what: str) -> CloudError:
    """An openstacksdk/keystoneauth exception as a :class:`CloudError` with the cloud's own words."""
    from keystoneauth1 import exceptions as ksa
    from openstack import exceptions as sdk

    if isinstance(exc, CloudError):
        return exc
    cause = exc.__cause__ or exc.__context__
    wrapped = isinstance(exc, sdk.SDKException) and not isinstance(exc, sdk.HttpException)
    if wrapped and isinstance(cause, ksa.ClientException):  # authorize() wraps keystoneauth's error
        return classify(cause, what)
    if isinstance(exc, sdk.ConfigException):
        return CloudError(f"{exc} (see clouds.yaml on the core's host)", reason="auth")
    if isinstance(exc, sdk.HttpException):
        status = int(exc.status_code or 0)
        text = _words(exc)
        lowered = text.lower()
        if "quota exceeded" in lowered or status == 413 or "overlimit" in lowered.replace(" ", ""):
            return CloudError(text, reason="quota")
        if "no valid host" in lowered:
            return CloudError(text, reason="capacity")
        if status == 429 or status >= 500:
            return CloudError(f"{text} ({what})", reason="throttled")
        if status in (401, 403):
            return CloudError(f"{text} ({what})", reason="auth")
        if status == 404 or isinstance(exc, sdk.ResourceNotFound):
            return CloudError(text, reason="not_found")
        return CloudError(text, reason="invalid")
    if isinstance(exc, ksa.Unauthorized):
        return CloudError(f"the cloud refused the credentials: {exc}", reason="auth")
    if isinstance(exc, (ksa.ConnectFailure, ksa.ConnectTimeout, ksa.DiscoveryFailure)):
        return CloudError(f"cannot reach the cloud for {what}: {exc}", reason="throttled")
    if isinstance(exc, ksa.ClientException):
        return CloudError(f"{what}: {exc}", reason="auth" if "auth" in str(exc).lower() else "provider")
    if isinstance(exc, sdk.SDKException):
        return CloudError(f"{what}: {exc}", reason="provider")
    return CloudError(f"{what}: {exc}", reason="provider")


def _words(exc: Any) -> str:
    """The cloud's message of an HTTP error (Nova: ``{"forbidden": {"message": ...}}``; Neutron:
    ``{"NeutronError": {"message": ...}}``), without the SDK's request dump."""
    response = getattr(exc, "response", None)
    try:
        body = response.json() if response is not None else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        for value in body.values():
            if isinstance(value, dict) and value.get("message"):
                return str(value["message"])
        if body.get("message"):
            return str(body["message"])
    return str(getattr(exc, "details", None) or getattr(exc, "message", None) or exc)


def _gpus(extra_specs: Mapping[str, Any]) -> tuple[int, str]:
    """GPUs of a flavor from its extra specs: ``pci_passthrough:alias`` (``a100:2,t4:1``) or a vGPU."""
    alias = str(extra_specs.get("pci_passthrough:alias") or "")
    count, models = 0, []
    for item in filter(None, (a.strip() for a in alias.split(","))):
        name, _, number = item.partition(":")
        n = int(number) if number.isdigit() else 1
        count += n
        models.append(f"{n}x {name}")
    vgpu = str(extra_specs.get("resources:VGPU") or "")
    if vgpu.isdigit():
        count += int(vgpu)
        models.append(f"{vgpu}x vGPU")
    return count, ", ".join(models)


def _meta(server: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in (getattr(server, "metadata", None) or {}).items()}


def _tag_map(group: Any) -> dict[str, str]:
    tags: dict[str, str] = {}
    for tag in getattr(group, "tags", None) or []:
        key, sep, value = str(tag).partition("=")
        if sep:
            tags[key] = value
    return tags


def _addresses(server: Any) -> tuple[str, str]:
    private = public = ""
    for entries in (getattr(server, "addresses", None) or {}).values():
        for entry in entries:
            kind = entry.get("OS-EXT-IPS:type")
            if kind == "floating" and not public:
                public = str(entry.get("addr", ""))
            elif not private:
                private = str(entry.get("addr", ""))
    return public, private


def partition_status(
    partition_id: str, servers: Sequence[Any], groups: Sequence[Any]
) -> CloudPartitionStatus | None:
    """Where a partition is, from its servers and security groups (None: nothing of it is left)."""
    live = [s for s in servers if str(s.status).upper() not in ("DELETED", "SOFT_DELETED")]
    if not live and not groups:
        return None
    tags: dict[str, str] = {}
    for group in groups:
        tags.update(_tag_map(group))
    for server in live:
        tags.update({k: v for k, v in _meta(server).items() if k.startswith("skyport-") and k != TAG_NODE})
    nodes = []
    for server in sorted(live, key=lambda s: _meta(s).get(TAG_NODE, s.name)):
        public, private = _addresses(server)
        nodes.append(
            ProvisionedNode(
                name=_meta(server).get(TAG_NODE, str(server.name)),
                provider_id=str(server.id),
                public_ip=public,
                private_ip=private,
            )
        )
    provider_id = str(groups[0].id) if groups else ""

    def status(state: Any, message: str) -> CloudPartitionStatus:
        return CloudPartitionStatus(
            partition_id=partition_id,
            state=state,
            provider_id=provider_id,
            message=message,
            nodes=nodes,
            tags=tags,
        )

    if not live:
        return status("deleting", "its servers are deleted; its security group is left")
    if any(getattr(s, "task_state", None) == "deleting" for s in live):
        return status("deleting", "its servers are being deleted")
    for server in live:
        state = str(server.status).upper()
        if state == "ERROR":
            fault = getattr(server, "fault", None) or {}
            text = str(fault.get("message") or "the server is in ERROR")
            return status("failed", f"server {_meta(server).get(TAG_NODE, server.name)}: {text}")
        if state in ("SHUTOFF", "STOPPED", "SUSPENDED", "PAUSED", "SHELVED", "SHELVED_OFFLOADED"):
            return status("failed", f"server {_meta(server).get(TAG_NODE, server.name)} is {state}")
    expected = node_count(tags, len(live))
    active = [s for s in live if str(s.status).upper() == "ACTIVE"]
    if len(active) >= expected:
        return status("ready", f"{len(active)} server(s) active")
    return status("creating", f"{len(active)} of {expected} server(s) active")


class OpenStackGate:
    """Provisioner for a ``kind = "openstack"`` remote (see the module's docstring).

    ``connect``: makes the openstacksdk connection (default: ``openstack.connect(cloud=...)``).
    """

    kind = "openstack"
    provides = ("provisioner",)

    def __init__(
        self,
        remote_name: str,
        settings: OpenStackRemoteSettings | Mapping[str, Any],
        *,
        home: Path | None = None,
        clock: Callable[[], float] = time.time,
        connect: Callable[[], Any] | None = None,
    ) -> None:
        self.remote_name = remote_name
        self.settings = (
            settings
            if isinstance(settings, OpenStackRemoteSettings)
            else OpenStackRemoteSettings.model_validate(settings)
        )
        s = self.settings
        self._connect = connect or self._default_connect
        self._conn: Any = None
        self._conn_lock = threading.Lock()
        self._run = SDKRunner(f"openstack-{remote_name}", s.threads, s.call_timeout_s)
        self._network_id: str | None = None
        self._catalog: Cached[Catalog] = Cached(
            f"catalog of {remote_name}", self._load_catalog, s.catalog_max_age_s, clock=clock
        )

    def _default_connect(self) -> Any:
        import openstack

        s = self.settings
        return openstack.connect(cloud=s.cloud, region_name=s.region, api_timeout=min(30.0, s.call_timeout_s))

    def _connection(self) -> Any:
        """The connection, made on first use (in a worker thread: it reads clouds.yaml)."""
        with self._conn_lock:
            if self._conn is None:
                self._conn = self._connect()
            return self._conn

    async def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        def call() -> Any:
            try:
                return fn(self._connection())
            except Exception as exc:
                raise classify(exc, what) from None

        return await self._run(what, call)

    # -- lookups -------------------------------------------------------------------------------------

    @staticmethod
    def _ours(server: Any, partition_id: str | None) -> bool:
        meta = _meta(server)
        return TAG_PARTITION in meta and (partition_id is None or meta[TAG_PARTITION] == partition_id)

    async def _servers(self, partition_id: str | None) -> list[Any]:
        found: list[Any] = await self._call(
            "list servers",
            lambda c: [s for s in c.compute.servers(details=True) if self._ours(s, partition_id)],
        )
        return found

    async def _groups(self, partition_id: str | None) -> list[Any]:
        def find(c: Any) -> list[Any]:
            if partition_id is not None:
                return list(c.network.security_groups(name=GROUP_PREFIX + partition_id))
            return [g for g in c.network.security_groups() if TAG_PARTITION in _tag_map(g)]

        found: list[Any] = await self._call("list security groups", find)
        return found

    async def _network(self) -> str:
        if self._network_id is None:
            wanted = self.settings.network

            def find(c: Any) -> str:
                from openstack.exceptions import ResourceNotFound

                if wanted:
                    try:
                        return str(c.network.find_network(wanted, ignore_missing=False).id)
                    except ResourceNotFound:
                        raise CloudError(f"no network {wanted!r} in the project", reason="invalid") from None
                own = [
                    n for n in c.network.networks(project_id=c.current_project_id) if not n.is_router_external
                ]
                if len(own) != 1:
                    raise CloudError(
                        f"the project has {len(own)} networks: set network on remote {self.remote_name}",
                        reason="invalid",
                    )
                return str(own[0].id)

            self._network_id = await self._call("find the network", find)
        return self._network_id

    # -- catalog -------------------------------------------------------------------------------------

    async def _load_catalog(self) -> Catalog:
        s = self.settings
        raw_flavors: list[Any] = await self._call(
            "list flavors", lambda c: list(c.compute.flavors(details=True))
        )
        flavors: list[CatalogFlavor] = []
        for f in sorted(raw_flavors, key=lambda f: str(f.name)):
            if s.flavors and f.id not in s.flavors and f.name not in s.flavors:
                continue
            price = price_for(str(f.name), {}, s)
            if str(f.id) in s.prices:
                price = s.prices[str(f.id)]
            if price is None:
                continue
            gpus, model = _gpus(getattr(f, "extra_specs", None) or {})
            flavors.append(
                CatalogFlavor(
                    id=str(f.id),
                    name=f"{f.name} ({model})" if model else str(f.name),
                    cpus=int(f.vcpus or 0),
                    mem=int(f.ram or 0) * MIB,
                    gpus=gpus,
                    storage=(int(f.disk or 0) + int(getattr(f, "ephemeral", 0) or 0)) * GIB,
                    price=price,
                )
            )
        if not flavors:
            log.warning("no priced flavor: set prices or default_price", remote=self.remote_name)
        wanted = [w for w in dict.fromkeys([*s.images, s.default_image or ""]) if w]
        raw_images: list[Any] = await self._call(
            "list images", lambda c: list(c.image.images(status="active"))
        )
        images = [
            CatalogImage(id=str(i.id), name=str(i.name or i.id))
            for i in sorted(raw_images, key=lambda i: str(i.name))
            if not wanted or i.id in wanted or i.name in wanted
        ]
        return Catalog(flavors=flavors, images=images)

    async def catalog(self) -> Catalog:
        return await self._catalog.get()

    async def _image_id(self, wanted: str) -> str:
        catalog = self._catalog.peek()
        for image in catalog.images if catalog else []:
            if wanted in (image.id, image.name):
                return image.id

        def find(c: Any) -> str:
            from openstack.exceptions import ResourceNotFound

            try:
                return str(c.image.find_image(wanted, ignore_missing=False).id)
            except ResourceNotFound:
                raise CloudError(f"no image {wanted!r} in the cloud", reason="invalid") from None

        found: str = await self._call("find the image", find)
        return found

    # -- the provisioner protocol --------------------------------------------------------------------

    async def create_partition(self, request: PartitionRequest) -> PartitionStatus:
        s = self.settings
        image_name = request.image or s.default_image
        if not image_name:
            raise CloudError(
                f"remote {self.remote_name} has no default_image and the job names none", reason="invalid"
            )
        servers = await self._servers(request.partition_id)
        group = await self._ensure_group(request)
        have = {_meta(x).get(TAG_NODE) for x in servers}
        missing = [n for n in request.nodes if n.node_name not in have]
        if missing:
            image_id = await self._image_id(image_name)
            network_id = await self._network()
            for node in missing:
                metadata = {
                    **{k: v[:255] for k, v in request.tags.items()},
                    TAG_PARTITION: request.partition_id,
                    TAG_NODES: str(len(request.nodes)),
                    TAG_NODE: node.node_name,
                }
                user_data = render_user_data(node, job_user=s.job_user, agent_install=s.agent_install)
                attrs = {
                    "name": node.node_name,
                    "flavor_id": request.flavor,
                    "image_id": image_id,
                    "networks": [{"uuid": network_id}],
                    "security_groups": [{"name": group.name}],
                    "user_data": base64.b64encode(user_data.encode()).decode(),
                    "metadata": metadata,
                }
                server = await self._call(
                    f"create server {node.node_name}", partial(_create_server, attrs=attrs)
                )
                log.info(
                    "server created",
                    remote=self.remote_name,
                    partition=request.partition_id,
                    server=server.id,
                )
                servers.append(server)
        status = partition_status(request.partition_id, servers, [group])
        assert status is not None
        return status

    async def _ensure_group(self, request: PartitionRequest) -> Any:
        s = self.settings
        name = GROUP_PREFIX + request.partition_id
        groups = await self._groups(request.partition_id)
        if groups:
            return groups[0]
        tags = [f"{k}={v}" for k, v in {**request.tags, TAG_PARTITION: request.partition_id}.items()]

        def make(c: Any) -> Any:
            group = c.network.create_security_group(
                name=name, description=f"Sky Port partition {request.name}: no inbound port but declared ones"
            )
            c.network.set_tags(group, tags)
            group.tags = tags
            rules: list[dict[str, Any]] = []
            if s.expose_ports:
                for port in sorted(set(request.ports)):
                    for cidr in s.expose_cidrs:
                        version = ipaddress.ip_network(cidr, strict=False).version
                        rules.append(
                            {
                                "protocol": "tcp",
                                "port_range_min": port,
                                "port_range_max": port,
                                "remote_ip_prefix": cidr,
                                "ethertype": f"IPv{version}",
                            }
                        )
            if s.internal_traffic:
                rules += [{"remote_group_id": group.id, "ethertype": e} for e in ("IPv4", "IPv6")]
            for rule in rules:
                c.network.create_security_group_rule(security_group_id=group.id, direction="ingress", **rule)
            return group

        return await self._call(f"create security group {name}", make)

    async def get_partition(self, partition_id: str) -> PartitionStatus | None:
        return partition_status(
            partition_id, await self._servers(partition_id), await self._groups(partition_id)
        )

    async def delete_partition(self, partition_id: str) -> None:
        servers = await self._servers(partition_id)
        pending = [x for x in servers if getattr(x, "task_state", None) != "deleting"]
        for server in pending:
            await self._call(
                f"delete server {server.name}",
                partial(_delete_server, server_id=str(server.id)),
            )
        if servers:
            return  # the group goes once Nova has removed the servers (and their ports)
        for group in await self._groups(partition_id):
            try:
                await self._call(
                    f"delete security group {group.name}",
                    partial(_delete_group, group_id=str(group.id)),
                )
            except CloudError as exc:
                if exc.reason not in ("invalid", "not_found"):  # 409 in use: the next call deletes it
                    raise

    async def list_partitions(self) -> list[PartitionStatus]:
        servers = await self._servers(None)
        groups = await self._groups(None)
        by_partition: dict[str, tuple[list[Any], list[Any]]] = {}
        for server in servers:
            by_partition.setdefault(_meta(server)[TAG_PARTITION], ([], []))[0].append(server)
        for group in groups:
            by_partition.setdefault(_tag_map(group)[TAG_PARTITION], ([], []))[1].append(group)
        found: list[PartitionStatus] = []
        for partition_id, (its_servers, its_groups) in sorted(by_partition.items()):
            status = partition_status(partition_id, its_servers, its_groups)
            if status is not None:
                found.append(status)
        return found

    async def close(self) -> None:
        await self._catalog.close()
        self._run.close()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    # -- credentials check ---------------------------------------------------------------------------

    async def check(self) -> RemoteCheck:
        """Who the credentials are, their roles on the project, what they can read, and the quota left.

        OpenStack has no dry run: creating and deleting are covered by the project ``member`` role.
        """
        items: list[CheckItem] = []
        try:
            who = await self._call("authenticate", _identity)
        except CloudError as exc:
            items.append(CheckItem(name="credentials", ok=False, detail=str(exc)))
            return RemoteCheck.of(self.remote_name, self.kind, "", items)
        identity = f"user {who['user']} in project {who['project']}"
        items.append(CheckItem(name="credentials", ok=True, detail=identity))
        roles = who["roles"]
        items.append(
            CheckItem(
                name="role member on the project",
                ok=any(r in MEMBER_ROLES for r in roles) or "admin" in roles,
                detail=f"roles: {', '.join(roles) or 'none'}"
                + (" (admin is more than needed)" if "admin" in roles else ""),
            )
        )

        async def step(
            name: str, what: Callable[[Any], Any], detail: Callable[[Any], str] = lambda _: ""
        ) -> Any:
            try:
                result = await self._call(name, what)
                items.append(CheckItem(name=name, ok=True, detail=detail(result)))
                return result
            except CloudError as exc:
                items.append(CheckItem(name=name, ok=False, detail=str(exc)))
                return None

        await step("compute: list servers", lambda c: list(c.compute.servers(details=False, limit=1)))
        await step(
            "compute: list flavors", lambda c: list(c.compute.flavors(details=True)), lambda r: f"{len(r)}"
        )
        await step("network: list security groups", lambda c: list(c.network.security_groups(limit=1)))
        await step("compute: quota", _quota, lambda r: str(r))
        try:
            network = await self._network()
            items.append(CheckItem(name="network", ok=True, detail=network))
        except CloudError as exc:
            items.append(CheckItem(name="network", ok=False, detail=str(exc)))
        if self.settings.default_image:
            try:
                image = await self._image_id(self.settings.default_image)
                items.append(CheckItem(name="default image", ok=True, detail=image))
            except CloudError as exc:
                items.append(CheckItem(name="default image", ok=False, detail=str(exc)))
        return RemoteCheck.of(self.remote_name, self.kind, identity, items)


def _identity(c: Any) -> dict[str, Any]:
    c.authorize()
    access = c.session.auth.get_access(c.session)
    return {
        "user": access.username or access.user_id,
        "project": access.project_name or access.project_id,
        "roles": list(access.role_names or []),
    }


def _quota(c: Any) -> str:
    absolute = c.compute.get_limits().absolute
    used = (
        ("instances", absolute.instances_used, absolute.instances),
        ("cores", absolute.total_cores_used, absolute.total_cores),
        ("RAM MiB", absolute.total_ram_used, absolute.total_ram),
    )
    return ", ".join(f"{name} {u}/{m if m not in (None, -1) else 'unlimited'}" for name, u, m in used)


def _create_server(c: Any, attrs: dict[str, Any]) -> Any:
    return c.compute.create_server(**attrs)


def _delete_server(c: Any, server_id: str) -> None:
    c.compute.delete_server(server_id, ignore_missing=True)


def _delete_group(c: Any, group_id: str) -> None:
    c.network.delete_security_group(group_id, ignore_missing=True)
