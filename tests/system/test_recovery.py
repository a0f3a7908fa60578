"""Crash recovery: kill -9 of a real engine process mid-run, restart, and the run completes
with no turn lost or duplicated and no in-flight tool silently re-run."""

from __future__ import annotations

import asyncio
import collections
import json
from pathlib import Path
from typing import Any

import pytest

from client_py import (
    AssistantMessage,
    AsyncEngineClient,
    Resumed,
    ToolCallCompleted,
    ToolCallStarted,
)
from tests.conftest import turn, undone_seqs
from tests.processes import EngineProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def env_for(tmp: Path) -> dict[str, str]:
    return {
        "MACHINA_STORAGE": str(tmp / "storage"),
        "MACHINA_WORKDIR_ROOT": str(tmp / "work"),
        "MACHINA_LEASE_TTL_S": "1",
        "MACHINA_RECOVERY_INTERVAL_S": "0.2",
        "MACHINA_MAX_TURNS": "1000",
        "MACHINA_TOOLS_CUSTOM": "tests.tools:noop",
    }


async def wait_done(client: AsyncEngineClient, run_id: str, timeout: float = 60) -> Any:
    handle = await client.attach(run_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    run = handle.run
    while run.state not in ("DONE", "FAILED", "CANCELLED") and loop.time() < deadline:
        run = await handle.wait(timeout=2)
        if run.state == "PAUSED":
            break
    return run


async def recovered(tmp: Path, env: dict[str, str], run_id: str) -> tuple[Any, list[Any]]:
    """Start the engine again over the same storage: the run once the recovery sweep has moved it
    to its end (or a pause), and all its events."""
    restarted = EngineProcess(tmp, env=env)
    try:
        async with AsyncEngineClient(restarted.target) as client:
            run = await wait_done(client, run_id)
            events = [e async for e in (await client.attach(run_id)).events(follow=False)]
    finally:
        restarted.close()
    return run, events


def workdir(tmp: Path, run_id: str) -> Path:
    return tmp / "work" / "default" / run_id


async def test_kill_9_mid_run_then_restart_completes_every_turn_once(tmp_path: Path) -> None:
    turns = 120
    script = [turn(f"turn {i}", ("Bash", {"command": f"echo {i} >> turns.log"})) for i in range(1, turns + 1)]
    script.append(turn("all done"))
    engine = EngineProcess(tmp_path, env=env_for(tmp_path))
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create("count", model="scripted", script=script, max_turns=turns + 5)
            completed = 0
            async for event in handle.events(follow=True):
                completed += isinstance(event, ToolCallCompleted)
                if completed >= 40:
                    break
        engine.kill9()
    finally:
        engine.close()
    run, events = await recovered(tmp_path, env_for(tmp_path), handle.run_id)
    assert run.state == "DONE", run
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    undone = undone_seqs(events)  # what the killed engine wrote past its checkpoint
    assistant_turns = [e.turn for e in events if isinstance(e, AssistantMessage) and e.seq not in undone]
    assert assistant_turns == list(range(1, turns + 2))  # every turn exactly once, in order
    assert run.meta.turns == turns + 1
    lines = (workdir(tmp_path, handle.run_id) / "turns.log").read_text().split()
    counts = collections.Counter(lines)
    assert all(n == 1 for n in counts.values()), counts.most_common(3)  # no command ran twice
    missing = {str(i) for i in range(1, turns + 1)} - set(lines)
    assert len(missing) <= 1  # at most the call the crash interrupted
    resumed = [e for e in events if isinstance(e, Resumed)]
    assert [e.resumed_by for e in resumed] == ["recovery"]


async def test_kill_9_during_a_tool_call_reports_it_interrupted(tmp_path: Path) -> None:
    script = [
        turn("", ("Bash", {"command": "echo ran >> side.txt; sleep 30"})),
        turn("I will check side.txt."),
    ]
    engine = EngineProcess(tmp_path, env=env_for(tmp_path))
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create("side effect", model="scripted", script=script)
            async for event in handle.events(follow=True):
                if isinstance(event, ToolCallStarted):
                    break
            for _ in range(100):
                if (workdir(tmp_path, handle.run_id) / "side.txt").exists():
                    break
                await asyncio.sleep(0.02)
        engine.kill9()
    finally:
        engine.close()
    run, events = await recovered(tmp_path, env_for(tmp_path), handle.run_id)
    assert run.state == "DONE"
    assert (workdir(tmp_path, handle.run_id) / "side.txt").read_text() == "ran\n"  # not re-run
    # The watcher saw the call start, so the log keeps that; the recovered run marks it undone
    # and records the call's outcome as the model was told it: interrupted, not run again.
    started = [e for e in events if isinstance(e, ToolCallStarted)]
    (resumed,) = [e for e in events if isinstance(e, Resumed)]
    assert resumed.resumed_by == "recovery"
    assert resumed.rolled_back_from_seq <= started[0].seq < resumed.seq
    (completed,) = [e for e in events if isinstance(e, ToolCallCompleted)]
    assert completed.outcome == "interrupted"
    assert completed.is_error
    assert completed.seq > resumed.seq
    assert "interrupted by an engine crash" in completed.output
    storage = tmp_path / "storage" / "workspaces" / "default" / "runs" / handle.run_id / "transcript"
    transcript = "".join(p.read_text() for p in sorted(storage.iterdir()))
    assert "interrupted by an engine crash" in transcript


@pytest.mark.parametrize(("delay", "kept"), [("5", False), ("0.2", True), ("0", True)])
async def test_a_crash_before_the_checkpoint_after_a_call_is_a_crash_during_it(
    tmp_path: Path, delay: str, kept: bool
) -> None:
    """The checkpoint after a call waits up to commit_delay_s for the run's next one. The next
    call here is idempotent (no checkpoint before it) and the engine dies during it: within the
    delay the first call's result is lost and reported interrupted, never run again; once the
    delay has passed (or with none) it was committed and the run goes on from it."""
    script = [
        turn("", ("Bash", {"command": "echo ran >> side.txt"})),
        turn("", ("linger", {"seconds": 2})),
        turn("done"),
    ]
    env = {**env_for(tmp_path), "MACHINA_COMMIT_DELAY_S": delay, "MACHINA_TOOLS_CUSTOM": "tests.tools:linger"}
    engine = EngineProcess(tmp_path, env=env)
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create("side effect", model="scripted", script=script)
            async for event in handle.events(follow=True):
                if isinstance(event, ToolCallStarted) and event.call.tool_name == "linger":
                    break
            await asyncio.sleep(0.6)  # past a 0.2 s delay, well within 5 s
        engine.kill9()
    finally:
        engine.close()
    run, events = await recovered(tmp_path, env, handle.run_id)
    assert run.state == "DONE", run
    assert (workdir(tmp_path, handle.run_id) / "side.txt").read_text() == "ran\n"  # never re-run
    (resumed,) = [e for e in events if isinstance(e, Resumed)]
    bash = [e for e in events if isinstance(e, ToolCallCompleted) and e.tool_name == "Bash"]
    if kept:
        assert [e.outcome for e in bash] == ["ran"]
        assert bash[0].seq < resumed.rolled_back_from_seq
    else:
        assert [e.outcome for e in bash] == ["ran", "interrupted"]
        assert resumed.rolled_back_from_seq <= bash[0].seq < resumed.seq < bash[1].seq


async def test_paused_runs_stay_paused_through_a_crash(tmp_path: Path) -> None:
    env = {**env_for(tmp_path), "MACHINA_TOOLS_PERMISSIONS": "noop=ask"}
    engine = EngineProcess(tmp_path, env=env)
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create(
                "wait", model="scripted", script=[turn("", ("noop", {})), turn("ok")]
            )
            run = await handle.wait(timeout=20)
            assert run.state == "PAUSED"
        engine.kill9()
    finally:
        engine.close()
    restarted = EngineProcess(tmp_path, env=env)
    try:
        async with AsyncEngineClient(restarted.target) as client:
            await asyncio.sleep(1.5)  # past the lease and several sweeps
            assert await client.recover_orphaned_runs() == []
            handle = await client.attach(run.run_id)
            assert handle.run.state == "PAUSED"
            await handle.approve(run.interrupts[0].interrupt_id)
            assert (await handle.wait(timeout=20)).state == "DONE"
    finally:
        restarted.close()


def edit_script(turns: int) -> list[dict[str, Any]]:
    """Turn 1 writes notes.txt, each later turn but the last edits it (a new snapshot each turn,
    stored as a blob: the file is too large to travel inside the checkpoint)."""
    script = [turn("write", ("Write", {"path": "notes.txt", "content": "v0\n" + "x" * 20_000}))]
    for k in range(2, turns):
        script.append(turn(f"edit {k}", ("Edit", {"path": "notes.txt", "old_string": f"v{k - 2}",
                                                   "new_string": f"v{k - 1}"})))  # fmt: skip
    return [*script, turn("all done")]


def lose_power(run_dir: Path) -> None:
    """What a power loss may do to a run written with fsync: every file a checkpoint did not
    sync is gone (its segments, its snapshot blobs), and the commit records that remain were
    written before the machine came back up."""
    for name in ("events", "transcript", "blobs"):
        for path in (run_dir / name).iterdir():
            path.unlink()
        (run_dir / name).rmdir()
    for log in (run_dir / "commits").iterdir():
        records = [json.loads(line) for line in log.read_bytes().splitlines()]
        for record in records:
            record["boot"] = "an-earlier-boot"
        log.write_text("".join(json.dumps(record) + "\n" for record in records))


async def test_a_power_loss_with_fsync_keeps_every_committed_checkpoint(tmp_path: Path) -> None:
    turns = 60
    env = {**env_for(tmp_path), "MACHINA_FSYNC": "true"}
    engine = EngineProcess(tmp_path, env=env)
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create(
                "edit", model="scripted", script=edit_script(turns), max_turns=turns + 5
            )
            seen = []
            async for event in handle.events(follow=True):
                seen.append(event)
                if sum(isinstance(e, ToolCallCompleted) for e in seen) >= 20:
                    break
        engine.kill9()
    finally:
        engine.close()
    run_dir = tmp_path / "storage" / "workspaces" / "default" / "runs" / handle.run_id
    [log] = (run_dir / "commits").iterdir()
    committed_state = json.dumps(json.loads(log.read_bytes().splitlines()[-1])["state"])
    # The blobs the last checkpoint names (its run directory's snapshot: manifest, file contents).
    named = {p.name for p in (run_dir / "blobs").iterdir() if p.name.split("-", 1)[1] in committed_state}
    assert named
    lose_power(run_dir)
    run, events = await recovered(tmp_path, env, handle.run_id)
    assert run.state == "DONE", run
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    (resumed,) = [e for e in events if isinstance(e, Resumed)]
    committed = resumed.rolled_back_from_seq - 1 if resumed.rolled_back_from_seq else resumed.seq - 1
    # What was committed before the power loss reads back as it was shown.
    assert committed >= 20
    shown = min(committed, len(seen))
    assert [(e.seq, e.kind) for e in events[:shown]] == [(e.seq, e.kind) for e in seen[:shown]]
    undone = undone_seqs(events)
    assistant_turns = [e.turn for e in events if isinstance(e, AssistantMessage) and e.seq not in undone]
    assert assistant_turns == list(range(1, turns + 1))  # every turn exactly once, in order
    edits = [e for e in events if isinstance(e, ToolCallCompleted) and e.seq not in undone]
    assert len(edits) == turns - 1
    # They were written back.
    assert named <= {p.name for p in (run_dir / "blobs").iterdir()}
