"""A run in execution: the agent loop and the checkpoints that make it durable.

One `RunActor` exists per run being moved by this process (executing, or
recording decisions). It owns the run's lease, appends events to the live
feed, and commits them together with transcript entries and the state
document at each checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_service.core._errors import RunFailure
from engine_service.core._feed import EventFeed
from engine_service.core._limits import MAX_DEPTH, is_small, too_deep
from engine_service.core._regex import SchemaValidator
from engine_service.core._run import (
    PENDING,
    READY,
    RESOLVED,
    Interrupt,
    PendingCall,
    RunError,
    RunRecord,
    RunSpec,
)
from engine_service.core._text import loads_untrusted
from engine_service.core._types import (
    Event,
    EventKind,
    InterruptKind,
    JsonObject,
    Message,
    PauseReason,
    Permission,
    RunState,
    ToolCall,
    ToolChoice,
)
from engine_service.models import ModelAdapter, ModelError, ModelRequest, TextChunk, TurnResult
from engine_service.storage._local import Storage, StorageUnavailable, storage_fault
from engine_service.storage._workdir_snapshot import WorkdirSnapshots, WorkdirTooLarge
from engine_service.tools import result_blob_name, truncation_note
from engine_service.tools._registry import Tool, ToolArgumentError, ToolContext, call_tool, capability_error

log = logging.getLogger("machina.engine")


CANCEL_REQUEST = "cancel-request"


class LeaseLost(Exception):
    """Another process holds the run's lease now; this one must stop writing."""


class RunnerUnreachable(Exception):
    """The runner did not accept a handed-off run (network error, timeout or non-2xx)."""


_REPAIR_PROMPT = (
    "Your answer is not valid JSON for the required output schema: {problem}. "
    "Reply again with only the JSON value, nothing else."
)


@dataclass(slots=True)
class RunEnv:
    """What a run needs from its engine, resolved once per actor."""

    storage: Storage
    model: ModelAdapter
    tools: dict[str, Tool]  # the tools this run may see and call, by name
    permissions: Callable[[str], Permission]
    system_prompt: str
    max_turns: int
    max_output_tokens: int
    price: tuple[float, float]  # USD per million input / output tokens
    owner: str
    lease_ttl: float
    workdir: Path | None = None
    # Carries the run directory in storage at checkpoints (None = it stays on this host).
    snapshots: WorkdirSnapshots | None = None
    max_result_chars: int = 50_000
    # Hands the run to a runner (POST /continue); None = stubs answer with an error instead.
    handoff: Callable[[str, str], Awaitable[None]] | None = None
    # Tells webhooks about a status change ("paused", "done", "failed", "cancelled").
    notify: Callable[[RunRecord, str], None] | None = None
    # How often to look for a cancel request left by another process (a replica).
    cancel_poll_s: float = 0.5
    clock: Callable[[], float] = time.time
    # How long a checkpoint retries unavailable storage before the run is left at its last
    # checkpoint for the recovery sweep (see _execute).
    storage_retry_s: float = 300.0


class RunActor:
    def __init__(
        self, record: RunRecord, spec: RunSpec, transcript: list[Message] | None, env: RunEnv
    ) -> None:
        """``transcript`` None: the committed one is read by `take_over`, once the run is ours."""
        self.record = record
        self.spec = spec
        self.transcript = transcript or []
        self._transcript_read = transcript is not None
        self.env = env
        # Watchers see an event once it is written (the feed); until then it waits in
        # _unwritten. Every event a watcher saw therefore survives a crash.
        self.feed = EventFeed(record.last_seq)
        self._last_seq = record.last_seq  # of the last event emitted, written or not
        self._unwritten: list[Event] = []
        self._written_seq = record.last_seq  # of the last event written to storage
        # Written, but shown only once the checkpoint that commits them lands: a pause or an
        # end (and what follows it) that a failed commit could still take back.
        self._held: list[Event] = []
        self._write_lock = asyncio.Lock()
        self._write_wanted = asyncio.Event()
        # After a crash recovery: the first seq of what the dead writer wrote past its checkpoint.
        self._rolled_back_from = 0
        # While a pause or an end is being committed, readers are shown the run as it was.
        self._shown: RunRecord | None = None
        self.task: asyncio.Task[None] | None = None
        self.cancel_reason: str | None = None
        # Transcript entries committed to storage so far.
        self._transcript_committed = record.transcript_len
        self._lease_renew_at = 0.0
        self._active_since = 0.0
        self._lease_lost = False
        # Set once the run is past its last point of cancellation: it started committing its end
        # (one end per run), or its pause is committed (a cancel then applies to the paused run).
        self.ending = False
        # The start (RUNNING, run_started/resumed) was committed before the task began.
        self._start_committed = False
        # A tool may have changed the run directory since its last snapshot.
        self._workdir_dirty = True

    @property
    def key(self) -> tuple[str, str]:
        return (self.record.workspace_id, self.record.run_id)

    # -- events and checkpoints ------------------------------------------------

    def view(self) -> RunRecord:
        """The run as readers may see it: never a pause or an end before it is committed."""
        return self._shown or self.record

    def emit(self, kind: EventKind, data: JsonObject) -> Event:
        self._last_seq += 1
        event = Event(self._last_seq, self.env.clock(), kind, data)
        self._unwritten.append(event)
        self._write_wanted.set()
        return event

    async def write_events(self) -> None:
        """Write the events emitted so far, then show them to watchers.

        A pause or an end is written in a segment of its own and shown only once the
        checkpoint that commits it lands: if that commit fails, recovery drops it unseen.
        """
        async with self._write_lock:
            batch = self._unwritten
            if not batch:
                return
            self._unwritten = []
            cut = len(batch) if not self._held else 0
            cut = next((i for i, e in enumerate(batch) if e.kind in _SHOWN_AT_COMMIT), cut)
            parts = [part for part in (batch[:cut], batch[cut:]) if part]
            ws, run_id = self.key
            for index, part in enumerate(parts):
                try:
                    await self.env.storage.write_segment(
                        ws, run_id, "events", part[0].seq, [e.to_json() for e in part]
                    )
                except BaseException:
                    # What is left: the next write (or the checkpoint) tries again.
                    self._unwritten[:0] = [e for rest in parts[index:] for e in rest]
                    raise
                self._written_seq = part[-1].seq
                if self._held or part[0].kind in _SHOWN_AT_COMMIT:
                    self._held.extend(part)
                else:
                    self.feed.publish_many(part)

    async def _writer(self) -> None:
        """Write events ahead as they come, so watchers see them within a write's time."""
        delay = self.env.storage.event_flush_delay
        backoff = 0.1
        while True:
            await self._write_wanted.wait()
            if delay:
                await asyncio.sleep(delay)
            self._write_wanted.clear()
            try:
                await self.write_events()
                backoff = 0.1
            except Exception:  # a storage hiccup: the next write or the checkpoint retries
                log.warning("writing events of run %s failed; will retry", self.record.run_id, exc_info=True)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self._write_wanted.set()

    async def checkpoint(self) -> None:
        """Commit the events and transcript entries so far, then the state document.

        While storage is unavailable (read-only, full, answering 5xx) the run waits here,
        retrying with backoff; past ``storage_retry_s`` it raises StorageUnavailable.
        """
        await self._retrying_storage("checkpoint", self._commit)

    async def _retrying_storage(self, what: str, attempt: Callable[[], Awaitable[None]]) -> None:
        give_up = time.monotonic() + self.env.storage_retry_s
        delay = 0.05
        while True:
            try:
                await attempt()
                return
            except Exception as exc:
                if not storage_fault(exc):
                    raise
                if time.monotonic() >= give_up:
                    raise StorageUnavailable(
                        f"storage was unavailable for more than {self.env.storage_retry_s:g} s ({exc})"
                    ) from None
                log.warning(
                    "run %s: storage unavailable during %s (%s); retrying in %.2f s",
                    self.record.run_id, what, exc, delay, extra={"run_id": self.record.run_id},
                )  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            # The outage may have outlasted the lease: make sure the run is still ours first
            # (LeaseLost if another process took it; a storage fault is retried with the rest).
            self._lease_renew_at = 0.0
            try:
                await self._renew_lease()
            except Exception as exc:
                if not storage_fault(exc):
                    raise

    async def _commit(self) -> None:
        record, storage = self.record, self.env.storage
        ws, run_id = self.key
        await self._snapshot_workdir()
        await self.write_events()
        if len(self.transcript) > self._transcript_committed:
            new_entries = self.transcript[self._transcript_committed :]
            await storage.write_segment(
                ws, run_id, "transcript", self._transcript_committed + 1, [m.to_json() for m in new_entries]
            )
        record.last_seq = self._written_seq
        record.transcript_len = len(self.transcript)
        record.updated_at = self.env.clock()
        await storage.write_state(ws, run_id, record.to_json())
        self._shown = None
        self._transcript_committed = record.transcript_len
        if self._held:
            self.feed.publish_many(self._held)
            self._held = []
        await self._renew_lease()

    async def _snapshot_workdir(self) -> None:
        snapshots, workdir = self.env.snapshots, self.env.workdir
        if snapshots is None or workdir is None or not self._workdir_dirty:
            return
        try:
            self.record.workdir_manifest = await snapshots.save(self.env.storage, *self.key, workdir)
        except WorkdirTooLarge:
            if self.task is not None and not self.record.state.terminal:
                raise  # the run fails with it
            # Ending, or recording decisions while paused: keep the last snapshot that fitted
            # (a paused run that grew too large fails at its first checkpoint once it runs).
            log.warning("run %s: its directory is too large to snapshot", self.record.run_id)
            return
        self._workdir_dirty = False

    def _show_until_committed(self) -> None:
        """Keep showing readers the run as it is now until the next checkpoint commits."""
        if self._shown is None:  # a failed commit: what readers see is still the older state
            self._shown = RunRecord.from_json(self.record.to_json())

    async def take_over(self) -> bool:
        """Acquire the lease and drop what a dead writer left uncommitted.

        The record was read before the lease was ours; if another writer moved
        the run in between, it is stale and we back off (False).
        """
        ws, run_id = self.key
        if not await self.env.storage.acquire_lease(ws, run_id, self.env.owner, self.env.lease_ttl):
            return False
        current = await self.env.storage.read_state(ws, run_id)
        if current is None or (current["last_seq"], current["state"]) != (
            self.record.last_seq,
            self.record.state.value,
        ):
            await self.env.storage.release_lease(ws, run_id, self.env.owner)
            return False
        self._lease_renew_at = self.env.clock() + self.env.lease_ttl / 3
        # Events the dead writer wrote past its checkpoint stay (watchers may have seen them);
        # its transcript entries go: the run redoes that work from the checkpoint.
        written = await self.env.storage.repair_end(ws, run_id, "events")
        if written < self.record.last_seq:
            log.error("run %s: its event log ends at %d, before its checkpoint's %d", run_id, written,
                      self.record.last_seq)  # fmt: skip
        if written > self.record.last_seq:
            written = await self._drop_unshown(written)
        if written > self.record.last_seq:
            self._rolled_back_from = self.record.last_seq + 1
        if written > self.feed.last_seq:
            self.feed = EventFeed(written)
            self._last_seq = written
        self._written_seq = max(written, self.record.last_seq)
        committed = self.record.transcript_len
        await self.env.storage.drop_uncommitted(ws, run_id, "transcript", committed)
        if not self._transcript_read:
            docs = await self.env.storage.read_segments(ws, run_id, "transcript", 0, committed)
            self.transcript = [Message.from_json(d) for d in docs]
            self._transcript_read = True
        if not self.transcript:
            # Before the first checkpoint the transcript's first entry, the task, lives in the
            # spec (written before CreateRun answered); the first checkpoint commits it.
            self.transcript = [Message("user", self.record.task)]
        if self.env.snapshots is not None and self.env.workdir is not None:
            try:  # the run may have moved on elsewhere: bring its directory here
                await self.env.snapshots.restore(
                    self.env.storage, ws, run_id, self.env.workdir, current.get("workdir_manifest", "")
                )
            except BaseException:
                await self.env.storage.release_lease(ws, run_id, self.env.owner)
                raise
        return True

    async def _drop_unshown(self, written: int) -> int:
        """Drop a pause or an end past the checkpoint (and what follows): its commit failed,
        so no watcher was shown it. Returns the new end of the log."""
        ws, run_id = self.key
        docs = await self.env.storage.read_segments(ws, run_id, "events", self.record.last_seq, written)
        unshown = next((d["seq"] for d in docs if d["k"] in _SHOWN_AT_COMMIT), 0)
        if not unshown:
            return written
        await self.env.storage.drop_uncommitted(ws, run_id, "events", unshown - 1)
        log.warning("run %s: dropped events from seq %d, whose commit failed", run_id, unshown)
        return unshown - 1

    async def release(self, *, close_feed: bool = True) -> None:
        ws, run_id = self.key
        try:
            await self.env.storage.release_lease(ws, run_id, self.env.owner)
        except Exception as exc:
            if not storage_fault(exc):
                raise
            # What mattered is committed; the lease expires on its own.
            log.warning("run %s: could not release its lease (%s)", run_id, exc)
        if close_feed:
            self.feed.close()

    async def _renew_lease(self) -> None:
        now = self.env.clock()
        if now >= self._lease_renew_at:
            ws, run_id = self.key
            if not await self.env.storage.acquire_lease(ws, run_id, self.env.owner, self.env.lease_ttl):
                raise LeaseLost(f"run {run_id} is now moved by another process")
            self._lease_renew_at = now + self.env.lease_ttl / 3

    async def _heartbeat(self) -> None:
        """Keep the lease alive through long model calls and tool calls (no checkpoint then)."""
        while True:
            await asyncio.sleep(self.env.lease_ttl / 3)
            try:
                await self._renew_lease()
            except LeaseLost:
                log.warning("lost the lease of run %s; stopping it here", self.record.run_id)
                self._lease_lost = True
                if self.task is not None:
                    self.task.cancel()
                return
            except Exception:  # a storage hiccup: the next beat or checkpoint retries
                log.warning("lease renewal of run %s failed; will retry", self.record.run_id, exc_info=True)

    # -- lifecycle ---------------------------------------------------------------

    async def commit_start(self, resumed_by: str | None) -> None:
        """Commit RUNNING and the run_started/resumed event before the caller is answered, so no
        process (a replica) shows the run as it was before this start."""
        self.record.state = RunState.RUNNING
        self.record.pause_reason = None
        self._emit_start(resumed_by)
        if resumed_by is not None:
            # A cancel request left for an earlier execution does not apply to this one.
            await self._clear_cancel_request()
        await self.checkpoint()
        self._start_committed = True

    def _emit_start(self, resumed_by: str | None) -> None:
        if resumed_by is None or self.feed.last_seq == 0:
            # Also a run recovered before any of its events was written: it never started visibly.
            self.emit(EventKind.RUN_STARTED, {"task": self.record.task, "model": self.record.meta.model})
        elif self._rolled_back_from:
            # What the dead writer did past its checkpoint is redone (or reported) from here.
            self.emit(EventKind.RESUMED, {"by": resumed_by, "rolled_back_from": self._rolled_back_from})
            self._rolled_back_from = 0
        else:
            self.emit(EventKind.RESUMED, {"by": resumed_by})

    async def cancel_request(self) -> str | None:
        """The reason of a cancel another process (a replica) asked for, or None."""
        ws, run_id = self.key
        blob = await self.env.storage.get_blob(ws, run_id, CANCEL_REQUEST)
        if not blob:
            return None
        try:
            return str(json.loads(blob).get("reason") or "cancelled by a caller")
        except (ValueError, AttributeError):
            return "cancelled by a caller"

    async def _clear_cancel_request(self) -> None:
        ws, run_id = self.key
        if await self.env.storage.get_blob(ws, run_id, CANCEL_REQUEST):
            await self.env.storage.put_blob(ws, run_id, CANCEL_REQUEST, b"")

    async def _cancelled_at_pause(self) -> bool:
        """After committing a pause, still holding the lease: honour a cancel asked for meanwhile.

        A canceller that wrote its request after this check sees the pause and cancels the run
        itself, so a cancel is never left waiting for a later resume.
        """
        try:
            reason = await self.cancel_request()
        except Exception:
            log.warning("cancel check of run %s failed", self.record.run_id, exc_info=True)
            return False
        if reason is None:
            return False
        self.cancel_reason = reason
        await self.cancel_now()
        return True

    def start(self, *, resumed_by: str | None) -> None:
        if self.env.workdir is not None:
            self.env.workdir.mkdir(parents=True, exist_ok=True)
        # RUNNING from the moment the caller gets an answer, not when the task first runs.
        self.record.state = RunState.RUNNING
        self.record.pause_reason = None
        self.task = asyncio.create_task(self._execute(resumed_by), name=f"run:{self.record.run_id}")

    async def _execute(self, resumed_by: str | None) -> None:
        helpers = [
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._watch_cancel()),
            asyncio.create_task(self._writer()),
        ]
        try:
            await self._execute_inner(resumed_by)
        except StorageUnavailable as exc:
            # Storage stayed unavailable past storage_retry_s: nothing more can be committed
            # here. The run stays at its last checkpoint (readers see it as it was there) and
            # is resumed by whichever process sweeps once storage is back, this one included.
            log.error("run %s parked at its last checkpoint, storage unavailable: %s", self.record.run_id,
                      exc, extra={"run_id": self.record.run_id})  # fmt: skip
            await self._close_quietly()
        except LeaseLost as lost:
            # Another process owns the run now: write nothing more, just stop.
            run_id = self.record.run_id
            log.warning("run %s stopped here: %s", run_id, lost, extra={"run_id": run_id})
            self.feed.close()
        finally:
            for helper in helpers:
                helper.cancel()

    async def _watch_cancel(self) -> None:
        """Honour a cancel that another process (a replica) recorded in storage."""
        run_id = self.record.run_id
        while True:
            await asyncio.sleep(self.env.cancel_poll_s)
            try:
                reason = await self.cancel_request()
            except Exception:  # a storage hiccup: look again next time
                log.debug("cancel check of run %s failed", run_id, exc_info=True)
                continue
            if reason is not None and self.cancel_reason is None and self.task is not None:
                if self.ending:
                    return  # it is committing its end: that is the end
                self.cancel_reason = reason
                self.task.cancel()
                return

    async def _execute_inner(self, resumed_by: str | None) -> None:
        record = self.record
        self._active_since = self.env.clock()
        record.state = RunState.RUNNING
        record.pause_reason = None
        if not self._start_committed:
            self._emit_start(resumed_by)
        try:
            remaining = record.deadline_at - self.env.clock() if record.deadline_at else None
            if remaining is not None and remaining <= 0:
                raise RunFailure(
                    "ERR_DEADLINE_EXCEEDED", "the run's deadline passed", timeout_ms=self.spec.timeout_ms
                )
            try:
                async with asyncio.timeout(remaining):
                    await self._loop()
            except TimeoutError:
                raise RunFailure(
                    "ERR_DEADLINE_EXCEEDED", "the run's deadline passed", timeout_ms=self.spec.timeout_ms
                ) from None
        except asyncio.CancelledError:
            if self._lease_lost:
                raise LeaseLost("lease lost") from None
            if self.cancel_reason is None or self.ending:
                # Engine shutdown: leave the last checkpoint for recovery.
                await self._close_quietly()
                raise
            await self._finish(
                RunState.CANCELLED,
                error=RunError("ERR_CANCELLED", self.cancel_reason or "cancelled by a caller"),
            )
        except LeaseLost:
            raise
        except StorageUnavailable:
            raise
        except RunFailure as failure:
            await self._finish(
                RunState.FAILED, error=RunError(failure.code, failure.message, failure.metadata)
            )
        except ModelError as error:
            await self._finish(
                RunState.FAILED, error=RunError(error.code, error.message, {"status": str(error.status)})
            )
        except Exception as exc:
            if storage_fault(exc):
                raise StorageUnavailable(str(exc)) from None
            log.exception("run %s failed with an internal error", record.run_id)
            await self._finish(
                RunState.FAILED, error=RunError("ERR_INTERNAL", "internal error; see the engine log")
            )

    async def _close_quietly(self) -> None:
        # Nothing past the last checkpoint is written: a half-streamed turn would
        # leave events that the recovered run then streams again. Freeing the
        # lease lets recovery (here or on a replica) start at once.
        with contextlib.suppress(Exception):
            await self.release()

    def _account_time(self) -> None:
        if self._active_since:
            now = self.env.clock()
            self.record.meta.duration_ms += int((now - self._active_since) * 1000)
            self._active_since = now

    async def _finish(
        self, state: RunState, *, data: Any = None, error: RunError | None = None, keep_pending: bool = False
    ) -> None:
        record = self.record
        self.ending = True
        self._show_until_committed()
        self._account_time()
        record.state = state
        record.data = data
        record.error = error
        if not keep_pending:
            record.pending = []
        record.pause_reason = None
        self.emit(
            EventKind.RUN_FINISHED,
            {
                "state": state.value,
                "data": data,
                "error": None if error is None else error.to_json(),
                "meta": record.meta.to_json(),
            },
        )
        await self.checkpoint()
        await self.release()
        self._notify(state.value.lower())
        log.info("run %s %s", record.run_id, state.value.lower(), extra={"run_id": record.run_id})

    def mark_interrupted(self) -> list[str]:
        """After a crash: calls that may have been running are reported, not silently re-run.

        Idempotent tools run again; others get an error result the model can act on.
        """
        interrupted = []
        for p in self.record.pending:
            tool = self.env.tools.get(p.call.name)
            if p.status == READY and not (tool is not None and tool.idempotent):
                p.status, p.result_is_error, p.outcome = RESOLVED, True, "interrupted"
                p.result_text = (
                    f"The {p.call.name} call was interrupted by an engine crash: it may or may not have "
                    "taken effect. Check before you retry it."
                )
                interrupted.append(p.call.call_id)
        return interrupted

    async def cancel_now(self) -> None:
        """Cancel a run that is not executing (paused, or orphaned while queued)."""
        await self._finish(
            RunState.CANCELLED, error=RunError("ERR_CANCELLED", self.cancel_reason or "cancelled")
        )

    async def pause(self) -> None:
        record = self.record
        await self._snapshot_workdir()  # a refused snapshot fails the run before it says paused
        self._show_until_committed()
        self._account_time()
        interrupts = record.interrupts
        kinds = {i.kind for i in interrupts}
        record.pause_reason = (
            PauseReason.AWAITING_APPROVAL
            if InterruptKind.APPROVAL in kinds
            else PauseReason.AWAITING_TOOL_RESULT
            if InterruptKind.TOOL_RESULT in kinds
            else PauseReason.AWAITING_INPUT
        )
        record.state = RunState.PAUSED
        self.emit(
            EventKind.PAUSED,
            {"reason": record.pause_reason.value, "interrupts": [i.to_json() for i in interrupts]},
        )
        await self.checkpoint()
        if await self._cancelled_at_pause():
            return
        self.ending = True
        await self.release()
        self._notify("paused")

    # -- the agent loop ------------------------------------------------------------

    async def _loop(self) -> None:
        record = self.record
        if record.pending:
            # Calls carried over from a pause (approved, or handed to us by the engine): commit
            # RUNNING and the decisions first, so a crash during such a call is recovered and
            # reported as interrupted instead of leaving the run paused to be approved again.
            ready = any(p.status == READY and not self._idempotent(p.call.name) for p in record.pending)
            if ready and not self._start_committed:  # committed with the start otherwise
                await self.checkpoint()
            if not await self._dispatch():
                return
        while True:
            self._check_limits()
            result = await self._model_turn()
            if not result.tool_calls:
                done, data = await self._final_answer(result.text)
                if done:
                    await self._finish(RunState.DONE, data=data)
                    return
                continue
            calls = result.tool_calls
            if all(is_small(c.arguments) for c in calls):
                record.pending = [self._plan(call) for call in calls]
            else:
                # Checking large arguments against a JSON Schema is seconds of pure-Python work:
                # in a worker thread the event loop keeps serving every other run meanwhile.
                record.pending = await asyncio.to_thread(self._plan_all, calls)
            if any(p.status == PENDING for p in record.pending):
                for p in record.pending:
                    if p.status == PENDING and p.interrupt is not None:
                        self.emit(_REQUEST_EVENT[p.interrupt.kind], {"interrupt": p.interrupt.to_json()})
                await self.pause()
                return
            # Commit the turn before running a tool that must not run twice: a
            # crash during the call then knows it was in flight. Idempotent
            # tools skip this write (it is most of a cheap turn's cost).
            if any(p.status == READY and not self._idempotent(p.call.name) for p in record.pending):
                await self.checkpoint()
            if not await self._dispatch():
                return

    def _check_limits(self) -> None:
        meta, spec = self.record.meta, self.spec
        if meta.turns >= self.env.max_turns:
            raise RunFailure(
                "ERR_MAX_TURNS",
                f"the run reached its limit of {self.env.max_turns} turns",
                max_turns=self.env.max_turns,
            )
        if spec.max_tokens and meta.usage.total >= spec.max_tokens:
            raise RunFailure(
                "ERR_TOKEN_BUDGET",
                f"the run used {meta.usage.total} of {spec.max_tokens} tokens",
                used=meta.usage.total,
                max_tokens=spec.max_tokens,
            )
        if spec.max_cost_usd and meta.cost_usd >= spec.max_cost_usd:
            raise RunFailure(
                "ERR_COST_BUDGET",
                f"the run cost ${meta.cost_usd:.4f} of ${spec.max_cost_usd:.4f}",
                cost_usd=meta.cost_usd,
                max_cost_usd=spec.max_cost_usd,
            )

    async def _model_turn(self) -> TurnResult:
        record, env = self.record, self.env
        turn = record.meta.turns + 1
        request = ModelRequest(
            system=env.system_prompt,
            messages=self.transcript,
            tools=[t.spec() for t in env.tools.values()],
            tool_choice=self.spec.tool_choice,
            max_output_tokens=env.max_output_tokens,
            output_schema=self.spec.output_schema,
            turn=record.meta.turns,
        )
        result: TurnResult | None = None
        async for item in env.model.stream(request):
            if isinstance(item, TextChunk):
                self.emit(EventKind.TEXT_DELTA, {"text": item.text, "turn": turn})
            else:
                result = item
        if result is None:
            raise ModelError("ERR_MODEL_STREAM", "the model stream ended without a result")
        record.meta.turns = turn
        record.meta.usage.add(result.usage)
        cost = (result.usage.input_tokens * env.price[0] + result.usage.output_tokens * env.price[1]) / 1e6
        record.meta.cost_usd += cost
        self.transcript.append(Message("assistant", result.text, result.tool_calls))
        self.emit(
            EventKind.ASSISTANT_MESSAGE,
            {"text": result.text, "calls": [c.to_json() for c in result.tool_calls], "turn": turn},
        )
        self.emit(EventKind.USAGE, {"turn": turn, "usage": result.usage.to_json(), "cost_usd": cost})
        return result

    async def _final_answer(self, text: str) -> tuple[bool, Any]:
        """(done, data). In structured mode, one repair turn, then ERR_OUTPUT_SCHEMA."""
        schema = self.spec.output_schema
        if schema is None:
            return True, text
        if len(text) > _INLINE_ANSWER_CHARS:
            problem = await asyncio.to_thread(_schema_problem, text, schema)
        else:
            problem = _schema_problem(text, schema)
        if problem is None:
            return True, loads_untrusted(text)
        if self.record.repair_used:
            raise RunFailure(
                "ERR_OUTPUT_SCHEMA", f"the final answer does not match the output schema: {problem}"
            )
        self.record.repair_used = True
        self.transcript.append(Message("user", _REPAIR_PROMPT.format(problem=problem)))
        await self.checkpoint()
        return False, None

    def _plan_all(self, calls: list[ToolCall]) -> list[PendingCall]:
        return [self._plan(call) for call in calls]

    def _plan(self, call: ToolCall) -> PendingCall:
        """Decide what happens to one tool call: run, ask, or answer at once."""
        tool = self.env.tools.get(call.name)
        if tool is None:
            available = ", ".join(sorted(self.env.tools)) or "none"
            return _resolved(
                call, f"Unknown tool {call.name!r}. Available tools: {available}.", "unknown_tool"
            )
        if self.spec.tool_choice is ToolChoice.NONE:
            # The model was told it may not call tools; a call it makes anyway is answered, not run.
            return _resolved(
                call,
                f"Tool calls are turned off for this run (tool_choice none): {call.name} was not run.",
                "denied",
            )
        permission = self.env.permissions(call.name)
        if permission is Permission.DENY:
            return _resolved(
                call, f"Permission denied: the {call.name} tool is not allowed in this run.", "denied"
            )
        try:
            tool.validate(call.arguments)
        except ToolArgumentError as exc:
            return _resolved(call, f"Invalid arguments for {call.name}: {exc}", "invalid_arguments")
        kind = tool.interrupt_kind
        if kind is None and call.name in self.spec.gated_tools:
            kind = InterruptKind.TOOL_RESULT
        if kind is None and permission is Permission.ASK:
            kind = InterruptKind.APPROVAL
        if kind is None:
            return PendingCall(call, READY)
        now = self.env.clock()
        timeout = self.spec.approval_timeout_ms
        interrupt = Interrupt(
            interrupt_id=f"int_{call.call_id}",
            kind=kind,
            call_id=call.call_id,
            tool_name=call.name,
            arguments=call.arguments,
            description=tool.describe(call.arguments),
            created_at=now,
            question=str(call.arguments.get("question", "")) if kind is InterruptKind.INPUT else "",
            expires_at=now + timeout / 1000 if timeout and kind is InterruptKind.APPROVAL else 0.0,
            input_schema=tool.input_schema,
        )
        return PendingCall(call, PENDING, interrupt)

    async def _dispatch(self) -> bool:
        """Run the turn's READY calls concurrently; append results in call order.

        Returns False when the run was handed to a runner instead (a READY call
        is a capability stub and the run is async with a runner configured).
        """
        pending = self.record.pending
        stubs = [p for p in pending if p.status == READY and self.env.tools[p.call.name].missing]
        if stubs and self.env.handoff is not None:
            await self._hand_off(sorted({p.call.name for p in stubs}))
            return False
        for p in stubs:
            missing = self.env.tools[p.call.name].missing
            p.status, p.result_text, p.result_is_error, p.outcome = (
                RESOLVED,
                capability_error(p.call.name, missing),
                True,
                "capability_missing",
            )
            if p.call.name not in self.record.meta.capabilities_missing:
                self.record.meta.capabilities_missing.append(p.call.name)
        results: dict[str, tuple[str, bool]] = {}
        for p in pending:
            if p.status == RESOLVED:
                # A call that does not run is on the record too, with why: the model sees its result.
                self._record_unrun(p)
                results[p.call.call_id] = (p.result_text, p.result_is_error)
        ready = [p for p in pending if p.status == READY]
        if ready:
            outcomes = await asyncio.gather(*(self._run_call(p.call) for p in ready))
            results.update((p.call.call_id, outcome) for p, outcome in zip(ready, outcomes, strict=True))
        for p in pending:
            text, is_error = results[p.call.call_id]
            self.transcript.append(
                Message("tool", text, call_id=p.call.call_id, tool_name=p.call.name, is_error=is_error)
            )
        self.record.pending = []
        await self.checkpoint()
        return True

    def _record_unrun(self, p: PendingCall) -> None:
        """A call that never started still completes on the record, with why and its result."""
        self.emit(
            EventKind.TOOL_CALL_COMPLETED,
            {
                "call_id": p.call.call_id,
                "tool": p.call.name,
                "is_error": p.result_is_error,
                "size": len(p.result_text.encode()),
                "output": p.result_text,
                "duration_ms": 0,
                "outcome": p.outcome or ("rejected" if p.result_is_error else "responded"),
            },
        )

    async def _hand_off(self, tools: list[str]) -> None:
        """Pause HANDOFF_TO_RUNNER and POST the run to the runner; fail clearly if it cannot take it."""
        record = self.record
        assert self.env.handoff is not None
        await self._snapshot_workdir()
        self._show_until_committed()
        self._account_time()
        record.state, record.pause_reason = RunState.PAUSED, PauseReason.HANDOFF_TO_RUNNER
        record.handoff_at, record.handoff_attempts = self.env.clock(), 1
        self.emit(EventKind.HANDOFF_TO_RUNNER, {"tools": tools})
        self.emit(EventKind.PAUSED, {"reason": PauseReason.HANDOFF_TO_RUNNER.value, "interrupts": []})
        await self.checkpoint()
        if await self._cancelled_at_pause():
            return
        self.ending = True
        # The runner takes the lease itself, so it must be free before the POST.
        await self.release(close_feed=False)
        try:
            await self.env.handoff(*self.key)
        except RunnerUnreachable as exc:
            await self._handoff_failed(str(exc))
            return
        self.feed.close()

    async def hand_off_again(self) -> None:
        """A handed-off run no runner took (we hold its lease): ask the runner again.

        A failed POST counts as an attempt; the recovery sweep asks again later or gives up.
        """
        record = self.record
        assert self.env.handoff is not None
        record.handoff_at, record.handoff_attempts = self.env.clock(), record.handoff_attempts + 1
        await self.checkpoint()
        await self.release(close_feed=False)
        log.warning("handing run %s to the runner again (attempt %d)", record.run_id, record.handoff_attempts,
                    extra={"run_id": record.run_id})  # fmt: skip
        try:
            await self.env.handoff(*self.key)
        except RunnerUnreachable as exc:
            log.warning("re-handoff of %s failed: %s", record.run_id, exc, extra={"run_id": record.run_id})
        self.feed.close()

    async def runner_lost(self) -> None:
        """No runner took the run after every attempt: fail it clearly; resuming retries it."""
        attempts = self.record.handoff_attempts
        await self._finish(
            RunState.FAILED,
            error=RunError(
                "ERR_RUNNER_LOST",
                f"no runner took the run after {attempts} handoffs",
                {"attempts": str(attempts)},
            ),
            keep_pending=True,
        )

    async def _handoff_failed(self, reason: str) -> None:
        ws, run_id = self.key
        current = await self.env.storage.read_state(ws, run_id)
        if current is None or current.get("last_seq") != self.record.last_seq or not await self.take_over():
            # The runner took the run after all (e.g. it answered after our timeout).
            self.feed.close()
            return
        # The pending calls stay in the checkpoint: resuming the run retries the handoff.
        await self._finish(
            RunState.FAILED,
            error=RunError("ERR_RUNNER_UNREACHABLE", f"the runner could not take the run: {reason}"),
            keep_pending=True,
        )

    async def _run_call(self, call: ToolCall) -> tuple[str, bool]:
        tool = self.env.tools[call.name]
        self._workdir_dirty = True
        self.emit(EventKind.TOOL_CALL_STARTED, {"call": call.to_json()})
        started = time.perf_counter()
        ctx = ToolContext(
            self.record.run_id,
            self.record.workspace_id,
            call.call_id,
            workdir=self.env.workdir,
            emit=self._emit_from_tool,
            fetch_result=self._fetch_result,
            sandbox_network=self.spec.sandbox_network,
        )
        text, is_error = await call_tool(tool, call.arguments, ctx)
        size = len(text.encode())
        if len(text) > self.env.max_result_chars:
            # The model gets a head and a ref; the whole payload stays retrievable (FetchData, API).
            ws, run_id = self.key
            blob = text.encode()

            async def store() -> None:
                await self.env.storage.put_blob(ws, run_id, result_blob_name(call.call_id), blob)

            await self._retrying_storage("storing a tool result", store)
            shown = self.env.max_result_chars
            text = text[:shown] + truncation_note(call.call_id, shown, len(text))
        self.emit(
            EventKind.TOOL_CALL_COMPLETED,
            {
                "call_id": call.call_id,
                "tool": call.name,
                "is_error": is_error,
                "size": size,
                "output": text,
                "duration_ms": int((time.perf_counter() - started) * 1000),
                "outcome": "ran",
            },
        )
        return text, is_error

    def _idempotent(self, name: str) -> bool:
        tool = self.env.tools.get(name)
        return tool is not None and tool.idempotent

    def _notify(self, event: str) -> None:
        if self.env.notify is not None and self.record.webhook:
            self.env.notify(self.record, event)

    def _emit_from_tool(self, kind: str, data: JsonObject) -> None:
        if kind not in _TOOL_EVENTS:
            raise ValueError(f"tools may not emit {kind!r} events")
        self.emit(EventKind(kind), data)

    async def _fetch_result(self, ref: str) -> str | None:
        blob = await self.env.storage.get_blob(*self.key, result_blob_name(ref))
        return None if blob is None else blob.decode("utf-8", errors="replace")

    # -- decisions -------------------------------------------------------------------

    def record_decision(
        self, pending: PendingCall, decision: str, by: str, *, expired: bool = False, reason: str = ""
    ) -> None:
        assert pending.interrupt is not None
        self.emit(
            EventKind.APPROVAL_DECIDED,
            {
                "interrupt_id": pending.interrupt.interrupt_id,
                "decision": decision,
                "by": by,
                "at": self.env.clock(),
                "sha256": arguments_digest(pending.call.arguments) if pending.status == READY else "",
                "expired": expired,
                "reason": reason,
            },
        )


# Event kinds shown to watchers only once the checkpoint that commits them lands.
_SHOWN_AT_COMMIT = frozenset({EventKind.HANDOFF_TO_RUNNER, EventKind.PAUSED, EventKind.RUN_FINISHED})
# A structured final answer longer than this is validated in a worker thread.
_INLINE_ANSWER_CHARS = 16_384

# Event kinds a tool may emit itself (metering).
_TOOL_EVENTS = frozenset({EventKind.API_CALL.value})

_REQUEST_EVENT = {
    InterruptKind.APPROVAL: EventKind.APPROVAL_REQUESTED,
    InterruptKind.INPUT: EventKind.INPUT_REQUESTED,
    InterruptKind.TOOL_RESULT: EventKind.TOOL_RESULT_REQUESTED,
}


def _resolved(call: ToolCall, text: str, outcome: str) -> PendingCall:
    return PendingCall(call, RESOLVED, result_text=text, result_is_error=True, outcome=outcome)


def arguments_digest(arguments: JsonObject) -> str:
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _schema_problem(text: str, schema: JsonObject) -> str | None:
    import jsonschema

    try:
        value = loads_untrusted(text)
    except json.JSONDecodeError as exc:
        return f"not JSON ({exc.msg} at position {exc.pos})"
    except ValueError as exc:
        return f"not usable JSON ({exc})"
    if too_deep(value):
        return f"(root): nested deeper than {MAX_DEPTH} levels"
    error = jsonschema.exceptions.best_match(SchemaValidator(schema).iter_errors(value))
    if error is None:
        return None
    where = ".".join(str(p) for p in error.path) or "(root)"
    return f"{where}: {error.message}"
