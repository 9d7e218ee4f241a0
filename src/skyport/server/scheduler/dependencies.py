"""Job dependencies (``#SWM depends``): whether a job may start, must wait, or can never start.

``after_ok`` needs the other job to have completed successfully: a dependency that failed or was
canceled can no longer be met, so the dependent job is rejected (it fails with that reason) instead of
waiting forever. ``after_any`` is met by any end. A dependency the snapshot does not know does not
exist: that job can never end, so the dependent one is rejected too. Dependencies may be on jobs in
any state, finished ones included: only their state matters here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from skyport.server.scheduler.snapshot import PendingJob

TERMINAL_STATES = frozenset({"completed", "failed", "canceled"})
Verdict = Literal["ok", "wait", "reject"]


def dependency_verdict(job: PendingJob, states: Mapping[str, str]) -> tuple[Verdict, str]:
    """("ok", ""), ("wait", why) or ("reject", why) for the job's dependencies."""
    to_complete: list[str] = []
    to_end: list[str] = []
    for dep in job.after_ok:
        state = states.get(dep)
        if state is None:
            return "reject", f"it depends on job {dep}, which does not exist"
        if state == "completed":
            continue
        if state in TERMINAL_STATES:
            return "reject", f"it depends on job {dep} completing successfully, but that job is {state}"
        to_complete.append(dep)
    for dep in job.after_any:
        state = states.get(dep)
        if state is None:
            return "reject", f"it depends on job {dep}, which does not exist"
        if state not in TERMINAL_STATES:
            to_end.append(dep)
    if not to_complete and not to_end:
        return "ok", ""
    parts = []
    if to_complete:
        parts.append(f"{', '.join(to_complete)} to complete")
    if to_end:
        parts.append(f"{', '.join(to_end)} to end")
    return "wait", f"Waiting for job(s) {' and '.join(parts)}"
