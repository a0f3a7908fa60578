"""Deleting runs and threads: every object of a run goes, and every RPC then says NOT_FOUND.

A run that is queued, running or paused is cancelled first (``ERR_RUN_ACTIVE``). A run whose
history another run shares (a later run of its thread, or a fork) stays while they do
(``ERR_RUN_REFERENCED``); deleting a whole thread with ``force`` deletes it anyway, and the
forks that shared it lose that part of their history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Collection
from typing import TYPE_CHECKING

from engine_service.core._errors import EngineError, precondition, shown_list
from engine_service.core._ids import check_id, new_id
from engine_service.core._run import RunRecord
from engine_service.core._threads import (
    CLAIM_GRACE_S,
    CLOSING_BEAT_S,
    CLOSING_STALE_S,
    being_deleted,
    closing_beat,
    closing_key,
    fork_key,
    index_key,
    run_active,
    slot_key,
    thread_key,
)
from engine_service.core._types import JsonObject, Principal

if TYPE_CHECKING:
    from engine_service.core._engine import Engine

log = logging.getLogger("machina.engine")


class Deleter:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def delete_run(self, principal: Principal, run_id: str) -> None:
        engine = self._engine
        key = (principal.workspace_id, check_id(run_id, "run_id"))
        async with engine._lock(key):
            record = await engine._load(key)
            self._check_ended(record)
            # Marked first, then checked: a follow-up or fork that began before is seen, one
            # that begins after sees the mark and waits (see ``core._threads``).
            async with self.holding_thread(key[0], record):
                referrers = await engine.threads.referrers(key[0], record)
                if referrers:
                    raise _referenced(record.run_id, referrers)
                await self.remove(record)

    @contextlib.asynccontextmanager
    async def holding_thread(self, ws: str, record: RunRecord) -> AsyncIterator[None]:
        """While the run is deleted, its thread is marked: no run starts on it and no fork of it
        is made (ERR_THREAD_BUSY, naming the run) until the mark goes."""
        mark = await self._mark(ws, record.thread, {"run_id": record.run_id})
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await self._unmark(ws, mark)

    async def delete_thread(self, principal: Principal, thread_id: str, *, force: bool = False) -> list[str]:
        """Delete every run of the thread, then the thread; the ids of the runs deleted."""
        engine, ws = self._engine, principal.workspace_id
        thread = await engine.threads.get(ws, thread_id)
        records = await engine.threads.thread_runs(ws, thread)
        for record in records:
            self._check_ended(record)
        going = {r.run_id for r in records}
        # From here no run starts on the thread, nor a fork of it; one that started since it
        # was read stops this.
        mark = await self.close_thread(ws, thread.thread_id, going)
        stop = asyncio.Event()
        beating = asyncio.create_task(self._keep_closing(ws, mark, stop))
        try:
            if not force:  # checked under the mark: a fork made before it is seen here
                for record in records:
                    referrers = await engine.threads.referrers(
                        ws, record, runs_going=going, threads_going={thread.thread_id}
                    )
                    if referrers:
                        raise _referenced(record.run_id, referrers)
            for record in reversed(records):  # the latest first: nothing is left pointing at a gap
                key = (ws, record.run_id)
                async with engine._lock(key):
                    self._check_ended(await engine._load(key))
                    await self.remove(record, forks_too=force)
        except BaseException:
            stop.set()
            await asyncio.shield(beating)
            with contextlib.suppress(Exception):
                await self._unmark(ws, mark)  # it stays a thread
            raise
        stop.set()
        await beating  # its last renewal lands before the mark goes
        await self.forget_thread(ws, thread.thread_id, thread.base)
        log.info("thread %s deleted (%d runs)", thread.thread_id, len(records), extra={"workspace": ws})
        return [r.run_id for r in records]

    async def close_thread(self, ws: str, thread_id: str, known: Collection[str]) -> JsonObject:
        """Mark the thread as being deleted, then check that no run but ``known`` holds or is
        taking a place in it (else ERR_THREAD_BUSY, and the mark goes). A start claims its place
        before it reads the mark: one of the two sees the other (see ``core._threads``).
        Returns the mark."""
        storage, now = self._engine.storage, self._engine._clock()
        key = closing_key(thread_id)
        mark = await self._mark(ws, thread_id, {})
        slots = await storage.list_docs(ws, f"thread-runs/{thread_id}")
        docs = await asyncio.gather(*(storage.get_doc(ws, slot) for slot in slots))
        newcomers = []
        for doc in docs:
            if doc is None or doc["run_id"] in known:
                continue
            if await storage.read_state(ws, doc["run_id"]) is not None or now - float(doc.get("at", 0)) < (
                CLAIM_GRACE_S
            ):
                newcomers.append(str(doc["run_id"]))  # else a place its creator abandoned
        if newcomers:
            await storage.delete_doc(ws, key)
            raise precondition(
                "ERR_THREAD_BUSY",
                f"thread {thread_id!r} has a run that started meanwhile ({newcomers[-1]!r}); delete it again "
                "once that run ended",
                thread_id=thread_id,
                run_id=newcomers[-1],
            )
        return mark

    async def _mark(self, ws: str, thread_id: str, what: JsonObject) -> JsonObject:
        """Write the thread's closing mark (``what``: {"run_id"} when one run of it is being
        deleted), or ERR_THREAD_BUSY if a deletion at work holds it; one whose deletion died is
        taken over. Returns the mark."""
        storage, now = self._engine.storage, self._engine._clock()
        key = closing_key(thread_id)
        mark: JsonObject = {"thread_id": thread_id, "at": now, "beat": now, "token": new_id("del"), **what}
        if not await storage.put_doc(ws, key, mark, create_only=True):
            current = await storage.get_doc(ws, key)
            if current is not None and now - closing_beat(current) < CLOSING_STALE_S:
                if current.get("run_id"):  # one run of it (DeleteRun, retention)
                    raise being_deleted(thread_id, current)
                raise precondition(
                    "ERR_THREAD_BUSY",
                    f"thread {thread_id!r} is being deleted already; if that deletion stopped, "
                    f"DeleteThread takes it over {CLOSING_STALE_S:g} s after it last made progress",
                    thread_id=thread_id,
                )
            await storage.put_doc(ws, key, mark)  # left by a deletion that died: taken over
        return mark

    async def _unmark(self, ws: str, mark: JsonObject) -> None:
        """Remove the thread's closing mark if it is still ``mark`` (not taken over since)."""
        storage, key = self._engine.storage, closing_key(str(mark["thread_id"]))
        current = await storage.get_doc(ws, key)
        if current is not None and current.get("token") == mark["token"]:
            await storage.delete_doc(ws, key)

    async def _keep_closing(self, ws: str, mark: JsonObject, stop: asyncio.Event) -> None:
        """Renew the thread's closing mark every ``CLOSING_BEAT_S`` until ``stop``: a deletion at
        work keeps its mark, and one that died leaves a mark another deletion may take over."""
        key = closing_key(str(mark["thread_id"]))
        while True:
            try:
                await asyncio.wait_for(stop.wait(), CLOSING_BEAT_S)
                return
            except TimeoutError:
                pass
            try:
                await self._engine.storage.put_doc(ws, key, {**mark, "beat": self._engine._clock()})
            except Exception:  # a storage fault: the next beat tries again
                log.warning("renewing the closing mark of thread %s failed", mark["thread_id"], exc_info=True)

    async def forget_thread(self, ws: str, thread_id: str, base: list[dict[str, object]]) -> None:
        """Remove the thread's own documents: its fork marks, the thread, its places, and last
        its closing mark (while the mark is there, no run starts on what is left)."""
        storage = self._engine.storage
        await asyncio.gather(
            *(storage.delete_doc(ws, fork_key(str(seg["run_id"]), thread_id)) for seg in base)
        )
        doc = await storage.get_doc(ws, thread_key(thread_id))
        if doc is not None:
            await storage.delete_doc(ws, index_key(float(doc["created_at"]), thread_id))
        await storage.delete_doc(ws, thread_key(thread_id))
        for key in await storage.list_docs(ws, f"thread-runs/{thread_id}"):
            await storage.delete_doc(ws, key)
        await storage.delete_doc(ws, closing_key(thread_id))

    def _check_ended(self, record: RunRecord) -> None:
        if run_active(self._engine, record):
            raise precondition(
                "ERR_RUN_ACTIVE",
                f"run {record.run_id!r} is {record.state.value}; cancel it before deleting it",
                run_id=record.run_id,
                state=record.state.value,
            )

    async def remove(self, record: RunRecord, *, forks_too: bool = False) -> None:
        """Delete the run's objects, its place on its thread and its idempotency key."""
        engine, ws, run_id = self._engine, record.workspace_id, record.run_id
        storage = engine.storage
        slot = slot_key(record.thread, record.thread_slot or 1)
        held = await storage.get_doc(ws, slot)
        if held is not None and held.get("run_id") == run_id:
            await storage.delete_doc(ws, slot)
        if forks_too:
            for key in await storage.list_docs(ws, f"forks/{run_id}"):
                await storage.delete_doc(ws, key)
        if record.request_id:
            await storage.delete_request_key(ws, record.request_id)
        await storage.delete_run(ws, run_id)
        await engine.on_run_deleted(ws, run_id)
        log.info("run %s deleted", run_id, extra={"run_id": run_id, "workspace": ws})


def _referenced(run_id: str, referrers: Collection[str]) -> EngineError:
    return precondition(
        "ERR_RUN_REFERENCED",
        f"run {run_id!r} is part of the history of {shown_list(list(referrers))}; delete those first "
        "(or delete the whole thread with force)",
        run_id=run_id,
        referenced_by=",".join(sorted(referrers))[:200],
    )
