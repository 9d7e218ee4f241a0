"""The ``slurm`` gate: Sky Port jobs on a Slurm cluster, which schedules them itself (DESIGN §4).

A slurm remote is *self-scheduling* (:class:`~skyport.gates.base.SelfSchedulingGate`): the core's
scheduler forwards a job that asks for it at once, without placing it (server/scheduler/forwarding.py),
and Slurm decides where and when it runs. The job is ``scheduled`` with Slurm's reason in its
``state_details`` ("Pending: Resources") until Slurm starts it, then ``running`` on Slurm's nodes.

Submission. :meth:`SlurmGate.launch_many` gets every job the execution loop launches in one pass and
groups them: jobs of one cluster login with the same ``sbatch`` options (nodes, CPUs, memory, GPUs,
walltime, partition, QoS, account, dependencies) become *one* Slurm job array, whatever their Sky Port
origin — the tasks of a Sky Port array, or unrelated jobs of the same shape. One batch script carries
every task (a ``case`` on ``SLURM_ARRAY_TASK_ID``), so nothing has to be copied to the cluster first and
slurmrestd (which moves no files) works the same. A task writes its control directory's ``status`` (its
exit code) at the end: the answer when Slurm has forgotten a job (``MinJobAge``, no accounting).
Dependencies on jobs of the same cluster become ``--dependency=afterok:…/afterany:…`` on the Slurm ids
this gate gave them (with ``--kill-on-invalid-dep``, so a failed dependency ends the dependent job).

Identity. Every call is made as the job owner's own cluster login (``users`` in the settings, or the
login of the same name): a root core runs the commands as that login (``setpriv``), over SSH it logs in
with that user's key, with slurmrestd it sends that user's JWT. There is no shared account.

Tracking. One poller per gate asks Slurm once per pass about every tracked job (``squeue --json`` for
all of them, the text format on versions without ``--json``, or one ``GET /jobs``), reports starts and
reasons through ``watch_progress``, ends through ``watch``, fetches logs over SFTP into the core's spool
when the cluster is remote, and sends cancels in batches (``scancel a b c``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import posixpath
import pwd
import re
import shlex
import uuid
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import structlog

from skyport.gates.base import (
    Exit,
    ExitCallback,
    GateError,
    Handle,
    JobLaunch,
    Progress,
    ProgressCallback,
    Recovered,
    Submitted,
    TunnelLink,
)
from skyport.gates.local import _collect_outputs, _copy_file, _copy_tree, _make_parents
from skyport.gates.process import ExitStatus
from skyport.gates.slurm_access import (
    CORE_LOGIN,
    Backend,
    CommandBackend,
    Inventory,
    LocalShell,
    RestBackend,
    Shell,
    SlurmJob,
    SSHShell,
    Submission,
    expand_hostlist,
    ssh_settings,
)
from skyport.gates.ssh import SSHGate
from skyport.models import Node
from skyport.models.job import parse_array
from skyport.server.settings import SlurmRemoteSettings

log = structlog.get_logger(__name__)

#: Job labels that choose Slurm's partition, QoS and account for one job (else the remote's defaults).
PARTITION_LABEL = "slurm.partition"
QOS_LABEL = "slurm.qos"
ACCOUNT_LABEL = "slurm.account"
PENDING = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"})
ACTIVE = frozenset(
    {"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESIZING"}
)
#: Passes a tracked job may be missing from Slurm's answer before its status file decides.
MISSES = 3
#: Slurm ids remembered for dependencies (a job's dependents may be submitted after it ended).
KNOWN_IDS = 100_000
MIB = 1024 * 1024
LOG_CHUNK = 4 * MIB
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _q(text: str) -> str:
    return shlex.quote(text)


def _walltime(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


@dataclass
class _Watch:
    job_id: str
    handle: Handle
    on_exit: ExitCallback
    started: bool = False
    said: str = ""  # the last progress text reported
    misses: int = 0
    offsets: dict[str, int] = field(default_factory=dict)


@dataclass
class _Task:
    """One job of a submission: where its files are, and its piece of the batch script."""

    job: JobLaunch
    login: str
    paths: dict[str, str]
    options: dict[str, str]
    pack: str = ""
    index: int = 0


class SlurmGate:
    """Executor gate for a ``slurm`` remote (see the module's docstring)."""

    kind = "slurm"
    self_scheduling = True
    partition_label = PARTITION_LABEL

    def __init__(self, settings: SlurmRemoteSettings) -> None:
        self._settings = settings
        self._keys = {
            u.login: u.key_file or (settings.key_dir / u.login if settings.key_dir else None)
            for u in settings.users.values()
        }
        if settings.host is not None:
            missing = [login for login, key in self._keys.items() if key is None]
            if settings.known_hosts is None or missing:
                raise ValueError(
                    f"remote {settings.name}: a login host needs known_hosts and a key per user "
                    f"(key_file, or key_dir/<login>); none for {', '.join(missing) or '-'}"
                )
        keys = {login: key for login, key in self._keys.items() if key is not None}
        self._shell: Shell | None = None
        self._backend: Backend
        if settings.submit == "rest":
            tokens = {u.login: u.token_file for u in settings.users.values() if u.token_file}
            self._backend = RestBackend(settings, tokens)
        else:
            self._shell = SSHShell(settings, keys) if settings.host else LocalShell(settings)
            self._backend = CommandBackend(settings, self._shell)
        self._ssh_files = SSHShell(settings, keys) if settings.host else None
        self._file_gates: dict[str, SSHGate] = {}
        self._local_shell = LocalShell(settings)
        self.inventory = Inventory((), "")
        self.version = ""
        self.problem = ""
        self._homes: dict[str, str] = {}
        self._watches: dict[str, _Watch] = {}
        self._progress: ProgressCallback | None = None
        self._ids: OrderedDict[str, str] = OrderedDict()  # Sky Port job id -> Slurm id
        self._cancels: dict[str, set[str]] = defaultdict(set)  # login -> Slurm ids to cancel
        self._poller: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    # -- life ----------------------------------------------------------------------------------------

    def _service_login(self) -> str:
        """Who reads the cluster's nodes and version: the core itself here, else the first user."""
        if self._settings.submit == "commands" and self._settings.host is None:
            return CORE_LOGIN
        if not self._settings.users:
            raise GateError(f"remote {self._settings.name}: no users are configured")
        return next(iter(self._settings.users.values())).login

    async def start(self) -> None:
        """Detect Slurm's version (the status format follows it) and read its partitions and nodes.

        An unreachable cluster is recorded in :attr:`problem`; its nodes stay unknown until a restart.
        """
        try:
            login = self._service_login()
            self.version = await self._backend.detect(login)
            self.inventory = await self._backend.inventory(login)
        except GateError as exc:
            self.problem = str(exc)
            log.error("slurm cluster unreachable", remote=self._settings.name, error=str(exc))
            return
        log.info("slurm cluster", remote=self._settings.name, version=self.version)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        with contextlib.suppress(Exception):
            await self._flush_cancels()
        self._watches.clear()
        await self._backend.close()
        if self._ssh_files is not None:
            await self._ssh_files.close()

    # -- capacity ------------------------------------------------------------------------------------

    @property
    def default_partition(self) -> str:
        return self._settings.partition or self.inventory.default_partition

    def partitions(self) -> list[str]:
        """The cluster's partitions (each a static Sky Port partition of this remote)."""
        return sorted({p for n in self.inventory.nodes for p in n.partitions})

    def nodes(self, remote_id: str, partition_id: str) -> list[Node]:
        """The cluster's nodes, as Slurm describes them (shown, never placed on by our scheduler)."""
        return [
            Node(
                id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"skyport:slurm:{self._settings.name}:{n.name}")),
                name=n.name,
                host=n.name,
                remote_id=remote_id,
                partition_id=partition_id,
                state_power="up" if n.up else "down",
                cpus=n.cpus,
                mem=n.mem,
                gpus=n.gpus,
            )
            for n in self.inventory.nodes
        ]

    def node_partitions(self) -> dict[str, str]:
        """Node name -> the first partition it is in (a Sky Port node belongs to one partition)."""
        return {n.name: n.partitions[0] for n in self.inventory.nodes if n.partitions}

    # -- identities and paths ------------------------------------------------------------------------

    def _login(self, owner: str) -> str:
        user = self._settings.users.get(owner)
        if user is not None:
            return user.login
        if self._settings.same_name_logins:
            return owner
        raise GateError(
            f"Sky Port user {owner!r} has no identity on Slurm remote {self._settings.name}: an "
            f"administrator adds it under users.{owner} (its own login, key or token)"
        )

    async def _home(self, login: str) -> str:
        home = self._homes.get(login)
        if home is None:
            if self._ssh_files is not None:
                home = await self._ssh_files.home(login)
            else:
                home = await self._local_shell.home(login)
            self._homes[login] = home
        return home

    async def _paths(self, job: JobLaunch, login: str) -> dict[str, str]:
        """Where everything of this attempt is on the cluster (deterministic: recovery rebuilds it)."""
        home = await self._home(login)
        root = posixpath.join(home, self._settings.workroot.replace("{login}", login).removeprefix("~/"))
        name = f"{job.job_id}.{job.attempt}"
        spec = job.spec
        workdir = posixpath.join(home, spec.workdir) if spec.workdir else posixpath.join(root, name)
        remote_out = posixpath.join(workdir, spec.stdout or "stdout.log")
        remote_err = posixpath.join(workdir, spec.stderr or "stderr.log")
        local = self._ssh_files is None
        return {
            "control_base": posixpath.join(root, ".control"),
            "control_dir": posixpath.join(root, ".control", name),
            "workdir": workdir,
            "stdin": posixpath.join(workdir, spec.stdin) if spec.stdin else "/dev/null",
            "remote_stdout": remote_out,
            "remote_stderr": remote_err,
            "stdout": remote_out if local else str(job.attempt_dir / "stdout.log"),
            "stderr": remote_err if local else str(job.attempt_dir / "stderr.log"),
        }

    def _options(self, job: JobLaunch) -> dict[str, str]:
        """``sbatch`` options for the job's resources and placement wishes."""
        spec = job.spec
        labels = spec.labels
        o = {"nodes": str(spec.nodes), "ntasks-per-node": "1", "cpus-per-task": str(spec.cpus)}
        if spec.mem:
            o["mem"] = f"{math.ceil(spec.mem / MIB)}M"
        if spec.gpus:
            o["gres"] = f"gpu:{spec.gpus}"
        walltime = spec.walltime or self._settings.default_walltime
        if walltime:
            o["time"] = _walltime(walltime)
        partition = labels.get(PARTITION_LABEL) or self._settings.partition
        qos = labels.get(QOS_LABEL) or self._settings.qos
        account = labels.get(ACCOUNT_LABEL) or (
            self._settings.account_map.get(spec.account or "") or self._settings.account
        )
        for key, value in (("partition", partition), ("qos", qos), ("account", account)):
            if value:
                o[key] = value
        if spec.exclusive:
            o["exclusive"] = ""
        return o

    # -- submission ----------------------------------------------------------------------------------

    async def launch(self, job: JobLaunch) -> Handle:
        result = (await self.launch_many([job]))[0]
        if isinstance(result, GateError):
            raise result
        return result.handle

    async def launch_many(self, jobs: list[JobLaunch]) -> list[Submitted | GateError]:
        """Submit ``jobs``: packed into one Slurm array per login and shape; dependent jobs in rounds,
        once the Slurm ids of the jobs they wait for (maybe in this very batch) are known."""
        results: dict[str, Submitted | GateError] = {}
        tasks: list[_Task] = []
        for job in jobs:
            try:
                login = self._login(job.owner)
                tasks.append(_Task(job, login, await self._paths(job, login), self._options(job)))
            except GateError as exc:
                results[job.job_id] = exc
        waiting = tasks
        while waiting:
            ready, later = [], []
            in_batch = {t.job.job_id for t in waiting}
            for task in waiting:
                deps = [*task.job.spec.depends, *task.job.spec.depends_any]
                failed = [d for d in deps if isinstance(results.get(d), GateError)]
                if failed:
                    results[task.job.job_id] = GateError(f"its dependency {failed[0]} could not be submitted")
                elif any(d in in_batch for d in deps):
                    later.append(task)
                else:
                    dependency = self._dependency(task.job)
                    if dependency:
                        task.options = {
                            **task.options,
                            "dependency": dependency,
                            "kill-on-invalid-dep": "yes",
                        }
                    ready.append(task)
            if not ready:  # a cycle within the batch: cannot happen for jobs the scheduler forwarded
                for task in later:
                    results[task.job.job_id] = GateError("its dependencies form a cycle")
                break
            await self._submit(ready, results)
            waiting = later
        return [results[j.job_id] for j in jobs]

    def _dependency(self, job: JobLaunch) -> str:
        """Slurm's ``--dependency`` for the job's dependencies on jobs this gate submitted. Others were
        met already: the scheduler forwards a job only then, or when they run on this cluster."""
        parts = []
        for kind, deps in (("afterok", job.spec.depends), ("afterany", job.spec.depends_any)):
            ids = [self._ids[d] for d in deps if d in self._ids]
            if ids:
                parts.append(f"{kind}:{':'.join(ids)}")
        return ",".join(parts)

    async def _submit(self, tasks: list[_Task], results: dict[str, Submitted | GateError]) -> None:
        groups: dict[tuple[str, tuple[tuple[str, str], ...], str, int | None], list[_Task]] = defaultdict(
            list
        )
        for task in tasks:
            throttle = _throttle(task.job)
            array = task.job.env.get("SKYPORT_ARRAY_ID", "") if throttle else ""
            key = (task.login, tuple(sorted(task.options.items())), array, throttle)
            groups[key].append(task)
        packs: dict[str, list[tuple[list[_Task], Submission]]] = defaultdict(list)
        for (login, _, _, throttle), members in groups.items():
            for start in range(0, len(members), self._settings.pack_limit):
                pack = members[start : start + self._settings.pack_limit]
                pack_id = uuid.uuid4().hex[:16]
                for i, task in enumerate(pack):
                    task.pack, task.index = pack_id, i
                packs[login].append((pack, self._submission(pack, throttle)))
        await asyncio.gather(*(self._submit_login(login, items, results) for login, items in packs.items()))

    async def _submit_login(
        self,
        login: str,
        items: list[tuple[list[_Task], Submission]],
        results: dict[str, Submitted | GateError],
    ) -> None:
        for pack, _ in items:
            await asyncio.to_thread(_write_markers, pack)
        try:
            await self._ensure_dirs(login, sorted({t.paths["control_base"] for p, _ in items for t in p}))
            answers = await self._backend.submit(login, [sub for _, sub in items])
        except GateError as exc:
            answers = [exc] * len(items)
        for (pack, sub), answer in zip(items, answers, strict=True):
            arrayed = "array" in sub.options
            for task in pack:
                if isinstance(answer, GateError):
                    results[task.job.job_id] = answer
                    continue
                slurm_id = f"{answer}_{task.index}" if arrayed else answer
                handle: Handle = {
                    "slurm_id": slurm_id,
                    "base": answer,
                    "login": login,
                    "pack": task.pack,
                    "index": task.index,
                    **task.paths,
                }
                self._remember(task.job.job_id, slurm_id)
                version = f" ({self.version})" if self.version else ""
                results[task.job.job_id] = Submitted(
                    handle, f"Submitted to Slurm{version} as job {slurm_id}, user {login}"
                )

    async def _ensure_dirs(self, login: str, dirs: list[str]) -> None:
        """The control directories Slurm writes its own output into (they must exist before a start)."""
        script = "umask 077\nmkdir -p -- " + " ".join(_q(d) for d in dirs) + "\n"
        if self._ssh_files is not None:
            code, _, err = await self._ssh_files.run(login, script, "creating the control directory")
        else:
            code, _, err = await self._local_shell.run(login, script, "creating the control directory")
        if code != 0:
            raise GateError(f"cannot create {', '.join(dirs)} as {login}: {err.strip()}")

    def _remember(self, job_id: str, slurm_id: str) -> None:
        self._ids[job_id] = slurm_id
        self._ids.move_to_end(job_id)
        while len(self._ids) > KNOWN_IDS:
            self._ids.popitem(last=False)

    def _submission(self, pack: list[_Task], throttle: int | None) -> Submission:
        first = pack[0]
        names = {t.job.spec.name for t in pack}
        name = names.pop() if len(names) == 1 and first.job.spec.name else f"skyport-{first.job.job_id[:8]}"
        arrayed = len(pack) > 1 or "SKYPORT_ARRAY_ID" in first.job.env
        base = first.paths["control_base"]
        options = {
            "job-name": name[:200],
            "comment": f"skyport:{first.pack}",
            "chdir": base,
            "output": posixpath.join(base, "slurm-%A_%a.out" if arrayed else "slurm-%j.out"),
            **first.options,
        }
        if arrayed:
            options["array"] = f"0-{len(pack) - 1}" + (f"%{throttle}" if throttle else "")
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": posixpath.dirname(base)}
        return Submission(options, _batch_script(pack), env)

    # -- staging -------------------------------------------------------------------------------------

    def _file_gate(self, login: str) -> SSHGate:
        gate = self._file_gates.get(login)
        if gate is None:
            key = self._keys.get(login)
            if key is None:
                raise GateError(f"remote {self._settings.name}: no SSH key for login {login!r}")
            gate = self._file_gates[login] = SSHGate(ssh_settings(self._settings, login, key))
        return gate

    async def stage_in(self, job: JobLaunch) -> None:
        """Inputs into the job's working directory: over SFTP to the login node (the ``ssh`` gate's
        staging), or as plain files owned by the job's login on a shared file system."""
        login = self._login(job.owner)
        paths = await self._paths(job, login)
        if self._ssh_files is not None:
            await self._file_gate(login).stage_in(_on_login_node(job, paths))
            return
        await self._ensure_dirs(login, [paths["workdir"]])
        await asyncio.to_thread(_copy_inputs, job, Path(paths["workdir"]), _ids_of(login))

    async def stage_out(self, job: JobLaunch, handle: Handle) -> list[tuple[str, int, str]]:
        if not job.output_patterns:
            return []
        login = str(handle.get("login") or self._login(job.owner))
        workdir = str(handle.get("workdir") or (await self._paths(job, login))["workdir"])
        if self._ssh_files is not None:
            ssh_handle = {"node": "login", "login": login, "workdir": workdir}
            return await self._file_gate(login).stage_out(job, ssh_handle)
        ids = _ids_of(login)
        return await asyncio.to_thread(
            _collect_outputs, Path(workdir), job.output_patterns, job.outputs_dir, ids[0] if ids else None
        )

    def log_path(self, handle: Handle, stream: str) -> Path | None:
        value = handle.get(stream) if stream in ("stdout", "stderr") else None
        return Path(value) if value else None

    async def open_port(self, handle: Handle, port: int) -> TunnelLink:
        raise GateError("ports of jobs on a Slurm cluster are not forwarded by Sky Port")

    # -- tracking ------------------------------------------------------------------------------------

    def watch_progress(self, callback: ProgressCallback) -> None:
        self._progress = callback

    def watch(self, job_id: str, handle: Handle, on_exit: ExitCallback) -> None:
        offsets = {s: _size(Path(str(handle[s]))) for s in ("stdout", "stderr")}
        self._watches[job_id] = _Watch(job_id, handle, on_exit, offsets=offsets)
        self._remember(job_id, str(handle["slurm_id"]))
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(
                self._poll_forever(), name=f"slurm-poller-{self._settings.name}"
            )
        self._wake.set()

    async def cancel(self, handle: Handle, grace_s: float) -> None:
        """Queue ``scancel`` (Slurm sends TERM, then KILL after its ``KillWait``); the poller sends the
        queued ones at once, many per command, and Slurm's answer ends the job through ``watch``."""
        self._cancels[str(handle["login"])].add(str(handle["slurm_id"]))
        self._wake.set()

    async def _flush_cancels(self) -> None:
        pending, self._cancels = self._cancels, defaultdict(set)
        for login, keys in pending.items():
            try:
                await self._backend.cancel(login, sorted(keys))
            except GateError as exc:
                log.warning("scancel failed; retrying", remote=self._settings.name, error=str(exc))
                self._cancels[login] |= keys

    async def recover(self, job: JobLaunch, handle: Handle | None) -> Recovered:
        """Find the attempt in Slurm: by its handle, or (a crash between ``sbatch`` and the store) by the
        pack it was submitted in (a marker in the core's spool, and Slurm's job comment)."""
        try:
            if handle is None:
                handle = await self._find(job)
                if handle is None:
                    return Recovered(handle=None, exit=None)
            login = str(handle["login"])
            records = await self._backend.jobs(self._reader(login), [str(handle["base"])])
        except GateError as exc:
            log.warning("slurm unreachable during recovery", job_id=job.job_id, error=str(exc))
            return Recovered(handle=handle, exit=None)
        self._remember(job.job_id, str(handle["slurm_id"]))
        record = next((r for r in records if str(handle["slurm_id"]) in r.keys), None)
        watch = _Watch(job.job_id, handle, lambda _j, _e: None)
        if record is None:
            exit = await self._status_exit(watch) or _forgotten(handle)
        elif record.state in PENDING or record.state in ACTIVE:
            return Recovered(handle=handle, exit=None)
        else:
            exit = await self._exit(record, watch)
        with contextlib.suppress(GateError):
            await self._fetch_logs(watch, final=True)
        return Recovered(handle=None, exit=exit)

    async def _find(self, job: JobLaunch) -> Handle | None:
        marker = job.attempt_dir / "slurm-pack.json"
        try:
            data = json.loads(await asyncio.to_thread(marker.read_text))
        except (OSError, ValueError):
            return None
        login = str(data["login"])
        for record in await self._backend.mine(login):
            if record.comment == f"skyport:{data['pack']}":
                base = record.keys[0].partition("_")[0]
                arrayed = "_" in record.keys[0]
                return {
                    "slurm_id": f"{base}_{data['index']}" if arrayed else base,
                    "base": base,
                    "login": login,
                    "pack": data["pack"],
                    "index": data["index"],
                    **(await self._paths(job, login)),
                }
        return None

    def _reader(self, login: str) -> str:
        """Who reads job states: the core itself with local commands (it sees everyone's), else the
        job's own login (a cluster with ``PrivateData`` shows each user only their own jobs)."""
        if self._settings.submit == "commands" and self._settings.host is None:
            return CORE_LOGIN
        return login

    async def _poll_forever(self) -> None:
        while self._watches or self._cancels:
            self._wake.clear()
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("slurm status pass failed", remote=self._settings.name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.poll_interval_s)

    async def poll_once(self) -> None:
        """One pass: queued cancels sent, one status query (per reader) for all tracked jobs, news
        reported, logs fetched, ends reported after their last bytes are in."""
        if self._cancels:
            await self._flush_cancels()
        groups: dict[str, list[_Watch]] = defaultdict(list)
        for w in list(self._watches.values()):
            groups[self._reader(str(w.handle["login"]))].append(w)
        for reader, watches in groups.items():
            try:
                records = await self._backend.jobs(reader, {str(w.handle["base"]) for w in watches})
            except GateError as exc:
                log.warning("slurm status query failed", remote=self._settings.name, error=str(exc))
                continue
            index = {key: r for r in records for key in r.keys}
            found = [(w, index.get(str(w.handle["slurm_id"]))) for w in watches]
            # A job Slurm canceled because a job it depends on failed is reported after the others of
            # this pass, so that its user never sees it ended while the job that ended it still runs.
            for after_dependency in (False, True):
                await asyncio.gather(
                    *(self._observe(w, r) for w, r in found if _ended_by_dependency(r) is after_dependency)
                )

    async def _observe(self, w: _Watch, record: SlurmJob | None) -> None:
        exit: Exit | None = None
        if record is None:
            w.misses += 1
            if w.misses < MISSES:
                return
            exit = await self._status_exit(w) or _forgotten(w.handle)
        else:
            w.misses = 0
            if record.state in PENDING:
                reason = record.reason if record.reason not in ("None", "") else "waiting for its turn"
                self._say(w, Progress(False, f"Pending: {reason}"))
            elif record.state in ACTIVE or record.started:
                self._start(w, record)
            if record.state not in PENDING and record.state not in ACTIVE:
                exit = await self._exit(record, w)
        try:
            await self._fetch_logs(w, final=exit is not None)
        except GateError as exc:
            if exit is not None:
                log.warning("could not fetch the last logs of a job", job_id=w.job_id, error=str(exc))
                return  # the next pass tries again; the end is reported with complete logs
        if exit is not None and self._watches.get(w.job_id) is w:
            del self._watches[w.job_id]
            w.on_exit(w.job_id, exit)

    def _start(self, w: _Watch, record: SlurmJob) -> None:
        if w.started:
            return
        nodes = tuple(expand_hostlist(record.nodes))
        text = f"Running on {', '.join(nodes) or 'the cluster'} (Slurm job {w.handle['slurm_id']}, "
        text += f"user {record.user or w.handle['login']})"
        if record.state == "SUSPENDED":
            text = f"Suspended by Slurm ({record.reason})"
        w.started = True
        self._say(w, Progress(True, text, nodes))

    def _say(self, w: _Watch, progress: Progress) -> None:
        if progress.message != w.said and self._progress is not None:
            w.said = progress.message
            self._progress(w.job_id, progress)

    async def _exit(self, record: SlurmJob, w: _Watch) -> Exit:
        """Slurm's end state (and the script's wait status) as an :class:`Exit`."""
        state, reason = record.state, record.reason
        if state in ("COMPLETED", "FAILED"):
            status = record.exit_status
            if status is None:  # the text format has no exit code: our status file does
                found = await self._status_exit(w)
                if found is not None:
                    return found
                status = 0 if state == "COMPLETED" else 1 << 8
            signum, code = status & 0x7F, (status >> 8) & 0xFF
            done = ExitStatus.killed(signum) if signum else ExitStatus.from_shell_status(code)
            return Exit(done.exit_code, done.signal, done.reason, done.message)
        if _ended_by_dependency(record):
            return Exit(None, None, "lost", "Slurm canceled it: a job it depends on did not complete")
        if state == "CANCELLED":
            return Exit(None, 15, "signal", f"canceled in Slurm ({reason})")
        if state == "TIMEOUT":
            return Exit(None, 9, "signal", "killed by Slurm at its time limit (TIMEOUT)")
        if state == "OUT_OF_MEMORY":
            return Exit(None, 9, "signal", "killed by Slurm: out of memory (OUT_OF_MEMORY)")
        if state in ("NODE_FAIL", "BOOT_FAIL"):
            return Exit(None, None, "node_lost", f"Slurm: {state} on {record.nodes or 'its node'}")
        return Exit(None, None, "lost", f"Slurm ended it: {state} ({reason})")

    async def _status_exit(self, w: _Watch) -> Exit | None:
        """The exit code the batch script wrote into the control directory, if any."""
        path = posixpath.join(str(w.handle["control_dir"]), "status")
        try:
            text = await self._read_small(str(w.handle["login"]), path)
        except GateError:
            return None
        if text is None or not text.strip().isdigit():
            return None
        done = ExitStatus.from_shell_status(int(text.strip()))
        return Exit(done.exit_code, done.signal, done.reason, done.message)

    async def _read_small(self, login: str, path: str) -> str | None:
        if self._ssh_files is None:
            try:
                return await asyncio.to_thread(Path(path).read_text)
            except OSError:
                return None
        sftp = await self._ssh_files.link(login).sftp()
        try:
            async with sftp.open(path, "r") as f:
                data = await f.read(64)
        except asyncssh.SFTPNoSuchFile:
            return None
        except (asyncssh.Error, OSError) as exc:
            raise GateError(f"reading {path}: {exc}") from None
        return data if isinstance(data, str) else bytes(data).decode(errors="replace")

    async def _fetch_logs(self, w: _Watch, *, final: bool) -> None:
        """Remote clusters: append what the job's stdout/stderr gained to the core's copies."""
        if self._ssh_files is None or not w.started:
            return
        sftp = await self._ssh_files.link(str(w.handle["login"])).sftp()
        for stream in ("stdout", "stderr"):
            offset = w.offsets.get(stream, 0)
            budget = None if final else LOG_CHUNK
            try:
                async with sftp.open(str(w.handle[f"remote_{stream}"]), "rb") as f:
                    while budget is None or budget > 0:
                        data = await f.read(LOG_CHUNK if budget is None else min(LOG_CHUNK, budget), offset)
                        if not data:
                            break
                        chunk = bytes(data) if not isinstance(data, str) else data.encode()
                        await asyncio.to_thread(_append, Path(str(w.handle[stream])), chunk)
                        offset += len(chunk)
                        if budget is not None:
                            budget -= len(chunk)
            except asyncssh.SFTPNoSuchFile:
                pass
            except (asyncssh.Error, OSError) as exc:
                raise GateError(f"reading the job's {stream}: {exc}") from None
            w.offsets[stream] = offset


# ------------------------------------------------------------------------------------------- helpers


def _throttle(job: JobLaunch) -> int | None:
    """How many tasks of the job's Sky Port array may run at once (Slurm's ``--array=...%N``)."""
    if job.spec.array is None or "SKYPORT_ARRAY_ID" not in job.env:
        return None
    return parse_array(job.spec.array).throttle


def _task_text(task: _Task) -> str:
    """One task's branch of the batch script: paths, its files, environment and command."""
    job, paths = task.job, task.paths
    spec = job.spec
    for name, value in job.env.items():
        if not _ENV_NAME.fullmatch(name) or "\0" in value:
            raise GateError(f"environment variable {name!r} is not valid (letters, digits, _)")
    lines = [
        f"C={_q(paths['control_dir'])}",
        f"W={_q(paths['workdir'])}",
        f"O={_q(paths['remote_stdout'])}",
        f"E={_q(paths['remote_stderr'])}",
        f"I={_q(paths['stdin'])}",
        '(umask 077 && mkdir -p -- "$C") && mkdir -p -- "$W" || exit 125',
    ]
    if spec.script is not None:
        lines.append(f'printf %s {_q(spec.script)} >"$C/job-script" && chmod 700 "$C/job-script" || exit 125')
        runner = '"$C/job-script"' if spec.script.startswith("#!") else '/bin/sh "$C/job-script"'
        lines.append(f"set -- {runner}")
    else:
        assert spec.command is not None
        lines.append("set -- " + " ".join(_q(a) for a in spec.command))
    env = {k: v for k, v in job.env.items() if k != "SKYPORT_NODES"}
    lines.append("X=" + _q("".join(f"export {k}={_q(v)}\n" for k, v in env.items())))
    return "\n  ".join(lines) + "\n  ;;\n"


def _batch_script(pack: list[_Task]) -> str:
    """The batch script of one submission: each task's branch, then what every task does.

    The task opens its files and its status file first, then loads the job's environment (so nothing
    of ours runs with a user-chosen ``PATH``), runs the job as a child and records its exit code.
    """
    branches = "".join(f"{i})\n  {_task_text(t)}" for i, t in enumerate(pack))
    return (
        "#!/bin/sh\n"
        f"# Sky Port: {len(pack)} job(s), one per array task\n"
        'case "${SLURM_ARRAY_TASK_ID:-0}" in\n'
        f"{branches}"
        '*) echo "no such task: ${SLURM_ARRAY_TASK_ID:-}" >&2; exit 125;;\n'
        "esac\n"
        'cd -- "$W" || exit 125\n'
        'exec 9>"$C/status" <"$I" >>"$O" 2>>"$E" || exit 125\n'
        'export SKYPORT_NODES="${SLURM_JOB_NODELIST:-}"\n'
        'eval "$X"; unset C W O E I X\n'
        '"$@" 9>&-\n'
        'set -- "$?"; echo "$1" >&9; exit "$1"\n'
    )


def _on_login_node(job: JobLaunch, paths: dict[str, str]) -> JobLaunch:
    """The job as the ``ssh`` gate sees it: on the one host "login", in the same working directory."""
    spec = job.spec if job.spec.workdir else job.spec.model_copy(update={"workdir": paths["workdir"]})
    return dataclasses.replace(job, node_names=["login"], spec=spec)


def _ids_of(login: str) -> tuple[int, int] | None:
    """The login's uid and gid when the core is root and must give it the files it writes."""
    if os.geteuid() != 0 or login == CORE_LOGIN:
        return None
    try:
        entry = pwd.getpwnam(login)
    except KeyError:
        raise GateError(f"no account {login!r} on this machine") from None
    return entry.pw_uid, entry.pw_gid


def _copy_inputs(job: JobLaunch, workdir: Path, owner: tuple[int, int] | None) -> None:
    for name in job.input_paths:
        source = job.inputs_dir / name
        _make_parents(workdir, name, owner)
        if source.is_dir() and not source.is_symlink():
            _copy_tree(source, workdir / name, owner)
        elif source.is_file():
            _copy_file(source, workdir / name, owner)
        else:
            raise GateError(f"input {name!r} is missing from the job's inputs on the core")


def _write_markers(pack: list[_Task]) -> None:
    """Before ``sbatch``: which pack each job goes in, so that a core that crashes before recording the
    submission finds the job in Slurm instead of submitting it twice."""
    for task in pack:
        task.job.attempt_dir.mkdir(parents=True, exist_ok=True)
        marker = {"pack": task.pack, "index": task.index, "login": task.login}
        (task.job.attempt_dir / "slurm-pack.json").write_text(json.dumps(marker))


def _ended_by_dependency(record: SlurmJob | None) -> bool:
    return record is not None and record.state == "CANCELLED" and record.reason == "DependencyNeverSatisfied"


def _forgotten(handle: Handle) -> Exit:
    return Exit(
        None,
        None,
        "lost",
        f"Slurm no longer knows job {handle['slurm_id']} and it left no exit status (ended long ago, or "
        "removed by an administrator)",
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _append(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(data)
