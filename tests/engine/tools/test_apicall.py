"""ApiCall against a real third-party HTTP API (httpbin under gunicorn): auth, rails, caps, metering."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from engine_service.core._errors import EngineError
from engine_service.net._egress import EgressPolicy
from engine_service.tools._apicall import (
    ApiConfig,
    ApiPolicyError,
    ApiService,
    AuthContext,
    CustomAuth,
    api_tool_enabled,
    build_api_call_tool,
    check_per_run_services,
    env_lookup_from,
    load_resolve_auth,
    normalise_path,
)
from engine_service.tools._registry import Tool, ToolContext, ToolError, call_tool
from tests.httpbin_server import Recorder

ENV = {"tok": "bearer-value-1234", "user": "alice", "pass": "wonder-pw-99", "key": "key-value-5678"}
SIGNING_KEY = b"signing-key"


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    with Recorder() as r:
        yield r


class Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        self.items.append((kind, data))


def service(base_url: str, name: str = "bin", **fields: Any) -> ApiService:
    return ApiService.model_validate({"name": name, "base_url": base_url, **fields})


def make_tool(*services: ApiService, env: dict[str, str] | None = None, **kwargs: Any) -> Tool:
    lookup = (env if env is not None else ENV).get
    return build_api_call_tool(services, env_lookup=lookup, **kwargs)


async def call(tool: Tool, events: Events | None = None, **args: Any) -> Any:
    """The model-facing result: parsed JSON on success, the error text (str) on failure."""
    ctx = ToolContext("run-1", "default", "call-1", emit=events or Events())
    text, is_error = await call_tool(tool, {"service": "bin", **args}, ctx)
    return text if is_error else json.loads(text)


def sign(auth: CustomAuth, ctx: AuthContext) -> dict[str, str]:
    mac = hmac.new(SIGNING_KEY, f"{ctx.method} {ctx.path}".encode(), hashlib.sha256).hexdigest()
    return {"X-Signature": mac}


# -- configuration and registration -------------------------------------------------------------------


def test_config_shape_and_validation() -> None:
    cfg = ApiConfig.model_validate(
        {
            "services": [
                {
                    "name": "a",
                    "base_url": "https://a.example/v1/",
                    "auth": {"type": "bearer", "token_ref": "t"},
                },
                {"name": "b", "base_url": "http://b.example", "auth": {"type": "custom", "id": "oauth"}},
            ],
            "env": {"t": "the-token-value"},
            "resolve_auth": "tests.engine.tools.test_apicall:sign",
        }
    )
    assert cfg.services[0].base_url == "https://a.example/v1"
    assert cfg.services[0].methods == ("GET", "POST", "PUT", "PATCH", "DELETE")
    assert "the-token-value" not in repr(cfg) + cfg.model_dump_json()
    bad: list[dict[str, Any]] = [
        {"services": [{"name": "bad name", "base_url": "http://x"}]},
        {"services": [{"name": "a", "base_url": "ftp://x"}]},
        {"services": [{"name": "a", "base_url": "https://user:pw@x"}]},
        {"services": [{"name": "a", "base_url": "http://x", "auth": {"type": "bearer"}}]},
        {"services": [{"name": "a", "base_url": "http://x", "auth": {"type": "oauth"}}]},
        {"services": [{"name": "a", "base_url": "http://x", "allowed_methods": ["TRACE"]}]},
        {"services": [{"name": "a", "base_url": "http://x", "allowed_paths": ["("]}]},
        {"services": [{"name": "a", "base_url": "http://x", "headers": {"Authorization": "x"}}]},
        {"services": [{"name": "a", "base_url": "http://x", "extra": 1}]},
        {"services": [{"name": "a", "base_url": "http://x"}, {"name": "a", "base_url": "http://y"}]},
    ]
    for raw in bad:
        with pytest.raises(ValidationError):
            ApiConfig.model_validate(raw)
    with pytest.raises(ValidationError):
        cfg.services[0].name = "changed"  # type: ignore[misc]


def test_tool_schema_and_description_name_services_but_no_secrets() -> None:
    a = service("https://a.example/v1", "a", auth={"type": "bearer", "token_ref": "tok"})
    b = service("http://b.example", "b", allowed_methods=["GET"], allowed_paths=[r"/items/\d+"])
    tool = make_tool(a, b)
    assert tool.name == "ApiCall"
    props = tool.input_schema["properties"]
    assert props["service"]["enum"] == ["a", "b"]
    assert set(props) == {"service", "method", "path", "query", "headers", "body"}
    assert "a: https://a.example/v1" in tool.description
    assert r"/items/\d+" in tool.description
    for value in ENV.values():
        assert value not in tool.description + json.dumps(tool.input_schema) + repr(tool)
    assert "tok" not in tool.description


def test_registration_helpers() -> None:
    a, b = service("http://a.example", "a"), service("http://b.example", "b")
    assert not api_tool_enabled([], [])
    assert not api_tool_enabled([a], ["ApiCall"])
    assert api_tool_enabled([a], ["Bash"])
    with pytest.raises(ValueError, match="at least one service"):
        build_api_call_tool([], env_lookup=ENV.get)
    b2 = service("http://b2.example", "b")
    c = service("http://c.example", "c")
    # Per-run services add to the engine's and never shadow one, whatever the case of the name.
    check_per_run_services([a, b], [c], ())
    for clash in (b2, service("http://x.example", "B"), service("http://x.example", "A")):
        with pytest.raises(ApiPolicyError) as refused:
            check_per_run_services([a, b], [clash], ())
        assert refused.value.reason == "ERR_API_SERVICE_SHADOWED"
        with pytest.raises(ApiPolicyError):
            build_api_call_tool([a, b], env_lookup=ENV.get, per_run_services=[clash])
    custom = service("http://c.example", "c", auth={"type": "custom", "id": "vault"})
    check_per_run_services([a], [custom], ["vault"])
    for allowed in ((), ["VAULT"], ["vault "]):
        with pytest.raises(ApiPolicyError) as refused:
            check_per_run_services([a], [custom], allowed)
        assert refused.value.reason == "ERR_API_AUTH_NOT_ALLOWED"
    lookup = env_lookup_from({"x": SecretStr("run")}, None, {"x": SecretStr("e"), "y": SecretStr("e")})
    assert (lookup("x"), lookup("y"), lookup("z")) == ("run", "e", None)
    assert load_resolve_auth("tests.engine.tools.test_apicall:sign") is sign
    for path in (
        "tests.engine.tools.test_apicall:nope",
        "no_such_module:x",
        "tests.engine.tools.test_apicall:ENV",
    ):
        with pytest.raises(EngineError):
            load_resolve_auth(path)


async def test_per_run_services_read_only_the_run_env_and_allowed_custom_ids(recorder: Recorder) -> None:
    """Also for a run stored before the policy changed: the tool itself refuses, not only the door."""
    seen: list[AuthContext] = []

    def resolver(auth: CustomAuth, ctx: AuthContext) -> dict[str, str]:
        seen.append(ctx)
        return {"Authorization": "Bearer engine-minted-0000"}

    own = [
        service(recorder.url, "bin", auth={"type": "bearer", "token_ref": "tok"}),
        service(recorder.url, "minted", auth={"type": "custom", "id": "vault"}),
        service(recorder.url, "tenant", auth={"type": "custom", "id": "tenant"}),
    ]
    tool = build_api_call_tool(
        [],
        env_lookup=ENV.get,
        resolve_auth=resolver,
        per_run_services=own,
        run_env_lookup={"other": "x"}.get,
        per_run_custom_auth_ids=["tenant"],
        egress=EgressPolicy.from_settings(allow_hosts=["127.0.0.1"]),  # the recorder is on loopback
    )
    assert "ERR_CREDENTIALS_MISSING" in await call(tool, path="/x")  # "tok" is the engine's, not the run's
    assert "ERR_API_AUTH_NOT_ALLOWED" in await call(tool, service="minted", path="/x")
    assert (await call(tool, service="tenant", path="/x"))["status"] == 200
    assert [h.get("authorization") for _, h in recorder.requests] == ["Bearer engine-minted-0000"]
    assert seen == [AuthContext("tenant", "GET", "/x", "default", "run-1", recorder.url, per_run=True)]


# -- auth ---------------------------------------------------------------------------------------------


async def test_auth_none_sends_no_credentials(httpbin: str) -> None:
    result = await call(make_tool(service(httpbin)), path="/headers")
    assert result["status"] == 200
    assert "Authorization" not in result["body"]["headers"]


async def test_requests_carry_the_current_trace_only_while_tracing_is_on(httpbin: str) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    from engine_service.core import _telemetry as telemetry

    assert "Traceparent" not in (await call(make_tool(service(httpbin)), path="/headers"))["body"]["headers"]
    provider = TracerProvider()
    telemetry.install_tracer_provider(provider)
    host = httpx.URL(httpbin).host
    try:
        with provider.get_tracer("test").start_as_current_span("tool") as span:
            result = await call(make_tool(service(httpbin), trace_hosts=[host]), path="/headers")
            # A host the operator did not list never learns the trace.
            unlisted = await call(make_tool(service(httpbin)), path="/headers")
            other = await call(make_tool(service(httpbin), trace_hosts=["*.example.com"]), path="/headers")
    finally:
        telemetry.uninstall()
    traceparent = result["body"]["headers"]["Traceparent"]
    assert traceparent.split("-")[1] == format(span.get_span_context().trace_id, "032x")
    assert "Traceparent" not in unlisted["body"]["headers"]
    assert "Traceparent" not in other["body"]["headers"]


async def test_auth_bearer(httpbin: str) -> None:
    tool = make_tool(service(httpbin, auth={"type": "bearer", "token_ref": "tok"}))
    result = await call(tool, path="/bearer")
    assert result["status"] == 200
    assert result["body"] == {"authenticated": True, "token": "[REDACTED]"}
    assert (await call(make_tool(service(httpbin)), path="/bearer"))["status"] == 401


async def test_auth_basic(httpbin: str) -> None:
    tool = make_tool(service(httpbin, auth={"type": "basic", "user_ref": "user", "pass_ref": "pass"}))
    ok = await call(tool, path="/basic-auth/alice/wonder-pw-99")
    assert ok["status"] == 200
    assert ok["body"] == {"authenticated": True, "user": "[REDACTED]"}
    assert (await call(tool, path="/basic-auth/alice/other"))["status"] == 401
    echoed = await call(tool, path="/headers")
    assert echoed["body"]["headers"]["Authorization"] == "Basic [REDACTED]"


async def test_auth_header(httpbin: str) -> None:
    tool = make_tool(service(httpbin, auth={"type": "header", "name": "X-Api-Key", "value_ref": "key"}))
    result = await call(tool, path="/headers")
    assert result["body"]["headers"]["X-Api-Key"] == "[REDACTED]"
    assert "Authorization" not in result["body"]["headers"]


@pytest.mark.parametrize("is_async", [False, True])
async def test_auth_custom_resolver_signs_method_and_path(httpbin: str, is_async: bool) -> None:
    seen: list[AuthContext] = []

    def sync_resolver(auth: CustomAuth, ctx: AuthContext) -> dict[str, str]:
        seen.append(ctx)
        assert auth.id == "hmac"
        return sign(auth, ctx)

    async def async_resolver(auth: CustomAuth, ctx: AuthContext) -> dict[str, str]:
        return sync_resolver(auth, ctx)

    tool = make_tool(
        service(httpbin, auth={"type": "custom", "id": "hmac"}),
        resolve_auth=async_resolver if is_async else sync_resolver,
    )
    result = await call(tool, method="PUT", path="/anything/./items/7", body={"a": 1})
    assert seen == [AuthContext("bin", "PUT", "/anything/items/7", "default", "run-1", httpbin)]
    assert result["body"]["method"] == "PUT"
    # The signature was sent: it comes back redacted, because resolver output is secret too.
    assert result["body"]["headers"]["X-Signature"] == "[REDACTED]"


async def test_custom_auth_without_resolver_and_failing_resolver(httpbin: str) -> None:
    svc = service(httpbin, auth={"type": "custom", "id": "x"})
    text = await call(make_tool(svc), path="/get")
    assert text.startswith("ERR_AUTH_RESOLVER:")

    def broken(auth: CustomAuth, ctx: AuthContext) -> dict[str, str]:
        raise KeyError("token store offline")

    text = await call(make_tool(svc, resolve_auth=broken), path="/get")
    assert text.startswith("ERR_AUTH_RESOLVER:")
    assert "KeyError" in text
    assert "offline" not in text


async def test_missing_env_ref_is_a_clear_error(httpbin: str) -> None:
    svc = service(httpbin, auth={"type": "basic", "user_ref": "user", "pass_ref": "gone"})
    text = await call(make_tool(svc), path="/get")
    assert text.startswith("ERR_CREDENTIALS_MISSING:")
    assert "'bin'" in text
    assert "'gone'" in text
    assert "alice" not in text


# -- rails: methods, paths, headers, body -----------------------------------------------------------


async def test_allowed_methods(httpbin: str) -> None:
    # The schema's enum is the union over services; each service is then checked on its own.
    tool = make_tool(service(httpbin, allowed_methods=["get", "POST"]), service(httpbin, "other"))
    assert tool.input_schema["properties"]["method"]["enum"] == ["GET", "POST", "PUT", "PATCH", "DELETE"]
    assert (await call(tool, method="POST", path="/post", body={"x": 1}))["body"]["json"] == {"x": 1}
    text = await call(tool, method="DELETE", path="/delete")
    assert "method DELETE is not allowed for service 'bin'" in text
    assert "Invalid arguments" in await call(tool, method="TRACE", path="/get")


async def test_allowed_paths_full_match_the_normalised_path(httpbin: str) -> None:
    tool = make_tool(service(httpbin, allowed_paths=[r"/anything/ok(/\d+)?"]))
    for path in ("/anything/ok", "anything/ok/1", "/anything/./ok", "/anything//ok/2", "/%61nything/ok"):
        result = await call(tool, path=path)
        assert isinstance(result, dict), (path, result)
        assert result["body"]["url"].split("/anything")[1] in ("/ok", "/ok/1", "/ok/2")
    for path in ("/anything/ok/x", "/anything/other", "/anything/ok/1/extra", "/get"):
        assert "is not allowed for service" in await call(tool, path=path)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("", "/"),
        ("/a/b/", "/a/b/"),
        ("a/./b", "/a/b"),
        ("/a//b", "/a/b"),
        ("/%7Euser/%41", "/~user/A"),
        ("/caf\u00e9 x", "/caf%C3%A9%20x"),
        ("/a%3ab%40", "/a%3Ab%40"),
        ("/things:batchGet", "/things:batchGet"),
        ("/100%25", "/100%25"),
    ],
)
def test_normalise_path(raw: str, normal: str) -> None:
    assert normalise_path(raw) == normal


@pytest.mark.parametrize(
    "raw",
    [
        "http://evil/x",
        "https:x",
        "javascript:alert(1)",
        "//evil.example/x",
        "/a/../b",
        "..",
        "/a/..;/b",
        "/%2e%2e/x",
        "/.%2E/x",
        "/a%2fb",
        "/a%5Cb",
        "/%252e%252e/x",
        "/a%2",
        "/a@evil",
        "\\\\evil\\x",
        "/a\r\nHost: evil",
        "/a%00",
        "/a?x=1",
        "/a#frag",
    ],
)
def test_normalise_path_rejects_escapes(raw: str) -> None:
    with pytest.raises(ToolError):
        normalise_path(raw)


async def test_query_values_are_stringified_and_encoded(httpbin: str) -> None:
    events = Events()
    query = {"q": "a b&c=d/é", "n": 3, "f": 1.5, "t": True}
    result = await call(make_tool(service(httpbin)), events, path="/get", query=query)
    assert result["body"]["args"] == {"q": "a b&c=d/é", "n": "3", "f": "1.5", "t": "true"}
    assert "a b&c" not in json.dumps(events.items)
    assert events.items[0][1]["path"] == "/get"


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "authorization",
        "AUTHORIZATION",
        "aUtHoRiZaTiOn",
        "Proxy-Authorization",
        "proxy-authorization",
        "Cookie",
        "COOKIE",
        "Host",
        "host",
        "Content-Length",
        "Transfer-Encoding",
        "x-api-key",
        "X-API-KEY",
        "X-Fixed",
        "x-fixed",
    ],
)
async def test_header_sanitiser_is_case_insensitive(httpbin: str, name: str) -> None:
    tool = make_tool(
        service(
            httpbin,
            auth={"type": "header", "name": "X-Api-Key", "value_ref": "key"},
            headers={"X-Fixed": "fixed"},
        )
    )
    text = await call(tool, path="/headers", headers={name: "spoofed"})
    assert f"header {name!r} cannot be set by the model" in text


async def test_custom_resolver_headers_cannot_be_set_by_the_model(httpbin: str) -> None:
    tool = make_tool(service(httpbin, auth={"type": "custom", "id": "hmac"}), resolve_auth=sign)
    assert "cannot be set" in await call(tool, path="/headers", headers={"x-signature": "forged"})


async def test_model_headers_and_fixed_headers_are_sent(httpbin: str) -> None:
    tool = make_tool(service(httpbin, headers={"X-Fixed": "fixed"}))
    result = await call(tool, path="/headers", headers={"X-Trace": "t-1"})
    assert result["body"]["headers"]["X-Trace"] == "t-1"
    assert result["body"]["headers"]["X-Fixed"] == "fixed"
    assert "header 'X Bad'" in await call(tool, path="/headers", headers={"X Bad": "v"})
    assert "invalid name or value" in await call(tool, path="/headers", headers={"X-A": "v\r\nX-B: w"})


async def test_body_cap(httpbin: str) -> None:
    requests: list[dict[str, Any]] = []
    events = Events()
    tool = make_tool(service(httpbin, max_body_bytes=100), on_request=requests.append)
    text = await call(tool, events, method="POST", path="/post", body={"data": "x" * 100})
    assert "body is 111 bytes; service 'bin' allows at most 100" in text
    assert requests == []
    assert events.items == []
    ok = await call(tool, method="POST", path="/post", body=["é" * 10])
    assert ok["body"]["json"] == ["é" * 10]
    assert ok["body"]["headers"]["Content-Type"] == "application/json"


# -- responses ------------------------------------------------------------------------------------------


async def test_response_cap_cuts_and_flags(httpbin: str) -> None:
    events = Events()
    tool = make_tool(service(httpbin, max_response_bytes=1000))
    result = await call(tool, events, path="/stream-bytes/50000", query={"seed": 1, "chunk_size": 4096})
    assert result["truncated"] is True
    assert events.items[0][1]["bytes_in"] == 1000
    json_cut = await call(make_tool(service(httpbin, max_response_bytes=50)), path="/json")
    assert json_cut["truncated"] is True
    assert isinstance(json_cut["body"], str)
    whole = await call(make_tool(service(httpbin)), path="/json")
    assert whole["truncated"] is False
    assert isinstance(whole["body"], dict)


async def test_non_utf8_text_and_header_allow_list(httpbin: str) -> None:
    tool = make_tool(service(httpbin))
    raw = await call(tool, path="/bytes/256", query={"seed": 7})
    assert isinstance(raw["body"], str)
    assert "\ufffd" in raw["body"]
    query = {"Set-Cookie": "session=abc", "X-Ratelimit-Remaining": "5", "X-Internal": "no"}
    result = await call(tool, path="/response-headers", query=query)
    assert result["headers"]["x-ratelimit-remaining"] == "5"
    assert result["headers"]["content-type"].startswith("application/json")
    assert "set-cookie" not in result["headers"]
    assert "x-internal" not in result["headers"]


async def test_timeout(httpbin: str) -> None:
    events = Events()
    text = await call(make_tool(service(httpbin, timeout_s=0.5)), events, path="/delay/3")
    assert text == "ApiCall to 'bin' timed out after 0.5s"
    assert events.items[0][1]["status"] == 0


async def test_service_timeout_overrides_a_shared_clients_default(httpbin: str) -> None:
    async with httpx.AsyncClient(timeout=0.2) as client:
        result = await call(make_tool(service(httpbin, timeout_s=5), client=client), path="/delay/1")
    assert result["status"] == 200


async def test_unreachable_service_is_an_error(httpbin: str) -> None:
    text = await call(make_tool(service("http://127.0.0.1:9")), path="/get")
    assert text.startswith("ApiCall could not reach the service: ConnectError")


# -- redirects --------------------------------------------------------------------------------------------


async def test_same_origin_redirects_are_followed_with_credentials(httpbin: str) -> None:
    tool = make_tool(service(httpbin, auth={"type": "bearer", "token_ref": "tok"}))
    result = await call(tool, path="/redirect-to", query={"url": "/bearer"})
    assert result["status"] == 200
    assert result["body"]["authenticated"] is True
    assert (await call(tool, path="/redirect/5"))["status"] == 200
    assert (await call(tool, path="/absolute-redirect/2"))["status"] == 200
    capped = await call(tool, path="/redirect/6")
    assert capped["status"] == 302
    assert "at most 5 redirects" in capped["note"]


async def test_redirect_method_rewrite(httpbin: str) -> None:
    tool = make_tool(service(httpbin))
    seen = await call(
        tool, method="POST", path="/redirect-to", query={"url": "/anything", "status_code": 303}
    )
    assert seen["body"]["method"] == "GET"
    kept = await call(
        tool,
        method="POST",
        path="/redirect-to",
        query={"url": "/anything", "status_code": 307},
        body={"k": 1},
    )
    assert kept["body"]["method"] == "POST"
    assert kept["body"]["json"] == {"k": 1}


async def test_off_origin_redirect_is_not_followed(httpbin: str, recorder: Recorder) -> None:
    tool = make_tool(service(httpbin, auth={"type": "bearer", "token_ref": "tok"}))
    for target in (f"{recorder.url}/steal", recorder.url.replace("http:", "") + "/steal"):
        result = await call(tool, path="/redirect-to", query={"url": target})
        assert result["status"] == 302
        assert "another origin not followed" in result["note"]
        assert result["headers"]["location"] == target
    assert recorder.requests == []
    userinfo = httpbin.replace("http://", "http://mallory:pw@") + "/headers"
    result = await call(tool, path="/redirect-to", query={"url": userinfo})
    assert "another origin not followed" in result["note"]


async def test_redirect_to_a_disallowed_path_is_not_followed(httpbin: str) -> None:
    tool = make_tool(service(httpbin, allowed_paths=["/redirect-to"]))
    result = await call(tool, path="/redirect-to", query={"url": "/headers"})
    assert result["status"] == 302
    assert "not allowed" in result["note"]


async def test_shared_client_cookie_jar_is_never_sent(httpbin: str) -> None:
    async with httpx.AsyncClient() as client:
        tool = make_tool(service(httpbin), client=client)
        result = await call(tool, path="/cookies/set", query={"session": "abc"})
        assert result["status"] == 200
        assert result["body"] == {"cookies": {}}
        assert not client.is_closed


# -- metering -----------------------------------------------------------------------------------------------


async def test_metering_hooks_and_event(httpbin: str, caplog: pytest.LogCaptureFixture) -> None:
    requests: list[dict[str, Any]] = []
    responses: list[dict[str, Any]] = []

    async def on_response(payload: dict[str, Any]) -> None:
        responses.append(payload)

    events = Events()
    tool = make_tool(service(httpbin), on_request=requests.append, on_response=on_response)
    result = await call(tool, events, method="POST", path="/status/201", query={"secretish": "value"})
    assert result["status"] == 201
    # Hooks learn whose call it is (per-tenant metering); the run's own event needs no such tag.
    who = {"workspace_id": "default", "run_id": "run-1", "per_run": False}
    assert requests == [{"service": "bin", "method": "POST", "path": "/status/201", **who}]
    [payload] = responses
    assert set(payload) == {"service", "method", "path", "status", "latency_ms", "bytes_in", *who}
    assert payload["status"] == 201
    assert payload["latency_ms"] >= 0
    assert payload["bytes_in"] == 0
    assert events.items == [("api_call", {k: v for k, v in payload.items() if k not in who})]

    def broken(payload: dict[str, Any]) -> None:
        raise RuntimeError("meter down")

    caplog.set_level(logging.WARNING, logger="engine_service.tools._apicall")
    tool = make_tool(service(httpbin), on_request=broken, on_response=broken)
    assert (await call(tool, path="/get"))["status"] == 200
    assert caplog.text.count("ApiCall hook failed: RuntimeError") == 2
