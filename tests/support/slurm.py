"""A real Slurm 22.05 cluster for tests and benchmarks, on loopback, in a directory of its own.

:class:`SlurmCluster` starts ``munged`` (its own socket, key, pid, log and seed files), ``slurmctld`` and
two ``slurmd`` (nodes ``n1`` and ``n2``, both ``127.0.0.1``, each on a free port) from a ``slurm.conf``
written into that directory, with fast scheduler parameters (FIELD-NOTES: ~2 trivial jobs/s instead of
~0.7), and optionally ``slurmrestd`` (run as ``nobody``: it refuses root) with JWT authentication. The
client commands find the cluster through ``SLURM_CONF`` (:attr:`SlurmCluster.env`); nothing is written
outside the directory, so another Slurm on this machine (default ports 6817/6818) is left alone.

:meth:`SlurmCluster.stop` always ends every daemon it started (by pid), even after a failed start.
Slurm needs root here (``slurmd`` starts jobs as their users); :func:`missing` says why a test must skip.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
STARTUP_TIMEOUT_S = 30.0
#: The account slurmrestd runs as (it refuses root).
REST_USER = "nobody"


def missing(*, rest: bool = False) -> str | None:
    """Why a Slurm cluster cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (slurmd starts jobs as their users)"
    needed = BINARIES + (("slurmrestd",) if rest else ())
    absent = [b for b in needed if shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin") is None]
    if absent:
        return f"Slurm binaries missing ({', '.join(absent)}): run scripts/setup.sh"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _binary(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin")
    if found is None:
        raise RuntimeError(f"{name} is not installed")
    return found


class SlurmCluster:
    """``cpus``: CPUs declared per node (more than the machine has is allowed: trivial jobs share)."""

    NODES = ("n1", "n2")

    def __init__(self, directory: Path, *, cpus: int = 2, mem_mb: int = 2000, rest: bool = False) -> None:
        self.directory = directory
        self.cpus = cpus
        self.mem_mb = mem_mb
        self.rest = rest
        directory.mkdir(parents=True, exist_ok=True)
        # Jobs run as ordinary users and slurmrestd as nobody: they must reach the config and sockets.
        directory.chmod(0o755)
        self.conf = directory / "slurm.conf"
        self.munge_socket = directory / "munge" / "munge.socket"
        self.jwt_key = directory / "jwt.key"
        self.ctld_port = free_port()
        self.node_ports = {n: free_port() for n in self.NODES}
        self.rest_port = free_port() if rest else 0
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._pids: list[Path] = []

    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm's client commands (and for a core that runs them)."""
        return {"SLURM_CONF": str(self.conf)}

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    # -- life ----------------------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-f", str(self.conf)])
            for node in self.NODES:
                self._spawn(f"slurmd-{node}", [_binary("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
            self._wait_nodes_idle()
            if self.rest:
                self._start_rest()
        except BaseException:
            self.stop()
            raise

    def _start_munge(self) -> None:
        mdir = self.munge_socket.parent
        mdir.mkdir(mode=0o755, exist_ok=True)
        key = mdir / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        argv = [
            _binary("munged"),
            "--foreground",
            "--force",
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={mdir / 'munged.pid'}",
            f"--log-file={mdir / 'munged.log'}",
            f"--seed-file={mdir / 'munged.seed'}",
        ]
        self._spawn("munged", argv)
        self._wait(lambda: self.munge_socket.exists(), "munged's socket", "munged")

    def _write_conf(self) -> None:
        d = self.directory
        (d / "state").mkdir(exist_ok=True)
        self.jwt_key.write_bytes(secrets.token_bytes(32))
        self.jwt_key.chmod(0o600)
        nodes = "".join(
            f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} Port={p} "
            f"CPUs={self.cpus} RealMemory={self.mem_mb} State=UNKNOWN\n"
            for n, p in self.node_ports.items()
        )
        self.conf.write_text(
            "ClusterName=skyporttest\n"
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)\n"
            f"SlurmctldPort={self.ctld_port}\n"
            f"SlurmdPort={next(iter(self.node_ports.values()))}\n"
            "AuthType=auth/munge\n"
            "CredType=cred/munge\n"
            f"AuthInfo=socket={self.munge_socket}\n"
            "AuthAltTypes=auth/jwt\n"
            f"AuthAltParameters=jwt_key={self.jwt_key}\n"
            "SlurmUser=root\n"
            "SlurmdUser=root\n"
            f"StateSaveLocation={d / 'state'}\n"
            f"SlurmdSpoolDir={d / 'spool-%n'}\n"
            f"SlurmctldPidFile={d / 'slurmctld.pid'}\n"
            f"SlurmdPidFile={d / 'slurmd-%n.pid'}\n"
            f"SlurmctldLogFile={d / 'slurmctld.log'}\n"
            f"SlurmdLogFile={d / 'slurmd-%n.log'}\n"
            "SlurmctldDebug=info\n"
            "SlurmdDebug=info\n"
            "SlurmdParameters=config_overrides\n"
            "ProctrackType=proctrack/pgid\n"
            "TaskPlugin=task/none\n"
            "JobAcctGatherType=jobacct_gather/none\n"
            "AccountingStorageType=accounting_storage/none\n"
            "JobCompType=jobcomp/none\n"
            "MpiDefault=none\n"
            "SwitchType=switch/none\n"
            "SelectType=select/cons_tres\n"
            "SelectTypeParameters=CR_CPU\n"
            "SchedulerType=sched/backfill\n"
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=2\n"
            "MessageTimeout=20\n"
            "KillWait=2\n"
            "MinJobAge=600\n"
            "MaxJobCount=100000\n"
            "MaxArraySize=100001\n"
            "ReturnToService=2\n"
            "InactiveLimit=0\n"
            f"{nodes}"
            "PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP\n"
        )
        self.conf.chmod(0o644)

    def _start_rest(self) -> None:
        nobody = pwd.getpwnam(REST_USER)
        argv = [
            "setpriv",
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
            _binary("slurmrestd"),
            "-f",
            str(self.conf),
            "-a",
            "rest_auth/jwt",
            "-s",
            "openapi/v0.0.38",
            f"127.0.0.1:{self.rest_port}",
        ]
        self._spawn("slurmrestd", argv, env={"SLURM_JWT": "daemon"})

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.rest_port), timeout=1).close()
                return True
            except OSError:
                return False

        self._wait(listening, "slurmrestd to listen", "slurmrestd")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.directory / f"{name}.out", "ab")  # noqa: SIM115 - handed to the child
        try:
            self._procs[name] = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env, **(env or {})},
                start_new_session=True,
            )
        finally:
            log.close()

    def _wait(self, predicate: object, what: str, proc: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not predicate():  # type: ignore[operator]
            p = self._procs.get(proc)
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"{proc} exited with {p.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")
            time.sleep(0.1)

    def _wait_nodes_idle(self) -> None:
        def idle() -> bool:
            done = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            states = dict(line.split() for line in done.stdout.splitlines() if len(line.split()) == 2)
            return all(states.get(n, "").startswith("idle") for n in self.NODES)

        self._wait(idle, "both nodes to be idle", "slurmctld")

    def run(self, argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A Slurm client command against this cluster."""
        return subprocess.run(
            argv, capture_output=True, text=True, check=check, env={**os.environ, **self.env}, timeout=60
        )

    def token(self, user: str, lifespan_s: int = 3600) -> str:
        """A JWT for ``user`` (an ordinary account: slurmrestd rejects root's)."""
        out = self.run(["scontrol", "token", f"username={user}", f"lifespan={lifespan_s}"]).stdout
        return out.strip().partition("=")[2]

    def logs(self) -> str:
        parts = []
        for path in sorted(self.directory.glob("*.log")) + sorted(self.directory.glob("*.out")):
            parts.append(f"== {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """End every daemon started (by pid), then whatever jobs they left (their own sessions)."""
        for name in reversed(list(self._procs)):
            proc = self._procs[name]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self._procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self._procs.clear()
        self._kill_leftover_steps()

    def _kill_leftover_steps(self) -> None:
        """slurmstepd processes of this cluster that outlived their slurmd (found by our spool dir)."""
        marker = str(self.directory).encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"slurmstepd") and marker in environ:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry), signal.SIGKILL)
