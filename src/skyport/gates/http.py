"""The ``http`` provisioner: drives an out-of-process gate that speaks the gate protocol.

The protocol is the original Sky Port one (reference/gate-protocol.md), so the same code drives the
original cloud gate (``swmcloudgate`` 0.1.8, e.g. in its mocked mode) and our own ``skyport gate serve``:

- catalog: ``GET /<provider>/flavors`` and ``/images`` with the header ``extra: location=<loc>``; memory
  and storage travel in MiB (the original gate's ``memory_in_mb``), our catalog keeps bytes;
- create: ``POST /<provider>/partitions`` with the original headers (``partname``, ``flavorname``,
  ``count`` = nodes besides the main one, ...). The gate's name of our partition is ``skyport-<our
  partition id>``, so every later call finds it from our id alone, even after a restart of the core, and
  creation is idempotent (we look before we create: the original gate is not idempotent itself). The
  JSON body carries an empty ``pem_data`` (the original gate reads one; we never send a key) and, under
  ``skyport``, the whole request — the nodes' bootstrap tokens included, like the user data a cloud
  gets — for gates that start agents (``skyport gate serve``); the original gate ignores it;
- status: ``GET /<provider>/partitions/<name>``; PartInfo statuses map to ours (``creating|updating`` ->
  creating, ``succeeded`` -> ready, ``failed``, ``deleting``, ``deleted``; ``unknown`` -> creating, and no
  status at all -> the remote's ``missing_status``). A PartInfo with a ``skyport`` object (our own gate)
  gives state, message, nodes and tags exactly;
- delete: ``DELETE /<provider>/partitions/<the gate's id>`` (the id the gate reported, appended as is:
  the original Azure gate's ids are resource paths, hence its ``partitions//subscriptions/...`` routes).

Errors: a real HTTP error carries ``detail``; the original gate also answers HTTP 200 with an ``error``
key (text, or a traceback as a list of lines). Either way the gate's text is the
:class:`ProvisionerError`'s message; timeouts, connection failures, 429 and 5xx are transient. Every call
has a deadline (the remote's ``timeout_s``). mTLS with the remote's CA, certificate and key files.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from typing import Any, Literal

import httpx

from skyport.gates.provisioner import (
    TAG_PARTITION,
    Catalog,
    CatalogFlavor,
    CatalogImage,
    PartitionRequest,
    PartitionState,
    PartitionStatus,
    ProvisionedNode,
    ProvisionerError,
)
from skyport.server.settings import HTTPRemoteSettings

MIB = 1024**2
#: The gate's name of a partition of ours is this prefix and our partition id.
NAME_PREFIX = "skyport-"
#: The original Azure gate names a partition's resource group after it with this suffix (in listings).
AZURE_SUFFIX = "-resource-group"
#: Tags that travel as the original headers.
TAG_JOB = "skyport-job"
TAG_USER = "skyport-user"

STATUS_MAP: dict[str, PartitionState] = {
    "creating": "creating",
    "updating": "creating",
    "unknown": "creating",
    "succeeded": "ready",
    "failed": "failed",
    "deleting": "deleting",
    "deleted": "deleted",
}


def gate_name(partition_id: str) -> str:
    """The name the gate knows our partition by (``partname``)."""
    return NAME_PREFIX + partition_id


def partition_id_of(name: str) -> str | None:
    """Our partition id from a gate-side name, or None when the partition is not ours."""
    if not name.startswith(NAME_PREFIX):
        return None
    return name.removeprefix(NAME_PREFIX).removesuffix(AZURE_SUFFIX) or None


def _header_value(text: str) -> str:
    """Header values stay printable ASCII without the list separators the original gate splits on."""
    return "".join(c for c in text if 32 <= ord(c) < 127 and c not in ",;=")


def _error_text(value: Any) -> str:
    """The gate's words: a string, or the last meaningful line of a traceback sent as a list."""
    if isinstance(value, list):
        lines = [str(v).strip() for v in value if str(v).strip()]
        return lines[-1] if lines else "the gate reported an error"
    if isinstance(value, dict):
        return str(value.get("message") or value.get("detail") or value)
    return str(value)


def _status_from_partinfo(
    info: Mapping[str, Any], partition_id: str, missing: PartitionState
) -> PartitionStatus:
    ours = info.get("skyport")
    if isinstance(ours, Mapping):
        return PartitionStatus(
            partition_id=str(ours.get("partition_id") or partition_id),
            state=_our_state(ours.get("state")),
            provider_id=str(ours.get("provider_id") or info.get("id") or ""),
            message=str(ours.get("message") or ""),
            nodes=[
                ProvisionedNode(
                    name=str(n.get("name", "")),
                    provider_id=str(n.get("provider_id", "")),
                    public_ip=str(n.get("public_ip", "")),
                    private_ip=str(n.get("private_ip", "")),
                )
                for n in ours.get("nodes", [])
                if isinstance(n, Mapping)
            ],
            tags={str(k): str(v) for k, v in (ours.get("tags") or {}).items()},
        )
    raw = info.get("status")
    state = missing if raw in (None, "") else STATUS_MAP.get(str(raw).lower(), "creating")
    message = str(info.get("description") or "")
    if raw not in (None, "") and str(raw).lower() not in STATUS_MAP:
        message = f"the gate reports status {raw!r}" + (f": {message}" if message else "")
    name = str(info.get("name") or gate_name(partition_id))
    nodes: list[ProvisionedNode] = []
    if info.get("master_private_ip") or info.get("master_public_ip"):
        nodes.append(
            ProvisionedNode(
                name=f"{name}-main",
                public_ip=str(info.get("master_public_ip") or ""),
                private_ip=str(info.get("master_private_ip") or ""),
            )
        )
    for index, ip in enumerate(info.get("compute_instances_ips") or []):
        nodes.append(ProvisionedNode(name=f"{name}-{index}", private_ip=str(ip)))
    return PartitionStatus(
        partition_id=partition_id,
        state=state,
        provider_id=str(info.get("id") or ""),
        message=message,
        nodes=nodes,
        tags={TAG_PARTITION: partition_id},
    )


def _our_state(value: Any) -> PartitionState:
    text = str(value)
    if text in ("creating", "ready", "failed", "deleting", "deleted"):
        return text  # type: ignore[return-value]
    return "creating"


class HTTPGate:
    """Provisioner for a ``kind = "http"`` remote (see the module's docstring).

    ``transport``: an httpx transport instead of the network (tests).
    """

    kind = "http"
    provides = ("provisioner",)

    def __init__(
        self,
        remote_name: str,
        settings: HTTPRemoteSettings | Mapping[str, Any],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.remote_name = remote_name
        self.settings = (
            settings
            if isinstance(settings, HTTPRemoteSettings)
            else HTTPRemoteSettings.model_validate(settings)
        )
        s = self.settings
        if (s.cert_file is None) != (s.key_file is None):
            raise ValueError(f"remote {remote_name}: give both cert_file and key_file, or neither")
        self._base = s.url.rstrip("/") + "/" + s.provider.strip("/")
        verify: ssl.SSLContext | bool = True
        if s.url.startswith("https:"):
            context = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
            if s.cert_file is not None and s.key_file is not None:
                context.load_cert_chain(s.cert_file, s.key_file)
            verify = context
        self._client = httpx.AsyncClient(
            verify=verify, timeout=httpx.Timeout(s.timeout_s), transport=transport, follow_redirects=False
        )
        self._catalog: Catalog | None = None
        #: Partitions we asked the gate to delete (the original mocked gate keeps listing them).
        self._deleting: set[str] = set()

    # -- plumbing ------------------------------------------------------------------------------------

    def _headers(self, **extra: str) -> dict[str, str]:
        headers = {"accept": "application/json"}
        if self.settings.location:
            headers["extra"] = f"location={_header_value(self.settings.location)}"
        headers.update(extra)
        return headers

    async def _call(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        allow_404: bool = False,
    ) -> Any:
        """One call with a deadline; the decoded JSON, or None for an allowed 404."""
        url = self._base + path
        what = f"{method} {url}"
        payload: dict[str, Any] = {"pem_data": ""}  # the original gate reads a body; never a key
        payload.update(body or {})
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                response = await self._client.request(
                    method, url, headers=headers or self._headers(), json=payload
                )
        except (TimeoutError, httpx.TimeoutException):
            raise ProvisionerError(
                f"the gate did not answer {what} within {self.settings.timeout_s:g}s", transient=True
            ) from None
        except httpx.HTTPError as exc:
            raise ProvisionerError(f"cannot reach the gate for {what}: {exc}", transient=True) from None
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code == 404 and allow_404:
            return None
        if response.status_code >= 400:
            detail = _error_text(data.get("detail")) if isinstance(data, dict) and "detail" in data else ""
            text = detail or response.text.strip()[:500] or response.reason_phrase
            transient = response.status_code == 429 or response.status_code >= 500
            if isinstance(data, dict) and isinstance(data.get("transient"), bool):
                transient = data["transient"]
            raise ProvisionerError(
                f"{text} (gate: HTTP {response.status_code} on {what})", transient=transient
            )
        if isinstance(data, dict) and data.get("error"):
            transient = bool(data.get("transient", False))
            raise ProvisionerError(_error_text(data["error"]), transient=transient)
        if data is None:
            raise ProvisionerError(f"the gate answered {what} with no JSON: {response.text[:200]!r}")
        return data

    # -- the provisioner protocol --------------------------------------------------------------------

    async def catalog(self) -> Catalog:
        flavors_doc, images_doc = await asyncio.gather(
            self._call("GET", "/flavors"), self._call("GET", "/images")
        )
        flavors = []
        for item in _list(flavors_doc, "flavors"):
            flavors.append(
                CatalogFlavor(
                    id=str(item["id"]),
                    name=str(item.get("name") or item["id"]),
                    cpus=int(item.get("cpus") or 0),
                    mem=int(float(item.get("mem") or 0) * MIB),
                    gpus=int(item.get("gpus") or 0),
                    storage=int(float(item.get("storage") or 0) * MIB),
                    price=float(item.get("price") or 0.0),
                )
            )
        images = []
        for item in _list(images_doc, "images"):
            raw_extra = item.get("extra")
            extra: Mapping[str, Any] = raw_extra if isinstance(raw_extra, Mapping) else {}
            kind: Literal["cloud", "container"] = "container" if extra.get("kind") == "container" else "cloud"
            comment = str(extra.get("comment") or extra.get("status") or "")
            images.append(
                CatalogImage(
                    id=str(item["id"]), name=str(item.get("name") or item["id"]), kind=kind, comment=comment
                )
            )
        self._catalog = Catalog(flavors=flavors, images=images)
        return self._catalog

    async def create_partition(self, request: PartitionRequest) -> PartitionStatus:
        existing = await self.get_partition(request.partition_id)
        if existing is not None and existing.state not in ("deleted",):
            return existing
        catalog = self._catalog or await self.catalog()
        flavor = next((f for f in catalog.flavors if f.id == request.flavor), None)
        image_id = request.image or self.settings.default_image or ""
        image = next((i for i in catalog.images if i.id == image_id), None)
        partname = gate_name(request.partition_id)
        headers = self._headers(
            partname=partname,
            jobid=_header_value(request.tags.get(TAG_JOB, request.partition_id)),
            username=_header_value(request.tags.get(TAG_USER, "skyport")),
            flavorname=_header_value(flavor.name if flavor else request.flavor),
            osversion=_header_value(image.name if image else image_id),
            containerimage="",
            count=str(max(0, len(request.nodes) - 1)),
            location=_header_value(self.settings.location),
            ports=",".join(str(p) for p in request.ports),
            runtime=",".join(f"{_header_value(k)}={_header_value(v)}" for k, v in request.tags.items()),
        )
        body = {
            "skyport": {
                "partition_id": request.partition_id,
                "name": request.name,
                "flavor": request.flavor,
                "image": request.image,
                "nodes": [
                    {"node_name": n.node_name, "core_url": n.core_url, "ca_pem": n.ca_pem, "token": n.token}
                    for n in request.nodes
                ],
                "ports": list(request.ports),
                "tags": dict(request.tags),
            }
        }
        data = await self._call("POST", "/partitions", headers=headers, body=body)
        self._deleting.discard(request.partition_id)
        info = data.get("partition") if isinstance(data, dict) else None
        if not isinstance(info, Mapping):
            raise ProvisionerError(
                f"the gate's answer to creating {partname} has no partition: {data!r:.300}"
            )
        status = _status_from_partinfo(info, request.partition_id, "creating")
        if info.get("status") in (None, "") and "skyport" not in info:
            # Just accepted: the gate has not reported a state yet.
            status = PartitionStatus(
                partition_id=status.partition_id,
                state="creating",
                provider_id=status.provider_id,
                message=status.message or "creation accepted by the gate",
                nodes=status.nodes,
                tags=dict(request.tags),
            )
        return status

    async def get_partition(self, partition_id: str) -> PartitionStatus | None:
        info = await self._call(
            "GET", f"/partitions/{gate_name(partition_id)}", headers=self._headers(), allow_404=True
        )
        if info is None:
            self._deleting.discard(partition_id)
            return None
        if not isinstance(info, Mapping):
            raise ProvisionerError(f"the gate's answer about {gate_name(partition_id)} is not a partition")
        return self._seen(_status_from_partinfo(info, partition_id, self.settings.missing_status))

    async def delete_partition(self, partition_id: str) -> None:
        info = await self._call(
            "GET", f"/partitions/{gate_name(partition_id)}", headers=self._headers(), allow_404=True
        )
        if info is None:
            return
        provider_id = str(info.get("id") or gate_name(partition_id)) if isinstance(info, Mapping) else ""
        path = "/partitions/" + provider_id if provider_id.startswith("/") else f"/partitions/{provider_id}"
        await self._call("DELETE", path, headers=self._headers(), allow_404=True)
        self._deleting.add(partition_id)

    async def list_partitions(self) -> list[PartitionStatus]:
        data = await self._call("GET", "/partitions")
        found: list[PartitionStatus] = []
        for info in _list(data, "partitions"):
            ours = info.get("skyport")
            partition_id = (
                str(ours["partition_id"])
                if isinstance(ours, Mapping) and ours.get("partition_id")
                else partition_id_of(str(info.get("name") or ""))
            )
            if partition_id is None:
                continue  # not ours
            found.append(self._seen(_status_from_partinfo(info, partition_id, self.settings.missing_status)))
        return found

    async def close(self) -> None:
        await self._client.aclose()

    def _seen(self, status: PartitionStatus) -> PartitionStatus:
        """A partition we asked to delete that the gate still reports as live is ``deleting``."""
        if status.partition_id in self._deleting and status.state in ("creating", "ready"):
            return PartitionStatus(
                partition_id=status.partition_id,
                state="deleting",
                provider_id=status.provider_id,
                message=status.message or "deletion started",
                nodes=status.nodes,
                tags=status.tags,
            )
        return status


def _list(data: Any, key: str) -> list[Mapping[str, Any]]:
    items = data.get(key) if isinstance(data, Mapping) else None
    if not isinstance(items, list):
        raise ProvisionerError(f"the gate's answer has no {key!r} list: {data!r:.300}")
    return [item for item in items if isinstance(item, Mapping) and "id" in item]
