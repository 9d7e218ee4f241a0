"""The order in which the scheduler considers pending jobs.

A job's priority is ``weight_priority * priority + weight_fairshare * F(account) + weight_age * age``
with the age in hours, capped at ``max_age_hours``. ``F`` is Slurm's classic fair-share factor,
``2 ** -(usage_fraction / share_fraction)``: 1 for an account that used nothing, 0.5 for one that used
exactly its share, towards 0 for one far over it. Usage arrives already decayed by the configured
half-life (the store computes it), so this module needs no clock beyond ``now``.

``backfill`` and ``fcfs`` take jobs in descending priority, then by ``seq`` (first come, first served),
then by id, so that the order is total and independent of the input order.

``fairshare`` orders by fair share first: it always takes the next job of the account whose usage is
lowest against its share, and it charges each job it starts (cpus x nodes x walltime) to its account
during the same pass, so one pass interleaves accounts in proportion to their shares instead of
starting every job of the least-served account first. Within an account, jobs go by the rest of the
priority (directive and age), then ``seq``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from operator import attrgetter

from skyport.server.scheduler.snapshot import AccountState, PendingJob, Policy

_priority_fields = attrgetter("submit_time", "priority", "account")
_seq = attrgetter("seq")


def account_universe(accounts: Mapping[str, AccountState], jobs: Iterable[PendingJob]) -> list[AccountState]:
    """Every account that counts towards the share total: the configured ones and those of pending
    jobs (an account the snapshot does not describe has the defaults: share 1, no usage, no budget).
    Sorted by name so that sums are computed in the same order every time."""
    names = set(accounts) | {j.account for j in jobs}
    return [accounts.get(name) or AccountState(name=name) for name in sorted(names)]


def fairshare_factors(universe: Sequence[AccountState]) -> dict[str, float]:
    """``2 ** -(usage_fraction / share_fraction)`` per account; 0 for an account with no share."""
    total_share = math.fsum(max(a.share, 0.0) for a in universe)
    total_usage = math.fsum(max(a.usage, 0.0) for a in universe)
    factors: dict[str, float] = {}
    for a in universe:
        share = max(a.share, 0.0)
        if share <= 0.0 or total_share <= 0.0:
            factors[a.name] = 0.0
            continue
        used = max(a.usage, 0.0) / total_usage if total_usage > 0.0 else 0.0
        factors[a.name] = 2.0 ** (-used / (share / total_share))
    return factors


def age_hours(job: PendingJob, now_ts: float, policy: Policy) -> float:
    """Hours since submission, between 0 (a clock that runs behind) and ``max_age_hours``."""
    age = (now_ts - job.submit_time.timestamp()) / 3600.0
    return min(max(age, 0.0), policy.max_age_hours)


def job_priority(job: PendingJob, factor: float, now_ts: float, policy: Policy) -> float:
    """The computed priority of one job (what ``backfill`` and ``fcfs`` sort by, descending); the same
    arithmetic as :func:`priority_order`, so that it shows exactly the number the order used."""
    age_s = min(max(now_ts - job.submit_time.timestamp(), 0.0), policy.max_age_hours * 3600.0)
    return (
        policy.weight_priority * job.priority
        + policy.weight_fairshare * factor
        + policy.weight_age / 3600.0 * age_s
    )


def priority_order(
    jobs: Sequence[PendingJob], factors: Mapping[str, float], now_ts: float, policy: Policy
) -> list[PendingJob]:
    """Jobs by descending computed priority, then ``seq``, then id, then input position."""
    wp, wf = policy.weight_priority, policy.weight_fairshare
    cap_s = policy.max_age_hours * 3600.0
    per_second = policy.weight_age / 3600.0
    factor = {name: wf * f for name, f in factors.items()}.get
    keys: list[float] = []
    add = keys.append
    for submit_time, priority, account in map(_priority_fields, jobs):
        age = now_ts - submit_time.timestamp()
        if age > cap_s:
            age = cap_s
        elif age < 0.0:
            age = 0.0
        add(-(wp * priority + factor(account, 0.0) + per_second * age))
    seqs: list[int] = list(map(_seq, jobs))
    if len(set(seqs)) == len(seqs):
        # Two stable sorts on single keys (by seq, then by priority) give the order of the tuple
        # (priority, seq) several times faster than comparing tuples; unique seqs make it total.
        order = sorted(range(len(keys)), key=seqs.__getitem__)
        order.sort(key=keys.__getitem__)
    else:
        order = sorted(range(len(keys)), key=lambda p: (keys[p], seqs[p], jobs[p].id, p))
    return [jobs[pos] for pos in order]


class JobOrder:
    """Yields pending jobs one at a time; :meth:`charge` tells it a job of an account started.

    The static orders ignore charges; the fair-share order uses them (see the module docstring)."""

    def __init__(self, ordered: list[PendingJob]) -> None:
        self._ordered = ordered

    def __iter__(self) -> Iterator[PendingJob]:
        return iter(self._ordered)

    def charge(self, account: str, cpu_seconds: float) -> None:
        del account, cpu_seconds


class FairShareOrder(JobOrder):
    """Next job from the account with the lowest ``usage / share``, usage growing as jobs start."""

    def __init__(
        self, jobs: Sequence[PendingJob], universe: Sequence[AccountState], now_ts: float, policy: Policy
    ) -> None:
        super().__init__([])
        wp, wa = policy.weight_priority, policy.weight_age
        per_account: dict[str, list[tuple[float, int, str, PendingJob]]] = {}
        for j in jobs:
            inner = wp * j.priority + wa * age_hours(j, now_ts, policy)
            per_account.setdefault(j.account, []).append((-inner, j.seq, j.id, j))
        self._queues: dict[str, list[tuple[float, int, str, PendingJob]]] = {}
        for name, queue in per_account.items():
            queue.sort(key=lambda e: e[:3])
            self._queues[name] = queue
        self._usage = {a.name: max(a.usage, 0.0) for a in universe}
        self._share = {a.name: max(a.share, 0.0) for a in universe}
        self._next_index = dict.fromkeys(self._queues, 0)
        self._heap: list[tuple[float, float, int, str, str]] = []
        for name in sorted(self._queues):
            self._push(name)

    def _ratio(self, account: str) -> float:
        share = self._share.get(account, 1.0)
        usage = self._usage.get(account, 0.0)
        return usage / share if share > 0.0 else math.inf

    def _push(self, account: str) -> None:
        i = self._next_index[account]
        queue = self._queues[account]
        if i < len(queue):
            neg, seq, job_id, _ = queue[i]
            heapq.heappush(self._heap, (self._ratio(account), neg, seq, job_id, account))

    def __iter__(self) -> Iterator[PendingJob]:
        while self._heap:
            account = heapq.heappop(self._heap)[4]
            i = self._next_index[account]
            self._next_index[account] = i + 1
            yield self._queues[account][i][3]
            # Back in after the caller decided (and maybe charged) it: at its account's new usage.
            self._push(account)

    def charge(self, account: str, cpu_seconds: float) -> None:
        self._usage[account] = self._usage.get(account, 0.0) + max(cpu_seconds, 0.0)


def job_order(
    jobs: Sequence[PendingJob], accounts: Mapping[str, AccountState], now_ts: float, policy: Policy
) -> JobOrder:
    """The order of ``policy.algorithm`` over ``jobs``."""
    universe = account_universe(accounts, jobs)
    if policy.algorithm == "fairshare":
        return FairShareOrder(jobs, universe, now_ts, policy)
    return JobOrder(priority_order(jobs, fairshare_factors(universe), now_ts, policy))
