"""Several "hosts" on one machine for tests: Linux network namespaces joined by a bridge.

A :class:`HostNetwork` makes a bridge in the root namespace with a random /24 from 10.0.0.0/8 that no
interface or route of the machine uses, and each :meth:`HostNetwork.add_host` makes a namespace of its
own, joined to the bridge by a veth pair, with its own address on that subnet. The root namespace (where
the core runs) reaches every host at ``host.address``; the hosts reach the core at
``network.gateway`` (the bridge's address). Traffic stays between the test's namespaces and the bridge:
no route, NAT or forwarding is set up towards the outside.

Names are random (``sp`` + 6 hex digits + a suffix, within the kernel's 15 characters), so parallel
test runs never collide. :meth:`HostNetwork.close` removes everything it made, even after a failure
half-way, and kills whatever still runs inside its namespaces (by pid: ``ip netns pids``). Needs root.

Usage::

    with HostNetwork() as net:
        a = net.add_host("a")
        a.popen(["/usr/sbin/sshd", "-D", ...])
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

IP = "/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "ip"
#: Subnets are drawn from 10.0.0.0/8 (second octet 16-250, avoiding the commonest 10.0.x / 10.1.x).
_ATTEMPTS = 200


class NetworkError(RuntimeError):
    """A namespace, bridge or address could not be set up."""


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [IP, *(("-n", netns) if netns else ()), *args]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise NetworkError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the root namespace has an address or a route in."""
    used: list[ipaddress.IPv4Network] = []
    addrs: list[dict[str, Any]] = json.loads(_ip("-j", "-4", "addr", "show").stdout or "[]")
    for link in addrs:
        for info in link.get("addr_info", []):
            used.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False))
    routes: list[dict[str, Any]] = json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]")
    for route in routes:
        dst = route.get("dst", "")
        if dst in ("", "default"):
            continue
        with contextlib.suppress(ValueError):
            used.append(ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32", strict=False))
    return used


def free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that overlaps nothing the machine has an address or a route for."""
    used = _used_networks()
    for _ in range(_ATTEMPTS):
        candidate = ipaddress.IPv4Network(f"10.{16 + secrets.randbelow(235)}.{secrets.randbelow(256)}.0/24")
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise NetworkError("no unused 10.x.y.0/24 subnet found")


@dataclass
class Host:
    """One namespace: a "machine" with its own network stack, reachable at ``address``."""

    name: str
    netns: str
    address: str
    gateway: str
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return [IP, "netns", "exec", self.netns, *argv]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run a command inside the host and wait for it."""
        return subprocess.run(self.argv(argv), check=False, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a command inside the host; it is killed when the network is closed."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.argv(argv), **kwargs)
        self._procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Every process that lives in this host's namespace now."""
        done = subprocess.run([IP, "netns", "pids", self.netns], capture_output=True, text=True, check=False)
        return [int(p) for p in done.stdout.split() if p.isdigit()]


class HostNetwork:
    """A bridge and the namespaces ("hosts") attached to it; a context manager that removes them all."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.subnet = free_subnet()
        hosts = list(self.subnet.hosts())
        self.gateway = str(hosts[0])
        self._free = [str(a) for a in hosts[1:]]
        self.bridge = f"sp{self.tag}br"
        self.hosts: dict[str, Host] = {}
        self._links: list[str] = []  # root-namespace interfaces we made, removed at close
        self._netns: list[str] = []
        self._closed = False
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._links.append(self.bridge)
            _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> HostNetwork:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def add_host(self, name: str) -> Host:
        """A new namespace on the bridge with the next free address of the subnet."""
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists already")
        index = len(self._netns)
        netns = f"sp{self.tag}-{index}"
        outer, inner = f"sp{self.tag}h{index}", f"sp{self.tag}n{index}"
        address = self._free.pop(0)
        _ip("netns", "add", netns)
        self._netns.append(netns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        self._links.append(outer)
        _ip("link", "set", inner, "netns", netns)
        _ip("link", "set", outer, "master", self.bridge)
        _ip("link", "set", outer, "up")
        _ip("link", "set", "lo", "up", netns=netns)
        _ip("addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", inner, netns=netns)
        _ip("link", "set", inner, "up", netns=netns)
        host = Host(name=name, netns=netns, address=address, gateway=self.gateway)
        self.hosts[name] = host
        return host

    def close(self) -> None:
        """Kill what runs in our namespaces, then delete namespaces and links. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for host in self.hosts.values():
            for proc in host._procs:
                if proc.poll() is None:
                    proc.terminate()
        for host in self.hosts.values():
            for proc in host._procs:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        for netns in self._netns:
            self._kill_inside(netns)
        for netns in self._netns:
            _ip("netns", "del", netns, check=False)
        for link in reversed(self._links):
            _ip("link", "del", link, check=False)

    @staticmethod
    def _kill_inside(netns: str) -> None:
        """KILL every process still in ``netns`` (jobs a test left behind), by pid."""
        for _ in range(50):
            done = subprocess.run([IP, "netns", "pids", netns], capture_output=True, text=True, check=False)
            pids = [int(p) for p in done.stdout.split() if p.isdigit()]
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)  # poll until the kernel has reaped them (bounded)
