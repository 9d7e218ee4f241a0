"""Several node agents in one process: for simulated clouds with hundreds of VMs on one machine.

Each agent of a pool is a whole node: its own key and certificate (enrolled with its own one-time token),
its own WebSocket to the core, its own working directories and jobs. Only the interpreter is shared —
a Python process per simulated VM costs ~0.7 s of CPU and ~55 MB to start, which makes 500 VMs on a
2-core machine impossible, while the core cannot tell a pooled agent from a lone one.

A pool watches a directory: a ``<name>.json`` file there (written atomically) is a node to run
(:class:`PoolMember`); removing the file stops that node's agent (its jobs are the caller's to kill,
as a VM's are when the VM goes). The pool exits once it has had no node for ``idle_exit_s`` (a pool
started ahead of its nodes waits ``start_grace_s`` for the first one).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import structlog

from skyport.agent.identity import CoreUnreachable, EnrolmentRefused, NodeIdentity, enrolment_client
from skyport.agent.node import Agent, AgentConfig
from skyport.pki import generate_key, make_csr
from skyport.server.settings import LocalGateSettings

log = structlog.get_logger(__name__)

SCAN_INTERVAL_S = 0.2
ENROL_RETRY_MAX_S = 30.0


@dataclass(frozen=True)
class PoolMember:
    """One node of a pool: what ``skyport agent``'s options would say for it."""

    url: str
    ca_file: str
    token_file: str
    state_dir: str
    workroot: str
    cpus: int
    mem: int
    gpus: int = 0
    default_user: str | None = None
    heartbeat_s: float = 5.0
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PoolMember:
        return cls(**json.loads(text))


async def _load_lazily_loaded() -> None:
    """Load what the agents' first enrolment loads on first use (httpx's transport and, when the client
    closes, anyio's asyncio backend; the key and CSR code), before any node arrives.

    A pool is started ahead of its nodes (the sim starts it while its VMs boot), and its first nodes
    would otherwise pay for these imports in the middle of a burst, ~0.1 s of CPU per pool."""
    async with httpx.AsyncClient() as client:
        client.headers.get("user-agent")
    make_csr(generate_key(), "warm-up")


class AgentPool:
    def __init__(self, directory: Path, *, idle_exit_s: float = 5.0, start_grace_s: float = 0.0) -> None:
        self._dir = directory
        self._idle_exit_s = idle_exit_s
        #: How long a pool started ahead of its nodes waits for the first one (then ``idle_exit_s``).
        self._start_grace_s = start_grace_s
        self._members: dict[str, asyncio.Task[None]] = {}
        #: What the last scan parsed: node name -> (inode of its file, the node).
        self._parsed: dict[str, tuple[int, PoolMember]] = {}
        #: The members' enrolment clients, one per CA they trust (see :func:`enrolment_client`).
        self._enrolment_clients: dict[bytes, httpx.AsyncClient] = {}

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            for client in self._enrolment_clients.values():
                await client.aclose()

    async def _run(self) -> None:
        await _load_lazily_loaded()
        gc.freeze()  # what start-up loaded lives as long as the pool (see skyport.agent.collector)
        idle_since = asyncio.get_running_loop().time()
        idle_exit_s = max(self._idle_exit_s, self._start_grace_s)
        while True:
            wanted = await asyncio.to_thread(self._scan)
            for name in set(self._members) - wanted.keys():
                await self._stop(name)
            for name, member in wanted.items():
                if name not in self._members:
                    self._members[name] = asyncio.create_task(self._run_member(name, member), name=name)
            for name, task in list(self._members.items()):
                if task.done():  # a member that gave up (refused enrolment) is not restarted
                    del self._members[name]
            now = asyncio.get_running_loop().time()
            if self._members or wanted:
                idle_since, idle_exit_s = now, self._idle_exit_s
            elif now - idle_since >= idle_exit_s:
                log.info("agent pool idle; exiting", directory=str(self._dir))
                return
            await asyncio.sleep(SCAN_INTERVAL_S)  # the directory is the interface: polled, bounded

    def _scan(self) -> dict[str, PoolMember]:
        """The node files in the directory. A file is parsed when it is new or was replaced (its inode
        changed: files are written atomically), not on every scan: a pool of fifty nodes scanned five
        times a second would otherwise read and parse 250 files a second, every second it runs."""
        found: dict[str, PoolMember] = {}
        seen: dict[str, tuple[int, PoolMember]] = {}
        try:
            entries = list(os.scandir(self._dir))
        except FileNotFoundError:
            entries = []  # the directory was removed: no node left
        for entry in entries:
            name, ext = os.path.splitext(entry.name)
            if ext != ".json":
                continue
            known = self._parsed.get(name)
            if known is not None and known[0] == entry.inode():
                member = known[1]
            else:
                try:
                    member = PoolMember.from_json(Path(entry.path).read_text())
                except (OSError, ValueError, TypeError):
                    continue  # being written or removed right now: seen on the next scan
            found[name] = member
            seen[name] = (entry.inode(), member)
        self._parsed = seen
        return found

    def _enrolment_client(self, ca_file: Path) -> httpx.AsyncClient:
        ca_pem = ca_file.read_bytes()
        client = self._enrolment_clients.get(ca_pem)
        if client is None:
            client = self._enrolment_clients[ca_pem] = enrolment_client(ca_pem)
        return client

    async def _stop(self, name: str) -> None:
        task = self._members.pop(name)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        log.info("pool member stopped", node=name)

    async def _run_member(self, name: str, member: PoolMember) -> None:
        identity = NodeIdentity(Path(member.state_dir), member.url)
        delay = 1.0
        while not identity.enrolled():
            token = (await asyncio.to_thread(Path(member.token_file).read_text)).strip()
            try:
                client = self._enrolment_client(Path(member.ca_file))
                await identity.enrol_async(token, Path(member.ca_file), client)
            except CoreUnreachable as exc:
                log.info("core unreachable; enrolling later", node=name, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, ENROL_RETRY_MAX_S)
            except EnrolmentRefused as exc:
                log.warning("enrolment refused", node=name, error=str(exc))
                return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(member.token_file)  # one-time: no use keeping it
        local = LocalGateSettings(workroot=Path(member.workroot), default_user=member.default_user)
        config = AgentConfig(
            member.url,
            Path(member.state_dir),
            local,
            member.cpus,
            member.mem,
            member.gpus,
            member.labels,
            member.heartbeat_s,
        )
        agent = Agent(config, identity)
        try:
            await agent.run()
        finally:
            agent.close()
