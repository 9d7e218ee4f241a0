"""Shared terminal output of the ``skyport`` command: errors with a next step, JSON for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape

# soft_wrap: messages are not broken at the terminal width (and not at 80 columns when piped).
err_console = Console(stderr=True, soft_wrap=True)


def fail(message: str, *, hint: str | None = None, code: int = 1) -> NoReturn:
    """Print an error (and what to do next) and exit. The texts are shown as they are, never as markup."""
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}")
    if hint:
        err_console.print(f"[dim]→ {escape(hint)}[/dim]")
    raise SystemExit(code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
