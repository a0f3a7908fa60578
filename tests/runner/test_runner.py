"""Engine and runner as separate real processes sharing a storage root."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import grpc
import httpx
import pytest

from client_py import (
    AsyncEngineClient,
    Resumed,
    ToolCallCompleted,
    ToolCallStarted,
)
from machina.runner.v1 import runner_service_pb2 as rpb
from machina.runner.v1 import runner_service_pb2_grpc as rpb_grpc
from tests.conftest import refresh_until, turn
from tests.processes import EngineProcess, RunnerProcess, free_port
from tests.webhook_receiver import Receiver, signed

pytestmark = pytest.mark.slow

SECRET = "runner-secret-for-tests-5c7e"
BASH_SCRIPT = [
    turn("I'll run it.", ("Bash", {"command": "echo hello-from-runner > out.txt && cat out.txt"})),
    turn("It printed hello-from-runner."),
]


def shared_env(tmp: Path, **extra: str) -> dict[str, str]:
    return {
        "MACHINA_STORAGE": str(tmp / "storage"),
        "MACHINA_WORKDIR_ROOT": str(tmp / "workdirs"),
        "MACHINA_RUNNER_SECRET": SECRET,
        "MACHINA_RUNNER_TIMEOUT_S": "1",
        **extra,
    }


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[RunnerProcess]:
    process = RunnerProcess(tmp_path, env=shared_env(tmp_path))
    yield process
    process.close()


@pytest.fixture(scope="module")
def idle_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunnerProcess]:
    """One runner process for the module's tests that create no runs (its storage stays empty)."""
    tmp = tmp_path_factory.mktemp("idle-runner")
    process = RunnerProcess(tmp, env=shared_env(tmp))
    yield process
    process.close()


def engine_for(tmp: Path, runner_url: str, **extra: str) -> EngineProcess:
    env = shared_env(tmp, MACHINA_CAPABILITIES_SUBPROCESS="false", MACHINA_RUNNER_URL=runner_url, **extra)
    return EngineProcess(tmp, env=env)


@pytest.fixture
def engine(tmp_path: Path, runner: RunnerProcess) -> Iterator[EngineProcess]:
    process = engine_for(tmp_path, f"{runner.http}/continue")
    yield process
    process.close()


async def test_async_run_hands_off_and_finishes_on_the_runner(engine: EngineProcess, tmp_path: Path) -> None:
    async with AsyncEngineClient(engine.target) as client:
        handle = await client.create("run a command", model="scripted", script=BASH_SCRIPT)
        watched = [e async for e in handle.events(follow=True)]
        run = await handle.wait(timeout=30)
    assert run.state == "DONE"
    assert run.data == "It printed hello-from-runner."
    assert run.meta.capabilities_missing == []
    kinds = [e.kind for e in watched]
    assert kinds.index("handoff_to_runner") < kinds.index("paused") < kinds.index("resumed")
    assert kinds[-1] == "run_finished"
    assert [e.seq for e in watched] == list(range(1, len(watched) + 1))
    resumed = next(e for e in watched if isinstance(e, Resumed))
    assert resumed.resumed_by == "runner"
    output = next(e for e in watched if isinstance(e, ToolCallCompleted))
    assert "hello-from-runner" in output.output
    assert (tmp_path / "workdirs" / "default" / run.run_id / "out.txt").read_text() == "hello-from-runner\n"


async def test_sync_run_degrades_with_capabilities_missing(engine: EngineProcess) -> None:
    async with AsyncEngineClient(engine.target) as client:
        run = await client.execute("run a command", model="scripted", script=BASH_SCRIPT).result()
    assert run.state == "DONE"
    assert run.meta.capabilities_missing == ["Bash"]


async def test_no_runner_configured_means_sync_behaviour_for_async_runs(tmp_path: Path) -> None:
    process = engine_for(tmp_path, "")
    try:
        async with AsyncEngineClient(process.target) as client:
            handle = await client.create("run", model="scripted", script=BASH_SCRIPT)
            run = await handle.wait(timeout=20)
    finally:
        process.close()
    assert run.state == "DONE"
    assert run.meta.capabilities_missing == ["Bash"]


class _Stub(BaseHTTPRequestHandler):
    """A runner that misbehaves: 500, slow, or accepts and does nothing."""

    mode: ClassVar[str] = "500"
    posts: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).posts.append(body)
        if self.mode == "slow":
            time.sleep(3)
        status = {"500": 500, "slow": 202, "accept": 202}[self.mode]
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


def stub_runner(mode: str) -> tuple[ThreadingHTTPServer, str]:
    handler = type("Stub", (_Stub,), {"mode": mode, "posts": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/continue"


@pytest.mark.parametrize("mode", ["down", "500", "slow"])
async def test_unreachable_runner_fails_the_run_clearly_and_fast(tmp_path: Path, mode: str) -> None:
    stub = None
    if mode == "down":
        url = f"http://127.0.0.1:{free_port()}/continue"
    else:
        stub, url = stub_runner(mode)
    process = engine_for(tmp_path, url)
    try:
        async with AsyncEngineClient(process.target) as client:
            started = time.monotonic()
            handle = await client.create("run", model="scripted", script=BASH_SCRIPT)
            run = await handle.wait(timeout=20)
            while run.state in ("PAUSED", "RUNNING") and time.monotonic() - started < 15:
                await asyncio.sleep(0.05)
                run = await handle.refresh()
            elapsed = time.monotonic() - started
    finally:
        process.close()
        if stub is not None:
            stub.shutdown()
            stub.server_close()
    assert run.state == "FAILED"
    assert run.error is not None
    assert run.error.code == "ERR_RUNNER_UNREACHABLE"
    assert SECRET not in run.error.message
    assert elapsed < 10


async def test_wrong_secret_then_retry_after_fixing_the_runner(tmp_path: Path) -> None:
    http_port = free_port()
    wrong = RunnerProcess(
        tmp_path / "wrong", http_port=http_port, env=shared_env(tmp_path, MACHINA_RUNNER_SECRET="x" * 20)
    )
    engine = engine_for(tmp_path, f"http://127.0.0.1:{http_port}/continue")
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create("run", model="scripted", script=BASH_SCRIPT)
            run = await refresh_until(handle, "FAILED")
            assert run.error is not None
            assert run.error.code == "ERR_RUNNER_UNREACHABLE"
            assert "401" in run.error.message
            # Rotate: the runner restarts with the right secret; resuming retries from the same checkpoint.
            wrong.stop()
            wrong.close()
            right = RunnerProcess(tmp_path / "right", http_port=http_port, env=shared_env(tmp_path))
            try:
                await handle.retry_handoff()
                await handle.wait(timeout=30)
                run = await refresh_until(handle, "DONE")
                assert run.state == "DONE"
                outputs = [
                    e.output async for e in handle.events(follow=False) if isinstance(e, ToolCallCompleted)
                ]
                assert len(outputs) == 1
                assert "hello-from-runner" in outputs[0]
            finally:
                right.close()
    finally:
        engine.close()
        wrong.close()


BAD_BODIES: list[tuple[str, dict[str, str], bytes, int]] = [
    ("no bearer", {"Authorization": ""}, b'{"runId": "r1"}', 401),
    ("wrong bearer", {"Authorization": "Bearer nope"}, b'{"runId": "r1"}', 401),
    ("basic scheme", {"Authorization": f"Basic {SECRET}"}, b'{"runId": "r1"}', 401),
    ("empty body", {}, b"", 400),
    ("not json", {}, b"runId=r1", 400),
    ("json array", {}, b'["r1"]', 400),
    ("missing runId", {}, b'{"run": "r1"}', 400),
    ("runId not a string", {}, b'{"runId": 42}', 400),
    ("traversal", {}, b'{"runId": "../../etc/passwd"}', 400),
    ("absolute", {}, b'{"runId": "/etc/passwd"}', 400),
    ("oversized", {}, b'{"runId": "' + b"a" * 10_000 + b'"}', 400),
    ("invalid utf-8", {}, b'{"runId": "\xff"}', 400),
    ("unknown run", {}, b'{"runId": "no-such-run"}', 404),
]


@pytest.mark.parametrize(("what", "headers", "body", "status"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_continue_contract_rejections(
    idle_runner: RunnerProcess, what: str, headers: dict[str, str], body: bytes, status: int
) -> None:
    auth = {"Authorization": f"Bearer {SECRET}"}
    response = httpx.post(
        f"{idle_runner.http}/continue", content=body, headers={**auth, **headers}, timeout=10
    )
    assert response.status_code == status, response.text
    assert SECRET not in response.text
    assert httpx.get(f"{idle_runner.http}/health", timeout=10).status_code == 200


async def test_same_run_posted_twice_at_once_runs_once(tmp_path: Path, runner: RunnerProcess) -> None:
    stub, url = stub_runner("accept")  # the engine's POST goes nowhere; the test posts to the runner itself
    process = engine_for(tmp_path, url)
    try:
        async with AsyncEngineClient(process.target) as client:
            handle = await client.create("run", model="scripted", script=BASH_SCRIPT)
            run = await handle.wait(timeout=20)
            assert (run.state, run.pause_reason) == ("PAUSED", "HANDOFF_TO_RUNNER")
            async with httpx.AsyncClient(timeout=10) as http:
                responses = await asyncio.gather(
                    *(
                        http.post(
                            f"{runner.http}/continue",
                            json={"runId": run.run_id},
                            headers={"Authorization": f"Bearer {SECRET}"},
                        )
                        for _ in range(5)
                    )
                )
            assert all(r.status_code in (202, 409) for r in responses), [r.status_code for r in responses]
            assert any(r.status_code == 202 for r in responses)
            await handle.wait(timeout=30)
            run = await refresh_until(handle, "DONE")
            assert run.state == "DONE"
            events = [e async for e in handle.events(follow=False)]
            assert sum(1 for e in events if isinstance(e, ToolCallStarted)) == 1
            assert sum(1 for e in events if isinstance(e, Resumed)) == 1
    finally:
        process.close()
        stub.shutdown()
        stub.server_close()


async def test_grpc_continue_has_the_same_semantics(idle_runner: RunnerProcess) -> None:
    async with grpc.aio.insecure_channel(idle_runner.grpc_target) as channel:
        stub: Any = rpb_grpc.RunnerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Continue(
                rpb.ContinueRequest(run_id="r1"), metadata=(("authorization", "Bearer wrong"),)
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        auth = (("authorization", f"Bearer {SECRET}"),)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Continue(rpb.ContinueRequest(run_id="../x"), metadata=auth)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Continue(rpb.ContinueRequest(run_id="missing-run"), metadata=auth)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_grpc_bytes_that_are_not_a_request_are_invalid_argument(idle_runner: RunnerProcess) -> None:
    from google.rpc import error_details_pb2, status_pb2

    auth = (("authorization", f"Bearer {SECRET}"),)
    async with grpc.aio.insecure_channel(idle_runner.grpc_target) as channel:
        raw = channel.unary_unary(
            "/machina.runner.v1.RunnerService/Continue",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(b"\xff\xff\xff\xff", metadata=auth)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        details = dict(caught.value.trailing_metadata() or ())["grpc-status-details-bin"]
        info = error_details_pb2.ErrorInfo()
        status_pb2.Status.FromString(details).details[0].Unpack(info)
        assert info.reason == "ERR_INVALID_REQUEST"
        with pytest.raises(grpc.aio.AioRpcError) as still:  # and it keeps serving
            await rpb_grpc.RunnerServiceStub(channel).Continue(
                rpb.ContinueRequest(run_id="nope"), metadata=auth
            )
        assert still.value.code() == grpc.StatusCode.NOT_FOUND


def test_runner_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {k: v for k, v in shared_env(tmp_path).items() if k != "MACHINA_RUNNER_SECRET"}
    import os

    result = subprocess.run(
        [sys.executable, "-m", "runner_service"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**{k: v for k, v in os.environ.items() if k != "MACHINA_RUNNER_SECRET"}, **env},
    )
    assert result.returncode == 2
    assert "MACHINA_RUNNER_SECRET is required" in result.stderr


async def test_the_runner_sends_the_webhook_when_it_finishes_the_run(tmp_path: Path) -> None:
    receiver = Receiver()
    secret_env = {
        "MACHINA_WEBHOOK_SECRETS": "hook=whsec-runner-1234",  # both processes know it by name
        "MACHINA_EGRESS_ALLOW_HOSTS": "127.0.0.1",  # the receiver listens on loopback
    }
    runner = RunnerProcess(tmp_path, env={**shared_env(tmp_path), **secret_env})
    engine = engine_for(tmp_path, f"{runner.http}/continue", **secret_env)
    try:
        async with AsyncEngineClient(engine.target) as client:
            webhook = {"url": receiver.url, "secret_ref": "hook", "events": ["done"]}
            handle = await client.create("run", model="scripted", script=BASH_SCRIPT, webhook=webhook)
            await handle.wait(timeout=30)
            await refresh_until(handle, "DONE", tries=100)
            await receiver.wait_for(1)
    finally:
        engine.close()
        runner.close()
        receiver.close()
    ((headers, body),) = receiver.requests
    assert headers["x-machina-event"] == "status.done"
    assert signed("whsec-runner-1234", headers, body)
    assert b'"state":"DONE"' in body
