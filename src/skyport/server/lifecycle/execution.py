"""The execution loop: launches placed jobs on their gates, watches them, stops them, finishes them.

Level-triggered over the store: each pass looks at jobs in ``scheduled``/``staging_in`` (to launch) and
at running jobs with a cancel request or an overrun walltime. Exits reported by gates are recorded in
batches. At start-up the loop first recovers: every job the store says is active is found again through
its gate (re-adopted if still running, finished with its real exit status if it ended while the core was
down, launched if it never started), so nothing is left untracked after a crash.
"""

from __future__ import annotations

import asyncio
import functools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Connection

from skyport.gates.base import (
    ExecutorGate,
    Exit,
    GateError,
    Handle,
    JobLaunch,
    Progress,
    Submitted,
    self_scheduling,
)
from skyport.models import JobSpec, JobState
from skyport.server.clock import Clock
from skyport.server.lifecycle.outcome import EndFlags, Outcome, decide
from skyport.server.lifecycle.wakeup import JobNotifier, Wakeup, run_passes
from skyport.server.metrics import Metrics
from skyport.server.spool import Spool
from skyport.server.staging import (
    Stager,
    StagingError,
    StagingStopped,
    input_paths,
    needs_stage_in,
    needs_stage_out,
    output_patterns,
)
from skyport.server.store import jobs as job_store
from skyport.server.store import users as user_store
from skyport.server.store.batch import GroupCommit
from skyport.server.store.engine import Store

log = structlog.get_logger(__name__)

LAUNCHABLE = frozenset({JobState.SCHEDULED, JobState.STAGING_IN})
STARTED = frozenset({JobState.SCHEDULED, JobState.STAGING_IN, JobState.RUNNING})
LAUNCH_BATCH = 1000
#: A launch batch's starts are written in groups of this many as the gate reports them (see
#: ExecutionLoop._launch_batch).
RECORD_STARTS_EVERY = 16


def _apply_and_charge(
    conn: Connection, changes: list[job_store.StateChange], now: datetime, half_life_s: float
) -> list[job_store.StateChange]:
    """Record state changes; charge the CPU time of every attempt that ended to its account (fair share)."""
    ending = [c.job_id for c in changes if c.to_state.terminal or c.to_state is JobState.QUEUED]
    used = job_store.cpu_seconds_used(conn, ending, now) if ending else {}
    applied = job_store.transition(conn, changes, now)
    charges: dict[str, float] = defaultdict(float)
    for change in applied:
        if (change.to_state.terminal or change.to_state is JobState.QUEUED) and change.job_id in used:
            account_id, cpu_seconds = used[change.job_id]
            charges[account_id] += cpu_seconds
    if charges:
        user_store.charge_usage(conn, charges, now, half_life_s)
    return applied


#: One write of the execution loop: state changes, and when they were decided.
_Write = tuple[list[job_store.StateChange], datetime]


def _apply_group(
    conn: Connection, writes: list[_Write], half_life_s: float
) -> list[list[job_store.StateChange]]:
    """Several writes of state changes (changes, when) in one transaction: for each, those applied."""
    now = max(when for _, when in writes)
    changes = [change for group, _ in writes for change in group]
    applied = {id(change) for change in _apply_and_charge(conn, changes, now, half_life_s)}
    return [[change for change in group if id(change) in applied] for group, _ in writes]


@dataclass
class _Tracked:
    """A job attempt this core is watching."""

    launch: JobLaunch
    remote_id: str
    handle: Handle
    walltime: int | None
    deadline: float | None  # monotonic
    recorded: bool = False  # its ``running`` state is committed
    cancel_sent: bool = False
    walltime_exceeded: bool = False
    cancel_requested: bool = False
    requeue_requested: bool = False
    canceled_by: str | None = None
    #: On a self-scheduling gate (Slurm): recorded as submitted (``scheduled``) until it starts there.
    self_scheduled: bool = False
    submitted: str = ""


class ExecutionLoop:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        metrics: Metrics,
        notifier: JobNotifier,
        spool: Spool,
        gates: dict[str, ExecutorGate],
        *,
        cancel_grace_s: float,
        interval_s: float,
        usage_half_life_s: float,
        wakeup: Wakeup,
        on_finished: Callable[[], None],
        stager: Stager,
    ) -> None:
        self.wakeup = wakeup
        self._stager = stager
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._notifier = notifier
        self._spool = spool
        self._gates = gates
        self._grace = cancel_grace_s
        self._half_life = usage_half_life_s
        self._interval = interval_s
        self._on_finished = on_finished
        self._tracked: dict[str, _Tracked] = {}
        self._busy: set[str] = set()  # staging in or out right now
        self._exits: dict[str, Exit] = {}
        self._progress: dict[str, Progress] = {}  # news from self-scheduling gates, recorded in batches
        self._batches_out = 0  # launch batches under way (see _launch_batch)
        self._flags_changed = True  # cancel or requeue requests to look for (see _flags_due)
        self._flags_read_at = float("-inf")
        self._tasks: set[asyncio.Task[None]] = set()
        #: State changes written together when they come together (see _apply).
        self._writes = GroupCommit[_Write, list[job_store.StateChange]](
            store, group_txn=functools.partial(_apply_group, half_life_s=usage_half_life_s)
        )
        #: Set once every active job has been found again after start-up.
        self.recovered = asyncio.Event()

    # -- the loop ------------------------------------------------------------------------------------

    async def run(self) -> None:
        await self.recover()
        self.recovered.set()
        await run_passes(self.pass_once, lambda: self.wakeup.wait(self._next_timeout()), "execution")

    def _next_timeout(self) -> float:
        deadlines = [t.deadline for t in self._tracked.values() if t.deadline and not t.cancel_sent]
        if not deadlines:
            return self._interval
        return max(0.0, min(self._interval, min(deadlines) - self._clock.monotonic()))

    async def pass_once(self) -> None:
        if not self._batches_out:  # else the batch's end rings: see _launch_batch
            await self._launch_placed()
        await self._enforce()
        await self._record_progress()
        await self._record_exits()

    # -- reading jobs --------------------------------------------------------------------------------

    async def _rows(self, states: frozenset[JobState], *, flagged_only: bool = False) -> list[Any]:
        if not flagged_only:  # to launch: not yet handed to a gate, and placed (or to be ended)
            return await self._store.read(
                job_store.rows_to_launch, states, limit=LAUNCH_BATCH, skip=self._in_hand
            )
        return await self._store.read(job_store.rows_with_owner, states, flagged_only=True)

    def _in_hand(self, job_id: str) -> bool:
        """Being launched or staged now, or launched already: not to be read for launching again."""
        return job_id in self._busy or job_id in self._tracked

    def _job_launch(self, row: Any) -> JobLaunch:
        spec = JobSpec.model_validate(row.spec)
        env = {
            **spec.env,
            "SWM_JOB_ID": row.id,
            "SKYPORT_JOB_ID": row.id,
            "SKYPORT_JOB_NAME": spec.name,
            "SKYPORT_NODES": ",".join(row.node_names),
            "SKYPORT_ATTEMPT": str(row.attempt),
        }
        if row.array_index is not None:
            env["SKYPORT_ARRAY_INDEX"] = str(row.array_index)
            env["SKYPORT_ARRAY_ID"] = row.array_id
        return JobLaunch(
            job_id=row.id,
            attempt=row.attempt,
            name=spec.name,
            owner=row.owner_name,
            spec=spec,
            node_names=list(row.node_names),
            inputs_dir=self._spool.inputs(row.array_id or row.id),  # an array's tasks share its inputs
            outputs_dir=self._spool.outputs(row.id),
            attempt_dir=self._spool.attempt(row.id, row.attempt),
            env=env,
            input_paths=input_paths(spec),
            output_patterns=output_patterns(spec),
        )

    def _gate(self, row: Any) -> ExecutorGate:
        gate = self._gates.get(row.remote_id)
        if gate is None:
            raise GateError(f"no gate is configured for remote {row.remote_id}")
        return gate

    # -- launching -----------------------------------------------------------------------------------

    async def _launch_placed(self) -> None:
        # the read skips the rows in hand; on PostgreSQL the read awaits, and more may be in hand after it
        rows = [r for r in await self._rows(LAUNCHABLE) if not self._in_hand(r.id)]
        if not rows:
            return
        started: list[_Tracked] = []
        failures: list[job_store.StateChange] = []
        forwarded: dict[str, list[tuple[Any, JobLaunch]]] = defaultdict(list)
        direct: list[tuple[Any, JobLaunch]] = []
        now = self._clock.now()
        for row in rows:
            if row.cancel_requested or row.requeue_requested:
                failures.append(self._ended_before_start(row, now))
                continue
            if not row.node_ids:
                continue  # waiting for its elastic partition (the provisioning loop assigns nodes)
            launch = self._job_launch(row)
            if needs_stage_in(launch.spec):
                self._busy.add(row.id)
                self._spawn(self._stage_in_then_launch(row, launch))
                continue
            if row.remote_id in self._gates and self_scheduling(self._gates[row.remote_id]):
                forwarded[row.remote_id].append((row, launch))  # submitted together, below
                continue
            gate = self._gates.get(row.remote_id)
            if getattr(gate, "launch_may_wait", False):  # e.g. for a node to reconnect: not inline
                self._busy.add(row.id)
                self._spawn(self._launch_in_background(row, launch))
                continue
            direct.append((row, launch))
        if direct:  # handed over without waiting: see _launch_batch
            self._busy.update(row.id for row, _ in direct)
            self._batches_out += 1
            self._spawn(self._launch_batch(direct, now))
        for remote_id, batch in forwarded.items():
            gate = self_scheduling(self._gates[remote_id])
            assert gate is not None
            submissions = await gate.launch_many([launch for _, launch in batch])
            for (row, launch), submission in zip(batch, submissions, strict=True):
                if isinstance(submission, GateError):
                    failures.append(self._launch_failed(row, str(submission), now))
                else:
                    started.append(self._track(row, launch, submission.handle, submitted=submission.message))
        await self._record_started(started, failures)

    async def _launch_batch(self, direct: list[tuple[Any, JobLaunch]], now: datetime) -> None:
        """Start a pass's jobs together (a gate may start several at once) and record them, off the pass.

        Off the pass: while the gate starts this batch (the local launcher forks one job after
        another, tens of milliseconds for a few dozen), the loop's passes record the jobs that ended
        and act on cancels. Waiting inside the pass held those up, and left the core idle while the
        launcher worked. One batch at a time: the jobs placed meanwhile wait for its end and go
        together as the next (the launcher starts them one by one anyway, and batches of a handful
        cost the core more passes and transactions per job than it saved). The starts are recorded
        every :data:`RECORD_STARTS_EVERY` launches, not at the batch's end: a job that ended is
        recorded only after its start, and until then its CPUs look taken (64 trivial jobs on 64
        CPUs, launched one after the other, held them all for the whole batch). The rows stay
        ``_busy`` until their start or failure is written, so no pass launches them twice.
        """
        launches = [asyncio.ensure_future(self._gate(row).launch(launch)) for row, launch in direct]
        try:
            for first in range(0, len(direct), RECORD_STARTS_EVERY):
                chunk = direct[first : first + RECORD_STARTS_EVERY]
                results = await asyncio.gather(
                    *launches[first : first + RECORD_STARTS_EVERY], return_exceptions=True
                )
                started: list[_Tracked] = []
                failures: list[job_store.StateChange] = []
                for (row, launch), result in zip(chunk, results, strict=True):
                    if isinstance(result, GateError):
                        failures.append(self._launch_failed(row, str(result), now))
                    elif isinstance(result, BaseException):
                        # not the gate's own refusal: leave the job placed, a later pass tries again
                        log.error("launch failed unexpectedly", job_id=row.id, error=repr(result))
                    else:
                        started.append(self._track(row, launch, result))
                await self._record_started(started, failures)
        except Exception:
            log.exception("recording a batch of launches failed; the next passes retry or re-adopt")
        finally:
            for pending in launches:
                pending.cancel()  # only if this task is cancelled or failed: else all are done
            self._busy.difference_update(row.id for row, _ in direct)
            self._batches_out -= 1
        self.wakeup.ring()  # the jobs placed meanwhile go as the next batch

    async def _launch_in_background(self, row: Any, launch: JobLaunch) -> None:
        """Launch one job off the pass (its gate may wait); record the start or the failure."""
        try:
            handle = await self._gate(row).launch(launch)
        except GateError as exc:
            await self._apply([self._launch_failed(row, str(exc), self._clock.now())])
            return
        finally:
            self._busy.discard(row.id)
        await self._record_started([self._track(row, launch, handle)], [])

    async def _stage_in_then_launch(self, row: Any, launch: JobLaunch) -> None:
        try:
            await self._apply(
                [
                    job_store.StateChange(
                        row.id,
                        JobState.STAGING_IN,
                        "staging_in",
                        f"Placing {len(launch.input_paths)} input(s) in the working directory",
                        frozenset({JobState.SCHEDULED, JobState.STAGING_IN}),
                    )
                ]
            )
            gate = self._gate(row)
            try:
                await self._stager.fetch_inputs(launch)
            except StagingError as exc:
                await self._apply([self._stage_in_failed(row, str(exc), self._clock.now())])
                return
            except StagingStopped:  # canceled or requeued meanwhile, or the core is stopping
                fresh = await self._fresh_row(row.id)
                stopped = fresh is not None and (fresh.cancel_requested or fresh.requeue_requested)
                if stopped and fresh.state == JobState.STAGING_IN.value:
                    await self._apply([self._ended_before_start(fresh, self._clock.now())])
                return
            await gate.stage_in(launch)
            fresh = await self._fresh_row(row.id)
            if fresh is None or fresh.state != JobState.STAGING_IN.value:
                return
            if fresh.cancel_requested or fresh.requeue_requested:
                await self._apply([self._ended_before_start(fresh, self._clock.now())])
                return
            forwarding = self_scheduling(gate)
            submitted: Submitted | None = None
            if forwarding is not None:
                result = (await forwarding.launch_many([launch]))[0]
                if isinstance(result, GateError):
                    raise result
                submitted = result
                handle = result.handle
            else:
                handle = await gate.launch(launch)
        except (GateError, OSError) as exc:
            await self._apply([self._launch_failed(row, str(exc), self._clock.now())])
            return
        finally:
            self._busy.discard(row.id)
        message = submitted.message if submitted is not None else None
        await self._record_started([self._track(row, launch, handle, submitted=message)], [])

    async def _fresh_row(self, job_id: str) -> Any:
        return await self._store.read(job_store.get_job_row, job_id)

    def _track(
        self,
        row: Any,
        launch: JobLaunch,
        handle: Handle,
        *,
        recorded: bool = False,
        ended: bool = False,
        submitted: str | None = None,
    ) -> _Tracked:
        """Remember an attempt; watch it unless it has ``ended`` already (found so after a restart).

        ``submitted``: it went to a self-scheduling gate (the text says how), which enforces its walltime.
        """
        forwarding = submitted is not None
        tracked = _Tracked(
            launch=launch,
            remote_id=row.remote_id,
            handle=handle,
            walltime=row.walltime,
            deadline=None if ended or forwarding else self._deadline(row, row.walltime),
            recorded=recorded,
            cancel_requested=row.cancel_requested,
            requeue_requested=row.requeue_requested,
            canceled_by=row.canceled_by,
            self_scheduled=forwarding,
            submitted=submitted or "",
        )
        self._tracked[row.id] = tracked
        if not ended:
            gate = self._gate(row)
            if forwarding and (ss := self_scheduling(gate)) is not None:
                ss.watch_progress(self._on_progress)
            gate.watch(row.id, handle, self._on_exit)
        return tracked

    def _deadline(self, row: Any, walltime: int | None) -> float | None:
        if walltime is None:
            return None
        ran = 0.0
        if row.start_time is not None:  # re-adopted after a restart: the clock started at the real start
            ran = max(0.0, (self._clock.now() - row.start_time).total_seconds())
        return self._clock.monotonic() + walltime - ran

    async def _record_started(self, started: list[_Tracked], failures: list[job_store.StateChange]) -> None:
        now = self._clock.now()
        changes = [
            job_store.StateChange(
                t.launch.job_id,
                JobState.SCHEDULED,
                "submitted",
                t.submitted,
                LAUNCHABLE,
                {"handle": t.handle},
            )
            if t.self_scheduled
            else job_store.StateChange(
                t.launch.job_id,
                JobState.RUNNING,
                "started",
                f"Running on {', '.join(t.launch.node_names)}",
                LAUNCHABLE,
                {"handle": t.handle, "start_time": now},
            )
            for t in started
        ]
        applied = await self._apply(changes + failures)
        for change in applied:
            if change.to_state is JobState.RUNNING or change.reason == "submitted":
                self._tracked[change.job_id].recorded = True
        if self._exits:  # ended before their start was written (a trivial job does): recorded now, not
            await self._record_exits()  # on a pass of their own (which reads the jobs to launch first)

    def _ended_before_start(self, row: Any, now: Any) -> job_store.StateChange:
        flags = EndFlags(
            row.cancel_requested, row.requeue_requested, row.canceled_by, False, None, row.attempt
        )
        outcome = decide(Exit(None, None, "canceled", "canceled before start"), flags)
        values = dict(outcome.values)
        if outcome.state is not JobState.QUEUED:
            values["end_time"] = now
        return job_store.StateChange(
            row.id, outcome.state, outcome.reason, outcome.message, LAUNCHABLE, values
        )

    def _stage_in_failed(self, row: Any, message: str, now: Any) -> job_store.StateChange:
        return job_store.StateChange(
            row.id,
            JobState.FAILED,
            "stage_in_failed",
            f"Inputs not fetched: {message}",
            STARTED,
            {"end_time": now},
        )

    def _launch_failed(self, row: Any, message: str, now: Any) -> job_store.StateChange:
        return job_store.StateChange(
            row.id,
            JobState.FAILED,
            "launch_failed",
            f"Could not start: {message}",
            STARTED,
            {"end_time": now},
        )

    # -- cancel and walltime -------------------------------------------------------------------------

    def flags_changed(self) -> None:
        """A cancel or requeue was asked for (:class:`~skyport.server.control.JobControl`)."""
        self._flags_changed = True
        self.wakeup.ring()

    async def _enforce(self) -> None:
        if self._flags_due() and any(not t.cancel_sent for t in self._tracked.values()):
            self._flags_changed, self._flags_read_at = False, self._clock.monotonic()
            rows = await self._rows(STARTED, flagged_only=True)
            if any(row.id not in self._tracked for row in rows):
                self._flags_changed = True  # its launch is under way: looked at again next pass
            for row in rows:
                tracked = self._tracked.get(row.id)
                if tracked is None or tracked.cancel_sent:
                    continue
                tracked.cancel_requested = row.cancel_requested
                tracked.requeue_requested = row.requeue_requested
                tracked.canceled_by = row.canceled_by
                await self._stop(tracked)
        now = self._clock.monotonic()
        for tracked in self._tracked.values():
            if tracked.deadline is not None and not tracked.cancel_sent and now >= tracked.deadline:
                tracked.walltime_exceeded = True
                await self._stop(tracked)

    async def _stop(self, tracked: _Tracked) -> None:
        tracked.cancel_sent = True
        try:
            await self._gates[tracked.remote_id].cancel(tracked.handle, self._grace)
        except GateError as exc:
            log.warning("cancel failed", job_id=tracked.launch.job_id, error=str(exc))

    def _flags_due(self) -> bool:
        """Whether to read the jobs flagged for cancel or requeue: after a request (and at start-up), and
        on the timer's cadence in case of a flag set by someone else. Reading them on every pass, while
        jobs ran, was 2-3 % of the core's CPU per trivial job, for a query that found nothing."""
        return self._flags_changed or self._clock.monotonic() - self._flags_read_at >= self._interval

    # -- exits ---------------------------------------------------------------------------------------

    def _on_exit(self, job_id: str, exit: Exit) -> None:
        self._exits[job_id] = exit
        self.wakeup.ring()

    def _on_progress(self, job_id: str, progress: Progress) -> None:
        self._progress[job_id] = progress
        self.wakeup.ring()

    async def _record_progress(self) -> None:
        """What self-scheduling gates saw: a start (``running``, on the provider's nodes), or why an
        attempt still waits there (``scheduled``, the reason in ``state_details``)."""
        for job_id in [j for j in self._progress if j not in self._tracked]:
            del self._progress[job_id]  # it ended meanwhile
        ready = [(j, p) for j, p in self._progress.items() if self._tracked[j].recorded]
        if not ready:
            return
        now = self._clock.now()
        changes = []
        for job_id, progress in ready:
            del self._progress[job_id]
            if progress.started:
                values: dict[str, Any] = {"start_time": now}
                if progress.node_names:
                    values["node_names"] = list(progress.node_names)
                changes.append(
                    job_store.StateChange(
                        job_id,
                        JobState.RUNNING,
                        "started",
                        progress.message,
                        frozenset({JobState.SCHEDULED, JobState.STAGING_IN}),
                        values,
                    )
                )
            else:
                changes.append(
                    job_store.StateChange(
                        job_id,
                        JobState.SCHEDULED,
                        "pending",
                        progress.message,
                        frozenset({JobState.SCHEDULED}),
                    )
                )
        await self._apply(changes)

    async def _record_exits(self) -> None:
        ready = [
            (self._tracked[j], e)
            for j, e in self._exits.items()
            if j in self._tracked and self._tracked[j].recorded
        ]
        if not ready:
            return
        for tracked, _ in ready:
            del self._exits[tracked.launch.job_id]
        now = self._clock.now()
        finals: list[job_store.StateChange] = []
        staging: list[tuple[_Tracked, Outcome, job_store.StateChange]] = []
        for tracked, exit in ready:
            outcome = decide(exit, self._flags(tracked))
            if needs_stage_out(tracked.launch.spec) and outcome.state is not JobState.QUEUED:
                change = job_store.StateChange(
                    tracked.launch.job_id,
                    JobState.STAGING_OUT,
                    outcome.reason,
                    "Copying output files back",
                    STARTED,
                    {**outcome.values, "canceled_by": tracked.canceled_by},
                )
                staging.append((tracked, outcome, change))
            else:
                finals.append(self._final_change(tracked.launch.job_id, outcome, STARTED, now))
        applied = {c.job_id for c in await self._apply(finals + [c for _, _, c in staging])}
        for tracked, _ in ready:
            if tracked.launch.job_id not in {t.launch.job_id for t, _, _ in staging}:
                self._tracked.pop(tracked.launch.job_id, None)
        for tracked, outcome, change in staging:
            if change.job_id in applied:
                self._busy.add(change.job_id)
                self._spawn(
                    self._stage_out_then_finish(tracked.launch, tracked.remote_id, tracked.handle, outcome)
                )
            self._tracked.pop(tracked.launch.job_id, None)

    def _flags(self, tracked: _Tracked) -> EndFlags:
        return EndFlags(
            tracked.cancel_requested,
            tracked.requeue_requested,
            tracked.canceled_by,
            tracked.walltime_exceeded,
            tracked.walltime,
            tracked.launch.attempt,
        )

    def _final_change(
        self, job_id: str, outcome: Outcome, from_states: frozenset[JobState], now: Any
    ) -> job_store.StateChange:
        values = dict(outcome.values)
        if outcome.state is not JobState.QUEUED:
            values["end_time"] = now
        return job_store.StateChange(
            job_id, outcome.state, outcome.reason, outcome.message, from_states, values
        )

    async def _stage_out_then_finish(
        self, launch: JobLaunch, remote_id: str, handle: Handle, outcome: Outcome
    ) -> None:
        try:
            gate = self._gates[remote_id]
            try:
                files = await gate.stage_out(launch, handle)
            except (GateError, OSError) as exc:
                outcome = Outcome(
                    JobState.FAILED, "stage_out_failed", f"Output files not returned: {exc}", {}
                )
                files = []
            await self._store.write(job_store.replace_files, launch.job_id, "output", files)
            if outcome.state is JobState.COMPLETED and launch.spec.outputs:
                try:  # delivered to their URLs only after a success; always kept for download
                    await self._stager.deliver_outputs(launch, handle.get("uid"))
                except StagingError as exc:
                    outcome = Outcome(
                        JobState.FAILED, "stage_out_failed", f"Outputs not delivered: {exc}", outcome.values
                    )
            await self._apply(
                [
                    self._final_change(
                        launch.job_id, outcome, frozenset({JobState.STAGING_OUT}), self._clock.now()
                    )
                ]
            )
        finally:
            self._busy.discard(launch.job_id)

    # -- recovery ------------------------------------------------------------------------------------

    async def recover(self) -> None:
        """Find every active job again after a (re)start of the core."""
        active = STARTED | {JobState.STAGING_OUT}
        rows = await self._store.read(job_store.rows_with_owner, active)
        finals: list[job_store.StateChange] = []
        for row in rows:
            if not row.node_ids:
                continue  # still waiting for its elastic partition: the provisioning loop resumes it
            launch = self._job_launch(row)
            try:
                gate = self._gate(row)
            except GateError as exc:
                finals.append(self._launch_failed(row, str(exc), self._clock.now()))
                continue
            if row.state == JobState.STAGING_OUT.value:
                exit = Exit(row.exit_code, row.signal, row.reason, row.state_details)
                flags = EndFlags(
                    row.cancel_requested,
                    False,
                    row.canceled_by,
                    row.reason == "walltime",
                    row.walltime,
                    row.attempt,
                )
                self._busy.add(row.id)
                self._spawn(
                    self._stage_out_then_finish(launch, row.remote_id, row.handle or {}, decide(exit, flags))
                )
                continue
            found = await gate.recover(launch, row.handle)
            forwarding = self_scheduling(gate) is not None
            if found.handle is not None:
                self._track(
                    row,
                    launch,
                    found.handle,
                    recorded=row.state == JobState.RUNNING.value or (forwarding and row.handle is not None),
                    submitted="Found again after a restart of the core" if forwarding else None,
                )
                log.info("re-adopted a running job", job_id=row.id)
            elif found.exit is not None:
                # It ended while we were away: record it as if we had watched it.
                self._track(row, launch, row.handle or {}, recorded=True, ended=True)
                self._exits[row.id] = found.exit
            elif row.state == JobState.RUNNING.value:
                finals.append(
                    job_store.StateChange(
                        row.id,
                        JobState.FAILED,
                        "lost",
                        "The job's process was not found after the core restarted",
                        frozenset({JobState.RUNNING}),
                        {"end_time": self._clock.now()},
                    )
                )
            # scheduled/staging_in that never started: the next pass launches them
        started = [t for t in self._tracked.values() if not t.recorded]
        await self._record_started(started, finals)

    # -- shared --------------------------------------------------------------------------------------

    async def _apply(self, changes: list[job_store.StateChange]) -> list[job_store.StateChange]:
        """Record state changes; those that come together share a transaction (group commit): when a
        burst of VMs comes up, each of hundreds of jobs started on an agent node is recorded on its own,
        as its agent answers."""
        if not changes:
            return []
        applied = await self._writes.write((changes, self._clock.now()))
        finished = False
        for change in applied:
            self._notifier.changed(change.job_id)
            if change.to_state.terminal:
                self._metrics.finished.labels(state=change.to_state.value).inc()
                finished = True
            if change.to_state is JobState.QUEUED:
                finished = True
        if finished:
            self._on_finished()
        return applied

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
