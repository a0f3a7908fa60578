"""In-memory fan-out of a run's events to live watchers.

The executing process appends events here as soon as they are written to
storage (within a write's time of the model adapter yielding a token), so a
watcher never sees an event that a crash could take back. Watchers that fall
behind ``base_seq`` read storage first. An event may cover several seqs (a run's
text deltas written together): a watcher that resumes inside one gets its rest.
"""

from __future__ import annotations

import asyncio
import bisect

from engine_service.core._types import Event


class EventFeed:
    def __init__(self, base_seq: int) -> None:
        # The seq of the last event that existed before this feed started.
        self.base_seq = base_seq
        self.events: list[Event] = []
        self._ends: list[int] = []  # each event's last seq, to find a seq by bisection
        self.closed = False
        self._changed = asyncio.Event()

    @property
    def last_seq(self) -> int:
        return self._ends[-1] if self._ends else self.base_seq

    def publish_many(self, events: list[Event]) -> None:
        self.events.extend(events)
        self._ends.extend([e.seq + e.n - 1 for e in events])
        self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    def after(self, seq: int, limit: int = 512) -> list[Event]:
        """Events with seq > ``seq`` (which must be >= base_seq), at most ``limit``; the first
        is cut to what lies past ``seq`` when ``seq`` falls inside it."""
        start = bisect.bisect_right(self._ends, seq)
        batch = self.events[start : start + limit]
        if batch and batch[0].seq <= seq:
            batch[0] = batch[0].after(seq)
        return batch

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
