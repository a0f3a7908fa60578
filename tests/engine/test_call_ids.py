"""Tool call ids come from the model's answer: each call gets one of its own, whatever it sent.

Results, interrupts and subagents are keyed by call id, so an id used twice in one turn (or one
that is not an id at all) must not hand one call's result to another, merge two approvals or
read as a path.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from client_py import AsyncEngineClient, ToolCallCompleted
from tests.conftest import ServerFactory
from tests.sse_server import Sse, data, serve

pytestmark = pytest.mark.timeout(30)


def tool_turn(calls: list[tuple[str, str, dict[str, Any]]]) -> Sse:
    deltas = [
        {
            "index": i,
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)},
        }
        for i, (call_id, name, args) in enumerate(calls)
    ]
    return Sse(
        [
            data({"choices": [{"index": 0, "delta": {"tool_calls": deltas}, "finish_reason": None}]}),
            data({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
            data("[DONE]"),
        ]
    )


def text_turn(text: str) -> Sse:
    return Sse(
        [
            data({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}),
            data({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            data("[DONE]"),
        ]
    )


def openai_config(url: str, **tools: Any) -> dict[str, Any]:
    return {"model": {"provider": "openai", "base_url": url + "/v1", "max_attempts": 1}, "tools": tools}


@pytest.mark.parametrize(
    "ids",
    [
        ["dup", "dup", "dup"],
        ["", "", "ok_1"],
        ["a/b", "../x", "y" * 200],
        ["call_1_2", "call_1_2", "call_1_3"],  # a replacement must not take an id the model used
    ],
    ids=["repeated", "empty", "not-ids", "clashing-replacement"],
)
async def test_each_call_is_answered_under_an_id_of_its_own(
    servers: ServerFactory, monkeypatch: pytest.MonkeyPatch, ids: list[str]
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    texts = ["alpha", "beta", "gamma"]
    with serve() as fake:
        fake.push(
            tool_turn([(i, "echo", {"text": t}) for i, t in zip(ids, texts, strict=True)]), text_turn("done")
        )
        srv = await servers.start(config=openai_config(fake.url))
        async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
            handle = await client.create("echo three things")
            run = await handle.wait(timeout=20)
            events = [e async for e in handle.events()]
        assert run.state == "DONE", run
        completed = [e for e in events if isinstance(e, ToolCallCompleted)]
        assert len({e.call_id for e in completed}) == 3, [e.call_id for e in completed]
        # The model's next request shows its calls under distinct ids, each answered with its own result.
        messages = fake.requests[1].body["messages"]
        assistant = next(m for m in messages if m["role"] == "assistant")
        shown = [c["id"] for c in assistant["tool_calls"]]
        assert len(set(shown)) == 3, shown
        answers = {m["tool_call_id"]: m["content"] for m in messages if m["role"] == "tool"}
        assert [answers[call_id] for call_id in shown] == texts
        assert all("/" not in call_id and len(call_id) <= 128 for call_id in shown)


async def test_two_approvals_under_one_id_are_two_interrupts(
    servers: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    with serve() as fake:
        fake.push(tool_turn([("same", "double", {"x": 2}), ("same", "double", {"x": 5})]), text_turn("done"))
        srv = await servers.start(config=openai_config(fake.url, permissions={"double": "ask"}))
        async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
            handle = await client.create("double two numbers")
            run = await handle.wait(timeout=20)
            assert run.state == "PAUSED", run
            assert len({i.interrupt_id for i in run.interrupts}) == 2, run.interrupts
            first, second = run.interrupts
            await handle.approve(first.interrupt_id)
            run = await handle.refresh()
            assert run.state == "PAUSED"
            assert [i.interrupt_id for i in run.interrupts] == [second.interrupt_id]
            await handle.reject(second.interrupt_id, reason="not this one")
            run = await handle.wait(timeout=20)
        assert run.state == "DONE", run
        messages = fake.requests[1].body["messages"]
        results = [m["content"] for m in messages if m["role"] == "tool"]
        assert results[0] == "4"
        assert "not this one" in results[1]
