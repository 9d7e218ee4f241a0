"""The job launcher: a real launcher process, real jobs, a real disconnect of the core and a real
``kill -9`` of the launcher. Every wait is on a condition with a deadline, never a sleep."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from skyport.gates.base import Exit, JobLaunch
from skyport.gates.launcher import (
    IDLE_GRACE_S,
    SOCKET_NAME,
    Launcher,
    LaunchRecord,
    read_record,
    record_path,
)
from skyport.gates.local import LocalGate
from skyport.gates.process import LaunchError, LaunchRequest, ProcessHandle
from skyport.models import JobSpec
from skyport.server.settings import LocalGateSettings

TIMEOUT = 20.0
ALLOW_ROOT = os.geteuid() == 0  # the tests run jobs as whoever runs them


def request(base: Path, name: str, argv: list[str], **overrides: Any) -> LaunchRequest:
    fields: dict[str, Any] = {
        "job_id": name,
        "attempt": 1,
        "workdir": base / f"{name}.work",
        "control_dir": base / ".control" / f"{name}.1",
        "argv": argv,
        "script": None,
        "env": {},
        "stdout_path": Path("stdout.log"),
        "stderr_path": Path("stderr.log"),
    }
    fields.update(overrides)
    return LaunchRequest(**fields)


class Ended:
    """Collects what a watch reports."""

    def __init__(self) -> None:
        self.statuses: list[int | None] = []
        self.event = asyncio.Event()

    def __call__(self, status: int | None) -> None:
        self.statuses.append(status)
        self.event.set()

    async def wait(self) -> int | None:
        await asyncio.wait_for(self.event.wait(), TIMEOUT)
        return self.statuses[0]


async def ended_with(launcher: Launcher, handle: ProcessHandle) -> int | None:
    """Watch ``handle`` and wait for the status the launcher reports."""
    ended = Ended()
    launcher.watch(handle, ended)
    return await ended.wait()


async def until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def launcher_pids(workroot: Path) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"skyport.gates.launcher" in argv and os.fsencode(workroot) in argv:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state != b"Z"


@pytest.fixture
async def workroot(tmp_path: Path) -> AsyncIterator[Path]:
    root = tmp_path / "work"
    root.mkdir()
    yield root
    for pid in launcher_pids(root):  # whatever a failed test left
        os.kill(pid, signal.SIGKILL)


async def test_a_job_runs_directly_under_the_launcher_and_its_status_is_reported_and_written(
    workroot: Path,
) -> None:
    launcher = Launcher(workroot, allow_root=ALLOW_ROOT)
    try:
        handle = await launcher.launch(request(workroot, "a", ["sh", "-c", "echo out; exit 3"]))
        assert not isinstance(handle, int)
        assert await ended_with(launcher, handle) == 3
        assert text_of(record_path(handle.control_dir)) == f"{handle.pid} {handle.start_ticks}\n3\n"
        # a command needs no control directory: its record is the one file the launcher made
        assert sorted(p.name for p in (workroot / ".control").iterdir()) == ["a.1.state"]
        assert (workroot / "a.work" / "stdout.log").read_text() == "out\n"
        # the job was the launcher's own child (no wrapper shell in between)
        assert handle.pgid == handle.pid
        [launcher_pid] = launcher_pids(workroot)
        assert launcher_pid != os.getpid()
    finally:
        launcher.close()


async def test_jobs_outlive_the_core_and_the_next_core_finds_them_running_or_ended(workroot: Path) -> None:
    first = Launcher(workroot, allow_root=ALLOW_ROOT)
    go = workroot / "go"
    long = await first.launch(request(workroot, "long", ["sleep", "600"]))
    short = await first.launch(
        request(workroot, "short", ["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.05; done; exit 7"])
    )
    assert not isinstance(long, int) and not isinstance(short, int)
    first.close()  # the core goes away (its connection closes, as with kill -9)

    # the short job ends while no core is connected: only its status file records it
    go.touch()

    def short_ended() -> bool:
        record = read_record(short.control_dir)
        return record is not None and record.status is not None

    await until(short_ended, "the launch record of the short job to hold its status")

    second = Launcher(workroot, allow_root=ALLOW_ROOT)
    try:
        assert await second.query(Path(short.control_dir)) is None
        assert read_record(short.control_dir) == LaunchRecord(short, 7)
        found = await second.query(Path(long.control_dir))
        assert found == long  # same pid and start time: the very process
        ended = Ended()
        second.watch(found, ended)
        await second.terminate(found, grace_s=5.0)
        assert await ended.wait() == 128 + signal.SIGTERM
        assert len(launcher_pids(workroot)) == 1  # the same launcher served both
    finally:
        second.close()


async def test_a_job_that_ignores_term_is_killed_after_the_grace_even_with_the_core_gone(
    workroot: Path,
) -> None:
    launcher = Launcher(workroot, allow_root=ALLOW_ROOT)
    stubborn = await launcher.launch(
        request(workroot, "stubborn", ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"])
    )
    assert not isinstance(stubborn, int)
    out = workroot / "stubborn.work" / "stdout.log"
    await until(lambda: out.exists() and out.read_text() == "ready\n", "the job to ignore TERM")
    await launcher.terminate(stubborn, grace_s=0.5)
    launcher.close()  # the KILL is the launcher's to send, not the core's

    def ended() -> bool:
        record = read_record(stubborn.control_dir)
        return record is not None and record.status is not None

    await until(ended, "the KILL after the grace period")
    assert read_record(stubborn.control_dir) == LaunchRecord(stubborn, 128 + signal.SIGKILL)


async def test_a_program_that_does_not_exist_ends_with_127_and_says_so_on_the_jobs_stderr(
    workroot: Path,
) -> None:
    launcher = Launcher(workroot, allow_root=ALLOW_ROOT)
    try:
        result = await launcher.launch(request(workroot, "missing", ["no-such-program-here"]))
        assert result == 127
        stderr = (workroot / "missing.work" / "stderr.log").read_text()
        assert "no-such-program-here" in stderr and "No such file" in stderr
        # nothing ran, so nothing is claimed: the same attempt may be launched again
        assert read_record(str(workroot / ".control" / "missing.1")) is None
    finally:
        launcher.close()


async def test_a_second_launch_into_the_same_control_directory_is_refused(workroot: Path) -> None:
    launcher = Launcher(workroot, allow_root=ALLOW_ROOT)
    try:
        req = request(workroot, "once", ["true"])
        first = await launcher.launch(req)
        assert not isinstance(first, int)
        with pytest.raises(LaunchError, match="already holds a launch"):
            await launcher.launch(req)
    finally:
        launcher.close()


async def test_the_launcher_leaves_once_no_core_is_connected_and_no_job_runs(workroot: Path) -> None:
    launcher = Launcher(workroot, allow_root=ALLOW_ROOT)
    handle = await launcher.launch(request(workroot, "quick", ["true"]))
    assert not isinstance(handle, int)
    [pid] = launcher_pids(workroot)
    launcher.close()
    await until(lambda: not alive(pid), "the idle launcher to leave", timeout=IDLE_GRACE_S + TIMEOUT)
    assert not (workroot / SOCKET_NAME).exists()
    # and the next core starts a new one
    again = Launcher(workroot, allow_root=ALLOW_ROOT)
    try:
        assert isinstance(await again.launch(request(workroot, "next", ["false"])), type(handle))
    finally:
        again.close()


def text_of(path: str) -> str:
    return Path(path).read_text()


def write(path: str, text: str) -> None:
    Path(path).write_text(text)


def started_elsewhere(control_dir: str) -> subprocess.Popen[bytes]:
    """A job process with the launch record a (now dead) launcher would have left for it."""
    orphan = subprocess.Popen(["sleep", "600"], start_new_session=True)
    ticks = int(Path(f"/proc/{orphan.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[19])
    write(record_path(control_dir), f"{orphan.pid} {ticks}\n")
    return orphan


def _job(workroot: Path, name: str, command: list[str]) -> JobLaunch:
    return JobLaunch(
        job_id=name,
        attempt=1,
        name=name,
        owner="admin",
        spec=JobSpec(command=command),
        node_names=["local"],
        inputs_dir=workroot / "inputs",
        outputs_dir=workroot / "outputs",
        attempt_dir=workroot / "attempt",
    )


async def test_when_the_launcher_is_killed_its_jobs_are_stopped_and_reported_lost(workroot: Path) -> None:
    gate = LocalGate(LocalGateSettings(allow_root=True, user_map={"admin": "root"}), workroot, launcher=True)
    try:
        job = _job(workroot, "orphaned", ["sleep", "600"])
        handle = await gate.launch(job)
        ended: list[Exit] = []
        event = asyncio.Event()

        def on_exit(job_id: str, exit: Exit) -> None:
            ended.append(exit)
            event.set()

        gate.watch(job.job_id, handle, on_exit)
        [pid] = launcher_pids(workroot)
        os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(event.wait(), TIMEOUT)
        assert ended[0].reason == "lost" and "launcher" in ended[0].message
        job_pid = handle["process"]["pid"]
        await until(lambda: not alive(job_pid), "the orphaned job to be killed")
    finally:
        gate.close()


async def test_a_claim_that_no_launcher_runs_is_lost_after_a_restart_never_launched_again(
    workroot: Path,
) -> None:
    gate = LocalGate(LocalGateSettings(allow_root=True, user_map={"admin": "root"}), workroot, launcher=True)
    try:
        job = _job(workroot, "claimed", ["true"])
        control = workroot / ".control" / "claimed.1"
        control.parent.mkdir(parents=True)
        write(record_path(str(control)), "")  # a launcher died between its claim and the start
        recovered = await gate.recover(job, None)
        assert recovered.handle is None and recovered.exit is not None and recovered.exit.reason == "lost"

        fresh = _job(workroot, "fresh", ["true"])  # never claimed: launched now
        recovered = await gate.recover(fresh, None)
        assert recovered.handle is None and recovered.exit is None

        # started by a launcher that died since: lost, and what still runs of it is killed
        orphan = started_elsewhere(str(workroot / ".control" / "started.1"))
        recovered = await gate.recover(_job(workroot, "started", ["true"]), None)
        assert recovered.exit is not None and recovered.exit.reason == "lost"
        assert await asyncio.to_thread(orphan.wait, TIMEOUT) == -signal.SIGKILL
    finally:
        gate.close()


async def test_a_work_root_too_deep_for_a_socket_address_still_gets_its_launcher(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "work"
    deep.mkdir(parents=True)
    assert len(str(deep / SOCKET_NAME)) > 108  # more than a Unix socket address holds
    launcher = Launcher(deep, allow_root=ALLOW_ROOT)
    try:
        handle = await launcher.launch(request(deep, "deep", ["sh", "-c", "exit 4"]))
        assert not isinstance(handle, int)
        assert await ended_with(launcher, handle) == 4
    finally:
        launcher.close()
        for pid in launcher_pids(deep):
            os.kill(pid, signal.SIGKILL)


async def test_a_request_the_launcher_cannot_serve_is_refused_and_it_goes_on_serving(workroot: Path) -> None:
    first = Launcher(workroot, allow_root=ALLOW_ROOT)
    keeper = await first.launch(request(workroot, "keeper", ["sleep", "600"]))  # keeps the launcher up
    assert not isinstance(keeper, int)
    first.close()
    reader, writer = await asyncio.open_unix_connection(str(workroot / SOCKET_NAME))
    writer.write(b'{"op": "hello"}\n{"op": "launch", "request": {"control_dir": "/nowhere/x.1"}}\n')
    assert b'"hello"' in await asyncio.wait_for(reader.readline(), TIMEOUT)
    refused = await asyncio.wait_for(reader.readline(), TIMEOUT)
    assert b'"refused"' in refused and b"the launcher failed" in refused
    writer.close()
    second = Launcher(workroot, allow_root=ALLOW_ROOT)
    try:
        ok = await second.launch(request(workroot, "after", ["sh", "-c", "exit 5"]))
        assert not isinstance(ok, int)
        assert await ended_with(second, ok) == 5
        found = await second.query(Path(keeper.control_dir))
        assert found == keeper
        await second.terminate(found, grace_s=0)
    finally:
        second.close()


async def test_two_cores_sharing_a_work_root_are_served_side_by_side(workroot: Path) -> None:
    first, second = Launcher(workroot, allow_root=ALLOW_ROOT), Launcher(workroot, allow_root=ALLOW_ROOT)
    try:
        a = await first.launch(request(workroot, "one", ["sh", "-c", "exit 6"]))
        # while the first is connected (a launcher serving one core at a time never answered this)
        b = await asyncio.wait_for(second.launch(request(workroot, "two", ["sh", "-c", "exit 9"])), TIMEOUT)
        assert not isinstance(a, int) and not isinstance(b, int)
        ended_a, ended_b = Ended(), Ended()
        first.watch(a, ended_a)
        second.watch(b, ended_b)
        assert (await ended_a.wait(), await ended_b.wait()) == (6, 9)  # each hears of its own job
        assert len(launcher_pids(workroot)) == 1
    finally:
        first.close()
        second.close()
