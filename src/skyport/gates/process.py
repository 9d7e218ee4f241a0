"""Run job processes on this machine and learn how they ended, even across a crash of the core.

This is the executor of the ``local`` gate and, later, of the node agent. It never touches the store:
the core's control loops call it and record what happened (DESIGN §4, §5).

How a job runs. :meth:`ProcessExecutor.launch` starts a tiny POSIX-shell *wrapper* in a new session
(so the job and everything it spawns share one process group that can be signalled as a whole)::

    /bin/sh -c WRAPPER skyport-job CONTROL_DIR JOB_ARGV...

The wrapper writes its own pid to ``CONTROL_DIR/pid``, runs the job as a child, and writes the job's
``$?`` to ``CONTROL_DIR/status`` (atomically for readers, see :func:`_wrapper_text`). While the core runs, it
watches the wrapper with a pidfd on its asyncio loop and reaps it; after a crash, a restarted core finds
the wrapper again (:meth:`~ProcessExecutor.adopt`, :meth:`~ProcessExecutor.probe`) and reads the status
file, because the wrapper, not the core, is the job's parent. The wrapper text is a constant: user
strings reach it only as positional parameters (``"$@"``), never as shell text.

Running as another account. When the job runs as a different Unix account than the executor (the
executor then must be root), the wrapper stays root, so that the job can neither forge its pid or status
files (the control directory is not writable by the job's user) nor kill the wrapper by accident with
``kill 0`` or ``kill -9 -1``. Only the job drops privileges, through ``setpriv``, into a small *setup*
shell that runs as the job's user: it creates the working directory if needed, opens stdin/stdout/stderr
with the user's own permissions (a root process opening user-chosen paths would follow the user's
symlinks), loads the job's environment from an anonymous memory file (so that no root process ever runs
with a user-chosen ``LD_PRELOAD``), and ``exec``s the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "PID_FILE",
    "ExitStatus",
    "LaunchError",
    "LaunchRequest",
    "ProcessExecutor",
    "ProcessHandle",
    "kill_orphaned_group",
    "read_exit_status",
]

log = logging.getLogger(__name__)

#: Signals the wrapper survives, so that our SIGTERM to the group or a ``kill 0`` from the job does not
#: end it before it has recorded the job's status.
WRAPPER_SIGNALS = "HUP INT QUIT TERM USR1 USR2"
#: Written by :meth:`ProcessExecutor.terminate` before it signals: a job not started yet then never starts.
CANCEL_FILE = "cancel"


def _wrapper_text() -> str:
    """The wrapper, run as ``sh -c WRAPPER skyport-job CONTROL_DIR JOB_ARGV...``.

    - The wrapper catches :data:`WRAPPER_SIGNALS` with a no-op handler. A handler (not an ignore) is
      reset to the default on exec, so the job itself still receives and obeys these signals.
    - A signal that arrives while the job's process is still the wrapper's fork (before the exec) may be
      caught by the inherited handler and lost, and the job would then run until the KILL. So the fork
      first restores the default handlers (from here on a signal ends it) and then looks for the
      ``cancel`` file that :meth:`ProcessExecutor.terminate` writes *before* it signals: either the
      file is there, or our signal comes later and finds default handlers.
    - The job runs in a subshell so that ``$1`` survives without a shell variable (whose name could
      collide with the job's environment); afterwards ``$2`` holds the job's status.
    - The status is one ``write(2)`` of ``"N\\n"`` by the shell's ``echo``, into a file that did not
      exist (the control directory serves one launch). A reader sees no file, an empty one, or the
      whole line, and accepts the status only with its newline (:func:`_status_from_file`): the same
      guarantee as writing a temporary file and renaming it, without an exec of ``mv``, which costs
      ~1.4 ms of CPU per job (on 2 cores: ~500 instead of ~750 launches and exits per second).
    - The wrapper's own stderr is /dev/null (the job's is kept on fd 3 and handed back to the job only):
      otherwise the shell would add "Terminated" to the job's stderr when the job dies of a signal.
    """
    return (
        f"trap : {WRAPPER_SIGNALS}\n"
        "exec 3>&2 2>/dev/null\n"
        'echo "$$" >"$1/pid"\n'
        f"(trap - {WRAPPER_SIGNALS}\n"
        f'[ ! -e "$1/{CANCEL_FILE}" ] || exit {128 + signal.SIGTERM}\n'
        'shift; exec 2>&3 3>&-; exec "$@")\n'
        'set -- "$1" "$?"\n'
        'echo "$2" >"$1/status"\n'
        'exit "$2"\n'
    )


WRAPPER = _wrapper_text()
#: ``$0`` of the wrapper: what ``ps`` shows and what :meth:`ProcessExecutor.probe` recognises.
WRAPPER_NAME = "skyport-job"

#: The setup shell, run as the job's user by ``setpriv`` when the job changes account:
#: ``sh -c SETUP skyport-job-setup MKDIR WORKDIR STDIN STDOUT STDERR JOB_ARGV...`` with the job's
#: environment (``export NAME='value'`` lines) on its stdin. Failures exit 125 with a message on the
#: wrapper's stderr, which is the control directory's ``setup.err``.
SETUP = (
    '[ -d "$2" ] || "$1" -p -m 0700 -- "$2" || exit 125\n'
    'cd -- "$2" || exit 125\n'
    "unset OLDPWD\n"
    "command . /dev/stdin || exit 125\n"
    'command exec <"$3" >>"$4" 2>>"$5" || exit 125\n'
    "shift 5\n"
    'exec "$@"\n'
)
SETUP_NAME = "skyport-job-setup"

PID_FILE = "pid"
STATUS_FILE = "status"
SCRIPT_FILE = "job-script"
SETUP_ERR_FILE = "setup.err"

#: Highest signal number a shell can report as ``128 + n``; larger statuses are plain exit codes (255).
_MAX_SIGNAL = 64
#: Accounts are looked up at most this often (seconds): a lookup may go to LDAP, launch is a hot path.
_ACCOUNT_TTL_S = 60.0
#: A clock tick of /proc's process start times, in nanoseconds (see :func:`_start_ticks`).
_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SYSTEM_DIRS = "/usr/sbin:/usr/bin:/sbin:/bin"
_USER_PATH = "/usr/local/bin:/usr/bin:/bin"
_ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class LaunchError(Exception):
    """The job could not be started; the message says why and, where possible, what to change."""


@dataclass(frozen=True)
class LaunchRequest:
    """Everything needed to start one attempt of a job.

    ``control_dir`` holds the executor's own files (pid, status, the job script); it must not be
    writable by the job's user, and one directory serves exactly one launch. Relative ``stdout_path``,
    ``stderr_path`` and ``stdin_path`` are taken relative to ``workdir``. Exactly one of ``argv`` and
    ``script`` is given.
    """

    job_id: str
    attempt: int
    workdir: Path
    control_dir: Path
    argv: list[str] | None
    script: str | None
    env: dict[str, str]
    stdout_path: Path
    stderr_path: Path
    stdin_path: Path | None = None
    run_as: str | None = None


@dataclass(frozen=True)
class ProcessHandle:
    """Identifies a running wrapper durably: the core stores it (``to_dict``) and adopts it after a restart.

    ``start_ticks`` (field 22 of ``/proc/<pid>/stat``, clock ticks since boot) tells our process apart
    from a later one that got the same pid.
    """

    pid: int
    pgid: int
    start_ticks: int
    control_dir: str

    def __post_init__(self) -> None:
        """Refuse pids that would make a signal hit the wrong processes (``killpg(0)`` is our own group)."""
        for name in ("pid", "pgid", "start_ticks"):
            value = getattr(self, name)
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or value < (0 if name == "start_ticks" else 2)
            ):
                raise ValueError(f"process handle has an invalid {name}: {value!r}")
        if not isinstance(self.control_dir, str) or not self.control_dir:
            raise ValueError(f"process handle has an invalid control_dir: {self.control_dir!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form."""
        return {
            "pid": self.pid,
            "pgid": self.pgid,
            "start_ticks": self.start_ticks,
            "control_dir": self.control_dir,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProcessHandle:
        """Read what :meth:`to_dict` wrote; refuses anything else, since we will signal this pid."""
        try:
            return cls(
                pid=data["pid"],
                pgid=data["pgid"],
                start_ticks=data["start_ticks"],
                control_dir=data["control_dir"],
            )
        except KeyError as exc:
            raise ValueError(f"process handle lacks {exc.args[0]!r}") from None


@dataclass(frozen=True)
class ExitStatus:
    """How a job ended.

    ``reason`` is machine-readable: ``exit_code`` (``exit_code`` is set), ``signal`` (``signal`` is
    set), ``setup_failed`` (the job's files or directory could not be prepared as its user; the message
    says why), ``lost`` (the process is gone and left no status, e.g. it ended while the core was down).
    """

    exit_code: int | None
    signal: int | None
    reason: str
    message: str

    @classmethod
    def from_shell_status(cls, status: int) -> ExitStatus:
        """Interpret a shell's ``$?``: 129..192 means killed by signal ``status - 128``."""
        if 128 < status <= 128 + _MAX_SIGNAL:
            return cls.killed(status - 128)
        hint = {126: " (the command is not executable)", 127: " (command not found)"}.get(status, "")
        return cls(
            exit_code=status, signal=None, reason="exit_code", message=f"exited with code {status}{hint}"
        )

    @classmethod
    def killed(cls, signum: int) -> ExitStatus:
        """A job ended by a signal."""
        return cls(
            exit_code=None,
            signal=signum,
            reason="signal",
            message=f"killed by signal {signum} ({_signal_name(signum)})",
        )

    @classmethod
    def lost(cls) -> ExitStatus:
        """The wrapper is gone and left no status."""
        return cls(
            exit_code=None,
            signal=None,
            reason="lost",
            message="the job's process ended while the core was down and left no exit status",
        )


def _signal_name(signum: int) -> str:
    """``SIGKILL`` for 9: the name people search logs for."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(frozen=True)
class _Account:
    """The Unix account a job runs as, looked up once per :data:`_ACCOUNT_TTL_S`."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str


@dataclass(frozen=True)
class _ProcStat:
    """The fields of ``/proc/<pid>/stat`` we use."""

    state: str
    pgid: int
    start_ticks: int


@dataclass
class _Watch:
    """One watched handle: its pidfd on the loop, its pending KILL, and the caller's callback."""

    handle: ProcessHandle
    on_exit: Callable[[ProcessHandle, ExitStatus], None]
    pidfd: int | None = None
    kill_timer: asyncio.TimerHandle | None = None
    kill_at: float = float("inf")
    pending: asyncio.Handle | None = None
    done: bool = False


def _read_stat(pid: int) -> _ProcStat | None:
    """Parse ``/proc/<pid>/stat``; None when there is no such process.

    The command name (field 2) may contain spaces and parentheses, so split after its last ``)``.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state); field 5 (pgrp) is fields[2]; field 22 (starttime) is fields[19]
    return _ProcStat(state=fields[0].decode(), pgid=int(fields[2]), start_ticks=int(fields[19]))


def _start_ticks(pid: int, not_before: int, not_after: int) -> int:
    """Field 22 of ``/proc/<pid>/stat`` for a child forked between two ``CLOCK_BOOTTIME`` readings (ns).

    The kernel stamps a process's start with that clock when it forks it, and reports it in whole clock
    ticks, rounded down: when both readings fall in the same tick, that tick is the child's. Reading
    the file instead waits for the child's exec to get past the point that ``/proc`` reads wait for:
    ~0.2 ms on every launch, and the launcher starts its jobs one after the other. A fork that
    straddles a tick (one in ~20 here) is read from the file.
    """
    if not_before // _TICK_NS == not_after // _TICK_NS:
        return not_before // _TICK_NS
    st = _read_stat(pid)
    if st is None:  # cannot happen: an unreaped child keeps its /proc entry
        raise LaunchError(f"the child {pid} vanished at its start")
    return st.start_ticks


def _is_our_wrapper(pid: int, control_dir: str) -> bool | None:
    """True if ``pid`` runs our wrapper for ``control_dir`` (a reused pid would run something else).

    The wrapper's text itself is not compared, so that a core upgraded with a changed wrapper still
    recognises the jobs that the previous version started (their status file has the same format).
    None while the process is between fork and the end of its exec: its command line is still empty
    then (``launch`` returns as soon as the exec has begun).
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    if not raw:
        return None
    argv = raw.split(b"\0")
    return argv[1:2] == [b"-c"] and argv[3:5] == [WRAPPER_NAME.encode(), os.fsencode(control_dir)]


def _find_wrapper(control_dir: str) -> int | None:
    """The pid of a live wrapper for ``control_dir``, found by its command line (only for recovery)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _is_our_wrapper(int(entry), control_dir) is True:
            st = _read_stat(int(entry))
            if st is not None and st.state not in ("Z", "X", "x"):
                return int(entry)
    return None


def _read_small(path: str) -> bytes | None:
    """The content of a small file, or None if it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read(4096)
    except FileNotFoundError:
        return None


def _status_from_file(control_dir: str) -> ExitStatus | None:
    """The job's status as the wrapper recorded it, or None if it recorded none (yet).

    Only a whole line counts: the wrapper writes the line with one ``write(2)``, so a file without
    its newline is one being written (or cut short by a crash) and is treated as missing.
    """
    data = _read_small(os.path.join(control_dir, STATUS_FILE))
    if data is None or not data.endswith(b"\n"):
        return None
    try:
        return ExitStatus.from_shell_status(int(data))
    except ValueError:
        return None


def _setup_failure(control_dir: str, status: ExitStatus) -> ExitStatus:
    """Turn a failure of the setup shell (which leaves text in ``setup.err``) into ``setup_failed``.

    Only the wrapper, ``setpriv`` and the setup shell write to ``setup.err``; the job's own stderr is
    its file, so text there always means that the job could not be prepared.
    """
    if status.exit_code == 0:
        return status
    data = _read_small(os.path.join(control_dir, SETUP_ERR_FILE))
    if not data or not data.strip():
        return status
    text = data.decode(errors="replace").strip().replace("\n", "; ")
    return ExitStatus(
        exit_code=status.exit_code,
        signal=status.signal,
        reason="setup_failed",
        message=f"the job could not be started as its user: {text}",
    )


def read_exit_status(control_dir: str, shell_status: int | None) -> ExitStatus | None:
    """How the job of ``control_dir`` ended: ``shell_status`` (a shell's ``$?``) when its parent told,
    else the status file; None when neither says. A failed setup as the job's user is recognised."""
    if shell_status is not None:
        status: ExitStatus | None = ExitStatus.from_shell_status(shell_status)
    else:
        status = _status_from_file(control_dir)
    return None if status is None else _setup_failure(control_dir, status)


def kill_orphaned_group(handle: ProcessHandle) -> None:
    """KILL the process group of a job that nobody can record the end of any more (its launcher
    died), but only while its leader is still that process (same start time, own group, not a zombie
    reaped by no one yet), so that a reused pid is never hit."""
    st = _read_stat(handle.pid)
    if st is None or st.start_ticks != handle.start_ticks or st.pgid != handle.pgid or st.state == "Z":
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(handle.pgid, signal.SIGKILL)


def _wait_status(result: os.waitid_result) -> ExitStatus:
    """An :class:`ExitStatus` from the wrapper's own wait status (used when it left no status file)."""
    if result.si_code == os.CLD_EXITED:
        return ExitStatus.from_shell_status(result.si_status)
    return ExitStatus.killed(result.si_status)


def _open_dir_trusted(path: str) -> int | None:
    """Open ``path`` as a directory only a privileged account can change, else return None.

    Inside such a directory the executor can create the job's workdir itself without a race with the
    job's user (who cannot swap the new entry for a symlink).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if st.st_uid in (0, os.geteuid()) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return fd
    os.close(fd)
    return None


def _make_dir(path: str, mode: int) -> None:
    """A directory, with its parents if missing; one ``mkdir`` in the usual case (a launch is a hot path)."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(path, mode, exist_ok=True)


def _interpreter(script: str) -> list[str]:
    """The interpreter of a ``#!`` line and its optional argument, split as Linux does: the program
    up to the first blank, then the rest of the line (trimmed) as one argument, if any."""
    line = script[2:].split("\n", 1)[0].strip(" \t")
    program, _, argument = line.replace("\t", " ").partition(" ")
    argument = argument.strip(" \t")
    if not program:
        raise LaunchError(
            "the job script's #! line names no interpreter: put its path after #!, e.g. #!/bin/sh"
        )
    if "/" not in program:  # the kernel takes it relative to the working directory, not from PATH
        program = f"./{program}"
    return [program, argument] if argument else [program]


def _shell_env(env: dict[str, str]) -> bytes:
    """The environment as ``export NAME='value'`` lines for the setup shell to source.

    Names were checked by ``ProcessExecutor._job_env`` (a name is shell syntax); values are
    single-quoted by :func:`shlex.quote`, so a value is never interpreted.
    """
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items()).encode()


class ProcessExecutor:
    """Starts jobs as processes, watches them on an asyncio loop and terminates them.

    ``launch`` may be called from any thread. ``watch``, ``terminate`` and ``close`` belong to the loop
    thread: the executor has no threads of its own and never polls.

    :param loop_clock: the event loop whose reader and clock (``call_later``) the executor uses; by
        default the loop running at the first ``watch``/``terminate``.
    :param allow_root: allow jobs to run as uid 0 (refused by default: a job is user code).
    :param kill_leftovers: when a job's wrapper ends, KILL whatever is left in its process group
        (background processes the job started and did not wait for), as a batch system does.
    :param wrapper: start each job under the wrapper (the default). Without it the job (or, for another
        account, ``setpriv``) is this process's direct child, and recording its status and pid is the
        caller's duty: that is the launcher's way (:mod:`skyport.gates.launcher`), a long-lived parent
        that outlives the core, so that a job costs one exec instead of a shell, a fork and an exec.
    """

    def __init__(
        self,
        *,
        loop_clock: asyncio.AbstractEventLoop | None = None,
        allow_root: bool = False,
        kill_leftovers: bool = True,
        shell: str = "/bin/sh",
        wrapper: bool = True,
    ) -> None:
        self._loop = loop_clock
        self._wrapper = wrapper
        self._allow_root = allow_root
        self._kill_leftovers = kill_leftovers
        self._shell = shell
        self._mkdir = shutil.which("mkdir", path=_SYSTEM_DIRS) or "/bin/mkdir"
        self._setpriv = shutil.which("setpriv", path=_SYSTEM_DIRS)
        self._accounts: dict[str | None, tuple[float, _Account]] = {}
        #: our unreaped children: pid -> (Popen, start ticks); an unreaped pid cannot be reused
        self._children: dict[int, tuple[subprocess.Popen[bytes], int]] = {}
        self._devnull: int | None = None
        self._devnull_lock = threading.Lock()
        self._watches: dict[tuple[int, int], _Watch] = {}
        self._timers: dict[tuple[int, int], asyncio.TimerHandle] = {}
        self._closed = False

    # ----------------------------------------------------------------------------------------- launch

    def launch(self, req: LaunchRequest) -> ProcessHandle:
        """Start the job's wrapper and return its handle; only fork/exec, no waiting.

        Raises :class:`LaunchError` for anything that prevents the start (bad request, unknown or
        forbidden account, an already used control directory, unwritable files).
        """
        return self._launch(req, claim=True)

    def spawn(self, req: LaunchRequest) -> ProcessHandle:
        """Start the job as this process's direct child without claiming its control directory.

        For an executor without the wrapper whose caller keeps its own record of each launch (the
        launcher: one record file per job, see :mod:`skyport.gates.launcher`). The control directory
        is made only when the job needs it: for its script, or for the setup errors of another account.
        """
        return self._launch(req, claim=False)

    def _launch(self, req: LaunchRequest, *, claim: bool) -> ProcessHandle:
        if self._closed:
            raise LaunchError("the process executor is closed")
        command = self._check_request(req)
        account = self._account(req.run_as)
        switch = account.uid != os.geteuid()
        if switch and os.geteuid() != 0:
            raise LaunchError(
                f"cannot run the job as {account.name!r}: the executor runs as uid {os.geteuid()}, "
                "and only root can start jobs as other accounts (or leave run_as unset)"
            )
        if switch and self._setpriv is None:
            raise LaunchError("running jobs as other accounts needs 'setpriv' (Debian package util-linux)")
        env = self._job_env(req, account)
        cdir = os.path.abspath(req.control_dir)
        if claim:
            self._claim_control_dir(cdir, account if switch else None)
        elif req.script is not None or switch:
            self._make_control_dir(cdir, account if switch else None)
        try:
            if req.script is not None:
                command = self._write_script(cdir, req.script)
            not_before = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
            if switch:
                proc = self._spawn_as(req, cdir, command, env, account)
            else:
                proc = self._spawn(req, cdir, command, env)
            not_after = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        except BaseException as exc:
            if claim:
                self._release_claim(cdir)  # nothing started: the same attempt may be launched again
            if isinstance(exc, (OSError, ValueError, subprocess.SubprocessError)):
                raise LaunchError(f"could not start job {req.job_id} (attempt {req.attempt}): {exc}") from exc
            raise
        start_ticks = _start_ticks(proc.pid, not_before, not_after)
        self._children[proc.pid] = (proc, start_ticks)
        return ProcessHandle(pid=proc.pid, pgid=proc.pid, start_ticks=start_ticks, control_dir=cdir)

    def _check_request(self, req: LaunchRequest) -> list[str]:
        """Validate the payload; returns the argv to run (a placeholder for scripts)."""
        if (req.argv is None) == (req.script is None):
            raise LaunchError(f"job {req.job_id}: give exactly one of argv (a command) or script")
        if req.argv is not None:
            if not req.argv or not req.argv[0]:
                raise LaunchError(f"job {req.job_id}: argv must name a program to run")
            if any("\0" in arg for arg in req.argv):
                raise LaunchError(f"job {req.job_id}: argv must not contain NUL bytes")
            return list(req.argv)
        return []

    def _account(self, run_as: str | None) -> _Account:
        """Resolve ``run_as`` (None: our own account), cached; refuses root unless allowed."""
        now = time.monotonic()
        cached = self._accounts.get(run_as)
        if cached is not None and cached[0] > now:
            account = cached[1]
        else:
            account = self._lookup_account(run_as)
            self._accounts[run_as] = (now + _ACCOUNT_TTL_S, account)
        if account.uid == 0 and not self._allow_root:
            raise LaunchError(
                f"refusing to run a job as root (account {account.name!r}): configure an unprivileged "
                "run_as account for this gate, or allow_root=True if you really mean it"
            )
        return account

    @staticmethod
    def _lookup_account(run_as: str | None) -> _Account:
        """Look an account up in the system's user database."""
        try:
            pw = pwd.getpwuid(os.geteuid()) if run_as is None else pwd.getpwnam(run_as)
        except KeyError:
            if run_as is None:
                uid = os.geteuid()
                return _Account(str(uid), uid, os.getegid(), tuple(os.getgroups()), "/", "/bin/sh")
            raise LaunchError(
                f"unknown account {run_as!r}: create that Unix account on this host, or map the job's "
                "user to an existing account in the gate's run_as setting"
            ) from None
        try:
            groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
        except OSError:
            groups = (pw.pw_gid,)
        return _Account(pw.pw_name, pw.pw_uid, pw.pw_gid, groups, pw.pw_dir or "/", pw.pw_shell or "/bin/sh")

    def _claim_control_dir(self, cdir: str, job_account: _Account | None) -> None:
        """Create the control directory if needed and claim it by creating ``pid`` exclusively.

        The exclusive create makes a second launch into the same directory fail loudly instead of
        running the job twice (after a crash, call :meth:`probe` instead). The wrapper overwrites the
        empty file with its pid.
        """
        self._make_control_dir(cdir, job_account)
        try:
            os.close(
                os.open(
                    os.path.join(cdir, PID_FILE), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
                )
            )
        except FileExistsError:
            raise LaunchError(
                f"control directory {cdir} already holds a launch: use probe() to find it, "
                "or a fresh control directory for a new attempt"
            ) from None
        except OSError as exc:
            raise LaunchError(f"cannot use control directory {cdir}: {exc.strerror}") from None

    def _make_control_dir(self, cdir: str, job_account: _Account | None) -> None:
        """Create the control directory if needed; refuse one the job's user could write."""
        _make_dir(cdir, 0o711)
        if job_account is not None:
            self._check_control_dir(cdir, job_account)

    @staticmethod
    def _release_claim(cdir: str) -> None:
        """Undo :meth:`_claim_control_dir` after a launch that started nothing."""
        for name in (PID_FILE, SCRIPT_FILE):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(cdir, name))

    @staticmethod
    def _check_control_dir(cdir: str, account: _Account) -> None:
        """Refuse a control directory the job's user could write (it could forge pid or status)."""
        st = os.lstat(cdir)
        if not stat.S_ISDIR(st.st_mode):
            raise LaunchError(f"control directory {cdir} is not a directory (a symlink is refused too)")
        group_writable = bool(st.st_mode & stat.S_IWGRP) and st.st_gid in account.groups
        if st.st_uid == account.uid or st.st_mode & stat.S_IWOTH or group_writable:
            raise LaunchError(
                f"control directory {cdir} is writable by the job's user {account.name!r}; it must belong "
                "to the executor's account and be writable by it alone"
            )

    @staticmethod
    def _write_script(cdir: str, script: str) -> list[str]:
        """Store the job script in the control directory and return how to run it.

        With a ``#!`` line its interpreter runs it, chosen as the kernel would (:func:`_interpreter`);
        without one, ``/bin/sh`` runs it. The script is handed to the interpreter, never executed itself:
        a fork in another thread while the file was open for writing keeps a writable descriptor of it
        until that child's own exec, and executing a file open for writing fails (ETXTBSY: the job would
        end with 126 at random when several launches run at once). The file is readable and executable
        by the job's user, who cannot change it.
        """
        path = os.path.join(cdir, SCRIPT_FILE)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o755)
        try:
            os.write(fd, script.encode())
        finally:
            os.close(fd)
        return [*_interpreter(script), path] if script.startswith("#!") else ["/bin/sh", path]

    @staticmethod
    def _job_env(req: LaunchRequest, account: _Account) -> dict[str, str]:
        """The job's whole environment: the request's, plus the account's HOME, USER, LOGNAME, PATH and
        SHELL where the request has none, and PWD (which the shell would set anyway).

        Names are checked here for both ways of starting, since the setup shell sources them as shell
        text (see :func:`_shell_env`).
        """
        for name, value in req.env.items():
            if not _ENV_NAME.fullmatch(name):
                raise LaunchError(f"environment variable name {name!r} is not valid (letters, digits, _)")
            if "\0" in value:
                raise LaunchError(f"environment variable {name!r} contains a NUL byte")
        env = dict(req.env)
        env.setdefault("HOME", account.home)
        env.setdefault("USER", account.name)
        env.setdefault("LOGNAME", account.name)
        env.setdefault("PATH", _ROOT_PATH if account.uid == 0 else _USER_PATH)
        env.setdefault("SHELL", account.shell)
        env["PWD"] = os.path.abspath(req.workdir)
        return env

    def _wrapper_argv(self, cdir: str, command: Sequence[str]) -> list[str]:
        """The wrapper's argv (``command`` only ever travels as positional parameters), or ``command``
        itself for an executor without the wrapper."""
        if not self._wrapper:
            return list(command)
        return [self._shell, "-c", WRAPPER, WRAPPER_NAME, cdir, *command]

    def _spawn(
        self, req: LaunchRequest, cdir: str, command: list[str], env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        """Start a job that runs as the executor's own account: we open its files and workdir."""
        workdir = os.path.abspath(req.workdir)
        _make_dir(workdir, 0o700)
        fds: list[int] = []
        try:
            stdin = (
                self._open(workdir, req.stdin_path, os.O_RDONLY, fds) if req.stdin_path else self._dev_null()
            )
            stdout = self._open(workdir, req.stdout_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, fds)
            stderr = self._open(workdir, req.stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, fds)
            return subprocess.Popen(
                self._wrapper_argv(cdir, command),
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                cwd=workdir,
                env=env,
                close_fds=True,
                start_new_session=True,
            )
        finally:
            for fd in fds:
                os.close(fd)

    def _dev_null(self) -> int:
        """One /dev/null fd for the stdin of every job without a stdin file (launch is a hot path)."""
        with self._devnull_lock:  # launches may run in several threads
            if self._devnull is None:
                self._devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            return self._devnull

    @staticmethod
    def _open(workdir: str, path: Path, flags: int, fds: list[int]) -> int:
        """Open one of the job's files (relative to the workdir), remembering the fd to close it."""
        full = os.path.join(workdir, path)
        try:
            fd = os.open(full, flags | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise LaunchError(f"cannot open the job's file {full}: {exc.strerror}") from None
        fds.append(fd)
        return fd

    def _spawn_as(
        self, req: LaunchRequest, cdir: str, command: list[str], env: dict[str, str], account: _Account
    ) -> subprocess.Popen[bytes]:
        """Start a job as another account: the wrapper stays root, the setup shell runs as the user."""
        assert self._setpriv is not None
        workdir = os.path.abspath(req.workdir)
        self._make_workdir(workdir, account)
        user_files = [
            os.path.join(workdir, req.stdin_path) if req.stdin_path else "/dev/null",
            os.path.join(workdir, req.stdout_path),
            os.path.join(workdir, req.stderr_path),
        ]
        groups = ",".join(str(g) for g in account.groups)
        setpriv = [self._setpriv, f"--reuid={account.uid}", f"--regid={account.gid}"]
        setpriv.append(f"--groups={groups}" if groups else "--clear-groups")
        setup = [self._shell, "-c", SETUP, SETUP_NAME, self._mkdir, workdir, *user_files]
        argv = self._wrapper_argv(cdir, [*setpriv, "--", *setup, *command])
        env_fd = os.memfd_create("skyport-job-env", os.MFD_CLOEXEC)
        err_fd = -1
        try:
            os.write(env_fd, _shell_env(env))
            os.lseek(env_fd, 0, os.SEEK_SET)
            err_path = os.path.join(cdir, SETUP_ERR_FILE)
            err_fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            return subprocess.Popen(
                argv,
                stdin=env_fd,
                stdout=err_fd,
                stderr=err_fd,
                cwd="/",
                env={},
                close_fds=True,
                start_new_session=True,
            )
        finally:
            os.close(env_fd)
            if err_fd >= 0:
                os.close(err_fd)

    @staticmethod
    def _make_workdir(workdir: str, account: _Account) -> None:
        """Create a missing workdir (0700, owned by the job's user) when its parent is trusted.

        Inside a directory the user cannot write, we create and chown the workdir through a directory
        fd, with no race. Elsewhere (e.g. the user's home or /tmp) the setup shell creates it as the user.
        """
        if os.path.isdir(workdir):
            return
        parent, name = os.path.split(workdir)
        dir_fd = _open_dir_trusted(parent)
        if dir_fd is None:
            return
        # Made under a temporary name, given to the user, then renamed into place: a crash of the core
        # between the mkdir and the chown must not leave a root-owned workdir the job cannot enter.
        temporary = f".{name}.{secrets.token_hex(4)}.new"
        try:
            os.mkdir(temporary, 0o700, dir_fd=dir_fd)
            os.chown(temporary, account.uid, account.gid, dir_fd=dir_fd, follow_symlinks=False)
            os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.rmdir(temporary, dir_fd=dir_fd)
            if not os.path.isdir(workdir):  # not made meanwhile by a launch of the same job
                raise LaunchError(f"cannot create the job's workdir {workdir}: {exc.strerror}") from None
        finally:
            os.close(dir_fd)

    # ------------------------------------------------------------------------------- find, adopt, probe

    def adopt(self, handle: ProcessHandle) -> bool:
        """After a restart: is ``handle`` still our live wrapper? If so, :meth:`watch` works on it.

        Checks the pid's start time (pid reuse), its process group, that it is not a zombie (a zombie
        has ended: its status is in the control directory, see :meth:`probe`), and that it runs our
        wrapper for this control directory.
        """
        if handle.pgid != handle.pid:  # a wrapper always leads its own session and process group
            return False
        st = _read_stat(handle.pid)
        if st is None or st.start_ticks != handle.start_ticks or st.pgid != handle.pgid:
            return False
        if st.state in ("Z", "X", "x"):
            return False
        # a command line still empty means an exec in progress: pid, start time and group (a session
        # of its own, led by this very pid) already identify it
        return _is_our_wrapper(handle.pid, handle.control_dir) is not False

    def probe(self, control_dir: Path) -> ProcessHandle | ExitStatus | None:
        """What became of a launch whose handle was never recorded (a crash between launch and record).

        Returns the handle of a wrapper that still runs, the job's exit status if it ended, or None if
        nothing ever ran in ``control_dir``. A claim whose wrapper never wrote its pid and runs nowhere
        (the core died between claiming and forking) is such a launch that never happened: the claim is
        released so the job can be launched again — the wrapper writes its pid before the job starts, so
        no job ran. A wrapper that vanished without a status is ``lost``.
        """
        cdir = os.path.abspath(control_dir)
        data = _read_small(os.path.join(cdir, PID_FILE))
        if data is None:
            return None
        done = _status_from_file(cdir)
        if done is not None:
            return _setup_failure(cdir, done)
        if not data.strip():
            pid = _find_wrapper(cdir)
            st = _read_stat(pid) if pid is not None else None
            if pid is None or st is None:
                self._release_claim(cdir)
                return None
            return ProcessHandle(pid=pid, pgid=st.pgid, start_ticks=st.start_ticks, control_dir=cdir)
        if data.endswith(b"\n") and data.strip().isdigit():
            pid = int(data)
            st = _read_stat(pid)
            if st is not None and st.state not in ("Z", "X", "x") and _is_our_wrapper(pid, cdir) is True:
                return ProcessHandle(pid=pid, pgid=st.pgid, start_ticks=st.start_ticks, control_dir=cdir)
        # it may have finished between the two reads
        done = _status_from_file(cdir)
        return _setup_failure(cdir, done) if done is not None else ExitStatus.lost()

    # ----------------------------------------------------------------------------------------- watch

    def watch(self, handle: ProcessHandle, on_exit: Callable[[ProcessHandle, ExitStatus], None]) -> None:
        """Call ``on_exit(handle, status)`` once, on the loop thread, when the wrapper ends.

        Uses a pidfd registered with the loop: no thread, no polling, and it works for processes that
        are not our children (adopted after a restart). Our own children are reaped here.
        """
        loop = self._loop_for_call()
        key = (handle.pid, handle.start_ticks)
        if key in self._watches:
            raise RuntimeError(f"process {handle.pid} is already watched")
        w = _Watch(handle=handle, on_exit=on_exit)
        self._watches[key] = w
        try:
            w.pidfd = os.pidfd_open(handle.pid)
        except ProcessLookupError:
            w.pending = loop.call_soon(self._finish, w, self._exit_status(w, None))
            return
        if not self._is_child(handle) and not self._same_process(handle):
            # the pid was reused before we opened it: our process ended long ago
            os.close(w.pidfd)
            w.pidfd = None
            w.pending = loop.call_soon(self._finish, w, self._exit_status(w, None))
            return
        loop.add_reader(w.pidfd, self._on_pidfd, w)
        if key in self._timers:  # terminate() came first; the watch now owns the KILL timer
            w.kill_timer = self._timers.pop(key)
            w.kill_at = w.kill_timer.when()

    def _is_child(self, handle: ProcessHandle) -> bool:
        """True if ``handle`` is our own unreaped child (so its pid is surely still its own)."""
        child = self._children.get(handle.pid)
        return child is not None and child[1] == handle.start_ticks

    @staticmethod
    def _same_process(handle: ProcessHandle) -> bool:
        """True while the pid still belongs to the handle's process (zombie included)."""
        st = _read_stat(handle.pid)
        return st is not None and st.start_ticks == handle.start_ticks and st.pgid == handle.pgid

    def _loop_for_call(self) -> asyncio.AbstractEventLoop:
        """The executor's loop; watch/terminate must run on it."""
        if self._closed:
            raise RuntimeError("the process executor is closed")
        running = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = running
        elif self._loop is not running:
            raise RuntimeError("the process executor belongs to another event loop")
        return self._loop

    def _on_pidfd(self, w: _Watch) -> None:
        """The wrapper ended: clean its group, reap it if it is our child, and report."""
        assert w.pidfd is not None
        try:
            peek = os.waitid(os.P_PIDFD, w.pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            peek = None  # not our child (adopted): it has ended, since the pidfd is readable
        else:
            if peek is None:  # spurious wake-up of our still running child
                return
        self._clean_group(w, is_child=peek is not None)
        result = None
        if peek is not None:
            with contextlib.suppress(ChildProcessError):
                result = os.waitid(os.P_PIDFD, w.pidfd, os.WEXITED | os.WNOHANG)
            self.forget_child(w.handle.pid, result)
        self._finish(w, self._exit_status(w, result))

    def _clean_group(self, w: _Watch, *, is_child: bool) -> None:
        """KILL what the job left running in its process group, while its group id is still ours.

        The group id stays ours while the wrapper is an unreaped zombie. For our child we reap only
        afterwards; for an adopted process we check the zombie is still there just before. A wrapper
        already reaped by someone else leaves its group id unprotected, so we leave that group alone.
        """
        if not self._kill_leftovers:
            return
        if not is_child and not self._same_process(w.handle):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(w.handle.pgid, signal.SIGKILL)

    def forget_child(self, pid: int, result: os.waitid_result | None) -> int | None:
        """Tell subprocess that its child ``pid`` was reaped (by us, or by the launcher that uses this
        executor), so it never waits for a pid that may be reused; returns the child's return code
        (negative: killed by that signal), or None without a wait result."""
        proc, _ = self._children.pop(pid, (None, 0))
        if result is None:
            return None
        code = result.si_status if result.si_code == os.CLD_EXITED else -result.si_status
        if proc is not None:
            proc.returncode = code
        return code

    @staticmethod
    def _exit_status(w: _Watch, result: os.waitid_result | None) -> ExitStatus:
        """The status file if the wrapper wrote one, else its wait status if we reaped it, else lost."""
        cdir = w.handle.control_dir
        status = _status_from_file(cdir)
        if status is None:
            status = _wait_status(result) if result is not None else ExitStatus.lost()
        return _setup_failure(cdir, status)

    def _finish(self, w: _Watch, status: ExitStatus) -> None:
        """Release everything the watch holds, then call the caller's callback exactly once."""
        if w.done:
            return
        w.done = True
        self._release(w)
        self._watches.pop((w.handle.pid, w.handle.start_ticks), None)
        w.on_exit(w.handle, status)

    def _release(self, w: _Watch) -> None:
        """Give back the pidfd and cancel the timers of a watch that is over (or abandoned by close)."""
        if w.pidfd is not None:
            if self._loop is not None:
                self._loop.remove_reader(w.pidfd)
            os.close(w.pidfd)
            w.pidfd = None
        if w.kill_timer is not None:
            w.kill_timer.cancel()
            w.kill_timer = None
        if w.pending is not None:
            w.pending.cancel()
            w.pending = None

    # ------------------------------------------------------------------------------------- terminate

    def terminate(self, handle: ProcessHandle, grace_s: float) -> None:
        """SIGTERM the job's whole process group now, SIGKILL it after ``grace_s`` if the wrapper lives.

        Never blocks. The wrapper survives the TERM (it records the job's status); a KILL ends it too,
        and then the status is the wrapper's own (killed by SIGKILL).
        """
        loop = self._loop_for_call()
        key = (handle.pid, handle.start_ticks)
        w = self._watches.get(key)
        if w is not None and w.done:
            return
        if w is None and not self._still_ours(handle):
            return
        self._mark_cancelled(handle)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(handle.pgid, signal.SIGTERM)
        when = loop.time() + max(0.0, grace_s)
        if w is not None:
            if when < w.kill_at:
                if w.kill_timer is not None:
                    w.kill_timer.cancel()
                w.kill_at = when
                w.kill_timer = loop.call_at(when, self._escalate, handle)
        elif key not in self._timers:
            self._timers[key] = loop.call_at(when, self._escalate, handle)

    @staticmethod
    def _mark_cancelled(handle: ProcessHandle) -> None:
        """Write the ``cancel`` file, so that a job whose process has not started yet never starts.

        It must exist before the TERM is sent (see :func:`_wrapper_text`).
        """
        path = os.path.join(handle.control_dir, CANCEL_FILE)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
        except OSError as exc:  # the TERM still goes out; only a job just starting could miss it
            log.warning("cannot mark %s as cancelled: %s", handle.control_dir, exc)

    def _still_ours(self, handle: ProcessHandle) -> bool:
        """True while the handle's wrapper exists (zombie included), so its group id is still ours."""
        return self._is_child(handle) or self._same_process(handle)

    def _escalate(self, handle: ProcessHandle) -> None:
        """The grace period is over: KILL the group if the wrapper has not ended."""
        key = (handle.pid, handle.start_ticks)
        self._timers.pop(key, None)
        w = self._watches.get(key)
        if w is not None:
            w.kill_timer = None
            if w.done:
                return
        elif not self._still_ours(handle):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(handle.pgid, signal.SIGKILL)

    # ----------------------------------------------------------------------------------------- close

    def close(self) -> None:
        """Stop watching; the jobs keep running and a new executor can adopt them.

        No ``on_exit`` callback runs after this. Children still running are left to ``subprocess``,
        which reaps them later so that they do not stay zombies.
        """
        self._closed = True
        for w in list(self._watches.values()):
            w.done = True
            self._release(w)
        self._watches.clear()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._children.clear()
        if self._devnull is not None:
            os.close(self._devnull)
            self._devnull = None
