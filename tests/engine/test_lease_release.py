"""A lease renewal that races the run giving its lease up never keeps the lease."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine_service.core._checkpoint import CheckpointedRun, RunEnv
from engine_service.core._run import RunRecord, RunSpec
from engine_service.core._types import Permission, RunState
from engine_service.storage._local import LocalStorage

pytestmark = pytest.mark.timeout(20)


async def test_a_renewal_under_way_when_the_lease_is_released_gives_it_back(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    record = RunRecord(
        run_id="r1", workspace_id="w", task="t", state=RunState.RUNNING, created_at=1.0, updated_at=1.0
    )
    assert await storage.create_run("w", "r1", {"task": "t"}, record.to_json())
    env = RunEnv(
        storage=storage,
        model=None,  # type: ignore[arg-type]
        tools={},
        permissions=lambda _name: Permission.ALLOW,
        system_prompt="",
        max_turns=1,
        max_output_tokens=1,
        price=(0.0, 0.0, 0.0, 0.0),
        owner="engine-a",
        lease_ttl=30.0,
    )
    run = CheckpointedRun(record, RunSpec(task="t", run_id="r1"), [], env)
    acquire = storage.acquire_lease
    assert await acquire("w", "r1", "engine-a", 30.0)
    gate = asyncio.Event()

    async def slow_acquire(*args: Any) -> bool:
        await gate.wait()
        return await acquire(*args)

    storage.acquire_lease = slow_acquire  # type: ignore[method-assign,assignment]
    renewal = asyncio.create_task(run._renew_lease())  # the heartbeat, mid-renewal
    await asyncio.sleep(0.05)
    await run.release()  # the run paused or ended meanwhile
    gate.set()
    await renewal
    # Another process can take the run at once, not only once a renewed lease expired.
    assert await acquire("w", "r1", "engine-b", 30.0)
    # And a heartbeat after the release does not take it either.
    await run._renew_lease()
    assert await acquire("w", "r1", "engine-b", 30.0)
