"""The agent API (``/agent/v1``): enrolment, renewal, the agent's control socket, its data and tunnels.

Thin: identity and authorization come from :mod:`skyport.server.auth`, enrolment from
:mod:`skyport.server.nodes`, the session protocol from :class:`skyport.gates.agent.AgentHub`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, MutableMapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
from fastapi import APIRouter, Depends, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.websockets import WebSocketState

from skyport.agent import protocol
from skyport.server.api.deps import check_job_id, get_core, get_principal
from skyport.server.auth import (
    AuthError,
    NodePrincipal,
    Principal,
    authenticate_node,
    may_touch_job,
    require_admin,
)
from skyport.server.core import Core
from skyport.server.nodes import EnrolmentError
from skyport.server.store import enrolment as enrol_store
from skyport.server.tunnels import PortError, WebSocketTunnel, splice

log = structlog.get_logger(__name__)
router = APIRouter(tags=["agent"])

UPLOAD_CHUNK = 1024 * 1024


class _InputFile(FileResponse):
    """An input file for an agent, sent in 1 MiB pieces: Starlette's 64 KiB default costs a thread hop
    and a TLS write per 64 KiB, which made the core's loop the busier end of a transfer."""

    chunk_size = 1024 * 1024


class EnrolRequest(BaseModel):
    token: str = Field(min_length=16, max_length=256)
    csr: str = Field(max_length=16_384, description="PEM certificate request for the node's own key")
    hostname: str = Field(default="", max_length=255)


class RenewRequest(BaseModel):
    csr: str = Field(max_length=16_384)


class NodeCertificateOut(BaseModel):
    node_id: str
    node_name: str
    remote: str
    certificate: str
    ca: str
    expires_at: str


def _cert_out(issued: Any) -> NodeCertificateOut:
    return NodeCertificateOut(
        node_id=issued.node_id,
        node_name=issued.node_name,
        remote=issued.remote,
        certificate=issued.certificate_pem,
        ca=issued.ca_pem,
        expires_at=issued.expires_at.isoformat(),
    )


async def node_principal(request: Request, core: Core = Depends(get_core)) -> NodePrincipal:
    return await authenticate_node(request.scope, core.enrolment.identify)


def _client_ip(scope: MutableMapping[str, Any]) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


@router.post(protocol.ENROL_PATH, response_model=NodeCertificateOut, summary="Enrol a node (bootstrap token)")
async def enrol(body: EnrolRequest, request: Request, core: Core = Depends(get_core)) -> NodeCertificateOut:
    try:
        issued = await core.enrolment.enrol(body.token, body.csr, body.hostname, _client_ip(request.scope))
    except EnrolmentError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return _cert_out(issued)


@router.post(protocol.RENEW_PATH, response_model=NodeCertificateOut, summary="Renew a node certificate")
async def renew(
    body: RenewRequest, node: NodePrincipal = Depends(node_principal), core: Core = Depends(get_core)
) -> NodeCertificateOut:
    try:
        issued = await core.enrolment.renew(node.node_id, body.csr)
    except EnrolmentError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return _cert_out(issued)


async def _job_of_node(core: Core, node: NodePrincipal, job_id: str) -> Any:
    row = await core.store.read(enrol_store.job_on_node, check_job_id(job_id), node.node_id)
    if row is None or not may_touch_job(node, row.node_ids):
        raise HTTPException(403, "this job is not placed on your node")
    return row


def _inside(root: Path, name: str) -> Path:
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()) or name.endswith(".part"):
        raise HTTPException(400, f"{name!r} is not a file name inside the job's directory")
    return path


@router.get(
    protocol.INPUT_PATH.replace("{name}", "{name:path}"), summary="An input file of a job on your node"
)
async def get_input(
    job_id: str, name: str, node: NodePrincipal = Depends(node_principal), core: Core = Depends(get_core)
) -> FileResponse:
    row = await _job_of_node(core, node, job_id)
    path = _inside(core.spool.inputs(row.array_id or row.id), name)
    if not path.is_file():
        raise HTTPException(404, f"the job has no input file {name!r}")
    return _InputFile(path, media_type="application/octet-stream")


@router.put(protocol.OUTPUT_PATH.replace("{name}", "{name:path}"), summary="Return an output file of a job")
async def put_output(
    job_id: str,
    name: str,
    request: Request,
    node: NodePrincipal = Depends(node_principal),
    core: Core = Depends(get_core),
) -> dict[str, Any]:
    row = await _job_of_node(core, node, job_id)
    expected = request.headers.get(protocol.SHA256_HEADER, "").lower()
    if len(expected) != 64:
        raise HTTPException(400, f"the {protocol.SHA256_HEADER} header (hex SHA-256 of the file) is required")
    target = _inside(core.spool.outputs(row.id), name)
    size, digest = await _receive_file(request.stream(), target)
    if digest != expected:
        raise HTTPException(422, f"{name}: checksum mismatch (sent {expected}, received {digest}); resend it")
    return {"name": name, "size": size, "sha256": digest}


async def _receive_file(chunks: AsyncIterator[bytes], target: Path) -> tuple[int, str]:
    """Stream a body to ``target`` (via a .part file, renamed only when complete): bounded memory."""
    await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.part")
    digest = hashlib.sha256()
    size = 0
    fd = await asyncio.to_thread(os.open, part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        buffer = bytearray()
        async for chunk in chunks:
            digest.update(chunk)
            size += len(chunk)
            buffer += chunk
            if len(buffer) >= UPLOAD_CHUNK:
                await asyncio.to_thread(_write_all, fd, buffer)  # not touched until written
                buffer.clear()
        if buffer:
            await asyncio.to_thread(_write_all, fd, buffer)
    finally:
        await asyncio.to_thread(os.close, fd)
    hexdigest = digest.hexdigest()
    await asyncio.to_thread(os.replace, part, target)
    return size, hexdigest


def _write_all(fd: int, data: bytearray) -> None:
    """Write all of ``data`` (views released on return, so the caller may clear it)."""
    with memoryview(data) as whole:
        done = 0
        while done < len(whole):
            done += os.write(fd, whole[done:])


class _AgentSocket:
    """The hub's view of an agent's WebSocket: JSON messages."""

    def __init__(self, websocket: WebSocket) -> None:
        self._ws = websocket
        self._send_lock = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await self._ws.send_text(json.dumps(message))

    async def close(self, reason: str) -> None:
        if self._ws.application_state != WebSocketState.DISCONNECTED:
            await self._ws.close(code=4000, reason=reason[:120])

    async def receive(self) -> dict[str, Any] | None:
        try:
            text = await self._ws.receive_text()
        except WebSocketDisconnect:
            return None
        message = json.loads(text)
        if not isinstance(message, dict):
            raise ValueError("an agent message must be a JSON object")
        return message


async def _accept_node(websocket: WebSocket, core: Core) -> NodePrincipal | None:
    """Accept a node agent's WebSocket; a socket without a valid node certificate is closed (4401)
    with the reason, and None is returned."""
    try:
        node = await authenticate_node(websocket.scope, core.enrolment.identify)
    except AuthError as exc:
        await websocket.close(code=4401, reason=str(exc)[:120])
        return None
    await websocket.accept()
    return node


@router.websocket(protocol.CONNECT_PATH)
async def connect(websocket: WebSocket) -> None:
    """An agent's control socket: hello first, then the session runs until either side closes."""
    core: Core = websocket.app.state.core
    node = await _accept_node(websocket, core)
    if node is None:
        return
    link = _AgentSocket(websocket)
    hello = await link.receive()
    if hello is None or hello.get("type") != "hello":
        await link.close("the first message must be hello")
        return
    node_info = hello.get("node") or {}
    await core.enrolment.hello(
        node.node_id, str(node_info.get("hostname", "")), _client_ip(websocket.scope), node_info
    )
    first: list[dict[str, Any] | None] = [hello]

    async def receive() -> dict[str, Any] | None:
        return first.pop() if first else await link.receive()

    try:
        await core.agents.serve(node.node_id, node.node_name, link, receive)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("malformed message from agent; closing", node=node.node_name, error=str(exc))
        await link.close("malformed message")


@router.websocket(protocol.TUNNEL_PATH)
async def agent_tunnel(websocket: WebSocket, tunnel_id: str) -> None:
    """The agent's side of a port-forwarding tunnel it was asked to open."""
    core: Core = websocket.app.state.core
    node = await _accept_node(websocket, core)
    if node is None:
        return
    tunnel = WebSocketTunnel(websocket)
    if not core.agents.attach_tunnel(tunnel_id, node.node_id, tunnel):
        await websocket.close(code=4403, reason="no such tunnel was asked of this node")
        return
    await tunnel.closed()


@router.websocket(protocol.OUT_PATH)
async def agent_out_port(websocket: WebSocket, job_id: str, port: int) -> None:
    """One connection a job made to an ``out`` port on its node, carried to its submission address.

    Only the agent of a node the job is placed on may open it; refusals close with 4000 + the HTTP
    status and a reason (the agent logs it and drops the job's connection).
    """
    core: Core = websocket.app.state.core
    node = await _accept_node(websocket, core)
    if node is None:
        return
    try:
        row = await core.store.read(enrol_store.job_on_node, check_job_id(job_id), node.node_id)
        if row is None or not may_touch_job(node, row.node_ids):
            raise PortError(403, "this job is not placed on your node")
        far = await core.ports.open_out(row.id, port)
    except PortError as exc:
        await websocket.close(code=4000 + exc.status, reason=str(exc)[:120])
        return
    except HTTPException as exc:
        await websocket.close(code=4000 + exc.status_code, reason=str(exc.detail)[:120])
        return
    await websocket.send_text(protocol.OUT_READY)
    await splice(WebSocketTunnel(websocket), far)


class BootstrapTokenRequest(BaseModel):
    node: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$", description="the node's name")
    ttl_s: int = Field(default=3600, ge=60, le=7 * 86400, description="seconds the token stays usable")


class BootstrapTokenOut(BaseModel):
    token: str
    remote: str
    node: str
    expires_at: str


@router.post(
    "/api/v1/remotes/{remote}/bootstrap-tokens",
    response_model=BootstrapTokenOut,
    summary="A one-time token that enrols one agent node (admins)",
)
async def create_bootstrap_token(
    remote: str,
    body: BootstrapTokenRequest,
    principal: Principal = Depends(get_principal),
    core: Core = Depends(get_core),
) -> BootstrapTokenOut:
    require_admin(principal)
    try:
        issued = await core.enrolment.create_token(remote, body.node, timedelta(seconds=body.ttl_s))
    except EnrolmentError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return BootstrapTokenOut(
        token=issued.token,
        remote=issued.remote,
        node=issued.node_name,
        expires_at=issued.expires_at.isoformat(),
    )
