"""Where work runs: remotes (configured providers), their flavors and images, and nodes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Resource(BaseModel):
    """A named amount: ``cpus``, ``mem`` (bytes), ``gpus``, ``storage`` (bytes), ..."""

    name: str
    count: int
    value: str = ""


class Remote(BaseModel):
    """One configured provider instance. Its credentials are referenced by the core, never shown."""

    id: str
    name: str
    kind: str
    account: str = ""
    server: str = ""
    port: int = 0
    default_image_id: str = ""
    default_flavor_id: str = ""
    settings: dict[str, object] = Field(default_factory=dict)


class Flavor(BaseModel):
    """A node type a remote can provide."""

    id: str
    name: str
    remote_id: str
    cpus: int
    mem: int
    gpus: int = 0
    storage: int = 0
    price: float = 0.0


class Image(BaseModel):
    """A VM image (``cloud``) or a container image (``container``)."""

    id: str
    name: str
    remote_id: str = ""
    kind: Literal["cloud", "container"] = "container"
    comment: str = ""


class Node(BaseModel):
    """A machine jobs run on, with its capacity and what is allocated on it now."""

    id: str
    name: str
    host: str
    remote_id: str
    partition_id: str = ""
    state_power: Literal["up", "down"] = "up"
    state_alloc: Literal["idle", "busy", "offline", "maint", "stopped"] = "idle"
    cpus: int
    mem: int
    gpus: int = 0
    storage: int = 0
    labels: dict[str, str] = Field(default_factory=dict)
    alloc_cpus: int = 0
    alloc_mem: int = 0
    alloc_gpus: int = 0
    ip: str = ""
