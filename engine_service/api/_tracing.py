"""gRPC server spans: one per call, a child of the caller's ``traceparent`` metadata.

Registered by `serving.add_service` around every handler of a service (the engine's and the
runner's) only while tracing is on; off, the handlers are registered as they are.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import grpc

from engine_service.core import _telemetry as telemetry


def _attributes(service: str, method: str) -> dict[str, Any]:
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


def _metadata(context: Any) -> dict[str, str]:
    # Only the trace headers are read: never the authorization value.
    return {
        k: v
        for k, v in (context.invocation_metadata() or ())
        if k in ("traceparent", "tracestate") and isinstance(v, str)
    }


def _status(context: Any) -> grpc.StatusCode:
    try:
        code = context.code()
    except (AttributeError, NotImplementedError):  # pragma: no cover - older grpc
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.OK


def _finish(span: telemetry.SpanHandle, context: Any) -> None:
    code = _status(context)
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code not in (grpc.StatusCode.OK,):
        span.record_error(code.name)


def traced_unary(
    service: str, method: str, handler: Callable[[bytes, Any], Awaitable[Any]]
) -> Callable[[bytes, Any], Awaitable[Any]]:
    name = f"{service}/{method}"
    attributes = _attributes(service, method)

    async def traced(raw: bytes, context: Any) -> Any:
        with telemetry.span(
            name, kind=telemetry.SpanKind.SERVER, attributes=attributes, carrier=_metadata(context)
        ) as span:
            result = await handler(raw, context)
            _finish(span, context)
            return result

    return traced


def traced_stream(
    service: str, method: str, handler: Callable[[bytes, Any], AsyncGenerator[Any, None]]
) -> Callable[[bytes, Any], AsyncGenerator[Any, None]]:
    name = f"{service}/{method}"
    attributes = _attributes(service, method)

    async def traced(raw: bytes, context: Any) -> AsyncGenerator[Any, None]:
        with telemetry.span(
            name, kind=telemetry.SpanKind.SERVER, attributes=attributes, carrier=_metadata(context)
        ) as span:
            responses = handler(raw, context)
            try:
                async for response in responses:
                    yield response
            finally:
                await responses.aclose()
            _finish(span, context)

    return traced
