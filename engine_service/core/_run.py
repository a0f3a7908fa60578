"""The run record: what a run is (its spec) and where it stands (its state).

``spec.json`` is written once at creation. ``state.json`` is the small status
document *and* the checkpoint cursor (counters, pending tool calls, how many
transcript entries and events are committed); it is rewritten atomically at
every checkpoint, so its size does not grow with the history.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from engine_service.core._types import (
    InterruptKind,
    JsonObject,
    PauseReason,
    Permission,
    RunState,
    ToolCall,
    ToolChoice,
    Usage,
)


@dataclass(slots=True)
class ScriptedTurn:
    text: str = ""
    tool_calls: list[tuple[str, JsonObject]] = field(default_factory=list)
    usage: Usage | None = None

    def to_json(self) -> JsonObject:
        doc: JsonObject = {"text": self.text}
        if self.tool_calls:
            doc["tool_calls"] = [{"name": n, "arguments": a} for n, a in self.tool_calls]
        if self.usage is not None:
            doc["usage"] = self.usage.to_json()
        return doc

    @classmethod
    def from_json(cls, doc: JsonObject) -> ScriptedTurn:
        usage = doc.get("usage")
        return cls(
            text=doc.get("text", ""),
            tool_calls=[(c["name"], c.get("arguments") or {}) for c in doc.get("tool_calls", ())],
            usage=Usage.from_json(usage) if usage else None,
        )


@dataclass(slots=True)
class RunSpec:
    """Everything a caller chose when starting a run (immutable afterwards)."""

    task: str
    run_id: str = ""
    request_id: str = ""
    model_provider: str = ""
    model_name: str = ""
    script: list[ScriptedTurn] | None = None
    max_output_tokens: int = 0
    # The model's context window for this run; 0 = the engine's setting for the model.
    context_window_tokens: int = 0
    max_turns: int = 0
    max_tokens: int = 0
    timeout_ms: int = 0
    max_cost_usd: float = 0.0
    tool_choice: ToolChoice = ToolChoice.AUTO
    tools: list[str] | None = None
    permissions: dict[str, Permission] = field(default_factory=dict)
    gated_tools: list[str] = field(default_factory=list)
    output_schema: JsonObject | None = None
    system_prompt: str = ""
    approval_timeout_ms: int = 0
    approval_expiry_approves: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    # Per-run ApiCall services (definitions with refs only; credentials are never stored).
    api_services: list[JsonObject] = field(default_factory=list)
    # MCP servers this run may use; None = all configured.
    mcp_servers: list[str] | None = None
    # Network for the run's sandboxed processes; None = the engine's setting, False = none.
    sandbox_network: bool | None = None
    # For the scripted model: the turns of each subagent, by its path.
    agent_scripts: dict[str, list[ScriptedTurn]] = field(default_factory=dict)
    # The thread the run continues ("" = a thread of its own, named by the run id), or where
    # a new thread forks from ({"run_id", "turn", "seq"}).
    thread_id: str = ""
    fork_from: JsonObject | None = None
    # The history the model sees before the task: segments [{"run_id", "upto"}] of other runs'
    # transcripts (set by the engine when the run starts on a thread; never copied).
    context: list[JsonObject] = field(default_factory=list)
    # The W3C trace context the run was created in ("" = none): every process that moves the run
    # (a runner, a process recovering it) continues that trace.
    traceparent: str = ""

    def to_json(self) -> JsonObject:
        doc: JsonObject = {
            "agent_scripts": {p: [t.to_json() for t in turns] for p, turns in self.agent_scripts.items()},
            "thread_id": self.thread_id,
            "fork_from": self.fork_from,
            "context": self.context,
            "api_services": self.api_services,
            "mcp_servers": self.mcp_servers,
            "sandbox_network": self.sandbox_network,
            "task": self.task,
            "run_id": self.run_id,
            "request_id": self.request_id,
            "model_provider": self.model_provider,
            "model_name": self.model_name,
            "script": None if self.script is None else [t.to_json() for t in self.script],
            "max_output_tokens": self.max_output_tokens,
            "context_window_tokens": self.context_window_tokens,
            "max_turns": self.max_turns,
            "max_tokens": self.max_tokens,
            "timeout_ms": self.timeout_ms,
            "max_cost_usd": self.max_cost_usd,
            "tool_choice": self.tool_choice.value,
            "tools": self.tools,
            "permissions": {k: v.value for k, v in self.permissions.items()},
            "gated_tools": self.gated_tools,
            "output_schema": self.output_schema,
            "system_prompt": self.system_prompt,
            "approval_timeout_ms": self.approval_timeout_ms,
            "approval_expiry_approves": self.approval_expiry_approves,
            "labels": self.labels,
        }
        if self.traceparent:
            doc["traceparent"] = self.traceparent
        return doc

    @classmethod
    def from_json(cls, doc: JsonObject) -> RunSpec:
        script = doc.get("script")
        return cls(
            task=doc["task"],
            run_id=doc.get("run_id", ""),
            request_id=doc.get("request_id", ""),
            model_provider=doc.get("model_provider", ""),
            model_name=doc.get("model_name", ""),
            script=None if script is None else [ScriptedTurn.from_json(t) for t in script],
            max_output_tokens=doc.get("max_output_tokens", 0),
            context_window_tokens=doc.get("context_window_tokens", 0),
            max_turns=doc.get("max_turns", 0),
            max_tokens=doc.get("max_tokens", 0),
            timeout_ms=doc.get("timeout_ms", 0),
            max_cost_usd=doc.get("max_cost_usd", 0.0),
            tool_choice=ToolChoice(doc.get("tool_choice", "auto")),
            tools=doc.get("tools"),
            permissions={k: Permission(v) for k, v in doc.get("permissions", {}).items()},
            gated_tools=doc.get("gated_tools", []),
            output_schema=doc.get("output_schema"),
            system_prompt=doc.get("system_prompt", ""),
            approval_timeout_ms=doc.get("approval_timeout_ms", 0),
            approval_expiry_approves=doc.get("approval_expiry_approves", False),
            labels=doc.get("labels", {}),
            api_services=doc.get("api_services", []),
            mcp_servers=doc.get("mcp_servers"),
            sandbox_network=doc.get("sandbox_network"),
            thread_id=doc.get("thread_id", ""),
            fork_from=doc.get("fork_from"),
            context=list(doc.get("context", ())),
            agent_scripts={
                p: [ScriptedTurn.from_json(t) for t in turns]
                for p, turns in (doc.get("agent_scripts") or {}).items()
            },
            traceparent=str(doc.get("traceparent") or ""),
        )


@dataclass(slots=True)
class Interrupt:
    interrupt_id: str
    kind: InterruptKind
    call_id: str
    tool_name: str
    arguments: JsonObject
    description: str
    created_at: float
    question: str = ""
    expires_at: float = 0.0
    input_schema: JsonObject | None = None
    # The subagent whose call this is ("" = the run's own agent).
    agent_path: str = ""

    def to_json(self) -> JsonObject:
        return {
            "agent_path": self.agent_path,
            "id": self.interrupt_id,
            "kind": self.kind.value,
            "call_id": self.call_id,
            "tool": self.tool_name,
            "args": self.arguments,
            "description": self.description,
            "created_at": self.created_at,
            "question": self.question,
            "expires_at": self.expires_at,
            "schema": self.input_schema,
        }

    @classmethod
    def from_json(cls, doc: JsonObject) -> Interrupt:
        return cls(
            interrupt_id=doc["id"],
            kind=InterruptKind(doc["kind"]),
            call_id=doc["call_id"],
            tool_name=doc["tool"],
            arguments=doc["args"],
            description=doc["description"],
            created_at=doc["created_at"],
            question=doc.get("question", ""),
            expires_at=doc.get("expires_at", 0.0),
            input_schema=doc.get("schema"),
            agent_path=doc.get("agent_path", ""),
        )


class CallStatus(enum.StrEnum):
    """Where a tool call of the current turn stands (stored as its string value)."""

    PENDING = "pending"  # waits for a decision on its interrupt
    READY = "ready"  # will run (allowed, or approved)
    RESOLVED = "resolved"  # has its result already (rejected, responded, denied, unknown)


PENDING, READY, RESOLVED = CallStatus.PENDING, CallStatus.READY, CallStatus.RESOLVED


class CallOutcome(enum.StrEnum):
    """How a tool call ended (``ToolCallCompleted.outcome``); ``NONE`` while it may still run."""

    NONE = ""
    RAN = "ran"
    REJECTED = "rejected"
    RESPONDED = "responded"
    EXPIRED = "expired"
    INTERRUPTED = "interrupted"
    DENIED = "denied"
    UNKNOWN_TOOL = "unknown_tool"
    INVALID_ARGUMENTS = "invalid_arguments"
    CAPABILITY_MISSING = "capability_missing"


class RunMode(enum.StrEnum):
    """Who waits for a run: a streaming caller (``sync``), or nobody (``async``: it may hand off)."""

    SYNC = "sync"
    ASYNC = "async"


class DecisionAction(enum.StrEnum):
    """A caller's answer to an interrupt, and what the run's history records for it."""

    APPROVE = "approve"
    APPROVE_WITH_EDITS = "approve_with_edits"  # recorded only: a caller approves with edited arguments
    REJECT = "reject"
    RESPOND = "respond"


@dataclass(slots=True)
class PendingCall:
    """A tool call of the current turn and what will happen to it."""

    call: ToolCall
    status: CallStatus
    interrupt: Interrupt | None = None
    result_text: str = ""
    result_is_error: bool = False
    # Why a RESOLVED call did not run (see ToolCallCompleted.outcome); NONE while it may still run.
    outcome: CallOutcome = CallOutcome.NONE

    def to_json(self) -> JsonObject:
        return {
            "call": self.call.to_json(),
            "status": self.status.value,
            "interrupt": None if self.interrupt is None else self.interrupt.to_json(),
            "result": self.result_text,
            "is_error": self.result_is_error,
            "outcome": self.outcome.value,
        }

    @classmethod
    def from_json(cls, doc: JsonObject) -> PendingCall:
        interrupt = doc.get("interrupt")
        return cls(
            call=ToolCall.from_json(doc["call"]),
            status=CallStatus(doc["status"]),
            interrupt=None if interrupt is None else Interrupt.from_json(interrupt),
            result_text=doc.get("result", ""),
            result_is_error=doc.get("is_error", False),
            outcome=CallOutcome(doc.get("outcome", "")),
        )


@dataclass(slots=True)
class RunMeta:
    turns: int = 0
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    duration_ms: int = 0
    capabilities_missing: list[str] = field(default_factory=list)
    model: str = ""

    def to_json(self) -> JsonObject:
        return {
            "turns": self.turns,
            "usage": self.usage.to_json(),
            "cost_usd": self.cost_usd,
            "duration_ms": self.duration_ms,
            "capabilities_missing": self.capabilities_missing,
            "model": self.model,
        }

    @classmethod
    def from_json(cls, doc: JsonObject) -> RunMeta:
        return cls(
            turns=doc.get("turns", 0),
            usage=Usage.from_json(doc.get("usage", {})),
            cost_usd=doc.get("cost_usd", 0.0),
            duration_ms=doc.get("duration_ms", 0),
            capabilities_missing=list(doc.get("capabilities_missing", [])),
            model=doc.get("model", ""),
        )


@dataclass(slots=True)
class RunError:
    code: str
    message: str
    metadata: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> JsonObject:
        return {"code": self.code, "message": self.message, "metadata": self.metadata}

    @classmethod
    def from_json(cls, doc: JsonObject) -> RunError:
        return cls(doc["code"], doc["message"], dict(doc.get("metadata", {})))


class AgentState(enum.StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(slots=True)
class ChildState:
    """Where one subagent stands; checkpointed with its run (``RunRecord.children``).

    Its transcript is a blob of the run (`core/_subagents.py`); ``transcript_len`` entries
    of it are committed.
    """

    path: str
    task: str
    tools: list[str]
    max_turns: int
    max_tokens: int = 0
    max_cost_usd: float = 0.0
    state: AgentState = AgentState.RUNNING
    turns: int = 0
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    pending: list[PendingCall] = field(default_factory=list)
    transcript_len: int = 0
    output: str = ""
    error: RunError | None = None

    def meta(self) -> RunMeta:
        return RunMeta(turns=self.turns, usage=Usage.from_json(self.usage.to_json()), cost_usd=self.cost_usd)

    def to_json(self) -> JsonObject:
        return {
            "path": self.path,
            "task": self.task,
            "tools": self.tools,
            "max_turns": self.max_turns,
            "max_tokens": self.max_tokens,
            "max_cost_usd": self.max_cost_usd,
            "state": self.state.value,
            "turns": self.turns,
            "usage": self.usage.to_json(),
            "cost_usd": self.cost_usd,
            "pending": [p.to_json() for p in self.pending],
            "transcript_len": self.transcript_len,
            "output": self.output,
            "error": None if self.error is None else self.error.to_json(),
        }

    @classmethod
    def from_json(cls, doc: JsonObject) -> ChildState:
        error = doc.get("error")
        return cls(
            path=doc["path"],
            task=doc["task"],
            tools=list(doc["tools"]),
            max_turns=doc["max_turns"],
            max_tokens=doc.get("max_tokens", 0),
            max_cost_usd=doc.get("max_cost_usd", 0.0),
            state=AgentState(doc.get("state", "running")),
            turns=doc.get("turns", 0),
            usage=Usage.from_json(doc.get("usage", {})),
            cost_usd=doc.get("cost_usd", 0.0),
            pending=[PendingCall.from_json(p) for p in doc.get("pending", ())],
            transcript_len=doc.get("transcript_len", 0),
            output=doc.get("output", ""),
            error=None if error is None else RunError.from_json(error),
        )


@dataclass(slots=True)
class RunRecord:
    """The status document and checkpoint cursor of one run (``state.json``)."""

    run_id: str
    workspace_id: str
    task: str
    state: RunState
    created_at: float
    updated_at: float
    request_id: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    pause_reason: PauseReason | None = None
    pending: list[PendingCall] = field(default_factory=list)
    data: Any = None
    error: RunError | None = None
    meta: RunMeta = field(default_factory=RunMeta)
    last_seq: int = 0
    transcript_len: int = 0
    repair_used: bool = False
    deadline_at: float = 0.0
    # request_ids of the latest resumes, so a retried ResumeRun is answered, not refused.
    resume_requests: list[str] = field(default_factory=list)
    # "sync" (ExecuteRun: a caller is streaming it) or "async" (CreateRun): only async runs hand off.
    mode: RunMode = RunMode.ASYNC
    # Where to POST status changes (WebhookConfig as a dict; the secret only by reference).
    webhook: JsonObject | None = None
    # While paused HANDOFF_TO_RUNNER: when the runner was last asked to take the run, and how
    # many times it was asked (the recovery sweep asks again, with backoff, then gives up).
    handoff_at: float = 0.0
    handoff_attempts: int = 0
    # The digest of the run directory's manifest at this checkpoint ("" = none): _workdir_snapshot.
    workdir_manifest: str = ""
    # That manifest itself when it is small enough to travel here ("" = it is among the run's blobs).
    workdir_inline: str = ""
    # Not stored: the run's place in its workspace's work queue while QUEUED (control plane only).
    queue_position: int = 0
    # The run's subagents by path, finished ones included (core/_subagents.py).
    children: dict[str, ChildState] = field(default_factory=dict)
    # The thread the run belongs to ("" = its own, named by its run id) and its place in it
    # (1-based; 0 = the first run of its own thread).
    thread_id: str = ""
    thread_slot: int = 0

    @property
    def thread(self) -> str:
        return self.thread_id or self.run_id

    @property
    def interrupts(self) -> list[Interrupt]:
        """What waits for a decision: the run's own calls', then its subagents'."""
        own = [p.interrupt for p in self.pending if p.status == PENDING and p.interrupt is not None]
        for child in self.children.values():
            own += [p.interrupt for p in child.pending if p.status == PENDING and p.interrupt is not None]
        return own

    def all_pending(self) -> list[PendingCall]:
        """The pending calls of the run's own agent and of its subagents."""
        return [*self.pending, *(p for child in self.children.values() for p in child.pending)]

    def to_json(self) -> JsonObject:
        return {
            "run_id": self.run_id,
            "workspace_id": self.workspace_id,
            "task": self.task,
            "state": self.state.value,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "request_id": self.request_id,
            "labels": self.labels,
            "pause_reason": None if self.pause_reason is None else self.pause_reason.value,
            "pending": [p.to_json() for p in self.pending],
            "data": self.data,
            "error": None if self.error is None else self.error.to_json(),
            "meta": self.meta.to_json(),
            "last_seq": self.last_seq,
            "transcript_len": self.transcript_len,
            "repair_used": self.repair_used,
            "deadline_at": self.deadline_at,
            "resume_requests": self.resume_requests,
            "mode": self.mode.value,
            "webhook": self.webhook,
            "handoff_at": self.handoff_at,
            "handoff_attempts": self.handoff_attempts,
            "workdir_manifest": self.workdir_manifest,
            "workdir_inline": self.workdir_inline,
            "thread_id": self.thread_id,
            "thread_slot": self.thread_slot,
            "children": {path: c.to_json() for path, c in self.children.items()},
        }

    @classmethod
    def from_json(cls, doc: JsonObject) -> RunRecord:
        reason = doc.get("pause_reason")
        error = doc.get("error")
        return cls(
            run_id=doc["run_id"],
            workspace_id=doc["workspace_id"],
            task=doc["task"],
            state=RunState(doc["state"]),
            created_at=doc["created_at"],
            updated_at=doc["updated_at"],
            request_id=doc.get("request_id", ""),
            labels=dict(doc.get("labels", {})),
            pause_reason=None if reason is None else PauseReason(reason),
            pending=[PendingCall.from_json(p) for p in doc.get("pending", ())],
            data=doc.get("data"),
            error=None if error is None else RunError.from_json(error),
            meta=RunMeta.from_json(doc.get("meta", {})),
            last_seq=doc.get("last_seq", 0),
            transcript_len=doc.get("transcript_len", 0),
            repair_used=doc.get("repair_used", False),
            deadline_at=doc.get("deadline_at", 0.0),
            resume_requests=list(doc.get("resume_requests", [])),
            mode=RunMode(doc.get("mode", "async")),
            webhook=doc.get("webhook"),
            handoff_at=doc.get("handoff_at", 0.0),
            handoff_attempts=doc.get("handoff_attempts", 0),
            workdir_manifest=doc.get("workdir_manifest", ""),
            workdir_inline=doc.get("workdir_inline", ""),
            thread_id=doc.get("thread_id", ""),
            thread_slot=doc.get("thread_slot", 0),
            children={path: ChildState.from_json(c) for path, c in (doc.get("children") or {}).items()},
        )

    def public(self) -> JsonObject:
        """The run as callers see it (webhook bodies): no checkpoint internals."""
        interrupts = [i.to_json() for i in self.interrupts]
        return {
            "run_id": self.run_id,
            "workspace_id": self.workspace_id,
            "state": self.state.value,
            "task": self.task,
            "pause": None
            if self.pause_reason is None
            else {"reason": self.pause_reason.value, "interrupts": interrupts},
            "data": self.data,
            "error": None if self.error is None else self.error.to_json(),
            "meta": self.meta.to_json(),
            "labels": self.labels,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "last_seq": self.last_seq,
            "thread_id": self.thread,
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """A caller's answer to one interrupt."""

    interrupt_id: str
    action: DecisionAction  # APPROVE, REJECT or RESPOND
    edited_arguments: JsonObject | None = None
    reason: str = ""
    output: Any = None


@dataclass(frozen=True, slots=True)
class ToolResultPage:
    content: str
    total_chars: int
    next_offset: int  # 0 once the end is reached


@dataclass(frozen=True, slots=True)
class ClientToolDef:
    name: str
    description: str
    input_schema: JsonObject


@dataclass(slots=True)
class PlannedDecision:
    """How one decision moved its pending call: what the run's history records once the run is ours."""

    pending: PendingCall
    action: DecisionAction
    reason: str = ""
