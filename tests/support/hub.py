"""A real JupyterHub for tests: ``jupyterhub`` in a subprocess with its own configurable-http-proxy.

Everything listens on loopback ports the OS picks; the hub's database, cookie secret and logs live in the
test's directory. The proxy is the npm package installed by scripts/setup.sh (``node_modules/.bin``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.support.core import wait_for

ROOT = Path(__file__).resolve().parents[2]
PROXY = ROOT / "node_modules" / ".bin" / "configurable-http-proxy"
#: The single-user servers' environment: a venv on Debian's Python, so job accounts (``nobody``) can
#: run it (scripts/setup.sh).
SINGLEUSER = ROOT / ".venv-singleuser" / "bin" / "jupyterhub-singleuser"
CHROMIUM = Path("/usr/bin/chromium")
STARTUP_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing_tools() -> list[str]:
    """What scripts/setup.sh installs that a hub test needs and is not here."""
    wanted = {
        "configurable-http-proxy (npm)": PROXY,
        "the single-user venv": SINGLEUSER,
        "chromium": CHROMIUM,
    }
    return [name for name, path in wanted.items() if not path.exists()]


class HubProcess:
    """``jupyterhub`` with ``config`` (Python lines appended to a base config) in ``directory``.

    ``python``: the interpreter whose ``jupyterhub`` runs (another venv for the original spawner).
    """

    def __init__(self, directory: Path, config: str, *, python: Path | None = None) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.hub_port = free_port()
        self.api_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.python = python or Path(sys.executable)
        self.log_path = directory / "hub.log"
        self.config_path = directory / "jupyterhub_config.py"
        self.config_path.write_text(
            "c = get_config()  # noqa: F821\n"
            f"c.JupyterHub.ip = '127.0.0.1'\nc.JupyterHub.port = {self.port}\n"
            f"c.JupyterHub.hub_ip = '127.0.0.1'\nc.JupyterHub.hub_port = {self.hub_port}\n"
            f"c.ConfigurableHTTPProxy.api_url = 'http://127.0.0.1:{self.api_port}'\n"
            f"c.ConfigurableHTTPProxy.command = [{str(PROXY)!r}]\n"
            f"c.JupyterHub.db_url = 'sqlite:///{directory / 'hub.sqlite'}'\n"
            f"c.JupyterHub.cookie_secret_file = {str(directory / 'cookie_secret')!r}\n"
            f"c.JupyterHub.pid_file = {str(directory / 'hub.pid')!r}\n"
            "c.JupyterHub.cleanup_servers = False\n" + config
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed with it
        env = {**os.environ, "PATH": f"{PROXY.parent}:{self.python.parent}:{os.environ.get('PATH', '')}"}
        self.proc = subprocess.Popen(
            [str(self.python), "-m", "jupyterhub", "-f", str(self.config_path)],
            cwd=self.directory,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the proxy is its child: stopped with it
        )
        log.close()

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the hub exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                return httpx.get(f"{self.url}/hub/api", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, STARTUP_TIMEOUT_S, "the hub to answer", interval=0.25)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM to the hub and its proxy (their own process group), KILL if they linger."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        """Stop and start again on the same ports and database (running servers are left running)."""
        self.stop()
        self.start()
