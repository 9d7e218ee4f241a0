"""Identifiers for jobs and arrays: time-ordered (version 7) UUIDs, RFC 9562.

The first 48 bits are the creation time in milliseconds, the rest random (74 bits). Ids made later sort
later, so the B-tree indexes keyed by job id (the jobs' own, the events') take each new job's entries at
their right-hand end: with random (version 4) ids every submission and every state change's event
dirtied a page somewhere in the middle of each, written to the WAL at commit.

The OS's random source is read in blocks: on some virtual machines each ``getrandom`` call costs
~170 µs, which made ``uuid.uuid4()`` a visible share of a submission's cost. One read serves 256 ids.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime

_BLOCK_IDS = 256
_RANDOM_BYTES = 10  # 74 random bits and the 6 bits that version and variant overwrite
_VERSION_7 = 0x7 << 76
_VARIANT = 0x2 << 62
_RAND_A = 0xFFF << 64  # 12 bits after the version
_RAND_B = (1 << 62) - 1  # 62 bits after the variant


class IdSource:
    def __init__(self) -> None:
        self._buffer = b""
        self._offset = 0

    def new(self, at: datetime) -> str:
        """A new id for a record created at ``at``."""
        if self._offset >= len(self._buffer):
            self._buffer = os.urandom(_RANDOM_BYTES * _BLOCK_IDS)
            self._offset = 0
        random = int.from_bytes(self._buffer[self._offset : self._offset + _RANDOM_BYTES])
        self._offset += _RANDOM_BYTES
        millis = int(at.timestamp() * 1000) & ((1 << 48) - 1)
        value = (millis << 80) | _VERSION_7 | ((random << 2) & _RAND_A) | _VARIANT | (random & _RAND_B)
        return str(uuid.UUID(int=value))
