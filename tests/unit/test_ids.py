"""Job ids: version 7 UUIDs, in the order they were made (the indexes keyed by them grow at one end)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from skyport.server.ids import IdSource


def test_ids_are_version_7_uuids_that_sort_by_creation_time() -> None:
    ids = IdSource()
    start = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)
    made = [ids.new(start + timedelta(milliseconds=i)) for i in range(300)]  # more than one random block
    parsed = [uuid.UUID(i) for i in made]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert made == sorted(made), "as text, as they are stored and indexed"
    assert [u.int >> 80 for u in parsed] == [int(start.timestamp() * 1000) + i for i in range(300)]


def test_ids_made_in_the_same_millisecond_differ() -> None:
    ids = IdSource()
    now = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)
    made = {ids.new(now) for _ in range(2000)}
    assert len(made) == 2000
