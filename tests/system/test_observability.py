"""Traces, metrics and transition logs of real engine and runner processes.

An approval run whose approved step needs the runner (the engine has no subprocess capability):
its spans, exported by both processes over OTLP/HTTP to a receiver on loopback, form ONE trace
under the caller's span; ``/metrics`` of each process, scraped over HTTP and parsed with
prometheus_client's parser, counts what happened; each transition is one log line with the run
id, the workspace and the trace id; and no secret (API key, runner secret) shows anywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families

from client_py import AsyncEngineClient, UnauthenticatedError
from tests.conftest import turn
from tests.otlp_receiver import OtlpReceiver, Span, otlp_receiver
from tests.processes import EngineProcess, RunnerProcess, free_port
from tests.runner.test_runner import shared_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

API_KEY = "canary-api-key-7f3a9c1e5b"
RUNNER_SECRET = "canary-runner-secret-2d8e4b6a0c"
WRONG_KEY = "canary-wrong-key-9b1d3f5e7a"

APPROVE_THEN_BASH = [
    turn("I'll run it.", ("Bash", {"command": "echo hello-from-runner"})),
    turn("It printed hello-from-runner."),
]


def _otel_env(receiver: OtlpReceiver) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
    }


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def _eventually(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def _transitions(log: Path, run_id: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [d for d in lines if d.get("run_id") == run_id and "transition" in d]


async def test_an_approval_run_handed_to_a_runner_is_one_trace_with_metrics_and_transition_logs(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(f'"{API_KEY}" = {{ workspace = "acme", name = "alice" }}\n')
    engine_metrics, runner_metrics = free_port(), free_port()
    with otlp_receiver() as receiver:
        env = shared_env(tmp_path, MACHINA_RUNNER_SECRET=RUNNER_SECRET, **_otel_env(receiver))
        runner = RunnerProcess(
            tmp_path, "--metrics-listen", f"127.0.0.1:{runner_metrics}", env=env | {"OTEL_SERVICE_NAME": "r"}
        )
        engine = EngineProcess(
            tmp_path,
            "--metrics-listen",
            f"127.0.0.1:{engine_metrics}",
            env=env
            | {
                "MACHINA_CAPABILITIES_SUBPROCESS": "false",
                "MACHINA_RUNNER_URL": f"{runner.http}/continue",
                "MACHINA_RUNNER_TIMEOUT_S": "10",
                "MACHINA_API_KEYS_FILE": str(keys),
            },
        )
        try:
            # The caller's own span: everything below is in its trace.
            tracer = TracerProvider().get_tracer("test")
            with tracer.start_as_current_span("caller") as caller:
                trace_id = format(caller.get_span_context().trace_id, "032x")
                async with AsyncEngineClient(engine.target, api_key=API_KEY) as client:
                    handle = await client.create(
                        "run a command",
                        model="scripted",
                        script=APPROVE_THEN_BASH,
                        permissions={"Bash": "ask"},
                    )
                    paused = await handle.wait(timeout=30)
                    assert paused.state == "PAUSED", paused
                    await handle.approve(paused.interrupts[0].interrupt_id)
                    run = await handle.wait(timeout=30)
                    assert (run.state, run.data) == ("DONE", "It printed hello-from-runner."), run
                    plain = await client.create("just answer", model="scripted", script=[turn("hi")])
                    assert (await plain.wait(timeout=30)).state == "DONE"
                async with AsyncEngineClient(engine.target, api_key=WRONG_KEY) as intruder:
                    with pytest.raises(UnauthenticatedError):
                        await intruder.get_run(handle.run_id)

            async with httpx.AsyncClient(timeout=10) as http:
                refused_post = await http.post(
                    f"{runner.http}/continue",
                    json={"runId": handle.run_id},
                    headers={"Authorization": f"Bearer {WRONG_KEY}"},
                )
            assert refused_post.status_code == 401

            # -- metrics, scraped over HTTP ------------------------------------------------------
            at_engine, at_runner = _scrape(engine_metrics), _scrape(runner_metrics)
            assert _value(at_engine, "machina_runs_created_total", mode="async") == 2
            assert _value(at_engine, "machina_runs_paused_total", reason="AWAITING_APPROVAL") == 1
            assert _value(at_engine, "machina_runs_paused_total", reason="HANDOFF_TO_RUNNER") == 1
            assert _value(at_engine, "machina_handoffs_total", result="accepted") == 1
            assert _value(at_engine, "machina_runs_resumed_total", how="caller") == 1
            assert _value(at_engine, "machina_runs_finished_total", state="done", error_code="") == 1
            assert _value(at_engine, "machina_turns_total", provider="scripted") == 2
            assert _value(at_engine, "machina_model_call_duration_seconds_count", provider="scripted",
                          outcome="ok") == 2  # fmt: skip
            assert _value(at_engine, "machina_tool_calls_total", tool="Bash", outcome="ran") == 0
            assert _value(at_engine, "machina_auth_refused_total", service="engine") == 1
            assert _value(at_engine, "machina_active_streams") == 0
            assert _value(at_engine, "machina_runs_active") == 0
            assert (
                _value(at_engine, "machina_storage_operation_duration_seconds_count", operation="commit") > 0
            )
            assert _value(at_runner, "machina_auth_refused_total", service="runner") == 1
            assert _value(at_runner, "machina_runs_resumed_total", how="runner") == 1
            assert _value(at_runner, "machina_tool_calls_total", tool="Bash", outcome="ran") == 1
            assert _value(at_runner, "machina_turns_total", provider="scripted") == 1
            assert _value(at_runner, "machina_runs_finished_total", state="done", error_code="") == 1
            assert _value(at_runner, "machina_model_tokens_total", provider="scripted", type="output") > 0
            # No run id is ever a label.
            assert not any(handle.run_id in str(labels) for _name, labels in (*at_engine, *at_runner))
        finally:
            assert engine.stop() == 0
            assert runner.stop() == 0
            engine.close()
            runner.close()
        await _eventually(lambda: {"machina_turns", "machina_runs_created"} <= receiver.metric_names,
                          f"OTLP metrics: {receiver.metric_names}")  # fmt: skip
        spans = list(receiver.spans)

    # -- one trace across the caller, the engine and the runner ---------------------------------
    model = run.meta.model.partition(":")[2]
    run_spans = [s for s in spans if s.trace_id == trace_id]
    by_id = {s.span_id: s for s in run_spans}
    names = [(s.service, s.name) for s in run_spans]
    service = "machina.engine.v1.EngineService"
    for expected in [
        ("machina-engine", f"{service}/CreateRun"),
        ("machina-engine", f"{service}/ResumeRun"),
        ("machina-engine", "invoke_agent"),
        ("machina-engine", f"chat {model}"),
        ("r", "POST /continue"),
        ("r", "invoke_agent"),
        ("r", f"chat {model}"),
        ("r", "execute_tool Bash"),
    ]:
        assert expected in names, (expected, names)
    # Every span of the run hangs from the caller's span, through parents that are all in the trace.
    caller_id = format(caller.get_span_context().span_id, "016x")
    for s in run_spans:
        seen = s
        while seen.parent_id != caller_id:
            assert seen.parent_id in by_id, (s.name, seen.name)
            seen = by_id[seen.parent_id]

    def parent(s: Span) -> Span:
        return by_id[s.parent_id]

    agents = [
        s
        for s in run_spans
        if s.name == "invoke_agent" and s.attributes["gen_ai.conversation.id"] == handle.run_id
    ]
    assert sorted(a.service for a in agents) == ["machina-engine", "machina-engine", "r"]
    # Each stretch of the run (started, resumed after the approval, continued by the runner)
    # is a child of the CreateRun call that made it.
    assert len({a.parent_id for a in agents}) == 1
    assert parent(agents[0]).name == f"{service}/CreateRun"
    tool = next(s for s in run_spans if s.name == "execute_tool Bash")
    assert (parent(tool).name, parent(tool).service) == ("invoke_agent", "r")
    assert tool.attributes["gen_ai.tool.name"] == "Bash"
    continue_span = next(s for s in run_spans if s.name == "POST /continue")
    assert (parent(continue_span).name, parent(continue_span).service) == ("invoke_agent", "machina-engine")
    chats = [s for s in run_spans if s.name == f"chat {model}"]
    assert all(c.attributes["gen_ai.operation.name"] == "chat" for c in chats)
    assert all(c.attributes["gen_ai.request.model"] == model for c in chats)
    assert all(c.attributes["gen_ai.usage.output_tokens"] > 0 for c in chats)
    assert any(c.attributes["gen_ai.response.finish_reasons"] == ["tool_call"] for c in chats)
    assert all(parent(c).name == "invoke_agent" for c in chats)

    # -- one log line per transition, with run id, workspace and trace id ---------------------
    engine_lines = _transitions(engine.log, handle.run_id)
    runner_lines = _transitions(runner.log, handle.run_id)
    assert [d["transition"] for d in engine_lines] == [
        "created",
        "paused",
        "decided",
        "resumed",
        "handed_off",
    ]
    assert [d["transition"] for d in runner_lines] == ["resumed", "done"]
    for line in engine_lines + runner_lines:
        assert (line["workspace"], line["trace_id"]) == ("acme", trace_id), line
    paused_line = engine_lines[1]
    assert paused_line["reason"] == "AWAITING_APPROVAL"
    assert paused_line["interrupt_ids"] == [paused.interrupts[0].interrupt_id]
    assert engine_lines[2]["by"] == "alice"
    assert runner_lines[-1]["error_code"] == ""
    wrong = hashlib.sha256(WRONG_KEY.encode()).hexdigest()[:12]
    for process in (engine, runner):
        lines = process.log.read_text().splitlines()
        refused = [json.loads(line) for line in lines if '"auth": "refused"' in line]
        assert [r["key_fingerprint"] for r in refused] == [wrong], process.log

    # -- no secret anywhere ---------------------------------------------------------------------
    everything = engine.log.read_text() + runner.log.read_text() + repr([s.attributes for s in spans])
    for secret in (API_KEY, RUNNER_SECRET, WRONG_KEY):
        assert secret not in everything


async def test_the_metrics_endpoint_is_off_by_default_and_a_busy_port_is_one_line(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(  # noqa: ASYNC221 - the test waits for nothing else
            [sys.executable, "-m", "engine_service", "--listen", "127.0.0.1:0", "--storage",
             str(tmp_path / "s"), "--metrics-listen", f"127.0.0.1:{port}"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "MACHINA_METRICS_LISTEN" in lines[0]


def test_an_unknown_trace_exporter_is_one_line_and_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    result = subprocess.run(
        [sys.executable, "-m", "engine_service", "--listen", "127.0.0.1:0", "--storage", str(tmp_path / "s")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "OTEL_TRACES_EXPORTER": "zipkinish"},
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "OTEL_TRACES_EXPORTER='zipkinish'" in lines[0]
