"""Reading runs: pages of runs, waiting for a run to settle, streaming its events."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING

from engine_service.core._actor import RunActor
from engine_service.core._checkpoint import CANCEL_REQUEST
from engine_service.core._errors import EngineError, ErrorKind, aborted, invalid, not_found
from engine_service.core._ids import check_id
from engine_service.core._run import RunRecord, ToolResultPage
from engine_service.core._types import Event, PauseReason, Principal, RunState
from engine_service.core._validate import check_labels
from engine_service.tools import result_blob_name

_POLL_S = 0.025  # how often watchers re-read storage for runs another process moves (state.json is tiny)
_CANCEL_FOLLOW_S = 10.0  # how long CancelRun follows a run another process moves before answering

if TYPE_CHECKING:
    from engine_service.core._engine import Engine

log = logging.getLogger("machina.engine")


class RunReader:
    """Part of an :class:`Engine`, kept beside it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def list_runs(
        self,
        principal: Principal,
        *,
        states: set[RunState] | None = None,
        labels: Mapping[str, str] | None = None,
        page_size: int = 50,
        page_token: str = "",
        max_bytes: int = 0,
        size_of: Callable[[RunRecord], int] | None = None,
    ) -> tuple[list[RunRecord], str]:
        """A page of runs, newest first, and the token of the next page ("" on the last).

        With ``size_of`` (a run's size in the caller's encoding) a page also ends before its runs
        add up to more than ``max_bytes``; it always holds at least one run, however large.
        """
        if not 0 <= page_size <= 1000:
            raise invalid("ERR_INVALID_REQUEST", "page_size must be between 1 and 1000", field="page_size")
        check_labels(labels or {}, "labels")
        page_size = page_size or 50
        if self._engine.control.indexed:
            return await self._list_indexed(
                principal, states, labels, page_size, page_token, max_bytes, size_of
            )
        offset = 0
        if page_token:
            try:
                offset = int(page_token)
                if offset < 0:
                    raise ValueError
            except ValueError:
                raise invalid(
                    "ERR_INVALID_REQUEST", "page_token is not one this server issued", field="page_token"
                ) from None
        ws = principal.workspace_id
        records = []
        for run_id in await self._engine.storage.list_runs(ws):
            with contextlib.suppress(EngineError):
                record = self._engine._live(await self._engine._load((ws, run_id)))
                if states and record.state not in states:
                    continue
                if labels and any(record.labels.get(k) != v for k, v in labels.items()):
                    continue
                records.append(record)
        records.sort(key=lambda r: (r.created_at, r.run_id), reverse=True)
        page = records[offset : offset + page_size]
        if size_of is not None:
            used = 0
            for count, record in enumerate(page):
                used += size_of(record)
                if count and used > max_bytes:
                    page = page[:count]
                    break
        end = offset + len(page)
        next_token = str(end) if end < len(records) else ""
        return page, next_token

    async def _list_indexed(
        self,
        principal: Principal,
        states: set[RunState] | None,
        labels: Mapping[str, str] | None,
        page_size: int,
        page_token: str,
        max_bytes: int,
        size_of: Callable[[RunRecord], int] | None,
    ) -> tuple[list[RunRecord], str]:
        """A page from the control plane's run index: one query, keyset pages (a token names the
        last run shown, so runs created meanwhile never shift a page)."""
        after = _read_token(page_token) if page_token else None
        docs = await self._engine.control.list_runs(
            principal.workspace_id,
            states=sorted(s.value for s in states or ()),
            labels=dict(labels or {}),
            after=after,
            limit=page_size + 1,
        )
        more = len(docs) > page_size
        page = [self._engine._live(RunRecord.from_json(doc)) for doc in docs[:page_size]]
        if size_of is not None:
            used = 0
            for count, record in enumerate(page):
                used += size_of(record)
                if count and used > max_bytes:
                    page, more = page[:count], True
                    break
        if self._engine.control.queued:
            for record in page:
                if record.state is RunState.QUEUED:
                    record.queue_position = await self._engine.control.queue_position(
                        record.workspace_id, record.run_id
                    )
        if not more or not page:
            return page, ""
        return page, _write_token(page[-1].created_at, page[-1].run_id)

    async def wait_run(self, principal: Principal, run_id: str, timeout: float) -> tuple[RunRecord, bool]:
        """Wait until the run is paused or ended. Returns (run, timed_out)."""
        key = (principal.workspace_id, check_id(run_id, "run_id"))
        deadline = time.monotonic() + timeout
        await self._engine.get_run(principal, run_id)  # NOT_FOUND first
        with self._engine._watching(key):
            return await self._wait_settled(key, deadline)

    async def _wait_settled(self, key: tuple[str, str], deadline: float) -> tuple[RunRecord, bool]:
        while True:
            remaining = deadline - time.monotonic()
            actor = self._engine._active.get(key)
            if actor is not None and actor.task is not None and not actor.task.done():
                # The actor's task ends exactly when the run pauses or ends, after the
                # state is committed: answering earlier (from memory) would let a caller
                # act on a pause that another process cannot see yet.
                if remaining <= 0:
                    return actor.view(), True
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    async with asyncio.timeout(remaining):
                        await asyncio.shield(actor.task)
                continue
            heard = self._engine._remote_seq.get(key, 0)
            record = await self._engine._load(key)
            if settled(record):
                return record, False
            if remaining <= 0:
                return record, True
            if self._engine._remote_seq.get(key, 0) != heard:
                continue  # another replica moved it while it was being read
            await self.wait_change(key, min(self._poll_interval(record), remaining))

    async def stream_events(
        self,
        principal: Principal,
        run_id: str,
        *,
        after_seq: int = 0,
        follow: bool = False,
        until_pause: bool = False,
    ) -> AsyncIterator[list[Event]]:
        """Batches of events with seq > after_seq, in order, each exactly once.

        ``follow`` streams until the run ends; ``until_pause`` stops at a pause too.
        Without either, it stops after what exists now.
        """
        if after_seq < 0:
            raise invalid("ERR_INVALID_REQUEST", "after_seq must not be negative", field="after_seq")
        key = (principal.workspace_id, check_id(run_id, "run_id"))
        await self._engine.get_run(principal, run_id)  # NOT_FOUND before the stream opens
        stream = self._stream(key, after_seq, follow=follow, until_pause=until_pause)
        with self._engine._watching(key):
            async with contextlib.aclosing(stream):
                async for batch in stream:
                    yield batch

    async def _stream(
        self, key: tuple[str, str], after_seq: int, *, follow: bool, until_pause: bool
    ) -> AsyncGenerator[list[Event], None]:
        cursor = after_seq
        finished: RunActor | None = None  # the last actor read live from
        while True:
            actor = self._engine._active.get(key)
            done = 0 if finished is None else finished.feed.last_seq
            if actor is None and finished is not None and finished.feed.base_seq <= cursor < done:
                # That actor has just finished: what it wrote is still in its feed, so do not
                # read (and parse) those events back from storage.
                batch = finished.feed.after(cursor)
                cursor = batch[-1].last_seq
                yield batch
                continue
            if actor is not None and actor.feed.base_seq <= cursor:
                # Live: the executing actor has every event after its base_seq.
                finished = actor
                batch = actor.feed.after(cursor)
                if batch:
                    cursor = batch[-1].last_seq
                    yield batch
                    continue
                if not actor.feed.closed:
                    if not (follow or until_pause):
                        return
                    await actor.feed.wait(cursor, timeout=1.0)
                    continue
                record = actor.record
            else:
                # Catch up from storage: everything committed before the live part.
                record = actor.record if actor is not None else await self._engine._load(key)
                if actor is not None:
                    committed = actor.feed.base_seq
                elif record.state.terminal:
                    committed = record.last_seq
                else:
                    # Events another replica wrote and showed past its last commit, as it announced.
                    committed = max(record.last_seq, self._engine._remote_seq.get(key, 0))
                if committed > cursor:
                    docs = await self._engine.storage.read_segments(
                        key[0], key[1], "events", cursor, committed
                    )
                    first = docs[0].get("seq", 0) if docs else 0
                    if not first or not first <= cursor + 1 < first + docs[0].get("n", 1):
                        # A log that lacks committed events cannot be streamed in order; say so
                        # rather than read the same gap forever.
                        log.error("run %s: event log lacks events after seq %d", key[1], cursor)
                        raise EngineError(
                            "ERR_INTERNAL",
                            f"the event log of run {key[1]!r} lacks events after seq {cursor}",
                            kind=ErrorKind.INTERNAL,
                            metadata={"run_id": key[1], "after_seq": str(cursor)},
                        )
                    for start in range(0, len(docs), 512):
                        batch = [Event.from_json(d) for d in docs[start : start + 512]]
                        if start == 0:
                            batch[0] = batch[0].after(cursor)  # resuming inside a record
                        cursor = batch[-1].last_seq
                        yield batch
                    continue
            stop = record.state.terminal or (until_pause and settled(record))
            if stop or not (follow or until_pause):
                return
            if actor is None and self._engine._remote_seq.get(key, 0) > cursor:
                continue  # announced while storage was being read: read again
            await self.wait_change(key, self._poll_interval(record))

    def _poll_interval(self, record: RunRecord) -> float:
        """How long to wait for news of a run moved elsewhere before re-reading storage: with a
        control plane, news comes as it happens (a long timeout is only a safety net)."""
        return self._engine.control.watch_timeout(_poll_interval(record))

    async def wait_change(self, key: tuple[str, str], timeout: float) -> None:
        """Wait until this process moves the run again (or ``timeout``, for other processes)."""
        changed = self._engine._changes.setdefault(key, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await changed.wait()

    async def tool_result(
        self, principal: Principal, run_id: str, call_id: str, *, offset: int = 0, limit: int = 0
    ) -> ToolResultPage:
        """A page of a tool result that was stored because it was too large to show.

        ``limit`` 0 means up to 1,000,000 characters.
        """
        if offset < 0 or limit < 0:
            raise EngineError("ERR_INVALID_REQUEST", "offset and limit must not be negative")
        key = (principal.workspace_id, check_id(run_id, "run_id"))
        await self._engine.get_run(principal, run_id)  # NOT_FOUND for unknown runs and other workspaces
        blob = await self._engine.storage.get_blob(*key, result_blob_name(call_id))
        if blob is None:
            raise not_found(
                "ERR_RESULT_NOT_FOUND",
                f"run {run_id!r} has no stored result for call {call_id[:128]!r} "
                "(only results too large to show in full are stored)",
                run_id=run_id,
                call_id=call_id[:128],
            )
        full = blob.decode("utf-8", errors="replace")
        end = offset + (limit or 1_000_000)
        return ToolResultPage(full[offset:end], len(full), end if end < len(full) else 0)

    async def follow_cancel(
        self, principal: Principal, key: tuple[str, str], reason: str, request: bytes
    ) -> RunRecord:
        """See a cancel of a run another process moves through: that process honours the request
        at its next await point or when it pauses; a run found paused is cancelled here. Answers
        once the run ended, so a cancel answered OK is never applied late, to a later resume
        (after ``_CANCEL_FOLLOW_S``: the run as it stands if it still runs elsewhere, the
        request left in place; ABORTED if it stayed paused and held by another process)."""
        deadline = time.monotonic() + _CANCEL_FOLLOW_S
        while True:
            if key in self._engine._active:  # resumed here meanwhile
                return await self._engine.cancel_run(principal, key[1], reason)
            record = await self._engine._load(key)
            if record.state.terminal:
                return record
            if record.state is RunState.PAUSED:
                async with self._engine._lock(key):
                    if key not in self._engine._active:
                        actor = await self._engine._actor_for(record)
                        if await actor.take_over():
                            self._engine._jobs.disarm_expiry(key)
                            actor.cancel_reason = reason
                            await actor.cancel_now()
                            self._engine._notify(key)
                            return actor.record
            elif not await self._engine.storage.get_blob(key[0], key[1], CANCEL_REQUEST):
                # A resume that started after the request was written cleared it: ask that execution.
                await self._engine.storage.put_blob(key[0], key[1], CANCEL_REQUEST, request)
            if time.monotonic() >= deadline:
                if record.state is RunState.PAUSED:
                    # Paused, and held by another process all along: refused rather than
                    # left for a later resume to find.
                    raise aborted(
                        "ERR_CONCURRENT_UPDATE",
                        f"run {key[1]!r} is being moved by another process; cancel it again",
                        run_id=key[1],
                    )
                return record  # still running elsewhere: the request stays and is honoured there
            await self.wait_change(key, 0.05)


_TOKEN_PREFIX = "k1."  # noqa: S105 (a page token's version, not a secret)


def _write_token(created_at: float, run_id: str) -> str:
    raw = json.dumps([created_at, run_id]).encode()
    return _TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _read_token(token: str) -> tuple[float, str]:
    try:
        if not token.startswith(_TOKEN_PREFIX):
            raise ValueError
        body = token[len(_TOKEN_PREFIX) :]
        created_at, run_id = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        if (
            not isinstance(run_id, str)
            or "\x00" in run_id
            or not isinstance(created_at, int | float)
            or isinstance(created_at, bool)
        ):
            raise ValueError
        when = float(created_at)
        if not math.isfinite(when):
            raise ValueError
        return when, run_id
    except (ValueError, TypeError, OverflowError):
        raise invalid(
            "ERR_INVALID_REQUEST", "page_token is not one this server issued", field="page_token"
        ) from None


def settled(record: RunRecord) -> bool:
    """Ended, or paused for the caller: what waits wait for. A handoff is not the caller's to act on."""
    if record.state is RunState.PAUSED:
        return record.pause_reason is not PauseReason.HANDOFF_TO_RUNNER
    return record.state.terminal


def _poll_interval(record: RunRecord) -> float:
    """How soon to re-read a run this process is not moving: fast while another process
    (a runner, a replica) is likely moving it, slowly while it waits for a person."""
    moving = record.state in (RunState.QUEUED, RunState.RUNNING)
    return _POLL_S if moving or record.pause_reason is PauseReason.HANDOFF_TO_RUNNER else 0.5
