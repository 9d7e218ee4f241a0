"""The peer of the submission benchmark: a bare FastAPI app that inserts each POSTed JSON body into
SQLite (WAL, one commit per request) — what "a durable POST" costs with the same stack and no Sky Port.

Run by bench/submit_rate.py as its own process: ``python bench/peer_fastapi_sqlite.py DB PORTFILE``
with the TLS files in the environment (PEER_CERT, PEER_KEY, PEER_CA).
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import uuid
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request, Response

from skyport.server.tls import make_uvicorn_config


def main() -> None:
    db_path, port_file = sys.argv[1], Path(sys.argv[2])
    db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, spec TEXT NOT NULL)")
    app = FastAPI()

    @app.post("/api/v1/jobs", status_code=201)
    async def submit(request: Request) -> Response:
        spec = json.loads(await request.body())
        job_id = str(uuid.uuid4())
        db.execute("INSERT INTO jobs VALUES (?, ?)", (job_id, json.dumps(spec)))
        return Response(json.dumps({"id": job_id}), status_code=201, media_type="application/json")

    config = make_uvicorn_config(
        app,
        host="127.0.0.1",
        port=0,
        cert_file=Path(os.environ["PEER_CERT"]),
        key_file=Path(os.environ["PEER_KEY"]),
        ca_file=Path(os.environ["PEER_CA"]),
        log_level="warning",
    )
    server = uvicorn.Server(config)

    original_startup = server.startup

    async def startup(sockets: object = None) -> None:
        await original_startup(sockets)  # type: ignore[arg-type]
        port = server.servers[0].sockets[0].getsockname()[1]
        port_file.write_text(str(port))  # noqa: ASYNC240 - once, at start-up

    server.startup = startup  # type: ignore[method-assign]
    server.run()


if __name__ == "__main__":
    main()
