"""Traces: a thin layer over the OpenTelemetry API, free when tracing is off.

Tracing is off unless the standard ``OTEL_TRACES_EXPORTER`` variable names an exporter (``otlp``,
``console``) and the ``otel`` extra (the SDK and the OTLP exporters) is installed; ``configure``
reads the variables once at startup. While it is off every helper here returns at once: no span,
no context switch, no header.

Spans follow the OpenTelemetry GenAI conventions: ``invoke_agent`` for each stretch of a run that
a process executes, ``chat {model}`` for each model call and ``execute_tool {name}`` for each tool
call. A run's trace context (W3C ``traceparent``) is kept in its spec, so the stretches a runner
or a recovering process executes later belong to the same trace. Attributes never carry a secret:
no tool arguments, no model text, no credentials.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Collection, Iterator, Mapping, MutableMapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

log = logging.getLogger("machina.engine")

_TRACER_NAME = "machina"
_state: dict[str, Any] = {"on": False, "tracer": None, "providers": []}


class TelemetryConfigError(Exception):
    """An OTEL_* variable asks for something this installation cannot do (one line for the operator)."""


def enabled() -> bool:
    """Whether spans are recorded in this process."""
    return bool(_state["on"])


def configure(service_name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Set up tracing (and OTLP metrics) from the standard OTEL_* variables; True if tracing is on.

    ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console`` or ``none``, the default) turns traces on;
    ``OTEL_METRICS_EXPORTER`` (``otlp``) sends the metrics over OTLP too. Endpoints, headers,
    protocol (``http/protobuf`` by default, or ``grpc``) and batching come from the usual
    ``OTEL_EXPORTER_OTLP_*`` and ``OTEL_BSP_*`` variables, which the SDK reads itself.
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    traces = _names(env.get("OTEL_TRACES_EXPORTER", ""))
    metrics = _names(env.get("OTEL_METRICS_EXPORTER", ""))
    if not traces and not metrics:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
    except ImportError:
        raise TelemetryConfigError(
            "OTEL_TRACES_EXPORTER/OTEL_METRICS_EXPORTER need the OpenTelemetry SDK: install "
            "machina-engine[otel], or unset them"
        ) from None
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or service_name})
    if traces:
        install_tracer_provider(_tracer_provider(resource, traces, env))
    if metrics:
        from engine_service.core import _metrics

        _metrics.export_otlp(_meter_provider(resource, metrics, env))
    log.info(
        "OpenTelemetry on: traces %s, metrics %s",
        ",".join(traces) or "off",
        ",".join(metrics) or "off",
        extra={"otel_traces": ",".join(traces), "otel_metrics": ",".join(metrics)},
    )
    return bool(traces)


def _names(value: str) -> list[str]:
    return [n for n in (p.strip().lower() for p in value.split(",")) if n and n != "none"]


def _protocol(env: Mapping[str, str], signal: str) -> str:
    return (
        env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    ).strip() or "http/protobuf"


def _tracer_provider(resource: Any, names: Sequence[str], env: Mapping[str, str]) -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=resource)
    for name in names:
        exporter: Any
        if name == "console":
            exporter = ConsoleSpanExporter()
        elif name == "otlp" and _protocol(env, "TRACES") == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        elif name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpSpanExporter,
            )

            exporter = HttpSpanExporter()
        else:
            raise TelemetryConfigError(f"OTEL_TRACES_EXPORTER={name!r} is not supported: use otlp or console")
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _meter_provider(resource: Any, names: Sequence[str], env: Mapping[str, str]) -> Any:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

    readers = []
    for name in names:
        exporter: Any
        if name == "console":
            exporter = ConsoleMetricExporter()
        elif name == "otlp" and _protocol(env, "METRICS") == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            exporter = OTLPMetricExporter()
        elif name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter as HttpMetricExporter,
            )

            exporter = HttpMetricExporter()
        elif name == "prometheus":
            continue  # the Prometheus endpoint is --metrics-listen, always available
        else:
            raise TelemetryConfigError(
                f"OTEL_METRICS_EXPORTER={name!r} is not supported: use otlp, console or prometheus"
            )
        readers.append(PeriodicExportingMetricReader(exporter))
    provider = MeterProvider(resource=resource, metric_readers=readers)
    _state["providers"].append(provider)
    return provider


def install_tracer_provider(provider: Any) -> None:
    """Record spans with ``provider`` (an SDK TracerProvider) in this process; used by `configure`
    and by benchmarks and tests that bring an in-memory exporter."""
    _state["tracer"] = provider.get_tracer(_TRACER_NAME)
    _state["providers"].append(provider)
    _state["on"] = True


def uninstall() -> None:
    """Stop recording spans (benchmarks compare on and off in one process)."""
    _state["on"] = False
    _state["tracer"] = None


def shutdown() -> None:
    """Flush what is batched (at process exit)."""
    for provider in _state["providers"]:
        with contextlib.suppress(Exception):
            provider.shutdown()
    _state["providers"] = []
    uninstall()


# -- spans -----------------------------------------------------------------------------------


class _Null:
    """What a span helper yields while tracing is off: every call is a no-op."""

    __slots__ = ()

    def set_attribute(self, key: str, value: Any) -> None:
        return None

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        return None

    def record_error(self, error_type: str, description: str = "") -> None:
        return None


NULL = _Null()


class _Live:
    __slots__ = ("errored", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.errored = False

    def set_attribute(self, key: str, value: Any) -> None:
        self.span.set_attribute(key, value)

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        self.span.set_attributes(attributes)

    def record_error(self, error_type: str, description: str = "") -> None:
        self.errored = True
        self.span.set_attribute("error.type", error_type)
        self.span.set_status(Status(StatusCode.ERROR, description or error_type))


SpanHandle = _Null | _Live


@contextlib.contextmanager
def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    parent: str = "",
    carrier: Mapping[str, str] | None = None,
) -> Iterator[SpanHandle]:
    """A span around the block, current inside it; nothing at all while tracing is off.

    The parent is the current span, or the ``traceparent`` given (a run's own trace), or the one
    in ``carrier`` (incoming request headers or metadata); the current span is then a link.
    """
    if not _state["on"]:
        yield NULL
        return
    tracer = _state["tracer"]
    ctx = None
    links: list[Link] = []
    incoming = carrier if carrier is not None else ({"traceparent": parent} if parent else None)
    if incoming:
        ctx = propagate.extract(incoming)
        current = trace.get_current_span().get_span_context()
        if current.is_valid and current.trace_id != trace.get_current_span(ctx).get_span_context().trace_id:
            links.append(Link(current))
    with tracer.start_as_current_span(
        name, context=ctx, kind=kind, attributes=attributes, links=links, record_exception=False
    ) as live:
        handle = _Live(live)
        try:
            yield handle
        except BaseException as exc:
            if not handle.errored and not isinstance(exc, GeneratorExit):
                handle.record_error(type(exc).__name__)
            raise


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the current span ("" when there is none, or tracing is off)."""
    if not _state["on"]:
        return ""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def inject(headers: MutableMapping[str, str]) -> None:
    """Add ``traceparent`` (and ``tracestate``) of the current span to outbound request headers."""
    if _state["on"]:
        propagate.inject(headers)


def inject_for(headers: MutableMapping[str, str], url: str, hosts: Collection[str]) -> None:
    """`inject`, only when ``url``'s host is one the operator lets see the trace (``hosts``:
    exact names or IP literals, ``*.example.com`` for its subdomains, ``*`` for every host).
    A trace id sent elsewhere would tell a third party which requests belong together."""
    if _state["on"] and hosts and trace_allowed(url, hosts):
        propagate.inject(headers)


def trace_allowed(url: str, hosts: Collection[str]) -> bool:
    try:
        host = (urlsplit(url).hostname or "").lower().rstrip(".")
    except ValueError:
        return False
    if not host:
        return False
    for pattern in hosts:
        pattern = pattern.strip().lower().rstrip(".")
        if pattern == "*" or pattern == host:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


def trace_id_of(traceparent: str) -> str:
    """The trace id in a ``traceparent`` value ("" if it is not one)."""
    parts = traceparent.split("-")
    if len(parts) >= 4 and len(parts[1]) == 32:
        return parts[1]
    return ""


def current_trace_id() -> str:
    if not _state["on"]:
        return ""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def attach_traceparent(traceparent: str) -> object | None:
    """Make ``traceparent`` the current context (returns a token for `detach`); None if off."""
    if not _state["on"] or not traceparent:
        return None
    return otel_context.attach(propagate.extract({"traceparent": traceparent}))


def detach(token: object | None) -> None:
    if token is not None:
        otel_context.detach(token)  # type: ignore[arg-type]


__all__ = [
    "NULL",
    "SpanHandle",
    "SpanKind",
    "TelemetryConfigError",
    "configure",
    "current_trace_id",
    "current_traceparent",
    "enabled",
    "inject",
    "inject_for",
    "install_tracer_provider",
    "shutdown",
    "span",
    "trace_allowed",
    "trace_id_of",
    "uninstall",
]
