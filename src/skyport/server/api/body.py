"""Reading request bodies with limits enforced while the bytes arrive.

Starlette's ``request.body()`` reads without a cap, and its form parser decodes fields leniently (it
falls back to latin-1), which would silently alter a job script that is not UTF-8. Here every body is
counted as it streams in (a 413 as soon as it is over the limit, with or without a Content-Length), and
multipart fields keep their raw bytes so the caller decides how strictly to decode them. File parts go
to spooled temporary files: memory stays bounded whatever their size.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import IO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from skyport.server.intake import SubmissionError

SPOOL_IN_MEMORY = 1024 * 1024
READ_CHUNK = 1024 * 1024


def too_large(limit: int) -> SubmissionError:
    return SubmissionError(
        f"the submission is over the limit of {limit} bytes: stage large data from a URL instead", status=413
    )


async def _capped(request: Request, limit: int) -> AsyncIterator[bytes]:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large(limit)
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise too_large(limit)
        yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    return b"".join([chunk async for chunk in _capped(request, limit)])


@dataclass
class FilePart:
    name: str
    filename: str
    file: IO[bytes]

    async def chunks(self) -> AsyncIterator[bytes]:
        self.file.seek(0)
        while chunk := self.file.read(READ_CHUNK):
            yield chunk


@dataclass
class Form:
    fields: dict[str, bytes] = field(default_factory=dict)
    files: list[FilePart] = field(default_factory=list)

    def close(self) -> None:
        for part in self.files:
            part.file.close()


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)
    file: IO[bytes] | None = None


class _FormBuilder:
    """python-multipart callbacks that fill a :class:`Form`."""

    def __init__(self, field_limit: int, max_parts: int) -> None:
        self.form = Form()
        self._field_limit = field_limit
        self._max_parts = max_parts
        self._parts = 0
        self._part = _Part()
        self._header_name = b""
        self._header_value = b""

    def on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > self._max_parts:
            raise SubmissionError(f"the form has more than {self._max_parts} parts")
        self._part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._part.headers[self._header_name.lower()] = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        disposition = self._part.headers.get(b"content-disposition")
        if disposition is None:
            raise SubmissionError("a form part has no Content-Disposition header")
        _, options = parse_options_header(disposition)
        if b"name" not in options:
            raise SubmissionError('a form part has no "name" in its Content-Disposition')
        self._part.name = options[b"name"].decode("utf-8", errors="replace")
        if b"filename" in options:
            self._part.filename = options[b"filename"].decode("utf-8", errors="replace")
            self._part.file = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part.file is not None:
            self._part.file.write(data[start:end])
            return
        if len(self._part.data) + (end - start) > self._field_limit:
            raise SubmissionError(
                f"the form field {self._part.name!r} is larger than {self._field_limit} bytes"
            )
        self._part.data += data[start:end]

    def on_part_end(self) -> None:
        part = self._part
        if part.file is not None and part.filename is not None:
            self.form.files.append(FilePart(part.name, part.filename, part.file))
        else:
            self.form.fields[part.name] = bytes(part.data)


async def read_form(request: Request, *, limit: int, field_limit: int, max_parts: int = 1000) -> Form:
    """Parse a multipart/form-data body. Raises SubmissionError (400/413) for anything malformed."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise SubmissionError("the multipart body has no boundary in its Content-Type")
    builder = _FormBuilder(field_limit, max_parts)
    callbacks = {name: getattr(builder, name) for name in dir(builder) if name.startswith("on_")}
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        async for chunk in _capped(request, limit):
            parser.write(chunk)
        parser.finalize()
    except SubmissionError:
        builder.form.close()
        raise
    except Exception as exc:  # the parser's own errors: a malformed body
        builder.form.close()
        raise SubmissionError(f"the multipart body is malformed: {exc}") from exc
    return builder.form
