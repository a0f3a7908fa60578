"""Prompt caching: the Anthropic adapter's cache breakpoints, checked against the official SDK's
request types; cache read and write counts from both adapters; cost at cached prices."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from anthropic.types import Message as SdkMessage
from anthropic.types import MessageDeltaUsage, RawMessageDeltaEvent, RawMessageStartEvent
from anthropic.types import Usage as SdkUsage
from anthropic.types.message_create_params import MessageCreateParamsStreaming

from client_py import AsyncEngineClient, UsageReported
from engine_service.core._config import EngineConfig
from engine_service.core._types import Message, ToolCall, Usage
from engine_service.models import AnthropicModel, OpenAIModel, ToolSpec, TurnResult
from engine_service.models._select import model_price
from tests.anthropic_types import problems
from tests.conftest import ServerFactory
from tests.sse_server import ScriptedServer, Sse, collect, data, event, model_factory, request, serve

pytestmark = pytest.mark.timeout(60)

KEY = "sk-ant-test-0123456789abcdef"
TOOLS = [
    ToolSpec("get_weather", "Current weather for a city.", {"type": "object", "properties": {}}),
    ToolSpec("get_time", "The time.", {"type": "object"}),
]
BREAKPOINT = {"type": "ephemeral"}


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with serve() as running:
        yield running


def test_the_checker_catches_a_misplaced_marker() -> None:
    body = {"model": "m", "max_tokens": 1, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    assert problems(body, MessageCreateParamsStreaming) == []
    assert problems({**body, "cache_controls": BREAKPOINT}, MessageCreateParamsStreaming)
    misplaced = {**body, "messages": [{"role": "user", "content": "hi", "cache_control": BREAKPOINT}]}
    assert problems(misplaced, MessageCreateParamsStreaming)
    assert problems({**body, "max_tokens": "1"}, MessageCreateParamsStreaming)


# -- request bodies -------------------------------------------------------------------------------


def _history(turns: int) -> list[Message]:
    history = [Message("user", "Weather in Paris, and the time?")]
    for i in range(turns):
        calls = [
            ToolCall(f"toolu_{i}a", "get_weather", {"city": "Paris"}),
            ToolCall(f"toolu_{i}b", "get_time", {}),
        ]
        history.append(Message("assistant", f"Checking {i}.", calls))
        history.append(Message("tool", "18C", call_id=f"toolu_{i}a", tool_name="get_weather"))
        history.append(Message("tool", "", call_id=f"toolu_{i}b", tool_name="get_time", is_error=True))
    return history


def _stream(usage: SdkUsage, delta: MessageDeltaUsage) -> Sse:
    start = RawMessageStartEvent(
        type="message_start",
        message=SdkMessage(
            id="msg_01",
            type="message",
            role="assistant",
            model="claude-test",
            content=[],
            stop_reason=None,
            stop_sequence=None,
            usage=usage,
        ),
    )
    end = RawMessageDeltaEvent.model_validate(
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": delta.model_dump()}
    )
    return Sse(
        [
            event("message_start", start.model_dump(mode="json")),
            event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": "ok"}},
            ),
            event("message_delta", end.model_dump(mode="json")),
            event("message_stop", {"type": "message_stop"}),
        ]
    )


def _plain_stream() -> Sse:
    return _stream(SdkUsage(input_tokens=5, output_tokens=1), MessageDeltaUsage(output_tokens=1))


def _markers(body: Any, where: str = "body") -> list[str]:
    """Where ``body`` holds a cache_control, as paths."""
    if isinstance(body, dict):
        found = [where] if "cache_control" in body else []
        return found + [m for k, v in body.items() for m in _markers(v, f"{where}.{k}")]
    if isinstance(body, list):
        return [m for i, v in enumerate(body) for m in _markers(v, f"{where}[{i}]")]
    return []


async def test_requests_mark_tools_system_and_the_history_prefix(server: ScriptedServer) -> None:
    history = _history(1)
    server.push(_plain_stream(), _plain_stream(), _plain_stream())
    async with model_factory(AnthropicModel, KEY, "claude-test", server.url) as make:
        model = make()
        bodies = []
        for _ in range(3):  # a growing transcript, as the engine sends it turn after turn
            req = request(system="Be brief.", messages=history, tools=TOOLS)
            await collect(model, req)
            bodies.append(server.requests[-1].body)
            assert json.loads(model._content(req)) == model._body(req)
            history.append(Message("assistant", "More.", [ToolCall(f"t{len(history)}", "get_time", {})]))
            history.append(Message("tool", "noon", call_id=f"t{len(history) - 1}", tool_name="get_time"))
    for body in bodies:
        assert problems(body, MessageCreateParamsStreaming) == []
        markers = _markers(body)
        assert len(markers) <= 4  # the API's limit
        last = len(body["messages"]) - 1
        assert markers == [
            f"body.messages[{last - 2}].content[{len(body['messages'][last - 2]['content']) - 1}]",
            f"body.messages[{last}].content[{len(body['messages'][last]['content']) - 1}]",
            "body.system[0]",
            f"body.tools[{len(TOOLS) - 1}]",
        ]
    # Each request's marked prefix is the previous request's history: the cache it wrote is read.
    for before, after in itertools.pairwise(bodies):
        previous = _unmarked(before["messages"])
        assert _unmarked(after["messages"])[: len(previous)] == previous
        assert "cache_control" in after["messages"][len(previous) - 1]["content"][-1]


def _unmarked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _unmarked(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_unmarked(v) for v in value]
    return value


async def test_a_first_request_has_one_history_marker(server: ScriptedServer) -> None:
    server.push(_plain_stream())
    async with model_factory(AnthropicModel, KEY, "claude-test", server.url) as make:
        await collect(make(), request())
    body = server.requests[0].body
    assert problems(body, MessageCreateParamsStreaming) == []
    assert _markers(body) == ["body.messages[0].content[0]"]


# -- usage ------------------------------------------------------------------------------------------


async def test_anthropic_usage_reports_cache_reads_and_writes(server: ScriptedServer) -> None:
    server.push(
        _stream(
            SdkUsage(
                input_tokens=12,
                output_tokens=1,
                cache_creation_input_tokens=300,
                cache_read_input_tokens=4000,
            ),
            MessageDeltaUsage(output_tokens=40),
        ),
        # Newer API versions repeat the input counts in message_delta: the last counts win.
        _stream(
            SdkUsage(input_tokens=12, output_tokens=1),
            MessageDeltaUsage(
                input_tokens=12, output_tokens=9, cache_creation_input_tokens=0, cache_read_input_tokens=4300
            ),
        ),
    )
    async with model_factory(AnthropicModel, KEY, "claude-test", server.url) as make:
        model = make()
        first = (await collect(model))[-1]
        second = (await collect(model))[-1]
    assert isinstance(first, TurnResult)
    assert first.usage == Usage(4312, 40, cache_read_tokens=4000, cache_write_tokens=300)
    assert isinstance(second, TurnResult)
    assert second.usage == Usage(4312, 9, cache_read_tokens=4300, cache_write_tokens=0)


async def test_openai_usage_reports_cached_prompt_tokens(server: ScriptedServer) -> None:
    def chunk(usage: dict[str, Any]) -> str:
        return data({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": usage})

    text = data({"id": "c", "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]})
    counts = {"prompt_tokens": 2006, "completion_tokens": 5, "total_tokens": 2011}
    server.push(
        Sse([text, chunk({**counts, "prompt_tokens_details": {"cached_tokens": 1920}}), data("[DONE]")]),
        # OpenRouter also reports the tokens it wrote to the provider's cache.
        Sse(
            [
                text,
                chunk({**counts, "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 1900}}),
                data("[DONE]"),
            ]
        ),
        Sse([text, chunk(counts), data("[DONE]")]),
    )
    async with model_factory(OpenAIModel, "sk-test", "gpt-test", server.url) as make:
        model = make()
        results = [(await collect(model))[-1] for _ in range(3)]
    assert [r.usage for r in results if isinstance(r, TurnResult)] == [
        Usage(2006, 5, cache_read_tokens=1920),
        Usage(2006, 5, cache_write_tokens=1900),
        Usage(2006, 5),
    ]


# -- cost -------------------------------------------------------------------------------------------


def test_prices_take_cache_prices_or_default_them_to_the_input_price() -> None:
    config = EngineConfig.model_validate(
        {"model": {"anthropic": {"prices": {"claude-a": [3, 15, 0.3, 3.75], "claude-b": [3, 15]}}}}
    )
    assert model_price(config, "anthropic", "anthropic", "claude-a") == (3, 15, 0.3, 3.75)
    assert model_price(config, "anthropic", "anthropic", "claude-b") == (3, 15, 3, 3)
    assert Usage(1_000_000, 0).cost((3, 15, 0.3, 3.75)) == pytest.approx(3.0)
    cached = Usage(1_000_000, 1_000_000, cache_read_tokens=600_000, cache_write_tokens=200_000)
    assert cached.cost((3, 15, 0.3, 3.75)) == pytest.approx(0.2 * 3 + 15 + 0.6 * 0.3 + 0.2 * 3.75)
    with pytest.raises(ValueError, match="prices"):
        EngineConfig.model_validate({"model": {"anthropic": {"prices": {"c": [3, 15, 0.3]}}}})


@pytest.fixture
async def anthropic_engine(
    servers: ServerFactory, server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[AsyncEngineClient]:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    anthropic = {"base_url": server.url, "prices": {"claude-test": "3/15/0.3/3.75"}}
    running = await servers.start(config={"model": {"anthropic": anthropic}})
    async with AsyncEngineClient(f"127.0.0.1:{running.port}") as client:
        yield client


async def test_a_run_reports_cached_tokens_and_costs_them_at_their_prices(
    anthropic_engine: AsyncEngineClient, server: ScriptedServer
) -> None:
    server.push(
        _stream(
            SdkUsage(
                input_tokens=1000,
                output_tokens=1,
                cache_creation_input_tokens=2000,
                cache_read_input_tokens=10_000,
            ),
            MessageDeltaUsage(output_tokens=100),
        )
    )
    execution = anthropic_engine.execute("hi", model="anthropic:claude-test", system_prompt="Be brief.")
    events = [e async for e in execution]
    run = execution.run
    assert run is not None
    assert run.state == "DONE"
    [usage] = [e for e in events if isinstance(e, UsageReported)]
    assert (usage.input_tokens, usage.output_tokens) == (13_000, 100)
    assert (usage.cache_read_tokens, usage.cache_write_tokens) == (10_000, 2000)
    expected = (1000 * 3 + 100 * 15 + 10_000 * 0.3 + 2000 * 3.75) / 1e6
    assert usage.cost_usd == pytest.approx(expected)
    assert run.meta.cost_usd == pytest.approx(expected)
    assert (run.meta.usage.cache_read_tokens, run.meta.usage.cache_write_tokens) == (10_000, 2000)
    # What the engine sent is a valid, marked request.
    body = server.requests[0].body
    assert problems(body, MessageCreateParamsStreaming) == []
    assert body["system"][0]["cache_control"] == BREAKPOINT
