"""Client-side views of runs and events, converted from the generated protos.

They are plain frozen dataclasses so that notebooks, tests and user code never
have to touch protobuf messages; enum values become short upper-case strings
(``"PAUSED"``, ``"APPROVAL"``) and ``Struct``/``Value`` become JSON values.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from client_py import _render
from client_py._json import struct_to_dict, to_datetime, value_to_python
from machina.engine.v1 import event_pb2, run_pb2


class RunState(enum.StrEnum):
    """A run's state. A ``str``: ``run.state == "DONE"`` and ``run.state is RunState.DONE`` both
    hold, and it prints, pickles and JSON-dumps as ``"DONE"``."""

    UNSPECIFIED = "UNSPECIFIED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class PauseReason(enum.StrEnum):
    """Why a run is paused; a ``str`` like ``RunState``."""

    UNSPECIFIED = "UNSPECIFIED"
    AWAITING_APPROVAL = "AWAITING_APPROVAL"
    AWAITING_TOOL_RESULT = "AWAITING_TOOL_RESULT"
    AWAITING_INPUT = "AWAITING_INPUT"
    HANDOFF_TO_RUNNER = "HANDOFF_TO_RUNNER"


TERMINAL_STATES = frozenset({RunState.DONE, RunState.FAILED, RunState.CANCELLED})


def _run_state(value: int) -> RunState | str:
    name = enum_name(run_pb2.RunState, value, "RUN_STATE_")
    # A state newer than this client stays a plain string.
    return RunState(name) if name in RunState.__members__ else name


def enum_name(wrapper: Any, value: int, prefix: str) -> str:
    """``RUN_STATE_PAUSED`` -> ``PAUSED``; a value newer than this client stays readable."""
    try:
        name: str = wrapper.Name(value)
    except ValueError:
        return f"UNKNOWN_{value}"
    return name.removeprefix(prefix)


@dataclass(frozen=True)
class Usage:
    """Token usage. The cache counts are the parts of ``input_tokens`` the provider read from
    or wrote to its prompt cache."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class RunMeta:
    """Counters and facts about a run."""

    turns: int = 0
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    duration_ms: int = 0
    capabilities_missing: list[str] = field(default_factory=list)
    model: str = ""


@dataclass(frozen=True)
class RunError:
    """Why a run failed (``code`` such as ``ERR_MAX_TURNS``); a value, not an exception."""

    code: str
    message: str
    metadata: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code


@dataclass(frozen=True)
class ToolCall:
    """A tool call the model made."""

    call_id: str
    tool_name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, repr=False)
class Interrupt:
    """A pending question that must be answered before the run continues.

    ``kind`` is ``"APPROVAL"`` (approve/reject/respond), ``"TOOL_RESULT"`` or
    ``"INPUT"`` (respond/answer).
    """

    interrupt_id: str
    kind: str
    call_id: str
    tool_name: str
    arguments: dict[str, Any]
    description: str
    question: str
    create_time: datetime
    expire_time: datetime | None
    input_schema: dict[str, Any] | None
    # The subagent whose call this is ("" = the run's own agent); decide it on the run as usual.
    agent_path: str = ""

    def __repr__(self) -> str:
        return _render.interrupt_repr(self)

    def __str__(self) -> str:
        return _render.interrupt_line(self)


@dataclass(frozen=True, repr=False)
class Run:
    """A snapshot of a run. ``data`` is the result of a DONE run (text or JSON)."""

    run_id: str
    workspace_id: str
    state: RunState | str
    pause_reason: PauseReason | str | None
    interrupts: list[Interrupt]
    data: Any
    error: RunError | None
    meta: RunMeta
    create_time: datetime
    update_time: datetime
    task: str
    last_seq: int
    # While QUEUED behind its workspace's concurrency limit: its place in the queue (1 = next).
    queue_position: int = 0
    # The thread the run belongs to (a run started without one: its own id).
    thread_id: str = ""

    @property
    def done(self) -> bool:
        """True once the run is DONE, FAILED or CANCELLED; it will not change again."""
        return self.state in TERMINAL_STATES

    @property
    def paused(self) -> bool:
        return self.state == "PAUSED"

    def __repr__(self) -> str:
        return _render.run_repr(self)

    def __str__(self) -> str:
        return _render.run_text(self)

    def _repr_html_(self) -> str:
        return _render.run_html(self)


# --- events -----------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class RunEvent:
    """One change in a run; ``seq`` is gap-free and increasing per run.

    ``kind`` is the name of the ``RunEvent.kind`` oneof field of the proto, so
    ``event.kind == "text_delta"`` and ``isinstance(event, TextDelta)`` agree.
    """

    kind: ClassVar[str] = ""

    run_id: str
    seq: int
    time: datetime
    # The subagent the event is about: "" for the run's own agent, else the call ids from the run
    # down to it joined by "/" (e.g. "call_1_1/call_2_1").
    agent_path: str = dataclasses.field(default="", kw_only=True)

    def __repr__(self) -> str:
        shown = (f for f in dataclasses.fields(self) if f.name != "time")
        args = ", ".join(f"{f.name}={_render.field_repr(getattr(self, f.name))}" for f in shown)
        return f"{type(self).__name__}({args})"

    def __str__(self) -> str:
        summary = self._summary()
        where = f" [{self.agent_path}]" if self.agent_path else ""
        return f"#{self.seq}{where} {self.kind}" + (f": {summary}" if summary else "")

    def _summary(self) -> str:
        return ""


@dataclass(frozen=True, repr=False)
class UnknownEvent(RunEvent):
    """An event kind this client version does not know; kept so ``seq`` stays gap-free."""

    kind: ClassVar[str] = "unknown"


@dataclass(frozen=True, repr=False)
class RunStarted(RunEvent):
    kind: ClassVar[str] = "run_started"

    task: str
    model: str

    def _summary(self) -> str:
        return f"{self.model} {_render.short(self.task)}"


@dataclass(frozen=True, repr=False)
class TextDelta(RunEvent):
    kind: ClassVar[str] = "text_delta"

    text: str
    turn: int

    def _summary(self) -> str:
        return _render.short(self.text)


@dataclass(frozen=True, repr=False)
class AssistantMessage(RunEvent):
    kind: ClassVar[str] = "assistant_message"

    text: str
    tool_calls: list[ToolCall]
    turn: int

    def _summary(self) -> str:
        calls = ", ".join(call.tool_name for call in self.tool_calls)
        return f"turn {self.turn} {_render.short(self.text)}" + (f" calls [{calls}]" if calls else "")


@dataclass(frozen=True, repr=False)
class ToolCallStarted(RunEvent):
    kind: ClassVar[str] = "tool_call_started"

    call: ToolCall

    def _summary(self) -> str:
        arguments = _render.short(_render.as_json(self.call.arguments))
        return f"{self.call.tool_name} ({self.call.call_id}) {arguments}"


@dataclass(frozen=True, repr=False)
class ToolCallCompleted(RunEvent):
    kind: ClassVar[str] = "tool_call_completed"

    call_id: str
    tool_name: str
    is_error: bool
    size_bytes: int
    output: str
    duration_ms: int
    # "ran", or why the call did not run: unknown_tool, invalid_arguments, denied,
    # capability_missing, rejected, responded, expired, interrupted.
    outcome: str = "ran"

    def _summary(self) -> str:
        status = ("error" if self.is_error else "ok") if self.outcome == "ran" else self.outcome
        output = _render.short(self.output)
        return f"{self.tool_name} ({self.call_id}) {status} in {self.duration_ms} ms {output}"


@dataclass(frozen=True, repr=False)
class _InterruptRaised(RunEvent):
    """An interrupt was raised; ``kind`` says which (approval, input or a client tool's result)."""

    interrupt: Interrupt

    def _summary(self) -> str:
        return str(self.interrupt)


@dataclass(frozen=True, repr=False)
class ApprovalRequested(_InterruptRaised):
    kind: ClassVar[str] = "approval_requested"


@dataclass(frozen=True, repr=False)
class ApprovalDecided(RunEvent):
    kind: ClassVar[str] = "approval_decided"

    interrupt_id: str
    decision: str
    decided_by: str
    decide_time: datetime
    arguments_sha256: str
    expired: bool
    reason: str

    def _summary(self) -> str:
        how = " (expired)" if self.expired else ""
        why = f": {_render.short(self.reason)}" if self.reason else ""
        return f"{self.interrupt_id} {self.decision}{how} by {self.decided_by or '?'}{why}"


@dataclass(frozen=True, repr=False)
class InputRequested(_InterruptRaised):
    kind: ClassVar[str] = "input_requested"


@dataclass(frozen=True, repr=False)
class ToolResultRequested(_InterruptRaised):
    kind: ClassVar[str] = "tool_result_requested"


@dataclass(frozen=True, repr=False)
class Paused(RunEvent):
    kind: ClassVar[str] = "paused"

    reason: PauseReason | str
    interrupts: list[Interrupt]

    def _summary(self) -> str:
        return f"{self.reason} ({len(self.interrupts)} pending)"


@dataclass(frozen=True, repr=False)
class Resumed(RunEvent):
    kind: ClassVar[str] = "resumed"

    resumed_by: str
    # After a crash: events from this seq up to this one were undone (0: nothing was).
    rolled_back_from_seq: int = 0

    def _summary(self) -> str:
        undone = f", undoing from seq {self.rolled_back_from_seq}" if self.rolled_back_from_seq else ""
        return f"by {self.resumed_by or '?'}{undone}"


@dataclass(frozen=True, repr=False)
class UsageReported(RunEvent):
    kind: ClassVar[str] = "usage"

    turn: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    def _summary(self) -> str:
        cached = (
            f" ({self.cache_read_tokens} cache read, {self.cache_write_tokens} cache write)"
            if self.cache_read_tokens or self.cache_write_tokens
            else ""
        )
        return (
            f"turn {self.turn}: {self.input_tokens} in{cached} / {self.output_tokens} out tokens, "
            f"${self.cost_usd:.4f}"
        )


@dataclass(frozen=True, repr=False)
class ContextCompacted(RunEvent):
    """Older turns were summarised to keep the model's request inside its context window."""

    kind: ClassVar[str] = "context_compacted"

    turn: int
    turns_summarized: int
    tokens_before: int
    tokens_after: int
    usage: Usage
    cost_usd: float

    def _summary(self) -> str:
        return (
            f"before turn {self.turn}: {self.turns_summarized} turns summarised, "
            f"~{self.tokens_before} → ~{self.tokens_after} tokens"
        )


@dataclass(frozen=True, repr=False)
class ApiCallMetered(RunEvent):
    kind: ClassVar[str] = "api_call"

    service: str
    method: str
    path: str
    status: int
    latency_ms: int
    bytes_in: int

    def _summary(self) -> str:
        return f"{self.service} {self.method} {self.path} -> {self.status} in {self.latency_ms} ms"


@dataclass(frozen=True, repr=False)
class HandoffToRunner(RunEvent):
    kind: ClassVar[str] = "handoff_to_runner"

    tools: list[str]

    def _summary(self) -> str:
        return ", ".join(self.tools)


@dataclass(frozen=True, repr=False)
class RunFinished(RunEvent):
    kind: ClassVar[str] = "run_finished"

    state: RunState | str
    data: Any
    error: RunError | None
    meta: RunMeta

    def _summary(self) -> str:
        if self.error is not None:
            return f"{self.state} {self.error}"
        return f"{self.state} {_render.short(_render.as_json(self.data))}"


@dataclass(frozen=True, repr=False)
class AgentStarted(RunEvent):
    """A subagent started (an ``Agent`` call); ``agent_path`` names it."""

    kind: ClassVar[str] = "agent_started"

    task: str
    tools: list[str]
    max_turns: int
    max_tokens: int
    max_cost_usd: float

    def _summary(self) -> str:
        return _render.short(self.task)


@dataclass(frozen=True, repr=False)
class AgentFinished(RunEvent):
    """A subagent ended; ``output`` is its answer (the result of its parent's ``Agent`` call)."""

    kind: ClassVar[str] = "agent_finished"

    state: RunState | str
    output: str
    error: RunError | None
    meta: RunMeta

    def _summary(self) -> str:
        if self.error is not None:
            return f"{self.state} {self.error}"
        return f"{self.state} {_render.short(self.output)}"


# --- conversion -------------------------------------------------------------------


def usage_from_proto(usage: run_pb2.Usage) -> Usage:
    return Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
    )


def meta_from_proto(meta: run_pb2.RunMeta) -> RunMeta:
    return RunMeta(
        turns=meta.turns,
        usage=usage_from_proto(meta.usage),
        cost_usd=meta.cost_usd,
        duration_ms=meta.duration_ms,
        capabilities_missing=list(meta.capabilities_missing),
        model=meta.model,
    )


def run_error_from_proto(error: run_pb2.RunError) -> RunError:
    return RunError(code=error.code, message=error.message, metadata=dict(error.metadata))


def tool_call_from_proto(call: event_pb2.ToolCall) -> ToolCall:
    return ToolCall(call_id=call.call_id, tool_name=call.tool_name, arguments=struct_to_dict(call.arguments))


def interrupt_from_proto(interrupt: run_pb2.Interrupt) -> Interrupt:
    return Interrupt(
        interrupt_id=interrupt.interrupt_id,
        kind=enum_name(run_pb2.InterruptKind, interrupt.kind, "INTERRUPT_KIND_"),
        call_id=interrupt.call_id,
        tool_name=interrupt.tool_name,
        arguments=struct_to_dict(interrupt.arguments),
        description=interrupt.description,
        question=interrupt.question,
        create_time=to_datetime(interrupt.create_time),
        expire_time=to_datetime(interrupt.expire_time) if interrupt.HasField("expire_time") else None,
        input_schema=struct_to_dict(interrupt.input_schema) if interrupt.HasField("input_schema") else None,
        agent_path=interrupt.agent_path,
    )


def _pause_reason(pause: run_pb2.Pause) -> PauseReason | str:
    name = enum_name(run_pb2.PauseReason, pause.reason, "PAUSE_REASON_")
    return PauseReason(name) if name in PauseReason.__members__ else name


def run_from_proto(run: run_pb2.Run) -> Run:
    paused = run.HasField("pause") and run.pause.reason != run_pb2.PAUSE_REASON_UNSPECIFIED
    return Run(
        run_id=run.run_id,
        workspace_id=run.workspace_id,
        state=_run_state(run.state),
        pause_reason=_pause_reason(run.pause) if paused else None,
        interrupts=[interrupt_from_proto(i) for i in run.pause.interrupts],
        data=value_to_python(run.data) if run.HasField("data") else None,
        error=run_error_from_proto(run.error) if run.HasField("error") else None,
        meta=meta_from_proto(run.meta),
        create_time=to_datetime(run.create_time),
        update_time=to_datetime(run.update_time),
        task=run.task,
        last_seq=run.last_seq,
        queue_position=run.queue_position,
        thread_id=run.thread_id or run.run_id,
    )


@dataclass(frozen=True, repr=False)
class Thread:
    """A snapshot of a thread: the conversation a sequence of runs shares.

    ``run_ids`` are oldest first; ``active_run_id`` is the run not ended yet ("" if none);
    ``forked_from`` is ``{"run_id", "turn", "seq"}`` for a fork, else None.
    """

    thread_id: str
    workspace_id: str
    labels: dict[str, str]
    run_ids: list[str]
    active_run_id: str
    forked_from: dict[str, Any] | None
    create_time: datetime
    update_time: datetime

    def __repr__(self) -> str:
        active = f", active={self.active_run_id!r}" if self.active_run_id else ""
        forked = f", forked_from={self.forked_from['run_id']!r}" if self.forked_from else ""
        return f"<Thread {self.thread_id} runs={len(self.run_ids)}{active}{forked}>"

    def _repr_html_(self) -> str:
        return _render.thread_html(self)


@dataclass(frozen=True)
class RetentionReport:
    """What applying the retention policy deleted (or, in a dry run, would delete)."""

    run_ids: list[str]
    thread_ids: list[str]
    retention_days: float
    dry_run: bool


def thread_from_proto(thread: run_pb2.Thread) -> Thread:
    forked = None
    if thread.HasField("forked_from"):
        forked = {
            "run_id": thread.forked_from.run_id,
            "turn": thread.forked_from.turn,
            "seq": thread.forked_from.seq,
        }
    return Thread(
        thread_id=thread.thread_id,
        workspace_id=thread.workspace_id,
        labels=dict(thread.labels),
        run_ids=list(thread.run_ids),
        active_run_id=thread.active_run_id,
        forked_from=forked,
        create_time=to_datetime(thread.create_time),
        update_time=to_datetime(thread.update_time),
    )


_Base = tuple[str, int, datetime]
_Converter = Callable[[Any, _Base], RunEvent]


def _finished(p: event_pb2.RunFinished, b: _Base) -> RunFinished:
    return RunFinished(
        *b,
        state=_run_state(p.state),
        data=value_to_python(p.data) if p.HasField("data") else None,
        error=run_error_from_proto(p.error) if p.HasField("error") else None,
        meta=meta_from_proto(p.meta),
    )


# Keyed by the name of the proto's oneof field; each value builds the event from
# that field's message and the common (run_id, seq, time).
_CONVERTERS: dict[str, _Converter] = {
    "run_started": lambda p, b: RunStarted(*b, task=p.task, model=p.model),
    "text_delta": lambda p, b: TextDelta(*b, text=p.text, turn=p.turn),
    "assistant_message": lambda p, b: AssistantMessage(
        *b, text=p.text, tool_calls=[tool_call_from_proto(c) for c in p.tool_calls], turn=p.turn
    ),
    "tool_call_started": lambda p, b: ToolCallStarted(*b, call=tool_call_from_proto(p.call)),
    "tool_call_completed": lambda p, b: ToolCallCompleted(
        *b,
        call_id=p.call_id,
        tool_name=p.tool_name,
        is_error=p.is_error,
        size_bytes=p.size_bytes,
        output=p.output,
        duration_ms=p.duration_ms,
        outcome=p.outcome or "ran",
    ),
    "approval_requested": lambda p, b: ApprovalRequested(*b, interrupt=interrupt_from_proto(p.interrupt)),
    "approval_decided": lambda p, b: ApprovalDecided(
        *b,
        interrupt_id=p.interrupt_id,
        decision=p.decision,
        decided_by=p.decided_by,
        decide_time=to_datetime(p.decide_time),
        arguments_sha256=p.arguments_sha256,
        expired=p.expired,
        reason=p.reason,
    ),
    "input_requested": lambda p, b: InputRequested(*b, interrupt=interrupt_from_proto(p.interrupt)),
    "tool_result_requested": lambda p, b: ToolResultRequested(
        *b, interrupt=interrupt_from_proto(p.interrupt)
    ),
    "paused": lambda p, b: Paused(
        *b, reason=_pause_reason(p.pause), interrupts=[interrupt_from_proto(i) for i in p.pause.interrupts]
    ),
    "resumed": lambda p, b: Resumed(*b, resumed_by=p.resumed_by, rolled_back_from_seq=p.rolled_back_from_seq),
    "usage": lambda p, b: UsageReported(
        *b,
        turn=p.turn,
        input_tokens=p.usage.input_tokens,
        output_tokens=p.usage.output_tokens,
        cost_usd=p.cost_usd,
        cache_read_tokens=p.usage.cache_read_tokens,
        cache_write_tokens=p.usage.cache_write_tokens,
    ),
    "context_compacted": lambda p, b: ContextCompacted(
        *b,
        turn=p.turn,
        turns_summarized=p.turns_summarized,
        tokens_before=p.tokens_before,
        tokens_after=p.tokens_after,
        usage=usage_from_proto(p.usage),
        cost_usd=p.cost_usd,
    ),
    "api_call": lambda p, b: ApiCallMetered(
        *b,
        service=p.service,
        method=p.method,
        path=p.path,
        status=p.status,
        latency_ms=p.latency_ms,
        bytes_in=p.bytes_in,
    ),
    "handoff_to_runner": lambda p, b: HandoffToRunner(*b, tools=list(p.tools)),
    "run_finished": _finished,
    "agent_started": lambda p, b: AgentStarted(
        *b,
        task=p.task,
        tools=list(p.tools),
        max_turns=p.max_turns,
        max_tokens=p.max_tokens,
        max_cost_usd=p.max_cost_usd,
    ),
    "agent_finished": lambda p, b: AgentFinished(
        *b,
        state=_run_state(p.state),
        output=p.output,
        error=run_error_from_proto(p.error) if p.HasField("error") else None,
        meta=meta_from_proto(p.meta),
    ),
}

EVENT_TYPES: dict[str, type[RunEvent]] = {
    cls.kind: cls
    for cls in (
        RunStarted,
        TextDelta,
        AssistantMessage,
        ToolCallStarted,
        ToolCallCompleted,
        ApprovalRequested,
        ApprovalDecided,
        InputRequested,
        ToolResultRequested,
        Paused,
        Resumed,
        UsageReported,
        ApiCallMetered,
        HandoffToRunner,
        RunFinished,
        AgentStarted,
        AgentFinished,
        ContextCompacted,
    )
}


def event_from_proto(event: event_pb2.RunEvent) -> RunEvent:
    """Converts a proto event; a kind newer than this client becomes ``UnknownEvent``."""
    base: _Base = (event.run_id, event.seq, to_datetime(event.time))
    which = event.WhichOneof("kind")
    if which is None or which not in _CONVERTERS:
        return UnknownEvent(*base, agent_path=event.agent_path)
    converted = _CONVERTERS[which](getattr(event, which), base)
    return dataclasses.replace(converted, agent_path=event.agent_path) if event.agent_path else converted
