"""Time on the engine's clock: approval deadlines and run deadlines, moved by a fake clock.

The engine reads every timestamp from its injected clock, so these tests jump hours ahead
instead of sleeping; the in-process timers that fire while an engine stays up are covered
with short real timeouts in test_runs.py."""

from __future__ import annotations

from client_py import ApprovalDecided, AsyncEngineClient, ToolCallCompleted
from engine_service import RunState
from tests.conftest import ServerFactory, refresh_until, turn
from tests.engine.harness import FakeClock, Harness

HOUR = 3600.0
DOUBLE_THEN_ANSWER = [turn("Let me double it.", ("double", {"x": 21})), turn("The answer is 42.")]
ASK_DOUBLE = {"tools": {"permissions": {"double": "ask"}}}


async def test_an_approval_deadline_that_passed_fires_once_in_the_next_engine(servers: ServerFactory) -> None:
    clock = FakeClock()
    first = await servers.start(config=ASK_DOUBLE, clock=clock)
    async with AsyncEngineClient(f"127.0.0.1:{first.port}") as client:
        handle = await client.create(
            "double 21",
            model="scripted",
            script=DOUBLE_THEN_ANSWER,
            approval_timeout=HOUR,
            approval_expiry_action="approve",
        )
        run = await handle.wait(timeout=10)
        assert run.state == "PAUSED"
        expire_time = run.interrupts[0].expire_time
        assert expire_time is not None
        assert expire_time.timestamp() == clock() + HOUR
    await servers.stop_all()

    clock.advance(HOUR + 1)  # the deadline passes while no engine is up
    # Two engines come up on the same storage: the expiry is recorded exactly once.
    replicas = [await servers.start(config=ASK_DOUBLE, clock=clock) for _ in range(2)]
    async with AsyncEngineClient(f"127.0.0.1:{replicas[0].port}") as client:
        handle = await client.attach(handle.run_id)
        run = await refresh_until(handle, "DONE", tries=200)
        assert run.state == "DONE", run
        events = [e async for e in handle.events(follow=False)]
    decided = [e for e in events if isinstance(e, ApprovalDecided)]
    assert [(d.decision, d.expired, d.decided_by) for d in decided] == [("approve", True, "system:expiry")]
    outputs = [e.output for e in events if isinstance(e, ToolCallCompleted)]
    assert outputs == ["42"]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_an_approval_deadline_not_yet_due_leaves_the_run_paused_after_a_restart(
    harness: Harness,
) -> None:
    record = await harness.run("double 21", *DOUBLE_THEN_ANSWER, approval_timeout_ms=int(HOUR * 1000))
    assert record.state is RunState.PAUSED
    harness.clock.advance(HOUR - 1)
    engine = await harness.restart()
    await engine.arm_approval_deadlines()  # what its startup sweep does, done here for certain
    record = await harness.wait(record)
    assert record.state is RunState.PAUSED
    # Answered in time, the approval is the caller's, not the expiry's.
    record = await harness.approve(record)
    assert record.state is RunState.DONE
    decided = [e["d"] for e in await harness.events(record) if e["k"] == "approval_decided"]
    assert [d.get("expired", False) for d in decided] == [False]


async def test_a_run_resumed_after_its_deadline_fails_without_running_the_call(harness: Harness) -> None:
    record = await harness.run("double 21", *DOUBLE_THEN_ANSWER, timeout_ms=60_000)
    assert record.state is RunState.PAUSED
    harness.clock.advance(61)  # the run waited for its approval past its deadline
    record = await harness.approve(record)
    assert record.state is RunState.FAILED
    assert record.error is not None
    assert record.error.code == "ERR_DEADLINE_EXCEEDED"
    kinds = [e["k"] for e in await harness.events(record)]
    assert "tool_call_started" not in kinds


async def test_event_times_are_the_engine_clocks(harness: Harness) -> None:
    start = harness.clock()
    record = await harness.run("double 21", *DOUBLE_THEN_ANSWER)
    harness.clock.advance(HOUR)
    record = await harness.approve(record)
    assert record.state is RunState.DONE
    times = [e["t"] for e in await harness.events(record)]
    assert times[0] == start
    assert times[-1] == start + HOUR
    assert record.created_at == start
