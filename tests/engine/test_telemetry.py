"""Traces, metrics and transition lines of runs in process (the engine's own layer).

Tracing here records into an in-memory exporter (`install_tracer_provider`), then is turned
off again; tests/system/test_observability.py checks the same over OTLP between processes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from client_py import AsyncEngineClient
from engine_service import RunState
from engine_service.core import _telemetry as telemetry
from tests.conftest import ServerFactory
from tests.engine.harness import Harness, turn
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.timeout(30)

CANARY = "canary-argument-5e1f"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.install_tracer_provider(provider)
    try:
        yield exporter
    finally:
        telemetry.uninstall()


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_an_approved_run_is_one_trace_of_agent_model_and_tool_spans(
    harness: Harness, spans: InMemorySpanExporter
) -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("caller") as caller:
        paused = await harness.run("double it", turn("", ("double", {"x": 21, "note": CANARY})), turn("42"))
    assert paused.state is RunState.PAUSED
    done = await harness.approve(paused)  # outside the caller's span: the run's trace goes on
    assert done.state is RunState.DONE
    finished = spans.get_finished_spans()
    trace_id = caller.get_span_context().trace_id
    assert {s.context.trace_id for s in finished} == {trace_id}
    names = [s.name for s in finished]
    assert names.count("invoke_agent") == 2
    assert names.count("chat script") == 2
    assert names.count("execute_tool double") == 1
    by_id = {s.context.span_id: s for s in finished}
    tool = next(s for s in finished if s.name == "execute_tool double")
    assert tool.parent is not None
    assert by_id[tool.parent.span_id].name == "invoke_agent"
    assert tool.attributes is not None
    assert tool.attributes["gen_ai.tool.name"] == "double"
    assert tool.attributes["gen_ai.operation.name"] == "execute_tool"
    chat = next(s for s in finished if s.name == "chat script")
    assert chat.attributes is not None
    assert chat.attributes["gen_ai.provider.name"] == "scripted"
    assert chat.attributes["gen_ai.response.finish_reasons"] == ("tool_call",)
    # Both stretches of the run hang from the caller's span, the second one too.
    agents = [s for s in finished if s.name == "invoke_agent"]
    assert {a.parent.span_id for a in agents if a.parent} == {caller.get_span_context().span_id}
    # Arguments and answers are never attributes.
    assert CANARY not in repr([dict(s.attributes or {}) for s in finished])


async def test_metrics_and_transition_lines_follow_the_run(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="machina.runs")
    before = {
        "created": _sample("machina_runs_created_total", mode="async"),
        "paused": _sample("machina_runs_paused_total", reason="AWAITING_APPROVAL"),
        "ran": _sample("machina_tool_calls_total", tool="double", outcome="ran"),
        "done": _sample("machina_runs_finished_total", state="done", error_code=""),
        "turns": _sample("machina_turns_total", provider="scripted"),
    }
    paused = await harness.run("double it", turn("", ("double", {"x": 21})), turn("42"))
    done = await harness.approve(paused)
    assert done.state is RunState.DONE
    assert _sample("machina_runs_created_total", mode="async") - before["created"] == 1
    assert _sample("machina_runs_paused_total", reason="AWAITING_APPROVAL") - before["paused"] == 1
    assert _sample("machina_tool_calls_total", tool="double", outcome="ran") - before["ran"] == 1
    assert _sample("machina_runs_finished_total", state="done", error_code="") - before["done"] == 1
    assert _sample("machina_turns_total", provider="scripted") - before["turns"] == 2
    assert _sample("machina_storage_operation_duration_seconds_count", operation="commit") > 0
    lines = [r for r in caplog.records if getattr(r, "run_id", "") == done.run_id]
    assert [getattr(r, "transition", "") for r in lines] == [
        "created",
        "paused",
        "decided",
        "resumed",
        "done",
    ]
    assert all(getattr(r, "workspace", "") == "default" for r in lines)
    assert getattr(lines[1], "interrupt_ids", None) == [i.interrupt_id for i in paused.interrupts]
    assert getattr(lines[2], "by", "") == "harness"
    assert getattr(lines[4], "error_code", None) == ""
    # Tracing is off here: the trace id is empty and nothing was stored for it.
    assert all(getattr(r, "trace_id", None) == "" for r in lines)
    spec = await harness.engine.storage.read_spec("default", done.run_id)
    assert spec is not None
    assert "traceparent" not in spec
    # A JSON line carries every field.
    from engine_service.core._logging import JsonFormatter

    doc = json.loads(JsonFormatter().format(lines[1]))
    assert doc["transition"] == "paused"
    assert doc["reason"] == "AWAITING_APPROVAL"


async def test_the_tracing_bench_measures_both_sides() -> None:
    from bench.tracing import measure

    data = await measure(turns=3, rounds=1)
    assert len(data["off_ms"]) == len(data["on_ms"]) == 1
    assert data["spans"] == 1 + 3 + 2  # invoke_agent, a chat per turn, a tool call in all but the last
    assert telemetry.enabled() is False


async def test_a_recovered_run_continues_its_trace_and_logs_the_recovery(
    harness: Harness, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    caplog.set_level(logging.INFO, logger="machina.runs")
    takeovers = _sample("machina_lease_takeovers_total")
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("caller") as caller:
        record = await harness.create("nap", turn("", ("sleep", {"seconds": 30})), turn("rested"))
    await asyncio.sleep(0.3)  # the call is in flight when the engine stops (its last checkpoint stays)
    harness.clock.advance(3600)  # past the lease: the next engine's sweep takes the run over
    await harness.restart()
    done = await harness.wait(record)
    assert done.state is RunState.DONE
    assert _sample("machina_lease_takeovers_total") - takeovers == 1
    recovered = [r for r in caplog.records if getattr(r, "transition", "") == "recovered"]
    assert [getattr(r, "run_id", "") for r in recovered] == [record.run_id]
    context = caller.get_span_context()
    assert getattr(recovered[0], "trace_id", "") == format(context.trace_id, "032x")
    agents = [s for s in spans.get_finished_spans() if s.name == "invoke_agent"]
    resumed = [a for a in agents if (a.attributes or {}).get("machina.run.resumed_by") == "recovery"]
    assert len(resumed) == 1
    assert resumed[0].parent is not None
    assert (resumed[0].context.trace_id, resumed[0].parent.span_id) == (context.trace_id, context.span_id)


@pytest.mark.parametrize("listed", [True, False])
async def test_webhooks_and_web_fetches_carry_the_run_trace(
    servers: ServerFactory, receiver: Receiver, spans: InMemorySpanExporter, listed: bool
) -> None:
    """WebFetch and webhooks send the trace only to hosts the operator lists in propagate_trace_to."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("traceparent", ""))
            body = b"hello"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    page = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=page.serve_forever, daemon=True).start()
    delivered = _sample("machina_webhook_deliveries_total", result="delivered")
    config: dict[str, Any] = {
        "egress_allow_hosts": ["127.0.0.1"],
        "tools": {"webfetch_allow_hosts": ["127.0.0.1"]},
    }
    if listed:
        config["propagate_trace_to"] = ["localhost", "127.0.0.1"]
    srv = await servers.start(config=config)
    url = f"http://127.0.0.1:{page.server_address[1]}/page"
    tracer = TracerProvider().get_tracer("test")
    try:
        with tracer.start_as_current_span("caller") as caller:
            async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
                handle = await client.create(
                    "fetch",
                    model="scripted",
                    script=[turn("", ("WebFetch", {"url": url})), turn("fetched")],
                    webhook={"url": receiver.url},
                )
                run = await handle.wait(timeout=20)
        assert run.state == "DONE", run
        await receiver.wait_for(1)
    finally:
        page.shutdown()
        page.server_close()
    trace_id = format(caller.get_span_context().trace_id, "032x")
    assert len(seen) == 1
    if listed:
        assert seen[0].split("-")[1] == trace_id  # WebFetch's GET
    else:
        assert seen == [""]  # a host not listed never learns the trace
    headers, _body = receiver.requests[0]
    if listed:
        assert headers["traceparent"].split("-")[1] == trace_id  # the webhook's POST
    else:
        assert "traceparent" not in headers  # nor does a webhook receiver the operator did not list
    # The receiver has the request; the sender counts it once it has the answer and logged it.
    for _ in range(100):
        if _sample("machina_webhook_deliveries_total", result="delivered") - delivered >= 1:
            break
        await asyncio.sleep(0.02)
    assert _sample("machina_webhook_deliveries_total", result="delivered") - delivered == 1
    # The engine's server span is a child of the client's call, under the caller's span.
    names = {s.name for s in spans.get_finished_spans() if s.context.trace_id == int(trace_id, 16)}
    assert {"machina.engine.v1.EngineService/CreateRun", "execute_tool WebFetch", "invoke_agent"} <= names


async def test_a_compaction_summary_is_a_model_call_span_of_its_own(
    servers: ServerFactory, spans: InMemorySpanExporter
) -> None:
    server = await servers.start()
    echo = "lorem ipsum dolor sit amet " * 22
    script = [turn(f"step {i}", ("echo", {"text": f"{i}: {echo}"})) for i in range(29)]
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        run = await client.execute(
            "Run the steps.", script=[*script, turn("done")], context_window_tokens=2_000, max_turns=40
        ).result()
    assert run.state == "DONE", run
    chats = [s for s in spans.get_finished_spans() if s.name == "chat script"]
    # One span per model call: the run's 30 turns and each summarising call besides them.
    assert len(chats) > 30


def test_which_hosts_learn_the_trace() -> None:
    from engine_service.core._telemetry import trace_allowed

    hosts = ["api.internal", "*.corp.example", "10.0.0.7"]
    assert trace_allowed("https://api.internal/x", hosts)
    assert trace_allowed("https://API.internal./x", hosts)
    assert trace_allowed("http://a.b.corp.example:8080/", hosts)
    assert trace_allowed("http://10.0.0.7/", hosts)
    assert not trace_allowed("https://corp.example/", hosts)  # the pattern names subdomains only
    assert not trace_allowed("https://evilcorp.example/", hosts)
    assert not trace_allowed("https://api.internal.evil.com/", hosts)
    assert not trace_allowed("https://example.org/", hosts)
    assert not trace_allowed("https://example.org/", [])
    assert not trace_allowed("not a url", hosts)
    assert trace_allowed("https://anything.at.all/", ["*"])
