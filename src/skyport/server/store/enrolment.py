"""Node enrolment: one-time bootstrap tokens, and the node records agents are known by.

A bootstrap token lets exactly one agent enrol as one named node of one remote, once, before it expires.
Only the SHA-256 of the secret is stored (secrets are 256 random bits, so a plain hash is enough).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from skyport.agent.protocol import node_id_for
from skyport.server.store.tables import jobs, nodes, partitions, remotes, tokens

BOOTSTRAP = "bootstrap"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Enrolment:
    """What redeeming a bootstrap token grants: the node's identity."""

    remote_id: str
    remote_name: str
    node_id: str
    node_name: str
    #: The elastic partition the node joins (None: the remote's static partition).
    partition_id: str | None = None


def create_bootstrap_token(
    conn: Connection,
    *,
    remote_id: str,
    node_name: str,
    ttl: timedelta,
    now: datetime,
    partition_id: str | None = None,
) -> str:
    """A new one-time token for enrolling ``node_name`` on the remote; returns the secret (shown once)."""
    secret = secrets.token_urlsafe(32)
    conn.execute(
        insert(tokens),
        {
            "id": str(uuid.uuid4()),
            "kind": BOOTSTRAP,
            "secret_hash": hash_secret(secret),
            "user_id": None,
            "name": f"enrol {node_name}",
            "scopes": ["node:enrol"],
            "remote_id": remote_id,
            "node_name": node_name,
            "partition_id": partition_id,
            "created_at": now,
            "expires_at": now + ttl,
        },
    )
    return secret


def redeem_bootstrap_token(conn: Connection, secret: str, now: datetime) -> Enrolment | str:
    """Use a token up (atomically); the enrolment it grants, or why it is refused."""
    return redeem_bootstrap_tokens(conn, [secret], now)[0]


def redeem_bootstrap_tokens(conn: Connection, secrets_: list[str], now: datetime) -> list[Enrolment | str]:
    """Use tokens up (atomically), in a few statements (not a few per token): what each grants, or why
    it is refused. A token named twice enrols once; the second use is refused."""
    hashes = [hash_secret(secret) for secret in secrets_]
    rows = {
        row.secret_hash: row
        for row in conn.execute(
            select(tokens, remotes.c.name.label("remote_name"))
            .join(remotes, remotes.c.id == tokens.c.remote_id)
            .where(tokens.c.secret_hash.in_(set(hashes)), tokens.c.kind == BOOTSTRAP)
        )
    }
    wanted = {row.id for row in rows.values() if _refusal(row, now) is None}
    claimed: set[str] = set()
    if wanted:
        claimed = set(
            conn.execute(
                update(tokens)
                .where(tokens.c.id.in_(wanted), tokens.c.used_at.is_(None))
                .values(used_at=now)
                .returning(tokens.c.id)
            ).scalars()
        )
    results: list[Enrolment | str] = []
    for secret_hash in hashes:
        row = rows.get(secret_hash)
        refusal = _refusal(row, now)
        if refusal is not None or row is None:
            results.append(refusal or _UNKNOWN)
        elif row.id not in claimed:
            results.append(_USED)
        else:
            claimed.discard(row.id)  # a second use of the same token in this group is refused
            node_id = node_id_for(row.remote_id, row.node_name)
            results.append(
                Enrolment(row.remote_id, row.remote_name, node_id, row.node_name, row.partition_id)
            )
    return results


_UNKNOWN = "the bootstrap token is not known to this core"
_USED = "the bootstrap token has been used already: each token enrols one node once"


def _refusal(row: Any, now: datetime) -> str | None:
    """Why a bootstrap token's row (None: no such token) cannot enrol a node, before it is claimed."""
    if row is None:
        return _UNKNOWN
    if row.revoked_at is not None:
        return "the bootstrap token has been revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "the bootstrap token has expired: ask for a new one (`skyport node token`)"
    return None


def register_enrolled_nodes(
    conn: Connection, enrolled: list[tuple[Enrolment, str, str]], now: datetime
) -> None:
    """Record freshly enrolled nodes, (enrolment, host, ip) each, in a few statements: ``down`` with an
    unknown capacity until their agents say hello."""
    if not enrolled:
        return
    values: dict[str, Any] = {
        "state_power": "down",
        "cpus": 1,
        "mem": 0,
        "gpus": 0,
        "labels": {},
        "updated_at": now,
    }
    ids = [enrolment.node_id for enrolment, _, _ in enrolled]
    existing = set(conn.execute(select(nodes.c.id).where(nodes.c.id.in_(ids))).scalars())
    statics: dict[str, str | None] = {}
    new_rows, known_rows = [], []
    for enrolment, host, ip in enrolled:
        if enrolment.node_id in existing:
            known_rows.append({"b_id": enrolment.node_id, "host": host, "ip": ip, **values})
            continue
        partition_id = enrolment.partition_id
        if partition_id is None:
            if enrolment.remote_id not in statics:
                static = conn.execute(
                    select(partitions.c.id).where(
                        partitions.c.remote_id == enrolment.remote_id, partitions.c.static
                    )
                ).first()
                statics[enrolment.remote_id] = static.id if static else None
            partition_id = statics[enrolment.remote_id]
        new_rows.append(
            {
                "id": enrolment.node_id,
                "remote_id": enrolment.remote_id,
                "partition_id": partition_id,
                "name": enrolment.node_name,
                "state_alloc": "idle",
                "host": host,
                "ip": ip,
                **values,
            }
        )
    if new_rows:
        conn.execute(insert(nodes), new_rows)
    if known_rows:
        conn.execute(update(nodes).where(nodes.c.id == bindparam("b_id")), known_rows)


def refresh_nodes(conn: Connection, hellos: list[tuple[str, dict[str, Any]]]) -> list[bool]:
    """Record connected agents' nodes, (node id, {host, ip, cpus, mem, gpus, labels, now}) each, as up
    with the capacity they describe, in a few statements; per node, whether it is known (an unknown
    node must enrol again)."""
    ids = [node_id for node_id, _ in hellos]
    known = set(conn.execute(select(nodes.c.id).where(nodes.c.id.in_(ids))).scalars())
    updates = [
        {
            "b_id": node_id,
            "host": values["host"],
            "ip": values["ip"],
            "state_power": "up",
            "cpus": values["cpus"],
            "mem": values["mem"],
            "gpus": values["gpus"],
            "labels": values["labels"],
            "updated_at": values["now"],
        }
        for node_id, values in hellos
        if node_id in known
    ]
    if updates:
        conn.execute(update(nodes).where(nodes.c.id == bindparam("b_id")), updates)
    return [node_id in known for node_id, _ in hellos]


def node_enrolment(conn: Connection, node_id: str) -> Enrolment | None:
    """The identity of a known node (for an agent presenting its certificate)."""
    row = conn.execute(
        select(
            nodes.c.id,
            nodes.c.name,
            nodes.c.remote_id,
            nodes.c.partition_id,
            remotes.c.name.label("remote_name"),
        )
        .join(remotes, remotes.c.id == nodes.c.remote_id)
        .where(nodes.c.id == node_id)
    ).first()
    if row is None:
        return None
    return Enrolment(row.remote_id, row.remote_name, row.id, row.name, row.partition_id)


def set_nodes_power(conn: Connection, node_ids: list[str], power: str, now: datetime) -> list[str]:
    """Mark nodes up or down; returns the ids whose power state changed."""
    if not node_ids:
        return []
    changed = [
        r.id
        for r in conn.execute(
            select(nodes.c.id).where(nodes.c.id.in_(node_ids), nodes.c.state_power != power)
        )
    ]
    if changed:
        conn.execute(update(nodes).where(nodes.c.id.in_(changed)).values(state_power=power, updated_at=now))
    return changed


def nodes_with_remote(conn: Connection, remote_ids: list[str]) -> list[tuple[str, str, str, str]]:
    """(node id, node name, remote id, power state) of every node of the given remotes."""
    rows = conn.execute(
        select(nodes.c.id, nodes.c.name, nodes.c.remote_id, nodes.c.state_power).where(
            nodes.c.remote_id.in_(remote_ids)
        )
    )
    return [(r.id, r.name, r.remote_id, r.state_power) for r in rows]


def job_on_node(conn: Connection, job_id: str, node_id: str) -> Any:
    """The job's row if it is placed on the node (what an agent may touch), else None."""
    row = conn.execute(
        select(jobs.c.id, jobs.c.node_ids, jobs.c.array_id, jobs.c.state).where(jobs.c.id == job_id)
    ).first()
    if row is None or node_id not in (row.node_ids or []):
        return None
    return row
