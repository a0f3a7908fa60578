"""Retention: runs that ended more than N days ago are deleted, per workspace.

``retention_days`` (``MACHINA_RETENTION_DAYS``; 0 keeps everything) applies to every
workspace unless ``workspace_retention_days`` names the workspace. The background sweep
applies it every ``retention_interval_s``; ``ApplyRetention`` and
``python -m engine_service retention`` apply it now, or only list what would go
(``dry_run``). A run whose history a kept run shares (a later run of its thread, a fork)
is kept until that one expires too; a thread goes with its last run. With a control plane
the run index names the candidates (runs that ended before the cutoff), so a sweep reads
those runs, not every run in storage.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine_service.core._errors import EngineError
from engine_service.core._run import RunRecord
from engine_service.core._threads import closing_key, run_active

if TYPE_CHECKING:
    from engine_service.core._engine import Engine

log = logging.getLogger("machina.engine")

_DAY_S = 86_400.0


@dataclass(slots=True)
class RetentionReport:
    workspace_id: str
    retention_days: float
    run_ids: list[str] = field(default_factory=list)
    thread_ids: list[str] = field(default_factory=list)
    dry_run: bool = False


def retention_days(engine: Engine, ws: str) -> float:
    config = engine.config
    return float(config.workspace_retention_days.get(ws, config.retention_days))


async def apply_retention(engine: Engine, ws: str, *, dry_run: bool = False) -> RetentionReport:
    """Delete (or with ``dry_run`` only list) the workspace's runs past its retention."""
    days = retention_days(engine, ws)
    report = RetentionReport(ws, days, dry_run=dry_run)
    if days <= 0:
        return report
    storage, threads = engine.storage, engine.threads
    cutoff = engine._clock() - days * _DAY_S
    expired: dict[str, RunRecord] = {}
    # With a control plane its index names the runs that ended before the cutoff; storage
    # (read below) still decides. Without one, every run of the workspace is read.
    control = engine.control
    candidates = await control.ended_before(ws, cutoff) if control.indexed else await storage.list_runs(ws)
    for run_id in candidates:
        state = await storage.read_state(ws, run_id)
        if state is None:
            continue
        record = RunRecord.from_json(state)
        if record.updated_at < cutoff and not run_active(engine, record):
            expired[run_id] = record
    # Threads whose every run expires go with them (their fork marks too), if they are old enough.
    thread_docs = {}
    for doc_key in await storage.list_docs(ws, "threads"):
        doc = await storage.get_doc(ws, doc_key)
        if doc is not None and float(doc.get("created_at", 0)) < cutoff:
            thread_docs[doc["thread_id"]] = doc
    # Apart: a caller may give a run and a thread one id.
    runs_going: set[str] = set()
    order: list[RunRecord] = []
    threads_going: list[str] = []
    thread_runs: dict[str, list[str]] = {}
    progress = True
    while progress:
        progress = False
        for thread_id in thread_docs:
            if thread_id in threads_going:
                continue
            runs = await threads._runs(ws, thread_id)
            if all(r.run_id in runs_going for r in runs):
                threads_going.append(thread_id)
                thread_runs[thread_id] = [r.run_id for r in runs]
                progress = True
        for run_id, record in expired.items():
            if run_id in runs_going:
                continue
            if not await threads.referrers(ws, record, runs_going=runs_going, threads_going=threads_going):
                runs_going.add(run_id)
                order.append(record)
                progress = True
    report.run_ids = [r.run_id for r in order]
    report.thread_ids = threads_going
    if dry_run:
        return report
    # The threads going are closed first: from here no run starts on them (one that started
    # since the plan keeps its thread, and the history it shares, below).
    closed = []
    for thread_id in threads_going:
        try:
            await engine.deleter.close_thread(ws, thread_id, runs_going)
        except EngineError:
            continue
        closed.append(thread_id)
    deleted_runs: list[str] = []
    deleted: set[str] = set()  # the same, to look up
    for record in order:  # the latest of a thread first
        key = (ws, record.run_id)
        async with engine._lock(key):
            current = await storage.read_state(ws, record.run_id)
            if current is None or current.get("updated_at") != record.updated_at:
                continue  # deleted meanwhile, or moved again (it is not expired any more)
            # Checked again, under the thread's mark (the sweep's own for a thread it deletes):
            # what shared its history at planning time may have been kept, and a run or a fork
            # may have started since.
            done = [t for t in closed if deleted.issuperset(thread_runs[t])]
            held = (
                contextlib.nullcontext()
                if record.thread in closed
                else engine.deleter.holding_thread(ws, record)
            )
            try:
                async with held:
                    if await threads.referrers(ws, record, runs_going=deleted, threads_going=done):
                        continue
                    await engine.deleter.remove(record)
            except EngineError:
                continue  # another deletion holds its thread: the next sweep looks again
            deleted_runs.append(record.run_id)
            deleted.add(record.run_id)
    forgotten = []
    for thread_id in closed:
        doc = thread_docs[thread_id]
        if await threads._runs(ws, thread_id):
            await storage.delete_doc(ws, closing_key(thread_id))
            continue
        await engine.deleter.forget_thread(ws, thread_id, list(doc.get("base", ())))
        forgotten.append(thread_id)
    report.thread_ids = forgotten
    report.run_ids = deleted_runs
    if deleted_runs or forgotten:
        log.info("retention (%g days) deleted %d runs and %d threads", days, len(deleted_runs),
                 len(forgotten), extra={"workspace": ws})  # fmt: skip
    return report


async def retention_sweep(engine: Engine, *, dry_run: bool = False) -> list[RetentionReport]:
    """Apply retention to every workspace that has one."""
    reports = []
    for ws in await engine.storage.list_workspaces():
        if retention_days(engine, ws) > 0:
            reports.append(await apply_retention(engine, ws, dry_run=dry_run))
    return reports
