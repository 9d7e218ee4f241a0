"""The core's parts, built once and wired together: store, loops, gates and the services routers use.

Nothing here is global: an app (or a test) builds a :class:`Core` from settings and a clock, starts it,
and stops it. The loops run as tasks of the core; a restart builds a new core that resumes from the
store.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from datetime import datetime

import structlog
from sqlalchemy import Connection

from skyport.gates.agent import AgentGate, AgentHub
from skyport.gates.base import ExecutorGate
from skyport.gates.local import LocalGate
from skyport.gates.ssh import SSHGate
from skyport.server.auth import Authenticator
from skyport.server.clock import Clock, SystemClock
from skyport.server.control import JobControl
from skyport.server.intake import Intake
from skyport.server.lifecycle.execution import ExecutionLoop
from skyport.server.lifecycle.ports import PortLoop
from skyport.server.lifecycle.scheduling import SchedulerLoop
from skyport.server.lifecycle.wakeup import JobNotifier, Wakeup
from skyport.server.metrics import Metrics
from skyport.server.nodes import NodeEnrolment, NodeLoop
from skyport.server.outputs import JobOutputs
from skyport.server.settings import AgentRemoteSettings, Settings, SSHRemoteSettings
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
            wake_execution=self.execution.wakeup,
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
            on_change=self.scheduler.capacity_changed,
        )
        self.port_listeners = PortListeners()
        self.ports = JobPorts(self.store, self.gates)
        self.port_loop = PortLoop(
            self.store, self.gates, self.port_listeners, remote_ids=self._remote_gate_ids
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._local: LocalGate | None = None
        self._ssh: list[SSHGate] = []

    async def start(self) -> None:
        await self.store.migrate()
        await self._register_local()
        await self._register_agent_remotes()
        await self._register_ssh_remotes()
        self._tasks = [
            asyncio.create_task(self.execution.run(), name="execution-loop"),
            asyncio.create_task(self.scheduler.run(), name="scheduler-loop"),
            asyncio.create_task(self.node_loop.run(), name="node-loop"),
            asyncio.create_task(self.port_loop.run(), name="port-loop"),
        ]
        log.info("core started", store=self.store.dialect, remotes=len(self.gates))

    async def _register_local(self) -> None:
        if not self.settings.local.enabled:
            return
        workroot = self.settings.local.workroot or self.settings.home / "work"
        gate = LocalGate(self.settings.local, workroot)
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

    async def _register_ssh_remotes(self) -> None:
        """SSH remotes: a static partition of the configured hosts, connected to (concurrently) at start."""
        gates: list[tuple[SSHRemoteSettings, SSHGate]] = []
        for remote in self.settings.remotes:
            if not isinstance(remote, SSHRemoteSettings):
                continue
            if remote.mode == "direct":
                gates.append((remote, SSHGate(remote)))
            # mode "agent" (install and start `skyport agent` on each host over SSH): added here.
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
        self.stager.close()
        await self.port_listeners.close_all()
        if self._local is not None:
            self._local.close()
        await asyncio.gather(*(gate.close() for gate in self._ssh))
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


def _register_remote(conn: Connection, name: str, kind: str, now: datetime) -> str:
    """Record a remote and its static partition (nodes join it later); returns its id."""
    remote_id = infra_store.ensure_remote(conn, name=name, kind=kind, server="", settings={}, now=now)
    infra_store.ensure_static_partition(conn, remote_id=remote_id, name=name, now=now)
    return remote_id
