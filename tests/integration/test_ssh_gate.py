"""The ``ssh`` gate in ``direct`` mode, through a real core, against real OpenSSH servers on "hosts" that
are network namespaces of the test's own making (tests/support/hosts.py, tests/support/sshd.py).

What a user notices: a job runs on a host with nothing of ours installed, its inputs arrive and its
outputs come back with checksums, its logs follow live; cancel and walltime stop its whole process group
on the host; a core killed with ``kill -9`` finds its jobs again with their real exit status; a host whose
key is unknown (or changed) is refused with a message that says so; each host of a remote gets jobs.

The hosts share this machine's file system (only the network is separate), so a test can release a
waiting job by creating a file, and look at the host's processes in ``/proc``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from skyport.gates.ssh import select_outputs
from skyport.models import JobSpec, JobState
from tests.support.core import CoreProcess, wait_for
from tests.support.hosts import Host, HostNetwork
from tests.support.sshd import SSHD, ClientKey, SSHServer, write_known_hosts

CAN_RUN_HOSTS = os.geteuid() == 0 and Path(SSHD).exists() and shutil.which("ip") is not None

POLL_S = 0.2


@dataclass
class Lab:
    """Hosts with sshd, the core's key and known_hosts, and a workroot the hosts use."""

    network: HostNetwork
    hosts: dict[str, Host]
    servers: dict[str, SSHServer]
    key: ClientKey
    known_hosts: Path
    workroot: Path

    def remote(
        self, name: str, hosts: list[str], *, cpus: int = 1, user_map: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """One ``[[remotes]]`` entry of kind ssh, mode direct, as the core reads it from SKYPORT_REMOTES."""
        return {
            "kind": "ssh",
            "mode": "direct",
            "name": name,
            "hosts": [{"host": self.hosts[h].address, "name": h, "cpus": cpus} for h in hosts],
            "user": "root",
            "user_map": user_map or {},
            "key_file": str(self.key.path),
            "known_hosts": str(self.known_hosts),
            "workroot": str(self.workroot),
            "poll_interval_s": POLL_S,
            "connect_timeout_s": 5,
        }

    def core(self, home: Path, remotes: list[dict[str, Any]]) -> CoreProcess:
        return CoreProcess(home, env={"SKYPORT_REMOTES": json.dumps(remotes)})


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if not CAN_RUN_HOSTS:
        pytest.skip("needs root, OpenSSH's sshd (scripts/setup.sh installs it) and iproute2")
    base = tmp_path_factory.mktemp("ssh")
    workroot = Path(tempfile.mkdtemp(prefix="skyport-ssh-work-"))
    workroot.chmod(0o711)
    network = HostNetwork()
    try:
        key = ClientKey.create(base / "core-key")
        hosts = {name: network.add_host(name) for name in ("a", "b", "stranger", "rekeyed")}
        servers = {name: SSHServer(base / f"sshd-{name}", [key], host) for name, host in hosts.items()}
        for server in servers.values():
            server.start()
        # "stranger" runs sshd like the others, but its key was never recorded
        known = write_known_hosts(base / "known_hosts", [s for n, s in servers.items() if n != "stranger"])
        yield Lab(network, hosts, servers, key, known, workroot)
    finally:
        network.close()
        shutil.rmtree(workroot, ignore_errors=True)


@pytest.fixture(scope="module")
def core(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoreProcess]:
    remotes = [
        lab.remote("pair", ["a", "b"], user_map={"mallory": "nosuchlogin"}),
        lab.remote("stranger", ["stranger"]),
        lab.remote("rekeyed", ["rekeyed"]),
    ]
    process = lab.core(tmp_path_factory.mktemp("core") / "home", remotes)
    process.start()
    try:
        yield process
    finally:
        process.cleanup()


def test_output_patterns_select_files_as_the_local_gate_globs_them() -> None:
    files = [
        "result.txt",
        "sub/deep.txt",
        "sub/x/deeper.txt",
        ".hidden.txt",
        "a/b/c.csv",
        "c.csv",
        "sub/.h.txt",
    ]
    assert select_outputs(["result.txt", "sub/*.txt"], files) == ["result.txt", "sub/deep.txt"]
    assert select_outputs(["**/*.csv", "c.csv"], files) == ["a/b/c.csv", "c.csv"]
    assert select_outputs(["*.txt"], files) == ["result.txt"]  # a wildcard skips dot files, like glob
    assert select_outputs([".*.txt", "sub/**"], files) == [
        ".hidden.txt",
        "sub/deep.txt",
        "sub/x/deeper.txt",
    ]


def _job_processes(job_id: str) -> list[int]:
    """Live processes (anywhere on the machine, so on every host) that belong to the job."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z" and f"SKYPORT_JOB_ID={job_id}".encode() in environ.split(
            b"\0"
        ):
            found.append(int(pid))
    return found


def _wait_marker(marker: Path) -> str:
    return f"while [ ! -e {marker} ]; do sleep 0.05; done"


@pytest.mark.slow
def test_a_job_runs_on_a_host_with_its_files_and_live_logs(
    lab: Lab, core: CoreProcess, tmp_path: Path
) -> None:
    data = tmp_path / "data.txt"
    data.write_text("hello from the core\n")
    marker = lab.workroot / f"go-{tmp_path.name}"
    script = (
        "#!/bin/sh\n"
        'echo "started on $(echo $SSH_CONNECTION | cut -d" " -f3)"\n'
        f"{_wait_marker(marker)}\n"
        "tr a-z A-Z < data.txt > result.txt\n"
        "mkdir -p sub && echo deep > sub/deep.txt\n"
        "ln -s /etc/hostname sub/leak.txt\n"  # a symlink out of the workdir: never brought back
        "echo done; echo a warning >&2\n"
    )
    spec = JobSpec(
        name="files",
        script=script,
        remote="pair",
        input_files=["data.txt"],
        output_files=["result.txt", "sub/*.txt"],
    )
    with core.client() as c:
        job = c.submit(spec, inputs=[data])
        stream = c.follow(job.id)
        seen = b""
        while b"started on" not in seen:  # the first line arrives while the job still waits
            seen += next(stream)
        assert c.job(job.id).state is JobState.RUNNING
        marker.touch()
        seen += b"".join(stream)
        text = seen.decode()
        final = c.wait(job.id, 30)
        assert final.state is JobState.COMPLETED, final.state_details
        ran_on = final.node_names[0]
        assert f"started on {lab.hosts[ran_on].address}\n" in text
        assert text.endswith("done\n")
        assert c.log(job.id, "stderr") == b"a warning\n"

        outputs = {o["name"]: o for o in c.outputs(job.id)}
        assert set(outputs) == {"result.txt", "sub/deep.txt"}
        target = tmp_path / "result.txt"
        c.download(job.id, "result.txt", target)
        assert target.read_text() == "HELLO FROM THE CORE\n"
        assert outputs["result.txt"]["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()


@pytest.mark.slow
def test_each_host_of_a_remote_gets_jobs(lab: Lab, core: CoreProcess, tmp_path: Path) -> None:
    marker = lab.workroot / f"go-{tmp_path.name}"
    command = ["sh", "-c", f'{_wait_marker(marker)}; echo "$SSH_CONNECTION"']
    with core.client() as c:
        ids = [
            c.submit(JobSpec(name=f"spread{i}", command=command, remote="pair", cpus=1)).id for i in range(2)
        ]
        # one CPU per host: both run at once only if each host took one
        wait_for(lambda: all(c.job(i).state is JobState.RUNNING for i in ids), 20, "both jobs to run")
        marker.touch()
        finals = [c.wait(i, 30) for i in ids]
        assert all(j.state is JobState.COMPLETED for j in finals), [j.state_details for j in finals]
        assert sorted(j.node_names[0] for j in finals) == ["a", "b"]
        for job in finals:
            server_address = c.log(job.id).decode().split()[2]
            assert server_address == lab.hosts[job.node_names[0]].address


@pytest.mark.slow
def test_a_job_outlives_a_dropped_connection(lab: Lab, core: CoreProcess, tmp_path: Path) -> None:
    marker = lab.workroot / f"go-{tmp_path.name}"
    command = ["sh", "-c", f"echo before; {_wait_marker(marker)}; echo after; exit 4"]
    with core.client() as c:
        job = c.submit(JobSpec(name="survivor", command=command, remote="pair"))
        wait_for(lambda: c.log(job.id) == b"before\n", 20, "the job to start")
        server = lab.servers[c.job(job.id).node_names[0]]
        connects = core.log().count(f"host=root@{server.address}")
        server.stop()  # every SSH connection to the host is cut; the job runs on
        server.start()
        marker.touch()
        final = c.wait(job.id, 30)
        assert final.state is JobState.FAILED and final.exit_code == 4
        assert c.log(job.id) == b"before\nafter\n"
        assert core.log().count(f"host=root@{server.address}") > connects  # the core connected again


@pytest.mark.slow
def test_cancel_kills_the_jobs_whole_process_group_on_the_host(lab: Lab, core: CoreProcess) -> None:
    # The job ignores TERM (so does its background child): only the KILL after the grace ends them.
    command = ["sh", "-c", "trap '' TERM; sleep 300 & echo started; sleep 300"]
    with core.client() as c:
        job = c.submit(JobSpec(name="stubborn", command=command, remote="pair"))
        wait_for(lambda: c.log(job.id) == b"started\n", 20, "the job to start")
        wait_for(lambda: len(_job_processes(job.id)) >= 3, 10, "the job's processes")  # sh, 2 sleeps
        c.cancel(job.id)
        final = c.wait(job.id, 20)
        assert final.state is JobState.CANCELED
        assert final.signal == 9
        wait_for(lambda: not _job_processes(job.id), 5, "every process of the job to be gone")


@pytest.mark.slow
def test_a_job_past_its_walltime_is_stopped(core: CoreProcess) -> None:
    with core.client() as c:
        job = c.submit(JobSpec(name="long", command=["sleep", "60"], remote="pair", walltime=1))
        final = c.wait(job.id, 20)
        assert final.state is JobState.FAILED
        assert final.reason == "walltime"
        assert final.signal == 15  # sleep obeys the TERM
        wait_for(lambda: not _job_processes(job.id), 5, "every process of the job to be gone")


@pytest.mark.slow
def test_a_host_with_an_unknown_or_changed_key_is_refused(lab: Lab, core: CoreProcess) -> None:
    with core.client() as c:
        nodes = {n.name: n for n in c.nodes()}
        assert nodes["stranger"].state_power == "down"
        assert nodes["rekeyed"].state_power == "up"
        refusal = [line for line in core.log().splitlines() if "node=stranger" in line]
        assert refusal and "host key is not in" in refusal[0] and str(lab.known_hosts) in refusal[0]

        first = c.wait(c.submit(JobSpec(command=["true"], remote="rekeyed")).id, 20)
        assert first.state is JobState.COMPLETED
        # The host comes back with another key (reinstalled, or an impostor): the core must not go on.
        lab.servers["rekeyed"].rekey()
        refused = c.wait(c.submit(JobSpec(command=["true"], remote="rekeyed")).id, 20)
        assert refused.state is JobState.FAILED
        assert refused.reason == "launch_failed"
        assert "host key" in refused.state_details and "refused" in refused.state_details
        assert str(lab.known_hosts) in refused.state_details


@pytest.mark.slow
def test_jobs_log_in_with_their_owners_mapped_login(core: CoreProcess) -> None:
    core.add_user("mallory")
    with core.client() as admin, core.client("mallory") as mallory:
        ok = admin.wait(admin.submit(JobSpec(command=["id", "-un"], remote="pair")).id, 20)
        assert ok.state is JobState.COMPLETED and admin.log(ok.id) == b"root\n"  # the remote's `user`
        refused = mallory.wait(mallory.submit(JobSpec(command=["id", "-un"], remote="pair")).id, 20)
        assert refused.state is JobState.FAILED and refused.reason == "launch_failed"
        assert "nosuchlogin@" in refused.state_details and "refused the login" in refused.state_details


@pytest.mark.slow
def test_a_killed_core_finds_its_jobs_on_the_host_again(lab: Lab, tmp_path: Path) -> None:
    process = lab.core(tmp_path / "home", [lab.remote("solo", ["a"], cpus=2)])
    away, later = lab.workroot / f"away-{tmp_path.name}", lab.workroot / f"later-{tmp_path.name}"
    try:
        process.start()
        with process.client() as c:
            ended = c.submit(
                JobSpec(
                    name="ends-away",
                    command=["sh", "-c", f"echo before; {_wait_marker(away)}; exit 3"],
                    remote="solo",
                )
            ).id
            running = c.submit(
                JobSpec(
                    name="outlives", command=["sh", "-c", f"{_wait_marker(later)}; exit 7"], remote="solo"
                )
            ).id
            wait_for(
                lambda: all(c.job(i).state is JobState.RUNNING for i in (ended, running)), 20, "jobs to run"
            )

        process.kill()
        away.touch()
        status = lab.workroot / ".control" / f"{ended}.1" / "status"
        wait_for(status.exists, 10, "the first job to end on the host while the core is down")
        process.start()

        with process.client() as c:
            first = c.wait(ended, 20)
            assert first.state is JobState.FAILED and first.exit_code == 3
            assert c.log(ended) == b"before\n"  # its output written while the core was away is here
            assert c.job(running).state is JobState.RUNNING  # re-adopted, not lost
            later.touch()
            second = c.wait(running, 20)
            assert second.state is JobState.FAILED and second.exit_code == 7
            assert [e.reason for e in c.events(running)].count("started") == 1
    finally:
        process.cleanup()
