"""The agent's runtime: one session with the core at a time, jobs that outlive any session.

Jobs run through the local gate's code (process groups, the job's Unix account, walltime via cancel,
recovery from control files), so a job behaves the same here as on the core's own machine. What the
agent knows about its jobs is kept in ``jobs.json`` in its state directory: a restarted agent finds its
running jobs again, and an ended job's exit is re-sent on every reconnect until the core acknowledges it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import random
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from skyport.agent import protocol, transfer
from skyport.agent.identity import NodeIdentity
from skyport.client.ports import CHUNK, LocalConnection, splice_websocket
from skyport.gates.base import Exit, GateError, JobLaunch
from skyport.gates.local import LocalGate, machine_memory
from skyport.models import JobSpec
from skyport.server.settings import LocalGateSettings

log = structlog.get_logger(__name__)

LOG_POLL_S = 0.25
RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 5.0
#: An ended job's record is kept this long (so a core that restarts can still ask about it).
KEEP_ENDED_S = 24 * 3600.0
#: Seconds without a byte before a transfer to or from the core fails.
TRANSFER_TIMEOUT_S = 60.0
#: The tunnel socket's write buffer (bytes) before a send waits: one message.
TUNNEL_CHUNK = CHUNK


@dataclass
class AgentConfig:
    url: str
    state_dir: Path
    local: LocalGateSettings
    cpus: int | None = None
    mem: int | None = None
    gpus: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    heartbeat_s: float = 5.0


@dataclass
class _Job:
    wire: protocol.WireJob
    handle: dict[str, Any] | None = None
    exit: dict[str, Any] | None = None
    ended_at: float | None = None
    acked: bool = False
    sent: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})

    def to_dict(self) -> dict[str, Any]:
        return {
            "wire": self.wire.to_dict(),
            "handle": self.handle,
            "exit": self.exit,
            "ended_at": self.ended_at,
            "acked": self.acked,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _Job:
        return cls(
            wire=protocol.WireJob.from_dict(data["wire"]),
            handle=data.get("handle"),
            exit=data.get("exit"),
            ended_at=data.get("ended_at"),
            acked=bool(data.get("acked")),
        )


class Agent:
    def __init__(self, config: AgentConfig, identity: NodeIdentity) -> None:
        self._config = config
        self._identity = identity
        workroot = config.local.workroot or config.state_dir / "work"
        self._gate = LocalGate(config.local, workroot, private_inputs=True)
        self._jobs: dict[str, _Job] = {}
        self._ws: ClientConnection | None = None
        self._send_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._exit_ready = asyncio.Event()
        self._log_lock = asyncio.Lock()
        #: Listeners of the running jobs' ``out`` ports, by job id.
        self._out_servers: dict[str, list[asyncio.Server]] = {}

    # -- state ---------------------------------------------------------------------------------------

    @property
    def _jobs_file(self) -> Path:
        return self._config.state_dir / "jobs.json"

    def _save(self) -> None:
        data = {job_id: job.to_dict() for job_id, job in self._jobs.items()}
        tmp = self._jobs_file.with_suffix(".new")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self._jobs_file)

    def _job_dir(self, wire: protocol.WireJob) -> Path:
        return self._config.state_dir / "jobs" / f"{wire.job_id}.{wire.attempt}"

    def _launch(self, wire: protocol.WireJob) -> JobLaunch:
        base = self._job_dir(wire)
        return JobLaunch(
            job_id=wire.job_id,
            attempt=wire.attempt,
            name=wire.name,
            owner=wire.owner,
            spec=JobSpec.model_validate(wire.spec),
            node_names=wire.node_names,
            inputs_dir=base / "inputs",
            outputs_dir=base / "outputs",
            attempt_dir=base,
            env=wire.env,
            input_paths=wire.input_paths,
            output_patterns=wire.output_patterns,
        )

    async def _restore(self) -> None:
        """After an agent restart: find every job again (running, or ended while the agent was away)."""
        if not self._jobs_file.exists():
            return
        loop = asyncio.get_running_loop()
        for job_id, data in json.loads(self._jobs_file.read_text()).items():
            job = _Job.from_dict(data)
            if job.ended_at is not None and loop.time() - job.ended_at > KEEP_ENDED_S:
                continue
            self._jobs[job_id] = job
            if job.exit is None:
                found = await self._gate.recover(self._launch(job.wire), job.handle)
                if found.handle is not None:
                    job.handle = found.handle
                    await self._open_out_ports(job.wire)
                    self._watch(job)
                else:
                    ended = found.exit or Exit(None, None, "lost", "the job's process was not found")
                    self._ended(job, ended)
        self._save()

    # -- running ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        await self._restore()
        delay = RECONNECT_MIN_S
        while True:
            try:
                await self._session()
                delay = RECONNECT_MIN_S
            except (OSError, ConnectionClosed, ssl.SSLError, TimeoutError) as exc:
                log.info("not connected to the core; retrying", error=str(exc) or type(exc).__name__)
            await asyncio.sleep(delay * (1 + random.random() / 4))  # backoff between reconnects
            delay = min(RECONNECT_MAX_S, delay * 2)
            await asyncio.to_thread(self._renew_if_due)

    def _renew_if_due(self) -> None:
        try:
            if self._identity.renewal_due(dt.datetime.now(dt.UTC)):
                self._identity.renew()
                log.info("node certificate renewed", expires=self._identity.expires_at().isoformat())
        except Exception as exc:  # renewal is retried on the next reconnect or timer
            log.warning("certificate renewal failed", error=str(exc))

    def _ws_url(self, path: str) -> str:
        base = self._config.url.rstrip("/")
        return "wss://" + base.split("://", 1)[1] + path

    async def _session(self) -> None:
        context = self._identity.client_context()
        async with connect(
            self._ws_url(protocol.CONNECT_PATH),
            ssl=context,
            max_size=protocol.MAX_MESSAGE_BYTES,
            compression=None,
            open_timeout=15,
            ping_interval=self._config.heartbeat_s,
            ping_timeout=self._config.heartbeat_s * 3,
            close_timeout=self._config.heartbeat_s * 2,  # a cut network must not hold a dead socket long
        ) as ws:
            self._ws = ws
            try:
                await self._send(self._hello())
                welcome = json.loads(await ws.recv())
                self._welcome(welcome)
                log.info("connected to the core", url=self._config.url)
                workers = [
                    asyncio.create_task(self._heartbeats()),
                    asyncio.create_task(self._pump_logs()),
                    asyncio.create_task(self._send_exits()),
                    asyncio.create_task(self._renewals()),
                ]
                try:
                    async for raw in ws:
                        self._spawn(self._handle(json.loads(raw)))
                finally:
                    for task in workers:
                        task.cancel()
                    await asyncio.gather(*workers, return_exceptions=True)
            finally:
                self._ws = None

    def _hello(self) -> dict[str, Any]:
        # Acknowledged ends too: a core that acknowledged one and died before recording it learns it here.
        jobs = [
            {"job_id": job_id, "attempt": job.wire.attempt, "exit": job.exit, "acked": job.acked}
            for job_id, job in self._jobs.items()
        ]
        node = {
            "hostname": socket.gethostname(),
            "cpus": self._config.cpus or os.cpu_count() or 1,
            "mem": self._config.mem or machine_memory(),
            "gpus": self._config.gpus,
            "labels": self._config.labels,
        }
        return {"type": "hello", "node": node, "jobs": jobs}

    def _welcome(self, welcome: dict[str, Any]) -> None:
        offsets = welcome.get("offsets", {})
        for job_id, job in self._jobs.items():
            # Send what the core lacks: from where its copy ends (it may have lost nothing or a lot).
            job.sent = dict(offsets.get(job_id, {"stdout": 0, "stderr": 0}))
        for kill in welcome.get("kill", []):
            doomed = self._jobs.get(kill["job_id"])
            if doomed is not None and doomed.handle is not None and doomed.exit is None:
                self._spawn(self._gate.cancel(doomed.handle, float(kill.get("grace_s", 0.0))))
        self._exit_ready.set()

    async def _send(self, message: dict[str, Any]) -> None:
        ws = self._ws
        if ws is None:
            raise ConnectionError("not connected")
        async with self._send_lock:
            await ws.send(json.dumps(message))

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self._config.heartbeat_s)
            await self._send({"type": "heartbeat"})

    async def _renewals(self) -> None:
        while True:
            await asyncio.sleep(60)
            await asyncio.to_thread(self._renew_if_due)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- requests --------------------------------------------------------------------------------------

    async def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "ack_exit":
            job = self._jobs.get(str(message["job_id"]))
            if job is not None and job.wire.attempt == int(message["attempt"]):
                job.acked = True
                self._save()
            return
        handler = {
            "launch": self._on_launch,
            "stage_in": self._on_stage_in,
            "stage_out": self._on_stage_out,
            "cancel": self._on_cancel,
            "status": self._on_status,
            "tunnel": self._on_tunnel,
        }.get(str(kind))
        if handler is None:
            await self._reply(message, error=f"unknown request {kind!r}")
            return
        try:
            result = await handler(message)
        except (GateError, OSError, ValueError, KeyError) as exc:
            await self._reply(message, error=str(exc) or type(exc).__name__)
            return
        await self._reply(message, result=result)

    async def _reply(self, message: dict[str, Any], *, result: Any = None, error: str | None = None) -> None:
        with contextlib.suppress(ConnectionError, ConnectionClosed):
            if error is None:
                await self._send({"type": "reply", "id": message.get("id"), "ok": True, "result": result})
            else:
                await self._send({"type": "reply", "id": message.get("id"), "ok": False, "error": error})

    async def _on_launch(self, message: dict[str, Any]) -> dict[str, Any]:
        wire = protocol.WireJob.from_dict(message["job"])
        existing = self._jobs.get(wire.job_id)
        if existing is not None and existing.wire.attempt == wire.attempt and existing.handle is not None:
            return {"pid": existing.handle["process"]["pid"]}  # a repeated launch: idempotent
        launch = self._launch(wire)
        await self._open_out_ports(wire)  # before the start: a job may connect out at once
        try:
            handle = await self._gate.launch(launch)
        except BaseException:
            self._close_out_ports(wire.job_id)
            raise
        job = _Job(wire=wire, handle=handle)
        self._jobs[wire.job_id] = job
        self._save()
        self._watch(job)
        return {"pid": handle["process"]["pid"]}

    def _watch(self, job: _Job) -> None:
        assert job.handle is not None

        def ended(_: str, exit: Exit) -> None:
            self._ended(job, exit)

        self._gate.watch(job.wire.job_id, job.handle, ended)

    def _ended(self, job: _Job, exit: Exit) -> None:
        job.exit = protocol.exit_to_dict(exit.exit_code, exit.signal, exit.reason, exit.message)
        job.ended_at = asyncio.get_running_loop().time()
        self._close_out_ports(job.wire.job_id)
        self._save()
        self._exit_ready.set()

    async def _on_stage_in(self, message: dict[str, Any]) -> dict[str, Any]:
        wire = protocol.WireJob.from_dict(message["job"])
        launch = self._launch(wire)
        digests: dict[str, str] = {}
        context = self._identity.client_context()
        for entry in message["files"]:
            digests[str(entry["name"])] = await self._download(context, wire.job_id, entry, launch.inputs_dir)
        await self._gate.stage_in(launch)
        return {"sha256": digests}

    async def _download(self, context: ssl.SSLContext, job_id: str, entry: dict[str, Any], root: Path) -> str:
        """Fetch one input (via a .part file); returns its SHA-256, which the core checks against its own."""
        name = str(entry["name"])
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"input {name!r} is outside the job's directory")
        target = root / name
        await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
        part = target.with_name(f".{target.name}.part")
        url = self._config.url.rstrip("/") + protocol.INPUT_PATH.format(job_id=job_id, name=quote(name))
        size, digest = await asyncio.to_thread(
            transfer.download, url, context, part, timeout=TRANSFER_TIMEOUT_S
        )
        if size != int(entry["size"]):
            await asyncio.to_thread(part.unlink, missing_ok=True)
            raise GateError(f"input {name} arrived incomplete ({size} of {entry['size']} bytes)")
        await asyncio.to_thread(os.replace, part, target)
        return digest

    async def _on_stage_out(self, message: dict[str, Any]) -> dict[str, Any]:
        wire = protocol.WireJob.from_dict(message["job"])
        job = self._jobs.get(wire.job_id)
        if job is None or job.handle is None:
            raise GateError("the agent does not know this job")
        launch = self._launch(wire)
        files = await self._gate.stage_out(launch, job.handle)
        context = self._identity.client_context()
        for name, _, sha in files:
            path = protocol.OUTPUT_PATH.format(job_id=wire.job_id, name=quote(name))
            url = self._config.url.rstrip("/") + path
            await asyncio.to_thread(
                transfer.upload,
                url,
                context,
                launch.outputs_dir / name,
                {protocol.SHA256_HEADER: sha},
                timeout=TRANSFER_TIMEOUT_S,
            )
        return {"files": [{"name": n, "size": s, "sha256": h} for n, s, h in files]}

    async def _on_cancel(self, message: dict[str, Any]) -> None:
        job = self._jobs.get(str(message["job_id"]))
        if job is None or job.wire.attempt != int(message["attempt"]) or job.handle is None:
            raise GateError("the agent does not run this job")
        if job.exit is None:
            await self._gate.cancel(job.handle, float(message.get("grace_s", 10.0)))

    async def _on_status(self, message: dict[str, Any]) -> dict[str, Any]:
        job = self._jobs.get(str(message["job_id"]))
        if job is None or job.wire.attempt != int(message["attempt"]):
            return {"state": "unknown"}
        if job.exit is not None:
            return {"state": "exited", "exit": job.exit}
        return {"state": "running"}

    async def _on_tunnel(self, message: dict[str, Any]) -> None:
        job = self._jobs.get(str(message["job_id"]))
        if job is None or job.exit is not None:
            raise GateError("the job is not running on this node")
        port = int(message["port"])
        loop = asyncio.get_running_loop()
        try:
            _, local = await loop.create_connection(LocalConnection, "127.0.0.1", port)
        except OSError as exc:
            raise GateError(f"nothing answers on port {port} of the job's node ({exc.strerror})") from exc
        url = self._ws_url(protocol.TUNNEL_PATH.format(tunnel_id=message["tunnel_id"]))
        try:
            ws = await self._tunnel_socket(url)
        except BaseException:
            local.close()
            raise
        self._spawn(splice_websocket(ws, local))

    # -- out ports -------------------------------------------------------------------------------------

    async def _open_out_ports(self, wire: protocol.WireJob) -> None:
        """Listen on ``127.0.0.1:<port>`` of this node for each ``out`` port of the job, while it runs.

        Every connection the job makes there is carried over a WebSocket of its own to the core, which
        connects it to the job's submission address (server/tunnels.py ``JobPorts.open_out``): a job on
        a cloud node reaches, say, the JupyterHub API beside the core at ``localhost:8081`` as the
        original Sky Port promised, and nothing listens on a public address. A port already taken on
        the node (another job's, or on a node that shares the core's host, whatever listens there) is
        logged and left alone: the job then reaches what is there.
        """
        ports = [p.port for p in JobSpec.model_validate(wire.spec).ports if p.direction == "out"]
        if not ports or wire.job_id in self._out_servers:
            return
        loop = asyncio.get_running_loop()
        servers: list[asyncio.Server] = []
        for port in ports:

            def accept(port: int = port) -> LocalConnection:
                local = LocalConnection()
                self._spawn(self._carry_out(wire.job_id, port, local))
                return local

            try:
                servers.append(await loop.create_server(accept, "127.0.0.1", port))
            except OSError as exc:
                log.warning(
                    "cannot listen for a job's out port", job_id=wire.job_id, port=port, error=str(exc)
                )
        self._out_servers[wire.job_id] = servers

    def _close_out_ports(self, job_id: str) -> None:
        for server in self._out_servers.pop(job_id, []):
            server.close()

    async def _tunnel_socket(self, url: str) -> ClientConnection:
        """A WebSocket to the core that carries one tunnel's bytes (raw, uncompressed, 256 KiB writes)."""
        return await connect(
            url,
            ssl=self._identity.client_context(),
            max_size=None,
            open_timeout=15,
            compression=None,
            write_limit=TUNNEL_CHUNK,
        )

    async def _carry_out(self, job_id: str, port: int, local: LocalConnection) -> None:
        """One connection to an out port: a tunnel to the core, or closed at once with the reason logged."""
        url = self._ws_url(protocol.OUT_PATH.format(job_id=job_id, port=port))
        try:
            ws = await self._tunnel_socket(url)
        except (OSError, ssl.SSLError, TimeoutError, InvalidStatus) as exc:
            local.close()
            log.warning("out port: cannot reach the core", job_id=job_id, port=port, error=str(exc))
            return
        try:
            first = await ws.recv()
        except ConnectionClosed as exc:
            local.close()
            reason = exc.rcvd.reason if exc.rcvd else "closed"
            log.warning("out port refused by the core", job_id=job_id, port=port, reason=reason)
            return
        if first != protocol.OUT_READY:
            local.close()
            await ws.close()
            return
        await splice_websocket(ws, local)

    # -- streaming to the core ---------------------------------------------------------------------

    async def _pump_logs(self) -> None:
        """Send what the jobs wrote since the last look, every LOG_POLL_S. A job's files are read (in a
        thread) only when they grew: their sizes are looked at here, a ``stat`` of a file on the node's
        own disk each. Reading each stream of each job in a thread hop of its own, four times a second,
        cost an agent pool of fifty idle jobs 400 thread hops a second (the ten pools of a 500-VM burst
        ~0.6 of a CPU once the jobs ran, docs/performance.md, issue 5)."""
        while True:
            for job in list(self._jobs.values()):
                handle = job.handle
                if handle is not None and not job.acked and _grown(handle, job.sent):
                    await self._send_logs(job)
            await asyncio.sleep(LOG_POLL_S)

    async def _send_logs(self, job: _Job) -> None:
        assert job.handle is not None
        async with self._log_lock:  # one sender at a time, or two could send one chunk at two offsets
            for stream in ("stdout", "stderr"):
                path = Path(job.handle[stream])
                while True:
                    offset = job.sent[stream]
                    chunk = await asyncio.to_thread(_read, path, offset, protocol.LOG_CHUNK_BYTES)
                    if not chunk:
                        break
                    await self._send(
                        {
                            "type": "log",
                            "job_id": job.wire.job_id,
                            "attempt": job.wire.attempt,
                            "stream": stream,
                            "offset": offset,
                            "data": base64.b64encode(chunk).decode(),
                        }
                    )
                    job.sent[stream] = offset + len(chunk)

    async def _send_exits(self) -> None:
        while True:
            await self._exit_ready.wait()
            self._exit_ready.clear()
            for job in list(self._jobs.values()):
                if job.exit is not None and not job.acked:
                    await self._send_logs(job)  # everything it wrote arrives before its end
                    await self._send(
                        {
                            "type": "exited",
                            "job_id": job.wire.job_id,
                            "attempt": job.wire.attempt,
                            "exit": job.exit,
                        }
                    )

    def close(self) -> None:
        self._gate.close()


def _grown(handle: dict[str, Any], sent: dict[str, int]) -> bool:
    """Whether the job's stdout or stderr is longer than what was sent of it (a missing file is not)."""
    for stream in ("stdout", "stderr"):
        try:
            if os.stat(handle[stream]).st_size > sent[stream]:
                return True
        except FileNotFoundError:
            continue
    return False


def _read(path: Path, offset: int, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(limit)
    except FileNotFoundError:
        return b""
