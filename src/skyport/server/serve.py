"""Run the core: the app on uvicorn over mutual TLS, in the foreground.

When it is listening, the core writes ``$SKYPORT_HOME/run/server.json`` (its URL and pid), so tools and
tests can start it on port 0 and find where it is.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from skyport.agent.collector import GC_THRESHOLDS
from skyport.agent.memory import keep_freed_memory
from skyport.server.app import create_app
from skyport.server.core import Core
from skyport.server.logs import configure_logging
from skyport.server.settings import Settings
from skyport.server.tls import make_uvicorn_config


class ServerNotReady(Exception):
    pass


def ready_file(settings: Settings) -> Path:
    return settings.home / "run" / "server.json"


def listening_url(host: str, port: int) -> str:
    """The URL other machines (agents started over SSH) reach a core listening on ``host:port`` at."""
    if host in {"0.0.0.0", "::", ""}:
        host = socket.getfqdn()
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


class _Server(uvicorn.Server):
    def __init__(
        self, config: uvicorn.Config, settings: Settings, on_listening: Callable[[str], None]
    ) -> None:
        super().__init__(config)
        self._settings = settings
        self._on_listening = on_listening

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit:
            return
        # What start-up made (the app, its routes and models, the tables, the imported modules) lives
        # as long as the process: out of the collector's way (see skyport.agent.collector).
        gc.freeze()
        port = self._settings.port
        for server in self.servers:
            for sock in server.sockets:
                port = sock.getsockname()[1]
        host = self._settings.host
        self._on_listening(listening_url(host, port))  # the bound port is known only now
        url_host = "localhost" if host in {"0.0.0.0", "127.0.0.1", "::", "localhost"} else host
        path = ready_file(self._settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": f"https://{url_host}:{port}", "port": port, "pid": os.getpid()}))
        tmp.replace(path)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        ready_file(self._settings).unlink(missing_ok=True)
        await super().shutdown(sockets)


def check_ready_to_serve(settings: Settings) -> None:
    for what, path in (
        ("server certificate", settings.server_cert),
        ("server key", settings.server_key),
        ("CA certificate", settings.ca_cert),
    ):
        if not path.exists():
            raise ServerNotReady(f"no {what} at {path}: run `skyport init` first")


#: How often the interpreter offers the GIL to another thread (Python's default is 5 ms). Threads that hand
#: work back to the event loop (the WAL checkpointer, staging's file I/O) can wait that long for each
#: hand-off while the loop is busy with requests. Measured when the store still ran every transaction in a
#: thread: ~370 -> ~530 submissions/s at 1 ms (docs/performance.md).
GIL_SWITCH_INTERVAL_S = 0.001
#: Seconds an idle client connection is kept open by the core.
KEEP_ALIVE_S = 30


def serve(settings: Settings, **uvicorn_options: Any) -> None:
    check_ready_to_serve(settings)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    gc.set_threshold(*GC_THRESHOLDS)
    keep_freed_memory()  # staging and tunnels: freed buffers stay in the process (skyport.agent.memory)
    configure_logging(settings.log_level, json=settings.log_json)
    app = create_app(settings)
    config = make_uvicorn_config(
        app,
        host=settings.host,
        port=settings.port,
        cert_file=settings.server_cert,
        key_file=settings.server_key,
        ca_file=settings.ca_cert,
        require_client_cert=False,  # the app answers a missing certificate with a clear 401
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
        # Longer than clients keep idle connections (httpx: 5 s), so that a client never sends on a
        # connection the server is closing at that moment ("disconnected without sending a response").
        timeout_keep_alive=KEEP_ALIVE_S,
        **uvicorn_options,
    )
    core: Core = app.state.core

    def on_listening(url: str) -> None:
        core.listening_url = url

    _Server(config, settings, on_listening).run()
