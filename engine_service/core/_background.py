"""Background jobs of an Engine: the recovery sweep, durable timers, handing runs off again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from engine_service.core import _metrics as metrics
from engine_service.core._control import APPROVAL_TIMER, HANDOFF_TIMER, WEBHOOK_TIMER
from engine_service.core._errors import EngineError
from engine_service.core._retention import retention_sweep
from engine_service.core._run import Decision, DecisionAction, RunRecord
from engine_service.core._types import JsonObject, PauseReason, Principal, RunState
from engine_service.tools import sweep_stale_cgroups

if TYPE_CHECKING:
    from engine_service.core._actor import RunActor
    from engine_service.core._engine import Engine

log = logging.getLogger("machina.engine")

# With a control plane a handoff deadline is a timer row; the recovery sweep steps in only for
# a run whose deadline passed this long ago (its timer was lost with the replica that set it).
HANDOFF_SWEEP_GRACE_S = 120.0


class BackgroundJobs:
    """Part of an :class:`Engine`, kept beside it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._retention_at = 0.0  # monotonic time of the next retention sweep

    async def recover_orphaned_runs(self, principal: Principal | None = None) -> list[str]:
        """Resume runs whose executor died: QUEUED/RUNNING with an expired lease. Paused runs stay paused.

        With a principal, only that workspace is swept (the RPC); without, all (the background sweep).
        """
        recovered = []
        for key in await self._candidates(principal):
            if key in self._engine._active or self._engine._closing:
                continue
            with contextlib.suppress(EngineError):
                if await self._recover(key) or await self._recover_handoff(key):
                    recovered.append(key[1])
        return recovered

    async def _candidates(self, principal: Principal | None) -> list[tuple[str, str]]:
        """Runs that may need recovering: with a run index, only those it lists as executing,
        claimed or handed off (finished runs cost nothing); without, every run in storage."""
        control = self._engine.control
        if control.indexed:
            return await control.active_runs(principal.workspace_id if principal else None)
        storage = self._engine.storage
        workspaces = [principal.workspace_id] if principal else await storage.list_workspaces()
        return [(ws, run_id) for ws in workspaces for run_id in await storage.list_runs(ws)]

    async def _recover(self, key: tuple[str, str]) -> bool:
        async with self._engine._lock(key):
            if key in self._engine._active:
                return False
            doc = await self._engine.storage.read_state(*key)
            if doc is None or doc["state"] not in (RunState.QUEUED.value, RunState.RUNNING.value):
                await self._repair_index(key, doc)
                return False
            record = RunRecord.from_json(doc)
            fresh = self._engine._clock() - record.created_at < self._engine.config.lease_ttl_s
            if record.state is RunState.QUEUED and fresh:
                return False  # just created: it is its creator's until the creator takes its lease
            if record.state is RunState.QUEUED and self._engine.control.queued:
                # Neither waiting in the shared queue nor claimed (its creator died before
                # queueing it, or its claimer before starting it): back in line, within the limit.
                await self._engine.control.enqueue(*key, pinned=False)
                return False
            actor = await self._engine._actor_for(record)
            if not await actor.take_over():
                log.debug("run %s is %s but its lease is held; not recovering", key[1], record.state.value)
                return False  # its executor is alive (lease held) or it moved meanwhile
            interrupted = actor.mark_interrupted()
            metrics.LEASE_TAKEOVERS.inc()
            actor.transition("recovered", from_seq=record.last_seq, interrupted_calls=interrupted)
            self._engine._start(actor, resumed_by="recovery")
            return True

    async def _repair_index(self, key: tuple[str, str], doc: JsonObject | None) -> None:
        """The index listed the run as executing or claimed, storage says otherwise: its last
        index rows (and timers) died with the replica that queued them. Write them again."""
        control = self._engine.control
        if not control.indexed:
            return
        if doc is None:
            # Gone from storage, or not there yet: a run being created is indexed first.
            control.forget_unstored(*key, self._engine._clock() - self._engine.config.lease_ttl_s)
            return
        if (doc["state"], doc.get("pause_reason")) == (
            RunState.PAUSED.value,
            PauseReason.HANDOFF_TO_RUNNER.value,
        ):
            return  # handed off: the index lists it as such, as the sweep expects
        await control.committed(doc)
        if doc["state"] == RunState.PAUSED.value:
            self.arm_expiry(key, RunRecord.from_json(doc))

    async def recovery_loop(self) -> None:
        while not self._engine._closing:
            try:
                if self._engine.sandbox_status == "bubblewrap":
                    # Sandboxes a crashed engine on this host may have left (see the function).
                    await asyncio.to_thread(sweep_stale_cgroups)
                await self.recover_orphaned_runs()
            except Exception:
                log.warning("recovery sweep failed; will retry", exc_info=True)
            try:
                await self.arm_approval_deadlines()
            except Exception:
                log.warning("approval deadline sweep failed; will retry", exc_info=True)
            await self._retention_due()
            if not self._engine.config.recovery_interval_s:
                return
            await asyncio.sleep(self._engine.config.recovery_interval_s)

    async def _retention_due(self) -> None:
        """Apply the retention policy when its interval has passed (and at startup)."""
        interval = self._engine.config.retention_interval_s
        now = time.monotonic()
        if not interval or now < self._retention_at:
            return
        self._retention_at = now + interval
        try:
            await retention_sweep(self._engine)
        except Exception:
            log.warning("retention sweep failed; will retry", exc_info=True)

    async def _recover_handoff(self, key: tuple[str, str]) -> bool:
        """A run paused HANDOFF_TO_RUNNER whose lease no runner took (or whose runner's lease
        expired) by its deadline is handed off again, each wait twice as long as the last;
        after ``handoff_attempts`` it fails ERR_RUNNER_LOST. Never a silent hang."""
        if not self._engine._runner.url(key[0]):
            return False  # a runner itself, or no runner for this workspace: not ours to hand on
        # With a control plane the run's timer does this; the sweep only catches a lost timer.
        grace = HANDOFF_SWEEP_GRACE_S if self._engine.control.indexed else 0.0
        return await self._hand_on_if_due(key, grace)

    async def _hand_on_if_due(self, key: tuple[str, str], grace: float) -> bool:
        async with self._engine._lock(key):
            if key in self._engine._active:
                return False
            doc = await self._engine.storage.read_state(*key)
            if doc is None or (doc["state"], doc.get("pause_reason")) != (
                RunState.PAUSED.value,
                PauseReason.HANDOFF_TO_RUNNER.value,
            ):
                return False
            return await self.hand_off_again(key, RunRecord.from_json(doc), force=False, grace=grace)

    def handoff_due(self, record: RunRecord) -> float:
        """When a handed-off run that no runner took is handed off again: each wait twice the last."""
        waited = self._engine.config.handoff_deadline_s * 2.0 ** max(0, min(record.handoff_attempts, 20) - 1)
        return float(record.handoff_at + waited)

    async def hand_off_again(
        self, key: tuple[str, str], record: RunRecord, *, force: bool, grace: float = 0.0
    ) -> bool:
        """Hand a stranded run off again, or give up on it once every attempt is used.

        ``force`` (retry_handoff): now, with a fresh set of attempts; ABORTED if a runner holds it.
        """
        cfg = self._engine.config
        if not force and self._engine._clock() < self.handoff_due(record) + grace:
            return False
        actor = await self._engine._actor_for(record)
        actor.env.handoff = self._engine._runner.post
        if force:
            await self._engine._take_over(actor)
            record.handoff_attempts = 0
        elif not await actor.take_over():
            return False  # a runner holds its lease (it is continuing it), or it moved
        if record.handoff_attempts >= cfg.handoff_attempts:
            await actor.runner_lost()
            self._engine._notify(key)
            log.warning("run %s failed: no runner took it", key[1], extra={"run_id": key[1]})
            return True
        self._engine._spawn(self._hand_on(key, actor))
        return True

    async def _hand_on(self, key: tuple[str, str], actor: RunActor) -> None:
        await actor.hand_off_again()
        record = actor.record
        if record.state is RunState.PAUSED and record.pause_reason is PauseReason.HANDOFF_TO_RUNNER:
            self.arm_handoff(key, record)

    def arm_handoff(self, key: tuple[str, str], record: RunRecord) -> None:
        """With a control plane, a handed-off run's deadline is a timer row: whichever replica
        claims it once due hands the run off again (or fails it ERR_RUNNER_LOST), also after
        the replica that handed it off is gone. A runner that took the run meanwhile makes the
        timer a no-op. Without a control plane the recovery sweep looks at such runs."""
        control = self._engine.control
        if not control.indexed or self._engine._closing or not self._engine._runner.url(key[0]):
            return
        due = self.handoff_due(record)
        now = self._engine._clock()
        if due <= now:
            # Due already, yet not handed on (a runner holds its lease): look again once it lapses.
            due = now + self._engine.config.lease_ttl_s
        control.set_timer(*key, HANDOFF_TIMER, due)

    async def _handoff_timer(self, key: tuple[str, str]) -> None:
        if not self._engine._runner.url(key[0]):
            return
        with contextlib.suppress(EngineError):
            if await self._hand_on_if_due(key, 0.0):
                return
            doc = await self._engine.storage.read_state(*key)
            if doc is not None and (doc["state"], doc.get("pause_reason")) == (
                RunState.PAUSED.value,
                PauseReason.HANDOFF_TO_RUNNER.value,
            ):
                # Not due by this replica's clock, or a runner holds it: look again later.
                self.arm_handoff(key, RunRecord.from_json(doc))

    async def arm_approval_deadlines(self) -> None:
        """Arm a timer for every paused run's approval deadline that no timer here watches.

        Deadlines live in each run's state.json; a timer lives only in the process that
        paused the run. After a restart (or on another replica) this sweep takes over: a
        deadline that passed while no engine was up fires at once. Whichever process fires
        first takes the run's lease and records the expiry; the others find it moved.
        With a control plane, deadlines are timer rows there instead (see `timer_loop`).
        """
        if self._engine.control.indexed:
            return
        for ws in await self._engine.storage.list_workspaces():
            for run_id in await self._engine.storage.list_runs(ws):
                key = (ws, run_id)
                if key in self._engine._active or key in self._engine._timers or self._engine._closing:
                    continue
                with contextlib.suppress(EngineError, ValueError):
                    record = await self._engine._load(key)
                    if record.state is RunState.PAUSED:
                        self.arm_expiry(key, record)

    def arm_expiry(self, key: tuple[str, str], record: RunRecord) -> None:
        """Arm the timers of a paused run: its approval deadline, or its handoff deadline."""
        if record.pause_reason is PauseReason.HANDOFF_TO_RUNNER:
            self.arm_handoff(key, record)
        deadlines = [i.expires_at for i in record.interrupts if i.expires_at]
        if not deadlines or self._engine._closing:
            return
        if self._engine.control.indexed:
            # A row any replica fires, even once this process is gone.
            self._engine.control.set_timer(*key, APPROVAL_TIMER, min(deadlines))
            return
        self.disarm_expiry(key)
        delay = max(0.0, min(deadlines) - self._engine._clock())
        loop = asyncio.get_running_loop()
        self._engine._timers[key] = loop.call_later(delay, lambda: self._engine._spawn(self._expire(key)))

    def disarm_expiry(self, key: tuple[str, str]) -> None:
        self._engine.control.cancel_timer(*key, APPROVAL_TIMER)
        self._engine.control.cancel_timer(*key, HANDOFF_TIMER)
        timer = self._engine._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    async def timer_loop(self) -> None:
        """Fire the control plane's due timers that this replica claims (each is claimed by one)."""
        control = self._engine.control
        # A runner hands nothing off: handoff deadlines are the engines'.
        skip = () if self._engine.claims_work else (HANDOFF_TIMER,)
        while not self._engine._closing:
            try:
                for ws, run_id, kind, token in await control.due_timers(skip):
                    if kind.startswith(WEBHOOK_TIMER):
                        # The attempt sets the next timer or deletes it; a claim it leaves lapses.
                        self._engine.webhooks.retry_due(ws, run_id, kind[len(WEBHOOK_TIMER) :])
                        continue
                    if kind == APPROVAL_TIMER:
                        await self._expire((ws, run_id))
                    elif kind == HANDOFF_TIMER:
                        await self._handoff_timer((ws, run_id))
                    control.timer_fired(ws, run_id, kind, token)
            except Exception:
                log.warning("firing timers failed; will retry", exc_info=True)
            try:
                await control.wait_for_timers(1.0)
            except Exception:  # whatever the database answers, this loop goes on
                log.warning("waiting for timers failed; will retry", exc_info=True)
                await asyncio.sleep(1.0)

    async def _expire(self, key: tuple[str, str]) -> None:
        self._engine._timers.pop(key, None)
        with contextlib.suppress(EngineError):
            record = await self._engine._load(key)
            if record.state is not RunState.PAUSED:
                return
            spec_doc = await self._engine.storage.read_spec(*key) or {}
            approves = bool(spec_doc.get("approval_expiry_approves"))
            now = self._engine._clock()
            due = [i for i in record.interrupts if i.expires_at and i.expires_at <= now]
            if not due:
                self.arm_expiry(key, record)
                return
            decisions = [
                Decision(
                    i.interrupt_id,
                    DecisionAction.APPROVE if approves else DecisionAction.REJECT,
                    reason="the approval expired",
                )
                for i in due
            ]
            await self._resume_expired(key, decisions)

    async def _resume_expired(self, key: tuple[str, str], decisions: list[Decision]) -> None:
        principal = Principal(key[0], "system:expiry")
        async with self._engine._lock(key):
            if key in self._engine._active:
                return
            record = await self._engine._load(key)
            if record.state is not RunState.PAUSED:
                return
            actor = await self._engine._actor_for(record)
            plan = self._engine._decisions.plan(actor, decisions)
            if not await actor.take_over():
                return
            await self._engine._decisions.decide(actor, plan, principal.identity, all_expired=True)
