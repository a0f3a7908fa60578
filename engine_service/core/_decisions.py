"""Applying a caller's decisions to a paused run's interrupts."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from engine_service.core._actor import RunActor
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
)
from engine_service.core._types import InterruptKind, JsonObject
from engine_service.tools._registry import ToolArgumentError, render_result

if TYPE_CHECKING:
    from engine_service.core._engine import Engine

log = logging.getLogger("machina.engine")


class DecisionDesk:
    """Part of an :class:`Engine`, kept beside it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

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
