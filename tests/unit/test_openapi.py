"""The generated OpenAPI documents the submissions, whose routes skip FastAPI's request handling."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import Request, Response

from skyport.server.api.deps import RequestRoute
from skyport.server.app import create_app
from skyport.server.settings import Settings


def test_the_submission_routes_are_documented(tmp_path: Path) -> None:
    paths = create_app(Settings(home=tmp_path)).openapi()["paths"]
    native = paths["/api/v1/jobs"]["post"]
    assert set(native["requestBody"]["content"]) == {"application/json", "text/plain", "multipart/form-data"}
    assert native["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Job"
    }
    assert "post" in paths["/user/job"]


def test_a_request_route_takes_the_request_alone() -> None:
    async def takes_more(request: Request, job_id: str) -> Response:
        return Response()

    with pytest.raises(TypeError, match="must take the request alone"):
        RequestRoute("/x", takes_more, methods=["POST"])
