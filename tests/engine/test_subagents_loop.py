"""Subagents in the agent loop (in process, on a fake clock): what the gRPC tests cannot time."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine_service import RunState, ScriptedTurn
from engine_service.core._run import AgentState
from tests.engine.harness import Harness, turn

pytestmark = pytest.mark.timeout(60)

HOUR = 3600


def _script(*turns: dict[str, Any]) -> list[ScriptedTurn]:
    return [ScriptedTurn.from_json(t) for t in turns]


async def test_a_childs_approval_expires_like_the_runs_own(harness: Harness) -> None:
    record = await harness.run(
        "delegate",
        turn("", ("Agent", {"task": "double 21"})),
        turn("parent done"),
        tools=["Agent", "double"],
        agent_scripts={"call_1_1": _script(turn("", ("double", {"x": 21})), turn("child saw the rejection"))},
        approval_timeout_ms=HOUR * 1000,
    )
    assert record.state is RunState.PAUSED
    (interrupt,) = record.interrupts
    assert interrupt.agent_path == "call_1_1"
    assert interrupt.expires_at == pytest.approx(harness.clock.now + HOUR)
    harness.clock.advance(HOUR + 1)
    engine = await harness.restart()  # its startup sweep fires the deadline that passed meanwhile
    for _ in range(200):
        record = await engine.get_run(harness.principal, record.run_id)
        if record.state is not RunState.PAUSED:
            break
        await asyncio.sleep(0.02)
    record = await harness.wait(record)
    assert record.state is RunState.DONE, record.error
    assert record.data == "parent done"
    events = await harness.events(record)
    decided = [e for e in events if e["k"] == "approval_decided"]
    assert [(e["d"]["decision"], e["d"]["expired"], e.get("a")) for e in decided] == [
        ("reject", True, "call_1_1")
    ]
    finished = [e for e in events if e["k"] == "agent_finished"]
    assert [(e["d"]["state"], e["d"]["output"]) for e in finished] == [
        (AgentState.DONE.value, "child saw the rejection")
    ]
