"""The scheduler simulator: replay a workload (synthetic or SWF) through ``plan()`` on a virtual clock.

``workload`` makes the jobs, ``engine`` replays them, ``report`` turns the result into metrics, a table,
JSON and a plot; ``skyport simulate`` (``skyport.cli.simulate``) puts the three together.
"""

from skyport.sim.engine import EPOCH, JobRecord, PlanError, SimEvent, SimResult, simulate
from skyport.sim.report import Metrics, metrics, plot, table
from skyport.sim.workload import (
    AccountSpec,
    JobClass,
    Machine,
    SimJob,
    SwfError,
    SwfRecord,
    SwfTrace,
    SyntheticSpec,
    Workload,
    parse_swf,
    read_swf,
    swf_machine,
    swf_workload,
    synthetic,
)

__all__ = [
    "EPOCH",
    "AccountSpec",
    "JobClass",
    "JobRecord",
    "Machine",
    "Metrics",
    "PlanError",
    "SimEvent",
    "SimJob",
    "SimResult",
    "SwfError",
    "SwfRecord",
    "SwfTrace",
    "SyntheticSpec",
    "Workload",
    "metrics",
    "parse_swf",
    "plot",
    "read_swf",
    "simulate",
    "swf_machine",
    "swf_workload",
    "synthetic",
    "table",
]
