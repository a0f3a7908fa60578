"""Tracing off (the default) is a no-op: no span, no context change, no header, no stored context."""

from __future__ import annotations

import pytest
from opentelemetry import trace

from engine_service.core import _telemetry as telemetry
from engine_service.core._run import RunSpec

pytestmark = pytest.mark.timeout(30)


def test_no_otel_variables_means_off() -> None:
    assert telemetry.configure("machina-engine", environ={}) is False
    assert telemetry.configure("machina-engine", environ={"OTEL_TRACES_EXPORTER": "none"}) is False
    off = {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}
    assert telemetry.configure("machina-engine", environ=off) is False
    assert telemetry.enabled() is False


def test_an_unknown_exporter_is_a_clear_error_and_leaves_tracing_off() -> None:
    with pytest.raises(telemetry.TelemetryConfigError, match="OTEL_TRACES_EXPORTER='zipkinish'"):
        telemetry.configure("machina-engine", environ={"OTEL_TRACES_EXPORTER": "zipkinish"})
    assert telemetry.enabled() is False


def test_spans_helpers_do_nothing_while_off() -> None:
    before = trace.get_current_span()
    with telemetry.span(
        "invoke_agent", attributes={"a": 1}, parent="00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    ) as s:
        assert s is telemetry.NULL
        assert trace.get_current_span() is before  # no context was attached
        s.set_attribute("x", 1)
        s.record_error("boom")
    headers: dict[str, str] = {}
    telemetry.inject(headers)
    assert headers == {}
    assert telemetry.current_traceparent() == ""
    assert telemetry.current_trace_id() == ""
    assert telemetry.attach_traceparent("00-" + "1" * 32 + "-" + "2" * 16 + "-01") is None


def test_a_spec_without_trace_context_stores_none() -> None:
    doc = RunSpec(task="t").to_json()
    assert "traceparent" not in doc
    assert RunSpec.from_json(doc).traceparent == ""
    traced = RunSpec(task="t", traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    assert RunSpec.from_json(traced.to_json()).traceparent == traced.traceparent


def test_trace_ids_come_out_of_traceparents() -> None:
    assert telemetry.trace_id_of("00-" + "a" * 32 + "-" + "b" * 16 + "-01") == "a" * 32
    assert telemetry.trace_id_of("garbage") == ""
