"""Pydantic models shared by the core, the client library and the command line.

Nothing here imports from :mod:`skyport.server`: the client side must be installable and importable
without the server's dependencies doing anything.
"""

from skyport.models.infra import Flavor, Image, Node, Remote, Resource
from skyport.models.job import (
    TERMINAL_STATES,
    ArrayJob,
    Event,
    InputSpec,
    Job,
    JobSpec,
    JobState,
    OutputSpec,
    Page,
    PortSpec,
)
from skyport.models.user import Account, AccountCost, Costs, JobCost, User

__all__ = [
    "TERMINAL_STATES",
    "Account",
    "AccountCost",
    "ArrayJob",
    "Costs",
    "Event",
    "Flavor",
    "Image",
    "InputSpec",
    "Job",
    "JobCost",
    "JobSpec",
    "JobState",
    "Node",
    "OutputSpec",
    "Page",
    "PortSpec",
    "Remote",
    "Resource",
    "User",
]
