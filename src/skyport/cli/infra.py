"""Cluster commands of ``skyport`` (nodes, flavors, images, remotes): one call, one table."""

from __future__ import annotations

import typer

from skyport.cli import render
from skyport.cli.jobs import JsonOpt, query


def nodes(json_out: JsonOpt = False) -> None:
    """List the nodes jobs run on, with what is in use on each.

    Example: [bold]skyport nodes[/bold]
    """
    query(lambda c: c.nodes(), render.nodes, json_out, "nodes")


def flavors(json_out: JsonOpt = False) -> None:
    """List the node types the remotes can provide (cloud flavors), with prices.

    Example: [bold]skyport flavors --json[/bold]
    """
    query(lambda c: c.flavors(), render.flavors, json_out, "flavors")


def images(json_out: JsonOpt = False) -> None:
    """List the VM and container images the remotes offer.

    Example: [bold]skyport images[/bold]
    """
    query(lambda c: c.images(), render.images, json_out, "images")


def remotes(json_out: JsonOpt = False) -> None:
    """List the configured remotes (this machine, SSH hosts, clusters, clouds).

    Example: [bold]skyport remotes[/bold]
    """
    query(lambda c: c.remotes(), render.remotes, json_out, "remotes")


def register(app: typer.Typer) -> None:
    # ``remotes`` is a group of its own (cli/remotes.py: the list, and ``check``), which calls ours.
    for command in (nodes, flavors, images):
        app.command()(command)
