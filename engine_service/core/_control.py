"""The control plane: where replicas of one deployment coordinate.

An engine on its own (the default, ``LocalControl``) needs none: storage is the only shared
state, runs are listed and recovered by reading it, watchers of runs another process moves
re-read it, timers live in memory. With a control plane (``engine_service.control``, on
PostgreSQL) the engine keeps an index of its runs there, shares a work queue with the other
replicas, keeps timers as rows any replica fires, and hears of other replicas' events at once.
Event logs, transcripts and blobs stay in storage either way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Protocol

from engine_service.core._errors import EngineError, ErrorKind
from engine_service.core._types import JsonObject

# Timer kinds: an approval deadline, a handoff deadline (no runner took the run), and a
# webhook notification's next attempt (the kind names the notification).
APPROVAL_TIMER = "approval"
HANDOFF_TIMER = "handoff"
WEBHOOK_TIMER = "webhook:"

# What a replica hears when a run changes elsewhere: (workspace, run_id, seq shown, state).
ChangeListener = Callable[[str, str, int, str], None]
# How the control plane reads a run's state document from storage.
Reload = Callable[[str, str], Awaitable[JsonObject | None]]


def control_unavailable(why: object) -> EngineError:
    return EngineError(
        "ERR_CONTROL_UNAVAILABLE",
        f"the control plane (PostgreSQL) is unreachable: {why}; retry shortly",
        kind=ErrorKind.UNAVAILABLE,
    )


class ControlPlane(Protocol):
    # ListRuns and the recovery sweep read the index instead of storage.
    indexed: bool
    # New runs wait in the shared work queue instead of starting where they were created.
    queued: bool

    def available(self) -> str:
        """ "" while the control plane answers, else why not (health reports NOT_SERVING)."""
        ...

    async def start(self, owner: str, on_change: ChangeListener, reload: Reload | None = None) -> None: ...

    async def close(self) -> None: ...

    def watch_timeout(self, polling: float) -> float:
        """How long a watcher of a run moved elsewhere may wait for news before re-reading storage."""
        ...

    # -- the run index and live fan-out ----------------------------------------------

    async def committed(self, state: JsonObject) -> None:
        """A run's state document was committed to storage: index it and tell the replicas.
        Never waits for the control plane, never raises: the row is queued and written soon."""
        ...

    def shown(self, workspace: str, run_id: str, seq: int) -> None:
        """Events up to ``seq`` are written and shown to watchers here: tell the other replicas."""
        ...

    async def list_runs(
        self,
        workspace: str,
        *,
        states: Collection[str],
        labels: Mapping[str, str],
        after: tuple[float, str] | None,
        limit: int,
    ) -> list[JsonObject]:
        """State documents, newest first (created_at, run_id), strictly after the ``after`` key."""
        ...

    async def active_runs(self, workspace: str | None) -> list[tuple[str, str]]:
        """Runs the recovery sweep looks at: executing, claimed but not started, handed off."""
        ...

    async def index_now(self, state: JsonObject) -> None:
        """Index a run about to be created before it is in storage (raises ERR_CONTROL_UNAVAILABLE):
        a creator that dies before queueing it leaves a row the recovery sweep finds."""
        ...

    def forget_unstored(self, workspace: str, run_id: str, created_before: float) -> None:
        """Drop the index row of a run storage does not hold, if it was created before
        ``created_before`` (a younger one may still be being created)."""
        ...

    async def ended_before(self, workspace: str, cutoff: float) -> list[str]:
        """Runs of the workspace that ended (DONE, FAILED, CANCELLED) and last changed before
        ``cutoff``: what retention looks at."""
        ...

    async def delete_run(self, workspace: str, run_id: str) -> None:
        """Forget a deleted run: its index row, queue entry, slot and timers."""
        ...

    # -- the work queue ------------------------------------------------------------------

    async def enqueue(self, workspace: str, run_id: str, *, pinned: bool) -> int:
        """Queue a run (indexed already, see `index_now`); returns its place in line.
        ``pinned``: only this replica may claim it (it holds its credentials)."""
        ...

    async def claim(self) -> tuple[str, str] | None:
        """The next run this replica executes, its slot taken, or None."""
        ...

    async def wait_for_work(self, timeout: float) -> None: ...

    async def queue_position(self, workspace: str, run_id: str) -> int: ...

    def hold_slot(self, workspace: str, run_id: str) -> None:
        """The run executes here (a resume, a recovery): it counts against its workspace's limit."""
        ...

    def release_slot(self, workspace: str, run_id: str) -> None: ...

    # -- durable timers ------------------------------------------------------------------

    def set_timer(self, workspace: str, run_id: str, kind: str, due_at: float) -> None: ...

    def ensure_timer(self, workspace: str, run_id: str, kind: str, due_at: float) -> None:
        """Set the timer unless it exists (a process that finds work left pending at startup)."""
        ...

    async def set_timer_now(self, workspace: str, run_id: str, kind: str, due_at: float) -> None:
        """Set the timer before returning (queued as `set_timer` while the database is away):
        for a timer that must outlive this process from the moment what needs it commits."""
        ...

    def cancel_timer(self, workspace: str, run_id: str, kind: str) -> None: ...

    async def due_timers(self, skip: Collection[str] = ()) -> list[tuple[str, str, str, str]]:
        """Claim timers that are due, other than of the kinds in ``skip``: (workspace, run_id,
        kind, claim token). A claim lasts a minute: a timer neither fired nor set again by
        then is due again (its claimer died)."""
        ...

    def timer_fired(self, workspace: str, run_id: str, kind: str, token: str) -> None: ...

    async def wait_for_timers(self, timeout: float) -> None: ...


class LocalControl:
    """No control plane: one engine, or replicas coordinating through storage alone."""

    indexed = False
    queued = False

    def available(self) -> str:
        return ""

    async def start(self, owner: str, on_change: ChangeListener, reload: Reload | None = None) -> None:
        return None

    async def close(self) -> None:
        return None

    def watch_timeout(self, polling: float) -> float:
        return polling

    async def committed(self, state: JsonObject) -> None:
        return None

    def shown(self, workspace: str, run_id: str, seq: int) -> None:
        return None

    async def list_runs(
        self,
        workspace: str,
        *,
        states: Collection[str],
        labels: Mapping[str, str],
        after: tuple[float, str] | None,
        limit: int,
    ) -> list[JsonObject]:
        raise NotImplementedError("no run index without a control plane")

    async def active_runs(self, workspace: str | None) -> list[tuple[str, str]]:
        raise NotImplementedError("no run index without a control plane")

    async def index_now(self, state: JsonObject) -> None:
        return None

    def forget_unstored(self, workspace: str, run_id: str, created_before: float) -> None:
        return None

    async def ended_before(self, workspace: str, cutoff: float) -> list[str]:
        raise NotImplementedError("no run index without a control plane")

    async def delete_run(self, workspace: str, run_id: str) -> None:
        return None

    async def enqueue(self, workspace: str, run_id: str, *, pinned: bool) -> int:
        raise NotImplementedError("no work queue without a control plane")

    async def claim(self) -> tuple[str, str] | None:
        return None

    async def wait_for_work(self, timeout: float) -> None:
        return None

    async def queue_position(self, workspace: str, run_id: str) -> int:
        return 0

    def hold_slot(self, workspace: str, run_id: str) -> None:
        return None

    def release_slot(self, workspace: str, run_id: str) -> None:
        return None

    def set_timer(self, workspace: str, run_id: str, kind: str, due_at: float) -> None:
        return None

    def ensure_timer(self, workspace: str, run_id: str, kind: str, due_at: float) -> None:
        return None

    async def set_timer_now(self, workspace: str, run_id: str, kind: str, due_at: float) -> None:
        return None

    def cancel_timer(self, workspace: str, run_id: str, kind: str) -> None:
        return None

    async def due_timers(self, skip: Collection[str] = ()) -> list[tuple[str, str, str, str]]:
        return []

    def timer_fired(self, workspace: str, run_id: str, kind: str, token: str) -> None:
        return None

    async def wait_for_timers(self, timeout: float) -> None:
        return None
