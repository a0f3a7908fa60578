"""The scripted model: replays a list of turns, deterministically and offline.

The turn to play is the number of completed turns (``request.turn``), so a run
resumed in another process continues exactly where it stopped.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence

from engine_service.core._run import ScriptedTurn
from engine_service.core._types import ToolCall, Usage
from engine_service.models._base import ModelError, ModelRequest, TextChunk, TurnResult

# Usage is an estimate: about four characters a token, as for English text with common tokenizers.
_CHARS_PER_TOKEN = 4
# Split text into word-sized fragments (keeping whitespace) to stream it like a model.
_FRAGMENT = re.compile(r"\s*\S+\s*|\s+")


class ScriptedModel:
    """Replays ``script``; raises ERR_SCRIPT_EXHAUSTED when it runs out."""

    def __init__(self, script: Sequence[ScriptedTurn], name: str = "script") -> None:
        self._script = script
        self._name = name
        # The request's history only grows within a run: count the characters of what is new.
        self._counted_messages = 0
        self._counted_chars = 0

    @property
    def provider(self) -> str:
        return "scripted"

    @property
    def name(self) -> str:
        return self._name

    async def stream(self, request: ModelRequest) -> AsyncIterator[TextChunk | TurnResult]:
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
        if len(messages) < self._counted_messages:  # not the history counted so far
            self._counted_messages = self._counted_chars = 0
        for message in messages[self._counted_messages :]:
            self._counted_chars += len(message.text) + sum(
                len(call.name) + len(json.dumps(call.arguments)) for call in message.tool_calls
            )
        self._counted_messages = len(messages)
        fixed = len(request.system) + sum(len(t.name) + len(t.description) for t in request.tools)
        return fixed + self._counted_chars

    async def aclose(self) -> None:
        return None
