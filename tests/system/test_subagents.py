"""Subagents across a crash: kill -9 of a real engine process while children run, restart, and
the run finishes with every child turn once; a run paused on a child's call is decided after one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from client_py import (
    AgentFinished,
    AssistantMessage,
    AsyncEngineClient,
    Resumed,
    RunEvent,
    ToolCallCompleted,
)
from tests.conftest import turn, undone_seqs
from tests.processes import EngineProcess
from tests.system.test_recovery import env_for, wait_done

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


async def _events(client: AsyncEngineClient, run_id: str) -> list[RunEvent]:
    return [e async for e in (await client.attach(run_id)).events(follow=False)]


async def test_kill_9_mid_child_then_restart_finishes_the_tree(tmp_path: Path) -> None:
    turns = 60

    def steps(n: int, answer: str, call: Callable[[int], tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        return [turn(f"step {i}", call(i)) for i in range(1, n + 1)] + [turn(answer)]

    # Two children checkpoint in parallel: each commit must be one consistent instant of both.
    script = [turn("", ("Agent", {"task": "long"}), ("Agent", {"task": "short"})), turn("parent done")]
    scripts: dict[str, Any] = {
        # The long one's steps take a while, so it is still working when the process is killed
        # however fast turns are.
        "call_1_1": steps(turns, "long done", lambda i: ("sleep", {"seconds": 0.05})),
        "call_1_2": steps(turns // 2, "short done", lambda i: ("noop", {"i": i})),
    }
    env = {**env_for(tmp_path), "MACHINA_TOOLS_CUSTOM": "tests.tools:noop,tests.tools:sleep"}
    engine = EngineProcess(tmp_path, env=env)
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create(
                "tree",
                script=script,
                agent_scripts=scripts,
                tools=["Agent", "noop", "sleep"],
                max_turns=turns + 5,
            )
            completed = 0
            async for event in handle.events(follow=True):
                completed += isinstance(event, ToolCallCompleted) and event.agent_path == "call_1_1"
                if completed >= 20:
                    break
        engine.kill9()
    finally:
        engine.close()
    restarted = EngineProcess(tmp_path, env=env)
    try:
        async with AsyncEngineClient(restarted.target) as client:
            run = await wait_done(client, handle.run_id)
            assert run.state == "DONE", run
            events = await _events(client, handle.run_id)
    finally:
        restarted.close()
    assert run.data == "parent done"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    undone = undone_seqs(events)
    kept = [e for e in events if e.seq not in undone]
    for path, n in (("call_1_1", turns), ("call_1_2", turns // 2)):
        child_turns = [e.turn for e in kept if isinstance(e, AssistantMessage) and e.agent_path == path]
        assert child_turns == list(range(1, n + 2))  # every child turn exactly once, in order
    finished = {e.agent_path: e.output for e in kept if isinstance(e, AgentFinished)}
    assert finished == {"call_1_1": "long done", "call_1_2": "short done"}
    assert [e.turn for e in kept if isinstance(e, AssistantMessage) and not e.agent_path] == [1, 2]
    assert "recovery" in [e.resumed_by for e in kept if isinstance(e, Resumed)]


async def test_a_run_paused_on_a_childs_call_is_decided_after_a_kill_9(tmp_path: Path) -> None:
    env = {**env_for(tmp_path), "MACHINA_TOOLS_PERMISSIONS": "noop=ask"}
    script = [turn("", ("Agent", {"task": "ask first"})), turn("parent done")]
    scripts: dict[str, Any] = {"call_1_1": [turn("", ("noop", {"x": 1})), turn("child done")]}
    engine = EngineProcess(tmp_path, env=env)
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create(
                "gated", script=script, agent_scripts=scripts, tools=["Agent", "noop"]
            )
            run = await handle.wait(timeout=20)
            assert run.state == "PAUSED"
        engine.kill9()
    finally:
        engine.close()
    restarted = EngineProcess(tmp_path, env=env)
    try:
        async with AsyncEngineClient(restarted.target) as client:
            handle = await client.attach(handle.run_id)
            (interrupt,) = handle.run.interrupts
            assert interrupt.agent_path == "call_1_1"
            assert interrupt.tool_name == "noop"
            await handle.approve(interrupt.interrupt_id)
            run = await wait_done(client, handle.run_id)
            events = await _events(client, handle.run_id)
    finally:
        restarted.close()
    assert run.state == "DONE", run
    assert run.data == "parent done"
    agent_call = next(e for e in events if isinstance(e, ToolCallCompleted) and e.tool_name == "Agent")
    assert agent_call.output == "child done"
