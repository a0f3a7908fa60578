"""Compaction in a real engine process: configured by environment, it survives kill -9, and the
recovered run goes on from the compacted view rebuilt from storage."""

from __future__ import annotations

from pathlib import Path

import pytest

from client_py import AssistantMessage, AsyncEngineClient, ContextCompacted, UsageReported
from engine_service import LocalStorage
from tests.conftest import turn, undone_seqs
from tests.processes import EngineProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

TURNS = 300
WINDOW = 4_000
_TEXT = "lorem ipsum dolor sit amet " * 22


def env_for(tmp: Path) -> dict[str, str]:
    return {
        "MACHINA_STORAGE": str(tmp / "storage"),
        "MACHINA_WORKDIR_ROOT": str(tmp / "work"),
        "MACHINA_LEASE_TTL_S": "1",
        "MACHINA_RECOVERY_INTERVAL_S": "0.2",
        "MACHINA_MAX_TURNS": "1000",
        "MACHINA_TOOLS_CUSTOM": "tests.tools:echo",
        "MACHINA_MODEL_COMPACT_KEEP_TURNS": "2",
        "MACHINA_MODEL_COMPACT_AT": "0.5",
    }


async def test_a_compacting_run_survives_kill_9(tmp_path: Path) -> None:
    script = [turn(f"step {i}", ("echo", {"text": f"{i}: {_TEXT}"})) for i in range(TURNS - 1)]
    script.append(turn("All steps done."))
    engine = EngineProcess(tmp_path, env=env_for(tmp_path))
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create("Run the steps.", script=script, context_window_tokens=WINDOW)
            compactions = 0
            async for event in handle.events(follow=True):
                compactions += isinstance(event, ContextCompacted)
                if compactions >= 3:
                    break
        engine.kill9()
    finally:
        engine.close()
    restarted = EngineProcess(tmp_path, env=env_for(tmp_path))
    try:
        async with AsyncEngineClient(restarted.target) as client:
            attached = await client.attach(handle.run_id)
            run = attached.run
            for _ in range(60):
                if run.state in ("DONE", "FAILED", "CANCELLED"):
                    break
                run = await attached.wait(timeout=2)
            events = [e async for e in attached.events(follow=False)]
    finally:
        restarted.close()
    assert run.state == "DONE", run
    assert run.data == "All steps done."
    undone = undone_seqs(events)
    kept = [e for e in events if e.seq not in undone]
    assert [e.turn for e in kept if isinstance(e, AssistantMessage)] == list(range(1, TURNS + 1))
    compacted = [e for e in kept if isinstance(e, ContextCompacted)]
    assert len(compacted) > 3  # it went on compacting after the restart
    assert max(e.input_tokens for e in kept if isinstance(e, UsageReported)) <= WINDOW
    # compact_at 0.5 from the environment: compacted past half the window (not the default 0.8).
    for c in compacted:
        assert WINDOW * 0.8 > c.tokens_before > WINDOW // 2 > c.tokens_after
    storage = LocalStorage(tmp_path / "storage")
    entries = await storage.read_segments("default", handle.run_id, "transcript", 0, 100_000)
    roles = [e["role"] for e in entries]
    assert roles.count("assistant") == TURNS
    assert roles.count("compaction") == len(compacted)
