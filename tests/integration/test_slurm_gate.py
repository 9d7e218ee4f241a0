"""The ``slurm`` gate, through a real core, on a real Slurm 22.05 cluster of two nodes on loopback
(tests/support/slurm.py), by both submission paths: Slurm's commands run here, and slurmrestd with JWT.

What a user notices: a job asked for ``remote hpc`` is handed to Slurm at once, waits there with Slurm's
reason in its details, runs on Slurm's nodes *as the user's own cluster login* (two Sky Port users, two
different Slurm users), and comes back with its exit code, logs and output files; a multi-node job gets
both nodes; an array is one Slurm array; a dependent job waits in Slurm for the job it depends on; a
cancel reaches Slurm whether the job runs or still waits; the cluster's nodes are listed as Sky Port's.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from skyport.models import JobSpec, JobState
from tests.support.core import CoreProcess, wait_for
from tests.support.slurm import SlurmCluster, missing

POLL_S = 0.3
TIMEOUT_S = 60.0
#: Sky Port user -> the cluster login that must run their jobs (accounts every Debian system has).
LOGINS = {"alice": "nobody", "bob": "daemon"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    why = missing(rest=True)
    if why:
        pytest.skip(why)
    directory = Path(tempfile.mkdtemp(prefix="skyport-slurm-"))
    slurm = SlurmCluster(directory, cpus=2, rest=True)
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def workroot() -> Iterator[Path]:
    """Jobs' directories: every login makes its own inside (sticky and world-writable, like /tmp)."""
    path = Path(tempfile.mkdtemp(prefix="skyport-slurm-work-"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def core(
    cluster: SlurmCluster, workroot: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CoreProcess]:
    base = tmp_path_factory.mktemp("slurm-core")
    token_file = base / "bob.jwt"  # bob brings a token; alice's are minted with the cluster's JWT key
    token_file.write_text(cluster.token(LOGINS["bob"]))
    common: dict[str, Any] = {
        "kind": "slurm",
        "same_name_logins": False,
        "workroot": f"{workroot}/{{login}}",
        "poll_interval_s": POLL_S,
    }
    remotes = [
        {
            **common,
            "name": "hpc",
            "submit": "commands",
            "env": cluster.env,
            "users": {user: {"login": login} for user, login in LOGINS.items()},
        },
        {
            **common,
            "name": "hpc-rest",
            "submit": "rest",
            "rest_url": cluster.rest_url,
            "jwt_key_file": str(cluster.jwt_key),
            "users": {
                "alice": {"login": LOGINS["alice"]},
                "bob": {"login": LOGINS["bob"], "token_file": str(token_file)},
            },
        },
    ]
    process = CoreProcess(base / "home", env={"SKYPORT_REMOTES": json.dumps(remotes)})
    process.start()
    for user in LOGINS:
        process.add_user(user)
    try:
        yield process
    finally:
        process.cleanup()


def _slurm_id(core: CoreProcess, user: str, job_id: str) -> str:
    """The Slurm job id the core gave the job (from its events: what the user sees too)."""
    with core.client(user) as c:
        for event in c.events(job_id):
            if event.reason == "submitted" and event.to_state is JobState.SCHEDULED:
                return event.message.split(" as job ")[1].split(",")[0]
    raise AssertionError(f"job {job_id} was never submitted to Slurm")


def _squeue(cluster: SlurmCluster) -> dict[str, dict[str, Any]]:
    """Every job Slurm knows, by id (``42`` or ``40_3``)."""
    out = cluster.run(["squeue", "--json", "-t", "all"]).stdout
    jobs = {}
    for j in json.loads(out)["jobs"]:
        key = f"{j['array_job_id']}_{j['array_task_id']}" if j["array_job_id"] else str(j["job_id"])
        jobs[key] = j
    return jobs


@pytest.mark.parametrize("remote", ["hpc", "hpc-rest"])
def test_a_job_runs_in_slurm_as_its_owners_own_login(
    core: CoreProcess, cluster: SlurmCluster, remote: str
) -> None:
    command = ["sh", "-c", 'id -un; echo "job=$SLURM_JOB_ID nodes=$SKYPORT_NODES"; echo oops >&2; exit 3']
    finals = {}
    for user in LOGINS:
        with core.client(user) as c:
            job = c.submit(JobSpec(name=f"who-{user}", command=command, remote=remote))
            assert job.state is JobState.QUEUED
            finals[user] = c.wait(job.id, TIMEOUT_S)
    slurm = _squeue(cluster)
    for user, final in finals.items():
        assert final.state is JobState.FAILED and final.exit_code == 3, final.state_details
        slurm_id = _slurm_id(core, user, final.id)
        assert slurm[slurm_id]["user_name"] == LOGINS[user]  # Slurm ran it as the user's own login
        with core.client(user) as c:
            out = c.log(final.id).decode().splitlines()
            assert out[0] == LOGINS[user]
            assert out[1] == f"job={slurm[slurm_id]['job_id']} nodes={final.node_names[0]}"
            assert c.log(final.id, "stderr") == b"oops\n"
            states = [(e.to_state, e.reason) for e in c.events(final.id)]
        assert final.node_names[0] in ("n1", "n2")
        assert (JobState.SCHEDULED, "forwarded") in states
        assert (JobState.SCHEDULED, "submitted") in states
        assert (JobState.RUNNING, "started") in states


def test_a_multi_node_job_gets_both_nodes(core: CoreProcess) -> None:
    script = "#!/bin/sh\nsrun -l printenv SLURMD_NODENAME | sort\n"
    with core.client("alice") as c:
        job = c.submit(JobSpec(name="wide", script=script, remote="hpc", nodes=2, cpus=1))
        final = c.wait(job.id, TIMEOUT_S)
        assert final.state is JobState.COMPLETED, final.state_details
        assert sorted(final.node_names) == ["n1", "n2"]
        assert c.log(job.id) == b"0: n1\n1: n2\n"


@pytest.mark.parametrize("remote", ["hpc", "hpc-rest"])
def test_an_array_is_one_slurm_array(core: CoreProcess, cluster: SlurmCluster, remote: str) -> None:
    script = f'#!/bin/sh\n#SWM remote {remote}\n#SWM array 1-5%2\necho "task $SKYPORT_ARRAY_INDEX"\n'
    with core.client("bob") as c:
        first = c.submit(script=script)
        wait_for(lambda: c.array(first.array_id).done, TIMEOUT_S, "the array's tasks to end")
        tasks = c.jobs(array=first.array_id, limit=100).items
        assert {t.state for t in tasks} == {JobState.COMPLETED}
        assert {c.log(t.id).decode() for t in tasks} == {f"task {i}\n" for i in range(1, 6)}
    slurm_ids = {_slurm_id(core, "bob", t.id) for t in tasks}
    bases = {s.partition("_")[0] for s in slurm_ids}
    assert len(bases) == 1 and len(slurm_ids) == 5  # one sbatch, five tasks
    slurm = _squeue(cluster)
    assert {slurm[s]["array_max_tasks"] for s in slurm_ids} == {2}  # the throttle went with it


def test_a_dependent_job_waits_in_slurm_and_a_failed_dependency_ends_it(core: CoreProcess) -> None:
    with core.client("alice") as c:
        first = c.submit(JobSpec(name="first", command=["sleep", "4"], remote="hpc"))
        then = c.submit(JobSpec(name="then", command=["echo", "after"], remote="hpc", depends=[first.id]))
        final = c.wait(then.id, TIMEOUT_S)
        assert final.state is JobState.COMPLETED and c.log(then.id) == b"after\n"
        # it was handed to Slurm while the first one still ran, and Slurm held it until that ended
        events = {(e.to_state, e.reason, e.message) for e in c.events(then.id)}
        assert (JobState.SCHEDULED, "pending", "Pending: Dependency") in events
        first_end = c.job(first.id).end_time
        assert final.start_time is not None and first_end is not None
        assert final.start_time >= first_end - timedelta(seconds=1)

        bad = c.submit(JobSpec(name="bad", command=["sh", "-c", "sleep 1; exit 1"], remote="hpc"))
        never = c.submit(JobSpec(name="never", command=["true"], remote="hpc", depends=[bad.id]))
        final = c.wait(never.id, TIMEOUT_S)
        assert final.state is JobState.FAILED
        assert c.job(bad.id).state is JobState.FAILED
        assert final.start_time is None  # it never ran


@pytest.mark.parametrize("remote", ["hpc", "hpc-rest"])
def test_cancel_reaches_slurm_for_running_and_waiting_jobs(
    core: CoreProcess, cluster: SlurmCluster, remote: str
) -> None:
    with core.client("bob") as c:
        running = c.submit(JobSpec(name="long", command=["sleep", "300"], remote=remote))
        waiting = c.submit(JobSpec(name="held", command=["true"], remote=remote, depends=[running.id]))
        wait_for(lambda: c.job(running.id).state is JobState.RUNNING, TIMEOUT_S, "the job to run")
        wait_for(lambda: c.job(waiting.id).state_details == "Pending: Dependency", TIMEOUT_S, "held")
        c.cancel(waiting.id)
        c.cancel(running.id)
        finals = [c.wait(running.id, TIMEOUT_S), c.wait(waiting.id, TIMEOUT_S)]
    assert [f.state for f in finals] == [JobState.CANCELED, JobState.CANCELED]
    slurm = _squeue(cluster)
    for final in finals:
        assert slurm[_slurm_id(core, "bob", final.id)]["job_state"] == "CANCELLED"


def test_inputs_go_in_and_outputs_come_back(core: CoreProcess, tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("hello slurm\n")
    script = "#!/bin/sh\ntr a-z A-Z < data.txt > result.txt\n"
    spec = JobSpec(
        name="files", script=script, remote="hpc", input_files=["data.txt"], output_files=["result.txt"]
    )
    with core.client("alice") as c:
        job = c.submit(spec, inputs=[data])
        final = c.wait(job.id, TIMEOUT_S)
        assert final.state is JobState.COMPLETED, final.state_details
        target = tmp_path / "result.txt"
        c.download(job.id, "result.txt", target)
        assert target.read_text() == "HELLO SLURM\n"


def test_the_clusters_nodes_are_sky_port_nodes_by_partition(core: CoreProcess) -> None:
    with core.client("alice") as c:
        remotes = {r.id: r.name for r in c.remotes()}
        nodes = [n for n in c.nodes() if remotes.get(n.remote_id) == "hpc"]
    assert sorted(n.name for n in nodes) == ["n1", "n2"]
    assert {n.cpus for n in nodes} == {2}
    assert len({n.partition_id for n in nodes}) == 1 and nodes[0].partition_id


# -- pure parts, no cluster needed ----------------------------------------------------------------------


def _pending(job_id: str, seq: int, **fields: Any) -> Any:
    from datetime import UTC, datetime

    from skyport.server.scheduler import PendingJob

    return PendingJob(
        id=job_id, priority=0, seq=seq, nodes=1, cpus=1, mem=0, gpus=0,
        submit_time=datetime(2026, 1, 1, tzinfo=UTC), **fields,
    )  # fmt: skip


def test_jobs_for_a_self_scheduling_remote_are_forwarded_not_placed() -> None:
    from datetime import UTC, datetime

    from skyport.server.scheduler import NodeCapacity, SelfScheduling, Snapshot, plan

    hpc = SelfScheduling("hpc", {"batch": ("n1", "n2"), "gpu": ("g1",)}, "batch", "slurm.partition")
    local = NodeCapacity("here", "local", 1, 0, 0, 1, 0, 0)
    jobs = (
        _pending("a", 1, remote_id="hpc"),  # no capacity check: 100 of them would all go
        _pending("b", 2, remote_id="hpc", after_ok=("a",)),  # waits in Slurm for a (same pass)
        _pending("c", 3, remote_id="hpc", labels=(("slurm.partition", "gpu"),)),
        _pending("d", 4, remote_id="hpc", after_ok=("elsewhere",)),  # runs on another remote: waits here
        _pending("e", 5, remote_id="hpc", after_ok=("broken",)),  # can never be met: rejected
        _pending("f", 6),  # an ordinary job: placed by our scheduler, never on Slurm's nodes
    )
    snapshot = Snapshot(
        jobs=jobs,
        nodes=(local,),
        dependency_states={"a": "queued", "elsewhere": "running", "broken": "failed"},
        dependency_remotes={"a": "hpc", "elsewhere": "local"},
        self_scheduling={"hpc": hpc},
    )
    decided = plan(snapshot, datetime(2026, 1, 1, tzinfo=UTC))
    forwards = {f.job_id: (f.partition, f.node_ids) for f in decided.forwards}
    assert forwards == {"a": ("batch", ("n1", "n2")), "b": ("batch", ("n1", "n2")), "c": ("gpu", ("g1",))}
    assert [(w.job_id, w.reason) for w in decided.waits] == [("d", "Dependency")]
    assert [(r.job_id, r.reason) for r in decided.rejections] == [("e", "dependency")]
    assert [(p.job_id, p.node_ids) for p in decided.placements] == [("f", ("here",))]


def test_slurm_records_and_host_lists_are_read_in_every_format() -> None:
    from skyport.gates.slurm_access import expand_hostlist, job_from_json, jobs_from_text

    assert expand_hostlist("n[1-3,5],gpu[01-02],login") == ["n1", "n2", "n3", "n5", "gpu01", "gpu02", "login"]
    pending = job_from_json(
        {"job_id": 40, "array_job_id": 40, "array_task_id": None, "array_task_string": "2-4%2",
         "job_state": "PENDING", "state_reason": "JobArrayTaskLimit", "start_time": 0, "nodes": ""}
    )  # fmt: skip
    assert pending.keys == ("40_2", "40_3", "40_4") and not pending.started
    newer = job_from_json(  # Slurm 23.x / v0.0.39+: state lists, numbers and exit codes as objects
        {"job_id": 7, "array_job_id": {"set": True, "number": 0}, "job_state": ["FAILED"],
         "exit_code": {"status": ["EXIT"], "return_code": {"set": True, "number": 3}},
         "start_time": {"set": True, "number": 5}, "nodes": "n1"}
    )  # fmt: skip
    assert newer.keys == ("7",) and newer.state == "FAILED" and newer.exit_status == 3 << 8 and newer.started
    text = jobs_from_text("41_[3-4]|PENDING|Resources|(null)|bob|N/A|skyport:p\n42|RUNNING|None|n2|bob|x|\n")
    assert [r.keys for r in text] == [("41_3", "41_4"), ("42",)] and text[1].started
