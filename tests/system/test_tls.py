"""TLS end to end with a test CA: engine ⇄ Python and Node clients and buf curl, engine → runner
handoff over HTTPS, runner gRPC over TLS, and clear refusals of unsafe or broken settings."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client_py import EngineClient, UnavailableError
from tests.certs import Pki, make_pki
from tests.conftest import ROOT, turn
from tests.node import require_ts_client, run_ts
from tests.processes import EngineProcess, RunnerProcess

pytestmark = pytest.mark.slow

BUF = Path(sys.executable).parent / "buf"
SECRET = "runner-secret-for-tls-tests-8d21"
BASH_SCRIPT = [
    turn("I'll run it.", ("Bash", {"command": "echo hello-over-tls > out.txt && cat out.txt"})),
    turn("It printed hello-over-tls."),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A second CA that signed nothing the servers use: trusting only it must fail."""
    return make_pki(tmp_path_factory.mktemp("other-pki"), name="untrusted")


def tls_args(pki: Pki) -> list[str]:
    return ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]


@pytest.fixture
def tls_engine(tmp_path: Path, pki: Pki) -> Iterator[EngineProcess]:
    process = EngineProcess(
        tmp_path,
        "--config",
        "demo/engine.toml",
        "--storage",
        str(tmp_path / "data"),
        *tls_args(pki),
        env={"MACHINA_WORKDIR_ROOT": str(tmp_path / "workdirs")},
    )
    yield process
    process.close()


def test_python_client_over_tls_verifies_the_ca(tls_engine: EngineProcess, pki: Pki, other_pki: Pki) -> None:
    with EngineClient(tls_engine.target, root_certificates=pki.ca_cert.read_bytes()) as client:
        run = client.create("greet", model="scripted", script=[turn("Hello over TLS.")]).wait(timeout=20)
        assert (run.state, run.data) == ("DONE", "Hello over TLS.")

    # A client that trusts another CA, or speaks plaintext, is refused at the handshake.
    for options in (
        {"root_certificates": other_pki.ca_cert.read_bytes()},
        {"tls": False},
    ):
        with (
            EngineClient(tls_engine.target, max_retries=0, call_timeout=10, **options) as client,
            pytest.raises(UnavailableError) as caught,
        ):
            client.get_run(run.run_id)
        if "root_certificates" in options:
            assert (
                "CERTIFICATE_VERIFY_FAILED" in str(caught.value) or "handshake" in str(caught.value).lower()
            )


@pytest.mark.timeout(180)  # the first Node test of a session may run `npm ci`
def test_node_client_over_tls_verifies_the_ca(tls_engine: EngineProcess, pki: Pki, other_pki: Pki) -> None:
    require_ts_client()
    target = {"MACHINA_TARGET": tls_engine.target}
    # The CA passed to the transport.
    result = run_ts("main.ts", "--run-id", "tls-run", env={**target, "MACHINA_CA_FILE": str(pki.ca_cert)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(TLS)" in result.stdout
    assert "final state: DONE" in result.stdout
    # Or Node's own trust store, extended with NODE_EXTRA_CA_CERTS.
    extra = {**target, "MACHINA_TLS": "1", "NODE_EXTRA_CA_CERTS": str(pki.ca_cert)}
    listed = run_ts("probe.ts", "get-run", "tls-run", env=extra)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert listed.json()["run"]["state"] == "RUN_STATE_DONE"

    for untrusted in ({**target, "MACHINA_TLS": "1"}, {**target, "MACHINA_CA_FILE": str(other_pki.ca_cert)}):
        refused = run_ts("probe.ts", "list-runs", env=untrusted)
        assert refused.returncode == 1
        failure = refused.json()
        assert failure["ok"] is False
        assert failure["reason"] == ""  # the engine never saw the call
        assert "unable to verify" in failure["message"], failure


def test_buf_curl_over_tls(tls_engine: EngineProcess, pki: Pki, tmp_path: Path) -> None:
    def curl(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BUF), "curl", "--protocol", "grpc", *extra, "--data", '{"run_id": "nope"}',
             f"https://{tls_engine.target}/machina.engine.v1.EngineService/GetRun"],
            cwd=tmp_path, capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    trusted = curl("--cacert", str(pki.ca_cert))
    assert json.loads(trusted.stderr)["code"] == "not_found"
    # Without the CA the handshake fails (buf curl reports it as reflection finding no schema).
    assert curl().returncode != 0


def shared_env(tmp: Path, **extra: str) -> dict[str, str]:
    return {
        "MACHINA_STORAGE": str(tmp / "storage"),
        "MACHINA_WORKDIR_ROOT": str(tmp / "workdirs"),
        "MACHINA_RUNNER_SECRET": SECRET,
        "MACHINA_RUNNER_TIMEOUT_S": "2",
        **extra,
    }


def test_handoff_to_a_tls_runner_verifies_the_ca(tmp_path: Path, pki: Pki) -> None:
    runner = RunnerProcess(tmp_path, *tls_args(pki), env=shared_env(tmp_path))
    try:
        ports = json.loads(runner.ports)
        runner_url = f"https://127.0.0.1:{ports['http']}/continue"
        # The HTTP shim and gRPC both speak TLS with the configured certificate.
        health = httpx.get(
            f"https://127.0.0.1:{ports['http']}/health",
            verify=ssl.create_default_context(cafile=str(pki.ca_cert)),
            timeout=10,
        )
        assert health.json()["status"] == "ok"
        credentials = grpc.ssl_channel_credentials(pki.ca_cert.read_bytes())
        with grpc.secure_channel(runner.grpc_target, credentials) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING

        # An engine that trusts the test CA hands the Bash step to the runner over HTTPS.
        engine_env = shared_env(
            tmp_path,
            MACHINA_CAPABILITIES_SUBPROCESS="false",
            MACHINA_RUNNER_URL=runner_url,
            MACHINA_RUNNER_CA_FILE=str(pki.ca_cert),
        )
        engine = EngineProcess(tmp_path / "engine", env=engine_env)
        try:
            with EngineClient(engine.target) as client:
                handle = client.create("run a command", model="scripted", script=BASH_SCRIPT)
                # Followed until the run ends: the handoff pause is not the end.
                kinds = [e.kind for e in handle.events(follow=True)]
                run = handle.refresh()
            assert (run.state, run.data) == ("DONE", "It printed hello-over-tls.")
            assert "handoff_to_runner" in kinds
        finally:
            engine.close()

        # One that does not trust it (system CAs only) fails the handoff clearly instead of hanging.
        distrust = {k: v for k, v in engine_env.items() if k != "MACHINA_RUNNER_CA_FILE"}
        engine = EngineProcess(tmp_path / "engine-untrusting", env=distrust)
        try:
            with EngineClient(engine.target) as client:
                handle = client.create("run a command", model="scripted", script=BASH_SCRIPT)
                assert [e.kind for e in handle.events(follow=True)][-1] == "run_finished"
                run = handle.refresh()
            assert run.state == "FAILED"
            assert run.error is not None
            assert run.error.code == "ERR_RUNNER_UNREACHABLE"
        finally:
            engine.close()
    finally:
        runner.close()


def run_module(module: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MACHINA_")}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**clean, **env},
    )


def test_unsafe_or_broken_settings_are_refused_clearly(tmp_path: Path, pki: Pki) -> None:
    storage = {"MACHINA_STORAGE": str(tmp_path / "storage")}
    public = ["--listen", "0.0.0.0:0", "--http-listen", "0.0.0.0:0"]
    # The runner never serves without its secret, on a public address least of all.
    no_secret = run_module("runner_service", *public, env=storage)
    assert no_secret.returncode == 2
    assert "MACHINA_RUNNER_SECRET is required" in no_secret.stderr
    # Half a TLS configuration is an error, not plaintext.
    half = run_module(
        "runner_service", "--tls-cert", str(pki.server_cert), env={**storage, **shared_env(tmp_path)}
    )
    assert half.returncode == 2
    assert "TLS needs both --tls-cert and --tls-key" in half.stderr
    # A CA file for the runner that cannot be loaded stops the engine at startup.
    bad_ca = run_module(
        "engine_service",
        "--listen",
        "127.0.0.1:0",
        env={**storage, "MACHINA_RUNNER_CA_FILE": str(tmp_path / "nope")},
    )
    assert bad_ca.returncode == 2
    assert "runner_ca_file" in bad_ca.stderr
    assert "Traceback" not in bad_ca.stderr + half.stderr + no_secret.stderr
