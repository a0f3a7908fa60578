"""What the engine acknowledged is what it keeps: crashes before the first checkpoint, storage
made read-only or full mid-run, restarts past approval deadlines (real engine processes)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from client_py import (
    ApprovalDecided,
    AsyncEngineClient,
    Resumed,
    RunFinished,
    ToolCallCompleted,
)
from tests.conftest import turn
from tests.processes import EngineProcess
from tests.sse_server import Sse, data, serve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

TERMINAL = ("DONE", "FAILED", "CANCELLED")


def base_env(tmp: Path, **extra: str) -> dict[str, str]:
    return {
        "MACHINA_STORAGE": str(tmp / "storage"),
        "MACHINA_WORKDIR_ROOT": str(tmp / "work"),
        "MACHINA_LEASE_TTL_S": "1",
        "MACHINA_RECOVERY_INTERVAL_S": "0.2",
        **extra,
    }


def openai_text(text: str, *, delay: float = 0.0) -> Sse:
    frames = [
        data({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
        data({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}),
        data({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        data({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 2}}),
        data("[DONE]"),
    ]
    return Sse(frames, delay=delay)


async def wait_state(client: AsyncEngineClient, run_id: str, states: tuple[str, ...], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    run = await client.get_run(run_id)
    while run.state not in states and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        run = await client.get_run(run_id)
    return run


async def until(predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


# -- the task survives a crash before the first checkpoint -----------------------------------------


async def test_a_crash_during_the_first_model_turn_keeps_the_task(tmp_path: Path) -> None:
    with serve() as model:
        # The first turn streams so slowly that the engine is killed in the middle of it.
        model.push(openai_text("never finished", delay=30), openai_text("the answer"))
        env = base_env(
            tmp_path,
            MACHINA_MODEL_PROVIDER="openai",
            MACHINA_MODEL_BASE_URL=model.url + "/v1",
            OPENAI_API_KEY="sk-test-first-turn",
        )
        engine = EngineProcess(tmp_path, env=env)
        try:
            async with AsyncEngineClient(engine.target) as client:
                handle = await client.create("what is the capital of France?")
                await until(lambda: len(model.requests) == 1)
        finally:
            engine.kill9()
        restarted = EngineProcess(tmp_path, env=env)
        try:
            async with AsyncEngineClient(restarted.target) as client:
                run = await wait_state(client, handle.run_id, TERMINAL, 30)
                assert run.state == "DONE", run
                events = [e async for e in (await client.attach(handle.run_id)).events(follow=False)]
        finally:
            restarted.close()
    assert len(model.requests) == 2
    # The recovered turn asked the model the user's task, not an empty conversation.
    messages = model.requests[1].body["messages"]
    assert {"role": "user", "content": "what is the capital of France?"} in messages, messages
    assert events[0].kind == "run_started"
    assert events[-1].kind == "run_finished"


# -- approval deadlines survive restarts ---------------------------------------------------------


async def test_an_approval_deadline_that_passed_while_down_fires_once_after_restart(tmp_path: Path) -> None:
    from tests.conftest import turn

    env = base_env(tmp_path, MACHINA_TOOLS_CUSTOM="tests.tools:echo")
    engine = EngineProcess(tmp_path / "a", env=env)
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create(
                "echo something",
                model="scripted",
                script=[turn("", ("echo", {"text": "hi"})), turn("all done")],
                permissions={"echo": "ask"},
                approval_timeout=1.0,
            )
            run = await wait_state(client, handle.run_id, ("PAUSED", *TERMINAL), 20)
            assert run.state == "PAUSED"
    finally:
        engine.kill9()
    await asyncio.sleep(1.5)  # the deadline passes while no engine is up
    # Two replicas come up on the same storage: the expiry is recorded exactly once.
    replicas = [EngineProcess(tmp_path / name, env=env) for name in ("b", "c")]
    try:
        async with AsyncEngineClient(replicas[0].target) as client:
            run = await wait_state(client, handle.run_id, TERMINAL, 30)
            assert run.state == "DONE", run
            events = [e async for e in (await client.attach(handle.run_id)).events(follow=False)]
    finally:
        for replica in replicas:
            replica.close()
    decided = [e for e in events if isinstance(e, ApprovalDecided)]
    assert len(decided) == 1, decided
    assert decided[0].expired
    assert decided[0].decision == "reject"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


# -- storage read-only or full mid-run: the run waits, nothing is shown that is taken back ---------


class Watcher:
    """Follows a run's events in the background, as a user's widget would."""

    def __init__(self, client: AsyncEngineClient, run_id: str) -> None:
        self.events: list[Any] = []
        self._task = asyncio.ensure_future(self._follow(client, run_id))

    async def _follow(self, client: AsyncEngineClient, run_id: str) -> None:
        async for event in (await client.attach(run_id)).events(follow=True):
            self.events.append(event)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    async def finished(self, timeout: float = 30) -> list[Any]:
        await asyncio.wait_for(self._task, timeout)
        return self.events


def sleepy_script(seconds: float) -> list[dict[str, Any]]:
    return [turn("", ("sleep", {"seconds": seconds})), turn("all done")]


async def storage_fault_mid_run(
    client: AsyncEngineClient, break_storage: Any, mend_storage: Any
) -> tuple[list[Any], Any]:
    """A run whose storage breaks during its tool call; returns what a watcher saw and the run."""
    from client_py import StorageUnavailableError

    handle = await client.create("sleep a while", model="scripted", script=sleepy_script(1.5))
    watcher = Watcher(client, handle.run_id)
    await until(lambda: "tool_call_started" in watcher.kinds())
    break_storage()
    await asyncio.sleep(4)  # the call ends, its commit fails and is retried
    run = await client.get_run(handle.run_id)
    assert run.state == "RUNNING", run
    assert "run_finished" not in watcher.kinds(), watcher.kinds()
    with pytest.raises(StorageUnavailableError) as refused:
        await client.create("another", model="scripted", script=sleepy_script(0))
    assert refused.value.code == "ERR_STORAGE_UNAVAILABLE"
    mend_storage()
    events = await watcher.finished()
    return events, await client.get_run(handle.run_id)


def check_one_end(events: list[Any], run: Any) -> None:
    assert run.state == "DONE", run
    ends = [e for e in events if isinstance(e, RunFinished)]
    assert [e.state for e in ends] == ["DONE"], ends
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_storage_made_read_only_mid_run_shows_no_end_that_is_not_committed() -> None:
    import os
    import shutil
    import tempfile

    from tests.fs_faults import as_root_without_dac_override

    launcher = as_root_without_dac_override()
    # The engine runs as root without CAP_DAC_OVERRIDE: the directories' modes bind it.
    root = Path(tempfile.mkdtemp(prefix="machina-ro-", dir="/tmp"))
    try:
        os.chmod(root, 0o755)  # noqa: S103 - the test process reads it too
        env = base_env(root, MACHINA_TOOLS_CUSTOM="tests.tools:sleep")
        engine = EngineProcess(root, env=env, launcher=launcher)
        runs = root / "storage" / "workspaces" / "default" / "runs"

        def set_mode(mode: int) -> None:
            for directory in [runs, *runs.rglob("*")]:
                if directory.is_dir():
                    os.chmod(directory, mode)

        try:
            async with AsyncEngineClient(engine.target) as client:
                events, run = await storage_fault_mid_run(
                    client, lambda: set_mode(0o555), lambda: set_mode(0o755)
                )
        finally:
            engine.close()
        check_one_end(events, run)
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_storage_full_mid_run_shows_no_end_that_is_not_committed(tmp_path: Path) -> None:
    from tests.fs_faults import fill, small_tmpfs

    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        env = base_env(
            tmp_path, MACHINA_STORAGE=str(disk / "storage"), MACHINA_TOOLS_CUSTOM="tests.tools:sleep"
        )
        engine = EngineProcess(tmp_path, env=env)
        filler: list[Path] = []
        try:
            async with AsyncEngineClient(engine.target) as client:
                events, run = await storage_fault_mid_run(
                    client, lambda: filler.append(fill(disk)), lambda: filler[0].unlink()
                )
        finally:
            engine.close()
        check_one_end(events, run)
        # What was written during the fault reads back whole from a fresh process.
        again = EngineProcess(tmp_path / "again", env=env)
        try:
            async with AsyncEngineClient(again.target) as client:
                stored = [e async for e in (await client.attach(run.run_id)).events(follow=False)]
        finally:
            again.close()
        assert [(e.seq, e.kind) for e in stored] == [(e.seq, e.kind) for e in events]


async def test_s3_answering_503_mid_run_shows_no_end_that_is_not_committed(tmp_path: Path, moto: str) -> None:
    from tests.s3_server import FaultyProxy, new_bucket

    bucket = await new_bucket(moto)
    proxy = FaultyProxy(moto, ["ok"])
    await proxy.start()
    env = base_env(
        tmp_path,
        MACHINA_STORAGE=f"s3://{bucket}/machina",
        AWS_ENDPOINT_URL=proxy.url,
        AWS_MAX_ATTEMPTS="2",  # botocore gives up fast; the engine itself waits for storage
        MACHINA_TOOLS_CUSTOM="tests.tools:sleep",
    )
    try:
        engine = EngineProcess(tmp_path, env=env)
        try:
            async with AsyncEngineClient(engine.target) as client:
                events, run = await storage_fault_mid_run(
                    client, lambda: proxy.set_pattern(["503"]), lambda: proxy.set_pattern(["ok"])
                )
        finally:
            engine.close()
    finally:
        await proxy.stop()
    check_one_end(events, run)
    assert proxy.counts["503"] > 0


async def test_an_end_whose_commit_failed_is_dropped_by_recovery(tmp_path: Path) -> None:
    """Killed while the commit of its end is failing (storage read-only), the run is resumed
    from its last checkpoint after a restart, and its log holds one end: the one committed."""
    import os
    import shutil
    import tempfile

    from tests.fs_faults import as_root_without_dac_override

    launcher = as_root_without_dac_override()
    root = Path(tempfile.mkdtemp(prefix="machina-ro-", dir="/tmp"))
    with serve() as model:
        model.push(openai_text("first answer", delay=1.0), openai_text("second answer"))
        try:
            os.chmod(root, 0o755)  # noqa: S103 - the test process reads it too
            for name in ("a", "b"):
                (root / name).mkdir()
                env = base_env(
                    root,
                    MACHINA_MODEL_PROVIDER="openai",
                    MACHINA_MODEL_BASE_URL=model.url + "/v1",
                    OPENAI_API_KEY="sk-test-end-commit",
                )
            runs = root / "storage" / "workspaces" / "default" / "runs"

            def set_mode(mode: int) -> None:
                for directory in [runs, *runs.rglob("*")]:
                    if directory.is_dir():
                        os.chmod(directory, mode)

            engine = EngineProcess(root / "a", env=env, launcher=launcher)
            try:
                async with AsyncEngineClient(engine.target) as client:
                    handle = await client.create("answer twice")
                    watcher = Watcher(client, handle.run_id)
                    await until(lambda: "text_delta" in watcher.kinds())
                    set_mode(0o555)  # the answer streams on; its end cannot be committed
                    await asyncio.sleep(5)
                    assert "run_finished" not in watcher.kinds(), watcher.kinds()
                    assert (await client.get_run(handle.run_id)).state == "RUNNING"
            finally:
                engine.kill9()
            set_mode(0o755)
            restarted = EngineProcess(root / "b", env=env, launcher=launcher)
            try:
                async with AsyncEngineClient(restarted.target) as client:
                    run = await wait_state(client, handle.run_id, TERMINAL, 30)
                    events = [e async for e in (await client.attach(handle.run_id)).events(follow=False)]
            finally:
                restarted.close()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    assert run.state == "DONE", run
    assert run.data == "second answer"
    ends = [e for e in events if isinstance(e, RunFinished)]
    assert [e.state for e in ends] == ["DONE"], ends
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_a_fault_that_outlasts_the_storage_wait_parks_the_run_for_the_sweep(tmp_path: Path) -> None:
    """Past storage_retry_s the run stops where its last checkpoint left it (nothing newer is
    shown); once storage is back the sweep resumes it, reporting the in-flight call interrupted."""
    from tests.fs_faults import fill, small_tmpfs

    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        env = base_env(
            tmp_path,
            MACHINA_STORAGE=str(disk / "storage"),
            MACHINA_TOOLS_CUSTOM="tests.tools:sleep_and_write",
            MACHINA_STORAGE_RETRY_S="1",
        )
        engine = EngineProcess(tmp_path, env=env)
        # The call changes the run directory: the checkpoint after it stores a new file, which a
        # full disk refuses.
        script = [turn("", ("sleep_and_write", {"seconds": 1.0})), turn("all done")]
        try:
            async with AsyncEngineClient(engine.target) as client:
                handle = await client.create("sleep a while", model="scripted", script=script)
                watcher = Watcher(client, handle.run_id)
                await until(lambda: "tool_call_started" in watcher.kinds())
                filler = fill(disk)
                await asyncio.sleep(4)  # the call ends; its commit fails for longer than 1 s
                assert "run_finished" not in watcher.kinds(), watcher.kinds()
                parked = await client.get_run(handle.run_id)
                assert parked.state == "RUNNING", parked
                filler.unlink()
                events = await watcher.finished()
                run = await client.get_run(handle.run_id)
        finally:
            engine.close()
        log = (tmp_path / "engine.log").read_text()
    assert "parked at its last checkpoint" in log
    check_one_end(events, run)
    resumed = [e for e in events if isinstance(e, Resumed)]
    assert [e.resumed_by for e in resumed] == ["recovery"], resumed
    (completed,) = [e for e in events if isinstance(e, ToolCallCompleted) and e.seq > resumed[0].seq]
    assert completed.outcome == "interrupted"
