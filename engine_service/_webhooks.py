"""Webhooks (SPEC E8): signed POSTs of a run's status when it pauses or ends.

Delivery never blocks the run: each notification is a background task that
retries with exponential backoff and jitter, and every attempt is appended to
the run's persisted delivery log. The secret is resolved by reference and
only ever used to sign.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine_service._storage import Storage
from engine_service._types import JsonObject

log = logging.getLogger("machina.webhooks")

EVENTS = ("paused", "done", "failed", "cancelled")
DEFAULT_EVENTS = ("paused", "done", "failed")
DELIVERY_LOG = "webhook-deliveries"
_RESERVED = ("x-machina-", "content-type", "content-length", "host")
# RFC 9110 token characters.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class WebhookConfig(BaseModel):
    """Where to POST a run's status, and which transitions to report."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(pattern=r"^https?://")
    # Names a secret in the engine config's webhook_secrets (or the process environment).
    secret_ref: str = ""
    events: list[str] = Field(default_factory=lambda: list(DEFAULT_EVENTS))
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(EVENTS))
        if unknown:
            raise ValueError(f"unknown webhook events {unknown}; use {list(EVENTS)}")
        return value or list(DEFAULT_EVENTS)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, header in value.items():
            if name.lower().startswith(_RESERVED):
                raise ValueError(f"header {name!r} is set by the engine")
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"header name {name!r} is not a valid HTTP header name")
            if not header.isascii() or any(ord(c) < 32 or ord(c) == 127 for c in header):
                raise ValueError(f"the value of header {name!r} must be printable ASCII")
        return value


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256 over "{timestamp}.{body}">``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


class WebhookSender:
    """Sends webhooks in the background; owned by an engine (or a runner's engine)."""

    def __init__(
        self,
        storage: Storage,
        resolve_secret: Callable[[str], str | None],
        *,
        max_attempts: int = 6,
        base_delay_s: float = 0.5,
        max_delay_s: float = 30.0,
        timeout_s: float = 10.0,
    ) -> None:
        self._storage = storage
        self._resolve_secret = resolve_secret
        self._max_attempts = max_attempts
        self._base = base_delay_s
        self._max = max_delay_s
        self._timeout = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()
        self._log_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._http: httpx.AsyncClient | None = None

    def notify(self, ws: str, run_id: str, webhook: Mapping[str, Any], event: str, run: JsonObject) -> None:
        """Schedule a delivery if ``webhook`` subscribes to ``event``; returns at once."""
        config = WebhookConfig.model_validate(webhook)
        if event not in config.events:
            return
        task = asyncio.create_task(self._deliver(ws, run_id, config, event, run), name=f"webhook:{run_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(
        self, ws: str, run_id: str, config: WebhookConfig, event: str, run: JsonObject
    ) -> None:
        body = json.dumps(run, separators=(",", ":"), ensure_ascii=False).encode()
        secret = self._resolve_secret(config.secret_ref) if config.secret_ref else None
        if config.secret_ref and secret is None:
            log.warning("webhook secret %r is not configured; sending unsigned", config.secret_ref,
                        extra={"run_id": run_id})  # fmt: skip
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
        for attempt in range(1, self._max_attempts + 1):
            delivery = str(uuid.uuid4())
            timestamp = str(int(time.time() * 1000))
            headers = {
                **config.headers,
                "Content-Type": "application/json",
                "X-Machina-Event": f"status.{event}",
                "X-Machina-Run-Id": run_id,
                "X-Machina-Delivery": delivery,
                "X-Machina-Timestamp": timestamp,
            }
            if secret:
                headers["X-Machina-Signature"] = sign(secret, timestamp, body)
            started = time.perf_counter()
            status, error = 0, ""
            try:
                response = await self._http.post(config.url, content=body, headers=headers)
                status = response.status_code
            except httpx.HTTPError as exc:
                error = type(exc).__name__
            ok = 200 <= status < 300
            await self._record(ws, run_id, {
                "delivery": delivery, "event": event, "attempt": attempt, "status": status, "error": error,
                "ok": ok, "at": time.time(), "latency_ms": int((time.perf_counter() - started) * 1000),
            })  # fmt: skip
            if ok:
                return
            if status and 400 <= status < 500 and status not in (408, 429):
                log.warning("webhook for %s refused with HTTP %d; not retrying", run_id, status)
                return
            if attempt < self._max_attempts:
                cap = min(self._max, self._base * 2 ** (attempt - 1))
                await asyncio.sleep(random.uniform(cap / 2, cap))
        log.warning(
            "webhook for %s gave up after %d attempts", run_id, self._max_attempts, extra={"run_id": run_id}
        )

    async def _record(self, ws: str, run_id: str, entry: JsonObject) -> None:
        """Append to the run's persisted delivery log (the last 200 attempts)."""
        lock = self._log_locks.setdefault((ws, run_id), asyncio.Lock())
        async with lock:
            try:
                raw = await self._storage.get_blob(ws, run_id, DELIVERY_LOG)
                entries: list[JsonObject] = json.loads(raw) if raw else []
                entries = [*entries, entry][-200:]
                await self._storage.put_blob(ws, run_id, DELIVERY_LOG, json.dumps(entries).encode())
            except Exception:  # the log is best effort; the delivery itself goes on
                log.warning("could not record a webhook delivery for %s", run_id, exc_info=True)

    async def deliveries(self, ws: str, run_id: str) -> list[JsonObject]:
        raw = await self._storage.get_blob(ws, run_id, DELIVERY_LOG)
        result: list[JsonObject] = json.loads(raw) if raw else []
        return result

    async def close(self, grace: float = 2.0) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        if self._http is not None:
            await self._http.aclose()
