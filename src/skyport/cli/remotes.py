"""``skyport remotes``: list the remotes, and ``skyport remotes check NAME``: verify a cloud remote's
credentials and permissions without creating anything.

The check runs where the credentials are: in the running core (through the admin API), or with
``--local`` right here with the home's settings (before the core is started, on the core's host).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from skyport.cli import infra
from skyport.cli.jobs import JsonOpt, call, client
from skyport.cli.output import fail, print_json

console = Console()

remotes_app = typer.Typer(
    help="Remotes: list them (no command) or check a cloud remote's credentials.",
    invoke_without_command=True,
    no_args_is_help=False,
)


@remotes_app.callback()
def remotes(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """List the configured remotes (this machine, SSH hosts, clusters, clouds).

    Example: [bold]skyport remotes[/bold];  [bold]skyport remotes check aws-eu[/bold]
    """
    if ctx.invoked_subcommand is None:
        infra.remotes(json_out)


@remotes_app.command("check")
def check(
    name: Annotated[str, typer.Argument(help="The cloud remote (a [[remotes]] name)")],
    local: Annotated[
        bool,
        typer.Option("--local", help="Check here with the home's settings instead of in the running core"),
    ] = False,
    home: Annotated[
        Path | None, typer.Option("--home", envvar="SKYPORT_HOME", help="Sky Port home (with --local)")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Verify a cloud remote's credentials and permissions (least privilege), creating nothing.

    Reads what the remote reads, and asks the provider whether each change the remote makes would be
    allowed (AWS dry runs; quotas and role permissions on OpenStack and Azure). Exit code 1 when a
    required permission is missing. Needs the admin role (or, with --local, the core's host).

    Example: [bold]skyport remotes check aws-eu[/bold]
    """
    if local:
        report = asyncio.run(_check_here(name, home))
    else:
        with client() as c:
            report = call(lambda: c.check_remote(name))
    if json_out:
        print_json(report)
    else:
        console.print(_render(report))
    if not report.get("ok"):
        raise SystemExit(1)


async def _check_here(name: str, home: Path | None) -> dict[str, Any]:
    from skyport.server.core import load_provisioner
    from skyport.server.settings import CloudRemoteSettings, Settings

    settings = Settings(home=home) if home is not None else Settings()
    remote = next(
        (r for r in settings.remotes if isinstance(r, CloudRemoteSettings) and r.name == name), None
    )
    if remote is None:
        fail(f"no cloud remote {name!r} in {settings.home}'s settings", hint="see `skyport remotes`")
    gate = load_provisioner(remote, settings.home)
    try:
        checker = getattr(gate, "check", None)
        if checker is None:
            fail(f"remote {name!r} (kind {remote.kind}) has no credentials check")
        result = await checker()
        report: dict[str, Any] = result.model_dump()
        return report
    finally:
        await gate.close()


def _render(report: dict[str, Any]) -> Table:
    verdict = "[green]✓ ready[/green]" if report.get("ok") else "[red]✗ not ready[/red]"
    title = f"{escape(str(report.get('remote')))} ({escape(str(report.get('kind')))}): {verdict}"
    if report.get("identity"):
        title += f"\nas {escape(str(report['identity']))}"
    table = Table(title=title, title_justify="left")
    table.add_column("CHECK")
    table.add_column("OK")
    table.add_column("DETAIL", overflow="fold")
    for item in report.get("items", []):
        ok = (
            "[green]✓[/green]"
            if item.get("ok")
            else ("[red]✗[/red]" if item.get("required") else "[yellow]-[/yellow]")
        )
        table.add_row(escape(str(item.get("name"))), ok, escape(str(item.get("detail") or "")))
    return table


def register(app: typer.Typer) -> None:
    app.add_typer(remotes_app, name="remotes")
