"""How an ended attempt is recorded: the final state, reason and text, from what the gate saw.

Pure, so that the normal path and recovery after a restart (a job found in ``staging_out``) decide the
same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from skyport.gates.base import Exit
from skyport.models import JobState
from skyport.server.store.jobs import requeue_values


@dataclass(frozen=True)
class Outcome:
    state: JobState
    reason: str
    message: str
    values: dict[str, Any]


@dataclass(frozen=True)
class EndFlags:
    cancel_requested: bool
    requeue_requested: bool
    canceled_by: str | None
    walltime_exceeded: bool
    walltime: int | None
    attempt: int


def decide(exit: Exit, flags: EndFlags) -> Outcome:
    recorded = {"exit_code": exit.exit_code, "signal": exit.signal}
    if flags.requeue_requested:
        return Outcome(
            JobState.QUEUED,
            "requeued",
            f"Requeued by {flags.canceled_by or 'an administrator'}: attempt {flags.attempt + 1} is waiting "
            "to be scheduled",
            requeue_values(flags.attempt),
        )
    if flags.cancel_requested:
        return Outcome(
            JobState.CANCELED, "canceled", f"Canceled by {flags.canceled_by or 'an administrator'}", recorded
        )
    if exit.reason == "preempted":  # spot capacity taken back: not the job's fault, it runs again
        return Outcome(
            JobState.QUEUED,
            "preempted",
            f"Preempted: {exit.message}; attempt {flags.attempt + 1} is waiting to be scheduled",
            requeue_values(flags.attempt),
        )
    if flags.walltime_exceeded:
        return Outcome(
            JobState.FAILED,
            "walltime",
            f"Killed: ran past its walltime of {format_duration(flags.walltime or 0)}",
            recorded,
        )
    if exit.reason in ("lost", "node_lost"):  # the process, or its whole node, is gone: a system error
        return Outcome(JobState.FAILED, exit.reason, exit.message, recorded)
    if exit.signal is not None:
        return Outcome(JobState.FAILED, "signal", f"Failed: {exit.message}", recorded)
    if exit.exit_code == 0:
        return Outcome(JobState.COMPLETED, "exit_code", "Completed (exit code 0)", recorded)
    return Outcome(JobState.FAILED, "exit_code", f"Failed: exited with code {exit.exit_code}", recorded)


def format_duration(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{text}" if days else text
