"""The TES service: create, list, show and cancel tasks on top of the core's intake, control and store.

Authorization is the native API's: a task is its job, owned by the user who created it; administrators
see all. Executor logs come from the runner's files, which the job's ordinary output collection brought
back to the spool (:mod:`skyport.server.tes.runner`); system logs from the job's events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

import skyport
from skyport.models import JobState
from skyport.server.auth import Principal
from skyport.server.core import LOCAL_REMOTE, Core
from skyport.server.store import infra as infra_store
from skyport.server.store import jobs as job_store
from skyport.server.tes import store as tes_store
from skyport.server.tes.mapping import BACKEND_PARAMETERS, Placement, to_job
from skyport.server.tes.models import TesState, TesTask, View
from skyport.server.tes.runner import EXECUTORS_FILE, LOG_DIR, SYSTEM_LOG

#: How long what the mapping needs to know about remotes and nodes is reused.
PLACEMENT_TTL_S = 10.0
TES_VERSION = "1.1.0"


def rfc3339(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


class _Batch:
    """Concurrent task inserts share one transaction (as job submissions do in the intake)."""

    def __init__(self, write: Callable[[list[tes_store.NewTask]], Awaitable[None]]) -> None:
        self._write = write
        self._pending: list[tuple[tes_store.NewTask, asyncio.Future[None]]] = []
        self._flushing = False

    async def add(self, task: tes_store.NewTask) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((task, fut))
        if not self._flushing:
            self._flushing = True
            try:
                while self._pending:
                    batch, self._pending = self._pending, []
                    try:
                        await self._write([t for t, _ in batch])
                    except Exception as exc:
                        for _, f in batch:
                            f.set_exception(exc)
                        continue
                    for _, f in batch:
                        f.set_result(None)
            finally:
                self._flushing = False
        await fut


class TesService:
    def __init__(self, core: Core, *, on_callback_task: Callable[[], None] = lambda: None) -> None:
        self._core = core
        self._on_callback_task = on_callback_task
        self._placement: tuple[float, Placement] | None = None
        self._batch = _Batch(self._insert)

    async def _insert(self, tasks: list[tes_store.NewTask]) -> None:
        await self._core.store.write(tes_store.insert_tasks, tasks)

    # -- service info --------------------------------------------------------------------------------

    def service_info(self) -> dict[str, Any]:
        settings = self._core.settings
        staging = getattr(settings, "staging", None)
        storage = [f"file://{root}" for root in getattr(staging, "file_roots", [])]
        storage += ["http://", "https://"]
        storage += [f"s3://{b}" if b != "*" else "s3://" for b in getattr(staging, "s3_buckets", [])]
        return {
            "id": "org.skyport.tes",
            "name": "Sky Port",
            "type": {"group": "org.ga4gh", "artifact": "tes", "version": TES_VERSION},
            "description": "GA4GH TES on Sky Port: each task is a Sky Port job, run on any of its gates.",
            "organization": {"name": "Sky Port", "url": settings.public_url or "https://localhost"},
            "version": skyport.__version__,
            "environment": "production",
            "storage": storage,
            "tesResources_backend_parameters": list(BACKEND_PARAMETERS),
        }

    # -- create --------------------------------------------------------------------------------------

    async def _placement_now(self) -> Placement:
        now = self._core.clock.monotonic()
        if self._placement is None or self._placement[0] < now:
            remotes, nodes = await self._core.store.read(_remotes_and_nodes)
            local = self._core.settings.local
            placement = Placement(
                remotes={r.name for r in remotes},
                images=local.images,
                host_path=list(local.host_path),
                storage_declared=any(n.storage > 0 for n in nodes),
                remote_name=LOCAL_REMOTE,
            )
            self._placement = (now + PLACEMENT_TTL_S, placement)
        return self._placement[1]

    async def create(self, principal: Principal, task: TesTask) -> str:
        """Accept a task (TaskRejected or SubmissionError: a 400 saying why); returns its id."""
        mapped = to_job(task, await self._placement_now())
        job = await self._core.intake.submit(principal.user, mapped.spec)
        now = self._core.clock.now()
        await self._batch.add(
            tes_store.NewTask(
                job_id=job.id,
                owner_id=principal.user.id,
                name=task.name or "",
                tags=dict(task.tags or {}),
                task=mapped.document,
                notes=mapped.notes,
                created_at=job.submit_time,
                callback_url=mapped.callback_url,
                token_id=principal.token_id,
            )
        )
        if mapped.image_error is not None:
            # Never run: fail it while queued (if the scheduler was faster, the runner fails it itself).
            change = job_store.StateChange(
                job.id,
                JobState.FAILED,
                "image_unavailable",
                f"Cannot run: {mapped.image_error}",
                frozenset({JobState.QUEUED}),
                {"end_time": now},
            )
            await self._core.store.write(job_store.transition, [change], now)
            self._core.notifier.changed(job.id)
        if mapped.callback_url is not None:
            self._on_callback_task()
        return job.id

    # -- read ----------------------------------------------------------------------------------------

    def _visible(self, principal: Principal, owner_id: str) -> bool:
        return principal.is_admin or principal.user.id == owner_id

    async def get(self, principal: Principal, task_id: str, view: View) -> dict[str, Any] | None:
        row = await self._core.store.read(tes_store.get_task, task_id, full=view is not View.MINIMAL)
        if row is None:
            return None
        owner = await self._core.store.read(tes_store.owner_of, task_id)
        if owner is None or not self._visible(principal, owner):
            return None
        rendered = await self._render([row], view)
        return rendered[0]

    async def list_tasks(
        self,
        principal: Principal,
        *,
        view: View,
        name_prefix: str | None,
        state: TesState | None,
        tags: dict[str, str],
        page_size: int,
        page_token: str | None,
    ) -> dict[str, Any]:
        flt = tes_store.TaskFilter(
            owner_id=None if principal.is_admin else principal.user.id,
            name_prefix=name_prefix,
            state=state,
            tags=tags,
        )
        rows, nxt = await self._core.store.read(
            tes_store.list_tasks, flt, full=view is not View.MINIMAL, limit=page_size, after=page_token
        )
        out: dict[str, Any] = {"tasks": await self._render(rows, view)}
        if nxt is not None:
            out["next_page_token"] = nxt
        return out

    async def _render(self, rows: Sequence[Any], view: View) -> list[dict[str, Any]]:
        if view is View.MINIMAL:
            return [{"id": r.job_id, "state": _state(r).value} for r in rows]
        full = view is View.FULL
        events = await self._core.store.read(_events_of, [r.job_id for r in rows]) if full else {}
        files = await asyncio.to_thread(self._read_logs, [r.job_id for r in rows], full)
        return [_task(r, view, files[r.job_id], events.get(r.job_id, [])) for r in rows]

    def _read_logs(self, job_ids: list[str], full: bool) -> dict[str, dict[str, str]]:
        """The runner's files of each job that came back (only those a view shows)."""
        found: dict[str, dict[str, str]] = {}
        for job_id in job_ids:
            root = self._core.outputs.output_path(job_id, ".")
            files: dict[str, str] = {}
            names = [EXECUTORS_FILE, f"{LOG_DIR}/outputs"]
            if full:
                names.append(SYSTEM_LOG)
            for name in names:
                text = _read_text(root / name)
                if text is not None:
                    files[name] = text
            if full and EXECUTORS_FILE in files:
                for line in files[EXECUTORS_FILE].splitlines():
                    index = line.split("\t", 1)[0]
                    for stream in ("stdout", "stderr"):
                        name = f"{LOG_DIR}/{index}.{stream}"
                        files[name] = _read_text(root / name) or ""
            found[job_id] = files
        return found

    # -- cancel --------------------------------------------------------------------------------------

    async def cancel(self, principal: Principal, task_id: str) -> bool:
        """Cancel the task (a no-op once it has ended); False if there is no such task of the caller's."""
        owner = await self._core.store.read(tes_store.owner_of, task_id)
        if owner is None or not self._visible(principal, owner):
            return False
        return await self._core.control.cancel(principal, task_id) is not None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return None


def _remotes_and_nodes(conn: Connection) -> tuple[list[Any], list[Any]]:
    return infra_store.list_remotes(conn), infra_store.list_nodes(conn)


def _events_of(conn: Connection, job_ids: list[str]) -> dict[str, list[Any]]:
    return {job_id: tes_store.job_events(conn, job_id) for job_id in job_ids}


def _state(row: Any) -> TesState:
    return tes_store.tes_state(JobState(row.state), row.reason, row.exit_code, row.cancel_requested)


def _executor_logs(files: dict[str, str], full: bool) -> list[dict[str, Any]]:
    logs = []
    for line in files.get(EXECUTORS_FILE, "").splitlines():
        parts = line.split("\t")
        if len(parts) != 4:
            continue
        index, start, end, code = parts
        entry: dict[str, Any] = {"start_time": start, "end_time": end, "exit_code": int(code)}
        if full:
            entry["stdout"] = files.get(f"{LOG_DIR}/{index}.stdout", "")
            entry["stderr"] = files.get(f"{LOG_DIR}/{index}.stderr", "")
        logs.append(entry)
    return logs


def _output_logs(document: dict[str, Any], files: dict[str, str]) -> list[dict[str, Any]]:
    urls = {o["path"]: o["url"] for o in document.get("outputs", [])}
    out = []
    for line in files.get(f"{LOG_DIR}/outputs", "").splitlines():
        path, _, size = line.partition("\t")
        if path in urls:
            out.append({"url": urls[path], "path": path, "size_bytes": size})
    return out


def _system_logs(row: Any, events: list[Any], files: dict[str, str]) -> list[str]:
    lines = [f"note: {n}" for n in row.notes]
    for e in events:
        moved = (
            f"{e.from_state} -> {e.to_state}" if e.from_state and e.from_state != e.to_state else e.to_state
        )
        lines.append(f"{rfc3339(e.time)} {moved} ({e.reason}): {e.message}")
    lines += [f"runner: {line}" for line in files.get(SYSTEM_LOG, "").splitlines() if line]
    return lines


def _task(row: Any, view: View, files: dict[str, str], events: list[Any]) -> dict[str, Any]:
    full = view is View.FULL
    document: dict[str, Any] = dict(row.task)
    if not full and "inputs" in document:
        document["inputs"] = [{k: v for k, v in i.items() if k != "content"} for i in document["inputs"]]
    log: dict[str, Any] = {
        "logs": _executor_logs(files, full),
        "metadata": {"skyport_job_id": row.job_id, "attempt": str(row.attempt)},
        "outputs": _output_logs(document, files),
    }
    if row.remote_name:
        log["metadata"]["remote"] = row.remote_name
    if row.node_names:
        log["metadata"]["host"] = ",".join(row.node_names)
    if row.start_time is not None:
        log["start_time"] = rfc3339(row.start_time)
    if row.end_time is not None:
        log["end_time"] = rfc3339(row.end_time)
    if full:
        log["system_logs"] = _system_logs(row, events, files)
    return {
        "id": row.job_id,
        "state": _state(row).value,
        **document,
        "logs": [log],
        "creation_time": rfc3339(row.created_at),
    }
