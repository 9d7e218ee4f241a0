"""Pure planning: ``plan(snapshot, now) -> Plan``. No I/O here; the scheduler loop feeds and records it."""

from skyport.server.scheduler.fcfs import plan
from skyport.server.scheduler.snapshot import (
    AccountState,
    FlavorOffer,
    NodeCapacity,
    PendingJob,
    Placement,
    Plan,
    Policy,
    Provision,
    Rejection,
    RunningJob,
    Snapshot,
    Wait,
)

__all__ = [
    "AccountState",
    "FlavorOffer",
    "NodeCapacity",
    "PendingJob",
    "Placement",
    "Plan",
    "Policy",
    "Provision",
    "Rejection",
    "RunningJob",
    "Snapshot",
    "Wait",
    "plan",
]
