"""How the ``slurm`` gate reaches a cluster: where its commands run, how it submits, what it reads back.

Two independent choices per remote (server/settings.py, ``SlurmRemoteSettings``):

- *Submission*: :class:`CommandBackend` runs ``sbatch``/``squeue``/``scancel``/``sinfo`` through a
  :class:`Shell` — here (:class:`LocalShell`, as the user's own login when the core is root) or on a
  login node over SSH (:class:`SSHShell`, the user's own key; nothing of ours installed there) — or
  :class:`RestBackend` talks to ``slurmrestd`` with the user's own JWT.
- *Files* (inputs, outputs, logs): SFTP to the login node when one is configured (the ``ssh`` gate's
  staging, reused), else this machine's file system is the cluster's (a login node, a shared mount).

Every call names the Sky Port user's cluster login: a job is submitted, watched and canceled as its
owner, never through one shared account. Status reads are batched: one ``squeue --json`` (or one
``GET /jobs``) per pass for all tracked jobs, with the text formats for versions without ``--json``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import pwd
import re
import shlex
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from skyport.gates.base import GateError
from skyport.gates.ssh import SSHLink
from skyport.server.settings import SlurmRemoteSettings, SSHRemoteSettings

COMMAND_TIMEOUT_S = 120.0
#: The environment Slurm's commands get here (plus the remote's ``env``): nothing of the core's own.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The login that means "the core's own account" (local commands only: it reads, never submits).
CORE_LOGIN = ""


# ------------------------------------------------------------------------------------------ job records


@dataclass(frozen=True)
class SlurmJob:
    """One job (or one array task, or a still unsplit range of pending tasks) as Slurm reports it."""

    keys: tuple[str, ...]  # "42" for a job, "40_3" for an array task (several for an unsplit range)
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    reason: str
    nodes: str  # Slurm host list, e.g. "n[1-2]"
    exit_status: int | None  # the batch script's wait status (exit code << 8 | signal)
    user: str
    comment: str
    started: bool  # it got a start time (it ran, however briefly)


def _number(value: Any) -> int | None:
    """An integer from v0.0.38 (plain) or newer (``{"set": true, "number": N}``) JSON."""
    if isinstance(value, dict):
        if not value.get("set", True) or value.get("infinite"):
            return None
        value = value.get("number")
    return value if isinstance(value, int) else None


def _exit_status(value: Any) -> int | None:
    """A wait status from an int (22.05) or from ``{"status": ..., "return_code": N, "signal": ...}``."""
    if isinstance(value, dict):
        code = _number(value.get("return_code")) or 0
        signal = value.get("signal", {})
        signum = _number(signal.get("id")) if isinstance(signal, dict) else None
        return (code << 8) | (signum or 0)
    return value if isinstance(value, int) else None


def expand_indices(text: str) -> list[int]:
    """``"2-4,7"`` or ``"0-9:2%3"`` -> the task indices (the ``%`` throttle is dropped)."""
    out: list[int] = []
    for part in text.partition("%")[0].split(","):
        if not part:
            continue
        bounds, _, step = part.partition(":")
        first, _, last = bounds.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            continue
        out.extend(range(int(first), int(last or first) + 1, int(step or 1)))
    return out


def expand_hostlist(text: str) -> list[str]:
    """Slurm's host list ``"n[1-3,5],gpu01"`` -> ``["n1", "n2", "n3", "n5", "gpu01"]``."""
    names: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", text):
        if plain:
            names.append(plain)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            if last:
                width = len(first)
                names.extend(f"{prefix}{i:0{width}d}" for i in range(int(first), int(last) + 1))
            else:
                names.append(prefix + first)
    return names


def job_from_json(item: dict[str, Any]) -> SlurmJob:
    """A record of ``squeue --json`` / slurmrestd ``GET /jobs`` (v0.0.38 and the newer shapes)."""
    state = item.get("job_state", "")
    if isinstance(state, list):  # v0.0.39+: a list of flags, the base state first
        state = state[0] if state else ""
    job_id = _number(item.get("job_id")) or 0
    array_job = _number(item.get("array_job_id")) or 0
    task = _number(item.get("array_task_id"))
    pending_range = item.get("array_task_string") or ""
    if array_job and task is not None:
        keys: tuple[str, ...] = (f"{array_job}_{task}",)
    elif array_job and pending_range:
        keys = tuple(f"{array_job}_{i}" for i in expand_indices(pending_range))
    else:
        keys = (str(job_id),)
    start = _number(item.get("start_time")) or 0
    return SlurmJob(
        keys=keys,
        state=str(state),
        reason=str(item.get("state_reason") or "None"),
        nodes=str(item.get("nodes") or ""),
        exit_status=_exit_status(item.get("exit_code")),
        user=str(item.get("user_name") or ""),
        comment=str(item.get("comment") or ""),
        # A job canceled while pending gets an end time as its start, but no nodes: it never ran.
        started=bool(start) and str(state) != "PENDING" and bool(item.get("nodes")),
    )


#: ``squeue`` text format of the fallback: job id (``42``, ``40_3``, ``40_[4-9%2]``), state, reason,
#: nodes, user, start time, comment (last: it may hold anything).
TEXT_FORMAT = "%i|%T|%r|%N|%u|%S|%k"


def jobs_from_text(out: str) -> list[SlurmJob]:
    """Records of ``squeue -h -o TEXT_FORMAT`` (versions without ``--json``); no exit status there."""
    found = []
    for line in out.splitlines():
        parts = line.split("|", 6)
        if len(parts) < 7:
            continue
        job_id, state, reason, nodes, user, start, comment = parts
        base, _, task = job_id.partition("_")
        if task.startswith("["):
            keys = tuple(f"{base}_{i}" for i in expand_indices(task.strip("[]")))
        else:
            keys = (job_id,)
        started = (
            start not in ("N/A", "", "0", "Unknown") and state != "PENDING" and nodes not in ("", "(null)")
        )
        found.append(
            SlurmJob(keys, state, reason, "" if nodes == "(null)" else nodes, None, user, comment, started)
        )
    return found


# ---------------------------------------------------------------------------------------------- shells


class Shell(Protocol):
    """Runs a ``/bin/sh`` script as a cluster login (here, or on the login node)."""

    async def run(self, login: str, script: str, what: str) -> tuple[int, str, str]: ...

    async def home(self, login: str) -> str: ...

    async def close(self) -> None: ...


class LocalShell:
    """Commands on this machine. A root core runs them as the login (``setpriv``, the login's groups),
    so Slurm sees the real user; a core that is not root can only act as itself (a single-user install),
    and refuses other logins."""

    def __init__(self, settings: SlurmRemoteSettings) -> None:
        self._settings = settings

    def _account(self, login: str) -> pwd.struct_passwd:
        if login == CORE_LOGIN:  # the core's own account: reading the cluster's nodes and states
            return pwd.getpwuid(os.geteuid())
        try:
            entry = pwd.getpwnam(login)
        except KeyError:
            raise GateError(f"remote {self._settings.name}: no account {login!r} on this machine") from None
        if os.geteuid() != 0 and entry.pw_uid != os.geteuid():
            raise GateError(
                f"remote {self._settings.name}: the core runs as uid {os.geteuid()} and cannot act as "
                f"{login!r} (run the core as root, or submit over SSH or slurmrestd)"
            )
        if entry.pw_uid == 0:
            raise GateError(f"remote {self._settings.name}: jobs never run as root on a cluster")
        return entry

    async def home(self, login: str) -> str:
        return self._account(login).pw_dir

    async def run(self, login: str, script: str, what: str) -> tuple[int, str, str]:
        entry = self._account(login)
        path = f"{self._settings.bin_dir}:{BASE_PATH}" if self._settings.bin_dir else BASE_PATH
        env = {
            "PATH": path,
            "HOME": entry.pw_dir,
            "USER": login,
            "LOGNAME": login,
            "SHELL": "/bin/sh",
            "LANG": "C.UTF-8",
            **self._settings.env,
        }
        argv = ["/bin/sh", "-s"]
        if os.geteuid() == 0 and login != CORE_LOGIN:
            argv = [
                "setpriv",
                f"--reuid={entry.pw_uid}",
                f"--regid={entry.pw_gid}",
                "--init-groups",
                "--",
                *argv,
            ]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd="/",
            )
            out, err = await asyncio.wait_for(proc.communicate(script.encode()), COMMAND_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise GateError(f"{what} failed: {exc or 'timed out'}") from None
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    async def close(self) -> None:
        return None


class SSHShell:
    """Commands on the login node over SSH, one connection per login with that user's own key (the
    ``ssh`` gate's :class:`~skyport.gates.ssh.SSHLink`: known_hosts checked, reconnects)."""

    def __init__(self, settings: SlurmRemoteSettings, keys: dict[str, Path]) -> None:
        assert settings.host is not None
        self._settings = settings
        self._keys = keys
        self._links: dict[str, SSHLink] = {}

    def link(self, login: str) -> SSHLink:
        link = self._links.get(login)
        if link is None:
            key = self._keys.get(login)
            if key is None:
                raise GateError(f"remote {self._settings.name}: no SSH key for login {login!r}")
            self._links[login] = link = SSHLink(ssh_settings(self._settings, login, key), self.host, login)
        return link

    @property
    def host(self) -> Any:
        return self._settings.host

    async def home(self, login: str) -> str:
        link = self.link(login)
        await link.connection()
        return link.home

    async def run(self, login: str, script: str, what: str) -> tuple[int, str, str]:
        env = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self._settings.env.items())
        path = f"export PATH={shlex.quote(self._settings.bin_dir)}:$PATH\n" if self._settings.bin_dir else ""
        done = await self.link(login).run(env + path + script, what)
        return done.exit_status or 0, _text(done.stdout), _text(done.stderr)

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self._links.values()))


def ssh_settings(settings: SlurmRemoteSettings, login: str, key: Path) -> SSHRemoteSettings:
    """The ``ssh`` remote that is "this cluster's login node as ``login``" (connections, staging)."""
    assert settings.host is not None and settings.known_hosts is not None
    return SSHRemoteSettings(
        name=settings.name,
        hosts=[settings.host.model_copy(update={"name": "login"})],
        user=login,
        key_file=key,
        known_hosts=settings.known_hosts,
        workroot=settings.workroot.replace("{login}", login),
        connect_timeout_s=settings.connect_timeout_s,
    )


def _text(data: object) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data if isinstance(data, str) else ""


# -------------------------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class Submission:
    """One ``sbatch``: its options (long names, no dashes) and its batch script."""

    options: dict[str, str]
    script: str
    env: dict[str, str]  # the batch script's environment (slurmrestd needs it; sbatch exports its own)


@dataclass(frozen=True)
class ClusterNode:
    name: str
    cpus: int
    mem: int  # bytes
    gpus: int
    partitions: tuple[str, ...]
    up: bool


@dataclass(frozen=True)
class Inventory:
    nodes: tuple[ClusterNode, ...]
    default_partition: str


class Backend(Protocol):
    version: tuple[int, int]

    async def detect(self, login: str) -> str: ...

    async def submit(self, login: str, subs: list[Submission]) -> list[str | GateError]: ...

    async def jobs(self, login: str, ids: Iterable[str]) -> list[SlurmJob]: ...

    async def cancel(self, login: str, keys: list[str]) -> None: ...

    async def mine(self, login: str) -> list[SlurmJob]: ...

    async def close(self) -> None: ...

    async def inventory(self, login: str) -> Inventory: ...


def _parse_version(text: str) -> tuple[int, int]:
    found = re.search(r"(\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


class CommandBackend:
    """Slurm's own commands through a :class:`Shell`, many ``sbatch`` per round trip."""

    def __init__(self, settings: SlurmRemoteSettings, shell: Shell) -> None:
        self._settings = settings
        self._shell = shell
        self.version: tuple[int, int] = (0, 0)

    @property
    def json_status(self) -> bool:
        """Whether status passes read ``squeue --json`` (the ``auto`` setting follows the version).

        ``--json`` exists from 21.08 on, but up to 22.05 it ignores ``--jobs`` and lists every job of the
        cluster: a pass then costs O(cluster), not O(tracked) — 0.5 s of CPU for 2,000 jobs on 22.05
        (bench/slurm_submit.py). So ``auto`` reads the filtered text format there, and takes exit codes
        from the status files the batch script writes; from 23.02 on it reads ``--json``.
        """
        fmt = self._settings.status_format
        return fmt == "json" or (fmt == "auto" and self.version >= (23, 2))

    async def _check(self, login: str, script: str, what: str) -> str:
        code, out, err = await self._shell.run(login, script, what)
        if code != 0:
            raise GateError(f"{what} failed: {err.strip() or out.strip() or f'exit status {code}'}")
        return out

    async def detect(self, login: str) -> str:
        out = await self._check(login, "sbatch --version\n", "asking Slurm's version")
        self.version = _parse_version(out)
        return out.strip()

    async def submit(self, login: str, subs: list[Submission]) -> list[str | GateError]:
        """All ``subs`` in one shell run: each line of output is ``<index> ok <id>`` or ``<index> err``."""
        lines = []
        for i, sub in enumerate(subs):
            words = " ".join(shlex.quote(f"--{k}={v}" if v else f"--{k}") for k, v in sub.options.items())
            marker = "SKYPORT_" + hashlib.sha256(sub.script.encode()).hexdigest()[:24]
            lines.append(
                f"if o=$(sbatch --parsable {words} 2>&1 <<'{marker}'\n{sub.script}\n{marker}\n); then "
                f'echo "{i} ok $o"; else printf "%s\\n" "{i} err $o" | tr "\\n" " "; echo; fi\n'
            )
        code, out, err = await self._shell.run(login, "".join(lines), "submitting to Slurm")
        results: dict[int, str | GateError] = {}
        for line in out.splitlines():
            index, _, rest = line.partition(" ")
            status, _, text = rest.partition(" ")
            if not index.isdigit():
                continue
            if status == "ok" and text.strip().split(";")[0].isdigit():
                results[int(index)] = text.strip().split(";")[0]
            else:
                results[int(index)] = GateError(f"Slurm refused the job: {text.strip()}")
        failure = GateError(f"submitting to Slurm failed: {err.strip() or f'exit status {code}'}")
        return [results.get(i, failure) for i in range(len(subs))]

    async def jobs(self, login: str, ids: Iterable[str]) -> list[SlurmJob]:
        joined = ",".join(sorted(set(ids)))
        if not joined:
            return []
        if self.json_status:
            # 22.05's --json ignores --jobs (it lists every job): the caller picks its own from them.
            out = await self._check(login, f"squeue --json -t all --jobs={joined}\n", "reading job states")
            data = await asyncio.to_thread(json.loads, out or "{}")  # megabytes on a busy cluster
            return [job_from_json(j) for j in data.get("jobs", [])]
        out = await self._check(
            login,
            f"squeue -h -t all --jobs={joined} -o {shlex.quote(TEXT_FORMAT)}\n",
            "reading job states",
        )
        return jobs_from_text(out)

    async def mine(self, login: str) -> list[SlurmJob]:
        """All jobs of ``login`` that Slurm still knows (recovery after a crash at submission)."""
        fmt = "--json" if self.json_status else f"-h -o {shlex.quote(TEXT_FORMAT)}"
        out = await self._check(login, f"squeue {fmt} -t all -u {shlex.quote(login)}\n", "listing jobs")
        if self.json_status:
            return [job_from_json(j) for j in json.loads(out or "{}").get("jobs", [])]
        return jobs_from_text(out)

    async def cancel(self, login: str, keys: list[str]) -> None:
        await self._check(login, f"scancel {' '.join(shlex.quote(k) for k in keys)}\n", "canceling jobs")

    async def inventory(self, login: str) -> Inventory:
        out = await self._check(login, "sinfo -h -N -o '%N|%c|%m|%G|%P|%t'\n", "listing the nodes")
        merged: dict[str, ClusterNode] = {}
        default = ""
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) != 6:
                continue
            name, cpus, mem, gres, partition, state = parts
            if partition.endswith("*"):
                partition = default = partition[:-1]
            gpus = sum(int(g) for g in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))
            known = merged.get(name)
            merged[name] = ClusterNode(
                name=name,
                cpus=int(cpus) if cpus.isdigit() else 1,
                mem=int(mem.rstrip("+")) * 1024 * 1024 if mem.rstrip("+").isdigit() else 0,
                gpus=gpus,
                partitions=(*(known.partitions if known else ()), partition),
                up=not any(s in state for s in ("down", "drain", "fail")),
            )
        return Inventory(tuple(merged.values()), default)

    async def close(self) -> None:
        await self._shell.close()


class RestBackend:
    """``slurmrestd`` with each user's own JWT (a token file, or minted with the cluster's JWT key)."""

    def __init__(self, settings: SlurmRemoteSettings, token_files: dict[str, Path]) -> None:
        if not settings.rest_url:
            raise ValueError(f"remote {settings.name}: submit = 'rest' needs rest_url")
        self._settings = settings
        self._token_files = token_files
        self._tokens: dict[str, tuple[float, str]] = {}
        self._client = httpx.AsyncClient(base_url=settings.rest_url.rstrip("/"), timeout=COMMAND_TIMEOUT_S)
        self.api = settings.rest_version if settings.rest_version != "auto" else ""
        self.version: tuple[int, int] = (0, 0)

    def _token(self, login: str) -> str:
        now = time.time()
        cached = self._tokens.get(login)
        if cached is not None and cached[0] > now:
            return cached[1]
        path = self._token_files.get(login)
        if path is not None:
            token = path.read_text().strip().removeprefix("SLURM_JWT=")
            self._tokens[login] = (now + 60, token)  # re-read: the file may be renewed
            return token
        key_file = self._settings.jwt_key_file
        if key_file is None:
            raise GateError(f"remote {self._settings.name}: no JWT for login {login!r} (give a token_file)")
        lifespan = self._settings.jwt_lifespan_s
        token = mint_jwt(key_file.read_bytes(), login, int(now), lifespan)
        self._tokens[login] = (now + lifespan * 0.8, token)
        return token

    async def _call(self, login: str, method: str, path: str, what: str, body: Any = None) -> Any:
        headers = {"X-SLURM-USER-NAME": login, "X-SLURM-USER-TOKEN": self._token(login)}
        try:
            response = await self._client.request(method, path, headers=headers, json=body)
        except httpx.HTTPError as exc:
            raise GateError(f"{what}: slurmrestd at {self._settings.rest_url}: {exc}") from None
        try:
            data = response.json()
        except ValueError:
            data = {}
        errors = [e.get("error") or e.get("description") for e in data.get("errors", []) if e]
        if response.status_code >= 400 or (errors and not data.get("jobs") and not data.get("job_id")):
            text = "; ".join(str(e) for e in errors if e) or response.text.strip()[:300]
            raise GateError(f"{what}: slurmrestd answered {response.status_code}: {text}")
        return data

    async def detect(self, login: str) -> str:
        """The newest ``/slurm/v0.0.NN`` plugin slurmrestd serves (unless set), and Slurm's release."""
        if not self.api:
            spec = await self._call(login, "GET", "/openapi/v3", "reading slurmrestd's API")
            versions = sorted(
                {m.group(1) for p in spec.get("paths", {}) if (m := re.match(r"/slurm/(v[\d.]+)/", p))},
                key=lambda v: tuple(int(x) for x in v[1:].split(".")),
            )
            if not versions:
                raise GateError(f"remote {self._settings.name}: slurmrestd serves no /slurm API")
            self.api = versions[-1]
        ping = await self._call(login, "GET", f"/slurm/{self.api}/ping", "asking Slurm's version")
        release = str(ping.get("meta", {}).get("Slurm", {}).get("release", ""))
        self.version = _parse_version(release)
        return f"slurm {release} (slurmrestd {self.api})"

    def _job_body(self, sub: Submission) -> dict[str, Any]:
        o = sub.options
        job: dict[str, Any] = {
            "name": o.get("job-name", "skyport"),
            "current_working_directory": o.get("chdir", "/tmp"),
            "standard_output": o.get("output", "/dev/null"),
            "environment": sub.env if self.api == "v0.0.38" else [f"{k}={v}" for k, v in sub.env.items()],
        }
        if "nodes" in o:
            job["nodes"] = [int(o["nodes"]), int(o["nodes"])] if self.api == "v0.0.38" else o["nodes"]
        for opt, field, cast in (
            ("cpus-per-task", "cpus_per_task", int),
            ("ntasks-per-node", "tasks_per_node", int),
            ("partition", "partition", str),
            ("qos", "qos", str),
            ("account", "account", str),
            ("array", "array", str),
            ("dependency", "dependency", str),
            ("comment", "comment", str),
            ("gres", "gres", str),
        ):
            if opt in o:
                job[field] = cast(o[opt])
        if "mem" in o:
            job["memory_per_node"] = int(o["mem"].rstrip("M"))
        if "time" in o:
            job["time_limit"] = max(1, -(-_seconds(o["time"]) // 60))
        if o.get("exclusive"):
            job["exclusive"] = "true"
        if "kill-on-invalid-dep" in o:
            job["kill_on_invalid_dependency"] = o["kill-on-invalid-dep"] == "yes"
        return job

    async def submit(self, login: str, subs: list[Submission]) -> list[str | GateError]:
        async def one(sub: Submission) -> str | GateError:
            try:
                data = await self._call(
                    login,
                    "POST",
                    f"/slurm/{self.api}/job/submit",
                    "submitting to Slurm",
                    {"job": self._job_body(sub), "script": sub.script},
                )
            except GateError as exc:
                return exc
            return str(_number(data.get("job_id")))

        return list(await asyncio.gather(*(one(s) for s in subs)))

    async def jobs(self, login: str, ids: Iterable[str]) -> list[SlurmJob]:
        wanted = set(ids)
        if not wanted:
            return []
        data = await self._call(login, "GET", f"/slurm/{self.api}/jobs", "reading job states")
        found = []
        for item in data.get("jobs", []):
            base = _number(item.get("array_job_id")) or _number(item.get("job_id"))
            if str(base) in wanted or str(_number(item.get("job_id"))) in wanted:
                found.append(job_from_json(item))
        return found

    async def mine(self, login: str) -> list[SlurmJob]:
        data = await self._call(login, "GET", f"/slurm/{self.api}/jobs", "listing jobs")
        return [job_from_json(j) for j in data.get("jobs", []) if j.get("user_name") == login]

    async def cancel(self, login: str, keys: list[str]) -> None:
        await asyncio.gather(
            *(self._call(login, "DELETE", f"/slurm/{self.api}/job/{k}", f"canceling job {k}") for k in keys)
        )

    async def inventory(self, login: str) -> Inventory:
        nodes = await self._call(login, "GET", f"/slurm/{self.api}/nodes", "listing the nodes")
        parts = await self._call(login, "GET", f"/slurm/{self.api}/partitions", "listing the partitions")
        default = ""
        for p in parts.get("partitions", []):
            flags = p.get("flags") or p.get("partition", {}).get("state", [])
            if "default" in [str(f).lower() for f in flags] or "DEFAULT" in flags:
                default = p.get("name", "")
        found = []
        for n in nodes.get("nodes", []):
            state = n.get("state", "")
            state_text = " ".join(state) if isinstance(state, list) else str(state)
            gres = str(n.get("gres") or "")
            found.append(
                ClusterNode(
                    name=n.get("name", ""),
                    cpus=_number(n.get("cpus")) or 1,
                    mem=(_number(n.get("real_memory")) or 0) * 1024 * 1024,
                    gpus=sum(int(g) for g in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres)),
                    partitions=tuple(n.get("partitions") or ()),
                    up=not any(s in state_text.lower() for s in ("down", "drain", "fail")),
                )
            )
        return Inventory(tuple(found), default)

    async def close(self) -> None:
        await self._client.aclose()


def _seconds(walltime: str) -> int:
    """``H:MM:SS`` -> seconds."""
    total = 0
    for part in walltime.split(":"):
        total = total * 60 + int(part)
    return total


def mint_jwt(key: bytes, login: str, now: int, lifespan_s: int) -> str:
    """An HS256 token as ``scontrol token`` makes it (claims ``iat``, ``exp``, ``sun``: the user name)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = {"exp": now + lifespan_s, "iat": now, "sun": login}
    payload = b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"
