"""Port forwarding from the user's side: a local listener whose connections reach a job's port.

Each accepted connection opens its own WebSocket to the core (mutual TLS, as the user), which the core
splices to the job's port through the job's gate (an agent's tunnel, or a local connection).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from skyport.client.api import ssl_context
from skyport.client.config import ClientConfig

CHUNK = 256 * 1024
#: The core's first frame on a tunnel that opened (a refusal is a close with a reason instead).
READY = "ready"


def port_url(config: ClientConfig, job_id: str, port: int) -> str:
    return "wss://" + config.url.split("://", 1)[1] + f"/api/v1/jobs/{job_id}/ports/{port}"


async def open_port(config: ClientConfig, job_id: str, port: int) -> ClientConnection:
    """A WebSocket carrying the bytes of one connection to the job's ``port``.

    Raises ``ConnectionError`` with the core's reason when it refuses (not the owner, port not declared,
    job not running).
    """
    try:
        ws = await connect(
            port_url(config, job_id, port),
            ssl=ssl_context(config),
            max_size=None,
            open_timeout=15,
            compression=None,
        )
    except InvalidStatus as exc:
        raise ConnectionError(f"the core refused the tunnel: HTTP {exc.response.status_code}") from exc
    try:
        first = await ws.recv()
    except ConnectionClosed as exc:
        reason = exc.rcvd.reason if exc.rcvd else "the connection closed"
        code = exc.rcvd.code - 4000 if exc.rcvd and exc.rcvd.code >= 4000 else None
        raise ConnectionError(f"{reason} (HTTP {code})" if code else reason) from None
    if first != READY:
        await ws.close()
        raise ConnectionError("the core answered the tunnel request with something unexpected")
    return ws


async def _pump(ws: ClientConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    async def up() -> None:
        while data := await reader.read(CHUNK):
            await ws.send(data)

    async def down() -> None:
        async for message in ws:
            writer.write(message if isinstance(message, bytes) else message.encode())
            await writer.drain()

    tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()
        with contextlib.suppress(Exception):
            await ws.close()


async def forward(
    config: ClientConfig,
    job_id: str,
    port: int,
    local_port: int = 0,
    host: str = "127.0.0.1",
    on_error: Callable[[str], None] = lambda _: None,
) -> asyncio.Server:
    """Listen on ``host:local_port`` (0: any free port) and forward every connection to the job's port.

    A connection the core refuses is closed at once and ``on_error`` gets the reason.
    """

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ws = await open_port(config, job_id, port)
        except (OSError, ConnectionClosed) as exc:  # ConnectionError is an OSError
            writer.close()
            on_error(str(exc))
            return
        await _pump(ws, reader, writer)

    return await asyncio.start_server(accept, host, local_port)
