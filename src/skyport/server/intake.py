"""Job intake: validate a submission against the store, keep its files, and commit it durably.

Submissions that arrive together share one transaction (group commit, :mod:`skyport.server.store.batch`);
one that cannot be written fails alone. Nothing is acknowledged before it is committed, and a submission
that fails validation leaves nothing behind (no row, no spool files).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath

from sqlalchemy import Connection

from skyport.models import Flavor, Image, Job, JobSpec, JobState, Remote, User
from skyport.models.job import parse_array
from skyport.server.clock import Clock
from skyport.server.ids import IdSource
from skyport.server.metrics import Metrics
from skyport.server.settings import LocalGateSettings, RemoteSettingsBase, Settings
from skyport.server.spool import Spool
from skyport.server.staging import StagingError, check_spec
from skyport.server.store import infra as infra_store
from skyport.server.store import jobs as job_store
from skyport.server.store import users as user_store
from skyport.server.store.batch import GroupCommit
from skyport.server.store.engine import Store


class SubmissionError(ValueError):
    """A submission we refuse; ``status`` is the HTTP status, the message says what to change."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Upload:
    """An input file sent with the submission: its relative name and its bytes, read in chunks."""

    name: str
    chunks: AsyncIterator[bytes]


def safe_relative_name(name: str) -> str:
    """A file name that stays inside the job's working directory, or SubmissionError."""
    path = PurePosixPath(name)
    if not name or "\x00" in name or path.is_absolute() or ".." in path.parts or str(path) in {".", ""}:
        raise SubmissionError(
            f"input file name {name!r} must be a relative path inside the working directory"
        )
    return str(path)


def _insert_submissions(conn: Connection, submissions: list[list[job_store.NewJob]]) -> list[None]:
    """A group of submissions (each a job, or all tasks of an array job) in one transaction."""
    job_store.insert_jobs(conn, [job for submission in submissions for job in submission])
    return [None] * len(submissions)


class Intake:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        spool: Spool,
        metrics: Metrics,
        settings: Settings,
        *,
        on_submit: Callable[[int], None],
    ) -> None:
        self._store = store
        self._clock = clock
        self._spool = spool
        self._metrics = metrics
        self._settings = settings
        self._on_submit = on_submit
        self._commit: GroupCommit[list[job_store.NewJob], None] = GroupCommit(
            store, group_txn=_insert_submissions
        )
        self._ids = IdSource()
        # Names resolve rarely change; look them up once per name, not per submission.
        self._accounts: dict[str, str] = {}

    async def submit(self, user: User, spec: JobSpec, uploads: Sequence[Upload] = ()) -> Job:
        started = self._clock.monotonic()
        try:
            job = await self._submit(user, spec, uploads)
        except SubmissionError:
            self._metrics.rejected.inc()
            raise
        self._metrics.submitted.inc()
        self._metrics.submit_latency.observe(self._clock.monotonic() - started)
        self._on_submit(spec.priority)
        return job

    async def _submit(self, user: User, spec: JobSpec, uploads: Sequence[Upload]) -> Job:
        account_name = spec.account or user_store.DEFAULT_ACCOUNT
        account_id = await self._account_id(user, account_name)
        remote_id = await self._remote_id(spec)
        await self._check_dependencies(user, spec)
        walltime = self._walltime(spec)
        upload_names = [safe_relative_name(u.name) for u in uploads]
        if len(set(upload_names)) != len(upload_names):
            raise SubmissionError("two uploaded input files have the same name")
        missing = [n for n in spec.input_files if n not in upload_names and "://" not in n]
        if missing:
            raise SubmissionError(
                f"input file(s) {', '.join(missing)} are named in the job but were not uploaded with it: "
                "pass them with --input"
            )
        extra = [n for n in upload_names if n not in spec.input_files]
        if extra:
            spec = spec.model_copy(update={"input_files": [*spec.input_files, *extra]})
        try:
            check_spec(spec, self._settings.staging)
        except StagingError as exc:
            raise SubmissionError(str(exc)) from exc
        if not spec.name:
            spec = spec.model_copy(update={"name": default_name(spec)})

        now = self._clock.now()
        job_id = self._ids.new(now)
        array = self._array(user, spec, now)
        # An array's uploads are kept once, under the array's id, for all its tasks.
        keep_under = array.id if array else job_id
        try:
            files = await self._keep_uploads(keep_under, uploads)
            tasks = [
                job_store.NewJob(
                    id=job_id if i == 0 else self._ids.new(now),
                    owner_id=user.id,
                    account_id=account_id,
                    spec=spec,
                    submit_time=now,
                    walltime=walltime,
                    remote_id=remote_id,
                    input_files=files,
                    array=array,
                    array_index=index,
                )
                for i, index in enumerate(parse_array(spec.array).indices if spec.array else [None])
            ]
            await self._commit.write(tasks)
        except BaseException:
            await asyncio.to_thread(self._spool.remove, keep_under)
            raise
        return Job(
            id=job_id,
            array_id=array.id if array else "",
            array_index=tasks[0].array_index,
            owner=user.name,
            account=account_name,
            name=spec.name,
            state=JobState.QUEUED,
            reason="submitted",
            state_details="Waiting to be scheduled",
            submit_time=now,
            spec=spec,
        )

    async def _account_id(self, user: User, name: str) -> str:
        if name not in user.accounts and not user.is_admin:
            choices = ", ".join(user.accounts) or "none"
            raise SubmissionError(f"unknown account {name!r} for user {user.name}: use one of {choices}")
        if name not in self._accounts:
            account_id = await self._store.read(user_store.account_id_by_name, name)
            if account_id is None:
                raise SubmissionError(f"unknown account {name!r}")
            self._accounts[name] = account_id
        return self._accounts[name]

    async def _remote_id(self, spec: JobSpec) -> str | None:
        if spec.remote is None and spec.flavor is None and spec.cloud_image is None:
            return None
        remote, flavors, images = await self._store.read(_catalog_for, spec)
        if spec.remote and remote is None:
            raise SubmissionError(
                f"unknown remote {spec.remote!r}: see `skyport remotes` for the ones configured"
            )
        if spec.flavor and not any(f.name == spec.flavor for f in flavors):
            raise SubmissionError(f"unknown flavor {spec.flavor!r}: see `skyport flavors`")
        if spec.cloud_image and not any(i.name == spec.cloud_image for i in images):
            raise SubmissionError(f"unknown cloud image {spec.cloud_image!r}: see `skyport images`")
        return remote.id if remote else None

    def _array(self, user: User, spec: JobSpec, now: datetime) -> job_store.NewArray | None:
        if spec.array is None:
            return None
        parsed = parse_array(spec.array)
        return job_store.NewArray(
            id=self._ids.new(now),
            owner_id=user.id,
            name=spec.name,
            range=spec.array,
            size=len(parsed.indices),
            throttle=parsed.throttle,
            submit_time=now,
        )

    async def _check_dependencies(self, user: User, spec: JobSpec) -> None:
        """Every job depended on must exist and be the submitter's (or the submitter an admin)."""
        wanted = [*spec.depends, *spec.depends_any]
        if not wanted:
            return
        owners = await self._store.read(job_store.owners_of, wanted)
        unknown = [d for d in wanted if d not in owners or (owners[d] != user.id and not user.is_admin)]
        if unknown:
            raise SubmissionError(f"the job depends on unknown job(s): {', '.join(unknown)}")

    def _walltime(self, spec: JobSpec) -> int | None:
        """The job's walltime: its own, else the default of the remote it names (or of ``local``); never
        over that remote's maximum."""
        limits: LocalGateSettings | RemoteSettingsBase = self._settings.local
        where = "on this core"
        if spec.remote is not None:
            named = next((r for r in self._settings.remotes if r.name == spec.remote), None)
            if named is not None:
                limits, where = named, f"on remote {named.name}"
        walltime = spec.walltime or limits.default_walltime
        if walltime is not None and limits.max_walltime is not None and walltime > limits.max_walltime:
            raise SubmissionError(
                f"walltime {walltime}s is over the maximum of {limits.max_walltime}s {where}"
            )
        return walltime

    async def _keep_uploads(self, job_id: str, uploads: Sequence[Upload]) -> list[tuple[str, int, str]]:
        if not uploads:
            return []
        budget = self._settings.max_upload_bytes
        kept: list[tuple[str, int, str]] = []
        inputs = self._spool.inputs(job_id)
        for upload in uploads:
            name = safe_relative_name(upload.name)
            target = inputs / name
            await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
            digest = hashlib.sha256()
            size = 0
            fd = await asyncio.to_thread(os.open, target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                async for chunk in upload.chunks:
                    size += len(chunk)
                    budget -= len(chunk)
                    if budget < 0:
                        limit = self._settings.max_upload_bytes
                        raise SubmissionError(
                            f"the uploaded files are larger than the limit of {limit} bytes: "
                            "stage large data from a URL instead",
                            status=413,
                        )
                    digest.update(chunk)
                    await asyncio.to_thread(out.write, chunk)
            kept.append((name, size, digest.hexdigest()))
        return kept


def _catalog_for(conn: Connection, spec: JobSpec) -> tuple[Remote | None, list[Flavor], list[Image]]:
    """The remote, flavors and images a spec names (only what it names is read)."""
    remote = infra_store.get_remote(conn, name=spec.remote) if spec.remote else None
    flavors = infra_store.list_flavors(conn) if spec.flavor else []
    images = infra_store.list_images(conn) if spec.cloud_image else []
    return remote, flavors, images


def default_name(spec: JobSpec) -> str:
    if spec.command:
        return Path(spec.command[0]).name
    return "script"
