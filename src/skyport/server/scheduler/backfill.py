"""EASY backfill: one reservation for the highest-priority job that cannot start, holes for the rest.

When the head job does not fit now, :func:`reserve` sweeps the release timeline (running jobs and the
jobs this pass already placed, each ending at start + walltime) until enough nodes of one remote fit
it: that time is the *shadow time* and those nodes are the reservation. A later job may then start now
if it fits now and

- it ends (now + its walltime) no later than the shadow time: whatever it holds is back by then; or
- it is placed within what the reserved nodes will have left over at the shadow time once the head has
  taken its share (on any node outside the reservation it cannot delay the head at all).

That is EASY backfill (Lifka, 1995) with per-node capacity instead of node counts: the head's start can
only move earlier, never later. When no start can be predicted (capacity held by work with no known
end), no job is "short", and every node the head could use is closed to later jobs: the head keeps
its claim, as it would under ``fcfs``.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

from skyport.server.scheduler.resources import ClusterState, Event, Groups


@dataclass
class Reservation:
    """The head job's claim: when it starts and what later jobs must leave to it."""

    job_id: str
    #: Epoch seconds of the expected start, or None when it cannot be predicted.
    shadow: float | None
    node_ids: tuple[str, ...] = ()
    #: Classes no job that outlives the shadow time may use (all the head could use, when no shadow).
    closed: frozenset[int] = frozenset()
    #: Per reserved node, what a job that outlives the shadow time may still take there (None: nothing).
    limits: dict[int, list[int] | None] = field(default_factory=dict)

    def is_short(self, end: float) -> bool:
        """Whether a job ending at ``end`` is back before the reservation starts."""
        return self.shadow is not None and end <= self.shadow


def reserve(
    state: ClusterState,
    job_id: str,
    groups: Groups,
    need: tuple[int, int, int, int],
    count: int,
    exclusive: bool,
    now_ts: float,
) -> Reservation:
    """The earliest time ``count`` nodes of one remote fit a job of size ``need``, and which nodes."""
    cpus, mem, gpus, storage = need
    remote_of = {k: remote for remote, ks in groups for k in ks}
    fitted: dict[str, list[int]] = state.fitting_now(groups, cpus, mem, gpus, storage, exclusive)
    fitted_set = {i for idxs in fitted.values() for i in idxs}
    temp: dict[int, list[int]] = {}
    shadow: float | None = None
    winner: str | None = None
    for remote in sorted(fitted):
        if len(fitted[remote]) >= count:
            shadow, winner = now_ts, remote
            break
    if winner is None:
        free, jobs_on, cap, class_of = state.free, state.jobs_on, state.cap, state.class_of
        events: Iterable[Event] = (
            heapq.merge(state.events, sorted(state.pass_events)) if state.pass_events else state.events
        )
        for ev in events:
            i = ev[1]
            node_remote = remote_of.get(class_of[i])
            if node_remote is None:
                continue
            t = temp.get(i)
            if t is None:
                f = free[i]
                t = temp[i] = [f[0], f[1], f[2], f[3], jobs_on[i]]
            t[0] += ev[2]
            t[1] += ev[3]
            t[2] += ev[4]
            t[3] += ev[5]
            t[4] -= ev[6]
            if i in fitted_set:
                continue
            if exclusive:
                c = cap[i]
                fits = t[4] <= 0 and t[0] == c[0] and t[1] == c[1] and t[2] == c[2] and t[3] == c[3]
            else:
                fits = t[0] >= cpus and t[1] >= mem and t[2] >= gpus and t[3] >= storage
            if fits:
                fitted_set.add(i)
                chosen = fitted.setdefault(node_remote, [])
                chosen.append(i)
                if len(chosen) >= count:
                    shadow, winner = max(ev[0], now_ts), node_remote
                    break
    if winner is None or shadow is None:
        return Reservation(job_id, None, closed=frozenset(remote_of))
    reserved = fitted[winner][:count]
    limits: dict[int, list[int] | None] = {}
    for i in reserved:
        if exclusive:
            limits[i] = None
            continue
        at = temp.get(i) or state.free[i]
        limits[i] = [at[0] - cpus, at[1] - mem, at[2] - gpus, at[3] - storage]
    return Reservation(
        job_id,
        shadow,
        node_ids=tuple(state.nodes[i].id for i in reserved),
        limits=limits,
    )
