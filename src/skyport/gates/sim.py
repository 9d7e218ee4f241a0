"""The ``sim`` cloud: a provisioner whose virtual machines are real ``skyport agent`` processes here.

For tests, demos and benchmarks of elastic capacity (DESIGN §4): it behaves like a small public cloud —
a catalog of flavors with prices and images in one region, account quotas, a boot latency, capacity
shortages and injected failures (on create, on boot, on delete) with the error texts a real provider
gives (``QuotaExceeded: ...``, ``InsufficientInstanceCapacity: ...``) — and the machines it "boots" are
``skyport agent`` processes that enrol with the core with the bootstrap token of the request, handed over
the way cloud-init would (a user-data file the agent reads with ``--token-file``). Optionally each VM
lives in a network namespace of its own, on a bridge with its own subnet.

State and recovery. Everything the sim knows lives in ``state_dir`` (default
``$SKYPORT_HOME/sim/<remote>``): one JSON file per partition in ``partitions/`` (written atomically,
before each side effect: the workroot is recorded before the agent is started, the pid right after),
and one directory per VM in ``vms/`` (its CA, user-data, agent state and log). Agents run in sessions of
their own, so they outlive a ``kill -9`` of the core; a new :class:`SimGate` on the same directory finds
them (:meth:`SimGate.list_partitions`), finishes boots that were due while nobody was there, and notices
VMs whose agent died (the partition is then ``failed`` with the agent's last words).
One SimGate (one process) owns a state directory at a time.

Finding a VM's processes. A VM's agent and every job wrapper it starts name the VM's workroot (a
``mkdtemp`` directory whose name carries the sim's tag and the instance id) in their argv; jobs run in
the wrappers' sessions. Deleting a VM KILLs every process whose argv names its workroot or its state
directory, everything in the sessions those processes lead and their descendants — this works after
a restart too, when the agents are no longer our children — and, in namespace mode, everything left in
its namespace. :func:`sim_inventory` does the same scan for the whole sim, so a test can prove that
nothing leaked.

Settings: the remote's ``sim`` table, validated by :class:`SimConfig`. Example (skyport.toml)::

    [[remotes]]
    kind = "sim"
    name = "cloud"
    [remotes.sim]
    boot_latency_s = 5
    max_vcpus = 16
    boot_failure_rate = 0.1
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import BaseModel, Field, ValidationError, field_validator

from skyport.agent.pool import PoolMember
from skyport.gates.provisioner import (
    PREEMPTED,
    TAG_PREEMPTIBLE,
    Catalog,
    CatalogFlavor,
    CatalogImage,
    PartitionRequest,
    PartitionStatus,
    ProvisionedNode,
    ProvisionerError,
)
from skyport.server.settings import SimRemoteSettings, default_home

log = structlog.get_logger(__name__)

GIB = 1024**3
RECORD_VERSION = 1
#: How long a delete waits for the KILLed processes of a VM to be gone.
KILL_DEADLINE_S = 15.0
#: Lines of an agent's log quoted when its VM stops on its own.
LOG_TAIL_LINES = 3
#: Seconds an agent pool without nodes waits before it exits.
POOL_IDLE_EXIT_S = 2.0
#: Seconds a pool started for VMs being created waits past their boot time for the first of them.
POOL_START_MARGIN_S = 10.0
IP = "/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "ip"
NICE = "/usr/bin/nice" if os.path.exists("/usr/bin/nice") else "nice"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


# -- settings ----------------------------------------------------------------------------------------


def _size(value: Any) -> Any:
    """``"4GiB"``, ``"512M"``, ``"1T"`` or a number of bytes -> bytes (other values: left to pydantic)."""
    if not isinstance(value, str):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", value, re.IGNORECASE)
    if not match:
        return value
    scale = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


class SimFlavor(BaseModel):
    """A node type of the sim cloud; ``price`` per node-hour in the remote's currency."""

    model_config = {"extra": "forbid"}

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
    name: str = ""
    cpus: int = Field(ge=1)
    mem: int = Field(ge=1, description="bytes, or a size like '4GiB'")
    gpus: int = Field(default=0, ge=0)
    storage: int = Field(default=0, ge=0)
    price: float = Field(default=0.0, ge=0)

    @field_validator("mem", "storage", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> Any:
        return _size(value)


class SimImage(BaseModel):
    model_config = {"extra": "forbid"}

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/\-]{0,127}$")
    name: str = ""
    kind: Literal["cloud", "container"] = "cloud"
    comment: str = ""


DEFAULT_FLAVORS = [
    SimFlavor(id="small", cpus=1, mem=1 * GIB, storage=10 * GIB, price=0.0125),
    SimFlavor(id="medium", cpus=2, mem=4 * GIB, storage=20 * GIB, price=0.05),
    SimFlavor(id="large", cpus=4, mem=16 * GIB, storage=40 * GIB, price=0.2),
    SimFlavor(id="gpu", cpus=4, mem=16 * GIB, gpus=1, storage=80 * GIB, price=0.9),
]
DEFAULT_IMAGES = [
    SimImage(id="debian-12", name="Debian 12 with skyport agent"),
    SimImage(id="ubuntu-24.04", name="Ubuntu 24.04 with skyport agent"),
]


class SimConfig(BaseModel):
    """The ``sim`` table of a ``kind = "sim"`` remote."""

    model_config = {"extra": "forbid"}

    #: Where the sim keeps its inventory; default ``$SKYPORT_HOME/sim/<remote>``.
    state_dir: Path | None = None
    region: str = "sim-local-1"
    flavors: list[SimFlavor] = Field(default_factory=lambda: list(DEFAULT_FLAVORS), min_length=1)
    images: list[SimImage] = Field(default_factory=lambda: list(DEFAULT_IMAGES), min_length=1)
    #: Account quotas (instances, vCPUs) over every VM that exists, whatever its state.
    max_instances: int | None = Field(default=None, ge=0)
    max_vcpus: int | None = Field(default=None, ge=0)
    #: Instances of a flavor the region can run at once (a flavor not named: unlimited).
    capacity: dict[str, int] = Field(default_factory=dict)
    #: Seconds from the create call until the agents start (+ up to ``boot_jitter_s`` more, at random).
    boot_latency_s: float = Field(default=2.0, ge=0)
    boot_jitter_s: float = Field(default=0.0, ge=0)
    #: Seconds a deleted partition stays ``deleting`` (its processes are killed at once).
    delete_latency_s: float = Field(default=0.0, ge=0)
    #: Probabilities of injected failures: the create call, a partition's boot, a delete call, and a
    #: capacity shortage on create (transient).
    create_failure_rate: float = Field(default=0.0, ge=0, le=1)
    boot_failure_rate: float = Field(default=0.0, ge=0, le=1)
    delete_failure_rate: float = Field(default=0.0, ge=0, le=1)
    capacity_failure_rate: float = Field(default=0.0, ge=0, le=1)
    #: Seed of the failure and jitter draws (tests); None: a random seed.
    seed: int | None = None
    #: Each VM in a network namespace of its own (needs root and ``ip``).
    netns: bool = False
    #: The namespaces' subnet (a /24 or bigger); None: a free 10.x.y.0/24, chosen once and kept.
    netns_subnet: str | None = None
    #: The core's URL as agents in namespaces reach it (None: the request's URL, which must then name
    #: an address the namespaces reach, e.g. the bridge's gateway the core listens on).
    netns_core_url: str | None = None
    #: Unix account jobs run as on the VMs when the agents run as root (None: ``nobody`` when root).
    default_user: str | None = None
    #: Seconds between the agents' heartbeats.
    agent_heartbeat_s: float = Field(default=5.0, gt=0)
    #: The agent command (None: this installation's ``skyport agent``); the sim appends the options.
    agent_command: list[str] | None = None
    #: Where VM workroots are made (must be traversable by the job accounts); None: the temp dir.
    workroot_parent: Path | None = None
    #: Spot capacity: a partition asked for as preemptible is taken back this many seconds after it is
    #: ready (None: never).
    preempt_after_s: float | None = Field(default=None, gt=0)
    #: VMs whose agents share one process (``skyport agent-pool``; not with ``netns``). 1: a process per
    #: VM. Each VM keeps its own key, certificate, connection and jobs; only the interpreter is shared,
    #: which is what lets hundreds of VMs run on one small machine.
    agents_per_process: int = Field(default=1, ge=1)
    #: Niceness of the VMs' agent processes and of their sessions (see ``_set_autogroup_nice``). A real
    #: cloud's VMs have CPUs of their own; the sim's agents run on the core's machine and, at 0, take its
    #: CPU on equal terms with the core's event loop (500 VMs booting at once on two cores: the core's
    #: loop was runnable but waiting for a CPU about half the time). Above 0 the core comes first and
    #: the VMs get what it leaves.
    agent_nice: int = Field(default=0, ge=0, le=19)

    @field_validator("netns_subnet")
    @classmethod
    def _subnet(cls, value: str | None) -> str | None:
        if value is not None:
            net = ipaddress.IPv4Network(value, strict=False)
            if net.num_addresses < 8:
                raise ValueError("netns_subnet must have room for a gateway and some VMs (/29 or bigger)")
            return str(net)
        return value


# -- records -----------------------------------------------------------------------------------------


@dataclass
class Instance:
    """One VM: its node, where its files are, and its agent process once booted."""

    id: str
    node_name: str
    core_url: str
    vm_dir: str
    workroot: str = ""
    pid: int = 0
    pid_start: int = 0
    address: str = ""
    netns: str = ""
    #: The agent pool directory running this VM's agent ("" : a process of its own).
    pool: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Instance:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class PartitionRecord:
    partition_id: str
    name: str
    flavor: str
    image: str
    region: str
    state: Literal["creating", "ready", "failed", "deleting"]
    created_at: float
    boot_at: float
    instances: list[Instance]
    ports: list[int] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    message: str = ""
    delete_at: float | None = None
    #: When it became ready (for spot preemption), and why it failed (``preempted``).
    ready_at: float | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["instances"] = [i.to_dict() for i in self.instances]
        data["version"] = RECORD_VERSION
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PartitionRecord:
        values = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        values["instances"] = [Instance.from_dict(i) for i in data.get("instances", [])]
        return cls(**values)


@dataclass(frozen=True)
class SimProcess:
    pid: int
    argv: tuple[str, ...]


@dataclass(frozen=True)
class SimInventory:
    """What the sim holds: partitions on record, live processes of its VMs, namespaces and bridge."""

    partitions: list[PartitionStatus]
    processes: list[SimProcess]
    namespaces: list[str]
    bridge: str | None = None

    @property
    def empty(self) -> bool:
        return not (self.partitions or self.processes or self.namespaces or self.bridge)


# -- /proc -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    sid: int
    start: int
    argv: tuple[str, ...]


def _read_proc(pid: int) -> _Proc | None:
    """One live (not zombie) process from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    argv = tuple(a.decode(errors="replace") for a in cmdline.split(b"\0") if a)
    return _Proc(pid=pid, ppid=int(fields[1]), sid=int(fields[3]), start=int(fields[19]), argv=argv)


def _all_procs() -> list[_Proc]:
    procs = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (proc := _read_proc(int(entry))) is not None:
            procs.append(proc)
    return procs


def _start_time(pid: int) -> int | None:
    proc = _read_proc(pid)
    return proc.start if proc else None


def _matching(procs: Iterable[_Proc], markers: Iterable[str]) -> dict[int, _Proc]:
    """Processes naming a marker in their argv, the sessions they lead, and all their descendants.

    Never the caller itself or anything in the caller's session (a VM's processes have their own).
    """
    procs = list(procs)
    marks = [m for m in markers if m]
    own_pid, own_sid = os.getpid(), os.getsid(0)
    found = {
        p.pid: p
        for p in procs
        if any(m in arg for arg in p.argv for m in marks) and p.pid not in (1, own_pid)
    }
    sessions = {p.sid for p in found.values() if p.sid == p.pid}
    for p in procs:
        if p.sid in sessions:
            found[p.pid] = p
    children: dict[int, list[_Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child.pid not in found:
                found[child.pid] = child
                stack.append(child.pid)
    return {pid: p for pid, p in found.items() if pid not in (1, own_pid) and p.sid != own_sid}


def _netns_pids(netns: str) -> list[int]:
    done = subprocess.run([IP, "netns", "pids", netns], capture_output=True, text=True, check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def _kill_all(markers: list[str], namespaces: list[str], deadline_s: float = KILL_DEADLINE_S) -> list[int]:
    """KILL the processes of a VM (see the module's docstring) until none is left; the survivors' pids."""
    deadline = time.monotonic() + deadline_s
    while True:
        pids = set(_matching(_all_procs(), markers))
        for netns in namespaces:
            pids.update(_netns_pids(netns))
        pids.discard(os.getpid())
        if not pids or time.monotonic() > deadline:
            return sorted(pids)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        # Poll until the kernel has taken them (bounded by the deadline); a zombie no longer counts.
        time.sleep(0.02)


def _tag(state_dir: Path) -> str:
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]


def _workroot_prefix(tag: str) -> str:
    return f"skyport-sim-{tag}-"


def _sim_markers(state_dir: Path) -> list[str]:
    return [str(state_dir.resolve()) + os.sep, _workroot_prefix(_tag(state_dir))]


# -- files -------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _record_file(state_dir: Path, partition_id: str) -> Path:
    safe = _SAFE.sub("_", partition_id)
    if safe != partition_id:  # keep distinct ids distinct
        safe += "-" + hashlib.sha256(partition_id.encode()).hexdigest()[:8]
    return state_dir / "partitions" / f"{safe}.json"


def _load_records(state_dir: Path) -> dict[str, PartitionRecord]:
    records: dict[str, PartitionRecord] = {}
    folder = state_dir / "partitions"
    if not folder.is_dir():
        return records
    for path in sorted(folder.glob("*.json")):
        try:
            record = PartitionRecord.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("sim: unreadable partition record", path=str(path), error=str(exc))
            continue
        records[record.partition_id] = record
    return records


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


def _status(record: PartitionRecord) -> PartitionStatus:
    nodes = [
        ProvisionedNode(name=i.node_name, provider_id=i.id, private_ip=i.address or "127.0.0.1")
        for i in record.instances
    ]
    provider_id = record.instances[0].id if record.instances else ""
    return PartitionStatus(
        partition_id=record.partition_id,
        state=record.state,
        provider_id=provider_id,
        message=record.message,
        nodes=nodes,
        tags=dict(record.tags),
        reason=record.reason,
    )


def _set_autogroup_nice(pid: int, nice: int) -> None:
    """Give the session of ``pid`` (an agent started with a session of its own) the niceness ``nice``.

    Where the kernel groups each session for CPU scheduling (``sched_autogroup_enabled``, on here), the
    CPU is first shared equally between the sessions that want it and a process's own niceness counts
    only inside its session: ten agent pools were ten sessions against the core's one, and niceness on
    their processes alone changed nothing for the core. The session's niceness counts between sessions.
    Best effort: without autogroups the file does not exist, and the processes' own niceness applies.
    """
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))


# -- network namespaces ------------------------------------------------------------------------------


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [IP, *(("-n", netns) if netns else ()), *args]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise ProvisionerError(f"NetworkError: {' '.join(argv)} failed: {done.stderr.strip()}")
    return done


def _link_exists(name: str) -> bool:
    return _ip("link", "show", name, check=False).returncode == 0


def _netns_list() -> list[str]:
    done = subprocess.run([IP, "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _used_networks() -> list[ipaddress.IPv4Network]:
    used: list[ipaddress.IPv4Network] = []
    addrs: list[dict[str, Any]] = json.loads(_ip("-j", "-4", "addr", "show").stdout or "[]")
    for link in addrs:
        for info in link.get("addr_info", []):
            used.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False))
    routes: list[dict[str, Any]] = json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]")
    for route in routes:
        dst = route.get("dst", "")
        if dst not in ("", "default"):
            with contextlib.suppress(ValueError):
                used.append(ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False))
    return used


def free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that overlaps nothing this machine has an address or a route for."""
    used = _used_networks()
    for _ in range(200):
        candidate = ipaddress.IPv4Network(f"10.{16 + secrets.randbelow(235)}.{secrets.randbelow(256)}.0/24")
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise ProvisionerError("NetworkError: no unused 10.x.y.0/24 subnet for the sim's namespaces")


class _Network:
    """The sim's bridge (in the root namespace, with the gateway address) and its VMs' namespaces.

    Names derive from the sim's tag, so a restarted sim finds its bridge; the subnet is kept in
    ``network.json``. Traffic stays between the namespaces and the bridge (no route or NAT outwards).
    """

    def __init__(self, state_dir: Path, tag: str, subnet: str | None) -> None:
        self._file = state_dir / "network.json"
        self.tag = tag
        self.bridge = f"sps{tag}br"
        self._configured = subnet

    def subnet(self) -> ipaddress.IPv4Network:
        if self._file.exists():
            return ipaddress.IPv4Network(json.loads(self._file.read_text())["subnet"])
        net = ipaddress.IPv4Network(self._configured) if self._configured else free_subnet()
        self._file.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self._file, json.dumps({"subnet": str(net)}).encode(), 0o644)
        return net

    def gateway(self) -> str:
        return str(next(self.subnet().hosts()))

    def ensure_bridge(self) -> str:
        net = self.subnet()
        gateway = str(next(net.hosts()))
        if not _link_exists(self.bridge):
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{gateway}/{net.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return gateway

    def add_vm(self, instance_id: str, taken: set[str]) -> tuple[str, str]:
        """A namespace for one VM, joined to the bridge; returns (namespace, address)."""
        net = self.subnet()
        self.ensure_bridge()
        hosts = list(net.hosts())[1:]
        address = next((str(a) for a in hosts if str(a) not in taken), None)
        if address is None:
            raise ProvisionerError(f"InsufficientAddressCapacity: no free address left in {net}")
        short = instance_id.removeprefix("i-")[:9]
        netns, outer, inner = f"sps{self.tag}-{short}", f"sv{short}h", f"sv{short}n"
        _ip("netns", "add", netns)
        try:
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", netns)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("link", "set", "lo", "up", netns=netns)
            _ip("addr", "add", f"{address}/{net.prefixlen}", "dev", inner, netns=netns)
            _ip("link", "set", inner, "up", netns=netns)
        except ProvisionerError:
            self.remove_vm(netns, instance_id)
            raise
        return netns, address

    @staticmethod
    def remove_vm(netns: str, instance_id: str) -> None:
        short = instance_id.removeprefix("i-")[:9]
        _ip("link", "del", f"sv{short}h", check=False)
        _ip("netns", "del", netns, check=False)

    def remove_bridge(self) -> None:
        _ip("link", "del", self.bridge, check=False)

    def namespaces(self) -> list[str]:
        prefix = f"sps{self.tag}-"
        return [n for n in _netns_list() if n.startswith(prefix)]


# -- the gate ----------------------------------------------------------------------------------------


def sim_config(settings: SimRemoteSettings | Mapping[str, Any]) -> tuple[str, SimRemoteSettings, SimConfig]:
    """The remote's settings and its validated ``sim`` table (a clear ValueError if they are wrong)."""
    remote = (
        settings if isinstance(settings, SimRemoteSettings) else SimRemoteSettings.model_validate(settings)
    )
    try:
        config = SimConfig.model_validate(remote.sim)
    except ValidationError as exc:
        raise ValueError(f"remote {remote.name}: the sim settings are not valid: {exc}") from None
    return remote.name, remote, config


def default_state_dir(remote_name: str, home: Path | None = None) -> Path:
    return (home or default_home()) / "sim" / remote_name


def _agent_command() -> list[str]:
    script = Path(sys.executable).parent / "skyport"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from skyport.cli.main import main; main()"]


class SimGate:
    """Provisioner for a ``kind = "sim"`` remote (see the module's docstring).

    ``home``: the core's home (for the default state directory; else ``$SKYPORT_HOME``). ``clock``:
    wall-clock seconds (boot and delete times are kept across restarts, so they are wall-clock).
    """

    kind = "sim"
    provides = ("provisioner",)

    def __init__(
        self,
        remote_name: str,
        settings: SimRemoteSettings | Mapping[str, Any],
        *,
        home: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _, self._remote, self.config = sim_config(settings)
        self.remote_name = remote_name
        state_dir = self.config.state_dir or default_state_dir(remote_name, home)
        self.state_dir = state_dir.expanduser().resolve()
        self._clock = clock
        self._rng = random.Random(self.config.seed)
        self._flavors = {f.id: f for f in self.config.flavors}
        self._images = {i.id: i for i in self.config.images}
        self._tag = _tag(self.state_dir)
        self._records: dict[str, PartitionRecord] | None = None
        self._lock = asyncio.Lock()
        self._partition_locks: dict[str, asyncio.Lock] = {}
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._network: _Network | None = None
        #: agent pools: directory -> [process, nodes in it] (None: not looked for yet)
        self._pool_cache: dict[Path, list[Any]] | None = None
        self._closed = False

    # -- helpers -------------------------------------------------------------------------------------

    async def _loaded(self) -> dict[str, PartitionRecord]:
        """The records, read from ``state_dir`` on first use (and the boots still due scheduled)."""
        if self._records is None:
            async with self._lock:
                if self._records is None:
                    await asyncio.to_thread(self._prepare_dir)
                    self._records = await asyncio.to_thread(_load_records, self.state_dir)
                    await asyncio.to_thread(self._remove_unrecorded_vms, self._records)
                    for record in self._records.values():
                        if record.state == "creating":
                            self._schedule_boot(record)
        return self._records

    def _remove_unrecorded_vms(self, records: Mapping[str, PartitionRecord]) -> None:
        """VM directories no record names: user data written by a create the core died in before it
        recorded the partition (no process can use them: agents start only from records)."""
        known = {Path(i.vm_dir).name for r in records.values() for i in r.instances}
        for vm in (self.state_dir / "vms").iterdir():
            if vm.name not in known:
                shutil.rmtree(vm, ignore_errors=True)

    def _prepare_dir(self) -> None:
        for sub in ("", "partitions", "vms"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)

    def _net(self) -> _Network:
        if self._network is None:
            self._network = _Network(self.state_dir, self._tag, self.config.netns_subnet)
        return self._network

    def _partition_lock(self, partition_id: str) -> asyncio.Lock:
        return self._partition_locks.setdefault(partition_id, asyncio.Lock())

    async def _save(self, record: PartitionRecord) -> None:
        data = json.dumps(record.to_dict()).encode()
        await asyncio.to_thread(_write_atomic, _record_file(self.state_dir, record.partition_id), data)

    async def _forget(self, record: PartitionRecord) -> None:
        records = await self._loaded()
        records.pop(record.partition_id, None)
        self._partition_locks.pop(record.partition_id, None)
        await asyncio.to_thread(_record_file(self.state_dir, record.partition_id).unlink, True)

    def _draw(self, rate: float) -> bool:
        return rate > 0 and self._rng.random() < rate

    def _flavor(self, flavor_id: str) -> SimFlavor:
        flavor = self._flavors.get(flavor_id)
        if flavor is None:
            offered = ", ".join(sorted(self._flavors))
            raise ProvisionerError(
                f"InvalidParameterValue: flavor {flavor_id!r} is not offered in region "
                f"{self.config.region} (offered: {offered})"
            )
        return flavor

    # -- the provisioner protocol --------------------------------------------------------------------

    async def catalog(self) -> Catalog:
        flavors = [
            CatalogFlavor(
                id=f.id,
                name=f.name or f.id,
                cpus=f.cpus,
                mem=f.mem,
                gpus=f.gpus,
                storage=f.storage,
                price=f.price,
            )
            for f in self.config.flavors
        ]
        images = [
            CatalogImage(id=i.id, name=i.name or i.id, kind=i.kind, comment=i.comment)
            for i in self.config.images
        ]
        return Catalog(flavors=flavors, images=images)

    async def create_partition(self, request: PartitionRequest) -> PartitionStatus:
        records = await self._loaded()
        async with self._lock:
            existing = records.get(request.partition_id)
            if existing is not None:
                return _status(existing)
            flavor = self._flavor(request.flavor)
            image_id = request.image or self._remote.default_image or self.config.images[0].id
            if image_id not in self._images:
                raise ProvisionerError(
                    f"InvalidAMIID.NotFound: image {image_id!r} does not exist in region {self.config.region}"
                )
            if not request.nodes:
                raise ProvisionerError("InvalidParameterValue: a partition needs at least one node")
            self._check_quotas(records.values(), flavor, len(request.nodes))
            if self._draw(self.config.capacity_failure_rate):
                raise ProvisionerError(
                    f"InsufficientInstanceCapacity: there is not enough {flavor.id} capacity in "
                    f"{self.config.region} right now (injected by the sim); try again later",
                    transient=True,
                )
            if self._draw(self.config.create_failure_rate):
                raise ProvisionerError(
                    f"InternalError: the sim cloud failed to create {request.name} (injected failure)"
                )
            now = self._clock()
            jitter = self._rng.uniform(0, self.config.boot_jitter_s) if self.config.boot_jitter_s else 0.0
            instances = []
            for node in request.nodes:
                instance_id = f"i-{secrets.token_hex(8)}"
                vm_dir = str(self.state_dir / "vms" / instance_id)
                instances.append(Instance(instance_id, node.node_name, node.core_url, vm_dir))
            record = PartitionRecord(
                partition_id=request.partition_id,
                name=request.name,
                flavor=flavor.id,
                image=image_id,
                region=self.config.region,
                state="creating",
                created_at=now,
                boot_at=now + self.config.boot_latency_s + jitter,
                instances=instances,
                ports=list(request.ports),
                tags=dict(request.tags),
                message=f"launching {len(instances)} {flavor.id} instance(s) from {image_id}",
            )
            # The VMs' "user data" first (CA, token), then the record: what is recorded can boot.
            await asyncio.to_thread(self._write_user_data, instances, request)
            await self._save(record)
            records[record.partition_id] = record
        log.info("sim: partition creating", remote=self.remote_name, partition=record.partition_id)
        await self._reserve_pools(record)
        self._schedule_boot(record)
        return _status(record)

    def _pooled(self) -> bool:
        return self.config.agents_per_process > 1 and not self.config.netns

    async def _reserve_pools(self, record: PartitionRecord) -> None:
        """Pooled VMs get their agent pool when they are created, so that the pool's interpreter starts
        during the boot latency (as a VM's operating system does), not after it; a VM's own agent (its
        key, enrolment, connection) still starts only when it has booted. A pool that gets no VM exits
        soon after the boot was due."""
        if not self._pooled():
            return
        grace = max(0.0, record.boot_at - self._clock()) + POOL_START_MARGIN_S
        for instance in record.instances:
            if not instance.pool:
                pool, _ = await self._pool_with_room(grace)
                instance.pool = str(pool)

    async def get_partition(self, partition_id: str) -> PartitionStatus | None:
        records = await self._loaded()
        record = records.get(partition_id)
        if record is None:
            return None
        record = await self._reconcile(record)
        return _status(record) if record is not None else None

    async def delete_partition(self, partition_id: str) -> None:
        records = await self._loaded()
        record = records.get(partition_id)
        if record is None:
            return
        async with self._partition_lock(partition_id):
            if record.partition_id not in records:
                return
            if record.state != "deleting" and self._draw(self.config.delete_failure_rate):
                raise ProvisionerError(
                    f"InternalError: the sim cloud failed to delete {record.name} (injected failure); "
                    "try again",
                    transient=True,
                )
            timer = self._timers.pop(partition_id, None)
            if timer is not None:
                timer.cancel()
            if record.state != "deleting":
                record.state = "deleting"
                record.message = f"terminating {len(record.instances)} instance(s)"
                record.delete_at = self._clock() + self.config.delete_latency_s
                await self._save(record)
            await self._destroy(record)
            if record.delete_at is None or self._clock() >= record.delete_at:
                await self._forget(record)
        log.info("sim: partition deleted", remote=self.remote_name, partition=partition_id)

    async def list_partitions(self) -> list[PartitionStatus]:
        records = await self._loaded()
        found: list[PartitionStatus] = []
        for record in list(records.values()):
            current = await self._reconcile(record)
            if current is not None:
                found.append(_status(current))
        return found

    async def close(self) -> None:
        """Stop the boot timers; the VMs keep running (a new SimGate finds them)."""
        self._closed = True
        timers, self._timers = list(self._timers.values()), {}
        for timer in timers:
            timer.cancel()
        for timer in timers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await timer
        for pid, child in list(self._children.items()):
            if child.poll() is not None:
                self._children.pop(pid, None)

    # -- tests and tools -----------------------------------------------------------------------------

    async def inventory(self) -> SimInventory:
        """Every partition on record (reconciled) and every live process, namespace and bridge of ours."""
        partitions = await self.list_partitions()
        found = await asyncio.to_thread(sim_inventory, self.state_dir, self.config.netns)
        return SimInventory(partitions, found.processes, found.namespaces, found.bridge)

    async def ensure_network(self) -> str:
        """Make the bridge now (namespace mode) and return its gateway address, e.g. for a core to listen
        on before any VM exists."""
        await asyncio.to_thread(self._prepare_dir)
        return await asyncio.to_thread(self._net().ensure_bridge)

    async def remove_network(self) -> None:
        """Remove the bridge when no VM is left (namespace mode)."""
        if await self.list_partitions():
            raise ProvisionerError("the sim still has partitions: delete them before its network")
        await asyncio.to_thread(self._net().remove_bridge)

    # -- quotas --------------------------------------------------------------------------------------

    def _check_quotas(self, records: Iterable[PartitionRecord], flavor: SimFlavor, count: int) -> None:
        instances = 0
        vcpus = 0
        of_flavor = 0
        for record in records:
            cpus = self._flavors[record.flavor].cpus if record.flavor in self._flavors else 1
            instances += len(record.instances)
            vcpus += cpus * len(record.instances)
            if record.flavor == flavor.id:
                of_flavor += len(record.instances)
        cfg = self.config
        if cfg.max_instances is not None and instances + count > cfg.max_instances:
            raise ProvisionerError(
                f"QuotaExceeded: instance limit of {cfg.max_instances} would be exceeded "
                f"({instances} running, {count} requested) in {cfg.region}"
            )
        if cfg.max_vcpus is not None and vcpus + count * flavor.cpus > cfg.max_vcpus:
            raise ProvisionerError(
                f"QuotaExceeded: vCPU limit of {cfg.max_vcpus} would be exceeded "
                f"({vcpus} in use, {count * flavor.cpus} requested) in {cfg.region}"
            )
        limit = cfg.capacity.get(flavor.id)
        if limit is not None and of_flavor + count > limit:
            raise ProvisionerError(
                f"InsufficientInstanceCapacity: there is not enough {flavor.id} capacity in "
                f"{cfg.region} ({limit - of_flavor} available, {count} requested); try again later",
                transient=True,
            )

    # -- booting -------------------------------------------------------------------------------------

    def _write_user_data(self, instances: list[Instance], request: PartitionRequest) -> None:
        """What cloud-init gets: the core's CA and the node's one-time token, private to the VM."""
        for instance, node in zip(instances, request.nodes, strict=True):
            vm = Path(instance.vm_dir)
            vm.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_atomic(vm / "ca.pem", node.ca_pem.encode(), 0o644)
            _write_atomic(vm / "user-data", (node.token + "\n").encode(), 0o600)

    def _schedule_boot(self, record: PartitionRecord) -> None:
        if self._closed or record.partition_id in self._timers:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._boot_later(record.partition_id))
        except RuntimeError:
            return
        self._timers[record.partition_id] = task
        partition_id = record.partition_id

        def forget(done: asyncio.Task[None]) -> None:
            if self._timers.get(partition_id) is done:
                del self._timers[partition_id]

        task.add_done_callback(forget)

    async def _boot_later(self, partition_id: str) -> None:
        records = await self._loaded()
        record = records.get(partition_id)
        if record is None:
            return
        delay = record.boot_at - self._clock()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            await self._reconcile(record)
        except Exception:  # the next get/list tries again; never lose the error silently
            log.exception("sim: boot failed", partition=partition_id)

    async def _reconcile(self, record: PartitionRecord) -> PartitionRecord | None:
        """One level-triggered step: boot what is due, finish deletions, notice VMs that died."""
        async with self._partition_lock(record.partition_id):
            records = await self._loaded()
            if records.get(record.partition_id) is not record:
                return records.get(record.partition_id)
            now = self._clock()
            if record.state == "creating" and now >= record.boot_at:
                await self._boot(record)
            elif record.state == "ready":
                await self._check_alive(record)
                await self._maybe_preempt(record, now)
            elif record.state == "deleting":
                await self._destroy(record)
                if record.delete_at is None or now >= record.delete_at:
                    await self._forget(record)
                    return None
            return record

    async def _maybe_preempt(self, record: PartitionRecord, now: float) -> None:
        """Spot capacity: a preemptible partition is taken back ``preempt_after_s`` after it was ready."""
        after = self.config.preempt_after_s
        if after is None or record.state != "ready" or record.ready_at is None:
            return
        if record.tags.get(TAG_PREEMPTIBLE, "").lower() != "true" or now - record.ready_at < after:
            return
        markers = [m for i in record.instances for m in (i.workroot, str(Path(i.vm_dir) / "agent"))]
        for instance in record.instances:
            if instance.pool:
                await asyncio.to_thread((Path(instance.pool) / f"{instance.id}.json").unlink, True)
        await asyncio.to_thread(_kill_all, markers, [i.netns for i in record.instances if i.netns])
        record.state, record.reason = "failed", PREEMPTED
        record.message = f"SpotInterruption: the sim took {record.name}'s spot capacity back"
        await self._save(record)
        log.info("sim: partition preempted", partition=record.partition_id)

    async def _boot(self, record: PartitionRecord) -> None:
        if self._draw(self.config.boot_failure_rate):
            record.state = "failed"
            record.message = (
                f"InstanceBootFailure: instance {record.instances[0].id} did not boot "
                "(the sim's injected boot failure)"
            )
            await self._save(record)
            log.info("sim: partition failed to boot", partition=record.partition_id)
            return
        try:
            for n, instance in enumerate(record.instances):
                await self._start_vm(record, instance, last=n == len(record.instances) - 1)
        except ProvisionerError as exc:
            record.state = "failed"
            record.message = str(exc)
            await self._save(record)
            return
        except OSError as exc:
            record.state = "failed"
            record.message = f"InternalError: the sim could not start a VM: {exc}"
            await self._save(record)
            return
        if record.state != "ready":
            self._mark_ready(record)
            await self._save(record)
        log.info("sim: partition ready", partition=record.partition_id)

    def _mark_ready(self, record: PartitionRecord) -> None:
        record.state = "ready"
        record.ready_at = self._clock()
        record.message = f"{len(record.instances)} instance(s) running"

    async def _start_vm(self, record: PartitionRecord, instance: Instance, *, last: bool = False) -> None:
        """Start the VM's agent (once: an agent that runs already, maybe from before a restart, is kept).
        ``last``: the partition's last VM (a pooled one's record is then saved ready at once)."""
        if instance.pid and _start_time(instance.pid) == instance.pid_start:
            return
        pooled = self._pooled()
        if pooled and not instance.workroot:
            await self._join_pool(record, instance, last)
            return
        if not instance.workroot:
            parent = self.config.workroot_parent or Path(tempfile.gettempdir())
            prefix = f"{_workroot_prefix(self._tag)}{instance.id}-"
            instance.workroot = await asyncio.to_thread(_make_workroot, parent, prefix)
            await self._save(record)  # recorded before any process can use it
        else:
            # A restart between recording the workroot and recording the pid: adopt a running agent.
            running = await asyncio.to_thread(self._agent_of, instance)
            if running is not None:
                instance.pid, instance.pid_start = running.pid, running.start
                await self._save(record)
                return
        if pooled:
            await self._join_pool(record, instance, last)
            return
        if self.config.netns and not instance.netns:
            taken = {i.address for r in (await self._loaded()).values() for i in r.instances if i.address}
            instance.netns, instance.address = await asyncio.to_thread(self._net().add_vm, instance.id, taken)
            await self._save(record)
        flavor = self._flavor(record.flavor)
        argv = self._agent_argv(record, instance, flavor)
        child = await asyncio.to_thread(self._spawn, argv, Path(instance.vm_dir))
        self._children[child.pid] = child
        instance.pid = child.pid
        instance.pid_start = _start_time(child.pid) or 0
        await self._save(record)

    async def _join_pool(self, record: PartitionRecord, instance: Instance, last: bool) -> None:
        """Run the VM's agent in a shared agent process: write its node file into a pool with room.

        Its files are written in one thread hop (hundreds of VMs boot at once, and the core's event loop
        runs this): the workroot, recorded before anything can use it; the node file; the record again,
        with the pool (and the partition ready, after its last VM)."""
        flavor = self._flavor(record.flavor)
        vm = Path(instance.vm_dir)
        user = self.config.default_user or ("nobody" if os.geteuid() == 0 else None)
        member = PoolMember(
            url=instance.core_url,
            ca_file=str(vm / "ca.pem"),
            token_file=str(vm / "user-data"),
            state_dir=str(vm / "agent"),
            workroot=instance.workroot,  # made with the node file when not yet
            cpus=flavor.cpus,
            mem=flavor.mem,
            gpus=flavor.gpus,
            default_user=user if os.geteuid() == 0 else None,
            heartbeat_s=self.config.agent_heartbeat_s,
            labels={"sim-instance": instance.id, "flavor": flavor.id, "region": record.region},
        )
        pool, proc = await self._reserved_pool(instance)
        parent = self.config.workroot_parent or Path(tempfile.gettempdir())
        prefix = f"{_workroot_prefix(self._tag)}{instance.id}-"
        path = _record_file(self.state_dir, record.partition_id)

        def write() -> None:
            if not instance.workroot:
                instance.workroot = _make_workroot(parent, prefix)
                _write_atomic(path, json.dumps(record.to_dict()).encode())
            node = dataclasses.replace(member, workroot=instance.workroot)
            _write_atomic(pool / f"{instance.id}.json", node.to_json().encode())
            instance.pool, instance.pid, instance.pid_start = str(pool), proc.pid, proc.start
            if last:
                self._mark_ready(record)
            _write_atomic(path, json.dumps(record.to_dict()).encode())

        try:
            await asyncio.to_thread(write)
        except BaseException:
            self._leave_pool(pool)
            raise

    async def _reserved_pool(self, instance: Instance) -> tuple[Path, _Proc]:
        """The pool reserved for the VM when it was created, if that pool still runs; else one with room."""
        entry = (self._pool_cache or {}).get(Path(instance.pool)) if instance.pool else None
        if entry is not None and self._pool_alive(entry[0]):
            return Path(instance.pool), entry[0]
        if entry is not None:
            self._leave_pool(Path(instance.pool))
        return await self._pool_with_room()

    async def _pool_with_room(self, grace_s: float = 0.0) -> tuple[Path, _Proc]:
        """A running agent pool with fewer than ``agents_per_process`` nodes (started when none has).

        Pools are remembered (process and node count) so that booting hundreds of VMs does not scan
        /proc for each; the scan happens once, to find the pools that outlived a previous core.
        """
        async with self._lock:
            root = self.state_dir / "pools"
            if self._pool_cache is None:
                await asyncio.to_thread(root.mkdir, exist_ok=True, mode=0o700)
                running = await asyncio.to_thread(self._pools)
                self._pool_cache = {
                    Path(d): [proc, await asyncio.to_thread(_count_members, Path(d))]
                    for d, proc in running.items()
                }
            for directory, entry in sorted(self._pool_cache.items()):
                proc, members = entry
                if members >= self.config.agents_per_process:
                    continue
                if not self._pool_alive(proc):  # it exited (idle) or died
                    del self._pool_cache[directory]
                    continue
                entry[1] = members + 1
                return directory, proc
            directory = root / f"p{secrets.token_hex(4)}"
            await asyncio.to_thread(directory.mkdir, mode=0o700)
            argv = [
                *(self.config.agent_command or _agent_command()),
                "agent-pool",
                str(directory),
                "--idle-exit",
                str(POOL_IDLE_EXIT_S),
                "--start-grace",
                f"{grace_s:.1f}",
            ]
            child = await asyncio.to_thread(self._spawn, argv, directory)
            self._children[child.pid] = child
            started = _read_proc(child.pid)
            if started is None:
                raise ProvisionerError("InternalError: the sim could not start an agent pool", transient=True)
            self._pool_cache[directory] = [started, 1]
            return directory, started

    def _pool_alive(self, proc: _Proc) -> bool:
        """Whether an agent pool still runs: asked of the child process when this sim started it (no
        /proc read: hundreds of VMs boot into their pools at once, on the core's event loop)."""
        child = self._children.get(proc.pid)
        if child is not None:
            return child.poll() is None
        return _start_time(proc.pid) == proc.start

    def _leave_pool(self, pool: Path) -> None:
        """A node of the pool is gone (or never joined): room for another."""
        entry = (self._pool_cache or {}).get(pool)
        if entry is not None:
            entry[1] = max(0, entry[1] - 1)

    def _pools(self) -> dict[str, _Proc]:
        """Running agent pools of this sim, by directory."""
        root = str(self.state_dir / "pools") + os.sep
        found = {}
        for proc in _all_procs():
            if "agent-pool" in proc.argv and proc.sid == proc.pid:
                directory = next((a for a in proc.argv if a.startswith(root)), None)
                if directory is not None:
                    found[directory] = proc
        return found

    def _agent_argv(self, record: PartitionRecord, instance: Instance, flavor: SimFlavor) -> list[str]:
        vm = Path(instance.vm_dir)
        url = (self.config.netns_core_url if instance.netns else None) or instance.core_url
        argv = [
            *(self.config.agent_command or _agent_command()),
            "agent",
            "--url",
            url,
            "--ca",
            str(vm / "ca.pem"),
            "--token-file",
            str(vm / "user-data"),
            "--state-dir",
            str(vm / "agent"),
            "--workroot",
            instance.workroot,
            "--cpus",
            str(flavor.cpus),
            "--mem",
            str(flavor.mem),
            "--gpus",
            str(flavor.gpus),
            "--heartbeat",
            str(self.config.agent_heartbeat_s),
            "--label",
            f"sim-instance={instance.id}",
            "--label",
            f"flavor={flavor.id}",
            "--label",
            f"region={record.region}",
        ]
        user = self.config.default_user or ("nobody" if os.geteuid() == 0 else None)
        if user and os.geteuid() == 0:
            argv += ["--default-user", user]
        if instance.netns:
            argv = [IP, "netns", "exec", instance.netns, *argv]
        return argv

    def _spawn(self, argv: list[str], vm: Path) -> subprocess.Popen[bytes]:
        """The agent in a session of its own (it outlives the core), with a clean environment: nothing
        of the core's (provider credentials included) reaches a VM."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(vm)}
        for name in ("PYTHONPATH", "TZ"):
            if name in os.environ:
                env[name] = os.environ[name]
        if self.config.agent_nice:  # set before the interpreter starts, so every thread of it has it
            argv = [NICE, "-n", str(self.config.agent_nice), *argv]
        fd = os.open(vm / "agent.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                cwd=vm,
                env=env,
                close_fds=True,
                start_new_session=True,
            )
        finally:
            os.close(fd)
        if self.config.agent_nice:
            _set_autogroup_nice(child.pid, self.config.agent_nice)
        return child

    def _agent_of(self, instance: Instance) -> _Proc | None:
        """The running agent of ``instance``, found by its state directory in its argv."""
        state = str(Path(instance.vm_dir) / "agent")
        for proc in _all_procs():
            if state in proc.argv and proc.sid == proc.pid:
                return proc
        return None

    async def _check_alive(self, record: PartitionRecord) -> None:
        """A ready VM whose agent is gone has stopped on its own: the partition has failed."""
        for instance in record.instances:
            child = self._children.get(instance.pid)
            if child is not None and child.poll() is None:
                continue
            if child is None and _start_time(instance.pid) == instance.pid_start:
                continue
            self._children.pop(instance.pid, None)
            tail = await asyncio.to_thread(_log_tail, Path(instance.vm_dir) / "agent.log")
            record.state = "failed"
            record.message = f"instance {instance.id} ({instance.node_name}) stopped: its agent exited" + (
                f": {tail}" if tail else ""
            )
            await self._save(record)
            return

    # -- deleting ------------------------------------------------------------------------------------

    async def _destroy(self, record: PartitionRecord) -> None:
        """KILL every process of the partition's VMs and remove their files and namespaces."""
        for instance in record.instances:  # a pooled agent stops when its node file goes
            if instance.pool:
                await asyncio.to_thread((Path(instance.pool) / f"{instance.id}.json").unlink, True)
                self._leave_pool(Path(instance.pool))
        markers = [m for i in record.instances for m in (i.workroot, str(Path(i.vm_dir) / "agent"))]
        namespaces = [i.netns for i in record.instances if i.netns]
        survivors = await asyncio.to_thread(_kill_all, markers, namespaces)
        for instance in record.instances:
            if instance.pool:
                continue  # the pool process serves other VMs: it exits on its own when it has none
            child = self._children.pop(instance.pid, None)
            if child is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(child.wait, 5)
        if survivors:
            raise ProvisionerError(
                f"InternalError: processes {survivors} of {record.name} would not die; try again",
                transient=True,
            )
        await asyncio.to_thread(self._remove_files, record)

    def _remove_files(self, record: PartitionRecord) -> None:
        for instance in record.instances:
            if instance.netns:
                _Network.remove_vm(instance.netns, instance.id)
            if instance.workroot:
                shutil.rmtree(instance.workroot, ignore_errors=True)
            shutil.rmtree(instance.vm_dir, ignore_errors=True)


def _count_members(pool: Path) -> int:
    return len(list(pool.glob("*.json")))


def _make_workroot(parent: Path, prefix: str) -> str:
    """A VM's workroot: 0711, so the accounts jobs run as (``nobody``) can reach their directories."""
    parent.mkdir(parents=True, exist_ok=True)
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(path, 0o711)
    return path


def sim_inventory(state_dir: Path, netns: bool = True) -> SimInventory:
    """What a sim's state directory holds, without a gate and without changing anything: partitions on
    record (as recorded), live processes of its VMs, its namespaces and bridge. For tests and tools."""
    state_dir = state_dir.expanduser()
    records = _load_records(state_dir) if state_dir.exists() else {}
    procs = _matching(_all_procs(), _sim_markers(state_dir)) if state_dir.exists() else {}
    processes = [SimProcess(p.pid, p.argv) for p in sorted(procs.values(), key=lambda p: p.pid)]
    namespaces: list[str] = []
    bridge: str | None = None
    if netns and (shutil.which(IP) or os.path.exists(IP)):
        net = _Network(state_dir, _tag(state_dir), None)
        with contextlib.suppress(OSError, ProvisionerError):
            namespaces = net.namespaces()
            bridge = net.bridge if _link_exists(net.bridge) else None
    return SimInventory([_status(r) for r in records.values()], processes, namespaces, bridge)
