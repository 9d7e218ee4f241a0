"""Cluster commands of ``skyport`` (nodes, flavors, images, remotes)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
