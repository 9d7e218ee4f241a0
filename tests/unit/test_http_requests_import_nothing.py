"""An HTTP request of our clients (the CLI, the agents, the load generators) searches for no module.

httpcore asks which async library runs (``sniffio``) several times per request; if that package is not
installed, each ask is an import that fails after searching ``sys.path``, ~0.2 ms of CPU per request in
all. A failed import is not cached, so any such lazy import in the request path costs on every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType

import httpx


class _Recorder(MetaPathFinder):
    def __init__(self) -> None:
        self.searched: list[str] = []

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        self.searched.append(fullname)
        return None  # the next finders do the real work


def test_requests_over_a_kept_alive_connection_search_for_no_module() -> None:

    async def run() -> list[str]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while await reader.readuntil(b"\r\n\r\n"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        async with server, httpx.AsyncClient() as client:
            await client.get(url)  # the first request may load what it needs, once
            recorder = _Recorder()
            sys.meta_path.insert(0, recorder)
            try:
                for _ in range(5):
                    assert (await client.get(url)).status_code == 200
            finally:
                sys.meta_path.remove(recorder)
            return recorder.searched

    assert asyncio.run(run()) == []
