"""A real Sky Port core for tests: ``skyport server`` in a subprocess, over real mutual TLS.

Each :class:`CoreProcess` has its own home (CA, store, spool) in a temporary directory, listens on a port
the OS picks, and can be killed (``kill -9``) and started again on the same home to test recovery.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skyport.client import Client, ClientConfig
from skyport.pki import CertificateAuthority, server_names, write_private
from skyport.server.admin import add_user, init_home
from skyport.server.settings import Settings

STARTUP_TIMEOUT_S = 30.0
VENV_BIN = Path(sys.executable).parent


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def until(
    predicate: Callable[[], Any], timeout: float = 10.0, what: str = "a condition", interval: float = 0.05
) -> Any:
    """:func:`wait_for` for async tests: ``predicate`` may be sync or return an awaitable."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def make_workroot() -> Path:
    """A directory jobs run in. Not under pytest's tmp_path: that is 0700 and jobs run as 'nobody'."""
    path = Path(tempfile.mkdtemp(prefix="skyport-work-"))
    path.chmod(0o711)
    return path


def _add_server_address(settings: Settings, address: str) -> None:
    """Re-issue the core's server certificate so that it also names ``address`` (an IP address)."""
    names, ips = server_names()
    if address not in ips:
        ips.append(address)
    issued = CertificateAuthority.load(settings.ca_dir).issue_server(names, ips)
    settings.server_key.unlink(missing_ok=True)
    write_private(settings.server_key, issued.key_pem)
    settings.server_cert.write_bytes(issued.cert_pem)


@dataclass
class User:
    name: str
    config: ClientConfig
    #: Every client handed out, closed with the core (:meth:`CoreProcess.cleanup`).
    clients: weakref.WeakSet[Client] = field(default_factory=weakref.WeakSet, repr=False)

    def client(self) -> Client:
        client = Client(self.config)
        self.clients.add(client)
        return client

    def close_clients(self) -> None:
        for client in list(self.clients):
            client.close()


class CoreProcess:
    """``host``: the address to listen on instead of 127.0.0.1, e.g. a :class:`~tests.support.hosts.
    HostNetwork`'s ``gateway``, so that agents in host namespaces reach the core; the server certificate
    then names it too (clients in the root namespace use it as well: it is a local address)."""

    def __init__(self, home: Path, env: dict[str, str] | None = None, *, host: str | None = None) -> None:
        self.home = home
        self.workroot = make_workroot()
        self.env = {
            **os.environ,
            "SKYPORT_HOME": str(home),
            "SKYPORT_LOCAL__WORKROOT": str(self.workroot),
            "SKYPORT_LOCAL__DEFAULT_USER": "nobody",
            "SKYPORT_LOCAL__CANCEL_GRACE_S": "2",
            "SKYPORT_SCHEDULER_INTERVAL_S": "0.5",
            **({"SKYPORT_HOST": host} if host else {}),
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.port = 0
        self.log_path = home / "core.log"
        asyncio.run(init_home(Settings(home=home)))
        if host:
            _add_server_address(Settings(home=home), host)
        self.users: dict[str, User] = {"admin": self._user("admin")}

    def _user(self, name: str) -> User:
        bundle = self.home / "users" / name
        config = ClientConfig(url="", cert=bundle / "cert.pem", key=bundle / "key.pem", ca=bundle / "ca.pem")
        return User(name, config)

    def start(self, *, same_port: bool = False) -> None:
        """Start the core: on a port the OS picks, or (``same_port``, a restart) on the one it had, as a
        real core restarts: what was given its URL (agents, VMs) finds it again."""
        port = self.port if same_port and self.port else 0
        ready = self.home / "run" / "server.json"
        ready.unlink(missing_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed with it
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "skyport"), "server", "--port", str(port)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

        def _ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the core exited with {self.proc.returncode}:\n{self.log()}")
            return ready.exists()

        wait_for(_ready, STARTUP_TIMEOUT_S, "the core to listen")
        info = json.loads(ready.read_text())
        self.url, self.port = info["url"], int(info["port"])
        for user in self.users.values():
            user.config = ClientConfig(
                url=self.url, cert=user.config.cert, key=user.config.key, ca=user.config.ca
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def add_user(self, name: str, *, admin: bool = False, swm_dir: Path | None = None) -> User:
        asyncio.run(add_user(Settings(home=self.home), name, admin=admin, swm_dir=swm_dir))
        user = self._user(name)
        if self.url:
            user.config = ClientConfig(
                url=self.url, cert=user.config.cert, key=user.config.key, ca=user.config.ca
            )
        self.users[name] = user
        return user

    def client(self, name: str = "admin") -> Client:
        return self.users[name].client()

    def kill(self) -> None:
        """``kill -9``: no shutdown code of the core runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def cleanup(self) -> None:
        # A client's idle keep-alive connection would hold the core's graceful shutdown for its full
        # timeout (the TLS close is never answered by a client nobody reads from): close them first,
        # those dropped but not yet collected (httpx's connections are in reference cycles) as well.
        gc.collect()
        for user in self.users.values():
            user.close_clients()
        self.stop()
        shutil.rmtree(self.workroot, ignore_errors=True)
