"""The gRPC face of the engine: EngineService servicer, auth, errors, server setup."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import grpc

from engine_service.api._auth import Authenticator
from engine_service.api._convert import (
    decision_from_proto,
    event_responses,
    run_to_proto,
    spec_from_proto,
    states_from_proto,
    thread_to_proto,
    webhook_from_proto,
)
from engine_service.api._errors import set_error
from engine_service.api.serving import add_service, serve_with_health, stop_gracefully
from engine_service.core import _metrics as metrics
from engine_service.core._engine import Engine
from engine_service.core._errors import EngineError, ErrorKind, shown
from engine_service.core._run import Decision, RunRecord
from engine_service.core._types import Principal
from engine_service.storage._protocol import storage_fault
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import engine_service_pb2_grpc as svc_grpc
from machina.engine.v1 import run_pb2 as rp

log = logging.getLogger("machina.engine")

_T = TypeVar("_T")

_SERVICE = svc.DESCRIPTOR.services_by_name["EngineService"]
SERVICE_NAME = _SERVICE.full_name

MAX_WAIT_MS = 300_000
# A ListRuns page ends before its runs pass this many bytes; a run larger on its own is listed in
# short form (see ListRunsResponse.runs).
MAX_PAGE_BYTES = 1 << 20
_SHORT_FORM_CHARS = 1000


# grpc.aio.ServicerContext; grpc ships no type information, so it is Any to mypy anyway.
Context: TypeAlias = Any
UnaryImpl = Callable[[Any, Any, Principal, Context], Awaitable[Any]]
StreamImpl = Callable[[Any, Any, Principal, Context], AsyncGenerator[Any, None]]


def _internal(context: Context, rpc: str) -> None:
    error = sys.exc_info()[1]
    if error is not None and storage_fault(error):
        # Not a bug: storage is read-only, full or unreachable. Nothing was acknowledged.
        log.warning("%s: storage unavailable: %s", rpc, error)
        set_error(
            context,
            EngineError(
                "ERR_STORAGE_UNAVAILABLE",
                "storage is unavailable (read-only, full or unreachable); retry later",
                kind=ErrorKind.UNAVAILABLE,
            ),
        )
        return
    log.exception("%s failed with an internal error", rpc)
    set_error(
        context, EngineError("ERR_INTERNAL", "internal error; see the engine log", kind=ErrorKind.INTERNAL)
    )


def _unary(impl: UnaryImpl) -> Callable[[Any, Any, Context], Awaitable[Any]]:
    """Wrap a unary RPC: authenticate, then map domain errors to a status with ErrorInfo."""

    @functools.wraps(impl)
    async def method(self: EngineServicer, request: Any, context: Context) -> Any:
        try:
            return await impl(self, request, self._principal(context), context)
        except EngineError as error:
            set_error(context, error)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            _internal(context, impl.__name__)
        return None

    return method


def _streaming(impl: StreamImpl) -> Callable[[Any, Any, Context], AsyncGenerator[Any, None]]:
    """Wrap a server-streaming RPC as `_unary` does a unary one."""

    @functools.wraps(impl)
    async def method(self: EngineServicer, request: Any, context: Context) -> AsyncGenerator[Any, None]:
        metrics.ACTIVE_STREAMS.inc()
        try:
            async with aclosing(impl(self, request, self._principal(context), context)) as responses:
                async for response in responses:
                    yield response
        except EngineError as error:
            set_error(context, error)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            _internal(context, impl.__name__)
        finally:
            metrics.ACTIVE_STREAMS.dec()

    return method


class EngineServicer(svc_grpc.EngineServiceServicer):
    """Translates proto <-> domain and domain errors -> status, and owns what only the wire needs.

    That is: the caller's principal from its metadata, the bound on waits (``MAX_WAIT_MS``),
    ListRuns pages bounded in bytes (a run too large is listed in short form), and converting
    large messages off the event loop. The run lifecycle itself is the Engine's.
    """

    def __init__(self, engine: Engine, auth: Authenticator) -> None:
        self._engine = engine
        self._auth = auth

    def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        return self._auth.principal(context.invocation_metadata())

    async def _create_run(self, principal: Principal, message: svc.RunSpec, mode: str = "async") -> RunRecord:
        spec, client_tools = await _off_loop_if_large(message, spec_from_proto, message)
        record, _ = await self._engine.create_run(
            principal,
            spec,
            client_tools,
            mode=mode,
            api_env=dict(message.api.env),
            webhook=webhook_from_proto(message),
        )
        return record

    @_streaming
    async def ExecuteRun(
        self, request: svc.ExecuteRunRequest, principal: Principal, context: Context
    ) -> AsyncGenerator[svc.ExecuteRunResponse, None]:
        record = await self._create_run(principal, request.spec, mode="sync")
        async for batch in self._engine.stream_events(principal, record.run_id, until_pause=True):
            for response in event_responses(svc.ExecuteRunResponse, record.run_id, batch):
                yield response
        final = await self._engine.get_run(principal, record.run_id)
        yield svc.ExecuteRunResponse(run=run_to_proto(final))

    @_streaming
    async def StreamRunEvents(
        self, request: svc.StreamRunEventsRequest, principal: Principal, context: Context
    ) -> AsyncGenerator[svc.StreamRunEventsResponse, None]:
        run_id = request.run_id
        async for batch in self._engine.stream_events(
            principal, run_id, after_seq=request.after_seq, follow=request.follow
        ):
            for response in event_responses(svc.StreamRunEventsResponse, run_id, batch):
                yield response

    @_unary
    async def CreateRun(self, request: svc.CreateRunRequest, principal: Principal, context: Context) -> Any:
        return svc.CreateRunResponse(run=run_to_proto(await self._create_run(principal, request.spec)))

    @_unary
    async def GetRun(self, request: svc.GetRunRequest, principal: Principal, context: Context) -> Any:
        return svc.GetRunResponse(run=run_to_proto(await self._engine.get_run(principal, request.run_id)))

    @_unary
    async def ListRuns(self, request: svc.ListRunsRequest, principal: Principal, context: Context) -> Any:
        converted: dict[str, rp.Run] = {}

        def size_of(record: RunRecord) -> int:
            run = converted[record.run_id] = run_to_proto(record)
            return run.ByteSize() + 8  # and its tag and length in the response

        records, token = await self._engine.list_runs(
            principal,
            states=states_from_proto(request.states),
            labels=dict(request.labels),
            page_size=request.page_size,
            page_token=request.page_token,
            max_bytes=MAX_PAGE_BYTES,
            size_of=size_of,
        )
        runs = [converted[r.run_id] if r.run_id in converted else run_to_proto(r) for r in records]
        if runs and runs[0].ByteSize() > MAX_PAGE_BYTES:
            _short_form(runs[0])  # alone on its page: the others were left to the next one
        return svc.ListRunsResponse(runs=runs, next_page_token=token)

    @_unary
    async def WaitRun(self, request: svc.WaitRunRequest, principal: Principal, context: Context) -> Any:
        if request.timeout_ms < 0:
            raise EngineError(
                "ERR_INVALID_REQUEST", "timeout_ms must not be negative", metadata={"field": "timeout_ms"}
            )
        timeout = min(request.timeout_ms or 30_000, MAX_WAIT_MS) / 1000
        remaining = context.time_remaining()
        if remaining is not None:
            # Answer (timed_out) just before the caller's deadline rather than let it expire.
            timeout = min(timeout, max(0.0, remaining - 0.05))
        record, timed_out = await self._engine.wait_run(principal, request.run_id, timeout)
        return svc.WaitRunResponse(run=run_to_proto(record), timed_out=timed_out)

    @_unary
    async def ResumeRun(self, request: svc.ResumeRunRequest, principal: Principal, context: Context) -> Any:
        decisions = await _off_loop_if_large(request, _decisions_from_proto, request)
        record = await self._engine.resume_run(
            principal,
            request.run_id,
            decisions,
            request.request_id,
            api_env=dict(request.api.env),
            webhook=webhook_from_proto(request),
        )
        return svc.ResumeRunResponse(run=run_to_proto(record))

    @_unary
    async def CancelRun(self, request: svc.CancelRunRequest, principal: Principal, context: Context) -> Any:
        record = await self._engine.cancel_run(principal, request.run_id, request.reason)
        return svc.CancelRunResponse(run=run_to_proto(record))

    @_unary
    async def GetToolResult(
        self, request: svc.GetToolResultRequest, principal: Principal, context: Context
    ) -> Any:
        page = await self._engine.tool_result(
            principal, request.run_id, request.call_id, offset=request.offset, limit=request.limit
        )
        return svc.GetToolResultResponse(
            content=page.content, total_chars=page.total_chars, next_offset=page.next_offset
        )

    @_unary
    async def RecoverOrphanedRuns(
        self, request: svc.RecoverOrphanedRunsRequest, principal: Principal, context: Context
    ) -> Any:
        run_ids = await self._engine.recover_orphaned_runs(principal)
        return svc.RecoverOrphanedRunsResponse(run_ids=run_ids)

    @_unary
    async def GetThread(self, request: svc.GetThreadRequest, principal: Principal, context: Context) -> Any:
        thread = await self._engine.get_thread(principal, request.thread_id)
        return svc.GetThreadResponse(thread=thread_to_proto(thread))

    @_unary
    async def ListThreads(
        self, request: svc.ListThreadsRequest, principal: Principal, context: Context
    ) -> Any:
        threads, token = await self._engine.list_threads(
            principal, labels=dict(request.labels), page_size=request.page_size, page_token=request.page_token
        )
        return svc.ListThreadsResponse(threads=[thread_to_proto(t) for t in threads], next_page_token=token)

    @_unary
    async def DeleteRun(self, request: svc.DeleteRunRequest, principal: Principal, context: Context) -> Any:
        await self._engine.delete_run(principal, request.run_id)
        return svc.DeleteRunResponse()

    @_unary
    async def DeleteThread(
        self, request: svc.DeleteThreadRequest, principal: Principal, context: Context
    ) -> Any:
        run_ids = await self._engine.delete_thread(principal, request.thread_id, force=request.force)
        return svc.DeleteThreadResponse(run_ids=run_ids)

    @_unary
    async def ApplyRetention(
        self, request: svc.ApplyRetentionRequest, principal: Principal, context: Context
    ) -> Any:
        report = await self._engine.apply_retention(principal, dry_run=request.dry_run)
        return svc.ApplyRetentionResponse(
            run_ids=report.run_ids,
            thread_ids=report.thread_ids,
            retention_days=report.retention_days,
            dry_run=report.dry_run,
        )


# A request larger than this is converted in a worker thread: turning megabytes of Struct into
# Python is pure-Python work (about 0.2 s per MB) that would otherwise hold every other RPC.
_INLINE_REQUEST_BYTES = 64 * 1024


async def _off_loop_if_large(message: Any, convert: Callable[[Any], _T], arg: Any) -> _T:
    if message.ByteSize() > _INLINE_REQUEST_BYTES:
        return await asyncio.to_thread(convert, arg)
    return convert(arg)


def _decisions_from_proto(request: svc.ResumeRunRequest) -> list[Decision]:
    return [decision_from_proto(d) for d in request.decisions]


def _short_form(run: rp.Run) -> None:
    """Shrink a run too large for a ListRuns page to a summary; GetRun still returns it whole."""
    run.ClearField("data")
    run.task = shown(run.task, _SHORT_FORM_CHARS)
    if run.HasField("error"):
        run.error.message = shown(run.error.message, _SHORT_FORM_CHARS)
    for interrupt in run.pause.interrupts:
        interrupt.ClearField("arguments")
        interrupt.ClearField("input_schema")
        interrupt.description = shown(interrupt.description, _SHORT_FORM_CHARS)
        interrupt.question = shown(interrupt.question, _SHORT_FORM_CHARS)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: Any  # grpc_health.v1.health.aio.HealthServicer (untyped)
    engine: Engine

    async def stop(self, grace: float = 5.0) -> None:
        """Graceful shutdown: NOT_SERVING first, then drain RPCs and runs."""
        await stop_gracefully(self.server, self.health, self.engine.close, grace)


async def start_server(
    engine: Engine,
    listen: str,
    *,
    api_keys: Mapping[str, Principal] | None = None,
    tls: tuple[bytes, bytes] | None = None,
    max_message_bytes: int = 4 * 1024 * 1024,
    reuse_port: bool = False,
) -> RunningServer:
    """Start EngineService (+ health + reflection) on ``listen``; port 0 picks a free port.

    ``reuse_port`` binds with SO_REUSEPORT: other processes that do the same share the port.
    """
    await engine.start()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
    )
    add_service(server, _SERVICE, EngineServicer(engine, Authenticator(api_keys)))
    port, health_servicer = await serve_with_health(
        server, SERVICE_NAME, listen, tls, sandbox_status=engine.sandbox_status, reuse_port=reuse_port
    )
    return RunningServer(server, port, health_servicer, engine)
