"""The ApiCall built-in: the model calls configured HTTP services, the engine adds the credentials.

The model names a service from a closed enum plus a method, a relative path, query, headers and a
JSON body. Credentials come from an env lookup (refs → values) or a ``resolve_auth`` callable and are
attached here, after the model's input has passed the rails (methods, normalised paths, header
sanitiser, body cap). Every text that leaves this module — result, error, event, hook payload, log
line — is scrubbed of every known credential value first, because APIs echo headers back.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import httpx

from engine_service.core import _telemetry as telemetry
from engine_service.core._errors import shown
from engine_service.core._regex import fullmatch
from engine_service.core._text import has_surrogate, loads_untrusted
from engine_service.core._types import JsonObject
from engine_service.net._egress import EgressPolicy, EgressRefused
from engine_service.net._tls import client_ssl_context
from engine_service.tools._apicall_auth import (
    REDACTED,
    AuthContext,
    EnvLookup,
    ResolveAuth,
    Scrubber,
    basic_credentials,
    credential_refs,
    env_lookup_from,
    known_secrets,
    load_resolve_auth,
    no_env,
)
from engine_service.tools._apicall_config import (
    DEFAULT_METHODS,
    HEADER_NAME,
    METHODS,
    RESERVED_HEADERS,
    AnyAuth,
    ApiAuth,
    ApiConfig,
    ApiService,
    BasicAuth,
    BearerAuth,
    CustomAuth,
    HeaderAuth,
    NoAuth,
    has_ctl,
)
from engine_service.tools._registry import Tool, ToolContext, ToolError

__all__ = [
    "DEFAULT_METHODS",
    "MAX_REDIRECTS",
    "METHODS",
    "REDACTED",
    "TOOL_NAME",
    "AnyAuth",
    "ApiAuth",
    "ApiConfig",
    "ApiPolicyError",
    "ApiService",
    "AuthContext",
    "BasicAuth",
    "BearerAuth",
    "CustomAuth",
    "EnvLookup",
    "HeaderAuth",
    "Hook",
    "NoAuth",
    "ResolveAuth",
    "api_tool_enabled",
    "build_api_call_tool",
    "check_per_run_services",
    "env_lookup_from",
    "known_secrets",
    "load_resolve_auth",
    "normalise_path",
]

logger = logging.getLogger(__name__)

# The only response headers the model sees (never set-cookie or anything credential-like).
_RESPONSE_HEADERS = frozenset(("content-type", "content-length", "content-language", "location", "etag",
                               "last-modified", "cache-control", "retry-after", "link", "x-request-id",
                               "x-ratelimit-limit", "x-ratelimit-remaining",
                               "x-ratelimit-reset"))  # fmt: skip

TOOL_NAME = "ApiCall"
MAX_REDIRECTS = 5


Hook = Callable[[JsonObject], Any]


class ApiPolicyError(ValueError):
    """A run's own services ask for something the engine does not grant; ``reason`` says what."""

    def __init__(self, reason: str, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.metadata = metadata


def check_per_run_services(
    engine_level: Iterable[ApiService], per_run: Iterable[ApiService], custom_ids: Iterable[str]
) -> None:
    """Refuse per-run services that would shadow an engine service or borrow an engine credential.

    Per-run services add to the engine's; a name may not repeat one, ignoring case. Their refs
    resolve against the run's own ``env`` only (see ``build_api_call_tool``), and a ``custom``
    id must be one the engine lists in ``per_run_custom_auth_ids``.
    """
    taken = {s.name.lower(): s.name for s in engine_level}
    allowed = set(custom_ids)
    for service in per_run:
        if service.name.lower() in taken:
            raise ApiPolicyError(
                "ERR_API_SERVICE_SHADOWED",
                f"per-run service {service.name!r} has the name of an engine service "
                f"({taken[service.name.lower()]!r}); choose another name",
                service=service.name,
            )
        if isinstance(service.auth, CustomAuth) and service.auth.id not in allowed:
            raise ApiPolicyError(
                "ERR_API_AUTH_NOT_ALLOWED",
                f"per-run service {service.name!r} names custom auth id {shown(service.auth.id)!r}, "
                "which this engine does not allow for per-run services (use per-run credentials: "
                "bearer, header or basic with refs into the run's env)",
                service=service.name,
            )


def api_tool_enabled(services: Iterable[ApiService], disabled_tools: Iterable[str]) -> bool:
    return any(True for _ in services) and TOOL_NAME not in set(disabled_tools)


def normalise_path(raw: str) -> str:
    """The path relative to base_url, normalised; ToolError for anything that could leave it."""
    if has_surrogate(raw):
        raise ToolError("path must be valid Unicode text")
    if has_ctl(raw):
        raise ToolError("path must not contain control characters")
    for char, what in (("\\", "backslashes"), ("@", "'@'"), ("?", "'?' (use query)"), ("#", "'#'")):
        if char in raw:
            raise ToolError(f"path must not contain {what}")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", raw) or raw.startswith("//"):
        raise ToolError("path must be relative to the service base URL (no scheme or host)")
    if re.search(r"%(?![0-9A-Fa-f]{2})", raw):
        raise ToolError("path has a malformed percent-escape")
    if re.search(r"%25[0-9A-Fa-f]{2}", raw):
        raise ToolError("path must not be double percent-encoded")

    def decode(match: re.Match[str]) -> str:
        char = chr(int(match.group(1), 16))
        if char.isascii() and (char.isalnum() or char in "-._~"):
            return char
        if char in "/\\" or has_ctl(char):
            raise ToolError("path must not contain encoded slashes, backslashes or control characters")
        return "%" + match.group(1).upper()

    segments: list[str] = []
    decoded = re.sub(r"%([0-9A-Fa-f]{2})", decode, raw)
    for segment in decoded.split("/"):
        # "..;x" is ".." to some servers (path parameters), so judge the part before ';'.
        head = segment.split(";", 1)[0]
        if head == "..":
            raise ToolError("path must not contain '..' segments")
        if segment and head != ".":
            segments.append(quote(segment, safe="!$&'()*+,;=:%"))
    trailing = "/" if segments and decoded.endswith("/") else ""
    result = "/" + "/".join(segments) + trailing
    # Decoding may have built a double encoding from pieces ("%25" then "%32%65" → "%252e"):
    # what is checked must be what is sent, so refuse it here too.
    if re.search(r"%25[0-9A-Fa-f]{2}", result):
        raise ToolError("path must not be double percent-encoded")
    return result


def _origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    u = httpx.URL(str(url))
    port = u.port or {"http": 80, "https": 443}.get(u.scheme)
    return u.scheme, u.host.lower(), port


def _input_schema(services: list[ApiService]) -> JsonObject:
    methods = [m for m in METHODS if any(m in s.methods for s in services)]
    return {
        "type": "object",
        "properties": {
            "service": {"type": "string", "enum": [s.name for s in services], "description": "Service."},
            "method": {"type": "string", "enum": methods, "default": "GET"},
            "path": {"type": "string", "description": "Path relative to the service base URL, e.g. /items/1"},
            "query": {
                "type": "object",
                "additionalProperties": {"type": ["string", "number", "boolean"]},
                "description": "Query parameters.",
            },
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            "body": {"description": "JSON request body."},
        },
        "required": ["service", "path"],
        "additionalProperties": False,
    }


def _description(services: list[ApiService]) -> str:
    lines = [
        "Call an external HTTP API. Authentication is added for you: never put credentials in "
        "headers, query or body. Returns JSON {status, headers, body, truncated}. Services:"
    ]
    for s in services:
        rails = f"methods {', '.join(s.methods)}"
        if s.allowed_paths is not None:
            rails += f"; paths matching {', '.join(s.allowed_paths)}"
        lines.append(f"- {s.name}: {s.base_url} ({rails})")
    return "\n".join(lines)


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


@dataclass(slots=True)
class _ApiCall:
    services: dict[str, ApiService]
    env_lookup: EnvLookup = field(repr=False)
    resolve_auth: ResolveAuth | None = field(repr=False)
    on_request: Hook | None
    on_response: Hook | None
    client: httpx.AsyncClient | None
    # Names of the run's own services, their env and the custom ids they may name. Their
    # connections go through ``egress``; the operator's services connect directly.
    per_run: frozenset[str] = frozenset()
    run_env_lookup: EnvLookup = field(default=no_env, repr=False)
    per_run_custom_ids: frozenset[str] = frozenset()
    egress: EgressPolicy = field(default_factory=EgressPolicy)
    # Hosts that get the run's trace context (``traceparent``); see `telemetry.inject_for`.
    trace_hosts: frozenset[str] = frozenset()

    def _lookup_for(self, service: ApiService) -> EnvLookup:
        # A per-run service's refs name the run's env only, never the engine's or the process's.
        return self.run_env_lookup if service.name in self.per_run else self.env_lookup

    async def __call__(self, args: JsonObject, ctx: ToolContext) -> str:
        scrub = Scrubber(
            value
            for service in self.services.values()
            for value in known_secrets([service], self._lookup_for(service))
        )
        failure: str | None = None
        try:
            return scrub.text(await self._call(args, ctx, scrub))
        except ToolError as exc:
            failure = scrub.text(str(exc))
        except EgressRefused as exc:
            failure = scrub.text(f"ApiCall: {exc}")
        except httpx.TransportError as exc:
            failure = scrub.text(f"ApiCall could not reach the service: {type(exc).__name__}: {exc}")
        except Exception as exc:  # messages of unknown errors may quote a header value: type only
            failure = f"ApiCall failed: {type(exc).__name__}"
        # Raised outside the except blocks so no original exception rides along as __context__.
        raise ToolError(failure)

    async def _call(self, args: JsonObject, ctx: ToolContext, scrub: Scrubber) -> str:
        service = self.services.get(str(args.get("service")))
        if service is None:
            raise ToolError(f"unknown service {args.get('service')!r}; choose from {sorted(self.services)}")
        method = str(args.get("method") or "GET").upper()
        if method not in service.methods:
            raise ToolError(f"method {method} is not allowed for service {service.name!r}")
        path = normalise_path(str(args.get("path", "")))
        if not self._path_allowed(service, path):
            raise ToolError(f"path {path!r} is not allowed for service {service.name!r}")
        body: bytes | None = None
        if args.get("body") is not None:
            body = json.dumps(args["body"], ensure_ascii=False, separators=(",", ":")).encode()
            if len(body) > service.max_body_bytes:
                raise ToolError(
                    f"body is {len(body)} bytes; service {service.name!r} allows at most "
                    f"{service.max_body_bytes}"
                )
        auth = await self._auth_headers(service, method, path, scrub, ctx)
        headers = self._headers(service, dict(args.get("headers") or {}), auth, body is not None)
        # The service's own traces can join the run's, where the operator allows it.
        telemetry.inject_for(headers, service.base_url, self.trace_hosts)
        query = [(str(k), _query_value(v)) for k, v in (args.get("query") or {}).items()]

        meter: JsonObject = {"service": service.name, "method": method, "path": scrub.text(path)}
        # Hooks also learn whose call it is (per-tenant metering); the event needs no such tag.
        who: JsonObject = {"workspace_id": ctx.workspace_id, "run_id": ctx.run_id,
                           "per_run": service.name in self.per_run}  # fmt: skip
        await self._hook(self.on_request, {**meter, **who}, scrub)
        started = time.perf_counter()
        result: JsonObject = {"status": 0}
        bytes_in = 0
        try:
            async with asyncio.timeout(service.timeout_s):
                result, bytes_in = await self._exchange(service, method, path, query, headers, body)
        except (TimeoutError, httpx.TimeoutException):
            raise ToolError(f"ApiCall to {service.name!r} timed out after {service.timeout_s:g}s") from None
        finally:
            latency_ms = round((time.perf_counter() - started) * 1000)
            done = {**meter, "status": result["status"], "latency_ms": latency_ms, "bytes_in": bytes_in}
            logger.debug("ApiCall %s %s %s -> %s", service.name, method, meter["path"], result["status"])
            await self._hook(self.on_response, {**done, **who}, scrub)
            ctx.emit("api_call", done)
        # Scrub the structure first: a secret with characters JSON escapes would slip past a text scrub.
        return json.dumps(scrub.value(result), ensure_ascii=False)

    @staticmethod
    def _path_allowed(service: ApiService, path: str) -> bool:
        patterns = service.allowed_paths
        return patterns is None or any(fullmatch(p, path) for p in patterns)

    async def _auth_headers(
        self, service: ApiService, method: str, path: str, scrub: Scrubber, ctx: ToolContext
    ) -> dict[str, str]:
        auth = service.auth
        if isinstance(auth, CustomAuth):
            return await self._custom_auth(service, auth, method, path, scrub, ctx)
        values: dict[str, str] = {}
        missing = []
        lookup = self._lookup_for(service)
        for ref in credential_refs(auth):
            value = lookup(ref)
            if value:
                values[ref] = value
            else:
                missing.append(ref)
        if missing:
            raise ToolError(
                f"ERR_CREDENTIALS_MISSING: service {service.name!r} needs credential ref(s) {missing}, "
                "which are not available in this process (per-run env values are kept in memory only: "
                "supply them again when resuming)"
            )
        if any(has_ctl(v) for v in values.values()):
            raise ToolError(
                f"ERR_CREDENTIALS_INVALID: a credential of service {service.name!r} has "
                "characters not allowed in an HTTP header"
            )
        if isinstance(auth, BearerAuth):
            return {"Authorization": f"Bearer {values[auth.token_ref]}"}
        if isinstance(auth, HeaderAuth):
            return {auth.name: values[auth.value_ref]}
        if isinstance(auth, BasicAuth):
            return {
                "Authorization": f"Basic {basic_credentials(values[auth.user_ref], values[auth.pass_ref])}"
            }
        return {}

    async def _custom_auth(
        self,
        service: ApiService,
        auth: CustomAuth,
        method: str,
        path: str,
        scrub: Scrubber,
        ctx: ToolContext,
    ) -> dict[str, str]:
        per_run = service.name in self.per_run
        if per_run and auth.id not in self.per_run_custom_ids:
            # Checked at the door too; this holds for runs stored before the policy changed.
            raise ToolError(
                f"ERR_API_AUTH_NOT_ALLOWED: service {service.name!r} is the run's own and may not use "
                "custom auth this engine does not allow for per-run services"
            )
        if self.resolve_auth is None:
            raise ToolError(
                f"ERR_AUTH_RESOLVER: service {service.name!r} uses custom auth but no "
                "resolve_auth is configured"
            )
        try:
            who = AuthContext(
                service.name, method, path, ctx.workspace_id, ctx.run_id, service.base_url, per_run
            )
            raw = await _maybe_await(self.resolve_auth(auth, who))
            headers = {str(k): str(v) for k, v in dict(raw).items()}
        except Exception as exc:  # the message may carry the secret the resolver was handling
            kind = type(exc).__name__
            logger.warning("ApiCall resolve_auth failed for service %s: %s", service.name, kind)
            raise ToolError(
                f"ERR_AUTH_RESOLVER: resolve_auth failed for service {service.name!r} ({kind})"
            ) from None
        for value in headers.values():
            scrub.add(value)
        if any(not HEADER_NAME.match(k) or has_ctl(v) for k, v in headers.items()):
            raise ToolError(
                f"ERR_AUTH_RESOLVER: resolve_auth returned an invalid header for service {service.name!r}"
            )
        return headers

    @staticmethod
    def _headers(
        service: ApiService, model: dict[str, Any], auth: dict[str, str], has_body: bool
    ) -> dict[str, str]:
        reserved = RESERVED_HEADERS | {n.lower() for n in (*auth, *service.headers)}
        headers = dict(service.headers)
        for name, value in model.items():
            if name.lower() in reserved or name.lower().startswith("proxy-"):
                raise ToolError(f"header {name!r} cannot be set by the model (it is set by the engine)")
            if not HEADER_NAME.match(name) or has_ctl(str(value)):
                raise ToolError(f"header {name!r} has an invalid name or value")
            headers[name] = str(value)
        if has_body and not any(n.lower() == "content-type" for n in headers):
            headers["Content-Type"] = "application/json"
        return {**headers, **auth}

    async def _exchange(
        self,
        service: ApiService,
        method: str,
        path: str,
        query: list[tuple[str, str]],
        headers: dict[str, str],
        body: bytes | None,
    ) -> tuple[JsonObject, int]:
        if self.client is not None:
            client = self.client
        elif service.name in self.per_run:
            transport = self.egress.transport(verify=client_ssl_context(False))
            client = httpx.AsyncClient(trust_env=False, transport=transport)
        else:
            client = httpx.AsyncClient(trust_env=False, verify=client_ssl_context(False))
        url: httpx.URL = httpx.URL(service.base_url + path, params=query)
        origin = _origin(service.base_url)
        try:
            for hop in range(MAX_REDIRECTS + 1):
                # The per-request timeout also overrides a shared client's (httpx defaults to 5s).
                request = client.build_request(
                    method, url, headers=headers, content=body, timeout=service.timeout_s
                )
                # A shared client's cookie jar must not carry state between calls or tenants.
                request.headers.pop("cookie", None)
                response = await client.send(request, stream=True, follow_redirects=False)
                try:
                    location = response.headers.get("location")
                    note = None
                    if response.is_redirect and location:
                        target = httpx.URL(urljoin(str(url), location))
                        note = self._redirect_refusal(service, origin, target, hop)
                        if note is None:
                            url = target
                            if response.status_code == 303 or (
                                response.status_code in (301, 302) and method == "POST"
                            ):
                                method, body = ("HEAD" if method == "HEAD" else "GET"), None
                                headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
                            continue
                    return await self._render(service, response, note)
                finally:
                    await response.aclose()
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            if self.client is None:
                await client.aclose()

    def _redirect_refusal(
        self, service: ApiService, origin: tuple[str, str, int | None], target: httpx.URL, hop: int
    ) -> str | None:
        # Userinfo would make httpx swap in its own Basic credentials.
        if _origin(target) != origin or target.userinfo:
            return "redirect to another origin not followed: credentials never leave the service origin"
        if hop >= MAX_REDIRECTS:
            return f"redirect not followed: at most {MAX_REDIRECTS} redirects are followed"
        base_path = urlsplit(service.base_url).path
        raw = target.raw_path.decode("ascii").split("?", 1)[0]
        if not raw.startswith(base_path + "/"):
            return "redirect outside the service base URL not followed"
        try:
            path = normalise_path(raw[len(base_path) :])
        except ToolError as exc:
            return f"redirect not followed: {exc}"
        return (
            None
            if self._path_allowed(service, path)
            else "redirect to a path that is not allowed not followed"
        )

    @staticmethod
    async def _render(
        service: ApiService, response: httpx.Response, note: str | None
    ) -> tuple[JsonObject, int]:
        data, truncated = bytearray(), False
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > service.max_response_bytes:
                del data[service.max_response_bytes :]
                truncated = True
                break
        text = data.decode("utf-8", errors="replace")
        body: Any = text
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if not truncated and text and (content_type == "application/json" or content_type.endswith("+json")):
            try:
                body = loads_untrusted(text)  # a "\ud83d" escape in it would crash the run's checkpoint
            except ValueError:
                body = text
        result: JsonObject = {
            "status": response.status_code,
            "headers": {k: v for k, v in response.headers.items() if k.lower() in _RESPONSE_HEADERS},
            "body": body,
            "truncated": truncated,
        }
        if note:
            result["note"] = note
        return result, len(data)

    async def _hook(self, hook: Hook | None, payload: JsonObject, scrub: Scrubber) -> None:
        if hook is None:
            return
        try:
            await _maybe_await(hook(payload))
        except Exception as exc:  # metering must never break a call
            logger.warning("ApiCall hook failed: %s: %s", type(exc).__name__, scrub.text(str(exc)))


def build_api_call_tool(
    services: Iterable[ApiService],
    *,
    env_lookup: EnvLookup,
    resolve_auth: ResolveAuth | None = None,
    on_request: Hook | None = None,
    on_response: Hook | None = None,
    client: httpx.AsyncClient | None = None,
    per_run_services: Iterable[ApiService] = (),
    run_env_lookup: EnvLookup = no_env,
    per_run_custom_auth_ids: Iterable[str] = (),
    egress: EgressPolicy | None = None,
    trace_hosts: Iterable[str] = (),
) -> Tool:
    """The ``ApiCall`` tool over these services (build it per run: env values may be per run).

    ``services`` are the operator's (refs read ``env_lookup``); ``per_run_services`` are the run
    caller's: they add to the others, refs read ``run_env_lookup`` only, custom auth only with
    an id in ``per_run_custom_auth_ids`` (another id fails the call), and their connections go
    through ``egress``. ApiPolicyError if a per-run name repeats an engine one.
    """
    listed = list(services)
    own = list(per_run_services)
    custom_ids = frozenset(per_run_custom_auth_ids)
    # Shadowing is refused here; a custom id the engine does not allow fails each call instead.
    check_per_run_services(listed, own, {a.id for s in own if isinstance(a := s.auth, CustomAuth)})
    everything = [*listed, *own]
    if not everything:
        raise ValueError("ApiCall needs at least one service")
    by_name = {s.name: s for s in everything}
    call = _ApiCall(
        by_name,
        env_lookup,
        resolve_auth,
        on_request,
        on_response,
        client,
        frozenset(s.name for s in own),
        run_env_lookup,
        custom_ids,
        egress or EgressPolicy(),
        frozenset(trace_hosts),
    )
    return Tool(TOOL_NAME, _description(everything), _input_schema(everything), handler=call)
