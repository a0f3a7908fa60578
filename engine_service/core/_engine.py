"""The engine: the run lifecycle API the gRPC servicer (and the runner) call.

Every method takes the caller's `Principal`; a run is only ever looked up
inside the caller's workspace, so one tenant can never see another's runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from engine_service.core import _metrics as metrics
from engine_service.core import _telemetry as telemetry
from engine_service.core._actor import RunActor
from engine_service.core._background import BackgroundJobs
from engine_service.core._catalogue import ToolCatalogue, builtin_tools, host_capabilities
from engine_service.core._checkpoint import CANCEL_REQUEST
from engine_service.core._config import EngineConfig
from engine_service.core._control import ControlPlane, LocalControl, control_unavailable
from engine_service.core._decisions import DecisionDesk
from engine_service.core._deletion import Deleter
from engine_service.core._errors import (
    EngineError,
    ErrorKind,
    aborted,
    invalid,
    not_found,
    precondition,
    shown,
)
from engine_service.core._handoff import RunnerClient
from engine_service.core._idempotency import check_same_request, fingerprint
from engine_service.core._ids import check_id, new_id
from engine_service.core._limits import is_small
from engine_service.core._reading import RunReader, settled
from engine_service.core._retention import RetentionReport, apply_retention
from engine_service.core._run import (
    ClientToolDef,
    Decision,
    PlannedDecision,
    RunMode,
    RunRecord,
    RunSpec,
    ToolResultPage,
)
from engine_service.core._threads import Placement, Thread, ThreadDesk
from engine_service.core._types import (
    Event,
    JsonObject,
    Message,
    PauseReason,
    Principal,
    RunState,
)
from engine_service.core._validate import SpecChecks
from engine_service.models._select import (
    ModelFactory,
    default_model_factory,
    load_script_file,
    model_price,
    resolve_default_model,
)
from engine_service.net._egress import EgressPolicy
from engine_service.net._webhooks import WebhookSender
from engine_service.storage._protocol import Storage
from engine_service.storage._workdir_snapshot import WorkdirSnapshots
from engine_service.tools import (
    Sandbox,
    describe_sandbox,
)
from engine_service.tools._registry import (
    ToolRegistry,
)

log = logging.getLogger("machina.engine")

# How many runs claimed from the shared work queue one engine starts at once.
_STARTING = 8
# Run errors that resuming without decisions retries (a fresh handoff from the same checkpoint).
_HANDOFF_FAILURES = ("ERR_RUNNER_UNREACHABLE", "ERR_RUNNER_LOST")


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        storage: Storage,
        *,
        tools: ToolRegistry | None = None,
        model_factory: ModelFactory | None = None,
        clock: Callable[[], float] = time.time,
        egress: EgressPolicy | None = None,
        control: ControlPlane | None = None,
    ) -> None:
        config.check_runner_secrets()  # never hand a run off unauthenticated
        self.config = config
        # Where replicas coordinate (a run index, a work queue, timers, live fan-out); the
        # default is none: storage alone, as for one engine.
        self.control: ControlPlane = control or LocalControl()
        # Whether this process takes runs from the control plane's work queue (a runner does not).
        self.claims_work = True
        # The newest seq another replica announced for runs watched here, and how many watch each.
        self._remote_seq: dict[tuple[str, str], int] = {}
        self._watchers: dict[tuple[str, str], int] = {}
        self.storage = metrics.instrument_storage(storage)
        # Where tenants' specs and models may send requests (per-run ApiCall services, webhooks).
        self.egress = egress or config.egress_policy()
        self.sandbox = Sandbox.from_config(config)
        self.tools = tools or ToolRegistry(builtin_tools(config, self.egress, self.sandbox))
        self._capabilities = host_capabilities(config, self.sandbox)
        self._checks = SpecChecks(self)
        self._catalogue = ToolCatalogue(self)
        self._jobs = BackgroundJobs(self)
        self._reader = RunReader(self)
        self._decisions = DecisionDesk(self)
        self.threads = ThreadDesk(self)
        self.deleter = Deleter(self)
        self._model_factory = model_factory or default_model_factory(config)
        self._clock = clock
        self._owner = f"engine-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._active: dict[tuple[str, str], RunActor] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._lock_users: dict[tuple[str, str], int] = {}
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._changes: dict[tuple[str, str], asyncio.Event] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._runner = RunnerClient(config)
        self._default_provider, self._default_model = resolve_default_model(config)
        self._started = False
        # Only secrets configured for webhooks, per workspace: never the process environment.
        # With a control plane each next attempt of a webhook is a timer row any replica fires.
        self.webhooks = WebhookSender(
            storage,
            config.webhook_secret,
            egress=self.egress,
            timers=self.control if self.control.indexed else None,
            trace_hosts=config.propagate_trace_to,
        )
        snapshot_max = config.workdir_snapshot_max_bytes
        root = Path(config.workdir_root).resolve()
        self._snapshots = WorkdirSnapshots(root, snapshot_max) if snapshot_max else None
        self._default_script = (
            load_script_file(config.model.script_file) if config.model.script_file else None
        )

    async def start(self) -> None:
        """Connect the configured MCP servers and add their tools to the catalogue.

        A stdio server needs the ``subprocess`` capability. A host without it
        cannot start one, so it offers the tools a runner published (capability
        stubs the model still sees, handed to the runner when called).
        """
        if self._started:
            return
        self._started = True
        level, line = describe_sandbox(self.sandbox, self.config.capabilities_subprocess)
        log.log(level, line, extra={"sandbox": self.sandbox_status})
        await self.control.start(self._owner, self._heard, self.storage.read_state)
        if self.control.indexed:
            self._spawn(self._jobs.timer_loop())
        if self.control.queued and self.claims_work:
            self._spawn(self._work_loop())
        self._spawn(self._jobs.recovery_loop())
        self._spawn(self.webhooks.resume_pending_all())  # webhooks a previous process left pending
        await self._catalogue.connect_mcp()

    @property
    def sandbox_status(self) -> str:
        """How processes for runs are confined: ``bubblewrap``, ``none`` (unsandboxed, on the
        operator's word), ``unavailable`` (no sandbox here, so no subprocess capability) or
        ``off`` (the subprocess capability is turned off)."""
        if not self.config.capabilities_subprocess:
            return "off"
        return self.sandbox.status()

    @property
    def default_model(self) -> str:
        return f"{self._default_provider}:{self._default_model}"

    # -- starting runs ---------------------------------------------------------------

    async def create_run(
        self,
        principal: Principal,
        spec: RunSpec,
        client_tools: Sequence[ClientToolDef] = (),
        *,
        mode: str = RunMode.ASYNC,
        api_env: Mapping[str, str] | None = None,
        webhook: Mapping[str, Any] | None = None,
    ) -> tuple[RunRecord, bool]:
        """Start a run in the background. Returns (run, created); idempotent on run_id/request_id."""
        self._check_open()
        ws = principal.workspace_id
        # Taken before validation fills in defaults: a retry repeats the request as it was sent.
        request_fp = fingerprint(spec.to_json(), [dataclasses.asdict(t) for t in client_tools], webhook)
        structured = [
            spec.output_schema,
            [t.input_schema for t in client_tools],
            [arguments for turn in spec.script or () for _, arguments in turn.tool_calls],
        ]
        if is_small(structured):
            self._checks.validate_spec(spec, client_tools)
        else:
            # Checking large schemas and scripts is seconds of pure-Python work: off the loop.
            await asyncio.to_thread(self._checks.validate_spec, spec, client_tools)
        webhook_doc = self._checks.validate_webhook(ws, webhook)
        id_chosen = bool(spec.run_id)  # by the caller: it may be a thread's id too
        # The trace this request is part of: whichever process moves the run later continues it.
        spec.traceparent = spec.traceparent or telemetry.current_traceparent()
        if spec.request_id:
            # The idempotency key maps to one run id; whoever reaches the run
            # first creates it, everyone else gets the same run back.
            check_id(spec.request_id, "request_id")
            proposed = spec.run_id or new_id("run")
            claimed = await self.storage.put_if_absent(
                ws, spec.request_id, {"run_id": proposed, "fingerprint": request_fp}
            )
            if claimed is not None:
                check_same_request(spec.request_id, claimed.get("fingerprint"), request_fp, "CreateRun")
            if claimed is not None and spec.run_id and claimed["run_id"] != spec.run_id:
                raise EngineError(
                    "ERR_RUN_EXISTS",
                    f"request_id {spec.request_id!r} was already used for run {claimed['run_id']!r}",
                    kind=ErrorKind.ALREADY_EXISTS,
                    metadata={"run_id": claimed["run_id"], "request_id": spec.request_id},
                )
            spec.run_id = claimed["run_id"] if claimed is not None else proposed
        run_id = check_id(spec.run_id, "run_id") if spec.run_id else new_id("run")
        spec.run_id = run_id
        key = (ws, run_id)
        async with self._lock(key):
            existing_doc = await self.storage.read_state(ws, run_id)
            if existing_doc is not None:
                record = RunRecord.from_json(existing_doc)
                if spec.request_id and record.request_id == spec.request_id:
                    return self._live(record), False
                raise EngineError(
                    "ERR_RUN_EXISTS",
                    f"run {run_id!r} already exists; pass the same request_id to retry a start safely",
                    kind=ErrorKind.ALREADY_EXISTS,
                    metadata={"run_id": run_id},
                )
            provider, model_name = self._checks.choose_model(spec)
            price = model_price(self.config, self._default_provider, provider, model_name)
            if spec.max_cost_usd and price is None:
                raise invalid(
                    "ERR_PRICE_UNKNOWN",
                    f"max_cost_usd needs the price of {provider}:{shown(model_name)}, which this engine "
                    f"does not know; configure model.{provider}.prices",
                    field="max_cost_usd",
                    model=f"{provider}:{shown(model_name)}",
                )
            now = self._clock()
            placement = await self.threads.place(ws, spec, now, id_chosen=id_chosen)
            try:
                if placement is not None:
                    await self.threads.claim(ws, placement, run_id, now)
                    spec.thread_id, spec.context = placement.thread_id, placement.context
                record, actor = await self._new_run(
                    ws, spec, client_tools, provider, model_name, now, mode, webhook_doc, api_env, placement
                )
            except BaseException:
                if placement is not None:
                    with contextlib.suppress(Exception):
                        if await self.storage.read_state(ws, run_id) is None:
                            # The place is free again; a fork's thread goes.
                            await self.threads.unclaim(ws, placement, run_id)
                raise
            if actor is None:
                if self.control.queued:
                    return record, True  # queued: a replica starts it when its turn comes
                return await self._load(key), True
            await actor.commit_start(None)
            metrics.RUNS_CREATED.inc(record.mode.value)
            actor.transition("created", model=record.meta.model, mode=record.mode.value)
            self._start(actor, resumed_by=None)
        return record, True

    async def _work_loop(self) -> None:
        """Execute runs from the shared work queue as long as the engine is open: claims one at
        a time, starts up to ``_STARTING`` at once (a start is a few storage round trips)."""
        starting = asyncio.Semaphore(_STARTING)
        while not self._closing:
            await starting.acquire()
            try:
                key = await self.control.claim()
            except Exception:
                log.warning("claiming queued runs failed; will retry", exc_info=True)
                key = None
            if key is None:
                starting.release()
                await self.control.wait_for_work(1.0)
                continue
            self._spawn(self._start_claimed(key, starting))

    async def _start_claimed(self, key: tuple[str, str], starting: asyncio.Semaphore) -> None:
        try:
            await self._start_queued(key)
        except Exception:
            log.warning("starting queued run %s failed", key[1], exc_info=True, extra={"run_id": key[1]})
            self.control.release_slot(*key)
        finally:
            starting.release()

    async def _start_queued(self, key: tuple[str, str]) -> None:
        async with self._lock(key):
            if key in self._active:
                return
            record = await self._load(key)
            if record.state is not RunState.QUEUED:  # cancelled while it waited
                self.control.release_slot(*key)
                return
            actor = await self._actor_for(record)
            if not await actor.take_over():
                self.control.release_slot(*key)
                return
            await actor.commit_start(None)
            metrics.RUNS_DEQUEUED.inc()
            actor.transition("created", model=record.meta.model, mode=record.mode.value)
            self._start(actor, resumed_by=None)

    def _heard(self, ws: str, run_id: str, seq: int, state: str) -> None:
        """Another replica (or this one) announced a change of a run; ``ws`` "": maybe any run."""
        if not ws:
            for key in list(self._changes):
                self._notify(key)
            return
        key = (ws, run_id)
        if key not in self._watchers:
            return  # nobody here watches it
        if seq > self._remote_seq.get(key, 0):
            self._remote_seq[key] = seq
        self._notify(key)

    @contextlib.contextmanager
    def _watching(self, key: tuple[str, str]) -> Iterator[None]:
        """While a watcher (a stream, a wait) follows the run: what replicas announce of it is kept."""
        self._watchers[key] = self._watchers.get(key, 0) + 1
        try:
            yield
        finally:
            self._watchers[key] -= 1
            if not self._watchers[key]:
                del self._watchers[key]
                self._remote_seq.pop(key, None)

    async def _new_run(
        self,
        ws: str,
        spec: RunSpec,
        client_tools: Sequence[ClientToolDef],
        provider: str,
        model_name: str,
        now: float,
        mode: str,
        webhook_doc: JsonObject | None,
        api_env: Mapping[str, str] | None,
        placement: Placement | None,
    ) -> tuple[RunRecord, RunActor | None]:
        """Write the run and take its lease; (record, None) if another process took it first, or
        if it waits in the control plane's work queue."""
        run_id = spec.run_id
        key = (ws, run_id)
        record = RunRecord(
            run_id=run_id,
            workspace_id=ws,
            task=spec.task,
            state=RunState.QUEUED,
            created_at=now,
            updated_at=now,
            request_id=spec.request_id,
            labels=dict(spec.labels),
            deadline_at=now + spec.timeout_ms / 1000 if spec.timeout_ms else 0.0,
            mode=RunMode(mode),
            webhook=webhook_doc,
            thread_id=placement.thread_id if placement is not None else "",
            thread_slot=placement.slot if placement is not None else 0,
        )
        record.meta.model = f"{provider}:{model_name}"
        spec_doc = spec.to_json()
        spec_doc["client_tools"] = [
            {"name": t.name, "description": t.description, "input_schema": t.input_schema}
            for t in client_tools
        ]
        if problem := self.control.available():
            raise control_unavailable(problem)
        state = record.to_json()
        if self.control.queued:
            # Indexed first: if this process dies before the run is queued, the recovery sweep
            # finds the row and queues the run (a row whose run never reached storage goes).
            await self.control.index_now(state)
        if not await self.storage.create_run(ws, run_id, spec_doc, state):
            if self.control.queued and (existing := await self.storage.read_state(ws, run_id)) is not None:
                await self.control.committed(existing)  # the row is that run's, not this attempt's
            raise aborted("ERR_CONCURRENT_UPDATE", f"run {run_id!r} was created concurrently", run_id=run_id)
        transcript = [Message("user", spec.task)]
        if api_env:
            self._catalogue.run_api_env[key] = dict(api_env)
        if self.control.queued:
            # It waits in the shared queue: whichever replica claims it first (within its
            # workspace's limit) executes it. Credentials held in memory pin it here. Its index
            # row was written before it was created: whoever lists runs next, anywhere, sees it.
            record.queue_position = await self.control.enqueue(
                ws, run_id, pinned=bool(api_env) or not self.claims_work
            )
            metrics.RUNS_CREATED.inc(record.mode.value)
            metrics.RUNS_ENQUEUED.inc()
            log.info("run %s queued", run_id, extra={"run_id": run_id, "workspace": ws})
            return record, None
        await self.control.committed(record.to_json())
        actor = RunActor(
            record,
            spec,
            transcript,
            self._catalogue.run_env(ws, spec, spec_doc, provider, model_name, mode),
        )
        if not await actor.take_over():
            # It exists and another process (a recovery sweep that ignored the grace period
            # of a fresh run) moves it: answer with the run, not an error.
            log.warning("run %s was taken by another process as it was created", run_id,
                        extra={"run_id": run_id, "workspace": ws})  # fmt: skip
            return record, None
        return record, actor

    def _start(self, actor: RunActor, *, resumed_by: str | None) -> None:
        self.control.hold_slot(*actor.key)
        if resumed_by is not None and resumed_by != "recovery":
            how = resumed_by if resumed_by in ("runner", "system:expiry") else "caller"
            metrics.RUNS_RESUMED.inc(how)
            actor.transition("resumed", by=resumed_by)
        self._active[actor.key] = actor
        # Watchers first: woken before the run's task is, they show what the start committed
        # before the run moves on.
        self._notify(actor.key)
        actor.start(resumed_by=resumed_by)
        assert actor.task is not None
        actor.task.add_done_callback(lambda _t: self._on_actor_done(actor))

    def _on_actor_done(self, actor: RunActor) -> None:
        if self._active.get(actor.key) is actor:
            del self._active[actor.key]
        record = actor.view()  # as committed: a run parked by a storage outage is not what it tried
        if record.state.terminal and not (record.error and record.error.code in _HANDOFF_FAILURES):
            self._catalogue.run_api_env.pop(actor.key, None)
        if record.state is RunState.PAUSED:
            self._jobs.arm_expiry(actor.key, record)
            if settled(record) and not self._closing:
                self._decisions.remember(actor)
        self.control.release_slot(*actor.key)
        self._notify(actor.key)

    # -- reading runs ---------------------------------------------------------------------

    async def get_run(self, principal: Principal, run_id: str) -> RunRecord:
        key = (principal.workspace_id, check_id(run_id, "run_id"))
        actor = self._active.get(key)
        if actor is not None and not actor.lease_released:
            return actor.view()
        record = await self._load(key)
        if record.state is RunState.QUEUED and self.control.queued:
            with contextlib.suppress(EngineError):
                record.queue_position = await self.control.queue_position(*key)
        return record

    async def _load(self, key: tuple[str, str]) -> RunRecord:
        doc = await self.storage.read_state(*key)
        if doc is None:
            raise not_found(
                "ERR_RUN_NOT_FOUND", f"run {key[1]!r} does not exist in this workspace", run_id=key[1]
            )
        return RunRecord.from_json(doc)

    def _live(self, record: RunRecord) -> RunRecord:
        actor = self._active.get((record.workspace_id, record.run_id))
        return actor.view() if actor is not None and not actor.lease_released else record

    async def list_runs(
        self,
        principal: Principal,
        *,
        states: set[RunState] | None = None,
        labels: Mapping[str, str] | None = None,
        page_size: int = 50,
        page_token: str = "",
        max_bytes: int = 0,
        size_of: Callable[[RunRecord], int] | None = None,
    ) -> tuple[list[RunRecord], str]:
        """A page of runs, newest first, and the token of the next page ("" on the last).

        With ``size_of`` (a run's size in the caller's encoding) a page also ends before its runs
        add up to more than ``max_bytes``; it always holds at least one run, however large.
        """
        return await self._reader.list_runs(
            principal,
            states=states,
            labels=labels,
            page_size=page_size,
            page_token=page_token,
            max_bytes=max_bytes,
            size_of=size_of,
        )

    async def wait_run(self, principal: Principal, run_id: str, timeout: float) -> tuple[RunRecord, bool]:
        """Wait until the run is paused or ended. Returns (run, timed_out)."""
        return await self._reader.wait_run(principal, run_id, timeout)

    def stream_events(
        self,
        principal: Principal,
        run_id: str,
        *,
        after_seq: int = 0,
        follow: bool = False,
        until_pause: bool = False,
    ) -> AsyncIterator[list[Event]]:
        """Batches of events with seq > after_seq, in order, each exactly once.

        ``follow`` streams until the run ends; ``until_pause`` stops at a pause too.
        Without either, it stops after what exists now.
        """
        return self._reader.stream_events(
            principal, run_id, after_seq=after_seq, follow=follow, until_pause=until_pause
        )

    def _notify(self, key: tuple[str, str]) -> None:
        changed = self._changes.pop(key, None)
        if changed is not None:
            changed.set()

    # -- moving runs ---------------------------------------------------------------------

    async def tool_result(
        self, principal: Principal, run_id: str, call_id: str, *, offset: int = 0, limit: int = 0
    ) -> ToolResultPage:
        """A page of a tool result that was stored because it was too large to show.

        ``limit`` 0 means up to 1,000,000 characters.
        """
        return await self._reader.tool_result(principal, run_id, call_id, offset=offset, limit=limit)

    async def resume_run(
        self,
        principal: Principal,
        run_id: str,
        decisions: list[Decision],
        request_id: str = "",
        api_env: Mapping[str, str] | None = None,
        webhook: Mapping[str, Any] | None = None,
    ) -> RunRecord:
        """Record decisions; the run continues once no interrupt is pending.

        A retry carrying the ``request_id`` of a resume that was already applied
        returns the run as it stands instead of failing.
        """
        self._check_open()
        key = (principal.workspace_id, check_id(run_id, "run_id"))
        if request_id:
            check_id(request_id, "request_id")
        # Kept with the request id only: what a retry with that id is checked against.
        resume_fp = fingerprint([dataclasses.asdict(d) for d in decisions], webhook) if request_id else ""
        webhook_doc = self._checks.validate_webhook(key[0], webhook)
        async with self._lock(key):
            if api_env:
                # Credentials re-supplied (e.g. after a restart); memory only, like at creation,
                # and only for a run that exists in the caller's workspace.
                await self._load(key)
                self._catalogue.run_api_env[key] = dict(api_env)
            if not decisions:
                return await self._retry_handoff(principal, key)
            # A run paused here and kept in memory: confirmed by one read once its lease is ours.
            remembered = self._decisions.recall(key) if not api_env and key not in self._active else None
            if remembered is not None:
                resumed = await self._resume_remembered(
                    principal, remembered, decisions, request_id, resume_fp, webhook_doc
                )
                if resumed is not None:
                    return resumed
            if request_id:
                current = await self.get_run(principal, run_id)
                for entry in current.resume_requests:
                    used_id, _, used_fp = entry.partition(":")
                    if used_id == request_id:
                        check_same_request(request_id, used_fp, resume_fp, "ResumeRun")
                        return current
            if key in self._active:
                raise precondition(
                    "ERR_RUN_NOT_PAUSED",
                    f"run {run_id!r} is running, not paused",
                    run_id=run_id,
                    state="RUNNING",
                )
            record = await self._load(key)
            if record.state is not RunState.PAUSED:
                raise precondition(
                    "ERR_RUN_NOT_PAUSED",
                    f"run {run_id!r} is {record.state.value}, not paused",
                    run_id=run_id,
                    state=record.state.value,
                )
            actor = await self._actor_for(record)
            plan = await self._plan(actor, decisions)
            await self._take_over(actor)
            return await self._decide(principal, actor, plan, request_id, resume_fp, webhook_doc)

    async def _plan(self, actor: RunActor, decisions: list[Decision]) -> list[PlannedDecision]:
        if all(d.edited_arguments is None or is_small(d.edited_arguments) for d in decisions):
            return self._decisions.plan(actor, decisions)
        # Large edits: schema validation is slow pure-Python work, kept off the loop.
        return await asyncio.to_thread(self._decisions.plan, actor, decisions)

    async def _decide(
        self,
        principal: Principal,
        actor: RunActor,
        plan: list[PlannedDecision],
        request_id: str,
        resume_fp: str,
        webhook_doc: JsonObject | None,
    ) -> RunRecord:
        """Record the planned decisions on a run whose lease is ours."""
        record = actor.record
        self._jobs.disarm_expiry(actor.key)
        if webhook_doc is not None:
            record.webhook = webhook_doc
        if request_id:
            record.resume_requests = [*record.resume_requests[-31:], f"{request_id}:{resume_fp}"]
        await self._decisions.decide(actor, plan, principal.identity)
        return record

    async def _resume_remembered(
        self,
        principal: Principal,
        actor: RunActor,
        decisions: list[Decision],
        request_id: str,
        resume_fp: str,
        webhook_doc: JsonObject | None,
    ) -> RunRecord | None:
        """Resume a run this process paused from what it kept of it: its spec, transcript and
        tools are not read back or rebuilt, only its state, to confirm that storage still holds
        what the pause committed (before the lease is taken, and again once it is ours). None
        (nothing done, the lease not held) when that cannot answer: storage moved on since, the
        request is a retry or a decision is refused; the caller then reads the run from storage
        and answers from that."""
        assert actor.paused_from is not None
        committed = actor.paused_from.doc
        record = actor.record
        if request_id and any(e.partition(":")[0] == request_id for e in record.resume_requests):
            return None
        if await self.storage.read_state(*actor.key) != committed:
            return None  # moved (or deleted) by another process since it paused here
        try:
            plan = await self._plan(actor, decisions)
        except EngineError:
            return None
        if not await actor.take_over(expected=committed):
            return None
        return await self._decide(principal, actor, plan, request_id, resume_fp, webhook_doc)

    async def _retry_handoff(self, principal: Principal, key: tuple[str, str]) -> RunRecord:
        """A resume without decisions retries a handoff that failed, from the same checkpoint."""
        if key in self._active:
            raise precondition(
                "ERR_RUN_NOT_PAUSED", f"run {key[1]!r} is running", run_id=key[1], state="RUNNING"
            )
        record = await self._load(key)
        handed_off = record.state is RunState.PAUSED and record.pause_reason is PauseReason.HANDOFF_TO_RUNNER
        if handed_off and self._runner.url(key[0]):
            await self._jobs.hand_off_again(key, record, force=True)
            return record
        if (
            record.state is not RunState.FAILED
            or record.error is None
            or record.error.code not in _HANDOFF_FAILURES
        ):
            raise invalid("ERR_INVALID_DECISION", "resume needs at least one decision", field="decisions")
        actor = await self._actor_for(record)
        await self._take_over(actor)
        record.error = None
        await actor.commit_start(principal.identity)
        self._start(actor, resumed_by=principal.identity)
        return record

    async def _actor_for(self, record: RunRecord) -> RunActor:
        ws, run_id = record.workspace_id, record.run_id
        self._decisions.forget((ws, run_id))  # moved from what storage holds from now on
        spec_doc = await self.storage.read_spec(ws, run_id)
        if spec_doc is None:
            raise EngineError("ERR_INTERNAL", f"run {run_id!r} has no spec", kind=ErrorKind.INTERNAL)
        spec = RunSpec.from_json(spec_doc)
        provider, _, model_name = record.meta.model.partition(":")
        # The transcript is read by take_over: a sweep that finds the run held elsewhere reads none.
        return RunActor(
            record, spec, None, self._catalogue.run_env(ws, spec, spec_doc, provider, model_name, record.mode)
        )

    async def cancel_run(self, principal: Principal, run_id: str, reason: str = "") -> RunRecord:
        key = (principal.workspace_id, check_id(run_id, "run_id"))
        reason = reason[:1000] or f"cancelled by {principal.identity}"
        async with self._lock(key):
            self._decisions.forget(key)
            actor = self._active.get(key)
            if actor is not None:
                assert actor.task is not None
                if not actor.ending:  # an end being committed is the end
                    actor.cancel_reason = reason
                    actor.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    async with asyncio.timeout(10):
                        await asyncio.shield(actor.task)
                if actor.record.state is not RunState.PAUSED:
                    return actor.record
                # It paused before the cancel reached it: cancel the paused run below.
            record = await self._load(key)
            if record.state is RunState.CANCELLED:
                return record
            if record.state.terminal:
                raise precondition(
                    "ERR_RUN_TERMINAL",
                    f"run {run_id!r} already ended ({record.state.value})",
                    run_id=run_id,
                    state=record.state.value,
                )
            actor = await self._actor_for(record)
            if not await actor.take_over():
                # Another process (a replica or the runner) moves it: leave a request it honours
                # at its next await point or its pause, and follow the run until then.
                doc = {"reason": reason, "by": principal.identity, "at": self._clock()}
                request = json.dumps(doc).encode()
                await self.storage.put_blob(key[0], key[1], CANCEL_REQUEST, request)
            else:
                self._jobs.disarm_expiry(key)
                actor.cancel_reason = reason
                await actor.cancel_now()
                self._notify(key)
                return record
        return await self._reader.follow_cancel(principal, key, reason, request)

    def _notify_webhook(self, record: RunRecord, event: str) -> None:
        if record.webhook:
            self.webhooks.notify(record.workspace_id, record.run_id, record.webhook, event, record.public())

    # -- threads, deletion, retention --------------------------------------------------------

    async def get_thread(self, principal: Principal, thread_id: str) -> Thread:
        return await self.threads.get(principal.workspace_id, thread_id)

    async def list_threads(
        self,
        principal: Principal,
        *,
        labels: Mapping[str, str] | None = None,
        page_size: int = 50,
        page_token: str = "",
    ) -> tuple[list[Thread], str]:
        """A page of threads, newest first, and the token of the next page ("" on the last)."""
        return await self.threads.list_page(
            principal.workspace_id, labels=labels, page_size=page_size, page_token=page_token
        )

    async def delete_run(self, principal: Principal, run_id: str) -> None:
        """Delete an ended run and every object it has; afterwards it is NOT_FOUND everywhere."""
        await self.deleter.delete_run(principal, run_id)

    async def delete_thread(self, principal: Principal, thread_id: str, *, force: bool = False) -> list[str]:
        """Delete every run of a thread and the thread; returns the run ids deleted."""
        return await self.deleter.delete_thread(principal, thread_id, force=force)

    async def apply_retention(self, principal: Principal, *, dry_run: bool = False) -> RetentionReport:
        """Apply the workspace's retention policy now (or list what it would delete)."""
        return await apply_retention(self, principal.workspace_id, dry_run=dry_run)

    async def on_run_deleted(self, ws: str, run_id: str) -> None:
        """Forget what this process holds about a deleted run (credentials, timers)."""
        key = (ws, run_id)
        self._catalogue.run_api_env.pop(key, None)
        self._decisions.forget(key)
        self._jobs.disarm_expiry(key)
        await self.control.delete_run(ws, run_id)
        self._notify(key)

    # -- crash recovery and runner handoff ------------------------------------------------

    async def recover_orphaned_runs(self, principal: Principal | None = None) -> list[str]:
        """Resume runs whose executor died: QUEUED/RUNNING with an expired lease. Paused runs stay paused.

        With a principal, only that workspace is swept (the RPC); without, all (the background sweep).
        """
        return await self._jobs.recover_orphaned_runs(principal)

    async def arm_approval_deadlines(self) -> None:
        """Arm a timer for every paused run's approval deadline that no timer here watches."""
        await self._jobs.arm_approval_deadlines()

    async def continue_handoff(self, principal: Principal, run_id: str) -> RunRecord:
        """Runner side: take a run paused HANDOFF_TO_RUNNER and continue it with this host's tools."""
        self._check_open()
        key = (principal.workspace_id, check_id(run_id, "run_id"))
        async with self._lock(key):
            if key in self._active:
                raise precondition(
                    "ERR_RUN_NOT_HANDED_OFF", f"run {run_id!r} is already running here", run_id=run_id
                )
            record = await self._load(key)
            if (
                record.state is not RunState.PAUSED
                or record.pause_reason is not PauseReason.HANDOFF_TO_RUNNER
            ):
                raise precondition(
                    "ERR_RUN_NOT_HANDED_OFF",
                    f"run {run_id!r} is not waiting for a runner",
                    run_id=run_id,
                    state=record.state.value,
                )
            actor = await self._actor_for(record)
            await self._take_over(actor)
            await actor.commit_start(principal.identity)
            self._start(actor, resumed_by=principal.identity)
            return record

    async def check_handed_off(self, principal: Principal, run_id: str) -> None:
        """Raise unless the run is paused HANDOFF_TO_RUNNER (a runner that queues work checks first)."""
        record = await self._load((principal.workspace_id, check_id(run_id, "run_id")))
        if record.state is not RunState.PAUSED or record.pause_reason is not PauseReason.HANDOFF_TO_RUNNER:
            raise precondition(
                "ERR_RUN_NOT_HANDED_OFF",
                f"run {run_id!r} is not waiting for a runner",
                run_id=run_id,
                state=record.state.value,
            )

    async def _take_over(self, actor: RunActor) -> None:
        """Make the run ours to move, or fail ABORTED: another process holds or just moved it."""
        if not await actor.take_over():
            run_id = actor.record.run_id
            raise aborted("ERR_CONCURRENT_UPDATE", f"run {run_id!r} is being moved by another process",
                          run_id=run_id)  # fmt: skip

    # -- plumbing ---------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @contextlib.asynccontextmanager
    async def _lock(self, key: tuple[str, str]) -> AsyncIterator[None]:
        """Serialise moves of one run in this process; the lock is dropped when nobody holds
        or waits for it, so requests naming made-up run ids leave nothing behind."""
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        self._lock_users[key] = self._lock_users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._lock_users[key] -= 1
            if not self._lock_users[key]:
                del self._lock_users[key]
                del self._locks[key]

    def _check_open(self) -> None:
        if self._closing:
            raise EngineError(
                "ERR_SHUTTING_DOWN",
                "the engine is shutting down; retry on another replica",
                kind=ErrorKind.UNAVAILABLE,
            )

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting work, let running turns finish for ``grace`` s, then checkpoint and stop."""
        self._closing = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        tasks = [a.task for a in self._active.values() if a.task is not None]
        if tasks:
            _done, still = await asyncio.wait(tasks, timeout=grace)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=5)
        for task in list(self._background):
            task.cancel()
        await self._runner.close()
        await self.control.close()
        close_models = getattr(self._model_factory, "aclose", None)
        if close_models is not None:  # the HTTP adapters' connections
            await close_models()
        await self._catalogue.close()
        await self.webhooks.close()
        await self.storage.close()
