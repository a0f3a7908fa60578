"""In-memory fan-out of a run's events to live watchers.

The executing process appends events here as soon as they are written to
storage (within a write's time of the model adapter yielding a token), so a
watcher never sees an event that a crash could take back. Watchers that fall
behind ``base_seq`` read storage first.
"""

from __future__ import annotations

import asyncio

from engine_service.core._types import Event


class EventFeed:
    def __init__(self, base_seq: int) -> None:
        # The seq of the last event that existed before this feed started.
        self.base_seq = base_seq
        self.events: list[Event] = []
        self.closed = False
        self._changed = asyncio.Event()

    @property
    def last_seq(self) -> int:
        return self.base_seq + len(self.events)

    def publish_many(self, events: list[Event]) -> None:
        self.events.extend(events)
        self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    def after(self, seq: int, limit: int = 512) -> list[Event]:
        """Events with seq > ``seq`` (which must be >= base_seq), at most ``limit``."""
        start = seq - self.base_seq
        return self.events[start : start + limit]

    async def wait(self, seq: int, timeout: float) -> None:
        """Return once an event after ``seq`` exists, the feed closed, or ``timeout`` passed."""
        if self.last_seq > seq or self.closed:
            return
        self._changed.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            return
