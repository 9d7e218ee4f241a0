"""The gate protocol, executor face (DESIGN §4): what the core's loops ask of a gate that runs work.

A gate never touches the store. The loops call it and record what it did; everything a gate needs to
find its work again after a restart of the core is in the ``handle`` it returns (stored as JSON).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from skyport.models import JobSpec, Node

Handle = dict[str, Any]


@dataclass(frozen=True)
class JobLaunch:
    """Everything a gate needs to run one attempt of a job."""

    job_id: str
    attempt: int
    name: str
    owner: str  # the Sky Port user name
    spec: JobSpec
    node_names: list[str]
    inputs_dir: Path  # files uploaded with the submission, kept by the core
    outputs_dir: Path  # where the gate puts the job's output files after the end
    attempt_dir: Path  # the gate's private directory for this attempt (control files)
    env: dict[str, str] = field(default_factory=dict)  # SKYPORT_* and the spec's env, built by the core


@dataclass(frozen=True)
class Exit:
    """How an attempt ended, as the gate observed it."""

    exit_code: int | None
    signal: int | None
    reason: str  # "exit_code" | "signal" | "lost" | ...
    message: str


@dataclass(frozen=True)
class Recovered:
    """What a gate found for an attempt after a restart of the core."""

    handle: Handle | None  # still running: watch it again
    exit: Exit | None  # ended while the core was away
    # both None: it never started; the core may launch it


class GateError(Exception):
    """A gate call failed; the message is shown to the job's owner, so it says what to do."""


ExitCallback = Callable[[str, Exit], None]


class ExecutorGate(Protocol):
    kind: str

    def nodes(self, remote_id: str, partition_id: str) -> list[Node]:
        """The nodes this gate offers (static capacity)."""

    async def stage_in(self, job: JobLaunch) -> None:
        """Put the job's input files in its working directory on the node."""

    async def launch(self, job: JobLaunch) -> Handle:
        """Start the attempt; return what is needed to find it again."""

    def watch(self, job_id: str, handle: Handle, on_exit: ExitCallback) -> None:
        """Call ``on_exit(job_id, exit)`` once, on the loop, when the attempt ends."""

    async def recover(self, job: JobLaunch, handle: Handle | None) -> Recovered:
        """After a restart: is the attempt running, ended, or never started?"""

    async def cancel(self, handle: Handle, grace_s: float) -> None:
        """Stop the attempt: TERM, then KILL after the grace period."""

    async def stage_out(self, job: JobLaunch, handle: Handle) -> list[tuple[str, int, str]]:
        """Bring the job's output files back; return (name, size, sha256) of each."""

    def log_path(self, handle: Handle, stream: str) -> Path | None:
        """Where the core can read the attempt's stdout or stderr, if on this machine."""
