"""An approval the engine answered is durable: kill -9 right after ResumeRun returns, and the
restarted engine carries the decision out (once), never asks for it again nor loses it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from client_py import ApprovalDecided, AsyncEngineClient, ToolCallCompleted
from tests.conftest import turn
from tests.processes import EngineProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def env_for(tmp: Path) -> dict[str, str]:
    return {
        "MACHINA_STORAGE": str(tmp / "storage"),
        "MACHINA_WORKDIR_ROOT": str(tmp / "work"),
        "MACHINA_LEASE_TTL_S": "1",
        "MACHINA_RECOVERY_INTERVAL_S": "0.2",
        "MACHINA_TOOLS_PERMISSIONS": "Bash=ask",
    }


async def test_kill_9_right_after_resume_answers_keeps_the_decision(tmp_path: Path) -> None:
    """Each round: the run pauses (in this process, which keeps it in memory), ResumeRun
    answers, the engine is killed at once; the restarted engine goes on from the decision."""
    rounds = 2
    script = [turn("", ("Bash", {"command": f"echo call{i} >> side.log"})) for i in range(rounds)]
    script.append(turn("all done"))
    env = env_for(tmp_path)
    run_id = ""
    for index in range(rounds):
        engine = EngineProcess(tmp_path, env=env)
        try:
            async with AsyncEngineClient(engine.target) as client:
                if not run_id:
                    run_id = (await client.create("side effects", model="scripted", script=script)).run_id
                handle = await client.attach(run_id)
                deadline = time.monotonic() + 20
                run = await handle.wait(timeout=2)
                while run.state != "PAUSED" and time.monotonic() < deadline:
                    run = await handle.wait(timeout=2)  # the recovery sweep moves it on first
                assert (run.state, run.pause_reason) == ("PAUSED", "AWAITING_APPROVAL"), run
                assert run.interrupts[0].arguments == {"command": f"echo call{index} >> side.log"}
                await handle.approve(run.interrupts[0].interrupt_id)
        finally:
            engine.kill9()
            engine.close()
    engine = EngineProcess(tmp_path, env=env)
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.attach(run_id)
            deadline = time.monotonic() + 30
            run = await handle.wait(timeout=2)
            while not run.done and time.monotonic() < deadline:
                assert run.state != "PAUSED", f"the decision was lost: {run}"
                run = await handle.wait(timeout=2)
            assert run.state == "DONE", run
            events = [e async for e in handle.events(follow=False)]
    finally:
        engine.close()
    decided = [e for e in events if isinstance(e, ApprovalDecided)]
    assert [e.interrupt_id for e in decided] == [f"int_call_{i + 1}_1" for i in range(rounds)]
    completed = [e for e in events if isinstance(e, ToolCallCompleted)]
    assert [e.call_id for e in completed] == [f"call_{i + 1}_1" for i in range(rounds)]
    # Each approved call ran at most once: a call the kill may have cut short is reported
    # interrupted, never run again.
    side = tmp_path / "work" / "default" / run_id / "side.log"
    lines = side.read_text().splitlines() if side.exists() else []
    assert len(lines) == len(set(lines)) <= rounds
    ran = [index for index, e in enumerate(completed) if e.outcome == "ran"]
    assert {f"call{index}" for index in ran} <= set(lines)
