"""What the engine acknowledged is what it keeps: crashes before the first checkpoint, storage
made read-only or full mid-run, restarts past approval deadlines (real engine processes)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from client_py import AsyncEngineClient
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
    decided = [e for e in events if e.kind == "approval_decided"]
    assert len(decided) == 1, decided
    assert decided[0].expired
    assert decided[0].decision == "reject"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
