"""The gate protocol, executor face (DESIGN §4): what the core's loops ask of a gate that runs work.

A gate never touches the store. The loops call it and record what it did; everything a gate needs to
find its work again after a restart of the core is in the ``handle`` it returns (stored as JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from skyport.models import JobSpec, Node

Handle = dict[str, Any]


@dataclass(frozen=True)
class JobLaunch:
    """Everything a gate needs to run one attempt of a job."""

    job_id: str
    attempt: int
    name: str
    owner: str  # the Sky Port user name
    spec: JobSpec
    node_names: list[str]
    inputs_dir: Path  # the job's inputs, kept by the core: uploaded with the submission or fetched
    outputs_dir: Path  # where the gate puts the job's output files after the end
    attempt_dir: Path  # the gate's private directory for this attempt (control files)
    env: dict[str, str] = field(default_factory=dict)  # SKYPORT_* and the spec's env, built by the core
    #: Paths under ``inputs_dir`` that ``stage_in`` places at the same relative path in the working
    #: directory: files, or directories (copied whole). The core has them all there before it asks.
    input_paths: list[str] = field(default_factory=list)
    #: Globs relative to the working directory (``**`` allowed) whose files ``stage_out`` brings back.
    output_patterns: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Exit:
    """How an attempt ended, as the gate observed it."""

    exit_code: int | None
    signal: int | None
    reason: str  # "exit_code" | "signal" | "lost" | ...
    message: str


@dataclass(frozen=True)
class Recovered:
    """What a gate found for an attempt after a restart of the core."""

    handle: Handle | None  # still running: watch it again
    exit: Exit | None  # ended while the core was away
    # both None: it never started; the core may launch it


class GateError(Exception):
    """A gate call failed; the message is shown to the job's owner, so it says what to do."""


ExitCallback = Callable[[str, Exit], None]


class ExecutorGate(Protocol):
    """What the loops call. Life cycle is the core's business, outside this protocol: a gate that must
    reach its provider before it can describe its nodes has ``async start()`` (called once, before
    ``nodes``) and ``close()`` (the jobs keep running; a new core finds them with ``recover``), e.g. the
    ``ssh`` gate, which connects to its hosts and asks those of undeclared capacity what they have."""

    kind: str

    def nodes(self, remote_id: str, partition_id: str) -> list[Node]:
        """The nodes this gate offers (static capacity)."""

    async def stage_in(self, job: JobLaunch) -> None:
        """Put each of ``job.input_paths`` (from ``job.inputs_dir``) in its working directory on the node.

        The core has fetched URL inputs into ``inputs_dir`` already (server/staging.py), so a gate only
        ever copies from the core. An array's tasks share one ``inputs_dir``: never move from it.
        """

    async def launch(self, job: JobLaunch) -> Handle:
        """Start the attempt; return what is needed to find it again."""

    def watch(self, job_id: str, handle: Handle, on_exit: ExitCallback) -> None:
        """Call ``on_exit(job_id, exit)`` once, on the loop, when the attempt ends."""

    async def recover(self, job: JobLaunch, handle: Handle | None) -> Recovered:
        """After a restart: is the attempt running, ended, or never started?"""

    async def cancel(self, handle: Handle, grace_s: float) -> None:
        """Stop the attempt: TERM, then KILL after the grace period."""

    async def stage_out(self, job: JobLaunch, handle: Handle) -> list[tuple[str, int, str]]:
        """Copy the files matching ``job.output_patterns`` into ``job.outputs_dir`` (same relative paths);
        return (name, size, sha256) of each. The core delivers them to URLs afterwards, if asked."""

    def log_path(self, handle: Handle, stream: str) -> Path | None:
        """Where the core can read the attempt's stdout or stderr, if on this machine."""

    async def open_port(self, handle: Handle, port: int) -> TunnelLink:
        """A byte stream to ``port`` of the running attempt's (first) node (port forwarding)."""


@dataclass(frozen=True)
class Submitted:
    """An attempt a self-scheduling gate handed to its provider: its handle and what to tell the user."""

    handle: Handle
    message: str  # e.g. "Submitted to Slurm as job 42"


@dataclass(frozen=True)
class Progress:
    """What a self-scheduling gate saw of an attempt before its end (reported on the loop)."""

    started: bool  # the provider started it; False: it still waits there, ``message`` says why
    message: str  # e.g. "Pending: Resources", "Running on n1, n2 (Slurm job 42)"
    node_names: tuple[str, ...] = ()  # where it runs, once started


ProgressCallback = Callable[[str, Progress], None]


class SelfSchedulingGate(ExecutorGate, Protocol):
    """A gate whose provider queues and places jobs itself (``slurm``): the core forwards jobs to it
    unplaced, and the provider decides where and when they run.

    Its attempts differ from other gates' in three ways. ``launch_many`` submits many at once (a gate
    may group them, e.g. into one job array), answering one :class:`Submitted` or :class:`GateError` per
    job, in order; the execution loop records a submitted attempt as ``scheduled`` with its handle, and
    as ``running`` only when ``watch_progress``'s callback says the provider started it (other news, such
    as why it waits, becomes the job's ``state_details``). The provider enforces walltimes itself. And an
    attempt may end (e.g. canceled while pending) without ever having started.
    """

    self_scheduling: bool  # True

    async def launch_many(self, jobs: list[JobLaunch]) -> list[Submitted | GateError]: ...

    def watch_progress(self, callback: ProgressCallback) -> None:
        """Call ``callback(job_id, progress)`` for each change seen in a watched attempt."""


def self_scheduling(gate: ExecutorGate) -> SelfSchedulingGate | None:
    """The gate as a :class:`SelfSchedulingGate`, or None for gates whose jobs the core places."""
    return gate if getattr(gate, "self_scheduling", False) is True else None  # type: ignore[return-value]


class TunnelLink(Protocol):
    """One end of a port-forwarding tunnel: bytes in, bytes out (an agent's socket, a TCP stream)."""

    async def send_bytes(self, data: bytes) -> None: ...

    async def receive_bytes(self) -> bytes | None:
        """The next chunk, or None when the other side closed."""

    async def close(self) -> None: ...


class StreamTunnel:
    """A TCP connection as a tunnel end."""

    CHUNK = 256 * 1024

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, host: str, port: int) -> StreamTunnel:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            raise GateError(f"nothing answers on port {port} of the job's node ({exc.strerror})") from exc
        return cls(reader, writer)

    async def send_bytes(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def receive_bytes(self) -> bytes | None:
        try:
            data = await self._reader.read(self.CHUNK)
        except ConnectionError:
            return None
        return data or None

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
