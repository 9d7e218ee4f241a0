"""Jobs: what a user asks for (:class:`JobSpec`) and what happened to it (:class:`Job`, :class:`Event`)."""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Largest job script we accept, in bytes. A script is a recipe, not a data carrier: inputs travel as files.
MAX_SCRIPT_BYTES = 1024 * 1024

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL = re.compile(r"^[A-Za-z0-9_.\-/]{1,63}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
#: Largest size in bytes (a signed 64-bit column).
MAX_BYTES = 2**63 - 1
_ARRAY = re.compile(r"^\d+(-\d+(:\d+)?)?(,\d+(-\d+(:\d+)?)?)*(%\d+)?$")


#: Most tasks one array job may have.
MAX_ARRAY_TASKS = 100_000


@dataclass(frozen=True)
class ArrayRange:
    """A parsed ``array`` directive: the task indices, in order, and how many may run at once."""

    indices: tuple[int, ...]
    throttle: int | None


@functools.lru_cache(maxsize=16)
def parse_array(text: str) -> ArrayRange:
    """``1-1000%50``, ``0,4,8-12``, ``1-100:10`` (every 10th). Raises ValueError with the reason.

    Cached: every task of an array carries the array's spec, validated again whenever the task is
    read for scheduling or launching; parsing ``1-2000`` each time was a tenth of the core's CPU for a
    2,000-task array.
    """
    if not _ARRAY.match(text):
        raise ValueError(f"array range {text!r} is not valid (e.g. 1-100, 1-1000%50, 1,3,5-9, 0-99:10)")
    spec, _, throttle_text = text.partition("%")
    indices: list[int] = []
    for part in spec.split(","):
        bounds, _, step_text = part.partition(":")
        first, _, last = bounds.partition("-")
        start, end, step = int(first), int(last or first), int(step_text or 1)
        if end < start or step < 1:
            raise ValueError(f"array range part {part!r} is empty: write low-high with low <= high")
        if len(indices) + (end - start) // step + 1 > MAX_ARRAY_TASKS:
            raise ValueError(f"an array job may have at most {MAX_ARRAY_TASKS} tasks")
        indices.extend(range(start, end + 1, step))
    unique = tuple(sorted(set(indices)))
    throttle = int(throttle_text) if throttle_text else None
    if throttle is not None and throttle < 1:
        raise ValueError("the array throttle (after %) must be at least 1")
    return ArrayRange(unique, throttle)


class JobState(enum.StrEnum):
    """Native job states (DESIGN §3). Terminal states are final; a requeue starts a new attempt."""

    QUEUED = "queued"
    SCHEDULED = "scheduled"
    STAGING_IN = "staging_in"
    RUNNING = "running"
    STAGING_OUT = "staging_out"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELED})

#: States in which a job holds an allocation (resources counted as used on its nodes).
ACTIVE_STATES = frozenset({JobState.SCHEDULED, JobState.STAGING_IN, JobState.RUNNING, JobState.STAGING_OUT})


class PortSpec(BaseModel):
    """A port the job exposes (``in``: reachable from the submitting side) or reaches (``out``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    port: Annotated[int, Field(ge=1, le=65535)]
    protocol: Literal["tcp"] = "tcp"
    direction: Literal["in", "out"]

    def __str__(self) -> str:
        return f"{self.port}/{self.protocol}/{self.direction}"


#: URL schemes data may be staged from and to (``file://`` is a path on the core host).
STAGING_SCHEMES = ("file", "http", "https", "s3")


def _relative_path(path: str, what: str) -> str:
    if not path or "\x00" in path or path.startswith("/") or ".." in path.split("/"):
        raise ValueError(f"{what} {path!r} must be a non-empty path relative to the working directory")
    return path


def _staging_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in STAGING_SCHEMES or not rest:
        raise ValueError(
            f"URL {url!r} is not supported: use one of {', '.join(s + '://' for s in STAGING_SCHEMES)}"
        )
    return url


class InputSpec(BaseModel):
    """A file or directory placed in the job's working directory before it starts.

    Exactly one source: ``url`` (fetched by the core, streamed and checksummed) or inline ``content``.
    Files uploaded with a submission are listed in :attr:`JobSpec.input_files` instead.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Annotated[str, Field(max_length=4096, description="relative to the working directory")]
    url: str | None = None
    content: Annotated[str | None, Field(max_length=MAX_SCRIPT_BYTES)] = None
    type: Literal["file", "directory"] = "file"
    #: When given, the fetched file must have this SHA-256 (hex) or the job fails before it starts.
    sha256: Annotated[str | None, Field(pattern=r"^[0-9a-f]{64}$")] = None

    @field_validator("path")
    @classmethod
    def _path(cls, path: str) -> str:
        return _relative_path(path, "input path")

    @field_validator("url")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        return None if url is None else _staging_url(url)

    @model_validator(mode="after")
    def _one_source(self) -> InputSpec:
        if (self.url is None) == (self.content is None):
            raise ValueError(f"input {self.path!r}: give exactly one of 'url' or 'content'")
        if self.content is not None and self.type == "directory":
            raise ValueError(f"input {self.path!r}: inline content can only be a file")
        return self


class OutputSpec(BaseModel):
    """Files the job leaves in its working directory, delivered to ``url`` after it ends.

    ``path`` may be a glob (``results/*.csv``); then ``url`` names a directory and each match keeps its
    path relative to ``path_prefix`` (default: the glob's directory part).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Annotated[str, Field(max_length=4096)]
    url: str
    type: Literal["file", "directory"] = "file"
    path_prefix: str | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, path: str) -> str:
        return _relative_path(path, "output path")

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        return _staging_url(url)


class JobSpec(BaseModel):
    """What a user asked for. Built from a ``#SWM`` job script, from JSON, or from a TES task.

    Sizes are in bytes, durations in seconds. Exactly one of ``script`` (a whole shell script, run by
    the interpreter of its shebang) and ``command`` (an argv list run without a shell) is set.
    """

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    name: Annotated[str, Field(max_length=256)] = ""
    comment: Annotated[str, Field(max_length=4096)] = ""
    script: Annotated[str | None, Field(max_length=MAX_SCRIPT_BYTES)] = None
    command: list[str] | None = None
    account: str | None = None
    remote: str | None = None
    flavor: str | None = None
    cloud_image: str | None = None
    container_image: str | None = None
    nodes: Annotated[int, Field(ge=1, le=100_000)] = 1
    cpus: Annotated[int, Field(ge=1, le=1_000_000, description="CPUs per node")] = 1
    mem: Annotated[
        int, Field(ge=0, le=MAX_BYTES, description="memory per node, bytes (0: no reservation)")
    ] = 0
    gpus: Annotated[int, Field(ge=0, le=1024, description="GPUs per node")] = 0
    storage_size: Annotated[int, Field(ge=0, le=MAX_BYTES, description="local storage per node, bytes")] = 0
    walltime: Annotated[int | None, Field(ge=1, description="seconds; None: the remote's default")] = None
    priority: Annotated[int, Field(ge=-1_000_000, le=1_000_000)] = 0
    env: dict[str, str] = Field(default_factory=dict)
    #: Jobs that must have completed successfully first (``#SWM depends``)...
    depends: list[str] = Field(default_factory=list)
    #: ...and jobs that must have ended, however (``#SWM depends-any``).
    depends_any: list[str] = Field(default_factory=list)
    array: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    ports: list[PortSpec] = Field(default_factory=list)
    submission_address: str | None = None
    workdir: str | None = None
    relocatable: bool = True
    #: Whole nodes: no other job shares the job's nodes while it runs.
    exclusive: bool = False
    #: It may run on preemptible (spot) capacity; if that is taken back, it is requeued.
    preemptible: bool = False
    input_files: list[str] = Field(default_factory=list)
    output_files: list[str] = Field(default_factory=list)
    #: Inputs fetched from URLs or given inline, and outputs delivered to URLs (staging).
    inputs: list[InputSpec] = Field(default_factory=list)
    outputs: list[OutputSpec] = Field(default_factory=list)
    storage: str | None = None
    stdin: str | None = None
    stdout: str | None = None
    stderr: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, data: object) -> object:
        """``""`` for an optional name means "not given", as in a job script; never a distinct value."""
        if isinstance(data, dict):
            optional = ("account", "remote", "flavor", "cloud_image", "container_image", "workdir", "storage")
            return {k: (None if k in optional and v == "" else v) for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _one_payload(self) -> JobSpec:
        if (self.script is None) == (self.command is None):
            raise ValueError("give exactly one of 'script' (a job script) or 'command' (an argv list)")
        if self.command is not None and (not self.command or not self.command[0]):
            raise ValueError("'command' must name a program to run")
        if self.script is not None and len(self.script.encode()) > MAX_SCRIPT_BYTES:
            raise ValueError(f"the script is larger than {MAX_SCRIPT_BYTES} bytes")
        if any("\x00" in text for text in self._texts()):
            raise ValueError("the job contains a NUL character")
        seen: dict[int, str] = {}
        for port in self.ports:
            if port.port in seen:
                raise ValueError(f"port {port.port} is given twice ({seen[port.port]} and {port.direction})")
            seen[port.port] = port.direction
        return self

    def _texts(self) -> list[str]:
        """Every free text of the spec (where a NUL byte could hide)."""
        texts = [self.name, self.comment, self.script or "", *(self.command or [])]
        texts += [
            v
            for v in (
                self.account,
                self.remote,
                self.flavor,
                self.cloud_image,
                self.container_image,
                self.submission_address,
                self.workdir,
                self.storage,
                self.stdin,
                self.stdout,
                self.stderr,
            )
            if v
        ]
        texts += [*self.env.keys(), *self.env.values(), *self.input_files, *self.output_files]
        return texts

    @field_validator("depends", "depends_any")
    @classmethod
    def _job_ids(cls, depends: list[str]) -> list[str]:
        ids = [d.strip().lower() for d in depends]
        for job_id in ids:
            if not _UUID.match(job_id):
                raise ValueError(f"dependency {job_id!r} is not a job id")
        return list(dict.fromkeys(ids))

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if not _ENV_NAME.match(key):
                raise ValueError(f"environment variable name {key!r} is not valid (letters, digits, _)")
        return env

    @field_validator("labels")
    @classmethod
    def _label_names(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not _LABEL.match(key) or not _LABEL.match(value):
                raise ValueError(f"label {key}={value} is not valid (1-63 of letters, digits, _ . - /)")
        return labels

    @field_validator("array")
    @classmethod
    def _array_range(cls, array: str | None) -> str | None:
        if array is not None:
            parse_array(array)  # raises with the reason
        return array

    @field_validator("input_files", "output_files")
    @classmethod
    def _file_names(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not path or "\x00" in path:
                raise ValueError("file names must be non-empty and contain no NUL byte")
        return paths

    @field_validator("output_files")
    @classmethod
    def _relative_outputs(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if path.startswith("/") or ".." in path.split("/"):
                raise ValueError(f"output file {path!r} must be relative to the working directory")
        return paths


class Job(BaseModel):
    """A job as the native API shows it: the spec plus everything that happened to it."""

    id: str
    owner: str
    account: str
    name: str
    state: JobState
    #: machine-readable reason of the latest transition (e.g. ``exit_code``, ``walltime``, ``canceled``)
    reason: str = ""
    #: human text of the latest event (the swm API's ``state_details``)
    state_details: str = ""
    attempt: int = 1
    remote: str = ""
    remote_id: str = ""
    flavor_id: str = ""
    node_names: list[str] = Field(default_factory=list)
    node_ips: list[str] = Field(default_factory=list)
    submit_time: datetime
    start_time: datetime | None = None
    end_time: datetime | None = None
    exit_code: int | None = None
    signal: int | None = None
    cancel_requested: bool = False
    #: For a task of an array job: the array's id and this task's index.
    array_id: str = ""
    array_index: int | None = None
    #: While queued: when the scheduler expects it to start, if it can tell.
    estimated_start: datetime | None = None
    #: What its elastic capacity cost (flavor price x node-hours, boot and staging included); 0 elsewhere.
    cost: float = 0.0
    spec: JobSpec

    @property
    def duration(self) -> float:
        """Seconds actually run (0 before start); measured, not guessed."""
        if self.start_time is None:
            return 0.0
        end = self.end_time or datetime.now(self.start_time.tzinfo)
        return max(0.0, (end - self.start_time).total_seconds())


class ArrayJob(BaseModel):
    """An array job: one submission, ``size`` tasks (each a job), at most ``throttle`` running at once."""

    id: str
    name: str
    owner: str
    range: str
    size: int
    throttle: int | None = None
    submit_time: datetime
    #: How many of its tasks are in each state.
    states: dict[JobState, int] = Field(default_factory=dict)

    @property
    def done(self) -> bool:
        return sum(n for s, n in self.states.items() if s.terminal) == self.size


class Event(BaseModel):
    """One append-only record of a state change, with a machine-readable reason and human text."""

    id: int
    job_id: str
    time: datetime
    attempt: int
    from_state: JobState | None
    to_state: JobState
    reason: str
    message: str


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a list. ``next`` is an opaque cursor for the following page, or None at the end."""

    items: list[T]
    next: str | None = None
