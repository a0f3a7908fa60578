"""HTTP plumbing shared by the provider adapters: SSE parsing and error mapping.

Every ModelError that quotes provider text goes through ``_redact`` so the API
key cannot leak through a provider echo, and httpx exceptions are not chained onto our
errors because their ``request`` carries the auth headers.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from engine_service.core._text import clean_text, loads_untrusted
from engine_service.core._types import JsonObject, Message
from engine_service.models._base import (
    ModelError,
    ModelRequest,
    RetryPolicy,
    TextChunk,
    TurnResult,
    stream_with_retries,
)

UNAVAILABLE = "ERR_MODEL_UNAVAILABLE"
AUTH = "ERR_MODEL_AUTH"
REQUEST = "ERR_MODEL_REQUEST"
STREAM = "ERR_MODEL_STREAM"

_MAX_DETAIL = 500
# Besides every 5xx (Anthropic's 529 "overloaded" included): the server timed out or throttled us.
_RETRYABLE_STATUS = frozenset({408, 429})
_AUTH_TYPES = frozenset({"authentication_error", "permission_error"})
_REQUEST_TYPES = frozenset({"invalid_request_error", "not_found_error", "request_too_large"})


# The JSON httpx writes for ``json=``; adapters that encode a body themselves use the same.
encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


@dataclass(slots=True)
class SerialisedHistory:
    """One transcript's messages as JSON fragments, in whatever shape the adapter keeps them."""

    first: Message | None = None
    last: Message | None = None
    count: int = 0  # messages of the transcript serialised so far
    chars: int = 0
    parts: list[str] = field(default_factory=list)
    open_role: str = ""  # Anthropic: the role of the last, still growing message
    roles: list[str] = field(default_factory=list)  # Anthropic: the role of each part
    open_parts: list[str] = field(default_factory=list)


class HistoryCache:
    """Serialised histories by transcript, so a run serialises each message once, not every turn.

    The engine hands an adapter the same append-only list every turn of a run. An entry
    is found by the list's id and trusted only while the list still holds the same
    first and last serialised message objects; anything else starts over. Least
    recently used entries go once there are more than ``max_entries`` or their
    fragments add up to more than ``max_chars``.
    """

    def __init__(self, max_entries: int = 256, max_chars: int = 16_000_000) -> None:
        self._entries: OrderedDict[int, SerialisedHistory] = OrderedDict()
        self._max_entries = max_entries
        self._max_chars = max_chars
        self._chars = 0

    def get(self, messages: Sequence[Message]) -> SerialisedHistory:
        """The entry for ``messages`` (fresh if unknown or stale); add to it, then ``grew``."""
        entry = self._entries.pop(id(messages), None)
        if entry is not None and not (
            entry.count <= len(messages)
            and (entry.count == 0 or (messages[0] is entry.first and messages[entry.count - 1] is entry.last))
        ):
            self._chars -= entry.chars
            entry = None
        entry = entry or SerialisedHistory()
        self._entries[id(messages)] = entry
        return entry

    def grew(self, entry: SerialisedHistory, messages: Sequence[Message], added_chars: int) -> None:
        """Record that ``entry`` now covers all of ``messages``; evict the oldest entries if needed."""
        if messages:
            entry.first, entry.last = messages[0], messages[-1]
        entry.count = len(messages)
        entry.chars += added_chars
        self._chars += added_chars
        while len(self._entries) > 1 and (
            len(self._entries) > self._max_entries or self._chars > self._max_chars
        ):
            _, old = self._entries.popitem(last=False)
            self._chars -= old.chars


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str
    data: str


async def post_sse(
    client: httpx.AsyncClient,
    url: str,
    *,
    headers: Mapping[str, str],
    content: bytes,
    timeout: float,
    provider: str,
    secret: str,
) -> AsyncGenerator[SseEvent, None]:
    """POST ``content`` (a JSON document) and yield the server-sent events of a 2xx response."""
    failure: ModelError | None = None
    headers = {**headers, "content-type": "application/json"}
    try:
        async with client.stream("POST", url, headers=headers, content=content, timeout=timeout) as response:
            if not 200 <= response.status_code < 300:
                raw = await response.aread()
                raise status_error(provider, response.status_code, response.headers, raw, secret)
            # Event streams are UTF-8 by definition; a charset the server names (utf-7, say)
            # could decode to lone surrogates, which no transcript can store.
            response.encoding = "utf-8"
            async for event in _parse_sse(response.aiter_lines()):
                yield event
    except httpx.RequestError as exc:
        failure = transport_error(provider, exc, _display_url(url), secret)
    # Raised outside the except block so the httpx error is not attached as context.
    if failure is not None:
        raise failure


async def _parse_sse(lines: AsyncIterator[str]) -> AsyncIterator[SseEvent]:
    event, data = "", list[str]()
    async for line in lines:
        if not line:
            if data:
                yield SseEvent(event or "message", "\n".join(data))
            event, data = "", list[str]()
            continue
        if line.startswith(":"):
            continue  # a comment, used by some servers as a keep-alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    # Lenient about a missing final blank line; a cut-off payload fails JSON decoding.
    if data:
        yield SseEvent(event or "message", "\n".join(data))


def decode_event(event: SseEvent, provider: str, secret: str) -> JsonObject:
    """One event's JSON; a lone surrogate escape in it (half an emoji) arrives as U+FFFD."""
    try:
        doc = loads_untrusted(event.data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise ModelError(
            STREAM,
            _redact(f"{provider} sent a malformed stream event: {_clip(clean_text(event.data))}", secret),
        )
    return doc


def truncated(provider: str) -> ModelError:
    # Most likely a dropped connection, so worth another try if nothing was yielded.
    return ModelError(STREAM, f"the {provider} stream ended before the turn was complete", retryable=True)


def bad_role(role: str, provider: str) -> ModelError:
    return ModelError(REQUEST, f"cannot send a message with role {role!r} to {provider}")


def parse_arguments(raw: str) -> JsonObject:
    """Tool arguments as an object; bad JSON is kept raw for the engine to report."""
    if not raw.strip():
        return {}
    try:
        value = loads_untrusted(raw)
    except ValueError:
        return {"_raw": clean_text(raw)}
    return value if isinstance(value, dict) else {"_raw": clean_text(raw)}


def status_error(
    provider: str, status: int, headers: Mapping[str, str], raw: bytes, secret: str
) -> ModelError:
    kind, message = _provider_detail(raw)
    label = f"{provider} returned HTTP {status}" + (f" ({kind})" if kind else "")
    if status in (401, 403):
        # Auth messages echo a partly masked key ("sk-ab***yz"), so their text is dropped.
        return ModelError(
            AUTH, _redact(f"{label}: check the API key and its permissions", secret), status=status
        )
    if status in _RETRYABLE_STATUS or status >= 500:
        error = ModelError(UNAVAILABLE, _redact(f"{label}: {message}", secret), retryable=True, status=status)
        error.retry_after = retry_after(headers)
        return error
    return ModelError(REQUEST, _redact(f"{label}: {message}", secret), status=status)


def event_error(provider: str, error: Any, secret: str) -> ModelError:
    """An error reported inside a 200 stream (Anthropic ``error`` event, OpenAI ``error`` chunk)."""
    fields: JsonObject = error if isinstance(error, dict) else {"message": str(error)}
    kind = str(fields.get("type") or fields.get("code") or "unknown")
    # vLLM and OpenRouter put an HTTP-like status in ``code``.
    status = fields["code"] if isinstance(fields.get("code"), int) else 0
    label = f"{provider} stream error ({kind})"
    if kind in _AUTH_TYPES or status in (401, 403):
        return ModelError(AUTH, f"{label}: check the API key and its permissions", status=status)
    text = _redact(f"{label}: {_clip(str(fields.get('message', '')))}", secret)
    if kind in _REQUEST_TYPES or (400 <= status < 500 and status not in _RETRYABLE_STATUS):
        return ModelError(REQUEST, text, status=status)
    # Overloaded, rate limited, api_error and anything unknown: the provider's side failed.
    return ModelError(UNAVAILABLE, text, retryable=True, status=status)


def transport_error(provider: str, exc: httpx.RequestError, where: str, secret: str) -> ModelError:
    what = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return ModelError(
        UNAVAILABLE, _redact(f"{provider} request to {where} {what} ({detail})", secret), retryable=True
    )


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (OpenAI) or ``Retry-After`` (seconds or a date)."""
    try:
        if "retry-after-ms" in headers:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (ValueError, TypeError, OverflowError):
        return None


def _provider_detail(raw: bytes) -> tuple[str, str]:
    """(error type, message) from OpenAI/Anthropic-style error bodies, else the raw text."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        doc = loads_untrusted(text)
    except ValueError:
        return "", _clip(text) or "(empty body)"
    error = doc.get("error", doc) if isinstance(doc, dict) else doc
    if isinstance(error, dict) and "message" in error:
        return str(error.get("type") or error.get("code") or ""), _clip(str(error["message"]))
    if isinstance(error, str):
        return "", _clip(error)
    return "", _clip(text)


def _display_url(url: str) -> str:
    # Without query or userinfo: a proxy URL may carry a credential there.
    parsed = httpx.URL(url)
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.host}{port}{parsed.path}"


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + "…"


def _redact(text: str, secret: str) -> str:
    return text.replace(secret, "[redacted]") if secret else text


# Frozen, so sharing one default instance between adapters is safe.
DEFAULT_RETRY = RetryPolicy()


class HttpModel:
    """What the HTTP adapters share: credentials, the client they own, retries and close.

    Subclasses set ``provider_name``, ``default_base_url`` and ``url_path`` (the endpoint,
    appended to the base URL), and implement ``_headers``, ``_content`` and ``_once`` (one
    streamed attempt, reading the events of ``_post``).
    """

    provider_name = ""
    default_base_url = ""
    url_path = ""

    def __init__(
        self,
        api_key: str,
        model: str,
        base_url: str | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        timeout: float = 120.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._api_key = api_key
        self._model = model
        base = self.default_base_url if base_url is None else base_url
        self._url = base.rstrip("/") + self.url_path
        self._retry = retry
        self._timeout = timeout
        self._client = client
        self._owns_client = client is None
        self._history = HistoryCache()

    @property
    def provider(self) -> str:
        return self.provider_name

    @property
    def name(self) -> str:
        return self._model

    def stream(self, request: ModelRequest) -> AsyncIterator[TextChunk | TurnResult]:
        return stream_with_retries(lambda: self._once(request), self._retry)

    def _once(self, request: ModelRequest) -> AsyncIterator[TextChunk | TurnResult]:
        raise NotImplementedError

    def _headers(self) -> dict[str, str]:
        """The request headers, credentials included (content-type is added by ``post_sse``)."""
        raise NotImplementedError

    def _content(self, request: ModelRequest) -> bytes:
        """The request body, JSON encoded."""
        raise NotImplementedError

    def _post(self, request: ModelRequest) -> AsyncGenerator[SseEvent, None]:
        """Send ``request`` and stream the response's events (nothing is sent until iterated)."""
        content = self._content(request)
        return post_sse(
            self._http(),
            self._url,
            headers=self._headers(),
            content=content,
            timeout=self._timeout,
            provider=self.provider,
            secret=self._api_key,
        )

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        return self._client

    async def aclose(self) -> None:
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None
