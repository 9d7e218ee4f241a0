"""Bulk transfers between an agent and the core: inputs downloaded, outputs uploaded, one thread each.

Each transfer is one blocking HTTPS request (``http.client`` over the node's mutual-TLS context) run in a
worker thread, moving the file through a few 1 MiB buffers: memory stays bounded whatever the size, and
every step (TLS in OpenSSL, SHA-256, the file's read or write) runs in C with the GIL released. The
agent's event loop, which keeps talking to the core meanwhile, sees one hand-off per file.

Why not the async HTTP client the agent uses elsewhere: streaming a body through it costs Python code per
TLS record (the TLS stream, the HTTP parser, a thread hop per write), which made the agent the busiest
process of a transfer (bench/remote_transfer.py, docs/performance.md).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import queue
import ssl
import threading
from pathlib import Path
from urllib.parse import urlsplit

from skyport.gates.base import GateError

#: Bytes moved per step.
CHUNK = 1024 * 1024
#: Buffers a download holds (CHUNK each): enough for the receiver to run ahead of the writer.
BUFFERS = 4


def _connection(url: str, context: ssl.SSLContext, timeout: float) -> tuple[http.client.HTTPSConnection, str]:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise GateError(f"not an https:// URL: {url}")
    connection = http.client.HTTPSConnection(
        parts.hostname, parts.port, context=context, timeout=timeout, blocksize=CHUNK
    )
    return connection, parts.path + (f"?{parts.query}" if parts.query else "")


def _refusal(what: str, response: http.client.HTTPResponse) -> GateError:
    text = response.read(16 * 1024).decode(errors="replace").strip()
    return GateError(f"{what}: the core answered {response.status}: {text}")


def download(url: str, context: ssl.SSLContext, target: Path, *, timeout: float) -> tuple[int, str]:
    """GET ``url`` into ``target`` (created 0600, truncated); returns (bytes, SHA-256 hex) of what arrived.

    Blocking: run it in a thread. A stall longer than ``timeout`` seconds is an error. Receiving (TLS)
    and hashing + writing overlap: this thread fills buffers, a second one hashes and writes them, in
    order, through a fixed pool of :data:`BUFFERS` buffers (so memory stays bounded).
    """
    connection, path = _connection(url, context, timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        if response.status != 200:
            raise _refusal(f"fetching {target.name}", response)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            return _receive(response, fd)
        finally:
            os.close(fd)
    except (OSError, http.client.HTTPException) as exc:
        raise GateError(f"fetching {target.name} from the core failed: {exc or type(exc).__name__}") from exc
    finally:
        connection.close()


def _receive(response: http.client.HTTPResponse, fd: int) -> tuple[int, str]:
    free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    full: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
    for _ in range(BUFFERS):
        free.put(bytearray(CHUNK))
    digest = hashlib.sha256()
    failed: list[OSError] = []

    def write() -> None:
        while (item := full.get()) is not None:
            buffer, n = item
            if not failed:
                try:
                    with memoryview(buffer) as whole:
                        chunk = whole[:n]
                        digest.update(chunk)
                        done = 0
                        while done < n:
                            done += os.write(fd, chunk[done:])
                except OSError as exc:
                    failed.append(exc)  # the receiver stops at its next buffer
            free.put(buffer)

    writer = threading.Thread(target=write, name="skyport-download-writer", daemon=True)
    writer.start()
    size = 0
    try:
        while not failed:
            buffer = free.get()
            n = response.readinto(buffer)
            if not n:
                free.put(buffer)
                break
            full.put((buffer, n))
            size += n
    finally:
        full.put(None)
        writer.join()
    if failed:
        raise failed[0]
    return size, digest.hexdigest()


def upload(
    url: str, context: ssl.SSLContext, source: Path, headers: dict[str, str], *, timeout: float
) -> None:
    """PUT the file ``source`` to ``url`` (with ``headers``); an answer other than 200 is an error."""
    connection, path = _connection(url, context, timeout)
    try:
        with open(source, "rb") as body:
            size = os.fstat(body.fileno()).st_size
            connection.request("PUT", path, body=body, headers={**headers, "Content-Length": str(size)})
            response = connection.getresponse()
            if response.status != 200:
                raise _refusal(f"returning {source.name}", response)
            response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise GateError(f"returning {source.name} to the core failed: {exc or type(exc).__name__}") from exc
    finally:
        connection.close()
