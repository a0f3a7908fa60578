"""The work queue: a workspace's limit, queue positions, FIFO; durable approval timers."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

from client_py import AsyncEngineClient
from tests.conftest import refresh_until, turn
from tests.control.conftest import Replicas

pytestmark = pytest.mark.timeout(90)

SLEEPY = [turn("", ("sleep", {"seconds": 0.3})), turn("done")]


async def test_queued_runs_wait_for_their_workspace_limit_in_order(replicas: Replicas) -> None:
    a = await replicas.start(max_running=2)
    b = await replicas.start(max_running=2)
    enqueued = REGISTRY.get_sample_value("machina_runs_enqueued_total") or 0.0
    dequeued = REGISTRY.get_sample_value("machina_runs_dequeued_total") or 0.0
    async with AsyncEngineClient(f"127.0.0.1:{a.port}") as ca, AsyncEngineClient(f"127.0.0.1:{b.port}") as cb:
        handles = []
        for i in range(8):
            client = ca if i % 2 else cb
            handles.append(await client.create(f"task {i}", model="scripted", script=SLEEPY))
        last = await handles[-1].refresh()
        assert last.state == "QUEUED"
        assert last.queue_position >= 1
        peak = 0
        while True:
            runs = [r async for r in ca.list_runs()]
            running = sum(r.state == "RUNNING" for r in runs)
            peak = max(peak, running)
            assert running <= 2
            if all(r.state == "DONE" for r in runs):
                break
            await asyncio.sleep(0.02)
        for handle in handles:
            assert (await handle.refresh()).queue_position == 0
    assert peak == 2
    # Both replicas live in this process: its counters add up the queue's traffic.
    assert (REGISTRY.get_sample_value("machina_runs_enqueued_total") or 0.0) - enqueued == 8
    assert (REGISTRY.get_sample_value("machina_runs_dequeued_total") or 0.0) - dequeued == 8


async def test_an_approval_deadline_fires_on_another_replica(replicas: Replicas) -> None:
    config = {"tools": {"permissions": {"double": "ask"}}}
    a = await replicas.start(config=config)
    async with AsyncEngineClient(f"127.0.0.1:{a.port}") as ca:
        handle = await ca.create(
            "double",
            model="scripted",
            script=[turn("", ("double", {"x": 2})), turn("after")],
            approval_timeout=1.5,
            approval_expiry_action="approve",
        )
        run = await handle.wait(timeout=20)
        assert run.state == "PAUSED"
    started = time.monotonic()
    await replicas.running[0].stop(0.5)  # the replica that armed the timer is gone
    replicas.running.clear()
    b = await replicas.start(config=config)
    async with AsyncEngineClient(f"127.0.0.1:{b.port}") as cb:
        done = await refresh_until(await cb.attach(run.run_id), "DONE", "FAILED", tries=150, interval=0.1)
    assert done.state == "DONE"
    assert time.monotonic() - started < 10
