"""The process executor of the ``local`` gate: real processes, real signals, a real simulated crash.

Every wait is on a condition with a deadline (an event, a pidfd, a pipe), never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from skyport.gates.process import (
    ExitStatus,
    LaunchError,
    LaunchRequest,
    ProcessExecutor,
    ProcessHandle,
    _read_stat,
)

TIMEOUT = 20.0
IS_ROOT = os.geteuid() == 0


def _nobody() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


NOBODY = _nobody()
needs_nobody = pytest.mark.skipif(
    not IS_ROOT or NOBODY is None or shutil.which("setpriv") is None,
    reason="running as another account needs root, a 'nobody' account and setpriv",
)


# ------------------------------------------------------------------------------------------ helpers


def request(base: Path, name: str = "job", **overrides: Any) -> LaunchRequest:
    """A request whose files all live under ``base``; tests override what they exercise."""
    fields: dict[str, Any] = {
        "job_id": name,
        "attempt": 1,
        "workdir": base / f"{name}.work",
        "control_dir": base / f"{name}.control",
        "argv": ["true"],
        "script": None,
        "env": {},
        "stdout_path": Path("stdout.log"),
        "stderr_path": Path("stderr.log"),
        "stdin_path": None,
        "run_as": None,
    }
    fields.update(overrides)
    return LaunchRequest(**fields)


@dataclass
class Outcome:
    """What ``on_exit`` delivered: every call, and on which thread."""

    calls: list[tuple[ProcessHandle, ExitStatus]] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, handle: ProcessHandle, status: ExitStatus) -> None:
        self.calls.append((handle, status))
        self.threads.append(threading.get_ident())
        self.event.set()

    async def wait(self, timeout: float = TIMEOUT) -> ExitStatus:
        await asyncio.wait_for(self.event.wait(), timeout)
        return self.calls[0][1]


async def run(executor: ProcessExecutor, req: LaunchRequest) -> tuple[ProcessHandle, ExitStatus]:
    """Launch, watch, and wait for the end of one job."""
    handle = executor.launch(req)
    outcome = Outcome()
    executor.watch(handle, outcome)
    status = await outcome.wait()
    return handle, status


async def wait_readable(fd: int, timeout: float = TIMEOUT) -> None:
    """Wait until ``fd`` is readable on the running loop."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def _readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, _readable)
    try:
        await asyncio.wait_for(ready, timeout)
    finally:
        loop.remove_reader(fd)


async def wait_pid_ended(pid: int, timeout: float = TIMEOUT) -> None:
    """Wait until ``pid`` has exited (gone, or a zombie nobody reaps), via a pidfd."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await wait_readable(pidfd, timeout)
    finally:
        os.close(pidfd)


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgid, start ticks) of a process, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[2]), int(fields[19])


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state, pgid) of a process, or None if it is gone."""
    st = proc_stat(pid)
    return None if st is None else st[:2]


def is_our_child(pid: int) -> bool:
    """Whether ``pid`` is a child of the test process (peeks, never reaps)."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def adopts_a_stranger(executor: ProcessExecutor, control_dir: str) -> tuple[bool, bool]:
    """Offer adopt() a live process with the right pid, start time and group that is not our wrapper,
    and the same with a wrong group; returns both answers."""
    argv = ["sh", "-c", "echo ready; read line"]  # no exec after "ready": its command line is final
    with subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True
    ) as stranger:
        try:
            assert stranger.stdout is not None and stranger.stdout.readline() == b"ready\n"
            st = proc_stat(stranger.pid)
            assert st is not None and st[1] == stranger.pid
            same_group = executor.adopt(ProcessHandle(stranger.pid, st[1], st[2], control_dir))
            other_group = executor.adopt(ProcessHandle(stranger.pid, os.getpgid(0), st[2], control_dir))
            return same_group, other_group
        finally:
            stranger.kill()


def live_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that have not exited (zombies count as exited: on this machine
    PID 1 may never reap the orphans)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_state(int(entry))
            if st is not None and st[1] == pgid and st[0] not in ("Z", "X"):
                members.append(int(entry))
    return members


async def wait_group_ended(pgid: int, timeout: float = TIMEOUT) -> None:
    """Wait, with a deadline, until no process of group ``pgid`` is alive."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while members := live_members(pgid):
        await asyncio.gather(*(wait_pid_ended(pid, deadline - loop.time()) for pid in members))


class Fifo:
    """A named pipe the test reads lines from without blocking the loop (a job's "ready" signal)."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.buffer = b""

    async def readline(self, timeout: float = TIMEOUT) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while b"\n" not in self.buffer:
            await wait_readable(self.fd, deadline - loop.time())
            try:
                chunk = os.read(self.fd, 4096)
            except BlockingIOError:
                continue
            if not chunk:
                raise EOFError(f"{self.path} closed before a full line: {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    def close(self) -> None:
        os.close(self.fd)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
async def executor() -> AsyncIterator[ProcessExecutor]:
    # The tests run as root: allow_root lets jobs run as the test's own account.
    ex = ProcessExecutor(allow_root=True)
    yield ex
    ex.close()


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory every account can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="skyport-process-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------- exit, files, env


@pytest.mark.parametrize("code", [0, 3])
async def test_exit_code_is_reported(executor: ProcessExecutor, tmp_path: Path, code: int) -> None:
    """The job's exit code comes back with a machine-readable reason, once, on the loop thread."""
    handle = executor.launch(request(tmp_path, argv=["sh", "-c", f"exit {code}"]))
    outcome = Outcome()
    executor.watch(handle, outcome)
    status = await outcome.wait()
    assert status == ExitStatus(code, None, "exit_code", f"exited with code {code}")
    # a second job through the same loop proves that no late second call for the first one arrived
    await run(executor, request(tmp_path, "barrier"))
    assert len(outcome.calls) == 1
    assert outcome.threads == [threading.get_ident()]
    assert handle.pgid == handle.pid, "the wrapper leads its own process group"
    assert (Path(handle.control_dir) / "status").read_text() == f"{code}\n"


async def test_killed_by_signal_is_reported(executor: ProcessExecutor, tmp_path: Path) -> None:
    """A job killed by a signal is reported as that signal, not as an exit code."""
    _, status = await run(executor, request(tmp_path, argv=["sh", "-c", "kill -KILL $$"]))
    assert (status.exit_code, status.signal, status.reason) == (None, 9, "signal")
    assert status.message == "killed by signal 9 (SIGKILL)"


async def test_missing_command_is_exit_127(executor: ProcessExecutor, tmp_path: Path) -> None:
    """A command that does not exist ends with 127 and says so (the wrapper runs it, not Python)."""
    _, status = await run(executor, request(tmp_path, argv=["skyport-no-such-command"]))
    assert status.exit_code == 127 and "not found" in status.message
    assert "skyport-no-such-command" in (tmp_path / "job.work" / "stderr.log").read_text()


async def test_stdout_and_stderr_are_appended_to_files(executor: ProcessExecutor, tmp_path: Path) -> None:
    """stdout and stderr go to their files, appended to what is there."""
    workdir = tmp_path / "job.work"
    workdir.mkdir()
    (workdir / "stdout.log").write_text("before\n")
    req = request(tmp_path, argv=["sh", "-c", "echo to-out; echo to-err >&2"])
    _, status = await run(executor, req)
    assert status.exit_code == 0
    assert (workdir / "stdout.log").read_text() == "before\nto-out\n"
    assert (workdir / "stderr.log").read_text() == "to-err\n"


async def test_environment_is_clean(
    executor: ProcessExecutor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job sees only its given variables plus the account's HOME/USER/LOGNAME/PATH/SHELL and PWD."""
    monkeypatch.setenv("SKYPORT_TEST_MUST_NOT_LEAK", "1")
    given = {"SKYPORT_JOB_ID": "j1", "SWM_JOB_ID": "j1", "ODD": "a b 'c' \"d\" $(id) `id`", "PATH": "/bin"}
    req = request(tmp_path, argv=["env", "-0"], env=given)
    _, status = await run(executor, req)
    assert status.exit_code == 0
    raw = (tmp_path / "job.work" / "stdout.log").read_bytes()
    seen = dict(item.split("=", 1) for item in raw.decode().split("\0") if item)
    me = pwd.getpwuid(os.geteuid())
    assert seen == {
        **given,
        "HOME": me.pw_dir,
        "USER": me.pw_name,
        "LOGNAME": me.pw_name,
        "SHELL": me.pw_shell,
        "PWD": str(tmp_path / "job.work"),
    }


async def test_workdir_is_created_and_is_the_cwd(executor: ProcessExecutor, tmp_path: Path) -> None:
    """A missing workdir is created private (0700) and the job runs in it."""
    req = request(tmp_path, argv=["/bin/pwd", "-P"], workdir=tmp_path / "deep" / "work")
    _, status = await run(executor, req)
    assert status.exit_code == 0
    workdir = tmp_path / "deep" / "work"
    assert (workdir / "stdout.log").read_text().strip() == str(workdir.resolve())
    assert stat.S_IMODE(workdir.stat().st_mode) == 0o700


async def test_stdin_comes_from_the_file_or_dev_null(executor: ProcessExecutor, tmp_path: Path) -> None:
    """stdin is the given file; without one it is /dev/null (never the core's stdin)."""
    source = tmp_path / "input.txt"
    source.write_text("line one\nline two\n")
    _, status = await run(executor, request(tmp_path, "cat", argv=["cat"], stdin_path=source))
    assert status.exit_code == 0
    assert (tmp_path / "cat.work" / "stdout.log").read_text() == "line one\nline two\n"
    _, status = await run(executor, request(tmp_path, "null", argv=["readlink", "/proc/self/fd/0"]))
    assert (tmp_path / "null.work" / "stdout.log").read_text().strip() == "/dev/null"


async def test_argv_is_passed_literally(executor: ProcessExecutor, tmp_path: Path) -> None:
    """No shell ever interprets the job's arguments: quotes, $(...), globs and newlines arrive as given."""
    args = ["a b", "'single'", '"double"', "$(touch pwned)", "`touch pwned2`", "$HOME", "*", ";", "x\ny", ""]
    _, status = await run(executor, request(tmp_path, argv=["printf", "[%s]\\n", *args]))
    assert status.exit_code == 0
    out = (tmp_path / "job.work" / "stdout.log").read_text()
    assert out == "".join(f"[{arg}]\n" for arg in args)
    assert not [p for p in os.listdir(tmp_path / "job.work") if p.startswith("pwned")]


async def test_script_runs_by_its_shebang_or_sh(executor: ProcessExecutor, tmp_path: Path) -> None:
    """A script runs with the interpreter of its #! line, and with /bin/sh when it has none."""
    bash = shutil.which("bash")
    assert bash is not None
    _, status = await run(
        executor,
        request(tmp_path, "b", argv=None, script=f"#!{bash}\necho ${{BASH_VERSION:+bash}}\nexit 4\n"),
    )
    assert status.exit_code == 4
    assert (tmp_path / "b.work" / "stdout.log").read_text() == "bash\n"
    _, status = await run(executor, request(tmp_path, "s", argv=None, script="echo ${BASH_VERSION:-plain}\n"))
    assert status.exit_code == 0
    assert (tmp_path / "s.work" / "stdout.log").read_text() == "plain\n"


async def test_job_killing_its_own_group_does_not_lose_its_status(
    executor: ProcessExecutor, tmp_path: Path
) -> None:
    """``kill 0`` from the job (a common clean-up idiom) must not kill the wrapper before it records."""
    handle, status = await run(executor, request(tmp_path, argv=["sh", "-c", "kill 0; sleep 5"]))
    assert status.signal == signal.SIGTERM
    assert (Path(handle.control_dir) / "status").read_text() == "143\n", "the wrapper wrote the status"


async def test_job_gets_only_its_three_fds(executor: ProcessExecutor, tmp_path: Path) -> None:
    """Nothing of the core or the wrapper leaks into the job: it holds fds 0, 1 and 2 only, and its
    stderr has no shell chatter when it dies of a signal."""
    _, status = await run(executor, request(tmp_path, argv=["sh", "-c", "ls /proc/$$/fd; kill $$"]))
    assert status.signal == signal.SIGTERM
    assert (tmp_path / "job.work" / "stdout.log").read_text().split() == ["0", "1", "2"]
    assert (tmp_path / "job.work" / "stderr.log").read_text() == ""


# -------------------------------------------------------------------------------------- refusals


async def test_root_is_refused_by_default(tmp_path: Path) -> None:
    """Without allow_root, a job never runs as uid 0, and the message says what to configure."""
    ex = ProcessExecutor()
    with pytest.raises(LaunchError, match=r"root.*run_as"):
        ex.launch(request(tmp_path, "r1", run_as="root"))
    if IS_ROOT:
        with pytest.raises(LaunchError, match="root"):
            ex.launch(request(tmp_path, "r2"))
    assert not (tmp_path / "r1.work").exists() and not (tmp_path / "r2.work").exists()
    ex.close()


async def test_unknown_account_is_a_clear_error(executor: ProcessExecutor, tmp_path: Path) -> None:
    """An account that does not exist is refused with what to configure, and nothing is started."""
    with pytest.raises(LaunchError, match=r"unknown account 'skyport-no-such-user'.*run_as"):
        executor.launch(request(tmp_path, run_as="skyport-no-such-user"))
    assert not (tmp_path / "job.work").exists() and not (tmp_path / "job.control").exists()


async def test_bad_requests_are_refused(executor: ProcessExecutor, tmp_path: Path) -> None:
    """Exactly one payload, a program to run, no NUL bytes."""
    with pytest.raises(LaunchError, match="exactly one"):
        executor.launch(request(tmp_path, "a", argv=["true"], script="true"))
    with pytest.raises(LaunchError, match="exactly one"):
        executor.launch(request(tmp_path, "b", argv=None))
    with pytest.raises(LaunchError, match="program"):
        executor.launch(request(tmp_path, "c", argv=[]))
    with pytest.raises(LaunchError, match="NUL"):
        executor.launch(request(tmp_path, "d", argv=["echo", "a\0b"]))
    with pytest.raises(LaunchError, match="not valid"):
        executor.launch(request(tmp_path, "e", env={"A=B": "x"}))
    with pytest.raises(LaunchError, match="NUL"):
        executor.launch(request(tmp_path, "f", env={"A": "x\0y"}))


async def test_failed_launch_can_be_retried(executor: ProcessExecutor, tmp_path: Path) -> None:
    """A launch that started nothing leaves the control directory free for the same attempt."""
    with pytest.raises(LaunchError, match="cannot open"):
        executor.launch(request(tmp_path, stdout_path=tmp_path / "missing-dir" / "out"))
    assert executor.probe(tmp_path / "job.control") is None
    _, status = await run(executor, request(tmp_path))
    assert status.exit_code == 0


async def test_a_control_dir_serves_one_launch(executor: ProcessExecutor, tmp_path: Path) -> None:
    """Launching twice into one control directory fails instead of running the job twice."""
    await run(executor, request(tmp_path))
    with pytest.raises(LaunchError, match="already holds a launch"):
        executor.launch(request(tmp_path))


def test_handle_round_trips_through_json_and_refuses_dangerous_pids() -> None:
    handle = ProcessHandle(pid=1234, pgid=1234, start_ticks=99, control_dir="/x/c")
    assert ProcessHandle.from_dict(json.loads(json.dumps(handle.to_dict()))) == handle
    for bad in ({"pid": 0}, {"pgid": 1}, {"pid": "12"}, {"start_ticks": -1}):
        with pytest.raises(ValueError):
            ProcessHandle.from_dict({**handle.to_dict(), **bad})
    with pytest.raises(ValueError, match="lacks"):
        ProcessHandle.from_dict({"pid": 5})


def test_shell_status_mapping() -> None:
    """128+n is signal n (up to SIGRTMAX); anything else, 255 included, is an exit code."""
    assert ExitStatus.from_shell_status(137) == ExitStatus(None, 9, "signal", "killed by signal 9 (SIGKILL)")
    assert ExitStatus.from_shell_status(128).exit_code == 128
    assert ExitStatus.from_shell_status(255).exit_code == 255


# ------------------------------------------------------------------------------------- terminate


async def test_terminate_kills_the_whole_group(tmp_path: Path) -> None:
    """TERM reaches the job and its background children; the wrapper records "killed by SIGTERM".

    kill_leftovers is off, so nothing but terminate() can have ended the background child.
    """
    ex = ProcessExecutor(allow_root=True, kill_leftovers=False)
    ready = Fifo(tmp_path / "ready")
    try:
        req = request(
            tmp_path, argv=["sh", "-c", 'sleep 1000 & echo "$!"; sleep 1000; wait'], stdout_path=ready.path
        )
        handle = ex.launch(req)
        outcome = Outcome()
        ex.watch(handle, outcome)
        background = int(await ready.readline())
        assert (proc_state(background) or ("gone", 0))[1] == handle.pgid
        ex.terminate(handle, grace_s=60)
        status = await outcome.wait()
        assert (status.signal, status.reason) == (signal.SIGTERM, "signal"), status
        await wait_pid_ended(background)
        await wait_group_ended(handle.pgid)
        assert live_members(handle.pgid) == []
    finally:
        ready.close()
        ex.close()


async def test_terminate_right_after_launch_is_not_swallowed(
    executor: ProcessExecutor, tmp_path: Path
) -> None:
    """A TERM that reaches the wrapper before the job exists must still end the job at once.

    The wrapper catches TERM to survive it; caught before the job is forked, it would otherwise be lost
    for the job, which would then run until the KILL after the grace period.
    """
    outcomes = []
    for i in range(40):
        handle = executor.launch(request(tmp_path, f"j{i}", argv=["sleep", "1000"]))
        outcome = Outcome()
        executor.watch(handle, outcome)
        executor.terminate(handle, grace_s=600)
        outcomes.append(outcome)
    statuses = await asyncio.gather(*(o.wait() for o in outcomes))
    assert {(s.signal, s.reason) for s in statuses} == {(signal.SIGTERM, "signal")}


async def test_terminate_escalates_to_kill(executor: ProcessExecutor, tmp_path: Path) -> None:
    """A job that ignores TERM is KILLed after the grace period, without blocking the loop."""
    ready = Fifo(tmp_path / "ready")
    try:
        script = "trap '' TERM; echo ready; sleep 1000"
        handle = executor.launch(request(tmp_path, argv=["sh", "-c", script], stdout_path=ready.path))
        outcome = Outcome()
        executor.watch(handle, outcome)
        assert await ready.readline() == "ready"
        loop = asyncio.get_running_loop()
        started = loop.time()
        executor.terminate(handle, grace_s=0.3)
        assert loop.time() - started < 0.1, "terminate must not wait for the grace period"
        status = await outcome.wait()
        assert (status.signal, status.reason) == (signal.SIGKILL, "signal")
        assert loop.time() - started >= 0.3
        await wait_group_ended(handle.pgid)
    finally:
        ready.close()


async def test_leftover_background_processes_are_killed_at_exit(
    executor: ProcessExecutor, tmp_path: Path
) -> None:
    """A job that exits and leaves a background process behind does not leave it running."""
    handle, status = await run(
        executor, request(tmp_path, argv=["sh", "-c", 'sleep 1000 & echo "$!"; exit 0'])
    )
    assert status.exit_code == 0
    background = int((tmp_path / "job.work" / "stdout.log").read_text())
    await wait_pid_ended(background)
    await wait_group_ended(handle.pgid)


# --------------------------------------------------------------------------- crash and adoption

#: Simulates the core for the crash tests. It makes itself a child subreaper and forks a "core" that
#: launches the job, prints the handle and waits to be SIGKILLed. The job's wrapper is then orphaned and
#: re-parented to this helper (not to the test process, and not to PID 1, which on this machine may not
#: reap). The helper reaps nothing until the test closes its stdin, so an ended wrapper stays a zombie.
CRASH_HELPER = r"""
import ctypes, json, os, signal, sys
from pathlib import Path
from skyport.gates.process import LaunchRequest, ProcessExecutor

spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
core = os.fork()
if core == 0:
    req = LaunchRequest(
        job_id="crash", attempt=1, workdir=Path(spec["workdir"]), control_dir=Path(spec["control_dir"]),
        argv=spec["argv"], script=None, env={}, stdout_path=Path("stdout.log"),
        stderr_path=Path("stderr.log"), stdin_path=Path(spec["stdin"]) if spec["stdin"] else None,
    )
    executor = ProcessExecutor(allow_root=True)  # kept: dropping it would let subprocess reap the job
    handle = executor.launch(req)
    print(json.dumps({"core": os.getpid(), "handle": handle.to_dict()}), flush=True)
    while True:
        signal.pause()
sys.stdin.read()
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


@dataclass
class Crashed:
    """A job whose launching core was SIGKILLed; ``handle`` is what that core had learnt."""

    handle: ProcessHandle
    helper: asyncio.subprocess.Process
    go: int | None  # write end of the job's stdin pipe: a line lets the job finish


async def launch_and_crash(tmp_path: Path, argv: list[str], *, gated: bool) -> Crashed:
    """Launch ``argv`` from a separate process, then SIGKILL that process."""
    go = None
    stdin = ""
    if gated:  # the job blocks on `read` until the test writes a line: no timing involved
        stdin = str(tmp_path / "go.fifo")
        os.mkfifo(stdin)
        go = os.open(stdin, os.O_RDWR | os.O_CLOEXEC)  # O_RDWR: the job's open does not block
    spec = {
        "workdir": str(tmp_path / "crash.work"),
        "control_dir": str(tmp_path / "crash.control"),
        "argv": argv,
        "stdin": stdin,
    }
    helper = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASH_HELPER, json.dumps(spec), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert helper.stdout is not None
    line = await asyncio.wait_for(helper.stdout.readline(), TIMEOUT)
    report = json.loads(line)
    core_pidfd = os.pidfd_open(report["core"])
    try:
        os.kill(report["core"], signal.SIGKILL)
        await wait_readable(core_pidfd)
    finally:
        os.close(core_pidfd)
    return Crashed(ProcessHandle.from_dict(report["handle"]), helper, go)


async def cleanup(crashed: Crashed) -> None:
    """Kill whatever is left of the job, let the helper reap everything, and wait for it."""
    with_group = proc_state(crashed.handle.pid)
    if with_group is not None and with_group[1] == crashed.handle.pgid:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(crashed.handle.pgid, signal.SIGKILL)
    if crashed.go is not None:
        os.close(crashed.go)
    assert crashed.helper.stdin is not None
    crashed.helper.stdin.close()
    await asyncio.wait_for(crashed.helper.wait(), TIMEOUT)


async def test_adopt_after_crash_reports_the_real_exit_code(
    executor: ProcessExecutor, tmp_path: Path
) -> None:
    """A restarted core adopts a job that is not its child and learns its exit code from the wrapper."""
    crashed = await launch_and_crash(tmp_path, ["sh", "-c", "read line; exit 42"], gated=True)
    try:
        handle = crashed.handle
        state = proc_state(handle.pid)
        assert state is not None and state[0] != "Z"
        assert not is_our_child(handle.pid)
        assert executor.adopt(handle)
        outcome = Outcome()
        executor.watch(handle, outcome)
        assert crashed.go is not None
        os.write(crashed.go, b"go\n")
        status = await outcome.wait()
        assert status == ExitStatus(42, None, "exit_code", "exited with code 42")
        state = proc_state(handle.pid)
        assert state is None or state[0] == "Z", "the wrapper ended (a zombie of the helper)"
    finally:
        await cleanup(crashed)


async def test_ended_wrapper_is_not_adopted_but_its_status_is_found(
    executor: ProcessExecutor, tmp_path: Path
) -> None:
    """A wrapper that ended while the core was down is a zombie: adopt says no, probe has the status."""
    crashed = await launch_and_crash(tmp_path, ["sh", "-c", "exit 7"], gated=False)
    try:
        await wait_pid_ended(crashed.handle.pid)
        assert proc_state(crashed.handle.pid) == ("Z", crashed.handle.pgid)
        assert not executor.adopt(crashed.handle)
        found = executor.probe(Path(crashed.handle.control_dir))
        assert found == ExitStatus(7, None, "exit_code", "exited with code 7")
        outcome = Outcome()  # watching it anyway reports the same at once: a zombie has exited
        executor.watch(crashed.handle, outcome)
        assert await outcome.wait() == found
    finally:
        await cleanup(crashed)


async def test_probe_finds_a_launch_whose_handle_was_lost(executor: ProcessExecutor, tmp_path: Path) -> None:
    """The core died between launch and recording the handle: probe finds the wrapper by its files."""
    crashed = await launch_and_crash(tmp_path, ["sh", "-c", "read line; exit 5"], gated=True)
    try:
        found = executor.probe(tmp_path / "crash.control")
        assert found == crashed.handle
        assert isinstance(found, ProcessHandle)
        outcome = Outcome()
        executor.watch(found, outcome)
        assert crashed.go is not None
        os.write(crashed.go, b"go\n")
        assert (await outcome.wait()).exit_code == 5
        assert executor.probe(tmp_path / "never-launched") is None
    finally:
        await cleanup(crashed)


async def test_a_claim_without_a_wrapper_is_a_launch_that_never_happened(
    executor: ProcessExecutor, tmp_path: Path
) -> None:
    """The core died between claiming the control directory and forking: nothing ran, so probe says
    so (not "lost") and the same attempt can be launched again."""
    control = tmp_path / "claimed.control"
    control.mkdir(mode=0o711)
    (control / "pid").touch()  # the claim, as launch() makes it before the fork
    assert executor.probe(control) is None
    outcome = Outcome()
    executor.watch(
        executor.launch(request(tmp_path, argv=["sh", "-c", "exit 4"], control_dir=control)), outcome
    )
    assert (await outcome.wait()).exit_code == 4


async def test_wrapper_killed_while_core_down_is_lost(executor: ProcessExecutor, tmp_path: Path) -> None:
    """If the wrapper itself is SIGKILLed while no core watches, the status is honestly "lost"."""
    crashed = await launch_and_crash(tmp_path, ["sh", "-c", "read line; exit 5"], gated=True)
    try:
        handle = crashed.handle
        assert executor.adopt(handle)
        outcome = Outcome()
        executor.watch(handle, outcome)
        os.kill(handle.pid, signal.SIGKILL)
        status = await outcome.wait()
        assert (status.exit_code, status.signal, status.reason) == (None, None, "lost")
        assert "no exit status" in status.message
        await wait_group_ended(handle.pgid)  # the orphaned job was killed as a leftover
    finally:
        await cleanup(crashed)


async def test_pid_reuse_guard(executor: ProcessExecutor, tmp_path: Path) -> None:
    """A handle whose pid now belongs to another process is not adopted."""
    ready = Fifo(tmp_path / "ready")
    handle = executor.launch(
        request(tmp_path, argv=["sh", "-c", "echo ready; exec sleep 1000"], stdout_path=ready.path)
    )
    outcome = Outcome()
    executor.watch(handle, outcome)
    try:
        assert await ready.readline() == "ready"  # the wrapper's exec is long done
        assert executor.adopt(handle)
        wrong_ticks = ProcessHandle(handle.pid, handle.pgid, handle.start_ticks + 1, handle.control_dir)
        assert not executor.adopt(wrong_ticks)
        other_dir = ProcessHandle(handle.pid, handle.pgid, handle.start_ticks, str(tmp_path / "other"))
        assert not executor.adopt(other_dir), "the wrapper must run for the handle's control directory"
    finally:
        ready.close()
        executor.terminate(handle, grace_s=5)
        await outcome.wait()
    assert adopts_a_stranger(executor, handle.control_dir) == (False, False)


# ---------------------------------------------------------------------------------------- fd leaks


async def test_no_fd_leaks_over_100_jobs(executor: ProcessExecutor, tmp_path: Path) -> None:
    """Launching and reaping 100 jobs leaves the core's open fd count where it was."""
    await run(executor, request(tmp_path, "warmup"))
    before = open_fds()
    outcomes = []
    for i in range(100):
        outcome = Outcome()
        executor.watch(
            executor.launch(request(tmp_path, f"j{i}", stdin_path=tmp_path / "warmup.work" / "stdout.log")),
            outcome,
        )
        outcomes.append(outcome)
    statuses = await asyncio.gather(*(o.wait() for o in outcomes))
    assert all(s.exit_code == 0 for s in statuses)
    assert open_fds() == before


# ----------------------------------------------------------------------------- another account


def nobody_owned(path: Path) -> bool:
    assert NOBODY is not None
    return path.stat().st_uid == NOBODY.pw_uid


@needs_nobody
async def test_runs_as_nobody(executor: ProcessExecutor, world_dir: Path) -> None:
    """run_as really switches account and groups; workdir and files belong to that account."""
    assert NOBODY is not None
    req = request(world_dir, argv=["sh", "-c", "id -u; id -g; id -G"], run_as="nobody")
    _, status = await run(executor, req)
    assert status.exit_code == 0, status
    workdir = world_dir / "job.work"
    uid, gid, groups = (workdir / "stdout.log").read_text().split("\n")[:3]
    assert (int(uid), int(gid)) == (NOBODY.pw_uid, NOBODY.pw_gid)
    assert set(map(int, groups.split())) == set(os.getgrouplist("nobody", NOBODY.pw_gid))
    assert nobody_owned(workdir) and stat.S_IMODE(workdir.stat().st_mode) == 0o700
    assert nobody_owned(workdir / "stdout.log") and nobody_owned(workdir / "stderr.log")
    control = world_dir / "job.control"
    assert control.stat().st_uid == 0 and not control.stat().st_mode & 0o022


@needs_nobody
async def test_nobody_gets_exactly_its_environment(executor: ProcessExecutor, world_dir: Path) -> None:
    """The environment crosses the account switch literally, and nothing of root's leaks."""
    assert NOBODY is not None
    given = {"SKYPORT_JOB_ID": "j2", "TRICKY": 'it\'s "$(id)" `id` $HOME\nsecond line', "EMPTY": ""}
    _, status = await run(executor, request(world_dir, argv=["env", "-0"], env=given, run_as="nobody"))
    assert status.exit_code == 0, status
    raw = (world_dir / "job.work" / "stdout.log").read_bytes()
    seen = dict(item.split("=", 1) for item in raw.decode().split("\0") if item)
    assert seen == {
        **given,
        "HOME": NOBODY.pw_dir,
        "USER": "nobody",
        "LOGNAME": "nobody",
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "SHELL": NOBODY.pw_shell,
        "PWD": str(world_dir / "job.work"),
    }


@needs_nobody
async def test_nobody_script_and_workdir_created_by_the_user(
    executor: ProcessExecutor, world_dir: Path
) -> None:
    """In a directory the user owns, the user creates the workdir; the script runs from the control dir."""
    assert NOBODY is not None
    home = world_dir / "home"
    home.mkdir()
    os.chown(home, NOBODY.pw_uid, NOBODY.pw_gid)
    req = request(
        world_dir, argv=None, script="#!/bin/sh\nid -un\nexit 6\n", workdir=home / "a" / "w", run_as="nobody"
    )
    _, status = await run(executor, req)
    assert status.exit_code == 6, status
    workdir = home / "a" / "w"
    assert (workdir / "stdout.log").read_text() == "nobody\n"
    assert nobody_owned(workdir) and stat.S_IMODE(workdir.stat().st_mode) == 0o700


@needs_nobody
async def test_nobody_cannot_forge_its_status(executor: ProcessExecutor, world_dir: Path) -> None:
    """The job cannot write the control directory: its attempt fails and the real status is reported."""
    control = world_dir / "job.control"
    forge = 'echo 0 > "$1/status" || exit 9; exit 0'
    _, status = await run(
        executor, request(world_dir, argv=["sh", "-c", forge, "sh", str(control)], run_as="nobody")
    )
    assert status.exit_code == 9


@needs_nobody
async def test_nobody_files_are_opened_with_its_permissions(
    executor: ProcessExecutor, world_dir: Path
) -> None:
    """A stdout path the user may not write is a setup failure with the shell's reason, not a root write."""
    private = world_dir / "root-only"
    private.mkdir(mode=0o755)
    req = request(world_dir, stdout_path=private / "out.log", run_as="nobody")
    _, status = await run(executor, req)
    assert status.reason == "setup_failed", status
    assert "Permission denied" in status.message
    assert not (private / "out.log").exists()


@needs_nobody
async def test_control_dir_writable_by_the_user_is_refused(
    executor: ProcessExecutor, world_dir: Path
) -> None:
    """The job's user could forge its pid or status in such a directory: refused before starting."""
    assert NOBODY is not None
    control = world_dir / "job.control"
    control.mkdir()
    os.chown(control, NOBODY.pw_uid, NOBODY.pw_gid)
    with pytest.raises(LaunchError, match="writable by the job's user"):
        executor.launch(request(world_dir, run_as="nobody"))


@needs_nobody
async def test_terminate_as_nobody(executor: ProcessExecutor, world_dir: Path) -> None:
    """The root wrapper and the user's job share a group: terminate ends the job, the status is TERM."""
    ready = Fifo(world_dir / "ready")
    ready.path.chmod(0o666)  # the job's user opens it
    try:
        script = 'sleep 1000 & echo "$!"; sleep 1000; wait'
        handle = executor.launch(
            request(world_dir, argv=["sh", "-c", script], stdout_path=ready.path, run_as="nobody")
        )
        outcome = Outcome()
        executor.watch(handle, outcome)
        background = int(await ready.readline())
        assert (proc_state(background) or ("gone", 0))[1] == handle.pgid
        executor.terminate(handle, grace_s=60)
        status = await outcome.wait()
        assert (status.signal, status.reason) == (signal.SIGTERM, "signal"), status
        assert (Path(handle.control_dir) / "status").read_text() == "143\n"
        await wait_group_ended(handle.pgid)
    finally:
        ready.close()


async def test_a_script_runs_with_the_interpreter_and_argument_of_its_hash_bang_line(
    executor: ProcessExecutor, tmp_path: Path
) -> None:
    """The #! line is split as the kernel splits it: the program, then the rest as one argument."""
    script = "#!/bin/sh -e  \nfalse\necho 'not reached: -e stops the script'\n"
    _, status = await run(executor, request(tmp_path, "e", argv=None, script=script))
    assert status.exit_code == 1
    assert (tmp_path / "e.work" / "stdout.log").read_bytes() == b""


async def test_scripts_launched_from_several_threads_at_once_all_run(
    executor: ProcessExecutor, tmp_path: Path
) -> None:
    """A launch's fork in one thread holds a writable descriptor of another launch's script until the
    child's exec; executing that script then would fail (ETXTBSY, exit 126) at random. Scripts are
    handed to their interpreter instead, so every one of many concurrent launches runs."""
    requests = [
        request(tmp_path, f"s{i}", argv=None, script=f"#!/bin/sh\nexit {i % 7}\n") for i in range(120)
    ]
    with ThreadPoolExecutor(max_workers=4) as threads:
        handles = list(threads.map(executor.launch, requests))
    outcomes = []
    for handle in handles:
        outcome = Outcome()
        executor.watch(handle, outcome)
        outcomes.append(outcome)
    codes = [(await outcome.wait()).exit_code for outcome in outcomes]
    assert codes == [i % 7 for i in range(120)]


async def test_a_handle_has_the_start_time_proc_reports(executor: ProcessExecutor, tmp_path: Path) -> None:
    """The start time in a handle (its identity against pid reuse) is taken from the clock around the
    fork, not read from /proc: it must be exactly what /proc says, for every launch."""
    handles = [executor.launch(request(tmp_path, f"j{i}", argv=["sleep", "30"])) for i in range(60)]
    try:
        for handle in handles:
            proc = _read_stat(handle.pid)
            assert proc is not None and handle.start_ticks == proc.start_ticks
    finally:
        for handle in handles:
            executor.terminate(handle, grace_s=0)
