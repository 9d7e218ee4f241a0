"""Pure planning: ``plan(snapshot, now) -> Plan``. No I/O here; the scheduler loop feeds and records it."""

from skyport.server.scheduler.fcfs import plan
from skyport.server.scheduler.snapshot import (
    NodeCapacity,
    PendingJob,
    Placement,
    Plan,
    Rejection,
    Snapshot,
    Wait,
)

__all__ = ["NodeCapacity", "PendingJob", "Placement", "Plan", "Rejection", "Snapshot", "Wait", "plan"]
