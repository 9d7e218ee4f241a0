"""``skyport simulate`` run as a person or a script runs it: the real command, as a subprocess.

No core is needed: the simulator replays workloads through the scheduler's ``plan()`` on this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SKYPORT = Path(sys.executable).parent / "skyport"
SAMPLE = Path(__file__).parent.parent / "data" / "sample.swf"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METRICS = {
    "utilization",
    "mean_wait_s",
    "p95_wait_s",
    "mean_bounded_slowdown",
    "accounts",
    "max_fairshare_deviation",
    "cost",
    "makespan_s",
    "completed",
    "killed",
    "rejected",
    "unstarted",
}


def simulate(*args: str | Path, code: int = 0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYPORT_")}
    env.update(COLUMNS="120", NO_COLOR="1")
    result = subprocess.run(
        [str(SKYPORT), "simulate", *map(str, args)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == code, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def test_json_has_every_algorithms_metrics() -> None:
    data = json.loads(simulate("--jobs", "200", "--nodes", "16", "--json").stdout)
    assert data["workload"]["jobs"] == 200 and data["workload"]["nodes"] == 16
    assert set(data["results"]) == {"fcfs", "backfill", "fairshare"}
    for algorithm, metrics in data["results"].items():
        assert metrics["algorithm"] == algorithm and set(metrics) >= METRICS
        assert metrics["completed"] + metrics["killed"] == 200
        assert 0 < metrics["utilization"] <= 1
        assert set(metrics["accounts"]) == {"biology", "chemistry", "physics", "students"}


def test_table_side_by_side_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    result = simulate("--jobs", "100", "--nodes", "8", "--seed", "3", "--plot", out)
    header = next(line for line in result.stdout.splitlines() if "metric" in line)
    assert header.index("fcfs") < header.index("backfill") < header.index("fairshare")
    for row in ("utilization", "mean wait", "p95 wait", "bounded slowdown", "fair-share", "makespan"):
        assert row in result.stdout
    assert f"plot written to {out}" in result.stdout.replace("\n", "")
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_swf_trace_with_one_algorithm() -> None:
    data = json.loads(simulate("--workload", SAMPLE, "--algorithm", "backfill", "--json").stdout)
    assert (data["workload"]["nodes"], data["workload"]["cpus_per_node"], data["workload"]["jobs"]) == (
        8,
        8,
        30,
    )
    assert list(data["results"]) == ["backfill"]
    backfill = data["results"]["backfill"]
    assert (backfill["completed"], backfill["killed"], backfill["rejected"]) == (28, 1, 1)


def test_errors_say_what_to_do(tmp_path: Path) -> None:
    missing = simulate("--workload", tmp_path / "missing.swf", code=1)
    assert "error:" in missing.stderr and "missing.swf is not a file" in missing.stderr
    bad = tmp_path / "bad.swf"
    bad.write_text("; MaxNodes: 4\n1 2 3\n")
    broken = simulate("--workload", bad, code=1)
    assert "line 2: expected 18 fields, found 3" in broken.stderr
    assert "lottery" in simulate("--algorithm", "lottery", code=2).stderr  # a usage error


def test_help_has_examples() -> None:
    result = simulate("--help")
    assert "Example:" in result.stdout and "skyport simulate --workload trace.swf" in result.stdout
