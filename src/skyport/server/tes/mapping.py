"""TES task <-> Sky Port job: what a task asks for as a JobSpec, and a job shown as a TES task.

Resources: ``cpu_cores`` -> cpus, ``ram_gb`` -> mem (GB = 10^9 bytes, as TES and its clients count),
``disk_gb`` -> storage (only where nodes declare storage: else it could never be placed, and the
system logs say it was not reserved), ``preemptible`` -> the job may run on spot capacity (and is
requeued if it is taken back), ``zones`` -> the first one that names a remote. ``backend_parameters``
carries what TES lacks: ``gpus``, ``flavor``, ``remote``, ``walltime`` (seconds or [D-]HH:MM:SS),
``account``, and the ``callback_url`` extension. Keys are case-insensitive; unknown keys are dropped
with a warning in the system logs, or the task is refused with ``backend_parameters_strict``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from skyport.models import InputSpec, JobSpec, OutputSpec
from skyport.models.job import STAGING_SCHEMES
from skyport.server.tes.models import TesInput, TesOutput, TesTask
from skyport.server.tes.runner import OUTPUT_FILES, build_script

#: backend_parameters keys we understand (lower case), as service-info lists them.
BACKEND_PARAMETERS = ("account", "callback_url", "flavor", "gpus", "remote", "walltime")
#: The tag that may carry the callback extension instead of a backend parameter.
CALLBACK_TAG = "callback_url"
GB = 1_000_000_000
_WALLTIME = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$")


class TaskRejected(ValueError):
    """A task we cannot accept; the message says what to change (a 400)."""


@dataclass
class Placement:
    """What the core knows when mapping: which remotes exist and how their images are provided."""

    remotes: set[str]
    images: str  # "none" | "host"
    host_path: list[str]
    storage_declared: bool
    remote_name: str = "local"


@dataclass
class Mapped:
    spec: JobSpec
    notes: list[str] = field(default_factory=list)
    callback_url: str | None = None
    #: The task document as stored and shown (unsupported backend parameters removed).
    document: dict[str, Any] = field(default_factory=dict)
    image_error: str | None = None


def parse_walltime(text: str) -> int:
    text = text.strip()
    if text.isdigit():
        seconds = int(text)
    else:
        match = _WALLTIME.match(text)
        if not match:
            raise TaskRejected(f"backend parameter walltime={text!r}: give seconds or [D-]HH:MM:SS")
        days, hours, minutes, secs = (int(g) if g else 0 for g in match.groups())
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    if seconds < 1:
        raise TaskRejected("backend parameter walltime must be at least one second")
    return seconds


def _relative(path: str) -> str:
    return path.lstrip("/")


def _url(url: str) -> str:
    """TES allows a bare absolute path for a file on the server; we say ``file://``."""
    return "file://" + url if url.startswith("/") else url


def _check_url(url: str, what: str) -> str:
    scheme = url.partition("://")[0].lower()
    if "://" not in url or scheme not in STAGING_SCHEMES:
        raise TaskRejected(
            f"{what} URL {url!r} is not supported: use one of {', '.join(s + '://' for s in STAGING_SCHEMES)}"
        )
    return url


def _input(item: TesInput) -> InputSpec:
    kind = "directory" if item.type == "DIRECTORY" else "file"
    if item.content is not None and (item.content != "" or item.url is None):
        if kind == "directory":
            raise TaskRejected(f"input {item.path}: inline content can only be a file")
        return InputSpec(path=_relative(item.path), content=item.content)
    assert item.url is not None
    return InputSpec(path=_relative(item.path), url=_check_url(_url(item.url), "input"), type=kind)


def _output(item: TesOutput) -> OutputSpec:
    prefix = _relative(item.path_prefix) if item.path_prefix else None
    return OutputSpec(
        path=_relative(item.path),
        url=_check_url(_url(item.url), "output"),
        type="directory" if item.type == "DIRECTORY" else "file",
        path_prefix=prefix,
    )


def _backend_parameters(task: TesTask, notes: list[str]) -> dict[str, str]:
    resources = task.resources
    given = (resources.backend_parameters if resources else None) or {}
    strict = bool(resources and resources.backend_parameters_strict)
    known: dict[str, str] = {}
    unknown: list[str] = []
    for key, value in given.items():
        if key.lower() in BACKEND_PARAMETERS:
            known[key.lower()] = value
        else:
            unknown.append(key)
    if unknown:
        supported = ", ".join(BACKEND_PARAMETERS)
        if strict:
            raise TaskRejected(
                f"backend parameter(s) {', '.join(sorted(unknown))} are not supported here "
                f"(backend_parameters_strict is set); supported: {supported}"
            )
        notes.append(
            f"warning: backend parameter(s) {', '.join(sorted(unknown))} are not supported and were "
            f"ignored; supported: {supported}"
        )
    return known


def to_job(task: TesTask, placement: Placement) -> Mapped:
    """The job a task becomes, or TaskRejected saying why it cannot be."""
    notes: list[str] = []
    params = _backend_parameters(task, notes)
    resources = task.resources
    values: dict[str, Any] = {"name": task.name or "tes-task", "comment": (task.description or "")[:4096]}
    if resources is not None:
        if resources.preemptible:
            values["preemptible"] = True
        if resources.cpu_cores:
            values["cpus"] = resources.cpu_cores
        if resources.ram_gb:
            values["mem"] = math.ceil(resources.ram_gb * GB)
        if resources.disk_gb:
            if placement.storage_declared:
                values["storage_size"] = math.ceil(resources.disk_gb * GB)
            else:
                notes.append(
                    f"disk_gb={resources.disk_gb:g} not reserved: no node here declares its local storage"
                )
        for zone in resources.zones or []:
            if zone in placement.remotes:
                values["remote"] = zone
                break
        else:
            if resources.zones:
                notes.append(
                    f"warning: none of the zones {', '.join(resources.zones)} is a remote of this core; "
                    "placed anywhere"
                )
    if "gpus" in params:
        try:
            values["gpus"] = int(params["gpus"])
        except ValueError:
            raise TaskRejected(f"backend parameter gpus={params['gpus']!r} is not a whole number") from None
    if "walltime" in params:
        values["walltime"] = parse_walltime(params["walltime"])
    for key in ("flavor", "account"):
        if params.get(key):
            values[key] = params[key]
    if params.get("remote"):
        if params["remote"] not in placement.remotes:
            raise TaskRejected(f"backend parameter remote={params['remote']!r} is not a remote of this core")
        values["remote"] = params["remote"]
    callback = params.get("callback_url") or (task.tags or {}).get(CALLBACK_TAG)
    if callback is not None and not callback.lower().startswith(("http://", "https://")):
        raise TaskRejected(f"callback_url {callback!r} must be an http:// or https:// URL")

    images = sorted({e.image for e in task.executors if e.image})
    image_error = None
    if images and placement.images == "none":
        image_error = (
            f"the remote {placement.remote_name!r} cannot provide container images ({', '.join(images)}): "
            "it runs no container runtime (local.images = none)"
        )
        notes.append(image_error)
    elif images:
        notes.append(
            f"image(s) {', '.join(images)} not pulled: the commands run in the host environment of the "
            f"remote {placement.remote_name!r} (local.images = host)"
        )
    values["script"] = build_script(task, host_path=placement.host_path, image_error=image_error)
    if images:
        values["container_image"] = images[0]
    try:
        values["inputs"] = [_input(i) for i in task.inputs or []]
        values["outputs"] = [_output(o) for o in task.outputs or []]
        spec = JobSpec(output_files=list(OUTPUT_FILES), **values)
    except ValueError as exc:
        if isinstance(exc, TaskRejected):
            raise
        raise TaskRejected(str(exc)) from exc

    # Shown back as sent: older clients (py-tes 0.4) refuse fields they do not know, defaults included.
    document = task.model_dump(mode="json", exclude_none=True, exclude_unset=True)
    if resources is not None and resources.backend_parameters:
        kept = {k: v for k, v in resources.backend_parameters.items() if k.lower() in BACKEND_PARAMETERS}
        document["resources"]["backend_parameters"] = kept
    return Mapped(spec=spec, notes=notes, callback_url=callback, document=document, image_error=image_error)
