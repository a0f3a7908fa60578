"""A run in execution: the agent loop.

One `RunActor` exists per run being moved by this process (executing, or
recording decisions). It is built in layers: `CheckpointedRun` (_checkpoint.py)
owns the run's lease, appends events to the live feed and commits them together
with transcript entries and the state document at each checkpoint;
`ToolDispatch` (_dispatch.py) plans and runs the model's tool calls; `Subagents`
(_subagents.py) moves the children its ``Agent`` calls start; `RunActor`
runs the loop of model turns, enforces the run's limits and pauses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from engine_service.core import _metrics as metrics
from engine_service.core import _telemetry as telemetry
from engine_service.core._checkpoint import LeaseLost
from engine_service.core._compaction import (
    COMPACTION,
    SUMMARY_REQUEST,
    SUMMARY_SYSTEM,
    CompactionPlan,
    ContextWindow,
    message_chars,
)
from engine_service.core._control import APPROVAL_TIMER
from engine_service.core._dispatch import REQUEST_EVENT, distinct_call_ids
from engine_service.core._errors import RunFailure
from engine_service.core._limits import MAX_DEPTH, is_small, too_deep
from engine_service.core._regex import SchemaValidator
from engine_service.core._run import PENDING, READY, RESOLVED, CallOutcome, ChildState, RunError
from engine_service.core._subagents import Subagents
from engine_service.core._text import loads_untrusted
from engine_service.core._threads import load_context
from engine_service.core._types import (
    EventKind,
    InterruptKind,
    JsonObject,
    Message,
    PauseReason,
    RunState,
    ToolChoice,
)
from engine_service.models import ModelError, ModelRequest, TextChunk, ToolSpec, TurnResult
from engine_service.storage._protocol import StorageUnavailable, storage_fault

log = logging.getLogger("machina.engine")


_REPAIR_PROMPT = (
    "Your answer is not valid JSON for the required output schema: {problem}. "
    "Reply again with only the JSON value, nothing else."
)


class RunActor(Subagents):
    """Executes a run: the agent loop, its limits, its end; pauses and cancels."""

    # -- lifecycle ---------------------------------------------------------------

    def start(self, *, resumed_by: str | None) -> None:
        if self.env.workdir is not None:
            self.env.workdir.mkdir(parents=True, exist_ok=True)
        # RUNNING from the moment the caller gets an answer, not when the task first runs.
        self.record.state = RunState.RUNNING
        self.record.pause_reason = None
        self.task = asyncio.create_task(self._execute(resumed_by), name=f"run:{self.record.run_id}")

    async def _execute(self, resumed_by: str | None) -> None:
        helpers = [
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._watch_cancel()),
            asyncio.create_task(self._writer()),
        ]
        metrics.RUNS_ACTIVE.inc()
        try:
            if telemetry.enabled():
                await self._execute_traced(resumed_by)
            else:
                await self._execute_inner(resumed_by)
        except StorageUnavailable as exc:
            # Storage stayed unavailable past storage_retry_s: nothing more can be committed
            # here. The run stays at its last checkpoint (readers see it as it was there) and
            # is resumed by whichever process sweeps once storage is back, this one included.
            log.error("run %s parked at its last checkpoint, storage unavailable: %s", self.record.run_id,
                      exc, extra={"run_id": self.record.run_id})  # fmt: skip
            await self._close_quietly()
        except LeaseLost as lost:
            # Another process owns the run now: write nothing more, just stop.
            run_id = self.record.run_id
            log.warning("run %s stopped here: %s", run_id, lost, extra={"run_id": run_id})
            metrics.LEASES_LOST.inc()
            self.feed.close()
        finally:
            metrics.RUNS_ACTIVE.dec()
            self._forgive_owed()
            for helper in helpers:
                helper.cancel()

    async def _execute_traced(self, resumed_by: str | None) -> None:
        """`_execute_inner` in an ``invoke_agent`` span, a child of the run's own trace."""
        record = self.record
        provider, _, model = record.meta.model.partition(":")
        attributes = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.provider.name": provider,
            "gen_ai.request.model": model,
            "gen_ai.conversation.id": record.run_id,
            "machina.run.id": record.run_id,
            "machina.workspace": record.workspace_id,
            "machina.run.resumed_by": resumed_by or "",
        }
        with telemetry.span("invoke_agent", attributes=attributes, parent=self.spec.traceparent) as span:
            try:
                await self._execute_inner(resumed_by)
            finally:
                span.set_attributes(
                    {
                        "machina.run.state": record.state.value,
                        "gen_ai.usage.input_tokens": record.meta.usage.input_tokens,
                        "gen_ai.usage.output_tokens": record.meta.usage.output_tokens,
                    }
                )
                if record.error is not None and record.state is RunState.FAILED:
                    span.record_error(record.error.code)

    async def _watch_cancel(self) -> None:
        """Honour a cancel that another process (a replica) recorded in storage."""
        run_id = self.record.run_id
        while True:
            await asyncio.sleep(self.env.cancel_poll_s)
            try:
                reason = await self.cancel_request()
            except Exception:  # a storage hiccup: look again next time
                log.debug("cancel check of run %s failed", run_id, exc_info=True)
                continue
            if reason is not None and self.cancel_reason is None and self.task is not None:
                if self.ending:
                    return  # it is committing its end: that is the end
                self.cancel_reason = reason
                self.task.cancel()
                return

    async def _execute_inner(self, resumed_by: str | None) -> None:
        record = self.record
        self._active_since = self.env.clock()
        record.state = RunState.RUNNING
        record.pause_reason = None
        if not self._start_committed:
            self._emit_start(resumed_by)
        try:
            remaining = record.deadline_at - self.env.clock() if record.deadline_at else None
            if remaining is not None and remaining <= 0:
                raise RunFailure(
                    "ERR_DEADLINE_EXCEEDED", "the run's deadline passed", timeout_ms=self.spec.timeout_ms
                )
            try:
                async with asyncio.timeout(remaining):
                    await self._loop()
            except TimeoutError:
                raise RunFailure(
                    "ERR_DEADLINE_EXCEEDED", "the run's deadline passed", timeout_ms=self.spec.timeout_ms
                ) from None
        except asyncio.CancelledError:
            if self._lease_lost:
                raise LeaseLost("lease lost") from None
            if self.cancel_reason is None or self.ending:
                # Engine shutdown: leave the last checkpoint for recovery.
                await self._close_quietly()
                raise
            await self._finish(
                RunState.CANCELLED,
                error=RunError("ERR_CANCELLED", self.cancel_reason or "cancelled by a caller"),
            )
        except LeaseLost:
            raise
        except StorageUnavailable:
            raise
        except RunFailure as failure:
            await self._finish(
                RunState.FAILED, error=RunError(failure.code, failure.message, failure.metadata)
            )
        except ModelError as error:
            await self._finish(
                RunState.FAILED, error=RunError(error.code, error.message, {"status": str(error.status)})
            )
        except Exception as exc:
            if storage_fault(exc):
                raise StorageUnavailable(str(exc)) from None
            log.exception("run %s failed with an internal error", record.run_id)
            await self._finish(
                RunState.FAILED, error=RunError("ERR_INTERNAL", "internal error; see the engine log")
            )

    async def _close_quietly(self) -> None:
        # Nothing past the last checkpoint is written (but one taken and not written yet): a
        # half-streamed turn would leave events that the recovered run then streams again.
        # Freeing the lease lets recovery (here or on a replica) start at once.
        if self._owed is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._commit_owed_once(), self.env.lease_ttl / 3)
        with contextlib.suppress(Exception):
            await self.release()

    def mark_interrupted(self) -> list[str]:
        """After a crash: calls that may have been running are reported, not silently re-run.

        Idempotent tools run again; others get an error result the model can act on.
        """
        interrupted = []
        for p in self.record.all_pending():
            tool = self.env.tools.get(p.call.name)
            if p.status == READY and not (tool is not None and tool.idempotent):
                p.status, p.result_is_error, p.outcome = RESOLVED, True, CallOutcome.INTERRUPTED
                p.result_text = (
                    f"The {p.call.name} call was interrupted by an engine crash: it may or may not have "
                    "taken effect. Check before you retry it."
                )
                interrupted.append(p.call.call_id)
        return interrupted

    async def pause(self) -> None:
        record = self.record
        await self._snapshot_workdir()  # a refused snapshot fails the run before it says paused
        self._show_until_committed()
        self._account_time()
        interrupts = record.interrupts
        kinds = {i.kind for i in interrupts}
        record.pause_reason = (
            PauseReason.AWAITING_APPROVAL
            if InterruptKind.APPROVAL in kinds
            else PauseReason.AWAITING_TOOL_RESULT
            if InterruptKind.TOOL_RESULT in kinds
            else PauseReason.AWAITING_INPUT
        )
        record.state = RunState.PAUSED
        self.emit(
            EventKind.PAUSED,
            {"reason": record.pause_reason.value, "interrupts": [i.to_json() for i in interrupts]},
        )
        if deadlines := [i.expires_at for i in interrupts if i.expires_at]:
            # With a control plane, the deadline's timer row is written before the pause
            # commits: a replica that dies right after the commit leaves it behind (and a timer
            # of a pause that never committed finds nothing due when it fires).
            await self.env.control.set_timer_now(*self.key, APPROVAL_TIMER, min(deadlines))
        await self.checkpoint()
        metrics.RUNS_PAUSED.inc(record.pause_reason.value)
        self.transition(
            "paused", reason=record.pause_reason.value, interrupt_ids=[i.interrupt_id for i in interrupts]
        )
        if await self._cancelled_at_pause():
            return
        self.ending = True
        await self.release()
        self._notify("paused")

    # -- the agent loop ------------------------------------------------------------

    async def _loop(self) -> None:
        record = self.record
        if record.pending:
            # Calls carried over from a pause (approved, or handed to us by the engine): commit
            # RUNNING and the decisions first, so a crash during such a call is recovered and
            # reported as interrupted instead of leaving the run paused to be approved again.
            ready = any(p.status == READY and not self._idempotent(p.call.name) for p in record.pending)
            if ready and not self._start_committed:  # committed with the start otherwise
                await self.checkpoint()
            if not await self._dispatch():
                return
        while True:
            self._check_limits()
            turn_started = time.perf_counter()
            try:
                if not await self._turn():
                    return
            finally:
                metrics.TURN_SECONDS.observe(time.perf_counter() - turn_started, self.env.model.provider)

    async def _turn(self) -> bool:
        """One model turn and the tool calls it asked for; False once the run paused or ended."""
        record = self.record
        result = await self._model_turn()
        if not result.tool_calls:
            done, data = await self._final_answer(result.text)
            if done:
                await self._finish(RunState.DONE, data=data)
                return False
            return True
        calls = result.tool_calls
        if all(is_small(c.arguments) for c in calls):
            record.pending = [self._plan(call) for call in calls]
        else:
            # Checking large arguments against a JSON Schema is seconds of pure-Python work:
            # in a worker thread the event loop keeps serving every other run meanwhile.
            record.pending = await asyncio.to_thread(self._plan_all, calls)
        if any(p.status == PENDING for p in record.pending):
            for p in record.pending:
                if p.status == PENDING and p.interrupt is not None:
                    self.emit(REQUEST_EVENT[p.interrupt.kind], {"interrupt": p.interrupt.to_json()})
            await self.pause()
            return False
        # Commit the turn before running a tool that must not run twice: a
        # crash during the call then knows it was in flight. Idempotent
        # tools skip this write (it is most of a cheap turn's cost).
        if any(p.status == READY and not self._idempotent(p.call.name) for p in record.pending):
            await self.checkpoint()
        return await self._dispatch()

    def _check_limits(self) -> None:
        meta, spec = self.record.meta, self.spec
        if meta.turns >= self.env.max_turns:
            raise RunFailure(
                "ERR_MAX_TURNS",
                f"the run reached its limit of {self.env.max_turns} turns",
                max_turns=self.env.max_turns,
            )
        if spec.max_tokens and meta.usage.total >= spec.max_tokens:
            raise RunFailure(
                "ERR_TOKEN_BUDGET",
                f"the run used {meta.usage.total} of {spec.max_tokens} tokens",
                used=meta.usage.total,
                max_tokens=spec.max_tokens,
            )
        if spec.max_cost_usd and meta.cost_usd >= spec.max_cost_usd:
            raise RunFailure(
                "ERR_COST_BUDGET",
                f"the run cost ${meta.cost_usd:.4f} of ${spec.max_cost_usd:.4f}",
                cost_usd=meta.cost_usd,
                max_cost_usd=spec.max_cost_usd,
            )

    async def _model_turn(self) -> TurnResult:
        return await self._measured_model_call(self.env.model, self._model_call)

    async def _model_call(self) -> TurnResult:
        record, env = self.record, self.env
        turn = record.meta.turns + 1
        tools = self._tool_specs
        if tools is None:  # the run's tools are resolved once, with its actor
            tools = self._tool_specs = [t.spec() for t in env.tools.values()]
        request = ModelRequest(
            system=env.system_prompt,
            messages=await self._context_messages(tools),
            tools=tools,
            tool_choice=self.spec.tool_choice,
            max_output_tokens=env.max_output_tokens,
            output_schema=self.spec.output_schema,
            turn=record.meta.turns,
        )
        result: TurnResult | None = None
        emit_text = self.emit_text
        async for item in env.model.stream(request):
            if type(item) is TextChunk or isinstance(item, TextChunk):  # one a token: cheap test first
                emit_text(item.text, turn)
            else:
                result = item
        if result is None:
            raise ModelError("ERR_MODEL_STREAM", "the model stream ended without a result")
        result.tool_calls = distinct_call_ids(result.tool_calls, turn)
        record.meta.turns = turn
        record.meta.usage.add(result.usage)
        self._observe_context("", result.usage.input_tokens)
        cost = result.usage.cost(env.price)
        record.meta.cost_usd += cost
        self.transcript.append(Message("assistant", result.text, result.tool_calls))
        self.emit(
            EventKind.ASSISTANT_MESSAGE,
            {"text": result.text, "calls": [c.to_json() for c in result.tool_calls], "turn": turn},
        )
        self.emit(EventKind.USAGE, {"turn": turn, "usage": result.usage.to_json(), "cost_usd": cost})
        return result

    # -- what the model sees ------------------------------------------------------------

    _contexts: dict[str, ContextWindow] | None = None
    _tool_specs: list[ToolSpec] | None = None

    def _forget_child(self, path: str) -> None:
        super()._forget_child(path)
        if self._contexts is not None:
            self._contexts.pop(path, None)

    def _observe_context(self, path: str, input_tokens: int) -> None:
        """The model reported ``input_tokens`` for the last request of ``path`` ("" = the run)."""
        context = self._contexts.get(path) if self._contexts is not None else None
        if context is not None:
            context.observe(input_tokens)

    async def _context_messages(
        self, tools: Sequence[ToolSpec], child: ChildState | None = None
    ) -> Sequence[Message]:
        """The messages of the next model request, which every model request of the run (and of
        its subagents: ``child``) takes from here: the transcript as the model sees it (see
        _compaction.py), compacted first when the request would pass ``compact_at`` of the
        model's context window. The run's own requests start with its thread's history."""
        if self._contexts is None:
            self._contexts = {}
        path = child.path if child is not None else ""
        transcript = self._child_transcripts[path] if child is not None else self.transcript
        context = self._contexts.setdefault(path, ContextWindow())
        if child is None and self.spec.context and self._thread_history is None:
            # The thread's history before this run: read once, when the run first needs it.
            history = await load_context(self.env.storage, self.record.workspace_id, self.spec.context)
            self._thread_history = history
            self._thread_chars = sum(map(message_chars, history))
        join = self._with_history if child is None else _as_is
        messages = join(context.messages(transcript))
        window = self.env.context_window_tokens
        if not window:
            return messages
        # The thread's history counts like the system prompt: this run compacts only its own turns.
        fixed = _fixed_chars(self.env.system_prompt, tools) + (self._thread_chars if child is None else 0)
        before = context.tokens(fixed)
        if before <= self.env.compact_at * window:
            context.sent(fixed)
            return messages
        plan = context.plan(self.env.compact_keep_turns)
        if plan is not None:
            await self._compact(plan, tools, before, fixed, context, transcript, child)
            messages = join(context.messages(transcript))
        after = context.tokens(fixed)
        if after > window:
            raise RunFailure(
                "ERR_COMPACTION_FAILED",
                f"the model's request (about {after} tokens) does not fit its context window of {window} "
                f"tokens, even with older turns summarised",
                tokens=after,
                context_window_tokens=window,
            )
        context.sent(fixed)
        return messages

    def _with_history(self, view: Sequence[Message]) -> Sequence[Message]:
        """The thread's history, then ``view``: one list that grows with the view (so the model
        adapters' serialised history stays valid), rebuilt when the view is replaced."""
        if not self._thread_history:
            return view
        if view is not self._joined_view or len(view) < self._joined_len:
            self._joined, self._joined_view, self._joined_len = list(self._thread_history), view, 0
        self._joined.extend(view[self._joined_len :])
        self._joined_len = len(view)
        return self._joined

    async def _compact(
        self,
        plan: CompactionPlan,
        tools: Sequence[ToolSpec],
        before: int,
        fixed: int,
        context: ContextWindow,
        transcript: list[Message],
        child: ChildState | None,
    ) -> None:
        """Summarise ``plan.messages`` with a model call and record the summary in the transcript
        (the run's, or the subagent ``child``'s)."""
        record, env = self.record, self.env
        turns = child.turns if child is not None else record.meta.turns
        model = self._child_model(child.path) if child is not None else env.model
        request = ModelRequest(
            system=SUMMARY_SYSTEM,
            messages=[*plan.messages, Message("user", SUMMARY_REQUEST)],
            tools=tools,  # the summarised turns may hold tool calls, which some APIs check against
            tool_choice=ToolChoice.NONE,
            max_output_tokens=env.max_output_tokens,
            turn=turns,
            purpose="compaction",
        )

        async def summarise() -> TurnResult:
            result: TurnResult | None = None
            async for item in model.stream(request):
                if isinstance(item, TurnResult):
                    result = item
            if result is None or not result.text.strip():
                raise RunFailure(
                    "ERR_COMPACTION_FAILED",
                    "summarising older turns to fit the context window gave no summary",
                )
            return result

        try:
            # Timed, counted and traced (a `chat {model}` span) like every other model call.
            result = await self._measured_model_call(model, summarise, child.path if child else "")
        except ModelError as error:
            raise RunFailure(
                "ERR_COMPACTION_FAILED",
                f"summarising older turns to fit the context window failed: {error.message}",
                model_error=error.code,
            ) from None
        record.meta.usage.add(result.usage)
        cost = result.usage.cost(env.price)
        record.meta.cost_usd += cost
        if child is not None:
            self._spend(child.path, result.usage, cost)
        transcript.append(Message(COMPACTION, result.text, keep_from=plan.keep_from))
        context.messages(transcript)
        self.emit(
            EventKind.CONTEXT_COMPACTED,
            {
                "turn": turns + 1,
                "turns_summarized": plan.turns,
                "tokens_before": before,
                "tokens_after": context.tokens(fixed),
                "usage": result.usage.to_json(),
                "cost_usd": cost,
            },
            child.path if child is not None else "",
        )

    async def _final_answer(self, text: str) -> tuple[bool, Any]:
        """(done, data). In structured mode, one repair turn, then ERR_OUTPUT_SCHEMA."""
        schema = self.spec.output_schema
        if schema is None:
            return True, text
        if len(text) > _INLINE_ANSWER_CHARS:
            problem = await asyncio.to_thread(_schema_problem, text, schema)
        else:
            problem = _schema_problem(text, schema)
        if problem is None:
            return True, loads_untrusted(text)
        if self.record.repair_used:
            raise RunFailure(
                "ERR_OUTPUT_SCHEMA", f"the final answer does not match the output schema: {problem}"
            )
        self.record.repair_used = True
        self.transcript.append(Message("user", _REPAIR_PROMPT.format(problem=problem)))
        await self.checkpoint()
        return False, None


def _as_is(view: Sequence[Message]) -> Sequence[Message]:
    return view


# A structured final answer longer than this is validated in a worker thread.
_INLINE_ANSWER_CHARS = 16_384


def _fixed_chars(system: str, tools: Sequence[ToolSpec]) -> int:
    """The characters of a request besides its messages: the system prompt and the tools."""
    return len(system) + sum(
        len(t.name) + len(t.description) + len(json.dumps(t.input_schema)) for t in tools
    )


def _schema_problem(text: str, schema: JsonObject) -> str | None:
    import jsonschema

    try:
        value = loads_untrusted(text)
    except json.JSONDecodeError as exc:
        return f"not JSON ({exc.msg} at position {exc.pos})"
    except ValueError as exc:
        return f"not usable JSON ({exc})"
    if too_deep(value):
        return f"(root): nested deeper than {MAX_DEPTH} levels"
    error = jsonschema.exceptions.best_match(SchemaValidator(schema).iter_errors(value))
    if error is None:
        return None
    where = ".".join(str(p) for p in error.path) or "(root)"
    return f"{where}: {error.message}"
