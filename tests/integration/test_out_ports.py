"""``out`` ports: a job on an agent node reaches its submission address's port at ``localhost:<port>``.

The agent listens on the node's 127.0.0.1:<port> while the job runs and carries each connection through
the core, which connects to the job's ``submission-address``. Here the "submitting side" is a server on
127.0.0.2 (so it cannot be mistaken for the agent's own listener on 127.0.0.1).
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from skyport.models import JobState
from tests.support.agent import AgentProcess
from tests.support.core import CoreProcess, wait_for

REMOTE = "lab"
SUBMITTER = "127.0.0.2"


@pytest.fixture
def agent_core(tmp_path: Path) -> Iterator[CoreProcess]:
    remotes = [{"kind": "agent", "name": REMOTE, "heartbeat_timeout_s": 5}]
    core = CoreProcess(
        tmp_path / "home", env={"SKYPORT_REMOTES": json.dumps(remotes), "SKYPORT_LOCAL__ENABLED": "false"}
    )
    core.start()
    agent = AgentProcess(core, REMOTE, "node1", tmp_path / "agent1")
    agent.start()
    try:
        up = lambda: any(n.name == "node1" and n.state_power == "up" for n in core.client().nodes())  # noqa: E731
        wait_for(up, 30, f"node1 to come up:\n{agent.log()}")
        yield core
    finally:
        agent.cleanup()
        core.cleanup()


class _Greeter(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        name = self.request.recv(100)
        self.request.sendall(b"hub says hi to " + name)


@pytest.fixture
def submitter() -> Iterator[int]:
    """A server on the submitting side; its port is free on 127.0.0.1 too (for the agent's listener)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    server = socketserver.ThreadingTCPServer((SUBMITTER, port), _Greeter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()


def _job(port: int, address: str) -> str:
    return (
        f"#!/bin/sh\n#SWM ports {port}/tcp/out\n#SWM submission-address {address}\n"
        'exec /usr/bin/python3 -c "import socket, sys\n'
        f"s = socket.create_connection(('127.0.0.1', {port}), timeout=20)\n"
        "s.sendall(b'job')\n"
        "print(s.recv(100).decode() or 'closed')\"\n"
    )


def test_a_job_reaches_its_submission_address_through_its_out_port(
    agent_core: CoreProcess, submitter: int
) -> None:
    c = agent_core.client()
    job = c.submit(script=_job(submitter, SUBMITTER))
    done = wait_for(lambda: (j := c.job(job.id)).state.terminal and j, 60, "the job to end")
    assert done.state is JobState.COMPLETED, (done.state_details, c.log(job.id, "stderr"))
    assert c.log(job.id).decode().strip() == "hub says hi to job"

    # The listener lived only as long as the job.
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", submitter), timeout=5):
        pass


def test_nothing_at_the_submission_address_closes_the_jobs_connection(
    agent_core: CoreProcess, submitter: int
) -> None:
    c = agent_core.client()
    job = c.submit(script=_job(submitter, "127.0.0.3"))  # nothing listens there
    done = wait_for(lambda: (j := c.job(job.id)).state.terminal and j, 60, "the job to end")
    assert c.log(job.id).decode().strip() == "closed", (done.state_details, c.log(job.id, "stderr"))
