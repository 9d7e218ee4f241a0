"""1,000 trivial jobs on a real Slurm 22.05 cluster: a plain ``sbatch`` loop vs through Sky Port (issue 6).

One run, one private cluster on loopback (tests/support/slurm.py: two ``slurmd`` nodes of ``CPUS``
declared CPUs each, fast scheduler parameters), the same user (``nobody``) and the same job (``true``):

1. Peer: a shell loop of ``sbatch --wrap=true``, one job per call (what a user's script does). Measured:
   submissions per second, and the time from the first submission until Slurm reports all completed.
2. Ours: the same 1,000 jobs POSTed to a real core (4 concurrent HTTPS clients) with ``remote hpc``.
   The core forwards them to Slurm, packing jobs of one user and shape into job arrays. Measured: the
   core's acceptance rate (durable submissions per second), the rate at which they reached Slurm, and
   the time until the core reports all 1,000 completed (Slurm ran them, the core saw them end).
3. Status of the 1,000 tracked jobs: a client polling Sky Port (``GET /api/v1/jobs?limit=1000``, states
   from the core's store; the core itself asks Slurm once per pass with one ``squeue --json``) vs a
   client polling ``slurmrestd`` ``GET /slurm/v0.0.38/jobs`` (every job Slurm holds), requests per
   second; and the cost of one status pass of the gate (one ``squeue --json`` for the 1,000 jobs).

Run (root: slurmd starts jobs as their users): ``.venv/bin/python bench/slurm_submit.py``
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from bench.harness import BenchCore, print_result, print_table
from bench.loadgen import build_request, run_load
from tests.support.slurm import SlurmCluster, missing

from skyport.client import Client, ClientConfig
from skyport.gates.slurm_access import CommandBackend, LocalShell
from skyport.server.settings import SlurmRemoteSettings

JOBS = 1000
CPUS = 8  # per node: 16 slots, so that Slurm's launch rate, not two CPUs, decides the end-to-end time
CLIENTS = 4
LOGIN = "nobody"
STATUS_SECONDS = 5.0


def _as_login(cluster: SlurmCluster, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/bin/sh", "-s"],
        input=script,
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", **cluster.env},
        cwd="/tmp",
    )


def _slurm_counts(cluster: SlurmCluster) -> dict[str, int]:
    out = cluster.run(["squeue", "-h", "-t", "all", "-r", "-u", LOGIN, "-o", "%T"]).stdout
    counts: dict[str, int] = {}
    for state in out.split():
        counts[state] = counts.get(state, 0) + 1
    return counts


def _wait(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> float:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(interval)
    return time.monotonic()


def _drain(cluster: SlurmCluster) -> None:
    """Forget finished jobs between the two runs, so each counts only its own."""
    cluster.run(["scancel", "-u", LOGIN], check=False)
    _wait(lambda: not set(_slurm_counts(cluster)) - {"COMPLETED", "CANCELLED"}, 60, "an idle cluster")


def measure_sbatch_loop(cluster: SlurmCluster, outdir: Path) -> dict[str, float]:
    script = (
        f"i=0; while [ $i -lt {JOBS} ]; do "
        f"sbatch --parsable --job-name=loop -o /dev/null -D {outdir} --wrap=true >/dev/null || exit 1; "
        "i=$((i+1)); done\n"
    )
    start = time.monotonic()
    _as_login(cluster, script)
    submitted = time.monotonic()
    done = _wait(lambda: _slurm_counts(cluster).get("COMPLETED", 0) >= JOBS, 1800, "the loop's jobs")
    return {"submit_s": submitted - start, "all_done_s": done - start}


def measure_skyport(cluster: SlurmCluster, workroot: Path) -> tuple[BenchCore, dict[str, float]]:
    remote = {
        "kind": "slurm",
        "name": "hpc",
        "submit": "commands",
        "env": cluster.env,
        "users": {"admin": {"login": LOGIN}},
        "same_name_logins": False,
        "workroot": str(workroot),
        "poll_interval_s": 0.5,
    }
    core = BenchCore(env={"SKYPORT_REMOTES": json.dumps([remote]), "SKYPORT_LOCAL__ENABLED": "false"})
    db = sqlite3.connect(f"file:{core.home / 'skyport.db'}?mode=ro", uri=True)

    def count(where: str) -> int:
        return int(db.execute(f"SELECT count(*) FROM jobs WHERE {where}").fetchone()[0])

    body = json.dumps({"command": ["true"], "name": "bench", "remote": "hpc"}).encode()
    request = build_request("POST", "localhost", "/api/v1/jobs", body, "application/json")
    start = time.monotonic()
    load = asyncio.run(
        run_load("127.0.0.1", core.port, core.ssl_context(), request, connections=CLIENTS, total=JOBS)
    )
    accepted = time.monotonic()
    if load.statuses != {201: JOBS}:
        raise SystemExit(f"submissions failed: {load.statuses}")
    in_slurm = _wait(lambda: count("handle IS NOT NULL") >= JOBS, 600, "the jobs to reach Slurm", 0.02)
    done = _wait(lambda: count("state = 'completed'") >= JOBS, 1800, "the jobs to complete")
    failed = count("state IN ('failed', 'canceled')")
    if failed:
        raise SystemExit(f"{failed} jobs did not complete")
    arrays = len({b for (b,) in db.execute("SELECT json_extract(handle, '$.base') FROM jobs")})
    db.close()
    return core, {
        "accept_s": accepted - start,
        "in_slurm_s": in_slurm - start,
        "all_done_s": done - start,
        "sbatch_calls": float(arrays),
    }


def measure_status(cluster: SlurmCluster, core: BenchCore) -> dict[str, float]:
    config = ClientConfig(url=core.url, cert=core.cert, key=core.key, ca=core.ca)
    with Client(config) as client:
        n, start = 0, time.monotonic()
        while time.monotonic() - start < STATUS_SECONDS:
            page = client.jobs(limit=JOBS)
            n += 1
        ours = n / (time.monotonic() - start)
        assert len(page.items) == JOBS
    token = cluster.token(LOGIN)
    headers = {"X-SLURM-USER-NAME": LOGIN, "X-SLURM-USER-TOKEN": token}
    with httpx.Client(base_url=cluster.rest_url, headers=headers, timeout=60) as rest:
        n, start = 0, time.monotonic()
        while time.monotonic() - start < STATUS_SECONDS:
            listed = rest.get("/slurm/v0.0.38/jobs").json()["jobs"]
            n += 1
        peer = n / (time.monotonic() - start)
    ids = {str(j["array_job_id"] or j["job_id"]) for j in listed if j["name"] == "bench"}

    # One status pass of the gate for every tracked job: what 22.05 gets by default (the text format,
    # filtered by Slurm), and with --json (which 22.05 does not filter: every job of the cluster).
    async def passes(fmt: Literal["text", "json"]) -> tuple[float, int]:
        settings = SlurmRemoteSettings(name="hpc", env=cluster.env, status_format=fmt)
        backend = CommandBackend(settings, LocalShell(settings))
        count, begin, seen = 0, time.monotonic(), 0
        while time.monotonic() - begin < STATUS_SECONDS:
            seen = sum(len(r.keys) for r in await backend.jobs("", ids))
            count += 1
        return (time.monotonic() - begin) / count, seen

    pass_s, seen = asyncio.run(passes("text"))
    json_pass_s, json_seen = asyncio.run(passes("json"))
    return {
        "ours_per_s": ours,
        "peer_per_s": peer,
        "pass_s": pass_s,
        "json_pass_s": json_pass_s,
        "listed": float(len(listed)),
        "seen": float(seen),
        "json_seen": float(json_seen),
    }


def main() -> None:
    why = missing(rest=True)
    if why:
        raise SystemExit(f"cannot run: {why}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the cluster on a kill, too
    base = Path(tempfile.mkdtemp(prefix="skyport-bench-slurm-"))
    base.chmod(0o755)  # the jobs' user and slurmrestd (nobody) read the cluster's configuration
    workroot = Path(tempfile.mkdtemp(prefix="skyport-bench-slurm-work-"))
    os.chmod(workroot, 0o1777)
    cluster = SlurmCluster(base / "cluster", cpus=CPUS, mem_mb=64000, rest=True)
    core: BenchCore | None = None
    try:
        cluster.start()
        loop = measure_sbatch_loop(cluster, workroot)
        _drain(cluster)
        core, ours = measure_skyport(cluster, workroot)
        status = measure_status(cluster, core)
    finally:
        if core is not None:
            core.close()
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(workroot, ignore_errors=True)
    loop_rate = JOBS / loop["submit_s"]
    our_accept = JOBS / ours["accept_s"]
    our_reach = JOBS / ours["in_slurm_s"]
    rows: list[tuple[str, ...]] = [
        (
            "plain sbatch loop",
            f"{loop_rate:,.0f}",
            f"{loop_rate:,.0f}",
            f"{loop['all_done_s']:.1f}",
            f"{JOBS:,}",
        ),
        (
            "Sky Port (4 HTTPS clients)",
            f"{our_accept:,.0f}",
            f"{our_reach:,.0f}",
            f"{ours['all_done_s']:.1f}",
            f"{ours['sbatch_calls']:.0f}",
        ),
    ]
    print_table(
        f"{JOBS:,} trivial jobs on Slurm 22.05 (2 nodes x {CPUS} CPUs, loopback)",
        rows,
        ("submitter", "accepted/s", "in Slurm/s", "all done s", "sbatch calls"),
    )
    status_rows: list[tuple[str, ...]] = [
        ("Sky Port GET /api/v1/jobs?limit=1000", f"{status['ours_per_s']:,.1f}"),
        (f"slurmrestd GET /jobs ({status['listed']:.0f} jobs listed)", f"{status['peer_per_s']:,.1f}"),
        (f"gate pass: squeue --jobs, text ({status['seen']:.0f} seen)", f"{1 / status['pass_s']:,.1f}"),
        (f"gate pass: squeue --json ({status['json_seen']:.0f} seen)", f"{1 / status['json_pass_s']:,.1f}"),
    ]
    print_table(f"Status of {JOBS:,} tracked jobs", status_rows, ("client polls", "requests/s"))
    submit_ratio = our_reach / loop_rate
    done_ratio = loop["all_done_s"] / ours["all_done_s"]
    status_ratio = status["ours_per_s"] / status["peer_per_s"]
    print(
        f"\nreach Slurm: ours / sbatch loop = {submit_ratio:.2f}; "
        f"all done: loop time / ours = {done_ratio:.2f}; "
        f"status polling: ours / slurmrestd = {status_ratio:.2f}"
    )
    print_result(
        {
            "jobs": JOBS,
            "loop_submit_per_s": round(loop_rate, 1),
            "loop_all_done_s": round(loop["all_done_s"], 2),
            "ours_accept_per_s": round(our_accept, 1),
            "ours_in_slurm_per_s": round(our_reach, 1),
            "ours_all_done_s": round(ours["all_done_s"], 2),
            "ours_sbatch_calls": int(ours["sbatch_calls"]),
            "submit_ratio": round(submit_ratio, 3),
            "done_ratio": round(done_ratio, 3),
            "status_ours_per_s": round(status["ours_per_s"], 1),
            "status_slurmrestd_per_s": round(status["peer_per_s"], 1),
            "status_ratio": round(status_ratio, 3),
            "status_pass_s": round(status["pass_s"], 4),
            "status_pass_jobs_seen": int(status["seen"]),
            "status_json_pass_s": round(status["json_pass_s"], 4),
        }
    )


if __name__ == "__main__":
    main()
