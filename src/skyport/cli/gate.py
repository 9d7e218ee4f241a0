"""``skyport gate serve``: serve one remote's provisioner over the gate protocol (mutual TLS).

The remote is one of the home's ``[[remotes]]`` (skyport.toml or ``SKYPORT_REMOTES``); the gate uses the
home's server certificate and CA, and admits the core by its client certificate (see
:mod:`skyport.gates.serve`). When it listens it writes ``$SKYPORT_HOME/run/gate-<remote>.json`` (URL, port,
pid), so it can be started on port 0 and found.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Annotated

import typer

from skyport.cli.output import err_console, fail

gate_app = typer.Typer(
    help="Out-of-process gates: serve a provisioner over the gate protocol.", no_args_is_help=True
)


def ready_file(home: Path, remote: str) -> Path:
    return home / "run" / f"gate-{remote}.json"


@gate_app.command("serve")
def serve(
    remote: Annotated[
        str, typer.Option(help="The remote (from the home's settings) whose provisioner to serve")
    ],
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 picks a free one)")] = 8444,
    provider: Annotated[
        str | None,
        typer.Option(help="The path segment of the calls (/<provider>/flavors); default: the kind"),
    ] = None,
    allow: Annotated[
        list[str] | None, typer.Option(help="User name whose client certificate may call (repeatable)")
    ] = None,
    home: Annotated[
        Path | None, typer.Option("--home", envvar="SKYPORT_HOME", help="Sky Port home (default ~/.skyport)")
    ] = None,
) -> None:
    """Serve a remote's provisioner (e.g. the [bold]sim[/bold] cloud) to cores over mutual TLS.

    Example: [bold]skyport gate serve --remote cloud --port 8444[/bold], and in the core's settings a
    remote of kind [bold]http[/bold] with url https://<host>:8444, provider = "sim", ca_file =
    <home>/ca/ca.pem, cert_file/key_file = an allowed user's certificate (default: admin's).
    """
    import uvicorn

    from skyport.gates.serve import GateLoadError, create_gate_app, load_provisioner
    from skyport.server.logs import configure_logging
    from skyport.server.settings import Settings
    from skyport.server.tls import make_uvicorn_config

    try:
        settings = Settings(home=home) if home is not None else Settings()
    except Exception as exc:  # pydantic's message names the bad setting
        fail(f"the settings are not valid: {exc}", hint="check skyport.toml and SKYPORT_* variables")
    found = next((r for r in settings.remotes if r.name == remote), None)
    if found is None:
        names = ", ".join(r.name for r in settings.remotes) or "none"
        fail(f"no remote named {remote!r} in {settings.home} (remotes: {names})")
    for what, path in (("server certificate", settings.server_cert), ("CA certificate", settings.ca_cert)):
        if not path.exists():
            fail(f"no {what} at {path}", hint="run `skyport init` first")
    try:
        provisioner = load_provisioner(found, home=settings.home)
    except GateLoadError as exc:
        fail(str(exc))
    configure_logging(settings.log_level, json=settings.log_json)
    kind = provider or str(getattr(found, "kind", remote))
    app = create_gate_app(provisioner, kind, allowed_users=allow or ["admin"])
    config = make_uvicorn_config(
        app,
        host=host,
        port=port,
        cert_file=settings.server_cert,
        key_file=settings.server_key,
        ca_file=settings.ca_cert,
        require_client_cert=True,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    ready = ready_file(settings.home, remote)

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.should_exit:
                return
            bound = port
            for server in self.servers:
                for sock in server.sockets:
                    bound = sock.getsockname()[1]
            url_host = "localhost" if host in {"0.0.0.0", "127.0.0.1", "::", "localhost"} else host
            url = f"https://{url_host}:{bound}"
            ready.parent.mkdir(parents=True, exist_ok=True)
            tmp = ready.with_suffix(".tmp")
            tmp.write_text(json.dumps({"url": url, "port": bound, "pid": os.getpid(), "provider": kind}))
            tmp.replace(ready)
            err_console.print(f"gate for remote [bold]{remote}[/bold] serving /{kind}/... on {url}")

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            ready.unlink(missing_ok=True)
            await super().shutdown(sockets)

    _Server(config).run()


def register(app: typer.Typer) -> None:
    app.add_typer(gate_app, name="gate")
