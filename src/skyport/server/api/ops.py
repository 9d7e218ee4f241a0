"""Operations: liveness and Prometheus metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from skyport.server.api.deps import get_core, get_principal
from skyport.server.auth import Principal
from skyport.server.core import Core

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the core answers and its store is reachable")
async def healthz(core: Annotated[Core, Depends(get_core)]) -> dict[str, str]:
    await core.jobs_by_state()
    return {"status": "ok"}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(
    core: Annotated[Core, Depends(get_core)], principal: Annotated[Principal, Depends(get_principal)]
) -> Response:
    body = core.metrics.render(await core.jobs_by_state())
    return Response(body, media_type="text/plain; version=0.0.4")
