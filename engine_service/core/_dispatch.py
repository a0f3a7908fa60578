"""Tool dispatch of a run: planning the model's calls, approvals, running them, handing off to a runner."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable

from engine_service.core import _metrics as metrics
from engine_service.core import _telemetry as telemetry
from engine_service.core._checkpoint import CheckpointedRun
from engine_service.core._ids import is_valid_id
from engine_service.core._run import (
    PENDING,
    READY,
    RESOLVED,
    CallOutcome,
    DecisionAction,
    Interrupt,
    PendingCall,
    RunError,
)
from engine_service.core._types import (
    EventKind,
    InterruptKind,
    JsonObject,
    Message,
    PauseReason,
    Permission,
    RunState,
    ToolCall,
    ToolChoice,
)
from engine_service.models import ModelAdapter, ModelError, TurnResult
from engine_service.tools import result_blob_name, truncation_note
from engine_service.tools._registry import (
    AGENT_TOOL,
    Tool,
    ToolArgumentError,
    ToolContext,
    call_tool,
    capability_error,
)

log = logging.getLogger("machina.engine")


class RunnerUnreachable(Exception):
    """The runner did not accept a handed-off run (network error, timeout or non-2xx)."""


# Event kinds a tool may emit itself (metering).
_TOOL_EVENTS = frozenset({EventKind.API_CALL.value})


REQUEST_EVENT = {
    InterruptKind.APPROVAL: EventKind.APPROVAL_REQUESTED,
    InterruptKind.INPUT: EventKind.INPUT_REQUESTED,
    InterruptKind.TOOL_RESULT: EventKind.TOOL_RESULT_REQUESTED,
}


def _resolved(call: ToolCall, text: str, outcome: CallOutcome) -> PendingCall:
    return PendingCall(call, RESOLVED, result_text=text, result_is_error=True, outcome=outcome)


def distinct_call_ids(calls: list[ToolCall], turn: int) -> list[ToolCall]:
    """The turn's calls, each with an id of its own that is a valid id.

    A call id comes from the model's answer (or an OpenAI-compatible server), yet results,
    interrupts and subagents are keyed by it: an id used twice in one turn would hand one
    call's result to the other, and an id like ``a/b`` would read as a path. Such an id is
    replaced by ``call_{turn}_{n}`` in the transcript and everything after it, so the model
    sees its calls answered under the ids it is then shown.
    """
    seen = {c.call_id for c in calls}
    if len(seen) == len(calls) and all(is_valid_id(c.call_id) for c in calls):
        return calls  # the usual case: nothing to copy
    taken: set[str] = set()
    distinct: list[ToolCall] = []
    for index, call in enumerate(calls, 1):
        call_id = call.call_id
        if call_id in taken or not is_valid_id(call_id):
            call_id = f"call_{turn}_{index}"
            while call_id in seen or call_id in taken:
                call_id += "x"
            call = ToolCall(call_id, call.name, call.arguments)
        taken.add(call_id)
        distinct.append(call)
    return distinct


def arguments_digest(arguments: JsonObject) -> str:
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# Providers' stop reasons as the GenAI conventions name them.
_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_call",
    "max_tokens": "length",
}


def _finish_reason(result: TurnResult) -> str:
    if result.stop_reason:
        return _FINISH_REASONS.get(result.stop_reason, result.stop_reason)
    return "tool_call" if result.tool_calls else "stop"


class ToolDispatch(CheckpointedRun):
    """Plans and runs one turn's tool calls; pauses for people, clients or runners."""

    def _plan_all(self, calls: list[ToolCall]) -> list[PendingCall]:
        return [self._plan(call) for call in calls]

    def _plan(self, call: ToolCall, tools: dict[str, Tool] | None = None, path: str = "") -> PendingCall:
        """Decide what happens to one tool call: run, ask, or answer at once.

        ``tools`` and ``path``: those of the subagent that made the call (default: the run's own).
        """
        tools = self.env.tools if tools is None else tools
        tool = tools.get(call.name)
        if tool is None:
            available = ", ".join(sorted(tools)) or "none"
            return _resolved(
                call, f"Unknown tool {call.name!r}. Available tools: {available}.", CallOutcome.UNKNOWN_TOOL
            )
        if self.spec.tool_choice is ToolChoice.NONE:
            # The model was told it may not call tools; a call it makes anyway is answered, not run.
            return _resolved(
                call,
                f"Tool calls are turned off for this run (tool_choice none): {call.name} was not run.",
                CallOutcome.DENIED,
            )
        permission = self.env.permissions(call.name)
        if permission is Permission.DENY:
            return _resolved(
                call,
                f"Permission denied: the {call.name} tool is not allowed in this run.",
                CallOutcome.DENIED,
            )
        try:
            tool.validate(call.arguments)
        except ToolArgumentError as exc:
            return _resolved(call, f"Invalid arguments for {call.name}: {exc}", CallOutcome.INVALID_ARGUMENTS)
        kind = tool.interrupt_kind
        if kind is None and call.name in self.spec.gated_tools:
            kind = InterruptKind.TOOL_RESULT
        if kind is None and permission is Permission.ASK:
            kind = InterruptKind.APPROVAL
        if kind is None:
            return PendingCall(call, READY)
        now = self.env.clock()
        timeout = self.spec.approval_timeout_ms
        interrupt = Interrupt(
            interrupt_id=f"int_{path}/{call.call_id}" if path else f"int_{call.call_id}",
            kind=kind,
            call_id=call.call_id,
            tool_name=call.name,
            arguments=call.arguments,
            description=tool.describe(call.arguments),
            created_at=now,
            question=str(call.arguments.get("question", "")) if kind is InterruptKind.INPUT else "",
            expires_at=now + timeout / 1000 if timeout and kind is InterruptKind.APPROVAL else 0.0,
            input_schema=tool.input_schema,
            agent_path=path,
        )
        return PendingCall(call, PENDING, interrupt)

    async def _dispatch(self) -> bool:
        """Run the turn's READY calls concurrently; append results in call order.

        Returns False when the run was handed to a runner instead (a READY call
        is a capability stub and the run is async with a runner configured).
        """
        pending = self.record.pending
        stubs = [p for p in pending if p.status == READY and self.env.tools[p.call.name].missing]
        if stubs and self.env.handoff is not None:
            await self._hand_off(sorted({p.call.name for p in stubs}))
            return False
        for p in stubs:
            missing = self.env.tools[p.call.name].missing
            p.status, p.result_text, p.result_is_error, p.outcome = (
                RESOLVED,
                capability_error(p.call.name, missing),
                True,
                CallOutcome.CAPABILITY_MISSING,
            )
            if p.call.name not in self.record.meta.capabilities_missing:
                self.record.meta.capabilities_missing.append(p.call.name)
        results = await self._run_pending(pending)
        if results is None:  # a subagent waits for a decision: so does the run
            await self.pause()
            return False
        for p in pending:
            text, is_error = results[p.call.call_id]
            self.transcript.append(
                Message("tool", text, call_id=p.call.call_id, tool_name=p.call.name, is_error=is_error)
            )
        self._retire_agents(pending, "")
        self.record.pending = []
        await self.checkpoint(after_tools=True)
        return True

    async def _measured_model_call(
        self, model: ModelAdapter, call: Callable[[], Awaitable[TurnResult]], path: str = ""
    ) -> TurnResult:
        """``call`` (one model call of the agent at ``path``), timed and counted, and in a
        ``chat {model}`` span with the GenAI attributes while tracing is on."""
        provider = model.provider
        started = time.perf_counter()
        outcome = "error"
        try:
            if telemetry.enabled():
                result = await self._traced_model_call(model, call, path)
            else:
                result = await call()
            outcome = "ok"
        finally:
            metrics.MODEL_SECONDS.observe(time.perf_counter() - started, provider, outcome)
        metrics.TURNS.inc(provider)
        metrics.TOKENS.inc(provider, "input", amount=result.usage.input_tokens)
        metrics.TOKENS.inc(provider, "output", amount=result.usage.output_tokens)
        cost = result.usage.cost(self.env.price)
        if cost:
            metrics.COST.inc(provider, amount=cost)
        return result

    async def _traced_model_call(
        self, model: ModelAdapter, call: Callable[[], Awaitable[TurnResult]], path: str
    ) -> TurnResult:
        attributes: dict[str, str | int] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": model.provider,
            "gen_ai.request.model": model.name,
            "gen_ai.conversation.id": self.record.run_id,
        }
        if self.env.max_output_tokens:
            attributes["gen_ai.request.max_tokens"] = self.env.max_output_tokens
        if path:
            attributes["machina.agent.path"] = path
        with telemetry.span(
            f"chat {model.name}", kind=telemetry.SpanKind.CLIENT, attributes=attributes
        ) as span:
            try:
                result = await call()
            except ModelError as error:
                span.record_error(error.code)
                raise
            span.set_attributes(
                {
                    "gen_ai.response.model": model.name,
                    "gen_ai.usage.input_tokens": result.usage.input_tokens,
                    "gen_ai.usage.output_tokens": result.usage.output_tokens,
                    "gen_ai.response.finish_reasons": [_finish_reason(result)],
                }
            )
            return result

    def _tool_label(self, name: str) -> str:
        """The metrics label of a tool: its name for the engine's tools, ``client`` for a caller's."""
        tool = self.env.tools.get(name)
        if tool is None:
            return "unknown"
        return metrics.tool_label(name, tool.interrupt_kind is not InterruptKind.TOOL_RESULT)

    async def _run_pending(
        self, pending: list[PendingCall], path: str = ""
    ) -> dict[str, tuple[str, bool]] | None:
        """Run the READY calls of ``pending`` (the agent at ``path``'s) concurrently: their results by
        call id, or None when a subagent among them paused for a decision (the calls that ended
        keep their results in ``pending`` until the run goes on)."""
        results: dict[str, tuple[str, bool]] = {}
        for p in pending:
            if p.status == RESOLVED:
                if p.outcome is not CallOutcome.RAN:
                    # A call that does not run is on the record too, with why: the model sees its result.
                    self._record_unrun(p, path)
                results[p.call.call_id] = (p.result_text, p.result_is_error)
        ready = [p for p in pending if p.status == READY]
        if not ready:
            return results
        if len(ready) == 1:  # most turns: no task to create and schedule
            outcomes = [await self._run_call(ready[0].call, path)]
        else:
            outcomes = await asyncio.gather(*(self._run_call(p.call, path) for p in ready))
        paused = False
        for p, outcome in zip(ready, outcomes, strict=True):
            if outcome is None:
                paused = True
                continue
            results[p.call.call_id] = outcome
            p.status, p.outcome = RESOLVED, CallOutcome.RAN
            p.result_text, p.result_is_error = outcome
        return None if paused else results

    async def pause(self) -> None:
        raise NotImplementedError  # RunActor

    async def _run_agent(self, call: ToolCall, path: str) -> tuple[str, bool] | None:
        raise NotImplementedError  # RunActor, via core/_subagents.py

    def _retire_agents(self, pending: list[PendingCall], path: str) -> None:
        raise NotImplementedError  # RunActor, via core/_subagents.py

    def _record_unrun(self, p: PendingCall, path: str = "") -> None:
        """A call that never started still completes on the record, with why and its result."""
        outcome = p.outcome or (CallOutcome.REJECTED if p.result_is_error else CallOutcome.RESPONDED)
        metrics.TOOL_CALLS.inc(self._tool_label(p.call.name), outcome.value)
        self.emit(
            EventKind.TOOL_CALL_COMPLETED,
            {
                "call_id": p.call.call_id,
                "tool": p.call.name,
                "is_error": p.result_is_error,
                "size": len(p.result_text.encode()),
                "output": p.result_text,
                "duration_ms": 0,
                "outcome": p.outcome
                or (CallOutcome.REJECTED if p.result_is_error else CallOutcome.RESPONDED),
            },
            path,
        )

    async def _hand_off(self, tools: list[str]) -> None:
        """Pause HANDOFF_TO_RUNNER and POST the run to the runner; fail clearly if it cannot take it."""
        record = self.record
        assert self.env.handoff is not None
        await self._snapshot_workdir()
        self._show_until_committed()
        self._account_time()
        record.state, record.pause_reason = RunState.PAUSED, PauseReason.HANDOFF_TO_RUNNER
        record.handoff_at, record.handoff_attempts = self.env.clock(), 1
        self.emit(EventKind.HANDOFF_TO_RUNNER, {"tools": tools})
        self.emit(EventKind.PAUSED, {"reason": PauseReason.HANDOFF_TO_RUNNER.value, "interrupts": []})
        await self.checkpoint()
        metrics.RUNS_PAUSED.inc(PauseReason.HANDOFF_TO_RUNNER.value)
        if await self._cancelled_at_pause():
            return
        self.ending = True
        # The runner takes the lease itself, so it must be free before the POST.
        await self.release(close_feed=False)
        try:
            await self.env.handoff(*self.key)
        except RunnerUnreachable as exc:
            metrics.HANDOFFS.inc("unreachable")
            await self._handoff_failed(str(exc))
            return
        metrics.HANDOFFS.inc("accepted")
        self.transition("handed_off", tools=tools, attempt=1)
        self.feed.close()

    async def hand_off_again(self) -> None:
        """A handed-off run no runner took (we hold its lease): ask the runner again.

        A failed POST counts as an attempt; the recovery sweep asks again later or gives up.
        """
        record = self.record
        assert self.env.handoff is not None
        record.handoff_at, record.handoff_attempts = self.env.clock(), record.handoff_attempts + 1
        await self.checkpoint()
        await self.release(close_feed=False)
        log.warning("handing run %s to the runner again (attempt %d)", record.run_id, record.handoff_attempts,
                    extra={"run_id": record.run_id})  # fmt: skip
        try:
            await self.env.handoff(*self.key)
        except RunnerUnreachable as exc:
            metrics.HANDOFFS.inc("unreachable")
            log.warning("re-handoff of %s failed: %s", record.run_id, exc, extra={"run_id": record.run_id})
        else:
            metrics.HANDOFFS.inc("accepted")
            self.transition("handed_off", attempt=record.handoff_attempts)
        self.feed.close()

    async def runner_lost(self) -> None:
        """No runner took the run after every attempt: fail it clearly; resuming retries it."""
        attempts = self.record.handoff_attempts
        await self._finish(
            RunState.FAILED,
            error=RunError(
                "ERR_RUNNER_LOST",
                f"no runner took the run after {attempts} handoffs",
                {"attempts": str(attempts)},
            ),
            keep_pending=True,
        )

    async def _handoff_failed(self, reason: str) -> None:
        ws, run_id = self.key
        current = await self.env.storage.read_state(ws, run_id)
        if current is None or current.get("last_seq") != self.record.last_seq or not await self.take_over():
            # The runner took the run after all (e.g. it answered after our timeout).
            self.feed.close()
            return
        # The pending calls stay in the checkpoint: resuming the run retries the handoff.
        await self._finish(
            RunState.FAILED,
            error=RunError("ERR_RUNNER_UNREACHABLE", f"the runner could not take the run: {reason}"),
            keep_pending=True,
        )

    async def _run_call(self, call: ToolCall, path: str = "") -> tuple[str, bool] | None:
        """Run one call of the agent at ``path``: its result, or None when it started a subagent
        that paused for a decision."""
        if call.name == AGENT_TOOL:
            return await self._run_agent(call, path)
        label = self._tool_label(call.name)
        started = time.perf_counter()
        is_error = True
        try:
            if telemetry.enabled():
                attributes = {
                    "gen_ai.operation.name": "execute_tool",
                    "gen_ai.tool.name": call.name,
                    "gen_ai.tool.call.id": call.call_id,
                    "gen_ai.tool.type": "function",
                    "gen_ai.conversation.id": self.record.run_id,
                }
                if path:
                    attributes["machina.agent.path"] = path
                with telemetry.span(f"execute_tool {call.name}", attributes=attributes) as span:
                    text, is_error = await self._call(call, path)
                    if is_error:
                        span.record_error("tool_error")
            else:
                text, is_error = await self._call(call, path)
        finally:
            metrics.TOOL_CALLS.inc(label, "error" if is_error else CallOutcome.RAN.value)
            metrics.TOOL_SECONDS.observe(time.perf_counter() - started, label)
        return text, is_error

    async def _call(self, call: ToolCall, path: str) -> tuple[str, bool]:
        tool = self.env.tools[call.name]
        self._workdir_dirty = True
        self.emit(EventKind.TOOL_CALL_STARTED, {"call": call.to_json()}, path)
        started = time.perf_counter()
        # A subagent's call ids are its own: its stored results are named by path too.
        ref = f"{path}/{call.call_id}" if path else call.call_id
        ctx = ToolContext(
            self.record.run_id,
            self.record.workspace_id,
            ref,
            workdir=self.env.workdir,
            emit=lambda kind, data: self._emit_from_tool(kind, data, path),
            fetch_result=self._fetch_result,
            sandbox_network=self.spec.sandbox_network,
        )
        text, is_error = await call_tool(tool, call.arguments, ctx)
        size = len(text.encode())
        if len(text) > self.env.max_result_chars:
            # The model gets a head and a ref; the whole payload stays retrievable (FetchData, API).
            ws, run_id = self.key
            blob = text.encode()

            async def store() -> None:
                await self.env.storage.put_blob(ws, run_id, result_blob_name(ref), blob)

            await self._retrying_storage("storing a tool result", store)
            shown = self.env.max_result_chars
            text = text[:shown] + truncation_note(ref, shown, len(text))
        self.emit(
            EventKind.TOOL_CALL_COMPLETED,
            {
                "call_id": call.call_id,
                "tool": call.name,
                "is_error": is_error,
                "size": size,
                "output": text,
                "duration_ms": int((time.perf_counter() - started) * 1000),
                "outcome": CallOutcome.RAN.value,
            },
            path,
        )
        return text, is_error

    def _idempotent(self, name: str) -> bool:
        tool = self.env.tools.get(name)
        return tool is not None and tool.idempotent

    def _emit_from_tool(self, kind: str, data: JsonObject, path: str = "") -> None:
        if kind not in _TOOL_EVENTS:
            raise ValueError(f"tools may not emit {kind!r} events")
        self.emit(EventKind(kind), data, path)

    async def _fetch_result(self, ref: str) -> str | None:
        blob = await self.env.storage.get_blob(*self.key, result_blob_name(ref))
        return None if blob is None else blob.decode("utf-8", errors="replace")

    def record_decision(
        self,
        pending: PendingCall,
        decision: DecisionAction,
        by: str,
        *,
        expired: bool = False,
        reason: str = "",
    ) -> None:
        assert pending.interrupt is not None
        self.emit(
            EventKind.APPROVAL_DECIDED,
            {
                "interrupt_id": pending.interrupt.interrupt_id,
                "decision": decision.value,
                "by": by,
                "at": self.env.clock(),
                "sha256": arguments_digest(pending.call.arguments) if pending.status == READY else "",
                "expired": expired,
                "reason": reason,
            },
            pending.interrupt.agent_path,
        )
