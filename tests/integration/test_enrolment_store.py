"""Enrolments, hellos and placements written for many nodes at once (a burst of booting VMs), on both
backends: each token still enrols one node once, and each job is placed once."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, select, update

from skyport.models import JobSpec, JobState
from skyport.server.lifecycle.provisioning import _place_all
from skyport.server.store import enrolment as enrol_store
from skyport.server.store import infra as infra_store
from skyport.server.store import jobs as job_store
from skyport.server.store import partitions as partition_store
from skyport.server.store import users as user_store
from skyport.server.store.engine import Store
from skyport.server.store.tables import events, nodes, tokens

NOW = datetime(2026, 12, 6, 23, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def _remote(conn: Connection) -> str:
    return infra_store.ensure_remote(conn, name="cloud", kind="sim", server="", settings={}, now=NOW)


def _token(conn: Connection, remote_id: str, name: str, ttl: timedelta = HOUR) -> str:
    return enrol_store.create_bootstrap_token(conn, remote_id=remote_id, node_name=name, ttl=ttl, now=NOW)


def _revoke(conn: Connection, name: str) -> None:
    conn.execute(update(tokens).where(tokens.c.name == f"enrol {name}").values(revoked_at=NOW))


def _redeem_group(conn: Connection, secrets: list[str]) -> list[enrol_store.Enrolment | str]:
    granted = enrol_store.redeem_bootstrap_tokens(conn, secrets, NOW)
    enrolled = [(g, "vm", "10.0.0.1") for g in granted if not isinstance(g, str)]
    enrol_store.register_enrolled_nodes(conn, enrolled, NOW)
    return granted


def _nodes(conn: Connection) -> dict[str, tuple[str, str, int, int]]:
    rows = conn.execute(select(nodes.c.name, nodes.c.state_power, nodes.c.host, nodes.c.cpus, nodes.c.mem))
    return {r.name: (r.state_power, r.host, r.cpus, r.mem) for r in rows}


async def test_a_group_of_enrolments_enrols_each_token_once_and_records_its_node_down(store: Store) -> None:
    remote_id = await store.write(_remote)
    secrets = {name: await store.write(_token, remote_id, name) for name in ("a", "b", "used", "revoked")}
    secrets["expired"] = await store.write(_token, remote_id, "expired", -HOUR)
    await store.write(_revoke, "revoked")
    assert not isinstance(await store.write(enrol_store.redeem_bootstrap_token, secrets["used"], NOW), str)

    granted = await store.write(
        _redeem_group,
        [
            secrets["a"],
            secrets["b"],
            secrets["a"],  # the same token twice in one group: one node, once
            secrets["used"],
            secrets["expired"],
            secrets["revoked"],
            "not-a-token",
        ],
    )

    enrolled = [g for g in granted[:2] if not isinstance(g, str)]
    assert [(g.node_name, g.remote_id) for g in enrolled] == [("a", remote_id), ("b", remote_id)]
    assert granted[2:] == [
        "the bootstrap token has been used already: each token enrols one node once",
        "the bootstrap token has been used already: each token enrols one node once",
        "the bootstrap token has expired: ask for a new one (`skyport node token`)",
        "the bootstrap token has been revoked",
        "the bootstrap token is not known to this core",
    ]
    # Down, with an unknown capacity, until the agent says hello.
    assert await store.read(_nodes) == {"a": ("down", "vm", 1, 0), "b": ("down", "vm", 1, 0)}
    # Used up: a later group cannot enrol with them again.
    again = await store.write(_redeem_group, [secrets["a"], secrets["b"]])
    assert again == ["the bootstrap token has been used already: each token enrols one node once"] * 2


async def test_a_re_enrolled_node_keeps_its_row_and_is_down_until_its_hello(store: Store) -> None:
    remote_id = await store.write(_remote)
    first = await store.write(_token, remote_id, "a")
    (granted,) = await store.write(_redeem_group, [first])
    assert not isinstance(granted, str)
    node_id = granted.node_id
    await store.write(enrol_store.refresh_nodes, [(node_id, _hello("a-host", 4))])
    assert await store.read(_nodes) == {"a": ("up", "a-host", 4, 2048)}

    second = await store.write(_token, remote_id, "a")
    (again,) = await store.write(_redeem_group, [second])
    assert not isinstance(again, str) and again.node_id == node_id
    assert await store.read(_nodes) == {"a": ("down", "vm", 1, 0)}


def _hello(host: str, cpus: int) -> dict[str, object]:
    return {
        "host": host,
        "ip": "10.0.0.2",
        "cpus": cpus,
        "mem": 2048,
        "gpus": 0,
        "labels": {"k": "v"},
        "now": NOW,
    }


async def test_a_group_of_hellos_records_known_nodes_up_and_refuses_unknown_ones(store: Store) -> None:
    remote_id = await store.write(_remote)
    secrets = [await store.write(_token, remote_id, name) for name in ("a", "b")]
    granted = await store.write(_redeem_group, secrets)
    ids = [g.node_id for g in granted if not isinstance(g, str)]

    known = await store.write(
        enrol_store.refresh_nodes,
        [
            (ids[0], _hello("host-a", 2)),
            (str(uuid.uuid4()), _hello("stranger", 8)),
            (ids[1], _hello("host-b", 4)),
        ],
    )

    assert known == [True, False, True]
    assert await store.read(_nodes) == {"a": ("up", "host-a", 2, 2048), "b": ("up", "host-b", 4, 2048)}


def _job_on_booting_partition(conn: Connection, remote_id: str, n: int = 1) -> tuple[str, str, list[object]]:
    user = user_store.add_user(conn, f"user{n}", admin=False, now=NOW)
    account = user_store.account_id_by_name(conn, user_store.DEFAULT_ACCOUNT)
    assert account is not None
    job_id, partition_id = str(uuid.uuid4()), str(uuid.uuid4())
    job_store.insert_jobs(
        conn,
        [
            job_store.NewJob(
                id=job_id,
                owner_id=user.id,
                account_id=account,
                spec=JobSpec(command=["true"]),
                submit_time=NOW,
                walltime=None,
            )
        ],
    )
    partition_store.insert_partition(
        conn,
        partition_store.NewPartition(
            partition_id, remote_id, f"sp-{n}", "small", None, account, job_id, 1, 0.0
        ),
        NOW,
    )
    change = job_store.StateChange(
        job_id,
        JobState.SCHEDULED,
        "provisioning",
        "Requesting",
        frozenset({JobState.QUEUED}),
        {"partition_id": partition_id},
    )
    assert job_store.transition(conn, [change], NOW)
    token = enrol_store.create_bootstrap_token(
        conn, remote_id=remote_id, node_name=f"sp-{n}-0", ttl=HOUR, now=NOW, partition_id=partition_id
    )
    (granted,) = enrol_store.redeem_bootstrap_tokens(conn, [token], NOW)
    assert not isinstance(granted, str)
    enrol_store.register_enrolled_nodes(conn, [(granted, f"vm{n}", f"10.0.0.{n}")], NOW)
    enrol_store.refresh_nodes(conn, [(granted.node_id, _hello(f"vm{n}", 1))])
    up = partition_store.nodes_of(conn, [partition_id])[partition_id]
    return job_id, partition_id, up


def _placed_events(conn: Connection, job_id: str) -> int:
    return len(
        conn.execute(select(events.c.id).where(events.c.job_id == job_id, events.c.reason == "placed")).all()
    )


async def test_a_job_is_placed_once_when_two_passes_place_its_partition(store: Store) -> None:
    """Two passes of the provisioning loop that read the partition before either placed it both try."""
    remote_id = await store.write(_remote)
    job_id, partition_id, up = await store.write(_job_on_booting_partition, remote_id)
    placement = [(job_id, remote_id, partition_id, up)]

    assert await store.write(_place_all, placement, NOW) == [True]
    assert await store.write(_place_all, placement, NOW + timedelta(seconds=1)) == [False]

    assert await store.read(_placed_events, job_id) == 1


def _placed(conn: Connection, job_ids: list[str], partition_ids: list[str]) -> list[tuple[object, ...]]:
    found = partition_store.jobs_of(conn, job_ids)
    return [
        (found[job_id].state, found[job_id].node_ids, partition_store.get(conn, partition_id).state)
        for job_id, partition_id in zip(job_ids, partition_ids, strict=True)
    ]


async def test_a_pass_places_many_partitions_together_and_skips_the_placed_ones(store: Store) -> None:
    """A burst's partitions are placed in one transaction: each job on its own partition's node, each
    partition in use; a job placed already (by an earlier pass) is left as it is."""
    remote_id = await store.write(_remote)
    made = [await store.write(_job_on_booting_partition, remote_id, n) for n in (1, 2, 3)]
    placements = [(job_id, remote_id, partition_id, up) for job_id, partition_id, up in made]
    assert await store.write(_place_all, placements[:1], NOW) == [True]

    later = NOW + timedelta(seconds=1)
    assert await store.write(_place_all, placements, later) == [False, True, True]

    job_ids, partition_ids = [m[0] for m in made], [m[1] for m in made]
    node_ids = [[node.id for node in up] for _, _, up in made]
    assert await store.read(_placed, job_ids, partition_ids) == [
        ("scheduled", ids, "in_use") for ids in node_ids
    ]
    assert [await store.read(_placed_events, job_id) for job_id in job_ids] == [1, 1, 1]
