"""The original console, ``swmconsole`` 0.1.4 from PyPI, unchanged, against our core over real mTLS.

``swmconsole.run`` reads its server URL and ``~/.swm`` files from module globals at call time. Each test
runs it in a subprocess that points those globals at our core and at the files ``skyport`` wrote for the
user, sets ``sys.argv`` and calls ``main()``: the console's own code, as a user would run it.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from skyport.client import Client
from skyport.models import JobSpec, JobState
from tests.compat.test_swmclient import Catalog, seed_catalog
from tests.support.core import CoreProcess, wait_for

JOB_TIMEOUT_S = 30.0
CONSOLE_TIMEOUT_S = 60.0
UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

RUN_CONSOLE = """
import sys
import swmconsole.run as console
console.URL, console.KEY_FILE, console.CERT_FILE, console.CA_FILE = sys.argv[1:5]
sys.argv = ["swm-console", *sys.argv[5:]]
console.main()
"""


def console_host() -> str:
    """The name the console dials: the FQDN, as ``swmconsole`` does (hostname checking on).

    Our core listens on 127.0.0.1 only. If the FQDN of this machine does not resolve to 127.0.0.1 (a
    machine whose FQDN maps to its LAN address), dialling it could not reach the core, so we fall back to
    ``localhost``, which the server certificate also carries.
    """
    fqdn = socket.getfqdn()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(fqdn, None, family=socket.AF_INET)}
    except socket.gaierror:
        return "localhost"
    return fqdn if "127.0.0.1" in addresses else "localhost"


@dataclass
class Console:
    url: str
    swm_dir: Path
    native: Client

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        files = [str(self.swm_dir / name) for name in ("key.pem", "cert.pem", "ca-chain-cert.pem")]
        result = subprocess.run(
            [sys.executable, "-c", RUN_CONSOLE, self.url, *files, *args],
            capture_output=True,
            text=True,
            timeout=CONSOLE_TIMEOUT_S,
        )
        output = result.stdout + result.stderr
        assert "Wrong output" not in output, output
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode == 0, output
        return result


@pytest.fixture(scope="module")
def console(shared_core: CoreProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    swm_dir = tmp_path_factory.mktemp("dana-home") / ".swm"
    shared_core.add_user("dana", swm_dir=swm_dir)
    port = urlsplit(shared_core.url).port
    with shared_core.client("dana") as native:
        yield Console(f"https://{console_host()}:{port}", swm_dir, native)


@pytest.fixture(scope="module")
def catalog(shared_core: CoreProcess) -> Catalog:
    return seed_catalog(shared_core)


def run_command(native: Client, command: list[str], name: str) -> str:
    return native.submit(JobSpec(name=name, command=command)).id


def finished(native: Client, job_id: str) -> str:
    job = native.wait(job_id, timeout=JOB_TIMEOUT_S)
    assert job.state.terminal, f"job {job_id} did not end in {JOB_TIMEOUT_S}s"
    return job_id


@pytest.fixture(scope="module")
def finished_job(console: Console) -> str:
    return finished(console.native, run_command(console.native, ["echo", "done"], "console-done"))


def table_rows(output: str) -> list[list[str]]:
    """The cells of a ``tabulate`` presto table."""
    return [[cell.strip() for cell in line.split("|")] for line in output.splitlines() if "|" in line]


# ---------------------------------------------------------------------------------------------------
# Jobs


def test_job_submit_prints_the_new_job_id(console: Console, tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\n#SWM name from-console\necho hi\n")
    out = console.run("--job-submit", str(script)).stdout
    lines = out.splitlines()
    assert len(lines) == 1 and UUID_TEXT.fullmatch(lines[0]), out
    assert console.native.job(lines[0]).name == "from-console"


def test_job_list_shows_the_users_jobs(console: Console, finished_job: str) -> None:
    out = console.run("--job-list").stdout
    rows = table_rows(out)
    assert rows[0][:1] == ["ID"] and "State" in rows[0]
    (row,) = [r for r in rows if r[0] == finished_job]
    assert row[rows[0].index("State")] == "F"


def test_job_info_shows_one_job(console: Console, finished_job: str) -> None:
    out = console.run("--job-info", finished_job).stdout
    cells = {row[0]: row[1] for row in table_rows(out)}
    assert cells["ID"] == finished_job
    assert cells["State"] == "F"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|\+00:00)", cells["End"])
    assert cells["Node IPs"]


def test_job_info_of_an_unknown_job_says_so(console: Console) -> None:
    assert console.run("--job-info", "00000000-0000-4000-8000-000000000000").stdout.strip() == "No job found"


def test_job_cancel_prints_the_canceled_job(console: Console) -> None:
    job_id = run_command(console.native, ["sleep", "60"], "console-long")

    def started() -> JobState | None:
        state = console.native.job(job_id).state
        return state if state is JobState.RUNNING or state.terminal else None

    assert wait_for(started, JOB_TIMEOUT_S, "the job to start") is JobState.RUNNING
    out = console.run("--job-cancel", job_id).stdout
    assert out.splitlines() == [f"Canceled: {job_id}", "Not found:"]
    assert console.native.wait(job_id, timeout=JOB_TIMEOUT_S).state is JobState.CANCELED


def test_job_cancel_of_an_unknown_job_lists_it_as_not_found(console: Console) -> None:
    unknown = "00000000-0000-4000-8000-000000000001"
    assert console.run("--job-cancel", unknown).stdout.splitlines() == ["Canceled:", f"Not found: {unknown}"]


def test_job_requeue_prints_the_requeued_job(console: Console) -> None:
    job_id = finished(console.native, run_command(console.native, ["true"], "console-requeue"))
    out = console.run("--job-requeue", job_id).stdout
    assert out.splitlines() == [f"Requeued: {job_id}", "Not found:"]
    job = console.native.wait(job_id, timeout=JOB_TIMEOUT_S)
    assert (job.attempt, job.state) == (2, JobState.COMPLETED)


# ---------------------------------------------------------------------------------------------------
# Nodes, flavors, images, remotes


def test_node_list_shows_the_nodes(console: Console) -> None:
    rows = table_rows(console.run("--node-list").stdout)
    assert rows[0] == ["ID", "Name", "Power", "Alloc", "Storage", "Mem", "CPUs", "GPUs"]
    nodes = console.native.nodes()
    assert {r[1] for r in rows[1:]} == {n.name for n in nodes}
    for row in rows[1:]:
        assert row[2] in {"up", "down"} and row[6].isdigit()


def test_flavor_list_shows_the_flavors(console: Console, catalog: Catalog) -> None:
    rows = table_rows(console.run("--flavor-list").stdout)
    assert rows[0] == ["ID", "Name", "Storage", "Mem", "CPUs", "Price"]
    (row,) = [r for r in rows if r[1] == catalog.flavor_name]
    assert (row[4], row[5]) == ("4", "0.25")


def test_image_list_shows_the_images(console: Console, catalog: Catalog) -> None:
    rows = table_rows(console.run("--image-list").stdout)
    assert rows[0] == ["Name", "Kind", "Comment"]
    kinds = {r[0]: r[1] for r in rows[1:]}
    assert kinds[catalog.cloud_image_name] == "cloud"
    assert kinds[catalog.container_image_name] == "container"


def test_remote_list_shows_the_remotes(console: Console, catalog: Catalog) -> None:
    rows = table_rows(console.run("--remote-list").stdout)
    assert rows[0] == ["ID", "Name", "Kind", "Default image ID", "Default flavor ID"]
    names = {r[1]: r for r in rows[1:]}
    assert names["local"][2] == "local"
    assert names[catalog.remote_name][0] == catalog.remote_id
