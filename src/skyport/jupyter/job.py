"""What the spawner submits and what it tells the user while waiting: pure functions, tested alone.

The single-user server runs as an ordinary Sky Port job: a small shell script that makes the job's
working directory its home and execs ``jupyterhub-singleuser``, with the hub's environment (its API
token among it) as the job's ``env``. It declares two ports: ``in`` for the server itself (the hub
reaches it through the core, spawner.py) and ``out`` for the hub's API (the server reaches the hub at
``localhost:<hub port>`` on its node; the core carries it back, server/tunnels.py).
"""

from __future__ import annotations

import shlex
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from skyport.models import Event, JobSpec, JobState, PortSpec

#: Percentages shown on the hub's progress bar for each state a job passes through.
_PROGRESS = {
    JobState.QUEUED: 10,
    JobState.SCHEDULED: 30,
    JobState.STAGING_IN: 60,
    JobState.RUNNING: 80,
}
_STATE_WORDS = {
    JobState.QUEUED: "Queued",
    JobState.SCHEDULED: "Getting a machine",
    JobState.STAGING_IN: "Copying notebooks",
    JobState.RUNNING: "Starting Jupyter",
}


def on_node(url: str) -> tuple[str, int]:
    """The hub API URL as the server sees it on its node (``localhost``), and the port to carry out.

    ``http://hub.internal:8081/hub/api`` -> ``http://127.0.0.1:8081/hub/api``, 8081.
    """
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return urlunsplit((parts.scheme, f"127.0.0.1:{port}", parts.path, parts.query, parts.fragment)), port


def job_script(cmd: list[str], args: list[str], user: str) -> str:
    """The job: home and Jupyter's runtime files in the job's own directory, then the server."""
    argv = " ".join(shlex.quote(a) for a in [*cmd, *args])
    return (
        "#!/bin/sh\n"
        f"# A JupyterHub single-user server for hub user {user.replace(chr(10), ' ')}, "
        "started by skyport.jupyter.SkyPortSpawner.\n"
        'export HOME="$PWD" XDG_CACHE_HOME="$PWD/.cache" JUPYTER_RUNTIME_DIR="$PWD/.jupyter-runtime"\n'
        f"exec {argv}\n"
    )


def job_spec(
    *,
    user: str,
    env: dict[str, str],
    cmd: list[str],
    args: list[str],
    options: dict[str, Any],
    server_port: int,
    notebooks: list[str],
    output_patterns: list[str],
    account: str | None = None,
    submission_address: str | None = None,
    walltime: int | None = None,
) -> JobSpec:
    """The single-user server as a Sky Port job (``env`` is the hub's, API URLs as seen on the node)."""
    env = dict(env)
    hub_port = 0
    for name in ("JUPYTERHUB_API_URL", "JUPYTERHUB_ACTIVITY_URL"):
        if env.get(name):
            env[name], hub_port = on_node(env[name])
    ports = [PortSpec(port=server_port, direction="in")]
    if hub_port and hub_port != server_port:
        ports.append(PortSpec(port=hub_port, direction="out"))
    return JobSpec(
        name=f"jupyter-{user}"[:256],
        comment="JupyterHub single-user server",
        script=job_script(cmd, args, user),
        remote=options.get("remote") or None,
        flavor=options.get("flavor") or None,
        cloud_image=options.get("image") or None,
        gpus=int(options.get("gpus") or 0),
        account=account or None,
        walltime=walltime or None,
        env=env,
        ports=ports,
        submission_address=submission_address or None,
        input_files=notebooks,
        output_files=output_patterns,
    )


def progress_event(event: Event) -> dict[str, Any]:
    """One of our job events as a message for the hub's progress page (``progress`` only when the job
    moved forward)."""
    words = _STATE_WORDS.get(event.to_state, event.to_state.value.replace("_", " ").capitalize())
    message = f"{words}: {event.message}" if event.message else words
    out: dict[str, Any] = {"message": message}
    if event.to_state in _PROGRESS:
        out["progress"] = _PROGRESS[event.to_state]
    return out
