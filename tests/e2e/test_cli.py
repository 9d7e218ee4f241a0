"""The ``skyport`` job and cluster commands, run as a user runs them: the real command against a real core.

Every test starts ``.venv/bin/skyport`` as a subprocess with ``SKYPORT_HOME``/``SKYPORT_URL`` pointing at a
core of its own (over real mutual TLS) and checks what a person or a script sees: stdout, stderr, exit code.
Jobs run as the Unix user ``nobody``. Waiting is done with ``skyport wait`` or by polling with a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.core import CoreProcess, wait_for

SKYPORT = Path(sys.executable).parent / "skyport"
DEADLINE_S = 60.0


@dataclass
class Cli:
    """Runs ``skyport`` against one core, as one user."""

    core: CoreProcess
    user: str | None = None
    columns: int = 100

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKYPORT_")}
        env.update(SKYPORT_HOME=str(self.core.home), SKYPORT_URL=self.core.url, COLUMNS=str(self.columns))
        env["NO_COLOR"] = "1"
        if self.user:
            env["SKYPORT_USER"] = self.user
        return env

    def run(
        self,
        *args: str | Path,
        code: int | None = 0,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(SKYPORT), *map(str, args)],
            env=env or self.env(),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=DEADLINE_S + 30,
        )
        if code is not None:
            assert result.returncode == code, (
                f"skyport {' '.join(map(str, args))} exited {result.returncode}, not {code}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def json(self, command: str, *args: str | Path) -> Any:
        return json.loads(self.run(command, "--json", *args).stdout)

    def submit(self, *args: str | Path, cwd: Path | None = None) -> str:
        """Submit; the job id is all that is printed on stdout."""
        job_id = self.run("submit", *args, cwd=cwd).stdout.strip()
        assert len(job_id) == 36 and job_id.count("-") == 4, job_id
        return job_id

    def wait_state(self, job_id: str, state: str) -> None:
        wait_for(
            lambda: self.json("show", job_id)["state"] == state,
            DEADLINE_S,
            f"job {job_id} to be {state}",
            0.2,
        )


@pytest.fixture
def cli(shared_core: CoreProcess) -> Cli:
    return Cli(shared_core)


@pytest.fixture
def gate_dir() -> Iterator[Path]:
    """A directory a job (running as nobody) can look into, where the test drops a file to let it go on."""
    path = Path(tempfile.mkdtemp(prefix="skyport-gate-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def flat(text: str) -> str:
    """Messages as one line: rich wraps them at the terminal's width."""
    return " ".join(text.split())


def blocked(gate: Path, before: str, after: str) -> list[str]:
    """A command that prints ``before``, waits until the test creates ``gate/go``, then prints ``after``."""
    script = f"echo {before}; while [ ! -e {gate}/go ]; do sleep 0.1; done; echo {after}"
    return ["--", "sh", "-c", script]


def test_submit_script_with_input_and_wait_prints_the_jobs_output(cli: Cli, tmp_path: Path) -> None:
    """A script file and an input file go to the core; --wait returns the job's stdout and its success."""
    (tmp_path / "job.sh").write_text("#!/bin/sh\n#SWM name with-input\ncat data.txt\necho done\n")
    (tmp_path / "data.txt").write_text("payload line\n")

    result = cli.run("submit", "job.sh", "--input", "data.txt", "--wait", cwd=tmp_path)

    assert result.stdout == "payload line\ndone\n"
    jobs = cli.json("jobs", "--name", "with-input")
    assert [j["state"] for j in jobs] == ["completed"]
    assert jobs[0]["spec"]["input_files"] == ["data.txt"]


def test_failed_command_wait_exits_1_and_the_job_shows_its_exit_code(cli: Cli) -> None:
    """`wait` mirrors the job's outcome in its exit code; `show --json` is the API's job, full id and all."""
    job_id = cli.submit("--", "sh", "-c", "exit 3")

    waited = cli.run("wait", job_id, code=1)
    assert "failed" in flat(waited.stderr) and "exit code 3" in flat(waited.stderr)
    assert f"skyport logs {job_id} --stderr" in flat(waited.stderr)  # what to do next

    job = cli.json("show", job_id)
    assert (job["id"], job["state"], job["exit_code"]) == (job_id, "failed", 3)
    assert job["spec"]["command"] == ["sh", "-c", "exit 3"]
    shown = cli.run("show", job_id).stdout
    assert job_id in shown and "failed" in shown  # the human view has the full id too

    events = cli.json("events", job_id)
    assert events[0]["to_state"] == "queued"
    assert {"running", "failed"} <= {e["to_state"] for e in events}
    assert "running → failed" in cli.run("events", job_id).stdout


def test_jobs_lists_submitted_jobs_with_filters_and_pagination(cli: Cli) -> None:
    first = cli.submit("--name", "listed-a", "--", "true")
    second = cli.submit("--name", "listed-b", "--", "sh", "-c", "exit 1")
    cli.run("wait", first)
    cli.run("wait", second, code=1)

    all_jobs = {j["id"]: j for j in cli.json("jobs")}
    assert {first, second} <= set(all_jobs)
    assert all_jobs[first]["name"] == "listed-a"

    failed = cli.json("jobs", "--state", "failed")
    assert second in {j["id"] for j in failed} and first not in {j["id"] for j in failed}
    assert [j["id"] for j in cli.json("jobs", "--name", "listed-a")] == [first]

    one_page = cli.run("jobs", "--limit", "1", "--json")
    assert len(json.loads(one_page.stdout)) == 1 and "--all" in flat(one_page.stderr)  # tells there are more
    every = cli.json("jobs", "--limit", "1", "--all")
    assert {first, second} <= {j["id"] for j in every} and len(every) == len(all_jobs)

    table = cli.run("jobs", "--name", "listed-b").stdout
    assert "listed-b" in table and "failed" in table and "listed-a" not in table


def test_logs_prints_stdout_stderr_and_tails(cli: Cli) -> None:
    job_id = cli.submit("--", "sh", "-c", "echo one; echo two; echo three; echo oops >&2")
    cli.run("wait", job_id)

    assert cli.run("logs", job_id).stdout == "one\ntwo\nthree\n"
    assert cli.run("logs", job_id, "--stderr").stdout == "oops\n"
    assert cli.run("logs", job_id, "--tail", "2").stdout == "two\nthree\n"
    lines = [json.loads(line) for line in cli.run("logs", job_id, "--json").stdout.splitlines()]
    assert "".join(line["text"] for line in lines) == "one\ntwo\nthree\n"


def test_logs_follow_streams_while_the_job_runs_and_returns_when_it_ends(cli: Cli, gate_dir: Path) -> None:
    job_id = cli.submit(*blocked(gate_dir, "first", "last"))
    follower = subprocess.Popen(
        [str(SKYPORT), "logs", "-f", job_id], env=cli.env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == "first\n"  # arrives while the job still runs...
        assert follower.poll() is None and cli.json("show", job_id)["state"] == "running"
        (gate_dir / "go").touch()
        rest, _ = follower.communicate(timeout=DEADLINE_S)  # ...and -f ends with the job
    finally:
        follower.kill()
        follower.wait()
    assert (rest, follower.returncode) == ("last\n", 0)
    assert cli.json("show", job_id)["state"] == "completed"


def test_cancel_stops_a_running_job(cli: Cli) -> None:
    job_id = cli.submit("--", "sleep", "300")
    cli.wait_state(job_id, "running")

    canceled = cli.run("cancel", job_id)
    assert job_id in canceled.stdout

    waited = cli.run("wait", job_id, "--timeout", str(DEADLINE_S), code=1)
    assert "canceled" in flat(waited.stderr)
    assert cli.json("show", job_id)["state"] == "canceled"


def test_wait_timeout_exits_1_while_the_job_goes_on(cli: Cli, gate_dir: Path) -> None:
    job_id = cli.submit(*blocked(gate_dir, "a", "b"))
    result = cli.run("wait", job_id, "--timeout", "0.5", code=1)
    assert "still" in flat(result.stderr) and f"skyport wait {job_id}" in flat(result.stderr)
    (gate_dir / "go").touch()
    assert cli.json("wait", job_id)["state"] == "completed"


def test_requeue_of_a_finished_job_runs_a_second_attempt(cli: Cli) -> None:
    job_id = cli.submit("--", "sh", "-c", "echo ran")
    cli.run("wait", job_id)

    requeued = cli.run("requeue", job_id)
    assert "attempt 2" in requeued.stdout

    cli.run("wait", job_id, "--timeout", str(DEADLINE_S))
    job = cli.json("show", job_id)
    assert (job["attempt"], job["state"]) == (2, "completed")
    events = cli.json("events", job_id)
    assert "requeued" in {e["reason"] for e in events}
    assert {e["attempt"] for e in events if e["to_state"] == "completed"} == {1, 2}
    assert cli.run("logs", job_id).stdout == "ran\n"


def test_command_options_set_the_job_and_bad_values_are_refused(cli: Cli, tmp_path: Path) -> None:
    job = cli.json(
        "submit", "--name", "opts", "--mem", "64M", "--walltime", "10:00", "--env", "GREETING=hi there",
        "--output", "out.txt", "--", "sh", "-c", 'echo "$GREETING" > out.txt',
    )  # fmt: skip
    spec = job["spec"]
    assert (spec["name"], spec["mem"], spec["walltime"]) == ("opts", 64 * 2**20, 600)
    assert spec["env"] == {"GREETING": "hi there"} and spec["output_files"] == ["out.txt"]
    cli.run("wait", job["id"])

    saved = cli.run("download", job["id"], tmp_path / "results")
    assert "out.txt" in saved.stdout
    assert (tmp_path / "results" / "out.txt").read_text() == "hi there\n"

    bad = cli.run("submit", "--mem", "4X", "--walltime", "99", "--", "true", code=2)
    assert "--mem: '4X' is not a size" in flat(bad.stderr) and "--walltime" in flat(bad.stderr)


def test_download_without_outputs_says_how_to_get_some(cli: Cli, tmp_path: Path) -> None:
    job_id = cli.submit("--", "true")
    cli.run("wait", job_id)
    result = cli.run("download", job_id, tmp_path, code=1)
    assert "no output files" in flat(result.stderr) and "--output" in flat(result.stderr)


def test_nodes_and_remotes_show_this_machine(cli: Cli, shared_core: CoreProcess) -> None:
    with shared_core.client() as client:
        api_nodes = [n.model_dump(mode="json") for n in client.nodes()]
    assert cli.json("nodes") == api_nodes  # exactly the API's objects
    table = cli.run("nodes").stdout
    assert api_nodes[0]["name"] in table and "CPUS" in table

    remotes = cli.json("remotes")
    assert [r["kind"] for r in remotes] == ["local"]
    assert "local" in cli.run("remotes").stdout

    assert cli.json("flavors") == [] and "no flavors" in cli.run("flavors").stdout
    assert cli.json("images") == [] and "no images" in cli.run("images").stdout


def test_a_bad_script_is_refused_with_its_line_numbers_before_submitting(cli: Cli, tmp_path: Path) -> None:
    script = tmp_path / "bad.sh"
    script.write_text("#!/bin/sh\n#SWM name never-submitted\n#SWM frobnicate 1\n#SWM cpus zero\necho hi\n")

    result = cli.run("submit", script.name, code=2, cwd=tmp_path)

    assert "bad.sh:3: unknown directive 'frobnicate'" in flat(result.stderr)  # file:line, as compilers say
    assert "bad.sh:4: cpus:" in flat(result.stderr)
    assert result.stdout == ""
    assert cli.json("jobs", "--name", "never-submitted") == []


def test_a_missing_file_is_reported_without_contacting_the_core(cli: Cli, tmp_path: Path) -> None:
    env = {**cli.env(), "SKYPORT_URL": "https://127.0.0.1:9"}  # nothing listens there
    missing = cli.run("submit", tmp_path / "nope.sh", code=2, env=env)
    assert "nope.sh does not exist" in flat(missing.stderr) and "cannot talk" not in flat(missing.stderr)

    (tmp_path / "ok.sh").write_text("#!/bin/sh\ncat in.txt\n")
    no_input = cli.run("submit", tmp_path / "ok.sh", "--input", tmp_path / "in.txt", code=2, env=env)
    assert "in.txt does not exist" in flat(no_input.stderr)

    neither = cli.run("submit", code=2, env=env)
    assert "nothing to run" in flat(neither.stderr)


def test_without_credentials_the_error_says_to_run_init(cli: Cli, tmp_path: Path) -> None:
    env = {**cli.env(), "SKYPORT_HOME": str(tmp_path)}
    del env["SKYPORT_URL"]
    result = cli.run("jobs", code=1, env=env)
    assert "skyport init" in flat(result.stderr) and "Traceback" not in flat(result.stderr)


def test_another_users_job_is_not_found(cli: Cli, shared_core: CoreProcess) -> None:
    job_id = cli.submit("--", "true")
    shared_core.add_user("bob-cli")
    bob = Cli(shared_core, user="bob-cli")
    result = bob.run("show", job_id, code=2)
    assert f"no job {job_id}" in flat(result.stderr)
    assert job_id not in {j["id"] for j in bob.json("jobs")}
    assert "not a job id" in flat(bob.run("show", "abc", code=2).stderr)


def test_tables_fit_an_80_column_terminal(shared_core: CoreProcess) -> None:
    narrow = Cli(shared_core, columns=80)
    job_id = narrow.submit("--name", "a-rather-long-job-name-" * 4, "--", "sh", "-c", "echo " + "x" * 120)
    narrow.run("wait", job_id)

    outputs = {
        command: narrow.run(*command.split(), *([job_id] if command in ("show", "events") else [])).stdout
        for command in ("jobs", "nodes", "remotes", "show", "events")
    }
    for command, text in outputs.items():
        too_long = [line for line in text.splitlines() if len(line) > 80]
        assert not too_long, f"`skyport {command}` prints lines over 80 columns: {too_long}"
    assert "…" in outputs["jobs"]  # the long name is cut, not wrapped
    assert job_id in outputs["show"].replace("\n", "")


def test_an_array_job_is_one_submission_one_line_and_its_tasks_on_demand(cli: Cli, tmp_path: Path) -> None:
    """`submit` prints the array's id; `jobs` shows it as one line; `show` and `jobs --array` detail it."""
    (tmp_path / "sweep.sh").write_text(
        "#!/bin/sh\n#SWM name sweep\n#SWM array 1-4%2\necho task $SKYPORT_ARRAY_INDEX\n"
    )
    array_id = cli.submit("sweep.sh", cwd=tmp_path)
    wait_for(
        lambda: cli.json("show", array_id)["states"] == {"completed": 4},
        DEADLINE_S,
        "the array's four tasks to complete",
        0.2,
    )

    listing = cli.run("jobs").stdout
    assert "sweep[1-4%2]" in listing and listing.count("sweep") == 1
    tasks = cli.json("jobs", "--array", array_id)
    assert sorted(t["array_index"] for t in tasks) == [1, 2, 3, 4]
    assert {cli.run("logs", t["id"]).stdout for t in tasks} == {f"task {i}\n" for i in range(1, 5)}
    assert "2" in cli.run("show", array_id).stdout  # the throttle, "at once"
