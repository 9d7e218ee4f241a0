"""Job commands of ``skyport`` (submit, jobs, show, logs, wait, cancel, requeue, events, download).

Every command reads with :func:`client` and :func:`call` and prints with :func:`emit`: the API's JSON with
``--json``, else a table or a few lines for a person. Job output goes to stdout byte for byte; status,
progress and errors go to stderr, so ``skyport logs ID > out.txt`` and ``JOB=$(skyport submit job.sh)``
capture exactly what they should.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from skyport.cli import render
from skyport.cli.output import err_console, fail
from skyport.cli.submitting import ARGV_KEY, Overrides, SubmitCommand, build_spec, check_inputs
from skyport.client import ApiError, Client, ClientConfig, ClientError, ConfigError
from skyport.client.api import dumps
from skyport.models import ArrayJob, Job, JobState

T = TypeVar("T")

console = Console()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's JSON (full ids) instead of a table")]
JobId = Annotated[
    str,
    typer.Argument(
        metavar="ID", help="Job id, in full (as `skyport submit` or `skyport jobs --json` print it)"
    ),
]

#: How long one wait request lasts: short when someone watches the status line, long otherwise.
LIVE_POLL_S = 2.0
QUIET_POLL_S = 30.0
HINTS = {
    401: "is your certificate valid and not revoked? (SKYPORT_USER, SKYPORT_CERT, SKYPORT_KEY)",
    403: "this needs a role or ownership you do not have; ask an admin",
}


@contextmanager
def client() -> Iterator[Client]:
    try:
        config = ClientConfig.load()
    except ConfigError as exc:
        fail(escape(str(exc)))
    with Client(config) as c:
        yield c


def call(fn: Callable[[], T]) -> T:
    """Run a client call; turn its errors into a message and a next step."""
    try:
        return fn()
    except ApiError as exc:
        fail(escape(str(exc)), hint=HINTS.get(exc.status), code=2 if exc.status < 500 else 1)
    except ClientError as exc:
        fail(escape(str(exc)))


def emit(data: Any, json_out: bool, show: Callable[[Any], RenderableType], empty: str = "") -> None:
    """``data`` as the API's JSON, or rendered for a person (``no <empty>`` for an empty list)."""
    if json_out:
        sys.stdout.write(dumps(data) + "\n")  # models exactly as the API serialises them
    elif empty and not data:
        console.print(render.empty(empty))
    else:
        console.print(show(data))


def query(
    fetch: Callable[[Client], T], show: Callable[[T], RenderableType], json_out: bool, empty: str = ""
) -> T:
    """The usual command: load the client, make one call, print its result."""
    with client() as c:
        data = call(partial(fetch, c))
    emit(data, json_out, show, empty)
    return data


# --- waiting and streaming ------------------------------------------------------------------------------


@dataclass
class _Status:
    """The live status line: rendered on every refresh, so its clock ticks between two replies."""

    job: Job

    def __rich__(self) -> Text:
        job = self.job
        waited = render.duration((datetime.now(job.submit_time.tzinfo) - job.submit_time).total_seconds())
        line = Text.assemble(f"job {job.id}  ", render.state(job.state))
        if job.state_details:
            line.append(f"  {job.state_details}")
        line.append(f"  ({waited} since submit)", style="dim")
        return line


def watch(c: Client, job: Job, timeout: float | None = None) -> Job:
    """Wait until the job ends (or ``timeout`` s pass), with a live status line on a terminal."""
    deadline = None if timeout is None else time.monotonic() + timeout
    poll = LIVE_POLL_S if err_console.is_terminal else QUIET_POLL_S
    status = _Status(job)
    try:
        with err_console.status(status):
            while not job.state.terminal:
                left = poll if deadline is None else min(poll, deadline - time.monotonic())
                if left <= 0:
                    break
                job = status.job = call(partial(c.wait, job.id, timeout=left))
    except KeyboardInterrupt:
        _interrupted(job.id)
    return job


def _interrupted(job_id: str) -> NoReturn:
    fail(
        f"interrupted; job {job_id} keeps running",
        hint=f"wait again: skyport wait {job_id}   stop it: skyport cancel {job_id}",
        code=130,
    )


def finish(job: Job, json_out: bool, *, quiet: bool = False) -> None:
    """Report how the job ended; exit 0 if it completed, 1 if not (or not yet)."""
    if json_out:
        emit(job, json_out, render.job)
    if job.state is JobState.COMPLETED:
        if not (json_out or quiet):
            ran = f" after {render.duration(job.duration)}" if job.start_time else ""
            console.print(Text.assemble(f"✓ job {job.id} ", render.state(job.state), ran))
        return
    if not job.state.terminal:
        fail(
            f"job {job.id} is still {escape(render.outcome(job))}", hint=f"skyport wait {job.id} to wait more"
        )
    hint = f"see what it wrote: skyport logs {job.id} --stderr" if job.state is JobState.FAILED else None
    fail(f"job {job.id} {escape(render.outcome(job))}", hint=hint)


def _write(chunks: Iterable[bytes], stream: str, json_out: bool) -> None:
    """Copy log bytes to stdout as they come; as JSON lines ``{"stream", "text"}`` with ``--json``."""
    out = sys.stdout.buffer
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in chunks:
        if json_out:
            if text := decoder.decode(chunk):
                print_json_line({"stream": stream, "text": text})
        else:
            out.write(chunk)
            out.flush()
    if json_out and (rest := decoder.decode(b"", final=True)):
        print_json_line({"stream": stream, "text": rest})


def print_json_line(data: dict[str, str]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def last_lines(data: bytes, count: int) -> bytes:
    return b"".join(data.splitlines(keepends=True)[-count:]) if count > 0 else b""


def _tail(c: Client, job_id: str, stream: str, count: int) -> bytes:
    """The last ``count`` lines, reading only as much of the end of the log as they need."""
    want = max(4096, count * 256)
    while True:
        data = call(partial(c.log, job_id, stream, tail=want))
        if len(data) < want or data.count(b"\n") > count:
            return last_lines(data, count)
        want *= 4


# --- commands -------------------------------------------------------------------------------------------


def submit(
    ctx: typer.Context,
    script: Annotated[
        Path | None,
        typer.Argument(metavar="SCRIPT", help="Job script (with #SWM directives)", show_default=False),
    ] = None,
    inputs: Annotated[
        list[Path] | None, typer.Option("--input", "-i", help="File to send with the job (repeatable)")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Wait for the end and print the job's output")
    ] = False,
    name: Annotated[str | None, typer.Option(help="Job name")] = None,
    cpus: Annotated[int | None, typer.Option(help="CPUs per node")] = None,
    gpus: Annotated[int | None, typer.Option(help="GPUs per node")] = None,
    mem: Annotated[str | None, typer.Option(help="Memory per node, e.g. 512M, 4G")] = None,
    walltime: Annotated[str | None, typer.Option(help="Time limit, [[D-]HH:]MM:SS, e.g. 30:00")] = None,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", "-e", help="K=V, or K to pass this shell's value (repeatable)"),
    ] = None,
    outputs: Annotated[
        list[str] | None,
        typer.Option("--output", "-o", help="File the job writes, to bring back (repeatable)"),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Submit a job script, or a command given after --; print the job id.

    Options override the script's #SWM directives of the same name.

    Example: [bold]skyport submit job.sh --input data.csv --wait[/bold]

    Example: [bold]skyport submit --cpus 4 --mem 8G -- python train.py --epochs 3[/bold]
    """
    overrides = Overrides(name, cpus, gpus, mem, walltime, env or (), outputs or ())
    spec = build_spec(script, ctx.meta.get(ARGV_KEY), overrides)
    files = inputs or []
    check_inputs(spec, files)
    with client() as c:
        job = call(partial(c.submit, spec, inputs=files))
        if job.array_id:  # an array job: its id names it; its tasks are listed with `jobs --array`
            emit(
                call(lambda: c.array(job.array_id)),
                json_out,
                lambda a: Text(a.id, no_wrap=True, overflow="ignore"),
            )
            if not json_out:
                err_console.print(
                    f"[dim]array job: `skyport jobs --array {job.array_id}` lists its tasks[/dim]"
                )
            return
        if not wait:
            emit(job, json_out, lambda j: Text(j.id, no_wrap=True, overflow="ignore"))
            return
        err_console.print(f"[dim]submitted job {job.id}[/dim]")
        job = watch(c, job)
        if not json_out:  # what it printed, where it printed it, as if it had run here
            for stream, out in (("stdout", sys.stdout), ("stderr", sys.stderr)):
                out.buffer.write(call(partial(c.log, job.id, stream)))
                out.flush()
    finish(job, json_out, quiet=True)


def jobs(
    states: Annotated[
        list[JobState] | None, typer.Option("--state", "-s", help="Only jobs in this state (repeatable)")
    ] = None,
    user: Annotated[str | None, typer.Option("--user", "-u", help="Only this user's jobs (admins)")] = None,
    name: Annotated[str | None, typer.Option("--name", "-n", help="Only jobs with this name")] = None,
    array: Annotated[str | None, typer.Option("--array", help="The tasks of this array job")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Jobs per page")] = 100,
    all_pages: Annotated[
        bool, typer.Option("--all", "-a", help="All matching jobs, page after page")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """List jobs, yours (or everyone's, for admins); an array job is one line (--array ID: its tasks).

    Example: [bold]skyport jobs --state running --state queued[/bold]

    Example: [bold]skyport jobs --array 5c1f6a7b-0b6e-4a8e-9d27-3f1e9f2c8c90[/bold]
    """
    # Array tasks are listed with their array (--array), not one by one among the other jobs.
    tasks = None if array else False
    fetch = partial(Client.jobs, states=states, name=name, user=user, limit=limit, array=array, tasks=tasks)
    with client() as c:
        page = call(partial(fetch, c))
        items = list(page.items)
        while all_pages and page.next:
            page = call(partial(fetch, c, after=page.next))
            items += page.items
        arrays = [] if array or json_out or states or name else call(lambda: c.arrays(limit=limit))
    if items or not arrays:
        emit(items, json_out, render.jobs, "jobs")
    if arrays:
        console.print(render.arrays(arrays))
    if page.next:
        err_console.print(f"[dim]showing the first {len(items)} jobs: --all for every one[/dim]")


def show(job_id: JobId, json_out: JsonOpt = False) -> None:
    """Show everything about one job, or an array job's tasks by state.

    Example: [bold]skyport show 0b6e9f2c-3f1e-4a8e-9d27-5c1f6a7b8c90[/bold]
    """
    with client() as c:
        found: Job | ArrayJob = call(
            lambda: _job_or_array(job_id, lambda: c.job(job_id), lambda: c.array(job_id))
        )
    emit(found, json_out, render.job if isinstance(found, Job) else render.array)


def _job_or_array(
    some_id: str, as_job: Callable[[], Job], as_array: Callable[[], ArrayJob]
) -> Job | ArrayJob:
    """A job by its id, or else an array job by its id (they share the same id space of UUIDs)."""
    try:
        return as_job()
    except ApiError as not_a_job:
        if not_a_job.status != 404:
            raise
        try:
            return as_array()
        except ApiError as not_an_array:
            if not_an_array.status == 404:
                raise not_a_job from None  # neither: say so as for a job
            raise


def logs(
    job_id: JobId,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends")] = False,
    stderr: Annotated[
        bool, typer.Option("--stderr", help="Standard error instead of standard output")
    ] = False,
    tail: Annotated[int | None, typer.Option("--tail", "-n", min=0, help="Only the last N lines")] = None,
    json_out: Annotated[bool, typer.Option("--json", help='JSON lines {"stream", "text"}')] = False,
) -> None:
    """Print a job's output, as it is now or (-f) as it grows.

    Example: [bold]skyport logs 0b6e9f2c-3f1e-4a8e-9d27-5c1f6a7b8c90 -f --tail 20[/bold]
    """
    stream = "stderr" if stderr else "stdout"
    with client() as c:
        if not follow:
            data = (
                _tail(c, job_id, stream, tail) if tail is not None else call(partial(c.log, job_id, stream))
            )
            _write([data], stream, json_out)
            return
        offset = 0
        if tail is not None:  # where the tail ends is where following starts
            data = call(partial(c.log, job_id, stream))
            offset = len(data)
            _write([last_lines(data, tail)], stream, json_out)
        try:
            call(lambda: _write(c.follow(job_id, stream, offset=offset), stream, json_out))
        except KeyboardInterrupt:
            raise SystemExit(130) from None


def wait(
    job_id: JobId,
    timeout: Annotated[float | None, typer.Option(min=0, help="Give up after this many seconds")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Wait until a job ends; exit 0 if it completed, 1 if it failed, was canceled or is still going.

    Example: [bold]skyport wait 0b6e9f2c-3f1e-4a8e-9d27-5c1f6a7b8c90 --timeout 3600[/bold]
    """
    with client() as c:
        job = watch(c, call(partial(c.job, job_id)), timeout)
    finish(job, json_out)


def cancel(job_id: JobId, json_out: JsonOpt = False) -> None:
    """Cancel a job: at once if it waits, after a grace period (SIGTERM, then SIGKILL) if it runs.

    Example: [bold]skyport cancel 0b6e9f2c-3f1e-4a8e-9d27-5c1f6a7b8c90[/bold]
    """
    with client() as c:
        found = call(lambda: _job_or_array(job_id, lambda: c.cancel(job_id), lambda: c.cancel_array(job_id)))
    emit(found, json_out, _canceled if isinstance(found, Job) else _array_canceled)


def _array_canceled(array: ArrayJob) -> Text:
    return Text(
        f"✓ array job {array.id}: queued tasks canceled, running ones stopping ({render.counts(array)})"
    )


def _canceled(job: Job) -> Text:
    if job.state is JobState.CANCELED:
        return Text.assemble(f"✓ job {job.id} is ", render.state(job.state))
    if job.state.terminal:
        return Text(f"job {job.id} had already ended ({job.state}); nothing to cancel", style="yellow")
    return Text(
        f"✓ cancel requested: job {job.id} ({job.state}) is stopping; `skyport wait {job.id}` to see it end"
    )


def requeue(job_id: JobId, json_out: JsonOpt = False) -> None:
    """Run a job again, as a new attempt (a running job is stopped first).

    Example: [bold]skyport requeue 0b6e9f2c-3f1e-4a8e-9d27-5c1f6a7b8c90[/bold]
    """
    query(lambda c: c.requeue(job_id), _requeued, json_out)


def _requeued(job: Job) -> Text:
    if job.state is JobState.QUEUED and job.reason == "requeued":
        return Text(f"✓ job {job.id} requeued: attempt {job.attempt} is waiting to be scheduled")
    if job.state is JobState.QUEUED:
        return Text(
            f"job {job.id} has not run yet (attempt {job.attempt} is queued); nothing to requeue",
            style="yellow",
        )
    return Text(
        f"✓ requeue requested: job {job.id} ({job.state}) stops, then attempt {job.attempt + 1} is queued"
    )


def events(job_id: JobId, json_out: JsonOpt = False) -> None:
    """Show a job's history: every state change, with its reason.

    Example: [bold]skyport events 0b6e9f2c-3f1e-4a8e-9d27-5c1f6a7b8c90[/bold]
    """
    query(lambda c: c.events(job_id), render.events, json_out, "events")


def download(
    job_id: JobId,
    dest: Annotated[Path, typer.Argument(metavar="DEST", help="Directory to save into")] = Path("."),
    json_out: JsonOpt = False,
) -> None:
    """Save a job's output files (those it names with #SWM output-files or submit --output).

    Example: [bold]skyport download 0b6e9f2c-3f1e-4a8e-9d27-5c1f6a7b8c90 results/[/bold]
    """
    if dest.exists() and not dest.is_dir():
        fail(
            f"{escape(str(dest))} is not a directory", hint="give a directory to save the files into", code=2
        )
    with client() as c:
        job = call(partial(c.job, job_id))
        files = call(partial(c.outputs, job_id))
        if not files:
            _no_outputs(job)
        saved = []
        with _DownloadProgress(sum(int(f.get("size") or 0) for f in files)) as progress:
            for f in files:
                target = _target(dest, f["name"])
                with progress.file(f["name"], target, int(f.get("size") or 0)):
                    _save(c, job_id, f["name"], f.get("sha256", ""), target)
                saved.append({**f, "path": str(target)})
    emit(saved, json_out, render.outputs)


#: Downloads at least this big show a progress bar (when stderr is a terminal).
PROGRESS_BYTES = 8 * 1024 * 1024


class _DownloadProgress:
    """A progress bar over all files of a download: bytes, speed and time left, on stderr.

    The client streams each file straight to disk, so the bar follows the file's size on disk, looked at
    a few times a second by a watcher thread (never per chunk, and nothing at all when it is not shown).
    """

    def __init__(self, total: int) -> None:
        self._shown = err_console.is_terminal and total >= PROGRESS_BYTES
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=True,
            disable=not self._shown,
        )
        self._task = self._bar.add_task("Downloading", total=total)
        self._done = 0

    def __enter__(self) -> _DownloadProgress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(None, None, None)

    @contextmanager
    def file(self, name: str, target: Path, size: int) -> Iterator[None]:
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.2):
                with suppress(OSError):
                    self._bar.update(self._task, completed=self._done + target.stat().st_size)

        self._bar.update(self._task, description=escape(name))
        watcher = threading.Thread(target=watch, daemon=True) if self._shown else None
        if watcher is not None:
            watcher.start()
        try:
            yield
        finally:
            stop.set()
            if watcher is not None:
                watcher.join()
            self._done += size
            self._bar.update(self._task, completed=self._done)


def _target(dest: Path, name: str) -> Path:
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts:  # the core checks too; a client does not trust it
        fail(f"the core named an output file {escape(name)!r} outside the destination; not saved")
    return dest / relative


def _save(c: Client, job_id: str, name: str, digest: str, target: Path) -> Path:
    try:
        call(partial(c.download, job_id, name, target))
    except OSError as exc:
        fail(f"cannot save {escape(str(target))}: {exc.strerror}", hint="is the destination writable?")
    if digest and _sha256(target) != digest:
        fail(f"{escape(str(target))} does not match the checksum the core gave", hint="download it again")
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _no_outputs(job: Job) -> None:
    if not job.state.terminal:
        fail(
            f"job {job.id} is {job.state}: output files come back when it ends",
            hint=f"skyport wait {job.id}, then download again",
        )
    fail(
        f"job {job.id} has no output files",
        hint="name them with `#SWM output-files` in the script or `submit --output FILE`; "
        f"its printed output is in `skyport logs {job.id}`",
    )


COMMANDS: Sequence[tuple[Callable[..., None], dict[str, Any]]] = (
    (submit, {"cls": SubmitCommand}),
    (jobs, {}),
    (show, {}),
    (logs, {}),
    (wait, {}),
    (cancel, {}),
    (requeue, {}),
    (events, {}),
    (download, {}),
)


def register(app: typer.Typer) -> None:
    for command, options in COMMANDS:
        app.command(**options)(command)
