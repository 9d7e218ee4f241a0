"""Port forwarding: byte pipes between a user (or a local listener) and a port of a running job.

A tunnel is two :class:`~skyport.gates.agent.TunnelLink` ends spliced together: the user's WebSocket
(or a TCP connection to the core-side listener kept for the original clients) on one side; on the other,
whatever the job's gate opened — an agent's tunnel socket, or a TCP connection to a local port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
from collections.abc import Awaitable, Callable

import structlog
from fastapi import WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from skyport.gates.base import ExecutorGate, GateError, StreamTunnel, TunnelLink
from skyport.models import JobState
from skyport.server.auth import Principal, may_see_job
from skyport.server.store import jobs as job_store
from skyport.server.store.engine import Store

log = structlog.get_logger(__name__)


class WebSocketTunnel:
    """A WebSocket carrying raw bytes (binary frames); an empty receive means the peer closed."""

    def __init__(self, websocket: WebSocket) -> None:
        self._ws = websocket
        self._done = asyncio.Event()

    async def send_bytes(self, data: bytes) -> None:
        await self._ws.send_bytes(data)

    async def receive_bytes(self) -> bytes | None:
        try:
            message = await self._ws.receive()
        except (WebSocketDisconnect, RuntimeError):
            return None
        if message["type"] == "websocket.disconnect":
            return None
        data = message.get("bytes")
        if data is None:
            text = message.get("text")
            return text.encode() if text else b""
        return bytes(data)

    async def close(self) -> None:
        self._done.set()
        if self._ws.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await self._ws.close()

    async def closed(self) -> None:
        """Wait until the tunnel is finished (the endpoint must stay open while bytes flow)."""
        await self._done.wait()


async def splice(a: TunnelLink, b: TunnelLink) -> None:
    """Copy bytes both ways until either side closes; then close both."""

    async def pump(src: TunnelLink, dst: TunnelLink) -> None:
        while (data := await src.receive_bytes()) is not None:
            if data:
                await dst.send_bytes(data)

    tasks = [asyncio.create_task(pump(a, b)), asyncio.create_task(pump(b, a))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await a.close()
        await b.close()


def loopback_address(job_id: str) -> str:
    """A loopback address of the job's own (127.x.y.z): its ports can listen on their own numbers."""
    digest = hashlib.sha256(job_id.encode()).digest()
    return str(ipaddress.IPv4Address(bytes([127, digest[0] | 1, digest[1], digest[2] | 1])))


OpenPort = Callable[[], Awaitable[TunnelLink]]


class PortListeners:
    """Core-side listeners for the original clients: ``node_ips[0]:<port>`` reaches the job's port.

    Each running job with ``in`` ports gets a loopback address of its own on the core host, listening on
    the job's port numbers; every connection is spliced to the job's port through its gate.
    """

    def __init__(self) -> None:
        self._servers: dict[str, list[asyncio.Server]] = {}

    def serving(self, job_id: str) -> bool:
        return job_id in self._servers

    def jobs(self) -> set[str]:
        return set(self._servers)

    async def open(self, job_id: str, ports: list[int], opener: Callable[[int], OpenPort]) -> str:
        address = loopback_address(job_id)
        servers: list[asyncio.Server] = []
        for port in ports:

            async def accept(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int = port
            ) -> None:
                client = StreamTunnel(reader, writer)
                try:
                    far = await opener(port)()
                except Exception as exc:
                    log.warning("port forward failed", job_id=job_id, port=port, error=str(exc))
                    await client.close()
                    return
                await splice(client, far)

            try:
                servers.append(await asyncio.start_server(accept, address, port))
            except OSError:
                for server in servers:
                    server.close()
                raise
        self._servers[job_id] = servers
        return address

    async def close(self, job_id: str) -> None:
        for server in self._servers.pop(job_id, []):
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()

    async def close_all(self) -> None:
        for job_id in list(self._servers):
            await self.close(job_id)


#: Where a job's ``out`` ports lead when it names no ``submission-address``: the core's own host.
DEFAULT_SUBMISSION_ADDRESS = "127.0.0.1"


class PortError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class JobPorts:
    """Opens a running job's ports for its owner, through whatever gate runs it."""

    def __init__(self, store: Store, gates: dict[str, ExecutorGate]) -> None:
        self._store = store
        self._gates = gates

    async def open(self, principal: Principal, job_id: str, port: int) -> TunnelLink:
        row = await self._store.read(job_store.get_job_row, job_id)
        job = await self._store.read(job_store.get_job, job_id) if row is not None else None
        if row is None or job is None or not may_see_job(principal, job.owner):
            raise PortError(404, f"no job {job_id} of yours")
        declared = {p.port for p in job.spec.ports if p.direction == "in"}
        if port not in declared:
            raise PortError(
                403,
                f"port {port} is not an 'in' port of the job: declare it (#SWM ports {port}/tcp/in)",
            )
        if job.state is not JobState.RUNNING or not row.handle:
            raise PortError(409, f"the job is {job.state.value}: its ports can be reached while it runs")
        gate = self._gates.get(row.remote_id)
        if gate is None:
            raise PortError(409, "the job's remote is not served by this core")
        try:
            return await gate.open_port(row.handle, port)
        except GateError as exc:
            raise PortError(502, str(exc)) from None

    async def open_out(self, job_id: str, port: int) -> TunnelLink:
        """A connection from a job on a remote node to its submission address's ``port`` (an ``out`` port).

        The job's agent listens on the node's ``127.0.0.1:<port>`` while the job runs and asks for one
        of these per connection the job makes there (the caller has checked that the job is placed on
        that agent's node). The far end is ``#SWM submission-address``, or the core's own host when the
        job names none: a terminal beside the core (a JupyterHub whose API listens on loopback) is reached
        without any listener on a public address. Jobs of the local gate run on the core's host and reach
        ``localhost:<port>`` directly, without a tunnel.
        """
        job = await self._store.read(job_store.get_job, job_id)
        if job is None:
            raise PortError(404, f"no job {job_id}")
        declared = {p.port for p in job.spec.ports if p.direction == "out"}
        if port not in declared:
            raise PortError(403, f"port {port} is not an 'out' port of the job (#SWM ports {port}/tcp/out)")
        if job.state is not JobState.RUNNING:
            raise PortError(409, f"the job is {job.state.value}: its out ports work while it runs")
        address = job.spec.submission_address or DEFAULT_SUBMISSION_ADDRESS
        try:
            return await StreamTunnel.connect(address, port)
        except GateError:
            raise PortError(
                502, f"nothing answers on {address}:{port} (the job's submission address)"
            ) from None
