"""The native API, ``/api/v1``: JSON, paginated lists, documented by the generated OpenAPI."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from skyport.gates.cloud_common import RemoteCheck
from skyport.models import (
    Account,
    AccountCost,
    ArrayJob,
    Costs,
    Event,
    Flavor,
    Image,
    Job,
    JobCost,
    JobState,
    Node,
    Page,
    Remote,
    User,
)
from skyport.server.api.deps import RequestRoute, check_job_id, get_core, get_principal, model_response
from skyport.server.api.submission import submission
from skyport.server.auth import Principal, owner_filter, require_admin
from skyport.server.core import Core
from skyport.server.intake import safe_relative_name
from skyport.server.store import infra as infra_store
from skyport.server.store import jobs as job_store
from skyport.server.store import users as user_store

router = APIRouter(prefix="/api/v1", tags=["native"])

CoreDep = Annotated[Core, Depends(get_core)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
MAX_WAIT_S = 60.0


async def _job(core: Core, principal: Principal, job_id: str) -> Job:
    job = await core.control.get(principal, check_job_id(job_id))
    if job is None:
        raise HTTPException(404, f"no job {job_id} (or it is not yours)")
    return job


async def submit(request: Request) -> Response:
    """A JobSpec as JSON, a job script as text, or multipart with ``spec``/``script`` and ``input`` files."""
    core, principal = await get_core(request), await get_principal(request)
    async with submission(request, limit=core.settings.max_upload_bytes) as (spec, uploads):
        job = await core.intake.submit(principal.user, spec, uploads)
    return model_response(job, status_code=201)


router.add_api_route(
    "/jobs",
    submit,
    methods=["POST"],
    route_class_override=RequestRoute,
    status_code=201,
    response_model=Job,
    summary="Submit a job",
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}},
                "text/plain": {"schema": {"type": "string", "description": "a #SWM job script"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "string", "description": "JobSpec as JSON"},
                            "script": {"type": "string", "description": "a #SWM job script"},
                            "input": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        },
                    }
                },
            }
        }
    },
)


@router.get("/jobs", response_model=Page[Job], summary="List jobs")
async def list_jobs(
    core: CoreDep,
    principal: PrincipalDep,
    state: Annotated[list[JobState] | None, Query(description="only jobs in these states")] = None,
    name: str | None = None,
    user: Annotated[str | None, Query(description="only this user's jobs (admins)")] = None,
    array: Annotated[str | None, Query(description="only the tasks of this array job")] = None,
    tasks: Annotated[
        bool | None, Query(description="false: leave out tasks of array jobs (see /arrays); true: only them")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(description="the 'next' cursor of the previous page")] = None,
) -> Response:
    flt = job_store.JobFilter(
        owner_id=owner_filter(principal),
        states=frozenset(state or ()),
        name=name,
        owner_name=user,
        array_id=check_job_id(array) if array else None,
        in_arrays=tasks,
    )
    try:
        items, nxt = await core.store.read(job_store.list_jobs, flt, limit=limit, after=after)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    return model_response(Page[Job](items=items, next=nxt))


@router.get("/jobs/{job_id}", response_model=Job, summary="Get a job")
async def get_job(job_id: str, core: CoreDep, principal: PrincipalDep) -> Response:
    return model_response(await _job(core, principal, job_id))


@router.get("/jobs/{job_id}/wait", response_model=Job, summary="Wait until a job ends (long poll)")
async def wait_job(
    job_id: str,
    core: CoreDep,
    principal: PrincipalDep,
    timeout: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 30.0,
) -> Job:
    """Returns when the job is in a final state, or after ``timeout`` seconds with the job as it is."""
    deadline = core.clock.monotonic() + timeout
    while True:
        with core.notifier.watching(job_id) as changed:  # before the read: no change slips between
            job = await _job(core, principal, job_id)
            left = deadline - core.clock.monotonic()
            if job.state.terminal or left <= 0:
                return job
            await asyncio.wait([changed], timeout=left)


@router.post("/jobs/{job_id}/cancel", response_model=Job, summary="Cancel a job")
async def cancel_job(job_id: str, core: CoreDep, principal: PrincipalDep) -> Job:
    job = await core.control.cancel(principal, check_job_id(job_id))
    if job is None:
        raise HTTPException(404, f"no job {job_id} (or it is not yours)")
    return job


@router.post("/jobs/{job_id}/requeue", response_model=Job, summary="Run a job again (a new attempt)")
async def requeue_job(job_id: str, core: CoreDep, principal: PrincipalDep) -> Job:
    job = await core.control.requeue(principal, check_job_id(job_id))
    if job is None:
        raise HTTPException(404, f"no job {job_id} (or it is not yours)")
    return job


def _log_endpoint(stream: str) -> Callable[..., Awaitable[Response]]:
    async def read_log(
        job_id: str,
        core: CoreDep,
        principal: PrincipalDep,
        offset: Annotated[int, Query(ge=0)] = 0,
        tail: Annotated[int | None, Query(ge=0, description="only the last N bytes")] = None,
        follow: bool = False,
    ) -> Response:
        job = await _job(core, principal, job_id)
        if follow:
            return StreamingResponse(
                core.outputs.follow(job, stream, offset=offset), media_type="application/octet-stream"
            )
        data = await core.outputs.read(job, stream, offset=offset, tail=tail)
        return Response(data or b"", media_type="application/octet-stream")

    read_log.__name__ = f"read_{stream}"
    return read_log


router.add_api_route(
    "/jobs/{job_id}/stdout",
    _log_endpoint("stdout"),
    methods=["GET"],
    summary="The job's standard output",
    response_class=Response,
)
router.add_api_route(
    "/jobs/{job_id}/stderr",
    _log_endpoint("stderr"),
    methods=["GET"],
    summary="The job's standard error",
    response_class=Response,
)


@router.get("/jobs/{job_id}/events", response_model=Page[Event], summary="A job's history")
async def job_events(
    job_id: str, core: CoreDep, principal: PrincipalDep, after: Annotated[int, Query(ge=0)] = 0
) -> Page[Event]:
    job = await _job(core, principal, job_id)
    items = await core.store.read(job_store.list_events, job.id, after_id=after)
    return Page[Event](items=items)


@router.get("/jobs/{job_id}/outputs", summary="Output files brought back from the job")
async def job_outputs(job_id: str, core: CoreDep, principal: PrincipalDep) -> list[dict[str, object]]:
    job = await _job(core, principal, job_id)
    return [{"name": n, "size": s, "sha256": h} for n, s, h in await core.outputs.output_files(job.id)]


@router.get("/jobs/{job_id}/outputs/{name:path}", summary="Download one output file")
async def job_output_file(job_id: str, name: str, core: CoreDep, principal: PrincipalDep) -> FileResponse:
    job = await _job(core, principal, job_id)
    known = {n for n, _, _ in await core.outputs.output_files(job.id)}
    if safe_relative_name(name) not in known:
        raise HTTPException(404, f"job {job.id} has no output file {name!r}")
    return FileResponse(core.outputs.output_path(job.id, name), filename=name.rsplit("/", 1)[-1])


@router.get(
    "/arrays", response_model=Page[ArrayJob], summary="Array jobs, newest first, tasks counted by state"
)
async def list_arrays(
    core: CoreDep, principal: PrincipalDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> Response:
    items = await core.store.read(job_store.list_arrays, owner_filter(principal), limit=limit)
    return model_response(Page[ArrayJob](items=items))


@router.get("/arrays/{array_id}", response_model=ArrayJob, summary="One array job")
async def get_array(array_id: str, core: CoreDep, principal: PrincipalDep) -> Response:
    array = await core.control.get_array(principal, check_job_id(array_id))
    if array is None:
        raise HTTPException(404, f"no array job {array_id} (or it is not yours)")
    return model_response(array)


@router.post(
    "/arrays/{array_id}/cancel", response_model=ArrayJob, summary="Cancel every task of an array job"
)
async def cancel_array(array_id: str, core: CoreDep, principal: PrincipalDep) -> Response:
    array = await core.control.cancel_array(principal, check_job_id(array_id))
    if array is None:
        raise HTTPException(404, f"no array job {array_id} (or it is not yours)")
    return model_response(array)


@router.get("/nodes", response_model=Page[Node], summary="Nodes")
async def list_nodes(core: CoreDep, principal: PrincipalDep) -> Page[Node]:
    found = await core.store.read(infra_store.list_nodes)
    return Page[Node](items=found)


@router.get("/flavors", response_model=Page[Flavor], summary="Flavors")
async def list_flavors(core: CoreDep, principal: PrincipalDep) -> Page[Flavor]:
    found = await core.store.read(infra_store.list_flavors)
    return Page[Flavor](items=found)


@router.get("/images", response_model=Page[Image], summary="Images")
async def list_images(core: CoreDep, principal: PrincipalDep) -> Page[Image]:
    found = await core.store.read(infra_store.list_images)
    return Page[Image](items=found)


@router.get("/remotes", response_model=Page[Remote], summary="Remotes")
async def list_remotes(core: CoreDep, principal: PrincipalDep) -> Page[Remote]:
    remotes = await core.store.read(infra_store.list_remotes)
    # Settings may reference credentials: never in API output.
    return Page[Remote](items=[r.model_copy(update={"settings": {}}) for r in remotes])


#: A credentials check makes a handful of read-only and dry-run provider calls.
CHECK_TIMEOUT_S = 120.0


@router.post(
    "/remotes/{name}/check",
    response_model=RemoteCheck,
    summary="Verify a cloud remote's credentials and permissions, creating nothing (admins)",
)
async def check_remote(name: str, core: CoreDep, principal: PrincipalDep) -> RemoteCheck:
    require_admin(principal)
    remote_id = next((rid for rid, r in core.cloud_remotes.items() if r.name == name), None)
    if remote_id is None:
        raise HTTPException(404, f"no cloud remote {name!r}")
    gate = core.provisioners[remote_id]
    check = getattr(gate, "check", None)
    if check is None:
        raise HTTPException(400, f"remote {name!r} (kind {gate.kind}) has no credentials check")
    try:
        result: RemoteCheck = await asyncio.wait_for(check(), CHECK_TIMEOUT_S)
    except TimeoutError:
        raise HTTPException(504, f"checking {name!r} took longer than {CHECK_TIMEOUT_S:.0f}s") from None
    return result


@router.get("/whoami", response_model=User, summary="The caller")
async def whoami(principal: PrincipalDep) -> User:
    return principal.user


class AccountChange(BaseModel):
    """An account to create, or the fields to change (absent fields stay as they are)."""

    model_config = ConfigDict(extra="forbid")

    share: float | None = Field(default=None, gt=0, description="fair-share weight")
    budget: float | None = Field(default=None, ge=0, description="what it may spend; absent: no limit")


class Membership(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str


@router.get("/accounts", response_model=list[Account], summary="Accounts: yours (admins: all), with usage")
async def list_accounts(core: CoreDep, principal: PrincipalDep) -> list[Account]:
    found = await core.store.read(
        user_store.list_accounts, core.clock.now(), core.settings.scheduler.usage_half_life_s
    )
    return [a for a in found if principal.is_admin or a.name in principal.user.accounts]


@router.put("/accounts/{name}", response_model=Account, summary="Create or change an account (admins)")
async def put_account(name: str, change: AccountChange, core: CoreDep, principal: PrincipalDep) -> Account:
    require_admin(principal)
    check_name(name, "account")
    values = change.model_dump(exclude_unset=True)
    exists = await core.store.read(user_store.account_id_by_name, name) is not None
    if exists and values:
        await core.store.write(user_store.update_account, name, values)
    elif not exists:
        try:
            await core.store.write(
                user_store.create_account,
                name,
                share=change.share or 1.0,
                budget=change.budget,
                now=core.clock.now(),
            )
        except user_store.AlreadyExists:
            await core.store.write(user_store.update_account, name, values)  # created meanwhile
    return await _account(core, name)


@router.post("/accounts/{name}/members", response_model=Account, summary="Add a user to an account (admins)")
async def add_member(name: str, member: Membership, core: CoreDep, principal: PrincipalDep) -> Account:
    require_admin(principal)
    problem = await core.store.write(user_store.add_member, name, member.user)
    if problem is not None:
        raise HTTPException(404, f"{problem}: create it first")
    core.auth.forget()  # memberships are part of the cached identities
    return await _account(core, name)


async def _account(core: Core, name: str) -> Account:
    found = await core.store.read(
        user_store.list_accounts, core.clock.now(), core.settings.scheduler.usage_half_life_s
    )
    for account in found:
        if account.name == name:
            return account
    raise HTTPException(404, f"no account {name!r}")


def check_name(name: str, what: str) -> None:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "._-" for c in name):
        raise HTTPException(400, f"{name!r} is not a valid {what} name: use letters, digits, '.', '_', '-'")


@router.post("/users/{name}/revoke", summary="Revoke every certificate of a user (admins)")
async def revoke_user(name: str, core: CoreDep, principal: PrincipalDep) -> dict[str, int]:
    require_admin(principal)
    count = await core.store.write(user_store.revoke_certificates_of, name, core.clock.now())
    if count is None:
        raise HTTPException(404, f"no user {name!r}")
    core.auth.forget()
    return {"revoked": count}


@router.get("/costs", response_model=Costs, summary="Spend on elastic capacity: per account, and per job")
async def costs(
    core: CoreDep,
    principal: PrincipalDep,
    account: Annotated[str | None, Query(description="Only this account")] = None,
    since: Annotated[datetime | None, Query(description="Only jobs that ended since then (ISO 8601)")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> Costs:
    if since is not None and since.tzinfo is None:
        raise HTTPException(400, "give 'since' with a time zone, e.g. 2026-11-01T00:00:00Z")
    if account is not None and not principal.is_admin and account not in principal.user.accounts:
        raise HTTPException(403, f"you are not a member of account {account!r}")
    summary, rows = await core.store.read(
        job_store.costs, owner_id=owner_filter(principal), account=account, since=since, limit=limit
    )
    accounts = [
        AccountCost(**a) for a in summary if principal.is_admin or a["account"] in principal.user.accounts
    ]
    jobs = [
        JobCost(
            id=r.id,
            name=r.name,
            owner=r.owner,
            account=r.account,
            remote=r.remote or "",
            flavor=r.flavor or "",
            state=r.state,
            cost=r.cost,
        )
        for r in rows
    ]
    return Costs(accounts=accounts, jobs=jobs)
