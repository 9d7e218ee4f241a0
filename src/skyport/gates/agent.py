"""The agent gate: runs jobs on nodes that run ``skyport agent`` and are connected to this core.

Two parts. :class:`AgentHub` is the core's switchboard for connected agents: the agent router hands it
each agent's WebSocket; it correlates requests and replies, writes streamed logs into the core's spool,
delivers exits, tracks when each node was last heard from, and pairs port-forwarding tunnels. It keeps no
state that matters after a restart: agents re-send what they know on reconnect (``hello``), and
the execution loop re-registers what the store says is running. :class:`AgentGate` is the executor face
of one remote whose nodes are agents (DESIGN §4); like every gate it never touches the store.

Security: a session is bound to the node named by the agent's certificate; an agent reporting on an
attempt that runs on another node is refused and the attempt is not touched.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from skyport.agent.protocol import WireJob, node_id_for
from skyport.gates.base import Exit, ExitCallback, GateError, Handle, JobLaunch, Recovered, TunnelLink
from skyport.models import Node

log = structlog.get_logger(__name__)

#: How long a request waits for the agent's reply (staging has its own, longer, deadline).
REQUEST_TIMEOUT_S = 30.0
STAGING_TIMEOUT_S = 6 * 3600.0
TUNNEL_OPEN_TIMEOUT_S = 15.0
#: How long a launch waits for a node's agent to (re)connect before it fails.
CONNECT_WAIT_S = 30.0


class AgentLink(Protocol):
    """The WebSocket of one connected agent, as the router provides it."""

    async def send(self, message: dict[str, Any]) -> None: ...

    async def close(self, reason: str) -> None: ...


@dataclass
class _Session:
    node_id: str
    node_name: str
    link: AgentLink
    pending: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    #: The hello was answered: from now on requests may be sent.
    ready: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Attempt:
    """A job attempt this core expects on an agent node."""

    job_id: str
    attempt: int
    node_id: str
    stdout: Path
    stderr: Path
    on_exit: ExitCallback | None = None
    ended: bool = False
    #: An end reported before anyone watched (a job quicker than its launch's reply): kept for watch().
    exit: Exit | None = None


class AgentHub:
    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._sessions: dict[str, _Session] = {}
        self._attempts: dict[str, _Attempt] = {}
        #: Exits reported for attempts the core has not re-registered yet (just after a restart).
        self._early_exits: dict[str, tuple[str, int, Exit]] = {}
        #: Cancels for attempts whose node is disconnected; sent on reconnect.
        self._pending_cancel: dict[str, float] = {}
        self._tunnels: dict[str, tuple[str, asyncio.Future[TunnelLink]]] = {}
        self._last_seen: dict[str, float] = {}
        self._started = monotonic()
        self._ids = itertools.count(1)
        #: Called with a node id when an agent connects (the node loop marks it up at once).
        self.on_connect: Callable[[str], None] = lambda _: None
        #: Set when the core has re-registered every active attempt after its start: until then an
        #: agent's report of a running job cannot be told from one the core no longer wants.
        self.ready = asyncio.Event()

    # -- sessions ------------------------------------------------------------------------------------

    def connected(self, node_id: str) -> bool:
        """The node's agent is connected and has been welcomed (it takes requests)."""
        session = self._sessions.get(node_id)
        return session is not None and session.ready.is_set()

    async def wait_connected(self, node_id: str, timeout: float) -> bool:
        """Wait (up to ``timeout``) for the node's agent to be connected and welcomed."""
        deadline = self._monotonic() + timeout
        while not self.connected(node_id):
            left = deadline - self._monotonic()
            if left <= 0:
                return False
            session = self._sessions.get(node_id)
            if session is None:
                await asyncio.sleep(min(0.1, left))  # no session to wait on yet: poll (bounded)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(session.ready.wait(), left)
        return True

    def silent_for(self, node_id: str) -> float:
        """Seconds since the node was last heard from (since this core started, if never)."""
        return self._monotonic() - self._last_seen.get(node_id, self._started)

    def nodes_with_attempts(self) -> set[str]:
        return {a.node_id for a in self._attempts.values() if not a.ended}

    async def serve(
        self,
        node_id: str,
        node_name: str,
        link: AgentLink,
        receive: Callable[[], Awaitable[dict[str, Any] | None]],
    ) -> None:
        """Run one agent's session until its socket closes. A newer session replaces an older one."""
        old = self._sessions.get(node_id)
        if old is not None:
            self._drop(old, "replaced by a newer connection")
            with contextlib.suppress(Exception):
                await old.link.close("replaced by a newer connection")
        session = _Session(node_id, node_name, link)
        self._sessions[node_id] = session
        self._last_seen[node_id] = self._monotonic()
        log.info("agent connected", node=node_name)
        try:
            while (message := await receive()) is not None:
                self._last_seen[node_id] = self._monotonic()
                await self._dispatch(session, message)
        finally:
            if self._sessions.get(node_id) is session:
                self._drop(session, "the agent disconnected")
                log.info("agent disconnected", node=node_name)

    async def disconnect(self, node_id: str, why: str) -> None:
        """Close a node's session (one that went silent: its socket may be dead without knowing it)."""
        session = self._sessions.get(node_id)
        if session is not None:
            self._drop(session, why)
            with contextlib.suppress(Exception):
                await session.link.close(why)

    def _drop(self, session: _Session, why: str) -> None:
        if self._sessions.get(session.node_id) is session:
            del self._sessions[session.node_id]
        for future in session.pending.values():
            if not future.done():
                future.set_exception(GateError(f"node {session.node_name}: {why}"))
        session.pending.clear()

    async def _dispatch(self, session: _Session, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "hello":
            await self._hello(session, message)
            self.on_connect(session.node_id)
        elif kind == "heartbeat":
            pass
        elif kind == "log":
            await self._log(session, message)
        elif kind == "exited":
            await self._exited(session, message)
        elif kind == "reply":
            future = session.pending.pop(int(message.get("id", 0)), None)
            if future is not None and not future.done():
                if message.get("ok"):
                    future.set_result(message.get("result"))
                else:
                    future.set_exception(GateError(str(message.get("error", "the agent refused"))))
        else:
            log.warning("unknown message from agent", node=session.node_name, type=kind)

    def _owned(self, session: _Session, job_id: str, attempt: int) -> _Attempt | None:
        """The attempt, if it is expected on this session's node; a report on another's is refused."""
        expected = self._attempts.get(job_id)
        if expected is None or expected.attempt != attempt:
            return None
        if expected.node_id != session.node_id:
            log.warning("refused a report on another node's job", node=session.node_name, job_id=job_id)
            return None
        return expected

    async def _hello(self, session: _Session, message: dict[str, Any]) -> None:
        await self.ready.wait()
        reported: dict[str, dict[str, Any]] = {j["job_id"]: j for j in message.get("jobs", [])}
        offsets: dict[str, dict[str, int]] = {}
        kill: dict[str, float] = {}
        for job_id, job in reported.items():
            expected = self._attempts.get(job_id)
            if expected is not None and expected.node_id != session.node_id:
                continue  # not this node's: ignored (and not killed: it may be another core's mistake)
            if job.get("acked") and job.get("exit") is not None:
                # Its logs and end were sent before; a core that died before recording the end needs it.
                if expected is not None and expected.attempt == job["attempt"] and not expected.ended:
                    raw = job["exit"]
                    self._deliver(
                        expected,
                        Exit(
                            raw.get("exit_code"),
                            raw.get("signal"),
                            str(raw["reason"]),
                            str(raw.get("message", "")),
                        ),
                    )
                continue
            if expected is None or expected.attempt != job["attempt"] or expected.ended:
                if job.get("exit") is None:
                    kill[job_id] = 0.0  # running, but the core no longer wants it
                continue
            offsets[job_id] = {"stdout": _size(expected.stdout), "stderr": _size(expected.stderr)}
            if job_id in self._pending_cancel:
                kill[job_id] = self._pending_cancel.pop(job_id)
        # Attempts the core expects on this node that the agent does not know: they are gone.
        for expected in list(self._attempts.values()):
            if expected.node_id == session.node_id and not expected.ended and expected.job_id not in reported:
                self._deliver(
                    expected, Exit(None, None, "lost", f"node {session.node_name} no longer knows the job")
                )
        await session.link.send(
            {
                "type": "welcome",
                "offsets": offsets,
                "kill": [{"job_id": j, "grace_s": g} for j, g in kill.items()],
            }
        )
        session.ready.set()

    async def _log(self, session: _Session, message: dict[str, Any]) -> None:
        attempt = self._owned(session, str(message["job_id"]), int(message["attempt"]))
        if attempt is None:
            return
        path = attempt.stdout if message.get("stream") == "stdout" else attempt.stderr
        data = base64.b64decode(message["data"])
        await asyncio.to_thread(_write_at, path, int(message["offset"]), data)

    async def _exited(self, session: _Session, message: dict[str, Any]) -> None:
        job_id, attempt_no = str(message["job_id"]), int(message["attempt"])
        raw = message["exit"]
        exit = Exit(raw.get("exit_code"), raw.get("signal"), str(raw["reason"]), str(raw.get("message", "")))
        expected = self._attempts.get(job_id)
        if expected is None:
            # Not re-registered yet (a restart): keep it for when the execution loop asks.
            self._early_exits[job_id] = (session.node_id, attempt_no, exit)
        elif self._owned(session, job_id, attempt_no) is not None:
            self._deliver(expected, exit)
        else:
            return
        await session.link.send({"type": "ack_exit", "job_id": job_id, "attempt": attempt_no})

    def _deliver(self, attempt: _Attempt, exit: Exit) -> None:
        if attempt.ended:
            return
        attempt.ended = True
        self._pending_cancel.pop(attempt.job_id, None)
        if attempt.on_exit is None:
            attempt.exit = exit
            return
        if self._attempts.get(attempt.job_id) is attempt:
            del self._attempts[attempt.job_id]
        if attempt.on_exit is not None:
            attempt.on_exit(attempt.job_id, exit)

    # -- what the gate and the node loop use --------------------------------------------------------

    async def request(self, node_id: str, kind: str, payload: dict[str, Any], timeout: float) -> Any:
        session = self._sessions.get(node_id)
        if session is None:
            raise GateError("the node's agent is not connected")
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        session.pending[request_id] = future
        try:
            await session.link.send({"type": kind, "id": request_id, **payload})
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise GateError(
                f"node {session.node_name} did not answer {kind!r} within {timeout:.0f}s"
            ) from None
        except (ConnectionError, RuntimeError) as exc:
            raise GateError(f"node {session.node_name}: {exc}") from exc
        finally:
            session.pending.pop(request_id, None)

    def expect(self, job_id: str, attempt: int, node_id: str, stdout: Path, stderr: Path) -> None:
        """Register an attempt on a node (at launch, or found again after a restart)."""
        current = self._attempts.get(job_id)
        if current is not None and current.attempt == attempt and current.node_id == node_id:
            return
        self._attempts[job_id] = _Attempt(job_id, attempt, node_id, stdout, stderr)

    def watch(self, job_id: str, on_exit: ExitCallback) -> None:
        attempt = self._attempts.get(job_id)
        if attempt is None:
            return
        attempt.on_exit = on_exit
        if attempt.exit is not None:  # it ended before this watch began
            del self._attempts[job_id]
            on_exit(job_id, attempt.exit)
            return
        early = self._early_exits.pop(job_id, None)
        if early is not None and early[0] == attempt.node_id and early[1] == attempt.attempt:
            self._deliver(attempt, early[2])

    def forget(self, job_id: str) -> None:
        self._attempts.pop(job_id, None)

    def queue_cancel(self, job_id: str, grace_s: float) -> None:
        self._pending_cancel[job_id] = grace_s

    def node_lost(self, node_id: str, message: str, reason: str = "node_lost") -> int:
        """The node stopped answering (or was taken back: ``reason`` ``preempted``): every attempt on it
        ends with that reason."""
        lost = [a for a in self._attempts.values() if a.node_id == node_id and not a.ended]
        for attempt in lost:
            self._deliver(attempt, Exit(None, None, reason, message))
        return len(lost)

    # -- tunnels ---------------------------------------------------------------------------------------

    async def open_tunnel(self, node_id: str, job_id: str, port: int) -> TunnelLink:
        """Ask the node's agent to connect to ``port`` there and attach it; returns the agent's side."""
        tunnel_id = secrets.token_urlsafe(16)
        future: asyncio.Future[TunnelLink] = asyncio.get_running_loop().create_future()
        self._tunnels[tunnel_id] = (node_id, future)
        try:
            await self.request(
                node_id,
                "tunnel",
                {"tunnel_id": tunnel_id, "job_id": job_id, "port": port},
                TUNNEL_OPEN_TIMEOUT_S,
            )
            return await asyncio.wait_for(future, TUNNEL_OPEN_TIMEOUT_S)
        except TimeoutError:
            raise GateError("the node's agent did not open the tunnel in time") from None
        finally:
            self._tunnels.pop(tunnel_id, None)

    def attach_tunnel(self, tunnel_id: str, node_id: str, link: TunnelLink) -> bool:
        """The agent's tunnel socket arrived; False if no such tunnel was asked of that node."""
        entry = self._tunnels.get(tunnel_id)
        if entry is None or entry[0] != node_id or entry[1].done():
            return False
        entry[1].set_result(link)
        return True


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _write_at(path: Path, offset: int, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


class AgentGate:
    """Executor face of a remote whose nodes run ``skyport agent`` (static partition, enrolled nodes)."""

    kind = "agent"
    #: A launch may wait for the node's agent to reconnect: the execution loop runs it off its pass.
    launch_may_wait = True

    def __init__(self, remote_id: str, hub: AgentHub) -> None:
        self._remote_id = remote_id
        self._hub = hub

    def nodes(self, remote_id: str, partition_id: str) -> list[Node]:
        return []  # nodes enrol themselves

    def _node_id(self, job: JobLaunch) -> str:
        if not job.node_names:
            raise GateError("the job was placed on no node")
        return node_id_for(self._remote_id, job.node_names[0])

    @staticmethod
    def _logs(job: JobLaunch) -> tuple[Path, Path]:
        return job.attempt_dir / "stdout.log", job.attempt_dir / "stderr.log"

    def _wire(self, job: JobLaunch) -> dict[str, Any]:
        return WireJob(
            job_id=job.job_id,
            attempt=job.attempt,
            name=job.name,
            owner=job.owner,
            spec=job.spec.model_dump(mode="json"),
            node_names=job.node_names,
            env=job.env,
            input_paths=job.input_paths,
            output_patterns=job.output_patterns,
        ).to_dict()

    async def stage_in(self, job: JobLaunch) -> None:
        """The agent fetches the inputs; both sides hash them (at the same time) and must agree."""
        files = await asyncio.to_thread(_list_files, job.inputs_dir)
        if not files:
            return
        hashing = asyncio.create_task(asyncio.to_thread(_digests, job.inputs_dir, [f["name"] for f in files]))
        try:
            result = await self._hub.request(
                self._node_id(job), "stage_in", {"job": self._wire(job), "files": files}, STAGING_TIMEOUT_S
            )
        finally:
            ours = await hashing
        theirs = result.get("sha256", {}) if isinstance(result, dict) else {}
        damaged = [name for name, digest in ours.items() if theirs.get(name) != digest]
        if damaged:
            raise GateError(
                f"input(s) {', '.join(damaged)} arrived different on the node (checksum mismatch)"
            )

    async def launch(self, job: JobLaunch) -> Handle:
        node_id = self._node_id(job)
        if not await self._hub.wait_connected(node_id, CONNECT_WAIT_S):  # e.g. reconnecting after a restart
            raise GateError(
                f"node {job.node_names[0]}'s agent has not been connected for {CONNECT_WAIT_S:.0f}s"
            )
        stdout, stderr = self._logs(job)
        await asyncio.to_thread(job.attempt_dir.mkdir, parents=True, exist_ok=True)
        self._hub.expect(job.job_id, job.attempt, node_id, stdout, stderr)
        try:
            agent_handle = await self._hub.request(
                node_id, "launch", {"job": self._wire(job)}, REQUEST_TIMEOUT_S
            )
        except GateError:
            self._hub.forget(job.job_id)
            raise
        return {
            "job_id": job.job_id,
            "node_id": node_id,
            "node": job.node_names[0],
            "attempt": job.attempt,
            "agent": agent_handle,
            "stdout": str(stdout),
            "stderr": str(stderr),
        }

    def watch(self, job_id: str, handle: Handle, on_exit: ExitCallback) -> None:
        self._hub.watch(job_id, on_exit)

    async def recover(self, job: JobLaunch, handle: Handle | None) -> Recovered:
        """After a restart, without asking the agent (it says hello only once the core has recovered):
        an attempt recorded as running is watched again (the agent's hello reports its end, or that it
        does not know it: lost); one never recorded as started is launched again, which the agent
        answers idempotently if it had started it."""
        if handle is None:
            return Recovered(handle=None, exit=None)
        node_id = self._node_id(job)
        stdout, stderr = self._logs(job)
        self._hub.expect(job.job_id, job.attempt, node_id, stdout, stderr)
        return Recovered(handle={**handle, "stdout": str(stdout), "stderr": str(stderr)}, exit=None)

    async def cancel(self, handle: Handle, grace_s: float) -> None:
        job_id = handle.get("job_id") or ""
        node_id = str(handle["node_id"])
        if not job_id:
            raise GateError("the job's handle names no job")
        if not self._hub.connected(node_id):
            self._hub.queue_cancel(job_id, grace_s)
            return
        await self._hub.request(
            node_id,
            "cancel",
            {"job_id": job_id, "attempt": handle["attempt"], "grace_s": grace_s},
            REQUEST_TIMEOUT_S,
        )

    async def stage_out(self, job: JobLaunch, handle: Handle) -> list[tuple[str, int, str]]:
        if not job.output_patterns:
            return []
        result = await self._hub.request(
            str(handle["node_id"]),
            "stage_out",
            {"job": self._wire(job)},
            STAGING_TIMEOUT_S,
        )
        self._hub.forget(job.job_id)
        return [(str(f["name"]), int(f["size"]), str(f["sha256"])) for f in result["files"]]

    def log_path(self, handle: Handle, stream: str) -> Path | None:
        value = handle.get(stream)
        return Path(value) if value else None

    async def open_port(self, handle: Handle, port: int) -> TunnelLink:
        """A connection to ``port`` on the job's node, through its agent."""
        return await self._hub.open_tunnel(str(handle["node_id"]), str(handle.get("job_id", "")), port)


def _list_files(root: Path) -> list[dict[str, Any]]:
    """The files under ``root`` (relative names and sizes), for the agent to fetch."""
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.endswith(".part"):
            found.append({"name": path.relative_to(root).as_posix(), "size": path.stat().st_size})
    return found


def _digests(root: Path, names: list[str]) -> dict[str, str]:
    """SHA-256 of each file, read in chunks (bounded memory)."""
    digests = {}
    for name in names:
        digest = hashlib.sha256()
        with open(root / name, "rb") as f:
            while chunk := f.read(1024 * 1024):
                digest.update(chunk)
        digests[name] = digest.hexdigest()
    return digests
