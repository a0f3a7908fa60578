"""The gRPC face of the engine: EngineService servicer, auth, errors, server setup."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf import any_pb2, message_factory
from google.protobuf import message as protobuf_message
from google.protobuf.descriptor import ServiceDescriptor
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from engine_service.api._convert import (
    decision_from_proto,
    event_responses,
    run_to_proto,
    spec_from_proto,
    states_from_proto,
    webhook_from_proto,
)
from engine_service.core._engine import Engine
from engine_service.core._errors import EngineError, ErrorKind, shown
from engine_service.core._run import Decision, RunRecord
from engine_service.core._types import Principal
from engine_service.storage._local import storage_fault
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import engine_service_pb2_grpc as svc_grpc
from machina.engine.v1 import run_pb2 as rp

log = logging.getLogger("machina.engine")

_T = TypeVar("_T")

ERROR_DOMAIN = "machina.dev"
_SERVICE = svc.DESCRIPTOR.services_by_name["EngineService"]
SERVICE_NAME = _SERVICE.full_name

MAX_WAIT_MS = 300_000
# A ListRuns page ends before its runs pass this many bytes; a run larger on its own is listed in
# short form (see ListRunsResponse.runs).
MAX_PAGE_BYTES = 1 << 20
_SHORT_FORM_CHARS = 1000

# A default gRPC client refuses trailers past 8 KiB (grpc.max_metadata_size). The message travels
# twice: percent-encoded in grpc-message, and in grpc-status-details-bin (base64 on the wire) with
# the ErrorInfo. With these bounds an error's trailers stay under about 5 KiB, whatever it repeats.
_MAX_MESSAGE_BYTES = 1024  # as percent-encoded in grpc-message
_MAX_METADATA_ENTRIES = 10
_MAX_METADATA_KEY_BYTES = 64
_MAX_METADATA_VALUE_BYTES = 128


def _fit(text: str, max_bytes: int, *, percent_encoded: bool = False) -> str:
    """``text`` cut (at a character) so that its UTF-8, or its grpc-message percent-encoding, fits."""
    # Lone surrogates (Python strings may hold them, protobuf strings cannot) become U+FFFD.
    data = text.encode("utf-8", "replace")
    head = data[:max_bytes]  # every byte costs at least one
    # grpc-message keeps printable ASCII but '%' and encodes every other byte as %XX.
    cost = [1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in head] if percent_encoded else [1] * len(head)
    if len(data) <= max_bytes and sum(cost) <= max_bytes:
        return data.decode()
    suffix = f"…({len(text)} chars)"
    budget = max_bytes - 3 * len(suffix.encode())
    end = used = 0
    while end < len(head) and used + cost[end] <= budget:
        used += cost[end]
        end += 1
    return head[:end].decode("utf-8", "ignore") + suffix


def error_status(error: EngineError) -> grpc.Status:
    """A canonical status with exactly one google.rpc.ErrorInfo (AIP-193), small enough for any client.

    Errors should show request values through `_errors.shown`; this bounds whatever still gets here.
    """
    code = code_pb2.Code.Value(error.kind.name)  # each ErrorKind is named after its canonical code
    metadata = {
        _fit(key, _MAX_METADATA_KEY_BYTES): _fit(value, _MAX_METADATA_VALUE_BYTES)
        for key, value in list(error.metadata.items())[:_MAX_METADATA_ENTRIES]
    }
    info = error_details_pb2.ErrorInfo(reason=error.code, domain=ERROR_DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    message = _fit(error.message, _MAX_MESSAGE_BYTES, percent_encoded=True)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=[detail]))


def set_error(context: Context, error: EngineError) -> None:
    """End the RPC with ``error`` (as `error_status`) once its handler returns."""
    # Setting the status (instead of abort_with_status) ends the RPC when the
    # handler returns, and works with grpcio-testing's in-memory contexts too.
    status = error_status(error)
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)


# Who decides, resumes or cancels when the engine has no API keys: it then listens on loopback
# only, so the caller is someone on this machine.
LOCAL_IDENTITY = "local-user"


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
            return Principal("default", LOCAL_IDENTITY)
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

    return method


class EngineServicer(svc_grpc.EngineServiceServicer):
    """Translates proto <-> domain and domain errors -> status; no logic of its own."""

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


_DECODE_ERRORS = (protobuf_message.Error, ValueError, RecursionError)


def _malformed(request_type: Any, exc: Exception) -> EngineError:
    return EngineError(
        "ERR_INVALID_REQUEST",
        f"the request is not a valid {request_type.DESCRIPTOR.full_name}: {shown(exc, 200)}",
        metadata={"field": "request", "message_type": request_type.DESCRIPTOR.full_name},
    )


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object) -> None:
    """Register ``servicer`` for ``service`` as the generated ``add_*_to_server`` would, except
    that the handlers parse the requests.

    The generated registration lets grpc parse each request before the servicer runs, and grpc
    answers bytes that do not parse (truncated, bad UTF-8, nested too deep) UNKNOWN without
    ErrorInfo. Here they get INVALID_ARGUMENT with ErrorInfo like every other bad request; valid
    requests pay one more call.
    """
    handlers = _method_handlers(service, servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _method_handlers(service: ServiceDescriptor, servicer: object) -> dict[str, grpc.RpcMethodHandler]:
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        assert not method.client_streaming, method.full_name
        request_type = message_factory.GetMessageClass(method.input_type)
        serialize = message_factory.GetMessageClass(method.output_type).SerializeToString
        impl = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _parsing_stream(impl, request_type), response_serializer=serialize
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _parsing_unary(impl, request_type), response_serializer=serialize
            )
    return handlers


def _parsing_unary(
    impl: Callable[[Any, Context], Awaitable[Any]], request_type: Any
) -> Callable[[bytes, Context], Awaitable[Any]]:
    parse = request_type.FromString

    async def handler(raw: bytes, context: Context) -> Any:
        try:
            request = parse(raw)
        except _DECODE_ERRORS as exc:
            set_error(context, _malformed(request_type, exc))
            return None
        return await impl(request, context)

    return handler


def _parsing_stream(
    impl: Callable[[Any, Context], AsyncGenerator[Any, None]], request_type: Any
) -> Callable[[bytes, Context], AsyncGenerator[Any, None]]:
    parse = request_type.FromString

    async def handler(raw: bytes, context: Context) -> AsyncGenerator[Any, None]:
        try:
            request = parse(raw)
        except _DECODE_ERRORS as exc:
            set_error(context, _malformed(request_type, exc))
            return
        async with aclosing(impl(request, context)) as responses:
            async for response in responses:
                yield response

    return handler


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: Any  # grpc_health.v1.health.aio.HealthServicer (untyped)
    engine: Engine

    async def stop(self, grace: float = 5.0) -> None:
        """Graceful shutdown: NOT_SERVING first, then drain RPCs and runs."""
        await stop_gracefully(self.server, self.health, self.engine.close, grace)


async def stop_gracefully(
    server: grpc.aio.Server, health_servicer: Any, close: Callable[[float], Awaitable[None]], grace: float
) -> None:
    """NOT_SERVING first, then drain RPCs while ``close(grace)`` drains the work behind them."""
    await health_servicer.enter_graceful_shutdown()
    stopping = asyncio.ensure_future(server.stop(grace))
    await close(grace)
    await stopping


# The health service also answers for ``machina.sandbox.<status>`` (bubblewrap, none, unavailable,
# off): a client or a probe can Check it to learn how run processes are confined.
SANDBOX_HEALTH_PREFIX = "machina.sandbox."


async def serve_with_health(
    server: grpc.aio.Server,
    service_name: str,
    listen: str,
    tls: tuple[bytes, bytes] | None,
    sandbox_status: str = "",
) -> tuple[int, Any]:
    """Add health and reflection to ``server``, bind ``listen`` and start; returns (port, health servicer).

    ``tls`` is (PEM private key, PEM certificate chain); None serves plaintext. Once started, the
    server and ``service_name`` report SERVING, and so does ``machina.sandbox.<sandbox_status>``.
    """
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [service_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    if tls is not None:
        port = server.add_secure_port(listen, grpc.ssl_server_credentials([tls]))
    else:
        port = server.add_insecure_port(listen)
    await server.start()
    names = ["", service_name] + ([SANDBOX_HEALTH_PREFIX + sandbox_status] if sandbox_status else [])
    for name in names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return port, health_servicer


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
    add_service(server, _SERVICE, EngineServicer(engine, Authenticator(api_keys)))
    port, health_servicer = await serve_with_health(
        server, SERVICE_NAME, listen, tls, sandbox_status=engine.sandbox_status
    )
    return RunningServer(server, port, health_servicer, engine)
