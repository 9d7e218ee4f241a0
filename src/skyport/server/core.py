"""The core's parts, built once and wired together: store, loops, gates and the services routers use.

Nothing here is global: an app (or a test) builds a :class:`Core` from settings and a clock, starts it,
and stops it. The loops run as tasks of the core; a restart builds a new core that resumes from the
store.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import uuid
from datetime import datetime
from importlib.metadata import entry_points
from pathlib import Path

import structlog
from sqlalchemy import Connection

from skyport.gates.agent import AgentGate, AgentHub
from skyport.gates.base import ExecutorGate
from skyport.gates.local import LocalGate
from skyport.gates.provisioner import ProvisionerGate
from skyport.gates.slurm import SlurmGate
from skyport.gates.ssh import SSHGate
from skyport.server.auth import Authenticator
from skyport.server.clock import Clock, SystemClock
from skyport.server.control import JobControl
from skyport.server.intake import Intake
from skyport.server.lifecycle.execution import ExecutionLoop
from skyport.server.lifecycle.ports import PortLoop
from skyport.server.lifecycle.provisioning import ProvisioningLoop
from skyport.server.lifecycle.scheduling import ForwardingRemote, SchedulerLoop
from skyport.server.lifecycle.ssh_agents import SSHAgentLoop
from skyport.server.lifecycle.wakeup import JobNotifier, Wakeup
from skyport.server.metrics import Metrics
from skyport.server.nodes import NodeEnrolment, NodeLoop
from skyport.server.outputs import JobOutputs
from skyport.server.settings import (
    AgentRemoteSettings,
    CloudRemoteSettings,
    Settings,
    SlurmRemoteSettings,
    SSHRemoteSettings,
)
from skyport.server.spool import Spool
from skyport.server.staging import Stager
from skyport.server.store import infra as infra_store
from skyport.server.store import jobs as job_store
from skyport.server.store.engine import Store
from skyport.server.tunnels import JobPorts, PortListeners

log = structlog.get_logger(__name__)

LOCAL_REMOTE = "local"


class Core:
    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.store = Store(settings.store_url)
        self.metrics = Metrics()
        self.notifier = JobNotifier()
        self.spool = Spool(settings.spool)
        #: remote id -> the gate that runs its jobs; filled at start from the configured remotes.
        self.gates: dict[str, ExecutorGate] = {}
        self.auth = Authenticator(self.store, self.clock)
        # The loops wake each other: a placement wakes execution, an end wakes the scheduler.
        execution_wakeup = Wakeup()
        self.stager = Stager(settings.staging, self.store, self.clock, self.notifier)
        self.scheduler = SchedulerLoop(
            self.store,
            self.clock,
            self.metrics,
            self.notifier,
            settings.scheduler,
            interval_s=settings.scheduler_interval_s,
            on_placed=execution_wakeup,
        )
        self.execution = ExecutionLoop(
            self.store,
            self.clock,
            self.metrics,
            self.notifier,
            self.spool,
            self.gates,
            cancel_grace_s=settings.local.cancel_grace_s,
            interval_s=settings.scheduler_interval_s,
            usage_half_life_s=settings.scheduler.usage_half_life_s,
            wakeup=execution_wakeup,
            on_finished=self.scheduler.capacity_changed,
            stager=self.stager,
        )
        self.intake = Intake(
            self.store, self.clock, self.spool, self.metrics, settings, on_submit=self.scheduler.submitted
        )
        self.control = JobControl(
            self.store,
            self.clock,
            self.notifier,
            on_change=self.scheduler.capacity_changed,
            on_flags=self.execution.flags_changed,
        )
        self.outputs = JobOutputs(self.store, self.spool, self.gates, self.notifier)
        # Node agents: their sessions, enrolment, and the loop that keeps node liveness true.
        self.agents = AgentHub(self.clock.monotonic)
        self.agents.ready = self.execution.recovered
        self.enrolment = NodeEnrolment(self.store, self.clock, settings)
        self._heartbeat_timeouts: dict[str, float] = {}
        self.node_loop = NodeLoop(
            self.store,
            self.clock,
            self.agents,
            timeouts=self._heartbeat_timeouts,
            on_change=self._nodes_changed,
        )
        #: Keeps `skyport agent` running on the hosts of ssh remotes in agent mode (started over SSH).
        self.ssh_agents = SSHAgentLoop(
            self.agents,
            self.enrolment,
            core_url=lambda: settings.public_url or self.listening_url,
            ca_file=settings.ca_cert,
            monotonic=self.clock.monotonic,
        )
        self.port_listeners = PortListeners()
        self.ports = JobPorts(self.store, self.gates)
        self.port_loop = PortLoop(
            self.store, self.gates, self.port_listeners, remote_ids=self._remote_gate_ids
        )
        # Elastic capacity: the provisioner of each cloud remote, and the loop that drives partitions.
        self.provisioners: dict[str, ProvisionerGate] = {}
        self.cloud_remotes: dict[str, CloudRemoteSettings] = {}
        self.scheduler.attach_cloud(self.cloud_remotes, on_provision=lambda: self.provisioning.wakeup.ring())
        #: Where this core listens (set once it does); agents use ``settings.public_url`` when given.
        self.listening_url: str | None = None
        self.provisioning = ProvisioningLoop(
            self.store,
            self.clock,
            self.notifier,
            provisioners=self.provisioners,
            remotes=self.cloud_remotes,
            core_id=core_identity(settings.home),
            core_url=self.public_url,
            ca_pem=lambda: settings.ca_cert.read_text(),
            on_placed=execution_wakeup.ring,
            on_capacity=self.scheduler.capacity_changed,
            on_nodes_gone=self._nodes_gone,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._local: LocalGate | None = None
        self._ssh: list[SSHGate] = []
        self._slurm: list[SlurmGate] = []
        #: Remotes that schedule jobs themselves (Slurm): the scheduler forwards their jobs unplaced.
        self.forwarding: dict[str, ForwardingRemote] = {}
        self.scheduler.attach_self_scheduling(self.forwarding)

    def _nodes_changed(self) -> None:
        """Nodes came up or went down: the scheduler may place more, a booting partition may be ready."""
        self.scheduler.capacity_changed()
        self.provisioning.wakeup.ring()

    def _nodes_gone(self, node_ids: list[str], why: str, reason: str = "node_lost") -> None:
        """Machines were deleted (or preempted): whatever still ran on them ended with them."""
        for node_id in node_ids:
            self.agents.node_lost(node_id, why, reason)

    def public_url(self) -> str:
        """The URL nodes reach this core at."""
        return (
            self.settings.public_url
            or self.listening_url
            or f"https://{self.settings.host}:{self.settings.port}"
        )

    async def start(self) -> None:
        await self.store.migrate()
        await self._register_local()
        await self._register_agent_remotes()
        await self._register_ssh_remotes()
        await self._register_slurm_remotes()
        await self._register_cloud_remotes()
        self._tasks = [
            asyncio.create_task(self.execution.run(), name="execution-loop"),
            asyncio.create_task(self.scheduler.run(), name="scheduler-loop"),
            asyncio.create_task(self.node_loop.run(), name="node-loop"),
            asyncio.create_task(self.port_loop.run(), name="port-loop"),
            asyncio.create_task(self.provisioning.run(), name="provisioning-loop"),
        ]
        if self.ssh_agents.has_hosts:
            self._tasks.append(asyncio.create_task(self.ssh_agents.run(), name="ssh-agents-loop"))
        log.info("core started", store=self.store.dialect, remotes=len(self.gates))

    async def _register_local(self) -> None:
        if not self.settings.local.enabled:
            return
        workroot = self.settings.local.workroot or self.settings.home / "work"
        gate = LocalGate(self.settings.local, workroot, launcher=True)
        remote_id = await self.store.write(_register_static_remote, gate, LOCAL_REMOTE, self.clock.now())
        self.gates[remote_id] = gate
        self._local = gate

    async def _register_agent_remotes(self) -> None:
        """Remotes whose nodes are agents that enrol themselves (static partitions, no nodes yet)."""
        for remote in self.settings.remotes:
            if not isinstance(remote, AgentRemoteSettings):
                continue
            remote_id = await self.store.write(_register_remote, remote.name, remote.kind, self.clock.now())
            self.gates[remote_id] = AgentGate(remote_id, self.agents)
            self._heartbeat_timeouts[remote_id] = remote.heartbeat_timeout_s

    async def _register_cloud_remotes(self) -> None:
        """Remotes that create partitions on demand: a provisioner plugin (found by kind through the
        ``skyport.gates`` entry points), and the agent gate for the nodes it makes."""
        for remote in self.settings.remotes:
            if not isinstance(remote, CloudRemoteSettings):
                continue
            provisioner = load_provisioner(remote, self.settings.home)
            remote_id = await self.store.write(_register_remote, remote.name, remote.kind, self.clock.now())
            self.provisioners[remote_id] = provisioner
            self.cloud_remotes[remote_id] = remote
            self.gates[remote_id] = AgentGate(remote_id, self.agents)
            self._heartbeat_timeouts[remote_id] = remote.heartbeat_timeout_s
        if self.provisioners:
            await self.provisioning.refresh_catalogs()

    async def _register_slurm_remotes(self) -> None:
        """Slurm clusters: each Slurm partition a static partition of the remote, with its nodes (shown,
        never placed on: the cluster schedules the jobs forwarded to it)."""
        gates = [(r, SlurmGate(r)) for r in self.settings.remotes if isinstance(r, SlurmRemoteSettings)]
        await asyncio.gather(*(gate.start() for _, gate in gates))
        for remote, gate in gates:
            server = remote.rest_url or (remote.host.host if remote.host else socket.getfqdn())
            remote_id = await self.store.write(
                _register_slurm_remote, gate, remote.name, server, self.clock.now()
            )
            self.gates[remote_id] = gate
            self.forwarding[remote_id] = ForwardingRemote(
                remote.name, gate.default_partition, gate.partition_label
            )
            self._slurm.append(gate)

    async def _register_ssh_remotes(self) -> None:
        """SSH remotes: a static partition of the configured hosts, connected to (concurrently) at start."""
        gates: list[tuple[SSHRemoteSettings, SSHGate]] = []
        for remote in self.settings.remotes:
            if not isinstance(remote, SSHRemoteSettings):
                continue
            if remote.mode == "direct":
                gates.append((remote, SSHGate(remote)))
            else:  # agent: `skyport agent` started on each host over SSH, then an ordinary agent node
                remote_id = await self.store.write(
                    _register_remote, remote.name, remote.kind, self.clock.now()
                )
                self.gates[remote_id] = AgentGate(remote_id, self.agents)
                self._heartbeat_timeouts[remote_id] = remote.heartbeat_timeout_s
                self.ssh_agents.add(remote_id, remote)
        await asyncio.gather(*(gate.start() for _, gate in gates))
        for remote, gate in gates:
            servers = ",".join(h.host for h in remote.hosts)
            remote_id = await self.store.write(
                _register_static_remote, gate, remote.name, self.clock.now(), server=servers
            )
            self.gates[remote_id] = gate
            self._ssh.append(gate)

    def _remote_gate_ids(self) -> list[str]:
        """Remotes whose jobs run on other hosts (their ports need the core's listeners)."""
        return [remote_id for remote_id, gate in self.gates.items() if gate is not self._local]

    async def jobs_by_state(self) -> dict[str, int]:
        return await self.store.read(job_store.count_by_state)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.execution.close()
        await self.provisioning.close()
        for provisioner in self.provisioners.values():
            with contextlib.suppress(Exception):
                await provisioner.close()
        self.stager.close()
        await self.port_listeners.close_all()
        if self._local is not None:
            self._local.close()
        await asyncio.gather(*(gate.close() for gate in self._ssh))
        await asyncio.gather(*(gate.close() for gate in self._slurm))
        await self.ssh_agents.close()
        await self.store.close()


def _register_static_remote(
    conn: Connection, gate: ExecutorGate, name: str, now: datetime, *, server: str | None = None
) -> str:
    """Record a remote with one static partition and the nodes its gate offers; returns its id."""
    remote_id = infra_store.ensure_remote(
        conn, name=name, kind=gate.kind, server=server or socket.getfqdn(), settings={}, now=now
    )
    partition_id = infra_store.ensure_static_partition(conn, remote_id=remote_id, name=name, now=now)
    for node in gate.nodes(remote_id, partition_id):
        infra_store.upsert_node(conn, node, now)
    return remote_id


def _register_slurm_remote(conn: Connection, gate: SlurmGate, name: str, server: str, now: datetime) -> str:
    """Record a Slurm remote: one static partition per Slurm partition, each node in its first one."""
    remote_id = infra_store.ensure_remote(
        conn, name=name, kind=gate.kind, server=server, settings={}, now=now
    )
    ids = {
        p: infra_store.ensure_static_partition(conn, remote_id=remote_id, name=p, now=now)
        for p in gate.partitions()
    }
    first = gate.node_partitions()
    for node in gate.nodes(remote_id, ""):
        partition_id = ids.get(first.get(node.name, ""), "")
        infra_store.upsert_node(conn, node.model_copy(update={"partition_id": partition_id}), now)
    return remote_id


def _register_remote(conn: Connection, name: str, kind: str, now: datetime) -> str:
    """Record a remote and its static partition (nodes join it later); returns its id."""
    remote_id = infra_store.ensure_remote(conn, name=name, kind=kind, server="", settings={}, now=now)
    infra_store.ensure_static_partition(conn, remote_id=remote_id, name=name, now=now)
    return remote_id


def core_identity(home: Path) -> str:
    """This core's id (kept in its home): the tag its cloud resources carry, so the garbage collector of
    one core never deletes another's."""
    path = home / "core-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        identity = str(uuid.uuid4())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(identity + "\n")
        return identity


def load_provisioner(remote: CloudRemoteSettings, home: Path) -> ProvisionerGate:
    """The provisioner plugin of a remote's kind, from the ``skyport.gates`` entry points (given the
    core's home when it takes one, for state it keeps)."""
    found = {e.name: e for e in entry_points(group="skyport.gates")}
    if remote.kind not in found:
        raise RuntimeError(
            f"remote {remote.name!r}: no gate plugin of kind {remote.kind!r} is installed "
            f"(installed: {', '.join(sorted(found))})"
        )
    cls = found[remote.kind].load()
    takes_home = "home" in inspect.signature(cls).parameters
    gate: ProvisionerGate = cls(remote.name, remote, home=home) if takes_home else cls(remote.name, remote)
    return gate
