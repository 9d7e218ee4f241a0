"""The GA4GH TES 1.1 task document as we accept it (reference/tes-1.1.openapi.yaml).

Lenient where clients differ (unknown and read-only fields are ignored, as py-tes 0.4 sends some of
them back), strict where a mistake would run the wrong thing: paths must be absolute and stay clean,
every executor needs a command.
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Inline input content we accept per input (the spec asks for at least 128 KiB).
MAX_CONTENT_BYTES = 1024 * 1024


class TesState(enum.StrEnum):
    UNKNOWN = "UNKNOWN"
    QUEUED = "QUEUED"
    INITIALIZING = "INITIALIZING"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    COMPLETE = "COMPLETE"
    EXECUTOR_ERROR = "EXECUTOR_ERROR"
    SYSTEM_ERROR = "SYSTEM_ERROR"
    CANCELED = "CANCELED"
    PREEMPTED = "PREEMPTED"
    CANCELING = "CANCELING"


class View(enum.StrEnum):
    MINIMAL = "MINIMAL"
    BASIC = "BASIC"
    FULL = "FULL"


def container_path(path: str, what: str) -> str:
    """An absolute, clean path inside the task's filesystem (no ``..``, no NUL)."""
    if not path.startswith("/") or "\x00" in path or ".." in path.split("/") or path.strip("/") == "":
        raise ValueError(f"{what} {path!r} must be an absolute path below / (no '..')")
    return path


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


FileType = Literal["FILE", "DIRECTORY"]


class TesInput(_Lenient):
    name: str | None = None
    description: str | None = None
    url: str | None = None
    path: str
    type: FileType | None = "FILE"
    content: Annotated[str | None, Field(max_length=MAX_CONTENT_BYTES)] = None
    streamable: bool | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, path: str) -> str:
        return container_path(path, "input path")

    @model_validator(mode="after")
    def _source(self) -> TesInput:
        if self.url is None and self.content is None:
            raise ValueError(f"input {self.path}: give 'url' or 'content'")
        return self


class TesOutput(_Lenient):
    name: str | None = None
    description: str | None = None
    url: str
    path: str
    path_prefix: str | None = None
    type: FileType | None = "FILE"

    @field_validator("path")
    @classmethod
    def _path(cls, path: str) -> str:
        return container_path(path, "output path")


class TesResources(_Lenient):
    cpu_cores: Annotated[int | None, Field(ge=1, le=1_000_000)] = None
    preemptible: bool | None = None
    ram_gb: Annotated[float | None, Field(ge=0)] = None
    disk_gb: Annotated[float | None, Field(ge=0)] = None
    zones: list[str] | None = None
    backend_parameters: dict[str, str] | None = None
    backend_parameters_strict: bool | None = False


class TesExecutor(_Lenient):
    image: str
    command: Annotated[list[str], Field(min_length=1)]
    workdir: str | None = None
    stdin: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    env: dict[str, str] | None = None
    ignore_error: bool | None = False

    @field_validator("workdir", "stdin", "stdout", "stderr")
    @classmethod
    def _paths(cls, path: str | None) -> str | None:
        return None if path is None else container_path(path, "executor path")

    @field_validator("command")
    @classmethod
    def _command(cls, command: list[str]) -> list[str]:
        if not command[0]:
            raise ValueError("the command must name a program")
        if any("\x00" in word for word in command):
            raise ValueError("the command contains a NUL character")
        return command


class TesTask(_Lenient):
    """A task as created (read-only fields a client may echo back are ignored)."""

    name: Annotated[str | None, Field(max_length=256)] = None
    description: str | None = None
    inputs: list[TesInput] | None = None
    outputs: list[TesOutput] | None = None
    resources: TesResources | None = None
    executors: Annotated[list[TesExecutor], Field(min_length=1)]
    volumes: list[str] | None = None
    tags: dict[str, str] | None = None

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, volumes: list[str] | None) -> list[str] | None:
        return None if volumes is None else [container_path(v, "volume") for v in volumes]
