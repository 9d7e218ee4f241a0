"""Properties of ``plan()`` over random small sites and queues (hypothesis).

- every pending job gets exactly one decision;
- no node is over-committed, exclusive jobs are alone, placements respect size, labels, remotes;
- a backfilled job never delays the head job's reservation: with everything the plan started added as
  running jobs, an independent brute-force computation of the head's earliest start is no later than
  the start the plan promised it;
- the same snapshot, its tuples shuffled, gives the same plan;
- dependencies and array throttles hold;
- the incremental ``Planner``, after random deltas, plans exactly what ``plan()`` plans for its
  snapshot.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

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
    plan,
)
from skyport.server.scheduler.resources import ClusterState, sorted_groups

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TERMINAL = {"completed", "failed", "canceled"}
LABELS = [("zone", "a"), ("zone", "b"), ("ssd", "yes")]


# ---------------------------------------------------------------------------------------------------
# Strategies


@st.composite
def sites(draw: st.DrawFn) -> Snapshot:
    nodes: list[NodeCapacity] = []
    for i in range(draw(st.sampled_from([1, 2, 3, 4, 4, 5, 6]))):
        cpus = draw(st.sampled_from([2, 4, 6, 8, 8]))
        mem = draw(st.sampled_from([2, 4, 6, 8, 8]))
        gpus = draw(st.sampled_from([1, 0, 2, 0]))
        storage = draw(st.sampled_from([4, 4, 0]))
        labels = tuple(sorted({LABELS[k] for k in draw(st.lists(st.integers(0, 2), min_size=1, max_size=2))}))
        if ("zone", "a") in labels and ("zone", "b") in labels:
            labels = tuple(lab for lab in labels if lab != ("zone", "b"))
        nodes.append(
            NodeCapacity(
                id=f"n{i}",
                remote_id=draw(st.sampled_from(["r1", "r2"])),
                cpus=cpus,
                mem=mem,
                gpus=gpus,
                free_cpus=cpus,
                free_mem=mem,
                free_gpus=gpus,
                labels=labels,
                storage=storage,
                free_storage=storage,
            )
        )
    used = {n.id: [0, 0, 0, 0] for n in nodes}
    held: set[str] = set()  # nodes an exclusive running job holds
    running: list[RunningJob] = []
    for k in range(draw(st.integers(0, 7))):
        on = sorted(set(draw(st.lists(st.sampled_from([n.id for n in nodes]), min_size=1, max_size=2))))
        size = [
            draw(st.integers(0, 4)),
            draw(st.integers(0, 4)),
            draw(st.integers(0, 1)),
            draw(st.integers(0, 2)),
        ]
        exclusive = draw(st.booleans()) and draw(st.booleans())
        by_id = {n.id: n for n in nodes}
        cap = {nid: (by_id[nid].cpus, by_id[nid].mem, by_id[nid].gpus, by_id[nid].storage) for nid in on}
        if any(nid in held for nid in on):
            continue
        if exclusive and any(any(used[nid]) or _has_jobs(running, nid) for nid in on):
            continue
        if not all(used[nid][d] + size[d] <= cap[nid][d] for nid in on for d in range(4)):
            continue
        for nid in on:
            for d in range(4):
                used[nid][d] += size[d]
            if exclusive:
                held.add(nid)
        running.append(
            RunningJob(
                id=f"run{k}",
                node_ids=tuple(on),
                cpus=size[0],
                mem=size[1],
                gpus=size[2],
                storage=size[3],
                start_time=NOW - timedelta(seconds=draw(st.integers(0, 7200))),
                walltime=draw(st.one_of(st.none(), st.integers(60, 7200))),
                account=draw(st.sampled_from(["a", "b", "c"])),
                array_id=draw(st.sampled_from([None, "arr"])),
                exclusive=exclusive,
            )
        )
    unknown = draw(st.booleans()) and draw(st.booleans())  # some capacity used by unlisted work
    final = []
    for n in nodes:
        u = used[n.id]
        extra = 1 if unknown and n.cpus - u[0] > 0 and n.id == nodes[0].id else 0
        final.append(
            replace(
                n,
                free_cpus=n.cpus - u[0] - extra,
                free_mem=n.mem - u[1],
                free_gpus=n.gpus - u[2],
                free_storage=n.storage - u[3],
            )
        )
    return Snapshot(jobs=(), nodes=tuple(final), running=tuple(running))


def _has_jobs(running: list[RunningJob], node_id: str) -> bool:
    return any(node_id in r.node_ids for r in running)


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    site = draw(sites())
    count = draw(st.sampled_from([0, 1, 2, 4, 6, 8, 9]))
    seqs = draw(st.permutations(list(range(count))))
    known = {"done": "completed", "bad": "failed", "stopped": "canceled", "busy": "running"}
    dep_pool = [*known, "ghost", *(f"j{i}" for i in range(count))]
    throttles = {"arr": draw(st.integers(1, 2)), "other": draw(st.integers(1, 2))}
    jobs = []
    small = st.sampled_from([0, 0, 0, 0, 1])
    maybe_dep = st.tuples(st.integers(0, 7), st.sampled_from(dep_pool)).map(
        lambda x: (x[1],) if x[0] == 1 else ()
    )
    for i in range(count):
        flavor = draw(st.sampled_from([None] * 12 + ["small", "gpu"]))
        labels = () if flavor or draw(st.integers(0, 5)) else (draw(st.sampled_from(LABELS)),)
        array = draw(st.sampled_from([None, None, "arr", "other"]))
        jobs.append(
            PendingJob(
                id=f"j{i}",
                priority=draw(st.integers(0, 3)),
                seq=seqs[i],
                nodes=draw(st.sampled_from([1, 1, 1, 2, 3])),
                cpus=draw(st.sampled_from([0, 1, 1, 2, 2, 3, 4, 6])),
                mem=draw(st.sampled_from([0, 1, 1, 2, 2, 3, 4, 6])),
                gpus=draw(small),
                storage=draw(small),
                submit_time=NOW - timedelta(seconds=draw(st.integers(0, 20_000))),
                remote_id=draw(st.sampled_from([None] * 6 + ["r1", "r2"])),
                labels=labels,
                account=draw(st.sampled_from(["a", "b", "c"])),
                walltime=draw(st.one_of(st.none(), st.integers(0, 7200))),
                exclusive=draw(st.booleans()) and draw(st.booleans()),
                after_ok=draw(maybe_dep),
                after_any=draw(maybe_dep),
                array_id=array,
                array_throttle=throttles[array] if array else None,
                flavor=flavor,
            )
        )
    states = dict(known)
    for j in jobs:
        states[j.id] = "queued"
    flavors = (
        FlavorOffer("cloud", "f-small", "small", 4, 4, 0, 2, price=1.0, max_creating=draw(st.integers(0, 2))),
        FlavorOffer("cloud", "f-gpu", "gpu", 8, 8, 2, 4, price=3.0, max_creating=2, creating=1),
    )
    accounts = {
        "a": AccountState(
            "a", share=2.0, usage=draw(st.floats(0, 1e4)), budget_left=draw(st.sampled_from([None, 0.5, 5.0]))
        ),
        "b": AccountState("b", share=1.0, usage=draw(st.floats(0, 1e4))),
    }
    policy = Policy(
        algorithm=draw(st.sampled_from(["backfill", "backfill", "fcfs", "fairshare"])),
        default_walltime=draw(st.sampled_from([600, 3600])),
    )
    return replace(
        site,
        jobs=tuple(jobs),
        flavors=flavors if draw(st.booleans()) else (),
        accounts=accounts,
        dependency_states=states,
        policy=policy,
    )


@st.composite
def busy_queues(draw: st.DrawFn) -> Snapshot:
    """Sites with running jobs and a queue of plain jobs of mixed sizes and walltimes: backfill's case."""
    site = draw(sites())
    count = draw(st.integers(2, 10))
    jobs = tuple(
        PendingJob(
            id=f"j{i}",
            priority=draw(st.integers(0, 2)),
            seq=i,
            nodes=draw(st.sampled_from([1, 1, 1, 2])),
            cpus=draw(st.integers(0, 6)),
            mem=draw(st.integers(0, 4)),
            gpus=0,
            submit_time=NOW,
            walltime=draw(st.sampled_from([None, 60, 600, 1800, 3600, 7200, 36_000])),
            exclusive=draw(st.integers(0, 5)) == 0,
        )
        for i in range(count)
    )
    return replace(site, jobs=jobs, policy=Policy(default_walltime=draw(st.sampled_from([600, 3600]))))


# ---------------------------------------------------------------------------------------------------
# An independent oracle: when could a job start at the earliest?


def _end(r: RunningJob, policy: Policy) -> float:
    wall = r.walltime if r.walltime is not None else policy.default_walltime
    return r.start_time.timestamp() + wall


def earliest_start(s: Snapshot, job: PendingJob) -> float | None:
    """Brute force over every release time: the first time enough nodes of one remote hold the job."""
    now = NOW.timestamp()
    nodes = {n.id: n for n in s.nodes}
    times = sorted({now} | {max(_end(r, s.policy), now) for r in s.running})
    for t in times:
        per_remote: Counter[str] = Counter()
        for n in nodes.values():
            if job.remote_id is not None and n.remote_id != job.remote_id:
                continue
            if not set(job.labels) <= set(n.labels) or n.account is not None or job.flavor is not None:
                continue
            on = [r for r in s.running if n.id in r.node_ids]
            still = [r for r in on if _end(r, s.policy) > t]
            if any(r.exclusive for r in still):
                continue
            ended = [r for r in on if _end(r, s.policy) <= t]
            free = [
                n.free_cpus + sum(r.cpus for r in ended),
                n.free_mem + sum(r.mem for r in ended),
                n.free_gpus + sum(r.gpus for r in ended),
                n.free_storage + sum(r.storage for r in ended),
            ]
            if job.exclusive:
                ok = not still and free == [n.cpus, n.mem, n.gpus, n.storage]
            else:
                ok = all(free[d] >= need for d, need in enumerate((job.cpus, job.mem, job.gpus, job.storage)))
            if ok:
                per_remote[n.remote_id] += 1
        if any(c >= job.nodes for c in per_remote.values()):
            return t
    return None


def with_placements_running(s: Snapshot, result: Plan) -> Snapshot:
    """The snapshot after the plan: its placed jobs run from now, holding what they asked for."""
    jobs = {j.id: j for j in s.jobs}
    started = []
    taken: dict[str, list[int]] = {n.id: [0, 0, 0, 0] for n in s.nodes}
    for p in result.placements:
        j = jobs[p.job_id]
        started.append(
            RunningJob(
                id=j.id,
                node_ids=p.node_ids,
                cpus=j.cpus,
                mem=j.mem,
                gpus=j.gpus,
                storage=j.storage,
                start_time=NOW,
                walltime=j.walltime,
                exclusive=j.exclusive,
            )
        )
        for nid in p.node_ids:
            for d, v in enumerate((j.cpus, j.mem, j.gpus, j.storage)):
                taken[nid][d] += v
    nodes = tuple(
        replace(
            n,
            free_cpus=n.free_cpus - taken[n.id][0],
            free_mem=n.free_mem - taken[n.id][1],
            free_gpus=n.free_gpus - taken[n.id][2],
            free_storage=n.free_storage - taken[n.id][3],
        )
        for n in s.nodes
    )
    return replace(s, nodes=nodes, running=(*s.running, *started))


def decided_ids(result: Plan) -> list[str]:
    return (
        [p.job_id for p in result.placements]
        + [p.job_id for p in result.provisions]
        + [r.job_id for r in result.rejections]
        + [w.job_id for w in result.waits]
    )


# ---------------------------------------------------------------------------------------------------
# Properties


@settings(deadline=None, max_examples=200)
@given(snapshots())
def test_every_pending_job_gets_exactly_one_decision(s: Snapshot) -> None:
    result = plan(s, NOW)
    assert sorted(decided_ids(result)) == sorted(j.id for j in s.jobs)


@settings(deadline=None, max_examples=200)
@given(snapshots())
def test_no_node_is_over_committed_and_placements_respect_the_job(s: Snapshot) -> None:
    result = plan(s, NOW)
    jobs = {j.id: j for j in s.jobs}
    nodes = {n.id: n for n in s.nodes}
    use = {nid: [0, 0, 0, 0] for nid in nodes}
    placed_on: Counter[str] = Counter()
    exclusive_on: set[str] = set()
    for p in result.placements:
        j = jobs[p.job_id]
        assert len(p.node_ids) == j.nodes == len(set(p.node_ids))
        assert len({nodes[nid].remote_id for nid in p.node_ids}) == 1
        for nid in p.node_ids:
            n = nodes[nid]
            assert j.remote_id in (None, n.remote_id)
            assert set(j.labels) <= set(n.labels)
            placed_on[nid] += 1
            if j.exclusive:
                exclusive_on.add(nid)
            for d, v in enumerate((j.cpus, j.mem, j.gpus, j.storage)):
                use[nid][d] += v
    for nid, n in nodes.items():
        free = (n.free_cpus, n.free_mem, n.free_gpus, n.free_storage)
        assert all(use[nid][d] <= max(free[d], 0) or use[nid][d] == 0 for d in range(4)), (
            nid,
            use[nid],
            free,
        )
        running_here = [r for r in s.running if nid in r.node_ids]
        if any(r.exclusive for r in running_here):
            assert placed_on[nid] == 0
        if nid in exclusive_on:
            assert placed_on[nid] == 1 and not running_here
            assert free == (n.cpus, n.mem, n.gpus, n.storage)


@settings(deadline=None, max_examples=200)
@given(st.one_of(snapshots(), busy_queues()))
def test_a_backfilled_job_never_delays_the_heads_reservation(s: Snapshot) -> None:
    s = replace(s, policy=replace(s.policy, algorithm="backfill"), flavors=())
    result = plan(s, NOW)
    heads = [w for w in result.waits if w.reason == "Resources"]
    assert len(heads) <= 1
    if not heads or heads[0].estimated_start is None:
        return
    head = next(j for j in s.jobs if j.id == heads[0].job_id)
    promised = heads[0].estimated_start.timestamp()
    after = earliest_start(with_placements_running(s, result), head)
    assert after is not None and after <= promised + 1e-6, (after, promised)


@settings(deadline=None, max_examples=200)
@given(snapshots(), st.randoms(use_true_random=False))
def test_the_same_snapshot_shuffled_gives_the_same_plan(s: Snapshot, rnd: random.Random) -> None:
    first = plan(s, NOW)
    assert plan(s, NOW) == first
    jobs, nodes, running, flavors = list(s.jobs), list(s.nodes), list(s.running), list(s.flavors)
    for items in (jobs, nodes, running, flavors):
        rnd.shuffle(items)
    shuffled = replace(
        s,
        jobs=tuple(jobs),
        nodes=tuple(nodes),
        running=tuple(running),
        flavors=tuple(flavors),
        accounts=dict(reversed(list(s.accounts.items()))),
        dependency_states=dict(reversed(list(s.dependency_states.items()))),
    )
    assert plan(shuffled, NOW) == first


@settings(deadline=None, max_examples=200)
@given(snapshots())
def test_dependencies_and_array_throttles_hold(s: Snapshot) -> None:
    result = plan(s, NOW)
    jobs = {j.id: j for j in s.jobs}
    started = [p.job_id for p in result.placements] + [p.job_id for p in result.provisions]
    for job_id in started:
        j = jobs[job_id]
        assert all(s.dependency_states.get(d) == "completed" for d in j.after_ok)
        assert all(s.dependency_states.get(d) in TERMINAL for d in j.after_any)
    rejected = {r.job_id: r.reason for r in result.rejections}
    for j in s.jobs:
        if any(s.dependency_states.get(d) in (None, "failed", "canceled") for d in j.after_ok) or any(
            d not in s.dependency_states for d in j.after_any
        ):
            assert rejected.get(j.id) in ("dependency", "unsatisfiable")
    running_per_array = Counter(r.array_id for r in s.running if r.array_id)
    started_per_array = Counter(jobs[i].array_id for i in started if jobs[i].array_id)
    for array_id, n in started_per_array.items():
        throttle = next(j.array_throttle for j in s.jobs if j.array_id == array_id)
        assert throttle is not None
        assert n <= max(0, throttle - running_per_array[array_id])


@settings(deadline=None, max_examples=200)
@given(snapshots(), st.randoms(use_true_random=False), st.integers(1, 4))
def test_the_planner_agrees_with_plan_after_deltas(s: Snapshot, rnd: random.Random, page: int) -> None:
    planner = Planner(replace(s, jobs=s.jobs[: len(s.jobs) // 2]), page_size=page)
    now = NOW
    pending = list(s.jobs[len(s.jobs) // 2 :])
    for _ in range(3):
        result = planner.plan(now)
        assert result == plan(planner.snapshot(), now)
        assert planner.plan(now, full=True) == plan(planner.snapshot(full=True), now)
        planner.apply(result, now)
        live = sorted(r.id for r in planner.snapshot().running)
        if live:
            planner.ended(rnd.sample(live, rnd.randint(0, len(live))))
        if pending:
            planner.submit([pending.pop()])
        queued = [j.id for j in planner.queued()]
        if queued and rnd.random() < 0.3:
            planner.withdraw([rnd.choice(queued)])
        now += timedelta(seconds=rnd.randint(0, 600))
    assert planner.plan(now) == plan(planner.snapshot(), now)


@settings(deadline=None, max_examples=200)
@given(
    st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8), st.integers(0, 2)), min_size=1, max_size=12),
    st.lists(
        st.tuples(st.integers(0, 11), st.integers(0, 4), st.integers(0, 4), st.integers(0, 1), st.booleans()),
        max_size=20,
    ),
    st.lists(
        st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(0, 2), st.integers(1, 3)), max_size=20
    ),
)
def test_the_fit_check_finds_the_best_fitting_nodes_whenever_some_exist(
    used: list[tuple[int, int, int]],
    takes: list[tuple[int, int, int, int, bool]],
    queries: list[tuple[int, int, int, int]],
) -> None:
    """The bucket bounds only ever skip what cannot fit: after any sequence of placements (and a
    rollback), the fit check returns what a brute-force search in the same preference order returns."""
    nodes = [
        NodeCapacity(f"n{i:02d}", "r1", 8, 8, 2, 8 - c, 8 - m, 2 - g, storage=1, free_storage=1)
        for i, (c, m, g) in enumerate(used)
    ]
    state = ClusterState(nodes, (), 3600)
    (groups,) = [sorted_groups(state.classes, range(len(state.classes)))]

    def check() -> None:
        for cpus, mem, gpus, count in queries:
            candidates = sorted(
                (state.class_of[i], f[0], i)
                for i, f in enumerate(state.free)
                if f[0] >= cpus and f[1] >= mem and f[2] >= gpus
            )
            expected = [i for _, _, i in candidates[:count]] if len(candidates) >= count else None
            assert state.find(groups, cpus, mem, gpus, 0, count, False) == expected

    state.begin_pass(undo=True)
    for node, cpus, mem, gpus, exclusive in takes:
        i = node % len(nodes)
        f = state.free[i]
        whole = exclusive and state.jobs_on[i] == 0 and f == state.cap[i]
        if whole or (not exclusive and f[0] >= cpus and f[1] >= mem and f[2] >= gpus):
            state.take(i, cpus, mem, gpus, 0, whole, NOW.timestamp() + 60)
        check()
    state.end_pass()
    check()
