"""Domain types of the engine core: plain dataclasses, JSON round-trippable.

Nothing here knows about gRPC or protobuf; the servicer translates.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

JsonObject = dict[str, Any]


class RunState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (RunState.DONE, RunState.FAILED, RunState.CANCELLED)


class PauseReason(enum.StrEnum):
    AWAITING_APPROVAL = "AWAITING_APPROVAL"
    AWAITING_TOOL_RESULT = "AWAITING_TOOL_RESULT"
    AWAITING_INPUT = "AWAITING_INPUT"
    HANDOFF_TO_RUNNER = "HANDOFF_TO_RUNNER"


class InterruptKind(enum.StrEnum):
    APPROVAL = "APPROVAL"
    TOOL_RESULT = "TOOL_RESULT"
    INPUT = "INPUT"


class Permission(enum.StrEnum):
    ALLOW = "allow"
    ASK = "ask"
    DENY = "deny"

    def narrow(self, other: Permission | None) -> Permission:
        """The stricter of the two (allow < ask < deny): runs can only narrow."""
        if other is None:
            return self
        order = [Permission.ALLOW, Permission.ASK, Permission.DENY]
        return max(self, other, key=order.index)


class ToolChoice(enum.StrEnum):
    AUTO = "auto"
    REQUIRED = "required"
    NONE = "none"


class EventKind(enum.StrEnum):
    RUN_STARTED = "run_started"
    TEXT_DELTA = "text_delta"
    ASSISTANT_MESSAGE = "assistant_message"
    TOOL_CALL_STARTED = "tool_call_started"
    TOOL_CALL_COMPLETED = "tool_call_completed"
    APPROVAL_REQUESTED = "approval_requested"
    APPROVAL_DECIDED = "approval_decided"
    INPUT_REQUESTED = "input_requested"
    TOOL_RESULT_REQUESTED = "tool_result_requested"
    PAUSED = "paused"
    RESUMED = "resumed"
    USAGE = "usage"
    API_CALL = "api_call"
    HANDOFF_TO_RUNNER = "handoff_to_runner"
    RUN_FINISHED = "run_finished"
    AGENT_STARTED = "agent_started"
    AGENT_FINISHED = "agent_finished"
    CONTEXT_COMPACTED = "context_compacted"


_EVENT_KINDS = {kind.value: kind for kind in EventKind}


@dataclass(slots=True)
class Event:
    """One persisted change of a run, or ``n`` consecutive ones. ``time`` is unix seconds.

    Text deltas are the only events that cover several seqs: a run's deltas of one turn that
    are written together stay one event, ``data = {"texts": [...], "turn": t}``, seqs ``seq``
    to ``last_seq``, until the messages a watcher receives are built (one per delta).
    """

    seq: int
    time: float
    kind: EventKind
    data: JsonObject
    # The subagent the event is about ("" = the run's own agent): see core/_subagents.py.
    agent_path: str = ""
    n: int = 1

    @property
    def last_seq(self) -> int:
        return self.seq + self.n - 1

    def to_json(self) -> JsonObject:
        # EventKind is a str: it encodes as its value without the enum's .value lookup.
        if self.kind is EventKind.TEXT_DELTA:
            # "n" second: storage reads a record's span from its first bytes (see _protocol).
            doc = {"seq": self.seq, "n": self.n, "t": self.time, "k": self.kind, "d": self.data}
        else:
            doc = {"seq": self.seq, "t": self.time, "k": self.kind, "d": self.data}
        if self.agent_path:
            doc["a"] = self.agent_path
        return doc

    @classmethod
    def from_json(cls, doc: JsonObject) -> Event:
        kind = _EVENT_KINDS[doc["k"]]
        data = doc["d"]
        if kind is EventKind.TEXT_DELTA and "texts" not in data:  # one delta a record
            data = {"texts": [data["text"]], "turn": data["turn"]}
        return cls(doc["seq"], doc["t"], kind, data, doc.get("a", ""), doc.get("n", 1))

    def after(self, seq: int) -> Event:
        """The part of this event past ``seq`` (itself when it all is)."""
        skip = seq + 1 - self.seq
        if skip <= 0:
            return self
        if skip >= self.n:
            raise ValueError(f"event {self.seq}..{self.last_seq} has nothing after seq {seq}")
        data = {"texts": self.data["texts"][skip:], "turn": self.data["turn"]}
        return Event(seq + 1, self.time, self.kind, data, self.agent_path, self.n - skip)

    def expand(self) -> list[JsonObject]:
        """One record per seq, each text delta as ``{"text", "turn"}``."""
        if self.kind is not EventKind.TEXT_DELTA:
            return [self.to_json()]
        turn = self.data["turn"]
        docs: list[JsonObject] = [
            {"seq": self.seq + i, "t": self.time, "k": self.kind, "d": {"text": text, "turn": turn}}
            for i, text in enumerate(self.data["texts"])
        ]
        if self.agent_path:
            for doc in docs:
                doc["a"] = self.agent_path
        return docs


@dataclass(slots=True)
class ToolCall:
    call_id: str
    name: str
    arguments: JsonObject

    def to_json(self) -> JsonObject:
        return {"id": self.call_id, "name": self.name, "args": self.arguments}

    @classmethod
    def from_json(cls, doc: JsonObject) -> ToolCall:
        return cls(doc["id"], doc["name"], doc["args"])


@dataclass(slots=True)
class Message:
    """A transcript entry: a user task, an assistant turn, a tool result or a compaction.

    A compaction entry (role "compaction") holds a summary of the entries before it that
    the model no longer sees: from index 1 (the task stays) up to ``keep_from``.
    """

    role: str  # "user" | "assistant" | "tool" | "compaction"
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    call_id: str = ""
    tool_name: str = ""
    is_error: bool = False
    keep_from: int = 0  # compaction: the index of the first entry the model still sees

    def to_json(self) -> JsonObject:
        doc: JsonObject = {"role": self.role, "text": self.text}
        if self.tool_calls:
            doc["calls"] = [c.to_json() for c in self.tool_calls]
        if self.role == "tool":
            doc.update(call_id=self.call_id, tool=self.tool_name, is_error=self.is_error)
        elif self.role == "compaction":
            doc["keep_from"] = self.keep_from
        return doc

    @classmethod
    def from_json(cls, doc: JsonObject) -> Message:
        return cls(
            role=doc["role"],
            text=doc.get("text", ""),
            tool_calls=[ToolCall.from_json(c) for c in doc.get("calls", ())],
            call_id=doc.get("call_id", ""),
            tool_name=doc.get("tool", ""),
            is_error=doc.get("is_error", False),
            keep_from=doc.get("keep_from", 0),
        )


@dataclass(slots=True)
class Usage:
    """Token counts. The cache counts are the parts of ``input_tokens`` the provider read
    from or wrote to its prompt cache (billed at their own prices)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_read_tokens += other.cache_read_tokens
        self.cache_write_tokens += other.cache_write_tokens

    def cost(self, price: tuple[float, float, float, float]) -> float:
        """USD at ``price``: per million uncached input, output, cache-read and cache-write tokens."""
        cached = self.cache_read_tokens + self.cache_write_tokens
        uncached = max(0, self.input_tokens - cached)
        return (
            uncached * price[0]
            + self.output_tokens * price[1]
            + self.cache_read_tokens * price[2]
            + self.cache_write_tokens * price[3]
        ) / 1e6

    def to_json(self) -> JsonObject:
        doc: JsonObject = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
        if self.cache_read_tokens or self.cache_write_tokens:
            doc.update(cache_read_tokens=self.cache_read_tokens, cache_write_tokens=self.cache_write_tokens)
        return doc

    @classmethod
    def from_json(cls, doc: JsonObject) -> Usage:
        return cls(
            doc.get("input_tokens", 0),
            doc.get("output_tokens", 0),
            doc.get("cache_read_tokens", 0),
            doc.get("cache_write_tokens", 0),
        )


@dataclass(slots=True)
class Principal:
    """Who is calling: the workspace they act in and a printable identity.

    ``identity`` is a name from the API-key file (or a short fingerprint), never
    the key itself.
    """

    workspace_id: str
    identity: str
