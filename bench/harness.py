"""What the benchmarks share: a Sky Port core of their own in a temporary home, and output helpers."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from skyport.server.admin import init_home
from skyport.server.settings import Settings

VENV_BIN = Path(sys.executable).parent
#: Where benchmark cores keep their home and job directories (default: the system's temporary
#: directory). On the development machine a new file or directory costs from ~15 us to over 1 ms of
#: kernel CPU depending on the directory and on how much was deleted near it lately, so a run that
#: makes thousands of entries says where it ran.
BENCH_TMPDIR = os.environ.get("BENCH_TMPDIR") or tempfile.gettempdir()


class BenchCore:
    """``skyport server`` on port 0 with its own home; stopped and removed by :meth:`close`."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="skyport-bench-", dir=BENCH_TMPDIR))
        self.workroot = Path(tempfile.mkdtemp(prefix="skyport-bench-work-", dir=BENCH_TMPDIR))
        self.workroot.chmod(0o711)
        asyncio.run(init_home(Settings(home=self.home)))
        full_env = {
            **os.environ,
            "SKYPORT_HOME": str(self.home),
            "SKYPORT_LOCAL__WORKROOT": str(self.workroot),
            "SKYPORT_LOCAL__DEFAULT_USER": "nobody",
            "SKYPORT_LOG_LEVEL": "warning",
            **(env or {}),
        }
        ready = self.home / "run" / "server.json"
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "skyport"), "server", "--port", "0"],
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.home / "core.log", "wb"),  # noqa: SIM115 - closed with the process
        )
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the core did not start:\n{(self.home / 'core.log').read_text()}")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        self.url, self.port = info["url"], info["port"]
        bundle = self.home / "users" / "admin"
        self.cert, self.key, self.ca = bundle / "cert.pem", bundle / "key.pem", bundle / "ca.pem"

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        return context

    def env(self) -> dict[str, str]:
        return {**os.environ, "SKYPORT_HOME": str(self.home), "SKYPORT_URL": self.url}

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.rmtree(self.workroot, ignore_errors=True)


def print_table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def print_result(figures: dict[str, Any]) -> None:
    """The last line of every benchmark: one JSON object with its figures."""
    print(json.dumps(figures, sort_keys=True))
