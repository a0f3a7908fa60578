"""Rebuild the run index (and the approval timers) from storage."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import asyncpg

from engine_service.control._postgres import index_row, migrate
from engine_service.core._control import APPROVAL_TIMER
from engine_service.core._run import RunRecord
from engine_service.core._types import JsonObject
from engine_service.storage._protocol import Storage

log = logging.getLogger("machina.control")

_BATCH = 500


async def reindex(storage: Storage, url: str) -> int:
    """Index every run in ``storage`` (replacing what the index says of it); returns how many.

    Safe while engines serve: a row is replaced only by a state at least as new."""
    conn: Any = await asyncpg.connect(url, timeout=10)
    try:
        await migrate(conn)
        count = 0
        batch: list[JsonObject] = []
        for ws in await storage.list_workspaces():
            for run_id in await storage.list_runs(ws):
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
        return count
    finally:
        await conn.close()


async def _write(conn: Any, docs: list[JsonObject]) -> int:
    async with conn.transaction():
        await conn.executemany(
            """
            INSERT INTO machina_runs AS r
                (workspace, run_id, state, pause_reason, labels, created_at, updated_at, last_seq, doc)
            VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9::jsonb)
            ON CONFLICT (workspace, run_id) DO UPDATE SET
                state = EXCLUDED.state, pause_reason = EXCLUDED.pause_reason, labels = EXCLUDED.labels,
                updated_at = EXCLUDED.updated_at, last_seq = EXCLUDED.last_seq, doc = EXCLUDED.doc
            WHERE (r.last_seq, r.updated_at) <= (EXCLUDED.last_seq, EXCLUDED.updated_at)
            """,
            [index_row(doc) for doc in docs],
        )
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
