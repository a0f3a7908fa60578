"""The scripted model: replays a list of turns, deterministically and offline.

The turn to play is the number of completed turns (``request.turn``), so a run
resumed in another process continues exactly where it stopped. A compaction request (summarise
the conversation) is answered without using a turn of the script: a short, deterministic summary.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import AsyncIterator, Sequence

from engine_service.core._run import ScriptedTurn
from engine_service.core._types import Message, ToolCall, Usage
from engine_service.models._base import ModelError, ModelRequest, TextChunk, TurnResult

# Usage is an estimate: about four characters a token, as for English text with common tokenizers.
_CHARS_PER_TOKEN = 4
# Split text into word-sized fragments (keeping whitespace) to stream it like a model.
_FRAGMENT = re.compile(r"\s*\S+\s*|\s+")
# How much of the task a scripted summary quotes.
_SUMMARY_TASK_CHARS = 200


class ScriptedModel:
    """Replays ``script``; raises ERR_SCRIPT_EXHAUSTED when it runs out."""

    def __init__(self, script: Sequence[ScriptedTurn], name: str = "script") -> None:
        self._script = script
        self._name = name
        # The request's history only grows within a run: count the characters of what is new.
        self._counted_list: Sequence[Message] | None = None
        self._counted_messages = 0
        self._counted_chars = 0

    @property
    def provider(self) -> str:
        return "scripted"

    @property
    def name(self) -> str:
        return self._name

    async def stream(self, request: ModelRequest) -> AsyncIterator[TextChunk | TurnResult]:
        if request.purpose == "compaction":
            summary = _summary(request.messages[:-1])
            input_chars = len(request.system) + sum(_chars(m) for m in request.messages)
            usage = Usage(max(1, input_chars // _CHARS_PER_TOKEN), max(1, len(summary) // _CHARS_PER_TOKEN))
            yield TextChunk(summary)
            yield TurnResult(summary, [], usage, "end_turn")
            return
        turn = request.turn
        if turn >= len(self._script):
            raise ModelError(
                "ERR_SCRIPT_EXHAUSTED",
                f"the scripted model has {len(self._script)} turns and turn {turn + 1} was requested",
            )
        step = self._script[turn]
        for fragment in _FRAGMENT.findall(step.text):
            yield TextChunk(fragment)
        calls = [
            ToolCall(f"call_{turn + 1}_{i + 1}", name, dict(arguments))
            for i, (name, arguments) in enumerate(step.tool_calls)
        ]
        usage = step.usage or Usage(
            input_tokens=max(1, self._input_chars(request) // _CHARS_PER_TOKEN),
            output_tokens=max(1, len(step.text) // _CHARS_PER_TOKEN),
        )
        yield TurnResult(step.text, calls, usage, "tool_use" if calls else "end_turn")

    def _input_chars(self, request: ModelRequest) -> int:
        messages = request.messages
        if messages is not self._counted_list or len(messages) < self._counted_messages:
            # Not the history counted so far (another run's, or a compacted one).
            self._counted_list, self._counted_messages, self._counted_chars = messages, 0, 0
        for message in messages[self._counted_messages :]:
            self._counted_chars += _chars(message)
        self._counted_messages = len(messages)
        fixed = len(request.system) + sum(len(t.name) + len(t.description) for t in request.tools)
        return fixed + self._counted_chars

    async def aclose(self) -> None:
        return None


def _chars(message: Message) -> int:
    return len(message.text) + sum(
        len(call.name) + len(json.dumps(call.arguments)) for call in message.tool_calls
    )


def _summary(messages: Sequence[Message]) -> str:
    """What a scripted model says a conversation was: the task, then counts of what happened."""
    task = messages[0].text if messages else ""
    if len(task) > _SUMMARY_TASK_CHARS:
        task = task[:_SUMMARY_TASK_CHARS] + "…"
    turns = sum(1 for m in messages if m.role == "assistant")
    calls = Counter(c.name for m in messages for c in m.tool_calls)
    tools = ", ".join(f"{name} ×{count}" for name, count in sorted(calls.items())) or "none"
    return f"Task: {task}\nSummarised: {turns} turns ({len(messages)} messages). Tool calls: {tools}."
