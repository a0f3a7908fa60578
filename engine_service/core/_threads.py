"""Threads: the conversation a sequence of runs shares, and forks of it.

A run started on a thread sees the thread's history, then its own task. The history is never
copied: a run's spec holds *segments* ``[{"run_id", "upto"}]`` (the first ``upto`` transcript
entries of that run), and the model request is built from the segments' transcripts. Run N
of a thread has the segments of run N-1 plus run N-1 itself, so starting it reads two small
documents whatever N is.

Workspace documents (see ``storage._protocol``):

- ``threads/{thread}``: the thread (labels, creation time, the ``base`` segments a fork
  starts from, where it was forked from);
- ``thread-runs/{thread}/{n:08d}``: the run holding place ``n`` of the thread, written
  create-only: whoever writes place ``n`` starts the thread's next run, everyone else is
  told the thread is busy (one active run per thread);
- ``forks/{run}/{thread}``: the history of fork ``thread`` includes run ``run`` (so the run
  is not deleted under it);
- ``thread-index/{when}.{digest}``: one per thread document, named so that listing the
  folder yields the threads newest first (``when`` counts down with the thread's creation
  time, ``digest`` is a hash of its id); it holds the id, creation time and labels, so a page
  of ListThreads reads the index entries it shows (and skips) and the documents of the threads
  on it, not every thread. Threads whose entry is missing (written before there was an index,
  or by a start that died between the two writes) get one when a listing finds them missing;
- ``thread-closing/{thread}``: the thread is being deleted (`Deleter`). A deletion writes it,
  then lists the thread's places; a start claims its place, then reads it. Whichever comes
  second sees the other, so a thread is never deleted with a run starting on it, nor does a
  run start on a thread being deleted. The deletion renews the mark while it works
  (``CLOSING_BEAT_S``); a mark not renewed for ``CLOSING_STALE_S`` was left by a deletion that
  died, and another DeleteThread takes it over; runs ignore a mark only once it has not been
  renewed for ``CLOSING_GRACE_S``.

A run started without a thread is the first run of a thread of its own, named by its run id;
the thread's documents are written when a second run joins it or it is forked.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import hashlib
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine_service.core._compaction import model_view
from engine_service.core._errors import EngineError, ErrorKind, invalid, not_found, precondition
from engine_service.core._ids import check_id, new_id
from engine_service.core._run import RunRecord, RunSpec
from engine_service.core._types import EventKind, JsonObject, Message, RunState
from engine_service.storage._protocol import Storage

if TYPE_CHECKING:
    from engine_service.core._engine import Engine

# A place claimed this long ago whose run was never created is abandoned (its creator died).
CLAIM_GRACE_S = 30.0
# A thread's deletion renews its closing mark this often while it works ("beat")...
CLOSING_BEAT_S = 10.0
# ... so a mark not renewed for this long was left by a deletion that died: another
# DeleteThread takes it over and finishes the work.
CLOSING_STALE_S = 60.0
# Runs do not start on a thread while its mark was renewed less than this long ago (far longer
# than a deletion stalls on storage, so no run starts on a thread still being deleted).
CLOSING_GRACE_S = 600.0


def thread_key(thread_id: str) -> str:
    return f"threads/{thread_id}"


def slot_key(thread_id: str, slot: int) -> str:
    return f"thread-runs/{thread_id}/{slot:08d}"


def fork_key(run_id: str, thread_id: str) -> str:
    return f"forks/{run_id}/{thread_id}"


def closing_key(thread_id: str) -> str:
    return f"thread-closing/{thread_id}"


_INDEX = "thread-index"
_INDEX_NAME = re.compile(r"[0-9]{14}\.[0-9a-f]{24}")


def index_key(created_at: float, thread_id: str) -> str:
    """The thread's index entry: sorted by name, the newest thread comes first."""
    when = max(0, 10**14 - 1 - int(created_at * 1000))
    return f"{_INDEX}/{when:014d}.{_digest(thread_id)}"


def _digest(thread_id: str) -> str:
    return hashlib.sha256(thread_id.encode()).hexdigest()[:24]


def index_entry(doc: JsonObject) -> JsonObject:
    return {"thread_id": doc["thread_id"], "created_at": doc["created_at"], "labels": doc.get("labels", {})}


def run_active(engine: Engine, record: RunRecord) -> bool:
    """Whether the run is still going: its state is not final, or a process here still holds
    its lease (it is committing its end). Such a run is not deleted, and its thread takes no
    new run."""
    live = engine._active.get((record.workspace_id, record.run_id))
    return not record.state.terminal or (live is not None and not live.lease_released)


@dataclass(slots=True)
class Placement:
    """Where a new run goes: its thread, its place there and the history it sees."""

    thread_id: str
    slot: int
    context: list[JsonObject]
    # A fork: its thread document and fork marks were written for this run, and go if it fails to start.
    forked: bool = False
    # Documents this start wrote to open the thread (they go if the thread turns out to be closing).
    opened: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Thread:
    thread_id: str
    workspace_id: str
    created_at: float
    updated_at: float
    labels: dict[str, str] = field(default_factory=dict)
    run_ids: list[str] = field(default_factory=list)
    # The run whose state is not final yet ("" when the thread takes a new run).
    active_run_id: str = ""
    forked_from: JsonObject | None = None
    base: list[JsonObject] = field(default_factory=list)


async def load_context(storage: Storage, ws: str, segments: list[JsonObject]) -> list[Message]:
    """What the model sees of the transcript entries the segments name, in order: each run's
    as its own model saw it (older turns it compacted stay summarised, see `model_view`). A
    deleted run contributes nothing."""
    parts = await asyncio.gather(
        *(storage.read_segments(ws, seg["run_id"], "transcript", 0, int(seg["upto"])) for seg in segments)
    )
    return [m for docs in parts for m in model_view([Message.from_json(doc) for doc in docs])]


class ThreadDesk:
    """Places new runs on threads and forks; answers GetThread and ListThreads."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def _storage(self) -> Storage:
        return self._engine.storage

    # -- placing a new run -----------------------------------------------------------------

    async def place(self, ws: str, spec: RunSpec, now: float, *, id_chosen: bool = True) -> Placement | None:
        """Claim the run's place on its thread (None: a run of its own). Raises ERR_THREAD_BUSY
        while the thread's latest run is active or paused.

        A run of its own starts a thread named by its run id: an id the caller chose
        (``id_chosen``) must not be a thread's already (ERR_THREAD_EXISTS)."""
        if spec.fork_from is not None:
            return await self._fork(ws, spec, now)
        if not spec.thread_id:
            if id_chosen and await self._storage.get_doc(ws, thread_key(spec.run_id)) is not None:
                raise EngineError(
                    "ERR_THREAD_EXISTS",
                    f"a thread named {spec.run_id!r} exists, and a run started without a thread starts "
                    "a thread named by its run id; give the run another id, or start it on that thread "
                    "(thread_id)",
                    kind=ErrorKind.ALREADY_EXISTS,
                    metadata={"thread_id": spec.run_id},
                )
            return None
        thread_id = check_id(spec.thread_id, "thread_id")
        doc, closing = await asyncio.gather(
            self._storage.get_doc(ws, thread_key(thread_id)),
            self._storage.get_doc(ws, closing_key(thread_id)),
        )
        if _closing(closing, now):
            raise being_deleted(thread_id, closing)
        opened: list[str] = []
        if doc is None:
            doc = await self._open(ws, thread_id, spec, now, opened)
        placement = await self._claim_next(ws, thread_id, list(doc.get("base", ())), now)
        placement.opened = opened
        return placement

    async def _open(
        self, ws: str, thread_id: str, spec: RunSpec, now: float, opened: list[str]
    ) -> JsonObject:
        """Write a thread's document: a new thread, or the thread of a run started on its own.
        The keys this call wrote are added to ``opened``."""
        own = await self._storage.read_state(ws, thread_id)
        record = RunRecord.from_json(own) if own is not None else None
        if record is not None and not record.thread_id:
            doc: JsonObject = {"thread_id": thread_id, "created_at": record.created_at,
                               "labels": record.labels, "base": [], "forked_from": None}  # fmt: skip
            if await self._storage.put_doc(ws, thread_key(thread_id), doc, create_only=True):
                opened.append(thread_key(thread_id))
                opened.append(await self._index(ws, doc))
            first = {"run_id": thread_id, "at": record.created_at}
            if await self._storage.put_doc(ws, slot_key(thread_id, 1), first, create_only=True):
                opened.append(slot_key(thread_id, 1))
        else:
            doc = {"thread_id": thread_id, "created_at": now, "labels": dict(spec.labels), "base": [],
                   "forked_from": None}  # fmt: skip
            if await self._storage.put_doc(ws, thread_key(thread_id), doc, create_only=True):
                opened.append(thread_key(thread_id))
                opened.append(await self._index(ws, doc))
        # Whoever wrote it first: theirs is the thread.
        return await self._storage.get_doc(ws, thread_key(thread_id)) or doc

    async def _index(self, ws: str, doc: JsonObject) -> str:
        """Write the thread's index entry; its key."""
        key = index_key(float(doc["created_at"]), doc["thread_id"])
        await self._storage.put_doc(ws, key, index_entry(doc))
        return key

    async def _claim_next(self, ws: str, thread_id: str, base: list[JsonObject], now: float) -> Placement:
        slots = await self._storage.list_docs(ws, f"thread-runs/{thread_id}")
        context = base
        for key in reversed(slots):
            slot = await self._storage.get_doc(ws, key)
            if slot is None:
                continue
            state = await self._storage.read_state(ws, slot["run_id"])
            if state is None:
                if now - float(slot.get("at", 0)) < CLAIM_GRACE_S:
                    raise _busy(thread_id, slot["run_id"])  # being created right now
                continue  # abandoned by a creator that died
            previous = RunRecord.from_json(state)
            if run_active(self._engine, previous):
                raise _busy(thread_id, previous.run_id, previous.state)
            spec_doc = await self._storage.read_spec(ws, previous.run_id) or {}
            context = [
                *spec_doc.get("context", ()),
                {"run_id": previous.run_id, "upto": previous.transcript_len},
            ]
            break
        slot_no = _slot_number(slots[-1]) + 1 if slots else 1
        return Placement(thread_id, slot_no, context)

    async def claim(self, ws: str, placement: Placement, run_id: str, now: float) -> None:
        """Take the place (create-only): a concurrent start that took it first makes this one busy."""
        key = slot_key(placement.thread_id, placement.slot)
        if not await self._storage.put_doc(ws, key, {"run_id": run_id, "at": now}, create_only=True):
            current = await self._storage.get_doc(ws, key) or {}
            if current.get("run_id") != run_id:
                raise _busy(placement.thread_id, str(current.get("run_id", "")))
        # The place is taken: a deletion that began before sees it; one that began earlier is seen here.
        closing = await self._storage.get_doc(ws, closing_key(placement.thread_id))
        if _closing(closing, now):
            await self.unclaim(ws, placement, run_id)
            for opened in placement.opened:  # what this start wrote to open the thread goes too
                await self._storage.delete_doc(ws, opened)
            raise being_deleted(placement.thread_id, closing)

    async def unclaim(self, ws: str, placement: Placement, run_id: str) -> None:
        """The run did not start: its place is free again, and a fork's new thread goes (its fork
        marks first, so no mark is left naming a thread that is not there)."""
        key = slot_key(placement.thread_id, placement.slot)
        current = await self._storage.get_doc(ws, key)
        if current is not None and current.get("run_id") == run_id:
            await self._storage.delete_doc(ws, key)
        if placement.forked:
            await self._forget_fork(ws, placement.thread_id, placement.context)

    async def _forget_fork(self, ws: str, thread_id: str, base: list[JsonObject]) -> None:
        await asyncio.gather(
            *(self._storage.delete_doc(ws, fork_key(seg["run_id"], thread_id)) for seg in base)
        )
        doc = await self._storage.get_doc(ws, thread_key(thread_id))
        if doc is not None:
            await self._storage.delete_doc(ws, index_key(float(doc["created_at"]), thread_id))
        await self._storage.delete_doc(ws, thread_key(thread_id))

    async def _fork(self, ws: str, spec: RunSpec, now: float) -> Placement:
        source = spec.fork_from or {}
        source_id = check_id(str(source.get("run_id", "")), "fork_from.run_id")
        turn, seq = int(source.get("turn", 0)), int(source.get("seq", 0))
        state = await self._storage.read_state(ws, source_id)
        if state is None:
            raise not_found("ERR_RUN_NOT_FOUND", f"run {source_id!r} does not exist in this workspace",
                            run_id=source_id)  # fmt: skip
        record = RunRecord.from_json(state)
        upto = await self._fork_point(ws, record, turn, seq)
        source_spec = await self._storage.read_spec(ws, source_id) or {}
        base = [*source_spec.get("context", ()), {"run_id": source_id, "upto": upto}]
        thread_id = check_id(spec.thread_id, "thread_id") if spec.thread_id else new_id("thread")
        if spec.thread_id and await self._exists(ws, thread_id):
            raise _thread_exists(thread_id)
        forked_from = {"run_id": source_id, "thread_id": record.thread, "turn": turn, "seq": seq}
        doc = {"thread_id": thread_id, "created_at": now, "labels": dict(spec.labels), "base": base,
               "forked_from": forked_from}  # fmt: skip
        if not await self._storage.put_doc(ws, thread_key(thread_id), doc, create_only=True):
            raise _thread_exists(thread_id)
        try:
            await self._index(ws, doc)
            await asyncio.gather(
                *(self._storage.put_doc(ws, fork_key(seg["run_id"], thread_id), {"at": now}) for seg in base)
            )
            # The marks are written: a deletion of the source that began before is seen here, one
            # that begins after sees them (it marks the source's thread, then looks for forks).
            closing = await self._storage.get_doc(ws, closing_key(record.thread))
            if _closing(closing, now):
                raise being_deleted(record.thread, closing)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._forget_fork(ws, thread_id, base)
            raise
        return Placement(thread_id, 1, base, forked=True)

    async def _exists(self, ws: str, thread_id: str) -> bool:
        if await self._storage.get_doc(ws, thread_key(thread_id)) is not None:
            return True
        own = await self._storage.read_state(ws, thread_id)
        return own is not None and not own.get("thread_id")

    async def _fork_point(self, ws: str, record: RunRecord, turn: int, seq: int) -> int:
        """How many of the run's committed transcript entries a fork at ``turn``/``seq`` shares."""
        run_id = record.run_id
        if turn < 0 or seq < 0:
            raise invalid(
                "ERR_INVALID_REQUEST", "fork_from turn and seq must not be negative", field="fork_from"
            )
        if turn and seq:
            raise invalid(
                "ERR_INVALID_REQUEST", "fork_from takes a turn or a seq, not both", field="fork_from"
            )
        committed = record.transcript_len
        if not turn and not seq:
            return committed  # the whole history so far
        if seq:
            if seq > record.last_seq:
                raise _bad_point(run_id, f"run {run_id!r} has no event with seq {seq}", seq=seq)
            events = await self._storage.read_segments(ws, run_id, "events", 0, seq)
            turn = sum(1 for e in events if e.get("k") == EventKind.ASSISTANT_MESSAGE.value)
            if not turn:
                raise _bad_point(run_id, f"run {run_id!r} completed no turn by seq {seq}", seq=seq)
        docs = await self._storage.read_segments(ws, run_id, "transcript", 0, committed)
        seen = 0
        for index, doc in enumerate(docs):
            if doc.get("role") != "assistant":
                continue
            seen += 1
            if seen < turn:
                continue
            calls = len(doc.get("calls", ()))
            end = index + 1
            while end < len(docs) and docs[end].get("role") == "tool":
                end += 1
            if end - index - 1 < calls:
                break  # its tool calls have no results yet
            return end
        raise _bad_point(run_id, f"turn {turn} of run {run_id!r} is not completed", turn=turn)

    # -- reading threads ---------------------------------------------------------------------

    async def get(self, ws: str, thread_id: str) -> Thread:
        thread_id = check_id(thread_id, "thread_id")
        doc = await self._storage.get_doc(ws, thread_key(thread_id))
        if doc is None:
            own = await self._storage.read_state(ws, thread_id)
            if own is None or own.get("thread_id"):
                raise not_found(
                    "ERR_THREAD_NOT_FOUND",
                    f"thread {thread_id!r} does not exist in this workspace",
                    thread_id=thread_id,
                )
            record = RunRecord.from_json(own)
            doc = {"thread_id": thread_id, "created_at": record.created_at, "labels": record.labels}
            records = [record]
        else:
            records = await self._runs(ws, thread_id)
        return self._thread(ws, doc, records)

    async def _runs(self, ws: str, thread_id: str) -> list[RunRecord]:
        slots = await self._storage.list_docs(ws, f"thread-runs/{thread_id}")
        docs = await asyncio.gather(*(self._storage.get_doc(ws, key) for key in slots))
        states = await asyncio.gather(
            *(self._storage.read_state(ws, d["run_id"]) for d in docs if d is not None)
        )
        return [RunRecord.from_json(s) for s in states if s is not None]

    def _thread(self, ws: str, doc: JsonObject, records: list[RunRecord]) -> Thread:
        records = [self._engine._live(r) for r in records]
        last = records[-1] if records else None
        return Thread(
            thread_id=doc["thread_id"],
            workspace_id=ws,
            created_at=float(doc["created_at"]),
            updated_at=max([float(doc["created_at"]), *(r.updated_at for r in records)]),
            labels=dict(doc.get("labels", {})),
            run_ids=[r.run_id for r in records],
            active_run_id=last.run_id if last is not None and not last.state.terminal else "",
            forked_from=doc.get("forked_from"),
            base=list(doc.get("base", ())),
        )

    async def thread_runs(self, ws: str, thread: Thread) -> list[RunRecord]:
        if (
            thread.run_ids == [thread.thread_id]
            and await self._storage.get_doc(ws, thread_key(thread.thread_id)) is None
        ):
            state = await self._storage.read_state(ws, thread.thread_id)
            return [RunRecord.from_json(state)] if state is not None else []
        return await self._runs(ws, thread.thread_id)

    async def list_page(
        self, ws: str, *, labels: Mapping[str, str] | None = None, page_size: int = 50, page_token: str = ""
    ) -> tuple[list[Thread], str]:
        """A page of the workspace's threads (started on a thread id, continued, or forked),
        newest first, and the next page's token ("" on the last). Keyset pages: a token names
        the last thread shown, so threads created or deleted meanwhile never shift a page."""
        if page_size < 0 or page_size > 1000:
            raise invalid("ERR_INVALID_REQUEST", "page_size must be between 0 and 1000", field="page_size")
        size = page_size or 50
        after = _read_token(page_token) if page_token else ""
        keys = await self._indexed(ws)
        wanted = dict(labels or {})
        picked: list[tuple[str, JsonObject]] = []
        start = bisect.bisect_right(keys, f"{_INDEX}/{after}") if after else 0
        more = False
        # Index entries are read in batches, only as far as the page (and one more, to know
        # whether there is a next page) needs.
        while start < len(keys) and not more:
            batch = keys[start : start + size - len(picked) + 1]
            start += len(batch)
            entries = await asyncio.gather(*(self._storage.get_doc(ws, k) for k in batch))
            for key, entry in zip(batch, entries, strict=True):
                if entry is None or any(entry.get("labels", {}).get(k) != v for k, v in wanted.items()):
                    continue
                if len(picked) == size:
                    more = True
                    break
                picked.append((key, entry))
        docs = await asyncio.gather(
            *(self._storage.get_doc(ws, thread_key(e["thread_id"])) for _, e in picked)
        )
        found = [(key, doc) for (key, _), doc in zip(picked, docs, strict=True) if doc is not None]
        runs = await asyncio.gather(*(self._runs(ws, doc["thread_id"]) for _, doc in found))
        threads = [self._thread(ws, doc, r) for (_, doc), r in zip(found, runs, strict=True)]
        token = _write_token(picked[-1][0].rsplit("/", 1)[-1]) if more and picked else ""
        return threads, token

    async def _indexed(self, ws: str) -> list[str]:
        """The keys of the thread index, sorted newest first; a thread document without its entry
        gets one now (threads stored before the index, a start that died between the writes)."""
        threads, keys = await asyncio.gather(
            self._storage.list_docs(ws, "threads"), self._storage.list_docs(ws, _INDEX)
        )
        # Compared by name, not by count: an entry left by a thread that is gone must not hide
        # a thread whose entry is missing.
        have = {k.rsplit(".", 1)[-1] for k in keys}
        missing = [k for k in threads if _digest(k.split("/", 1)[1]) not in have]
        if missing:
            for doc in await asyncio.gather(*(self._storage.get_doc(ws, k) for k in missing)):
                if doc is not None:
                    keys.append(await self._index(ws, doc))
            keys.sort()
        return keys

    async def referrers(
        self,
        ws: str,
        record: RunRecord,
        *,
        runs_going: Collection[str] = (),
        threads_going: Collection[str] = (),
    ) -> list[str]:
        """What shares the run's history: later runs of its thread (also one whose place is
        claimed and whose run is being created), and forks (thread ids).

        Runs in ``runs_going`` and threads in ``threads_going`` (about to go too) do not count.
        The two are apart: a caller may give a run and a thread one id."""
        out: list[str] = []
        thread_id, own = record.thread, record.thread_slot or 1
        now = self._engine._clock()
        if thread_id not in threads_going:
            for key in reversed(await self._storage.list_docs(ws, f"thread-runs/{thread_id}")):
                if _slot_number(key) <= own:
                    break
                slot = await self._storage.get_doc(ws, key)
                if slot is None or slot["run_id"] in runs_going:
                    continue
                if await self._storage.read_state(ws, slot["run_id"]) is not None or (
                    now - float(slot.get("at", 0)) < CLAIM_GRACE_S  # claimed, its run not written yet
                ):
                    out.append(slot["run_id"])
        for key in await self._storage.list_docs(ws, f"forks/{record.run_id}"):
            fork = key.rsplit("/", 1)[-1]
            if fork not in threads_going:
                out.append(fork)
        return out


_TOKEN_PREFIX = "t1."  # noqa: S105 (a page token's version, not a secret)


def _write_token(index_name: str) -> str:
    return _TOKEN_PREFIX + base64.urlsafe_b64encode(json.dumps([index_name]).encode()).decode().rstrip("=")


def _read_token(token: str) -> str:
    """The index entry a page token names (ERR_INVALID_REQUEST for anything this API did not write)."""
    try:
        if not token.startswith(_TOKEN_PREFIX) or len(token) > 200:
            raise ValueError
        body = token[len(_TOKEN_PREFIX) :]
        (name,) = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        if not isinstance(name, str) or not _INDEX_NAME.fullmatch(name):
            raise ValueError
        return name
    except (ValueError, TypeError):
        raise invalid(
            "ERR_INVALID_REQUEST", "page_token is not one this API returned", field="page_token"
        ) from None


def _slot_number(key: str) -> int:
    return int(key.rsplit("/", 1)[-1])


def _busy(thread_id: str, run_id: str, state: RunState | None = None) -> EngineError:
    what = f"is {state.value}" if state is not None else "is starting"
    return precondition(
        "ERR_THREAD_BUSY",
        f"thread {thread_id!r} has an active run ({run_id!r} {what}); wait for it to end or cancel it",
        thread_id=thread_id,
        run_id=run_id,
    )


def _closing(doc: JsonObject | None, now: float) -> bool:
    return doc is not None and now - closing_beat(doc) < CLOSING_GRACE_S


def closing_beat(doc: JsonObject) -> float:
    """When a thread's closing mark was last written by the deletion that holds it."""
    beat = doc.get("beat")
    return float(doc.get("at", 0) if beat is None else beat)


def being_deleted(thread_id: str, mark: JsonObject | None = None) -> EngineError:
    run_id = str((mark or {}).get("run_id") or "")
    if run_id:  # one run of it (DeleteRun, retention), not the thread
        return precondition(
            "ERR_THREAD_BUSY",
            f"run {run_id!r} of thread {thread_id!r} is being deleted; try again in a moment",
            thread_id=thread_id,
            run_id=run_id,
        )
    return precondition(
        "ERR_THREAD_BUSY",
        f"thread {thread_id!r} is being deleted; start the run on another thread",
        thread_id=thread_id,
    )


def _thread_exists(thread_id: str) -> EngineError:
    return EngineError(
        "ERR_THREAD_EXISTS",
        f"thread {thread_id!r} already exists; a fork starts a new thread",
        kind=ErrorKind.ALREADY_EXISTS,
        metadata={"thread_id": thread_id},
    )


def _bad_point(run_id: str, message: str, **metadata: Any) -> EngineError:
    return precondition("ERR_FORK_POINT", message, run_id=run_id, **metadata)
