"""Keeps ``skyport agent`` running on the hosts of ``ssh`` remotes in ``agent`` mode.

Level-triggered, like every loop of the core (DESIGN §5): a pass looks only at hosts whose node is not
connected to this core right now, and for each one that is due, logs in over SSH
(:class:`~skyport.gates.ssh_agent.SSHAgentStarter`) and makes what is true match what should be:

- our agent runs there, enrolled as this node: nothing to do (it is reconnecting, e.g. after a restart
  of the core; its own back-off is a few seconds). If it stays unconnected, its log's last lines are
  logged, so that a wrong URL or a firewall is visible from the core;
- not running (never started, killed, the host rebooted): start it; with a fresh one-time bootstrap
  token if the host is not enrolled as this node yet.

Nothing is remembered between passes but back-off timers, so a core that restarts simply resumes. A
host that cannot be reached or refuses (unknown host key, missing agent command, ...) is retried with a
doubling wait, and each new error is logged once with the host's own text.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import structlog

from skyport.agent.protocol import node_id_for
from skyport.gates.agent import AgentHub
from skyport.gates.base import GateError
from skyport.gates.ssh_agent import SSHAgentStarter
from skyport.server.lifecycle.wakeup import Wakeup, run_passes
from skyport.server.nodes import EnrolmentError, NodeEnrolment
from skyport.server.settings import SSHRemoteSettings

log = structlog.get_logger(__name__)

#: Longest wait between two attempts on a host that keeps failing.
MAX_BACKOFF_S = 60.0
#: How long a one-time bootstrap token handed to a starting agent stays usable.
TOKEN_TTL = timedelta(minutes=15)


@dataclass
class _Host:
    remote_id: str
    remote: str
    node: str
    starter: SSHAgentStarter
    #: Seconds an agent that runs may take to connect before the core looks again.
    connect_grace_s: float
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""
    #: Looks that found our agent running but not connected, in a row.
    unconnected: int = 0
    #: When the agent we last started was being started; None once the loop has seen it connected.
    started_at: float | None = None

    @property
    def node_id(self) -> str:
        return node_id_for(self.remote_id, self.node)


class SSHAgentLoop:
    def __init__(
        self,
        hub: AgentHub,
        enrolment: NodeEnrolment,
        *,
        core_url: Callable[[], str | None],
        ca_file: Path,
        monotonic: Callable[[], float],
        interval_s: float = 1.0,
    ) -> None:
        self._hub = hub
        self._enrolment = enrolment
        self._core_url = core_url
        self._ca_file = ca_file
        self._monotonic = monotonic
        self._interval = interval_s
        self._hosts: list[_Host] = []
        self._starters: list[SSHAgentStarter] = []
        self.wakeup = Wakeup()

    def add(self, remote_id: str, settings: SSHRemoteSettings) -> None:
        starter = SSHAgentStarter(settings)
        self._starters.append(starter)
        grace = max(10.0, settings.heartbeat_timeout_s / 2)
        for node in starter.node_names:
            self._hosts.append(_Host(remote_id, settings.name, node, starter, grace))

    @property
    def has_hosts(self) -> bool:
        return bool(self._hosts)

    async def run(self) -> None:
        await run_passes(self.pass_once, lambda: self.wakeup.wait(self._interval), "ssh-agents")

    async def pass_once(self) -> None:
        url = self._core_url()
        if url is None:
            return  # the core does not know its own address yet (still starting to listen)
        now = self._monotonic()
        due = []
        for host in self._hosts:
            if self._hub.connected(host.node_id):
                host.failures, host.retry_at, host.last_error, host.unconnected = 0, 0.0, "", 0
                host.started_at = None
            elif host.retry_at <= now or self._connected_since_start(host):
                due.append(host)
        if due:
            ca_pem = await asyncio.to_thread(self._ca_file.read_bytes)
            await asyncio.gather(*(self._ensure(host, url, ca_pem) for host in due))

    async def _ensure(self, host: _Host, url: str, ca_pem: bytes) -> None:
        try:
            state = await host.starter.inspect(host.node)
            moved = state.url is not None and state.url != url  # the core listens elsewhere now
            if state.pid is not None and state.node_id == host.node_id and not moved:
                host.unconnected += 1
                if host.unconnected == 2:
                    log.warning(
                        "the agent runs on the host but does not connect to the core",
                        remote=host.remote,
                        node=host.node,
                        url=url,
                        agent_log=state.log_tail,
                    )
                host.failures, host.started_at = 0, None
                host.retry_at = self._monotonic() + host.connect_grace_s
                return
            token = None
            if state.node_id != host.node_id:
                issued = await self._enrolment.create_token(host.remote, host.node, TOKEN_TTL)
                token = issued.token
            starting = self._monotonic()
            pid = await host.starter.start(host.node, url=url, ca_pem=ca_pem, token=token, stop_pid=state.pid)
        except (GateError, EnrolmentError) as exc:
            host.failures, host.started_at = host.failures + 1, None
            wait = min(MAX_BACKOFF_S, self._interval * 2**host.failures)
            host.retry_at = self._monotonic() + wait
            text = str(exc)
            if text != host.last_error:
                log.error(
                    "cannot start the agent on the host",
                    remote=host.remote,
                    node=host.node,
                    error=text,
                    retry_in_s=round(wait, 1),
                )
                host.last_error = text
            return
        log.info(
            "agent started over ssh",
            remote=host.remote,
            node=host.node,
            host=host.starter.where(host.node),
            pid=pid,
            enrolling=token is not None,
        )
        host.failures, host.last_error, host.unconnected = 0, "", 0
        host.retry_at, host.started_at = self._monotonic() + host.connect_grace_s, starting

    def _connected_since_start(self, host: _Host) -> bool:
        """The agent started last has been heard from since (so it connected): the connect grace is
        over, and an agent gone again is looked at at once, even before a pass saw it connected."""
        if host.started_at is None:
            return False
        return self._monotonic() - self._hub.silent_for(host.node_id) >= host.started_at

    async def close(self) -> None:
        for starter in self._starters:
            with contextlib.suppress(Exception):
                await starter.close()
