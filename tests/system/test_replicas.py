"""Two engine processes over one S3 bucket: any replica can get, watch, resume or cancel any run;
exactly one executes it."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from client_py import AsyncEngineClient, ConcurrentUpdateError, InterruptNotFoundError, RunNotPausedError
from tests.conftest import refresh_until, turn
from tests.processes import EngineProcess
from tests.s3_server import new_bucket

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

DOUBLE = [turn("", ("double", {"x": 21})), turn("42")]


@pytest.fixture
async def replicas(tmp_path: Path, moto: str) -> Iterator[tuple[EngineProcess, EngineProcess]]:  # type: ignore[misc]
    bucket = await new_bucket(moto)
    env = {
        "MACHINA_STORAGE": f"s3://{bucket}/machina",
        "AWS_ENDPOINT_URL": moto,
        "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
        "MACHINA_WORKDIR_ROOT": str(tmp_path / "work"),
        "MACHINA_LEASE_TTL_S": "3",
        "MACHINA_TOOLS_CUSTOM": "tests.tools:double,tests.tools:sleep",
        "MACHINA_TOOLS_PERMISSIONS": "double=ask",
    }
    a = EngineProcess(tmp_path / "a", env=env)
    b = EngineProcess(tmp_path / "b", env=env)
    yield a, b
    a.close()
    b.close()


async def test_start_on_one_watch_and_resume_on_the_other(
    replicas: tuple[EngineProcess, EngineProcess],
) -> None:
    a, b = replicas
    async with AsyncEngineClient(a.target) as ca, AsyncEngineClient(b.target) as cb:
        handle_a = await ca.create("double", model="scripted", script=DOUBLE)
        run = await handle_a.wait(timeout=20)
        assert run.state == "PAUSED"
        handle_b = await cb.attach(run.run_id)
        assert handle_b.run.state == "PAUSED"

        async def watch() -> list[object]:
            return [e async for e in handle_b.events(follow=True)]

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.2)
        await handle_b.approve(run.interrupts[0].interrupt_id)
        events = await asyncio.wait_for(watcher, 30)
        done = await handle_a.wait(timeout=20)
    assert done.state == "DONE"
    assert done.data == "42"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))  # type: ignore[attr-defined]
    assert events[-1].kind == "run_finished"  # type: ignore[attr-defined]


async def test_concurrent_resumes_across_replicas_exactly_one_wins(
    replicas: tuple[EngineProcess, EngineProcess],
) -> None:
    a, b = replicas
    async with AsyncEngineClient(a.target) as ca, AsyncEngineClient(b.target) as cb:
        handle = await ca.create("double", model="scripted", script=DOUBLE)
        run = await handle.wait(timeout=20)
        interrupt_id = run.interrupts[0].interrupt_id
        handles = [await ca.attach(run.run_id), await cb.attach(run.run_id)] * 4
        results = await asyncio.gather(*(h.approve(interrupt_id) for h in handles), return_exceptions=True)
        winners = [r for r in results if not isinstance(r, BaseException)]
        assert len(winners) == 1, results
        assert all(
            isinstance(r, RunNotPausedError | ConcurrentUpdateError | InterruptNotFoundError)
            for r in results
            if isinstance(r, BaseException)
        ), results
        run = await refresh_until(handle, "DONE")
        events = [e async for e in handle.events(follow=False)]
    assert run.state == "DONE"
    assert sum(e.kind == "approval_decided" for e in events) == 1
    assert sum(e.kind == "tool_call_completed" for e in events) == 1


async def test_cancel_from_the_other_replica(replicas: tuple[EngineProcess, EngineProcess]) -> None:
    a, b = replicas
    async with AsyncEngineClient(a.target) as ca, AsyncEngineClient(b.target) as cb:
        script = [turn("", ("sleep", {"seconds": 20})), turn("never")]
        handle = await ca.create(f"sleepy-{uuid.uuid4().hex[:6]}", model="scripted", script=script)
        async for event in handle.events(follow=True):
            if event.kind == "tool_call_started":
                break
        other = await cb.attach(handle.run_id)
        run = await other.cancel("stop from replica b")
        assert run.state in ("RUNNING", "CANCELLED")
        run = await refresh_until(other, "CANCELLED", tries=100)
    assert run.state == "CANCELLED"
    assert run.error is not None
    assert "replica b" in run.error.message
