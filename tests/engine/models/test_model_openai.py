"""OpenAIModel against a real loopback server speaking the Chat Completions SSE format."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from engine_service.core._types import Message, ToolCall, ToolChoice, Usage
from engine_service.models import (
    OpenAIModel,
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
    data,
    drain,
    failure,
    model_factory,
    request,
    serve,
)

KEY = "sk-test-openai-0123456789abcdef"
WEATHER = ToolSpec("get_weather", "Current weather for a city.", {"type": "object", "properties": {}})

Make = Callable[..., OpenAIModel]


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with serve() as running:
        yield running


@pytest.fixture
async def make(server: ScriptedServer) -> AsyncIterator[Make]:
    async with model_factory(OpenAIModel, KEY, "gpt-test", server.url + "/v1") as build:
        yield build


def content(text: str) -> str:
    return data({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


def finish(reason: str) -> str:
    return data({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})


def usage(prompt: int, completion: int) -> str:
    return data({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}})


def call_delta(index: int, arguments: str, call_id: str = "", name: str = "") -> str:
    fragment: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id:
        fragment.update(id=call_id, type="function")
        fragment["function"]["name"] = name
    return data({"choices": [{"index": 0, "delta": {"tool_calls": [fragment]}, "finish_reason": None}]})


def text_stream(*pieces: str, delay: float = 0.0) -> Sse:
    role = data({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    frames = [role, *(content(p) for p in pieces), finish("stop"), usage(12, 3), data("[DONE]")]
    return Sse(frames, delay=delay)


async def test_text_streams_as_chunks_then_one_turn_result(server: ScriptedServer, make: Make) -> None:
    server.push(text_stream("Hel", "lo", " world", delay=0.05))
    stamps: list[float] = []
    items: list[TextChunk | TurnResult] = []
    async for item in make().stream(request()):
        stamps.append(time.monotonic())
        items.append(item)

    assert items[:-1] == [TextChunk("Hel"), TextChunk("lo"), TextChunk(" world")]
    result = items[-1]
    assert isinstance(result, TurnResult)
    assert (result.text, result.tool_calls, result.stop_reason) == ("Hello world", [], "end_turn")
    assert result.usage == Usage(12, 3)
    # The first chunk is handed over while the server is still sending, not at the end.
    assert stamps[-1] - stamps[0] >= 0.1


async def test_parallel_tool_calls_assemble_from_interleaved_deltas(
    server: ScriptedServer, make: Make
) -> None:
    split = call_delta(0, 'ty": "Pa')
    frames = [
        call_delta(0, "", "call_a", "get_weather"),
        call_delta(1, "", "call_b", "get_time"),
        call_delta(0, '{"ci'),
        call_delta(1, '{"tz"'),
        split[:20],  # one event cut across two network writes
        split[20:],
        call_delta(1, ': "UTC"}'),
        call_delta(0, 'ris"}'),
        finish("tool_calls"),
        usage(40, 22),
        data("[DONE]"),
    ]
    server.push(Sse(frames, delay=0.005))

    result = (await collect(make()))[-1]

    assert isinstance(result, TurnResult)
    assert result.tool_calls == [
        ToolCall("call_a", "get_weather", {"city": "Paris"}),
        ToolCall("call_b", "get_time", {"tz": "UTC"}),
    ]
    assert (result.text, result.stop_reason, result.usage) == ("", "tool_use", Usage(40, 22))


async def test_invalid_tool_arguments_are_kept_raw(server: ScriptedServer, make: Make) -> None:
    frames = [call_delta(0, "", "call_x", "get_weather"), call_delta(0, '{"city": Par'), finish("tool_calls")]
    server.push(Sse([*frames, data("[DONE]")]))

    result = (await collect(make()))[-1]

    assert isinstance(result, TurnResult)
    assert result.tool_calls == [ToolCall("call_x", "get_weather", {"_raw": '{"city": Par'})]


async def test_request_body_maps_history_tools_and_schema(server: ScriptedServer, make: Make) -> None:
    server.push(text_stream("ok"))
    history = [
        Message("user", "Weather in Paris, and the time?"),
        Message(
            "assistant",
            "Checking.",
            [ToolCall("call_1", "get_weather", {"city": "Paris"}), ToolCall("call_2", "get_time", {})],
        ),
        Message("tool", "18C", call_id="call_1", tool_name="get_weather"),
        Message("tool", "clock broke", call_id="call_2", tool_name="get_time", is_error=True),
        Message("assistant", "", [ToolCall("call_3", "get_time", {"_raw": "{bad"})]),
        Message("tool", "12:00", call_id="call_3", tool_name="get_time"),
        Message("assistant", "It is 18C at noon."),
        Message("user", "Thanks"),
    ]
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    req = request(
        system="Be brief.",
        messages=history,
        tools=[WEATHER],
        tool_choice=ToolChoice.REQUIRED,
        max_output_tokens=256,
        output_schema=schema,
    )

    await collect(make(), req)

    [sent] = server.requests
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.body == {
        "model": "gpt-test",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 256,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris, and the time?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "Error: clock broke"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_3",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": "{bad"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_3", "content": "12:00"},
            {"role": "assistant", "content": "It is 18C at noon."},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather for a city.",
                    "parameters": {"type": "object", "properties": {}},
                },
            }
        ],
        "tool_choice": "required",
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": schema, "strict": False},
        },
    }


@pytest.mark.parametrize("choice", list(ToolChoice))
async def test_tool_choice_is_passed_through(server: ScriptedServer, make: Make, choice: ToolChoice) -> None:
    server.push(text_stream("ok"))
    await collect(make(), request(tools=[WEATHER], tool_choice=choice))
    assert server.requests[0].body["tool_choice"] == choice.value


async def test_no_tools_means_no_tools_and_no_tool_choice(server: ScriptedServer, make: Make) -> None:
    server.push(text_stream("ok"))
    await collect(make(), request(tool_choice=ToolChoice.REQUIRED))
    body = server.requests[0].body
    assert "tools" not in body
    assert "tool_choice" not in body
    assert "response_format" not in body
    assert body["messages"] == [{"role": "user", "content": "Hi"}]  # no empty system message


@pytest.mark.parametrize(
    ("header", "delay"), [({"Retry-After": "3"}, 3.0), ({"retry-after-ms": "1500"}, 1.5)]
)
async def test_429_is_retried_after_the_retry_after_delay(
    server: ScriptedServer, make: Make, header: dict[str, str], delay: float
) -> None:
    sleep = FakeSleep()
    limited = {"error": {"message": "Rate limit reached", "type": "requests"}}
    server.push(Reply(429, limited, header), text_stream("fine"))

    items = await collect(make(retry=RetryPolicy(max_attempts=3, sleep=sleep)))

    assert items[-1] == TurnResult("fine", [], Usage(12, 3), "end_turn")
    assert len(server.requests) == 2
    assert sleep.delays == [delay]


@pytest.mark.parametrize(
    ("code", "expected", "requests"), [(502, "ERR_MODEL_UNAVAILABLE", 3), (400, "ERR_MODEL_REQUEST", 1)]
)
async def test_error_chunk_inside_a_200_stream(
    server: ScriptedServer, make: Make, code: int, expected: str, requests: int
) -> None:
    server.push(*[Sse([data({"error": {"message": "upstream said no", "code": code}})])] * 3)

    error = await failure(collect(make()))

    assert (error.code, error.status) == (expected, code)
    assert "upstream said no" in error.message
    assert len(server.requests) == requests


async def test_500_every_time_gives_up_after_max_attempts(server: ScriptedServer, make: Make) -> None:
    sleep = FakeSleep()
    server.push(*[Reply(500, {"error": {"message": "The server had an error"}})] * 3)

    error = await failure(collect(make(retry=RetryPolicy(max_attempts=3, sleep=sleep))))

    assert (error.code, error.retryable, error.status) == ("ERR_MODEL_UNAVAILABLE", True, 500)
    assert len(server.requests) == 3
    assert len(sleep.delays) == 2


async def test_401_is_an_auth_error_without_retry(server: ScriptedServer, make: Make) -> None:
    sleep = FakeSleep()
    server.push(
        Reply(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
    )

    error = await failure(collect(make(retry=RetryPolicy(max_attempts=3, sleep=sleep))))

    assert (error.code, error.retryable, error.status) == ("ERR_MODEL_AUTH", False, 401)
    assert len(server.requests) == 1
    assert sleep.delays == []


async def test_400_carries_the_provider_message(server: ScriptedServer, make: Make) -> None:
    message = "Invalid schema for function 'get_weather': 'nope' is not valid."
    server.push(
        Reply(400, {"error": {"message": message, "type": "invalid_request_error", "param": "tools"}})
    )

    error = await failure(collect(make()))

    assert (error.code, error.retryable, error.status) == ("ERR_MODEL_REQUEST", False, 400)
    assert message in error.message
    assert len(server.requests) == 1


async def test_connection_refused_is_unavailable(make: Make) -> None:
    sleep = FakeSleep()
    model = make(base_url=closed_port_url() + "/v1", retry=RetryPolicy(max_attempts=2, sleep=sleep))

    error = await failure(collect(model))

    assert (error.code, error.retryable) == ("ERR_MODEL_UNAVAILABLE", True)
    assert len(sleep.delays) == 1


async def test_read_timeout_is_unavailable(server: ScriptedServer, make: Make) -> None:
    server.push(Sse([content("slow"), content("er")], delay=2.0))

    error = await failure(collect(make(timeout=0.3, retry=RetryPolicy(max_attempts=1))))

    assert error.code == "ERR_MODEL_UNAVAILABLE"
    assert "timed out" in error.message


async def test_stream_cut_after_text_is_not_retried(server: ScriptedServer, make: Make) -> None:
    server.push(Sse([content("partial")]), text_stream("never"))
    items: list[TextChunk | TurnResult] = []

    error = await failure(drain(make(), request(), items))

    assert error.code == "ERR_MODEL_STREAM"
    assert items == [TextChunk("partial")]
    assert len(server.requests) == 1  # a retry would repeat the text already shown


async def test_malformed_event_is_a_stream_error(server: ScriptedServer, make: Make) -> None:
    server.push(Sse(["data: {not json\n\n"]))

    error = await failure(collect(make()))

    assert (error.code, error.retryable) == ("ERR_MODEL_STREAM", False)


async def test_injected_client_is_not_closed(server: ScriptedServer) -> None:
    server.push(text_stream("ok"))
    async with httpx.AsyncClient() as client:
        model = OpenAIModel(KEY, "gpt-test", base_url=server.url + "/v1", client=client)
        assert (model.provider, model.name) == ("openai", "gpt-test")
        await collect(model)
        await model.aclose()
        assert not client.is_closed


LEAKY_REPLIES = [
    Reply(401, {"error": {"message": f"Incorrect API key provided: {KEY}."}}),
    Reply(403, {"error": {"message": f"key {KEY} may not use this model"}}),
    Reply(400, {"error": {"message": f"bad request from {KEY}"}}),
    Reply(500, {"error": {"message": f"crash while serving {KEY}"}}),
    Reply(429, f"slow down {KEY}", {"Retry-After": "1"}),
    Sse([data({"error": {"message": f"mid-stream failure for {KEY}", "code": 502}})]),
    Sse([f"data: {{broken {KEY}\n\n"]),
]


@pytest.mark.parametrize("reply", LEAKY_REPLIES)
async def test_api_key_never_appears_in_errors(
    server: ScriptedServer, make: Make, reply: Reply | Sse
) -> None:
    server.push(reply)
    error = await failure(collect(make(retry=RetryPolicy(max_attempts=1))))
    assert_no_key(error, KEY)


async def test_api_key_never_appears_in_transport_errors(make: Make) -> None:
    model = make(base_url=closed_port_url() + "/v1", retry=RetryPolicy(max_attempts=1))
    assert_no_key(await failure(collect(model)), KEY)
