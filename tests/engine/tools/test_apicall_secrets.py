"""Secret isolation for ApiCall: adversarial calls against a real echoing API never surface a credential.

Everything the tool produces is collected — result and error texts, emitted events, hook payloads,
exception tracebacks and every log record at DEBUG from every logger — and searched for each secret
value and the forms it travels in (see tests/secrets_util.py).
"""

from __future__ import annotations

import json
import logging
import traceback
from typing import Any

import httpx
import pytest

from engine_service.tools._apicall import ApiService, AuthContext, CustomAuth, build_api_call_tool
from engine_service.tools._registry import Tool, ToolContext, ToolError, call_tool
from tests.httpbin_server import Recorder
from tests.secrets_util import CUSTOM_TOKEN, SECRET_ENV, assert_no_secret, find_secrets

AUTHS: dict[str, dict[str, Any]] = {
    "bearer": {"type": "bearer", "token_ref": "bearer_token"},
    "basic": {"type": "basic", "user_ref": "basic_user", "pass_ref": "basic_pass"},
    "header": {"type": "header", "name": "X-Api-Key", "value_ref": "header_value"},
    "custom": {"type": "custom", "id": "vault:token"},
    "signed": {"type": "custom", "id": "hmac"},
}
SPOOFED = ["authorization", "AUTHORIZATION", "Authorization", "Cookie", "cookie", "Proxy-Authorization",
           "PROXY-AUTHORIZATION", "X-Api-Key", "x-api-key", "X-Custom-Token", "x-signature"]  # fmt: skip
BAD_PATHS = ["//evil.example/x", "https://evil/x", "http:x", "..", "/a/../../b", "%2e%2e/", "/%2E%2E/etc",
             "/%252e%252e/x", "@evil", "/x@evil.example", "\\\\evil\\x", "/a%2f..%2fb", "/a%5c..",
             "/a\r\nAuthorization: x", "javascript:alert(1)"]  # fmt: skip
ECHO_PATHS = ["/headers", "/anything", "/anything/deep/path", "/get", "/gzip", "/deflate", "/bearer"]


class Collector:
    """Everything the tool let out, in one place."""

    def __init__(self) -> None:
        self.blobs: list[str] = []
        self.ok = 0

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        self.blobs.append(json.dumps({"kind": kind, "data": data}))

    def hook(self, payload: dict[str, Any]) -> None:
        self.blobs.append(json.dumps(payload))


def resolver(auth: CustomAuth, ctx: AuthContext) -> dict[str, str]:
    if auth.id == "vault:token":
        return {"Authorization": f"Bearer {CUSTOM_TOKEN}", "X-Custom-Token": CUSTOM_TOKEN}
    return {"X-Signature": f"sig-{CUSTOM_TOKEN}-{ctx.method}{ctx.path}"}


def make_tool(httpbin: str, collector: Collector, **kwargs: Any) -> Tool:
    services = [ApiService(name=n, base_url=httpbin, auth=a) for n, a in AUTHS.items()]
    return build_api_call_tool(
        services,
        env_lookup=SECRET_ENV.get,
        resolve_auth=kwargs.pop("resolve_auth", resolver),
        on_request=collector.hook,
        on_response=collector.hook,
        **kwargs,
    )


async def run(tool: Tool, collector: Collector, args: dict[str, Any]) -> tuple[str, bool]:
    text, is_error = await call_tool(tool, args, ToolContext("run-s", "default", "c-1", emit=collector.emit))
    collector.blobs.append(text)
    collector.ok += not is_error
    return text, is_error


async def test_adversarial_calls_never_surface_a_secret(
    httpbin: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    collector = Collector()
    with Recorder() as recorder:
        tool = make_tool(httpbin, collector)
        calls: list[dict[str, Any]] = []
        for name in AUTHS:
            calls += [{"service": name, "path": p} for p in ECHO_PATHS]
            calls += [{"service": name, "path": "/anything", "method": "POST", "body": {"echo": "me"},
                       "query": {"q": "x"}, "headers": {"X-Trace": "t"}}]  # fmt: skip
            calls += [{"service": name, "path": "/headers", "headers": {h: "spoof"}} for h in SPOOFED]
            calls += [{"service": name, "path": p} for p in BAD_PATHS]
            targets = (f"{recorder.url}/steal", "//" + recorder.url[7:] + "/x", "/headers")
            calls += [{"service": name, "path": "/redirect-to", "query": {"url": u}} for u in targets]
            calls += [{"service": name, "path": "/redirect-to", "method": "POST", "body": {"a": 1},
                       "query": {"url": f"{recorder.url}/steal", "status_code": 307}}]  # fmt: skip
            calls += [{"service": name, "method": "POST", "path": "/post", "body": "x" * (2 << 20)}]
            calls += [{"service": name, "path": "/response-headers", "query": {"Set-Cookie": "s=1"}}]
        for args in calls:
            await run(tool, collector, args)
        assert recorder.requests == []
    # Not vacuous: echo endpoints answered, and they saw the credentials (which came back redacted).
    assert collector.ok >= len(AUTHS) * len(ECHO_PATHS)
    assert any('"Authorization": "Bearer [REDACTED]"' in b for b in collector.blobs)
    assert any('"Authorization": "Basic [REDACTED]"' in b for b in collector.blobs)
    assert any('"X-Api-Key": "[REDACTED]"' in b for b in collector.blobs)
    assert any('"X-Signature": "[REDACTED]"' in b for b in collector.blobs)
    assert_no_secret(collector.blobs, "tool output")
    assert_no_secret(caplog.text, "logs")
    assert_no_secret([r.getMessage() for r in caplog.records], "log records")
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{httpbin}/get", timeout=5)).status_code == 200


async def test_failing_resolver_and_missing_refs_say_so_without_the_secret(
    httpbin: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    collector = Collector()

    def leaky(auth: CustomAuth, ctx: AuthContext) -> dict[str, str]:
        raise RuntimeError(f"token {CUSTOM_TOKEN} expired; refresh with {SECRET_ENV['bearer_token']}")

    tool = make_tool(httpbin, collector, resolve_auth=leaky)
    for service in ("custom", "signed"):
        text, is_error = await run(tool, collector, {"service": service, "path": "/headers"})
        assert is_error
        assert text.startswith("ERR_AUTH_RESOLVER:")
        assert "RuntimeError" in text
        # The raised ToolError carries no chained exception that a traceback logger could print.
        with pytest.raises(ToolError) as info:
            await tool.run({"service": service, "path": "/headers"}, ToolContext("r", "w", "c"))
        collector.blobs.append("".join(traceback.format_exception(info.value)))

    partial = {"basic_user": SECRET_ENV["basic_user"]}  # the password ref is gone after a resume
    services = [ApiService(name=n, base_url=httpbin, auth=AUTHS[n]) for n in ("bearer", "basic", "header")]
    tool = build_api_call_tool(services, env_lookup=partial.get)
    for service, ref in (("bearer", "bearer_token"), ("basic", "basic_pass"), ("header", "header_value")):
        text, is_error = await run(tool, collector, {"service": service, "path": "/headers"})
        assert is_error
        assert text.startswith("ERR_CREDENTIALS_MISSING:")
        assert f"'{service}'" in text
        assert f"'{ref}'" in text
    assert_no_secret(collector.blobs, "errors")
    assert_no_secret(caplog.text, "logs")


async def test_secret_with_json_special_characters_is_redacted_in_escaped_form(httpbin: str) -> None:
    secret = 'q"uo\\te-SECRET-</x>'
    service = ApiService(
        name="odd", base_url=httpbin, auth={"type": "header", "name": "X-K", "value_ref": "k"}
    )
    tool = build_api_call_tool([service], env_lookup={"k": secret}.get)
    text, is_error = await call_tool(tool, {"service": "odd", "path": "/headers"}, ToolContext("r", "w", "c"))
    assert not is_error
    assert json.loads(text)["body"]["headers"]["X-K"] == "[REDACTED]"
    assert secret not in text
    assert json.dumps(secret)[1:-1] not in text
    assert not find_secrets(text)


def test_config_and_tool_objects_do_not_render_secrets(httpbin: str) -> None:
    from engine_service.tools._apicall import ApiConfig

    cfg = ApiConfig.model_validate(
        {
            "services": [{"name": n, "base_url": httpbin, "auth": a} for n, a in AUTHS.items()],
            "env": SECRET_ENV,
        }
    )
    tool = make_tool(httpbin, Collector())
    assert_no_secret(
        [
            repr(cfg),
            str(cfg),
            cfg.model_dump_json(),
            tool.description,
            json.dumps(tool.input_schema),
            repr(tool),
        ],
        "config/tool rendering",
    )
