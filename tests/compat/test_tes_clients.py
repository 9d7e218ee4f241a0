"""Real GA4GH TES clients from PyPI against a real core: py-tes 1.1 (in this venv), py-tes 0.4 (the line
Snakemake's TES plugin pins) and a Snakemake workflow with ``snakemake-executor-plugin-tes``.

The two py-tes lines cannot share a venv, so py-tes 0.4 and Snakemake live in ``.venv-snakemake`` (made
by scripts/setup.sh) and run as subprocesses. TES clients speak HTTPS with a token and verify the core
with its CA certificate (``REQUESTS_CA_BUNDLE``).

The workflow's tasks run in the host environment with the Snakemake venv first on PATH. They run as root
(``local.user_map``): that venv's interpreter lives under /root, which the usual job account (nobody)
cannot enter. Snakemake needs a storage provider when its executor has no shared file system; the ``fs``
plugin (rsync) on a directory both sides see stands in for the S3 bucket a cloud set-up would use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.core import CoreProcess, wait_for

ROOT = Path(__file__).resolve().parents[2]
SNAKE_VENV = ROOT / ".venv-snakemake"
WORKFLOW = ROOT / "tests" / "data" / "tes_workflow"

tes = pytest.importorskip("tes")


@pytest.fixture(scope="module")
def area() -> Iterator[Path]:
    """Working directories and data outside /tmp (a task's /tmp is its own: see tes/runner.py)."""
    path = Path(tempfile.mkdtemp(prefix="skyport-tes-compat-", dir="/var/tmp"))
    path.chmod(0o755)
    (path / "work").mkdir(mode=0o711)
    (path / "files").mkdir(mode=0o777)
    (path / "files").chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory, area: Path) -> Iterator[CoreProcess]:
    process = CoreProcess(
        tmp_path_factory.mktemp("tes-compat") / "home",
        env={
            "SKYPORT_LOCAL__IMAGES": "host",
            "SKYPORT_LOCAL__HOST_PATH": json.dumps([str(SNAKE_VENV / "bin")]),
            "SKYPORT_LOCAL__WORKROOT": str(area / "work"),
            "SKYPORT_LOCAL__ALLOW_ROOT": "true",
            "SKYPORT_LOCAL__USER_MAP": json.dumps({"snake": "root"}),
            "SKYPORT_STAGING__FILE_ROOTS": json.dumps([str(area / "files")]),
        },
    )
    process.start()
    process.add_user("alice")
    process.add_user("snake")
    try:
        yield process
    finally:
        process.cleanup()


@pytest.fixture(scope="module")
def secret(core: CoreProcess) -> str:
    with core.client("alice") as c:
        token: str = c.create_token("py-tes")["secret"]
    return token


@pytest.fixture
def ca_bundle(core: CoreProcess, monkeypatch: pytest.MonkeyPatch) -> str:
    ca = str(core.users["admin"].config.ca)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca)
    return ca


def test_py_tes_1_1_runs_lists_and_cancels_tasks(
    core: CoreProcess, secret: str, ca_bundle: str, area: Path
) -> None:
    client = tes.HTTPClient(core.url, token=secret, timeout=30)
    info = client.get_service_info()
    assert info.type["artifact"] == "tes"  # py-tes keeps service-info's type as a dict
    out = area / "files" / "pytes-out.txt"
    task = tes.Task(
        name="py-tes-1.1",
        inputs=[tes.Input(path="/data/in.txt", content="from py-tes\n")],
        outputs=[tes.Output(path="/data/out.txt", url=f"file://{out}")],
        executors=[
            tes.Executor(image="alpine", command=["cp", "/data/in.txt", "/data/out.txt"]),
            tes.Executor(image="alpine", command=["echo", "done"]),
        ],
        tags={"client": "py-tes-1.1"},
    )
    task_id = client.create_task(task)
    done = client.wait(task_id, timeout=60)
    assert done.state == "COMPLETE"
    assert out.read_text() == "from py-tes\n"
    full = client.get_task(task_id, view="FULL")
    assert [log.exit_code for log in full.logs[0].logs] == [0, 0]
    assert full.logs[0].logs[1].stdout == "done\n"
    assert full.inputs[0].content == "from py-tes\n"
    first = client.list_tasks(view="BASIC", page_size=1)  # py-tes pages; it has no filters
    assert [t.id for t in first.tasks] == [task_id] and first.tasks[0].name == "py-tes-1.1"

    sleeper = client.create_task(tes.Task(executors=[tes.Executor(image="alpine", command=["sleep", "60"])]))
    wait_for(lambda: client.get_task(sleeper).state == "RUNNING", 60, "the task to run")
    client.cancel_task(sleeper)
    # py-tes's wait() returns at CANCELING already; the task is CANCELED once its processes are gone.
    wait_for(lambda: client.get_task(sleeper).state == "CANCELED", 60, "the task to be canceled")


def test_py_tes_1_1_with_basic_auth(core: CoreProcess, secret: str, ca_bundle: str) -> None:
    client = tes.HTTPClient(core.url, user="alice", password=secret, timeout=30)
    task_id = client.create_task(tes.Task(executors=[tes.Executor(image="alpine", command=["false"])]))
    assert client.wait(task_id, timeout=60).state == "EXECUTOR_ERROR"
    wrong = tes.HTTPClient(core.url, user="alice", password="skp_wrong", timeout=30)
    with pytest.raises(Exception, match="401"):
        wrong.list_tasks()


def snake_python(code: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SNAKE_VENV / "bin" / "python"), "-c", textwrap.dedent(code)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def snake_env(core: CoreProcess) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPORT_", "VIRTUAL_ENV", "PYTHON"))}
    env["REQUESTS_CA_BUNDLE"] = str(core.users["admin"].config.ca)
    env["PATH"] = f"{SNAKE_VENV / 'bin'}:{env['PATH']}"
    return env


needs_snake_venv = pytest.mark.skipif(
    not (SNAKE_VENV / "bin" / "snakemake").exists(), reason="run scripts/setup.sh to make .venv-snakemake"
)


@needs_snake_venv
def test_py_tes_0_4_the_line_snakemake_pins(core: CoreProcess, secret: str) -> None:
    """py-tes 0.4 speaks the older paths (``/v1/tasks/service-info``) under the URL it is given."""
    code = f"""
        import json, tes
        assert tes.__version__.startswith("0.4"), tes.__version__
        c = tes.HTTPClient({core.url + "/ga4gh/tes"!r}, token={secret!r}, timeout=30)
        info = c.get_service_info()
        t = tes.Task(name="py-tes-0.4", executors=[tes.Executor(image="alpine", command=["echo", "old"])])
        task_id = c.create_task(t)
        done = c.wait(task_id, timeout=60)
        full = c.get_task(task_id, view="FULL")
        page = c.list_tasks(view="BASIC", page_size=5)
        print(json.dumps({{"state": done.state,
                          "stdout": full.logs[0].logs[0].stdout, "listed": [x.id for x in page.tasks]}}))
        """
    result = snake_python(code, snake_env(core))
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["state"] == "COMPLETE" and seen["stdout"] == "old\n"
    assert seen["listed"]


@needs_snake_venv
@pytest.mark.slow
def test_a_snakemake_workflow_runs_to_completion_through_tes(core: CoreProcess, area: Path) -> None:
    """Two rules, each a TES task on the local gate; the second reads what the first wrote."""
    with core.client("snake") as c:
        token = c.create_token("snakemake")["secret"]
    workflow = area / "workflow"
    shutil.copytree(WORKFLOW, workflow)
    storage = area / "storage"
    storage.mkdir()
    # The plugin waits 40 s before its first status check; the whole run takes about a minute.
    result = subprocess.run(
        [
            str(SNAKE_VENV / "bin" / "snakemake"),
            "--executor", "tes",
            "--tes-url", core.url + "/ga4gh/tes",
            "--tes-token", token,
            "--jobs", "2",
            "--seconds-between-status-checks", "1",
            "--default-storage-provider", "fs",
            "--default-storage-prefix", str(storage),
        ],
        cwd=workflow,
        env=snake_env(core),
        capture_output=True,
        text=True,
        timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    assert (storage / "results" / "shout.txt").read_text() == "HELLO FROM SKY PORT\n"
    with core.client("snake") as c:
        jobs = c.jobs(limit=10).items
    # Each rule was one Sky Port job, run in the host environment.
    assert sorted(j.name.split(".")[1] for j in jobs) == ["greet", "shout"]
    assert all(j.state.value == "completed" for j in jobs)
