"""Context compaction through gRPC: a long run under a small context window summarises older
turns, finishes, and keeps its whole transcript in storage."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from anthropic.types.message_create_params import MessageCreateParamsStreaming

from client_py import AsyncEngineClient, ContextCompacted, RunFinished, Usage, UsageReported
from engine_service.core._compaction import COMPACTION, ContextWindow, model_view
from engine_service.core._types import Message, ToolCall
from tests.anthropic_types import problems
from tests.conftest import ServerFactory, turn
from tests.sse_server import Reply, ScriptedServer, Sse, event, serve

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


# -- through a provider adapter: the summarising call is a real request ---------------------------

KEY = "sk-ant-test-0123456789abcdef"


def _anthropic_turn(text: str, call: tuple[str, dict[str, Any]] | None = None) -> Sse:
    usage = {"input_tokens": 50, "output_tokens": 1}
    message: dict[str, Any] = {
        "id": "msg",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [],
        "stop_reason": None,
        "usage": usage,
    }
    frames = [
        event("message_start", {"type": "message_start", "message": message}),
        event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": text}},
        ),
    ]
    if call is not None:
        block = {"type": "tool_use", "id": f"toolu_{len(text)}", "name": call[0], "input": call[1]}
        frames.append(
            event("content_block_start", {"type": "content_block_start", "index": 1, "content_block": block})
        )
    stop = "tool_use" if call else "end_turn"
    delta = {"type": "message_delta", "delta": {"stop_reason": stop}, "usage": {"output_tokens": 10}}
    frames += [event("message_delta", delta), event("message_stop", {"type": "message_stop"})]
    return Sse(frames)


@pytest.fixture
def provider() -> Iterator[ScriptedServer]:
    with serve() as running:
        yield running


async def _anthropic_client(
    servers: ServerFactory, provider: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncEngineClient:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    model = {"anthropic": {"base_url": provider.url}, "compact_keep_turns": 1}
    server = await servers.start(config={"model": model})
    return AsyncEngineClient(f"127.0.0.1:{server.port}")


def _run_options() -> dict[str, Any]:
    return {"model": "anthropic:claude-test", "tools": ["echo"], "context_window_tokens": 1_200}


async def test_the_summary_is_asked_of_the_runs_model_and_the_run_goes_on_with_it(
    servers: ServerFactory, provider: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider.push(
        _anthropic_turn("First.", ("echo", {"text": "short"})),
        _anthropic_turn("Second.", ("echo", {"text": "x" * 2_000})),
        _anthropic_turn("The task: echo things. Echoed 'short' once."),  # the summary
        _anthropic_turn("Done."),
    )
    async with await _anthropic_client(servers, provider, monkeypatch) as client:
        execution = client.execute("Echo things.", **_run_options())
        events = [e async for e in execution]
    assert execution.run is not None
    assert execution.run.state == "DONE", execution.run.error
    [compacted] = [e for e in events if isinstance(e, ContextCompacted)]
    assert (compacted.turn, compacted.turns_summarized) == (3, 1)
    assert compacted.usage == Usage(50, 10)
    first, second, summarise, third = (r.body for r in provider.requests)
    # The summarising request: the older turns, then the ask; tools listed but not to be called.
    assert summarise["tool_choice"] == {"type": "none"}
    for body in (first, second, summarise, third):
        assert problems(body, MessageCreateParamsStreaming) == []
    assert summarise["messages"][-1]["content"][-1]["text"].startswith("Summarise the conversation")
    assert len(summarise["messages"]) == 3  # task, turn 1, its result with the ask
    # The next turn: the task and the summary, then the kept turn whole.
    task_and_summary = [block["text"] for block in third["messages"][0]["content"]]
    assert task_and_summary[0] == "Echo things."
    assert task_and_summary[1].endswith("The task: echo things. Echoed 'short' once.")
    assert [m["role"] for m in third["messages"]] == ["user", "assistant", "user"]
    assert third["messages"][1]["content"][0]["text"] == "Second."
    assert len(second["messages"]) == 3
    assert len(first["messages"]) == 1


async def test_a_failed_summarising_call_fails_the_run(
    servers: ServerFactory, provider: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider.push(
        _anthropic_turn("First.", ("echo", {"text": "short"})),
        _anthropic_turn("Second.", ("echo", {"text": "x" * 2_000})),
        Reply(400, {"type": "error", "error": {"type": "invalid_request_error", "message": "no"}}),
    )
    async with await _anthropic_client(servers, provider, monkeypatch) as client:
        execution = client.execute("Echo things.", **_run_options())
        _ = [e async for e in execution]
    run = execution.run
    assert run is not None
    assert run.state == "FAILED"
    assert run.error is not None
    assert run.error.code == "ERR_COMPACTION_FAILED"
    assert run.error.metadata["model_error"] == "ERR_MODEL_REQUEST"
    assert len(provider.requests) == 3


async def test_the_estimate_follows_the_input_tokens_the_model_reports(servers: ServerFactory) -> None:
    # The model reports far more input tokens than four characters a token would give (a
    # tokenizer that splits this text finely): the engine compacts by that count, not its guess.
    script = [{**step, "usage": {"input_tokens": 12_000, "output_tokens": 5}} for step in _long_script(12)]
    options: dict[str, Any] = {"tools": ["echo"], "context_window_tokens": 12_000}
    async with await _client(servers) as client:
        reported = client.execute("Run the steps.", script=script, **options)
        reported_events = [e async for e in reported]
        guessed = client.execute("Run the steps.", script=_long_script(12), **options)
        guessed_events = [e async for e in guessed]
    assert reported.run is not None
    assert reported.run.state == "DONE"
    assert [e for e in reported_events if isinstance(e, ContextCompacted)]
    assert guessed.run is not None
    assert guessed.run.state == "DONE"
    assert not [e for e in guessed_events if isinstance(e, ContextCompacted)]


def test_the_rate_is_learned_within_bounds() -> None:
    transcript = [Message("user", "x" * 4_000)]
    window = ContextWindow()
    window.messages(transcript)
    assert window.tokens() == 1_000
    window.sent(0)
    window.observe(2_000)
    assert window.tokens() == 2_000
    window.sent(0)
    window.observe(1)  # implausible: the rate stays within its bounds
    assert window.tokens() == 500
    window.observe(9_999)  # nothing was sent since: ignored
    assert window.tokens() == 500
