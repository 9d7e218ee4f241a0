"""Free capacity per node, now and over time, in a form that makes a scheduling pass cheap.

Why this shape:

- **Node classes.** Clusters have thousands of nodes but few node types. Nodes with the same remote,
  labels, flavor, owning account and capacity form a class; whether a job may *ever* use a node
  (remote, labels, elastic ownership, size) is decided once per class and cached per job shape, never
  per node.
- **Buckets by free cpus.** Within a class, nodes are kept in buckets keyed by their free cpus, each
  bucket sorted by node index, with the non-empty keys sorted (:class:`FreeIndex`). A fit check looks
  only at buckets with enough cpus, smallest first (best fit on cpus, so large holes stay for large
  jobs), and takes the lowest node index that also has the memory, GPUs and storage. Full nodes cost
  nothing, and per-bucket bounds on the other dimensions let a job that fits nowhere fail without
  looking at nodes at all: the long tail of a pass over a full machine, with thousands of distinct job
  sizes, costs O(1) per job.
- **A release timeline.** Every running job releases its resources at ``start + walltime`` (the
  policy's default walltime if it gave none). Releases are kept as one sorted list of events; the
  earliest start of a blocked job (its reservation) is a sweep over that list, stopping as soon as
  enough nodes fit. Capacity the snapshot reports as used but no running job accounts for never comes
  back in the timeline: nobody knows when it ends, so nothing is promised on it.
- **Exclusive jobs** hold their node whole: its free capacity is below zero while one runs (see
  ``HELD``), and every release on it waits for the last exclusive job to end.

A pass changes free capacity as it places jobs. :class:`ClusterState` can log the first change to each
node and roll it back, so the incremental :class:`~skyport.server.scheduler.planner.Planner` keeps one
state between passes; every order inside is by node index (nodes sorted by id) and by sorted events, so a
state updated by deltas makes the same choices as one built from scratch and both give the same plans.
Node and job ids are taken to be unique (they are the store's primary keys).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter, itemgetter

from skyport.server.scheduler.snapshot import NodeCapacity, RunningJob

#: Free capacity of a node an exclusive job holds: below zero, so that not even a job asking for
#: nothing fits; the release that ends the hold gives the 1 back with the rest.
HELD = (-1, -1, -1, -1)

_running_fields = attrgetter(
    "id", "start_time", "walltime", "node_ids", "cpus", "mem", "gpus", "storage", "exclusive", "array_id"
)

#: A release of resources on one node: (time, node index, cpus, mem, gpus, storage, jobs ending).
Event = tuple[float, int, int, int, int, int, int]


@dataclass(frozen=True)
class NodeClass:
    """Nodes that are interchangeable for placement: same remote, labels, flavor, owner, capacity."""

    id: int
    remote_id: str
    labels: frozenset[tuple[str, str]]
    flavor: str | None
    account: str | None
    cpus: int
    mem: int
    gpus: int
    storage: int
    members: tuple[int, ...]


#: What makes nodes interchangeable; sorts smallest first (GPUs, cpus, memory, storage), then by name.
_ClassKey = tuple[int, int, int, int, str, tuple[tuple[str, str], ...], str, bool, str, bool]

#: Per remote, the classes a job may use, in placement preference (smallest nodes first).
Groups = tuple[tuple[str, tuple[int, ...]], ...]


def running_end(job: RunningJob, default_walltime: int) -> float:
    """When a running job is expected to release its nodes (epoch seconds)."""
    walltime = job.walltime if job.walltime is not None else default_walltime
    return job.start_time.timestamp() + walltime


class ClusterState:
    """Free capacity of every node now, and the timeline of its releases (see the module docstring)."""

    def __init__(
        self, nodes: Iterable[NodeCapacity], running: Iterable[RunningJob], default_walltime: int
    ) -> None:
        unique: dict[str, NodeCapacity] = {}
        for n in sorted(nodes, key=lambda n: n.id):
            unique.setdefault(n.id, n)
        self.nodes: list[NodeCapacity] = list(unique.values())
        self.default_walltime = default_walltime
        self.node_ids: list[str] = [n.id for n in self.nodes]
        self.index: dict[str, int] = {n.id: i for i, n in enumerate(self.nodes)}
        self.cap: list[list[int]] = [[n.cpus, n.mem, n.gpus, n.storage] for n in self.nodes]
        #: ``free_*`` as the snapshot reports it (what no running job holds), kept up to date by deltas.
        self.reported: list[list[int]] = [
            [n.free_cpus, n.free_mem, n.free_gpus, n.free_storage] for n in self.nodes
        ]
        self._build_classes()
        count = len(self.nodes)
        self.running: dict[str, RunningJob] = {}
        #: Expected end of every running job (epoch seconds), built with ``_on_node``.
        self.ends: dict[str, float] = {}
        self.array_running: dict[str, int] = {}
        #: What a job can use now (``HELD`` on a node an exclusive job holds).
        self.free: list[list[int]] = [list(r) for r in self.reported]
        #: Jobs on the node now (running ones, plus the ones this pass placed).
        self.jobs_on: list[int] = [0] * count
        self.node_events: list[list[Event]] = [[] for _ in range(count)]
        #: Running jobs per node, built on the first delta (a one-off pass does not need it).
        self._on_node: list[dict[str, RunningJob]] | None = None
        self._load(running)
        # Built node by node (each node's events sorted), then sorted stably by time alone: the same
        # order as sorting whole tuples, at the price of comparing floats only.
        self.events: list[Event] = [e for evs in self.node_events for e in evs]
        self.events.sort(key=itemgetter(0))
        #: Per node class, its nodes by free cpus.
        self.free_index: list[FreeIndex] = [FreeIndex(cls.members, self.free) for cls in self.classes]
        #: Releases of the jobs this pass placed; not part of the sorted ``events``.
        self.pass_events: list[Event] = []
        self._undo: dict[int, tuple[list[int], int]] | None = None

    # --- construction -------------------------------------------------------------------------

    def _build_classes(self) -> None:
        members: dict[_ClassKey, list[int]] = {}
        labels: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = {}
        for i, n in enumerate(self.nodes):
            normal = labels.get(n.labels)
            if normal is None:
                normal = labels[n.labels] = tuple(sorted(set(n.labels)))
            key: _ClassKey = (
                n.gpus,
                n.cpus,
                n.mem,
                n.storage,
                n.remote_id,
                normal,
                n.flavor or "",
                n.flavor is not None,
                n.account or "",
                n.account is not None,
            )
            members.setdefault(key, []).append(i)
        self.classes: list[NodeClass] = []
        self.class_of: list[int] = [0] * len(self.nodes)
        # Smallest nodes first (GPU nodes last), so that small jobs leave the big ones to big jobs.
        for cid, key in enumerate(sorted(members)):
            idxs = members[key]
            first = self.nodes[idxs[0]]
            self.classes.append(
                NodeClass(
                    id=cid,
                    remote_id=first.remote_id,
                    labels=frozenset(first.labels),
                    flavor=first.flavor,
                    account=first.account,
                    cpus=first.cpus,
                    mem=first.mem,
                    gpus=first.gpus,
                    storage=first.storage,
                    members=tuple(idxs),
                )
            )
            for i in idxs:
                self.class_of[i] = cid
        self.accounts_with_nodes: frozenset[str] = frozenset(
            c.account for c in self.classes if c.account is not None
        )

    def _load(self, running: Iterable[RunningJob]) -> None:
        """What :meth:`_derive` computes for every node, in one sweep over the running jobs."""
        index, by_id, events, arrays = self.index, self.running, self.node_events, self.array_running
        wall = self.default_walltime
        held: dict[int, float] = {}  # node -> when its last exclusive job ends
        for job in running:
            job_id, start, walltime, node_ids, c, m, g, s, exclusive, array_id = _running_fields(job)
            if job_id in by_id:
                continue
            by_id[job_id] = job
            end = start.timestamp() + (walltime if walltime is not None else wall)
            if array_id is not None:
                arrays[array_id] = arrays.get(array_id, 0) + 1
            if len(node_ids) > 1 and len(set(node_ids)) < len(node_ids):
                node_ids = tuple(dict.fromkeys(node_ids))
            for node_id in node_ids:
                i = index.get(node_id)
                if i is None:
                    continue
                events[i].append((end, i, c, m, g, s, 1))
                if exclusive and held.get(i, end) <= end:
                    held[i] = end
        jobs_on = self.jobs_on
        for i, evs in enumerate(events):
            if not evs:
                continue
            jobs_on[i] = len(evs)
            if i in held:
                until = held[i]
                evs[:] = [(max(t, until), n, c, m, g, s, k) for t, n, c, m, g, s, k in evs]
                c, m, g, s = self.reported[i]
                evs.append((until, i, c + 1, m + 1, g + 1, s + 1, 0))
                self.free[i] = list(HELD)
            if len(evs) > 1:
                evs.sort()

    def _jobs_by_node(self) -> list[dict[str, RunningJob]]:
        if self._on_node is None:
            on_node: list[dict[str, RunningJob]] = [{} for _ in self.nodes]
            for job in self.running.values():
                self._index_job(job, on_node)
                self.ends[job.id] = running_end(job, self.default_walltime)
            self._on_node = on_node
        return self._on_node

    def _index_job(self, job: RunningJob, on_node: list[dict[str, RunningJob]]) -> None:
        for node_id in job.node_ids:
            i = self.index.get(node_id)
            if i is not None:
                on_node[i][job.id] = job

    def _attach(self, job: RunningJob) -> bool:
        job_id = job.id
        if job_id in self.running:
            return False
        on_node = self._jobs_by_node()
        self.running[job_id] = job
        self.ends[job_id] = running_end(job, self.default_walltime)
        if job.array_id is not None:
            self.array_running[job.array_id] = self.array_running.get(job.array_id, 0) + 1
        self._index_job(job, on_node)
        return True

    def _derive(self, i: int) -> None:
        """Free capacity now, job count and release events of node ``i`` from its running jobs."""
        reported = self.reported[i]
        jobs = self._jobs_by_node()[i]
        ends = self.ends
        held_until: float | None = None
        for job in jobs.values():
            if job.exclusive:
                end = ends[job.id]
                held_until = end if held_until is None else max(held_until, end)
        events: list[Event]
        if held_until is None:
            self.free[i] = list(reported)
            events = [(ends[j.id], i, j.cpus, j.mem, j.gpus, j.storage, 1) for j in jobs.values()]
        else:
            self.free[i] = list(HELD)
            events = [
                (max(ends[j.id], held_until), i, j.cpus, j.mem, j.gpus, j.storage, 1) for j in jobs.values()
            ]
            c, m, g, s = reported
            events.append((held_until, i, c + 1, m + 1, g + 1, s + 1, 0))
        events.sort()
        self.jobs_on[i] = len(jobs)
        self.node_events[i] = events

    # --- deltas (the Planner) -----------------------------------------------------------------

    def _refresh(self, i: int) -> None:
        """Re-derive node ``i`` after its running jobs changed, keeping buckets and events sorted."""
        old = self.free[i]
        for e in self.node_events[i]:
            del self.events[bisect_left(self.events, e)]
        self._derive(i)
        for e in self.node_events[i]:
            insort(self.events, e)
        self.free_index[self.class_of[i]].move(i, old, self.free[i])

    def start(self, job: RunningJob) -> None:
        """A job now holds resources on its nodes (their reported free capacity shrinks)."""
        if not self._attach(job):
            return
        for i in self._nodes_of(job):
            r = self.reported[i]
            r[0] -= job.cpus
            r[1] -= job.mem
            r[2] -= job.gpus
            r[3] -= job.storage
            self._refresh(i)

    def end(self, job_id: str) -> RunningJob | None:
        """A running job released its nodes."""
        if job_id not in self.running:
            return None
        on_node = self._jobs_by_node()
        job = self.running.pop(job_id)
        self.ends.pop(job_id, None)
        if job.array_id is not None:
            left = self.array_running.get(job.array_id, 0) - 1
            if left > 0:
                self.array_running[job.array_id] = left
            else:
                self.array_running.pop(job.array_id, None)
        for i in self._nodes_of(job):
            del on_node[i][job.id]
            r = self.reported[i]
            r[0] += job.cpus
            r[1] += job.mem
            r[2] += job.gpus
            r[3] += job.storage
            self._refresh(i)
        return job

    def _nodes_of(self, job: RunningJob) -> list[int]:
        idxs = {self.index[n] for n in job.node_ids if n in self.index}
        return sorted(idxs)

    # --- a pass -------------------------------------------------------------------------------

    def begin_pass(self, undo: bool) -> None:
        """Start a pass; with ``undo`` every change it makes can be rolled back by :meth:`end_pass`."""
        self.pass_events = []
        self._undo = {} if undo else None

    def end_pass(self) -> None:
        """Roll back what the pass placed (only if it began with ``undo``)."""
        if self._undo is not None:
            for i, (free, jobs_on) in self._undo.items():
                self.free_index[self.class_of[i]].move(i, self.free[i], free)
                self.free[i] = free
                self.jobs_on[i] = jobs_on
        self._undo = None
        self.pass_events = []

    def take(self, i: int, cpus: int, mem: int, gpus: int, storage: int, exclusive: bool, end: float) -> None:
        """Place one node's share of a job on node ``i`` until ``end``."""
        f = self.free[i]
        if self._undo is not None and i not in self._undo:
            self._undo[i] = (list(f), self.jobs_on[i])
        if exclusive:
            c, m, g, s = (x + 1 for x in self.cap[i])
            new = list(HELD)
        else:
            c, m, g, s = cpus, mem, gpus, storage
            new = [f[0] - cpus, f[1] - mem, f[2] - gpus, f[3] - storage]
        self.free[i] = new
        self.free_index[self.class_of[i]].move(i, f, new)
        self.jobs_on[i] += 1
        self.pass_events.append((end, i, c, m, g, s, 1))

    def find(
        self,
        groups: Groups,
        cpus: int,
        mem: int,
        gpus: int,
        storage: int,
        count: int,
        exclusive: bool,
        closed: frozenset[int] = frozenset(),
        limits: dict[int, list[int] | None] | None = None,
    ) -> list[int] | None:
        """``count`` nodes of one remote where the job fits now, or None.

        ``closed`` classes are skipped; on a node in ``limits`` the job must also fit the capacity
        given there (None: not at all). Both come from a reservation the job must not delay."""
        free, jobs_on, cap = self.free, self.jobs_on, self.cap
        for _remote, class_ids in groups:
            chosen: list[int] = []
            for k in class_ids:
                if k in closed:
                    continue
                index = self.free_index[k]
                keys = index.keys
                if exclusive:  # only nodes with every cpu free
                    whole = self.classes[k].cpus
                    first = bisect_left(keys, whole)
                    if first == len(keys) or keys[first] != whole:
                        continue
                    stop = first + 1
                else:
                    first = bisect_left(keys, cpus)
                    stop = len(keys)
                    if first == stop:
                        continue
                suffix = index.suffix
                top = suffix[first] if suffix is not None else index.top(first)
                if top[0] < mem or top[1] < gpus or top[2] < storage:
                    continue  # no bucket with enough cpus has a node with enough of the rest
                bounds, buckets = index.bounds, index.buckets
                for x in range(first, stop):
                    key = keys[x]
                    b = bounds[key]
                    if b[0] < mem or b[1] < gpus or b[2] < storage:
                        continue
                    before = len(chosen)
                    for i in buckets[key]:
                        f = free[i]
                        if f[1] < mem or f[2] < gpus or f[3] < storage:
                            continue
                        if exclusive and (jobs_on[i] or f != cap[i]):
                            continue
                        if limits is not None and i in limits:
                            lim = limits[i]
                            if (
                                lim is None
                                or exclusive
                                or lim[0] < cpus
                                or lim[1] < mem
                                or lim[2] < gpus
                                or lim[3] < storage
                            ):
                                continue
                        chosen.append(i)
                        if len(chosen) == count:
                            return chosen
                    if len(chosen) == before:
                        index.tighten(key, free)  # none fitted: learn the bucket's true bounds
        return None

    def fitting_now(
        self, groups: Groups, cpus: int, mem: int, gpus: int, storage: int, exclusive: bool
    ) -> dict[str, list[int]]:
        """Every node, per remote, where a job of this size fits now (for multi-node reservations)."""
        out: dict[str, list[int]] = {}
        for remote, class_ids in groups:
            for k in class_ids:
                index = self.free_index[k]
                for key in index.keys[bisect_left(index.keys, cpus) :]:
                    for i in index.buckets[key]:
                        f = self.free[i]
                        if f[1] < mem or f[2] < gpus or f[3] < storage:
                            continue
                        if exclusive and (self.jobs_on[i] or f != self.cap[i]):
                            continue
                        out.setdefault(remote, []).append(i)
        return out


class FreeIndex:
    """The nodes of one class by free cpus, with bounds that let a fit check skip whole buckets.

    ``buckets`` maps free cpus to the nodes with that many free (sorted by node index), ``keys`` are the
    non-empty bucket keys, sorted. ``bounds[key]`` holds, for free memory, GPUs and storage, the largest
    value in the bucket and how many of its nodes have it; a node leaving or shrinking only lowers a
    count, and when a count reaches zero the bucket is *loose*: its bound is still an upper bound but
    maybe not the maximum, until a fit check that found nothing in it recomputes it (``tighten``).
    ``top(j)`` is the maximum of the bounds of ``keys[j:]`` (every bucket with at least that many
    cpus): a job asking for more of anything fails the whole class at once. It is recomputed lazily
    after changes and stays valid in the long tail of a pass where nothing more starts. Bounds only
    ever skip buckets without a fitting node: they change how fast a pass is, never what it decides."""

    __slots__ = ("bounds", "buckets", "keys", "loose", "suffix")

    def __init__(self, members: Iterable[int], free: list[list[int]]) -> None:
        self.buckets: dict[int, list[int]] = {}
        for i in members:  # ascending, so every bucket starts sorted
            self.buckets.setdefault(free[i][0], []).append(i)
        self.keys: list[int] = sorted(self.buckets)
        #: Per bucket: [max mem, max gpus, max storage, how many have each of the three].
        self.bounds: dict[int, list[int]] = {key: _maxima(b, free) for key, b in self.buckets.items()}
        self.loose: set[int] = set()
        #: ``top`` for every position in ``keys``, or None until recomputed.
        self.suffix: list[tuple[int, int, int]] | None = None

    def move(self, i: int, old: list[int], new: list[int]) -> None:
        """Node ``i``'s free capacity went from ``old`` to ``new``."""
        if old[0] == new[0]:
            self._leave(old[0], old)
            self._join(new[0], new)
            return
        bucket = self.buckets[old[0]]
        del bucket[bisect_left(bucket, i)]
        if bucket:
            self._leave(old[0], old)
        else:
            del self.buckets[old[0]], self.bounds[old[0]]
            del self.keys[bisect_left(self.keys, old[0])]
            self.loose.discard(old[0])
            self.suffix = None
        target = self.buckets.get(new[0])
        if target is None:
            self.buckets[new[0]] = [i]
            self.bounds[new[0]] = [new[1], new[2], new[3], 1, 1, 1]
            insort(self.keys, new[0])
            self.suffix = None
        else:
            insort(target, i)
            self._join(new[0], new)

    def _leave(self, key: int, f: list[int]) -> None:
        b = self.bounds[key]
        if f[1] == b[0]:
            b[3] -= 1
            if b[3] <= 0:
                self.loose.add(key)
        if f[2] == b[1]:
            b[4] -= 1
            if b[4] <= 0:
                self.loose.add(key)
        if f[3] == b[2]:
            b[5] -= 1
            if b[5] <= 0:
                self.loose.add(key)

    def _join(self, key: int, f: list[int]) -> None:
        b = self.bounds[key]
        m, g, s = f[1], f[2], f[3]
        if m > b[0]:
            b[0], b[3] = m, 1
            self.suffix = None
        elif m == b[0]:
            b[3] += 1
        if g > b[1]:
            b[1], b[4] = g, 1
            self.suffix = None
        elif g == b[1]:
            b[4] += 1
        if s > b[2]:
            b[2], b[5] = s, 1
            self.suffix = None
        elif s == b[2]:
            b[5] += 1

    def tighten(self, key: int, free: list[list[int]]) -> None:
        """Make a loose bucket's bounds exact again."""
        if key not in self.loose:
            return
        self.loose.discard(key)
        exact = _maxima(self.buckets[key], free)
        if exact[:3] != self.bounds[key][:3]:
            self.suffix = None
        self.bounds[key] = exact

    def top(self, j: int) -> tuple[int, int, int]:
        """Bounds over the buckets ``keys[j:]``."""
        suffix = self.suffix
        if suffix is None:
            m = g = s = -(1 << 62)
            out: list[tuple[int, int, int]] = []
            bounds = self.bounds
            for key in reversed(self.keys):
                b = bounds[key]
                if b[0] > m:
                    m = b[0]
                if b[1] > g:
                    g = b[1]
                if b[2] > s:
                    s = b[2]
                out.append((m, g, s))
            out.reverse()
            self.suffix = suffix = out
        return suffix[j]


def _maxima(nodes: list[int], free: list[list[int]]) -> list[int]:
    """[max mem, max gpus, max storage, and how many nodes have each] over ``nodes``."""
    out = [-(1 << 62)] * 3 + [0] * 3
    for i in nodes:
        f = free[i]
        for d in range(3):
            v = f[d + 1]
            if v > out[d]:
                out[d], out[d + 3] = v, 1
            elif v == out[d]:
                out[d + 3] += 1
    return out


def sorted_groups(classes: Sequence[NodeClass], ids: Iterable[int]) -> Groups:
    """Group class ids by remote (remotes sorted), keeping class order inside each remote."""
    per_remote: dict[str, list[int]] = {}
    for k in sorted(ids):
        per_remote.setdefault(classes[k].remote_id, []).append(k)
    return tuple((r, tuple(per_remote[r])) for r in sorted(per_remote))
