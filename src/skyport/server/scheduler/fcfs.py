"""First come, first served: the scheduler of the core's first release, now one of three algorithms.

Jobs are taken in priority order (the computed priority of :mod:`.priority`, then submission). When the
job at the head cannot start now, nothing behind it starts either (``Priority``), so a large job is
never starved by a stream of small ones, at the price of idle capacity that ``backfill`` would use.
Jobs that wait for something else (dependencies, an array throttle, a budget, a provisioning limit) do
not hold the queue up. A job no node could ever hold is rejected with a reason instead of waiting.

The pass itself is shared with the other algorithms (:mod:`.algorithms`); this module keeps the name.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from skyport.server.scheduler import algorithms
from skyport.server.scheduler.snapshot import Plan, Snapshot


def plan(snapshot: Snapshot, now: datetime) -> Plan:
    """The plan of ``snapshot`` under ``fcfs``, whatever algorithm its policy names."""
    return algorithms.plan(replace(snapshot, policy=replace(snapshot.policy, algorithm="fcfs")), now)
