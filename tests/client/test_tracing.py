"""The client sends the application's trace context (W3C traceparent) with every call."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider

from client_py._tracing import client_span, with_trace_context

pytestmark = pytest.mark.timeout(30)


def test_calls_outside_any_span_carry_the_metadata_as_given() -> None:
    assert with_trace_context(None) is None
    assert with_trace_context([("x-tenant", "a")]) == (("x-tenant", "a"),)


def test_calls_inside_a_span_carry_its_traceparent() -> None:
    tracer = TracerProvider().get_tracer("app")
    with tracer.start_as_current_span("app") as span:
        metadata = with_trace_context((("authorization", "Bearer k"),))
        with client_span("GetRun") as call:
            inner = dict(with_trace_context(None) or ())
    assert metadata is not None
    context = span.get_span_context()
    traceparent = dict(metadata)["traceparent"]
    assert traceparent.split("-")[1:3] == [format(context.trace_id, "032x"), format(context.span_id, "016x")]
    assert dict(metadata)["authorization"] == "Bearer k"
    # Without an SDK of its own the client's span is the application's context, not a new one.
    assert call is not None
    assert inner["traceparent"].split("-")[1] == format(context.trace_id, "032x")


def test_a_traceparent_the_caller_set_is_kept() -> None:
    tracer = TracerProvider().get_tracer("app")
    mine = "00-" + "c" * 32 + "-" + "d" * 16 + "-01"
    with tracer.start_as_current_span("app"):
        metadata = with_trace_context((("traceparent", mine),))
    assert metadata == (("traceparent", mine),)
