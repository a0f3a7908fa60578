"""What the real OpenAI and Anthropic adapters spend building one request, by history length.

Only the request body is timed: the adapter's ``_content`` (history → the JSON
bytes that are POSTed), no HTTP. The history is the one a run of the bench script
has at turn N: the task, then N-1 assistant turns that call the no-op tool with
their results; the tool list is the built-in catalogue. ``baseline`` times what
the adapters did before they cached serialised messages: the whole document
(``_body``) encoded as httpx does for ``json=``, every turn.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from engine_service import EngineConfig
from engine_service.models import AnthropicModel, ModelRequest, OpenAIModel
from engine_service.testing import Message, ToolCall, builtin_tools


def history(turns: int) -> list[Message]:
    messages = [Message("user", "bench")]
    for turn in range(1, turns):
        call = ToolCall(f"call_{turn}_1", "noop", {})
        messages.append(Message("assistant", "step", [call]))
        messages.append(Message("tool", "ok", call_id=call.call_id, tool_name="noop"))
    return messages


def request_build_us(adapter: Any, turns: int, repeats: int, baseline: bool = False) -> list[float]:
    """Microseconds to build the body of the request for turn ``turns`` (history grows as in a run)."""
    tools = [t.spec() for t in builtin_tools(EngineConfig())]
    full = history(turns)
    first = max(1, turns - repeats)
    # One transcript list that grows as a run's does (the engine hands adapters the same
    # list every turn); the requests of the last ``repeats`` turns are the sample, after
    # one untimed request for the turn before them.
    transcript = full[: 2 * first - 1]
    out = []
    for turn in range(first, turns + 1):
        request = ModelRequest(system="You are a bench.", messages=transcript, tools=tools, turn=turn - 1)
        started = time.perf_counter()
        if baseline:
            httpx.Request("POST", "http://127.0.0.1/v1", json=adapter._body(request))
        else:
            adapter._content(request)
        elapsed = time.perf_counter() - started
        if turn > first:
            out.append(elapsed * 1e6)
        transcript.extend(full[2 * turn - 1 : 2 * turn + 1])
    return out


def measure(turns: int, repeats: int) -> dict[str, list[float]]:
    """Per adapter: the request as built now, and the whole-document ``baseline``."""
    out = {}
    for name, make in (
        ("openai", lambda: OpenAIModel(api_key="-", model="gpt-4o-mini")),
        ("anthropic", lambda: AnthropicModel(api_key="-", model="claude-sonnet-4-5")),
    ):
        out[name] = request_build_us(make(), turns, repeats)
        out[f"{name}_baseline"] = request_build_us(make(), turns, repeats, baseline=True)
    return out
