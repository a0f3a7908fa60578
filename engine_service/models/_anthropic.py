"""Anthropic Messages API, streamed, with prompt caching.

Each request marks up to four cache breakpoints (``cache_control``): the tools, the system
prompt, the end of the previous request's history and the end of this one. The next turn's
request then starts with the same bytes up to its predecessor's last breakpoint, and the
provider reads that prefix from its cache instead of processing it again.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from engine_service.core._types import JsonObject, Message, ToolCall, ToolChoice, Usage
from engine_service.models import _http
from engine_service.models._base import (
    ModelRequest,
    TextChunk,
    TurnResult,
)

_API_VERSION = "2023-06-01"
_TOOL_CHOICE = {ToolChoice.AUTO: "auto", ToolChoice.REQUIRED: "any", ToolChoice.NONE: "none"}
# The Messages API has no JSON-schema response mode, so the schema becomes an instruction.
_SCHEMA_INSTRUCTION = (
    "Answer with only a JSON value that matches the following JSON Schema: "
    "no prose, no Markdown code fence.\n"
)
_BREAKPOINT: JsonObject = {"type": "ephemeral"}
_BREAKPOINT_JSON = ',"cache_control":{"type":"ephemeral"}'


@dataclass(slots=True)
class _PendingCall:
    call_id: str
    name: str
    initial: JsonObject = field(default_factory=dict)
    json: str = ""


class AnthropicModel(_http.HttpModel):
    """Streams one turn from ``POST {base_url}/v1/messages``."""

    provider_name = "anthropic"
    default_base_url = "https://api.anthropic.com"
    url_path = "/v1/messages"

    def _headers(self) -> dict[str, str]:
        return {"x-api-key": self._api_key, "anthropic-version": _API_VERSION, "accept": "text/event-stream"}

    def _body(self, request: ModelRequest) -> JsonObject:
        """The request as a document; what is sent is ``_content``, its JSON."""
        messages = _messages(request.messages)
        # The history's breakpoints: the end of this request and of the previous one (the user
        # message before the last assistant turn), so the next request finds both cached.
        for index in _history_breakpoints([m["role"] for m in messages]):
            messages[index]["content"][-1]["cache_control"] = _BREAKPOINT
        return {"messages": messages, **self._settings(request)}

    def _content(self, request: ModelRequest) -> bytes:
        """The JSON of ``_body``, each history message serialised once per run (not every turn).

        Finished messages are kept as JSON; the last one stays open as its blocks, since
        the next history entry may belong to it (same-role neighbours are merged).
        """
        entry = self._history.get(request.messages)
        added = 0
        for message in request.messages[entry.count :]:
            role, blocks = _blocks(message)
            if not blocks:
                continue
            if entry.open_parts and role != entry.open_role:
                entry.parts.append(_group(entry.open_role, entry.open_parts))
                entry.roles.append(entry.open_role)
                entry.open_parts = []
            entry.open_role = role
            new = [_http.encode_json(b) for b in blocks]
            entry.open_parts.extend(new)
            added += sum(map(len, new)) + 32
        self._history.grew(entry, request.messages, added)
        messages = (
            [*entry.parts, _group(entry.open_role, entry.open_parts)] if entry.open_parts else [*entry.parts]
        )
        roles = [*entry.roles, entry.open_role] if entry.open_parts else entry.roles
        for index in _history_breakpoints(roles):
            # Every group ends with its last block's "}" then "]}": the marker goes before those.
            messages[index] = messages[index][:-3] + _BREAKPOINT_JSON + messages[index][-3:]
        settings = _http.encode_json(self._settings(request))
        return f'{{"messages":[{",".join(messages)}],{settings[1:]}'.encode()

    def _settings(self, request: ModelRequest) -> JsonObject:
        """Everything in the body but the messages."""
        system = request.system
        if request.output_schema is not None:
            instruction = _SCHEMA_INSTRUCTION + json.dumps(request.output_schema, ensure_ascii=False)
            system = f"{system}\n\n{instruction}" if system else instruction
        body: JsonObject = {"model": self._model, "max_tokens": request.max_output_tokens, "stream": True}
        if system:
            body["system"] = [{"type": "text", "text": system, "cache_control": _BREAKPOINT}]
        if request.tools:
            tools: list[JsonObject] = [
                {"name": t.name, "description": t.description, "input_schema": t.input_schema}
                for t in request.tools
            ]
            tools[-1] = {**tools[-1], "cache_control": _BREAKPOINT}
            body["tools"] = tools
            body["tool_choice"] = {"type": _TOOL_CHOICE[request.tool_choice]}
        return body

    async def _once(self, request: ModelRequest) -> AsyncIterator[TextChunk | TurnResult]:
        text: list[str] = []
        calls: dict[int, _PendingCall] = {}
        usage = Usage()
        stop = ""
        done = False
        events = self._post(request)
        async with aclosing(events):
            async for event in events:
                doc = _http.decode_event(event, self.provider, self._api_key)
                kind = doc.get("type") or event.event
                if kind == "message_start":
                    counts = (doc.get("message") or {}).get("usage") or {}
                    usage = _usage(counts, Usage())
                elif kind == "content_block_start":
                    block = doc.get("content_block") or {}
                    if block.get("type") == "tool_use":
                        calls[int(doc.get("index", 0))] = _PendingCall(
                            block.get("id", ""), block.get("name", ""), block.get("input") or {}
                        )
                    elif block.get("type") == "text" and block.get("text"):
                        text.append(block["text"])
                        yield TextChunk(block["text"])
                elif kind == "content_block_delta":
                    delta = doc.get("delta") or {}
                    if delta.get("type") == "text_delta" and delta.get("text"):
                        text.append(delta["text"])
                        yield TextChunk(delta["text"])
                    elif delta.get("type") == "input_json_delta" and int(doc.get("index", 0)) in calls:
                        calls[int(doc.get("index", 0))].json += delta.get("partial_json") or ""
                elif kind == "message_delta":
                    stop = (doc.get("delta") or {}).get("stop_reason") or stop
                    # The counts are cumulative; newer API versions repeat the input counts here.
                    usage = _usage(doc.get("usage") or {}, usage)
                elif kind == "message_stop":
                    done = True
                    break
                elif kind == "error":
                    raise _http.event_error(self.provider, doc.get("error"), self._api_key)
                # ping, content_block_stop, thinking deltas and future event types need nothing.
        if not done:
            raise _http.truncated(self.provider)
        tool_calls = [
            ToolCall(call.call_id, call.name, _http.parse_arguments(call.json) if call.json else call.initial)
            for _, call in sorted(calls.items())
        ]
        yield TurnResult("".join(text), tool_calls, usage, stop)


def _usage(counts: JsonObject, previous: Usage) -> Usage:
    """``previous`` updated with the counts an event reports (it may leave some out)."""

    def count(key: str, default: int) -> int:
        value = counts.get(key)
        return default if value is None else int(value or 0)

    read = count("cache_read_input_tokens", previous.cache_read_tokens)
    write = count("cache_creation_input_tokens", previous.cache_write_tokens)
    uncached = previous.input_tokens - previous.cache_read_tokens - previous.cache_write_tokens
    # Cache reads and writes fill the context like any other input: input_tokens counts them.
    return Usage(
        input_tokens=count("input_tokens", uncached) + read + write,
        output_tokens=count("output_tokens", previous.output_tokens),
        cache_read_tokens=read,
        cache_write_tokens=write,
    )


def _history_breakpoints(roles: Sequence[str]) -> list[int]:
    """The messages whose last block gets a breakpoint: the last one, and the last user message
    before the last assistant message (where the previous request ended)."""
    if not roles:
        return []
    marks = [len(roles) - 1]
    last_assistant = next((i for i in range(len(roles) - 1, -1, -1) if roles[i] == "assistant"), None)
    if last_assistant and roles[last_assistant - 1] == "user" and last_assistant - 1 != marks[0]:
        marks.insert(0, last_assistant - 1)
    return marks


def _messages(history: Sequence[Message]) -> list[JsonObject]:
    # The API wants user/assistant alternation and every tool_result of a turn in the
    # user message right after it, so same-role neighbours are merged into one message.
    merged: list[JsonObject] = []
    for message in history:
        role, blocks = _blocks(message)
        if not blocks:
            continue  # the API rejects empty text blocks and empty messages
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"].extend(blocks)
        else:
            merged.append({"role": role, "content": blocks})
    return merged


def _group(role: str, blocks: list[str]) -> str:
    """One API message from the JSON of its content blocks."""
    return f'{{"role":{_http.encode_json(role)},"content":[{",".join(blocks)}]}}'


def _blocks(message: Message) -> tuple[str, list[JsonObject]]:
    if message.role == "user":
        return "user", [{"type": "text", "text": message.text}] if message.text else []
    if message.role == "assistant":
        blocks: list[JsonObject] = [{"type": "text", "text": message.text}] if message.text else []
        blocks.extend(
            {"type": "tool_use", "id": c.call_id, "name": c.name, "input": c.arguments}
            for c in message.tool_calls
        )
        return "assistant", blocks
    if message.role == "tool":
        # The API rejects an empty error result; a placeholder keeps empty results uniform.
        content = message.text or "(no output)"
        result = {"type": "tool_result", "tool_use_id": message.call_id, "content": content}
        return "user", [{**result, "is_error": message.is_error}]
    raise _http.bad_role(message.role, "anthropic")
