"""Threads: what a long conversation costs, and what deleting one leaves behind.

In process, local storage, the scripted model. A thread is grown to ``LENGTH`` runs; the start
of its last runs (``create_run`` returning: the place claimed, the spec with the history's
segments written, the run started) is timed against the start of the first run of fresh
threads, side by side in the same process. The whole run (start to DONE, which reads the
history the model is sent) is reported too. Then every thread is deleted and the bytes left in
storage by it are counted. ``python -m bench.threads`` prints the rows.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import PRINCIPAL, bench_engine, dir_bytes
from bench._rows import summarize
from engine_service import Engine, LocalStorage, RunSpec, RunState, ScriptedTurn

LENGTH = 100
TARGET_RATIO = 1.2


async def _start(engine: Engine, thread_id: str, task: str) -> tuple[float, float]:
    """(ms to start, ms to DONE) of one run on ``thread_id``."""
    spec = RunSpec(
        task=task, model_provider="scripted", script=[ScriptedTurn(f"noted {task}")], thread_id=thread_id
    )
    started = time.perf_counter()
    record, _ = await engine.create_run(PRINCIPAL, spec)
    start_ms = (time.perf_counter() - started) * 1000
    record, _ = await engine.wait_run(PRINCIPAL, record.run_id, timeout=60)
    done_ms = (time.perf_counter() - started) * 1000
    assert record.state is RunState.DONE, record.error
    return start_ms, done_ms


async def measure(length: int, samples: int) -> dict[str, Any]:
    """Start and end-to-end times of the first runs of fresh threads and of the last
    ``samples`` runs of a ``length``-run thread, and the bytes left after deleting them all."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "storage"
        engine = bench_engine(LocalStorage(root), str(Path(tmp) / "work"))
        await _start(engine, "warmup", "warm up")  # imports, first files
        await engine.delete_thread(PRINCIPAL, "warmup")
        baseline = dir_bytes(root)
        first: list[tuple[float, float]] = []
        last: list[tuple[float, float]] = []
        for position in range(1, length + 1):
            if position > length - samples:
                # Side by side: a first run of a fresh thread, then the next run of the long one.
                first.append(await _start(engine, f"fresh-{position}", "a first question"))
                last.append(await _start(engine, "long", f"question {position}"))
            else:
                await _start(engine, "long", f"question {position}")
        stored = dir_bytes(root) - baseline
        thread_ids = ["long", *(f"fresh-{p}" for p in range(length - samples + 1, length + 1))]
        deleted = 0
        for thread_id in thread_ids:
            deleted += len(await engine.delete_thread(PRINCIPAL, thread_id))
        left = dir_bytes(root) - baseline
        await engine.close()
    return {
        "length": length,
        "first_start_ms": [f[0] for f in first],
        "last_start_ms": [r[0] for r in last],
        "first_done_ms": [f[1] for f in first],
        "last_done_ms": [r[1] for r in last],
        "stored_bytes": stored,
        "runs_deleted": deleted,
        "bytes_left": left,
    }


async def rows(quick: bool) -> list[dict[str, Any]]:
    data = await measure(LENGTH, 10 if quick else 30)
    first, last = summarize(data["first_start_ms"]), summarize(data["last_start_ms"])
    ratio = last["median"] / first["median"]
    first_done, last_done = summarize(data["first_done_ms"]), summarize(data["last_done_ms"])
    return [
        {
            "name": f"start run {LENGTH} of a thread vs run 1",
            "value": f"{ratio:.2f}× ({last['median']:.2f} vs {first['median']:.2f} ms median; "
            f"p95 {last['p95']:.2f} vs {first['p95']:.2f})",
            "target": f"≤ {TARGET_RATIO}×",
            "verdict": "MET" if ratio <= TARGET_RATIO else "MISSED",
            "data": {"ratio": ratio, "first": first, "last": last, **data},
        },
        {
            "name": f"run {LENGTH} of a thread vs run 1, start to DONE (reads the history)",
            "value": f"{last_done['median']:.2f} vs {first_done['median']:.2f} ms median",
            "target": "",
            "verdict": "REPORT",
            "data": {"first": first_done, "last": last_done},
        },
        {
            "name": "bytes left after deleting the threads",
            "value": f"{data['bytes_left']} B (of {data['stored_bytes']} B stored by "
            f"{data['runs_deleted']} runs)",
            "target": "0 B",
            "verdict": "MET" if data["bytes_left"] == 0 else "MISSED",
            "data": {"bytes_left": data["bytes_left"], "stored_bytes": data["stored_bytes"]},
        },
    ]


def main() -> None:
    quick = "--quick" in sys.argv
    for row in asyncio.run(rows(quick)):
        print(json.dumps({k: v for k, v in row.items() if k != "data"}, ensure_ascii=False))


if __name__ == "__main__":
    main()
