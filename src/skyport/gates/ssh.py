"""The ``ssh`` gate, ``direct`` mode: jobs run on hosts reached over SSH, with nothing installed there.

For login nodes and workstations where no daemon of ours may run (DESIGN §4). The core holds one SSH
connection per host and login (asyncssh, key authentication, host keys checked against the remote's
``known_hosts`` — an unknown or changed key is refused, never learnt), reuses it for everything, and opens
it again when it drops. All a host needs is a POSIX ``sh``, ``setsid`` (util-linux), ``kill``, ``find``
and an SFTP subsystem.

How a job runs on a host. :meth:`SSHGate.launch` sends one shell script (on the stdin of ``/bin/sh -s``,
so the login shell never parses anything of ours) that writes the job's files into a *control
directory* ``<workroot>/.control/<job>.<attempt>`` and starts::

    setsid /bin/sh CONTROL/wrapper CONTROL /bin/sh CONTROL/run

detached, in a session and process group of its own: the job survives SSH disconnects and restarts of
the core. The wrapper (:data:`WRAPPER`, the local gate's wrapper plus a clean-up) writes its pid (= the
job's process group) to ``CONTROL/pid``, runs ``CONTROL/run`` (cd to the workdir, source the job's
environment, open stdin/stdout/stderr, exec the job), then writes the job's ``$?`` to ``CONTROL/status``
and KILLs what the job left in its process group, as the local gate does. User text (argv, script,
environment, paths) reaches the host only as single-quoted words of these generated files.

Tracking. One poller per gate sends, per host and login, one status script per pass for all the jobs it
watches (not one command per job), fetches what the jobs' stdout/stderr gained since the last pass over
SFTP into the core's spool (``JobLaunch.attempt_dir``, so :meth:`~SSHGate.log_path` is a local file and
``skyport logs -f`` works), and reports ends through ``watch``'s callback after the last bytes are in.
A restarted core finds its jobs again from the control files (:meth:`~SSHGate.recover`).

The login runs the job, so the job can write its own control files: nothing there is a privilege
boundary (the job is that user's), unlike the local gate's root-owned control directories.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import math
import os
import posixpath
import re
import shlex
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import asyncssh
import structlog

from skyport.gates.base import Exit, ExitCallback, GateError, Handle, JobLaunch, Recovered, TunnelLink
from skyport.gates.process import CANCEL_FILE, WRAPPER_SIGNALS, ExitStatus
from skyport.models import Node
from skyport.server.settings import SSHHost, SSHRemoteSettings

log = structlog.get_logger(__name__)

#: Bytes of one stream fetched per pass (the rest comes on the next one; all of it at the end).
LOG_CHUNK = 4 * 1024 * 1024
#: Bytes read at once when bringing outputs back (memory stays bounded whatever the file size).
COPY_CHUNK = 4 * 1024 * 1024
#: Longest wait for one command on a host (a busy login node can be slow to fork).
COMMAND_TIMEOUT_S = 60.0
KEEPALIVE_S = 15.0
#: Longest wait between two status passes to a host that cannot be reached.
MAX_BACKOFF_S = 30.0
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: ``/bin/sh CONTROL/wrapper CONTROL JOB_ARGV...``: the local gate's wrapper (see
#: :func:`skyport.gates.process._wrapper_text` for why each line is as it is), plus a last line that KILLs
#: whatever the job left running in its process group (the wrapper itself included, its status written).
WRAPPER = (
    f"trap : {WRAPPER_SIGNALS}\n"
    "exec 3>&2 2>/dev/null\n"
    'echo "$$" >"$1/pid"\n'
    f"(trap - {WRAPPER_SIGNALS}\n"
    f'[ ! -e "$1/{CANCEL_FILE}" ] || exit 143\n'
    'shift; exec 2>&3 3>&-; exec "$@")\n'
    'set -- "$1" "$?"\n'
    'echo "$2" >"$1/status"\n'
    "kill -s KILL 0\n"
)

#: Shell functions of the status, recover and cancel scripts (builtins only on the per-job path of a
#: pass, no fork). ``alive P``: pid P exists and is not a zombie (an ended wrapper waits to be reaped by
#: init, which may take a while). ``ours P C``: P is C's live wrapper (not a reused pid). ``st I C
#: [check]`` prints job I's state: ``exit N`` (+ ``setup TEXT``), ``running PID``, ``killed``, ``lost``,
#: ``unstarted`` or ``missing``.
_FUNCTIONS = r"""
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  [ -r "/proc/$1/stat" ] || return 0
  l=; read -r l <"/proc/$1/stat" 2>/dev/null
  case "$l" in *") Z "*|*") X "*) return 1;; esac
}
ours() {
  alive "$1" || return 1
  if [ -r "/proc/$1/cmdline" ]; then grep -qF -- "$2/wrapper" "/proc/$1/cmdline"
  else ps -o args= -p "$1" 2>/dev/null | grep -qF -- "$2/wrapper"; fi
}
done_line() {
  read -r s <"$2/status" || [ -n "$s" ] || return 1
  echo "$1 exit $s"
  if [ "$s" != 0 ] && [ -s "$2/setup.err" ]; then
    printf '%s setup ' "$1"; head -c 2000 "$2/setup.err" | tr '\n\r' '  '; echo
  fi
}
st() {
  s=; p=
  if [ -s "$2/status" ] && done_line "$1" "$2"; then return; fi
  [ -s "$2/pid" ] && read -r p <"$2/pid"
  if [ -n "$p" ]; then
    if [ "$3" = check ]; then ours "$p" "$2" && { echo "$1 running $p"; return; }
    elif alive "$p"; then echo "$1 running $p"; return; fi
  fi
  if [ -s "$2/status" ] && done_line "$1" "$2"; then return; fi
  if [ -e "$2/killed" ]; then echo "$1 killed"
  elif [ ! -d "$2" ]; then echo "$1 missing"
  elif [ -z "$p" ]; then echo "$1 unstarted"
  else echo "$1 lost"; fi
}
"""

#: Run detached by the cancel script: ``sh -c ESCALATE skyport-kill GRACE CONTROL PID``. It outlives the
#: SSH session and the core, so a job that ignores TERM is KILLed even if the core restarts meanwhile.
ESCALATE = (
    'sleep "$1"; [ ! -e "$2/status" ] || exit 0; kill -0 "$3" 2>/dev/null || exit 0; '
    'grep -qF -- "$2/wrapper" "/proc/$3/cmdline" 2>/dev/null || exit 0; '
    ': >"$2/killed"; kill -s KILL -- "-$3"'
)


def _q(text: str) -> str:
    return shlex.quote(text)


def _join(base: str, path: str) -> str:
    """``path`` on the host: absolute as given, else relative to ``base``."""
    return posixpath.normpath(posixpath.join(base, path))


def _match(pattern: list[str], parts: list[str]) -> bool:
    """Does a relative path (``parts``) match a glob pattern (``pattern``, split at ``/``)?

    The semantics of ``glob.glob(pattern, recursive=True)`` used by the local gate: ``*`` stays within
    one name, ``**`` spans any number of directories, and wildcards do not match names starting with a
    dot unless the pattern's name does.
    """
    if not pattern:
        return not parts
    head = pattern[0]
    if head == "**":
        if _match(pattern[1:], parts):
            return True
        return bool(parts) and not parts[0].startswith(".") and _match(pattern, parts[1:])
    if not parts:
        return False
    name = parts[0]
    if name.startswith(".") and not head.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, head) and _match(pattern[1:], parts[1:])


def select_outputs(patterns: Iterable[str], files: Iterable[str]) -> list[str]:
    """The files (relative paths) that the output patterns name, in pattern order, each once."""
    available = sorted(files)
    chosen: dict[str, None] = {}
    for pattern in patterns:
        split = [p for p in pattern.split("/") if p not in ("", ".")]
        for rel in available:
            if _match(split, rel.split("/")):
                chosen.setdefault(rel, None)
    return list(chosen)


# ------------------------------------------------------------------------------------------- connections


class SSHLink:
    """One SSH connection to one host as one login: opened on first use, reused, reopened when dropped.

    Public: the agent mode (:mod:`skyport.gates.ssh_agent`) reaches its hosts the same way.
    """

    def __init__(self, settings: SSHRemoteSettings, host: SSHHost, login: str) -> None:
        self._settings = settings
        self.host = host
        self.login = login
        self.where = f"{login}@{host.host}" + (f":{host.port}" if host.port != 22 else "")
        self.home = ""
        self._conn: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_conn: asyncssh.SSHClientConnection | None = None  # the connection _sftp runs on
        self._lock = asyncio.Lock()
        #: The poller's back-off while the host cannot be reached (launch and cancel always try).
        self.failures = 0
        self.retry_at = 0.0

    def _alive(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def connection(self) -> asyncssh.SSHClientConnection:
        if self._alive():
            assert self._conn is not None
            return self._conn
        async with self._lock:
            if not self._alive():
                await self._connect()
            assert self._conn is not None
            return self._conn

    async def _connect(self) -> None:
        self.drop()
        known_hosts = self._settings.known_hosts
        if not known_hosts.is_file():
            raise GateError(
                f"remote {self._settings.name}: known_hosts file {known_hosts} does not exist; host keys "
                "are never accepted blindly: put the hosts' keys there (ssh-keyscan, then verify them)"
            )
        if not self._settings.key_file.is_file():
            raise GateError(
                f"remote {self._settings.name}: key file {self._settings.key_file} does not exist"
            )
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(
                    self.host.host,
                    self.host.port,
                    username=self.login,
                    client_keys=[str(self._settings.key_file)],
                    known_hosts=str(known_hosts),
                    config=None,  # never the core account's ~/.ssh/config
                    agent_path=None,  # nor its ssh-agent: the configured key only
                    x509_trusted_certs=None,
                    preferred_auth="publickey",
                    keepalive_interval=KEEPALIVE_S,
                    keepalive_count_max=3,
                    connect_timeout=self._settings.connect_timeout_s,
                    login_timeout=self._settings.connect_timeout_s,
                ),
                self._settings.connect_timeout_s * 2,
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            raise GateError(
                f"host {self.where} refused: its host key is not in {known_hosts} or does not match the "
                f"key recorded there ({exc.reason}). If the host was reinstalled, verify its new key "
                "and update known_hosts; otherwise someone may be impersonating it"
            ) from None
        except asyncssh.PermissionDenied as exc:
            raise GateError(
                f"host {self.where} refused the login with key {self._settings.key_file}: {exc.reason} "
                "(is the public key in that account's authorized_keys?)"
            ) from None
        except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
            raise GateError(
                f"remote {self._settings.name}: cannot use key file {self._settings.key_file}: {exc} "
                "(it must be an unencrypted private key: the core has no one to type a passphrase)"
            ) from None
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            raise GateError(f"cannot reach host {self.where}: {_text(exc)}") from None
        self._conn = conn
        try:
            home = await conn.run("/bin/sh -s", input="cd && pwd -P\n", check=False)
        except (asyncssh.Error, OSError) as exc:
            self.drop()
            raise GateError(f"host {self.where}: {_text(exc)}") from None
        out = _str(home.stdout).strip()
        if home.exit_status != 0 or not out.startswith("/"):
            self.drop()
            text = _str(home.stderr).strip()
            raise GateError(f"host {self.where}: cannot find the login's home directory: {text}")
        self.home = out
        log.info("connected", host=self.where)

    async def sftp(self) -> asyncssh.SFTPClient:
        conn = await self.connection()
        if self._sftp is None or self._sftp_conn is not conn:
            try:
                self._sftp = await conn.start_sftp_client()
            except (asyncssh.Error, OSError) as exc:
                self.drop()
                raise GateError(f"host {self.where}: cannot start SFTP: {_text(exc)}") from None
            self._sftp_conn = conn
        return self._sftp

    async def run(self, script: str, what: str) -> asyncssh.SSHCompletedProcess:
        """Run ``script`` with ``/bin/sh -s`` on the host; a lost connection is dropped for a new one."""
        conn = await self.connection()
        try:
            return await asyncio.wait_for(
                conn.run("/bin/sh -s", input=script, check=False, errors="replace"), COMMAND_TIMEOUT_S
            )
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            self.drop()
            raise GateError(f"{what} on {self.where} failed: {_text(exc)}") from None

    async def check(self, script: str, what: str) -> str:
        """Like :meth:`run`; a non-zero exit is a :class:`GateError` with the host's text."""
        done = await self.run(script, what)
        if done.exit_status != 0:
            text = _str(done.stderr).strip() or f"exit status {done.exit_status}"
            raise GateError(f"{what} on {self.where} failed: {text}")
        return _str(done.stdout)

    def drop(self) -> None:
        """Forget the connection (closing it if open); the next use opens a new one."""
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._sftp = None
        self._sftp_conn = None

    async def close(self) -> None:
        conn = self._conn
        self.drop()
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 5)


def _str(data: object) -> str:
    """A command's output as text (asyncssh types it loosely)."""
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data if isinstance(data, str) else ""


def _bytes(data: object) -> bytes:
    """What an SFTP file opened in binary mode returned."""
    assert isinstance(data, bytes)
    return data


def _text(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.Error):
        return exc.reason or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------------------------- the gate


@dataclass
class _Watch:
    """A job the poller follows: where its files are and how much of its logs we have."""

    job_id: str
    handle: Handle
    on_exit: ExitCallback
    offsets: dict[str, int] = field(default_factory=dict)


class SSHGate:
    """Executor gate for an ``ssh`` remote in ``direct`` mode (see the module's docstring)."""

    kind = "ssh"

    def __init__(self, settings: SSHRemoteSettings) -> None:
        if settings.mode != "direct":
            raise ValueError(
                f"remote {settings.name}: SSHGate runs mode 'direct' only, not {settings.mode!r}"
            )
        self._settings = settings
        self._hosts = {h.name or h.host: h for h in settings.hosts}
        self._links: dict[tuple[str, str], SSHLink] = {}
        self._capacity: dict[str, tuple[int, int]] = {}
        #: node name -> why it is down (could not be reached at start)
        self.problems: dict[str, str] = {}
        self._watches: dict[str, _Watch] = {}
        #: control dir -> (handle, grace) of cancels that could not reach their host yet
        self._pending_cancels: dict[str, tuple[Handle, float]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    # -- life ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to every host (as the remote's ``user``) and learn what capacity was not declared.

        A host that cannot be reached is offered as a node that is ``down``; the reason is in
        :attr:`problems` and the core's log.
        """
        await asyncio.gather(*(self._probe(name, host) for name, host in self._hosts.items()))

    async def _probe(self, name: str, host: SSHHost) -> None:
        link = self._link(name, self._settings.user)
        script = (
            "nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1\n"
            "sed -n 's/^MemTotal: *\\([0-9]*\\) kB.*/\\1/p' /proc/meminfo 2>/dev/null\n"
        )
        try:
            out = (await link.check(script, "asking the host's capacity")).split()
        except GateError as exc:
            self.problems[name] = str(exc)
            log.error("ssh host is down", remote=self._settings.name, node=name, error=str(exc))
            return
        cpus = int(out[0]) if out and out[0].isdigit() else 1
        mem = int(out[1]) * 1024 if len(out) > 1 and out[1].isdigit() else 0
        self._capacity[name] = (host.cpus or cpus, host.mem or mem)
        self.problems.pop(name, None)

    async def close(self) -> None:
        """Stop polling and close the connections; the jobs keep running on their hosts."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        self._watches.clear()
        await asyncio.gather(*(link.close() for link in self._links.values()))

    # -- capacity ------------------------------------------------------------------------------------

    def nodes(self, remote_id: str, partition_id: str) -> list[Node]:
        found = []
        for name, host in self._hosts.items():
            cpus, mem = self._capacity.get(name, (host.cpus or 1, host.mem or 0))
            found.append(
                Node(
                    id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"skyport:ssh:{self._settings.name}:{name}")),
                    name=name,
                    host=host.host,
                    ip=host.host,
                    remote_id=remote_id,
                    partition_id=partition_id,
                    state_power="up" if name in self._capacity else "down",
                    cpus=cpus,
                    mem=mem,
                    gpus=host.gpus,
                    labels=dict(host.labels),
                )
            )
        return found

    # -- where things are ----------------------------------------------------------------------------

    def _link(self, node: str, login: str) -> SSHLink:
        host = self._hosts.get(node)
        if host is None:
            raise GateError(f"remote {self._settings.name} has no host named {node!r}")
        link = self._links.get((node, login))
        if link is None:
            link = self._links[(node, login)] = SSHLink(self._settings, host, login)
        return link

    def _login(self, owner: str) -> str:
        return self._settings.user_map.get(owner, self._settings.user)

    def _job_link(self, job: JobLaunch) -> SSHLink:
        if not job.node_names:
            raise GateError(f"job {job.job_id} was placed on no node")
        return self._link(job.node_names[0], self._login(job.owner))

    def _handle_link(self, handle: Handle) -> SSHLink:
        return self._link(str(handle["node"]), str(handle["login"]))

    def _handle(self, job: JobLaunch, link: SSHLink) -> Handle:
        """Where everything of this attempt is, on the host and here (deterministic: recover rebuilds it)."""
        workroot = _join(link.home, self._settings.workroot.removeprefix("~/"))
        name = f"{job.job_id}.{job.attempt}"
        spec = job.spec
        workdir = _join(link.home, spec.workdir) if spec.workdir else _join(workroot, name)
        return {
            "node": job.node_names[0],
            "login": link.login,
            "control_dir": _join(workroot, f".control/{name}"),
            "workdir": workdir,
            "stdin": _join(workdir, spec.stdin) if spec.stdin else "/dev/null",
            "remote_stdout": _join(workdir, spec.stdout or "stdout.log"),
            "remote_stderr": _join(workdir, spec.stderr or "stderr.log"),
            "stdout": str(job.attempt_dir / "stdout.log"),
            "stderr": str(job.attempt_dir / "stderr.log"),
        }

    async def open_port(self, handle: Handle, port: int) -> TunnelLink:
        """A TCP stream to ``port`` on the job's host, through the SSH connection (``direct-tcpip``)."""
        link = self._handle_link(handle)
        conn = await link.connection()
        try:
            reader, writer = await conn.open_connection("127.0.0.1", port, encoding=None)
        except asyncssh.ChannelOpenError as exc:
            raise GateError(f"nothing answers on port {port} of {link.host.host}: {exc.reason}") from None
        except (asyncssh.Error, OSError) as exc:
            link.drop()
            raise GateError(f"cannot reach port {port} of {link.where}: {_text(exc)}") from None
        return _SSHTunnel(reader, writer)

    def log_path(self, handle: Handle, stream: str) -> Path | None:
        value = handle.get(stream) if stream in ("stdout", "stderr") else None
        return Path(value) if value else None

    # -- staging -------------------------------------------------------------------------------------

    async def stage_in(self, job: JobLaunch) -> None:
        """Upload each of ``job.input_paths`` (a file, or a directory copied whole) into the workdir.

        Each file goes to a ``.part`` name first and is renamed once its size is complete: a job never
        sees a partial input.
        """
        files, directories = await asyncio.to_thread(_input_files, job.inputs_dir, job.input_paths)
        link = self._job_link(job)
        await link.connection()
        workdir = self._handle(job, link)["workdir"]
        dirs = sorted({_join(workdir, d) for d in directories} | {workdir})
        await link.check(
            "umask 077\ncd || exit 1\nmkdir -p -- " + " ".join(_q(d) for d in dirs) + "\n",
            "creating the job's working directory",
        )
        sftp = await link.sftp()
        for rel, size in files.items():
            target = _join(workdir, rel)
            part = posixpath.join(posixpath.dirname(target), f".{posixpath.basename(target)}.part")
            try:
                await sftp.put(str(job.inputs_dir / rel), part, preserve=True)
                got = (await sftp.stat(part)).size
                if got != size:
                    raise GateError(f"input {rel!r} arrived with {got} of {size} bytes on {link.where}")
                await sftp.posix_rename(part, target)
            except (asyncssh.Error, OSError) as exc:
                link.drop()
                raise GateError(f"uploading input {rel!r} to {link.where} failed: {_text(exc)}") from None

    async def stage_out(self, job: JobLaunch, handle: Handle) -> list[tuple[str, int, str]]:
        """Bring back the regular files of the workdir matching ``job.output_patterns``, with sha256.

        The listing is ``find`` without ``-L``: a symlink (to a file or a directory) is never followed,
        so nothing outside the workdir is copied.
        """
        patterns = job.output_patterns
        if not patterns:
            return []
        if "workdir" not in handle:  # ended before its handle was recorded (a crash at launch)
            link = self._job_link(job)
            await link.connection()
            handle = self._handle(job, link)
        link = self._handle_link(handle)
        workdir = str(handle["workdir"])
        done = await link.run(f"cd -- {_q(workdir)} && find . -type f -print0\n", "listing the output files")
        if done.exit_status != 0:
            text = _str(done.stderr).strip()
            raise GateError(f"cannot list the job's files in {workdir} on {link.where}: {text}")
        names = [n.removeprefix("./") for n in _str(done.stdout).split("\0") if n]
        if any("\ufffd" in n for n in names):
            log.warning("output files with names that are not UTF-8 are not brought back", host=link.where)
            names = [n for n in names if "\ufffd" not in n]
        found: list[tuple[str, int, str]] = []
        sftp = await link.sftp()
        for rel in select_outputs(patterns, names):
            try:
                size, digest = await _fetch(sftp, _join(workdir, rel), job.outputs_dir / rel)
            except (asyncssh.Error, OSError) as exc:
                raise GateError(
                    f"bringing back output {rel!r} from {link.where} failed: {_text(exc)}"
                ) from None
            found.append((rel, size, digest))
        return found

    # -- running -------------------------------------------------------------------------------------

    async def launch(self, job: JobLaunch) -> Handle:
        link = self._job_link(job)
        await link.connection()
        handle = self._handle(job, link)
        script = self._launch_script(job, handle)
        out = await link.check(script, f"starting job {job.job_id}")
        pid = out.strip().splitlines()[-1] if out.strip() else ""
        handle["pid"] = int(pid) if pid.isdigit() else None
        await asyncio.to_thread(job.attempt_dir.mkdir, parents=True, exist_ok=True)
        return handle

    def _launch_script(self, job: JobLaunch, handle: Handle) -> str:
        spec = job.spec
        for name, value in job.env.items():
            if not _ENV_NAME.fullmatch(name) or "\0" in value:
                raise GateError(f"environment variable {name!r} is not valid (letters, digits, _)")
        env = "".join(f"export {name}={_q(value)}\n" for name, value in job.env.items())
        cdir, workdir = str(handle["control_dir"]), str(handle["workdir"])
        if spec.command is not None:
            command = "exec " + " ".join(_q(a) for a in spec.command)
        else:
            script_path = posixpath.join(cdir, "job-script")
            assert spec.script is not None
            command = (
                f"exec {_q(script_path)}"
                if spec.script.startswith("#!")
                else f"exec /bin/sh {_q(script_path)}"
            )
        run = (
            f"cd -- {_q(workdir)} || exit 125\n"
            "unset OLDPWD\n"
            f"export PWD={_q(workdir)}\n"
            f"command . {_q(posixpath.join(cdir, 'env'))} || exit 125\n"
            f"command exec <{_q(str(handle['stdin']))} >>{_q(str(handle['remote_stdout']))} "
            f"2>>{_q(str(handle['remote_stderr']))} || exit 125\n"
            f"{command}\n"
        )
        files = {"wrapper": WRAPPER, "env": env, "run": run}
        if spec.script is not None:
            files["job-script"] = spec.script
        writes = "".join(f'printf %s {_q(text)} >"$C/{name}" || exit 1\n' for name, text in files.items())
        return (
            "u=$(umask); umask 077\n"  # our files and the workdir private; the job gets the login's umask
            "cd || exit 1\n"
            f"C={_q(cdir)}\n"
            f"mkdir -p -- {_q(posixpath.dirname(cdir))} || exit 1\n"
            'if ! mkdir -- "$C" 2>/dev/null; then\n'
            '  if [ -e "$C/pid" ]; then echo "this attempt was started already ($C)" >&2; exit 3; fi\n'
            "fi\n"
            f"mkdir -p -- {_q(workdir)} || exit 1\n"
            f"{writes}"
            '[ ! -e "$C/job-script" ] || chmod 700 "$C/job-script" || exit 1\n'
            "command -v setsid >/dev/null 2>&1 || "
            "{ echo 'the host has no setsid command (util-linux)' >&2; exit 4; }\n"
            'umask "$u"\n'
            'setsid /bin/sh "$C/wrapper" "$C" /bin/sh "$C/run" </dev/null >/dev/null 2>"$C/setup.err" &\n'
            "p=$!\n"
            # Return once the wrapper has recorded itself, so that a crash of the core after this finds
            # a pid file (recover() adopts it). Spin while the wrapper starts (a few ms); should setsid
            # have forked (then $! is gone at once), wait a little longer.
            'while [ ! -s "$C/pid" ] && kill -0 "$p" 2>/dev/null; do :; done\n'
            "n=0\n"
            'while [ ! -s "$C/pid" ] && [ "$n" -lt 300 ]; do sleep 0.01; n=$((n+1)); done\n'
            'if [ ! -s "$C/pid" ]; then\n'
            '  echo "the job\'s wrapper did not start: $(cat "$C/setup.err" 2>/dev/null)" >&2; exit 5\n'
            "fi\n"
            'read -r p <"$C/pid"; echo "$p"\n'
        )

    def watch(self, job_id: str, handle: Handle, on_exit: ExitCallback) -> None:
        offsets = {s: _local_size(Path(str(handle[s]))) for s in ("stdout", "stderr")}
        self._watches[job_id] = _Watch(job_id, handle, on_exit, offsets)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(
                self._poll_forever(), name=f"ssh-poller-{self._settings.name}"
            )
        self._wake.set()

    async def cancel(self, handle: Handle, grace_s: float) -> None:
        """TERM the job's process group now; a detached helper on the host KILLs it after ``grace_s``.

        If the host cannot be reached, the cancel is kept and sent by the poller once it can (the
        loops ask only once), and the caller still gets the error.
        """
        link = self._handle_link(handle)
        cdir = str(handle["control_dir"])
        grace = f"{max(0.0, math.ceil(grace_s * 10) / 10):g}"
        script = (
            f"{_FUNCTIONS}\ncd || exit 1\nC={_q(cdir)}\n"
            '[ -d "$C" ] && [ ! -e "$C/status" ] || exit 0\n'
            ': >"$C/cancel"\n'
            'p=; [ -s "$C/pid" ] && read -r p <"$C/pid"\n'
            '[ -n "$p" ] && ours "$p" "$C" || exit 0\n'
            'kill -s TERM -- "-$p" 2>/dev/null\n'
            f'setsid /bin/sh -c {_q(ESCALATE)} skyport-kill {grace} "$C" "$p" '
            "</dev/null >/dev/null 2>&1 &\n"
        )
        try:
            await link.check(script, "canceling the job")
        except GateError:
            self._pending_cancels[cdir] = (handle, grace_s)
            raise
        self._pending_cancels.pop(cdir, None)
        self._wake.set()

    async def recover(self, job: JobLaunch, handle: Handle | None) -> Recovered:
        """Find the attempt from its control files: running (re-adopted), ended (with its status), or
        never started. An unreachable host keeps a known attempt "running": the poller tries again."""
        try:
            link = self._handle_link(handle) if handle else self._job_link(job)
            await link.connection()
        except GateError as exc:
            log.warning("ssh host unreachable during recovery", job_id=job.job_id, error=str(exc))
            return Recovered(handle=handle, exit=None)
        rebuilt = handle or self._handle(job, link)
        cdir = str(rebuilt["control_dir"])
        try:
            out = await link.check(
                f"{_FUNCTIONS}\ncd || exit 1\nst 0 {_q(cdir)} check\n", "looking for the job"
            )
        except GateError as exc:
            log.warning("ssh recovery failed", job_id=job.job_id, error=str(exc))
            return Recovered(handle=handle, exit=None)
        state, exit = _parse_status(out, link.where).get(0, ("missing", None))
        if state == "running":
            return Recovered(handle=rebuilt, exit=None)
        if state in ("missing", "unstarted"):
            if state == "unstarted":  # a launch cut short before its wrapper ran: start afresh
                await link.run(f"rm -rf -- {_q(cdir)}\n", "clearing an unstarted launch")
            return Recovered(handle=None, exit=None)
        assert exit is not None
        watch = _Watch(job.job_id, rebuilt, lambda _j, _e: None)
        await asyncio.to_thread(job.attempt_dir.mkdir, parents=True, exist_ok=True)
        watch.offsets = {s: _local_size(Path(str(rebuilt[s]))) for s in ("stdout", "stderr")}
        with contextlib.suppress(GateError):
            await self._fetch_logs(link, watch, final=True)
        return Recovered(handle=None, exit=exit)

    # -- the poller ----------------------------------------------------------------------------------

    async def _poll_forever(self) -> None:
        while self._watches:
            self._wake.clear()
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ssh status pass failed", remote=self._settings.name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.poll_interval_s)

    async def poll_once(self) -> None:
        """One status pass: one command per host and login, logs fetched, ends reported."""
        groups: dict[tuple[str, str], list[_Watch]] = {}
        for w in self._watches.values():
            groups.setdefault((str(w.handle["node"]), str(w.handle["login"])), []).append(w)
        await asyncio.gather(*(self._poll_link(self._link(*key), ws) for key, ws in groups.items()))

    async def _poll_link(self, link: SSHLink, watches: list[_Watch]) -> None:
        now = asyncio.get_running_loop().time()
        if link.retry_at > now:
            return
        lines = "".join(f"st {i} {_q(str(w.handle['control_dir']))}\n" for i, w in enumerate(watches))
        try:
            out = await link.check(f"{_FUNCTIONS}\ncd || exit 1\n{lines}", "checking jobs")
            states = _parse_status(out, link.where)
        except GateError as exc:
            if link.failures == 0:
                log.warning("ssh host unreachable; its jobs keep running there", error=str(exc))
            link.failures += 1
            backoff = min(MAX_BACKOFF_S, self._settings.poll_interval_s * 2**link.failures)
            link.retry_at = asyncio.get_running_loop().time() + backoff
            return
        if link.failures:
            log.info("ssh host reachable again", host=link.where)
            link.failures, link.retry_at = 0, 0.0
        for handle, grace in [
            p for w in watches if (p := self._pending_cancels.get(str(w.handle["control_dir"])))
        ]:
            with contextlib.suppress(GateError):
                await self.cancel(handle, grace)
        ended: list[tuple[_Watch, Exit]] = []
        fetches = []
        for i, w in enumerate(watches):
            state, exit = states.get(i, ("missing", None))
            if exit is None and state == "missing":
                exit = Exit(None, None, "lost", f"the job's control files vanished from {link.where}")
            if exit is not None:
                ended.append((w, exit))
            else:
                fetches.append(self._fetch_logs(link, w, final=False))
        results = await asyncio.gather(*fetches, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, GateError):
                raise r
        for w, exit in ended:
            try:
                await self._fetch_logs(link, w, final=True)
            except GateError as exc:
                log.warning("could not fetch the last logs of a job", job_id=w.job_id, error=str(exc))
                continue  # next pass tries again; the end is reported with complete logs
            if self._watches.get(w.job_id) is w:
                del self._watches[w.job_id]
                self._pending_cancels.pop(str(w.handle["control_dir"]), None)
                w.on_exit(w.job_id, exit)

    async def _fetch_logs(self, link: SSHLink, w: _Watch, *, final: bool) -> None:
        """Append what the job's stdout/stderr on the host gained to the local copies."""
        sftp = await link.sftp()
        for stream in ("stdout", "stderr"):
            remote = str(w.handle[f"remote_{stream}"])
            local = Path(str(w.handle[stream]))
            offset = w.offsets.get(stream, 0)
            budget = None if final else LOG_CHUNK
            try:
                async with sftp.open(remote, "rb") as f:
                    while budget is None or budget > 0:
                        size = LOG_CHUNK if budget is None else min(LOG_CHUNK, budget)
                        data = _bytes(await f.read(size, offset))
                        if not data:
                            break
                        await asyncio.to_thread(_append, local, data)
                        offset += len(data)
                        if budget is not None:
                            budget -= len(data)
            except asyncssh.SFTPNoSuchFile:
                pass  # not created (yet), or the job sent it elsewhere
            except (asyncssh.Error, OSError) as exc:
                link.drop()
                raise GateError(f"reading the job's {stream} on {link.where}: {_text(exc)}") from None
            w.offsets[stream] = offset


class _SSHTunnel:
    """A forwarded TCP connection on the host, as one end of a port-forwarding tunnel."""

    CHUNK = 256 * 1024

    def __init__(self, reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]) -> None:
        self._reader = reader
        self._writer = writer

    async def send_bytes(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def receive_bytes(self) -> bytes | None:
        try:
            data = await self._reader.read(self.CHUNK)
        except (asyncssh.Error, OSError):
            return None
        return data or None

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


def _parse_status(out: str, where: str) -> dict[int, tuple[str, Exit | None]]:
    """The status script's lines -> {index: (state, exit or None while it runs)}."""
    found: dict[int, tuple[str, Exit | None]] = {}
    setup: dict[int, str] = {}
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) < 2 or not parts[0].isdigit():
            continue
        index, state = int(parts[0]), parts[1]
        rest = parts[2] if len(parts) > 2 else ""
        if state == "setup":
            setup[index] = rest.strip()
            continue
        exit: Exit | None = None
        if state == "exit":
            code = rest.strip()
            status = (
                ExitStatus.from_shell_status(int(code))
                if code.isdigit()
                else ExitStatus(None, None, "lost", f"unreadable exit status {code!r} on {where}")
            )
            exit = Exit(status.exit_code, status.signal, status.reason, status.message)
        elif state == "killed":
            status = ExitStatus.killed(9)
            exit = Exit(status.exit_code, status.signal, status.reason, status.message)
        elif state == "lost":
            exit = Exit(None, None, "lost", f"the job's process on {where} ended without an exit status")
        found[index] = (state, exit)
    for index, text in setup.items():
        state, exit = found.get(index, ("exit", None))
        if exit is not None and text:
            found[index] = (
                state,
                Exit(exit.exit_code, exit.signal, "setup_failed", f"the job could not be started: {text}"),
            )
    return found


def _input_files(root: Path, names: list[str]) -> tuple[dict[str, int], set[str]]:
    """The files to upload (relative path -> size) and the directories to make for ``names``.

    A name is a file or a directory under ``root`` (the core's own copies); symlinks are not followed.
    """
    files: dict[str, int] = {}
    dirs: set[str] = set()
    for name in names:
        source = root / name
        if source.is_file() and not source.is_symlink():
            files[name] = source.stat().st_size
            dirs.add(posixpath.dirname(name))
        elif source.is_dir() and not source.is_symlink():
            dirs.add(name)
            for dirpath, subdirs, children in os.walk(source):
                base = Path(dirpath).relative_to(root).as_posix()
                dirs.update(posixpath.join(base, d) for d in subdirs)
                for child in children:
                    path = Path(dirpath) / child
                    if path.is_file() and not path.is_symlink():
                        files[posixpath.join(base, child)] = path.stat().st_size
        else:
            raise GateError(f"input {name!r} is missing from the job's inputs on the core")
    return files, dirs


def _local_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _append(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(data)


async def _fetch(sftp: asyncssh.SFTPClient, remote: str, target: Path) -> tuple[int, str]:
    """Stream one file from the host into ``target`` (via a ``.part`` file); return (size, sha256)."""
    await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    digest = hashlib.sha256()
    size = 0
    dst = await asyncio.to_thread(open, tmp, "wb")
    try:
        async with sftp.open(remote, "rb") as src:
            while chunk := _bytes(await src.read(COPY_CHUNK)):
                await asyncio.to_thread(_write_hashed, dst, digest, chunk)
                size += len(chunk)
    finally:
        dst.close()
    await asyncio.to_thread(os.replace, tmp, target)
    return size, digest.hexdigest()


def _write_hashed(dst: BinaryIO, digest: hashlib._Hash, chunk: bytes) -> None:
    digest.update(chunk)
    dst.write(chunk)
