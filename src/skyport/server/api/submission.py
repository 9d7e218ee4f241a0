"""Reading a submission off the wire, whatever its form: JSON, a job script, or multipart with files."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pydantic import ValidationError
from starlette.requests import Request

from skyport.jobscript import JobScriptError, parse_jobscript
from skyport.models import JobSpec
from skyport.models.job import MAX_SCRIPT_BYTES
from skyport.server.api.body import Form, read_body, read_form
from skyport.server.intake import SubmissionError, Upload

#: Room for the form's own framing and a JSON spec beside the uploads.
ENVELOPE_BYTES = MAX_SCRIPT_BYTES + 64 * 1024


def validation_message(exc: ValidationError) -> str:
    """Pydantic errors as short lines a person can act on: ``field: problem``."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "job"
        lines.append(f"{where}: {err['msg']}")
    return "\n".join(lines)


def spec_from_json(raw: bytes) -> JobSpec:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SubmissionError(f"the body is not valid JSON: {exc}") from exc
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SubmissionError(validation_message(exc)) from exc


def spec_from_script(raw: bytes, *, compat: bool) -> JobSpec:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SubmissionError(f"the job script is not UTF-8 text (byte {exc.start} is not valid)") from exc
    try:
        return parse_jobscript(text, compat=compat)
    except JobScriptError as exc:
        raise SubmissionError(f"the job script has errors:\n{exc}") from exc


def _from_form(form: Form, script_field: str, compat: bool) -> tuple[JobSpec, list[Upload]]:
    uploads = [Upload(name=p.filename, chunks=p.chunks()) for p in form.files if p.name != script_field]
    script_files = [p for p in form.files if p.name == script_field]
    if "spec" in form.fields:
        return spec_from_json(form.fields["spec"]), uploads
    if script_field in form.fields:
        return spec_from_script(form.fields[script_field], compat=compat), uploads
    if script_files:  # a script sent as a file part is still the script
        script_files[0].file.seek(0)
        raw = script_files[0].file.read(MAX_SCRIPT_BYTES + 1)
        return spec_from_script(raw, compat=compat), uploads
    raise SubmissionError(f"the form has neither a 'spec' (JSON) nor a {script_field!r} (job script) field")


@asynccontextmanager
async def submission(
    request: Request, *, limit: int, script_field: str = "script", compat: bool = False
) -> AsyncIterator[tuple[JobSpec, list[Upload]]]:
    """The spec and uploads of a submission, valid inside the block (uploaded files are closed after).

    Raises SubmissionError (400/413) for anything malformed or too large.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await read_form(request, limit=limit + ENVELOPE_BYTES, field_limit=ENVELOPE_BYTES)
        try:
            yield _from_form(form, script_field, compat)
        finally:
            form.close()
        return
    body = await read_body(request, ENVELOPE_BYTES)
    if not body:
        raise SubmissionError("the submission is empty: send a job script or a JSON job spec")
    if content_type == "application/json":
        yield spec_from_json(body), []
    else:
        yield spec_from_script(body, compat=compat), []
