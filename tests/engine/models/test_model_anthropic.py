"""AnthropicModel against a real loopback server speaking the Messages API SSE format."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from engine_service.core._types import Message, ToolCall, ToolChoice, Usage
from engine_service.models import (
    AnthropicModel,
    RetryPolicy,
    TextChunk,
    ToolSpec,
    TurnResult,
)
from tests.sse_server import (
    FakeSleep,
    Reply,
    ScriptedServer,
    Sse,
    assert_no_key,
    closed_port_url,
    collect,
    drain,
    event,
    failure,
    model_factory,
    request,
    serve,
)

KEY = "sk-ant-test-0123456789abcdef"
WEATHER = ToolSpec("get_weather", "Current weather for a city.", {"type": "object", "properties": {}})

Make = Callable[..., AnthropicModel]


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with serve() as running:
        yield running


@pytest.fixture
async def make(server: ScriptedServer) -> AsyncIterator[Make]:
    async with model_factory(AnthropicModel, KEY, "claude-test", server.url) as build:
        yield build


def message_start(input_tokens: int) -> str:
    message: dict[str, Any] = {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [],
        "stop_reason": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 1},
    }
    return event("message_start", {"type": "message_start", "message": message})


def block_start(index: int, block: dict[str, Any]) -> str:
    return event(
        "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}
    )


def text_delta(index: int, text: str) -> str:
    delta = {"type": "text_delta", "text": text}
    return event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def json_delta(index: int, partial: str) -> str:
    delta = {"type": "input_json_delta", "partial_json": partial}
    return event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def block_stop(index: int) -> str:
    return event("content_block_stop", {"type": "content_block_stop", "index": index})


def message_end(stop_reason: str, output_tokens: int) -> list[str]:
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason},
        "usage": {"output_tokens": output_tokens},
    }
    return [event("message_delta", delta), event("message_stop", {"type": "message_stop"})]


PING = event("ping", {"type": "ping"})


def error_event(kind: str, message: str) -> str:
    return event("error", {"type": "error", "error": {"type": kind, "message": message}})


def text_stream(*pieces: str, delay: float = 0.0) -> Sse:
    frames = [message_start(25), block_start(0, {"type": "text", "text": ""}), PING]
    frames += [text_delta(0, p) for p in pieces]
    return Sse([*frames, block_stop(0), *message_end("end_turn", 7)], delay=delay)


async def test_text_streams_as_chunks_then_one_turn_result(server: ScriptedServer, make: Make) -> None:
    server.push(text_stream("Hel", "lo", " there", delay=0.01))

    items = await collect(make())

    assert items == [
        TextChunk("Hel"),
        TextChunk("lo"),
        TextChunk(" there"),
        TurnResult("Hello there", [], Usage(25, 7), "end_turn"),
    ]


async def test_tool_use_assembles_from_input_json_deltas(server: ScriptedServer, make: Make) -> None:
    split = json_delta(1, '"Par')
    frames = [
        message_start(90),
        block_start(0, {"type": "text", "text": ""}),
        text_delta(0, "Let me check."),
        block_stop(0),
        block_start(1, {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {}}),
        json_delta(1, ""),
        json_delta(1, '{"city": '),
        split[:30],  # one event cut across two network writes
        split[30:],
        json_delta(1, 'is", "unit"'),
        PING,
        json_delta(1, ': "c"}'),
        block_stop(1),
        block_start(2, {"type": "tool_use", "id": "toolu_01B", "name": "get_time", "input": {}}),
        block_stop(2),
        *message_end("tool_use", 61),
    ]
    server.push(Sse(frames, delay=0.005))

    items = await collect(make())

    assert items[:-1] == [TextChunk("Let me check.")]
    assert items[-1] == TurnResult(
        "Let me check.",
        [
            ToolCall("toolu_01A", "get_weather", {"city": "Paris", "unit": "c"}),
            ToolCall("toolu_01B", "get_time", {}),
        ],
        Usage(90, 61),
        "tool_use",
    )


async def test_invalid_tool_input_is_kept_raw(server: ScriptedServer, make: Make) -> None:
    frames = [
        message_start(5),
        block_start(0, {"type": "tool_use", "id": "toolu_X", "name": "get_weather", "input": {}}),
        json_delta(0, '{"city": Par'),
        block_stop(0),
        *message_end("tool_use", 4),
    ]
    server.push(Sse(frames))

    result = (await collect(make()))[-1]

    assert isinstance(result, TurnResult)
    assert result.tool_calls == [ToolCall("toolu_X", "get_weather", {"_raw": '{"city": Par'})]


async def test_request_body_merges_tool_results_and_maps_everything(
    server: ScriptedServer, make: Make
) -> None:
    server.push(text_stream("ok"))
    history = [
        Message("user", "Weather in Paris, and the time?"),
        Message(
            "assistant",
            "Checking.",
            [ToolCall("toolu_1", "get_weather", {"city": "Paris"}), ToolCall("toolu_2", "get_time", {})],
        ),
        Message("tool", "18C", call_id="toolu_1", tool_name="get_weather"),
        Message("tool", "clock broke", call_id="toolu_2", tool_name="get_time", is_error=True),
        Message("assistant", "It is 18C."),
        Message("user", "Thanks"),
    ]
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    req = request(
        system="Be brief.",
        messages=history,
        tools=[WEATHER],
        tool_choice=ToolChoice.REQUIRED,
        max_output_tokens=512,
        output_schema=schema,
    )

    await collect(make(), req)

    [sent] = server.requests
    assert (sent.method, sent.path) == ("POST", "/v1/messages")
    assert sent.headers["x-api-key"] == KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["content-type"] == "application/json"
    body = dict(sent.body)
    [system] = body.pop("system")
    assert system["cache_control"] == {"type": "ephemeral"}
    assert system["text"].startswith("Be brief.\n\n")
    assert json.dumps(schema) in system["text"]
    cached = {"cache_control": {"type": "ephemeral"}}
    assert body == {
        "model": "claude-test",
        "max_tokens": 512,
        "stream": True,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris, and the time?"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C", "is_error": False},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "content": "clock broke",
                        "is_error": True,
                        **cached,
                    },
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "It is 18C."}]},
            {"role": "user", "content": [{"type": "text", "text": "Thanks", **cached}]},
        ],
        "tools": [
            {
                "name": "get_weather",
                "description": "Current weather for a city.",
                "input_schema": {"type": "object", "properties": {}},
                **cached,
            }
        ],
        "tool_choice": {"type": "any"},
    }


async def test_user_text_after_tool_results_joins_the_same_message(
    server: ScriptedServer, make: Make
) -> None:
    server.push(text_stream("ok"))
    history = [
        Message("user", "Go"),
        Message("assistant", "", [ToolCall("toolu_1", "get_time", {})]),
        Message("tool", "", call_id="toolu_1", tool_name="get_time"),
        Message("user", "And now?"),
    ]

    await collect(make(), request(messages=history))

    messages = server.requests[0].body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "(no output)", "is_error": False},
        {"type": "text", "text": "And now?", "cache_control": {"type": "ephemeral"}},
    ]


@pytest.mark.parametrize(
    ("choice", "wire"), [(ToolChoice.AUTO, "auto"), (ToolChoice.REQUIRED, "any"), (ToolChoice.NONE, "none")]
)
async def test_tool_choice_mapping(server: ScriptedServer, make: Make, choice: ToolChoice, wire: str) -> None:
    server.push(text_stream("ok"))
    await collect(make(), request(tools=[WEATHER], tool_choice=choice))
    assert server.requests[0].body["tool_choice"] == {"type": wire}


async def test_no_tools_and_no_system_are_omitted(server: ScriptedServer, make: Make) -> None:
    server.push(text_stream("ok"))
    await collect(make(), request(tool_choice=ToolChoice.REQUIRED))
    body = server.requests[0].body
    assert not {"tools", "tool_choice", "system"} & body.keys()


async def test_429_is_retried_after_the_retry_after_delay(server: ScriptedServer, make: Make) -> None:
    sleep = FakeSleep()
    limited = {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Number of requests too high"},
    }
    server.push(Reply(429, limited, {"retry-after": "2"}), text_stream("fine"))

    items = await collect(make(retry=RetryPolicy(max_attempts=3, sleep=sleep)))

    assert items[-1] == TurnResult("fine", [], Usage(25, 7), "end_turn")
    assert len(server.requests) == 2
    assert sleep.delays == [2.0]


async def test_529_every_time_gives_up_after_max_attempts(server: ScriptedServer, make: Make) -> None:
    sleep = FakeSleep()
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    server.push(*[Reply(529, overloaded)] * 4)

    error = await failure(collect(make(retry=RetryPolicy(max_attempts=4, sleep=sleep))))

    assert (error.code, error.retryable, error.status) == ("ERR_MODEL_UNAVAILABLE", True, 529)
    assert len(server.requests) == 4
    assert len(sleep.delays) == 3


async def test_401_is_an_auth_error_without_retry(server: ScriptedServer, make: Make) -> None:
    sleep = FakeSleep()
    invalid = {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}
    server.push(Reply(401, invalid))

    error = await failure(collect(make(retry=RetryPolicy(max_attempts=3, sleep=sleep))))

    assert (error.code, error.retryable, error.status) == ("ERR_MODEL_AUTH", False, 401)
    assert len(server.requests) == 1
    assert sleep.delays == []


async def test_400_carries_the_provider_message(server: ScriptedServer, make: Make) -> None:
    message = "messages.1: tool_use ids were found without tool_result blocks immediately after"
    server.push(Reply(400, {"type": "error", "error": {"type": "invalid_request_error", "message": message}}))

    error = await failure(collect(make()))

    assert (error.code, error.retryable, error.status) == ("ERR_MODEL_REQUEST", False, 400)
    assert message in error.message
    assert "invalid_request_error" in error.message


async def test_overloaded_error_event_before_text_is_retried(server: ScriptedServer, make: Make) -> None:
    sleep = FakeSleep()
    server.push(
        Sse([message_start(25), PING, error_event("overloaded_error", "Overloaded")]),
        text_stream("recovered"),
    )

    items = await collect(make(retry=RetryPolicy(max_attempts=3, sleep=sleep)))

    assert items == [TextChunk("recovered"), TurnResult("recovered", [], Usage(25, 7), "end_turn")]
    assert len(server.requests) == 2
    assert len(sleep.delays) == 1


async def test_error_event_after_text_is_raised_without_retry(server: ScriptedServer, make: Make) -> None:
    frames = [message_start(25), block_start(0, {"type": "text", "text": ""}), text_delta(0, "Hal")]
    server.push(Sse([*frames, error_event("overloaded_error", "Overloaded")]), text_stream("never"))
    items: list[TextChunk | TurnResult] = []

    error = await failure(drain(make(), request(), items))

    assert (error.code, error.retryable) == ("ERR_MODEL_UNAVAILABLE", True)
    assert items == [TextChunk("Hal")]
    assert len(server.requests) == 1


async def test_stream_without_message_stop_is_a_stream_error(server: ScriptedServer, make: Make) -> None:
    server.push(Sse([message_start(25), PING]))

    error = await failure(collect(make(retry=RetryPolicy(max_attempts=1))))

    assert error.code == "ERR_MODEL_STREAM"


async def test_connection_refused_is_unavailable(make: Make) -> None:
    sleep = FakeSleep()
    model = make(base_url=closed_port_url(), retry=RetryPolicy(max_attempts=2, sleep=sleep))

    error = await failure(collect(model))

    assert (error.code, error.retryable) == ("ERR_MODEL_UNAVAILABLE", True)
    assert len(sleep.delays) == 1


async def test_injected_client_is_not_closed(server: ScriptedServer) -> None:
    server.push(text_stream("ok"))
    async with httpx.AsyncClient() as client:
        model = AnthropicModel(KEY, "claude-test", base_url=server.url, client=client)
        assert (model.provider, model.name) == ("anthropic", "claude-test")
        await collect(model)
        await model.aclose()
        assert not client.is_closed


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


LEAKY_REPLIES = [
    Reply(401, _error("authentication_error", f"invalid x-api-key {KEY}")),
    Reply(403, _error("permission_error", f"{KEY} may not use this model")),
    Reply(400, _error("invalid_request_error", f"bad request from {KEY}")),
    Reply(529, _error("overloaded_error", f"overloaded while serving {KEY}"), {"retry-after": "1"}),
    Sse([message_start(1), error_event("overloaded_error", f"overloaded for {KEY}")]),
    Sse([message_start(1), error_event("authentication_error", f"revoked {KEY}")]),
    Sse([f"event: ping\ndata: {{broken {KEY}\n\n"]),
]


@pytest.mark.parametrize("reply", LEAKY_REPLIES)
async def test_api_key_never_appears_in_errors(
    server: ScriptedServer, make: Make, reply: Reply | Sse
) -> None:
    server.push(reply)
    error = await failure(collect(make(retry=RetryPolicy(max_attempts=1))))
    assert_no_key(error, KEY)


async def test_api_key_never_appears_in_transport_errors(make: Make) -> None:
    model = make(base_url=closed_port_url(), retry=RetryPolicy(max_attempts=1))
    assert_no_key(await failure(collect(model)), KEY)
