"""WebFetch: fetch a URL over HTTP(S) with size, time and target limits.

Every connection goes through the engine's egress policy (``net/_egress.py``): the
host name is resolved once, every address is checked, and the socket connects to
the checked address, so loopback, private, link-local, metadata and other
non-public targets are refused unless the operator allows them (the engine's
``egress_allow_*`` settings plus WebFetch's own ``allow_hosts`` /
``allow_private``). Redirects are followed by hand so each hop's scheme is
checked too, and each hop's connection passes the same policy.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpx
from pydantic import BaseModel, Field

from engine_service.core import _telemetry as telemetry
from engine_service.core._text import clean_text
from engine_service.net._egress import EgressPolicy, EgressRefused
from engine_service.net._tls import client_ssl_context
from engine_service.tools._registry import Tool, ToolContext, ToolError, tool_from_callable

_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/xhtml+xml", "application/ld+json")


@dataclass(frozen=True)
class WebFetchPolicy:
    """What WebFetch may reach and how much it may read."""

    max_bytes: int = 2 * 1024 * 1024
    timeout_s: float = 20.0
    max_redirects: int = 5
    # WebFetch's additions to ``egress``: every non-public address but metadata, and host
    # names or IP literals allowed whatever they resolve to.
    allow_private: bool = False
    allow_hosts: frozenset[str] = field(default_factory=frozenset)
    egress: EgressPolicy = field(default_factory=EgressPolicy)
    # Hosts that get the run's trace context (``traceparent``); see `telemetry.inject_for`.
    trace_hosts: frozenset[str] = field(default_factory=frozenset)

    def effective_egress(self) -> EgressPolicy:
        return self.egress.widened(allow_private=self.allow_private, allow_hosts=self.allow_hosts)


class WebFetchArgs(BaseModel):
    url: str = Field(min_length=1, max_length=8192, description="The http(s) URL to fetch.")


def _check_target(url: str, egress: EgressPolicy) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ToolError(f"only http and https URLs can be fetched, not {parts.scheme or 'no scheme'!r}")
    host = parts.hostname
    if not host:
        raise ToolError("the URL has no host")
    if parts.username or parts.password:
        raise ToolError("URLs with credentials are not fetched")
    # Literals are refused before any connection; names are checked by the transport.
    refusal = egress.url_refusal(url)
    if refusal:
        raise ToolError(refusal)


def web_fetch_tool(policy: WebFetchPolicy, client: httpx.AsyncClient | None = None) -> Tool:
    """The WebFetch tool bound to ``policy`` (and an optional shared client, for tests)."""
    egress = policy.effective_egress()

    async def web_fetch(args: WebFetchArgs, ctx: ToolContext) -> str:
        """Fetch a web page or API response (text formats only) and return its status, type and body."""
        owned = client is None
        http = client or httpx.AsyncClient(
            timeout=policy.timeout_s,
            follow_redirects=False,
            transport=egress.transport(verify=client_ssl_context(True)),
        )
        try:
            return await _fetch(http, args.url, policy, egress)
        except EgressRefused as exc:
            raise ToolError(str(exc)) from None
        except httpx.InvalidURL as exc:  # e.g. a host name IDNA cannot encode
            raise ToolError(f"invalid URL: {exc}") from None
        except httpx.TimeoutException:
            raise ToolError(f"fetching {args.url} timed out after {policy.timeout_s:g}s") from None
        except httpx.HTTPError as exc:
            raise ToolError(f"fetching {args.url} failed: {type(exc).__name__}") from None
        finally:
            if owned:
                await http.aclose()

    return tool_from_callable(web_fetch, name="WebFetch", idempotent=True)


def _trace_headers(url: str, hosts: frozenset[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    telemetry.inject_for(headers, url, hosts)
    return headers


async def _fetch(http: httpx.AsyncClient, url: str, policy: WebFetchPolicy, egress: EgressPolicy) -> str:
    for _ in range(policy.max_redirects + 1):
        _check_target(url, egress)
        async with (
            asyncio.timeout(policy.timeout_s),
            http.stream(
                "GET", url, timeout=policy.timeout_s, headers=_trace_headers(url, policy.trace_hosts)
            ) as response,
        ):
            if response.is_redirect and "location" in response.headers:
                url = urljoin(url, response.headers["location"])
                continue
            kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind and not kind.startswith(_TEXT_TYPES):
                return f"status: {response.status_code}\ncontent-type: {kind}\n[binary content not shown]"
            body = bytearray()
            truncated = False
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > policy.max_bytes:
                    del body[policy.max_bytes :]
                    truncated = True
                    break
            # The page names its charset, and some (utf-7, unicode_escape) decode to lone
            # surrogates, which no transcript can store.
            text = clean_text(body.decode(response.encoding or "utf-8", errors="replace"))
            note = f"\n[truncated at {policy.max_bytes} bytes]" if truncated else ""
            head = f"status: {response.status_code}\ncontent-type: {kind or 'unknown'}\nurl: {url}"
            return f"{head}\n\n{text}{note}"
    raise ToolError(f"more than {policy.max_redirects} redirects")
