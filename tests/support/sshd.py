"""A real OpenSSH server for tests, optionally inside a :class:`~tests.support.hosts.Host` namespace.

:class:`SSHServer` runs ``/usr/sbin/sshd -D -e -f CONFIG`` with everything of its own in one directory:
host key, config, pid file, log and ``authorized_keys`` (key authentication only, no PAM, an ``sftp``
subsystem). Inside a host namespace it listens on port 22 of the host's address, like a real machine;
without one, on a free port of 127.0.0.1. :class:`ClientKey` is the core's login key and
:func:`write_known_hosts` the file the core verifies host keys against.

The server needs root (privilege separation), like every sshd. Debian's package creates
``/run/sshd`` at boot through its service unit; on a machine where no system sshd runs the directory may
be missing, so :meth:`SSHServer.start` creates it (an empty root-owned directory, as sshd expects).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.hosts import Host

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
PRIVSEP_DIR = Path("/run/sshd")
STARTUP_TIMEOUT_S = 15.0


def _keygen(path: Path, comment: str) -> str:
    """A new ed25519 key pair at ``path``/``path.pub``; returns the public key line."""
    for stale in (path, path.with_name(path.name + ".pub")):
        stale.unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path.with_name(path.name + ".pub").read_text().strip()


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class ClientKey:
    """The core's SSH login key: the private key file and its public line for ``authorized_keys``."""

    path: Path
    public: str

    @classmethod
    def create(cls, directory: Path, name: str = "skyport-core") -> ClientKey:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / name
        return cls(path, _keygen(path, name))


class SSHServer:
    """One sshd with its own host key, accepting ``authorized`` keys for any login."""

    def __init__(self, directory: Path, authorized: list[ClientKey], host: Host | None = None) -> None:
        self.directory = directory
        self.host = host
        self.address = host.address if host else "127.0.0.1"
        self.port = 22 if host else free_port()
        self.directory.mkdir(parents=True, exist_ok=True)
        # sshd reads authorized_keys as the login user: let any account traverse and read it.
        self.directory.chmod(0o711)
        self.host_key = directory / "ssh_host_ed25519_key"
        self.host_public = _keygen(self.host_key, f"host-{self.address}")
        self.config = directory / "sshd_config"
        self.log_path = directory / "sshd.log"
        self.authorized_keys = directory / "authorized_keys"
        self.authorized_keys.write_text("".join(k.public + "\n" for k in authorized))
        self.authorized_keys.chmod(0o644)
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> None:
        self.config.write_text(
            f"ListenAddress {self.address}\n"
            f"Port {self.port}\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.directory / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            "UsePAM no\n"
            # the test's directories live under /tmp (world-writable), which StrictModes refuses
            "StrictModes no\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "MaxSessions 100\n"
            "MaxStartups 100:30:200\n"
            "LogLevel VERBOSE\n"
            f"Subsystem sftp {SFTP_SERVER}\n"
        )

    @property
    def known_hosts_line(self) -> str:
        """This server's entry for a ``known_hosts`` file."""
        name = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        return f"{name} {self.host_public}"

    def start(self) -> None:
        if not PRIVSEP_DIR.is_dir():
            PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        self._write_config()
        argv = [SSHD, "-D", "-e", "-f", str(self.config)]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed with it
        try:
            if self.host is not None:
                self.proc = self.host.popen(argv, stdout=log, stderr=subprocess.STDOUT)
            else:
                self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        self._wait_listening()

    def _wait_listening(self) -> None:
        """Poll until the server sends its SSH banner (from the root namespace, as the core will)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection((self.address, self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not listen on {self.address}:{self.port}:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def sessions(self) -> list[int]:
        """Pids of this server's per-connection processes (its descendants named ``sshd: ...``)."""
        if self.proc is None:
            return []
        parents: dict[int, int] = {}
        names: dict[int, bytes] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
                names[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            parents[int(entry)] = int(stat[stat.rindex(b")") + 2 :].split()[1])

        def descends(pid: int) -> bool:
            for _ in range(64):
                pid = parents.get(pid, 0)
                if pid == self.proc.pid:  # type: ignore[union-attr]
                    return True
                if pid <= 1:
                    return False
            return False

        return [pid for pid, name in names.items() if name.startswith(b"sshd:") and descends(pid)]

    def stop(self, *, drop_sessions: bool = True) -> None:
        """Stop listening and, unless told otherwise, cut every open connection (jobs keep running)."""
        sessions = self.sessions() if drop_sessions else []
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        for pid in sessions:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)

    def rekey(self) -> None:
        """Restart with a brand new host key (what a reinstalled host, or an impostor, looks like)."""
        self.stop()
        self.host_public = _keygen(self.host_key, f"host-{self.address}-new")
        self.start()


def write_known_hosts(path: Path, servers: list[SSHServer]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(s.known_hosts_line + "\n" for s in servers))
    return path
