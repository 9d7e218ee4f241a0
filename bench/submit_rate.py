"""Durable single-job submissions per second over HTTPS with 4 concurrent clients (target >= 1,000/s).

Ours: ``POST /api/v1/jobs`` on a real core (mutual TLS, authentication, validation, the job and its
first event committed to SQLite before the reply, the scheduler loop running). The local node is kept
busy by one long job so that submitted jobs stay queued: this measures intake, not execution (as
benchmarks of batch systems do with held jobs).
Peer: a bare FastAPI app that commits each POSTed JSON body to SQLite (WAL) — the same stack with
nothing of Sky Port — served on the same TLS certificates, driven by the same load generator.

Run: ``.venv/bin/python bench/submit_rate.py``
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import VENV_BIN, BenchCore, print_result, print_table
from bench.loadgen import LoadResult, build_request, run_load

from skyport.client import Client, ClientConfig
from skyport.models import JobSpec

CLIENTS = 4
WARMUP = 500
REQUESTS = 6000
BODY = json.dumps({"command": ["true"], "name": "bench"}).encode()


def _load(port: int, core: BenchCore, total: int) -> LoadResult:
    request = build_request("POST", "localhost", "/api/v1/jobs", BODY, "application/json")
    return asyncio.run(
        run_load("127.0.0.1", port, core.ssl_context(), request, connections=CLIENTS, total=total)
    )


def measure_ours(core: BenchCore) -> LoadResult:
    config = ClientConfig(url=core.url, cert=core.cert, key=core.key, ca=core.ca)
    with Client(config) as client:
        blocker = client.submit(JobSpec(name="keeps-the-node-busy", command=["sleep", "3600"], cpus=1))
        try:
            _load(core.port, core, WARMUP)
            result = _load(core.port, core, REQUESTS)
        finally:  # jobs outlive their core by design: stop this one before the core goes
            client.cancel(blocker.id)
            client.wait(blocker.id, timeout=30)
    stored = sqlite3.connect(core.home / "skyport.db").execute("SELECT count(*) FROM jobs").fetchone()[0]
    expected = 1 + WARMUP + REQUESTS
    if stored != expected or result.statuses != {201: REQUESTS}:
        raise SystemExit(
            f"not every submission was stored: {stored} of {expected}, replies {result.statuses}"
        )
    return result


def measure_peer(core: BenchCore) -> LoadResult:
    workdir = Path(tempfile.mkdtemp(prefix="skyport-bench-peer-"))
    port_file = workdir / "port"
    env = {
        **os.environ,
        "PEER_CERT": str(core.home / "server" / "cert.pem"),
        "PEER_KEY": str(core.home / "server" / "key.pem"),
        "PEER_CA": str(core.home / "ca" / "ca.pem"),
    }
    peer = subprocess.Popen(
        [
            str(VENV_BIN / "python"),
            str(Path(__file__).parent / "peer_fastapi_sqlite.py"),
            str(workdir / "peer.db"),
            str(port_file),
        ],
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text()):
            if peer.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the peer did not start")
            time.sleep(0.05)
        port = int(port_file.read_text())
        _load(port, core, WARMUP)
        return _load(port, core, REQUESTS)
    finally:
        peer.terminate()
        peer.wait(timeout=20)


def main() -> None:
    core = BenchCore(env={"SKYPORT_LOCAL__CPUS": "1"})
    try:
        ours = measure_ours(core)
        peer = measure_peer(core)
    finally:
        core.close()
    rows = [
        (name, f"{r.rate:,.0f}", f"{r.percentile(50) * 1000:.1f}", f"{r.percentile(99) * 1000:.1f}")
        for name, r in (("Sky Port core", ours), ("bare FastAPI + SQLite", peer))
    ]
    print_table(
        f"Durable submissions over HTTPS, {CLIENTS} concurrent clients, {REQUESTS} requests",
        rows,
        ("server", "submissions/s", "p50 ms", "p99 ms"),
    )
    ratio = ours.rate / peer.rate
    print(f"\nours / peer = {ratio:.2f}; target 1,000/s: {'met' if ours.rate >= 1000 else 'NOT met'}")
    print_result(
        {
            "submit_per_s": round(ours.rate, 1),
            "peer_submit_per_s": round(peer.rate, 1),
            "ratio": round(ratio, 3),
            "submit_p50_s": round(ours.percentile(50), 5),
            "submit_p99_s": round(ours.percentile(99), 5),
            "target_per_s": 1000,
        }
    )


if __name__ == "__main__":
    main()
