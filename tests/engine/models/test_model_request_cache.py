"""The adapters send exactly the body they describe while serialising each message once per run."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from engine_service.core._types import Message, ToolCall
from engine_service.models import AnthropicModel, ModelRequest, OpenAIModel, ToolSpec

TOOL = ToolSpec("noop", "Do nothing.", {"type": "object", "properties": {}})


def adapters() -> list[Any]:
    return [OpenAIModel(api_key="k", model="m"), AnthropicModel(api_key="k", model="m")]


def random_message(rng: random.Random, i: int) -> Message:
    kind = rng.choice(["user", "assistant", "assistant-calls", "tool", "tool-error", "empty"])
    text = rng.choice(["", "ok", "héllo ✓", 'quote " and \\ backslash', "line\nbreak"])
    if kind == "assistant-calls":
        calls = [
            ToolCall(f"call_{i}_{j}", "noop", rng.choice([{}, {"x": 1.5, "s": "é"}, {"_raw": "{bad"}]))
            for j in range(rng.randint(1, 3))
        ]
        return Message("assistant", text, calls)
    if kind in ("tool", "tool-error"):
        return Message("tool", text, call_id=f"call_{i}", tool_name="noop", is_error=kind == "tool-error")
    if kind == "empty":
        return Message("user", "")
    return Message(kind, text)


@pytest.mark.parametrize("seed", range(20))
def test_incremental_body_equals_the_document(seed: int) -> None:
    rng = random.Random(seed)
    transcript = [Message("user", "task")]
    models = adapters()
    for turn in range(40):
        request = ModelRequest(
            system=rng.choice(["", "Be brief."]),
            messages=transcript,
            tools=[TOOL] if turn % 3 else [],
            turn=turn,
        )
        for model in models:
            assert json.loads(model._content(request)) == model._body(request)
        transcript.extend(random_message(rng, turn) for _ in range(rng.randint(1, 3)))


def test_a_changed_or_new_transcript_is_serialised_afresh() -> None:
    first = [Message("user", "one"), Message("assistant", "two")]
    for model in adapters():
        request = ModelRequest(system="", messages=first, tools=[])
        assert json.loads(model._content(request)) == model._body(request)
        # Not append-only any more (the engine never does this, but a caller could).
        first[1] = Message("assistant", "changed")
        assert json.loads(model._content(request)) == model._body(request)
        other = ModelRequest(system="", messages=[Message("user", "three")], tools=[])
        assert json.loads(model._content(other)) == model._body(other)


def test_the_cache_is_bounded() -> None:
    model = OpenAIModel(api_key="k", model="m")
    for i in range(600):
        transcript = [Message("user", f"task {i}")]
        assert json.loads(model._content(ModelRequest(system="", messages=transcript, tools=[])))
    assert len(model._history._entries) <= 256
