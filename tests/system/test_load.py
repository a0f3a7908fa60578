"""Load on loopback: hundreds of concurrent streams and runs against a real engine
process for a bounded time — zero errors, latency percentiles recorded, memory flat.

Three kinds of workers share the engine for ``MACHINA_LOAD_SECONDS`` (default 8 s here; `just load`
runs a minute with more workers):

- executors: ``ExecuteRun`` a 3-turn scripted run with a tool call per turn, streaming every event;
- creators: ``CreateRun`` then ``WaitRun``, handing each run id to a follower;
- followers: ``StreamRunEvents(follow=True)`` on those runs until ``run_finished``.

Every stream must be gap-free (seqs 1..N) and every run DONE. The engine's RSS is sampled from
/proc every 0.2 s; after a warm-up, the mean of the last third of the samples must stay within a
generous bound of the first third's. Percentiles are printed and written to
``test-artifacts/load.json``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from client_py import AsyncEngineClient, RunEvent
from tests.conftest import ROOT, turn
from tests.processes import EngineProcess

SECONDS = float(os.environ.get("MACHINA_LOAD_SECONDS", "8"))
CONCURRENCY = int(os.environ.get("MACHINA_LOAD_CONCURRENCY", "240"))
WARMUP_S = min(3.0, SECONDS / 3)
CHANNELS = 4  # the workers spread over a few HTTP/2 connections, as several callers would
SCRIPT = [turn(f"step {i}", ("noop", {"i": i})) for i in range(1, 4)] + [turn("finished")]
# Memory may grow a little as caches fill; it must not keep growing with the number of runs.
RSS_GROWTH_FACTOR = 1.25
RSS_GROWTH_SLACK_MB = 40.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(SECONDS * 3 + 90))]


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    errors: list[str] = field(default_factory=list)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)

    def record(self, what: str, seconds: float) -> None:
        self.latencies[what].append(seconds * 1000)

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for what, values in sorted(self.latencies.items()):
            ordered = sorted(values)

            def pct(p: float, ordered: list[float] = ordered) -> float:
                return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 2)

            out[what] = {
                "count": len(ordered),
                "p50_ms": pct(50),
                "p90_ms": pct(90),
                "p99_ms": pct(99),
                "max_ms": round(ordered[-1], 2),
            }
        return out


def gap_free(events: list[RunEvent]) -> bool:
    return [e.seq for e in events] == list(range(1, len(events) + 1))


async def guarded(stats: Stats, what: str, body: Callable[[], Awaitable[None]]) -> None:
    try:
        await body()
        stats.counts[what] += 1
    except Exception as exc:  # every failure is counted and reported, none may happen
        stats.errors.append(f"{what}: {type(exc).__name__}: {exc}")


async def executor(client: AsyncEngineClient, stats: Stats, stop: asyncio.Event) -> None:
    async def once() -> None:
        started = time.perf_counter()
        execution = client.execute("load", model="scripted", script=SCRIPT)
        events: list[RunEvent] = []
        async for event in execution:
            if not events:
                stats.record("execute_first_event", time.perf_counter() - started)
            events.append(event)
        run = execution.run
        assert run is not None
        assert run.state == "DONE", run
        assert gap_free(events), [e.seq for e in events]
        stats.record("execute_run", time.perf_counter() - started)

    while not stop.is_set():
        await guarded(stats, "execute", once)


async def creator(
    client: AsyncEngineClient, stats: Stats, stop: asyncio.Event, runs: asyncio.Queue[str]
) -> None:
    async def once() -> None:
        started = time.perf_counter()
        handle = await client.create("load", model="scripted", script=SCRIPT)
        stats.record("create_run", time.perf_counter() - started)
        if runs.qsize() < 1000:
            runs.put_nowait(handle.run_id)
        run = await handle.wait(timeout=60)
        assert run.state == "DONE", run
        stats.record("create_to_done", time.perf_counter() - started)

    while not stop.is_set():
        await guarded(stats, "create", once)


async def follower(
    client: AsyncEngineClient, stats: Stats, stop: asyncio.Event, runs: asyncio.Queue[str]
) -> None:
    async def once(run_id: str) -> None:
        started = time.perf_counter()
        handle = await client.attach(run_id)
        events = [e async for e in handle.events(follow=True)]
        assert events, run_id
        assert events[-1].kind == "run_finished", events[-1]
        assert gap_free(events), [e.seq for e in events]
        stats.record("follow_to_finish", time.perf_counter() - started)

    while not stop.is_set():
        try:
            run_id = await asyncio.wait_for(runs.get(), timeout=0.5)
        except TimeoutError:
            continue
        await guarded(stats, "follow", functools.partial(once, run_id))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def sample_rss(pid: int, stop: asyncio.Event, samples: list[tuple[float, float]]) -> None:
    while not stop.is_set():
        samples.append((time.monotonic(), rss_mb(pid)))
        await asyncio.sleep(0.2)


async def test_hundreds_of_concurrent_streams_and_runs(tmp_path: Path) -> None:
    env = {
        "MACHINA_STORAGE": str(tmp_path / "storage"),
        "MACHINA_WORKDIR_ROOT": str(tmp_path / "work"),
        "MACHINA_TOOLS_CUSTOM": "tests.tools:noop",
        "MACHINA_LOG_LEVEL": "warning",
    }
    engine = EngineProcess(tmp_path, env=env)
    stats = Stats()
    samples: list[tuple[float, float]] = []
    executors = CONCURRENCY // 2
    creators = followers = CONCURRENCY // 4
    try:
        clients = [AsyncEngineClient(engine.target, call_timeout=60) for _ in range(CHANNELS)]
        stop, stop_sampling = asyncio.Event(), asyncio.Event()
        runs: asyncio.Queue[str] = asyncio.Queue()
        sampler = asyncio.create_task(sample_rss(engine.proc.pid, stop_sampling, samples))
        started = time.monotonic()
        workers = [
            *(executor(clients[i % CHANNELS], stats, stop) for i in range(executors)),
            *(creator(clients[i % CHANNELS], stats, stop, runs) for i in range(creators)),
            *(follower(clients[i % CHANNELS], stats, stop, runs) for i in range(followers)),
        ]
        tasks = [asyncio.create_task(w) for w in workers]
        await asyncio.sleep(SECONDS)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)
        elapsed = time.monotonic() - started
        stop_sampling.set()
        await sampler
        for client in clients:
            await client.close()
        assert engine.proc.poll() is None, "the engine died under load"
    finally:
        engine.close()

    summary = stats.summary()
    steady = [mb for t, mb in samples if t - started >= WARMUP_S]
    third = max(1, len(steady) // 3)
    first, last = statistics.mean(steady[:third]), statistics.mean(steady[-third:])
    report: dict[str, Any] = {
        "seconds": round(elapsed, 2),
        "concurrency": {"executors": executors, "creators": creators, "followers": followers},
        "completed": dict(stats.counts),
        "runs_per_second": round((stats.counts["execute"] + stats.counts["create"]) / elapsed, 1),
        "errors": len(stats.errors),
        "latency": summary,
        "rss_mb": {
            "first_third_mean": round(first, 1),
            "last_third_mean": round(last, 1),
            "max": round(max(mb for _, mb in samples), 1),
            "samples": len(samples),
        },
    }
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))

    assert not stats.errors, f"{len(stats.errors)} errors, e.g. {stats.errors[:5]}"
    assert stats.counts["execute"] >= executors, stats.counts
    assert stats.counts["follow"] > 0, stats.counts
    assert last <= first * RSS_GROWTH_FACTOR + RSS_GROWTH_SLACK_MB, report["rss_mb"]
