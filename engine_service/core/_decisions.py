"""Applying a caller's decisions to a paused run's interrupts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine_service.core._actor import RunActor
from engine_service.core._checkpoint import RunEnv
from engine_service.core._compaction import message_chars
from engine_service.core._errors import invalid, not_found, precondition, shown
from engine_service.core._run import (
    PENDING,
    READY,
    RESOLVED,
    CallOutcome,
    Decision,
    DecisionAction,
    PendingCall,
    PlannedDecision,
    RunMode,
    RunRecord,
    RunSpec,
)
from engine_service.core._types import InterruptKind, JsonObject, Message, RunState
from engine_service.tools._registry import ToolArgumentError, render_result

if TYPE_CHECKING:
    from engine_service.core._engine import Engine

log = logging.getLogger("machina.engine")

# How many paused runs, and how many characters of their transcripts, this process keeps in
# memory to resume without reading them back (the least recently paused go first).
PAUSED_KEPT = 256
PAUSED_CHARS_KEPT = 32_000_000


@dataclass(slots=True)
class PausedRun:
    """A run this process paused, as its pause left it: enough to resume it without reading
    its spec and transcript back. Only trusted while storage still holds ``doc`` exactly."""

    doc: JsonObject  # the state document the pause committed
    spec: RunSpec
    transcript: list[Message]
    env: RunEnv
    workdir_dirty: bool
    counted: int  # transcript entries counted in chars
    chars: int  # the size of the transcript, roughly (message_chars)


class DecisionDesk:
    """Part of an :class:`Engine`, kept beside it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._paused: dict[tuple[str, str], PausedRun] = {}
        self._paused_chars = 0

    # -- runs paused here --------------------------------------------------------------

    def remember(self, actor: RunActor) -> None:
        """Keep a run this process just paused (its lease given up), to resume it quickly."""
        record = actor.record
        if record.state is not RunState.PAUSED or not actor.lease_released or actor.view() is not record:
            return  # not a committed pause (a failed commit shows the older state)
        self.forget(actor.key)
        before = actor.paused_from
        if before is not None and before.transcript is actor.transcript:
            # Resumed from memory: only what it added since needs counting.
            counted, chars = before.counted, before.chars
        else:
            counted, chars = 0, 0
        chars += sum(map(message_chars, actor.transcript[counted:]))
        if chars > PAUSED_CHARS_KEPT // 4:
            return  # too large to keep: read back when resumed
        paused = PausedRun(record.to_json(), actor.spec, actor.transcript, actor.env, actor.workdir_dirty,
                           len(actor.transcript), chars)  # fmt: skip
        self._paused[actor.key] = paused
        self._paused_chars += chars
        while len(self._paused) > PAUSED_KEPT or self._paused_chars > PAUSED_CHARS_KEPT:
            self.forget(next(iter(self._paused)))

    def forget(self, key: tuple[str, str]) -> PausedRun | None:
        paused = self._paused.pop(key, None)
        if paused is not None:
            self._paused_chars -= paused.chars
        return paused

    def recall(self, key: tuple[str, str]) -> RunActor | None:
        """An actor for a run this process paused, built from memory (which lets go of it);
        None if it is not kept. Its record is what the pause committed: `RunActor.take_over`
        with ``expected=actor.paused_from.doc`` checks that storage still says so."""
        paused = self.forget(key)
        if paused is None:
            return None
        record = RunRecord.from_json(paused.doc)
        actor = RunActor(
            record, paused.spec, paused.transcript, paused.env, workdir_dirty=paused.workdir_dirty
        )
        actor.paused_from = paused
        return actor

    def plan(self, actor: RunActor, decisions: list[Decision]) -> list[PlannedDecision]:
        """Validate every decision, then apply them all (all or nothing)."""
        by_id = {p.interrupt.interrupt_id: p for p in actor.record.all_pending() if p.interrupt is not None}
        seen: set[str] = set()
        staged: list[tuple[PendingCall, Decision, JsonObject | None]] = []
        for d in decisions:
            pending = by_id.get(d.interrupt_id)
            if pending is None:
                raise not_found(
                    "ERR_INTERRUPT_NOT_FOUND",
                    f"interrupt {shown(d.interrupt_id)!r} is not pending on run {actor.record.run_id!r}",
                    interrupt_id=shown(d.interrupt_id, 128),
                    run_id=actor.record.run_id,
                )
            if pending.status != PENDING or d.interrupt_id in seen:
                raise precondition(
                    "ERR_INTERRUPT_DECIDED",
                    f"interrupt {d.interrupt_id!r} is already decided",
                    interrupt_id=d.interrupt_id,
                )
            seen.add(d.interrupt_id)
            assert pending.interrupt is not None
            kind = pending.interrupt.kind
            if d.action not in (DecisionAction.APPROVE, DecisionAction.REJECT, DecisionAction.RESPOND):
                raise invalid(
                    "ERR_INVALID_DECISION",
                    f"decision for {d.interrupt_id!r} has no action",
                    interrupt_id=d.interrupt_id,
                )
            if d.action is not DecisionAction.RESPOND and kind is not InterruptKind.APPROVAL:
                raise invalid(
                    "ERR_INVALID_DECISION",
                    f"interrupt {d.interrupt_id!r} is {kind.value}: answer it with respond, not {d.action}",
                    interrupt_id=d.interrupt_id,
                    kind=kind.value,
                )
            edited = None
            if d.action is DecisionAction.APPROVE and d.edited_arguments is not None:
                tool = actor.env.tools.get(pending.call.name)
                assert tool is not None
                try:
                    tool.validate(d.edited_arguments)
                except ToolArgumentError as exc:
                    raise invalid(
                        "ERR_INVALID_EDITS",
                        f"edited arguments for {pending.call.name} do not match its schema: "
                        f"{shown(exc, 500)}",
                        interrupt_id=d.interrupt_id,
                        tool=pending.call.name,
                    ) from None
                edited = d.edited_arguments
            staged.append((pending, d, edited))
        plan = []
        for pending, d, edited in staged:
            plan.append(apply_decision(pending, d.action, edited=edited, reason=d.reason, output=d.output))
        return plan

    async def decide(
        self, actor: RunActor, plan: list[PlannedDecision], by: str, *, all_expired: bool = False
    ) -> None:
        """Record the planned decisions on a run we hold; it continues once none is pending."""
        actor.transition(
            "decided",
            by=by,
            decisions=[
                f"{p.pending.interrupt.interrupt_id}={p.action.value}" for p in plan if p.pending.interrupt
            ],
            expired=all_expired,
        )
        for planned in plan:
            pending = planned.pending
            actor.record_decision(pending, planned.action, by, reason=planned.reason, expired=all_expired)
            if all_expired and pending.outcome is CallOutcome.REJECTED:
                pending.outcome = CallOutcome.EXPIRED
        if actor.record.interrupts:
            await actor.checkpoint()  # still waiting for the other interrupts
            await actor.release()
            self._engine._jobs.arm_expiry(actor.key, actor.record)
            self.remember(actor)
            self._engine._notify(actor.key)
            return
        # A resumed run is asynchronous (its caller is not streaming it): it may hand off.
        actor.record.mode = RunMode.ASYNC
        ws = actor.record.workspace_id
        actor.env.handoff = self._engine._runner.post if self._engine._runner.url(ws) else None
        await actor.commit_start(by)
        self._engine._start(actor, resumed_by=by)


def apply_decision(
    pending: PendingCall,
    action: DecisionAction,
    *,
    edited: JsonObject | None = None,
    reason: str = "",
    output: Any = None,
) -> PlannedDecision:
    """Move a pending call according to a decision; returns what the run's history records."""
    if action is DecisionAction.APPROVE:
        if edited is not None:
            pending.call.arguments = edited
        pending.status = READY
        return PlannedDecision(
            pending, DecisionAction.APPROVE_WITH_EDITS if edited is not None else DecisionAction.APPROVE
        )
    if action is DecisionAction.REJECT:
        pending.status = RESOLVED
        pending.result_text = (
            f"The user rejected this call. Reason: {reason}" if reason else "The user rejected this call."
        )
        pending.result_is_error = True
        pending.outcome = CallOutcome.REJECTED
        return PlannedDecision(pending, DecisionAction.REJECT, reason)
    pending.status = RESOLVED
    pending.result_text = render_result(output)
    pending.result_is_error = False
    pending.outcome = CallOutcome.RESPONDED
    return PlannedDecision(pending, DecisionAction.RESPOND)
