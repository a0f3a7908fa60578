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
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from engine_service.core._actor import CANCEL_REQUEST, RunActor, RunEnv
from engine_service.core._background import BackgroundJobs
from engine_service.core._catalogue import ToolCatalogue, builtin_tools, host_capabilities
from engine_service.core._config import EngineConfig
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
from engine_service.core._run import (
    PENDING,
    READY,
    RESOLVED,
    ClientToolDef,
    Decision,
    PendingCall,
    PlannedDecision,
    RunRecord,
    RunSpec,
    ToolResultPage,
)
from engine_service.core._types import (
    Event,
    InterruptKind,
    JsonObject,
    Message,
    PauseReason,
    Permission,
    Principal,
    RunState,
)
from engine_service.core._validate import SpecChecks
from engine_service.models import ScriptedModel
from engine_service.models._select import (
    ModelFactory,
    default_model_factory,
    load_script_file,
    model_price,
    resolve_default_model,
)
from engine_service.net._egress import EgressPolicy
from engine_service.net._webhooks import WebhookSender
from engine_service.storage._local import Storage
from engine_service.storage._workdir_snapshot import WorkdirSnapshots
from engine_service.tools import (
    Sandbox,
    describe_sandbox,
    result_blob_name,
)
from engine_service.tools._apicall import (
    ApiConfig,
    load_resolve_auth,
)
from engine_service.tools._registry import (
    ToolArgumentError,
    ToolRegistry,
    load_hook,
    render_result,
)

log = logging.getLogger("machina.engine")

# Run errors that resuming without decisions retries (a fresh handoff from the same checkpoint).
_HANDOFF_FAILURES = ("ERR_RUNNER_UNREACHABLE", "ERR_RUNNER_LOST")
_POLL_S = 0.025  # how often watchers re-read storage for runs another process moves (state.json is tiny)
_CANCEL_FOLLOW_S = 10.0  # how long CancelRun follows a run another process moves before answering


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
    ) -> None:
        config.check_runner_secrets()  # never hand a run off unauthenticated
        self.config = config
        self.storage = storage
        # Where tenants' specs and models may send requests (per-run ApiCall services, webhooks).
        self.egress = egress or config.egress_policy()
        self.sandbox = Sandbox.from_config(config)
        self.tools = tools or ToolRegistry(builtin_tools(config, self.egress, self.sandbox))
        self._capabilities = host_capabilities(config, self.sandbox)
        self._checks = SpecChecks(self)
        self._catalogue = ToolCatalogue(self)
        self._jobs = BackgroundJobs(self)
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
        api = config.api or ApiConfig()
        self._api_services = list(api.services)
        self._per_run_custom_ids = frozenset(api.per_run_custom_auth_ids)
        self._api_env = {k: v.get_secret_value() for k, v in api.env.items()}
        self._resolve_auth = load_resolve_auth(api.resolve_auth) if api.resolve_auth else None
        self._api_hooks = tuple(
            load_hook(path) if path else None for path in (api.on_request, api.on_response)
        )
        # Per-run ApiCall credentials: memory only, never persisted (SPEC §4).
        self._run_api_env: dict[tuple[str, str], dict[str, str]] = {}
        self._mcp: Any = None  # tools._mcp.McpManager, imported only when servers are configured
        self._started = False
        # Only secrets configured for webhooks, per workspace: never the process environment.
        self.webhooks = WebhookSender(storage, config.webhook_secret, egress=self.egress)
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
        mode: str = "async",
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
                mode=mode,
                webhook=webhook_doc,
            )
            record.meta.model = f"{provider}:{model_name}"
            spec_doc = spec.to_json()
            spec_doc["client_tools"] = [
                {"name": t.name, "description": t.description, "input_schema": t.input_schema}
                for t in client_tools
            ]
            if not await self.storage.create_run(ws, run_id, spec_doc, record.to_json()):
                raise aborted(
                    "ERR_CONCURRENT_UPDATE", f"run {run_id!r} was created concurrently", run_id=run_id
                )
            transcript = [Message("user", spec.task)]
            if api_env:
                self._run_api_env[key] = dict(api_env)
            actor = RunActor(
                record, spec, transcript, self._env(ws, spec, spec_doc, provider, model_name, mode)
            )
            if not await actor.take_over():
                # It exists and another process (a recovery sweep that ignored the grace period
                # of a fresh run) moves it: answer with the run, not an error.
                log.warning("run %s was taken by another process as it was created", run_id,
                            extra={"run_id": run_id, "workspace": ws})  # fmt: skip
                return await self._load(key), True
            await actor.commit_start(None)
            self._start(actor, resumed_by=None)
        log.info(
            "run %s created (model %s)", run_id, record.meta.model, extra={"run_id": run_id, "workspace": ws}
        )
        return record, True

    def _env(
        self, ws: str, spec: RunSpec, spec_doc: JsonObject, provider: str, model_name: str, mode: str
    ) -> RunEnv:
        cfg = self.config
        tools = self._catalogue.run_tools(ws, spec, spec_doc)
        engine_perms = {k: Permission(v) for k, v in cfg.tools.permissions.items()}
        default = Permission(cfg.tools.default_permission)

        def permission(name: str) -> Permission:
            return engine_perms.get(name, default).narrow(spec.permissions.get(name))

        model = (
            ScriptedModel(spec.script or [], model_name)
            if provider == "scripted"
            else self._model_factory(provider, model_name)
        )
        return RunEnv(
            storage=self.storage,
            model=model,
            tools=tools,
            permissions=permission,
            system_prompt=spec.system_prompt,
            max_turns=spec.max_turns or cfg.max_turns,
            max_output_tokens=spec.max_output_tokens or cfg.model.max_output_tokens,
            # Unknown prices count as 0: a run with a cost budget needs known ones (create_run).
            price=model_price(cfg, self._default_provider, provider, model_name) or (0.0, 0.0),
            owner=self._owner,
            lease_ttl=cfg.lease_ttl_s,
            workdir=Path(cfg.workdir_root).resolve() / ws / spec.run_id,
            snapshots=self._snapshots,
            max_result_chars=cfg.tools.max_result_chars,
            handoff=self._runner.post if mode == "async" and self._runner.url(ws) else None,
            notify=self._notify_webhook,
            clock=self._clock,
            storage_retry_s=cfg.storage_retry_s,
        )

    def _start(self, actor: RunActor, *, resumed_by: str | None) -> None:
        self._active[actor.key] = actor
        actor.start(resumed_by=resumed_by)
        self._notify(actor.key)
        assert actor.task is not None
        actor.task.add_done_callback(lambda _t: self._on_actor_done(actor))

    def _on_actor_done(self, actor: RunActor) -> None:
        if self._active.get(actor.key) is actor:
            del self._active[actor.key]
        record = actor.view()  # as committed: a run parked by a storage outage is not what it tried
        if record.state.terminal and not (record.error and record.error.code in _HANDOFF_FAILURES):
            self._run_api_env.pop(actor.key, None)
        if record.state is RunState.PAUSED:
            self._jobs.arm_expiry(actor.key, record)
        self._notify(actor.key)

    # -- reading runs ---------------------------------------------------------------------

    async def get_run(self, principal: Principal, run_id: str) -> RunRecord:
        key = (principal.workspace_id, check_id(run_id, "run_id"))
        actor = self._active.get(key)
        if actor is not None:
            return actor.view()
        return await self._load(key)

    async def _load(self, key: tuple[str, str]) -> RunRecord:
        doc = await self.storage.read_state(*key)
        if doc is None:
            raise not_found(
                "ERR_RUN_NOT_FOUND", f"run {key[1]!r} does not exist in this workspace", run_id=key[1]
            )
        return RunRecord.from_json(doc)

    def _live(self, record: RunRecord) -> RunRecord:
        actor = self._active.get((record.workspace_id, record.run_id))
        return actor.view() if actor is not None else record

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
        if not 0 <= page_size <= 1000:
            raise invalid("ERR_INVALID_REQUEST", "page_size must be between 1 and 1000", field="page_size")
        page_size = page_size or 50
        offset = 0
        if page_token:
            try:
                offset = int(page_token)
                if offset < 0:
                    raise ValueError
            except ValueError:
                raise invalid(
                    "ERR_INVALID_REQUEST", "page_token is not one this server issued", field="page_token"
                ) from None
        ws = principal.workspace_id
        records = []
        for run_id in await self.storage.list_runs(ws):
            with contextlib.suppress(EngineError):
                record = self._live(await self._load((ws, run_id)))
                if states and record.state not in states:
                    continue
                if labels and any(record.labels.get(k) != v for k, v in labels.items()):
                    continue
                records.append(record)
        records.sort(key=lambda r: (r.created_at, r.run_id), reverse=True)
        page = records[offset : offset + page_size]
        if size_of is not None:
            used = 0
            for count, record in enumerate(page):
                used += size_of(record)
                if count and used > max_bytes:
                    page = page[:count]
                    break
        end = offset + len(page)
        next_token = str(end) if end < len(records) else ""
        return page, next_token

    async def wait_run(self, principal: Principal, run_id: str, timeout: float) -> tuple[RunRecord, bool]:
        """Wait until the run is paused or ended. Returns (run, timed_out)."""
        key = (principal.workspace_id, check_id(run_id, "run_id"))
        deadline = time.monotonic() + timeout
        await self.get_run(principal, run_id)  # NOT_FOUND first
        while True:
            remaining = deadline - time.monotonic()
            actor = self._active.get(key)
            if actor is not None and actor.task is not None and not actor.task.done():
                # The actor's task ends exactly when the run pauses or ends, after the
                # state is committed: answering earlier (from memory) would let a caller
                # act on a pause that another process cannot see yet.
                if remaining <= 0:
                    return actor.view(), True
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    async with asyncio.timeout(remaining):
                        await asyncio.shield(actor.task)
                continue
            record = await self._load(key)
            if settled(record):
                return record, False
            if remaining <= 0:
                return record, True
            await self._wait_change(key, min(_poll_interval(record), remaining))

    async def stream_events(
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
        if after_seq < 0:
            raise invalid("ERR_INVALID_REQUEST", "after_seq must not be negative", field="after_seq")
        key = (principal.workspace_id, check_id(run_id, "run_id"))
        await self.get_run(principal, run_id)  # NOT_FOUND before the stream opens
        cursor = after_seq
        finished: RunActor | None = None  # the last actor read live from
        while True:
            actor = self._active.get(key)
            done = 0 if finished is None else finished.feed.last_seq
            if actor is None and finished is not None and finished.feed.base_seq <= cursor < done:
                # That actor has just finished: what it wrote is still in its feed, so do not
                # read (and parse) those events back from storage.
                batch = finished.feed.after(cursor, limit=min(512, done - cursor))
                cursor = batch[-1].seq
                yield batch
                continue
            if actor is not None and actor.feed.base_seq <= cursor:
                # Live: the executing actor has every event after its base_seq.
                finished = actor
                batch = actor.feed.after(cursor)
                if batch:
                    cursor = batch[-1].seq
                    yield batch
                    continue
                if not actor.feed.closed:
                    if not (follow or until_pause):
                        return
                    await actor.feed.wait(cursor, timeout=1.0)
                    continue
                record = actor.record
            else:
                # Catch up from storage: everything committed before the live part.
                record = actor.record if actor is not None else await self._load(key)
                committed = actor.feed.base_seq if actor is not None else record.last_seq
                if committed > cursor:
                    docs = await self.storage.read_segments(key[0], key[1], "events", cursor, committed)
                    if not docs or docs[0].get("seq") != cursor + 1:
                        # A log that lacks committed events cannot be streamed in order; say so
                        # rather than read the same gap forever.
                        log.error("run %s: event log lacks events after seq %d", key[1], cursor)
                        raise EngineError(
                            "ERR_INTERNAL",
                            f"the event log of run {key[1]!r} lacks events after seq {cursor}",
                            kind=ErrorKind.INTERNAL,
                            metadata={"run_id": key[1], "after_seq": str(cursor)},
                        )
                    for start in range(0, len(docs), 512):
                        batch = [Event.from_json(d) for d in docs[start : start + 512]]
                        cursor = batch[-1].seq
                        yield batch
                    continue
            stop = record.state.terminal or (until_pause and settled(record))
            if stop or not (follow or until_pause):
                return
            await self._wait_change(key, _poll_interval(record))

    async def _wait_change(self, key: tuple[str, str], timeout: float) -> None:
        """Wait until this process moves the run again (or ``timeout``, for other processes)."""
        changed = self._changes.setdefault(key, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await changed.wait()

    def _notify(self, key: tuple[str, str]) -> None:
        changed = self._changes.pop(key, None)
        if changed is not None:
            changed.set()

    async def tool_result(
        self, principal: Principal, run_id: str, call_id: str, *, offset: int = 0, limit: int = 0
    ) -> ToolResultPage:
        """A page of a tool result that was stored because it was too large to show.

        ``limit`` 0 means up to 1,000,000 characters.
        """
        if offset < 0 or limit < 0:
            raise EngineError("ERR_INVALID_REQUEST", "offset and limit must not be negative")
        key = (principal.workspace_id, check_id(run_id, "run_id"))
        await self.get_run(principal, run_id)  # NOT_FOUND for unknown runs and other workspaces
        blob = await self.storage.get_blob(*key, result_blob_name(call_id))
        if blob is None:
            raise not_found(
                "ERR_RESULT_NOT_FOUND",
                f"run {run_id!r} has no stored result for call {call_id[:128]!r} "
                "(only results too large to show in full are stored)",
                run_id=run_id,
                call_id=call_id[:128],
            )
        full = blob.decode("utf-8", errors="replace")
        end = offset + (limit or 1_000_000)
        return ToolResultPage(full[offset:end], len(full), end if end < len(full) else 0)

    # -- moving runs ---------------------------------------------------------------------

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
        resume_fp = fingerprint([dataclasses.asdict(d) for d in decisions], webhook)
        webhook_doc = self._checks.validate_webhook(key[0], webhook)
        async with self._lock(key):
            if api_env:
                # Credentials re-supplied (e.g. after a restart); memory only, like at creation,
                # and only for a run that exists in the caller's workspace.
                await self._load(key)
                self._run_api_env[key] = dict(api_env)
            if not decisions:
                return await self._retry_handoff(principal, key)
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
            if all(d.edited_arguments is None or is_small(d.edited_arguments) for d in decisions):
                plan = self._apply_decisions(actor, decisions)
            else:  # large edits: schema validation is slow pure-Python work, kept off the loop
                plan = await asyncio.to_thread(self._apply_decisions, actor, decisions)
            await self._take_over(actor)
            self._jobs.disarm_expiry(key)
            if webhook_doc is not None:
                record.webhook = webhook_doc
            if request_id:
                record.resume_requests = [*record.resume_requests[-31:], f"{request_id}:{resume_fp}"]
            await self._decide(actor, plan, principal.identity)
            return record

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

    def _apply_decisions(self, actor: RunActor, decisions: list[Decision]) -> list[PlannedDecision]:
        """Validate every decision, then apply them all (all or nothing)."""
        by_id = {p.interrupt.interrupt_id: p for p in actor.record.pending if p.interrupt is not None}
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
            if d.action not in ("approve", "reject", "respond"):
                raise invalid(
                    "ERR_INVALID_DECISION",
                    f"decision for {d.interrupt_id!r} has no action",
                    interrupt_id=d.interrupt_id,
                )
            if d.action != "respond" and kind is not InterruptKind.APPROVAL:
                raise invalid(
                    "ERR_INVALID_DECISION",
                    f"interrupt {d.interrupt_id!r} is {kind.value}: answer it with respond, not {d.action}",
                    interrupt_id=d.interrupt_id,
                    kind=kind.value,
                )
            edited = None
            if d.action == "approve" and d.edited_arguments is not None:
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

    async def _actor_for(self, record: RunRecord) -> RunActor:
        ws, run_id = record.workspace_id, record.run_id
        spec_doc = await self.storage.read_spec(ws, run_id)
        if spec_doc is None:
            raise EngineError("ERR_INTERNAL", f"run {run_id!r} has no spec", kind=ErrorKind.INTERNAL)
        spec = RunSpec.from_json(spec_doc)
        provider, _, model_name = record.meta.model.partition(":")
        # The transcript is read by take_over: a sweep that finds the run held elsewhere reads none.
        return RunActor(record, spec, None, self._env(ws, spec, spec_doc, provider, model_name, record.mode))

    async def cancel_run(self, principal: Principal, run_id: str, reason: str = "") -> RunRecord:
        key = (principal.workspace_id, check_id(run_id, "run_id"))
        reason = reason[:1000] or f"cancelled by {principal.identity}"
        async with self._lock(key):
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
        return await self._follow_cancel(principal, key, reason, request)

    async def _follow_cancel(
        self, principal: Principal, key: tuple[str, str], reason: str, request: bytes
    ) -> RunRecord:
        """See a cancel of a run another process moves through: that process honours the request
        at its next await point or when it pauses; a run found paused is cancelled here. Answers
        once the run ended, so a cancel answered OK is never applied late, to a later resume
        (after ``_CANCEL_FOLLOW_S``: the run as it stands if it still runs elsewhere, the
        request left in place; ABORTED if it stayed paused and held by another process)."""
        deadline = time.monotonic() + _CANCEL_FOLLOW_S
        while True:
            if key in self._active:  # resumed here meanwhile
                return await self.cancel_run(principal, key[1], reason)
            record = await self._load(key)
            if record.state.terminal:
                return record
            if record.state is RunState.PAUSED:
                async with self._lock(key):
                    if key not in self._active:
                        actor = await self._actor_for(record)
                        if await actor.take_over():
                            self._jobs.disarm_expiry(key)
                            actor.cancel_reason = reason
                            await actor.cancel_now()
                            self._notify(key)
                            return actor.record
            elif not await self.storage.get_blob(key[0], key[1], CANCEL_REQUEST):
                # A resume that started after the request was written cleared it: ask that execution.
                await self.storage.put_blob(key[0], key[1], CANCEL_REQUEST, request)
            if time.monotonic() >= deadline:
                if record.state is RunState.PAUSED:
                    # Paused, and held by another process all along: refused rather than
                    # left for a later resume to find.
                    raise aborted(
                        "ERR_CONCURRENT_UPDATE",
                        f"run {key[1]!r} is being moved by another process; cancel it again",
                        run_id=key[1],
                    )
                return record  # still running elsewhere: the request stays and is honoured there
            await self._wait_change(key, 0.05)

    def _notify_webhook(self, record: RunRecord, event: str) -> None:
        if record.webhook:
            self.webhooks.notify(record.workspace_id, record.run_id, record.webhook, event, record.public())

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

    async def _decide(
        self,
        actor: RunActor,
        plan: list[PlannedDecision],
        by: str,
        *,
        all_expired: bool = False,
    ) -> None:
        """Record the planned decisions on a run we hold; it continues once none is pending."""
        for planned in plan:
            pending = planned.pending
            actor.record_decision(pending, planned.action, by, reason=planned.reason, expired=all_expired)
            if all_expired and pending.outcome == "rejected":
                pending.outcome = "expired"
        if actor.record.interrupts:
            await actor.checkpoint()  # still waiting for the other interrupts
            await actor.release()
            self._jobs.arm_expiry(actor.key, actor.record)
            self._notify(actor.key)
            return
        # A resumed run is asynchronous (its caller is not streaming it): it may hand off.
        actor.record.mode = "async"
        ws = actor.record.workspace_id
        actor.env.handoff = self._runner.post if self._runner.url(ws) else None
        await actor.commit_start(by)
        self._start(actor, resumed_by=by)

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
        if self._mcp is not None:
            await self._mcp.close()
        await self.webhooks.close()
        await self.storage.close()


def settled(record: RunRecord) -> bool:
    """Ended, or paused for the caller: what waits wait for. A handoff is not the caller's to act on."""
    if record.state is RunState.PAUSED:
        return record.pause_reason is not PauseReason.HANDOFF_TO_RUNNER
    return record.state.terminal


def _poll_interval(record: RunRecord) -> float:
    """How soon to re-read a run this process is not moving: fast while another process
    (a runner, a replica) is likely moving it, slowly while it waits for a person."""
    moving = record.state in (RunState.QUEUED, RunState.RUNNING)
    return _POLL_S if moving or record.pause_reason is PauseReason.HANDOFF_TO_RUNNER else 0.5


def apply_decision(
    pending: PendingCall,
    action: str,
    *,
    edited: JsonObject | None = None,
    reason: str = "",
    output: Any = None,
) -> PlannedDecision:
    """Move a pending call according to a decision; returns what the run's history records."""
    if action == "approve":
        if edited is not None:
            pending.call.arguments = edited
        pending.status = READY
        return PlannedDecision(pending, "approve_with_edits" if edited is not None else "approve")
    if action == "reject":
        pending.status = RESOLVED
        pending.result_text = (
            f"The user rejected this call. Reason: {reason}" if reason else "The user rejected this call."
        )
        pending.result_is_error = True
        pending.outcome = "rejected"
        return PlannedDecision(pending, "reject", reason)
    pending.status = RESOLVED
    pending.result_text = render_result(output)
    pending.result_is_error = False
    pending.outcome = "responded"
    return PlannedDecision(pending, "respond")
