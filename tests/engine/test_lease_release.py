"""A lease renewal never keeps or takes back a lease it should not: one that races the run
giving its lease up, or one another process took while this one stalled."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine_service.core._checkpoint import CheckpointedRun, LeaseLost, RunEnv
from engine_service.core._run import RunRecord, RunSpec
from engine_service.core._types import EventKind, Permission, RunState
from engine_service.storage._local import LocalStorage

pytestmark = pytest.mark.timeout(20)


async def _actor(storage: LocalStorage, *, lease_ttl: float) -> CheckpointedRun:
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
        lease_ttl=lease_ttl,
    )
    return CheckpointedRun(record, RunSpec(task="t", run_id="r1"), [], env)


async def test_a_renewal_under_way_when_the_lease_is_released_gives_it_back(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    run = await _actor(storage, lease_ttl=30.0)
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


async def test_a_stalled_writer_does_not_take_back_a_run_another_process_moved(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    run = await _actor(storage, lease_ttl=0.2)
    assert await run.take_over()
    # This process stalls past its lease (a long GC pause, a storage outage); another process
    # takes the run, moves it and gives it up again before this one wakes.
    await asyncio.sleep(0.3)
    assert await storage.acquire_lease("w", "r1", "engine-b", 30.0)
    await storage.release_lease("w", "r1", "engine-b")
    # The stalled writer's next renewal must not take the run back: what it holds is stale.
    with pytest.raises(LeaseLost):
        await run._renew_lease()
    assert await storage.acquire_lease("w", "r1", "engine-c", 30.0)


async def test_an_expired_lease_nobody_took_is_extended(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    run = await _actor(storage, lease_ttl=0.2)
    assert await run.take_over()
    await asyncio.sleep(0.3)
    await run._renew_lease()  # nobody moved the run meanwhile: it is still this writer's
    assert not await storage.acquire_lease("w", "r1", "engine-b", 30.0)


async def test_a_stalled_writer_writes_nothing_once_another_process_took_the_run(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    run = await _actor(storage, lease_ttl=0.2)
    assert await run.take_over()
    await run.checkpoint()
    before = await storage.read_state("w", "r1")
    # Stalled past its lease (its heartbeat did not run either) while another process took the
    # run over and gave it up again.
    await asyncio.sleep(0.3)
    assert await storage.acquire_lease("w", "r1", "engine-b", 30.0)
    await storage.release_lease("w", "r1", "engine-b")
    run.emit(EventKind.ASSISTANT_MESSAGE, {"text": "written from stale memory"})
    with pytest.raises(LeaseLost):
        await run.write_events()
    with pytest.raises(LeaseLost):
        await run.checkpoint()
    assert await storage.read_segments("w", "r1", "events", 0, 100) == []
    assert await storage.read_state("w", "r1") == before


async def test_a_writer_that_stalled_with_nobody_taking_the_run_goes_on(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    run = await _actor(storage, lease_ttl=0.2)
    assert await run.take_over()
    await asyncio.sleep(0.3)
    run.emit(EventKind.ASSISTANT_MESSAGE, {"text": "still mine"})
    await run.write_events()  # renewed first
    written = await storage.read_segments("w", "r1", "events", 0, 100)
    assert [e["d"]["text"] for e in written] == ["still mine"]
    assert not await storage.acquire_lease("w", "r1", "engine-b", 30.0)


async def test_a_text_delta_after_a_checkpoint_is_stored_not_lost_in_the_event_it_wrote(
    tmp_path: Path,
) -> None:
    """A checkpoint writes the text delta event being built; a delta that follows (a subagent
    streaming while its parent checkpoints) starts a new event instead of joining one already
    written, so every seq is stored once."""
    storage = LocalStorage(tmp_path)
    run = await _actor(storage, lease_ttl=30.0)
    assert await run.take_over()
    for text in ("a", "b"):
        run.emit_text(text, 1, "c1")
    await run.checkpoint()
    for text in ("c", "d"):
        run.emit_text(text, 1, "c1")
    await run.checkpoint()
    stored = await storage.read_segments("w", "r1", "events", 0, 10)
    assert [d["seq"] for d in stored] == [1, 3]
    assert [d["d"]["texts"] for d in stored] == [["a", "b"], ["c", "d"]]
