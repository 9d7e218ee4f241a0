"""Data staging: a job's inputs fetched from URLs before it starts, its outputs delivered to URLs after.

Before the start (``staging_in``) the core fetches every input of the job into its spool; the job's gate
then places the spool's files in the working directory. After the end (``staging_out``) the gate brings
the outputs back into the spool and the core delivers the ones the job sends to URLs. Every transfer

- streams in chunks, so memory stays bounded whatever the size;
- hashes as it goes, and a SHA-256 given with an input is verified before anything is kept;
- writes a ``.part`` file renamed into place only when complete: never a silent partial file;
- retries transient errors (connection errors, HTTP 5xx) with doubling waits, then fails the job with a
  reason (``stage_in_failed`` / ``stage_out_failed``) and a message that says what failed and why.

Transfers block (files, hashing, fsspec), so each runs in a thread of the stager's own pool: never on the
event loop, and never in the default pool that the store's transactions need. Progress is recorded as an
event (the job's ``state_details``) at most every ``progress_interval_s``, not per chunk.

Where data may come from and go to is the operator's choice (``[staging]`` in skyport.toml), checked at
submission and again before each transfer: ``file://`` only under ``file_roots`` (a core, maybe root,
never reads or writes arbitrary host files for a user), ``s3://`` only in ``s3_buckets``, with the core's
own AWS credentials (the optional extra ``skyport-wm[s3]``). ``http(s)://`` needs no setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import os
import pwd
import shutil
import ssl
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

import certifi
import httpx
import structlog
from pydantic import ValidationError
from sqlalchemy import Connection

from skyport.gates.base import JobLaunch
from skyport.models import JobSpec, JobState
from skyport.models.job import InputSpec, OutputSpec
from skyport.server.clock import Clock
from skyport.server.lifecycle.wakeup import JobNotifier
from skyport.server.settings import StagingSettings
from skyport.server.store import jobs as job_store
from skyport.server.store.engine import Store

log = structlog.get_logger(__name__)

#: Bytes read and written at a time: the memory one transfer holds.
CHUNK_BYTES = 1024 * 1024
#: S3 multipart parts: at least 8 MiB (S3's minimum is 5 MiB), more for huge files (at most 10,000 parts).
S3_PART_BYTES = 8 * 1024 * 1024
S3_MAX_PARTS = 9000
MB = 1_000_000
#: Progress is reported every ``progress_interval_s``, twice as seldom after each this many reports, and
#: at least every this many seconds.
PROGRESS_DOUBLING = 10
PROGRESS_MAX_INTERVAL_S = 30.0

T = TypeVar("T")


class StagingError(Exception):
    """A transfer failed for good (or a URL is not allowed); the message is shown to the job's owner."""


class StagingStopped(Exception):
    """The job was canceled or requeued, or the core is stopping, while its data moved."""


class _Transient(Exception):
    """Worth another try: a connection error, a timeout, an HTTP 5xx."""


# -- what a job stages --------------------------------------------------------------------------------


def _is_url(name: str) -> bool:
    return "://" in name


def _url_file_name(url: str) -> str:
    """The file name an ``input-files`` URL gets in the working directory: the last part of its path."""
    name = unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    if not name or name in {".", ".."} or "/" in name or "\x00" in name:
        raise StagingError(
            f"input file URL {url!r} names no file to save it as: give it as an input with a 'path'"
        )
    return name


def staged_inputs(spec: JobSpec) -> list[InputSpec]:
    """Every input the core fetches: ``inputs``, and URLs listed in ``input_files`` (``#SWM input-files
    https://...``), each saved under the last part of its URL path."""
    from_files = []
    for name in spec.input_files:
        if _is_url(name):
            try:
                from_files.append(InputSpec(path=_url_file_name(name), url=name))
            except ValidationError as exc:
                raise StagingError(f"input file {name!r}: {exc.errors()[0]['msg']}") from None
    return [*spec.inputs, *from_files]


def input_paths(spec: JobSpec) -> list[str]:
    """Paths under the job's inputs directory that its gate places in the working directory: the files
    uploaded with the submission, then the inputs the core fetched (files or directories)."""
    uploaded = dict.fromkeys(n for n in spec.input_files if not _is_url(n))
    try:
        staged = [i.path for i in staged_inputs(spec)]
    except StagingError:  # a job stored before such URLs were checked: fetch_inputs fails it, saying why
        staged = []
    return [*uploaded, *staged]


def output_patterns(spec: JobSpec) -> list[str]:
    """Globs (relative to the working directory) of the files the gate brings back after the end."""
    patterns = list(spec.output_files)
    for out in spec.outputs:
        patterns.append(f"{out.path.rstrip('/')}/**" if out.type == "directory" else out.path)
    return list(dict.fromkeys(patterns))


def needs_stage_in(spec: JobSpec) -> bool:
    return bool(spec.input_files or spec.inputs)


def needs_stage_out(spec: JobSpec) -> bool:
    return bool(spec.output_files or spec.outputs)


# -- which URLs are allowed ------------------------------------------------------------------------------


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower()


def file_path(url: str, settings: StagingSettings) -> Path:
    """The host path of a ``file://`` URL, symlinks resolved, if it lies under an allowed root."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise StagingError(f"{url}: file:// URLs name a path on the core host (file:///path), not a host")
    if not settings.file_roots:
        raise StagingError(
            f"{url}: file:// URLs are not enabled on this core; the operator allows directories by "
            "listing them in staging.file_roots in skyport.toml (or SKYPORT_STAGING__FILE_ROOTS)"
        )
    path = Path(unquote(parts.path)).resolve()
    for root in settings.file_roots:
        if path.is_relative_to(root.resolve()):
            return path
    roots = ", ".join(str(r) for r in settings.file_roots)
    raise StagingError(
        f"{url}: {path} is outside the directories this core allows for file:// URLs ({roots}); "
        "the operator may add it to staging.file_roots in skyport.toml"
    )


def _s3_key(url: str, settings: StagingSettings) -> str:
    """``bucket/key`` of an ``s3://`` URL, if its bucket is allowed and s3 support is installed."""
    parts = urlsplit(url)
    bucket = parts.netloc
    if not bucket:
        raise StagingError(f"{url}: an s3:// URL names a bucket: s3://bucket/key")
    if bucket not in settings.s3_buckets and "*" not in settings.s3_buckets:
        raise StagingError(
            f"{url}: bucket {bucket!r} is not one this core stages from or to; the operator lists "
            "buckets in staging.s3_buckets in skyport.toml"
        )
    try:
        import s3fs  # noqa: F401
    except ImportError:
        raise StagingError(
            f"{url}: s3:// needs the optional extra on the core: pip install 'skyport-wm[s3]'"
        ) from None
    return f"{bucket}/{parts.path.lstrip('/')}".rstrip("/")


def check_url(url: str, settings: StagingSettings, *, directory: bool = False) -> None:
    """Raise StagingError if this core would refuse to move data from or to ``url``; ``directory``: an
    input directory, which must be listed (an output directory is written file by file)."""
    scheme = _scheme(url)
    if scheme == "file":
        file_path(url, settings)
    elif scheme == "s3":
        _s3_key(url, settings)
    elif scheme in ("http", "https"):
        if directory:
            raise StagingError(
                f"{url}: an http(s) URL cannot be listed as a directory; give each file as its own "
                "input, or fetch an archive and unpack it in the job"
            )
        if not urlsplit(url).hostname:
            raise StagingError(f"{url}: the URL names no host")
    else:
        raise StagingError(f"{url}: unsupported URL scheme {scheme!r}")


def check_spec(spec: JobSpec, settings: StagingSettings) -> None:
    """Refuse at submission what staging would refuse later: URLs not allowed, clashing input paths."""
    inputs = staged_inputs(spec)
    for item in inputs:
        if item.url is not None:
            check_url(item.url, settings, directory=item.type == "directory")
    for out in spec.outputs:
        check_url(out.url, settings)
    paths = [PurePosixPath(p) for p in input_paths(spec)]
    seen: set[PurePosixPath] = set()
    for path in paths:
        if path in seen:
            raise StagingError(f"two inputs would be saved as {str(path)!r}")
        seen.add(path)
    for path in paths:
        for parent in path.parents:
            if parent in seen:
                raise StagingError(f"inputs {str(parent)!r} and {str(path)!r} would overwrite each other")


# -- progress -------------------------------------------------------------------------------------------


@dataclass
class _Meter:
    """Bytes moved so far, written by transfer threads and read by the progress reporter.

    ``stop`` is how the loop tells a transfer thread to give up (cancel, shutdown): threads cannot be
    cancelled, so each checks it between chunks.
    """

    verb: str
    stop: threading.Event
    done: int = 0
    total: int = 0
    count: int = 0
    index: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, n: int) -> None:
        if self.stop.is_set():
            raise StagingStopped("stopped")
        with self._lock:
            self.done += n

    def expect(self, n: int) -> None:
        with self._lock:
            self.total += n

    def rewind(self, done: int, total: int) -> None:
        """Back to where a failed try started (it is tried again from the beginning)."""
        with self._lock:
            self.done, self.total = done, total

    def message(self) -> str:
        which = f" ({self.index} of {self.count})" if self.count > 1 else ""
        if self.total >= self.done and self.total:
            return f"{self.verb}{which}: {_mb(self.done)} of {_mb(self.total)}"
        return f"{self.verb}{which}: {_mb(self.done)}"


def _mb(n: int) -> str:
    return f"{n / MB:.0f} MB" if n >= 10 * MB else f"{n / MB:.1f} MB"


def _progress_event(
    conn: Connection, job_id: str, attempt: int, state: JobState, reason: str, message: str | None, now: Any
) -> bool:
    """Record progress (if any ``message``) while the job is still in ``state``; False if the transfer
    should stop (the job was canceled, requeued or moved on)."""
    row = job_store.get_job_row(conn, job_id)
    if row is None or row.state != state.value or row.attempt != attempt:
        return False
    if message is not None:
        job_store.add_event(conn, job_id, attempt, state, reason, message, now)
    return not (row.cancel_requested or row.requeue_requested)


# -- the stager -----------------------------------------------------------------------------------------


class Stager:
    """Moves jobs' data in and out of the core's spool. One per core; see the module's docstring."""

    def __init__(self, settings: StagingSettings, store: Store, clock: Clock, notifier: JobNotifier) -> None:
        self._settings = settings
        self._store = store
        self._clock = clock
        self._notifier = notifier
        self._pool = ThreadPoolExecutor(max_workers=settings.parallel, thread_name_prefix="staging")
        # An array's tasks share its inputs directory: one task fetches, the others find the files.
        self._locks: dict[Path, tuple[asyncio.Lock, int]] = {}  # lock, how many jobs use it
        self._stops: set[threading.Event] = set()
        self._s3: Any = None
        self._s3_lock = threading.Lock()
        self._tls = ssl.create_default_context(cafile=certifi.where())
        if settings.https_ca_file is not None:
            self._tls.load_verify_locations(cafile=settings.https_ca_file)

    # -- stage in ---------------------------------------------------------------------------------------

    async def fetch_inputs(self, job: JobLaunch) -> None:
        """Fetch every URL or inline input of ``job`` into its inputs directory.

        Raises StagingError (the job fails with ``stage_in_failed``) or StagingStopped (it was canceled
        or requeued meanwhile). Inputs already there (an array's earlier task, an earlier attempt) are
        kept: a file is only ever renamed into place complete and verified.
        """
        items = staged_inputs(job.spec)
        if not items:
            return
        key = job.inputs_dir
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                await self._run(
                    job, JobState.STAGING_IN, "Fetching inputs", len(items), self._fetch_all, job, items
                )
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def _fetch_all(self, meter: _Meter, job: JobLaunch, items: list[InputSpec]) -> None:
        for index, item in enumerate(items, 1):
            meter.index = index
            target = job.inputs_dir / item.path
            if target.exists():
                continue
            if item.url is not None:
                check_url(item.url, self._settings, directory=item.type == "directory")
            if item.content is not None:
                data = item.content.encode()
                meter.expect(len(data))
                _write_file(iter([data]), target, item.sha256, meter)
            elif item.type == "directory":
                self._fetch_directory(item, target, meter)
            else:
                assert item.url is not None
                fetch = partial(self._fetch_file, item.url, target, item.sha256, meter)
                self._retrying(f"fetching {item.url}", meter, fetch)

    def _fetch_file(
        self, url: str, target: Path, sha256: str | None, meter: _Meter, *, counted: bool = False
    ) -> None:
        """One file, one try. ``counted``: its size is in the meter's total already."""
        with self._reader(url) as (size, chunks):
            if size is not None and not counted:
                meter.expect(size)
                _check_space(target.parent, size, url)
            _write_file(chunks, target, sha256, meter, expected_size=size)

    def _fetch_directory(self, item: InputSpec, target: Path, meter: _Meter) -> None:
        assert item.url is not None
        listing = self._retrying(f"listing {item.url}", meter, partial(self._list, item.url))
        total = sum(size for _, _, size in listing)
        _check_space(target.parent, total, item.url)
        meter.expect(total)
        part = target.with_name(f".{target.name}.part")
        shutil.rmtree(part, ignore_errors=True)
        try:
            part.mkdir(parents=True, mode=0o700)
            for rel, url, _ in listing:
                fetch = partial(self._fetch_file, url, part / rel, None, meter, counted=True)
                self._retrying(f"fetching {url}", meter, fetch)
            os.replace(part, target)
        except BaseException:
            shutil.rmtree(part, ignore_errors=True)
            raise

    # -- stage out --------------------------------------------------------------------------------------

    async def deliver_outputs(self, job: JobLaunch, owner_uid: int | None = None) -> None:
        """Send each ``outputs`` entry of ``job`` from its outputs directory to its URL.

        ``owner_uid``: where the core runs as root, files written through ``file://`` are given to the
        job's Unix account. Raises StagingError (the job fails with ``stage_out_failed``).
        """
        if not job.spec.outputs:
            return
        owner = _owner_ids(owner_uid)
        await self._run(
            job,
            JobState.STAGING_OUT,
            "Delivering outputs",
            len(job.spec.outputs),
            self._deliver_all,
            job,
            owner,
        )

    def _deliver_all(self, meter: _Meter, job: JobLaunch, owner: tuple[int, int] | None) -> None:
        plan: list[tuple[Path, str]] = []
        for out in job.spec.outputs:
            check_url(out.url, self._settings)  # writing needs no listing: each file is sent
            plan += _deliveries(out, job.outputs_dir)
        meter.count = len(plan)
        for source, _ in plan:
            meter.expect(source.stat().st_size)
        for index, (source, url) in enumerate(plan, 1):
            meter.index = index
            what = f"delivering {source.relative_to(job.outputs_dir)} to {url}"
            self._retrying(what, meter, partial(self._deliver_file, source, url, meter, owner))

    def _deliver_file(self, source: Path, url: str, meter: _Meter, owner: tuple[int, int] | None) -> None:
        size = source.stat().st_size
        scheme = _scheme(url)
        if scheme == "file":
            _put_local(source, file_path(url, self._settings), meter, owner)
        elif scheme == "s3":
            self._put_s3(source, _s3_key(url, self._settings), size, meter)
        else:
            self._put_http(source, url, size, meter)

    # -- running transfers off the loop, with progress ------------------------------------------------

    async def _run(
        self,
        job: JobLaunch,
        state: JobState,
        verb: str,
        count: int,
        work: Callable[..., None],
        *args: Any,
    ) -> None:
        stop = threading.Event()
        meter = _Meter(verb, stop, count=count)
        self._stops.add(stop)
        finished = asyncio.Event()
        reporter = asyncio.create_task(self._report(job, state, meter, finished))
        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, lambda: work(meter, *args))
        except asyncio.CancelledError:
            stop.set()  # the thread sees it at its next chunk
            raise
        except (StagingError, StagingStopped):
            raise
        except _Transient as exc:
            raise StagingError(str(exc)) from exc
        except OSError as exc:
            raise StagingError(f"{exc.strerror or exc} ({exc.filename or 'the spool'})") from exc
        except Exception as exc:  # never leave a job stuck in staging: it fails, with the error's text
            log.exception("staging failed unexpectedly", job_id=job.job_id)
            raise StagingError(f"unexpected error: {type(exc).__name__}: {exc}") from exc
        finally:
            finished.set()
            await reporter
            self._stops.discard(stop)

    async def _report(self, job: JobLaunch, state: JobState, meter: _Meter, finished: asyncio.Event) -> None:
        """Record progress every ``progress_interval_s`` (less often as a long transfer goes on, so its
        history stays short); stop the transfer if the job is canceled or requeued meanwhile."""
        reason = "staging_in" if state is JobState.STAGING_IN else "staging_out"
        base = self._settings.progress_interval_s
        last = ""
        reports = 0
        while not finished.is_set():
            interval = min(base * 2 ** (reports // PROGRESS_DOUBLING), max(base, PROGRESS_MAX_INTERVAL_S))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), interval)
            if finished.is_set():
                return
            message = meter.message()
            try:
                if message != last:
                    last = message
                    reports += 1
                    going = await self._store.write(
                        _progress_event, job.job_id, job.attempt, state, reason, message, self._clock.now()
                    )
                    self._notifier.changed(job.job_id)
                else:  # nothing new to show: only look for a cancel
                    going = await self._store.read(
                        _progress_event, job.job_id, job.attempt, state, reason, None, self._clock.now()
                    )
            except Exception:
                log.exception("could not record staging progress", job_id=job.job_id)
                continue
            if not going and state is JobState.STAGING_IN:
                meter.stop.set()

    def _retrying(self, what: str, meter: _Meter, attempt: Callable[[], T]) -> T:
        """Run ``attempt`` until it succeeds, retrying transient errors with doubling waits."""
        tries = self._settings.attempts
        for number in range(1, tries + 1):
            done, total = meter.done, meter.total
            try:
                return attempt()
            except _Transient as exc:
                meter.rewind(done, total)
                if number == tries:
                    raise StagingError(f"{what} failed: {exc} (gave up after {tries} attempts)") from exc
                delay = self._settings.backoff_s * 2 ** (number - 1)
                log.info("transient staging error; retrying", what=what, error=str(exc), delay=delay)
                if meter.stop.wait(delay):
                    raise StagingStopped("stopped") from exc
            except StagingError as exc:
                raise StagingError(f"{what} failed: {exc}") from exc
            except OSError as exc:
                raise StagingError(f"{what} failed: {exc.strerror or exc}") from exc
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Tell running transfers to stop and release the threads."""
        for stop in list(self._stops):
            stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- sources --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _reader(self, url: str) -> Iterator[tuple[int | None, Iterator[bytes]]]:
        """(size if known, chunks) of the file at ``url``."""
        scheme = _scheme(url)
        if scheme == "file":
            path = file_path(url, self._settings)
            if not path.is_file():
                raise StagingError("no such file" if not path.exists() else "not a regular file")
            with open(path, "rb") as f:
                yield os.fstat(f.fileno()).st_size, _file_chunks(f)
        elif scheme == "s3":
            key = _s3_key(url, self._settings)
            fs = self._s3fs()
            try:
                size = int(fs.info(key)["size"])
                with fs.open(key, "rb", block_size=CHUNK_BYTES, cache_type="none") as f:
                    yield size, _file_chunks(f)
            except (StagingError, StagingStopped, _Transient):
                raise
            except Exception as exc:
                raise _s3_error(exc) from exc
        else:
            with self._http() as client:
                try:
                    with client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as r:
                        _check_status(r)
                        length = r.headers.get("content-length")
                        if r.headers.get("content-encoding", "identity") != "identity":
                            length = None  # decoded as it comes: its length is not the file's
                        yield (int(length) if length else None), r.iter_bytes(CHUNK_BYTES)
                except httpx.TransportError as exc:
                    raise _Transient(_http_reason(exc)) from exc

    def _list(self, url: str) -> list[tuple[str, str, int]]:
        """(relative path, URL, size) of every file under the directory ``url``."""
        scheme = _scheme(url)
        if scheme == "file":
            root = file_path(url, self._settings)
            if not root.is_dir():
                raise StagingError(f"{url}: no such directory")
            found = []
            for dirpath, _, names in os.walk(root):
                for name in sorted(names):
                    path = Path(dirpath) / name
                    if path.is_symlink() or not path.is_file():
                        continue  # a link could lead outside the allowed roots
                    rel = path.relative_to(root).as_posix()
                    found.append((rel, f"{url.rstrip('/')}/{quote(rel)}", path.stat().st_size))
            return sorted(found)
        if scheme == "s3":
            prefix = _s3_key(url, self._settings)
            try:
                listing = self._s3fs().find(prefix, detail=True)
            except Exception as exc:
                raise _s3_error(exc) from exc
            found = []
            for key, info in sorted(listing.items()):
                rel = key[len(prefix) :].lstrip("/")
                if info.get("type") != "file" or not rel or key.endswith("/"):
                    continue
                if ".." in PurePosixPath(rel).parts:
                    continue
                found.append((rel, f"{url.rstrip('/')}/{rel}", int(info["size"])))
            if not found:
                raise StagingError(f"{url}: no objects under this prefix")
            return found
        check_url(url, self._settings, directory=True)
        raise AssertionError("unreachable")

    # -- destinations -----------------------------------------------------------------------------------

    def _put_s3(self, source: Path, key: str, size: int, meter: _Meter) -> None:
        fs = self._s3fs()
        part = max(S3_PART_BYTES, -(-size // S3_MAX_PARTS))
        with open(source, "rb") as f:
            try:
                out = fs.open(key, "wb", block_size=part)
                try:
                    for chunk in _file_chunks(f):
                        out.write(chunk)
                        meter.add(len(chunk))
                except BaseException:
                    out.discard()  # abort the upload: never leave a partial object behind
                    raise
                out.close()
                stored = int(fs.info(key, refresh=True)["size"])
            except (StagingError, StagingStopped, _Transient):
                raise
            except Exception as exc:
                raise _s3_error(exc) from exc
        if stored != size:
            raise StagingError(f"the stored object has {stored} bytes, not {size}")

    def _put_http(self, source: Path, url: str, size: int, meter: _Meter) -> None:
        def body() -> Iterator[bytes]:
            with open(source, "rb") as f:
                for chunk in _file_chunks(f):
                    meter.add(len(chunk))
                    yield chunk

        with self._http() as client:
            try:
                r = client.put(url, content=body(), headers={"Content-Length": str(size)})
                _check_status(r)
                head = client.head(url)
            except httpx.TransportError as exc:
                raise _Transient(_http_reason(exc)) from exc
        stored = head.headers.get("content-length") if head.is_success else None
        if stored is not None and int(stored) != size:
            raise StagingError(f"the server has {stored} bytes, not {size}")

    # -- clients ----------------------------------------------------------------------------------------

    def _http(self) -> httpx.Client:
        return httpx.Client(
            verify=self._tls,
            timeout=httpx.Timeout(self._settings.timeout_s),
            follow_redirects=True,
        )

    def _s3fs(self) -> Any:
        with self._s3_lock:
            if self._s3 is None:
                import s3fs

                client_kwargs: dict[str, Any] = {}
                if self._settings.s3_region:
                    client_kwargs["region_name"] = self._settings.s3_region
                self._s3 = s3fs.S3FileSystem(
                    endpoint_url=self._settings.s3_endpoint_url,
                    client_kwargs=client_kwargs,
                    skip_instance_cache=True,
                )
            return self._s3


# -- helpers that run in transfer threads -----------------------------------------------------------------


def _file_chunks(f: Any) -> Iterator[bytes]:
    while chunk := f.read(CHUNK_BYTES):
        yield chunk


def _write_file(
    chunks: Iterator[bytes],
    target: Path,
    sha256: str | None,
    meter: _Meter,
    *,
    expected_size: int | None = None,
) -> None:
    """Stream ``chunks`` to ``target`` through a ``.part`` file, hashing; verify size and checksum."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    part = target.with_name(f".{target.name}.part")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(part, "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            for chunk in chunks:
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
                meter.add(len(chunk))
        if expected_size is not None and size != expected_size:
            raise _Transient(f"the transfer ended after {size} of {expected_size} bytes")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise StagingError(
                f"checksum mismatch: its SHA-256 is {digest.hexdigest()} but the job expects {sha256}; "
                "nothing was kept"
            )
        os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _put_local(source: Path, target: Path, meter: _Meter, owner: tuple[int, int] | None) -> None:
    """Copy ``source`` to ``target`` through a ``.part`` file, owned by ``owner`` where we are root."""
    _check_may_write(target, owner)
    _make_dirs(target.parent, owner)
    part = target.with_name(f".{target.name}.part")
    size = 0
    try:
        with open(source, "rb") as src, open(part, "wb") as dst:
            if owner is not None:
                os.fchown(dst.fileno(), *owner)
            for chunk in _file_chunks(src):
                dst.write(chunk)
                size += len(chunk)
                meter.add(len(chunk))
        stored = part.stat().st_size
        if stored != size or size != source.stat().st_size:
            raise StagingError(f"wrote {stored} bytes, not {source.stat().st_size}")
        os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _check_may_write(target: Path, owner: tuple[int, int] | None) -> None:
    """A root core writes only where the job's own account could: into a directory it may write, and
    never over a file of another account (``file_roots`` may be shared by many users)."""
    if owner is None:
        return
    uid, gid = owner
    if target.exists() and target.stat().st_uid != uid:
        raise StagingError(f"{target} exists and belongs to another account")
    directory = target.parent
    while not directory.exists():
        directory = directory.parent
    try:
        groups = set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        groups = {gid}
    st = directory.stat()
    if not (
        (st.st_uid == uid and st.st_mode & 0o200)
        or (st.st_gid in groups and st.st_mode & 0o020)
        or st.st_mode & 0o002
    ):
        raise StagingError(f"the job's Unix account may not write in {directory}")


def _make_dirs(path: Path, owner: tuple[int, int] | None) -> None:
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        if owner is not None:
            os.chown(directory, *owner)


def _owner_ids(uid: int | None) -> tuple[int, int] | None:
    """(uid, gid) to give written files to, when the core is root and the job ran as another account."""
    if uid is None or os.geteuid() != 0:
        return None
    try:
        return uid, pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid, uid


def _check_space(directory: Path, size: int, url: str) -> None:
    existing = directory
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if size > free:
        raise StagingError(
            f"{url} is {_mb(size)} but the core's spool has {_mb(free)} free; ask the operator for space"
        )


def _deliveries(out: OutputSpec, outputs_dir: Path) -> list[tuple[Path, str]]:
    """(file in the outputs directory, URL to send it to) for one ``outputs`` entry."""
    base = out.url.rstrip("/")

    def join(rel: str) -> str:
        return f"{base}/{rel}" if _scheme(out.url) == "s3" else f"{base}/{quote(rel)}"

    if glob.has_magic(out.path):
        prefix = PurePosixPath(out.path_prefix.strip("/") if out.path_prefix else _glob_base(out.path))
        found: list[tuple[Path, str]] = []
        for match in sorted(glob.glob(out.path, root_dir=outputs_dir, recursive=True)):
            for path in _files_under(outputs_dir / match):
                rel = PurePosixPath(path.relative_to(outputs_dir).as_posix())
                pruned = rel.relative_to(prefix) if prefix.parts and rel.is_relative_to(prefix) else rel
                found.append((path, join(pruned.as_posix())))
        return found
    path = outputs_dir / out.path
    if out.type == "directory":
        if not path.is_dir():
            raise StagingError(f"output directory {out.path!r} was not found in the working directory")
        return [(f, join(f.relative_to(path).as_posix())) for f in _files_under(path)]
    if not path.is_file():
        raise StagingError(f"output file {out.path!r} was not found in the working directory")
    return [(path, out.url)]


def _glob_base(pattern: str) -> str:
    """The directory part of a glob before its first wildcard: ``results/*.csv`` -> ``results``."""
    parts: list[str] = []
    for part in PurePosixPath(pattern).parts[:-1]:
        if glob.has_magic(part):
            break
        parts.append(part)
    return "/".join(parts)


def _files_under(path: Path) -> list[Path]:
    if path.is_symlink():
        return []
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _check_status(r: httpx.Response) -> None:
    if r.is_success:
        return
    text = f"the server answered {r.status_code} {r.reason_phrase}"
    if r.status_code >= 500 or r.status_code in (408, 429):
        raise _Transient(text)
    raise StagingError(text)


def _http_reason(exc: httpx.TransportError) -> str:
    kind = {
        httpx.ConnectError: "cannot connect",
        httpx.ConnectTimeout: "connecting timed out",
        httpx.ReadTimeout: "no data for too long",
        httpx.WriteTimeout: "sending timed out",
        httpx.RemoteProtocolError: "the connection broke",
        httpx.ReadError: "the connection broke",
    }.get(type(exc), "transfer error")
    return f"{kind}: {exc}" if str(exc) else kind


def _s3_error(exc: BaseException) -> Exception:
    """What an exception from s3fs means for us: a permanent refusal, or worth another try."""
    if isinstance(exc, FileNotFoundError):
        return StagingError("no such object in the bucket")
    if isinstance(exc, PermissionError):
        return StagingError("access denied (the core's AWS credentials may not read or write it)")
    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError | TimeoutError):
        return StagingError(f"{type(exc).__name__}: {exc}")
    return _Transient(f"{type(exc).__name__}: {exc}")
