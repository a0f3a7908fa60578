"""Context compaction through gRPC: a long run under a small context window summarises older
turns, finishes, and keeps its whole transcript in storage."""

from __future__ import annotations

from typing import Any

import pytest

from client_py import AsyncEngineClient, ContextCompacted, RunFinished, UsageReported
from engine_service.core._compaction import COMPACTION, ContextWindow, model_view
from engine_service.core._types import Message, ToolCall
from tests.conftest import ServerFactory, turn

pytestmark = pytest.mark.timeout(120)

# Each turn reads a ~600-character result: 300 turns are ~45,000 tokens of history.
_ECHO = "lorem ipsum dolor sit amet " * 22


def _long_script(turns: int) -> list[dict[str, Any]]:
    script = [turn(f"step {i}", ("echo", {"text": f"{i}: {_ECHO}"})) for i in range(turns - 1)]
    return [*script, turn("All steps done.")]


async def _client(servers: ServerFactory, **model: Any) -> AsyncEngineClient:
    server = await servers.start(config={"model": model} if model else None)
    return AsyncEngineClient(f"127.0.0.1:{server.port}")


async def test_a_300_turn_run_compacts_and_finishes(servers: ServerFactory) -> None:
    async with await _client(servers) as client:
        execution = client.execute(
            "Run the 300 steps.", script=_long_script(300), context_window_tokens=4_000, max_turns=400
        )
        events = [e async for e in execution]
        run = execution.run
    assert run is not None
    assert run.state == "DONE", run
    assert run.data == "All steps done."
    assert run.meta.turns == 300
    compactions = [e for e in events if isinstance(e, ContextCompacted)]
    assert len(compactions) >= 5
    for c in compactions:
        assert 0 < c.tokens_after < c.tokens_before
        assert c.tokens_before > 0.8 * 4_000
        assert c.turns_summarized >= 1
        assert c.usage.input_tokens > 0
        assert c.usage.output_tokens > 0
    # The model's input stays bounded by the window instead of growing with the run.
    inputs = [e.input_tokens for e in events if isinstance(e, UsageReported)]
    assert len(inputs) == 300
    assert max(inputs) <= 4_000
    # Each compaction comes right before the turn it names and counts its call in the run's usage.
    usage_turns = {e.turn: e.seq for e in events if isinstance(e, UsageReported)}
    assert all(usage_turns[c.turn] > c.seq > usage_turns.get(c.turn - 1, 0) for c in compactions)
    spent = sum(e.input_tokens for e in events if isinstance(e, UsageReported))
    spent += sum(c.usage.input_tokens for c in compactions)
    assert run.meta.usage.input_tokens == spent
    finished = events[-1]
    assert isinstance(finished, RunFinished)

    # The whole transcript stays in storage: every turn, plus one entry per compaction.
    engine = servers.running[0].engine
    entries = await engine.storage.read_segments("default", run.run_id, "transcript", 0, 100_000)
    roles = [e["role"] for e in entries]
    assert roles.count("assistant") == 300
    assert roles.count("tool") == 299
    assert roles.count(COMPACTION) == len(compactions)
    assert entries[0] == {"role": "user", "text": "Run the 300 steps."}
    # What the model saw last, rebuilt from storage: the task, the summary, the last turns.
    view = model_view([Message.from_json(e) for e in entries])
    assert view[0].text == "Run the 300 steps."
    assert "Summarised" in view[1].text
    assert view[-1].text == "All steps done."
    assert len(view) < 20


async def test_without_a_window_nothing_is_compacted(servers: ServerFactory) -> None:
    async with await _client(servers) as client:
        execution = client.execute("Run the steps.", script=_long_script(30))
        events = [e async for e in execution]
    assert execution.run is not None
    assert execution.run.state == "DONE"
    assert not [e for e in events if isinstance(e, ContextCompacted)]
    inputs = [e.input_tokens for e in events if isinstance(e, UsageReported)]
    assert inputs == sorted(inputs)
    assert inputs[-1] > 4_000


async def test_the_engine_setting_applies_and_the_run_setting_wins(servers: ServerFactory) -> None:
    async with await _client(servers, context_window_tokens=3_000, compact_keep_turns=2) as client:
        by_engine = client.execute("Run the steps.", script=_long_script(40))
        engine_events = [e async for e in by_engine]
        by_run = client.execute("Run the steps.", script=_long_script(40), context_window_tokens=1_000_000)
        run_events = [e async for e in by_run]
    assert by_engine.run is not None
    assert by_engine.run.state == "DONE"
    assert [e for e in engine_events if isinstance(e, ContextCompacted)]
    assert max(e.input_tokens for e in engine_events if isinstance(e, UsageReported)) <= 3_000
    assert by_run.run is not None
    assert by_run.run.state == "DONE"
    assert not [e for e in run_events if isinstance(e, ContextCompacted)]


async def test_a_context_that_cannot_fit_fails_the_run(servers: ServerFactory) -> None:
    async with await _client(servers) as client:
        # The last turns alone are larger than the window: summarising older ones cannot help.
        execution = client.execute("Run the steps.", script=_long_script(20), context_window_tokens=500)
        _ = [e async for e in execution]
        run = execution.run
    assert run is not None
    assert run.state == "FAILED"
    assert run.error is not None
    assert run.error.code == "ERR_COMPACTION_FAILED"
    assert int(run.error.metadata["context_window_tokens"]) == 500
    assert int(run.error.metadata["tokens"]) > 500


async def test_a_negative_window_is_refused(servers: ServerFactory) -> None:
    from client_py import InvalidRequestError

    async with await _client(servers) as client:
        with pytest.raises(InvalidRequestError):
            await client.create("x", script=["hi"], context_window_tokens=-1)


def test_the_incremental_view_matches_the_view_from_scratch() -> None:
    transcript = [Message("user", "task")]
    window = ContextWindow()
    for i in range(40):
        transcript.append(Message("assistant", f"turn {i}", [ToolCall(f"c{i}", "echo", {"text": "x" * i})]))
        transcript.append(Message("tool", "x" * i, call_id=f"c{i}", tool_name="echo"))
        view = window.messages(transcript)
        assert view == model_view(transcript)
        if i % 7 == 6:
            plan = window.plan(3)
            assert plan is not None
            assert [m.role for m in plan.messages].count("assistant") == plan.turns
            transcript.append(Message(COMPACTION, f"summary {i}", keep_from=plan.keep_from))
            view = window.messages(transcript)
            assert view == model_view(transcript)
            assert [m.role for m in view].count("assistant") == 3
    # A transcript read back (say after a crash) gives the same view.
    assert ContextWindow().messages(list(transcript)) == model_view(transcript)


async def test_the_bench_sees_bounded_input_with_compaction_and_growing_without() -> None:
    from bench.compaction import input_tokens_per_turn

    compacted, compactions = await input_tokens_per_turn(40, 3_000)
    growing, none = await input_tokens_per_turn(40, 0)
    assert compactions > 0
    assert none == 0
    assert max(compacted) <= 3_000
    assert growing == sorted(growing)
    assert growing[-1] > 3 * compacted[-1]
