"""What the public-cloud provisioners (aws, openstack, azure) share: SDK calls off the event loop with a
deadline, cached catalogs and prices refreshed in the background, error classes with a reason, the
preemption signal, and the credential check report (``skyport remotes check``).

The providers' SDKs (boto3, openstacksdk, the Azure SDK) are blocking: every call runs in a thread pool
of the gate's own (``threads`` workers; the event loop's default pool is small and shared), under the
remote's ``call_timeout_s``. A call that overruns becomes a transient :class:`CloudError`; the thread
finishes on its own (each SDK is configured with socket timeouts of its own).

Prices and catalogs: :class:`Cached` keeps the last value (prices also in a JSON file in the core's home,
so a restart does not ask again), returns it at once, and starts one background refresh when it is
older than its maximum age. Only a cold start with nothing cached waits for the provider — and that
happens in the provisioning loop's catalog refresh at start-up, never on an API request's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

import structlog
from pydantic import BaseModel, Field

from skyport.gates.provisioner import TAG_PREEMPTIBLE, PartitionStatus, ProvisionerError
from skyport.server.settings import ProviderRemoteSettings

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Our tag with the node's name, on every VM.
TAG_NODE = "skyport-node"
#: Our tag with a partition's node count (what creating it should end with).
TAG_NODES = "skyport-nodes"
#: How long a catalog load waits for prices nobody has fetched yet (then the price table serves, and the
#: catalog is rebuilt when the prices arrive).
PRICE_WAIT_S = 15.0
#: :attr:`CloudPartitionStatus.reason` of a partition whose spot capacity the provider took back.
PREEMPTED = "preempted"

ErrorReason = Literal["quota", "capacity", "throttled", "auth", "invalid", "not_found", "provider"]


class CloudError(ProvisionerError):
    """A provider error with what kind it is (``reason``), for the job's events and for retries.

    ``quota``: the account's limit (not transient: it does not free itself); ``capacity``: the region has
    no machines of the kind now (transient: worth retrying, then the job fails); ``throttled``: slow down
    (transient); ``auth``: credentials or permissions; ``invalid``: our request (bad flavor, image...).
    """

    def __init__(
        self, message: str, *, reason: ErrorReason = "provider", transient: bool | None = None
    ) -> None:
        super().__init__(
            message, transient=reason in ("capacity", "throttled") if transient is None else transient
        )
        self.reason: ErrorReason = reason


@dataclass(frozen=True)
class CloudPartitionStatus(PartitionStatus):
    """A status whose ``reason`` is ``preempted`` when the provider took the spot capacity back (state
    ``failed``): the job is to be requeued, not failed (the field lives in :class:`PartitionStatus`)."""


class CheckItem(BaseModel):
    """One verified capability of a remote's credentials (``required=False``: optional features)."""

    name: str
    ok: bool
    detail: str = ""
    required: bool = True


class RemoteCheck(BaseModel):
    """What ``skyport remotes check`` reports: who the credentials are, and what they may do."""

    remote: str
    kind: str
    ok: bool
    identity: str = ""
    items: list[CheckItem] = Field(default_factory=list)

    @classmethod
    def of(cls, remote: str, kind: str, identity: str, items: list[CheckItem]) -> RemoteCheck:
        ok = all(i.ok for i in items if i.required)
        return cls(remote=remote, kind=kind, ok=ok, identity=identity, items=items)


class CheckableGate(Protocol):
    """A provisioner that can verify its credentials and permissions without creating anything."""

    async def check(self) -> RemoteCheck: ...


class SDKRunner:
    """Blocking SDK calls in a pool of the gate's own threads, each under a deadline."""

    def __init__(self, name: str, threads: int, timeout_s: float) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"skyport-{name}")
        self.timeout_s = timeout_s

    async def __call__(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                return await loop.run_in_executor(self._pool, partial(fn, *args, **kwargs))
        except TimeoutError:
            raise CloudError(
                f"the provider did not answer {what} within {self.timeout_s:g}s", reason="throttled"
            ) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Cached(Generic[T]):
    """A value loaded from a provider, served at once and refreshed in the background when stale.

    ``path``: a JSON file keeping the value across restarts (``encode``/``decode`` convert it).
    """

    def __init__(
        self,
        name: str,
        load: Callable[[], Awaitable[T]],
        max_age_s: float,
        *,
        path: Path | None = None,
        encode: Callable[[T], Any] | None = None,
        decode: Callable[[Any], T] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._name = name
        self._load = load
        self._max_age = max_age_s
        self._path = path
        self._encode = encode
        self._decode = decode
        self._clock = clock
        self._value: T | None = None
        self._at = float("-inf")
        self._task: asyncio.Task[None] | None = None
        #: Called after each successful load (e.g. a catalog made from prices goes stale).
        self.on_update: Callable[[], None] | None = None
        self._read_file()

    @property
    def age_s(self) -> float:
        return self._clock() - self._at

    def _read_file(self) -> None:
        if self._path is None or self._decode is None or not self._path.exists():
            return
        try:
            doc = json.loads(self._path.read_text())
            self._value, self._at = self._decode(doc["value"]), float(doc["at"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring an unreadable cache", cache=str(self._path), error=str(exc))

    def _write_file(self) -> None:
        if self._path is None or self._encode is None or self._value is None:
            return
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"at": self._at, "value": self._encode(self._value)}))
            os.replace(tmp, self._path)
        except OSError as exc:
            log.warning("cannot write a cache", cache=str(self._path), error=str(exc))

    async def _refresh(self) -> None:
        value = await self._load()
        self._value, self._at = value, self._clock()
        self._write_file()
        if self.on_update is not None:
            self.on_update()

    def _background(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():

            async def refresh() -> None:
                try:
                    await self._refresh()
                except Exception as exc:  # kept stale; retried on the next stale read
                    log.warning("background refresh failed", what=self._name, error=str(exc))

            self._task = asyncio.get_running_loop().create_task(refresh())
        return self._task

    async def get(self, wait_s: float | None = None) -> T:
        """The value; a cold cache waits for the first load (and raises its error) — at most ``wait_s``
        seconds when given, after which the load goes on in the background (a :class:`CloudError`)."""
        if self._value is None:
            if wait_s is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(self._background()), wait_s)
                except TimeoutError:
                    raise CloudError(f"{self._name}: still loading", reason="throttled") from None
                if self._value is None:
                    raise CloudError(f"{self._name} could not be loaded (see the log)", reason="provider")
            else:
                if self._task is not None and not self._task.done():
                    await asyncio.shield(self._task)
                if self._value is None:
                    await self._refresh()
        elif self.age_s > self._max_age:
            self._background()
        assert self._value is not None
        return self._value

    def peek(self) -> T | None:
        """The value held now, if any (never a provider call)."""
        return self._value

    def invalidate(self) -> None:
        self._at = float("-inf")

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


def price_cache_path(home: Path | None, kind: str, remote: str) -> Path | None:
    return None if home is None else home / "cache" / f"prices-{kind}-{remote}.json"


def price_for(
    flavor_id: str, api_prices: Mapping[str, float], settings: ProviderRemoteSettings
) -> float | None:
    """A flavor's price per node-hour: the operator's table, else the provider's price API, else the
    remote's ``default_price``; None: not priced (the flavor is then not offered)."""
    if flavor_id in settings.prices:
        return settings.prices[flavor_id]
    if flavor_id in api_prices:
        return api_prices[flavor_id]
    return settings.default_price


def wants_spot(policy: str, tags: Mapping[str, str]) -> bool:
    """Whether a partition goes on spot capacity: the remote's policy and the job's consent."""
    if policy == "always":
        return True
    if policy == "when_allowed":
        return tags.get(TAG_PREEMPTIBLE, "").lower() in ("1", "true", "yes", "allowed")
    return False


def node_count(tags: Mapping[str, str], default: int) -> int:
    with contextlib.suppress(ValueError):
        return int(tags.get("skyport-nodes", default))
    return default
