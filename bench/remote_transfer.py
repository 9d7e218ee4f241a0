"""Moving bytes to and from a remote host: staging and tunnels vs scp and ``ssh -L`` (target >= 80%).

One "host" is a network namespace on a bridge (like the integration tests), running a real sshd and a real
``skyport agent``; the core listens on the bridge. Side by side, on the same host and the same link:

- staging: a job's input file (uploaded to the core beforehand) is placed in its working directory on the
  host — time from the job's ``staging_in`` event to ``running`` (core -> agent over mutual TLS, checksums
  on both sides) — vs ``scp`` of the same file to the host. Each copy is deleted after its run, ours and
  scp's alike (a new file on a machine whose page cache is full of old ones costs more to write);
- tunnel: downloading a file from an HTTP server in a job through ``skyport port-forward`` (the CLI in a
  process of its own: client -> core -> agent -> job) vs through ``ssh -L`` to the same server.

The runs alternate (ours, theirs, ours, ...) and each side's best of ``REPEATS`` is reported. Needs root
(namespaces, sshd). Run: ``.venv/bin/python bench/remote_transfer.py`` (``BENCH_MB=128`` for a quick one).
"""

from __future__ import annotations

import functools
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
from tests.support.core import VENV_BIN, CoreProcess, wait_for
from tests.support.hosts import HostNetwork
from tests.support.sshd import ClientKey, SSHServer, free_port, write_known_hosts

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


def _staging_s(core: CoreProcess, agent: AgentProcess, source: Path) -> float:
    """One staging of ``source`` into a job's working directory; the staged copy is deleted after."""
    c = core.client()
    job = c.submit(script=f"#!/bin/sh\n#SWM input-files {source.name}\ntrue\n", inputs=[source])
    wait_for(lambda: c.job(job.id).state.terminal, 300, "the staging job to end")
    assert c.job(job.id).state is JobState.COMPLETED, c.job(job.id).state_details
    for staged in agent.workroot.glob(f"{job.id}.*/{source.name}"):
        staged.unlink()  # as scp's copy is: each run writes a new file into recycled page cache
    return _event_time(core, job.id, "started") - _event_time(core, job.id, "staging_in")


def _ssh_base(key: ClientKey, known_hosts: Path) -> list[str]:
    return ["-i", str(key.path), "-o", f"UserKnownHostsFile={known_hosts}", "-o", "BatchMode=yes"]


def _scp_s(key: ClientKey, known_hosts: Path, address: str, source: Path, target: Path) -> float:
    """One ``scp`` of ``source`` to ``target`` on the host (the same file system); deleted after."""
    started = time.perf_counter()
    subprocess.run(
        ["scp", "-q", *_ssh_base(key, known_hosts), str(source), f"root@{address}:{target}"], check=True
    )
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


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


def _port_forward(core: CoreProcess, job_id: str, port: int, local: int) -> subprocess.Popen[bytes]:
    """``skyport port-forward`` (the CLI, a process of its own, as ``ssh -L`` is): local -> core ->
    agent -> the job's port."""
    config = core.users["admin"].config
    env = {
        **os.environ,
        "SKYPORT_URL": core.url,
        "SKYPORT_CERT": str(config.cert),
        "SKYPORT_KEY": str(config.key),
        "SKYPORT_CA": str(config.ca),
    }
    return subprocess.Popen(
        [str(VENV_BIN / "skyport"), "port-forward", job_id, f"{port}:{local}"],
        env=env,
        stderr=subprocess.DEVNULL,
    )


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

            # Side by side, alternating (so that a busy moment of the machine hits both alike).
            scp_target = tmp / "scp-copy"
            ours_runs, scp_runs = [], []
            for _ in range(REPEATS):
                ours_runs.append(_staging_s(core, agent, source))
                scp_runs.append(_scp_s(key, known_hosts, host.address, source, scp_target))
            ours, scp = min(ours_runs), min(scp_runs)
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
            ours_local, ssh_local = free_port(), free_port()
            forwarders = [
                _port_forward(core, job.id, port, ours_local),
                subprocess.Popen(
                    [
                        "ssh",
                        "-N",
                        *_ssh_base(key, known_hosts),
                        "-L",
                        f"{ssh_local}:127.0.0.1:{port}",
                        f"root@{host.address}",
                    ]
                ),
            ]
            try:
                for local in (ours_local, ssh_local):
                    wait_for(
                        functools.partial(_answers, local),
                        60,
                        "the forwarders and the job's server to answer",
                    )
                tunnel_runs, ssh_runs = [], []
                for _ in range(REPEATS):
                    tunnel_runs.append(_download_s(ours_local))
                    ssh_runs.append(_download_s(ssh_local))
                tunnel, ssh_l = min(tunnel_runs), min(ssh_runs)
            finally:
                for forwarder in forwarders:
                    forwarder.terminate()
                    forwarder.wait(timeout=10)
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


if __name__ == "__main__":
    main()
