"""The port loop: core-side listeners for the ``in`` ports of running jobs on remote nodes.

The original clients reach a job at ``node_ips[0]:<port>`` (swm contract: the Jupyter spawner connects to
its single-user server that way). A node behind NAT has no address the submitting host can reach, so for
every running job with ``in`` ports on a remote gate the core listens on a loopback address of the job's
own, on the job's port numbers, splices each connection to the job's port through its gate, and reports
that address as ``node_ips[0]``. Level-triggered: listeners follow the store (and come back after a
restart); they close when the job stops running.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from skyport.gates.base import ExecutorGate, TunnelLink
from skyport.server.lifecycle.wakeup import run_passes
from skyport.server.store import jobs as job_store
from skyport.server.store.engine import Store
from skyport.server.tunnels import OpenPort, PortListeners

log = structlog.get_logger(__name__)


class PortLoop:
    def __init__(
        self,
        store: Store,
        gates: dict[str, ExecutorGate],
        listeners: PortListeners,
        *,
        remote_ids: Callable[[], list[str]],
        interval_s: float = 1.0,
    ) -> None:
        self._store = store
        self._gates = gates
        self._listeners = listeners
        self._remote_ids = remote_ids
        self._interval = interval_s

    async def run(self) -> None:
        await run_passes(self.pass_once, lambda: asyncio.sleep(self._interval), "ports")

    async def pass_once(self) -> None:
        rows = await self._store.read(job_store.running_with_ports, self._remote_ids())
        wanted = {r.id for r in rows}
        for job_id in self._listeners.jobs() - wanted:
            await self._listeners.close(job_id)
        for row in rows:
            ports = [p["port"] for p in row.spec["ports"] if p.get("direction") == "in"]
            if not ports or self._listeners.serving(row.id) or not row.handle:
                continue
            gate = self._gates.get(row.remote_id)
            if gate is None:
                continue
            try:
                address = await self._listeners.open(row.id, ports, _opener(gate, row.handle))
            except OSError as exc:
                log.warning("cannot listen for a job's ports", job_id=row.id, error=str(exc))
                continue
            await self._store.write(job_store.set_first_node_ip, row.id, address)
            log.info("listening for a job's ports", job_id=row.id, address=address, ports=ports)


def _opener(gate: ExecutorGate, handle: dict[str, object]) -> Callable[[int], OpenPort]:
    def for_port(port: int) -> OpenPort:
        async def open_it() -> TunnelLink:
            return await gate.open_port(handle, port)

        return open_it

    return for_port
