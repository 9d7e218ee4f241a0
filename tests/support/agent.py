"""A real node agent for tests: ``skyport agent`` in a subprocess, optionally inside a host namespace.

It enrols with a bootstrap token from the core (as an admin asks for one), keeps its own state directory,
and can be killed and started again (the same enrolment) to test reconnects and restarts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from tests.support.core import VENV_BIN, CoreProcess, make_workroot


class AgentProcess:
    def __init__(
        self,
        core: CoreProcess,
        remote: str,
        node: str,
        state_dir: Path,
        *,
        url: str | None = None,
        netns: str | None = None,
        cpus: int = 2,
        heartbeat_s: float = 0.5,
    ) -> None:
        self.core = core
        self.remote = remote
        self.node = node
        self.state_dir = state_dir
        self.url = url
        self.netns = netns
        self.cpus = cpus
        self.heartbeat_s = heartbeat_s
        self.workroot = make_workroot()
        self.log_path = state_dir.parent / f"agent-{node}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, token: str | None = None) -> None:
        """Start the agent; the first start enrols it with a fresh token (or the one given)."""
        env = {**os.environ}
        if not (self.state_dir / "node.json").exists():
            env["SKYPORT_AGENT_TOKEN"] = (
                token or self.core.client().bootstrap_token(self.remote, self.node)["token"]
            )
        argv = [
            str(VENV_BIN / "skyport"),
            "agent",
            "--url",
            self.url or self.core.url,
            "--ca",
            str(self.core.home / "ca" / "ca.pem"),
            "--state-dir",
            str(self.state_dir),
            "--workroot",
            str(self.workroot),
            "--default-user",
            "nobody",
            "--cpus",
            str(self.cpus),
            "--heartbeat",
            str(self.heartbeat_s),
        ]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed with it
        self.proc = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """``kill -9`` the agent (its jobs, in their own sessions, keep running)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workroot, ignore_errors=True)
