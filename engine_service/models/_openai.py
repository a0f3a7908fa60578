"""OpenAI Chat Completions, streamed; also any compatible server (vLLM, Ollama, OpenRouter)."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import httpx

from engine_service.core._types import JsonObject, Message, ToolCall, Usage
from engine_service.models import _http
from engine_service.models._base import (
    ModelRequest,
    TextChunk,
    TurnResult,
)

# Finish reasons in the engine's vocabulary (the one ScriptedModel and Anthropic use).
_STOP_REASONS = {
    "stop": "end_turn",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "length": "max_tokens",
    "content_filter": "refusal",
}


@dataclass(slots=True)
class _PendingCall:
    call_id: str = ""
    name: str = ""
    arguments: str = ""


class OpenAIModel(_http.HttpModel):
    """Streams one turn from ``POST {base_url}/chat/completions``."""

    provider_name = "openai"
    default_base_url = "https://api.openai.com/v1"
    url_path = "/chat/completions"

    @functools.cached_property
    def _max_tokens_field(self) -> str:
        # OpenAI rejects max_tokens for reasoning models; most compatible servers only know max_tokens.
        official = httpx.URL(self._url).host == "api.openai.com"
        return "max_completion_tokens" if official else "max_tokens"

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._api_key}", "accept": "text/event-stream"}

    def _body(self, request: ModelRequest) -> JsonObject:
        """The request as a document; what is sent is ``_content``, its JSON."""
        messages: list[JsonObject] = [{"role": "system", "content": request.system}] if request.system else []
        messages.extend(_message(m) for m in request.messages)
        return {"messages": messages, **self._settings(request)}

    def _content(self, request: ModelRequest) -> bytes:
        """The JSON of ``_body``, each history message serialised once per run (not every turn)."""
        entry = self._history.get(request.messages)
        new = [_http.encode_json(_message(m)) for m in request.messages[entry.count :]]
        entry.parts.extend(new)
        self._history.grew(entry, request.messages, sum(map(len, new)))
        system = [_http.encode_json({"role": "system", "content": request.system})] if request.system else []
        settings = _http.encode_json(self._settings(request))
        return f'{{"messages":[{",".join([*system, *entry.parts])}],{settings[1:]}'.encode()

    def _settings(self, request: ModelRequest) -> JsonObject:
        """Everything in the body but the messages."""
        body: JsonObject = {
            "model": self._model,
            "stream": True,
            "stream_options": {"include_usage": True},
            self._max_tokens_field: request.max_output_tokens,
        }
        if request.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description, "parameters": t.input_schema},
                }
                for t in request.tools
            ]
            body["tool_choice"] = request.tool_choice.value
        if request.output_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": request.output_schema, "strict": False},
            }
        return body

    async def _once(self, request: ModelRequest) -> AsyncIterator[TextChunk | TurnResult]:
        text: list[str] = []
        calls: dict[int, _PendingCall] = {}
        usage = Usage()
        finish = ""
        done = False
        events = self._post(request)
        async with aclosing(events):
            async for event in events:
                if event.data.strip() == "[DONE]":
                    done = True
                    break
                chunk = _http.decode_event(event, self.provider, self._api_key)
                if chunk.get("error"):
                    raise _http.event_error(self.provider, chunk["error"], self._api_key)
                if chunk.get("usage"):
                    usage = _usage(chunk["usage"])
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        text.append(delta["content"])
                        yield TextChunk(delta["content"])
                    for fragment in delta.get("tool_calls") or ():
                        _merge_call(calls, fragment)
                    finish = choice.get("finish_reason") or finish
        # Some compatible servers omit [DONE]; a finish_reason still proves the turn is whole.
        if not (done or finish):
            raise _http.truncated(self.provider)
        tool_calls = [
            ToolCall(
                call.call_id or f"call_{request.turn + 1}_{i + 1}",
                call.name,
                _http.parse_arguments(call.arguments),
            )
            for i, (_, call) in enumerate(sorted(calls.items()))
        ]
        yield TurnResult("".join(text), tool_calls, usage, _STOP_REASONS.get(finish, finish))


def _usage(counts: JsonObject) -> Usage:
    # prompt_tokens counts cached tokens too. OpenAI caches by itself and reports reads only;
    # some compatible servers report writes as well (OpenRouter), or reads their own way (DeepSeek).
    details = counts.get("prompt_tokens_details") or {}
    read = details.get("cached_tokens") or counts.get("prompt_cache_hit_tokens") or 0
    return Usage(
        input_tokens=int(counts.get("prompt_tokens") or 0),
        output_tokens=int(counts.get("completion_tokens") or 0),
        cache_read_tokens=int(read),
        cache_write_tokens=int(details.get("cache_write_tokens") or 0),
    )


def _merge_call(calls: dict[int, _PendingCall], fragment: JsonObject) -> None:
    # id and name come once, in the first delta of a call; arguments arrive as string pieces.
    index = fragment.get("index")
    if index is None:  # servers that send each call whole, without an index
        index = len(calls) if fragment.get("id") or not calls else max(calls)
    call = calls.setdefault(int(index), _PendingCall())
    if fragment.get("id"):
        call.call_id = fragment["id"]
    function = fragment.get("function") or {}
    if function.get("name"):
        call.name = function["name"]
    call.arguments += function.get("arguments") or ""


def _message(message: Message) -> JsonObject:
    if message.role == "user":
        return {"role": "user", "content": message.text}
    if message.role == "assistant":
        if not message.tool_calls:
            return {"role": "assistant", "content": message.text}
        return {
            "role": "assistant",
            "content": message.text or None,
            "tool_calls": [
                {
                    "id": c.call_id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": _arguments(c)},
                }
                for c in message.tool_calls
            ],
        }
    if message.role == "tool":
        # Chat Completions has no error flag on tool results, so the model is told in the text.
        content = f"Error: {message.text}" if message.is_error else message.text
        return {"role": "tool", "tool_call_id": message.call_id, "content": content}
    raise _http.bad_role(message.role, "openai")


def _arguments(call: ToolCall) -> str:
    # Echo unparseable arguments back as the model wrote them, not wrapped in {"_raw": ...}.
    raw = call.arguments.get("_raw")
    if len(call.arguments) == 1 and isinstance(raw, str):
        return raw
    return json.dumps(call.arguments, ensure_ascii=False)
