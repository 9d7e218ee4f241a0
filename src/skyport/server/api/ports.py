"""Port forwarding for users: ``/api/v1/jobs/{id}/ports/{port}`` is a WebSocket to the job's port.

``skyport port-forward`` opens one per local connection. Only the job's owner (or an admin) may open
it, only for ports the job declared as ``in``, only while it runs.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, WebSocket

from skyport.server.api.deps import check_job_id
from skyport.server.auth import AuthError
from skyport.server.core import Core
from skyport.server.tunnels import PortError, WebSocketTunnel, splice

router = APIRouter(tags=["ports"])

#: WebSocket close codes (4000 + the HTTP status it would have been).
CLOSE_BASE = 4000


#: The first frame of a tunnel that opened; after it, raw bytes both ways.
READY = "ready"


@router.websocket("/api/v1/jobs/{job_id}/ports/{port}")
async def port_forward(websocket: WebSocket, job_id: str, port: int) -> None:
    """Accepted first so that a refusal can say why (a close code 4000 + HTTP status, and a reason)."""
    core: Core = websocket.app.state.core
    await websocket.accept()
    try:
        principal = await core.auth.authenticate(websocket.scope)
        far = await core.ports.open(principal, check_job_id(job_id), port)
    except (AuthError, PortError) as exc:
        await websocket.close(code=CLOSE_BASE + exc.status, reason=str(exc)[:120])
        return
    except HTTPException as exc:
        await websocket.close(code=CLOSE_BASE + exc.status_code, reason=str(exc.detail)[:120])
        return
    await websocket.send_text(READY)
    await splice(WebSocketTunnel(websocket), far)
