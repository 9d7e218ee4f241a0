"""Node agents: enrolment with one-time bootstrap tokens, certificate renewal, and node liveness.

Enrolment: an operator (or a provisioner, or the SSH gate) asks for a bootstrap token for one node of
one remote; the agent generates its own key, sends a CSR with the token, and gets a short-lived node
certificate. The private key never leaves the node and no two nodes share one. Before it expires the
agent renews with its current certificate and a CSR for a fresh key.

Liveness (:class:`NodeLoop`, level-triggered): a node whose agent is connected is ``up``; one not heard
from for longer than its remote's heartbeat timeout is ``down`` and every job on it fails with reason
``node_lost``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from cryptography import x509
from sqlalchemy import Connection

from skyport.gates.agent import AgentHub
from skyport.pki import CertificateAuthority, cert_to_pem
from skyport.server.clock import Clock
from skyport.server.lifecycle.wakeup import Wakeup, run_passes
from skyport.server.settings import Settings
from skyport.server.store import enrolment as enrol_store
from skyport.server.store import infra as infra_store
from skyport.server.store.batch import GroupCommit
from skyport.server.store.engine import Store

log = structlog.get_logger(__name__)


class EnrolmentError(Exception):
    """Refused: the message says why (shown to the agent's operator)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class NodeCertificate:
    node_id: str
    node_name: str
    remote: str
    certificate_pem: str
    ca_pem: str
    expires_at: datetime


@dataclass(frozen=True)
class BootstrapToken:
    token: str
    remote: str
    node_name: str
    expires_at: datetime


class NodeEnrolment:
    def __init__(self, store: Store, clock: Clock, settings: Settings) -> None:
        self._store = store
        self._clock = clock
        self._settings = settings
        self._ca: CertificateAuthority | None = None
        # A burst of booting VMs enrols and says hello together: one transaction for those that arrive
        # together (see skyport.server.store.batch).
        self._enrolments = GroupCommit(store, group_txn=_redeem_and_register)
        self._hellos = GroupCommit(store, group_txn=_refresh)

    def _authority(self) -> CertificateAuthority:
        if self._ca is None:
            self._ca = CertificateAuthority.load(self._settings.ca_dir)
        return self._ca

    async def create_token(self, remote_name: str, node_name: str, ttl: timedelta) -> BootstrapToken:
        remote = await self._store.read(infra_store.get_remote, name=remote_name)
        if remote is None:
            raise EnrolmentError(404, f"no remote named {remote_name!r}: see `skyport remotes`")
        if remote.kind not in ("agent", "ssh", "sim"):
            raise EnrolmentError(400, f"remote {remote_name!r} ({remote.kind}) has no agent nodes")
        now = self._clock.now()
        secret = await self._store.write(_create_token, remote.id, node_name, ttl, now)
        return BootstrapToken(secret, remote_name, node_name, now + ttl)

    async def enrol(self, token: str, csr_pem: str, host: str, ip: str) -> NodeCertificate:
        try:  # a bad request must not use the token up
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as exc:
            raise EnrolmentError(400, f"the certificate request is not valid: {exc}") from None
        if not csr.is_signature_valid:
            raise EnrolmentError(400, "the certificate request's signature does not verify")
        granted = await self._enrolments.write(_Arrival(token, host, ip, self._clock.now()))
        if isinstance(granted, str):
            raise EnrolmentError(401, granted)
        log.info("node enrolled", node=granted.node_name, remote=granted.remote_name)
        return await self._issue(granted, csr_pem)

    async def hello(self, node_id: str, host: str, ip: str, resources: dict[str, object]) -> None:
        """An agent connected and described its node: record its capacity; it is up."""
        labels = resources.get("labels") or {}
        known = await self._hellos.write(
            _Hello(
                node_id,
                {
                    "host": host,
                    "ip": ip,
                    "cpus": max(1, int(str(resources.get("cpus", 1)))),
                    "mem": max(0, int(str(resources.get("mem", 0)))),
                    "gpus": max(0, int(str(resources.get("gpus", 0)))),
                    "labels": {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
                    "now": self._clock.now(),
                },
            )
        )
        if not known:
            raise EnrolmentError(401, "this node is no longer known to the core: enrol it again")

    async def identify(self, node_id: str) -> enrol_store.Enrolment | None:
        return await self._store.read(enrol_store.node_enrolment, node_id)

    async def renew(self, node_id: str, csr_pem: str) -> NodeCertificate:
        granted = await self._store.read(enrol_store.node_enrolment, node_id)
        if granted is None:
            raise EnrolmentError(401, "this node is no longer known to the core: enrol it again")
        return await self._issue(granted, csr_pem)

    async def _issue(self, granted: enrol_store.Enrolment, csr_pem: str) -> NodeCertificate:
        lifetime = timedelta(seconds=self._settings.node_cert_lifetime_s)
        authority = self._authority()
        try:
            cert = await asyncio.to_thread(
                authority.sign_node_csr, csr_pem.encode(), granted.node_id, granted.node_name, lifetime
            )
        except ValueError as exc:
            raise EnrolmentError(400, f"the certificate request is not valid: {exc}") from None
        return NodeCertificate(
            node_id=granted.node_id,
            node_name=granted.node_name,
            remote=granted.remote_name,
            certificate_pem=cert_to_pem(cert).decode(),
            ca_pem=authority.cert_pem.decode(),
            expires_at=cert.not_valid_after_utc,
        )


def _create_token(conn: Connection, remote_id: str, node_name: str, ttl: timedelta, now: datetime) -> str:
    return enrol_store.create_bootstrap_token(
        conn,
        remote_id=remote_id,
        node_name=node_name,
        ttl=ttl,
        now=now,
    )


@dataclass(frozen=True)
class _Hello:
    """A connected agent's description of its node (host, ip, cpus, mem, gpus, labels, now)."""

    node_id: str
    values: dict[str, Any]


@dataclass(frozen=True)
class _Arrival:
    """An enrolment request that passed the checks done without the store."""

    token: str
    host: str
    ip: str
    now: datetime


def _refresh(conn: Connection, hellos: list[_Hello]) -> list[bool]:
    """Record known nodes' capacities as their agents describe them, in a few statements; per hello,
    False if its node is not known."""
    return enrol_store.refresh_nodes(conn, [(hello.node_id, hello.values) for hello in hellos])


def _redeem_and_register(conn: Connection, arrivals: list[_Arrival]) -> list[enrol_store.Enrolment | str]:
    """Use the tokens up and record their nodes (down until their agents say hello), in a few
    statements; per arrival, the enrolment granted or why it is refused."""
    now = max(arrival.now for arrival in arrivals)  # the group's tokens are used when the last arrived
    granted = enrol_store.redeem_bootstrap_tokens(conn, [arrival.token for arrival in arrivals], now)
    enrolled = [
        (grant, arrival.host, arrival.ip)
        for arrival, grant in zip(arrivals, granted, strict=True)
        if not isinstance(grant, str)
    ]
    enrol_store.register_enrolled_nodes(conn, enrolled, now)
    return granted


class NodeLoop:
    """Keeps the store's node power states true to the agents' liveness; fails jobs of lost nodes."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        hub: AgentHub,
        *,
        timeouts: dict[str, float],
        on_change: Callable[[], None],
        interval_s: float = 1.0,
    ) -> None:
        self._store = store
        self._clock = clock
        self._hub = hub
        #: remote id -> heartbeat timeout (seconds), for the remotes whose nodes are agents
        self._timeouts = timeouts
        self._on_change = on_change
        self._interval = interval_s
        self.wakeup = Wakeup()
        hub.on_connect = self._connected

    def _connected(self, _node_id: str) -> None:
        """An agent said hello: its node is recorded up already (the hello's transaction did it), so no
        pass of this loop would find a power state to change and call ``on_change``; placements waiting
        for the node (a booting partition's) would wait for their loops' timers. Tell them now.

        This loop itself is not woken: its pass would read every node to find nothing to change (500
        times, each reading 500 nodes, while a burst of VMs connects); its timer catches a node that
        is connected but not recorded up."""
        self._on_change()

    async def run(self) -> None:
        await run_passes(self.pass_once, lambda: self.wakeup.wait(self._interval), "nodes")

    async def pass_once(self) -> None:
        if not self._timeouts:
            return
        known = await self._store.read(enrol_store.nodes_with_remote, list(self._timeouts))
        up, down = [], []
        for node_id, name, remote_id, power in known:
            silent = self._hub.silent_for(node_id)
            timeout = self._timeouts[remote_id]
            if silent <= timeout:
                if self._hub.connected(node_id) and power != "up":
                    up.append(node_id)
                continue
            # Silent too long, connected or not (a cut network leaves a dead socket open for a while).
            if power != "down":
                down.append(node_id)
            await self._hub.disconnect(node_id, "no heartbeat")
            lost = self._hub.node_lost(
                node_id, f"node {name} stopped answering (no heartbeat for {silent:.0f}s)"
            )
            if lost:
                log.warning("node lost; its jobs failed", node=name, jobs=lost)
        now = self._clock.now()
        changed = await self._store.write(enrol_store.set_nodes_power, up, "up", now) if up else []
        if down:
            changed += await self._store.write(enrol_store.set_nodes_power, down, "down", now)
        if changed:
            self._on_change()
