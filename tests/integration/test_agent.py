"""Jobs on agent nodes: enrolment, running, logs, outputs, cancel, reconnects, node loss, authorization."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from websockets.asyncio.client import connect

from skyport.agent.identity import NodeIdentity, enrolment_client
from skyport.client import ApiError
from skyport.client.ports import forward, open_port
from skyport.models import JobState
from tests.support.agent import AgentProcess
from tests.support.core import CoreProcess, wait_for

REMOTE = "lab"


@pytest.fixture
def agent_core(tmp_path: Path) -> Iterator[CoreProcess]:
    remotes = [{"kind": "agent", "name": REMOTE, "heartbeat_timeout_s": 3}]
    core = CoreProcess(
        tmp_path / "home", env={"SKYPORT_REMOTES": json.dumps(remotes), "SKYPORT_LOCAL__ENABLED": "false"}
    )
    core.start()
    try:
        yield core
    finally:
        core.cleanup()


@pytest.fixture
def agent(agent_core: CoreProcess, tmp_path: Path) -> Iterator[AgentProcess]:
    process = AgentProcess(agent_core, REMOTE, "node1", tmp_path / "agent1")
    process.start()
    try:
        wait_for(lambda: _node_up(agent_core, "node1"), 30, f"node1 to come up:\n{process.log()}")
        yield process
    finally:
        process.cleanup()


def _node_up(core: CoreProcess, name: str) -> bool:
    return any(n.name == name and n.state_power == "up" for n in core.client().nodes())


def _ended(core: CoreProcess, job_id: str, timeout: float = 30) -> JobState:
    def ended() -> JobState | None:
        state = core.client().job(job_id).state
        return state if state.terminal else None

    return JobState(wait_for(ended, timeout, f"job {job_id} to end"))


def test_a_job_runs_on_an_enrolled_agent_with_its_logs_and_outputs(
    agent_core: CoreProcess, agent: AgentProcess
) -> None:
    c = agent_core.client()
    node = next(n for n in c.nodes() if n.name == "node1")
    assert node.cpus == 2, "the node offers what its agent declared"
    script = (
        "#!/bin/sh\n#SWM output-files result.txt\n"
        "echo hello from $(hostname) on $SKYPORT_NODES\necho oops >&2\necho 42 > result.txt\nexit 3\n"
    )
    job = c.submit(script=script)
    assert _ended(agent_core, job.id) is JobState.FAILED
    done = c.job(job.id)
    assert done.exit_code == 3 and done.node_names == ["node1"]
    assert c.log(job.id).decode().startswith("hello from ") and b"node1" in c.log(job.id)
    assert c.log(job.id, "stderr") == b"oops\n"
    outputs = {f["name"]: f for f in c.outputs(job.id)}
    assert outputs["result.txt"]["size"] == 3


def test_a_bootstrap_token_enrols_once_and_a_node_certificate_is_not_a_user(
    agent_core: CoreProcess, agent: AgentProcess, tmp_path: Path
) -> None:
    # The token was used by node1: a second agent with the same token is refused.
    url = agent_core.url + "/agent/v1/enrol"
    from skyport.pki import generate_key, make_csr

    fresh = agent_core.client().bootstrap_token(REMOTE, "node2")["token"]
    ca = str(agent_core.home / "ca" / "ca.pem")
    server_only = ssl.create_default_context(cafile=ca)
    body = {"token": fresh, "csr": make_csr(generate_key(), "n2").decode()}
    assert httpx.post(url, json=body, verify=server_only).status_code == 200
    again = httpx.post(url, json=body, verify=server_only)
    assert again.status_code == 401 and "used already" in again.json()["detail"]
    # The node certificate cannot act as a user.
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(str(agent.state_dir / "node-cert.pem"), str(agent.state_dir / "node-key.pem"))
    whoami = httpx.get(agent_core.url + "/api/v1/whoami", verify=context)
    assert whoami.status_code == 401


def test_nodes_of_one_process_enrol_over_a_shared_connection_each_with_its_own_certificate(
    agent_core: CoreProcess, tmp_path: Path
) -> None:
    """An agent pool's nodes share an enrolment client: one kept-alive TLS connection carries all
    their enrolments (counted by a TCP relay in front of the core), and each node still gets its own
    certificate for its own key, with its own token."""
    names = ["pooled1", "pooled2", "pooled3"]
    tokens = {n: agent_core.client().bootstrap_token(REMOTE, n)["token"] for n in names}
    ca_file = agent_core.home / "ca" / "ca.pem"

    async def enrol_all() -> tuple[int, list[dict[str, str]]]:
        port = int(agent_core.url.rsplit(":", 1)[1])
        connections = 0

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                dst.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

        server = await asyncio.start_server(relay, "127.0.0.1", 0)
        relay_url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server, enrolment_client(ca_file.read_bytes(), max_connections=1) as client:
            nodes = []
            for name in names:
                identity = NodeIdentity(tmp_path / name, relay_url)
                nodes.append(await identity.enrol_async(tokens[name], ca_file, client))
            return connections, nodes

    connections, nodes = asyncio.run(enrol_all())
    assert connections == 1
    assert sorted(n["node_name"] for n in nodes) == names
    subjects = set()
    for name in names:
        cert = x509.load_pem_x509_certificate((tmp_path / name / "node-cert.pem").read_bytes())
        key = load_pem_private_key((tmp_path / name / "node-key.pem").read_bytes(), None)
        assert cert.public_key().public_numbers() == key.public_key().public_numbers()
        subjects.add(cert.subject.rfc4514_string())
    assert len(subjects) == len(names)


def test_cancel_stops_a_job_on_the_agent(agent_core: CoreProcess, agent: AgentProcess) -> None:
    c = agent_core.client()
    job = c.submit(script="#!/bin/sh\necho started\nsleep 300\n")
    wait_for(lambda: c.log(job.id) == b"started\n", 30, "the job to start and its log to arrive")
    c.cancel(job.id)
    assert _ended(agent_core, job.id) is JobState.CANCELED


def test_a_job_survives_its_agent_being_cut_off_and_reconnecting(
    agent_core: CoreProcess, agent: AgentProcess
) -> None:
    c = agent_core.client()
    job = c.submit(script="#!/bin/sh\necho one\nwhile [ ! -f go ]; do sleep 0.1; done\necho two\nexit 7\n")
    wait_for(lambda: c.log(job.id) == b"one\n", 30, "the first line")
    workdir = next(agent.workroot.glob(f"{job.id}.*"))
    agent.kill()  # the agent goes away; its job keeps running
    (workdir / "go").touch()
    agent.start()  # back within the heartbeat timeout: the job's end and its output are not lost
    assert _ended(agent_core, job.id) is JobState.FAILED
    assert c.job(job.id).exit_code == 7
    assert c.log(job.id) == b"one\ntwo\n"


def test_a_node_that_stops_answering_is_marked_down_and_its_jobs_fail(
    agent_core: CoreProcess, agent: AgentProcess
) -> None:
    c = agent_core.client()
    job = c.submit(script="#!/bin/sh\necho up\nsleep 300\n")
    wait_for(lambda: c.log(job.id) == b"up\n", 30, "the job to start")
    agent.kill()
    assert _ended(agent_core, job.id) is JobState.FAILED
    done = c.job(job.id)
    assert done.reason == "node_lost" and "node1" in done.state_details
    wait_for(lambda: not _node_up(agent_core, "node1"), 10, "node1 to be marked down")
    # When it comes back, the job the core gave up on is stopped there, not left running.
    agent.start()
    wait_for(lambda: _node_up(agent_core, "node1"), 30, "node1 to come back")
    wait_for(lambda: not _job_processes(job.id), 30, "the abandoned job to be stopped on the node")


def _job_processes(job_id: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if job_id.encode() in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_an_unknown_remote_or_a_user_asking_for_a_token_is_refused(agent_core: CoreProcess) -> None:
    with pytest.raises(ApiError) as unknown:
        agent_core.client().bootstrap_token("nowhere", "n1")
    assert unknown.value.status == 404
    agent_core.add_user("bob")
    with pytest.raises(ApiError) as forbidden:
        agent_core.client("bob").bootstrap_token(REMOTE, "n1")
    assert forbidden.value.status == 403


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_server_job(core: CoreProcess, port: int, user: str = "admin") -> str:
    script = (
        f"#!/bin/sh\n#SWM ports {port}/tcp/in\necho served > index.html\n"
        f"exec python3 -m http.server {port} --bind 127.0.0.1\n"
    )
    job = core.client(user).submit(script=script)
    return job.id


def _cancel_and_wait(core: CoreProcess, job_id: str) -> None:
    """Cancel the job and wait until it ended and nothing of it runs: the fixtures stop the agent and
    the core right after the test, and a cancel still on its way would leave the job's server running."""
    c = core.client()
    c.cancel(job_id)
    wait_for(lambda: c.job(job_id).state.terminal, 30, "the canceled job to end")
    wait_for(lambda: not _job_processes(job_id), 30, "the canceled job's processes to be gone")


async def _get_through_forward(core: CoreProcess, job_id: str, port: int, user: str = "admin") -> bytes:
    server = await forward(core.users[user].config, job_id, port)
    local = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(100):  # the job's server may not listen yet
                try:
                    return (await http.get(f"http://127.0.0.1:{local}/index.html")).content
                except (httpx.ReadError, httpx.RemoteProtocolError, httpx.ConnectError):
                    await asyncio.sleep(0.1)
        raise AssertionError("the job's port never answered through the tunnel")
    finally:
        server.close()


def test_port_forward_reaches_a_jobs_http_server_on_an_agent_node(
    agent_core: CoreProcess, agent: AgentProcess
) -> None:
    port = _free_port()
    job_id = _http_server_job(agent_core, port)
    c = agent_core.client()
    wait_for(lambda: c.job(job_id).state is JobState.RUNNING, 30, "the server job to run")
    assert asyncio.run(_get_through_forward(agent_core, job_id, port)) == b"served\n"
    _cancel_and_wait(agent_core, job_id)


async def _refused(core: CoreProcess, job_id: str, port: int, user: str) -> str:
    with pytest.raises(ConnectionError) as refused:
        await open_port(core.users[user].config, job_id, port)
    return str(refused.value)


def test_only_the_owner_reaches_a_declared_port(agent_core: CoreProcess, agent: AgentProcess) -> None:
    agent_core.add_user("mallory")
    port = _free_port()
    job_id = _http_server_job(agent_core, port)
    c = agent_core.client()
    wait_for(lambda: c.job(job_id).state is JobState.RUNNING, 30, "the server job to run")
    assert "HTTP 404" in asyncio.run(_refused(agent_core, job_id, port, "mallory"))
    undeclared = asyncio.run(_refused(agent_core, job_id, port + 1, "admin"))
    assert "not an 'in' port" in undeclared and "HTTP 403" in undeclared
    _cancel_and_wait(agent_core, job_id)


def test_an_in_port_is_reachable_at_node_ips_0_for_the_original_clients(
    agent_core: CoreProcess, agent: AgentProcess
) -> None:
    port = _free_port()
    job_id = _http_server_job(agent_core, port)
    c = agent_core.client()

    def address() -> str | None:
        job = c.job(job_id)
        ips = job.node_ips
        # The node's own address (the agent connects from 127.0.0.1 here) is replaced by the job's own.
        own = ips and ips[0].startswith("127.") and ips[0] != "127.0.0.1"
        return ips[0] if job.state is JobState.RUNNING and own else None

    ip = str(wait_for(address, 30, "the core to listen for the job's port on an address of the job's own"))

    def fetch() -> bytes | None:
        try:
            return httpx.get(f"http://{ip}:{port}/index.html", timeout=5).content
        except httpx.HTTPError:
            return None

    assert wait_for(fetch, 30, "the job's server through the core's listener") == b"served\n"
    _cancel_and_wait(agent_core, job_id)
    wait_for(lambda: fetch() is None, 30, "the listener to close after the job ended")


async def _impersonate(core: CoreProcess, identity: NodeIdentity, job_id: str) -> dict[str, object]:
    """Node2's agent claims node1's job ended and writes into its log; returns the core's welcome."""
    url = "wss://" + core.url.split("://", 1)[1] + "/agent/v1/connect"
    async with connect(url, ssl=identity.client_context()) as ws:
        await ws.send(json.dumps({"type": "hello", "node": {"cpus": 1, "mem": 1}, "jobs": []}))
        welcome: dict[str, object] = json.loads(await ws.recv())
        forged = {"type": "log", "job_id": job_id, "attempt": 1, "stream": "stdout", "offset": 0}
        await ws.send(json.dumps({**forged, "data": base64.b64encode(b"forged\n").decode()}))
        exit = {"exit_code": 0, "signal": None, "reason": "exit_code", "message": "forged"}
        await ws.send(json.dumps({"type": "exited", "job_id": job_id, "attempt": 1, "exit": exit}))
        await ws.send(json.dumps({"type": "heartbeat"}))
        return welcome


def test_an_agent_may_not_report_on_another_nodes_job(
    agent_core: CoreProcess, agent: AgentProcess, tmp_path: Path
) -> None:
    c = agent_core.client()
    job = c.submit(script="#!/bin/sh\necho real\nwhile [ ! -f go ]; do sleep 0.1; done\n")
    wait_for(lambda: c.log(job.id) == b"real\n", 30, "node1's job to start")
    intruder = NodeIdentity(tmp_path / "node2", agent_core.url)
    token = c.bootstrap_token(REMOTE, "node2")["token"]
    intruder.enrol(token, agent_core.home / "ca" / "ca.pem")
    asyncio.run(_impersonate(agent_core, intruder, job.id))
    refusals = "refused a report on another node's job"
    wait_for(lambda: agent_core.log().count(refusals) >= 2, 10, "the core to refuse both forged reports")
    # Node1's job is untouched: still running, its log as node1 wrote it.
    assert c.job(job.id).state is JobState.RUNNING
    assert c.log(job.id) == b"real\n"
    (next(agent.workroot.glob(f"{job.id}.*")) / "go").touch()
    assert _ended(agent_core, job.id) is JobState.COMPLETED
    assert c.log(job.id) == b"real\n"
