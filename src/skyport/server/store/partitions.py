"""Elastic partitions: rows the provisioning loop drives, catalogs of cloud remotes, and costs.

A partition's row is written before any provider call (intent first), with our id, which is also the
idempotency key and the tag the provider's resources carry. States::

    requested -> creating -> booting -> in_use <-> idle -> deleting -> deleted
                         \\-> failed -> deleting

``booting``: the provider says the machines are up; the agents have not all enrolled yet. ``in_use``:
a job runs (or is about to) on its nodes. ``idle``: kept warm for another job of the same account,
flavor and image until the remote's idle timeout.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update

from skyport.gates.provisioner import Catalog
from skyport.models.job import ACTIVE_STATES, TERMINAL_STATES
from skyport.server.store.tables import accounts, flavors, images, jobs, nodes, partitions, tokens

#: States in which a partition holds (or is getting) provider resources.
LIVE = ("requested", "creating", "booting", "in_use", "idle", "deleting", "failed")
#: States counted against a remote's ``max_creating``.
CREATING = ("requested", "creating", "booting")
#: States whose nodes the scheduler may place jobs on.
SCHEDULABLE = ("in_use", "idle")


def flavor_id_for(remote_id: str, catalog_id: str) -> str:
    return str(uuid.uuid5(uuid.UUID(remote_id), f"flavor:{catalog_id}"))


def image_id_for(remote_id: str, catalog_id: str) -> str:
    return str(uuid.uuid5(uuid.UUID(remote_id), f"image:{catalog_id}"))


def save_catalog(conn: Connection, remote_id: str, catalog: Catalog) -> None:
    """Make the remote's flavors and images what the provider offers now."""
    wanted = {flavor_id_for(remote_id, f.id): f for f in catalog.flavors}
    known = {r.id for r in conn.execute(select(flavors.c.id).where(flavors.c.remote_id == remote_id))}
    for flavor_id, f in wanted.items():
        values = {
            "name": f.name,
            "cpus": f.cpus,
            "mem": f.mem,
            "gpus": f.gpus,
            "storage": f.storage,
            "price": f.price,
        }
        if flavor_id in known:
            conn.execute(update(flavors).where(flavors.c.id == flavor_id).values(**values))
        else:
            conn.execute(insert(flavors), {"id": flavor_id, "remote_id": remote_id, **values})
    gone = known - wanted.keys()
    if gone:
        conn.execute(delete(flavors).where(flavors.c.id.in_(gone)))
    wanted_images = {image_id_for(remote_id, i.id): i for i in catalog.images}
    known_images = {r.id for r in conn.execute(select(images.c.id).where(images.c.remote_id == remote_id))}
    for image_id, i in wanted_images.items():
        values = {"name": i.name, "kind": i.kind, "comment": i.comment}
        if image_id in known_images:
            conn.execute(update(images).where(images.c.id == image_id).values(**values))
        else:
            conn.execute(insert(images), {"id": image_id, "remote_id": remote_id, **values})
    gone_images = known_images - wanted_images.keys()
    if gone_images:
        conn.execute(delete(images).where(images.c.id.in_(gone_images)))


def flavor_rows(conn: Connection, remote_ids: list[str]) -> list[Any]:
    if not remote_ids:
        return []
    return list(conn.execute(select(flavors).where(flavors.c.remote_id.in_(remote_ids))))


def creating_counts(conn: Connection) -> dict[str, int]:
    """Partitions being created now, per remote."""
    rows = conn.execute(
        select(partitions.c.remote_id, func.count())
        .where(partitions.c.state.in_(CREATING), partitions.c.static.is_(False))
        .group_by(partitions.c.remote_id)
    )
    return {r[0]: int(r[1]) for r in rows}


@dataclass(frozen=True)
class NewPartition:
    id: str
    remote_id: str
    name: str
    flavor_id: str
    image: str | None
    account_id: str
    job_id: str
    node_count: int
    price: float


def insert_partition(conn: Connection, p: NewPartition, now: datetime) -> None:
    conn.execute(
        insert(partitions),
        {
            "id": p.id,
            "remote_id": p.remote_id,
            "name": p.name,
            "state": "requested",
            "static": False,
            "created_at": now,
            "updated_at": now,
            "flavor_id": p.flavor_id,
            "image": p.image,
            "account_id": p.account_id,
            "job_id": p.job_id,
            "node_count": p.node_count,
            "price": p.price,
            "charged_until": now,
        },
    )


@dataclass(frozen=True)
class Work:
    """What the provisioning loop has to look at, read in one transaction (one read per pass, not one
    per partition: hundreds of partitions are made at once)."""

    #: Elastic partitions not deleted and not backing off, each with its job's state (``job_state``,
    #: ``job_partition_id``, ``job_cancel_requested``, ``job_requeue_requested``, ``job_node_ids``).
    rows: list[Any]
    #: Partition id -> how many of its nodes are up (partitions booting).
    nodes_up: dict[str, int]
    #: Partition id -> an active job on it (partitions in use or idle that have one).
    active: dict[str, str]


def work(conn: Connection, now: datetime) -> Work:
    """Elastic partitions the loop has something to do for (not deleted; not backing off)."""
    query = (
        select(
            partitions,
            flavors.c.name.label("flavor_name"),
            jobs.c.state.label("job_state"),
            jobs.c.partition_id.label("job_partition_id"),
            jobs.c.cancel_requested.label("job_cancel_requested"),
            jobs.c.requeue_requested.label("job_requeue_requested"),
            jobs.c.node_ids.label("job_node_ids"),
        )
        .outerjoin(flavors, flavors.c.id == partitions.c.flavor_id)
        .outerjoin(jobs, jobs.c.id == partitions.c.job_id)
        .where(
            partitions.c.static.is_(False),
            partitions.c.state.in_(LIVE),
            (partitions.c.next_try_at.is_(None)) | (partitions.c.next_try_at <= now),
        )
        .order_by(partitions.c.created_at)
    )
    rows = list(conn.execute(query))
    booting = [r.id for r in rows if r.state == "booting"]
    held = [r.id for r in rows if r.state in SCHEDULABLE]
    return Work(rows, up_counts(conn, booting), active_jobs(conn, held))


def get(conn: Connection, partition_id: str) -> Any:
    return conn.execute(select(partitions).where(partitions.c.id == partition_id)).first()


def set_state(conn: Connection, /, partition_id: str, now: datetime, **values: Any) -> None:
    set_states(conn, [(partition_id, values)], now)


def set_states(conn: Connection, changes: list[tuple[str, dict[str, Any]]], now: datetime) -> None:
    """Update partitions, (id, new values) each: one ``executemany`` per set of columns changed.

    The provisioning loop moves hundreds of partitions at once (a burst's VMs boot together); an
    UPDATE each was a statement's Python each, on the event loop."""
    shapes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for partition_id, values in changes:
        row = {"b_id": partition_id, "v_updated_at": now, **{f"v_{k}": v for k, v in values.items()}}
        shapes.setdefault(tuple(sorted(values)), []).append(row)
    for columns, rows in shapes.items():
        statement = (
            update(partitions)
            .where(partitions.c.id == bindparam("b_id"))
            .values({c: bindparam(f"v_{c}", type_=partitions.c[c].type) for c in ("updated_at", *columns)})
        )
        conn.execute(statement, rows)


def node_states(conn: Connection, partition_id: str) -> list[Any]:
    return nodes_of(conn, [partition_id]).get(partition_id, [])


def nodes_of(conn: Connection, partition_ids: list[str]) -> dict[str, list[Any]]:
    """The nodes of each partition (one query for many partitions)."""
    found: dict[str, list[Any]] = {}
    if not partition_ids:
        return found
    rows = conn.execute(
        select(
            nodes.c.id, nodes.c.name, nodes.c.ip, nodes.c.host, nodes.c.state_power, nodes.c.partition_id
        ).where(nodes.c.partition_id.in_(partition_ids))
    )
    for row in rows:
        found.setdefault(row.partition_id, []).append(row)
    return found


def up_counts(conn: Connection, partition_ids: list[str]) -> dict[str, int]:
    """How many nodes of each partition are up (one query for many partitions)."""
    if not partition_ids:
        return {}
    rows = conn.execute(
        select(nodes.c.partition_id, func.count())
        .where(nodes.c.partition_id.in_(partition_ids), nodes.c.state_power == "up")
        .group_by(nodes.c.partition_id)
    )
    return {r[0]: int(r[1]) for r in rows}


def job_of(conn: Connection, job_id: str | None) -> Any:
    return None if job_id is None else jobs_of(conn, [job_id]).get(job_id)


def jobs_of(conn: Connection, job_ids: list[str]) -> dict[str, Any]:
    """What the provisioning loop needs of partitions' jobs, by job id (those that exist)."""
    rows = conn.execute(
        select(
            jobs.c.id,
            jobs.c.state,
            jobs.c.partition_id,
            jobs.c.cancel_requested,
            jobs.c.requeue_requested,
            jobs.c.attempt,
            jobs.c.spec,
            jobs.c.node_ids,
        ).where(jobs.c.id.in_(job_ids))
    )
    return {r.id: r for r in rows}


def active_jobs(conn: Connection, partition_ids: list[str]) -> dict[str, str]:
    """Partition id -> one active job on it, for the partitions that have one (one query for many)."""
    if not partition_ids:
        return {}
    rows = conn.execute(
        select(jobs.c.partition_id, func.min(jobs.c.id))
        .where(jobs.c.partition_id.in_(partition_ids), jobs.c.state.in_([s.value for s in ACTIVE_STATES]))
        .group_by(jobs.c.partition_id)
    )
    return {r[0]: str(r[1]) for r in rows}


def job_specs(conn: Connection, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Job id -> its spec (what the provider must be told: ports to open, preemptible)."""
    if not job_ids:
        return {}
    rows = conn.execute(select(jobs.c.id, jobs.c.spec).where(jobs.c.id.in_(job_ids)))
    return {r.id: dict(r.spec or {}) for r in rows}


def forget_nodes(conn: Connection, partition_id: str) -> None:
    """The partition is gone: its nodes and any unused enrolment tokens go too."""
    conn.execute(delete(nodes).where(nodes.c.partition_id == partition_id))
    conn.execute(delete(tokens).where(tokens.c.partition_id == partition_id))


def charge_idle(conn: Connection, partition_id: str, now: datetime) -> float:
    """Charge the partition's account for time it was kept without a job (warm); returns the cost."""
    row = get(conn, partition_id)
    if row is None or row.idle_since is None or row.account_id is None:
        return 0.0
    since = max(row.idle_since, row.charged_until or row.idle_since)
    hours = max(0.0, (now - since).total_seconds()) / 3600.0
    cost = float(row.price * row.node_count * hours)
    conn.execute(
        update(accounts).where(accounts.c.id == row.account_id).values(spend=accounts.c.spend + cost)
    )
    conn.execute(update(partitions).where(partitions.c.id == partition_id).values(charged_until=now))
    return cost


def charge_jobs(conn: Connection, job_ids: list[str], now: datetime) -> None:
    """Jobs on elastic partitions that just ended (or were requeued): record their cost, charge accounts.

    Cost = the partition's price x its nodes x the hours since the job was scheduled (which, on a new
    partition, is when its creation was asked for: boot and staging time count).
    """
    if not job_ids:
        return
    rows = conn.execute(
        select(
            jobs.c.id,
            jobs.c.account_id,
            jobs.c.scheduled_time,
            jobs.c.cost,
            partitions.c.price,
            partitions.c.node_count,
        )
        .join(partitions, partitions.c.id == jobs.c.partition_id)
        .where(jobs.c.id.in_(job_ids))
    )
    for row in rows:
        if row.scheduled_time is None:
            continue
        hours = max(0.0, (now - row.scheduled_time).total_seconds()) / 3600.0
        cost = row.price * row.node_count * hours
        conn.execute(update(jobs).where(jobs.c.id == row.id).values(cost=row.cost + cost))
        conn.execute(
            update(accounts).where(accounts.c.id == row.account_id).values(spend=accounts.c.spend + cost)
        )


def ended(state: str) -> bool:
    return state in {s.value for s in TERMINAL_STATES}


def live_ids(conn: Connection) -> set[str]:
    """Ids of partitions that should exist at the provider (for the garbage collector)."""
    rows = conn.execute(
        select(partitions.c.id).where(partitions.c.static.is_(False), partitions.c.state.in_(LIVE))
    )
    return {r.id for r in rows}
