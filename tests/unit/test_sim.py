"""The simulator: SWF reading, the synthetic generator, the event engine's invariants, the metrics.

Apart from the comparison of algorithms at the end, nothing here depends on which algorithm places jobs
better: scenarios are built so every correct scheduler makes the same decisions, and invariants
(conservation, no over-commit, walltime kills) are checked for each algorithm.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter, defaultdict
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from skyport.server.scheduler import Placement, Plan, Snapshot, plan
from skyport.server.scheduler.snapshot import Algorithm
from skyport.sim import (
    EPOCH,
    JobClass,
    Machine,
    PlanError,
    SimJob,
    SimResult,
    SwfError,
    SyntheticSpec,
    Workload,
    metrics,
    parse_swf,
    read_swf,
    simulate,
    swf_machine,
    swf_workload,
    synthetic,
    table,
)
from skyport.sim.report import bounded_slowdown, percentile, utilization_series

SAMPLE = Path(__file__).parent.parent / "data" / "sample.swf"
ALGORITHMS: tuple[Algorithm, ...] = ("fcfs", "backfill", "fairshare")
GiB = 1024**3


# --- the Standard Workload Format --------------------------------------------------------------------------


def test_swf_fields_and_unknowns() -> None:
    trace = read_swf(SAMPLE)
    assert len(trace.records) == 32
    first = trace.records[0]
    assert (first.job, first.submit, first.wait, first.run, first.allocated_procs) == (1, 0, 0, 3600, 64)
    assert first.avg_cpu == pytest.approx(3500.5)
    assert (first.used_mem, first.requested_procs, first.requested_time, first.requested_mem) == (
        1024,
        64,
        7200,
        2048,
    )
    assert (first.status, first.user, first.group, first.executable, first.queue, first.partition) == (
        1,
        1,
        1,
        1,
        1,
        1,
    )
    assert first.preceding_job is None and first.think_time is None  # -1: unknown
    by_id = {r.job: r for r in trace.records}
    assert by_id[6].preceding_job == 1 and by_id[6].think_time == 60
    assert by_id[5].requested_procs is None and by_id[5].used_mem is None and by_id[5].allocated_procs == 4
    assert by_id[7].run is None and by_id[7].wait is None and by_id[7].status == 5
    assert by_id[9].requested_time is None


def test_swf_header_sizes_the_machine() -> None:
    trace = read_swf(SAMPLE)
    assert trace.header["MaxNodes"] == "8" and trace.header_int("maxprocs") == 64
    assert trace.header["Computer"].startswith("Sky Port sample cluster")
    machine = swf_machine(trace)
    assert (machine.nodes, machine.cpus_per_node, machine.mem_per_node) == (8, 8, 32 * GiB)
    assert swf_machine(trace, nodes=4, cpus_per_node=16) == Machine(4, 16, 64 * GiB)
    only_procs = parse_swf(["; MaxProcs: 64", "1 0 0 10 4 -1 -1 4 60 -1 1 1 1 1 1 1 -1 -1"])
    assert (swf_machine(only_procs).nodes, swf_machine(only_procs).cpus_per_node) == (64, 1)
    assert swf_machine(only_procs, cpus_per_node=16).nodes == 4
    bare = parse_swf(["1 0 0 10 12 -1 -1 -1 60 -1 1 1 1 1 1 1 -1 -1"])  # sized by its largest job
    assert (swf_machine(bare).nodes, swf_machine(bare, cpus_per_node=8).nodes) == (12, 2)


def test_swf_records_become_jobs() -> None:
    trace = read_swf(SAMPLE)
    workload = swf_workload(trace, swf_machine(trace))
    jobs = {job.id: job for job in workload.jobs}
    assert len(jobs) == 30 and "j7" not in jobs and "j22" not in jobs  # no runtime / no processor count
    assert jobs["j1"] == SimJob("j1", 0, 3600, 7200, 8, 8, 2048 * 1024 * 8, "g1")
    assert (jobs["j15"].nodes, jobs["j15"].cpus) == (2, 6)  # 12 processors: 2 nodes x 6
    assert (jobs["j27"].nodes, jobs["j27"].cpus) == (1, 3)
    assert (jobs["j5"].nodes, jobs["j5"].cpus, jobs["j5"].mem) == (1, 4, 0)  # allocated procs, no memory
    assert jobs["j9"].walltime == jobs["j9"].runtime == 900  # no requested time: its runtime
    assert jobs["j12"].runtime > jobs["j12"].walltime
    assert jobs["j20"].nodes == 16  # more than the machine has: the scheduler will reject it
    assert dict(workload.shares) == {"g1": 1.0, "g2": 1.0, "g3": 1.0}
    by_user = swf_workload(trace, swf_machine(trace), account_by="user", limit=5)
    assert [job.account for job in by_user.jobs] == ["u1", "u2", "u3", "u4", "u5"]


def test_swf_submit_times_are_relative_and_sorted() -> None:
    lines = [
        "2 1000 0 10 1 -1 -1 1 60 -1 1 1 1 1 1 1 -1 -1",
        "1 900 0 10 1 -1 -1 1 60 -1 1 1 1 1 1 1 -1 -1",
    ]
    workload = swf_workload(parse_swf(lines), Machine(1, 1, GiB))
    assert [(job.id, job.submit) for job in workload.jobs] == [("j1", 0), ("j2", 100)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1 2 3", "line 2: expected 18 fields, found 3"),
        ("1 0 0 ten 1 -1 -1 1 60 -1 1 1 1 1 1 1 -1 -1", "line 2: field 'run' is not a number: 'ten'"),
        ("-1 0 0 10 1 -1 -1 1 60 -1 1 1 1 1 1 1 -1 -1", "line 2: the job number is unknown"),
    ],
)
def test_swf_bad_lines_are_named(line: str, message: str) -> None:
    with pytest.raises(SwfError, match=message):
        parse_swf(["; MaxNodes: 1", line])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_swf_sample_replays(algorithm: Algorithm) -> None:
    trace = read_swf(SAMPLE)
    result = simulate(swf_workload(trace, swf_machine(trace)), algorithm)
    outcomes = {r.job.id: r.outcome for r in result.records}
    assert outcomes["j20"] == "rejected" and outcomes["j12"] == "killed"
    assert Counter(outcomes.values()) == {"completed": 28, "killed": 1, "rejected": 1}
    check_conservation(result)


# --- the synthetic generator -------------------------------------------------------------------------------


def test_synthetic_is_deterministic_for_a_seed() -> None:
    spec = SyntheticSpec(jobs=300, nodes=16, seed=42)
    assert synthetic(spec) == synthetic(spec)
    assert synthetic(spec).jobs != synthetic(replace(spec, seed=43)).jobs


def test_synthetic_follows_its_parameters() -> None:
    narrow = JobClass("narrow", 3.0, 1, 1, 1, 4, 100, 1000)
    wide = JobClass("wide", 1.0, 2, 6, 8, None, 1000, 5000)
    spec = SyntheticSpec(
        jobs=2000,
        nodes=8,
        cpus_per_node=16,
        mem_per_node=32 * GiB,
        seed=7,
        arrival_rate=0.01,
        classes=(narrow, wide),
        overestimate=2.0,
        underestimate_fraction=0.1,
    )
    jobs = synthetic(spec).jobs
    assert len(jobs) == 2000 and [j.id for j in jobs] == [f"j{i}" for i in range(1, 2001)]
    gaps = (jobs[-1].submit - jobs[0].submit) / (len(jobs) - 1)
    assert gaps == pytest.approx(100, rel=0.1)  # Poisson arrivals at 0.01/s: 100 s apart on average
    for job in jobs:
        assert job.submit >= 0 and 1 <= job.mem <= spec.mem_per_node
        if job.nodes == 1:
            assert job.cpus in (1, 2, 4) and 100 <= job.runtime <= 1000
        else:
            assert 2 <= job.nodes <= 6 and job.cpus in (8, 16) and 1000 <= job.runtime <= 5000
        if job.walltime >= job.runtime:  # overestimated: at most 2x, rounded up to a minute
            assert job.walltime <= 60 * math.ceil(job.runtime * 2.0 / 60)
    assert sum(j.nodes == 1 for j in jobs) / len(jobs) == pytest.approx(0.75, abs=0.05)
    assert sum(j.walltime < j.runtime for j in jobs) / len(jobs) == pytest.approx(0.1, abs=0.03)
    accounts = Counter(j.account for j in jobs)  # by activity 2:3:1:4
    assert accounts["students"] / len(jobs) == pytest.approx(0.4, abs=0.05)
    assert accounts["biology"] / len(jobs) == pytest.approx(0.1, abs=0.03)


def test_synthetic_load_sets_the_arrival_rate() -> None:
    spec = SyntheticSpec(jobs=2000, nodes=32, cpus_per_node=8, seed=3, load=0.7)
    workload = synthetic(spec)
    work = sum(j.total_cpus * j.runtime for j in workload.jobs)
    span = workload.jobs[-1].submit - workload.jobs[0].submit
    assert work / (workload.machine.cpus * span) == pytest.approx(0.7, rel=0.1)
    assert max(j.nodes for j in workload.jobs) <= 32 and max(j.cpus for j in workload.jobs) <= 8


def test_synthetic_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="arrival rate"):
        synthetic(SyntheticSpec(arrival_rate=0))
    with pytest.raises(ValueError, match="nodes >= 1"):
        synthetic(SyntheticSpec(nodes=0))
    with pytest.raises(ValueError, match="job class 'empty'"):
        synthetic(SyntheticSpec(classes=(JobClass("empty", 1.0, 1, 1, 1, None, 0, 10),)))


# --- the engine --------------------------------------------------------------------------------------------


def check_conservation(result: SimResult) -> None:
    """Every job arrives once, starts at most once, ends exactly once, in that order and not before its
    submission; replaying the recorded starts and ends never uses more of a node than it has."""
    machine = result.workload.machine
    kinds: dict[str, list[tuple[str, int]]] = defaultdict(list)
    times = [e.time for e in result.events]
    assert times == sorted(times)
    for event in result.events:
        kinds[event.job_id].append((event.kind, event.time))
    assert set(kinds) == {job.id for job in result.workload.jobs}
    for record in result.records:
        job, seen = record.job, kinds[record.job.id]
        assert seen[0] == ("arrive", job.submit)
        if record.start is None:
            assert [k for k, _ in seen] == ["arrive", "end"] and record.outcome in ("rejected", "unstarted")
        else:
            assert [k for k, _ in seen] == ["arrive", "start", "end"]
            assert seen[1][1] == record.start >= job.submit and seen[2][1] == record.end
            assert record.end == record.start + min(job.runtime, job.walltime)
            assert record.outcome == ("killed" if job.runtime > job.walltime else "completed")
            assert len(record.node_ids) == len(set(record.node_ids)) == job.nodes
    records = {record.job.id: record for record in result.records}
    cpus: dict[str, int] = defaultdict(int)
    mem: dict[str, int] = defaultdict(int)
    total = 0
    for event in result.events:  # in the order they happened: zero-length runs included
        record = records[event.job_id]
        if event.kind == "arrive" or record.start is None:
            continue
        sign = 1 if event.kind == "start" else -1
        for node in record.node_ids:
            cpus[node] += sign * record.job.cpus
            mem[node] += sign * record.job.mem
            assert 0 <= cpus[node] <= machine.cpus_per_node and 0 <= mem[node] <= machine.mem_per_node
        total += sign * record.job.total_cpus
        assert 0 <= total <= machine.cpus
    assert all(0 <= busy <= machine.cpus for _, busy in result.busy)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_engine_conserves_jobs_on_a_synthetic_workload(algorithm: Algorithm) -> None:
    workload = synthetic(SyntheticSpec(jobs=300, nodes=16, cpus_per_node=8, mem_per_node=16 * GiB, seed=5))
    result = simulate(workload, algorithm)
    check_conservation(result)
    assert all(r.outcome in ("completed", "killed") for r in result.records)
    assert result == simulate(workload, algorithm)  # deterministic


job_strategy = st.builds(
    lambda gap, runtime, walltime, nodes, cpus, mem: (gap, runtime, walltime, nodes, cpus, mem),
    st.integers(0, 30),
    st.integers(0, 200),
    st.integers(1, 150),
    st.integers(1, 4),  # up to one more node than the largest machine below: some are rejected
    st.integers(1, 4),
    st.sampled_from([0, GiB, 3 * GiB]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    drafts=st.lists(job_strategy, min_size=1, max_size=25),
    nodes=st.integers(1, 3),
    algorithm=st.sampled_from(ALGORITHMS),
)
def test_engine_invariants_hold_for_any_workload(
    drafts: list[tuple[int, int, int, int, int, int]], nodes: int, algorithm: Algorithm
) -> None:
    jobs, clock = [], 0
    for i, (gap, runtime, walltime, n, cpus, mem) in enumerate(drafts):
        clock += gap
        jobs.append(SimJob(f"j{i}", clock, runtime, walltime, n, cpus, mem, f"a{i % 3}"))
    workload = Workload("hypothesis", Machine(nodes, 4, 4 * GiB), tuple(jobs), {"a0": 2.0, "a1": 1.0})
    result = simulate(workload, algorithm)
    check_conservation(result)
    for record in result.records:
        too_big = record.job.nodes > nodes
        assert (record.outcome == "rejected") == too_big  # all others fit an empty machine: they run


def one_node_workload(*jobs: SimJob) -> Workload:
    return Workload("tiny", Machine(1, 4, 4 * GiB), jobs, {"default": 1.0})


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_job_is_killed_at_its_walltime(algorithm: Algorithm) -> None:
    workload = one_node_workload(
        SimJob("long", 0, runtime=500, walltime=100, nodes=1, cpus=4, mem=GiB),
        SimJob("next", 5, runtime=10, walltime=60, nodes=1, cpus=4, mem=GiB),
    )
    long, after = simulate(workload, algorithm).records
    assert (long.outcome, long.start, long.end, long.run) == ("killed", 0, 100, 100)
    assert (after.outcome, after.start, after.end, after.wait) == ("completed", 100, 110, 95)


def test_snapshots_carry_running_jobs_nodes_and_decayed_usage() -> None:
    seen: list[tuple[datetime, Snapshot]] = []

    def recording(snapshot: Snapshot, now: datetime) -> Plan:
        seen.append((now, snapshot))
        return plan(snapshot, now)

    workload = one_node_workload(
        SimJob("first", 0, runtime=3600, walltime=7200, nodes=1, cpus=1, mem=GiB),
        SimJob("second", 3600, runtime=60, walltime=60, nodes=1, cpus=2, mem=GiB),
    )
    result = simulate(workload, "fcfs", half_life=3600, planner=recording)
    assert [(now - EPOCH).total_seconds() for now, _ in seen] == [0, 3600]  # only when something waits
    first_pass, second_pass = seen[0][1], seen[1][1]
    assert [job.id for job in first_pass.jobs] == ["first"] and first_pass.running == ()
    assert first_pass.policy.algorithm == "fcfs" and first_pass.jobs[0].walltime == 7200
    assert first_pass.nodes[0].free_cpus == 4 and first_pass.accounts["default"].usage == 0
    # At 3600 "first" has just ended; 1 cpu for one half-life leaves H/ln2 * (1 - 1/2) cpu-seconds.
    assert [job.id for job in second_pass.jobs] == ["second"] and second_pass.running == ()
    assert second_pass.accounts["default"].usage == pytest.approx(3600 / (2 * math.log(2)))
    assert second_pass.nodes[0].free_cpus == 4 and result.plan_calls == 2


def test_snapshot_lists_what_runs() -> None:
    seen: list[Snapshot] = []

    def recording(snapshot: Snapshot, now: datetime) -> Plan:
        seen.append(snapshot)
        return plan(snapshot, now)

    workload = one_node_workload(
        SimJob("a", 0, runtime=100, walltime=200, nodes=1, cpus=3, mem=GiB, account="x"),
        SimJob("b", 10, runtime=100, walltime=200, nodes=1, cpus=2, mem=GiB),
    )
    simulate(workload, "backfill", planner=recording)
    running = seen[1].running
    assert [
        (r.id, r.cpus, r.walltime, r.account, (r.start_time - EPOCH).total_seconds()) for r in running
    ] == [("a", 3, 200, "x", 0)]
    assert seen[1].nodes[0].free_cpus == 1 and seen[1].nodes[0].free_mem == 3 * GiB


def test_an_impossible_plan_is_an_error() -> None:
    workload = one_node_workload(
        SimJob("a", 0, 10, 10, 1, 3, 0),
        SimJob("b", 0, 10, 10, 1, 3, 0),
    )

    def overcommit(snapshot: Snapshot, now: datetime) -> Plan:
        return Plan(placements=[Placement(job.id, (snapshot.nodes[0].id,)) for job in snapshot.jobs])

    def unknown(snapshot: Snapshot, now: datetime) -> Plan:
        return Plan(placements=[Placement("nobody", (snapshot.nodes[0].id,))])

    with pytest.raises(PlanError, match="over-commits"):
        simulate(workload, "fcfs", planner=overcommit)
    with pytest.raises(PlanError, match="not pending"):
        simulate(workload, "fcfs", planner=unknown)


def test_jobs_a_plan_never_places_end_unstarted() -> None:
    workload = one_node_workload(SimJob("a", 0, 10, 10, 1, 1, 0), SimJob("b", 50, 10, 10, 1, 1, 0))
    result = simulate(workload, "fcfs", planner=lambda snapshot, now: Plan())
    assert [(r.outcome, r.end) for r in result.records] == [("unstarted", 50), ("unstarted", 50)]
    check_conservation(result)


# --- metrics -----------------------------------------------------------------------------------------------


def hand_scenario() -> Workload:
    """2 nodes x 4 cpus. A fills the machine for 100 s, so B and C (arriving meanwhile) both start at 100
    whatever the algorithm; C asks for 100 s but needs 200: it is killed at 200."""
    return Workload(
        "hand",
        Machine(2, 4, 8 * GiB, price_per_node_hour=0.5),
        (
            SimJob("A", 0, runtime=100, walltime=150, nodes=2, cpus=4, mem=GiB, account="physics"),
            SimJob("B", 10, runtime=50, walltime=60, nodes=1, cpus=4, mem=GiB, account="chemistry"),
            SimJob("C", 20, runtime=200, walltime=100, nodes=1, cpus=2, mem=GiB, account="chemistry"),
        ),
        {"physics": 3.0, "chemistry": 1.0},
    )


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_metrics_of_a_hand_computed_scenario(algorithm: Algorithm) -> None:
    result = simulate(hand_scenario(), algorithm, half_life=1e12)  # no decay
    assert [(r.job.id, r.start, r.end, r.outcome) for r in result.records] == [
        ("A", 0, 100, "completed"),
        ("B", 100, 150, "completed"),
        ("C", 100, 200, "killed"),
    ]
    m = metrics(result)
    assert (m.jobs, m.completed, m.killed, m.rejected, m.unstarted) == (3, 2, 1, 0, 0)
    assert m.makespan_s == 200
    # busy cpu-seconds: A 8 x 100 + B 4 x 50 + C 2 x 100 = 1200, of 8 cpus x 200 s = 1600
    assert m.utilization == pytest.approx(0.75)
    assert m.mean_wait_s == pytest.approx((0 + 90 + 80) / 3)
    assert m.p95_wait_s == 90  # nearest rank of 3: the largest
    # bounded slowdowns: A 100/100 = 1, B (90 + 50)/50 = 2.8, C (80 + 100)/100 = 1.8
    assert m.mean_bounded_slowdown == pytest.approx((1 + 2.8 + 1.8) / 3)
    # node-hours: (2 x 100 + 1 x 50 + 1 x 100) / 3600, at 0.5 per node-hour
    assert m.cost == pytest.approx(350 / 3600 * 0.5)
    physics, chemistry = m.accounts["physics"], m.accounts["chemistry"]
    assert (physics.share_fraction, chemistry.share_fraction) == (0.75, 0.25)
    assert (physics.usage_fraction, chemistry.usage_fraction) == pytest.approx((800 / 1200, 400 / 1200))
    # Usage seen at the event times: t=10, 20, 100: physics only (fraction 1 vs 0.75: off by 0.25);
    # t=150: physics 800, chemistry 4 x 50 + 2 x 50 = 300 (off by |800/1100 - 0.75|). Weighted by time
    # from t=10 (the first moment anything was used) to t=200: 140 s at 0.25, 50 s at 0.0227.
    expected = (140 * 0.25 + 50 * abs(800 / 1100 - 0.75)) / 190
    assert physics.deviation == pytest.approx(expected) and chemistry.deviation == pytest.approx(expected)
    assert m.max_fairshare_deviation == pytest.approx(expected)
    json.dumps(m.to_json())  # plain data all the way down


def test_metric_helpers() -> None:
    assert percentile([], 0.95) == 0
    assert percentile(list(range(1, 101)), 0.95) == 95 and percentile([5, 1, 3], 0.5) == 3
    short = replace(simulate(hand_scenario(), "fcfs").records[0], start=8, end=10)  # waited 8, ran 2
    assert bounded_slowdown(short) == 1.0  # (8 + 2) / 10: bounded below by 1
    assert bounded_slowdown(replace(short, start=28, end=30)) == pytest.approx(3.0)  # (28 + 2) / 10


def test_utilization_series_matches_the_total() -> None:
    result = simulate(hand_scenario(), "fcfs")
    hours, fractions = utilization_series(result, bins=7)
    assert len(hours) == len(fractions) == 7
    assert sum(fractions) / 7 == pytest.approx(metrics(result).utilization)  # the run starts at 0


# --- what the simulator must show --------------------------------------------------------------------------


def contended_workload() -> Workload:
    """High load; a quarter of the jobs are wide (half to all of the machine) and long, the rest narrow
    and short: under FCFS the narrow ones queue behind every wide one; backfill runs them in the holes."""
    classes = (
        JobClass("wide", 0.25, 8, 16, 1, None, 2 * 3600, 6 * 3600),
        JobClass("narrow", 0.75, 1, 1, 1, None, 60, 1200),
    )
    return synthetic(SyntheticSpec(jobs=300, nodes=16, cpus_per_node=8, seed=1, load=0.95, classes=classes))


def test_backfill_beats_fcfs_on_utilization_and_mean_wait() -> None:
    workload = contended_workload()
    fcfs, backfill = (metrics(simulate(workload, algorithm)) for algorithm in ("fcfs", "backfill"))
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(table([fcfs, backfill]))
    printed = console.export_text()
    assert "fcfs" in printed and "backfill" in printed and "utilization" in printed
    assert backfill.utilization > fcfs.utilization + 0.03
    assert backfill.mean_wait_s < 0.5 * fcfs.mean_wait_s
