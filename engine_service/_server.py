"""The gRPC face of the engine: EngineService servicer, auth, errors, server setup."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from engine_service._convert import (
    add_events,
    decision_from_proto,
    run_to_proto,
    spec_from_proto,
    states_from_proto,
    webhook_from_proto,
)
from engine_service._engine import Engine
from engine_service._errors import EngineError, ErrorKind
from engine_service._types import Principal
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import engine_service_pb2_grpc as svc_grpc

log = logging.getLogger("machina.engine")

ERROR_DOMAIN = "machina.dev"
SERVICE_NAME = svc.DESCRIPTOR.services_by_name["EngineService"].full_name

_STATUS: dict[ErrorKind, tuple[grpc.StatusCode, int]] = {
    ErrorKind.INVALID_ARGUMENT: (grpc.StatusCode.INVALID_ARGUMENT, code_pb2.INVALID_ARGUMENT),
    ErrorKind.NOT_FOUND: (grpc.StatusCode.NOT_FOUND, code_pb2.NOT_FOUND),
    ErrorKind.ALREADY_EXISTS: (grpc.StatusCode.ALREADY_EXISTS, code_pb2.ALREADY_EXISTS),
    ErrorKind.FAILED_PRECONDITION: (grpc.StatusCode.FAILED_PRECONDITION, code_pb2.FAILED_PRECONDITION),
    ErrorKind.ABORTED: (grpc.StatusCode.ABORTED, code_pb2.ABORTED),
    ErrorKind.PERMISSION_DENIED: (grpc.StatusCode.PERMISSION_DENIED, code_pb2.PERMISSION_DENIED),
    ErrorKind.UNAUTHENTICATED: (grpc.StatusCode.UNAUTHENTICATED, code_pb2.UNAUTHENTICATED),
    ErrorKind.RESOURCE_EXHAUSTED: (grpc.StatusCode.RESOURCE_EXHAUSTED, code_pb2.RESOURCE_EXHAUSTED),
    ErrorKind.UNAVAILABLE: (grpc.StatusCode.UNAVAILABLE, code_pb2.UNAVAILABLE),
    ErrorKind.DEADLINE_EXCEEDED: (grpc.StatusCode.DEADLINE_EXCEEDED, code_pb2.DEADLINE_EXCEEDED),
    ErrorKind.INTERNAL: (grpc.StatusCode.INTERNAL, code_pb2.INTERNAL),
    ErrorKind.UNIMPLEMENTED: (grpc.StatusCode.UNIMPLEMENTED, code_pb2.UNIMPLEMENTED),
}

MAX_WAIT_MS = 300_000


def error_status(error: EngineError) -> grpc.Status:
    """A canonical status with exactly one google.rpc.ErrorInfo (AIP-193)."""
    _, code = _STATUS[error.kind]
    info = error_details_pb2.ErrorInfo(reason=error.code, domain=ERROR_DOMAIN, metadata=error.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    return rpc_status.to_status(status_pb2.Status(code=code, message=error.message, details=[detail]))


class Authenticator:
    """Maps ``authorization: Bearer <key>`` to a workspace.

    Keys are looked up by their SHA-256 so lookup time does not depend on how
    much of a guessed key is right. With no keys configured every caller is
    the ``default`` workspace.
    """

    def __init__(self, keys: Mapping[str, Principal] | None) -> None:
        self._by_digest = {hashlib.sha256(k.encode()).digest(): p for k, p in (keys or {}).items()}
        self.enabled = bool(self._by_digest)

    def principal(self, metadata: Any) -> Principal:
        if not self.enabled:
            return Principal("default", "anonymous")
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value
                break
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise EngineError(
                "ERR_UNAUTHENTICATED",
                "missing 'authorization: Bearer <api key>' metadata",
                kind=ErrorKind.UNAUTHENTICATED,
            )
        digest = hashlib.sha256(token.strip().encode()).digest()
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return principal
        raise EngineError("ERR_UNAUTHENTICATED", "the API key is not valid", kind=ErrorKind.UNAUTHENTICATED)


# grpc.aio.ServicerContext; grpc ships no type information, so it is Any to mypy anyway.
Context: TypeAlias = Any
UnaryImpl = Callable[[Any, Any, Principal, Context], Awaitable[Any]]


def _unary(impl: UnaryImpl) -> Callable[[Any, Any, Context], Awaitable[Any]]:
    """Wrap a unary RPC: authenticate, then map domain errors to a status with ErrorInfo."""

    @functools.wraps(impl)
    async def method(self: EngineServicer, request: Any, context: Context) -> Any:
        try:
            return await impl(self, request, self._principal(context), context)
        except EngineError as error:
            await self._fail(context, error)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            await self._internal(context, impl.__name__)
        return None

    return method


class EngineServicer(svc_grpc.EngineServiceServicer):
    """Translates proto <-> domain and domain errors -> status; no logic of its own."""

    def __init__(self, engine: Engine, auth: Authenticator) -> None:
        self._engine = engine
        self._auth = auth

    async def _fail(self, context: grpc.aio.ServicerContext, error: EngineError) -> None:
        # Setting the status (instead of abort_with_status) ends the RPC when the
        # handler returns, and works with grpcio-testing's in-memory contexts too.
        status = error_status(error)
        context.set_code(status.code)
        context.set_details(status.details)
        context.set_trailing_metadata(status.trailing_metadata)

    async def _internal(self, context: grpc.aio.ServicerContext, rpc: str) -> None:
        log.exception("%s failed with an internal error", rpc)
        await self._fail(
            context,
            EngineError("ERR_INTERNAL", "internal error; see the engine log", kind=ErrorKind.INTERNAL),
        )

    def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        return self._auth.principal(context.invocation_metadata())

    async def ExecuteRun(
        self, request: svc.ExecuteRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[svc.ExecuteRunResponse]:
        try:
            principal = self._principal(context)
            spec, client_tools = spec_from_proto(request.spec)
            record, _ = await self._engine.create_run(
                principal,
                spec,
                client_tools,
                mode="sync",
                api_env=dict(request.spec.api.env),
                webhook=webhook_from_proto(request.spec, "webhook"),
            )
            async for batch in self._engine.stream_events(principal, record.run_id, until_pause=True):
                response = svc.ExecuteRunResponse()
                add_events(response.events, record.run_id, batch)
                yield response
            final = await self._engine.get_run(principal, record.run_id)
            yield svc.ExecuteRunResponse(run=run_to_proto(final))
        except EngineError as error:
            await self._fail(context, error)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            await self._internal(context, "ExecuteRun")

    async def StreamRunEvents(
        self, request: svc.StreamRunEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[svc.StreamRunEventsResponse]:
        try:
            principal = self._principal(context)
            run_id = request.run_id
            async for batch in self._engine.stream_events(
                principal, run_id, after_seq=request.after_seq, follow=request.follow
            ):
                streamed = svc.StreamRunEventsResponse()
                add_events(streamed.events, run_id, batch)
                yield streamed
        except EngineError as error:
            await self._fail(context, error)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            await self._internal(context, "StreamRunEvents")

    @_unary
    async def CreateRun(self, request: svc.CreateRunRequest, principal: Principal, context: Context) -> Any:
        spec, client_tools = spec_from_proto(request.spec)
        record, _ = await self._engine.create_run(
            principal,
            spec,
            client_tools,
            api_env=dict(request.spec.api.env),
            webhook=webhook_from_proto(request.spec, "webhook"),
        )
        return svc.CreateRunResponse(run=run_to_proto(record))

    @_unary
    async def GetRun(self, request: svc.GetRunRequest, principal: Principal, context: Context) -> Any:
        return svc.GetRunResponse(run=run_to_proto(await self._engine.get_run(principal, request.run_id)))

    @_unary
    async def ListRuns(self, request: svc.ListRunsRequest, principal: Principal, context: Context) -> Any:
        records, token = await self._engine.list_runs(
            principal,
            states=states_from_proto(request.states),
            labels=dict(request.labels),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return svc.ListRunsResponse(runs=[run_to_proto(r) for r in records], next_page_token=token)

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
        decisions = [decision_from_proto(d) for d in request.decisions]
        record = await self._engine.resume_run(
            principal,
            request.run_id,
            decisions,
            request.request_id,
            api_env=dict(request.api.env),
            webhook=webhook_from_proto(request, "webhook"),
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
        if request.offset < 0 or request.limit < 0:
            raise EngineError("ERR_INVALID_REQUEST", "offset and limit must not be negative")
        full = await self._engine.tool_result(principal, request.run_id, request.call_id)
        end = request.offset + (request.limit or 1_000_000)
        return svc.GetToolResultResponse(
            content=full[request.offset : end],
            total_chars=len(full),
            next_offset=end if end < len(full) else 0,
        )

    @_unary
    async def RecoverOrphanedRuns(
        self, request: svc.RecoverOrphanedRunsRequest, principal: Principal, context: Context
    ) -> Any:
        run_ids = await self._engine.recover_orphaned_runs(principal)
        return svc.RecoverOrphanedRunsResponse(run_ids=run_ids)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: Any  # grpc_health.v1.health.aio.HealthServicer (untyped)
    engine: Engine

    async def stop(self, grace: float = 5.0) -> None:
        """Graceful shutdown: NOT_SERVING first, then drain RPCs and runs."""
        await self.health.enter_graceful_shutdown()
        stopping = asyncio.ensure_future(self.server.stop(grace))
        await self.engine.close(grace)
        await stopping


async def start_server(
    engine: Engine,
    listen: str,
    *,
    api_keys: Mapping[str, Principal] | None = None,
    tls: tuple[bytes, bytes] | None = None,
    max_message_bytes: int = 4 * 1024 * 1024,
) -> RunningServer:
    """Start EngineService (+ health + reflection) on ``listen``; port 0 picks a free port."""
    await engine.start()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    svc_grpc.add_EngineServiceServicer_to_server(EngineServicer(engine, Authenticator(api_keys)), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    if tls is not None:
        key, cert = tls
        port = server.add_secure_port(listen, grpc.ssl_server_credentials([(key, cert)]))
    else:
        port = server.add_insecure_port(listen)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, port, health_servicer, engine)
