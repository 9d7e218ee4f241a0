"""Data staging on a real core: inputs fetched from URLs before the start, outputs delivered after the end.

The core is a real ``skyport server`` subprocess (tests/support/core.py); the data lives on real servers
this module starts: an HTTP and an HTTPS server (the latter with a certificate of the core's own CA, which
the core is told to trust), and an S3 endpoint (moto in server mode, the ecosystem's own fake for what
cannot run here). Jobs run as ``nobody`` and report what they found in their working directory, so each
test checks what a user would: the job's output, its state, reason and text, and the files at the
destination.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from skyport.client import Client
from skyport.client.api import ApiError
from skyport.models import Job, JobSpec, JobState
from skyport.models.job import InputSpec, OutputSpec
from skyport.server.spool import Spool
from tests.support.core import CoreProcess, wait_for
from tests.unit.test_staging import DataServer, Resource

END_DEADLINE_S = 60.0
MIB = 1024 * 1024
BUCKET = "skyport-staging"
#: The 500 MB input: a random 1 MiB block, repeated (the server holds one block, not the file).
BIG_BLOCKS = 500


def ended(client: Client, job_id: str, timeout: float = END_DEADLINE_S) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        job = client.wait(job_id, timeout=max(0.0, min(left, 60.0)))
        if job.state.terminal:
            return job
        if left <= 0:
            raise AssertionError(f"job {job_id} is still {job.state.value}: {job.state_details}")


def script(*lines: str) -> str:
    return "\n".join(["#!/bin/sh", *lines]) + "\n"


# ---------------------------------------------------------------------------------------------------
# Servers and the core


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    """An S3 endpoint (moto's server, in-process on a free port) with one bucket."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    s3(url).create_bucket(Bucket=BUCKET)
    try:
        yield url
    finally:
        server.stop()


def s3(endpoint: str) -> object:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one directory the core allows for file:// URLs."""
    return tmp_path_factory.mktemp("file-root")


@pytest.fixture(scope="module")
def staging_core(tmp_path_factory: pytest.TempPathFactory, roots: Path, moto: str) -> Iterator[CoreProcess]:
    home = tmp_path_factory.mktemp("staging") / "home"
    process = CoreProcess(
        home,
        env={
            "SKYPORT_STAGING__FILE_ROOTS": json.dumps([str(roots)]),
            "SKYPORT_STAGING__S3_BUCKETS": json.dumps([BUCKET]),
            "SKYPORT_STAGING__S3_ENDPOINT_URL": moto,
            "SKYPORT_STAGING__S3_REGION": "us-east-1",
            "SKYPORT_STAGING__BACKOFF_S": "0.1",
            "SKYPORT_STAGING__PROGRESS_INTERVAL_S": "0.3",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        },
    )
    process.env["SKYPORT_STAGING__HTTPS_CA_FILE"] = str(home / "ca" / "ca.pem")
    process.start()
    try:
        yield process
    finally:
        process.cleanup()


@pytest.fixture(scope="module")
def client(staging_core: CoreProcess) -> Iterator[Client]:
    with staging_core.client("admin") as c:
        yield c


@pytest.fixture(scope="module")
def web() -> Iterator[DataServer]:
    with DataServer() as server:
        yield server


@pytest.fixture(scope="module")
def secure_web(staging_core: CoreProcess) -> Iterator[DataServer]:
    """HTTPS with a server certificate of the core's CA (the core trusts it through its settings)."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(staging_core.home / "server" / "cert.pem", staging_core.home / "server" / "key.pem")
    with DataServer(tls=tls) as server:
        yield server


def inputs_dir(core: CoreProcess, job_id: str) -> Path:
    return Spool(core.home / "spool").inputs(job_id)


def files_under(directory: Path) -> list[str]:
    if not directory.exists():
        return []
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------
# Inputs


def test_inputs_from_https_and_inline_are_in_the_workdir(client: Client, secure_web: DataServer) -> None:
    table = Resource(b"x,y\n1,2\n")
    url = secure_web.add("/data/table.csv", table)
    spec = JobSpec(
        script=script("cat in/table.csv params.txt"),
        inputs=[
            InputSpec(path="in/table.csv", url=url, sha256=hashlib.sha256(table.block).hexdigest()),
            InputSpec(path="params.txt", content="alpha=1\n"),
        ],
    )
    job = ended(client, client.submit(spec).id)
    assert job.state is JobState.COMPLETED, job.state_details
    assert client.log(job.id) == b"x,y\n1,2\nalpha=1\n"
    assert any(e.to_state is JobState.STAGING_IN for e in client.events(job.id))


def test_a_job_script_names_an_input_url(client: Client, web: DataServer) -> None:
    """``#SWM input-files`` may list URLs: each is fetched under its file name (jobscript.md)."""
    url = web.add("/genome/ref.fa", Resource(b">chr1\nACGT\n"))
    job = client.submit(script=script(f"#SWM input-files {url}", "cat ref.fa"))
    job = ended(client, job.id)
    assert job.state is JobState.COMPLETED, job.state_details
    assert client.log(job.id) == b">chr1\nACGT\n"


def test_a_file_url_inside_the_allowed_root_is_read(client: Client, roots: Path) -> None:
    (roots / "dataset" / "part").mkdir(parents=True)
    (roots / "dataset" / "part" / "1.txt").write_text("one\n")
    (roots / "dataset" / "2.txt").write_text("two\n")
    spec = JobSpec(
        script=script("cat d/part/1.txt d/2.txt"),
        inputs=[InputSpec(path="d", url=f"file://{roots}/dataset", type="directory")],
    )
    job = ended(client, client.submit(spec).id)
    assert job.state is JobState.COMPLETED, job.state_details
    assert client.log(job.id) == b"one\ntwo\n"


def test_file_urls_outside_the_allowed_roots_are_refused_at_submission(client: Client, roots: Path) -> None:
    for url in ("file:///etc/shadow", f"file://{roots}/../../etc/shadow"):
        spec = JobSpec(script=script("cat s"), inputs=[InputSpec(path="s", url=url)])
        with pytest.raises(ApiError) as err:
            client.submit(spec)
        assert err.value.status == 400
        assert "outside the directories" in str(err.value) and "staging.file_roots" in str(err.value)
    assert not [j for j in client.jobs().items if j.spec.inputs and "shadow" in str(j.spec.inputs[0].url)]


def test_a_checksum_mismatch_fails_the_job_and_keeps_no_file(
    client: Client, staging_core: CoreProcess, web: DataServer
) -> None:
    url = web.add("/tampered.bin", Resource(b"tampered\n"))
    spec = JobSpec(
        script=script("touch ran; cat data.bin"),
        inputs=[InputSpec(path="data.bin", url=url, sha256=hashlib.sha256(b"original\n").hexdigest())],
    )
    job = ended(client, client.submit(spec).id)
    assert job.state is JobState.FAILED
    assert job.reason == "stage_in_failed"
    assert "checksum mismatch" in job.state_details and url in job.state_details
    assert job.start_time is None  # it never ran
    assert files_under(inputs_dir(staging_core, job.id)) == []  # neither the file nor a .part


def test_a_transient_server_error_is_retried(client: Client, web: DataServer) -> None:
    flaky = Resource(b"worth the wait\n", fail_first=2, fail_status=503)
    url = web.add("/flaky.txt", flaky)
    job = ended(
        client, client.submit(JobSpec(script=script("cat f"), inputs=[InputSpec(path="f", url=url)])).id
    )
    assert job.state is JobState.COMPLETED, job.state_details
    assert client.log(job.id) == b"worth the wait\n"
    assert flaky.hits == 3


def test_a_server_that_stays_down_fails_the_job_with_its_answer(client: Client, web: DataServer) -> None:
    url = web.add("/down.txt", Resource(b"", fail_first=1000, fail_status=502))
    job = ended(
        client, client.submit(JobSpec(script=script("true"), inputs=[InputSpec(path="d", url=url)])).id
    )
    assert job.state is JobState.FAILED and job.reason == "stage_in_failed"
    assert "502" in job.state_details and "gave up after" in job.state_details


def test_an_arrays_tasks_share_one_fetch(client: Client, web: DataServer) -> None:
    shared = Resource(b"shared by all tasks\n")
    url = web.add("/array-input.txt", shared)
    spec = JobSpec(script=script("cat s.txt"), array="1-3", inputs=[InputSpec(path="s.txt", url=url)])
    first = client.submit(spec)
    tasks = client.jobs(array=first.array_id).items
    assert len(tasks) == 3
    for task in tasks:
        job = ended(client, task.id)
        assert job.state is JobState.COMPLETED, job.state_details
        assert client.log(job.id) == b"shared by all tasks\n"
    assert shared.hits == 1


def test_canceling_a_job_while_it_fetches_stops_the_transfer(
    client: Client, staging_core: CoreProcess, web: DataServer
) -> None:
    slow = Resource(os.urandom(64 * 1024), count=3000, pace_s=0.01)  # ~30 s if not stopped
    url = web.add("/slow.bin", slow)
    job = client.submit(JobSpec(script=script("true"), inputs=[InputSpec(path="slow.bin", url=url)]))
    wait_for(
        lambda: client.job(job.id).state_details.startswith("Fetching inputs:"), 30, "progress to be shown"
    )
    client.cancel(job.id)
    job = ended(client, job.id, timeout=15)
    assert job.state is JobState.CANCELED
    assert job.start_time is None
    assert files_under(inputs_dir(staging_core, job.id)) == []


def vm_hwm(pid: int) -> int:
    """Peak resident memory of a process, bytes (``VmHWM`` in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_a_500_mb_input_is_staged_in_bounded_memory_with_a_verified_checksum(
    client: Client, staging_core: CoreProcess, web: DataServer
) -> None:
    big = Resource(os.urandom(MIB), count=BIG_BLOCKS)
    url = web.add("/big.bin", big)
    digest = big.sha256()
    # Warm up: the core's staging path has run once, so its one-time costs are in the baseline.
    warm = web.add("/warm.bin", Resource(b"w" * 1000))
    assert ended(
        client, client.submit(JobSpec(command=["true"], inputs=[InputSpec(path="w", url=warm)])).id
    ).state
    assert staging_core.proc is not None
    before = vm_hwm(staging_core.proc.pid)
    spec = JobSpec(
        script=script("stat -c %s big.bin; sha256sum big.bin | cut -d' ' -f1"),
        inputs=[InputSpec(path="big.bin", url=url, sha256=digest)],
    )
    job = client.submit(spec)
    try:
        job = ended(client, job.id, timeout=180)
        after = vm_hwm(staging_core.proc.pid)
        assert job.state is JobState.COMPLETED, job.state_details
        assert client.log(job.id).decode().split() == [str(BIG_BLOCKS * MIB), digest]
        grew = after - before
        assert grew < 100 * MIB, f"the core's peak memory grew by {grew / MIB:.0f} MiB for a 500 MiB input"
        progress = [e.message for e in client.events(job.id) if e.message.startswith("Fetching inputs:")]
        assert progress, "no progress was shown while fetching"
        assert progress[-1].endswith(f"of {BIG_BLOCKS * MIB / 1e6:.0f} MB")
    finally:
        shutil.rmtree(inputs_dir(staging_core, job.id), ignore_errors=True)
        shutil.rmtree(staging_core.workroot / f"{job.id}.1", ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Outputs


def test_output_globs_are_delivered_to_a_file_url_as_the_jobs_account(client: Client, roots: Path) -> None:
    dest = roots / "results-1"
    dest.mkdir()
    nobody = pwd.getpwnam("nobody")
    os.chown(dest, nobody.pw_uid, nobody.pw_gid)  # the job's account may write there
    spec = JobSpec(
        script=script(
            "mkdir -p out/sub", "echo 1 > out/a.csv", "echo 2 > out/sub/b.csv", "echo x > out/c.txt"
        ),
        outputs=[OutputSpec(path="out/**/*.csv", url=f"file://{dest}/")],
    )
    job = ended(client, client.submit(spec).id)
    assert job.state is JobState.COMPLETED, job.state_details
    assert files_under(dest) == ["a.csv", "sub/b.csv"]
    assert (dest / "sub" / "b.csv").read_text() == "2\n"
    assert (dest / "a.csv").stat().st_uid == nobody.pw_uid
    # ...and they are kept with the job for `skyport download` too.
    assert sorted(f["name"] for f in client.outputs(job.id)) == ["out/a.csv", "out/sub/b.csv"]


def test_a_file_url_the_jobs_account_may_not_write_fails_the_job(client: Client, roots: Path) -> None:
    dest = roots / "root-only"
    dest.mkdir(mode=0o755)
    spec = JobSpec(
        script=script("echo r > r.txt"), outputs=[OutputSpec(path="r.txt", url=f"file://{dest}/r.txt")]
    )
    job = ended(client, client.submit(spec).id)
    assert job.state is JobState.FAILED and job.reason == "stage_out_failed"
    assert "may not write" in job.state_details
    assert files_under(dest) == []


def test_an_upload_refused_by_the_server_fails_the_job(client: Client, web: DataServer) -> None:
    refusing = DataServer(put_status=403)
    with refusing:
        spec = JobSpec(
            script=script("echo r > r.txt"), outputs=[OutputSpec(path="r.txt", url=refusing.url + "/r.txt")]
        )
        job = ended(client, client.submit(spec).id)
    assert job.state is JobState.FAILED
    assert job.reason == "stage_out_failed"
    assert job.state_details.startswith("Outputs not delivered:") and "403" in job.state_details
    assert job.exit_code == 0  # the job itself succeeded: the failure is the delivery's


def test_outputs_go_by_http_put(client: Client, web: DataServer) -> None:
    spec = JobSpec(
        script=script("printf 'hello' > h.txt"),
        outputs=[OutputSpec(path="h.txt", url=web.url + "/put/h.txt")],
    )
    job = ended(client, client.submit(spec).id)
    assert job.state is JobState.COMPLETED, job.state_details
    assert web.uploads["/put/h.txt"] == b"hello"


def test_s3_inputs_and_outputs(client: Client, moto: str) -> None:
    bucket = s3(moto)
    bucket.put_object(Bucket=BUCKET, Key="in/reads.txt", Body=b"ACGT\n")  # type: ignore[attr-defined]
    bucket.put_object(Bucket=BUCKET, Key="in/set/1.txt", Body=b"one\n")  # type: ignore[attr-defined]
    bucket.put_object(Bucket=BUCKET, Key="in/set/deep/2.txt", Body=b"two\n")  # type: ignore[attr-defined]
    spec = JobSpec(
        script=script(
            "mkdir res", "cat reads.txt set/1.txt set/deep/2.txt > res/all.txt", "echo done > res/flag.txt"
        ),
        inputs=[
            InputSpec(path="reads.txt", url=f"s3://{BUCKET}/in/reads.txt"),
            InputSpec(path="set", url=f"s3://{BUCKET}/in/set", type="directory"),
        ],
        outputs=[OutputSpec(path="res/*.txt", url=f"s3://{BUCKET}/out/")],
    )
    job = ended(client, client.submit(spec).id)
    assert job.state is JobState.COMPLETED, job.state_details
    got = bucket.get_object(Bucket=BUCKET, Key="out/all.txt")["Body"].read()  # type: ignore[attr-defined]
    assert got == b"ACGT\none\ntwo\n"
    assert bucket.get_object(Bucket=BUCKET, Key="out/flag.txt")["Body"].read() == b"done\n"  # type: ignore[attr-defined]


def test_a_missing_s3_object_fails_the_job_and_an_unlisted_bucket_is_refused(client: Client) -> None:
    spec = JobSpec(script=script("true"), inputs=[InputSpec(path="x", url=f"s3://{BUCKET}/no/such/key")])
    job = ended(client, client.submit(spec).id)
    assert job.state is JobState.FAILED and job.reason == "stage_in_failed"
    assert "no such object" in job.state_details
    with pytest.raises(ApiError, match=r"staging\.s3_buckets"):
        client.submit(JobSpec(script=script("true"), inputs=[InputSpec(path="x", url="s3://other-bucket/k")]))


# ---------------------------------------------------------------------------------------------------
# Getting outputs back with the CLI


def test_skyport_download_shows_progress_for_a_large_file(
    client: Client, staging_core: CoreProcess, tmp_path: Path
) -> None:
    spec = JobSpec(script=script("head -c 20000000 /dev/urandom > big.out"), output_files=["big.out"])
    job = ended(client, client.submit(spec).id)
    assert job.state is JobState.COMPLETED, job.state_details
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYPORT_")}
    env.update(SKYPORT_HOME=str(staging_core.home), SKYPORT_URL=staging_core.url, TTY_COMPATIBLE="1")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "skyport"), "download", job.id, str(tmp_path / "got")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "got" / "big.out").stat().st_size == 20_000_000
    assert "big.out" in result.stderr and "20.0 MB" in result.stderr  # the bar: name, bytes of total
