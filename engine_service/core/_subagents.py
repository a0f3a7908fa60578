"""Subagents: the ``Agent`` tool starts a child agent inside its parent's run.

A child is a loop of model turns like the run's own agent, with its own task, transcript and
budget, and tools that can only narrow its parent's. It is moved by the run's actor: the same
lease, event log and checkpoints, so a crash recovers the children with the run. Several
``Agent`` calls of one turn run in parallel, like any calls.

- Its path names it: the call ids from the run down to it, joined by ``/`` (``call_1_1``, then
  ``call_1_1/call_2_1`` for a child of that child). Its events carry the path
  (``Event.agent_path``), so the run's one stream shows the whole tree.
- Its state (turns, usage, pending calls, answer) is ``RunRecord.children[path]``, committed
  with the run's; its transcript is the blob ``agent-<path>-transcript`` (``/`` as ``.``), of
  which ``ChildState.transcript_len`` entries are committed. Once its answer is in its
  caller's transcript, the next checkpoint drops it from ``children`` (`_retire_agents`).
- A child's call that needs a decision pauses the run with that interrupt (its
  ``agent_path`` set); deciding it through ResumeRun resumes the child where it stopped.
- Budgets: a child's own (``max_turns`` …, at most the run's turns) end the child only: its
  parent's call gets an error result. Its tokens and cost count for the run too, so the run's
  budgets bound the whole tree and end the run. Cancelling the run cancels its children.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

from engine_service.core._checkpoint import legacy_transcript_blob, transcript_blob
from engine_service.core._dispatch import REQUEST_EVENT, ToolDispatch, distinct_call_ids
from engine_service.core._ids import is_valid_id
from engine_service.core._run import (
    PENDING,
    READY,
    RESOLVED,
    AgentState,
    CallOutcome,
    ChildState,
    PendingCall,
    RunError,
)
from engine_service.core._types import EventKind, Message, ToolCall, ToolChoice, Usage
from engine_service.models import (
    ModelAdapter,
    ModelError,
    ModelRequest,
    ScriptedModel,
    TextChunk,
    ToolSpec,
    TurnResult,
)
from engine_service.tools._registry import AGENT_TOOL, Tool, capability_error


class ChildStopped(Exception):
    """A subagent reached one of its own limits: it ends, the run goes on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class Subagents(ToolDispatch):
    """Starts, moves and ends the run's subagents (see the module docstring)."""

    async def _run_agent(self, call: ToolCall, parent_path: str) -> tuple[str, bool] | None:
        """The ``Agent`` call ``call`` of the agent at ``parent_path``: the child's answer as the
        call's result, or None when the child (or one of its own) paused for a decision."""
        if not is_valid_id(call.call_id):
            # The call id names the child (its path, its events, its state): the model chose
            # it, so it must be an id, never a path of its own ("a/b") or a name of any length.
            self.emit(EventKind.TOOL_CALL_STARTED, {"call": call.to_json()}, parent_path)
            return self._agent_result(
                call, parent_path, "ERR_AGENT_CALL_ID: a subagent's call id must match "
                "[A-Za-z0-9][A-Za-z0-9._-]{0,127}; this one does not, so no subagent started.", True
            )  # fmt: skip
        path = f"{parent_path}/{call.call_id}" if parent_path else call.call_id
        if path in self._moving_agents:  # the same call id twice in one turn
            return self._agent_result(
                call, parent_path, f"ERR_AGENT_CALL_ID: call id {call.call_id!r} is used by another "
                "Agent call of this turn; no second subagent started.", True
            )  # fmt: skip
        self._moving_agents.add(path)
        try:
            return await self._move_agent(call, path, parent_path)
        finally:
            self._moving_agents.discard(path)

    async def _move_agent(self, call: ToolCall, path: str, parent_path: str) -> tuple[str, bool] | None:
        child = self.record.children.get(path)
        if child is None:
            self.emit(EventKind.TOOL_CALL_STARTED, {"call": call.to_json()}, parent_path)
            made = self._new_child(call, path, parent_path)
            if isinstance(made, str):
                return self._agent_result(call, parent_path, made, True)
            child = made
        if child.state is not AgentState.RUNNING:  # it ended before the run last stopped
            return self._agent_result(call, parent_path, *_answer(child))
        transcript = await self._child_transcript(child)
        try:
            answer = await self._child_loop(child, transcript)
        except ChildStopped as stop:
            self._end_child(child, AgentState.FAILED, error=RunError(stop.code, stop.message))
        except ModelError as error:
            self._end_child(child, AgentState.FAILED, error=RunError(error.code, error.message))
        else:
            if answer is None:
                return None
            self._end_child(child, AgentState.DONE, output=answer)
        return self._agent_result(call, parent_path, *_answer(child))

    def _new_child(self, call: ToolCall, path: str, parent_path: str) -> ChildState | str:
        """A new child for ``call``, or why there is none (the call's error result)."""
        args: dict[str, Any] = call.arguments
        depth = path.count("/") + 1
        limit = self.env.max_agent_depth
        if depth > limit:
            return f"ERR_AGENT_DEPTH: subagents nest at most {limit} deep; this one would be {depth} deep."
        available = self._tools_of(parent_path)
        requested = args.get("tools")
        if requested is None:
            names = [n for n in available if n != AGENT_TOOL or depth < limit]
        else:
            if outside := sorted(set(requested) - set(available)):
                return (
                    f"ERR_AGENT_TOOLS: a subagent may only use tools its parent has; not available: "
                    f"{', '.join(outside)}."
                )
            if AGENT_TOOL in requested and depth >= limit:
                return f"ERR_AGENT_DEPTH: subagents nest at most {limit} deep; this one could not start more."
            names = list(dict.fromkeys(requested))
        working = sum(1 for c in self.record.children.values() if c.state is AgentState.RUNNING)
        if working >= self.env.max_parallel_agents:
            return (
                f"ERR_AGENT_LIMIT: at most {self.env.max_parallel_agents} subagents of a run work at once "
                "and that many are working; this call started none. Call Agent again once some have answered."
            )
        turns_left, tokens_left, cost_left = self._left(parent_path)
        if (
            turns_left <= 0
            or (tokens_left is not None and tokens_left <= 0)
            or (cost_left is not None and cost_left <= 0)
        ):
            return "ERR_AGENT_BUDGET: the caller has no budget left (turns, tokens or cost) for a subagent."
        child = ChildState(
            path=path,
            task=str(args["task"]),
            tools=names,
            max_turns=_within(int(args.get("max_turns") or 0), turns_left),
            max_tokens=_within(int(args.get("max_tokens") or 0), tokens_left),
            max_cost_usd=_within(float(args.get("max_cost_usd") or 0.0), cost_left),
        )
        self.record.children[path] = child
        self._child_transcripts[path] = [Message("user", child.task)]
        self.emit(
            EventKind.AGENT_STARTED,
            {"task": child.task, "tools": names, "max_turns": child.max_turns,
             "max_tokens": child.max_tokens, "max_cost_usd": child.max_cost_usd},
            path,
        )  # fmt: skip
        return child

    def _left(self, path: str) -> tuple[int, int | None, float | None]:
        """What the agent at ``path`` ("" the run's own) has left of its turns, tokens and cost
        (None: no limit), bounded by what each of its parents and the run have left."""
        meta, spec = self.record.meta, self.spec
        turns = self.env.max_turns - meta.turns
        tokens = spec.max_tokens - meta.usage.total if spec.max_tokens else None
        cost = spec.max_cost_usd - meta.cost_usd if spec.max_cost_usd else None
        for payer in self._payers(path):
            turns = payer.max_turns - payer.turns  # a child's turns are its own, within its parent's
            if payer.max_tokens:
                tokens = _least(tokens, payer.max_tokens - payer.usage.total)
            if payer.max_cost_usd:
                cost = _least(cost, payer.max_cost_usd - payer.cost_usd)
        return turns, tokens, cost

    def _payers(self, path: str) -> list[ChildState]:
        """The subagent at ``path`` and its parents, outermost first (none for the run's own)."""
        if not path:
            return []
        parts = path.split("/")
        return [self.record.children["/".join(parts[: i + 1])] for i in range(len(parts))]

    def _retire_agents(self, pending: list[PendingCall], path: str) -> None:
        """The answers of ``pending``'s Agent calls are in their caller's transcript now: the
        subagents that gave them (and theirs) leave the state document at the next checkpoint."""
        for p in pending:
            if p.call.name == AGENT_TOOL:
                child = f"{path}/{p.call.call_id}" if path else p.call.call_id
                self._retiring.update(
                    c for c in self.record.children if c == child or c.startswith(child + "/")
                )

    def _tools_of(self, path: str) -> dict[str, Tool]:
        if not path:
            return self.env.tools
        child = self.record.children[path]
        return {n: self.env.tools[n] for n in child.tools if n in self.env.tools}

    def _agent_result(self, call: ToolCall, parent_path: str, text: str, is_error: bool) -> tuple[str, bool]:
        self.emit(
            EventKind.TOOL_CALL_COMPLETED,
            {"call_id": call.call_id, "tool": call.name, "is_error": is_error, "size": len(text.encode()),
             "output": text, "duration_ms": 0, "outcome": CallOutcome.RAN.value},
            parent_path,
        )  # fmt: skip
        return text, is_error

    def _end_child(
        self, child: ChildState, state: AgentState, *, output: str = "", error: RunError | None = None
    ) -> None:
        child.state, child.output, child.error = state, output, error
        child.pending = []
        self.emit(
            EventKind.AGENT_FINISHED,
            {"state": state.value, "output": output, "error": None if error is None else error.to_json(),
             "meta": child.meta().to_json()},
            child.path,
        )  # fmt: skip

    def end_children(self, state: AgentState, reason: str) -> None:
        """The run ends: so do the children still running (deepest first)."""
        for child in sorted(self.record.children.values(), key=lambda c: -c.path.count("/")):
            if child.state is AgentState.RUNNING:
                code = "ERR_CANCELLED" if state is AgentState.CANCELLED else "ERR_PARENT_ENDED"
                self._end_child(child, state, error=RunError(code, reason))

    async def _child_transcript(self, child: ChildState) -> list[Message]:
        transcript = self._child_transcripts.get(child.path)
        if transcript is None:
            blob = await self.env.storage.get_blob(*self.key, transcript_blob(child.path))
            legacy = legacy_transcript_blob(child.path)
            if not blob and child.transcript_len and legacy is not None:
                blob = await self.env.storage.get_blob(*self.key, legacy)  # stored before names were hashed
            docs = json.loads(blob) if blob else []
            # Entries past the committed ones were written by a process that died before its
            # checkpoint: the child redoes that work.
            transcript = [Message.from_json(d) for d in docs[: child.transcript_len]]
            if not transcript:
                transcript = [Message("user", child.task)]
            self._child_transcripts[child.path] = transcript
        return transcript

    # -- the child's loop ------------------------------------------------------------

    async def _child_loop(self, child: ChildState, transcript: list[Message]) -> str | None:
        """Move the child until it answers (its answer) or waits for a decision (None)."""
        tools = self._tools_of(child.path)
        if child.pending and not await self._child_dispatch(child, transcript, tools):
            return None
        while True:
            self._check_limits()  # the run's budgets bound its subagents too
            self._check_child_limits(child)
            result = await self._child_turn(child, transcript, tools)
            if not result.tool_calls:
                return result.text
            child.pending = [self._plan(call, tools, child.path) for call in result.tool_calls]
            if any(p.status == PENDING for p in child.pending):
                for p in child.pending:
                    if p.status == PENDING and p.interrupt is not None:
                        self.emit(
                            REQUEST_EVENT[p.interrupt.kind], {"interrupt": p.interrupt.to_json()}, child.path
                        )
                return None
            if any(p.status == READY and not self._idempotent(p.call.name) for p in child.pending):
                await self.checkpoint()  # a crash during such a call then knows it was in flight
            if not await self._child_dispatch(child, transcript, tools):
                return None

    def _check_limits(self) -> None:
        raise NotImplementedError  # RunActor

    def _check_child_limits(self, child: ChildState) -> None:
        if child.turns >= child.max_turns:
            raise ChildStopped("ERR_MAX_TURNS", f"the subagent reached its limit of {child.max_turns} turns")
        # What a subagent spends, its parents spend too (`_spend`): the budget of any of them
        # that is spent ends it, not only its own (parallel siblings share their parent's).
        for payer in reversed(self._payers(child.path)):
            who = "the subagent" if payer is child else f"its parent agent {payer.path!r}"
            if payer.max_tokens and payer.usage.total >= payer.max_tokens:
                raise ChildStopped(
                    "ERR_TOKEN_BUDGET", f"{who} used {payer.usage.total} of {payer.max_tokens} tokens"
                )
            if payer.max_cost_usd and payer.cost_usd >= payer.max_cost_usd:
                raise ChildStopped(
                    "ERR_COST_BUDGET", f"{who} cost ${payer.cost_usd:.4f} of ${payer.max_cost_usd:.4f}"
                )

    async def _child_dispatch(
        self, child: ChildState, transcript: list[Message], tools: dict[str, Tool]
    ) -> bool:
        for p in child.pending:
            tool = tools.get(p.call.name)
            if p.status == READY and tool is not None and tool.missing:
                # A subagent's calls are not handed to a runner: a tool this host lacks answers so.
                p.status, p.result_is_error, p.outcome = RESOLVED, True, CallOutcome.CAPABILITY_MISSING
                p.result_text = capability_error(p.call.name, tool.missing)
        results = await self._run_pending(child.pending, child.path)
        if results is None:
            return False
        for p in child.pending:
            text, is_error = results[p.call.call_id]
            transcript.append(
                Message("tool", text, call_id=p.call.call_id, tool_name=p.call.name, is_error=is_error)
            )
        self._retire_agents(child.pending, child.path)
        child.pending = []
        await self.checkpoint()
        return True

    def _child_model(self, path: str) -> ModelAdapter:
        model = self._child_models.get(path)
        if model is None:
            if isinstance(self.env.model, ScriptedModel):
                model = ScriptedModel(self.spec.agent_scripts.get(path, []), self.env.model.name)
            else:
                model = self.env.model
            self._child_models[path] = model
        return model

    async def _child_turn(
        self, child: ChildState, transcript: list[Message], tools: dict[str, Tool]
    ) -> TurnResult:
        return await self._measured_model_call(
            self._child_model(child.path), lambda: self._child_call(child, transcript, tools), child.path
        )

    async def _child_call(
        self, child: ChildState, transcript: list[Message], tools: dict[str, Tool]
    ) -> TurnResult:
        env, path = self.env, child.path
        turn = child.turns + 1
        specs = [t.spec() for t in tools.values()]
        request = ModelRequest(
            system=env.system_prompt,
            messages=await self._context_messages(specs, child),
            tools=specs,
            tool_choice=ToolChoice.AUTO,
            max_output_tokens=env.max_output_tokens,
            turn=child.turns,
        )
        result: TurnResult | None = None
        async for item in self._child_model(path).stream(request):
            if isinstance(item, TextChunk):
                self.emit(EventKind.TEXT_DELTA, {"text": item.text, "turn": turn}, path)
            else:
                result = item
        if result is None:
            raise ModelError("ERR_MODEL_STREAM", "the model stream ended without a result")
        result.tool_calls = distinct_call_ids(result.tool_calls, turn)
        child.turns = turn
        cost = result.usage.cost(env.price)
        self._spend(path, result.usage, cost)
        self.record.meta.usage.add(result.usage)
        self.record.meta.cost_usd += cost
        self._observe_context(path, result.usage.input_tokens)
        transcript.append(Message("assistant", result.text, result.tool_calls))
        self.emit(
            EventKind.ASSISTANT_MESSAGE,
            {"text": result.text, "calls": [c.to_json() for c in result.tool_calls], "turn": turn},
            path,
        )
        self.emit(EventKind.USAGE, {"turn": turn, "usage": result.usage.to_json(), "cost_usd": cost}, path)
        return result

    async def _context_messages(
        self, tools: Sequence[ToolSpec], child: ChildState | None = None
    ) -> Sequence[Message]:
        raise NotImplementedError  # RunActor: what the model sees, compacted when it grows

    def _observe_context(self, path: str, input_tokens: int) -> None:
        raise NotImplementedError  # RunActor: the request's size as the model reported it

    def _spend(self, path: str, usage: Usage, cost: float) -> None:
        """What a subagent spends, its parents spend too: their budgets bound it."""
        for payer in self._payers(path):
            payer.usage.add(usage)
            payer.cost_usd += cost


_N = TypeVar("_N", int, float)


def _within(asked: _N, left: _N | None) -> _N:
    """A child's budget: what its call asked for (0: as much as it may), at most what is left."""
    if left is None:
        return asked
    return min(asked, left) if asked else left


def _least(a: _N | None, b: _N) -> _N:
    return b if a is None else min(a, b)


def _answer(child: ChildState) -> tuple[str, bool]:
    if child.state is AgentState.DONE:
        return child.output, False
    error = child.error or RunError("ERR_INTERNAL", "the subagent ended without an answer")
    return f"The subagent stopped without an answer: {error.message} ({error.code}).", True
