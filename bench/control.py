"""The PostgreSQL control plane side by side with the embedded mode (storage alone).

Needs Debian's `postgresql` (a throw-away cluster is started); rows are N/A without it.
Both engines of a pair run in this process over one local storage root: "replica A" executes,
"replica B" watches.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._common import PRINCIPAL, progress
from bench._rows import summarize
from engine_service import (
    Engine,
    EngineConfig,
    LocalStorage,
    RunSpec,
    RunState,
    ScriptedTurn,
    ToolRegistry,
)
from engine_service.testing import ASK_USER, SAMPLE_TOOLS, new_database, postgres_bin, running_postgres

TARGET_PAGE_MS = 10.0
TARGET_LATENCY_P50_MS = 10.0
TARGET_LATENCY_P99_MS = 50.0


def _row(name: str, value: str, target: str, verdict: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "value": value, "target": target, "verdict": verdict, "data": data}


def _engine(root: Path, control_url: str = "", *, claims_work: bool = True) -> Engine:
    config = EngineConfig(
        storage=str(root),
        workdir_root=str(root / "workdirs"),
        max_turns=100_000,
        recovery_interval_s=0,
        control_url=control_url,
    )
    control = None
    if control_url:
        from engine_service.control import PostgresControl

        control = PostgresControl(control_url)
    tools = ToolRegistry([ASK_USER, *SAMPLE_TOOLS])
    engine = Engine(config, LocalStorage(root), tools=tools, control=control)
    engine.claims_work = claims_work
    return engine


def _state_doc(i: int, now: float) -> dict[str, Any]:
    return {
        "run_id": f"run-{i:07d}",
        "workspace_id": PRINCIPAL.workspace_id,
        "task": "bench",
        "state": "DONE",
        "created_at": now - 1_000_000 + i,
        "updated_at": now - 1_000_000 + i,
        "labels": {},
        "pause_reason": None,
        "pending": [],
        "data": "done",
        "error": None,
        "last_seq": 3,
        "transcript_len": 2,
    }


async def _fill_index(url: str, count: int) -> None:
    """``count`` finished runs in the index, in bulk (COPY)."""
    import asyncpg

    from engine_service.control import migrate

    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        now = time.time()
        records = []
        for i in range(count):
            doc = _state_doc(i, now)
            ws, run_id, created = doc["workspace_id"], doc["run_id"], doc["created_at"]
            records.append((ws, run_id, "DONE", None, "{}", created, created, 3, json.dumps(doc)))
        await conn.copy_records_to_table(
            "machina_runs",
            records=records,
            columns=["workspace", "run_id", "state", "pause_reason", "labels", "created_at", "updated_at",
                     "last_seq", "doc"],
        )  # fmt: skip
        await conn.execute("ANALYZE machina_runs")
    finally:
        await conn.close()


async def _fill_storage(storage: LocalStorage, count: int) -> None:
    now = time.time()
    for i in range(count):
        doc = _state_doc(i, now)
        await storage.create_run(PRINCIPAL.workspace_id, doc["run_id"], {"task": "bench"}, doc)


async def _timed(call: Callable[[], Any], repeat: int) -> dict[str, float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await call()
        times.append((time.perf_counter() - started) * 1000)
    return summarize(times)


async def _list_and_sweep(engine: Engine, repeat: int) -> tuple[dict[str, float], dict[str, float]]:
    page = await _timed(lambda: engine.list_runs(PRINCIPAL, page_size=50), repeat)
    sweep = await _timed(engine.recover_orphaned_runs, max(3, repeat // 5))
    return page, sweep


async def _latency(a: Engine, b: Engine, events: int) -> dict[str, float]:
    """Latency from replica A announcing an event it wrote to B's watcher receiving it."""
    announced: dict[int, float] = {}
    shown = a.control.shown
    committed = a.control.committed

    def on_shown(ws: str, run_id: str, seq: int) -> None:
        announced.setdefault(seq, time.perf_counter())
        shown(ws, run_id, seq)

    async def on_committed(state: dict[str, Any]) -> None:
        announced.setdefault(int(state.get("last_seq") or 0), time.perf_counter())
        await committed(state)

    control: Any = a.control
    control.shown = on_shown
    control.committed = on_committed
    turns = [ScriptedTurn("", [("sleep", {"seconds": 0.02})]) for _ in range(events // 4)]
    turns.append(ScriptedTurn("done"))
    spec = RunSpec(task="bench", model_provider="scripted", script=turns, max_turns=len(turns) + 1)
    record, _ = await a.create_run(PRINCIPAL, spec)
    latencies = []
    async for batch in b.stream_events(PRINCIPAL, record.run_id, follow=True):
        now = time.perf_counter()
        for event in batch:
            origin = min((t for seq, t in announced.items() if seq >= event.seq), default=None)
            if origin is not None:
                latencies.append((now - origin) * 1000)
    final, _ = await a.wait_run(PRINCIPAL, record.run_id, timeout=60)
    assert final.state is RunState.DONE, final.error
    control.shown = shown
    control.committed = committed
    return summarize(latencies)


async def _idle_reads(a: Engine, b: Engine, seconds: float) -> float:
    """Storage reads per minute by a watcher on B following a run paused on A."""
    spec = RunSpec(
        task="bench",
        model_provider="scripted",
        script=[ScriptedTurn("", [("AskUser", {"question": "wait?"})]), ScriptedTurn("done")],
    )
    record, _ = await a.create_run(PRINCIPAL, spec)
    paused, _ = await a.wait_run(PRINCIPAL, record.run_id, timeout=30)
    assert paused.state is RunState.PAUSED, paused.state
    reads = 0
    storage: Any = b.storage
    names = ("read_state", "read_segments", "get_blob", "read_spec")
    originals = {name: getattr(storage, name) for name in names}

    def counted(original: Callable[..., Any]) -> Callable[..., Any]:
        async def call(*args: Any) -> Any:
            nonlocal reads
            reads += 1
            return await original(*args)

        return call

    for name, original in originals.items():
        setattr(storage, name, counted(original))

    async def watch() -> None:
        async for _batch in b.stream_events(PRINCIPAL, record.run_id, after_seq=paused.last_seq, follow=True):
            pass

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.5)
    before = reads
    await asyncio.sleep(seconds)
    idle = reads - before
    watcher.cancel()
    for name, original in originals.items():
        setattr(storage, name, original)
    await a.cancel_run(PRINCIPAL, record.run_id)
    return idle * 60 / seconds


async def rows(quick: bool) -> list[dict[str, Any]]:
    if postgres_bin() is None:
        reason = "PostgreSQL is not installed (apt-get install postgresql)"
        return [_row("control plane", reason, "", "N/A", {})]
    if quick:
        return await measure(indexed=10_000, embedded_runs=1_000, idle_s=5.0, events=100)
    return await measure(indexed=100_000, embedded_runs=10_000, idle_s=20.0, events=400)


async def measure(*, indexed: int, embedded_runs: int, idle_s: float, events: int) -> list[dict[str, Any]]:
    """The rows, at these sizes (a test runs it tiny)."""
    results: list[dict[str, Any]] = []
    with running_postgres() as server, tempfile.TemporaryDirectory(prefix="machina-bench-control-") as tmp:
        top = Path(tmp)
        # Embedded: storage alone.
        progress(f"control: {embedded_runs} finished runs in storage (embedded)")
        embedded_a = _engine(top / "embedded")
        await _fill_storage(LocalStorage(top / "embedded"), embedded_runs)
        emb_page, emb_sweep = await _list_and_sweep(embedded_a, 5)
        embedded_b = _engine(top / "embedded")
        emb_latency = await _latency(embedded_a, embedded_b, max(8, events // 4))
        emb_idle = await _idle_reads(embedded_a, embedded_b, idle_s)
        await embedded_a.close(0.5)
        await embedded_b.close(0.5)
        # Control plane: the same storage shape, the index in PostgreSQL.
        small_url = await new_database(server)
        url = await new_database(server)
        progress(f"control: {indexed} finished runs in the index")
        await _fill_index(url, indexed)
        a = _engine(top / "control", url)
        b = _engine(top / "control", url, claims_work=False)
        await a.start()
        await b.start()
        small = _engine(top / "small", small_url)
        await small.start()
        _, small_sweep = await _list_and_sweep(small, 10)
        await small.close(0.5)
        page, sweep = await _list_and_sweep(a, 50)
        latency = await _latency(a, b, events)
        idle = await _idle_reads(a, b, idle_s)
        await a.close(0.5)
        await b.close(0.5)

    page_ok = page["median"] <= TARGET_PAGE_MS
    results.append(
        _row(
            f"ListRuns first page (50), {indexed:,} runs indexed",
            f"p50 {page['median']:.2f} ms "
            f"(embedded, {embedded_runs:,} runs in storage: {emb_page['median']:.1f} ms)",
            f"p50 ≤ {TARGET_PAGE_MS:g} ms",
            "MET" if page_ok else "MISSED",
            {
                "control_p50_ms": page["median"],
                "embedded_p50_ms": emb_page["median"],
                "indexed": indexed,
                "embedded_runs": embedded_runs,
            },
        )
    )
    latency_ok = latency["median"] <= TARGET_LATENCY_P50_MS and latency["p99"] <= TARGET_LATENCY_P99_MS
    results.append(
        _row(
            "event latency, executing replica → watcher on another",
            f"p50 {latency['median']:.2f} / p99 {latency['p99']:.2f} ms "
            f"(embedded: {emb_latency['median']:.1f} / {emb_latency['p99']:.1f} ms)",
            f"p50 ≤ {TARGET_LATENCY_P50_MS:g} ms, p99 ≤ {TARGET_LATENCY_P99_MS:g} ms",
            "MET" if latency_ok else "MISSED",
            {
                "control_p50_ms": latency["median"],
                "control_p99_ms": latency["p99"],
                "embedded_p50_ms": emb_latency["median"],
                "embedded_p99_ms": emb_latency["p99"],
            },
        )
    )
    results.append(
        _row(
            "storage reads per idle watcher-minute (run paused elsewhere)",
            f"{idle:.0f} (embedded: {emb_idle:.0f})",
            "0",
            "MET" if idle == 0 else "MISSED",
            {"control": idle, "embedded": emb_idle, "seconds": idle_s},
        )
    )
    independent = sweep["median"] <= max(2 * small_sweep["median"], small_sweep["median"] + 5.0)
    results.append(
        _row(
            f"recovery sweep, {indexed:,} finished runs indexed",
            f"{sweep['median']:.2f} ms (empty index: {small_sweep['median']:.2f} ms; "
            f"embedded, {embedded_runs:,} runs: {emb_sweep['median']:.0f} ms)",
            "independent of finished runs",
            "MET" if independent else "MISSED",
            {
                "control_ms": sweep["median"],
                "empty_index_ms": small_sweep["median"],
                "embedded_ms": emb_sweep["median"],
                "indexed": indexed,
                "embedded_runs": embedded_runs,
            },
        )
    )
    return results
