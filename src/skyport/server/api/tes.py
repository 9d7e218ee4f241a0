"""GA4GH TES 1.1, ``/ga4gh/tes/v1`` (reference/tes-1.1.openapi.yaml). Thin: the work is in
:mod:`skyport.server.tes.service`.

Clients authenticate with a bearer token, basic auth (user name and token) or a client certificate.
``/tasks/service-info`` is served too: py-tes 0.4 (which Snakemake's TES plugin pins) asks there.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response

from skyport.server.api.deps import get_principal
from skyport.server.auth import Principal
from skyport.server.tes.mapping import TaskRejected
from skyport.server.tes.models import TesState, TesTask, View
from skyport.server.tes.service import TesService

router = APIRouter(prefix="/ga4gh/tes/v1", tags=["GA4GH TES 1.1"])

#: The spec: "Must be less than 2048. Defaults to 256."
MAX_PAGE_SIZE = 2047
DEFAULT_PAGE_SIZE = 256


async def get_tes(request: Request) -> TesService:
    service: TesService = request.app.state.tes
    return service


TesDep = Annotated[TesService, Depends(get_tes)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
ViewQuery = Annotated[View, Query(description="MINIMAL (id, state), BASIC, or FULL")]


def _json(data: object) -> Response:
    return Response(json.dumps(data), media_type="application/json")


def _task_id(task_id: str) -> str:
    try:
        return str(uuid.UUID(task_id))
    except ValueError:
        raise HTTPException(404, f"no task {task_id!r}") from None


@router.get("/service-info", summary="GetServiceInfo")
async def service_info(tes: TesDep, principal: PrincipalDep) -> Response:
    return _json(tes.service_info())


@router.get("/tasks/service-info", summary="GetServiceInfo as TES 0.x clients ask (their path, their shape)")
async def service_info_legacy(tes: TesDep, principal: PrincipalDep) -> Response:
    info = tes.service_info()
    return _json({"name": info["name"], "doc": info["description"], "storage": info["storage"]})


@router.post("/tasks", summary="CreateTask")
async def create_task(task: TesTask, tes: TesDep, principal: PrincipalDep) -> Response:
    try:
        task_id = await tes.create(principal, task)
    except TaskRejected as exc:
        raise HTTPException(400, str(exc)) from exc
    return _json({"id": task_id})


@router.get("/tasks", summary="ListTasks")
async def list_tasks(
    tes: TesDep,
    principal: PrincipalDep,
    name_prefix: str | None = None,
    state: TesState | None = None,
    tag_key: Annotated[list[str] | None, Query()] = None,
    tag_value: Annotated[list[str] | None, Query()] = None,
    page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    page_token: str | None = None,
    view: ViewQuery = View.MINIMAL,
) -> Response:
    keys, values = tag_key or [], tag_value or []
    if len(values) > len(keys):
        raise HTTPException(400, "more tag_value than tag_key parameters: each value needs its key")
    tags = {key: values[i] if i < len(values) else "" for i, key in enumerate(keys)}
    try:
        page = await tes.list_tasks(
            principal,
            view=view,
            name_prefix=name_prefix,
            state=state,
            tags=tags,
            page_size=page_size,
            page_token=page_token,
        )
    except ValueError as exc:  # a page token we did not make
        raise HTTPException(400, str(exc)) from exc
    return _json(page)


@router.get("/tasks/{task_id}", summary="GetTask")
async def get_task(
    task_id: str, tes: TesDep, principal: PrincipalDep, view: ViewQuery = View.MINIMAL
) -> Response:
    task = await tes.get(principal, _task_id(task_id), view)
    if task is None:
        raise HTTPException(404, f"no task {task_id} (or it is not yours)")
    return _json(task)


@router.post("/tasks/{task_id}:cancel", summary="CancelTask")
async def cancel_task(task_id: str, tes: TesDep, principal: PrincipalDep) -> Response:
    if not await tes.cancel(principal, _task_id(task_id)):
        raise HTTPException(404, f"no task {task_id} (or it is not yours)")
    return _json({})
