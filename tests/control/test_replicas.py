"""Three engine replicas and a runner over one S3 bucket (moto) and one PostgreSQL database."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from client_py import AsyncEngineClient
from tests.conftest import refresh_until, turn
from tests.processes import EngineProcess, RunnerProcess
from tests.s3_server import new_bucket

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SECRET = "runner-secret-for-tests"


@dataclass
class Deployment:
    engines: list[EngineProcess]
    runner: RunnerProcess
    database: str

    async def executor(self, run_id: str) -> EngineProcess:
        """The replica holding the run's execution slot (waits until one does)."""
        conn = await asyncpg.connect(self.database)
        try:
            for _ in range(400):
                owner = await conn.fetchval("SELECT owner FROM machina_slots WHERE run_id = $1", run_id)
                for engine in self.engines:
                    if owner and owner.startswith(f"engine-{engine.proc.pid}-"):
                        return engine
                await asyncio.sleep(0.05)
        finally:
            await conn.close()
        raise AssertionError(f"no replica executes {run_id}")


@pytest.fixture
async def deployment(tmp_path: Path, moto: str, database: str) -> AsyncIterator[Deployment]:
    bucket = await new_bucket(moto)
    env = {
        "MACHINA_STORAGE": f"s3://{bucket}/machina",
        "AWS_ENDPOINT_URL": moto,
        "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
        "MACHINA_CONTROL_URL": database,
        "MACHINA_LEASE_TTL_S": "3",
        "MACHINA_RECOVERY_INTERVAL_S": "1",
        "MACHINA_WORKSPACE_MAX_RUNNING": "5",
        "MACHINA_TOOLS_CUSTOM": "tests.tools:double,tests.tools:sleep",
        "MACHINA_TOOLS_PERMISSIONS": "double=ask",
        "MACHINA_RUNNER_SECRET": SECRET,
    }
    runner = RunnerProcess(tmp_path / "runner", env={**env, "MACHINA_WORKDIR_ROOT": str(tmp_path / "r")})
    engines = [
        EngineProcess(
            tmp_path / name,
            env={
                **env,
                "MACHINA_WORKDIR_ROOT": str(tmp_path / name / "work"),
                "MACHINA_RUNNER_URL": f"{runner.http}/continue",
                "MACHINA_CAPABILITIES_SUBPROCESS": "false",
            },
        )
        for name in ("a", "b", "c")
    ]
    yield Deployment(engines, runner, database)
    for engine in engines:
        engine.close()
    runner.close()


async def test_kill_9_a_replica_mid_run_and_another_finishes_it(deployment: Deployment) -> None:
    script = [turn("", ("sleep", {"seconds": 0.5})) for _ in range(6)] + [turn("finished")]
    async with AsyncEngineClient(deployment.engines[0].target) as client:
        handle = await client.create("long", model="scripted", script=script)
        victim = await deployment.executor(handle.run_id)
        await refresh_until(handle, "RUNNING")
        await asyncio.sleep(1.0)
        victim.kill9()
        survivors = [e for e in deployment.engines if e is not victim]
    async with AsyncEngineClient(survivors[0].target) as client:
        handle = await client.attach(handle.run_id)
        run = await handle.wait(timeout=60)
        events = [e async for e in handle.events()]
    assert run.state == "DONE", run
    assert run.data == "finished"
    assert any(e.kind == "resumed" for e in events)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_200_queued_runs_respect_a_workspace_limit_of_5_at_every_moment(deployment: Deployment) -> None:
    script = [turn("", ("sleep", {"seconds": 0.05})), turn("ok")]
    clients = [AsyncEngineClient(e.target) for e in deployment.engines]
    conn = await asyncpg.connect(deployment.database)
    peak = 0
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(
                peak, await conn.fetchval("SELECT count(*) FROM machina_slots WHERE workspace = 'default'")
            )
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        handles = await asyncio.gather(
            *(clients[i % 3].create(f"task {i}", model="scripted", script=script) for i in range(200))
        )
        queued = [await h.refresh() for h in handles[-5:]]
        runs = [await h.wait(timeout=150) for h in handles]
        spans = []
        for handle in handles:
            events = [e async for e in handle.events()]
            spans.append((events[0].time.timestamp(), events[-1].time.timestamp()))
    finally:
        sampling = False
        await sampler
        await conn.close()
        for client in clients:
            await client.close()
    assert all(r.state == "DONE" for r in runs)
    assert peak <= 5
    # From the runs' own events: never more than 5 between run_started and run_finished at once.
    moments = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, step in moments:
        running += step
        most = max(most, running)
    assert most <= 5
    assert any(r.state == "QUEUED" and r.queue_position > 0 for r in queued) or most == 5


async def test_a_watcher_on_b_sees_the_events_of_a_run_executing_on_a(deployment: Deployment) -> None:
    script = [turn("", ("sleep", {"seconds": 0.2})) for _ in range(5)] + [turn("done")]
    async with AsyncEngineClient(deployment.engines[0].target) as creator:
        handle = await creator.create("watched", model="scripted", script=script)
    executing = await deployment.executor(handle.run_id)
    other = next(e for e in deployment.engines if e is not executing)
    async with AsyncEngineClient(other.target) as watcher:
        watched = await watcher.attach(handle.run_id)
        events = [e async for e in watched.events(follow=True)]
        run = await watched.wait(timeout=30)
    assert run.state == "DONE"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert sum(e.kind == "tool_call_completed" for e in events) == 5
    assert events[-1].kind == "run_finished"


async def test_a_timer_set_on_a_fires_after_a_is_killed(deployment: Deployment) -> None:
    script = [turn("", ("double", {"x": 4})), turn("after the deadline")]
    async with AsyncEngineClient(deployment.engines[0].target) as client:
        handle = await client.create(
            "expiring", model="scripted", script=script, approval_timeout=3, approval_expiry_action="approve"
        )
        paused = await handle.wait(timeout=30)
        assert paused.state == "PAUSED"
    # The deadline's timer row is written before the pause commits; the slot is given back
    # with the replica's next batch of control-plane writes, so wait for both.
    count_timers = "SELECT count(*) FROM machina_timers WHERE run_id = $1"
    slot_owner = "SELECT owner FROM machina_slots WHERE run_id = $1"
    conn = await asyncpg.connect(deployment.database)
    try:
        for _ in range(200):
            timers = await conn.fetchval(count_timers, handle.run_id)
            held_by = await conn.fetchval(slot_owner, handle.run_id)
            if timers and held_by is None:
                break
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    assert timers == 1
    assert held_by is None  # a paused run holds no slot
    # The replica that paused the run (and set its timer) dies; the timer is a row, not its memory.
    deployment.engines[0].kill9()
    async with AsyncEngineClient(deployment.engines[1].target) as client:
        run = await refresh_until(
            await client.attach(handle.run_id), "DONE", "FAILED", tries=300, interval=0.1
        )
    assert run.state == "DONE", run
    assert run.data == "after the deadline"


async def test_a_run_handed_to_the_runner_is_indexed_and_watched_live(deployment: Deployment) -> None:
    script = [turn("", ("Bash", {"command": "echo from the runner"})), turn("done")]
    async with AsyncEngineClient(deployment.engines[1].target) as client:
        handle = await client.create("handoff", model="scripted", script=script)
        events = [e async for e in handle.events(follow=True)]
        run = await handle.wait(timeout=60)
        listed = [r async for r in client.list_runs(states=["DONE"])]
    assert run.state == "DONE", run
    assert any(e.kind == "handoff_to_runner" for e in events)
    assert handle.run_id in [r.run_id for r in listed]
