"""The gate protocol, provisioner face (DESIGN §4): what the core asks of a gate that creates capacity.

A provisioner creates and deletes *partitions*: one main node and ``count - 1`` workers of one flavor and
image, with our tags. The core's provisioning loop (``server/lifecycle/provisioning.py``) writes each
partition's row before calling ``create_partition``, so every call here is keyed by our partition id and
must be idempotent on it: creating a partition that exists already returns its status, deleting one that
is gone succeeds. ``list_partitions`` shows every partition the provider holds with our tag, so the
garbage collector can delete what has no live owner.

Nodes of a partition run ``skyport agent``: the request carries, per node, the one-time bootstrap token
the node enrols with (what cloud-init would hand the VM). No provider credential ever goes to a node.
A provisioner never touches the store; its errors are :class:`ProvisionerError` with the provider's own
text, which the core shows the job's owner.

Provisioners are found through the ``skyport.gates`` entry points: a class with ``provides =
("provisioner",)`` (and optionally ``"executor"``), built as ``Class(remote_name, settings)`` where
``settings`` is the remote's table from skyport.toml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

PartitionState = Literal["creating", "ready", "failed", "deleting", "deleted"]

#: Tag keys every provider resource of ours carries.
TAG_PARTITION = "skyport-partition"
TAG_CORE = "skyport-core"
#: Carried by a request whose job accepts preemptible (spot) capacity.
TAG_PREEMPTIBLE = "skyport-preemptible"
PREEMPTED = "preempted"


class ProvisionerError(Exception):
    """A provider call failed; the message is the provider's text (shown to the job's owner).

    ``transient``: worth retrying (throttling, a timeout, capacity that may come back).
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class CatalogFlavor:
    """A node type the provider offers, with its price per node-hour in the remote's currency."""

    id: str
    name: str
    cpus: int
    mem: int  # bytes
    gpus: int = 0
    storage: int = 0  # bytes
    price: float = 0.0


@dataclass(frozen=True)
class CatalogImage:
    id: str
    name: str
    kind: Literal["cloud", "container"] = "cloud"
    comment: str = ""


@dataclass(frozen=True)
class Catalog:
    flavors: list[CatalogFlavor]
    images: list[CatalogImage]


@dataclass(frozen=True)
class NodeBootstrap:
    """What one node needs to join: its name, the core's URL and CA, and its one-time enrolment token."""

    node_name: str
    core_url: str
    ca_pem: str
    token: str


@dataclass(frozen=True)
class PartitionRequest:
    partition_id: str  # ours; creation is idempotent on it
    name: str  # human and provider-visible name, e.g. "skyport-1a2b3c4d"
    flavor: str  # a catalog flavor id
    image: str | None  # a catalog image id (None: the remote's default)
    nodes: list[NodeBootstrap]  # one per node; the first is the main node
    ports: list[int] = field(default_factory=list)  # in-ports to open where the remote exposes them
    tags: dict[str, str] = field(default_factory=dict)  # includes TAG_PARTITION and TAG_CORE


@dataclass(frozen=True)
class ProvisionedNode:
    name: str
    provider_id: str = ""
    public_ip: str = ""
    private_ip: str = ""


@dataclass(frozen=True)
class PartitionStatus:
    partition_id: str
    state: PartitionState
    provider_id: str = ""
    message: str = ""  # the provider's words about the latest step (or failure)
    nodes: list[ProvisionedNode] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    #: Why it failed, machine-readable, when that matters to the job: ``preempted`` (spot capacity taken
    #: back: the job is requeued, not failed).
    reason: str = ""


class ProvisionerGate(Protocol):
    kind: str

    async def catalog(self) -> Catalog:
        """Flavors (with prices) and images the remote offers."""

    async def create_partition(self, request: PartitionRequest) -> PartitionStatus:
        """Start creating (returns at once, usually ``creating``); idempotent on ``partition_id``."""

    async def get_partition(self, partition_id: str) -> PartitionStatus | None:
        """Where the partition is; None when the provider holds nothing of it."""

    async def delete_partition(self, partition_id: str) -> None:
        """Start deleting; succeeds when it is already gone. Confirm with ``get_partition``."""

    async def list_partitions(self) -> list[PartitionStatus]:
        """Every partition the provider holds that carries our tag (for the garbage collector)."""

    async def close(self) -> None:
        """Release connections and the like."""


def describe(status: PartitionStatus) -> dict[str, Any]:
    """A status as plain data (for logs and events)."""
    return {
        "partition_id": status.partition_id,
        "state": status.state,
        "provider_id": status.provider_id,
        "message": status.message,
        "nodes": [n.name for n in status.nodes],
    }
