"""Bad input gets a clear 4xx that names the problem, and a refused submission leaves nothing behind.

A core of its own with a small upload limit, so oversized uploads are cheap to send. Every request goes
over the wire with a bare ``httpx`` client, as a terminal would send it: job scripts as a text body
(native API) or as the original clients' multipart field ``script_content`` (``/user/job``), JSON specs,
multipart uploads with and without a Content-Length.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from skyport.models.job import MAX_SCRIPT_BYTES
from tests.support.core import CoreProcess

UPLOAD_LIMIT = 4096
#: Over what a submission may carry in all (uploads + the largest script + room for the form).
OVER_THE_TOTAL = UPLOAD_LIMIT + MAX_SCRIPT_BYTES + 65536 + 1
BOUNDARY = "skyport-test-boundary"


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoreProcess]:
    process = CoreProcess(
        tmp_path_factory.mktemp("core") / "home", env={"SKYPORT_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT)}
    )
    process.start()
    try:
        yield process
    finally:
        process.cleanup()


def https_client(core: CoreProcess, name: str) -> httpx.Client:
    config = core.users[name].config
    ctx = ssl.create_default_context(cafile=str(config.ca))
    ctx.load_cert_chain(str(config.cert), str(config.key))
    return httpx.Client(base_url=core.url, verify=ctx, timeout=30)


@pytest.fixture(scope="module")
def eve(core: CoreProcess) -> Iterator[httpx.Client]:
    core.add_user("eve")
    with https_client(core, "eve") as client:
        yield client


@pytest.fixture(scope="module")
def admin(core: CoreProcess) -> Iterator[httpx.Client]:
    with https_client(core, "admin") as client:
        yield client


# ---------------------------------------------------------------------------------------------------
# The bad requests


@dataclass(frozen=True)
class Bad:
    """One bad request: what to send (built afresh for each send: a body may be a generator) and the reply."""

    id: str
    method: str
    path: str
    request: Callable[[], dict[str, Any]]
    status: int
    words: list[str] = field(default_factory=list)


def native_script(script: bytes) -> Callable[[], dict[str, Any]]:
    return lambda: {"content": script, "headers": {"content-type": "text/plain"}}


def swm_script(script: bytes) -> Callable[[], dict[str, Any]]:
    """As ``swmclient`` sends it: a multipart part named script_content, no filename, no content type."""
    return lambda: {"files": {"script_content": (None, script)}}


def as_json(body: object) -> Callable[[], dict[str, Any]]:
    return lambda: {"json": body}


def chunked(*chunks: bytes, content_type: str = "text/plain") -> Callable[[], dict[str, Any]]:
    """A body httpx sends with ``Transfer-Encoding: chunked`` and no Content-Length (a generator)."""

    def body() -> Iterator[bytes]:
        yield from chunks

    return lambda: {"content": body(), "headers": {"content-type": content_type}}


def multipart_parts(script: bytes, file_name: str, data: bytes) -> list[bytes]:
    return [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="script"\r\n\r\n'.encode(),
        script,
        f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="input"; filename="{file_name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode(),
        *[data[i : i + 1024] for i in range(0, len(data), 1024)],
        f"\r\n--{BOUNDARY}--\r\n".encode(),
    ]


def with_upload(script: bytes, file_name: str, data: bytes) -> Callable[[], dict[str, Any]]:
    return lambda: {"data": {"script": script.decode()}, "files": {"input": (file_name, data)}}


SCRIPT_CASES: list[tuple[str, bytes, list[str]]] = [
    (
        "unknown-directive",
        b"#!/bin/sh\n#SWM name ok\n#SWM frobnicate yes\necho hi\n",
        ["line 3", "frobnicate"],
    ),
    ("bad-walltime", b"#!/bin/sh\n#SWM walltime 99:99\necho hi\n", ["line 2", "walltime", "99:99"]),
    ("bad-cpus", b"#!/bin/sh\n#SWM cpus many\necho hi\n", ["line 2", "cpus", "many"]),
    ("zero-cpus", b"#!/bin/sh\n#SWM cpus 0\necho hi\n", ["line 2", "cpus", "at least 1"]),
    ("nul-byte", b"#!/bin/sh\necho a\x00b\n", ["line 2", "NUL"]),
    ("blank", b"\n   \n", ["empty"]),
    ("non-utf8", b"#!/bin/sh\necho caf\xe9\n", ["UTF-8"]),
    ("unknown-account", b"#!/bin/sh\n#SWM account nosuch\necho hi\n", ["account", "nosuch"]),
    ("unknown-remote", b"#!/bin/sh\n#SWM remote nowhere\necho hi\n", ["remote", "nowhere"]),
    ("unknown-flavor", b"#!/bin/sh\n#SWM flavor gigantic\necho hi\n", ["flavor", "gigantic"]),
    ("unknown-cloud-image", b"#!/bin/sh\n#SWM cloud-image nosuch-os\necho hi\n", ["image", "nosuch-os"]),
]

OVERSIZED_SCRIPT = b"echo hi\n" + b"# padding padding padding padding padding padding padding padding\n" * (
    OVER_THE_TOTAL // 64 + 1
)

SUBMISSIONS: list[Bad] = [
    *[Bad(f"native-{n}", "POST", "/api/v1/jobs", native_script(s), 400, w) for n, s, w in SCRIPT_CASES],
    *[Bad(f"user-{n}", "POST", "/user/job", swm_script(s), 400, w) for n, s, w in SCRIPT_CASES],
    Bad("native-empty-body", "POST", "/api/v1/jobs", native_script(b""), 400, ["empty"]),
    Bad("user-empty-script", "POST", "/user/job", swm_script(b""), 400, ["empty"]),
    Bad("json-neither-script-nor-command", "POST", "/api/v1/jobs", as_json({}), 400, ["script", "command"]),
    Bad(
        "json-zero-cpus",
        "POST",
        "/api/v1/jobs",
        as_json({"command": ["true"], "cpus": 0}),
        400,
        ["cpus", "greater than or equal to 1"],
    ),
    Bad(
        "json-unknown-field",
        "POST",
        "/api/v1/jobs",
        as_json({"command": ["true"], "frobnicate": 1}),
        400,
        ["frobnicate", "not permitted"],
    ),
    Bad(
        "json-unknown-account",
        "POST",
        "/api/v1/jobs",
        as_json({"command": ["true"], "account": "nosuch"}),
        400,
        ["account", "nosuch"],
    ),
    Bad(
        "json-malformed",
        "POST",
        "/api/v1/jobs",
        lambda: {"content": b'{"command": [', "headers": {"content-type": "application/json"}},
        400,
        ["not valid JSON"],
    ),
    Bad(
        "upload-escaping-the-workdir",
        "POST",
        "/api/v1/jobs",
        with_upload(b"echo hi\n", "../escape.txt", b"data"),
        400,
        ["../escape.txt", "relative path"],
    ),
    Bad(
        "input-file-not-uploaded",
        "POST",
        "/api/v1/jobs",
        native_script(b"#!/bin/sh\n#SWM input-files missing.dat\ncat missing.dat\n"),
        400,
        ["missing.dat", "not uploaded"],
    ),
    Bad(
        "upload-over-the-limit-with-length",
        "POST",
        "/api/v1/jobs",
        with_upload(b"echo hi\n", "data.bin", b"x" * (2 * UPLOAD_LIMIT)),
        413,
        ["limit", str(UPLOAD_LIMIT)],
    ),
    Bad(
        "upload-over-the-limit-chunked",
        "POST",
        "/api/v1/jobs",
        chunked(
            *multipart_parts(b"echo hi\n", "data.bin", b"x" * (4 * UPLOAD_LIMIT)),
            content_type=f"multipart/form-data; boundary={BOUNDARY}",
        ),
        413,
        ["limit", str(UPLOAD_LIMIT)],
    ),
    Bad(
        "body-over-the-total-with-length",
        "POST",
        "/api/v1/jobs",
        native_script(OVERSIZED_SCRIPT),
        413,
        ["limit"],
    ),
    Bad(
        "user-body-over-the-total-with-length",
        "POST",
        "/user/job",
        swm_script(OVERSIZED_SCRIPT),
        413,
        ["limit"],
    ),
    Bad("body-over-the-total-chunked", "POST", "/api/v1/jobs", chunked(OVERSIZED_SCRIPT), 413, ["limit"]),
]

UNKNOWN_ID = str(uuid.uuid4())

OTHER_REQUESTS: list[Bad] = [
    Bad("job-id-not-a-uuid", "GET", "/api/v1/jobs/not-a-uuid", dict, 400, ["not-a-uuid", "UUID"]),
    Bad("cancel-id-not-a-uuid", "POST", "/api/v1/jobs/not-a-uuid/cancel", dict, 400, ["not-a-uuid", "UUID"]),
    Bad("log-id-not-a-uuid", "GET", "/api/v1/jobs/not-a-uuid/stdout", dict, 400, ["not-a-uuid", "UUID"]),
    Bad("unknown-job-id", "GET", f"/api/v1/jobs/{UNKNOWN_ID}", dict, 404, [UNKNOWN_ID]),
    Bad("cancel-unknown-job-id", "POST", f"/api/v1/jobs/{UNKNOWN_ID}/cancel", dict, 404, [UNKNOWN_ID]),
    Bad("user-api-unknown-job-id", "GET", f"/user/job/{UNKNOWN_ID}", dict, 404, [UNKNOWN_ID]),
    Bad("bad-page-cursor", "GET", "/api/v1/jobs", lambda: {"params": {"after": "garbage"}}, 400, ["cursor"]),
    Bad("page-limit-zero", "GET", "/api/v1/jobs", lambda: {"params": {"limit": 0}}, 400, ["limit"]),
    Bad("unknown-job-state", "GET", "/api/v1/jobs", lambda: {"params": {"state": "sleepy"}}, 400, ["state"]),
    Bad("modify-without-header", "PATCH", f"/user/job/{UNKNOWN_ID}", dict, 400, ["modification", "requeue"]),
    Bad(
        "modify-with-unknown-header",
        "PATCH",
        f"/user/job/{UNKNOWN_ID}",
        lambda: {"headers": {"modification": "hold"}},
        400,
        ["modification", "requeue"],
    ),
]


def send(client: httpx.Client, bad: Bad) -> httpx.Response:
    return client.request(bad.method, bad.path, **bad.request())


def message(reply: httpx.Response) -> str:
    if reply.headers.get("content-type", "").startswith("application/json"):
        return str(reply.json().get("detail", reply.text))
    return reply.text


def assert_refused(reply: httpx.Response, bad: Bad) -> None:
    text = message(reply)
    assert reply.status_code == bad.status, f"{bad.id}: {reply.status_code} {text!r}"
    for word in bad.words:
        assert word.lower() in text.lower(), f"{bad.id}: {word!r} not in {text!r}"


# ---------------------------------------------------------------------------------------------------
# What is stored


def job_dirs(core: CoreProcess) -> set[str]:
    """Ids of the job directories in the core's spool (``spool/jobs/<2 chars>/<job id>``)."""
    return {path.name for path in (core.home / "spool" / "jobs").glob("*/*")}


def stored_ids(admin: httpx.Client, user: str | None = None) -> set[str]:
    params: dict[str, Any] = {"limit": 1000, **({"user": user} if user else {})}
    reply = admin.get("/api/v1/jobs", params=params)
    assert reply.status_code == 200, reply.text
    return {job["id"] for job in reply.json()["items"]}


def orphan_dirs(core: CoreProcess, admin: httpx.Client) -> set[str]:
    """Spool job directories of no stored job: what a submission left half-way."""
    return job_dirs(core) - stored_ids(admin)


# ---------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("bad", SUBMISSIONS, ids=lambda bad: bad.id)
def test_bad_submission_is_refused_with_a_clear_reason_and_stores_nothing(
    core: CoreProcess, eve: httpx.Client, admin: httpx.Client, bad: Bad
) -> None:
    before = stored_ids(admin, "eve")
    assert_refused(send(eve, bad), bad)
    assert stored_ids(admin, "eve") == before, f"{bad.id} stored a job"
    assert orphan_dirs(core, admin) == set(), f"{bad.id} left files in the spool"


@pytest.mark.parametrize("bad", OTHER_REQUESTS, ids=lambda bad: bad.id)
def test_bad_request_is_refused_with_a_clear_reason(eve: httpx.Client, bad: Bad) -> None:
    assert_refused(send(eve, bad), bad)


def test_bad_script_reports_every_problem_with_its_line(eve: httpx.Client) -> None:
    script = b"#!/bin/sh\n#SWM cpus many\n#SWM walltime soon\n#SWM frobnicate\necho hi\n"
    for reply in (
        eve.post("/api/v1/jobs", content=script),
        eve.post("/user/job", files={"script_content": (None, script)}),
    ):
        assert reply.status_code == 400
        lines = [line for line in message(reply).splitlines() if line.startswith("line ")]
        assert [line.split(":")[0] for line in lines] == ["line 2", "line 3", "line 4"]


def test_after_every_bad_submission_the_user_has_no_job_and_the_spool_no_directory(
    core: CoreProcess, admin: httpx.Client
) -> None:
    core.add_user("mallory")
    dirs_before = job_dirs(core)
    with https_client(core, "mallory") as mallory:
        accepted = [bad.id for bad in SUBMISSIONS if send(mallory, bad).is_success]
        own = mallory.get("/api/v1/jobs", params={"limit": 1000})
        swm_list = mallory.get("/user/job")
    assert own.status_code == 200 and swm_list.status_code == 200
    assert own.json()["items"] == [], f"jobs stored for {accepted}"
    assert swm_list.json() == []
    assert stored_ids(admin, "mallory") == set()
    assert job_dirs(core) - dirs_before == set()
    assert orphan_dirs(core, admin) == set()
