"""Reading a submission off the wire, whatever its form: JSON, a job script, or multipart with files."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from skyport.jobscript import JobScriptError, parse_jobscript
from skyport.models import JobSpec
from skyport.models.job import MAX_SCRIPT_BYTES
from skyport.server.intake import SubmissionError, Upload

UPLOAD_CHUNK = 1024 * 1024


def validation_message(exc: ValidationError) -> str:
    """Pydantic errors as short lines a person can act on: ``field: problem``."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "job"
        lines.append(f"{where}: {err['msg']}")
    return "\n".join(lines)


def spec_from_json(raw: bytes | str) -> JobSpec:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SubmissionError(f"the body is not valid JSON: {exc}") from exc
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SubmissionError(validation_message(exc)) from exc


def spec_from_script(text: str | bytes, *, compat: bool) -> JobSpec:
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError as exc:
            raise SubmissionError("the job script is not UTF-8 text") from exc
    try:
        return parse_jobscript(text, compat=compat)
    except JobScriptError as exc:
        raise SubmissionError(f"the job script has errors:\n{exc}") from exc


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(UPLOAD_CHUNK):
        yield chunk


def check_length(request: Request, limit: int) -> None:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + MAX_SCRIPT_BYTES + 65536:
        raise SubmissionError(
            f"the submission is {length} bytes, over the limit of {limit} bytes of uploads: "
            "stage large data from a URL instead",
            status=413,
        )


async def read_submission(
    request: Request, *, limit: int, script_field: str = "script", compat: bool = False
) -> tuple[JobSpec, list[Upload]]:
    """The spec and uploads of a submission. Raises SubmissionError (400/413) for anything malformed."""
    check_length(request, limit)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=1000, max_fields=100, max_part_size=MAX_SCRIPT_BYTES + 1024)
        script = form.get(script_field)
        if isinstance(script, UploadFile):  # a script sent as a file part is still the script
            script = (await script.read(MAX_SCRIPT_BYTES + 1)).decode(errors="replace")
        uploads = [
            Upload(name=value.filename or key, chunks=_chunks(value))
            for key, value in form.multi_items()
            if isinstance(value, UploadFile) and key != script_field
        ]
        spec_field = form.get("spec")
        if isinstance(spec_field, str):
            return spec_from_json(spec_field), uploads
        if isinstance(script, str):
            return spec_from_script(script, compat=compat), uploads
        raise SubmissionError(
            f"the form has neither a 'spec' (JSON) nor a {script_field!r} (job script) field"
        )
    body = await request.body()
    if not body:
        raise SubmissionError("the submission is empty: send a job script or a JSON job spec")
    if content_type == "application/json":
        return spec_from_json(body), []
    return spec_from_script(body, compat=compat), []
