"""The ``local`` gate: runs jobs as processes on the machine of the core.

Jobs run as the Unix account mapped to their owner (see :class:`UserMapper`), each in its own process
group and working directory. Process handling is :mod:`skyport.gates.process`, shared with the node
agent; this module adds what is specific to "here": the node description, user mapping, and files that
move by plain copies.
"""

from __future__ import annotations

import asyncio
import errno
import glob
import hashlib
import os
import pwd
import shutil
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from skyport.gates.base import (
    Exit,
    ExitCallback,
    GateError,
    Handle,
    JobLaunch,
    Recovered,
    StreamTunnel,
    TunnelLink,
)
from skyport.gates.launcher import Launcher, LauncherGone, read_record
from skyport.gates.process import (
    ExitStatus,
    LaunchError,
    LaunchRequest,
    ProcessExecutor,
    ProcessHandle,
    kill_orphaned_group,
    read_exit_status,
)
from skyport.models import Node
from skyport.server.settings import LocalGateSettings

COPY_CHUNK = 1024 * 1024


def machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


ACCOUNT_TTL_S = 60.0
#: Threads that start jobs. A start is mostly system calls that wait on the filesystem (directories and
#: files made for the job, the fork and exec of its wrapper: ~1-2 ms on a busy disk), so a few threads
#: overlap them and the event loop never waits for one.
LAUNCH_THREADS = 4


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


class UserMapper:
    """Which Unix account runs a Sky Port user's jobs.

    A core that is not root runs every job as its own account (a single-user install). A root core uses
    the configured map, then an account of the same name, then the configured default; it never picks
    root unless ``allow_root`` is set.
    """

    def __init__(self, settings: LocalGateSettings) -> None:
        self._settings = settings
        # Sky Port user -> (expiry, account): a lookup may go to LDAP, and launching is a hot path.
        self._cache: dict[str, tuple[float, Account | None]] = {}

    def account(self, user: str) -> Account | None:
        """The account that runs ``user``'s jobs, or None for "the core's own account"."""
        now = time.monotonic()
        cached = self._cache.get(user)
        if cached is not None and cached[0] > now:
            return cached[1]
        account = self._lookup(user)
        self._cache[user] = (now + ACCOUNT_TTL_S, account)
        return account

    def _lookup(self, user: str) -> Account | None:
        if os.geteuid() != 0:
            return None
        candidates = [self._settings.user_map.get(user), user, self._settings.default_user]
        for name in candidates:
            if not name:
                continue
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            if entry.pw_uid == 0 and not self._settings.allow_root:
                continue
            return Account(name, entry.pw_uid, entry.pw_gid)
        raise GateError(
            f"no Unix account to run jobs of Sky Port user {user!r}: create an account of that name, or "
            f"set local.user_map.{user} or local.default_user in skyport.toml"
        )


class LocalGate:
    kind = "local"

    def __init__(
        self,
        settings: LocalGateSettings,
        workroot: Path,
        *,
        private_inputs: bool = False,
        launcher: bool = False,
    ) -> None:
        """``private_inputs``: each attempt's inputs directory is its own (the node agent's), so input
        files are moved into the working directory rather than copied (the core's are shared).

        ``launcher``: jobs are started by the work root's launcher process (:mod:`skyport.gates.launcher`:
        one exec per job, the core's way) rather than each under a wrapper shell forked from this
        process (the node agent's way: fifty agents of a simulated cloud share a process, and a
        launcher each would be fifty more processes).
        """
        self._private_inputs = private_inputs
        self._settings = settings
        self._users = UserMapper(settings)
        self._workroot = workroot = workroot.absolute()
        workroot.mkdir(parents=True, exist_ok=True, mode=0o711)
        #: watches what the launcher cannot: jobs of a wrapper (the node agent's, or a core before the
        #: launcher) and cancels of them
        self._executor = ProcessExecutor(allow_root=settings.allow_root)
        self._launcher = Launcher(workroot, allow_root=settings.allow_root) if launcher else None
        self._launch_threads = ThreadPoolExecutor(
            max_workers=LAUNCH_THREADS, thread_name_prefix="local-launch"
        )

    # -- capacity ------------------------------------------------------------------------------------

    def nodes(self, remote_id: str, partition_id: str) -> list[Node]:
        host = socket.gethostname()
        return [
            Node(
                id=str(uuid.uuid5(uuid.NAMESPACE_DNS, f"skyport-local-{host}")),
                name=host,
                host=host,
                ip="127.0.0.1",
                remote_id=remote_id,
                partition_id=partition_id,
                cpus=self._settings.cpus or os.cpu_count() or 1,
                mem=self._settings.mem or machine_memory(),
                gpus=self._settings.gpus,
            )
        ]

    # -- paths ---------------------------------------------------------------------------------------

    def _workdir(self, job: JobLaunch) -> Path:
        if job.spec.workdir:
            return Path(job.spec.workdir)
        return self._workroot / f"{job.job_id}.{job.attempt}"

    def _control_dir(self, job: JobLaunch) -> Path:
        return self._workroot / ".control" / f"{job.job_id}.{job.attempt}"

    @staticmethod
    def _in_workdir(workdir: Path, name: str | None, default: str) -> Path:
        path = Path(name or default)
        return path if path.is_absolute() else workdir / path

    def _owner_ids(self, job: JobLaunch) -> tuple[int, int] | None:
        account = self._users.account(job.owner)
        return None if account is None else (account.uid, account.gid)

    def _prepare_dirs(self, job: JobLaunch) -> Path:
        workdir = self._workdir(job)
        ids = self._owner_ids(job)
        workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if ids is not None:
            os.chown(workdir, *ids)
        return workdir

    # -- staging -------------------------------------------------------------------------------------

    async def stage_in(self, job: JobLaunch) -> None:
        workdir = await asyncio.to_thread(self._prepare_dirs, job)
        ids = self._owner_ids(job)
        for name in job.input_paths:
            source = job.inputs_dir / name
            await asyncio.to_thread(_make_parents, workdir, name, ids)
            if source.is_dir() and not source.is_symlink():
                await asyncio.to_thread(_copy_tree, source, workdir / name, ids)
            elif source.is_file() and self._private_inputs:
                await asyncio.to_thread(_move_file, source, workdir / name, ids)
            elif source.is_file():
                await asyncio.to_thread(_copy_file, source, workdir / name, ids)
            else:
                raise GateError(f"input {name!r} is missing from the job's inputs on the core")

    async def stage_out(self, job: JobLaunch, handle: Handle) -> list[tuple[str, int, str]]:
        return await asyncio.to_thread(
            _collect_outputs,
            Path(handle["workdir"]),
            job.output_patterns,
            job.outputs_dir,
            handle.get("uid"),
        )

    # -- running -------------------------------------------------------------------------------------

    async def launch(self, job: JobLaunch) -> Handle:
        """Start the job: through the launcher, or in one of the launch threads (many launches awaited
        together overlap)."""
        if self._launcher is None:
            return await asyncio.get_running_loop().run_in_executor(self._launch_threads, self._launch, job)
        request, uid = self._request(job)
        try:
            started = await self._launcher.launch(request)
        except (LaunchError, LauncherGone) as exc:
            raise GateError(str(exc)) from exc
        if isinstance(started, int):  # the program could not be executed: the job ends at once
            return {**self._handle(request, uid), "process": None, "not_run": started}
        return {**self._handle(request, uid), "process": started.to_dict(), "launcher": True}

    def _launch(self, job: JobLaunch) -> Handle:
        try:
            request, uid = self._request(job)
            process = self._executor.launch(request)
        except (LaunchError, OSError) as exc:
            raise GateError(str(exc)) from exc
        return {**self._handle(request, uid), "process": process.to_dict()}

    def _request(self, job: JobLaunch) -> tuple[LaunchRequest, int | None]:
        """What the executor or the launcher needs to start ``job``, and the uid it runs as."""
        workdir = self._workdir(job)  # the executor creates it, safely, as the job's account
        account = self._users.account(job.owner)
        spec = job.spec
        request = LaunchRequest(
            job_id=job.job_id,
            attempt=job.attempt,
            workdir=workdir,
            control_dir=self._control_dir(job),
            argv=spec.command,
            script=spec.script,
            env=job.env,
            stdout_path=self._in_workdir(workdir, spec.stdout, "stdout.log"),
            stderr_path=self._in_workdir(workdir, spec.stderr, "stderr.log"),
            stdin_path=self._in_workdir(workdir, spec.stdin, "") if spec.stdin else None,
            run_as=account.name if account else None,
        )
        return request, account.uid if account else None

    @staticmethod
    def _handle(request: LaunchRequest, uid: int | None) -> Handle:
        return {
            "workdir": str(request.workdir),
            "stdout": str(request.stdout_path),
            "stderr": str(request.stderr_path),
            "uid": uid,
        }

    def watch(self, job_id: str, handle: Handle, on_exit: ExitCallback) -> None:
        def _ended(status: ExitStatus) -> None:
            on_exit(job_id, _gate_exit(status))

        if handle.get("process") is None:  # never ran (see launch)
            status = ExitStatus.from_shell_status(int(handle["not_run"]))
            asyncio.get_running_loop().call_soon(_ended, status)
            return
        process = ProcessHandle.from_dict(handle["process"])
        if self._launcher is not None and handle.get("launcher"):
            self._launcher.watch(process, lambda code: _ended(self._launched_status(process, code)))
        else:
            self._executor.watch(process, lambda _, status: _ended(status))

    @staticmethod
    def _launched_status(process: ProcessHandle, code: int | None) -> ExitStatus:
        """How a launcher's job ended: its status, else its launch record's, else (the launcher died and
        the job may still run with no one to record its end) it is lost and what is left is killed."""
        if code is None:
            record = read_record(process.control_dir)
            code = record.status if record is not None else None
        status = read_exit_status(process.control_dir, code) if code is not None else None
        if status is not None:
            return status
        kill_orphaned_group(process)
        return ExitStatus(
            exit_code=None,
            signal=None,
            reason="lost",
            message="the launcher that ran the job ended unexpectedly; the job's processes were stopped",
        )

    async def recover(self, job: JobLaunch, handle: Handle | None) -> Recovered:
        if handle is not None and handle.get("process") is None and "not_run" in handle:
            return Recovered(
                handle=None, exit=_gate_exit(ExitStatus.from_shell_status(int(handle["not_run"])))
            )
        if handle is not None and not handle.get("launcher"):
            process = ProcessHandle.from_dict(handle["process"])
            if self._executor.adopt(process):  # a wrapper's job
                return Recovered(handle=handle, exit=None)
        if self._launcher is not None:
            return await self._recover_launched(job)
        found = self._executor.probe(self._control_dir(job))
        if found is None:
            return Recovered(handle=None, exit=None)
        if isinstance(found, ProcessHandle):
            request, uid = self._request(job)
            rebuilt = {**self._handle(request, uid), "process": found.to_dict()}
            if self._executor.adopt(found):
                return Recovered(handle=rebuilt, exit=None)
            return Recovered(
                handle=None, exit=Exit(None, None, "lost", "the job's process could not be found")
            )
        return Recovered(handle=None, exit=_gate_exit(found))

    async def _recover_launched(self, job: JobLaunch) -> Recovered:
        """After a restart of the core: ask the launcher, then the job's launch record."""
        assert self._launcher is not None
        cdir = self._control_dir(job)
        try:
            running = await self._launcher.query(cdir)
        except LauncherGone as exc:
            raise GateError(f"cannot reach the launcher: {exc}") from exc
        if running is not None:
            request, uid = self._request(job)
            return Recovered(
                handle={**self._handle(request, uid), "process": running.to_dict(), "launcher": True},
                exit=None,
            )
        record = read_record(str(cdir))
        if record is None:
            return Recovered(handle=None, exit=None)  # never launched: launch it now
        if record.process is not None:
            return Recovered(
                handle=None, exit=_gate_exit(self._launched_status(record.process, record.status))
            )
        # claimed but never started by a live launcher: one died while starting it, and it may have run
        return Recovered(
            handle=None,
            exit=Exit(None, None, "lost", "the launcher ended while starting the job; it may have run"),
        )

    async def cancel(self, handle: Handle, grace_s: float) -> None:
        if handle.get("process") is None:
            return  # never ran
        process = ProcessHandle.from_dict(handle["process"])
        if self._launcher is not None and handle.get("launcher"):
            try:
                await self._launcher.terminate(process, grace_s)
            except LauncherGone as exc:
                raise GateError(f"cannot reach the launcher: {exc}") from exc
        else:
            self._executor.terminate(process, grace_s)

    def log_path(self, handle: Handle, stream: str) -> Path | None:
        value = handle.get(stream)
        return Path(value) if value else None

    async def open_port(self, handle: Handle, port: int) -> TunnelLink:
        return await StreamTunnel.connect("127.0.0.1", port)

    def close(self) -> None:
        self._launch_threads.shutdown(wait=True)
        if self._launcher is not None:
            self._launcher.close()
        self._executor.close()


def _gate_exit(status: ExitStatus) -> Exit:
    """The executor's account of an end, as the gate interface reports it."""
    return Exit(status.exit_code, status.signal, status.reason, status.message)


def _collect_outputs(
    workdir: Path, patterns: list[str], outputs_dir: Path, owner_uid: int | None
) -> list[tuple[str, int, str]]:
    """Copy the files matching ``patterns`` out of ``workdir``; return (name, size, sha256) of each.

    Never follows a job's symlink out of its workdir nor copies a file the job's account does not own:
    the core may run as root, and what is copied goes back to the job's owner.
    """
    workdir = workdir.resolve()
    found: list[tuple[str, int, str]] = []
    for pattern in patterns:
        for rel in sorted(glob.glob(pattern, root_dir=workdir, recursive=True)):
            path = (workdir / rel).resolve()
            if not path.is_relative_to(workdir) or not path.is_file():
                continue
            if owner_uid is not None and path.stat().st_uid != owner_uid:
                continue
            size, digest = _copy_file(path, outputs_dir / rel, None)
            found.append((rel, size, digest))
    return found


def _make_parents(workdir: Path, name: str, owner: tuple[int, int] | None) -> None:
    """The directories of ``name`` inside ``workdir``, owned by the job's account (it writes there)."""
    directory = workdir
    for part in Path(name).parts[:-1]:
        directory = directory / part
        if not directory.exists():
            directory.mkdir(mode=0o700)
            if owner is not None:
                os.chown(directory, *owner)


def _copy_tree(source: Path, target: Path, owner: tuple[int, int] | None) -> None:
    """Copy a fetched input directory (the core's own files: no links) file by file, as ``owner``."""
    for path in [source, *sorted(source.rglob("*"))]:
        dest = target / path.relative_to(source)
        if path.is_dir() and not path.is_symlink():
            dest.mkdir(parents=True, exist_ok=True, mode=0o700)
            if owner is not None:
                os.chown(dest, *owner)
        elif path.is_file() and not path.is_symlink():
            _copy_file(path, dest, owner)


def _move_file(source: Path, target: Path, owner: tuple[int, int] | None) -> None:
    """Move a file into place (given to ``owner``); copy when it is on another filesystem."""
    try:
        if owner is not None:
            os.chown(source, *owner)
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_file(source, target, owner)


def _copy_file(source: Path, target: Path, owner: tuple[int, int] | None) -> tuple[int, str]:
    """Copy in chunks (bounded memory) and return (size, sha256)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    tmp = target.with_name(f".{target.name}.part")
    with open(source, "rb") as src, open(tmp, "wb") as dst:
        while chunk := src.read(COPY_CHUNK):
            digest.update(chunk)
            dst.write(chunk)
            size += len(chunk)
    shutil.copymode(source, tmp)
    if owner is not None:
        os.chown(tmp, *owner)
    os.replace(tmp, target)
    return size, digest.hexdigest()
