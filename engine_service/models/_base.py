"""The model protocol every adapter implements, plus shared retry logic."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine_service.core._types import JsonObject, Message, ToolCall, ToolChoice, Usage


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """What the model is told about a tool."""

    name: str
    description: str
    input_schema: JsonObject


@dataclass(slots=True)
class ModelRequest:
    """One model turn's input. ``messages`` is the full history (not a copy)."""

    system: str
    messages: Sequence[Message]
    tools: Sequence[ToolSpec]
    tool_choice: ToolChoice = ToolChoice.AUTO
    max_output_tokens: int = 4096
    output_schema: JsonObject | None = None
    # Completed assistant turns so far (0 on the first turn).
    turn: int = 0
    # "turn": the next step of the agent; "compaction": summarise ``messages`` (the last one
    # asks for the summary), no tool calls wanted.
    purpose: str = "turn"


@dataclass(frozen=True, slots=True)
class TextChunk:
    """A fragment of model text, yielded as soon as the provider sends it."""

    text: str


@dataclass(slots=True)
class TurnResult:
    """The last item of every stream: the complete turn."""

    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    stop_reason: str = ""


class ModelError(Exception):
    """A model call failed. ``code`` is stable (ERR_MODEL_*); never holds a key."""

    def __init__(self, code: str, message: str, *, retryable: bool = False, status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.status = status
        # Seconds the provider asked us to wait (Retry-After), if any.
        self.retry_after: float | None = None


class ModelAdapter(Protocol):
    """Streams one model turn: zero or more TextChunk, then exactly one TurnResult."""

    @property
    def provider(self) -> str: ...

    @property
    def name(self) -> str: ...

    def stream(self, request: ModelRequest) -> AsyncIterator[TextChunk | TurnResult]: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter for 429 / 5xx / timeouts."""

    max_attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 8.0
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def delay(self, attempt: int, error: ModelError) -> float:
        if error.retry_after is not None:
            return min(error.retry_after, self.max_delay)
        cap = min(self.max_delay, self.base_delay * (2**attempt))
        return random.uniform(cap / 2, cap)


async def stream_with_retries(
    open_stream: Callable[[], AsyncIterator[TextChunk | TurnResult]],
    policy: RetryPolicy,
) -> AsyncIterator[TextChunk | TurnResult]:
    """Retry a stream while nothing has been yielded yet.

    Once a chunk reached the caller a retry would duplicate text, so a failure
    after that point is raised as is.
    """
    attempt = 0
    while True:
        started = False
        try:
            async for item in open_stream():
                started = True
                yield item
            return
        except ModelError as error:
            attempt += 1
            if started or not error.retryable or attempt >= policy.max_attempts:
                raise
            await policy.sleep(policy.delay(attempt, error))
