"""Trust boundaries: no tenant's run spec and no model can make the engine use an engine-held secret.

Real engine and runner processes, the public gRPC client (and raw stubs where the client has no
such option), recording HTTP servers on loopback standing for the engine's own API, a tenant's
host, a webhook receiver and a runner. Each test throws a corpus of hostile per-run specs at one
path — per-run ApiCall services (custom ids, refs, names), webhooks' ``secret_ref``, the runner
handoff — then searches everything the system produced (storage tree, engine and runner stderr,
events, webhook bodies, what the tenant's host received) for every engine-held secret and its
base64 form.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import grpc
import httpx
import pytest

from client_py import AsyncEngineClient, MachinaError, ToolCallCompleted
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import engine_service_pb2_grpc as svc_grpc
from machina.runner.v1 import runner_service_pb2 as rpb
from machina.runner.v1 import runner_service_pb2_grpc as rpb_grpc
from tests.conftest import ROOT, refresh_until, turn
from tests.httpbin_server import Recorder
from tests.processes import EngineProcess, RunnerProcess
from tests.secrets_util import find_secrets
from tests.trust_hooks import ENGINE_MINTED, TENANT_ID, read
from tests.webhook_receiver import Receiver, signed

pytestmark = pytest.mark.slow

# Engine-held secrets (canaries): none may reach a tenant's host, storage, a log, an event or a webhook.
ENG_BEARER = "eng-CANARY-bearer-31c7"  # api.env["eng_token"], for the engine's own service
PROC_SECRET = "proc-CANARY-env-55d2"  # a process variable an engine service reads by ref
AWS_SECRET = "aws-CANARY-secret-0b9e"  # a process variable nothing should read
RUNNER_DEFAULT = "runner-CANARY-default-77aa"
RUNNER_A = "runner-CANARY-ws-a-1f40"
RUNNER_B = "runner-CANARY-ws-b-9c3d"
WH_SHARED = "whsec-CANARY-shared-6e21"
WH_A = "whsec-CANARY-ws-a-d8f0"
KEY_A = "apikey-CANARY-ws-a-4471"
KEY_B = "apikey-CANARY-ws-b-a0c9"
CANARIES = (ENG_BEARER, ENGINE_MINTED, PROC_SECRET, AWS_SECRET, RUNNER_DEFAULT, RUNNER_A, RUNNER_B,
            WH_SHARED, WH_A, KEY_A, KEY_B)  # fmt: skip
# Names under which the engine holds those secrets: a per-run spec naming one must get nothing.
ENGINE_NAMES = ["eng_token", "ENG_TOKEN", "run:eng_token", "MACHINA_TB_PROC_SECRET", "AWS_SECRET_ACCESS_KEY",
                "MACHINA_RUNNER_SECRET", "MACHINA_RUNNER_SECRETS", "runner_secret", "runner_secrets",
                "hook", "a_hook", "webhook_secrets", "MACHINA_API_KEYS_FILE", "HOME",
                "PATH"]  # fmt: skip


def forms(secrets: tuple[str, ...] = CANARIES) -> list[str]:
    """Each secret and its base64 form (alone and as the HTTP Basic pair it might travel in)."""
    out = list(secrets)
    out += [base64.b64encode(s.encode()).decode() for s in secrets]
    out += [base64.b64encode(f"{s}:".encode()).decode()[:-4] for s in secrets]
    return sorted(set(out))


def assert_clean(blobs: Sequence[str | bytes], where: str, secrets: tuple[str, ...] = CANARIES) -> None:
    hits = {i: found for i, b in enumerate(blobs) if (found := find_secrets(b, forms(secrets)))}
    assert not hits, f"engine-held secrets found in {where}: {hits}"


def tree(root: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()]


def q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string for these values


@dataclass
class Stack:
    engine: EngineProcess
    engine_api: Recorder  # the operator's own API (engine services point here)
    tenant: Recorder  # a host a tenant controls
    receiver: Receiver
    storage: Path
    hook_log: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("trust")
    keys = tmp / "keys.toml"
    keys.write_text(f'{q(KEY_A)} = "ws-a"\n{q(KEY_B)} = "ws-b"\n')
    with Recorder() as engine_api, Recorder() as tenant:
        receiver = Receiver()
        config = tmp / "engine.toml"
        config.write_text(
            f"""
api_keys_file = {q(str(keys))}
webhook_secrets = {{ hook = {q(WH_SHARED)} }}
runner_secret = {q(RUNNER_DEFAULT)}
runner_secrets = {{ ws-a = {q(RUNNER_A)}, ws-b = {q(RUNNER_B)} }}

[workspace_webhook_secrets.ws-a]
a_hook = {q(WH_A)}

[api]
resolve_auth = "tests.trust_hooks:resolve_auth"
on_request = "tests.trust_hooks:on_request"
on_response = "tests.trust_hooks:on_response"
per_run_custom_auth_ids = [{q(TENANT_ID)}]
env = {{ eng_token = {q(ENG_BEARER)} }}

[[api.services]]
name = "engine_bin"
base_url = {q(engine_api.url)}
auth = {{ type = "bearer", token_ref = "eng_token" }}

[[api.services]]
name = "vault_svc"
base_url = {q(engine_api.url)}
auth = {{ type = "custom", id = "vault" }}

[[api.services]]
name = "proc_svc"
base_url = {q(engine_api.url)}
auth = {{ type = "header", name = "X-Proc", value_ref = "MACHINA_TB_PROC_SECRET" }}
"""
        )
        hook_log = tmp / "hooks.jsonl"
        env = {
            "MACHINA_STORAGE": str(tmp / "storage"),
            "MACHINA_WORKDIR_ROOT": str(tmp / "workdirs"),
            "MACHINA_LOG_LEVEL": "debug",
            # The tenant's host and the receivers listen on loopback: the operator allows it, so
            # what is tested here is the credentials, not the egress policy.
            "MACHINA_EGRESS_ALLOW_HOSTS": "127.0.0.1",
            "MACHINA_TB_PROC_SECRET": PROC_SECRET,
            "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
            "MACHINA_TEST_HOOK_LOG": str(hook_log),
        }
        engine = EngineProcess(tmp, "--config", str(config), env=env)
        try:
            yield Stack(engine, engine_api, tenant, receiver, tmp / "storage", hook_log)
        finally:
            engine.close()
            receiver.close()


def client(stack: Stack, key: str = KEY_A) -> AsyncEngineClient:
    return AsyncEngineClient(stack.engine.target, api_key=key)


def api_call(service: str, path: str = "/x") -> tuple[str, dict[str, Any]]:
    return ("ApiCall", {"service": service, "method": "GET", "path": path})


def service(name: str, base_url: str, auth: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "base_url": base_url, "auth": auth}


def scan_everything(stack: Stack, extra: Sequence[str | bytes]) -> None:
    assert_clean(tree(stack.storage), "the storage tree")
    assert_clean([stack.engine.log.read_bytes()], "the engine's stderr")
    assert_clean([json.dumps(r) for r in read(str(stack.hook_log))], "metering hook payloads")
    assert_clean([b for _, b in stack.receiver.requests], "webhook bodies")
    assert_clean([json.dumps(h) for h, _ in stack.receiver.requests], "webhook headers")
    tenant_saw = [json.dumps(r) for r in stack.tenant.requests] + list(stack.tenant.bodies)
    assert_clean(tenant_saw, "what the tenant's host received")
    assert_clean(extra, "RPC responses and events")


# -- ApiCall ------------------------------------------------------------------------------------


CUSTOM_IDS_REFUSED = ["vault", "VAULT", "Vault", " vault", "vault ", "vault\t", "vault\u200b", "oauth:google",
                      "tenant-oauth ", "TENANT-OAUTH", "Tenant-OAuth", "tenant-oauth\n", "*", ".*",
                      "tenant-oauth,vault"]  # fmt: skip
SHADOWING_NAMES = ["engine_bin", "ENGINE_BIN", "Engine_Bin", "engine_BIN", "vault_svc", "VAULT_SVC",
                   "proc_svc", "Proc_Svc"]  # fmt: skip


async def test_per_run_custom_auth_and_shadowing_are_refused_at_the_door(stack: Stack) -> None:
    tenant = stack.tenant.url
    refused: list[tuple[str, dict[str, Any]]] = []
    for custom_id in CUSTOM_IDS_REFUSED:
        refused.append(
            ("ERR_API_AUTH_NOT_ALLOWED", service("thief", tenant, {"type": "custom", "id": custom_id}))
        )
    for name in SHADOWING_NAMES:
        for auth in ({"type": "none"}, {"type": "bearer", "token_ref": "eng_token"},
                     {"type": "custom", "id": TENANT_ID}):  # fmt: skip
            refused.append(("ERR_API_SERVICE_SHADOWED", service(name, tenant, auth)))
    responses: list[str | bytes] = []
    async with client(stack) as c:
        for reason, bad in refused:
            for run_api in ({"services": [bad]}, {"services": [bad], "env": {"eng_token": "mine"}}):
                with pytest.raises(MachinaError) as info:
                    await c.create("steal", model="scripted", script=[turn("x")], api=run_api)
                assert info.value.code == reason, (bad, info.value)
                expected = grpc.StatusCode.PERMISSION_DENIED if reason == "ERR_API_AUTH_NOT_ALLOWED" else (
                    grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
                assert info.value.status == expected
                responses.append(repr(info.value))
        # Two per-run services whose names differ only in case: one could pass for the other.
        twins = {
            "services": [service("t1", tenant, {"type": "none"}), service("T1", tenant, {"type": "none"})]
        }
        with pytest.raises(MachinaError) as info:
            await c.create("twins", model="scripted", script=[turn("x")], api=twins)
        assert info.value.code == "ERR_INVALID_REQUEST"
    assert stack.tenant.requests == []
    scan_everything(stack, responses)


async def test_per_run_refs_read_only_the_runs_own_env(stack: Stack) -> None:
    """Per-run services whose refs name engine env keys, process variables, the runner or webhook
    secrets' names, an API key...: every call fails ERR_CREDENTIALS_MISSING, nothing is sent."""
    tenant = stack.tenant.url
    services: list[dict[str, Any]] = []
    # "eng_token" is left to "mine" below: this run supplies its own value under that name.
    refs = [n for n in ENGINE_NAMES if n != "eng_token"]
    for i, ref in enumerate(refs):
        services.append(service(f"b{i}", tenant, {"type": "bearer", "token_ref": ref}))
        services.append(service(f"h{i}", tenant, {"type": "header", "name": "X-Steal", "value_ref": ref}))
        services.append(service(f"u{i}", tenant, {"type": "basic", "user_ref": ref, "pass_ref": ref}))
    # Same ref name as the engine's credential, but the run supplies its own value: that is sent.
    services.append(service("mine", tenant, {"type": "bearer", "token_ref": "eng_token"}))
    # The one custom id per-run services may use: the resolver learns who asks and mints for them.
    services.append(service("minted", tenant, {"type": "custom", "id": TENANT_ID}))
    calls = [api_call(s["name"]) for s in services] + [api_call("engine_bin"), api_call("vault_svc"),
                                                       api_call("proc_svc")]  # fmt: skip
    before = len(stack.tenant.requests)
    async with client(stack) as c:
        execution = c.execute(
            "Call everything.",
            model="scripted",
            script=[turn("calling", *calls), turn("done")],
            api={"services": services, "env": {"eng_token": "tenant-own-value"}},
        )
        events = [e async for e in execution]
        run = execution.run
    assert run is not None
    assert run.state == "DONE"
    results = {e.call_id: e for e in events if isinstance(e, ToolCallCompleted)}
    assert len(results) == len(calls)
    outputs = [e.output for e in events if isinstance(e, ToolCallCompleted)]
    missing = [o for o in outputs if "ERR_CREDENTIALS_MISSING" in o]
    assert len(missing) == 3 * len(refs)
    # The tenant's host got exactly two calls: its own value and its own minted token.
    got = stack.tenant.requests[before:]
    assert sorted(h.get("authorization", "") for _, h in got) == [
        "Bearer tenant-own-value",
        "Bearer tenant-token-for-ws-a",
    ]
    assert not any("x-steal" in h for _, h in got)
    # The engine's own services still get the engine's credentials.
    engine_auth = [h.get("authorization") or h.get("x-proc") for _, h in stack.engine_api.requests]
    assert f"Bearer {ENG_BEARER}" in engine_auth
    assert f"Bearer {ENGINE_MINTED}" in engine_auth
    assert PROC_SECRET in engine_auth
    # resolve_auth learned who asks: workspace, run, service, base URL, per-run or engine-level.
    asked = [
        r for r in read(str(stack.hook_log)) if r["kind"] == "resolve_auth" and r["run_id"] == run.run_id
    ]
    by_service = {r["service"]: r for r in asked}
    assert set(by_service) == {"minted", "vault_svc"}
    assert by_service["minted"] | {"path": "/x"} == {
        "kind": "resolve_auth", "id": TENANT_ID, "service": "minted", "method": "GET", "path": "/x",
        "workspace_id": "ws-a", "run_id": run.run_id, "base_url": tenant, "per_run": True,
    }  # fmt: skip
    assert by_service["vault_svc"]["per_run"] is False
    assert by_service["vault_svc"]["workspace_id"] == "ws-a"
    # Metering hooks carry the workspace and run id, for per-tenant billing.
    metered = [r for r in read(str(stack.hook_log)) if r["kind"] in ("on_request", "on_response")]
    mine = [r for r in metered if r["run_id"] == run.run_id]
    assert mine
    assert all(r["workspace_id"] == "ws-a" for r in mine)
    assert {r["service"] for r in mine if r["kind"] == "on_response"} == {
        "mine", "minted", "engine_bin", "vault_svc", "proc_svc",
    }  # fmt: skip
    scan_everything(stack, [repr(e) for e in events] + [repr(run)])


async def test_resume_cannot_add_services_or_borrow_credentials(stack: Stack) -> None:
    """ResumeRun's api only re-supplies the run's own env; its services never join the run."""
    tenant = stack.tenant.url
    own = [service("late", tenant, {"type": "bearer", "token_ref": "k"})]
    before = len(stack.tenant.requests)
    async with client(stack) as c:
        handle = await c.create(
            "Ask, then call late and thief.",
            model="scripted",
            script=[turn("", ("AskUser", {"question": "go?"})),
                    turn("calling", api_call("late"), api_call("thief")), turn("done")],
            api={"services": own},
        )  # fmt: skip
        run = await refresh_until(handle, "PAUSED")
        assert run.state == "PAUSED"
        thief = {"services": [service("thief", tenant, {"type": "custom", "id": "vault"}),
                              service("late", tenant, {"type": "bearer", "token_ref": "eng_token"})],
                 "env": {"k": "tenant-late"}}  # fmt: skip
        await handle.resume({"interrupt_id": run.interrupts[0].interrupt_id, "respond": "yes"}, api=thief)
        run = await refresh_until(handle, "DONE")
        events = [e async for e in handle.events(follow=False)]
    assert run.state == "DONE"
    # "thief" is no service of this run (its schema's enum refuses it); "late" kept its own ref.
    completed = [e for e in events if isinstance(e, ToolCallCompleted) and e.outcome == "ran"]
    assert [(e.tool_name, e.is_error) for e in completed] == [("ApiCall", False)]
    got = stack.tenant.requests[before:]
    assert [h.get("authorization") for _, h in got] == ["Bearer tenant-late"]
    scan_everything(stack, [repr(e) for e in events] + [repr(run)])


# -- webhooks -----------------------------------------------------------------------------------

REFS_REFUSED = ["MACHINA_RUNNER_SECRET", "MACHINA_RUNNER_SECRETS", "MACHINA_TB_PROC_SECRET",
                "AWS_SECRET_ACCESS_KEY", "PATH", "HOME", "MACHINA_API_KEYS_FILE", "MACHINA_TEST_HOOK_LOG",
                "eng_token", "runner_secret",
                "runner_secrets", "HOOK", "Hook", "hook ", " hook", "hook\n", "webhook_secrets.hook",
                "ws-a.a_hook", KEY_A, WH_SHARED, RUNNER_DEFAULT]  # fmt: skip


async def test_webhook_secret_ref_names_only_webhook_secrets(stack: Stack) -> None:
    hook = stack.receiver.url
    responses: list[str | bytes] = []
    async with client(stack, KEY_B) as c_b, client(stack, KEY_A) as c_a:
        # Workspace B may not sign with A's own secret; nobody with anything but a webhook secret.
        for key_client, refs in ((c_b, [*REFS_REFUSED, "a_hook"]), (c_a, REFS_REFUSED)):
            for ref in refs:
                with pytest.raises(MachinaError) as info:
                    await key_client.create("x", model="scripted", script=[turn("x")],
                                            webhook={"url": hook, "secret_ref": ref})  # fmt: skip
                assert info.value.code == "ERR_WEBHOOK_SECRET_UNKNOWN", ref
                assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT
                responses.append(repr(info.value))
        # The same refs on ResumeRun (raw stub: the client's resume takes no webhook).
        paused = await c_b.create("p", model="scripted", script=[turn("", ("AskUser", {"question": "?"}))])
        await refresh_until(paused, "PAUSED")
        async with grpc.aio.insecure_channel(stack.engine.target) as channel:
            stub = svc_grpc.EngineServiceStub(channel)
            for ref in [*REFS_REFUSED, "a_hook"]:
                request = svc.ResumeRunRequest(
                    run_id=paused.run_id, webhook=svc.Webhook(url=hook, secret_ref=ref)
                )
                with pytest.raises(grpc.aio.AioRpcError) as raw:
                    await stub.ResumeRun(request, metadata=(("authorization", f"Bearer {KEY_B}"),))
                assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "ERR_WEBHOOK_SECRET_UNKNOWN" in str(raw.value.trailing_metadata())
        # What is allowed: A's own secret for A, the shared one for B.
        before = len(stack.receiver.requests)
        run_a = await c_a.create("a", model="scripted", script=[turn("a")],
                                 webhook={"url": hook, "secret_ref": "a_hook",
                                          "events": ["done"]})  # fmt: skip
        run_b = await c_b.create("b", model="scripted", script=[turn("b")],
                                 webhook={"url": hook, "secret_ref": "hook", "events": ["done"]})  # fmt: skip
        await run_a.wait(timeout=20)
        await run_b.wait(timeout=20)
        await stack.receiver.wait_for(before + 2)
    delivered = {
        json.loads(body)["run_id"]: (headers, body) for headers, body in stack.receiver.requests[before:]
    }
    assert signed(WH_A, *delivered[run_a.run_id])
    assert signed(WH_SHARED, *delivered[run_b.run_id])
    scan_everything(stack, responses)


# -- the runner -------------------------------------------------------------------------------


class _Accepting(BaseHTTPRequestHandler):
    """A runner for workspace B that accepts every handoff and does nothing (B's run stays handed off)."""

    seen: ClassVar[list[dict[str, str]]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).seen.append({k.lower(): v for k, v in self.headers.items()})
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


BASH = [turn("", ("Bash", {"command": "echo ran > out.txt"})), turn("finished")]


async def test_a_workspaces_runner_secret_cannot_continue_another_workspaces_run(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(f'{q(KEY_A)} = "ws-a"\n{q(KEY_B)} = "ws-b"\n')
    secrets = (
        f"runner_secret = {q(RUNNER_DEFAULT)}\n"
        f"runner_secrets = {{ ws-a = {q(RUNNER_A)}, ws-b = {q(RUNNER_B)} }}\n"
    )
    shared = {"MACHINA_STORAGE": str(tmp_path / "storage"), "MACHINA_WORKDIR_ROOT": str(tmp_path / "work"),
              "MACHINA_RUNNER_TIMEOUT_S": "2", "MACHINA_LOG_LEVEL": "debug",
              "MACHINA_EGRESS_ALLOW_HOSTS": "127.0.0.1"}  # fmt: skip
    runner_config = tmp_path / "runner.toml"
    runner_config.write_text(secrets)

    class handler(_Accepting):  # a fresh class: its own list of what it saw
        seen: ClassVar[list[dict[str, str]]] = []

    stub = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    runner = RunnerProcess(tmp_path / "r", "--config", str(runner_config), env=shared)
    engine_config = tmp_path / "engine.toml"
    engine_config.write_text(
        f"api_keys_file = {q(str(keys))}\ncapabilities_subprocess = false\n{secrets}"
        f"[runner_urls]\nws-a = {q(runner.http + '/continue')}\n"
        f"ws-b = {q(f'http://127.0.0.1:{stub.server_address[1]}/continue')}\n"
    )
    engine = EngineProcess(tmp_path / "e", "--config", str(engine_config), env=shared)
    answers: list[str | bytes] = []
    try:
        async with client_for(engine, KEY_A) as c_a, client_for(engine, KEY_B) as c_b:
            handle_a = await c_a.create("a", model="scripted", script=BASH)
            run_a = await refresh_until(handle_a, "DONE", "FAILED", tries=400)
            handle_b = await c_b.create("b", model="scripted", script=BASH)
            run_b = await refresh_until(handle_b, "PAUSED")
            assert run_b.pause_reason == "HANDOFF_TO_RUNNER"
            # Each workspace's handoff carries its own secret (the POST follows the pause).
            for _ in range(200):
                if handler.seen:
                    break
                await asyncio.sleep(0.05)
            assert [h["authorization"] for h in handler.seen] == [f"Bearer {RUNNER_B}"]
            attempts = [
                (RUNNER_A, {"runId": run_b.run_id, "workspaceId": "ws-b"}, 401),
                (RUNNER_A, {"runId": run_b.run_id, "workspaceId": "WS-B"}, 401),
                (RUNNER_A, {"runId": run_b.run_id}, 401),  # the runner's default workspace
                (RUNNER_A, {"runId": run_b.run_id, "workspaceId": "ws-a"}, 404),  # not in A's storage
                (RUNNER_DEFAULT, {"runId": run_b.run_id, "workspaceId": "ws-b"}, 401),  # B has its own
                (RUNNER_DEFAULT, {"runId": run_b.run_id, "workspaceId": "default"}, 404),
                (f"{RUNNER_B}x", {"runId": run_b.run_id, "workspaceId": "ws-b"}, 401),
                (RUNNER_B.upper(), {"runId": run_b.run_id, "workspaceId": "ws-b"}, 401),
                ("-", {"runId": run_b.run_id, "workspaceId": "ws-b"}, 401),
            ]
            async with httpx.AsyncClient() as http:
                for secret, body, status in attempts:
                    response = await http.post(
                        f"{runner.http}/continue", json=body, headers={"Authorization": f"Bearer {secret}"}
                    )
                    assert response.status_code == status, (secret, body, response.text)
                    answers.append(response.text)
            async with grpc.aio.insecure_channel(runner.grpc_target) as channel:
                stub_r = rpb_grpc.RunnerServiceStub(channel)
                for secret, ws in ((RUNNER_A, "ws-b"), (RUNNER_DEFAULT, "ws-b"), (RUNNER_A, "")):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await stub_r.Continue(rpb.ContinueRequest(run_id=run_b.run_id, workspace_id=ws),
                                              metadata=(("authorization", f"Bearer {secret}"),))  # fmt: skip
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    answers.append(str(info.value))
            assert (await handle_b.refresh()).pause_reason == "HANDOFF_TO_RUNNER"
            # B's own secret continues B's run.
            async with httpx.AsyncClient() as http:
                response = await http.post(f"{runner.http}/continue",
                                           json={"runId": run_b.run_id, "workspaceId": "ws-b"},
                                           headers={"Authorization": f"Bearer {RUNNER_B}"})  # fmt: skip
            assert response.status_code == 202
            run_b = await refresh_until(handle_b, "DONE", tries=400)
    finally:
        engine.close()
        runner.close()
        stub.shutdown()
        stub.server_close()
    assert run_a.state == "DONE"
    assert run_b.state == "DONE"
    assert_clean(tree(tmp_path / "storage"), "the storage tree")
    assert_clean([engine.log.read_bytes(), runner.log.read_bytes()], "engine and runner stderr")
    assert_clean(answers, "the runner's answers")


def client_for(engine: EngineProcess, key: str) -> AsyncEngineClient:
    return AsyncEngineClient(engine.target, api_key=key)


# -- startup ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "env", "named"),
    [
        ("", {"MACHINA_RUNNER_URL": "http://127.0.0.1:9/continue"}, "runner_secret"),
        ('runner_url = "http://127.0.0.1:9/continue"\nrunner_secrets = { ws-a = "x-secret-123" }\n', {},
         "runner_secret"),
        ('[runner_urls]\nws-a = "http://127.0.0.1:9/continue"\n', {}, "ws-a"),
        ('runner_secrets = { ws-b = "x-secret-123" }\n'
         '[runner_urls]\nws-a = "http://127.0.0.1:9/continue"\n', {},
         "ws-a"),
    ],
)  # fmt: skip
def test_an_engine_with_a_runner_url_but_no_secret_refuses_to_start(
    tmp_path: Path, config: str, env: dict[str, str], named: str
) -> None:
    path = tmp_path / "engine.toml"
    path.write_text(config)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MACHINA_")}
    result = subprocess.run(
        [sys.executable, "-m", "engine_service", "--config", str(path), "--listen", "127.0.0.1:0",
         "--storage", str(tmp_path / "s")],
        cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "secret" in lines[0]
