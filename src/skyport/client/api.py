"""The Python client of the native API, sync (:class:`Client`) and async (:class:`AsyncClient`).

Both build requests and read replies with the same functions; only the transport differs. Errors come
as :class:`ApiError` (the core answered with an error: its message says what to do) or
:class:`ConnectionFailed` (it could not be reached or refused our certificate).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from skyport.client.config import ClientConfig
from skyport.jobscript import JobScriptError, parse_jobscript
from skyport.models import (
    Account,
    ArrayJob,
    Costs,
    Event,
    Flavor,
    Image,
    Job,
    JobSpec,
    JobState,
    Node,
    Page,
    Remote,
    User,
)

T = TypeVar("T", bound=BaseModel)
TIMEOUT = httpx.Timeout(30.0, connect=10.0)


class ClientError(Exception):
    pass


class ApiError(ClientError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ConnectionFailed(ClientError):
    pass


def ssl_context(config: ClientConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(config.ca))
    context.load_cert_chain(str(config.cert), str(config.key))
    return context


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    content: bytes | None = None
    files: list[tuple[str, tuple[str | None, Any]]] | None = None
    data: dict[str, str] | None = None
    timeout: float | None = None

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"params": self.params}
        for name in ("json", "content", "files", "data"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.timeout is not None:
            out["timeout"] = httpx.Timeout(self.timeout + 10.0, connect=10.0)
        return out


def _check(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text
    raise ApiError(response.status_code, str(detail) or f"HTTP {response.status_code}")


def _connection_failed(url: str, exc: httpx.HTTPError) -> ConnectionFailed:
    if isinstance(exc, httpx.ConnectError):
        hint = "is the core running (`skyport server`) and is the URL right?"
    elif isinstance(exc, httpx.RemoteProtocolError):
        hint = "the core closed the connection: is your certificate issued by its CA and not revoked?"
    else:
        hint = "check the network and the core's log"
    return ConnectionFailed(f"cannot talk to the core at {url}: {exc} — {hint}")


def upload_name(path: Path, wanted: Sequence[str]) -> str:
    """The name an input file gets in the job's working directory: the relative path as given when the
    job names it so (``--input data/x.csv`` for ``#SWM input-files data/x.csv``), else its base name
    (``--input examples/greeting.txt`` for ``#SWM input-files greeting.txt``)."""
    return path.as_posix() if path.as_posix() in wanted else path.name


def _script_inputs(script: str) -> list[str]:
    """The input files a script names; its errors are left for the core to report."""
    try:
        return parse_jobscript(script, compat=True).input_files
    except JobScriptError:
        return []


def _submit_call(spec: JobSpec | None, script: str | None, inputs: Sequence[Path]) -> _Call:
    if (spec is None) == (script is None):
        raise ValueError("give a spec or a script")
    if not inputs:
        if spec is not None:
            return _Call("POST", "/api/v1/jobs", json=spec.model_dump(mode="json", exclude_defaults=True))
        return _Call("POST", "/api/v1/jobs", content=(script or "").encode())
    fields = {"spec": spec.model_dump_json(exclude_defaults=True)} if spec else {"script": script or ""}
    wanted = spec.input_files if spec is not None else _script_inputs(script or "")
    files = [("input", (upload_name(p, wanted), p.open("rb"))) for p in inputs]
    return _Call("POST", "/api/v1/jobs", data=fields, files=files)  # type: ignore[arg-type]


def _list_params(
    states: Sequence[JobState] | None,
    name: str | None,
    user: str | None,
    limit: int,
    after: str | None,
    array: str | None = None,
    tasks: bool | None = None,
) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit}
    if array is not None:
        params["array"] = array
    if tasks is not None:
        params["tasks"] = "true" if tasks else "false"
    if states:
        params["state"] = [s.value for s in states]
    for key, value in (("name", name), ("user", user), ("after", after)):
        if value is not None:
            params[key] = value
    return params


def _log_params(offset: int, tail: int | None, follow: bool = False) -> dict[str, Any]:
    params: dict[str, Any] = {"offset": offset}
    if tail is not None:
        params["tail"] = tail
    if follow:
        params["follow"] = "true"
    return params


class Client:
    """Synchronous client. Use as a context manager, or call :meth:`close`."""

    def __init__(self, config: ClientConfig | None = None) -> None:
        self.config = config or ClientConfig.load()
        self._http = httpx.Client(base_url=self.config.url, verify=ssl_context(self.config), timeout=TIMEOUT)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _do(self, call: _Call) -> httpx.Response:
        try:
            return _check(self._http.request(call.method, call.path, **call.kwargs()))
        except httpx.HTTPError as exc:
            raise _connection_failed(self.config.url, exc) from exc

    def _model(self, model: type[T], call: _Call) -> T:
        return model.model_validate_json(self._do(call).content)

    def submit(
        self, spec: JobSpec | None = None, *, script: str | None = None, inputs: Sequence[Path] = ()
    ) -> Job:
        return self._model(Job, _submit_call(spec, script, inputs))

    def jobs(
        self,
        states: Sequence[JobState] | None = None,
        *,
        name: str | None = None,
        user: str | None = None,
        limit: int = 100,
        after: str | None = None,
        array: str | None = None,
        tasks: bool | None = None,
    ) -> Page[Job]:
        """A page of jobs; ``array``: only that array's tasks; ``tasks=False``: no array tasks."""
        params = _list_params(states, name, user, limit, after, array, tasks)
        return self._model(Page[Job], _Call("GET", "/api/v1/jobs", params=params))

    def job(self, job_id: str) -> Job:
        return self._model(Job, _Call("GET", f"/api/v1/jobs/{job_id}"))

    def arrays(self, limit: int = 100) -> list[ArrayJob]:
        return self._model(Page[ArrayJob], _Call("GET", "/api/v1/arrays", params={"limit": limit})).items

    def array(self, array_id: str) -> ArrayJob:
        return self._model(ArrayJob, _Call("GET", f"/api/v1/arrays/{array_id}"))

    def cancel_array(self, array_id: str) -> ArrayJob:
        return self._model(ArrayJob, _Call("POST", f"/api/v1/arrays/{array_id}/cancel"))

    def wait(self, job_id: str, timeout: float = 30.0) -> Job:
        """The job once it has ended, or as it is after ``timeout`` seconds (at most 60 per call)."""
        params = {"timeout": timeout}
        return self._model(Job, _Call("GET", f"/api/v1/jobs/{job_id}/wait", params=params, timeout=timeout))

    def cancel(self, job_id: str) -> Job:
        return self._model(Job, _Call("POST", f"/api/v1/jobs/{job_id}/cancel"))

    def requeue(self, job_id: str) -> Job:
        return self._model(Job, _Call("POST", f"/api/v1/jobs/{job_id}/requeue"))

    def log(self, job_id: str, stream: str = "stdout", *, offset: int = 0, tail: int | None = None) -> bytes:
        return self._do(
            _Call("GET", f"/api/v1/jobs/{job_id}/{stream}", params=_log_params(offset, tail))
        ).content

    def follow(self, job_id: str, stream: str = "stdout", *, offset: int = 0) -> Iterator[bytes]:
        """The log as it grows, until the job ends."""
        params = _log_params(offset, None, follow=True)
        try:
            with self._http.stream(
                "GET", f"/api/v1/jobs/{job_id}/{stream}", params=params, timeout=None
            ) as r:
                if not r.is_success:
                    r.read()
                    _check(r)
                yield from r.iter_bytes()
        except httpx.HTTPError as exc:
            raise _connection_failed(self.config.url, exc) from exc

    def events(self, job_id: str) -> list[Event]:
        return self._model(Page[Event], _Call("GET", f"/api/v1/jobs/{job_id}/events")).items

    def outputs(self, job_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._do(_Call("GET", f"/api/v1/jobs/{job_id}/outputs")).json()
        return result

    def download(self, job_id: str, name: str, target: Path) -> int:
        """Save one output file to ``target``, streamed; returns its size."""
        size = 0
        try:
            with self._http.stream("GET", f"/api/v1/jobs/{job_id}/outputs/{name}") as r:
                if not r.is_success:
                    r.read()
                    _check(r)
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as out:
                    for chunk in r.iter_bytes():
                        out.write(chunk)
                        size += len(chunk)
        except httpx.HTTPError as exc:
            raise _connection_failed(self.config.url, exc) from exc
        return size

    def nodes(self) -> list[Node]:
        return self._model(Page[Node], _Call("GET", "/api/v1/nodes")).items

    def flavors(self) -> list[Flavor]:
        return self._model(Page[Flavor], _Call("GET", "/api/v1/flavors")).items

    def images(self) -> list[Image]:
        return self._model(Page[Image], _Call("GET", "/api/v1/images")).items

    def remotes(self) -> list[Remote]:
        return self._model(Page[Remote], _Call("GET", "/api/v1/remotes")).items

    def check_remote(self, name: str) -> dict[str, Any]:
        """Verify a cloud remote's credentials and permissions, creating nothing (admins)."""
        result: dict[str, Any] = self._do(_Call("POST", f"/api/v1/remotes/{name}/check")).json()
        return result

    def whoami(self) -> User:
        return self._model(User, _Call("GET", "/api/v1/whoami"))

    def accounts(self) -> list[Account]:
        response = self._do(_Call("GET", "/api/v1/accounts"))
        return [Account.model_validate(a) for a in response.json()]

    def set_account(self, name: str, *, share: float | None = None, budget: float | None = None) -> Account:
        """Create the account, or change its share and budget (admins)."""
        body = {k: v for k, v in (("share", share), ("budget", budget)) if v is not None}
        return self._model(Account, _Call("PUT", f"/api/v1/accounts/{name}", json=body))

    def add_member(self, account: str, user: str) -> Account:
        return self._model(Account, _Call("POST", f"/api/v1/accounts/{account}/members", json={"user": user}))

    def revoke_user(self, name: str) -> int:
        return int(self._do(_Call("POST", f"/api/v1/users/{name}/revoke")).json()["revoked"])

    def create_token(
        self,
        name: str = "",
        *,
        scopes: Sequence[str] = ("api",),
        expires_days: float = 30,
        user: str | None = None,
    ) -> dict[str, Any]:
        """A new API token; its ``secret`` is in the reply, this once. ``expires_days=0``: never."""
        body: dict[str, Any] = {"name": name, "scopes": list(scopes), "expires_days": expires_days}
        if user is not None:
            body["user"] = user
        result: dict[str, Any] = self._do(_Call("POST", "/api/v1/tokens", json=body)).json()
        return result

    def tokens(self, *, all_users: bool = False) -> list[dict[str, Any]]:
        params = {"all": "true"} if all_users else None
        result: list[dict[str, Any]] = self._do(_Call("GET", "/api/v1/tokens", params=params)).json()
        return result

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._do(_Call("POST", f"/api/v1/tokens/{token_id}/revoke")).json()
        return result

    def costs(self, account: str | None = None, since: datetime | None = None, limit: int = 100) -> Costs:
        """Spend on elastic capacity per account, and the costliest jobs (yours; admins: everyone's)."""
        params: dict[str, Any] = {"limit": limit}
        if account is not None:
            params["account"] = account
        if since is not None:
            params["since"] = since.isoformat()
        return self._model(Costs, _Call("GET", "/api/v1/costs", params=params))

    def bootstrap_token(self, remote: str, node: str, ttl_s: int = 3600) -> dict[str, str]:
        """A one-time token that enrols agent ``node`` on ``remote`` (admins)."""
        call = _Call(
            "POST", f"/api/v1/remotes/{remote}/bootstrap-tokens", json={"node": node, "ttl_s": ttl_s}
        )
        data: dict[str, str] = self._do(call).json()
        return data


class AsyncClient:
    """Asynchronous client with the same methods as :class:`Client`."""

    def __init__(self, config: ClientConfig | None = None, *, max_connections: int = 100) -> None:
        self.config = config or ClientConfig.load()
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(
            base_url=self.config.url, verify=ssl_context(self.config), timeout=TIMEOUT, limits=limits
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _do(self, call: _Call) -> httpx.Response:
        try:
            return _check(await self._http.request(call.method, call.path, **call.kwargs()))
        except httpx.HTTPError as exc:
            raise _connection_failed(self.config.url, exc) from exc

    async def _model(self, model: type[T], call: _Call) -> T:
        return model.model_validate_json((await self._do(call)).content)

    async def submit(
        self, spec: JobSpec | None = None, *, script: str | None = None, inputs: Sequence[Path] = ()
    ) -> Job:
        return await self._model(Job, _submit_call(spec, script, inputs))

    async def jobs(
        self,
        states: Sequence[JobState] | None = None,
        *,
        name: str | None = None,
        user: str | None = None,
        limit: int = 100,
        after: str | None = None,
        array: str | None = None,
        tasks: bool | None = None,
    ) -> Page[Job]:
        params = _list_params(states, name, user, limit, after, array, tasks)
        return await self._model(Page[Job], _Call("GET", "/api/v1/jobs", params=params))

    async def job(self, job_id: str) -> Job:
        return await self._model(Job, _Call("GET", f"/api/v1/jobs/{job_id}"))

    async def wait(self, job_id: str, timeout: float = 30.0) -> Job:
        params = {"timeout": timeout}
        return await self._model(
            Job, _Call("GET", f"/api/v1/jobs/{job_id}/wait", params=params, timeout=timeout)
        )

    async def cancel(self, job_id: str) -> Job:
        return await self._model(Job, _Call("POST", f"/api/v1/jobs/{job_id}/cancel"))

    async def requeue(self, job_id: str) -> Job:
        return await self._model(Job, _Call("POST", f"/api/v1/jobs/{job_id}/requeue"))

    async def log(
        self, job_id: str, stream: str = "stdout", *, offset: int = 0, tail: int | None = None
    ) -> bytes:
        call = _Call("GET", f"/api/v1/jobs/{job_id}/{stream}", params=_log_params(offset, tail))
        return (await self._do(call)).content

    async def follow(self, job_id: str, stream: str = "stdout", *, offset: int = 0) -> AsyncIterator[bytes]:
        params = _log_params(offset, None, follow=True)
        try:
            async with self._http.stream(
                "GET", f"/api/v1/jobs/{job_id}/{stream}", params=params, timeout=None
            ) as r:
                if not r.is_success:
                    await r.aread()
                    _check(r)
                async for chunk in r.aiter_bytes():
                    yield chunk
        except httpx.HTTPError as exc:
            raise _connection_failed(self.config.url, exc) from exc

    async def events(self, job_id: str) -> list[Event]:
        return (await self._model(Page[Event], _Call("GET", f"/api/v1/jobs/{job_id}/events"))).items

    async def nodes(self) -> list[Node]:
        return (await self._model(Page[Node], _Call("GET", "/api/v1/nodes"))).items

    async def flavors(self) -> list[Flavor]:
        return (await self._model(Page[Flavor], _Call("GET", "/api/v1/flavors"))).items

    async def images(self) -> list[Image]:
        return (await self._model(Page[Image], _Call("GET", "/api/v1/images"))).items

    async def remotes(self) -> list[Remote]:
        return (await self._model(Page[Remote], _Call("GET", "/api/v1/remotes"))).items

    async def check_remote(self, name: str) -> dict[str, Any]:
        """Verify a cloud remote's credentials and permissions, creating nothing (admins)."""
        result: dict[str, Any] = (await self._do(_Call("POST", f"/api/v1/remotes/{name}/check"))).json()
        return result

    async def outputs(self, job_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = (await self._do(_Call("GET", f"/api/v1/jobs/{job_id}/outputs"))).json()
        return result

    async def whoami(self) -> User:
        return await self._model(User, _Call("GET", "/api/v1/whoami"))


def dumps(obj: BaseModel | list[BaseModel] | Any) -> str:
    """JSON for ``--json`` output: models and lists of models as the API shows them."""
    if isinstance(obj, BaseModel):
        return obj.model_dump_json(indent=2)
    if isinstance(obj, list):
        return json.dumps(
            [o.model_dump(mode="json") if isinstance(o, BaseModel) else o for o in obj], indent=2
        )
    return json.dumps(obj, indent=2, default=str)
