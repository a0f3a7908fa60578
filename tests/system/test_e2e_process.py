"""The engine as a real process: entry point, health, reflection, graceful shutdown, the demo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client_py import (
    ApprovalDecided,
    EngineClient,
)
from tests.conftest import ROOT, turn
from tests.processes import EngineProcess

pytestmark = pytest.mark.slow


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[EngineProcess]:
    keys = tmp_path / "keys.toml"
    keys.write_text('"sk-test-secret-value-0001" = { workspace = "team-a", name = "alice" }\n')
    process = EngineProcess(
        tmp_path,
        "--storage",
        str(tmp_path / "data"),
        "--api-keys-file",
        str(keys),
        env={"MACHINA_TOOLS_CUSTOM": "tests.tools:double", "MACHINA_TOOLS_PERMISSIONS": "double=ask"},
    )
    yield process
    process.close()


def test_health_reflection_run_and_graceful_shutdown(engine: EngineProcess) -> None:
    with grpc.insecure_channel(engine.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="machina.engine.v1.EngineService")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = {s.name for r in responses for s in r.list_services_response.service}
        assert {"machina.engine.v1.EngineService", "grpc.health.v1.Health"} <= services

    with EngineClient(engine.target, api_key="sk-test-secret-value-0001") as client:
        execution = client.execute(
            "double 4", model="scripted", script=[turn("", ("double", {"x": 4})), turn("8")]
        )
        kinds = [e.kind for e in execution]
        assert kinds[-1] == "paused"
        run = execution.run
        assert run is not None
        handle = client.attach(run.run_id)
        handle.approve(run.interrupts[0].interrupt_id)
        run = handle.wait(timeout=20)
        assert (run.state, run.data, run.workspace_id) == ("DONE", "8", "team-a")
        decided = next(e for e in handle.events(follow=False) if isinstance(e, ApprovalDecided))
        assert decided.decided_by == "alice"

    assert engine.stop() == 0
    lines = [json.loads(line) for line in engine.log.read_text().splitlines() if line.startswith("{")]
    messages = [line["msg"] for line in lines]
    assert any("serving on 127.0.0.1" in m for m in messages)
    assert any("shutting down" in m for m in messages)
    assert messages[-1] == "engine stopped"
    assert "sk-test-secret-value-0001" not in engine.log.read_text()


def test_refuses_a_public_address_without_api_keys(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "engine_service", "--listen", "0.0.0.0:0", "--storage", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "without API keys" in result.stderr


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "engine_service", "--listen", "nonsense"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "listen" in result.stderr
    assert "Traceback" not in result.stderr


def test_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "engine_service", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    assert "--listen" in result.stdout


def test_the_demo_runs_end_to_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY")}
    env["TMPDIR"] = str(tmp_path)  # where the demo makes its working directory
    result = subprocess.run(
        [sys.executable, "-m", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for expected in (
        "model:",
        "get_weather",
        "handed off to the runner",
        "resumed by runner",
        "Paris: sunny, 21°C",
        "approval needed",
        "approving send_email",
        "queued message",
        "final state: DONE",
        "engine and runner stopped gracefully (exit 0, 0)",
        "approve by local-user",  # who approved: the engine has no API keys, so the local user
        "DONE · turns 4 · tokens",  # the progress line, left in place at the end
    ):
        assert expected in out
    assert "anonymous" not in out
    # The scripted model counts what it was given and what it said.
    tokens_in, tokens_out = (int(n) for n in re.findall(r"tokens (\d+) in / (\d+) out", out)[-1])
    assert tokens_in > 0
    assert tokens_out > 0
    # It removes what it created, and says so.
    assert "removed " in out
    assert list(tmp_path.iterdir()) == []
