"""The clock the core reads. Injected everywhere so tests and the simulator can control time."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Wall-clock time, timezone-aware UTC: what is recorded and shown."""

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps: what deadlines and latencies are measured with."""


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()
