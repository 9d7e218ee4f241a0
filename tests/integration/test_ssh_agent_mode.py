"""The ``ssh`` gate in ``agent`` mode: the core starts ``skyport agent`` on hosts over SSH, keeps it up.

Hosts are network namespaces of the test's own making, each with a real OpenSSH server
(tests/support/hosts.py, tests/support/sshd.py); the core listens on the bridge, where the agents it
starts reach it. What a user notices: configuring a remote is enough — the node enrols by itself and
jobs run on it (in the host's network); an agent that dies is started again by the core (without a new
enrolment); a host whose key is unknown is refused and nothing is started there; a host without the agent
command says so.

The hosts share this machine's file system, so ``agent_command`` is this venv's ``skyport agent`` and
the test can read an agent's pid file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from skyport.models import JobState
from tests.support.core import VENV_BIN, CoreProcess, make_workroot, wait_for
from tests.support.hosts import Host, HostNetwork
from tests.support.sshd import SSHD, ClientKey, SSHServer, write_known_hosts

CAN_RUN_HOSTS = os.geteuid() == 0 and Path(SSHD).exists() and shutil.which("ip") is not None
HEARTBEAT_TIMEOUT_S = 6


@dataclass
class Lab:
    network: HostNetwork
    hosts: dict[str, Host]
    state_root: Path
    core: CoreProcess

    def state_dir(self, node: str) -> Path:
        return self.state_root / node

    def agent_pid(self, node: str) -> int | None:
        pid_file = self.state_dir(node) / "agent.pid"
        text = pid_file.read_text().strip() if pid_file.exists() else ""
        return int(text) if text.isdigit() else None

    def node_up(self, node: str) -> bool:
        return any(n.name == node and n.state_power == "up" for n in self.core.client().nodes())


def _remote(
    name: str, host: Host, key: ClientKey, known_hosts: Path, state_root: Path, workroot: Path, **extra: Any
) -> dict[str, Any]:
    return {
        "kind": "ssh",
        "mode": "agent",
        "name": name,
        "hosts": [{"host": host.address, "name": host.name, "cpus": 2}],
        "user": "root",
        "key_file": str(key.path),
        "known_hosts": str(known_hosts),
        "workroot": str(workroot),
        "agent_command": f"{VENV_BIN / 'skyport'} agent",
        "agent_options": ["--default-user", "nobody", "--heartbeat", "0.5"],
        "agent_state_dir": str(state_root / "{node}"),
        "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
        "connect_timeout_s": 5,
        **extra,
    }


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if not CAN_RUN_HOSTS:
        pytest.skip("needs root, OpenSSH's sshd (scripts/setup.sh installs it) and iproute2")
    base = tmp_path_factory.mktemp("ssh-agent")
    workroot = make_workroot()
    network = HostNetwork()
    core: CoreProcess | None = None
    try:
        key = ClientKey.create(base / "core-key")
        hosts = {name: network.add_host(name) for name in ("alpha", "stranger", "bare")}
        servers = {name: SSHServer(base / f"sshd-{name}", [key], host) for name, host in hosts.items()}
        for server in servers.values():
            server.start()
        # "stranger" runs sshd like the others, but its key was never recorded
        known = write_known_hosts(base / "known_hosts", [s for n, s in servers.items() if n != "stranger"])
        state_root = base / "agents"
        remotes = [
            _remote("lab", hosts["alpha"], key, known, state_root, workroot),
            _remote("strangers", hosts["stranger"], key, known, state_root, workroot),
            _remote(
                "bare", hosts["bare"], key, known, state_root, workroot, agent_command="no-such-skyport agent"
            ),
        ]
        env = {"SKYPORT_REMOTES": json.dumps(remotes), "SKYPORT_LOCAL__ENABLED": "false"}
        core = CoreProcess(base / "home", env=env, host=network.gateway)
        core.start()
        yield Lab(network, hosts, state_root, core)
    finally:
        if core is not None:
            core.cleanup()
        network.close()  # kills the agents the core started in the hosts
        shutil.rmtree(workroot, ignore_errors=True)


def _run(core: CoreProcess, script: str) -> tuple[JobState, str, str]:
    c = core.client()
    job = c.submit(script=script)

    def ended() -> JobState | None:
        state = c.job(job.id).state
        return state if state.terminal else None

    wait_for(ended, 60, f"job {job.id} to end:\n{core.log()[-3000:]}")
    state = c.job(job.id).state
    return state, c.job(job.id).node_names[0], c.log(job.id).decode()


def test_the_core_starts_the_agent_over_ssh_and_jobs_run_on_the_host(lab: Lab) -> None:
    wait_for(lambda: lab.node_up("alpha"), 60, f"alpha's agent to enrol and connect:\n{lab.core.log()}")
    pid = lab.agent_pid("alpha")
    assert pid is not None and Path(f"/proc/{pid}").exists(), "the agent runs, with its own pid file"
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"--state-dir" in argv and not any(b"token" in a for a in argv), "no token in the agent's argv"
    assert os.getsid(pid) == pid, "detached: a session of its own, so it outlives the SSH session"
    assert not list(lab.state_dir("alpha").glob("*token*")), "no token left in a file"
    node = next(n for n in lab.core.client().nodes() if n.name == "alpha")
    assert node.ip == lab.hosts["alpha"].address, "the node connected from its host"

    state, where, out = _run(lab.core, "#!/bin/sh\n#SWM cpus 2\nip -4 -o addr show | grep -v ' lo '\n")
    assert state is JobState.COMPLETED
    assert where == "alpha"
    assert lab.hosts["alpha"].address in out, "the job ran in the host's network"


def test_inputs_and_outputs_reach_the_host_and_come_back_verified(lab: Lab, tmp_path: Path) -> None:
    wait_for(lambda: lab.node_up("alpha"), 60, "alpha's agent")
    data = os.urandom(3 * 1024 * 1024 + 123)
    source = tmp_path / "data.bin"
    source.write_bytes(data)
    script = (
        "#!/bin/sh\n#SWM input-files data.bin\n#SWM output-files copy.bin\n"
        "sha256sum data.bin | cut -d' ' -f1\ncp data.bin copy.bin\n"
    )
    c = lab.core.client()
    job = c.submit(script=script, inputs=[source])
    wait_for(lambda: c.job(job.id).state.terminal, 60, f"job {job.id} to end")
    assert c.job(job.id).state is JobState.COMPLETED, c.job(job.id).state_details
    assert c.log(job.id).decode().strip() == hashlib.sha256(data).hexdigest(), "the input arrived whole"
    outputs = {f["name"]: f for f in c.outputs(job.id)}
    assert outputs["copy.bin"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert c.download(job.id, "copy.bin", tmp_path / "back.bin") == len(data)
    assert (tmp_path / "back.bin").read_bytes() == data, "the output came back whole"


def test_an_agent_that_dies_is_started_again_by_the_core(lab: Lab) -> None:
    wait_for(lambda: lab.node_up("alpha"), 60, "alpha's agent")
    old = lab.agent_pid("alpha")
    assert old is not None
    enrolment = (lab.state_dir("alpha") / "node.json").read_text()
    os.kill(old, signal.SIGKILL)

    def restarted() -> bool:
        new = lab.agent_pid("alpha")
        return new is not None and new != old and Path(f"/proc/{new}").exists() and lab.node_up("alpha")

    wait_for(restarted, 60, f"the core to start alpha's agent again:\n{lab.core.log()[-3000:]}")
    assert (lab.state_dir("alpha") / "node.json").read_text() == enrolment, "same node, not enrolled anew"
    state, where, _ = _run(lab.core, "#!/bin/sh\necho again\n")
    assert (state, where) == (JobState.COMPLETED, "alpha")


def test_a_host_with_an_unknown_key_is_refused_and_nothing_is_started_there(lab: Lab) -> None:
    def refused() -> list[str]:
        return [
            line
            for line in lab.core.log().splitlines()
            if "cannot start the agent" in line and "stranger" in line
        ]

    lines = wait_for(refused, 30, "the core to refuse the stranger's host key")
    assert isinstance(lines, list)
    assert "host key is not in" in lines[0], lines[0]
    assert not lab.state_dir("stranger").exists(), "nothing was done on a host that was not verified"
    assert not any(n.name == "stranger" for n in lab.core.client().nodes())


def test_a_host_without_the_agent_command_says_so(lab: Lab) -> None:
    def told() -> list[str]:
        return [
            line
            for line in lab.core.log().splitlines()
            if "cannot start the agent" in line and "bare" in line
        ]

    lines = wait_for(told, 30, "the core to report the missing agent command")
    assert isinstance(lines, list)
    assert "no-such-skyport" in lines[0] and "is not found on the host" in lines[0], lines[0]
    assert not any(n.name == "bare" for n in lab.core.client().nodes())


def test_after_a_core_restart_the_agent_is_pointed_at_the_new_core(lab: Lab) -> None:
    """A core killed with ``kill -9`` comes back (here on another port): it finds its agent running with
    the old address and restarts it with the new one; the node keeps its enrolment and runs jobs."""
    wait_for(lambda: lab.node_up("alpha"), 60, "alpha's agent")
    old = lab.agent_pid("alpha")
    enrolment = (lab.state_dir("alpha") / "node.json").read_text()
    old_url = lab.core.url
    lab.core.kill()
    lab.core.start()
    assert lab.core.url != old_url
    log = lab.state_dir("alpha") / "agent.log"

    def serving_new_core() -> bool:
        pid = lab.agent_pid("alpha")
        lines = log.read_text().splitlines()
        connected = any("] connected to the core" in ln and f"url={lab.core.url}" in ln for ln in lines)
        return pid is not None and pid != old and connected

    wait_for(serving_new_core, 60, f"the agent to follow the core:\n{lab.core.log()[-3000:]}")
    assert (lab.state_dir("alpha") / "node.json").read_text() == enrolment
    state, where, _ = _run(lab.core, "#!/bin/sh\necho after the restart\n")
    assert (state, where) == (JobState.COMPLETED, "alpha")
