"""Level-triggered loops are woken by events and also run on a timer (DESIGN §5)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from typing import NoReturn

import structlog

log = structlog.get_logger(__name__)


async def run_passes(
    pass_once: Callable[[], Awaitable[object]], wait: Callable[[], Awaitable[object]], what: str
) -> NoReturn:
    """A control loop's life: a pass, then ``wait`` (for a ring or the timer), forever. A pass that fails
    is logged and the next one tries again: a loop never dies of one bad row or provider answer."""
    while True:
        try:
            await pass_once()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("pass failed; retrying on the next wakeup", loop=what)
        await wait()


class Wakeup:
    """A coalescing doorbell: any number of rings before the loop looks become one pass."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def ring(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        self._event.clear()


class JobNotifier:
    """In-process notice that a job changed state, for readers that follow a job (logs -f, wait)."""

    def __init__(self) -> None:
        self._waiters: dict[str, list[asyncio.Future[None]]] = defaultdict(list)

    def changed(self, job_id: str) -> None:
        for fut in self._waiters.pop(job_id, []):
            if not fut.done():
                fut.set_result(None)

    @contextlib.contextmanager
    def watching(self, job_id: str) -> Iterator[asyncio.Future[None]]:
        """A future that completes at the job's next change. Enter it *before* reading the job: a change
        between the read and the wait is then seen, not slept through until the timeout."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[job_id].append(fut)
        try:
            yield fut
        finally:
            waiters = self._waiters.get(job_id)
            if waiters and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._waiters[job_id]

    async def wait(self, job_id: str, timeout: float) -> None:
        """Return when the job changes state, or after ``timeout`` seconds, whichever comes first."""
        with self.watching(job_id) as changed:
            await asyncio.wait([changed], timeout=timeout)
