"""The core's agent hub: an attempt's end is never lost, even when it arrives before anyone watches.

A job that ends at once (``true``) can have its ``exited`` message reach the core before the reply to
its ``launch`` does, so before the execution loop calls ``watch``. That end must reach the loop when it
does (found by bench/remote_transfer.py: such a job stayed ``running`` for ever).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from skyport.gates.agent import AgentHub
from skyport.gates.base import Exit


class _Link:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def close(self, reason: str) -> None:
        pass


def test_an_end_reported_before_the_watch_begins_is_delivered_to_the_watch(tmp_path: Path) -> None:
    async def main() -> list[tuple[str, Exit]]:
        hub = AgentHub()
        hub.ready.set()
        link = _Link()
        inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        hub.expect("job1", 1, "node1", tmp_path / "stdout", tmp_path / "stderr")  # as launch() does
        session = asyncio.create_task(hub.serve("node1", "node1", link, inbox.get))
        done = {"exit_code": 0, "signal": None, "reason": "exit_code", "message": "exited with code 0"}
        await inbox.put({"type": "exited", "job_id": "job1", "attempt": 1, "exit": done})
        for _ in range(1000):  # until the hub has handled it (it acknowledges)
            if any(m["type"] == "ack_exit" for m in link.sent):
                break
            await asyncio.sleep(0)
        assert any(m["type"] == "ack_exit" for m in link.sent)
        ended: list[tuple[str, Exit]] = []
        hub.watch("job1", lambda job_id, exit: ended.append((job_id, exit)))  # launch() has returned
        await inbox.put(None)
        await session
        return ended

    ended = asyncio.run(main())
    assert ended == [("job1", Exit(0, None, "exit_code", "exited with code 0"))]
