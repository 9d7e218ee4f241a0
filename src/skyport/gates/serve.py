"""``skyport gate serve``: the gate protocol served from any of our provisioner plugins.

The other side of :mod:`skyport.gates.http`: a core (ours through the ``http`` gate, or one that speaks
the original protocol) drives a provisioner that runs in another process or on another host — the
``sim`` cloud, or any plugin of the ``skyport.gates`` entry points — through the calls of
reference/gate-protocol.md, under ``/<kind>/...``.

- Mutual TLS is required; the server presents the home's server certificate and accepts client
  certificates of the home's CA whose user is on the allow list (default: the core's ``admin``), so the
  core identifies itself by its certificate. Anything else gets 403.
- Creation needs the Sky Port request in the JSON body (``skyport``: partition id, flavor, image, the
  nodes with their bootstrap tokens, ports, tags), as the ``http`` gate sends it; the original headers
  alone do not say how a node enrols. The partition's ``partname`` is kept as a tag, so the partition is
  found by our id or by that name. ``pem_data`` in a body is ignored (we never take a key).
- Errors are real HTTP errors with ``detail`` (the provider's text) and ``transient``: 409 for a refusal
  (quota, bad flavor), 503 for what is worth retrying, 404 for an unknown partition.
- A PartInfo carries, besides the original fields, a ``skyport`` object with our state, message, nodes
  and tags, so the ``http`` gate sees exactly what the provisioner said.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Body, Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from skyport.gates.provisioner import (
    NodeBootstrap,
    PartitionRequest,
    PartitionStatus,
    ProvisionerError,
    ProvisionerGate,
)
from skyport.pki import identity_from_certificate
from skyport.server.settings import RemoteSettingsBase
from skyport.server.tls import peer_certificate

MIB = 1024**2
#: The tag that keeps the gate-side name (``partname``) of a partition.
TAG_PARTNAME = "skyport-partname"
ENTRY_POINT_GROUP = "skyport.gates"
T = TypeVar("T")

OUR_TO_THEIRS = {
    "creating": "creating",
    "ready": "succeeded",
    "failed": "failed",
    "deleting": "deleting",
    "deleted": "deleted",
}


class GateLoadError(Exception):
    """A remote's provisioner cannot be built (unknown kind, not a provisioner, bad settings)."""


def load_provisioner(remote: RemoteSettingsBase, *, home: Path | None = None) -> ProvisionerGate:
    """Build the provisioner of ``remote`` from the ``skyport.gates`` entry point of its kind.

    ``home`` goes to classes that take one (the ``sim`` keeps its inventory there by default).
    """
    kind = str(getattr(remote, "kind", ""))
    points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=kind)
    point = next(iter(points), None)
    if point is None:
        raise GateLoadError(
            f"no gate plugin of kind {kind!r} is installed (entry points {ENTRY_POINT_GROUP})"
        )
    cls = point.load()
    if "provisioner" not in getattr(cls, "provides", ()):
        raise GateLoadError(f"the {kind!r} gate creates no capacity: it cannot be served as a provisioner")
    kwargs: dict[str, Any] = {}
    if home is not None and "home" in inspect.signature(cls).parameters:
        kwargs["home"] = home
    try:
        gate: ProvisionerGate = cls(remote.name, remote, **kwargs)
    except ValueError as exc:
        raise GateLoadError(str(exc)) from None
    return gate


class _Node(BaseModel):
    node_name: str
    core_url: str
    ca_pem: str
    token: str


class _SkyportRequest(BaseModel):
    partition_id: str = Field(min_length=1, max_length=200)
    name: str = ""
    flavor: str
    image: str | None = None
    nodes: list[_Node] = Field(min_length=1)
    ports: list[int] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)


class _Body(BaseModel):
    """The JSON body of a call: the original ``pem_data`` (ignored) and our request (on create)."""

    pem_data: str | None = None
    skyport: _SkyportRequest | None = None


def part_info(status: PartitionStatus) -> dict[str, Any]:
    """A status as the original PartInfo, plus our ``skyport`` object."""
    nodes = status.nodes
    return {
        "id": status.partition_id,
        "name": status.tags.get(TAG_PARTNAME) or status.partition_id,
        "status": OUR_TO_THEIRS.get(status.state, "unknown"),
        "created": None,
        "updated": None,
        "description": status.message,
        "master_public_ip": nodes[0].public_ip if nodes else "",
        "master_private_ip": nodes[0].private_ip if nodes else "",
        "compute_instances_ips": [n.private_ip for n in nodes[1:]],
        "skyport": {
            "partition_id": status.partition_id,
            "state": status.state,
            "provider_id": status.provider_id,
            "message": status.message,
            "nodes": [
                {
                    "name": n.name,
                    "provider_id": n.provider_id,
                    "public_ip": n.public_ip,
                    "private_ip": n.private_ip,
                }
                for n in nodes
            ],
            "tags": dict(status.tags),
        },
    }


def _provider_error(exc: ProvisionerError) -> HTTPException:
    return HTTPException(503 if exc.transient else 409, detail=str(exc))


def create_gate_app(
    provisioner: ProvisionerGate,
    kind: str,
    *,
    allowed_users: Iterable[str] = ("admin",),
    authenticate: bool = True,
) -> FastAPI:
    """The gate protocol for ``provisioner`` under ``/<kind>``; ``allowed_users``: certificate user names.

    ``authenticate=False`` only for in-process tests of the routes (the TLS layer is not there).
    """
    allowed = set(allowed_users)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await provisioner.close()

    app = FastAPI(title=f"Sky Port gate ({kind})", lifespan=lifespan)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": exc.detail, "transient": exc.status_code in (429, 503)}, status_code=exc.status_code
        )

    async def caller(request: Request) -> str:
        if not authenticate:
            return "test"
        der = peer_certificate(request.scope)
        if der is None:
            raise HTTPException(401, detail="a client certificate is required")
        identity = identity_from_certificate(der)
        if identity is None or identity.name not in allowed:
            who = identity.name if identity else "a certificate without a user"
            raise HTTPException(403, detail=f"{who} may not use this gate")
        return identity.name

    async def guarded(call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except ProvisionerError as exc:
            raise _provider_error(exc) from None

    async def find(ref: str) -> PartitionStatus | None:
        ref = ref.lstrip("/")
        status = await guarded(lambda: provisioner.get_partition(ref))
        if status is not None:
            return status
        for candidate in await guarded(provisioner.list_partitions):
            if candidate.tags.get(TAG_PARTNAME) == ref:
                return candidate
        return None

    prefix = f"/{kind}"

    @app.get(prefix + "/flavors")
    async def flavors(_who: str = Depends(caller)) -> dict[str, Any]:
        catalog = await guarded(provisioner.catalog)
        return {
            "flavors": [
                {
                    "id": f.id,
                    "name": f.name,
                    "cpus": f.cpus,
                    "gpus": f.gpus,
                    "mem": f.mem // MIB,
                    "storage": f.storage // MIB,
                    "price": f.price,
                }
                for f in catalog.flavors
            ]
        }

    def image_doc(image: Any) -> dict[str, Any]:
        return {
            "id": image.id,
            "name": image.name,
            "extra": {"status": "active", "kind": image.kind, "comment": image.comment},
        }

    @app.get(prefix + "/images")
    async def images(_who: str = Depends(caller)) -> dict[str, Any]:
        catalog = await guarded(provisioner.catalog)
        return {"images": [image_doc(i) for i in catalog.images]}

    @app.get(prefix + "/images/{image_id:path}")
    async def image(image_id: str, _who: str = Depends(caller)) -> dict[str, Any]:
        catalog = await guarded(provisioner.catalog)
        for item in catalog.images:
            if item.id == image_id:
                return image_doc(item)
        raise HTTPException(404, detail="Image not found")

    @app.post(prefix + "/partitions")
    async def create(
        partname: str | None = Header(default=None),
        flavorname: str | None = Header(default=None),
        body: _Body | None = Body(default=None),
        _who: str = Depends(caller),
    ) -> dict[str, Any]:
        wanted = body.skyport if body is not None else None
        if wanted is None:
            raise HTTPException(
                400,
                detail="this gate needs the Sky Port request in the body (skyport: partition_id, flavor, "
                "nodes with their bootstrap tokens); the headers alone do not say how a node enrols",
            )
        catalog = await guarded(provisioner.catalog)
        flavor = wanted.flavor
        if not any(f.id == flavor for f in catalog.flavors):
            # The original protocol names flavors by name.
            flavor = next((f.id for f in catalog.flavors if f.name in (wanted.flavor, flavorname)), flavor)
        tags = dict(wanted.tags)
        tags[TAG_PARTNAME] = partname or wanted.name or wanted.partition_id
        request = PartitionRequest(
            partition_id=wanted.partition_id,
            name=wanted.name or tags[TAG_PARTNAME],
            flavor=flavor,
            image=wanted.image,
            nodes=[NodeBootstrap(n.node_name, n.core_url, n.ca_pem, n.token) for n in wanted.nodes],
            ports=list(wanted.ports),
            tags=tags,
        )
        status = await guarded(lambda: provisioner.create_partition(request))
        return {"partition": part_info(status)}

    @app.get(prefix + "/partitions")
    async def listing(_who: str = Depends(caller)) -> dict[str, Any]:
        return {"partitions": [part_info(s) for s in await guarded(provisioner.list_partitions)]}

    @app.get(prefix + "/partitions/{ref:path}")
    async def get(ref: str, _who: str = Depends(caller)) -> dict[str, Any]:
        status = await find(ref)
        if status is None:
            raise HTTPException(404, detail="Partition not found")
        return part_info(status)

    @app.delete(prefix + "/partitions/{ref:path}")
    async def delete(ref: str, _who: str = Depends(caller)) -> dict[str, Any]:
        status = await find(ref)
        if status is None:
            raise HTTPException(404, detail="Partition not found")
        await guarded(lambda: provisioner.delete_partition(status.partition_id))
        return {"result": "Deletion started"}

    return app
