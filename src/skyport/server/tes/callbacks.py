"""The ``callback_url`` extension: a signed POST to the task's URL on each of its state changes.

A task names the URL in ``resources.backend_parameters.callback_url`` or in ``tags.callback_url``. For
each change of its TES state the core POSTs JSON::

    {"id": "<task id>", "state": "RUNNING", "time": "<RFC 3339>", "reason": "started",
     "message": "Running on node1", "event_id": 17}

with the headers ``X-Skyport-Timestamp`` (Unix seconds) and ``X-Skyport-Signature: sha256=<hex>``, the
HMAC-SHA256 of ``<timestamp>.<body>``. The key: for a task created with an API token, the SHA-256 (hex,
as ASCII) of that token, which its holder can compute and nobody else holds; otherwise the core's own
key, ``$SKYPORT_HOME/tes/callback.key`` (hex, as ASCII), which the administrator hands out. Receivers
should check the signature and that the timestamp is recent, and use ``event_id`` to drop duplicates:
delivery is at least once, in order per task, retried with doubling waits (:data:`ATTEMPTS` times)
while the receiver fails or answers other than 2xx.

The loop is level-triggered over the store (DESIGN §5): what was delivered is recorded per task, so a
restarted core goes on where it stopped.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
from collections import defaultdict
from pathlib import Path

import httpx
import structlog

from skyport.models import JobState
from skyport.server.clock import Clock
from skyport.server.lifecycle.wakeup import Wakeup, run_passes
from skyport.server.store.engine import Store
from skyport.server.tes import store as tes_store
from skyport.server.tes.models import TesState

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-Skyport-Signature"
TIMESTAMP_HEADER = "X-Skyport-Timestamp"
ATTEMPTS = 6
FIRST_RETRY_S = 1.0
TIMEOUT_S = 10.0
PARALLEL = 16
BATCH = 500


def core_key(home: Path) -> bytes:
    """The core's signing key, made on first use (0600; hex text, used as its ASCII bytes)."""
    path = home / "tes" / "callback.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(secrets.token_hex(32))
        tmp.chmod(0o600)
        tmp.replace(path)
    return path.read_text().strip().encode()


def sign(key: bytes, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def _state_of(pending: tes_store.PendingCallback) -> TesState:
    if pending.reason == "cancel_requested":
        return TesState.CANCELING
    return tes_store.tes_state(JobState(pending.to_state), pending.reason, pending.exit_code, False)


class CallbackLoop:
    def __init__(self, store: Store, clock: Clock, key: bytes, *, interval_s: float) -> None:
        self._store = store
        self._clock = clock
        self._key = key
        self._interval = interval_s
        self._wakeup = Wakeup()
        self._last: dict[str, TesState] = {}  # task -> the state last delivered (no repeats)
        self._retry: dict[str, tuple[int, float]] = {}  # task -> (failed attempts, not before)
        self._http: httpx.AsyncClient | None = None

    def ring(self) -> None:
        self._wakeup.ring()

    async def run(self) -> None:
        self._http = httpx.AsyncClient(timeout=TIMEOUT_S)
        try:
            await run_passes(self.pass_once, lambda: self._wakeup.wait(self._interval), "tes-callbacks")
        finally:
            await self._http.aclose()

    async def pass_once(self) -> None:
        pending = await self._store.read(tes_store.pending_callbacks, limit=BATCH)
        by_task: dict[str, list[tes_store.PendingCallback]] = defaultdict(list)
        for item in pending:
            by_task[item.job_id].append(item)
        now = self._clock.monotonic()
        ready = [items for job_id, items in by_task.items() if self._retry.get(job_id, (0, 0.0))[1] <= now]
        gate = asyncio.Semaphore(PARALLEL)

        async def deliver(items: list[tes_store.PendingCallback]) -> None:
            async with gate:
                await self._deliver_task(items)

        await asyncio.gather(*(deliver(items) for items in ready))

    async def _deliver_task(self, items: list[tes_store.PendingCallback]) -> None:
        """Deliver one task's events in order; stop at the first failure (retried later)."""
        for item in items:
            state = _state_of(item)
            done = JobState(item.to_state).terminal and item.reason != "cancel_requested"
            if self._last.get(item.job_id) != state and not await self._post(item, state):
                return
            await self._store.write(tes_store.callback_delivered, item.job_id, item.event_id, done)
            self._last[item.job_id] = state
            self._retry.pop(item.job_id, None)
            if done:
                self._last.pop(item.job_id, None)

    async def _post(self, item: tes_store.PendingCallback, state: TesState) -> bool:
        body = json.dumps(
            {
                "id": item.job_id,
                "state": state.value,
                "time": item.time.isoformat().replace("+00:00", "Z"),
                "reason": item.reason,
                "message": item.message,
                "event_id": item.event_id,
            }
        ).encode()
        timestamp = str(int(self._clock.now().timestamp()))
        key = item.token_hash.encode() if item.token_hash else self._key
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(key, timestamp, body),
        }
        assert self._http is not None
        try:
            response = await self._http.post(item.url, content=body, headers=headers)
            if response.is_success:
                return True
            problem = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        attempts = self._retry.get(item.job_id, (0, 0.0))[0] + 1
        if attempts >= ATTEMPTS:
            log.warning("callback given up", task=item.job_id, event=item.event_id, error=problem)
            self._retry.pop(item.job_id, None)
            return True  # skip this event; the next state change is tried afresh
        wait = FIRST_RETRY_S * 2 ** (attempts - 1)
        self._retry[item.job_id] = (attempts, self._clock.monotonic() + wait)
        log.info("callback failed; will retry", task=item.job_id, error=problem, retry_in_s=wait)
        return False
