"""Job change notices: what the long poll (``GET /api/v1/jobs/ID/wait``) and ``logs -f`` wait on."""

from __future__ import annotations

import asyncio
import time

from skyport.server.lifecycle.wakeup import JobNotifier


async def test_a_change_during_the_readers_read_ends_its_wait_at_once() -> None:
    """The reader watches before it reads the job: a change that lands while it reads (the job ended
    just then) wakes it at once, instead of leaving it asleep until its timeout (a lost wake-up made a
    long poll return 30 s late under load)."""
    notifier = JobNotifier()
    started = time.monotonic()
    with notifier.watching("job-1") as changed:
        notifier.changed("job-1")  # the change, between the read and the wait
        done, _ = await asyncio.wait([changed], timeout=10)
    assert changed in done
    assert time.monotonic() - started < 5


async def test_a_wait_ends_at_the_jobs_own_change_or_at_its_timeout() -> None:
    notifier = JobNotifier()
    with notifier.watching("job-1") as changed:
        notifier.changed("job-2")
        assert not changed.done(), "another job's change does not wake it"
        notifier.changed("job-1")
        assert changed.done()
    started = time.monotonic()
    await notifier.wait("job-1", timeout=0.05)  # nothing changes: it returns at its timeout
    assert time.monotonic() - started >= 0.05


async def test_a_finished_watch_is_forgotten() -> None:
    """Watches end with their reader: a later change finds no stale waiter to complete."""
    notifier = JobNotifier()
    with notifier.watching("job-1") as first:
        pass
    notifier.changed("job-1")
    assert not first.done(), "the watch was removed when its reader left"
