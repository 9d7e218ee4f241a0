"""A job's life on a real core, as its user sees it: limits, files, environment, exit status, requeue,
queueing, operations endpoints and logs.

Every test talks to a real ``skyport server`` subprocess over mutual TLS (see :mod:`tests.support.core`);
jobs run on the local gate as the Unix user ``nobody``. Tests assert only on what a user can observe:
job states, reasons, texts and exit codes, the job's own output and files, HTTP replies, and the
processes left on the machine. Waiting is always on a condition with a deadline (the ``wait`` long
poll or :func:`wait_for`), never on a fixed sleep.

Cores: ``shared_core`` for the tests that only add their own jobs; a module core with a small declared
capacity, a maximum walltime and a variable only the core has, for the tests about those settings; and
a fresh core for the metrics, whose counts must not depend on other tests.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from skyport.client import Client
from skyport.client.api import ApiError
from skyport.models import Job, JobSpec, JobState
from tests.support.core import CoreProcess, wait_for

#: Long enough for any job here to be scheduled, run and recorded on a loaded test machine.
END_DEADLINE_S = 30.0
#: What the fixture's core waits between SIGTERM and SIGKILL (``SKYPORT_LOCAL__CANCEL_GRACE_S``).
CANCEL_GRACE_S = 2.0
#: Declared CPUs of the configured core, and the largest walltime it accepts.
LIMITED_CPUS = 2
MAX_WALLTIME_S = 60
#: A variable in the configured core's own environment, which no job may see.
CORE_ONLY_NAME = "CORE_ONLY_SECRET"
CORE_ONLY_VALUE = "should-not-leak"


# ---------------------------------------------------------------------------------------------------
# Cores and clients


@pytest.fixture(scope="module")
def client(shared_core: CoreProcess) -> Iterator[Client]:
    with shared_core.client("admin") as c:
        yield c


@pytest.fixture(scope="module")
def limited_core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoreProcess]:
    """A core declaring 2 CPUs, refusing walltimes over a minute, with a variable jobs must not see."""
    process = CoreProcess(
        tmp_path_factory.mktemp("limited") / "home",
        env={
            "SKYPORT_LOCAL__CPUS": str(LIMITED_CPUS),
            "SKYPORT_LOCAL__MAX_WALLTIME": str(MAX_WALLTIME_S),
            CORE_ONLY_NAME: CORE_ONLY_VALUE,
        },
    )
    process.start()
    try:
        yield process
    finally:
        process.cleanup()


@pytest.fixture(scope="module")
def limited_client(limited_core: CoreProcess) -> Iterator[Client]:
    with limited_core.client("admin") as c:
        yield c


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory jobs (running as ``nobody``) and the test can both write; pytest's tmp_path is 0700."""
    path = Path(tempfile.mkdtemp(prefix="skyport-lifecycle-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Helpers


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def script(*lines: str) -> str:
    return "\n".join(["#!/bin/sh", *lines]) + "\n"


def wait_until_ended(client: Client, job_id: str, timeout: float = END_DEADLINE_S) -> Job:
    """The job once it is in a final state; fails (with its last state and text) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        job = client.wait(job_id, timeout=max(0.0, min(left, 60.0)))
        if job.state.terminal:
            return job
        if left <= 0:
            state = f"{job.state.value} ({job.reason}: {job.state_details})"
            raise AssertionError(f"job {job_id} is still {state} after {timeout}s")


def wait_until_running(client: Client, job_id: str, timeout: float = END_DEADLINE_S) -> Job:
    def running() -> Job | None:
        job = client.job(job_id)
        assert not job.state.terminal, f"job ended before running long: {job.reason}: {job.state_details}"
        return job if job.state is JobState.RUNNING else None

    found = wait_for(running, timeout, f"job {job_id} to run", interval=0.1)
    assert isinstance(found, Job)
    return found


def wait_for_output(client: Client, job_id: str, text: bytes, timeout: float = END_DEADLINE_S) -> None:
    wait_for(lambda: text in client.log(job_id), timeout, f"{text!r} in the stdout of {job_id}", 0.1)


def live_processes_of(job_id: str) -> list[int]:
    """Processes (zombies excepted) whose environment carries ``SKYPORT_JOB_ID=<job_id>``."""
    needle = f"SKYPORT_JOB_ID={job_id}".encode()
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def env_lines(output: bytes) -> dict[str, str]:
    """``NAME=value`` lines of a job's stdout as a dict."""
    pairs = (line.partition("=") for line in output.decode().splitlines() if "=" in line)
    return {name: value for name, _, value in pairs}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def https(core: CoreProcess, *, with_certificate: bool) -> httpx.Client:
    """A bare HTTPS client trusting the core's CA, presenting the admin's certificate or none."""
    config = core.users["admin"].config
    context = ssl.create_default_context(cafile=str(config.ca))
    if with_certificate:
        context.load_cert_chain(str(config.cert), str(config.key))
    return httpx.Client(base_url=core.url, verify=context, timeout=30)


# ---------------------------------------------------------------------------------------------------
# Walltime


def test_a_job_over_its_walltime_is_killed_with_its_whole_process_group(client: Client) -> None:
    # Two leftovers besides the foreground sleep: a plain background process, and one that ignores
    # SIGTERM, which only the end-of-job cleanup (SIGKILL of the group) can stop.
    spec = JobSpec(
        name=unique("walltime"),
        script=script("sleep 300 &", "(trap '' TERM; exec sleep 300) &", "echo started", "sleep 300"),
        walltime=2,
    )
    submitted = time.monotonic()
    job = client.submit(spec)
    wait_for_output(client, job.id, b"started")
    # The final check is not vacuous: the script and its sleeps are visible while the job runs.
    wait_for(lambda: len(live_processes_of(job.id)) >= 3, 10, "the job's processes to be visible")

    ended = wait_until_ended(client, job.id)
    took = time.monotonic() - submitted

    assert ended.state is JobState.FAILED
    assert ended.reason == "walltime"
    assert "walltime" in ended.state_details
    assert "00:00:02" in ended.state_details, ended.state_details
    assert 2.0 <= ended.duration < 2.0 + CANCEL_GRACE_S + 5.0, ended.duration
    assert took < 20.0, f"a 2 s walltime took {took:.1f}s to enforce"
    wait_for(lambda: not live_processes_of(job.id), 5, "no process of the job to be left running")


def test_a_walltime_over_the_maximum_is_refused_and_nothing_is_stored(limited_client: Client) -> None:
    name = unique("too-long")
    before = {j.id for j in limited_client.jobs(limit=1000).items}

    with pytest.raises(ApiError) as refused:
        limited_client.submit(JobSpec(name=name, script=script("true"), walltime=MAX_WALLTIME_S + 1))

    assert refused.value.status == 400
    assert str(MAX_WALLTIME_S) in str(refused.value), str(refused.value)
    assert "maximum" in str(refused.value)
    assert limited_client.jobs(name=name).items == []
    assert {j.id for j in limited_client.jobs(limit=1000).items} == before


# ---------------------------------------------------------------------------------------------------
# Input and output files


def test_input_files_reach_the_job_and_its_output_files_come_back_intact(
    client: Client, tmp_path: Path
) -> None:
    data = b"the quick brown fox\njumps over the lazy dog\n"
    source = tmp_path / "data.txt"
    source.write_bytes(data)
    job_script = script(
        f"#SWM name {unique('files')}",
        "#SWM input-files data.txt",
        "#SWM output-files result.txt logs/*.log",
        "cat data.txt",
        "tr a-z A-Z < data.txt > result.txt",
        "mkdir logs",
        "echo first > logs/a.log",
        "printf 'second\\nthird\\n' > logs/b.log",
    )
    expected = {
        "result.txt": data.upper(),
        "logs/a.log": b"first\n",
        "logs/b.log": b"second\nthird\n",
    }

    job = client.submit(script=job_script, inputs=[source])
    ended = wait_until_ended(client, job.id)

    assert ended.state is JobState.COMPLETED, ended.state_details
    assert data in client.log(job.id)
    listed = {f["name"]: f for f in client.outputs(job.id)}
    assert sorted(listed) == sorted(expected)
    for name, content in expected.items():
        assert listed[name]["size"] == len(content), name
        assert listed[name]["sha256"] == sha256(content), name
        target = tmp_path / "downloads" / name
        assert client.download(job.id, name, target) == len(content)
        assert target.read_bytes() == content, name


def test_a_symlink_out_of_the_workdir_is_not_returned_as_an_output(client: Client, tmp_path: Path) -> None:
    job_script = script(
        f"#SWM name {unique('symlink')}",
        "#SWM output-files secret.txt fine.txt",
        "ln -s /etc/shadow secret.txt",
        "echo fine > fine.txt",
    )

    job = client.submit(script=job_script)
    ended = wait_until_ended(client, job.id)

    assert ended.state.terminal
    assert [f["name"] for f in client.outputs(job.id)] == ["fine.txt"]
    with pytest.raises(ApiError) as missing:
        client.download(job.id, "secret.txt", tmp_path / "secret.txt")
    assert missing.value.status == 404
    assert not (tmp_path / "secret.txt").exists()


# ---------------------------------------------------------------------------------------------------
# The job's environment


def test_the_job_sees_its_own_environment_and_not_the_cores(
    limited_core: CoreProcess, limited_client: Client
) -> None:
    name = unique("env")
    job_script = script(
        f"#SWM name {name}",
        "#SWM env GREETING=hello world",
        "#SWM env EMPTY=",
        "#SWM env WITH_EQUALS=a=b",
        'echo "SKYPORT_JOB_ID=$SKYPORT_JOB_ID"',
        'echo "SWM_JOB_ID=$SWM_JOB_ID"',
        'echo "SKYPORT_JOB_NAME=$SKYPORT_JOB_NAME"',
        'echo "SKYPORT_NODES=$SKYPORT_NODES"',
        'echo "GREETING=$GREETING"',
        'echo "EMPTY=${EMPTY-<unset>}"',
        'echo "WITH_EQUALS=$WITH_EQUALS"',
        f'echo "{CORE_ONLY_NAME}=${{{CORE_ONLY_NAME}-<unset>}}"',
        'echo "SKYPORT_HOME=${SKYPORT_HOME-<unset>}"',
        'echo "RUN_AS=$(id -un)"',
        'echo "CWD=$(pwd -P)"',
    )

    job = limited_client.submit(script=job_script)
    ended = wait_until_ended(limited_client, job.id)

    assert ended.state is JobState.COMPLETED, ended.state_details
    seen = env_lines(limited_client.log(job.id))
    assert seen["SKYPORT_JOB_ID"] == job.id
    assert seen["SWM_JOB_ID"] == job.id
    assert seen["SKYPORT_JOB_NAME"] == name
    assert ended.node_names
    assert seen["SKYPORT_NODES"] == ",".join(ended.node_names)
    assert seen["GREETING"] == "hello world"
    assert seen["EMPTY"] == ""
    assert seen["WITH_EQUALS"] == "a=b"
    assert seen[CORE_ONLY_NAME] == "<unset>", "a variable of the core's own environment reached the job"
    assert seen["SKYPORT_HOME"] == "<unset>", "the core's home reached the job's environment"
    assert seen["RUN_AS"] == "nobody"
    workdir = Path(seen["CWD"])
    workroot = limited_core.workroot.resolve()
    assert workdir.is_relative_to(workroot) and workdir != workroot, workdir


def test_each_job_runs_in_a_workdir_of_its_own(client: Client, shared_core: CoreProcess) -> None:
    ids = [client.submit(JobSpec(name=unique("pwd"), script=script("pwd -P"))).id for _ in range(2)]
    dirs = []
    for job_id in ids:
        assert wait_until_ended(client, job_id).state is JobState.COMPLETED
        dirs.append(Path(client.log(job_id).decode().strip()))

    workroot = shared_core.workroot.resolve()
    assert all(d.is_relative_to(workroot) and d != workroot for d in dirs), dirs
    assert dirs[0] != dirs[1]
    assert os.path.commonpath(dirs) == str(workroot)


# ---------------------------------------------------------------------------------------------------
# Exit status


def test_a_nonzero_exit_code_fails_the_job_with_that_code(client: Client) -> None:
    job = client.submit(JobSpec(name=unique("exit3"), script=script("echo bye", "exit 3")))
    ended = wait_until_ended(client, job.id)

    assert ended.state is JobState.FAILED
    assert ended.exit_code == 3
    assert ended.signal is None
    assert ended.reason == "exit_code"
    assert "3" in ended.state_details


def test_a_job_killed_by_a_signal_fails_with_that_signal(client: Client) -> None:
    job = client.submit(JobSpec(name=unique("sigterm"), script=script("kill -TERM $$", "sleep 60")))
    ended = wait_until_ended(client, job.id)

    assert ended.state is JobState.FAILED
    assert ended.signal == 15
    assert ended.reason == "signal"
    assert "15" in ended.state_details or "SIGTERM" in ended.state_details, ended.state_details


def test_a_successful_job_completes_with_exit_code_zero(client: Client) -> None:
    job = client.submit(JobSpec(name=unique("ok"), script=script("echo done")))
    ended = wait_until_ended(client, job.id)

    assert ended.state is JobState.COMPLETED
    assert ended.exit_code == 0
    assert ended.reason == "exit_code"
    assert client.log(job.id) == b"done\n"


# ---------------------------------------------------------------------------------------------------
# Requeue


def test_requeue_of_a_running_job_stops_it_and_runs_it_again_as_attempt_2(
    client: Client, shared_dir: Path
) -> None:
    # The first run leaves a mark and hangs; the run after it finds the mark and finishes at once.
    mark = shared_dir / "ran-once"
    job_script = script(
        f"#SWM name {unique('requeue')}",
        f'if [ -e "{mark}" ]; then echo "second run"; exit 0; fi',
        f'touch "{mark}"',
        'echo "first run"',
        "sleep 300",
    )
    job = client.submit(script=job_script)
    wait_for_output(client, job.id, b"first run")

    requested = time.monotonic()
    client.requeue(job.id)
    ended = wait_until_ended(client, job.id)

    assert ended.state is JobState.COMPLETED, ended.state_details
    assert ended.attempt == 2
    assert time.monotonic() - requested < 20.0, "the running attempt was not stopped promptly"
    assert b"second run" in client.log(job.id)

    events = client.events(job.id)
    reasons = [e.reason for e in events]
    assert "requeue_requested" in reasons, reasons
    requeued = [e for e in events if e.to_state is JobState.QUEUED and e.reason == "requeued"]
    assert requeued, reasons
    assert "attempt 2" in requeued[0].message, requeued[0].message
    second = [e for e in events if e.attempt == 2]
    assert any(e.to_state is JobState.RUNNING for e in second), [(e.attempt, e.to_state) for e in events]
    assert second[-1].to_state is JobState.COMPLETED
    assert [e.attempt for e in events] == sorted(e.attempt for e in events), "events out of attempt order"
    wait_for(lambda: not live_processes_of(job.id), 5, "no process of either attempt to be left running")


# ---------------------------------------------------------------------------------------------------
# Scheduling


def test_a_job_larger_than_any_node_fails_as_unsatisfiable_instead_of_waiting(client: Client) -> None:
    job = client.submit(JobSpec(name=unique("huge"), script=script("true"), cpus=10_000))
    ended = wait_until_ended(client, job.id, timeout=15.0)

    assert ended.state is JobState.FAILED
    assert ended.reason == "unsatisfiable"
    assert "cannot run" in ended.state_details.lower(), ended.state_details
    assert "10000" in ended.state_details, ended.state_details
    assert ended.start_time is None


def test_jobs_filling_the_node_run_one_at_a_time_in_submission_order(limited_client: Client) -> None:
    ids = [
        limited_client.submit(
            JobSpec(name=unique(f"fcfs{i}"), script=script("sleep 1", f"echo job {i}"), cpus=LIMITED_CPUS)
        ).id
        for i in range(3)
    ]
    ended = [wait_until_ended(limited_client, job_id) for job_id in ids]

    assert [j.state for j in ended] == [JobState.COMPLETED] * 3, [j.state_details for j in ended]
    for i, job in enumerate(ended):
        assert limited_client.log(job.id) == f"job {i}\n".encode()
    for earlier, later in itertools.pairwise(ended):
        assert earlier.start_time and earlier.end_time and later.start_time
        assert later.start_time >= earlier.end_time, (
            f"{later.name} started at {later.start_time} while {earlier.name} ran until {earlier.end_time}"
        )


def test_free_cpus_are_filled_by_one_scheduling_pass_not_a_page_at_a_time(tmp_path: Path) -> None:
    """40 queued jobs and 40 free CPUs: all 40 are placed together (one pass, one placement time),
    not the first few and the rest a pass later."""
    cpus = 40
    core = CoreProcess(tmp_path / "home", env={"SKYPORT_LOCAL__CPUS": str(cpus)})
    core.start()
    try:
        with core.client("admin") as c:
            first = c.submit(JobSpec(name=unique("fill"), command=["true"], array=f"1-{cpus}"))
            wait_for(lambda: c.array(first.array_id).done, END_DEADLINE_S, "the array's tasks to end")
            tasks = c.jobs(array=first.array_id, limit=100).items
            assert [t.state for t in tasks] == [JobState.COMPLETED] * cpus
            placed = {e.time for t in tasks for e in c.events(t.id) if e.to_state is JobState.SCHEDULED}
    finally:
        core.cleanup()
    assert len(placed) == 1, f"{cpus} jobs for {cpus} free CPUs were placed at {len(placed)} moments"


# ---------------------------------------------------------------------------------------------------
# Operations endpoints


def test_healthz_answers_without_a_client_certificate(shared_core: CoreProcess) -> None:
    with https(shared_core, with_certificate=False) as anonymous:
        reply = anonymous.get("/healthz")

    assert reply.status_code == 200
    assert reply.json() == {"status": "ok"}


def test_metrics_count_jobs_by_state_and_need_a_certificate(core: CoreProcess) -> None:
    with core.client("admin") as c:
        ids = [c.submit(JobSpec(name=unique("m-ok"), script=script("true"))).id for _ in range(2)]
        ids.append(c.submit(JobSpec(name=unique("m-fail"), script=script("exit 1"))).id)
        states = [wait_until_ended(c, job_id).state for job_id in ids]
    assert states == [JobState.COMPLETED, JobState.COMPLETED, JobState.FAILED]

    with https(core, with_certificate=True) as admin:
        reply = admin.get("/metrics")
    assert reply.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(reply.text)}

    by_state = {s.labels["state"]: s.value for s in families["skyport_jobs"].samples}
    assert by_state["completed"] == 2
    assert by_state["failed"] == 1
    assert by_state["running"] == 0
    assert by_state["queued"] == 0

    latency = families["skyport_submit_latency_seconds"]
    assert latency.type == "histogram"
    samples = {(s.name, s.labels.get("le")): s.value for s in latency.samples}
    assert samples[("skyport_submit_latency_seconds_count", None)] == 3
    assert samples[("skyport_submit_latency_seconds_bucket", "+Inf")] == 3
    assert 0 < samples[("skyport_submit_latency_seconds_sum", None)] < 30

    with https(core, with_certificate=False) as anonymous:
        assert anonymous.get("/metrics").status_code == 401


# ---------------------------------------------------------------------------------------------------
# Logs


def test_log_tail_and_offset_return_the_requested_bytes(client: Client) -> None:
    text = b"0123456789abcdefghij"
    job = client.submit(JobSpec(name=unique("log"), script=script(f"printf '{text.decode()}'")))
    assert wait_until_ended(client, job.id).state is JobState.COMPLETED

    assert client.log(job.id) == text
    assert client.log(job.id, tail=5) == text[-5:]
    assert client.log(job.id, tail=0) == b""
    assert client.log(job.id, tail=1000) == text
    assert client.log(job.id, offset=12) == text[12:]
    assert client.log(job.id, offset=len(text)) == b""
    assert client.log(job.id, offset=1000) == b""


def test_follow_yields_all_output_and_returns_when_the_job_ends(client: Client) -> None:
    lines = [f"line {i}" for i in range(1, 6)]
    body = [f'echo "{line}"; sleep 0.25' for line in lines]
    job = client.submit(JobSpec(name=unique("follow"), script=script(*body)))

    received: list[bytes] = []
    failures: list[BaseException] = []

    def follow() -> None:
        try:
            received.extend(client.follow(job.id))
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    # httpx clients are thread-safe; the thread only lets the test bound the wait with a deadline.
    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    follower.join(END_DEADLINE_S)

    assert not follower.is_alive(), f"follow did not return within {END_DEADLINE_S}s of the job's start"
    assert not failures, failures
    assert b"".join(received).decode().splitlines() == lines
    assert client.job(job.id).state is JobState.COMPLETED


def test_stderr_is_kept_apart_from_stdout(client: Client) -> None:
    job = client.submit(JobSpec(name=unique("stderr"), script=script("echo out", "echo err >&2")))
    assert wait_until_ended(client, job.id).state is JobState.COMPLETED

    assert client.log(job.id, "stdout") == b"out\n"
    assert client.log(job.id, "stderr") == b"err\n"
