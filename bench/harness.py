"""What the benchmarks share: a Sky Port core of their own in a temporary home, and output helpers."""

from __future__ import annotations

import asyncio
import atexit
import functools
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
#: kernel CPU depending on how much was deleted near it lately (see local_throughput's
#: ``wait_for_the_disk``), so a run that makes thousands of entries says what an entry cost.
BENCH_TMPDIR = os.environ.get("BENCH_TMPDIR") or tempfile.gettempdir()


@functools.cache
def bench_root() -> Path:
    """This process's directory for benchmark cores, inside :data:`BENCH_TMPDIR`, removed at exit.

    Marked as the top of a directory hierarchy for ext4 (``chattr +T``, as /home is), so that the
    directories made in it are spread over the disk's block groups instead of sharing the group of
    the temporary directory, where earlier runs deleted thousands of files: on ext4 without a journal
    a new inode then costs ~1 ms of CPU for minutes (the kernel skips recently deleted inodes one by
    one), and the bench would measure its predecessor's clean-up. Elsewhere the flag is not set, and
    nothing changes.
    """
    root = Path(tempfile.mkdtemp(prefix="skyport-bench-", dir=BENCH_TMPDIR))
    root.chmod(0o711)
    if chattr := shutil.which("chattr"):
        subprocess.run([chattr, "+T", str(root)], capture_output=True, check=False)
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


class BenchCore:
    """``skyport server`` on port 0 with its own home; stopped and removed by :meth:`close`."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="home-", dir=bench_root()))
        self.workroot = Path(tempfile.mkdtemp(prefix="work-", dir=bench_root()))
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

    def close(self, *, remove: bool = True) -> None:
        """Stop the core; ``remove=False`` keeps its files until :meth:`remove` (see local_throughput)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if remove:
            self.remove()

    def remove(self) -> None:
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
