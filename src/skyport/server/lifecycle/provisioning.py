"""The provisioning loop: elastic partitions from request to deletion, whatever fails in between.

Level-triggered over the partition rows (server/store/partitions.py): each pass takes every partition
with something to do and performs one idempotent step for it, many partitions at once. The scheduler
writes a partition's row together with its job's placement; this loop calls the provider only after
that, with our partition id as the idempotency key and as a tag, so a ``kill -9`` at any moment is
resumed by the next pass of the next core: a create is repeated (the provider answers with what exists),
a delete is repeated until the provider confirms. The garbage collector deletes anything the provider
holds with our tag that no live row owns.

Steps (each with a deadline, transient provider errors retried with backoff):

- ``requested``: make one bootstrap token per node, ask the provider to create -> ``creating``;
- ``creating``: the provider says the machines are up -> ``booting``;
- ``booting``: every node's agent has enrolled and is up -> the job is placed on them -> ``in_use``;
- ``in_use``: no active job on it any more -> ``idle`` (kept warm for the same account and flavor);
- ``idle``: a job was placed on it again -> ``in_use``; idle past the remote's timeout -> ``deleting``;
- ``failed`` -> ``deleting``; ``deleting``: delete until the provider confirms -> ``deleted``.

A create that fails fails the job (reason ``provision_failed``, with the provider's words) and deletes
whatever was made; a job canceled while its partition is being made gets its partition deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import structlog
from sqlalchemy import Connection

from skyport.gates.provisioner import (
    PREEMPTED,
    TAG_CORE,
    TAG_PARTITION,
    TAG_PREEMPTIBLE,
    Catalog,
    NodeBootstrap,
    PartitionRequest,
    PartitionStatus,
    ProvisionerError,
    ProvisionerGate,
)
from skyport.models import JobState
from skyport.models.job import ACTIVE_STATES
from skyport.server.clock import Clock
from skyport.server.lifecycle.wakeup import JobNotifier, Wakeup, run_passes
from skyport.server.settings import CloudRemoteSettings
from skyport.server.store import enrolment as enrol_store
from skyport.server.store import jobs as job_store
from skyport.server.store import partitions as partition_store
from skyport.server.store.engine import Store

log = structlog.get_logger(__name__)

#: Steps running at once (each is mostly waiting on a provider).
PARALLEL_STEPS = 256
GC_INTERVAL_S = 60.0
CATALOG_INTERVAL_S = 600.0
#: How often a partition being created is checked with its provider.
POLL_INTERVAL_S = 1.0
#: How often a booted partition waiting for its agents is checked with its provider (at most: a remote's
#: shorter ``check_interval_s`` wins), plus up to half of it chosen by the partition's id (see
#: :func:`boot_check_interval`). Its placement does not wait for this: it follows its nodes' hellos.
BOOT_CHECK_INTERVAL_S = 15.0
#: Seconds between the start of a pass's wait and the next pass, at least (rings that come meanwhile
#: are kept: they start the next pass then).
MIN_PASS_GAP_S = 0.2
#: A provider call that does not answer in this long counts as a transient failure.
CALL_TIMEOUT_S = 60.0

WAITING = frozenset({JobState.SCHEDULED})
_ACTIVE = frozenset(s.value for s in ACTIVE_STATES)
T = TypeVar("T")


class ProvisioningLoop:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        notifier: JobNotifier,
        *,
        provisioners: dict[str, ProvisionerGate],
        remotes: dict[str, CloudRemoteSettings],
        core_id: str,
        core_url: Callable[[], str],
        ca_pem: Callable[[], str],
        on_placed: Callable[[], None],
        on_capacity: Callable[[], None],
        on_nodes_gone: Callable[..., None] = lambda ids, why, reason="node_lost": None,
        interval_s: float = 1.0,
    ) -> None:
        self.wakeup = Wakeup()
        self._store = store
        self._clock = clock
        self._notifier = notifier
        self._provisioners = provisioners
        self._remotes = remotes
        self._core_id = core_id
        self._core_url = core_url
        self._ca_pem = ca_pem
        self._on_placed = on_placed
        self._on_capacity = on_capacity
        self._on_nodes_gone = on_nodes_gone
        self._interval = interval_s
        self._busy: set[str] = set()
        self._polled: dict[str, float] = {}  # partition id -> when its provider was last asked
        self._catalogs: dict[str, Catalog] = {}  # remote id -> its catalog as last read
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(PARALLEL_STEPS)
        self._last_gc = float("-inf")
        self._last_catalog = float("-inf")
        #: Partition id -> an active job on it, as of the last pass.
        self._active: dict[str, str] = {}

    # -- the loop ------------------------------------------------------------------------------------

    async def run(self) -> None:
        await run_passes(self.pass_once, self._next_pass, "provisioning")

    async def _next_pass(self) -> None:
        """Wait for a ring or the timer, but never start a pass sooner than MIN_PASS_GAP_S after the last:
        every agent's hello rings this loop, and while hundreds connect a pass followed each pass at
        once, each reading every partition with its job."""
        await asyncio.sleep(MIN_PASS_GAP_S)
        await self.wakeup.wait(max(0.0, self._interval - MIN_PASS_GAP_S))

    async def pass_once(self) -> None:
        if not self._provisioners:
            return
        tick = self._clock.monotonic()
        if tick - self._last_catalog > CATALOG_INTERVAL_S:
            self._last_catalog = tick
            self._spawn(self.refresh_catalogs())
        if tick - self._last_gc > GC_INTERVAL_S:
            self._last_gc = tick
            self._spawn(self.collect_garbage())
        work = await self._store.read(partition_store.work, self._clock.now())
        self._active = work.active
        # Partitions at the same step are done together: one transaction for hundreds of them.
        batches: dict[str, list[Any]] = {"create": [], "check": [], "place": []}
        for row in work.rows:
            if row.id in self._busy or row.remote_id not in self._provisioners:
                continue
            nodes_up = work.nodes_up.get(row.id, 0)
            if not self._due(row, tick, nodes_up):
                continue
            self._busy.add(row.id)
            if row.state == "requested":
                batches["create"].append(row)
            elif row.state == "creating":
                batches["check"].append(row)
            elif row.state == "booting" and nodes_up >= row.node_count:
                batches["place"].append(row)
            else:
                self._spawn(self._step(row))
        for kind, rows in batches.items():
            if rows:
                self._spawn(self._batch(kind, rows))

    def _due(self, row: Any, tick: float, nodes_up: int) -> bool:
        """Whether a partition needs a step in this pass. Waiting on the provider (creating) is polled
        every POLL_INTERVAL_S, not every pass: hundreds of partitions boot at once. A booting partition
        whose nodes are all up is placed at once (an agent's hello wakes this loop); one still waiting
        for its agents is asked about now and then (a VM that died while booting, see
        :func:`boot_check_interval`). A partition in use by its job is looked at when its job ends, and
        asked about every ``check_interval_s`` (preemption)."""
        if row.state == "in_use" and self._job_is_on(row):
            interval = self._remotes[row.remote_id].check_interval_s
            return tick - self._polled.get(row.id, float("-inf")) >= interval
        if row.state not in ("creating", "booting"):
            return True
        if row.state == "booting" and nodes_up >= row.node_count:
            return True
        interval = POLL_INTERVAL_S
        if row.state == "booting":
            interval = min(boot_check_interval(row.id), self._remotes[row.remote_id].check_interval_s)
        if tick - self._polled.get(row.id, float("-inf")) < interval and not self._late(row):
            return False
        self._polled[row.id] = tick
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _step(self, row: Any) -> None:
        try:
            async with self._slots:
                step = getattr(self, f"_on_{row.state}")
                await step(row)
        except Exception:
            log.exception("partition step failed; retried on a later pass", partition=row.id, state=row.state)
        finally:
            self._busy.discard(row.id)

    async def _batch(self, kind: str, rows: list[Any]) -> None:
        """One step for many partitions at the same state: their reads and writes are one transaction
        each; the provider calls run side by side (at most PARALLEL_STEPS at once)."""
        try:
            waiting = [row for row in rows if await self._still_waiting(row)]
            if waiting:
                step = {"create": self._create_all, "check": self._check_all, "place": self._place_all}[kind]
                await step(waiting)
        except Exception:
            log.exception("partition step failed; retried on a later pass", partitions=len(rows), step=kind)
        finally:
            for row in rows:
                self._busy.discard(row.id)

    async def _each(self, rows: list[Any], call: Callable[[Any], Awaitable[T]]) -> list[T | None]:
        """``call(row)`` for every row at once (bounded by the step slots); None where it raised (logged:
        that partition is tried again on a later pass, the others go on)."""

        async def one(row: Any) -> T | None:
            try:
                async with self._slots:
                    return await call(row)
            except Exception:
                log.exception("partition step failed; retried on a later pass", partition=row.id)
                return None

        return list(await asyncio.gather(*(one(row) for row in rows)))

    # -- catalog and garbage -------------------------------------------------------------------------

    async def refresh_catalogs(self) -> None:
        """Flavors and images of every cloud remote, off any request's path."""
        for remote_id, gate in self._provisioners.items():
            try:
                catalog = await asyncio.wait_for(gate.catalog(), CALL_TIMEOUT_S)
            except (ProvisionerError, TimeoutError) as exc:
                log.warning("catalog refresh failed", remote=self._name(remote_id), error=str(exc))
                continue
            await self._store.write(partition_store.save_catalog, remote_id, catalog)
            self._catalogs[remote_id] = catalog
        self._on_capacity()

    async def collect_garbage(self) -> int:
        """Delete provider partitions with our tag that no live row owns; returns how many."""
        deleted = 0
        for remote_id, gate in self._provisioners.items():
            try:
                held = await asyncio.wait_for(gate.list_partitions(), CALL_TIMEOUT_S)
            except (ProvisionerError, TimeoutError) as exc:
                log.warning("listing partitions failed", remote=self._name(remote_id), error=str(exc))
                continue
            live = await self._store.read(partition_store.live_ids)  # read after listing: no race
            for status in held:
                ours = status.tags.get(TAG_CORE, self._core_id) == self._core_id
                if not ours or status.partition_id in live or status.state == "deleted":
                    continue
                log.warning(
                    "deleting an orphaned partition",
                    remote=self._name(remote_id),
                    partition=status.partition_id,
                )
                with contextlib.suppress(ProvisionerError, TimeoutError):
                    await asyncio.wait_for(gate.delete_partition(status.partition_id), CALL_TIMEOUT_S)
                    deleted += 1
        return deleted

    # -- steps ---------------------------------------------------------------------------------------

    async def _create_all(self, rows: list[Any]) -> None:
        """``requested`` partitions: their nodes' bootstrap tokens (one transaction), the provider's create
        calls, then ``creating`` (one transaction)."""
        specs = await self._store.read(partition_store.job_specs, [row.job_id for row in rows])
        names = {row.id: [f"{row.name}-{i}" for i in range(row.node_count)] for row in rows}
        wanted = [(row.remote_id, row.id, names[row.id], self._token_ttl(row)) for row in rows]
        tokens = await self._store.write(_tokens, wanted, self._clock.now())

        async def create(row: Any) -> PartitionStatus | None:
            request = self._request(row, specs.get(row.job_id, {}), names[row.id], tokens[row.id])
            status: PartitionStatus | None = await self._call(row, "create", request)
            return status

        created = [
            (row, status)
            for row, status in zip(rows, await self._each(rows, create), strict=True)
            if status is not None and status is not _NOTHING
        ]
        steps = []
        for row, status in created:
            remote = self._remotes[row.remote_id]
            what = f"Creating {row.node_count} node(s) of {row.flavor_name or row.flavor_id} on {remote.name}"
            deadline = self._clock.now() + timedelta(seconds=remote.create_timeout_s)
            values = {
                "state": "creating",
                "provider_id": status.provider_id,
                "step_deadline": deadline,
                "message": status.message,
            }
            steps.append((row, what, values))
        await self._advance(steps)
        await self._after_create(created)

    def _token_ttl(self, row: Any) -> timedelta:
        remote = self._remotes[row.remote_id]
        return timedelta(seconds=remote.create_timeout_s + remote.boot_timeout_s)

    async def _request(
        self, row: Any, spec: dict[str, Any], names: list[str], tokens: list[str]
    ) -> PartitionStatus:
        """Ask the provider to create the partition (the flavor as the provider calls it)."""
        request = PartitionRequest(
            partition_id=row.id,
            name=row.name,
            flavor=await self._catalog_flavor(row),
            image=row.image,
            nodes=[
                NodeBootstrap(n, self._core_url(), self._ca_pem(), t)
                for n, t in zip(names, tokens, strict=True)
            ],
            ports=sorted({p["port"] for p in (spec.get("ports") or []) if p.get("direction") == "in"}),
            tags={
                TAG_PARTITION: row.id,
                TAG_CORE: self._core_id,
                **({TAG_PREEMPTIBLE: "true"} if spec.get("preemptible") else {}),
            },
        )
        return await self._provisioners[row.remote_id].create_partition(request)

    async def _check_all(self, rows: list[Any]) -> None:
        """``creating`` partitions: ask the provider whether their machines are up."""

        async def check(row: Any) -> Any:
            return await self._call(row, "check", self._provisioners[row.remote_id].get_partition(row.id))

        found = []
        for row, status in zip(rows, await self._each(rows, check), strict=True):
            if status is _NOTHING:
                await self._fail(row, "the provider no longer has the partition")
            elif status is not None:
                found.append((row, status))
        await self._after_create(found)

    async def _after_create(self, found: list[tuple[Any, PartitionStatus]]) -> None:
        """What the provider said about partitions being created: those ready boot (one transaction)."""
        booting = []
        for row, status in found:
            remote = self._remotes[row.remote_id]
            if status.state == "ready":
                deadline = self._clock.now() + timedelta(seconds=remote.boot_timeout_s)
                values = {"state": "booting", "step_deadline": deadline, "message": status.message}
                booting.append(
                    (
                        row,
                        f"Booting {row.node_count} node(s) of {remote.name}: waiting for their agents",
                        values,
                    )
                )
            elif status.state == "failed" and status.reason == PREEMPTED:
                await self._requeue(row, status.message or "the provider took the capacity back")
            elif status.state in ("failed", "deleted", "deleting"):
                await self._fail(row, status.message or f"the provider reports the partition {status.state}")
            elif self._late(row):
                await self._fail(row, f"the provider did not create it within {remote.create_timeout_s:.0f}s")
        if booting:
            await self._advance(booting)
            self.wakeup.ring()

    async def _place_all(self, rows: list[Any]) -> None:
        """``booting`` partitions whose nodes are all up: their jobs are placed on them (one transaction)."""
        nodes = await self._store.read(partition_store.nodes_of, [row.id for row in rows])
        placements = []
        for row in rows:
            up = [n for n in nodes.get(row.id, []) if n.state_power == "up"]
            if len(up) >= row.node_count:
                placements.append((row.job_id, row.remote_id, row.id, up[: row.node_count]))
        if not placements:
            return
        placed = await self._store.write(_place_all, placements, self._clock.now())
        for (job_id, *_), done in zip(placements, placed, strict=True):
            if done:
                self._notifier.changed(job_id)
        if any(placed):
            self._on_placed()

    async def _on_booting(self, row: Any) -> None:
        """A partition whose nodes are not all up yet (those that are get placed in a batch)."""
        if not await self._still_waiting(row):
            return
        # The provider may know better (a VM that died while booting): ask it.
        status = await self._call(row, "check", self._provisioners[row.remote_id].get_partition(row.id))
        if (
            status is not None
            and status is not _NOTHING
            and status.state == "failed"
            and status.reason == PREEMPTED
        ):
            await self._requeue(row, status.message or "the provider took the capacity back")
            return
        if status is _NOTHING or (status is not None and status.state in ("failed", "deleted", "deleting")):
            reason = status.message if status is not None and status is not _NOTHING else ""
            await self._fail(row, reason or "the provider no longer has the partition")
            return
        if self._late(row):
            remote = self._remotes[row.remote_id]
            nodes = await self._store.read(partition_store.node_states, row.id)
            up = [n for n in nodes if n.state_power == "up"]
            await self._fail(
                row,
                f"{row.node_count - len(up)} of {row.node_count} node(s) did not join within "
                f"{remote.boot_timeout_s:.0f}s (their agents never connected)",
            )

    async def _on_in_use(self, row: Any) -> None:
        active = self._active.get(row.id)
        if active is not None:
            if not self._job_is_on(row):
                await self._set(row, "in_use", job_id=active)
            await self._check_in_use(row)
            return
        await self._set(row, "idle", idle_since=self._clock.now(), charged_until=self._clock.now())
        self._on_capacity()

    async def _check_in_use(self, row: Any) -> None:
        """Now and then, ask the provider about a partition in use: spot capacity it took back ends its
        jobs with reason ``preempted`` (they are requeued), and the partition goes."""
        tick = self._clock.monotonic()
        if tick - self._polled.get(row.id, float("-inf")) < self._remotes[row.remote_id].check_interval_s:
            return
        self._polled[row.id] = tick
        status = await self._call(
            row, "check", self._provisioners[row.remote_id].get_partition(row.id), fail_job=False
        )
        if status is None or status is _NOTHING or status.state != "failed" or status.reason != PREEMPTED:
            return
        nodes = await self._store.read(partition_store.node_states, row.id)
        log.warning("partition preempted; its jobs are requeued", partition=row.id)
        self._on_nodes_gone(
            [n.id for n in nodes], f"partition {row.name} was preempted ({status.message})", PREEMPTED
        )
        await self._set(row, "deleting", message=status.message or "preempted")

    async def _requeue(self, row: Any, message: str) -> None:
        """Spot capacity taken back before the job started: it waits for capacity again."""
        now = self._clock.now()
        current = await self._store.read(partition_store.job_of, row.job_id)
        attempt = current.attempt if current is not None else 1
        change = job_store.StateChange(
            row.job_id,
            JobState.QUEUED,
            PREEMPTED,
            f"Preempted before it started: {message}; waiting for capacity again",
            WAITING,
            job_store.requeue_values(attempt),
        )
        await self._store.write(_fail_job, change, row.id, now, message)
        self._notifier.changed(row.job_id)
        self._on_capacity()

    async def _on_idle(self, row: Any) -> None:
        active = self._active.get(row.id)
        now = self._clock.now()
        if active is not None:
            await self._store.write(partition_store.charge_idle, row.id, now)
            await self._set(row, "in_use", job_id=active, idle_since=None)
            return
        remote = self._remotes[row.remote_id]
        nodes = await self._store.read(partition_store.node_states, row.id)
        gone = any(n.state_power != "up" for n in nodes) or len(nodes) < row.node_count
        if gone or (now - row.idle_since).total_seconds() >= remote.idle_timeout_s:
            await self._store.write(partition_store.charge_idle, row.id, now)
            await self._set(row, "deleting", message="idle" if not gone else "a node of it was lost")

    async def _on_failed(self, row: Any) -> None:
        await self._set(row, "deleting")

    async def _on_deleting(self, row: Any) -> None:
        gate = self._provisioners[row.remote_id]
        if (
            await self._call(row, "delete", gate.delete_partition(row.id), fail_job=False, quiet_ok=True)
            is None
        ):
            return
        status = await self._call(row, "check", gate.get_partition(row.id), fail_job=False, quiet_ok=True)
        if status is not None and status is not _NOTHING and status.state != "deleted":
            await self._set(row, "deleting", next_try_at=self._clock.now() + timedelta(seconds=1))
            return
        nodes = await self._store.read(partition_store.node_states, row.id)
        if nodes:  # anything still running there ended with the machines
            self._on_nodes_gone(
                [n.id for n in nodes], f"partition {row.name} was deleted ({row.message or 'gone'})"
            )
        await self._store.write(partition_store.forget_nodes, row.id)
        await self._set(row, "deleted", step_deadline=None)
        self._polled.pop(row.id, None)
        log.info("partition deleted", partition=row.id, remote=self._name(row.remote_id))
        self._on_capacity()

    # -- helpers -------------------------------------------------------------------------------------

    @staticmethod
    def _job_is_on(row: Any) -> bool:
        """The partition's job is active and on this partition (from the pass's read of both)."""
        return row.job_state in _ACTIVE and row.job_partition_id == row.id

    async def _still_waiting(self, row: Any) -> bool:
        """Whether the partition's job still waits for the partition being made. Otherwise the partition
        is deleted (the job no longer needs it) or, the job being on its nodes already (a placement whose
        step was cut short), in use."""
        if not self._job_is_on(row) or row.job_cancel_requested or row.job_requeue_requested:
            await self._set(row, "deleting", message="its job no longer needs it")
            return False
        if row.job_node_ids:
            await self._set(row, "in_use", step_deadline=None)
            return False
        return True

    def _late(self, row: Any) -> bool:
        return row.step_deadline is not None and self._clock.now() >= row.step_deadline

    def _name(self, remote_id: str) -> str:
        remote = self._remotes.get(remote_id)
        return remote.name if remote else remote_id

    async def _catalog_flavor(self, row: Any) -> str:
        """The provider's id of the partition's flavor, from the catalog last read (read again if the
        flavor is not in it): creating hundreds of partitions asks the provider's catalog once."""
        catalog = self._catalogs.get(row.remote_id)
        if catalog is None or not any(
            partition_store.flavor_id_for(row.remote_id, f.id) == row.flavor_id for f in catalog.flavors
        ):
            catalog = await asyncio.wait_for(self._provisioners[row.remote_id].catalog(), CALL_TIMEOUT_S)
            self._catalogs[row.remote_id] = catalog
        for flavor in catalog.flavors:
            if partition_store.flavor_id_for(row.remote_id, flavor.id) == row.flavor_id:
                return flavor.id
        raise ProvisionerError(f"flavor {row.flavor_name or row.flavor_id} is no longer offered")

    async def _call(
        self, row: Any, what: str, call: Any, *, fail_job: bool = True, quiet_ok: bool = False
    ) -> Any:
        """Await a provider call with a deadline; on failure retry later (transient) or fail the partition.

        Returns the call's result (``_NOTHING`` for None), or None when it failed.
        """
        remote = self._remotes[row.remote_id]
        try:
            result = await asyncio.wait_for(call, CALL_TIMEOUT_S)
        except (ProvisionerError, TimeoutError, OSError) as exc:
            text = str(exc) or f"the provider did not answer {what} within {CALL_TIMEOUT_S:.0f}s"
            transient = isinstance(exc, (TimeoutError, OSError)) or getattr(exc, "transient", False)
            attempts = row.attempts + 1
            if (transient or not fail_job) and (attempts < remote.attempts or not fail_job):
                wait = remote.backoff_s * 2 ** min(attempts - 1, 6)
                await self._set(
                    row,
                    row.state,
                    attempts=attempts,
                    next_try_at=self._clock.now() + timedelta(seconds=wait),
                    message=text,
                )
                log.warning(
                    "provider call failed; retrying",
                    what=what,
                    partition=row.id,
                    error=text,
                    attempt=attempts,
                )
                if fail_job:
                    await self._job_progress(row, f"{remote.name}: {text} (retrying)")
                return None
            await self._fail(row, text)
            return None
        if row.attempts:
            await self._set(row, row.state, attempts=0, next_try_at=None)
        return _NOTHING if result is None else result

    async def _fail(self, row: Any, message: str) -> None:
        """The partition cannot be made: its job fails with the provider's words; what exists is deleted."""
        remote = self._remotes[row.remote_id]
        text = f"Could not get capacity from {remote.name}: {message}"
        log.warning("partition failed", partition=row.id, remote=remote.name, error=message)
        now = self._clock.now()
        change = job_store.StateChange(
            row.job_id, JobState.FAILED, "provision_failed", text, WAITING, {"end_time": now}
        )
        # One transaction: a crash never leaves a failed partition whose job still waits for it.
        applied = await self._store.write(_fail_job, change, row.id, now, message)
        if applied:
            self._notifier.changed(row.job_id)
            self._on_capacity()
        self.wakeup.ring()

    async def _advance(self, steps: list[tuple[Any, str, dict[str, Any]]]) -> None:
        """Partitions' next steps, each with its job's progress event: (row, job message, new values), all
        in one transaction."""
        if not steps:
            return
        changes = [
            (
                row.id,
                job_store.StateChange(row.job_id, JobState.SCHEDULED, "provisioning", text, WAITING),
                values,
            )
            for row, text, values in steps
        ]
        applied = await self._store.write(_advance_all, changes, self._clock.now())
        for (row, _, _), done in zip(steps, applied, strict=True):
            if done:
                self._notifier.changed(row.job_id)

    async def _job_progress(self, row: Any, message: str) -> None:
        change = job_store.StateChange(row.job_id, JobState.SCHEDULED, "provisioning", message, WAITING)
        applied = await self._store.write(_progress, change, row.id, self._clock.now())
        if applied:
            self._notifier.changed(row.job_id)

    async def _set(self, row: Any, state: str, **values: Any) -> None:
        await self._store.write(partition_store.set_state, row.id, self._clock.now(), state=state, **values)


def boot_check_interval(partition_id: str) -> float:
    """How long a booted partition waits for its agents between two checks with its provider:
    BOOT_CHECK_INTERVAL_S plus up to half of it, the same for a partition each time.

    Partitions that boot together (a burst: 500 VMs within a second) would otherwise all be asked about
    in the same pass, each call holding its partition out of the passes that place jobs on it. Every
    second, those calls were a fifth of the core's event loop while 500 VMs' agents enrolled; every 5 s,
    the partitions still waiting were asked 5 s after they booted, all at once (185 calls in one pass of
    a burst, while the event loop lagged 0.43 s in that half second, up to 0.36 s in the others), in the
    middle of the agents' arrival. A real cloud's API limits its callers' rate, too. A VM that died while
    booting is found within 15-22.5 s; the partition's boot deadline is the backstop either way."""
    spread = (zlib.crc32(partition_id.encode()) % 1000) / 2000
    return BOOT_CHECK_INTERVAL_S * (1 + spread)


#: A call that succeeded with nothing to return (``get_partition`` of a partition that is gone).
_NOTHING: Any = object()


def _tokens(
    conn: Connection, wanted: list[tuple[str, str, list[str], timedelta]], now: datetime
) -> dict[str, list[str]]:
    """A bootstrap token for each node of each partition: (remote id, partition id, node names, ttl)."""
    return {
        partition_id: [
            enrol_store.create_bootstrap_token(
                conn, remote_id=remote_id, node_name=name, ttl=ttl, now=now, partition_id=partition_id
            )
            for name in names
        ]
        for remote_id, partition_id, names, ttl in wanted
    }


def _place_all(
    conn: Connection, placements: list[tuple[str, str, str, list[Any]]], now: datetime
) -> list[bool]:
    """Place each job on its partition's nodes (job id, remote id, partition id, nodes): the jobs and
    their partitions in a few statements for all of them; whether each was placed.

    A job already placed is skipped: a pass that read its partition before an earlier pass's placement
    was committed (an agent's hello wakes this loop at once, so passes follow each other closely)."""
    current = partition_store.jobs_of(conn, [job_id for job_id, *_ in placements])
    changes = []
    for job_id, remote_id, partition_id, nodes in placements:
        row = current.get(job_id)
        if row is not None and row.partition_id == partition_id and not row.node_ids:
            changes.append(_placement(job_id, remote_id, nodes))
    placed = {change.job_id for change in job_store.transition(conn, changes, now)}
    # in the same transaction: a crash never leaves a placed job on a "booting" partition
    in_use = {"state": "in_use", "step_deadline": None, "message": ""}
    partition_store.set_states(
        conn, [(partition_id, in_use) for job_id, _, partition_id, _ in placements if job_id in placed], now
    )
    return [job_id in placed for job_id, *_ in placements]


def _placement(job_id: str, remote_id: str, nodes: list[Any]) -> job_store.StateChange:
    return job_store.StateChange(
        job_id,
        JobState.SCHEDULED,
        "placed",
        f"Placed on {', '.join(n.name for n in nodes)}",
        WAITING,
        {
            "remote_id": remote_id,
            "node_ids": [n.id for n in nodes],
            "node_names": [n.name for n in nodes],
            "node_ips": [n.ip or n.host for n in nodes],
        },
    )


def _advance_all(
    conn: Connection, changes: list[tuple[str, job_store.StateChange, dict[str, Any]]], now: datetime
) -> list[bool]:
    """Partitions' next steps (partition id, its job's progress, the partition's new values) in a few
    statements for all of them; whether each job's progress was recorded (it is still that
    partition's)."""
    partition_store.set_states(conn, [(partition_id, values) for partition_id, _, values in changes], now)
    return _progress_all(conn, [(partition_id, change) for partition_id, change, _ in changes], now)


def _progress_all(
    conn: Connection, changes: list[tuple[str, job_store.StateChange]], now: datetime
) -> list[bool]:
    """Partitions' jobs' changes, (partition id, change) each, for the jobs that are still that
    partition's; whether each was applied."""
    current = partition_store.jobs_of(conn, [change.job_id for _, change in changes])
    still_theirs = [
        change
        for partition_id, change in changes
        if (row := current.get(change.job_id)) is not None and row.partition_id == partition_id
    ]
    applied = {id(change) for change in job_store.transition(conn, still_theirs, now)}
    return [id(change) in applied for _, change in changes]


def _progress(conn: Connection, change: job_store.StateChange, partition_id: str, now: datetime) -> bool:
    return _progress_all(conn, [(partition_id, change)], now)[0]


def _fail_job(
    conn: Connection, change: job_store.StateChange, partition_id: str, now: datetime, message: str
) -> bool:
    partition_store.set_state(conn, partition_id, now, state="failed", message=message, step_deadline=None)
    return _progress(conn, change, partition_id, now)
