"""Pure planning: ``plan(snapshot, now) -> Plan``. No I/O here; the scheduler loop feeds and records it.

``plan`` dispatches on ``snapshot.policy.algorithm`` (``backfill`` by default, ``fcfs``, ``fairshare``;
see :mod:`.algorithms`). :class:`Planner` keeps the cluster state between passes for incremental passes
over the head of the queue and agrees exactly with ``plan`` (see :mod:`.planner`).
"""

from skyport.server.scheduler.algorithms import ALGORITHMS, plan
from skyport.server.scheduler.planner import Planner
from skyport.server.scheduler.priority import fairshare_factors, job_priority
from skyport.server.scheduler.snapshot import (
    AccountState,
    FlavorOffer,
    Forward,
    NodeCapacity,
    PendingJob,
    Placement,
    Plan,
    Policy,
    Provision,
    Rejection,
    RunningJob,
    SelfScheduling,
    Snapshot,
    Wait,
)

__all__ = [
    "ALGORITHMS",
    "AccountState",
    "FlavorOffer",
    "Forward",
    "NodeCapacity",
    "PendingJob",
    "Placement",
    "Plan",
    "Planner",
    "Policy",
    "Provision",
    "Rejection",
    "RunningJob",
    "SelfScheduling",
    "Snapshot",
    "Wait",
    "fairshare_factors",
    "job_priority",
    "plan",
]
