"""What every router needs: the core, the caller's identity, and job-id checking."""

from __future__ import annotations

import uuid

from fastapi import HTTPException, Request, Response
from pydantic import BaseModel

from skyport.server.auth import Principal
from skyport.server.core import Core


async def get_core(request: Request) -> Core:
    """The request's core. ``async`` on purpose: FastAPI runs sync dependencies in a worker thread."""
    core: Core = request.app.state.core
    return core


async def get_principal(request: Request) -> Principal:
    """Authenticate the request (AuthError becomes a 401/403 in the app's handler)."""
    core: Core = request.app.state.core
    principal: Principal = await core.auth.authenticate(request.scope)
    return principal


def check_job_id(job_id: str) -> str:
    try:
        return str(uuid.UUID(job_id))
    except ValueError:
        raise HTTPException(400, f"{job_id!r} is not a job id (job ids are UUIDs)") from None


def model_response(model: BaseModel, status_code: int = 200) -> Response:
    """A model as JSON, serialised once by pydantic (FastAPI would validate it again first)."""
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")
