"""The scheduler's rules, one small scenario each: named nodes and jobs, one ``plan()``, what it decided.

Sizes are small numbers (cpus, GiB, GPUs, storage units); times are seconds from a fixed ``NOW``.
"""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from skyport.server.scheduler import (
    AccountState,
    FlavorOffer,
    NodeCapacity,
    PendingJob,
    Plan,
    Planner,
    Policy,
    RunningJob,
    Snapshot,
    Wait,
    fairshare_factors,
    plan,
)
from skyport.server.scheduler import fcfs as fcfs_module
from skyport.server.scheduler.snapshot import Algorithm

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HOUR = 3600


# ---------------------------------------------------------------------------------------------------
# Builders


def node(
    name: str,
    cpus: int = 8,
    mem: int = 32,
    gpus: int = 0,
    *,
    remote: str = "hpc",
    labels: dict[str, str] | None = None,
    storage: int = 100,
    flavor: str | None = None,
    account: str | None = None,
) -> NodeCapacity:
    """An empty node; :func:`snapshot` subtracts what running jobs hold."""
    return NodeCapacity(
        id=name,
        remote_id=remote,
        cpus=cpus,
        mem=mem,
        gpus=gpus,
        free_cpus=cpus,
        free_mem=mem,
        free_gpus=gpus,
        labels=tuple(sorted((labels or {}).items())),
        storage=storage,
        free_storage=storage,
        flavor=flavor,
        account=account,
    )


_seq = iter(range(1, 1_000_000))


def job(
    name: str,
    cpus: int = 1,
    mem: int = 1,
    gpus: int = 0,
    *,
    nodes: int = 1,
    priority: int = 0,
    seq: int | None = None,
    walltime: int | None = HOUR,
    waited: int = 0,
    account: str = "default",
    **extra: object,
) -> PendingJob:
    return PendingJob(
        id=name,
        priority=priority,
        seq=next(_seq) if seq is None else seq,
        nodes=nodes,
        cpus=cpus,
        mem=mem,
        gpus=gpus,
        submit_time=NOW - timedelta(seconds=waited),
        walltime=walltime,
        account=account,
        **extra,  # type: ignore[arg-type]
    )


def running(
    name: str,
    *node_names: str,
    cpus: int = 1,
    mem: int = 1,
    gpus: int = 0,
    started: int = 0,
    walltime: int | None = HOUR,
    **extra: object,
) -> RunningJob:
    """A job that started ``started`` seconds ago."""
    return RunningJob(
        id=name,
        node_ids=node_names,
        cpus=cpus,
        mem=mem,
        gpus=gpus,
        start_time=NOW - timedelta(seconds=started),
        walltime=walltime,
        **extra,  # type: ignore[arg-type]
    )


def snapshot(
    jobs: list[PendingJob],
    nodes: list[NodeCapacity],
    run: list[RunningJob] | None = None,
    *,
    algorithm: Algorithm = "backfill",
    **extra: object,
) -> Snapshot:
    """A snapshot whose nodes' free capacity is what the running jobs leave."""
    run = run or []
    adjusted = []
    for n in nodes:
        on = [r for r in run if n.id in r.node_ids]
        adjusted.append(
            replace(
                n,
                free_cpus=n.cpus - sum(r.cpus for r in on),
                free_mem=n.mem - sum(r.mem for r in on),
                free_gpus=n.gpus - sum(r.gpus for r in on),
                free_storage=n.storage - sum(r.storage for r in on),
            )
        )
    policy = extra.pop("policy", Policy(algorithm=algorithm))
    return Snapshot(jobs=tuple(jobs), nodes=tuple(adjusted), running=tuple(run), policy=policy, **extra)  # type: ignore[arg-type]


def placed(result: Plan) -> dict[str, tuple[str, ...]]:
    return {p.job_id: p.node_ids for p in result.placements}


def waits(result: Plan) -> dict[str, Wait]:
    return {w.job_id: w for w in result.waits}


def reasons(result: Plan) -> dict[str, str]:
    out = {w.job_id: w.reason for w in result.waits}
    out.update({p.job_id: "placed" for p in result.placements})
    out.update({p.job_id: "provisioned" for p in result.provisions})
    out.update({r.job_id: f"rejected:{r.reason}" for r in result.rejections})
    return out


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


# ---------------------------------------------------------------------------------------------------
# Resources


def test_a_job_goes_only_where_its_cpus_memory_gpus_and_storage_all_fit() -> None:
    nodes = [node("small", 4, 8), node("gpu", 8, 64, gpus=2), node("disk", 8, 64, storage=1000)]
    result = plan(
        snapshot(
            [
                job("wants-gpu", 2, 4, gpus=1),
                job("wants-memory", 2, 40),
                job("wants-storage", 2, 4, storage=500),
            ],
            nodes,
        ),
        NOW,
    )
    assert placed(result) == {
        "wants-gpu": ("gpu",),
        "wants-memory": ("disk",),
        "wants-storage": ("disk",),
    }


def test_jobs_share_a_node_up_to_its_capacity_and_no_further() -> None:
    result = plan(
        snapshot([job("a", 4), job("b", 3), job("c", 2)], [node("n1", 8)], algorithm="fcfs"),
        NOW,
    )
    assert placed(result) == {"a": ("n1",), "b": ("n1",)}
    assert waits(result)["c"].reason == "Resources"


def test_running_jobs_hold_their_share_of_a_node() -> None:
    result = plan(snapshot([job("new", 4)], [node("n1", 8)], [running("old", "n1", cpus=6)]), NOW)
    assert placed(result) == {}
    assert waits(result)["new"].reason == "Resources"


def test_a_job_runs_only_on_nodes_carrying_all_its_labels() -> None:
    nodes = [
        node("plain"),
        node("fast-a", labels={"cpu": "fast"}),
        node("fast-b", labels={"cpu": "fast", "zone": "b"}),
    ]
    result = plan(
        snapshot(
            [job("picky", labels=(("cpu", "fast"), ("zone", "b"))), job("fast", labels=(("cpu", "fast"),))],
            nodes,
        ),
        NOW,
    )
    assert placed(result) == {"picky": ("fast-b",), "fast": ("fast-a",)}


def test_an_exclusive_job_takes_only_an_empty_node_and_nothing_joins_it() -> None:
    nodes = [node("busy", 8), node("empty", 8)]
    result = plan(
        snapshot(
            [job("whole", 1, exclusive=True, priority=10), job("small", 1)],
            nodes,
            [running("old", "busy", cpus=1)],
        ),
        NOW,
    )
    assert placed(result) == {"whole": ("empty",), "small": ("busy",)}


def test_an_exclusive_running_job_keeps_its_node_to_itself() -> None:
    result = plan(
        snapshot([job("small", 1)], [node("n1", 8)], [running("whole", "n1", cpus=1, exclusive=True)]),
        NOW,
    )
    assert placed(result) == {}
    assert waits(result)["small"].estimated_start == at(HOUR)


def test_a_multi_node_job_starts_on_all_its_nodes_or_not_at_all() -> None:
    nodes = [node("n1", 8), node("n2", 8), node("n3", 8)]
    result = plan(
        snapshot([job("wide", 8, nodes=3)], nodes, [running("old", "n3", cpus=1, walltime=600)]),
        NOW,
    )
    assert placed(result) == {}
    wait = waits(result)["wide"]
    assert wait.reason == "Resources"
    assert wait.estimated_start == at(600)

    result = plan(snapshot([job("wide", 8, nodes=3)], nodes), NOW)
    assert placed(result) == {"wide": ("n1", "n2", "n3")}


def test_a_multi_node_job_uses_nodes_of_one_remote_only() -> None:
    nodes = [node("a1", remote="a"), node("a2", remote="a"), node("b1", remote="b")]
    result = plan(snapshot([job("three", nodes=3), job("two", nodes=2)], nodes), NOW)
    assert placed(result) == {"two": ("a1", "a2")}
    (rejection,) = result.rejections
    assert rejection.job_id == "three"
    assert rejection.reason == "unsatisfiable"


def test_a_job_that_names_a_remote_runs_there() -> None:
    nodes = [node("a1", remote="a"), node("b1", remote="b")]
    result = plan(snapshot([job("on-b", remote_id="b")], nodes), NOW)
    assert placed(result) == {"on-b": ("b1",)}


def test_a_job_no_node_could_ever_hold_is_rejected_with_what_it_asks_and_the_largest_node() -> None:
    result = plan(snapshot([job("huge", 10_000)], [node("n1", 8), node("n2", 16)]), NOW)
    (rejection,) = result.rejections
    assert rejection.reason == "unsatisfiable"
    assert "10000 cpus" in rejection.message
    assert "the largest has 16 cpus" in rejection.message


def test_a_job_whose_labels_no_node_has_is_rejected() -> None:
    result = plan(snapshot([job("arm", labels=(("arch", "arm"),))], [node("n1")]), NOW)
    assert [(r.job_id, r.reason) for r in result.rejections] == [("arm", "unsatisfiable")]
    assert "labels" in result.rejections[0].message


# ---------------------------------------------------------------------------------------------------
# Order


def test_higher_priority_goes_first_and_equal_priority_first_come_first_served() -> None:
    one_slot = [node("n1", 4)]
    result = plan(snapshot([job("early", 4, seq=1), job("urgent", 4, seq=2, priority=5)], one_slot), NOW)
    assert placed(result) == {"urgent": ("n1",)}

    result = plan(snapshot([job("second", 4, seq=2), job("first", 4, seq=1)], one_slot), NOW)
    assert placed(result) == {"first": ("n1",)}


def test_an_account_that_used_less_than_its_share_goes_first() -> None:
    accounts = {
        "heavy": AccountState("heavy", share=1.0, usage=9_000.0),
        "light": AccountState("light", share=1.0, usage=1_000.0),
    }
    factors = fairshare_factors(list(accounts.values()))
    assert factors["light"] > factors["heavy"]
    assert factors["light"] == pytest.approx(2 ** (-0.1 / 0.5))
    result = plan(
        snapshot(
            [job("from-heavy", 4, seq=1, account="heavy"), job("from-light", 4, seq=2, account="light")],
            [node("n1", 4)],
            accounts=accounts,
        ),
        NOW,
    )
    assert placed(result) == {"from-light": ("n1",)}


def test_a_job_that_waited_longer_gains_priority() -> None:
    policy = Policy(weight_priority=1.0, weight_age=1.0)
    result = plan(
        snapshot(
            [job("important", 4, seq=1, priority=2), job("patient", 4, seq=2, priority=0, waited=3 * HOUR)],
            [node("n1", 4)],
            policy=policy,
        ),
        NOW,
    )
    assert placed(result) == {"patient": ("n1",)}


# ---------------------------------------------------------------------------------------------------
# Algorithms


def busy_site() -> tuple[list[NodeCapacity], list[RunningJob]]:
    """Two 8-cpu nodes: n1 half busy for an hour, n2 fully busy for two hours."""
    nodes = [node("n1", 8), node("n2", 8)]
    run = [running("r1", "n1", cpus=4, walltime=HOUR), running("r2", "n2", cpus=8, walltime=2 * HOUR)]
    return nodes, run


def test_fcfs_the_blocked_head_holds_everyone_behind_it() -> None:
    nodes, run = busy_site()
    jobs = [job("big", 8, priority=1), job("small", 2)]
    result = plan(snapshot(jobs, nodes, run, algorithm="fcfs"), NOW)
    assert placed(result) == {}
    assert waits(result)["big"].reason == "Resources"
    assert waits(result)["big"].estimated_start == at(HOUR)
    assert waits(result)["small"].reason == "Priority"


def test_backfill_a_short_job_uses_the_hole_before_the_heads_reservation() -> None:
    nodes, run = busy_site()
    jobs = [job("big", 8, priority=1), job("short", 4, walltime=HOUR), job("long", 4, walltime=3 * HOUR)]
    result = plan(snapshot(jobs, nodes, run), NOW)
    assert placed(result) == {"short": ("n1",)}
    assert waits(result)["big"].reason == "Resources"
    assert waits(result)["big"].estimated_start == at(HOUR)
    assert waits(result)["long"].reason == "Reservation"


def test_a_remote_may_use_its_own_algorithm_for_the_jobs_that_name_it() -> None:
    # Two identical sites, each with a blocked head and a short job that fits before its reservation:
    # the lab (fcfs) holds the short job back, the hpc site (the default, backfill) starts it.
    nodes = [node("lab1", remote="lab"), node("hpc1", remote="hpc")]
    run = [running("r-lab", "lab1", cpus=4, started=0), running("r-hpc", "hpc1", cpus=4, started=0)]
    jobs = [
        job("lab-big", 8, priority=1, remote_id="lab"),
        job("lab-short", 4, walltime=HOUR // 2, remote_id="lab"),
        job("hpc-big", 8, priority=1, remote_id="hpc"),
        job("hpc-short", 4, walltime=HOUR // 2, remote_id="hpc"),
    ]
    policy = Policy(algorithm="backfill", remote_algorithms=(("lab", "fcfs"),))
    result = plan(snapshot(jobs, nodes, run, policy=policy), NOW)
    assert placed(result) == {"hpc-short": ("hpc1",)}
    assert reasons(result) == {
        "lab-big": "Resources",
        "lab-short": "Priority",
        "hpc-big": "Resources",
        "hpc-short": "placed",
    }


def test_backfill_a_long_job_may_use_what_the_reservation_does_not_need() -> None:
    nodes = [node("n1", 8)]
    run = [running("r1", "n1", cpus=4, walltime=HOUR)]
    # The head needs 6 cpus, from in an hour; 2 of the node's 8 stay free then. Both long jobs fit
    # now (4 cpus are free), but only the 2-cpu one leaves the head what it needs.
    jobs = [
        job("head", 6, priority=2),
        job("long-3", 3, priority=1, walltime=10 * HOUR),
        job("long-2", 2, walltime=10 * HOUR),
    ]
    result = plan(snapshot(jobs, nodes, run), NOW)
    assert placed(result) == {"long-2": ("n1",)}
    assert waits(result)["long-3"].reason == "Reservation"
    assert waits(result)["head"].estimated_start == at(HOUR)


def test_backfill_a_long_job_may_use_a_node_outside_the_reservation() -> None:
    nodes = [node("n1", 8), node("n2", 8)]
    run = [running("r1", "n1", cpus=4, walltime=HOUR), running("r2", "n2", cpus=4, walltime=5 * HOUR)]
    jobs = [job("head", 8, priority=1), job("long", 4, walltime=10 * HOUR)]
    result = plan(snapshot(jobs, nodes, run), NOW)
    # The head is to start on n1 in an hour and needs all of it; n2 is not part of the reservation.
    assert waits(result)["head"].estimated_start == at(HOUR)
    assert placed(result) == {"long": ("n2",)}


def test_backfill_when_no_start_can_be_predicted_the_head_keeps_its_nodes() -> None:
    """Capacity used by work the snapshot does not list never comes back in the timeline: the head
    gets no start time, and no job may take the nodes it could use (as under fcfs)."""
    unknown_use = [replace(node("n1", 8), free_cpus=4), replace(node("n2", 8), free_cpus=4)]
    small_node = node("g", 4, gpus=1)
    jobs = [job("head", 8, priority=1), job("small", 2), job("mid", 4)]
    result = plan(Snapshot(jobs=tuple(jobs), nodes=(*unknown_use, small_node)), NOW)
    assert waits(result)["head"].reason == "Resources"
    assert waits(result)["head"].estimated_start is None
    # "g" is too small for the head, so it stays open; n1 and n2 are the head's.
    assert placed(result) == {"small": ("g",)}
    assert waits(result)["mid"].reason == "Reservation"


def test_fairshare_interleaves_accounts_by_share_within_one_pass() -> None:
    accounts = {"a": AccountState("a", share=1.0), "b": AccountState("b", share=1.0)}
    jobs = [job(f"a{i}", 1, account="a", priority=5, seq=i) for i in range(4)]
    jobs += [job(f"b{i}", 1, account="b", seq=10 + i) for i in range(4)]
    result = plan(snapshot(jobs, [node("n1", 4)], algorithm="fairshare", accounts=accounts), NOW)
    assert sorted(placed(result)) == ["a0", "a1", "b0", "b1"]

    result = plan(snapshot(jobs, [node("n1", 4)], algorithm="backfill", accounts=accounts), NOW)
    assert sorted(placed(result)) == ["a0", "a1", "a2", "a3"]


def test_an_unknown_algorithm_is_an_error() -> None:
    with pytest.raises(ValueError, match="lottery"):
        plan(snapshot([job("a")], [node("n1")], policy=Policy(algorithm="lottery")), NOW)  # type: ignore[arg-type]


def test_the_fcfs_module_plans_fcfs_whatever_the_policy_says() -> None:
    nodes, run = busy_site()
    jobs = [job("big", 8, priority=1), job("short", 4, walltime=HOUR)]
    assert placed(plan(snapshot(jobs, nodes, run), NOW)) == {"short": ("n1",)}
    assert placed(fcfs_module.plan(snapshot(jobs, nodes, run), NOW)) == {}


# ---------------------------------------------------------------------------------------------------
# Dependencies, arrays, budgets


def test_after_ok_waits_for_completion_without_blocking_others() -> None:
    states = {"build": "running"}
    result = plan(
        snapshot(
            [job("test", 8, after_ok=("build",), priority=9), job("other", 8)],
            [node("n1", 8)],
            dependency_states=states,
        ),
        NOW,
    )
    assert waits(result)["test"].reason == "Dependency"
    assert "build" in waits(result)["test"].message
    assert placed(result) == {"other": ("n1",)}

    result = plan(
        snapshot([job("test", after_ok=("build",))], [node("n1")], dependency_states={"build": "completed"}),
        NOW,
    )
    assert placed(result) == {"test": ("n1",)}


@pytest.mark.parametrize("state", ["failed", "canceled"])
def test_after_ok_on_a_job_that_did_not_succeed_rejects_the_dependent_job(state: str) -> None:
    result = plan(
        snapshot([job("test", after_ok=("build",))], [node("n1")], dependency_states={"build": state}),
        NOW,
    )
    (rejection,) = result.rejections
    assert (rejection.job_id, rejection.reason) == ("test", "dependency")
    assert "build" in rejection.message and state in rejection.message


def test_a_dependency_on_a_job_that_does_not_exist_rejects_the_job() -> None:
    result = plan(snapshot([job("test", after_any=("ghost",))], [node("n1")]), NOW)
    assert [(r.job_id, r.reason) for r in result.rejections] == [("test", "dependency")]
    assert "ghost" in result.rejections[0].message


def test_after_any_is_met_by_any_end() -> None:
    states = {"a": "failed", "b": "canceled", "c": "completed", "d": "running"}
    jobs = [job("after-abc", after_any=("a", "b", "c")), job("after-d", after_any=("d",))]
    result = plan(snapshot(jobs, [node("n1")], dependency_states=states), NOW)
    assert reasons(result) == {"after-abc": "placed", "after-d": "Dependency"}


def test_an_array_runs_at_most_its_throttle_of_tasks_at_once() -> None:
    tasks = [job(f"arr[{i}]", 1, array_id="arr", array_throttle=3) for i in range(6)]
    result = plan(
        snapshot([*tasks, job("other", 1)], [node("n1", 16)], [running("arr[r]", "n1", array_id="arr")]),
        NOW,
    )
    assert sorted(placed(result)) == ["arr[0]", "arr[1]", "other"]
    assert {w.job_id for w in result.waits if w.reason == "ArrayThrottle"} == {
        "arr[2]",
        "arr[3]",
        "arr[4]",
        "arr[5]",
    }


def offers() -> tuple[FlavorOffer, ...]:
    return (
        FlavorOffer(
            "aws", "m.large", "m.large", cpus=8, mem=32, gpus=0, storage=100, price=2.0, max_creating=2
        ),
        FlavorOffer(
            "gcp", "n.large", "n.large", cpus=8, mem=32, gpus=0, storage=100, price=1.5, max_creating=1
        ),
        FlavorOffer(
            "aws", "g.large", "g.large", cpus=8, mem=64, gpus=1, storage=100, price=5.0, max_creating=2
        ),
    )


def test_a_job_whose_predicted_cost_exceeds_the_budget_left_waits_for_budget() -> None:
    accounts = {"lab": AccountState("lab", budget_left=10.0)}
    jobs = [
        job("fits", 8, flavor="g.large", account="lab", walltime=HOUR, seq=1),  # 5.0
        job("too-much", 8, flavor="g.large", account="lab", walltime=2 * HOUR, seq=2),  # 10.0 > 5.0 left
        job("still-fits", 8, flavor="g.large", account="lab", walltime=HOUR, seq=3),  # 5.0
        job("free", 1, account="lab", seq=4),  # a static node costs nothing
    ]
    result = plan(snapshot(jobs, [node("n1")], flavors=offers(), accounts=accounts), NOW)
    assert reasons(result) == {
        "fits": "provisioned",
        "too-much": "Budget",
        "still-fits": "provisioned",
        "free": "placed",
    }
    assert "10.00" in waits(result)["too-much"].message


# ---------------------------------------------------------------------------------------------------
# Elastic capacity


def test_a_flavor_job_reuses_an_idle_partition_of_its_account_first() -> None:
    nodes = [
        node("theirs", 8, flavor="m.large", account="other", remote="aws"),
        node("ours", 8, flavor="m.large", account="lab", remote="aws"),
    ]
    result = plan(snapshot([job("j", 4, flavor="m.large", account="lab")], nodes, flavors=offers()), NOW)
    assert placed(result) == {"j": ("ours",)}
    assert result.provisions == []


def test_a_flavor_job_without_an_idle_partition_gets_a_new_one() -> None:
    result = plan(
        snapshot([job("j", 4, nodes=2, flavor="m.large", account="lab")], [node("n1")], flavors=offers()), NOW
    )
    (p,) = result.provisions
    assert (p.job_id, p.remote_id, p.flavor_id, p.nodes, p.cost_per_hour) == ("j", "aws", "m.large", 2, 4.0)


def test_a_job_no_static_node_can_hold_gets_the_cheapest_flavor_that_fits() -> None:
    jobs = [job("big", 8, 30), job("gpu", 2, 8, gpus=1)]
    result = plan(snapshot(jobs, [node("small", 4, 8)], flavors=offers()), NOW)
    assert {(p.job_id, p.remote_id, p.flavor_id) for p in result.provisions} == {
        ("big", "gcp", "n.large"),
        ("gpu", "aws", "g.large"),
    }
    assert result.rejections == []


def test_a_job_a_static_node_can_hold_waits_for_it_instead_of_renting() -> None:
    result = plan(
        snapshot([job("j", 4)], [node("n1", 4)], [running("r", "n1", cpus=4)], flavors=offers()), NOW
    )
    assert result.provisions == []
    assert waits(result)["j"].reason == "Resources"


def test_partitions_being_created_are_limited_per_remote() -> None:
    flavors = (
        replace(offers()[1], creating=0, max_creating=1),
        replace(offers()[0], creating=1, max_creating=2),
    )
    jobs = [job(f"j{i}", 8, 30, seq=i) for i in range(3)]
    result = plan(snapshot(jobs, [node("small", 4, 8)], flavors=flavors), NOW)
    # gcp (cheapest) may create one; aws one more (one is being created); the third waits.
    assert [(p.job_id, p.remote_id) for p in result.provisions] == [("j0", "gcp"), ("j1", "aws")]
    assert waits(result)["j2"].reason == "ProvisionLimit"


# ---------------------------------------------------------------------------------------------------
# Explained waiting, determinism, incremental planning


def test_every_queued_job_gets_exactly_one_decision() -> None:
    nodes, run = busy_site()
    jobs = [
        job("big", 8, priority=3),
        job("short", 2),
        job("long", 4, walltime=10 * HOUR),
        job("dep", after_ok=("x",)),
        job("huge", 100),
        job("gone", after_ok=("y",)),
    ]
    result = plan(snapshot(jobs, nodes, run, dependency_states={"x": "running", "y": "failed"}), NOW)
    decided = [p.job_id for p in result.placements] + [w.job_id for w in result.waits]
    decided += [r.job_id for r in result.rejections] + [p.job_id for p in result.provisions]
    assert sorted(decided) == sorted(j.id for j in jobs)
    assert reasons(result) == {
        "big": "Resources",
        "short": "placed",
        "long": "Reservation",
        "dep": "Dependency",
        "huge": "rejected:unsatisfiable",
        "gone": "rejected:dependency",
    }


def test_an_overdue_running_job_is_expected_to_end_now() -> None:
    result = plan(
        snapshot([job("j", 8)], [node("n1", 8)], [running("late", "n1", cpus=8, started=2 * HOUR)]), NOW
    )
    assert waits(result)["j"].estimated_start == NOW


def test_the_same_snapshot_in_any_order_gives_the_same_plan() -> None:
    nodes = [node(f"n{i}", 8, remote="ab"[i % 2]) for i in range(6)]
    run = [running(f"r{i}", f"n{i}", cpus=i + 2, walltime=(i + 1) * 600) for i in range(6)]
    jobs = [job(f"j{i}", 1 + i % 5, nodes=1 + i % 3, walltime=300 * (i % 4 + 1), seq=i) for i in range(20)]
    first = plan(snapshot(jobs, nodes, run), NOW)
    rng = random.Random(7)
    for _ in range(5):
        rng.shuffle(jobs)
        rng.shuffle(nodes)
        rng.shuffle(run)
        assert plan(snapshot(jobs, nodes, run), NOW) == first


def test_the_planner_agrees_with_plan_after_deltas_and_leaves_its_state_as_it_was() -> None:
    nodes, run = busy_site()
    jobs = [job("big", 8, priority=1), job("short", 2), job("later", 4, walltime=2 * HOUR)]
    planner = Planner(snapshot(jobs, nodes, run), page_size=2)
    first = planner.plan(NOW)
    assert first == plan(planner.snapshot(), NOW)
    assert planner.plan(NOW) == first  # the pass rolled back what it placed
    assert [j.id for j in planner.head()] == ["big", "short"]

    planner.apply(first, NOW)
    planner.ended(["r2"])
    planner.submit([job("new", 1, priority=2)])
    then = NOW + timedelta(minutes=5)
    assert planner.plan(then) == plan(planner.snapshot(), then)
    assert planner.plan(then, full=True) == plan(planner.snapshot(full=True), then)
    assert [j.id for j in planner.head()] == ["new", "big"]
    assert placed(planner.plan(then)) == {"new": ("n1",), "big": ("n2",)}
