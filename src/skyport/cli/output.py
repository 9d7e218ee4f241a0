"""Shared terminal output of the ``skyport`` command: errors with a next step, JSON for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

from rich.console import Console

err_console = Console(stderr=True)


def fail(message: str, *, hint: str | None = None, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/bold red] {message}")
    if hint:
        err_console.print(f"[dim]→ {hint}[/dim]")
    raise SystemExit(code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
