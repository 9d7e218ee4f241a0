"""The discrete-event simulation: a workload replayed through the real ``plan()`` on a virtual clock.

Nothing happens between events, so the clock jumps from one to the next: a job arriving, or a running
job ending (at start + runtime, or at start + walltime when it would run longer: it is killed). All events
at the same second are applied together and then ``plan()`` is called once, with a snapshot built the way
the core's scheduler loop builds one: pending jobs, running jobs with their start times and walltimes,
node capacities, accounts with their decayed usage, and the policy with the algorithm under study.
Placements start now; rejections end the job; provisions are ignored (the simulated machine has no
elastic capacity), so such a job keeps waiting.

A plan that over-commits a node, or places a job that is not pending, raises :class:`PlanError`: the
simulator doubles as a check of the scheduler it drives.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

from skyport.server.scheduler import (
    AccountState,
    NodeCapacity,
    PendingJob,
    Plan,
    Policy,
    RunningJob,
    Snapshot,
    plan,
)
from skyport.server.scheduler.snapshot import Algorithm
from skyport.sim.workload import SimJob, Workload

#: Second 0 of every simulation (any fixed instant would do; the scheduler only sees differences).
EPOCH = datetime(2025, 1, 1, tzinfo=UTC)
REMOTE = "sim"
DEFAULT_HALF_LIFE = 7 * 24 * 3600.0

Planner = Callable[[Snapshot, datetime], Plan]
Outcome = Literal["completed", "killed", "rejected", "unstarted"]
EventKind = Literal["arrive", "start", "end"]


class PlanError(RuntimeError):
    """The planner decided something impossible (over-commit, unknown or non-pending job)."""


@dataclass(frozen=True)
class JobRecord:
    """What happened to one job. ``start`` is None for a job that never ran (rejected or unstarted)."""

    job: SimJob
    outcome: Outcome
    end: int
    start: int | None = None
    node_ids: tuple[str, ...] = ()
    reason: str = ""

    @property
    def wait(self) -> int | None:
        return None if self.start is None else self.start - self.job.submit

    @property
    def run(self) -> int:
        return 0 if self.start is None else self.end - self.start


@dataclass(frozen=True)
class SimEvent:
    time: int
    kind: EventKind
    job_id: str


@dataclass(frozen=True)
class SimResult:
    algorithm: Algorithm
    workload: Workload
    records: tuple[JobRecord, ...]  # in workload order
    events: tuple[SimEvent, ...]  # in the order they happened
    #: (time, cpus in use from then on), one point per event time.
    busy: tuple[tuple[int, int], ...]
    plan_calls: int
    #: The accounts, and at each event time their decayed usage as ``plan()`` saw it (same order).
    accounts: tuple[str, ...] = ()
    usage: tuple[tuple[int, tuple[float, ...]], ...] = ()


class _Usage:
    """Per-account cpu-seconds, decayed exponentially with a half-life, integrated exactly between events
    (a constant number of cpus ``r`` over ``dt`` adds ``r * H/ln2 * (1 - 2^(-dt/H))``)."""

    def __init__(self, accounts: list[str], half_life: float) -> None:
        self.half_life = half_life
        self.usage = dict.fromkeys(accounts, 0.0)
        self.rate = dict.fromkeys(accounts, 0)
        self.time = 0

    def advance(self, now: int) -> None:
        dt = now - self.time
        if dt <= 0:
            return
        factor = 2.0 ** (-dt / self.half_life)
        gained = self.half_life / math.log(2) * (1.0 - factor)
        for name, used in self.usage.items():
            self.usage[name] = used * factor + self.rate[name] * gained
        self.time = now


class _Simulation:
    """The mutable state of one run; :func:`simulate` is its only user."""

    def __init__(self, workload: Workload, policy: Policy, planner: Planner, half_life: float) -> None:
        machine = workload.machine
        self.workload = workload
        self.policy = policy
        self.planner = planner
        self.node_ids = [f"n{i:0{len(str(machine.nodes))}d}" for i in range(machine.nodes)]
        self.node_index = {node_id: i for i, node_id in enumerate(self.node_ids)}
        self.free_cpus = [machine.cpus_per_node] * machine.nodes
        self.free_mem = [machine.mem_per_node] * machine.nodes
        self.capacity = [self._capacity(i) for i in range(machine.nodes)]
        self.changed: set[int] = set()  # nodes whose capacity entry is out of date
        self.jobs = {job.id: job for job in workload.jobs}
        if len(self.jobs) != len(workload.jobs):
            raise ValueError("job ids in a workload must be unique")
        self.seq = {job.id: seq for seq, job in enumerate(workload.jobs)}
        self.pending: dict[str, PendingJob] = {}
        self.running: dict[str, RunningJob] = {}
        self.started: dict[str, int] = {}  # start time of each running job
        self.ends: list[tuple[int, int, str]] = []  # heap of (end time, seq, job id)
        self.records: dict[str, JobRecord] = {}
        self.events: list[SimEvent] = []
        self.busy: list[tuple[int, int]] = []
        self.usage_log: list[tuple[int, tuple[float, ...]]] = []
        self.busy_cpus = 0
        accounts = sorted({*workload.shares, *(job.account for job in workload.jobs)})
        self.shares = {name: workload.shares.get(name, 1.0) for name in accounts}
        self.usage = _Usage(accounts, half_life)
        self.plan_calls = 0

    # --- events ---

    def arrive(self, job: SimJob, now: int) -> None:
        self.pending[job.id] = PendingJob(
            id=job.id,
            priority=0,
            seq=self.seq[job.id],
            nodes=job.nodes,
            cpus=job.cpus,
            mem=job.mem,
            gpus=0,
            submit_time=EPOCH + timedelta(seconds=job.submit),
            account=job.account,
            walltime=job.walltime,
        )
        self.events.append(SimEvent(now, "arrive", job.id))

    def end(self, job_id: str, now: int) -> None:
        job, started = self.jobs[job_id], self.running.pop(job_id)
        for node_id in started.node_ids:
            self._give(self.node_index[node_id], -job.cpus, -job.mem)
        self.usage.rate[job.account] -= job.total_cpus
        start = self.started.pop(job_id)
        outcome: Outcome = "killed" if job.runtime > job.walltime else "completed"
        self.records[job_id] = JobRecord(job, outcome, now, start, started.node_ids)
        self.events.append(SimEvent(now, "end", job_id))

    def _give(self, node: int, cpus: int, mem: int) -> None:
        """Take (positive) or give back (negative) resources on a node."""
        self.free_cpus[node] -= cpus
        self.free_mem[node] -= mem
        self.busy_cpus += cpus
        self.changed.add(node)

    # --- planning ---

    def _capacity(self, node: int) -> NodeCapacity:
        machine = self.workload.machine
        return NodeCapacity(
            id=self.node_ids[node],
            remote_id=REMOTE,
            cpus=machine.cpus_per_node,
            mem=machine.mem_per_node,
            gpus=0,
            free_cpus=self.free_cpus[node],
            free_mem=self.free_mem[node],
            free_gpus=0,
        )

    def snapshot(self) -> Snapshot:
        for node in self.changed:  # only what changed since the last pass is rebuilt
            self.capacity[node] = self._capacity(node)
        self.changed.clear()
        accounts = {
            name: AccountState(name, share=self.shares[name], usage=used)
            for name, used in self.usage.usage.items()
        }
        return Snapshot(
            jobs=tuple(self.pending.values()),
            nodes=tuple(self.capacity),
            running=tuple(self.running.values()),
            accounts=accounts,
            policy=self.policy,
        )

    def schedule(self, now: int) -> None:
        self.plan_calls += 1
        decided = self.planner(self.snapshot(), EPOCH + timedelta(seconds=now))
        for placement in decided.placements:
            self.start(placement.job_id, placement.node_ids, now)
        for rejection in decided.rejections:
            job = self.jobs.get(rejection.job_id)
            if job is None or self.pending.pop(rejection.job_id, None) is None:
                raise PlanError(f"the plan rejects {rejection.job_id}, which is not pending")
            reason = f"{rejection.reason}: {rejection.message}"
            self.records[job.id] = JobRecord(job, "rejected", now, reason=reason)
            self.events.append(SimEvent(now, "end", job.id))

    def start(self, job_id: str, node_ids: tuple[str, ...], now: int) -> None:
        if job_id not in self.pending:
            raise PlanError(f"the plan starts {job_id}, which is not pending")
        job = self.jobs[job_id]
        if len(node_ids) != job.nodes or len(set(node_ids)) != job.nodes:
            raise PlanError(f"the plan gives {job_id} nodes {node_ids}; it needs {job.nodes} distinct ones")
        indexes = [self.node_index.get(node_id, -1) for node_id in node_ids]
        for node_id, i in zip(node_ids, indexes, strict=True):
            if i < 0:
                raise PlanError(f"the plan puts {job_id} on {node_id}, which does not exist")
            if self.free_cpus[i] < job.cpus or self.free_mem[i] < job.mem:
                raise PlanError(f"the plan over-commits {node_id} with {job_id}")
        del self.pending[job_id]
        for i in indexes:
            self._give(i, job.cpus, job.mem)
        self.usage.rate[job.account] += job.total_cpus
        self.running[job_id] = RunningJob(
            id=job_id,
            node_ids=tuple(node_ids),
            cpus=job.cpus,
            mem=job.mem,
            gpus=0,
            start_time=EPOCH + timedelta(seconds=now),
            walltime=job.walltime,
            account=job.account,
        )
        self.started[job_id] = now
        heapq.heappush(self.ends, (now + min(job.runtime, job.walltime), self.seq[job_id], job_id))
        self.events.append(SimEvent(now, "start", job_id))

    # --- the loop ---

    def run(self) -> None:
        arrivals = self.workload.jobs
        next_arrival = 0
        now = 0
        while next_arrival < len(arrivals) or self.ends:
            candidates = [self.ends[0][0]] if self.ends else []
            if next_arrival < len(arrivals):
                candidates.append(arrivals[next_arrival].submit)
            now = min(candidates)
            self.usage.advance(now)
            self.usage_log.append((now, tuple(self.usage.usage.values())))
            while self.ends and self.ends[0][0] == now:
                self.end(heapq.heappop(self.ends)[2], now)
            while next_arrival < len(arrivals) and arrivals[next_arrival].submit == now:
                self.arrive(arrivals[next_arrival], now)
                next_arrival += 1
            if self.pending:
                self.schedule(now)
            self.busy.append((now, self.busy_cpus))
        for job_id in self.pending:  # nothing will ever free what they wait for
            reason = "never placed: the plan kept it waiting after the last event"
            self.records[job_id] = JobRecord(self.jobs[job_id], "unstarted", now, reason=reason)
            self.events.append(SimEvent(now, "end", job_id))
        self.pending.clear()


def simulate(
    workload: Workload,
    algorithm: Algorithm,
    *,
    half_life: float = DEFAULT_HALF_LIFE,
    policy: Policy | None = None,
    planner: Planner = plan,
) -> SimResult:
    """Replay ``workload`` through ``planner`` (the scheduler's ``plan`` by default) with ``algorithm``.

    ``half_life`` (seconds) decays the accounts' usage for fair-share; ``policy`` sets the other weights
    (its algorithm is replaced by ``algorithm``). Deterministic: the same inputs give the same result.
    """
    if half_life <= 0:
        raise ValueError("the half-life must be positive")
    if any(job.submit < 0 or job.runtime < 0 or job.walltime < 0 for job in workload.jobs):
        raise ValueError("submit times, runtimes and walltimes must not be negative")
    if any(b.submit < a.submit for a, b in zip(workload.jobs, workload.jobs[1:], strict=False)):
        raise ValueError("the workload's jobs must be in submission order")
    sim = _Simulation(workload, replace(policy or Policy(), algorithm=algorithm), planner, half_life)
    sim.run()
    return SimResult(
        algorithm=algorithm,
        workload=workload,
        records=tuple(sim.records[job.id] for job in workload.jobs),
        events=tuple(sim.events),
        busy=tuple(sim.busy),
        plan_calls=sim.plan_calls,
        accounts=tuple(sim.usage.usage),
        usage=tuple(sim.usage_log),
    )
