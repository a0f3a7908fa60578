"""The two wheels a user installs: built from the repository, installed into clean environments.

- ``machina-client`` works with only grpcio and protobuf, down to an approval against a live engine;
- ``machina-engine`` (with its ``s3`` and ``mcp`` extras) serves ``--help`` and the demo's config
  from its console scripts;
- no module is in both wheels, and both carry the one version in ``VERSION``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from google.rpc import error_details_pb2, status_pb2

from client_py import EngineClient
from tests.processes import EngineProcess, ServiceProcess
from tests.system.uv import uv

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {"machina-client", "grpcio", "protobuf", "typing-extensions"}
VERSION = (ROOT / "VERSION").read_text().strip()

SMOKE = textwrap.dedent(
    """
    import importlib.util, sys
    import grpc
    import client_py

    assert "/site-packages/" in client_py.__file__, client_py.__file__
    # The client must decode ErrorInfo without googleapis-common-protos.
    assert importlib.util.find_spec("google.rpc") is None
    client = client_py.AsyncEngineClient("127.0.0.1:1", api_key="sk-test-123")
    assert "sk-test-123" not in repr(client)

    trailing = grpc.aio.Metadata(("grpc-status-details-bin", bytes.fromhex(sys.argv[1])))
    exc = grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), trailing, details="x")
    err = client_py.error_from_rpc(exc)
    assert type(err) is client_py.RunNotFoundError, repr(err)
    assert err.metadata == {"run_id": "r1"}, err.metadata

    # Nothing listens on port 1: the sync client reports it as UnavailableError.
    with client_py.EngineClient("127.0.0.1:1", max_retries=0, call_timeout=10) as sync:
        try:
            sync.get_run("r1")
        except client_py.UnavailableError:
            pass
        else:
            raise AssertionError("expected UnavailableError")
    print("smoke ok")
    """
)

# Run by the clean client environment against a live engine serving demo/engine.toml.
APPROVAL = textwrap.dedent(
    """
    import sys
    from client_py import EngineClient

    script = [
        {"text": "", "tool_calls": [{"name": "send_email",
            "arguments": {"to": "a@example.com", "subject": "s", "body": "b"}}]},
        {"text": "sent"},
    ]
    with EngineClient(sys.argv[1]) as client:
        handle = client.create("Email a", model="scripted", script=script)
        run = handle.wait(timeout=20)
        assert run.state == "PAUSED", run
        handle.approve(run.interrupts[0].interrupt_id)
        run = handle.wait(timeout=20)
        print(run.state, run.data)
    """
)


def _run(*args: str, cwd: Path, env: dict[str, str], timeout: float = 50) -> str:
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _clean_env() -> dict[str, str]:
    # The test's own venv must not leak into the fresh ones.
    return {
        k: v
        for k, v in os.environ.items()
        if k not in {"VIRTUAL_ENV", "PYTHONPATH", "UV_PROJECT_ENVIRONMENT"}
    }


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dist = tmp_path_factory.mktemp("dist")
    for package in ("client", "engine"):
        _run(
            uv(),
            "build",
            "--wheel",
            "--out-dir",
            str(dist),
            str(ROOT / "packaging" / package),
            cwd=ROOT,
            env=_clean_env(),
            timeout=120,
        )
    found = {w.name.split("-")[0]: w for w in dist.glob("*.whl")}
    assert set(found) == {"machina_client", "machina_engine"}, found
    return found


def _venv(tmp: Path, *requirements: str) -> Path:
    venv = tmp / "venv"
    env = _clean_env()
    _run(uv(), "venv", "--quiet", "--python", sys.executable, str(venv), cwd=tmp, env=env)
    python = venv / "bin" / "python"
    _run(
        uv(),
        "pip",
        "install",
        "--quiet",
        "--python",
        str(python),
        *requirements,
        cwd=tmp,
        env=env,
        timeout=240,
    )
    return python


def _top_level(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return {name.split("/")[0] for name in zf.namelist() if ".dist-info/" not in name}


def _metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return zf.read(name).decode()


@pytest.mark.slow
def test_no_module_is_in_both_wheels_and_both_carry_the_one_version(wheels: dict[str, Path]) -> None:
    assert _top_level(wheels["machina_client"]) == {"client_py", "machina"}
    assert _top_level(wheels["machina_engine"]) == {"engine_service", "runner_service"}
    for wheel in wheels.values():
        assert re.search(rf"^Version: {re.escape(VERSION)}$", _metadata(wheel), re.M), wheel.name
    engine = _metadata(wheels["machina_engine"])
    assert re.search(r"^Requires-Dist: machina-client\b", engine, re.M)
    assert re.search(r"^Requires-Dist: aioboto3.*extra == .s3.", engine, re.M)
    assert re.search(r"^Requires-Dist: mcp.*extra == .mcp.", engine, re.M)
    with zipfile.ZipFile(wheels["machina_engine"]) as zf:
        (entry_points,) = [n for n in zf.namelist() if n.endswith("entry_points.txt")]
        scripts = zf.read(entry_points).decode()
    assert "machina-engine = engine_service.__main__:main" in scripts
    assert "machina-runner = runner_service.__main__:main" in scripts


@pytest.mark.slow
def test_client_wheel_alone_runs_an_approval_against_a_live_engine(
    wheels: dict[str, Path], tmp_path: Path
) -> None:
    python = _venv(tmp_path, str(wheels["machina_client"]))
    env = _clean_env()
    listed = json.loads(
        _run(uv(), "pip", "list", "--python", str(python), "--format", "json", cwd=tmp_path, env=env)
    )
    names = {item["name"].lower() for item in listed}
    assert {"machina-client", "grpcio", "protobuf"} <= names
    assert names <= ALLOWED, f"unexpected packages: {sorted(names - ALLOWED)}"

    status = status_pb2.Status(code=5, message="run r1 not found")
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(
            reason="ERR_RUN_NOT_FOUND", domain="machina.dev", metadata={"run_id": "r1"}
        )
    )
    out = _run(str(python), "-c", SMOKE, status.SerializeToString().hex(), cwd=tmp_path, env=env)
    assert "smoke ok" in out

    engine = EngineProcess(
        tmp_path / "engine", "--config", str(ROOT / "demo" / "engine.toml"), "--storage", str(tmp_path / "s")
    )
    try:
        out = _run(str(python), "-c", APPROVAL, engine.target, cwd=tmp_path, env=env)
    finally:
        engine.close()
    assert out.split() == ["DONE", "sent"], out


@pytest.mark.slow
def test_engine_wheel_serves_help_and_the_demo_config(wheels: dict[str, Path], tmp_path: Path) -> None:
    engine_req = f"machina-engine[s3,mcp] @ {wheels['machina_engine'].as_uri()}"
    python = _venv(tmp_path, str(wheels["machina_client"]), engine_req)
    bin_dir = python.parent
    env = _clean_env()
    for script in ("machina-engine", "machina-runner"):
        out = _run(str(bin_dir / script), "--help", cwd=tmp_path, env=env)
        assert "--listen" in out, out
        assert _run(str(bin_dir / script), "--version", cwd=tmp_path, env=env).split()[-1] == VERSION

    # The demo's custom tools come from a copy of demo/ beside the config, not from the repository.
    app = tmp_path / "app"
    shutil.copytree(ROOT / "demo", app / "demo", ignore=shutil.ignore_patterns("__pycache__"))
    where = _run(
        str(python),
        "-c",
        "import engine_service, runner_service; print(engine_service.__file__)",
        cwd=app,
        env=env,
    )
    assert str(python.parent.parent) in where, where
    engine = ServiceProcess(
        "engine_service",
        tmp_path / "engine",
        "--config",
        str(app / "demo" / "engine.toml"),
        "--listen",
        "127.0.0.1:0",
        "--storage",
        str(tmp_path / "s"),
        command=[str(bin_dir / "machina-engine")],
        cwd=app,
        env={"PYTHONPATH": str(app)},
        name="engine",
    )
    try:
        with EngineClient(f"127.0.0.1:{engine.ports}") as client:
            run = client.create(
                "Weather?",
                model="scripted",
                script=[
                    {"text": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
                    {"text": "sunny"},
                ],
            ).wait(timeout=20)
        assert (run.state, run.data) == ("DONE", "sunny"), run
        assert engine.stop() == 0
    finally:
        engine.close()
