"""The machina-client wheel installs and works with only grpcio and protobuf."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from google.rpc import error_details_pb2, status_pb2

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {"machina-client", "grpcio", "protobuf", "typing-extensions"}

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


def _run(*args: str, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=50, check=False)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_client_wheel_installs_alone(tmp_path: Path) -> None:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed")
    # The test's own venv must not leak into the fresh one.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"VIRTUAL_ENV", "PYTHONPATH", "UV_PROJECT_ENVIRONMENT"}
    }

    dist = tmp_path / "dist"
    _run(
        uv, "build", "--wheel", "--out-dir", str(dist), str(ROOT / "packaging" / "client"), cwd=ROOT, env=env
    )
    wheels = list(dist.glob("machina_client-*.whl"))
    assert len(wheels) == 1

    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    _run(uv, "venv", "--quiet", "--python", sys.executable, str(venv), cwd=tmp_path, env=env)
    _run(uv, "pip", "install", "--quiet", "--python", str(python), str(wheels[0]), cwd=tmp_path, env=env)

    listed = json.loads(
        _run(uv, "pip", "list", "--python", str(python), "--format", "json", cwd=tmp_path, env=env)
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
