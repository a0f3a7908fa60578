"""``python -m bench.trust``: health-check latency of a real engine while the worst Grep runs.

A run Greps 48 MB of lines of ``a`` with patterns that backtrack exponentially in Python's ``re``
(``(a+)+!$``, ``(a|aa)+!$``, ``(.*a){20}!``); meanwhile this process sends gRPC health checks
back to back and records each one's latency. For scale it also times ``re`` itself on
``(a+)+!$`` against 20–24 ``a``'s (each character doubles it; the Grep's lines have 200).
Prints a summary and writes ``bench-results/trust.json``.
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench._common import ROOT, progress, start_engine, stop_engine
from bench._rows import summarize
from client_py import AsyncEngineClient

PATTERNS = [r"(a+)+!$", r"(a|aa)+!$", r"(.*a){20}!"]


def backtracking_seconds() -> dict[int, float]:
    """Seconds Python's ``re`` takes for ``(a+)+!$`` against n ``a``'s (no match)."""
    out = {}
    for n in range(20, 25):
        started = time.perf_counter()
        re.search(r"(a+)+!$", "a" * n)
        out[n] = round(time.perf_counter() - started, 4)
    return out


async def health_during_grep(storage: Path) -> dict[str, Any]:
    run_id = "bench-grep"
    work = storage / "work" / "default" / run_id
    work.mkdir(parents=True)
    block = ("a" * 200 + "\n") * 24_000
    for i in range(10):
        (work / f"f{i}.txt").write_text(block)
    proc, target, _ = start_engine(storage)
    try:
        async with AsyncEngineClient(target) as client, grpc.aio.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            script = [{"tool_calls": [{"name": "Grep", "arguments": {"pattern": p}}]} for p in PATTERNS]
            started = time.perf_counter()
            handle = await client.create("grep", run_id=run_id, script=[*script, {"text": "done"}])
            latencies = []
            while (await handle.refresh()).state not in ("DONE", "FAILED"):
                t = time.perf_counter()
                await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                latencies.append((time.perf_counter() - t) * 1000)
            run = await handle.wait(timeout=120)
            return {
                "state": run.state,
                "run_seconds": round(time.perf_counter() - started, 2),
                "health_ms": {k: round(v, 2) for k, v in summarize(latencies).items()},
                "health_max_ms": round(max(latencies), 2),
            }
    finally:
        stop_engine(proc)


def main() -> None:
    progress("Python re on (a+)+!$ for comparison")
    results: dict[str, Any] = {"re_seconds_by_length": backtracking_seconds()}
    progress("health checks while a run Greps 48 MB with catastrophic patterns")
    with tempfile.TemporaryDirectory() as tmp:
        results["grep"] = asyncio.run(health_during_grep(Path(tmp)))
    out = ROOT / "bench-results" / "trust.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
