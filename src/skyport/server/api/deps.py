"""What every router needs: the core, the caller's identity, and job-id checking."""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute
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


class RequestRoute(APIRoute):
    """A route whose endpoint takes the request alone and returns its response: FastAPI calls it
    without solving dependencies or validating a response model (both then are documentation only).

    For the submissions, which come thousands a second: FastAPI's request handler cost ~60-80 us a
    request even with only the request to give, a tenth of what a submission costs the core. The
    endpoint gets the core and the caller itself (``await get_core(request)``, ``await
    get_principal(request)``); errors it raises reach the app's exception handlers as from any route.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        parameters = list(inspect.signature(endpoint).parameters.values())
        if len(parameters) != 1 or parameters[0].annotation not in (Request, "Request"):
            raise TypeError(f"{endpoint.__name__} must take the request alone to be a RequestRoute")
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint: Callable[[Request], Coroutine[Any, Any, Response]] = self.endpoint
        return endpoint
