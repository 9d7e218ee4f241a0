"""Identifiers for jobs and other records: random (version 4) UUIDs.

The OS's random source is read in blocks: on some virtual machines each ``getrandom`` call costs
~170 µs, which made ``uuid.uuid4()`` a visible share of a submission's cost. One read serves 256 ids,
with the same randomness.
"""

from __future__ import annotations

import os
import uuid

_BLOCK_IDS = 256


class IdSource:
    def __init__(self) -> None:
        self._buffer = b""
        self._offset = 0

    def new(self) -> str:
        if self._offset >= len(self._buffer):
            self._buffer = os.urandom(16 * _BLOCK_IDS)
            self._offset = 0
        raw = self._buffer[self._offset : self._offset + 16]
        self._offset += 16
        return str(uuid.UUID(bytes=raw, version=4))
