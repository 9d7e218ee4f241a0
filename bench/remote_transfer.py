"""Moving bytes to and from a remote host: staging and tunnels vs scp and ``ssh -L`` (target >= 80%).

One "host" is a network namespace on a bridge (like the integration tests), running a real sshd and a real
``skyport agent``; the core listens on the bridge. Side by side, on the same host and the same link:

- staging: a job's input file (uploaded to the core beforehand) is placed in its working directory on the
  host — time from the job's ``staging_in`` event to ``running`` (core -> agent over mutual TLS, checksums
  on both sides) — vs ``scp`` of the same file to the host;
- tunnel: downloading a file from an HTTP server in a job through ``skyport port-forward`` (client ->
  core -> agent -> job) vs through ``ssh -L`` to the same server.

Needs root (namespaces, sshd). Run: ``.venv/bin/python bench/remote_transfer.py``
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import print_result, print_table
from tests.support.agent import AgentProcess
from tests.support.core import CoreProcess, wait_for
from tests.support.hosts import HostNetwork
from tests.support.sshd import ClientKey, SSHServer, free_port, write_known_hosts

from skyport.client.ports import forward
from skyport.models import JobState

SIZE = int(os.environ.get("BENCH_MB", "512")) * 1024 * 1024
REPEATS = 3


def _make_file(path: Path, size: int) -> None:
    block = os.urandom(1024 * 1024)  # incompressible, like real data
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)


def _event_time(core: CoreProcess, job_id: str, reason: str) -> float:
    for event in core.client().events(job_id):
        if event.reason == reason:
            return event.time.timestamp()
    raise AssertionError(f"job {job_id} has no {reason!r} event")


def _staging_s(core: CoreProcess, source: Path) -> float:
    c = core.client()
    job = c.submit(script=f"#!/bin/sh\n#SWM input-files {source.name}\ntrue\n", inputs=[source])
    wait_for(lambda: c.job(job.id).state.terminal, 300, "the staging job to end")
    assert c.job(job.id).state is JobState.COMPLETED, c.job(job.id).state_details
    return _event_time(core, job.id, "started") - _event_time(core, job.id, "staging_in")


def _ssh_base(key: ClientKey, known_hosts: Path) -> list[str]:
    return ["-i", str(key.path), "-o", f"UserKnownHostsFile={known_hosts}", "-o", "BatchMode=yes"]


def _scp_s(key: ClientKey, known_hosts: Path, address: str, source: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        ["scp", "-q", *_ssh_base(key, known_hosts), str(source), f"root@{address}:/tmp/skyport-bench-scp"],
        check=True,
    )
    return time.perf_counter() - started


def _download_s(port: int) -> float:
    """GET /blob over plain HTTP from 127.0.0.1:port, bytes to nowhere; seconds for the whole body."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /blob HTTP/1.0\r\n\r\n")
        received = 0
        while chunk := s.recv(1024 * 1024):
            received += len(chunk)
    assert received > SIZE, f"short download: {received} bytes"
    return time.perf_counter() - started


def _answers(port: int) -> bool:
    """Does an HTTP server answer at 127.0.0.1:port (a HEAD request)?"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"HEAD /blob HTTP/1.0\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.0 200")
    except OSError:
        return False


async def _tunnel_s(core: CoreProcess, job_id: str, port: int) -> float:
    server = await forward(core.users["admin"].config, job_id, port)
    local = server.sockets[0].getsockname()[1]
    try:
        for _ in range(100):  # until the job's server listens
            if await asyncio.to_thread(_answers, local):
                break
            await asyncio.sleep(0.1)
        return await asyncio.to_thread(_download_s, local)
    finally:
        server.close()


def main() -> None:
    rows: list[tuple[str, ...]] = []
    with HostNetwork() as net, tempfile.TemporaryDirectory(prefix="skyport-bench-") as tmp_text:
        tmp = Path(tmp_text)
        host = net.add_host("node")
        key = ClientKey.create(tmp / "keys")
        sshd = SSHServer(tmp / "sshd", [key], host)
        sshd.start()
        known_hosts = write_known_hosts(tmp / "known_hosts", [sshd])
        remotes = [{"kind": "agent", "name": "lab", "heartbeat_timeout_s": 30}]
        env = {
            "SKYPORT_REMOTES": json.dumps(remotes),
            "SKYPORT_LOCAL__ENABLED": "false",
            "SKYPORT_LOG_LEVEL": "warning",
            "SKYPORT_MAX_UPLOAD_BYTES": str(2 * SIZE),
        }
        core = CoreProcess(tmp / "home", env=env, host=net.gateway)
        core.start()
        agent = AgentProcess(core, "lab", "node", tmp / "agent", netns=host.netns, heartbeat_s=2)
        try:
            agent.start()
            wait_for(lambda: any(n.state_power == "up" for n in core.client().nodes()), 30, "the agent")
            source = tmp / "blob"
            _make_file(source, SIZE)

            ours = min(_staging_s(core, source) for _ in range(REPEATS))
            scp = min(_scp_s(key, known_hosts, host.address, source) for _ in range(REPEATS))
            rows.append(
                (
                    "staging in",
                    f"{SIZE / ours / 1e6:.0f} MB/s",
                    f"{SIZE / scp / 1e6:.0f} MB/s",
                    f"{scp / ours:.2f}",
                )
            )

            port = free_port()
            script = (
                f"#!/bin/sh\n#SWM ports {port}/tcp/in\nhead -c {SIZE} /dev/urandom > blob\n"
                f"exec python3 -m http.server {port} --bind 127.0.0.1\n"
            )
            c = core.client()
            job = c.submit(script=script)
            wait_for(lambda: c.job(job.id).state is JobState.RUNNING, 60, "the server job")
            workdir = next(agent.workroot.glob(f"{job.id}.*"))
            wait_for(
                lambda: (workdir / "blob").exists() and (workdir / "blob").stat().st_size == SIZE,
                60,
                "the blob",
            )
            tunnel = min(asyncio.run(_tunnel_s(core, job.id, port)) for _ in range(REPEATS))
            local = free_port()
            ssh = subprocess.Popen(
                [
                    "ssh",
                    "-N",
                    *_ssh_base(key, known_hosts),
                    "-L",
                    f"{local}:127.0.0.1:{port}",
                    f"root@{host.address}",
                ]
            )
            try:
                wait_for(lambda: _listening(local), 15, "ssh -L to listen")
                ssh_l = min(_download_s(local) for _ in range(REPEATS))
            finally:
                ssh.terminate()
                ssh.wait(timeout=10)
            rows.append(
                (
                    "tunnel",
                    f"{SIZE / tunnel / 1e6:.0f} MB/s",
                    f"{SIZE / ssh_l / 1e6:.0f} MB/s",
                    f"{ssh_l / tunnel:.2f}",
                )
            )
            c.cancel(job.id)
        finally:
            agent.cleanup()
            core.cleanup()
            sshd.stop()
    print_table(
        f"Moving {SIZE // 2**20} MiB to/from a host in a network namespace (best of {REPEATS})",
        rows,
        ("path", "Sky Port", "OpenSSH", "ratio"),
    )
    print_result(
        {
            "staging_s": round(ours, 3),
            "scp_s": round(scp, 3),
            "staging_ratio": round(scp / ours, 3),
            "tunnel_s": round(tunnel, 3),
            "ssh_l_s": round(ssh_l, 3),
            "tunnel_ratio": round(ssh_l / tunnel, 3),
            "ratio": round(min(scp / ours, ssh_l / tunnel), 3),
        }
    )


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
