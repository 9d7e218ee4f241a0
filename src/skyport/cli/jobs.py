"""Job commands of ``skyport`` (submit, jobs, show, logs, wait, cancel, requeue, events, download)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import typer

from skyport.cli.output import fail
from skyport.client import ApiError, Client, ClientConfig, ClientError, ConfigError

T = TypeVar("T")


@contextmanager
def client() -> Iterator[Client]:
    try:
        config = ClientConfig.load()
    except ConfigError as exc:
        fail(str(exc))
    with Client(config) as c:
        yield c


def call(fn: Callable[[], T]) -> T:
    """Run a client call; turn its errors into a message and a next step."""
    try:
        return fn()
    except ApiError as exc:
        fail(str(exc), code=2 if exc.status < 500 else 1)
    except ClientError as exc:
        fail(str(exc))


def register(app: typer.Typer) -> None:
    pass
