"""``skyport token create|list|revoke``: API tokens for TES clients, scripts and the web page.

The secret is printed once, on stdout alone (``TOKEN=$(skyport token create --name ci)`` captures just
it); everything else goes to stderr. The core keeps only a hash of it.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from skyport.cli import jobs
from skyport.cli.output import err_console, print_json

token_app = typer.Typer(
    help="API tokens (bearer or basic auth) for TES clients and scripts.", no_args_is_help=True
)
console = Console()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's JSON")]


@token_app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", help="What it is for (shown in `skyport token list`)")] = "",
    days: Annotated[
        float, typer.Option("--days", min=0, help="Days until it expires (0: never; default 30)")
    ] = 30,
    tes_only: Annotated[
        bool, typer.Option("--tes-only", help="Valid only for the GA4GH TES API (/ga4gh/tes/v1)")
    ] = False,
    user: Annotated[str | None, typer.Option("--user", help="For another user (administrators)")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a token; its secret is printed once. Use it as a bearer token, or as the password with
    your user name (basic auth).

    Example: [bold]skyport token create --name snakemake --days 7[/bold]
    """
    scopes = ["tes"] if tes_only else ["api"]
    with jobs.client() as c:
        token = jobs.call(lambda: c.create_token(name, scopes=scopes, expires_days=days, user=user))
    if json_out:
        print_json(token)
        return
    expires = token["expires_at"] or "never"
    err_console.print(
        f"[green]✓[/green] token {token['id']} for {token['user']} ({', '.join(token['scopes'])}), "
        f"expires {expires}; it is shown only now:"
    )
    print(token["secret"])


def _table(found: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    table.add_column("ID", no_wrap=True, min_width=36)  # in full: `skyport token revoke` needs it
    for column in ("USER", "NAME", "SCOPES", "CREATED", "EXPIRES", "LAST USED", "STATE"):
        table.add_column(column)
    for t in found:
        state = "revoked" if t["revoked_at"] else "active"
        table.add_row(
            t["id"],
            t["user"],
            t["name"],
            ",".join(t["scopes"]),
            (t["created_at"] or "")[:19],
            (t["expires_at"] or "never")[:19],
            (t["used_at"] or "-")[:19],
            state,
        )
    return table


@token_app.command("list")
def list_tokens(
    all_users: Annotated[bool, typer.Option("--all", help="Everyone's (administrators)")] = False,
    json_out: JsonOpt = False,
) -> None:
    """List your tokens (never their secrets).

    Example: [bold]skyport token list[/bold]
    """
    with jobs.client() as c:
        found = jobs.call(lambda: c.tokens(all_users=all_users))
    if json_out:
        print_json(found)
    elif not found:
        err_console.print("no tokens")
    else:
        console.print(_table(found))


@token_app.command("revoke")
def revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="Token id (from `skyport token list`)")],
    json_out: JsonOpt = False,
) -> None:
    """Revoke a token: refused from now on.

    Example: [bold]skyport token revoke 0b6c...[/bold]
    """
    with jobs.client() as c:
        token = jobs.call(lambda: c.revoke_token(token_id))
    if json_out:
        print_json(token)
    else:
        err_console.print(f"[green]✓[/green] revoked token {token['id']} of {token['user']}")


def register(app: typer.Typer) -> None:
    app.add_typer(token_app, name="token")
