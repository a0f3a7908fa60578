"""Client spans and trace context, when the application uses OpenTelemetry.

If ``opentelemetry-api`` is importable, each unary call is a CLIENT span (``rpc.*`` attributes)
and every call, streams included, carries the current span's W3C ``traceparent`` in its
metadata, so the engine's spans join the application's trace. Without it, nothing happens.
The API key is never an attribute.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

_otel: Any
try:
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace

    _otel = (_propagate, _trace)
except ImportError:  # pragma: no cover - the client does not require OpenTelemetry
    _otel = None

_SERVICE = "machina.engine.v1.EngineService"


def with_trace_context(
    metadata: Sequence[tuple[str, str]] | None,
) -> tuple[tuple[str, str], ...] | None:
    """``metadata`` plus ``traceparent`` (and ``tracestate``) of the current span, if there is one."""
    if _otel is None:
        return None if metadata is None else tuple(metadata)
    carrier: dict[str, str] = {}
    _otel[0].inject(carrier)
    given = {k for k, _ in metadata or ()}
    extra = tuple((k, v) for k, v in carrier.items() if k in ("traceparent", "tracestate") and k not in given)
    if not extra:
        return None if metadata is None else tuple(metadata)
    return (*(metadata or ()), *extra)


@contextlib.contextmanager
def client_span(method: str) -> Iterator[Any]:
    """A CLIENT span for one call of ``method`` (a no-op span without an SDK)."""
    if _otel is None:
        yield None
        return
    trace = _otel[1]
    tracer = trace.get_tracer("machina.client")
    attributes = {"rpc.system": "grpc", "rpc.service": _SERVICE, "rpc.method": method}
    with tracer.start_as_current_span(
        f"{_SERVICE}/{method}", kind=trace.SpanKind.CLIENT, attributes=attributes
    ) as span:
        yield span
