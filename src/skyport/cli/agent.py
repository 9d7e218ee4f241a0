"""Node commands of ``skyport``: run an agent, enrol nodes, and reach a job's ports.

``skyport agent`` runs on a node; ``skyport node token`` (admins) makes the one-time token it enrols
with; ``skyport port-forward`` opens a local port that reaches a running job's port.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer

from skyport.cli.jobs import JobId, JsonOpt, call, client, console, print_json_line
from skyport.cli.output import err_console, fail

node_app = typer.Typer(help="Agent nodes: enrolment tokens.", no_args_is_help=True)


def agent(
    url: Annotated[str, typer.Option(help="The core's URL, e.g. https://core.example.org:8443")],
    ca: Annotated[Path | None, typer.Option(help="The core's CA certificate (needed to enrol)")] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding the one-time bootstrap token (else $SKYPORT_AGENT_TOKEN, else stdin)"
        ),
    ] = None,
    state_dir: Annotated[
        Path, typer.Option(help="Where the agent keeps its key, certificate and jobs")
    ] = Path("~/.skyport-agent"),
    workroot: Annotated[Path | None, typer.Option(help="Where job working directories are made")] = None,
    default_user: Annotated[
        str | None, typer.Option(help="Unix account for jobs of users without their own (root agent)")
    ] = None,
    cpus: Annotated[int | None, typer.Option(help="CPUs to offer (default: all)")] = None,
    mem: Annotated[int | None, typer.Option(help="Memory to offer, bytes (default: all)")] = None,
    gpus: Annotated[int, typer.Option(help="GPUs to offer")] = 0,
    label: Annotated[list[str] | None, typer.Option(help="A node label k=v (repeatable)")] = None,
    heartbeat: Annotated[float, typer.Option(help="Seconds between heartbeats")] = 5.0,
) -> None:
    """Run the node agent: connect out to the core and run the jobs it places on this node.

    The first start enrols the node with a one-time token (the key is made here and never leaves):

      [bold]skyport node token lab node1[/bold]   (on the core, as an admin)
      [bold]SKYPORT_AGENT_TOKEN=... skyport agent --url https://core:8443 --ca ca.pem[/bold]

    Later starts reuse the node's certificate (renewed automatically before it expires).
    """
    import structlog

    from skyport.agent.identity import CoreUnreachable, EnrolmentRefused, NodeIdentity
    from skyport.agent.node import Agent, AgentConfig
    from skyport.server.settings import LocalGateSettings

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    state = state_dir.expanduser()
    lock = _claim_state_dir(state)  # noqa: F841 - held (open and locked) for as long as the agent runs
    identity = NodeIdentity(state, url)
    if not identity.enrolled():
        if ca is None:
            fail("this node is not enrolled yet: give --ca (the core's CA certificate) and a bootstrap token")
        token = _read_token(token_file)
        delay = 1.0
        while True:  # a node may boot while its core restarts: keep trying until it answers
            try:
                node = identity.enrol(token, ca)
                break
            except CoreUnreachable as exc:
                err_console.print(f"{exc}; trying again in {delay:.0f}s")
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
            except EnrolmentRefused as exc:
                fail(str(exc))
        err_console.print(
            f"[green]✓[/green] enrolled as node [bold]{node['node_name']}[/bold] of {node['remote']}"
        )
    labels = dict(item.split("=", 1) for item in (label or []) if "=" in item)
    local = LocalGateSettings(workroot=workroot, default_user=default_user)
    runner = Agent(AgentConfig(url, state, local, cpus, mem, gpus, labels, heartbeat), identity)
    try:
        run_loop(runner.run())
    except KeyboardInterrupt:
        pass
    finally:
        runner.close()


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when it is installed (it comes with uvicorn[standard]), else asyncio's loop.

    The agent, an agent pool and ``port-forward`` move bulk bytes through TLS and WebSockets: uvloop's
    transports (TLS included) are compiled code, where asyncio's run Python per read and write; the core
    runs on uvloop too (uvicorn's choice). The collector runs at the core's thresholds.
    """
    import gc

    from skyport.agent.collector import GC_THRESHOLDS
    from skyport.agent.memory import keep_freed_memory

    gc.set_threshold(*GC_THRESHOLDS)  # see skyport.agent.collector
    keep_freed_memory()  # bulk bytes: freed buffers stay in the process (see skyport.agent.memory)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it on every platform we run on
        asyncio.run(main)
        return
    uvloop.run(main)


def _claim_state_dir(state: Path) -> int:
    """Lock the state directory for this process and write ``agent.pid``; refuse if another agent has it.

    Two agents on one state directory would share a key and a job list. The pid file is how the core
    (agent mode of the ssh gate) finds a running agent; the lock (on ``agent.lock``, never removed)
    is what makes it trustworthy. Returns the lock's descriptor, to be kept open.
    """
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid_file = state / "agent.pid"
        other = pid_file.read_text().strip() if pid_file.exists() else "?"
        fail(f"another agent runs with the state directory {state} (pid {other})")
    tmp = state / "agent.pid.new"
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, state / "agent.pid")
    return fd


def _read_token(token_file: Path | None) -> str:
    if token_file is not None:
        return token_file.read_text().strip()
    if token := os.environ.get("SKYPORT_AGENT_TOKEN"):
        return token.strip()
    if not sys.stdin.isatty():
        return sys.stdin.readline().strip()
    fail("no bootstrap token: use --token-file, $SKYPORT_AGENT_TOKEN or standard input")


@node_app.command("token")
def node_token(
    remote: Annotated[str, typer.Argument(help="The remote the node belongs to")],
    node: Annotated[str, typer.Argument(help="The node's name")],
    ttl: Annotated[int, typer.Option(help="Seconds the token stays usable")] = 3600,
    json_out: JsonOpt = False,
) -> None:
    """Make a one-time token that enrols one agent node (admins).

    Example: [bold]skyport node token lab node1 --ttl 600[/bold]
    """
    with client() as c:
        issued = call(lambda: c.bootstrap_token(remote, node, ttl))
    if json_out:
        print_json_line(issued)
        return
    console.print(issued["token"], markup=False, highlight=False)
    err_console.print(
        f"enrols node [bold]{node}[/bold] of {remote} once, until {issued['expires_at']}; on the node:\n"
        f"  SKYPORT_AGENT_TOKEN=<token> skyport agent --url <core URL> --ca <the core's ca.pem>"
    )


def port_forward(
    job_id: JobId,
    ports: Annotated[str, typer.Argument(metavar="PORT[:LOCAL]", help="The job's port, and a local one")],
    address: Annotated[str, typer.Option(help="Local address to listen on")] = "127.0.0.1",
) -> None:
    """Reach a running job's port from here: connections to the local port go to the job's port.

    Only the job's owner may; the job must declare the port ([bold]#SWM ports 8888/tcp/in[/bold]).

    Example: [bold]skyport port-forward 5b1c...e2 8888:9999[/bold] then open http://localhost:9999
    """
    from skyport.client import ClientConfig
    from skyport.client.ports import forward

    remote_text, _, local_text = ports.partition(":")
    try:
        remote_port, local_port = int(remote_text), int(local_text or remote_text)
    except ValueError:
        fail(f"{ports!r} is not PORT or PORT:LOCAL (numbers)")
    config = ClientConfig.load()

    async def serve() -> None:
        server = await forward(
            config,
            job_id,
            remote_port,
            local_port,
            address,
            on_error=lambda m: err_console.print(f"[red]{m}[/red]"),
        )
        bound = server.sockets[0].getsockname()
        err_console.print(
            f"forwarding {bound[0]}:{bound[1]} -> job {job_id} port {remote_port} (Ctrl-C stops)"
        )
        async with server:
            await server.serve_forever()

    try:
        run_loop(serve())
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        fail(f"cannot listen on {address}:{local_port}: {exc.strerror}")


def agent_pool(
    directory: Annotated[Path, typer.Argument(help="Directory of node files (<name>.json) to run")],
    idle_exit: Annotated[float, typer.Option(help="Exit after this many seconds without a node")] = 5.0,
    start_grace: Annotated[float, typer.Option(help="Wait this long for the first node")] = 0.0,
) -> None:
    """Run several node agents in one process, one per node file in DIRECTORY (simulated clouds).

    Each node has its own key, certificate, connection and jobs; removing its file stops it. Used by the
    [bold]sim[/bold] cloud to run hundreds of VMs on one machine.
    """
    import structlog

    from skyport.agent.pool import AgentPool

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    with contextlib.suppress(KeyboardInterrupt):
        run_loop(AgentPool(directory, idle_exit_s=idle_exit, start_grace_s=start_grace).run())


def register(app: typer.Typer) -> None:
    app.command()(agent)
    app.command("agent-pool")(agent_pool)
    app.command("port-forward")(port_forward)
    app.add_typer(node_app, name="node")
