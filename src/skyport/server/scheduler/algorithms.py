"""One scheduling pass: every pending job gets exactly one decision, in priority order.

``plan(snapshot, now)`` dispatches on ``snapshot.policy.algorithm``:

- ``backfill`` (the default): EASY backfill (see :mod:`.backfill`). The first job in priority order
  that cannot start gets a reservation (``Resources``, with its expected start); later jobs start if
  they do not delay it, and otherwise wait with ``Reservation``.
- ``fcfs``: the same order, but once the head cannot start nothing behind it does (``Priority``).
- ``fairshare``: backfill, with the fair-share order of :mod:`.priority` (least-served account first,
  charged as its jobs start).

For each job, in this order of checks:

1. a dependency that can no longer be met, or a job no node and no offer could ever hold: a Rejection
   (``dependency``, ``unsatisfiable``);
2. unmet dependencies: ``Dependency``; an array already running ``array_throttle`` tasks (running ones
   plus ones started by this plan): ``ArrayThrottle`` — neither blocks anyone;
3. under ``fcfs``, behind a blocked head: ``Priority``;
4. placement now on existing nodes (all-or-nothing, one remote, respecting the reservation); a job whose
   predicted cost exceeds what is left of its account's budget waits with ``Budget`` instead;
5. elastic capacity for a job that names a flavor or that only an offer could hold: a Provision, or
   ``ProvisionLimit`` / ``Budget``, neither blocking anyone;
6. otherwise it is blocked: the first such job is the head (``Resources``), the rest ``Reservation``.

The pass is pure: the same snapshot, in any input order, gives the same plan. Its cost is dominated by
sorting the queue and by one decision per job; what makes the decisions cheap is in :mod:`.resources`,
plus a per-pass memo of job *shapes* (size, count, remote, labels, flavor): once a shape did not fit,
later jobs of that shape fail in O(1), so after the machine is full the rest of the queue is a walk.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from operator import attrgetter

from skyport.server.scheduler.backfill import Reservation, reserve
from skyport.server.scheduler.dependencies import Verdict, dependency_verdict
from skyport.server.scheduler.elastic import class_prices, feasible_offers, flavor_aliases, room
from skyport.server.scheduler.forwarding import split_forwarded
from skyport.server.scheduler.priority import job_order
from skyport.server.scheduler.resources import ClusterState, Groups, NodeClass, sorted_groups
from skyport.server.scheduler.snapshot import (
    AccountState,
    FlavorOffer,
    PendingJob,
    Placement,
    Plan,
    Policy,
    Provision,
    Rejection,
    Snapshot,
    Wait,
)

ALGORITHMS = ("fcfs", "backfill", "fairshare")

#: Everything the walk reads of a job, in one C-level call instead of fourteen attribute lookups.
_fields = attrgetter(
    "id", "after_ok", "after_any", "account", "array_id",
    "remote_id", "labels", "flavor", "cpus", "mem", "gpus", "storage", "nodes", "exclusive",
)  # fmt: skip

PRIORITY_MESSAGE = "Waiting for jobs ahead of it in the queue"
RESERVATION_MESSAGE = (
    "Waiting for resources: it cannot start now without delaying the job with the reservation"
)


def plan(snapshot: Snapshot, now: datetime) -> Plan:
    """Decide what happens to every pending job now. Pure: no I/O, no clock, no randomness.

    Jobs for remotes that schedule themselves are forwarded first (:mod:`.forwarding`); the pass
    decides the others."""
    check_algorithm(snapshot.policy)
    forwarded, jobs = split_forwarded(snapshot)
    with _no_gc():
        state = ClusterState(snapshot.nodes, snapshot.running, snapshot.policy.default_walltime)
    decided = Plan()
    # Remotes with an algorithm of their own first: their jobs can only use their nodes. Jobs that name
    # no remote are planned last, on what is left (they do not see those remotes' reservations).
    own = dict(snapshot.policy.remote_algorithms)
    for remote_id, algorithm in sorted(own.items()):
        theirs = [j for j in jobs if j.remote_id == remote_id]
        if theirs:
            policy = replace(snapshot.policy, algorithm=algorithm, remote_algorithms=())
            _merge(decided, _pass(state, theirs, snapshot, policy, now))
    rest = [j for j in jobs if j.remote_id not in own] if own else jobs
    _merge(decided, _pass(state, rest, snapshot, snapshot.policy, now))
    decided.forwards.extend(forwarded.forwards)
    decided.rejections.extend(forwarded.rejections)
    decided.waits.extend(forwarded.waits)
    return decided


def _pass(
    state: ClusterState, jobs: Sequence[PendingJob], snapshot: Snapshot, policy: Policy, now: datetime
) -> Plan:
    return run_pass(
        state, jobs, snapshot.flavors, snapshot.accounts, snapshot.dependency_states, policy, now, undo=False
    )


def _merge(into: Plan, other: Plan) -> None:
    into.placements.extend(other.placements)
    into.provisions.extend(other.provisions)
    into.rejections.extend(other.rejections)
    into.waits.extend(other.waits)
    into.forwards.extend(other.forwards)


def check_algorithm(policy: Policy) -> None:
    for algorithm in (policy.algorithm, *(a for _, a in policy.remote_algorithms)):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown scheduling algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")


def run_pass(
    state: ClusterState,
    jobs: Sequence[PendingJob],
    flavors: Sequence[FlavorOffer],
    accounts: Mapping[str, AccountState],
    dependency_states: Mapping[str, str],
    policy: Policy,
    now: datetime,
    *,
    undo: bool,
) -> Plan:
    """One pass over ``jobs`` against ``state``; with ``undo`` the state is left as it was.

    The cyclic garbage collector is paused for the pass: it allocates a few hundred thousand small
    objects and no cycles, and full collections walking the whole heap (the snapshot's 100,000 jobs
    included) would otherwise add a quarter to its time. It is re-enabled on return."""
    with _no_gc():
        state.begin_pass(undo)
        try:
            return _Pass(state, flavors, accounts, dependency_states, policy, now).run(jobs)
        finally:
            state.end_pass()


@contextmanager
def _no_gc() -> Iterator[None]:
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


class _Shape:
    """What jobs of one shape may ever use, and whether they failed to fit in this pass (memoised per
    pass; the failure flags stay true because free capacity only shrinks during a pass)."""

    __slots__ = ("elastic", "ever_fits", "fail_long", "fail_now", "groups", "offers", "problem")

    def __init__(
        self,
        groups: Groups,
        ever_fits: bool,
        offers: tuple[FlavorOffer, ...],
        elastic: bool,
        problem: str | None,
    ) -> None:
        self.groups = groups
        self.ever_fits = ever_fits  # enough existing nodes of one remote are large enough
        self.offers = offers  # elastic flavors that hold it, cheapest first
        self.elastic = elastic  # it may get a provision
        self.problem = problem  # why it can never run (None: it can)
        self.fail_now = False  # did not fit now, reservation or not
        self.fail_long = False  # did not fit without delaying the reservation


class _Pass:
    def __init__(
        self,
        state: ClusterState,
        flavors: Sequence[FlavorOffer],
        accounts: Mapping[str, AccountState],
        dependency_states: Mapping[str, str],
        policy: Policy,
        now: datetime,
    ) -> None:
        self.state = state
        self.flavors = tuple(
            sorted(flavors, key=lambda o: (o.remote_id, o.flavor_id, o.name, o.price, o.cpus, o.mem))
        )
        self.accounts = accounts
        self.dependency_states = dependency_states
        self.policy = policy
        self.now = now
        self.now_ts = now.timestamp()
        self.fcfs = policy.algorithm == "fcfs"
        self.result = Plan()
        self.shapes: dict[tuple[object, ...], _Shape] = {}
        self.matching: dict[tuple[object, ...], tuple[NodeClass, ...]] = {}
        self.sized: dict[tuple[int, ...], tuple[Groups, int]] = {}
        self.prices = class_prices(state.classes, self.flavors)
        self.priced = any(self.prices)  # some node costs money: placements need a budget check
        self.reservation: Reservation | None = None
        self.arrays: dict[str, int] = dict(state.array_running)
        self.spent: dict[str, float] = {}
        self.provisioning: dict[str, int] = {}

    # --- the walk ---------------------------------------------------------------------------------

    def run(self, jobs: Sequence[PendingJob]) -> Plan:
        """Decide every job. The loop is written flat (locals, no helper calls on the common paths):
        with 100,000 queued jobs every microsecond per job is a tenth of the pass's budget."""
        order = job_order(jobs, self.accounts, self.now_ts, self.policy)
        charge = order.charge if self.policy.algorithm == "fairshare" else None
        state = self.state
        find = state.find
        seen: set[str] = set()
        waits = self.result.waits
        rejections = self.result.rejections
        shapes = self.shapes
        with_nodes = state.accounts_with_nodes
        dependency_states = self.dependency_states
        now_ts = self.now_ts
        default_walltime = self.policy.default_walltime
        reservation: Reservation | None = None
        blocked = False  # fcfs, once the head could not start
        for job in order:
            (
                job_id, after_ok, after_any, account, array_id,
                remote_id, labels, flavor, cpus, mem, gpus, storage, count, exclusive,
            ) = _fields(job)  # fmt: skip
            if job_id in seen:  # the same job twice in a snapshot: decide it once
                continue
            seen.add(job_id)
            verdict: Verdict = "ok"
            why = ""
            if after_ok or after_any:
                verdict, why = dependency_verdict(job, dependency_states)
                if verdict == "reject":
                    rejections.append(Rejection(job_id, "dependency", why))
                    continue
            # The shape (with the account only where some nodes belong to accounts).
            key: tuple[object, ...] = (remote_id, labels, flavor, cpus, mem, gpus, storage, count, exclusive)
            if with_nodes and account in with_nodes:
                key = (key, account)
            shape = shapes.get(key)
            if shape is None:
                shape = shapes[key] = self._new_shape(job)
            if shape.problem is not None:
                rejections.append(Rejection(job_id, "unsatisfiable", shape.problem))
                continue
            if verdict == "wait":
                waits.append(Wait(job_id, "Dependency", why))
                continue
            if array_id is not None and job.array_throttle is not None:
                running = self.arrays.get(array_id, 0)
                if running >= job.array_throttle:
                    message = (
                        f"Array {array_id} runs at most {job.array_throttle} task(s) at once; "
                        f"{running} are running or starting"
                    )
                    waits.append(Wait(job_id, "ArrayThrottle", message))
                    continue
            if blocked:
                waits.append(Wait(job_id, "Priority", PRIORITY_MESSAGE))
                continue
            if shape.fail_now and not shape.elastic and reservation is not None:
                # The common case once the machine is full: nothing of this shape fits any more.
                waits.append(Wait(job_id, "Reservation", RESERVATION_MESSAGE))
                continue
            walltime = job.walltime if job.walltime is not None else default_walltime
            end = now_ts + walltime
            if shape.ever_fits and not shape.fail_now:
                if count < 1:
                    count = 1
                nodes: list[int] | None
                if reservation is not None and (reservation.shadow is None or end > reservation.shadow):
                    # It would still run at the head's start: it must leave the head its share.
                    if shape.fail_long:
                        nodes = None
                    else:
                        nodes = find(
                            shape.groups, cpus, mem, gpus, storage, count, exclusive,
                            reservation.closed, reservation.limits,
                        )  # fmt: skip
                        if nodes is None:
                            shape.fail_long = True
                else:
                    nodes = find(shape.groups, cpus, mem, gpus, storage, count, exclusive)
                    if nodes is None:
                        shape.fail_now = True
                if nodes is not None:
                    cost = 0.0
                    if self.priced:
                        cost = walltime / 3600.0 * sum(self.prices[state.class_of[i]] for i in nodes)
                        if self._over_budget(job, cost, waits):
                            continue
                    self._place(job, nodes, end, cost, reservation)
                    if charge is not None:
                        charge(account, float(cpus) * count * walltime)
                    continue
            if shape.elastic:
                if self._provision(job, shape, walltime) and charge is not None:
                    charge(account, float(cpus) * max(count, 1) * walltime)
                continue
            if reservation is not None:
                waits.append(Wait(job_id, "Reservation", RESERVATION_MESSAGE))
                continue
            reservation = self.reservation = self._reserve(job, shape)
            blocked = self.fcfs
        return self.result

    def _reserve(self, job: PendingJob, shape: _Shape) -> Reservation:
        """The head: reserve its earliest start, and say when that is."""
        need = (job.cpus, job.mem, job.gpus, job.storage)
        res = reserve(self.state, job.id, shape.groups, need, max(job.nodes, 1), job.exclusive, self.now_ts)
        if res.shadow is None:
            message = (
                "Waiting for resources: the nodes it needs are held by work with no known end, "
                "so no start time can be estimated"
            )
            self.result.waits.append(Wait(job.id, "Resources", message))
            return res
        start = self.now + timedelta(seconds=res.shadow - self.now_ts)
        message = (
            f"Waiting for resources; expected to start at {start.isoformat()} on {', '.join(res.node_ids)}"
        )
        self.result.waits.append(Wait(job.id, "Resources", message, start))
        return res

    def _place(
        self, job: PendingJob, nodes: list[int], end: float, cost: float, res: Reservation | None
    ) -> None:
        state = self.state
        outlives = res is not None and not res.is_short(end)
        for i in nodes:
            state.take(i, job.cpus, job.mem, job.gpus, job.storage, job.exclusive, end)
            if outlives and res is not None:
                lim = res.limits.get(i)
                if lim is not None:
                    lim[0] -= job.cpus
                    lim[1] -= job.mem
                    lim[2] -= job.gpus
                    lim[3] -= job.storage
        node_ids = state.node_ids
        self.result.placements.append(Placement(job.id, tuple([node_ids[i] for i in nodes])))
        self._started(job, cost)

    def _started(self, job: PendingJob, cost: float) -> None:
        if job.array_id is not None:
            self.arrays[job.array_id] = self.arrays.get(job.array_id, 0) + 1
        if cost:
            self.spent[job.account] = self.spent.get(job.account, 0.0) + cost

    def _over_budget(self, job: PendingJob, cost: float, waits: list[Wait]) -> bool:
        """Hold the job (``Budget``) if it would cost more than its account has left."""
        if cost <= 0.0:
            return False
        account = self.accounts.get(job.account)
        if account is None or account.budget_left is None:
            return False
        left = account.budget_left - self.spent.get(job.account, 0.0)
        if cost <= left:
            return False
        message = (
            f"Its predicted cost ({cost:.2f}) exceeds what is left of account {job.account}'s budget "
            f"({max(left, 0.0):.2f})"
        )
        waits.append(Wait(job.id, "Budget", message))
        return True

    def _provision(self, job: PendingJob, shape: _Shape, walltime: int) -> bool:
        offer = next((o for o in shape.offers if room(o, self.provisioning)), None)
        if offer is None:
            remotes = sorted({o.remote_id for o in shape.offers})
            message = (
                f"Waiting for elastic capacity: remote(s) {', '.join(remotes)} are already creating as "
                "many partitions as they may"
            )
            self.result.waits.append(Wait(job.id, "ProvisionLimit", message))
            return False
        count = max(job.nodes, 1)
        cost = offer.price * count * walltime / 3600.0
        if self._over_budget(job, cost, self.result.waits):
            return False
        self.result.provisions.append(
            Provision(job.id, offer.remote_id, offer.flavor_id, count, offer.price * count)
        )
        self.provisioning[offer.remote_id] = self.provisioning.get(offer.remote_id, 0) + 1
        self._started(job, cost)
        return True

    # --- shapes -----------------------------------------------------------------------------------

    def _new_shape(self, job: PendingJob) -> _Shape:
        """The static part of a new shape, from two smaller memos: the classes a job may use at all
        (by remote, labels, flavor, account: few distinct values), and which of those are large
        enough (by the tuple of such classes: few distinct values however varied the sizes are)."""
        state = self.state
        owner = job.account if job.account in state.accounts_with_nodes else None
        eligibility = (job.remote_id, job.labels, job.flavor, owner)
        matching = self.matching.get(eligibility)
        if matching is None:
            aliases = flavor_aliases(job.flavor, self.flavors) if job.flavor is not None else frozenset()
            wanted = frozenset(job.labels)
            matching = tuple(c for c in state.classes if _may_use(c, job, wanted, aliases))
            self.matching[eligibility] = matching
        cpus, mem, gpus, storage = job.cpus, job.mem, job.gpus, job.storage
        large = tuple(
            [
                c.id
                for c in matching
                if cpus <= c.cpus and mem <= c.mem and gpus <= c.gpus and storage <= c.storage
            ]
        )
        sized = self.sized.get(large)
        if sized is None:
            per_remote: dict[str, int] = {}
            for k in large:
                c = state.classes[k]
                per_remote[c.remote_id] = per_remote.get(c.remote_id, 0) + len(c.members)
            sized = self.sized[large] = (
                sorted_groups(state.classes, large),
                max(per_remote.values(), default=0),
            )
        groups, most = sized
        ever_fits = most >= (job.nodes if job.nodes > 0 else 1)
        # Offers matter only to a job that names a flavor or that no existing node can hold.
        offers = feasible_offers(job, self.flavors) if self.flavors and (job.flavor or not ever_fits) else ()
        elastic = bool(offers) and (job.flavor is not None or not ever_fits)
        problem = None if ever_fits or offers else self._unsatisfiable(job, matching, most)
        return _Shape(groups if ever_fits else (), ever_fits, offers, elastic, problem)

    def _unsatisfiable(self, job: PendingJob, matching: tuple[NodeClass, ...], large: int) -> str:
        offers_note = "; no elastic flavor on offer holds it either" if self.flavors else ""
        if not matching:
            what = "remote, labels and flavor" if job.flavor is not None else "remote and labels"
            return f"no node matches the job's {what}{offers_note}"
        largest = max(matching, key=lambda c: (c.cpus, c.mem, c.gpus, c.storage, c.id))
        return (
            f"the job asks for {job.nodes} node(s) with {job.cpus} cpus, {job.mem} bytes of memory, "
            f"{job.gpus} gpus and {job.storage} bytes of storage each; at most {large} node(s) of one "
            f"remote are that large (the largest has {largest.cpus} cpus, {largest.mem} bytes, "
            f"{largest.gpus} gpus, {largest.storage} bytes of storage){offers_note}"
        )


def _may_use(
    cls: NodeClass, job: PendingJob, labels: frozenset[tuple[str, str]], aliases: frozenset[str]
) -> bool:
    """Whether a job may run on nodes of this class at all (size aside).

    Nodes of an elastic partition owned by an account serve only that account's jobs; a job that names
    a flavor runs only on nodes of that flavor."""
    if job.remote_id is not None and cls.remote_id != job.remote_id:
        return False
    if not labels <= cls.labels:
        return False
    if cls.account is not None and cls.account != job.account:
        return False
    if job.flavor is not None:
        return cls.flavor is not None and cls.flavor in aliases
    return True
