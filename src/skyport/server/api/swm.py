"""The original Sky Port user API, ``/user/...``, exactly as its terminals expect.

The contract is ``shared/reference/swm-contract.md``: top-level JSON arrays, never null (``""``, 0 and
``[]`` instead), one-letter states, plain-text replies for submit/cancel/requeue. Unlike the original,
users only see their own jobs, and a bad script is a 400 with the reason.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from skyport.models import Flavor, Image, Job, JobState, Node, Remote
from skyport.server.api.deps import RequestRoute, get_core, get_principal
from skyport.server.api.submission import submission
from skyport.server.auth import Principal, owner_filter
from skyport.server.core import Core
from skyport.server.intake import SubmissionError
from skyport.server.store import infra as infra_store
from skyport.server.store import jobs as job_store

router = APIRouter(prefix="/user", tags=["swm"])

CoreDep = Annotated[Core, Depends(get_core)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
LIST_LIMIT = 10_000

#: Reasons that mean the system failed the job, not the job itself (swm letter E instead of F).
SYSTEM_ERRORS = frozenset({"launch_failed", "lost", "unsatisfiable", "stage_out_failed", "stage_in_failed"})

_LETTERS = {
    JobState.QUEUED: "Q",
    JobState.SCHEDULED: "W",
    JobState.STAGING_IN: "T",
    JobState.RUNNING: "R",
    JobState.STAGING_OUT: "R",
    JobState.COMPLETED: "F",
    JobState.CANCELED: "C",
}


def state_letter(job: Job) -> str:
    if job.state is JobState.FAILED:
        return "E" if job.reason in SYSTEM_ERRORS else "F"
    return _LETTERS[job.state]


def _time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else ""


def _resources(**counts: int) -> list[dict[str, Any]]:
    return [{"name": k, "count": v} for k, v in counts.items()]


#: The original Sky Port's words for a job waiting on capacity (state W). swmjupyter 0.1.7 maps the start
#: of ``state_details`` to its progress bar and fails the spawn on any other text in state W.
_WAITING_WORDS = {"provisioning": "Initiate a new partition"}
_PLACED_WORDS = "Partition spawned"


def swm_details(job: Job) -> str:
    """``state_details`` as the original clients read it: in state W it starts with the original's words."""
    if state_letter(job) != "W":
        return job.state_details
    words = _WAITING_WORDS.get(job.reason, _PLACED_WORDS)
    return f"{words}: {job.state_details}" if job.state_details else words


def swm_job(job: Job) -> dict[str, Any]:
    spec = job.spec
    request = _resources(
        nodes=spec.nodes, cpus=spec.cpus, mem=spec.mem, gpus=spec.gpus, storage=spec.storage_size
    )
    if spec.flavor:
        request.append({"name": "flavor", "count": 1, "value": spec.flavor})
    allocated = request if job.node_names else []
    return {
        "id": job.id,
        "name": job.name,
        "state": state_letter(job),
        "state_details": swm_details(job),
        "submit_time": _time(job.submit_time),
        "start_time": _time(job.start_time),
        "end_time": _time(job.end_time),
        "duration": int(job.duration),
        "exitcode": job.exit_code or 0,
        "signal": job.signal or 0,
        "node_names": job.node_names,
        "node_ips": job.node_ips,
        "remote_id": job.remote_id,
        "flavor_id": job.flavor_id,
        "request": request,
        "resources": allocated,
        "comment": spec.comment,
    }


def swm_node(node: Node) -> dict[str, Any]:
    return {
        "id": node.id,
        "name": node.name,
        "host": node.host,
        "api_port": 0,
        "state_power": node.state_power,
        "state_alloc": node.state_alloc,
        "resources": _resources(cpus=node.cpus, mem=node.mem, gpus=node.gpus, storage=node.storage),
        "roles": [],
    }


def swm_flavor(flavor: Flavor) -> dict[str, Any]:
    return {
        "id": flavor.id,
        "name": flavor.name,
        "remote_id": flavor.remote_id,
        "resources": _resources(cpus=flavor.cpus, mem=flavor.mem, gpus=flavor.gpus, storage=flavor.storage),
        "price": flavor.price,
    }


def swm_image(image: Image) -> dict[str, Any]:
    return {
        "id": image.id,
        "name": image.name,
        "remote_id": image.remote_id,
        "kind": image.kind,
        "comment": image.comment,
    }


def swm_remote(remote: Remote) -> dict[str, Any]:
    return {
        "id": remote.id,
        "name": remote.name,
        "account_id": remote.account,
        "server": remote.server,
        "port": remote.port,
        "kind": remote.kind,
        "default_image_id": remote.default_image_id,
        "default_flavor_id": remote.default_flavor_id,
    }


@router.get("")
async def api_version(principal: PrincipalDep) -> dict[str, int]:
    return {"api_version": 1}


@router.get("/job")
async def list_jobs(
    core: CoreDep, principal: PrincipalDep, limit: Annotated[int, Query(ge=1, le=LIST_LIMIT)] = LIST_LIMIT
) -> JSONResponse:
    flt = job_store.JobFilter(owner_id=owner_filter(principal))
    jobs, _ = await core.store.read(job_store.list_jobs, flt, limit=limit)
    return JSONResponse([swm_job(j) for j in jobs])


async def _visible(core: Core, principal: Principal, job_id: str) -> Job | None:
    try:
        job_id = str(uuid.UUID(job_id))
    except ValueError:
        return None
    return await core.control.get(principal, job_id)


@router.get("/job/{job_id}")
async def get_job(job_id: str, core: CoreDep, principal: PrincipalDep) -> Response:
    job = await _visible(core, principal, job_id)
    if job is None:
        return PlainTextResponse(f"Job not found: {job_id}", status_code=404)
    return JSONResponse(swm_job(job))


async def _log(core: Core, principal: Principal, job_id: str, stream: str) -> Response:
    job = await _visible(core, principal, job_id)
    if job is None:
        return PlainTextResponse(f"Job not found: {job_id}", status_code=404)
    data = await core.outputs.read(job, stream)
    if data is None:
        return PlainTextResponse(f"No {stream} for job {job_id} yet", status_code=404)
    return Response(data, media_type="application/octet-stream")


@router.get("/job/{job_id}/stdout")
async def job_stdout(job_id: str, core: CoreDep, principal: PrincipalDep) -> Response:
    return await _log(core, principal, job_id, "stdout")


@router.get("/job/{job_id}/stderr")
async def job_stderr(job_id: str, core: CoreDep, principal: PrincipalDep) -> Response:
    return await _log(core, principal, job_id, "stderr")


async def submit(request: Request) -> Response:
    core, principal = await get_core(request), await get_principal(request)
    try:
        async with submission(
            request,
            limit=core.settings.max_upload_bytes,
            script_field="script_content",
            compat=core.settings.jobscript_compat,
        ) as (spec, uploads):
            job = await core.intake.submit(principal.user, spec, uploads)
    except SubmissionError as exc:
        return PlainTextResponse(str(exc), status_code=exc.status)
    return Response(job.id, media_type="application/octet-stream")


router.add_api_route("/job", submit, methods=["POST"], route_class_override=RequestRoute)


@router.delete("/job/{job_id}")
async def cancel(job_id: str, core: CoreDep, principal: PrincipalDep) -> Response:
    job = await _visible(core, principal, job_id)
    if job is not None:
        await core.control.cancel(principal, job.id)
        return PlainTextResponse(f"Canceled: {job.id}\nNot found: ")
    return PlainTextResponse(f"Canceled: \nNot found: {job_id}")


@router.patch("/job/{job_id}")
async def modify(
    job_id: str,
    core: CoreDep,
    principal: PrincipalDep,
    modification: Annotated[str | None, Header()] = None,
) -> Response:
    if modification != "requeue":
        return PlainTextResponse(
            "Unknown modification: send the header 'modification: requeue'", status_code=400
        )
    job = await _visible(core, principal, job_id)
    if job is not None:
        await core.control.requeue(principal, job.id)
        return PlainTextResponse(f"Requeued: {job.id}\nNot found: ")
    return PlainTextResponse(f"Requeued: \nNot found: {job_id}")


def _limited(items: list[dict[str, Any]], limit: int | None) -> JSONResponse:
    return JSONResponse(items[:limit] if limit else items)


@router.get("/node")
async def nodes(core: CoreDep, principal: PrincipalDep, limit: int | None = None) -> JSONResponse:
    found = await core.store.read(infra_store.list_nodes)
    return _limited([swm_node(n) for n in found], limit)


@router.get("/flavor")
async def flavors(core: CoreDep, principal: PrincipalDep, limit: int | None = None) -> JSONResponse:
    found = await core.store.read(infra_store.list_flavors)
    return _limited([swm_flavor(f) for f in found], limit)


@router.get("/image")
async def images(core: CoreDep, principal: PrincipalDep, limit: int | None = None) -> JSONResponse:
    found = await core.store.read(infra_store.list_images)
    return _limited([swm_image(i) for i in found], limit)


@router.get("/remote")
async def remotes(core: CoreDep, principal: PrincipalDep, limit: int | None = None) -> JSONResponse:
    found = await core.store.read(infra_store.list_remotes)
    return _limited([swm_remote(r) for r in found], limit)
