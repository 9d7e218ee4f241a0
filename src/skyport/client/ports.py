"""Port forwarding from the user's side: a local listener whose connections reach a job's port.

Each accepted connection opens its own WebSocket to the core (mutual TLS, as the user), which the core
splices to the job's port through the job's gate (an agent's tunnel, or a local connection).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from typing import cast

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from skyport.client.api import ssl_context
from skyport.client.config import ClientConfig

#: Largest WebSocket message of a tunnel, and the bytes a local connection buffers before reading
#: pauses: the size that cost the hops the least CPU per byte (bench/remote_transfer.py).
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
            write_limit=CHUNK,
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


class LocalConnection(asyncio.Protocol):
    """A local TCP connection as one end of a tunnel, without a stream buffer in between.

    What the socket delivers is handed to :meth:`read` as the very ``bytes`` object that arrived (a
    ``StreamReader`` would copy it into its buffer and out again, and move the rest down: a third of
    the copying a tunnel hop did), and reading pauses while :data:`CHUNK` bytes wait to be sent on.
    """

    def __init__(self) -> None:
        self._arrived: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._ended = False
        self._paused = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream transport (uvloop's is no subclass)

    def data_received(self, data: bytes) -> None:
        self._arrived.append(data)
        self._queued += len(data)
        self._readable.set()
        if self._queued >= CHUNK and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._ended = True
        self._readable.set()
        return False  # close: a tunnel ends when either side does

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = True
        self._readable.set()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def read(self) -> bytes | None:
        """The next bytes that arrived (joined up to :data:`CHUNK`), or None once the peer closed."""
        while not self._arrived:
            if self._ended:
                return None
            self._readable.clear()
            await self._readable.wait()
        data = self._arrived.popleft()
        if self._arrived and len(data) < CHUNK:  # many small pieces: one message, not many
            pieces = [data]
            size = len(data)
            while self._arrived and size + len(self._arrived[0]) <= CHUNK:
                piece = self._arrived.popleft()
                pieces.append(piece)
                size += len(piece)
            data = b"".join(pieces)
        self._queued -= len(data)
        if self._paused and self._queued < CHUNK // 4 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the local connection closed")
        self.transport.write(data)
        await self._writable.wait()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def splice_websocket(ws: ClientConnection, local: LocalConnection) -> None:
    """Copy bytes between a tunnel's WebSocket and a local TCP connection until either side closes.

    Messages are at most :data:`CHUNK` bytes: every message costs every hop (client, core, agent) some
    fixed work, and bigger ones than what the receivers' TLS layers hand over at once make each
    receiver's frame buffer grow and copy (measured with bench/remote_transfer.py).
    """

    async def up() -> None:
        while (data := await local.read()) is not None:
            await ws.send(data)

    async def down() -> None:
        async for message in ws:
            await local.write(message if isinstance(message, bytes) else message.encode())

    tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        local.close()
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
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def serve(local: LocalConnection) -> None:
        try:
            ws = await open_port(config, job_id, port)
        except (OSError, ConnectionClosed) as exc:  # ConnectionError is an OSError
            local.close()
            on_error(str(exc))
            return
        await splice_websocket(ws, local)

    def accept() -> LocalConnection:
        local = LocalConnection()
        task = loop.create_task(serve(local))  # what arrives meanwhile waits (reading pauses if much)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return local

    return await loop.create_server(accept, host, local_port)
