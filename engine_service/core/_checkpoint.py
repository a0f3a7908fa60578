"""A run's durable side: events, checkpoints, the lease, snapshots of its directory, its end."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine_service.core import _metrics as metrics
from engine_service.core import _telemetry as telemetry
from engine_service.core._control import ControlPlane, LocalControl
from engine_service.core._feed import EventFeed
from engine_service.core._ids import is_valid_id
from engine_service.core._logging import run_transition
from engine_service.core._run import AgentState, RunError, RunRecord, RunSpec
from engine_service.core._types import Event, EventKind, JsonObject, Message, Permission, RunState
from engine_service.models import ModelAdapter
from engine_service.storage._protocol import (
    Checkpoint,
    StateConflict,
    Storage,
    StorageUnavailable,
    storage_fault,
)
from engine_service.storage._workdir_snapshot import WorkdirSnapshots, WorkdirTooLarge
from engine_service.tools._registry import Tool

if TYPE_CHECKING:
    from engine_service.core._decisions import PausedRun

log = logging.getLogger("machina.engine")

CANCEL_REQUEST = "cancel-request"  # the blob where another process asks for a cancel


def transcript_blob(path: str) -> str:
    """The blob holding the transcript of the subagent at ``path`` (core/_subagents.py).

    Hashed: a path is made of call ids a model chose, so it must not pick the name (collide
    with another subagent's or another of the run's blobs, or be too long for a name)."""
    return "agent-" + hashlib.sha256(path.encode()).hexdigest()[:40] + "-transcript"


def legacy_transcript_blob(path: str) -> str | None:
    """The name runs stored before names were hashed used (None if it is not a valid name)."""
    name = f"agent-{path.replace('/', '.')}-transcript"
    return name if is_valid_id(name) else None


class LeaseLost(Exception):
    """Another process holds the run's lease now; this one must stop writing."""


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
    # USD per million input / output / cache-read / cache-write tokens.
    price: tuple[float, float, float, float]
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
    # checkpoint for the recovery sweep (see RunActor._execute).
    storage_retry_s: float = 300.0
    # Tells the other replicas of commits and new events (LocalControl: there are none to tell).
    control: ControlPlane = field(default_factory=LocalControl)
    # How deep subagents may nest (core/_subagents.py).
    max_agent_depth: int = 2
    # How many subagents of the run's tree may work at once (core/_subagents.py).
    max_parallel_agents: int = 8
    # The model's context window in tokens (0 = unknown: no compaction), the share of it past
    # which older turns are summarised, and how many recent turns the model keeps seeing whole.
    context_window_tokens: int = 0
    compact_at: float = 0.8
    compact_keep_turns: int = 4
    # How long the checkpoint after a turn's tool calls may wait for the run's next one, which
    # then commits both (see CheckpointedRun.checkpoint); 0 = it is written at once.
    commit_delay: float = 0.0


@dataclass(slots=True)
class _Owed:
    """A checkpoint taken but not written yet: the state document as it was, the last event
    and the transcript entries it commits."""

    state: JsonObject
    upto: int
    transcript_len: int


# At most this many text deltas in one event: the messages built from it go in one response.
_DELTAS_PER_EVENT = 1024

# Event kinds shown to watchers only once the checkpoint that commits them lands.
_SHOWN_AT_COMMIT = frozenset({EventKind.HANDOFF_TO_RUNNER, EventKind.PAUSED, EventKind.RUN_FINISHED})


class CheckpointedRun:
    """A run being moved by this process: its record, transcript, events and lease."""

    def __init__(
        self,
        record: RunRecord,
        spec: RunSpec,
        transcript: list[Message] | None,
        env: RunEnv,
        *,
        workdir_dirty: bool = True,
    ) -> None:
        """``transcript`` None: the committed one is read by `take_over`, once the run is ours.
        ``workdir_dirty`` False: the run directory is as its last snapshot left it."""
        self.record = record
        self.spec = spec
        self.transcript = transcript or []
        # The thread's history the model sees before the transcript (read when first needed),
        # its size, and the list that joins it to the run's own view (see RunActor._with_history).
        self._thread_history: list[Message] | None = None
        self._thread_chars = 0
        self._joined: list[Message] = []
        self._joined_view: object = None
        self._joined_len = 0
        self._transcript_read = transcript is not None
        self.env = env
        # Watchers see an event once it is written (the feed); until then it waits in
        # _unwritten. Every event a watcher saw therefore survives a crash.
        self.feed = EventFeed(record.last_seq)
        self._last_seq = record.last_seq  # of the last event emitted, written or not
        self._unwritten: list[Event] = []
        # The text delta event last in _unwritten, its turn and its texts: the next delta of that
        # turn joins it (see emit_text). None once something else follows it or it is taken.
        self._open_text: Event | None = None
        self._open_turn = 0
        self._open_texts: list[str] = []
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
        # Whether this actor took the lease: the first take may take it over from an expired
        # holder; from then on it is only extended, never taken back from a process that took it.
        self._lease_taken = False
        # Until when the lease is known to be ours (the clock when its last renewal was asked, plus
        # its ttl): past that, another process may have taken the run, so nothing is written
        # before a renewal says it has not.
        self._lease_valid_until = 0.0
        self._active_since = 0.0
        self._lease_lost = False
        # Set once the lease is given up (a pause or an end): this actor no longer speaks for the run.
        self.lease_released = False
        # Set once the run is past its last point of cancellation: it started committing its end
        # (one end per run), or its pause is committed (a cancel then applies to the paused run).
        self.ending = False
        # The start (RUNNING, run_started/resumed) was committed before the task began.
        self._start_committed = False
        # A tool may have changed the run directory since its last snapshot.
        self._workdir_dirty = workdir_dirty
        # The transcripts of the subagents moved here so far, by path (core/_subagents.py).
        self._child_transcripts: dict[str, list[Message]] = {}
        self._child_models: dict[str, ModelAdapter] = {}
        self._child_written: dict[str, int] = {}  # entries of each transcript blob written
        # Subagents being moved right now (one mover each: a repeated call id starts no second).
        self._moving_agents: set[str] = set()
        # Subagents whose answers their parents' transcripts now hold: the next checkpoint drops
        # them from the state document (their transcripts and events stay), which so stays small.
        self._retiring: set[str] = set()
        # One commit at a time: parallel subagents each checkpoint.
        self._commit_lock = asyncio.Lock()
        # What this process kept of the run at its last pause here, when it was resumed from that.
        self.paused_from: PausedRun | None = None
        # A checkpoint taken after tool calls and not written yet (see checkpoint), and what
        # writes it once commit_delay has passed if no other checkpoint has by then.
        self._owed: _Owed | None = None
        self._owed_timer: asyncio.TimerHandle | None = None
        self._owed_task: asyncio.Task[None] | None = None
        self._landed_at = 0.0  # when the last checkpoint was written (the loop's clock)

    @property
    def key(self) -> tuple[str, str]:
        return (self.record.workspace_id, self.record.run_id)

    def transition(self, name: str, **fields: Any) -> None:
        """Log one of the run's transitions (see `run_transition`)."""
        trace_id = telemetry.trace_id_of(self.spec.traceparent) or telemetry.current_trace_id()
        run_transition(name, self.record.run_id, self.record.workspace_id, trace_id=trace_id, **fields)

    def view(self) -> RunRecord:
        """The run as readers may see it: never a pause or an end before it is committed."""
        return self._shown or self.record

    def emit(self, kind: EventKind, data: JsonObject, agent_path: str = "") -> Event:
        if kind is EventKind.TEXT_DELTA:
            return self.emit_text(data["text"], data["turn"], agent_path)
        self._last_seq += 1
        event = Event(self._last_seq, self.env.clock(), kind, data, agent_path)
        self._unwritten.append(event)
        self._open_text = None
        self._write_wanted.set()
        return event

    def emit_text(self, text: str, turn: int, agent_path: str = "") -> Event:
        """Emit a text delta: joined to the previous one while both wait to be written, so the
        deltas of one flush are one record (and one event) instead of one each. Returns the
        event that holds it. (Called once per token: kept to a few attribute reads.)"""
        self._last_seq += 1
        last = self._open_text
        if (
            last is not None
            and turn == self._open_turn
            and last.n < _DELTAS_PER_EVENT
            and last.agent_path == agent_path
        ):
            self._open_texts.append(text)
            last.n += 1
            return last
        texts = [text]
        event = Event(
            self._last_seq,
            self.env.clock(),
            EventKind.TEXT_DELTA,
            {"texts": texts, "turn": turn},
            agent_path,
        )
        self._unwritten.append(event)
        self._open_text, self._open_turn, self._open_texts = event, turn, texts
        self._write_wanted.set()
        return event

    async def write_events(self) -> None:
        """Write the events emitted so far, then show them to watchers.

        A pause or an end is written in a segment of its own and shown only once the
        checkpoint that commits it lands: if that commit fails, recovery drops it unseen.
        """
        async with self._write_lock:
            if not self._unwritten:
                return
            await self._fence()
            batch = self._unwritten  # taken now: what was emitted while the lease was renewed too
            self._unwritten = []
            self._open_text = None  # taken: what it holds is written as it is now
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
                self._written_seq = part[-1].last_seq
                if self._held or part[0].kind in _SHOWN_AT_COMMIT:
                    self._held.extend(part)
                else:
                    self.feed.publish_many(part)
                    self.env.control.shown(ws, run_id, part[-1].seq)

    async def _writer(self) -> None:
        """Write events ahead as they come, so watchers see them within a write's time."""
        delay = self.env.storage.event_flush_delay
        loop = asyncio.get_running_loop()
        backoff = 0.1
        while True:
            await self._write_wanted.wait()
            if delay:
                await asyncio.sleep(delay)
                # Checkpoints coming this often write the events with them (and show them as
                # soon): a write of its own would only hold the next one up.
                while True:
                    wait = self._landed_at + delay - loop.time()
                    if wait <= 0:
                        break
                    await asyncio.sleep(wait)
            self._write_wanted.clear()
            try:
                await self.write_events()
                backoff = 0.1
            except LeaseLost:
                self._stop_for_lost_lease()
                return
            except Exception:  # a storage hiccup: the next write or the checkpoint retries
                log.warning("writing events of run %s failed; will retry", self.record.run_id, exc_info=True)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self._write_wanted.set()

    async def checkpoint(self, *, after_tools: bool = False) -> None:
        """Commit the events and transcript entries so far, then the state document.

        While storage is unavailable (read-only, full, answering 5xx) the run waits here,
        retrying with backoff; past ``storage_retry_s`` it raises StorageUnavailable.

        ``after_tools``: the checkpoint records finished tool calls, and the run goes on to a
        model call. With ``commit_delay`` it is taken now (a consistent state: the directory's
        snapshot, the state document, the transcript's length) but written only when the run's
        next checkpoint comes, which commits it too (one write, and with fsync one sync, a turn
        instead of two), or once ``commit_delay`` has passed. A crash in between loses it: the
        run recovers from the checkpoint before the calls and reports them interrupted, the
        same as a crash during them.
        """
        if after_tools and self.env.commit_delay > 0 and self._may_owe():
            async with self._commit_lock:
                await self._retrying_storage("checkpoint", self._owe)
            return
        async with self._commit_lock:
            await self._retrying_storage("checkpoint", self._commit)

    def _may_owe(self) -> bool:
        # Subagents' transcripts are written whole at checkpoints, and pauses and ends must be
        # committed before they are shown: those checkpoints are written at once.
        return not (self._child_transcripts or self._retiring or self._held or self._shown is not None)

    async def _owe(self) -> None:
        await self._snapshot_workdir()
        record = self.record
        record.transcript_len = len(self.transcript)
        record.updated_at = self.env.clock()
        self._owed = _Owed(record.to_json(), self._last_seq, record.transcript_len)
        if self._owed_timer is None:  # the first one owed waits the longest: it bounds the delay
            loop = asyncio.get_running_loop()
            self._owed_timer = loop.call_later(self.env.commit_delay, self._owed_due)

    def _owed_due(self) -> None:
        self._owed_timer = None
        if self._owed is not None and (self._owed_task is None or self._owed_task.done()):
            self._owed_task = asyncio.create_task(self._pay_owed())

    async def _pay_owed(self) -> None:
        """Write the owed checkpoint (its time is up, or the run is being stopped here)."""
        try:
            async with self._commit_lock:
                if self._owed is not None:
                    await self._retrying_storage("checkpoint", self._commit_owed)
        except LeaseLost:
            self._stop_for_lost_lease()
        except Exception:  # the run's next checkpoint commits what it holds
            log.warning("writing a checkpoint of run %s failed", self.record.run_id, exc_info=True)

    async def _commit_owed_once(self) -> None:
        """Write the owed checkpoint, if any, without retrying (the run is being stopped here)."""
        async with self._commit_lock:
            await self._commit_owed()

    def _forgive_owed(self) -> None:
        """A checkpoint being taken commits all an owed one would."""
        self._owed = None
        if self._owed_timer is not None:
            self._owed_timer.cancel()
            self._owed_timer = None

    async def _commit_owed(self) -> None:
        owed = self._owed
        if owed is None:
            return
        await self._fence()
        first = self._transcript_committed + 1
        entries = [m.to_json() for m in self.transcript[self._transcript_committed : owed.transcript_len]]
        batch = await self._write(owed.state, owed.upto, first, entries, {})
        if self._owed is owed:
            self._owed = None
        if self._held:  # behind a pause or an end being committed: shown with it
            self._held.extend(batch)
        elif batch:
            self.feed.publish_many(batch)
        await self._landed(owed.state)

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
        record = self.record
        await self._fence()
        await self._snapshot_workdir()
        self._forgive_owed()
        # What this checkpoint commits is taken at one instant: subagents running in parallel
        # (core/_subagents.py) move on while it is written, and a state document that counted a
        # turn whose transcript entry or events it does not commit would not recover.
        upto = self._last_seq
        first = self._transcript_committed + 1
        new_entries = [m.to_json() for m in self.transcript[self._transcript_committed :]]
        child_blobs = {
            path: [m.to_json() for m in entries]
            for path, entries in self._child_transcripts.items()
            if self._child_written.get(path) != len(entries)
        }
        retired = set(self._retiring)
        for path in retired:
            record.children.pop(path, None)
        for path, entries in self._child_transcripts.items():
            if path in record.children:
                record.children[path].transcript_len = len(entries)
        record.transcript_len = len(self.transcript)
        record.updated_at = self.env.clock()
        doc = record.to_json()
        # A subagent's transcript is rewritten whole: it is short next to its run's.
        blobs = {transcript_blob(path): json.dumps(docs).encode() for path, docs in child_blobs.items()}
        self._held.extend(await self._write(doc, upto, first, new_entries, blobs))
        for path, docs in child_blobs.items():
            self._child_written[path] = len(docs)
        for path in retired:  # their whole transcripts are written: nothing more to keep here
            self._forget_child(path)
        self._retiring -= retired
        self._shown = None
        if self._held:
            self.feed.publish_many(self._held)
            self._held = []
        await self._landed(doc)

    async def _write(
        self, doc: JsonObject, upto: int, first: int, entries: list[JsonObject], blobs: dict[str, bytes]
    ) -> list[Event]:
        """Commit ``doc`` with the events up to ``upto`` not written yet, the transcript entries
        from ``first`` and ``blobs``. ``doc``'s ``last_seq`` becomes ``upto``, or the last event
        written if less. Returns the events it wrote."""
        ws, run_id = self.key
        async with self._write_lock:
            # The events not written ahead yet go with the checkpoint: one write, not two.
            batch = self._unwritten
            cut = len(batch)
            while cut and batch[cut - 1].seq > upto:
                cut -= 1
            batch, self._unwritten = batch[:cut], batch[cut:]
            if not self._unwritten:
                self._open_text = None  # taken: what it holds is written as it is now
            written = batch[-1].last_seq if batch else self._written_seq
            doc["last_seq"] = min(upto, written)
            checkpoint = Checkpoint(doc, first, entries, blobs, [e.to_json() for e in batch])
            try:
                await self.env.storage.commit(ws, run_id, checkpoint)
            except BaseException as exc:
                self._unwritten[:0] = batch  # the next attempt commits them
                if isinstance(exc, StateConflict):
                    raise LeaseLost(f"run {run_id} was moved on by another process") from None
                raise
            self._written_seq = written
            self._landed_at = asyncio.get_running_loop().time()
        self.record.last_seq = doc["last_seq"]
        self._transcript_committed = doc["transcript_len"]
        return batch

    async def _landed(self, doc: JsonObject) -> None:
        """A checkpoint landed: tell the other replicas, keep the lease."""
        await self.env.control.committed(doc)  # never raises: an unreachable index catches up later
        await self._renew_lease()

    async def _snapshot_workdir(self) -> None:
        snapshots, workdir = self.env.snapshots, self.env.workdir
        if snapshots is None or workdir is None or not self._workdir_dirty:
            return
        try:
            record = self.record
            record.workdir_manifest, record.workdir_inline = await snapshots.take(
                self.env.storage, *self.key, workdir
            )
        except WorkdirTooLarge:
            if self.task is not None and not self.record.state.terminal:
                raise  # the run fails with it
            # Ending, or recording decisions while paused: keep the last snapshot that fitted
            # (a paused run that grew too large fails at its first checkpoint once it runs).
            log.warning("run %s: its directory is too large to snapshot", self.record.run_id)
            return
        self._workdir_dirty = False

    @property
    def workdir_dirty(self) -> bool:
        return self._workdir_dirty

    def _show_until_committed(self) -> None:
        """Keep showing readers the run as it is now until the next checkpoint commits."""
        if self._shown is None:  # a failed commit: what readers see is still the older state
            self._shown = RunRecord.from_json(self.record.to_json())

    async def take_over(self, expected: JsonObject | None = None) -> bool:
        """Acquire the lease and drop what a dead writer left uncommitted.

        The record was read before the lease was ours; if another writer moved
        the run in between, it is stale and we back off (False). ``expected``: the
        state document the record came from, which storage must still hold exactly
        (a run this process paused, kept in memory since).
        """
        ws, run_id = self.key
        asked = self.env.clock()
        if not await self.env.storage.acquire_lease(ws, run_id, self.env.owner, self.env.lease_ttl):
            return False
        current = await self.env.storage.read_state(ws, run_id)
        if current is None or (
            current != expected
            if expected is not None
            else (current["last_seq"], current["state"]) != (self.record.last_seq, self.record.state.value)
        ):
            await self.env.storage.release_lease(ws, run_id, self.env.owner)
            return False
        self.lease_released = False  # ours again (a handoff the runner could not take comes back)
        self._lease_taken = True
        self._lease_valid_until = asked + self.env.lease_ttl
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
                    self.env.storage,
                    ws,
                    run_id,
                    self.env.workdir,
                    current.get("workdir_manifest", ""),
                    current.get("workdir_inline", ""),
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
        # From here on another process may move the run: readers go to storage, not to this actor.
        self.lease_released = True
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
        if self.lease_released:
            # Given up (a pause, an end): renewing now would take it again, and keep every other
            # process from moving the run until it expired.
            return
        now = self.env.clock()
        if now >= self._lease_renew_at:
            ws, run_id = self.key
            storage, owner, ttl = self.env.storage, self.env.owner, self.env.lease_ttl
            if self._lease_taken:
                held = await storage.renew_lease(ws, run_id, owner, ttl)
            else:
                held = self._lease_taken = await storage.acquire_lease(ws, run_id, owner, ttl)
            if not held:
                if self._released_meanwhile():
                    return  # given up while this renewal was under way (the heartbeat raced the end)
                raise LeaseLost(f"run {run_id} is now moved by another process")
            if self._released_meanwhile():
                # Released while this renewal was under way (the heartbeat races the end): the
                # renewal took the lease again, so give it back.
                await self.env.storage.release_lease(ws, run_id, self.env.owner)
                return
            self._lease_valid_until = now + ttl
            self._lease_renew_at = now + self.env.lease_ttl / 3

    async def _fence(self) -> None:
        """Write only under a lease known to be ours. A process that stalled past its lease (a
        long GC pause, a suspended VM, a stuck disk) renews it first, which fails (LeaseLost) if
        another process took the run meanwhile: it never writes over that process's work."""
        if self.env.clock() >= self._lease_valid_until - self.env.lease_ttl / 10:
            self._lease_renew_at = 0.0
            await self._renew_lease()

    def _stop_for_lost_lease(self) -> None:
        log.warning("lost the lease of run %s; stopping it here", self.record.run_id)
        self._lease_lost = True
        if self.task is not None:
            self.task.cancel()

    def _released_meanwhile(self) -> bool:
        return self.lease_released

    async def _heartbeat(self) -> None:
        """Keep the lease alive through long model calls and tool calls (no checkpoint then)."""
        while True:
            await asyncio.sleep(self.env.lease_ttl / 3)
            try:
                await self._renew_lease()
            except LeaseLost:
                self._stop_for_lost_lease()
                return
            except Exception:  # a storage hiccup: the next beat or checkpoint retries
                log.warning("lease renewal of run %s failed; will retry", self.record.run_id, exc_info=True)

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
        if record.children:
            ended = AgentState.CANCELLED if state is RunState.CANCELLED else AgentState.FAILED
            self.end_children(ended, error.message if error is not None else "the run ended")
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
        code = "" if error is None else error.code
        metrics.RUNS_FINISHED.inc(state.value.lower(), code)
        self.transition(
            state.value.lower(),
            error_code=code,
            turns=record.meta.turns,
            cost_usd=round(record.meta.cost_usd, 6),
        )

    def _forget_child(self, path: str) -> None:
        self._child_transcripts.pop(path, None)
        self._child_written.pop(path, None)
        self._child_models.pop(path, None)

    def end_children(self, state: AgentState, reason: str) -> None:
        """The run ends: so do its subagents still running (core/_subagents.py)."""

    async def cancel_now(self) -> None:
        """Cancel a run that is not executing (paused, or orphaned while queued)."""
        await self._finish(
            RunState.CANCELLED, error=RunError("ERR_CANCELLED", self.cancel_reason or "cancelled")
        )

    def _notify(self, event: str) -> None:
        if self.env.notify is not None and self.record.webhook:
            self.env.notify(self.record, event)
