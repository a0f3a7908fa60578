"""Rebuild the run index (and the approval timers) from storage."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import asyncpg

from engine_service.control._postgres import UPSERT_RUN, index_row, migrate
from engine_service.core._control import APPROVAL_TIMER
from engine_service.core._run import RunRecord
from engine_service.core._types import JsonObject
from engine_service.storage._protocol import Storage

log = logging.getLogger("machina.control")

_BATCH = 500


async def reindex(storage: Storage, url: str) -> tuple[int, int]:
    """Index every run in ``storage`` (replacing what the index says of it) and drop the rows
    (with their queue entries, slots and timers) of runs storage no longer holds.
    Returns (runs indexed, rows dropped).

    Safe while engines serve: a row is replaced only by a state at least as new, and a row is
    dropped only if its run is missing from storage after the row was read (runs are created
    in storage before they are indexed)."""
    conn: Any = await asyncpg.connect(url, timeout=10)
    try:
        await migrate(conn)
        count = 0
        seen: set[tuple[str, str]] = set()
        batch: list[JsonObject] = []
        for ws in await storage.list_workspaces():
            for run_id in await storage.list_runs(ws):
                seen.add((ws, run_id))
                doc = None
                with contextlib.suppress(ValueError, KeyError):
                    doc = await storage.read_state(ws, run_id)
                if doc is None:
                    continue
                batch.append(doc)
                if len(batch) >= _BATCH:
                    count += await _write(conn, batch)
                    batch = []
        if batch:
            count += await _write(conn, batch)
        dropped = await _drop_missing(conn, storage, seen)
        return count, dropped
    finally:
        await conn.close()


async def _write(conn: Any, docs: list[JsonObject]) -> int:
    async with conn.transaction():
        await conn.executemany(UPSERT_RUN, [index_row(doc) for doc in docs])
        timers = []
        for doc in docs:
            if doc["state"] != "PAUSED":
                continue
            deadlines = [i.expires_at for i in RunRecord.from_json(doc).interrupts if i.expires_at]
            if deadlines:
                timers.append((doc["workspace_id"], doc["run_id"], APPROVAL_TIMER, float(min(deadlines))))
        if timers:
            await conn.executemany(
                "INSERT INTO machina_timers (workspace, run_id, kind, due_at) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (workspace, run_id, kind) DO UPDATE SET due_at = EXCLUDED.due_at",
                timers,
            )
    return len(docs)


async def _drop_missing(conn: Any, storage: Storage, seen: set[tuple[str, str]]) -> int:
    """Delete what the index holds of runs storage lacks."""
    rows = await conn.fetch("SELECT workspace, run_id FROM machina_runs")
    gone = []
    for ws, run_id in ((row[0], row[1]) for row in rows):
        # Not listed when storage was read: gone, or created since (then it is there now).
        if (ws, run_id) not in seen and not await _present(storage, ws, run_id):
            gone.append((ws, run_id))
    for start in range(0, len(gone), _BATCH):
        part = gone[start : start + _BATCH]
        workspaces, run_ids = [k[0] for k in part], [k[1] for k in part]
        async with conn.transaction():
            for table in ("machina_runs", "machina_queue", "machina_slots", "machina_timers"):
                await conn.execute(
                    f"DELETE FROM {table} WHERE (workspace, run_id) IN "  # noqa: S608 (fixed table names)
                    "(SELECT * FROM unnest($1::text[], $2::text[]))",
                    workspaces,
                    run_ids,
                )
    if gone:
        log.info("reindex: dropped %d index rows of runs no longer in storage", len(gone))
    return len(gone)


async def _present(storage: Storage, ws: str, run_id: str) -> bool:
    try:
        return await storage.read_state(ws, run_id) is not None
    except (ValueError, KeyError):
        return True  # there, if unreadable
