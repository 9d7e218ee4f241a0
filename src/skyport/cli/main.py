"""The ``skyport`` command: the core's administration here, job and cluster commands in sibling modules."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from skyport.cli import agent, gate, infra, jobs, remotes, render, simulate, tokens
from skyport.cli.output import fail, print_json
from skyport.server.settings import Settings

app = typer.Typer(
    name="skyport",
    help="Sky Port: submit, run and follow jobs on this machine, SSH hosts, clusters and clouds.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
user_app = typer.Typer(help="Manage Sky Port users (on the core's host).", no_args_is_help=True)
app.add_typer(user_app, name="user")
account_app = typer.Typer(
    help="Manage accounts: who pays, fair shares, budgets (admins).", no_args_is_help=True
)
app.add_typer(account_app, name="account")
console = Console()

HomeOpt = Annotated[
    Path | None, typer.Option("--home", envvar="SKYPORT_HOME", help="Sky Port home (default ~/.skyport)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts")]


def _settings(home: Path | None, **overrides: object) -> Settings:
    values = {k: v for k, v in overrides.items() if v is not None}
    if home is not None:
        values["home"] = home
    try:
        return Settings(**values)  # type: ignore[arg-type]
    except Exception as exc:  # pydantic's message names the bad setting
        fail(f"the settings are not valid: {exc}", hint="check skyport.toml and SKYPORT_* variables")
        raise


@app.command()
def init(
    home: HomeOpt = None,
    port: Annotated[
        int | None, typer.Option(help="Port the core will listen on (for client settings)")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Create the CA, the server certificate, the admin user and settings. Safe to run again.

    Example: [bold]skyport init[/bold]
    """
    from skyport.server.admin import init_home

    settings = _settings(home)
    report = asyncio.run(init_home(settings, port=port))
    if json_out:
        print_json({"home": str(report.home), "created": report.created})
        return
    if not report.created:
        console.print(f"[green]✓[/green] {report.home} is already initialised; nothing to do.")
        return
    for item in report.created:
        console.print(f"[green]✓[/green] created {item}")
    console.print(f"\nStart the core with [bold]skyport server[/bold] (home: {report.home}).")


@app.command()
def server(
    home: HomeOpt = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8443; 0 picks a free one)")] = None,
) -> None:
    """Run the core in the foreground until Ctrl-C.

    Example: [bold]skyport server --host 0.0.0.0 --port 8443[/bold]
    """
    from skyport.server.serve import ServerNotReady, serve

    settings = _settings(home, host=host, port=port)
    try:
        serve(settings)
    except ServerNotReady as exc:
        fail(str(exc))


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="User name (letters, digits, . _ -)")],
    admin: Annotated[bool, typer.Option("--admin", help="Give the admin role")] = False,
    swm_dir: Annotated[
        Path | None,
        typer.Option("--swm-dir", help="Also write the original clients' files here (e.g. ~/.swm)"),
    ] = None,
    home: HomeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Register a user and write their certificate bundle.

    Example: [bold]skyport user add alice --swm-dir /home/alice/.swm[/bold]
    """
    from skyport.server.admin import add_user
    from skyport.server.store.users import AlreadyExists

    if not name or not all(c.isalnum() or c in "._-" for c in name) or len(name) > 64:
        fail(f"{name!r} is not a valid user name", hint="use letters, digits, '.', '_' and '-' (at most 64)")
    settings = _settings(home)
    if not settings.ca_cert.exists():
        fail(f"{settings.home} has no certificate authority", hint="run `skyport init` first")
    try:
        bundle = asyncio.run(add_user(settings, name, admin=admin, swm_dir=swm_dir))
    except AlreadyExists as exc:
        fail(str(exc), hint="pick another name")
    if json_out:
        print_json(
            {
                "user": bundle.user.model_dump(),
                "cert": str(bundle.cert),
                "key": str(bundle.key),
                "ca": str(bundle.ca),
            }
        )
        return
    console.print(f"[green]✓[/green] user [bold]{name}[/bold] ({', '.join(bundle.user.roles)}) registered")
    console.print(f"  certificate bundle: {bundle.directory}")
    if swm_dir:
        console.print(f"  original clients' files: {swm_dir}")
    console.print(f"  use it with: SKYPORT_USER={name} skyport jobs")


@user_app.command("revoke")
def user_revoke(
    name: Annotated[str, typer.Argument(help="User whose certificates to revoke")],
    json_out: JsonOpt = False,
) -> None:
    """Revoke every certificate of a user, at once (through the running core; needs the admin role).

    Example: [bold]skyport user revoke alice[/bold]
    """
    with jobs.client() as c:
        count = jobs.call(lambda: c.revoke_user(name))
    if json_out:
        print_json({"user": name, "revoked": count})
    else:
        console.print(f"[green]✓[/green] revoked {count} certificate(s) of {name}")


@app.command("accounts")
def accounts_list(json_out: JsonOpt = False) -> None:
    """List accounts (yours; admins: all) with fair-share weight, recent usage, budget and members.

    Example: [bold]skyport accounts[/bold]
    """
    with jobs.client() as c:
        found = jobs.call(c.accounts)
    jobs.emit(found, json_out, render.accounts, "accounts")


@app.command("costs")
def costs(
    account: Annotated[str | None, typer.Option(help="Only this account")] = None,
    since: Annotated[
        datetime | None, typer.Option(help="Only jobs that ended since then, e.g. 2026-11-01 (UTC)")
    ] = None,
    limit: Annotated[int, typer.Option(help="Jobs to list, costliest first")] = 20,
    json_out: JsonOpt = False,
) -> None:
    """What elastic capacity has cost: per account (with budget left) and the costliest jobs.

    A job's cost is its flavor's price x node-hours from when its capacity was asked for (boot and
    staging included) until it ended.

    Example: [bold]skyport costs --account physics --since 2026-11-01[/bold]
    """
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    with jobs.client() as c:
        found = jobs.call(lambda: c.costs(account, since, limit))
    jobs.emit(found, json_out, render.costs)


@account_app.command("set")
def account_set(
    name: Annotated[str, typer.Argument(help="Account name")],
    share: Annotated[float | None, typer.Option(min=0.0001, help="Fair-share weight (default 1)")] = None,
    budget: Annotated[float | None, typer.Option(min=0, help="What it may spend (price x hours)")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Create an account, or change its share or budget.

    Example: [bold]skyport account set physics --share 3 --budget 500[/bold]
    """
    with jobs.client() as c:
        account = jobs.call(lambda: c.set_account(name, share=share, budget=budget))
    jobs.emit([account], json_out, render.accounts)


@account_app.command("add-user")
def account_add_user(
    name: Annotated[str, typer.Argument(help="Account name")],
    user: Annotated[str, typer.Argument(help="User to add")],
    json_out: JsonOpt = False,
) -> None:
    """Let a user charge jobs to an account (#SWM account NAME).

    Example: [bold]skyport account add-user physics alice[/bold]
    """
    with jobs.client() as c:
        account = jobs.call(lambda: c.add_member(name, user))
    jobs.emit([account], json_out, render.accounts)


jobs.register(app)
agent.register(app)
infra.register(app)
simulate.register(app)
tokens.register(app)
gate.register(app)
remotes.register(app)


def main() -> None:
    app()
