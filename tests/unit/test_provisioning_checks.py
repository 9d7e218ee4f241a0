"""When the provisioning loop asks a provider about partitions that booted and wait for their agents."""

from __future__ import annotations

import random
import uuid
from collections import Counter

from skyport.server.lifecycle.provisioning import BOOT_CHECK_INTERVAL_S, boot_check_interval


def test_partitions_that_boot_together_are_not_all_asked_about_at_once() -> None:
    """500 partitions of a burst: each waits between 1 and 1.5 intervals, always the same for one
    partition, and no 0.2 s pass (the loop's shortest gap) gets more than a few percent of the checks."""
    draw = random.Random(5)  # partition ids are uuid4s; these are the same ones on every run
    ids = [str(uuid.UUID(int=draw.getrandbits(128), version=4)) for _ in range(500)]
    intervals = [boot_check_interval(i) for i in ids]
    assert all(BOOT_CHECK_INTERVAL_S <= t < 1.5 * BOOT_CHECK_INTERVAL_S for t in intervals)
    assert [boot_check_interval(i) for i in ids] == intervals
    per_pass = Counter(int(t / 0.2) for t in intervals)
    assert len(per_pass) >= 30
    assert max(per_pass.values()) <= 30, per_pass.most_common(3)
