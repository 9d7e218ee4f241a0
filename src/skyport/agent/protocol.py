"""The agent protocol: what the core and a node agent say to each other on their WebSocket.

One long-lived WebSocket per agent, opened by the agent (so a node behind NAT needs no inbound port),
mutually authenticated by TLS (the agent's node certificate). Every message is a JSON object with a
``type``. Requests the core makes carry an ``id`` that the agent's ``reply`` repeats. Bulk data does not
go through this socket: the agent fetches inputs and sends outputs over plain HTTPS requests, and port
forwarding opens one extra WebSocket per tunnel.

Agent -> core
  ``hello``      on every (re)connect: the node's resources and every job attempt the agent knows,
                 running or ended-but-unacknowledged (so nothing is lost over a disconnect)
  ``heartbeat``  periodically
  ``log``        a chunk of a job's stdout/stderr at a byte offset (idempotent: resent chunks overwrite)
  ``exited``     an attempt ended; repeated on every reconnect until the core sends ``ack_exit``
  ``reply``      the answer to a request: ``{"id", "ok", "result" | "error"}``
Core -> agent
  ``welcome``    the answer to ``hello``: heartbeat interval, log offsets the core has, attempts to kill
  ``launch`` ``stage_in`` ``stage_out`` ``cancel`` ``status``   requests (with ``id``)
  ``ack_exit``   the core has recorded an attempt's end
  ``tunnel``     open a connection to a job's port and attach it to tunnel ``tunnel_id``

Out ports (``#SWM ports 8081/tcp/out``) go the other way and need no control message: while a job runs,
its agent listens on the node's ``127.0.0.1:<port>`` and opens, for each connection the job makes there,
a WebSocket to :data:`OUT_PATH`; the core checks that the job runs on that agent's node and declared the
port, connects to the job's submission address on that port and splices the two.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from typing import Any

from skyport.models import JobSpec

#: Paths on the core, under its HTTPS listener.
ENROL_PATH = "/agent/v1/enrol"
RENEW_PATH = "/agent/v1/renew"
CONNECT_PATH = "/agent/v1/connect"
TUNNEL_PATH = "/agent/v1/tunnels/{tunnel_id}"
#: An agent's tunnel for one connection a job made to one of its ``out`` ports.
OUT_PATH = "/agent/v1/jobs/{job_id}/out/{port}"
#: The core's first frame on an out tunnel that is connected (a refusal is a close with a reason).
OUT_READY = "ready"
INPUT_PATH = "/agent/v1/jobs/{job_id}/inputs/{name}"
OUTPUT_PATH = "/agent/v1/jobs/{job_id}/outputs/{name}"
#: Header carrying the SHA-256 (hex) of an uploaded output file, checked by the core as it streams.
SHA256_HEADER = "x-skyport-sha256"

#: Largest control message (log chunks are the largest).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Log chunks are at most this big before base64.
LOG_CHUNK_BYTES = 256 * 1024


def node_id_for(remote_id: str, node_name: str) -> str:
    """A node's id follows from its remote and name, so re-enrolling a node keeps its history."""
    return str(uuid.uuid5(uuid.UUID(remote_id), node_name))


@dataclass(frozen=True)
class WireJob:
    """What an agent needs to run one attempt (the core-side paths stay on the core)."""

    job_id: str
    attempt: int
    name: str
    owner: str
    spec: dict[str, Any]
    node_names: list[str]
    env: dict[str, str]
    input_paths: list[str]
    output_patterns: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WireJob:
        JobSpec.model_validate(data["spec"])  # refuse a malformed spec before anything runs
        return cls(
            job_id=str(data["job_id"]),
            attempt=int(data["attempt"]),
            name=str(data["name"]),
            owner=str(data["owner"]),
            spec=dict(data["spec"]),
            node_names=[str(n) for n in data["node_names"]],
            env={str(k): str(v) for k, v in data["env"].items()},
            input_paths=[str(p) for p in data.get("input_paths", [])],
            output_patterns=[str(p) for p in data.get("output_patterns", [])],
        )


def exit_to_dict(exit_code: int | None, signal: int | None, reason: str, message: str) -> dict[str, Any]:
    return {"exit_code": exit_code, "signal": signal, "reason": reason, "message": message}
