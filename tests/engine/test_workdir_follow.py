"""A run's files follow it: the run directory is snapshotted into the run's storage at each
checkpoint and restored wherever the run continues, whatever disk that process has.

Real processes: two engines on one S3 bucket (moto) with their own workdir roots, as two
machines have; an engine handing off to a runner with its own workdir root.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from client_py import AsyncEngineClient, AsyncRunHandle, RunEvent, ToolCallCompleted
from tests.conftest import ServerFactory, turn
from tests.processes import EngineProcess, RunnerProcess
from tests.s3_server import new_bucket

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SECRET = "runner-secret-for-workdir-tests-41a7"


def outputs(events: list[RunEvent]) -> dict[str, ToolCallCompleted]:
    return {e.call_id: e for e in events if isinstance(e, ToolCallCompleted)}


async def approve_and_wait(handle: AsyncRunHandle) -> str:
    run = await handle.approve(handle.run.interrupts[0].interrupt_id)
    run = await handle.wait(timeout=30)
    return run.state


@pytest.fixture
async def two_machines(tmp_path: Path, moto: str) -> Iterator[tuple[EngineProcess, EngineProcess]]:  # type: ignore[misc]
    bucket = await new_bucket(moto)
    env = {
        "MACHINA_STORAGE": f"s3://{bucket}/machina",
        "AWS_ENDPOINT_URL": moto,
        "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
        "MACHINA_TOOLS_CUSTOM": "tests.tools:double,tests.tools:remove",
        "MACHINA_TOOLS_PERMISSIONS": "double=ask",
    }
    a = EngineProcess(tmp_path / "a", env={**env, "MACHINA_WORKDIR_ROOT": str(tmp_path / "a" / "work")})
    b = EngineProcess(tmp_path / "b", env={**env, "MACHINA_WORKDIR_ROOT": str(tmp_path / "b" / "work")})
    yield a, b
    a.close()
    b.close()


async def test_files_follow_the_run_between_replicas(
    two_machines: tuple[EngineProcess, EngineProcess], tmp_path: Path
) -> None:
    a, b = two_machines
    script = [
        # On a: two files, then a pause for approval.
        turn("", ("Write", {"path": "notes/a.txt", "content": "written on a"}),
             ("Write", {"path": "gone.txt", "content": "removed on b"})),
        turn("", ("double", {"x": 1})),
        # Approved through b: b reads a's file, removes one, writes its own; pauses again.
        turn("", ("Read", {"path": "notes/a.txt"}), ("remove", {"path": "gone.txt"}),
             ("Write", {"path": "b.txt", "content": "written on b"})),
        turn("", ("double", {"x": 2})),
        # Approved through a again: a sees b's changes, the removal too.
        turn("", ("Read", {"path": "b.txt"}), ("Read", {"path": "gone.txt"}),
             ("Read", {"path": "notes/a.txt"})),
        turn("done"),
    ]  # fmt: skip
    async with AsyncEngineClient(a.target) as ca, AsyncEngineClient(b.target) as cb:
        on_a = await ca.create("files", model="scripted", script=script)
        assert (await on_a.wait(timeout=30)).state == "PAUSED"
        on_b = await cb.attach(on_a.run_id)
        assert await approve_and_wait(on_b) == "PAUSED"
        on_a = await ca.attach(on_a.run_id)
        assert await approve_and_wait(on_a) == "DONE"
        events = [e async for e in on_a.events(follow=False)]
    results = outputs(events)
    assert "written on a" in results["call_3_1"].output  # on b
    assert not results["call_3_1"].is_error
    assert "written on b" in results["call_5_1"].output  # back on a
    assert results["call_5_2"].is_error  # removed on b, so gone on a as well
    assert "written on a" in results["call_5_3"].output
    run_dir = Path("default") / on_a.run_id
    assert not (tmp_path / "a" / "work" / run_dir / "gone.txt").exists()
    assert (tmp_path / "b" / "work" / run_dir / "notes" / "a.txt").read_text() == "written on a"


async def test_files_follow_the_run_to_a_runner_with_its_own_disk(tmp_path: Path) -> None:
    env = {"MACHINA_STORAGE": str(tmp_path / "storage"), "MACHINA_RUNNER_SECRET": SECRET}
    runner = RunnerProcess(tmp_path / "runner", env={**env, "MACHINA_WORKDIR_ROOT": str(tmp_path / "r")})
    engine = EngineProcess(
        tmp_path / "engine",
        env={
            **env,
            "MACHINA_WORKDIR_ROOT": str(tmp_path / "e"),
            "MACHINA_CAPABILITIES_SUBPROCESS": "false",
            "MACHINA_RUNNER_URL": f"{runner.http}/continue",
        },
    )
    script = [
        turn("", ("Write", {"path": "in.txt", "content": "from the engine"})),
        turn("", ("Bash", {"command": "cat in.txt; echo from the runner > out.txt"})),
        turn("", ("Read", {"path": "out.txt"})),
        turn("done"),
    ]
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create("handoff", model="scripted", script=script)
            events = [e async for e in handle.events(follow=True)]
            run = await handle.wait(timeout=30)
    finally:
        engine.close()
        runner.close()
    assert run.state == "DONE", run
    assert any(e.kind == "handoff_to_runner" for e in events)
    results = outputs(events)
    assert "from the engine" in results["call_2_1"].output
    assert "from the runner" in results["call_3_1"].output
    assert (tmp_path / "r" / "default" / run.run_id / "in.txt").read_text() == "from the engine"


async def test_a_run_directory_past_the_cap_fails_the_run_clearly(servers: ServerFactory) -> None:
    server = await servers.start(config={"workdir_snapshot_max_bytes": 1000})
    script = [turn("", ("Write", {"path": "big.txt", "content": "x" * 2000})), turn("never")]
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        handle = await client.create("too big", model="scripted", script=script)
        run = await handle.wait(timeout=20)
    assert run.state == "FAILED"
    assert run.error is not None
    assert run.error.code == "ERR_WORKDIR_TOO_LARGE"
    assert run.error.metadata == {"size": "2000", "max_bytes": "1000"}
