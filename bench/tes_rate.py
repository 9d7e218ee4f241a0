"""GA4GH TES on the core: task creations per second, and ``GET /tasks`` (MINIMAL, page_size 256) per
second with 100,000 tasks stored. 4 concurrent clients over HTTPS with a bearer token, as TES clients do.

Ours: a real core (TLS, token authentication, the TES mapping and runner generation, the job and its
task row committed to SQLite before the reply, the scheduler running). The 100,000 stored tasks are
seeded directly through the store API (the same ``insert_jobs``/``insert_tasks`` the intake uses, in
batches, marked completed) rather than by 100,000 HTTP calls; the creations measured are real HTTP
POSTs, kept queued by one job that holds the node (this measures intake, not execution).
Peer: a bare FastAPI app over SQLite (WAL) with the same two endpoints — POST inserts the task JSON,
GET selects the newest 256 (id, state) — seeded with the same number of rows, on the same TLS
certificates, driven by the same load generator.

Run: ``.venv/bin/python bench/tes_rate.py``
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import VENV_BIN, BenchCore, print_result, print_table
from bench.loadgen import LoadResult, build_request, run_load

from skyport.client import Client, ClientConfig
from skyport.models import JobSpec, JobState
from skyport.server.store import jobs as job_store
from skyport.server.store import users as user_store
from skyport.server.store.engine import Store
from skyport.server.tes import store as tes_store

CLIENTS = 4
STORED = 100_000
SEED_BATCH = 5_000
CREATE_WARMUP = 300
CREATES = 3_000
LIST_WARMUP = 100
LISTS = 1_500
TASK = {
    "name": "bench",
    "executors": [{"image": "debian:12", "command": ["echo", "hello"]}],
    "tags": {"suite": "bench"},
}
TASK_BODY = json.dumps(TASK).encode()
LIST_PATH = "/ga4gh/tes/v1/tasks?view=MINIMAL&page_size=256"


def request(method: str, path: str, body: bytes, token: str) -> bytes:
    raw = build_request(method, "localhost", path, body, "application/json")
    head, _, rest = raw.partition(b"\r\n")
    return head + f"\r\nAuthorization: Bearer {token}".encode() + b"\r\n" + rest


def load(port: int, context: object, raw: bytes, total: int) -> LoadResult:
    return asyncio.run(run_load("127.0.0.1", port, context, raw, connections=CLIENTS, total=total))  # type: ignore[arg-type]


# -- seeding -----------------------------------------------------------------------------------------


def _seed_batch(conn: object, user_id: str, account_id: str, count: int, now: datetime) -> None:
    spec = JobSpec(name="seeded", command=["true"], container_image="debian:12")
    new = [
        job_store.NewJob(
            id=str(uuid.uuid4()),
            owner_id=user_id,
            account_id=account_id,
            spec=spec,
            submit_time=now,
            walltime=None,
        )
        for _ in range(count)
    ]
    job_store.insert_jobs(conn, new)  # type: ignore[arg-type]
    job_store.transition(
        conn,  # type: ignore[arg-type]
        [
            job_store.StateChange(
                j.id,
                JobState.COMPLETED,
                "exit_code",
                "Completed (exit code 0)",
                frozenset({JobState.QUEUED}),
                {"exit_code": 0, "end_time": now},
            )
            for j in new
        ],
        now,
    )
    tes_store.insert_tasks(
        conn,  # type: ignore[arg-type]
        [
            tes_store.NewTask(
                job_id=j.id,
                owner_id=user_id,
                name="seeded",
                tags={"suite": "seeded"},
                task=TASK,
                notes=[],
                created_at=now,
                callback_url=None,
                token_id=None,
            )
            for j in new
        ],
    )


def _ids(conn: object) -> tuple[str, str]:
    user = user_store.get_user(conn, name="admin")  # type: ignore[arg-type]
    account = user_store.account_id_by_name(conn, user_store.DEFAULT_ACCOUNT)  # type: ignore[arg-type]
    assert user is not None and account is not None
    return user.id, account


async def seed(store_url: str) -> float:
    store = Store(store_url)
    started = time.perf_counter()
    try:
        user_id, account_id = await store.read(_ids)
        now = datetime.now(UTC)
        for _ in range(STORED // SEED_BATCH):
            await store.write(_seed_batch, user_id, account_id, SEED_BATCH, now)
    finally:
        await store.close()
    return time.perf_counter() - started


# -- ours --------------------------------------------------------------------------------------------


def measure_ours() -> tuple[LoadResult, LoadResult, float]:
    core = BenchCore(env={"SKYPORT_LOCAL__CPUS": "1", "SKYPORT_LOCAL__IMAGES": "host"})
    try:
        seed_s = asyncio.run(seed(f"sqlite+aiosqlite:///{core.home / 'skyport.db'}"))
        config = ClientConfig(url=core.url, cert=core.cert, key=core.key, ca=core.ca)
        context = core.ssl_context()
        with Client(config) as client:
            token = client.create_token("bench", expires_days=1)["secret"]
            blocker = client.submit(JobSpec(name="keeps-the-node-busy", command=["sleep", "3600"], cpus=1))
            try:
                create = request("POST", "/ga4gh/tes/v1/tasks", TASK_BODY, token)
                load(core.port, context, create, CREATE_WARMUP)
                creates = load(core.port, context, create, CREATES)
                listing = request("GET", LIST_PATH, b"", token)
                load(core.port, context, listing, LIST_WARMUP)
                lists = load(core.port, context, listing, LISTS)
            finally:
                client.cancel(blocker.id)
                client.wait(blocker.id, timeout=30)
        db = sqlite3.connect(core.home / "skyport.db")
        stored = db.execute("SELECT count(*) FROM tes_tasks").fetchone()[0]
        if creates.statuses != {200: CREATES} or lists.statuses != {200: LISTS}:
            raise SystemExit(f"failed requests: {creates.statuses} {lists.statuses}")
        if stored != STORED + CREATE_WARMUP + CREATES:
            raise SystemExit(f"not every task was stored: {stored}")
    finally:
        core.close()
    return creates, lists, seed_s


# -- peer --------------------------------------------------------------------------------------------


def peer_main(db_path: str, port_file: Path) -> None:
    """The peer server (run as its own process by :func:`measure_peer`)."""
    import uvicorn
    from fastapi import FastAPI, Request, Response

    from skyport.server.tls import make_uvicorn_config

    db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    app = FastAPI()

    @app.post("/ga4gh/tes/v1/tasks")
    async def create(request: Request) -> Response:
        task = json.loads(await request.body())
        task_id = str(uuid.uuid4())
        db.execute("INSERT INTO tasks (id, state, task) VALUES (?, 'QUEUED', ?)", (task_id, json.dumps(task)))
        return Response(json.dumps({"id": task_id}), media_type="application/json")

    @app.get("/ga4gh/tes/v1/tasks")
    async def list_tasks(page_size: int = 256) -> Response:
        rows = db.execute(
            "SELECT seq, id, state FROM tasks ORDER BY seq DESC LIMIT ?", (page_size + 1,)
        ).fetchall()
        body = {"tasks": [{"id": r[1], "state": r[2]} for r in rows[:page_size]]}
        if len(rows) > page_size:
            body["next_page_token"] = str(rows[page_size - 1][0])
        return Response(json.dumps(body), media_type="application/json")

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
        port_file.write_text(str(server.servers[0].sockets[0].getsockname()[1]))  # noqa: ASYNC240

    server.startup = startup  # type: ignore[method-assign]
    server.run()


def measure_peer() -> tuple[LoadResult, LoadResult]:
    core = BenchCore()  # only for its TLS files and client certificate
    workdir = Path(tempfile.mkdtemp(prefix="skyport-bench-tes-peer-"))
    db = sqlite3.connect(workdir / "peer.db")
    db.execute("CREATE TABLE tasks (seq INTEGER PRIMARY KEY, id TEXT UNIQUE, state TEXT, task TEXT)")
    db.executemany(
        "INSERT INTO tasks (id, state, task) VALUES (?, 'COMPLETE', ?)",
        ((str(uuid.uuid4()), json.dumps(TASK)) for _ in range(STORED)),
    )
    db.commit()
    db.close()
    port_file = workdir / "port"
    env = {
        **os.environ,
        "PEER_CERT": str(core.home / "server" / "cert.pem"),
        "PEER_KEY": str(core.home / "server" / "key.pem"),
        "PEER_CA": str(core.home / "ca" / "ca.pem"),
    }
    peer = subprocess.Popen(
        [str(VENV_BIN / "python"), __file__, "--peer", str(workdir / "peer.db"), str(port_file)], env=env
    )
    try:
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text()):
            if peer.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the peer did not start")
            time.sleep(0.05)
        port = int(port_file.read_text())
        context = core.ssl_context()
        create = request("POST", "/ga4gh/tes/v1/tasks", TASK_BODY, "peer")
        load(port, context, create, CREATE_WARMUP)
        creates = load(port, context, create, CREATES)
        listing = request("GET", LIST_PATH, b"", "peer")
        load(port, context, listing, LIST_WARMUP)
        lists = load(port, context, listing, LISTS)
        return creates, lists
    finally:
        peer.terminate()
        peer.wait(timeout=20)
        core.close()


def main() -> None:
    creates, lists, seed_s = measure_ours()
    peer_creates, peer_lists = measure_peer()

    def row(name: str, r: LoadResult) -> tuple[str, ...]:
        return (name, f"{r.rate:,.0f}", f"{r.percentile(50) * 1000:.1f}", f"{r.percentile(99) * 1000:.1f}")

    print_table(
        f"GA4GH TES over HTTPS with a bearer token, {CLIENTS} concurrent clients, {STORED:,} tasks stored "
        f"(seeded through the store API in {seed_s:.1f} s)",
        [
            row("Sky Port: POST /tasks", creates),
            row("peer: POST /tasks", peer_creates),
            row("Sky Port: GET /tasks MINIMAL 256", lists),
            row("peer: GET /tasks MINIMAL 256", peer_lists),
        ],
        ("operation", "per s", "p50 ms", "p99 ms"),
    )
    print_result(
        {
            "create_per_s": round(creates.rate, 1),
            "peer_create_per_s": round(peer_creates.rate, 1),
            "list_minimal_256_per_s": round(lists.rate, 1),
            "peer_list_minimal_256_per_s": round(peer_lists.rate, 1),
            "create_p99_s": round(creates.percentile(99), 5),
            "list_p99_s": round(lists.percentile(99), 5),
            "tasks_stored": STORED,
            "seed_s": round(seed_s, 1),
        }
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--peer":
        peer_main(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
