"""Remotes, their flavors and images, partitions and nodes."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update

from skyport.models import Flavor, Image, Node, Remote
from skyport.models.job import ACTIVE_STATES
from skyport.server.store.tables import flavors, images, jobs, nodes, partitions, remotes


def _remote(row: Any) -> Remote:
    return Remote(
        id=row.id,
        name=row.name,
        kind=row.kind,
        server=row.server,
        port=row.port,
        settings=row.settings,
    )


def list_remotes(conn: Connection) -> list[Remote]:
    return [_remote(r) for r in conn.execute(select(remotes).order_by(remotes.c.name))]


def get_remote(conn: Connection, *, name: str) -> Remote | None:
    row = (conn.execute(select(remotes).where(remotes.c.name == name))).first()
    return _remote(row) if row else None


def ensure_remote(
    conn: Connection, *, name: str, kind: str, server: str, settings: dict[str, Any], now: datetime
) -> str:
    """The remote's id; created if absent, its server and settings refreshed if present."""
    row = (conn.execute(select(remotes.c.id).where(remotes.c.name == name))).first()
    if row:
        conn.execute(update(remotes).where(remotes.c.id == row.id).values(server=server, settings=settings))
        return str(row.id)
    remote_id = str(uuid.uuid4())
    conn.execute(
        insert(remotes),
        {
            "id": remote_id,
            "name": name,
            "kind": kind,
            "account_id": None,
            "server": server,
            "port": 0,
            "settings": settings,
            "created_at": now,
        },
    )
    return remote_id


def ensure_static_partition(conn: Connection, *, remote_id: str, name: str, now: datetime) -> str:
    row = (
        conn.execute(
            select(partitions.c.id).where(partitions.c.remote_id == remote_id, partitions.c.name == name)
        )
    ).first()
    if row:
        return str(row.id)
    partition_id = str(uuid.uuid4())
    conn.execute(
        insert(partitions),
        {
            "id": partition_id,
            "remote_id": remote_id,
            "name": name,
            "state": "ready",
            "static": True,
            "created_at": now,
            "updated_at": now,
        },
    )
    return partition_id


def upsert_node(conn: Connection, node: Node, now: datetime) -> str:
    """Record a node as its gate describes it; keeps the id of a node already known by remote and name."""
    row = (
        conn.execute(select(nodes.c.id).where(nodes.c.remote_id == node.remote_id, nodes.c.name == node.name))
    ).first()
    values = {
        "partition_id": node.partition_id or None,
        "host": node.host,
        "ip": node.ip,
        "state_power": node.state_power,
        "state_alloc": node.state_alloc,
        "cpus": node.cpus,
        "mem": node.mem,
        "gpus": node.gpus,
        "storage": node.storage,
        "labels": node.labels,
        "updated_at": now,
    }
    if row:
        conn.execute(update(nodes).where(nodes.c.id == row.id).values(**values))
        return str(row.id)
    conn.execute(insert(nodes), {"id": node.id, "remote_id": node.remote_id, "name": node.name, **values})
    return node.id


def _node(row: Any) -> Node:
    return Node(
        id=row.id,
        name=row.name,
        host=row.host,
        ip=row.ip,
        remote_id=row.remote_id,
        partition_id=row.partition_id or "",
        state_power=row.state_power,
        state_alloc=row.state_alloc,
        cpus=row.cpus,
        mem=row.mem,
        gpus=row.gpus,
        storage=row.storage,
        labels=row.labels,
    )


def list_nodes(conn: Connection) -> list[Node]:
    """Nodes with what is allocated on them now (an idle node with jobs on it shows as busy)."""
    found = [_node(r) for r in conn.execute(select(nodes).order_by(nodes.c.name))]
    by_id = {n.id: n for n in found}
    active = conn.execute(
        select(jobs.c.node_ids, jobs.c.cpus, jobs.c.mem, jobs.c.gpus).where(
            jobs.c.state.in_([s.value for s in ACTIVE_STATES])
        )
    )
    for row in active:
        for node_id in row.node_ids:
            node = by_id.get(node_id)
            if node is not None:
                node.alloc_cpus += row.cpus
                node.alloc_mem += row.mem
                node.alloc_gpus += row.gpus
                if node.state_alloc == "idle":
                    node.state_alloc = "busy"
    return found


def list_flavors(conn: Connection) -> list[Flavor]:
    rows = conn.execute(select(flavors).order_by(flavors.c.price, flavors.c.name))
    return [
        Flavor(
            id=r.id,
            name=r.name,
            remote_id=r.remote_id,
            cpus=r.cpus,
            mem=r.mem,
            gpus=r.gpus,
            storage=r.storage,
            price=r.price,
        )
        for r in rows
    ]


def list_images(conn: Connection) -> list[Image]:
    rows = conn.execute(select(images).order_by(images.c.name))
    return [
        Image(id=r.id, name=r.name, remote_id=r.remote_id or "", kind=r.kind, comment=r.comment) for r in rows
    ]
