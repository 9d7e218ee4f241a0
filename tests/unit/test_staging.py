"""Data staging in the core (server/staging.py), in-process: sources, checks, retries, memory, outputs.

Transfers go to real servers started here (an HTTP server on a free port) and real files in the test's
own directories. The store is the one thing stubbed: a recorder of the progress events the stager would
write, which can also say "the job was canceled".
"""

from __future__ import annotations

import hashlib
import http.server
import os
import ssl
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from skyport.gates.base import JobLaunch
from skyport.models import JobSpec
from skyport.models.job import InputSpec, OutputSpec
from skyport.server.clock import SystemClock
from skyport.server.lifecycle.wakeup import JobNotifier
from skyport.server.settings import StagingSettings
from skyport.server.staging import (
    Stager,
    StagingError,
    StagingStopped,
    check_spec,
    input_paths,
    output_patterns,
    staged_inputs,
)

MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------------
# A real HTTP(S) server with files to serve, failures to inject and uploads to receive


@dataclass
class Resource:
    """What the server answers for one path: ``block`` repeated ``count`` times (so hundreds of MB
    cost no memory), after answering ``fail_first`` requests with ``fail_status``; ``pace_s`` between
    chunks makes a slow server."""

    block: bytes
    count: int = 1
    fail_first: int = 0
    fail_status: int = 503
    pace_s: float = 0.0
    hits: int = 0

    @property
    def size(self) -> int:
        return len(self.block) * self.count

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for _ in range(self.count):
            digest.update(self.block)
        return digest.hexdigest()


@dataclass
class DataServer:
    """``http.server`` on 127.0.0.1 and a free port, with TLS when given a context. GET and HEAD serve
    ``resources``; PUT stores the body in ``uploads`` unless ``put_status`` says otherwise."""

    tls: ssl.SSLContext | None = None
    resources: dict[str, Resource] = field(default_factory=dict)
    uploads: dict[str, bytes] = field(default_factory=dict)
    put_status: int = 201
    url: str = ""

    def __post_init__(self) -> None:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _resource(self) -> Resource | None:
                resource = server.resources.get(self.path)
                if resource is None:
                    self.send_error(404)
                    return None
                resource.hits += 1
                if resource.hits <= resource.fail_first:
                    self.send_error(resource.fail_status)
                    return None
                self.send_response(200)
                self.send_header("Content-Length", str(resource.size))
                self.end_headers()
                return resource

            def do_HEAD(self) -> None:
                if self.path in server.uploads:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(server.uploads[self.path])))
                    self.end_headers()
                    return
                self._resource()

            def do_GET(self) -> None:
                resource = self._resource()
                if resource is None:
                    return
                try:
                    for _ in range(resource.count):
                        self.wfile.write(resource.block)
                        if resource.pace_s:
                            time.sleep(resource.pace_s)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_PUT(self) -> None:
                length = int(self.headers["Content-Length"])
                body = self.rfile.read(length)
                if server.put_status >= 300:
                    self.send_error(server.put_status)
                    return
                server.uploads[self.path] = body
                self.send_response(server.put_status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        if self.tls is not None:
            self._httpd.socket = self.tls.wrap_socket(self._httpd.socket, server_side=True)
        scheme = "https" if self.tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> DataServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def add(self, path: str, resource: Resource) -> str:
        self.resources[path] = resource
        return self.url + path


# ---------------------------------------------------------------------------------------------------
# The stager with a recording store


class RecordingStore:
    """Stands in for the store: keeps each progress message; ``going=False`` means "canceled"."""

    def __init__(self) -> None:
        self.messages: list[tuple[float, str]] = []
        self.going = True

    async def write(
        self, fn: Any, job_id: str, attempt: int, state: Any, reason: str, msg: str, now: Any
    ) -> bool:
        self.messages.append((time.monotonic(), msg))
        return self.going

    async def read(self, fn: Any, *args: Any) -> bool:
        """Asked when there is nothing new to show: is the job still going?"""
        return self.going


def settings(tmp_path: Path, **values: Any) -> StagingSettings:
    base: dict[str, Any] = {"file_roots": [tmp_path / "shared"], "backoff_s": 0.01, "progress_interval_s": 60}
    (tmp_path / "shared").mkdir(exist_ok=True)
    return StagingSettings(**{**base, **values})


@pytest.fixture
def stager(tmp_path: Path) -> Iterator[Any]:
    """``stager(**settings)``: a Stager on a recording store , closed after the test."""
    made: list[Stager] = []

    def make(store: RecordingStore | None = None, **values: Any) -> Stager:
        store = store or RecordingStore()
        s = Stager(settings(tmp_path, **values), store, SystemClock(), JobNotifier())  # type: ignore[arg-type]
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def launch(tmp_path: Path, spec: JobSpec) -> JobLaunch:
    return JobLaunch(
        job_id="00000000-0000-4000-8000-000000000001",
        attempt=1,
        name="t",
        owner="alice",
        spec=spec,
        node_names=["n"],
        inputs_dir=tmp_path / "spool" / "inputs",
        outputs_dir=tmp_path / "spool" / "outputs",
        attempt_dir=tmp_path / "spool" / "attempt-1",
        input_paths=input_paths(spec),
        output_patterns=output_patterns(spec),
    )


@pytest.fixture
def server() -> Iterator[DataServer]:
    with DataServer() as s:
        yield s


def spec_with(*inputs: InputSpec, outputs: tuple[OutputSpec, ...] = ()) -> JobSpec:
    return JobSpec(command=["true"], inputs=list(inputs), outputs=list(outputs))


def files_in(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------
# Fetching inputs


async def test_a_large_input_streams_in_bounded_memory_and_is_verified(
    tmp_path: Path, stager: Any, server: DataServer
) -> None:
    """64 MiB through HTTP: Python's allocations stay a few MiB (chunks), and the checksum is verified."""
    data = Resource(os.urandom(MIB), count=64)
    url = server.add("/big.bin", data)
    job = launch(tmp_path, spec_with(InputSpec(path="big.bin", url=url, sha256=data.sha256())))
    s = stager()
    tracemalloc.start()
    try:
        await s.fetch_inputs(job)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    target = job.inputs_dir / "big.bin"
    assert target.stat().st_size == 64 * MIB
    assert peak < 8 * MIB, f"peak Python memory {peak / MIB:.1f} MiB for a 64 MiB transfer"
    assert files_in(job.inputs_dir) == ["big.bin"]  # no .part left


async def test_a_checksum_mismatch_fails_and_keeps_nothing(
    tmp_path: Path, stager: Any, server: DataServer
) -> None:
    url = server.add("/data.txt", Resource(b"not what you expect\n"))
    job = launch(tmp_path, spec_with(InputSpec(path="data.txt", url=url, sha256="0" * 64)))
    s = stager()
    with pytest.raises(StagingError) as err:
        await s.fetch_inputs(job)
    assert "checksum mismatch" in str(err.value) and url in str(err.value)
    assert "0" * 64 in str(err.value)
    assert files_in(job.inputs_dir) == []


async def test_transient_server_errors_are_retried(tmp_path: Path, stager: Any, server: DataServer) -> None:
    data = Resource(b"eventually\n", fail_first=2, fail_status=503)
    url = server.add("/flaky.txt", data)
    job = launch(tmp_path, spec_with(InputSpec(path="flaky.txt", url=url)))
    s = stager()
    await s.fetch_inputs(job)
    assert data.hits == 3
    assert (job.inputs_dir / "flaky.txt").read_bytes() == b"eventually\n"


async def test_a_server_that_keeps_failing_gives_up_with_the_reason(
    tmp_path: Path, stager: Any, server: DataServer
) -> None:
    data = Resource(b"never\n", fail_first=100, fail_status=503)
    url = server.add("/down.txt", data)
    job = launch(tmp_path, spec_with(InputSpec(path="down.txt", url=url)))
    s = stager(attempts=3)
    with pytest.raises(StagingError, match=r"503 Service Unavailable \(gave up after 3 attempts\)"):
        await s.fetch_inputs(job)
    assert data.hits == 3
    assert files_in(job.inputs_dir) == []


async def test_a_missing_file_is_not_retried(tmp_path: Path, stager: Any, server: DataServer) -> None:
    job = launch(tmp_path, spec_with(InputSpec(path="x", url=server.url + "/nothing-here")))
    s = stager()
    started = time.monotonic()
    with pytest.raises(StagingError, match="404"):
        await s.fetch_inputs(job)
    assert time.monotonic() - started < 5


async def test_a_refused_connection_is_retried_then_reported(tmp_path: Path, stager: Any) -> None:
    with DataServer() as gone:
        url = gone.url + "/x"
    job = launch(tmp_path, spec_with(InputSpec(path="x", url=url)))
    s = stager(attempts=2)
    with pytest.raises(StagingError, match=r"cannot connect.*gave up after 2 attempts"):
        await s.fetch_inputs(job)


async def test_inline_content_and_a_file_directory_are_placed(tmp_path: Path, stager: Any) -> None:
    shared = tmp_path / "shared" / "dataset"
    (shared / "sub").mkdir(parents=True)
    (shared / "a.txt").write_text("a\n")
    (shared / "sub" / "b.txt").write_text("b\n")
    (shared / "escape").symlink_to("/etc/passwd")  # a link could lead out of the allowed roots
    spec = spec_with(
        InputSpec(path="params.json", content='{"k": 1}'),
        InputSpec(path="data", url=f"file://{shared}", type="directory"),
    )
    job = launch(tmp_path, spec)
    s = stager()
    await s.fetch_inputs(job)
    assert files_in(job.inputs_dir) == ["data/a.txt", "data/sub/b.txt", "params.json"]
    assert (job.inputs_dir / "params.json").read_text() == '{"k": 1}'
    assert job.input_paths == ["params.json", "data"]


async def test_inputs_already_fetched_are_kept(tmp_path: Path, stager: Any, server: DataServer) -> None:
    """An array's tasks share one inputs directory: the second task does not fetch again."""
    data = Resource(b"once\n")
    url = server.add("/once.txt", data)
    s = stager()
    for _ in range(2):
        await s.fetch_inputs(launch(tmp_path, spec_with(InputSpec(path="once.txt", url=url))))
    assert data.hits == 1


async def test_progress_is_reported_at_a_bounded_rate(
    tmp_path: Path, stager: Any, server: DataServer
) -> None:
    data = Resource(os.urandom(64 * 1024), count=40, pace_s=0.02)  # ~0.8 s, 40 chunks
    url = server.add("/slow.bin", data)
    store = RecordingStore()
    job = launch(tmp_path, spec_with(InputSpec(path="slow.bin", url=url)))
    s = stager(store, progress_interval_s=0.2)
    started = time.monotonic()
    await s.fetch_inputs(job)
    elapsed = time.monotonic() - started
    assert store.messages, "no progress was reported"
    assert len(store.messages) <= elapsed / 0.2 + 1
    assert all(m.startswith("Fetching inputs: ") and " of 2.6 MB" in m for _, m in store.messages)


async def test_a_canceled_job_stops_its_transfer_and_keeps_nothing(
    tmp_path: Path, stager: Any, server: DataServer
) -> None:
    data = Resource(os.urandom(64 * 1024), count=1000, pace_s=0.01)  # would take ~10 s
    url = server.add("/long.bin", data)
    store = RecordingStore()
    store.going = False  # the first progress report learns that the job was canceled
    job = launch(tmp_path, spec_with(InputSpec(path="long.bin", url=url)))
    s = stager(store, progress_interval_s=0.1)
    started = time.monotonic()
    with pytest.raises(StagingStopped):
        await s.fetch_inputs(job)
    assert time.monotonic() - started < 5
    assert files_in(job.inputs_dir) == []


# ---------------------------------------------------------------------------------------------------
# What is allowed


def test_file_urls_are_refused_outside_the_allowed_roots(tmp_path: Path) -> None:
    allowed = settings(tmp_path)
    inside = spec_with(InputSpec(path="x", url=f"file://{tmp_path}/shared/x"))
    check_spec(inside, allowed)
    outside = spec_with(InputSpec(path="p", url="file:///etc/passwd"))
    with pytest.raises(StagingError, match=r"outside the directories .* staging\.file_roots"):
        check_spec(outside, allowed)
    sneaky = spec_with(InputSpec(path="p", url=f"file://{tmp_path}/shared/../../etc"))
    with pytest.raises(StagingError, match="outside"):
        check_spec(sneaky, allowed)
    with pytest.raises(StagingError, match=r"not enabled on this core.*staging\.file_roots"):
        check_spec(inside, StagingSettings())
    out = JobSpec(command=["true"], outputs=[OutputSpec(path="r.txt", url="file:///root/r.txt")])
    with pytest.raises(StagingError, match="outside"):
        check_spec(out, allowed)


def test_urls_that_cannot_work_are_refused_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(StagingError, match="cannot be listed"):
        check_spec(spec_with(InputSpec(path="d", url="https://h/d/", type="directory")), settings(tmp_path))
    with pytest.raises(StagingError, match=r"staging\.s3_buckets"):
        check_spec(spec_with(InputSpec(path="o", url="s3://bucket/o")), settings(tmp_path))
    check_spec(spec_with(InputSpec(path="o", url="s3://bucket/o")), settings(tmp_path, s3_buckets=["bucket"]))
    clash = JobSpec(command=["true"], input_files=["data"], inputs=[InputSpec(path="data/x", content="x")])
    with pytest.raises(StagingError, match="overwrite each other"):
        check_spec(clash, settings(tmp_path))


def test_urls_in_input_files_are_fetched_under_their_file_name() -> None:
    spec = JobSpec(script="#!/bin/sh\n", input_files=["local.txt", "https://example.org/data/x%20y.csv?v=2"])
    assert [(i.path, i.url) for i in staged_inputs(spec)] == [
        ("x y.csv", "https://example.org/data/x%20y.csv?v=2")
    ]
    assert input_paths(spec) == ["local.txt", "x y.csv"]
    with pytest.raises(StagingError, match="names no file"):
        staged_inputs(JobSpec(script="#!/bin/sh\n", input_files=["https://example.org/"]))


# ---------------------------------------------------------------------------------------------------
# Delivering outputs


def outputs_launch(tmp_path: Path, *outputs: OutputSpec) -> JobLaunch:
    job = launch(tmp_path, spec_with(outputs=outputs))
    results = job.outputs_dir / "results"
    (results / "deep").mkdir(parents=True)
    (results / "a.csv").write_text("a\n")
    (results / "deep" / "b.csv").write_text("b\n")
    (results / "notes.txt").write_text("n\n")
    return job


async def test_output_globs_are_delivered_to_a_file_directory(tmp_path: Path, stager: Any) -> None:
    dest = tmp_path / "shared" / "out"
    job = outputs_launch(
        tmp_path,
        OutputSpec(path="results/**/*.csv", url=f"file://{dest}/"),
        OutputSpec(path="results/notes.txt", url=f"file://{dest}/renamed.txt"),
    )
    assert job.output_patterns == ["results/**/*.csv", "results/notes.txt"]
    s = stager()
    await s.deliver_outputs(job)
    assert files_in(dest) == ["a.csv", "deep/b.csv", "renamed.txt"]
    assert (dest / "deep" / "b.csv").read_text() == "b\n"


async def test_outputs_go_by_http_put_and_a_refusal_is_an_error(
    tmp_path: Path, stager: Any, server: DataServer
) -> None:
    job = outputs_launch(tmp_path, OutputSpec(path="results", url=server.url + "/up", type="directory"))
    s = stager()
    await s.deliver_outputs(job)
    assert server.uploads == {"/up/a.csv": b"a\n", "/up/deep/b.csv": b"b\n", "/up/notes.txt": b"n\n"}
    server.put_status = 403
    with pytest.raises(StagingError, match=r"delivering results/a\.csv to .* failed: .*403"):
        await s.deliver_outputs(job)


async def test_a_missing_output_file_is_an_error(tmp_path: Path, stager: Any) -> None:
    job = outputs_launch(tmp_path, OutputSpec(path="missing.txt", url=f"file://{tmp_path}/shared/m.txt"))
    s = stager()
    with pytest.raises(StagingError, match=r"output file 'missing\.txt' was not found"):
        await s.deliver_outputs(job)
