"""Webhooks: signed POSTs of a run's status when it pauses or ends.

Delivery never blocks the run: each notification is a background task that
retries with exponential backoff and jitter, and every attempt is appended to
the run's persisted delivery log. The secret is resolved by reference and
only ever used to sign.

Notifications survive a crash (the outbox). Before its first attempt a
notification is written to the run's storage as the blob
``webhook-notification-{id}`` (the event, the run's body and the webhook config
with its ``secret_ref``, never the secret) and listed in one of
``OUTBOX_SHARDS`` shared index documents ``webhook-outbox-{0..f}`` (chosen by
hashing the run), so a starting engine finds what is pending by reading 16
small documents rather than every run. Delivery, a refusal (a 4xx other than
408/429) or giving up after ``max_attempts`` (counted across restarts, from the
delivery log) overwrites the blob with a small tombstone and drops the index
entry; ``resume_pending_all``, which the engine runs at startup, retries the
rest.

Delivery is at least once: a crash between a receiver's 2xx and the tombstone,
or an engine that starts while another is still retrying a notification (both
then retry it), can POST a notification twice. Each attempt has a fresh
``X-Machina-Delivery``; ``X-Machina-Notification-Id`` is the same for every
attempt of one notification in every process, so receivers dedupe on it.

With a control plane (PostgreSQL) every next attempt is a timer row instead of a
sleep in the process that made the last one: before its first attempt a
notification gets a guard timer (due once that attempt would have timed out),
and each failed attempt sets the timer to the next backoff. Whichever replica
claims the due row makes the attempt, so a notification whose replica dies is
retried by another, once per attempt; settling it deletes the row. At startup a
process makes sure every notification the outbox lists has a row rather than
retrying it itself.

The storage has no compare-and-set for shared documents, so two processes
editing one index shard at the same moment can lose one's edit. A lost removal
only leaves a stale entry (the next startup scan drops it); a lost addition is
put back before every retry of the notification, so it matters only if the
process also dies before its next retry.
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
from collections.abc import Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine_service.core import _metrics as metrics
from engine_service.core import _telemetry as telemetry
from engine_service.core._limits import MAX_DEPTH, too_deep
from engine_service.core._types import JsonObject
from engine_service.net._egress import EgressPolicy, EgressRefused
from engine_service.net._tls import client_ssl_context
from engine_service.storage._protocol import Storage

log = logging.getLogger("machina.webhooks")

# The timer kind of a notification's next attempt (the control plane's WEBHOOK_TIMER prefix).
TIMER_PREFIX = "webhook:"
# A guard timer fires this long after a first attempt's timeout (its process died meanwhile).
GUARD_S = 5.0


class TimerRows(Protocol):
    """Durable timers (the control plane's): rows whichever replica claims fires."""

    def set_timer(self, workspace: str, run_id: str, kind: str, due_at: float) -> None: ...

    def ensure_timer(self, workspace: str, run_id: str, kind: str, due_at: float) -> None: ...

    def cancel_timer(self, workspace: str, run_id: str, kind: str) -> None: ...


EVENTS = ("paused", "done", "failed", "cancelled")
DEFAULT_EVENTS = ("paused", "done", "failed")
DELIVERY_LOG = "webhook-deliveries"
OUTBOX_SHARDS = 16
PENDING = "pending"
_RESERVED = ("x-machina-", "content-type", "content-length", "host")
# RFC 9110 token characters.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class WebhookConfig(BaseModel):
    """Where to POST a run's status, and which transitions to report."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(pattern=r"^https?://")
    # Names a secret in the engine config's webhook_secrets or workspace_webhook_secrets (only).
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


OMITTED_DATA = f"[omitted: nested deeper than {MAX_DEPTH} levels]"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256 over "{timestamp}.{body}">``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def outbox_shard(ws: str, run_id: str) -> str:
    """The shared index document that lists the run's pending notifications."""
    digest = hashlib.sha256(f"{ws}/{run_id}".encode()).digest()
    return _shard_name(digest[0] % OUTBOX_SHARDS)


def _shard_name(index: int) -> str:
    return f"webhook-outbox-{index:x}"


def notification_blob(notification_id: str) -> str:
    """The name of the run blob that holds one notification (pending, then its tombstone)."""
    return f"webhook-notification-{notification_id}"


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class _Notification:
    """One status change to report; ``id`` is stable across attempts, restarts and processes."""

    id: str
    ws: str
    run_id: str
    event: str
    config: WebhookConfig
    run: JsonObject
    created_at: float

    def to_json(self) -> JsonObject:
        # The config carries secret_ref only: the secret itself is resolved when signing.
        return {
            "id": self.id, "ws": self.ws, "run_id": self.run_id, "event": self.event,
            "webhook": self.config.model_dump(), "run": self.run, "created_at": self.created_at,
            "state": PENDING,
        }  # fmt: skip

    @classmethod
    def from_json(cls, doc: JsonObject) -> _Notification:
        return cls(
            id=str(doc["id"]),
            ws=str(doc["ws"]),
            run_id=str(doc["run_id"]),
            event=str(doc["event"]),
            config=WebhookConfig.model_validate(doc["webhook"]),
            run=dict(doc["run"]),
            created_at=float(doc["created_at"]),
        )


class WebhookSender:
    """Sends webhooks in the background; owned by an engine (or a runner's engine)."""

    def __init__(
        self,
        storage: Storage,
        resolve_secret: Callable[[str, str], str | None],
        *,
        max_attempts: int = 6,
        base_delay_s: float = 0.5,
        max_delay_s: float = 30.0,
        timeout_s: float = 10.0,
        egress: EgressPolicy | None = None,
        timers: TimerRows | None = None,
        trace_hosts: Collection[str] = (),
    ) -> None:
        self._storage = storage
        # Hosts the operator lets see the run's trace id (a webhook URL is the tenant's choice).
        self._trace_hosts = tuple(trace_hosts)
        # With durable timers each next attempt is a row any replica fires; else a sleep here.
        self._timers = timers
        # Webhook URLs come from tenants: every connection is checked by the egress policy.
        self._egress = egress or EgressPolicy()
        self._resolve_secret = resolve_secret
        self._max_attempts = max_attempts
        self._base = base_delay_s
        self._max = max_delay_s
        self._timeout = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()
        # Striped: serialises appends to one run's delivery log without a lock per run ever seen.
        self._log_locks = [asyncio.Lock() for _ in range(64)]
        self._index_locks: dict[str, asyncio.Lock] = {}
        self._inflight: set[str] = set()  # notification ids this process is delivering
        self._http: httpx.AsyncClient | None = None

    def notify(self, ws: str, run_id: str, webhook: Mapping[str, Any], event: str, run: JsonObject) -> None:
        """Schedule a delivery if ``webhook`` subscribes to ``event``; returns at once."""
        config = WebhookConfig.model_validate(webhook)
        if event not in config.events:
            return
        if too_deep(run):
            # Receivers parse this body too; the run's answer is refused deeper than this, so only
            # a value that got in some other way is left out, never the notification.
            run = {**run, "data": OMITTED_DATA}
        notification = _Notification(uuid.uuid4().hex, ws, run_id, event, config, run, time.time())
        self._spawn(notification.id, notification.run_id, self._send_new(notification))

    def retry_due(self, ws: str, run_id: str, notification_id: str) -> None:
        """A notification's timer came due and this process claimed it: make its next attempt
        (in the background). The attempt sets the timer again or, settling, deletes it; if this
        process dies first, the claim lapses and another process makes it."""
        if notification_id in self._inflight:
            return  # an attempt is under way here: it sets the next timer itself
        self._spawn(notification_id, run_id, self._retry(ws, run_id, notification_id))

    async def resume_pending_all(self) -> int:
        """Retry every notification the outbox lists as pending; returns how many were scheduled.

        The engine runs this once at startup, in the background. It reads the
        ``OUTBOX_SHARDS`` index documents and one blob per listed notification
        (plus the run's delivery log, to continue its attempt count), drops
        entries that are already settled, and never raises.
        """
        resumed = 0
        for index in range(OUTBOX_SHARDS):
            try:
                resumed += await self._resume_shard(_shard_name(index))
            except Exception:
                log.warning("could not read the webhook outbox %s", _shard_name(index), exc_info=True)
        if resumed:
            log.info("resuming %d pending webhook notifications", resumed)
        return resumed

    async def deliveries(self, ws: str, run_id: str) -> list[JsonObject]:
        raw = await self._storage.get_blob(ws, run_id, DELIVERY_LOG)
        result: list[JsonObject] = json.loads(raw) if raw else []
        return result

    async def close(self, grace: float = 2.0) -> None:
        # A delivery cancelled here stays pending in the outbox: the next start resumes it.
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        if self._http is not None:
            await self._http.aclose()

    # -- delivery ---------------------------------------------------------------------------

    def _spawn(self, notification_id: str, run_id: str, coro: Coroutine[Any, Any, None]) -> None:
        self._inflight.add(notification_id)
        task = asyncio.create_task(coro, name=f"webhook:{run_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _t: self._inflight.discard(notification_id))

    async def _send_new(self, n: _Notification) -> None:
        await self._persist(n)
        if self._timers is not None:
            # Should this process die during the first attempt, another makes the next.
            self._timers.set_timer(n.ws, n.run_id, TIMER_PREFIX + n.id, time.time() + self._timeout + GUARD_S)
        await self._deliver(n, first_attempt=1)

    async def _retry(self, ws: str, run_id: str, notification_id: str) -> None:
        assert self._timers is not None
        kind = TIMER_PREFIX + notification_id
        try:
            raw = await self._storage.get_blob(ws, run_id, notification_blob(notification_id))
            stored: JsonObject | None = json.loads(raw) if raw else None
            if stored is None or stored.get("state") != PENDING:
                self._timers.cancel_timer(ws, run_id, kind)  # settled (or deleted with its run)
                return
            n = _Notification.from_json(stored)
            if n.config.secret_ref and self._resolve_secret(n.ws, n.config.secret_ref) is None:
                # Sending unsigned could get it refused for good: the claim lapses, and a process
                # that can sign it makes the attempt.
                log.warning("a pending webhook for %s names secret %r, which this process lacks; leaving it",
                            run_id, n.config.secret_ref, extra={"run_id": run_id})  # fmt: skip
                return
            attempts, gave_up = await self._attempts_made(n)
            if gave_up or attempts >= self._max_attempts:
                if gave_up:
                    await self._settle(n, "gave_up", attempts)
                else:
                    await self._give_up(n, attempts)
                return
            await self._deliver(n, first_attempt=attempts + 1)
        except Exception:  # storage away: the claim lapses and the attempt is made then
            log.warning("could not retry webhook %s of %s", notification_id, run_id, exc_info=True)

    async def _deliver(self, n: _Notification, first_attempt: int) -> None:
        config = n.config
        body = _dumps(n.run)
        secret = self._resolve_secret(n.ws, config.secret_ref) if config.secret_ref else None
        if config.secret_ref and secret is None:
            log.warning("webhook secret %r is not configured; sending unsigned", config.secret_ref,
                        extra={"run_id": n.run_id})  # fmt: skip
        if self._http is None:
            transport = self._egress.transport(verify=client_ssl_context(True))
            self._http = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False, transport=transport)
        attempt = first_attempt - 1
        for attempt in range(first_attempt, self._max_attempts + 1):
            if attempt > first_attempt and not await self._still_pending(n):
                return  # another process delivered it (or gave up) meanwhile
            delivery = str(uuid.uuid4())
            timestamp = str(int(time.time() * 1000))
            headers = {
                **config.headers,
                "Content-Type": "application/json",
                "X-Machina-Event": f"status.{n.event}",
                "X-Machina-Run-Id": n.run_id,
                "X-Machina-Notification-Id": n.id,
                "X-Machina-Delivery": delivery,
                "X-Machina-Timestamp": timestamp,
            }
            if secret:
                headers["X-Machina-Signature"] = sign(secret, timestamp, body)
            telemetry.inject_for(headers, config.url, self._trace_hosts)
            started = time.perf_counter()
            status, error, refused = 0, "", False
            try:
                response = await self._http.post(config.url, content=body, headers=headers)
                status = response.status_code
            except EgressRefused as exc:
                error, refused = f"{type(exc).__name__}: {exc}", True  # host and reason only
            except httpx.HTTPError as exc:
                error = type(exc).__name__
            ok = 200 <= status < 300
            await self._record(n.ws, n.run_id, {
                "notification": n.id, "delivery": delivery, "event": n.event, "attempt": attempt,
                "status": status, "error": error, "ok": ok, "at": time.time(),
                "latency_ms": int((time.perf_counter() - started) * 1000),
            })  # fmt: skip
            metrics.WEBHOOK_DELIVERIES.inc("delivered" if ok else "failed")
            if ok:
                await self._settle(n, "delivered", attempt)
                return
            if refused:
                log.warning("webhook for %s not sent: %s", n.run_id, error, extra={"run_id": n.run_id})
                await self._settle(n, "refused", attempt)
                return
            if status and 400 <= status < 500 and status not in (408, 429):
                log.warning("webhook for %s refused with HTTP %d; not retrying", n.run_id, status)
                await self._settle(n, "refused", attempt)
                return
            if attempt < self._max_attempts:
                cap = min(self._max, self._base * 2 ** (attempt - 1))
                delay = random.uniform(cap / 2, cap)
                if self._timers is not None:
                    # The next attempt is a row: whichever replica claims it once due makes it.
                    self._timers.set_timer(n.ws, n.run_id, TIMER_PREFIX + n.id, time.time() + delay)
                    return
                await asyncio.sleep(delay)
        await self._give_up(n, attempt)

    async def _give_up(self, n: _Notification, attempts: int) -> None:
        log.warning(
            "webhook for %s gave up after %d attempts", n.run_id, attempts, extra={"run_id": n.run_id}
        )
        await self._record(n.ws, n.run_id, {
            "notification": n.id, "delivery": "", "event": n.event, "attempt": attempts, "status": 0,
            "error": f"gave up after {attempts} attempts", "ok": False, "gave_up": True, "at": time.time(),
            "latency_ms": 0,
        })  # fmt: skip
        metrics.WEBHOOK_DELIVERIES.inc("gave_up")
        await self._settle(n, "gave_up", attempts)

    async def _record(self, ws: str, run_id: str, entry: JsonObject) -> None:
        """Append to the run's persisted delivery log (the last 200 attempts)."""
        lock = self._log_locks[hash((ws, run_id)) % len(self._log_locks)]
        async with lock:
            try:
                raw = await self._storage.get_blob(ws, run_id, DELIVERY_LOG)
                entries: list[JsonObject] = json.loads(raw) if raw else []
                entries = [*entries, entry][-200:]
                await self._storage.put_blob(ws, run_id, DELIVERY_LOG, json.dumps(entries).encode())
            except Exception:  # the log is best effort; the delivery itself goes on
                log.warning("could not record a webhook delivery for %s", run_id, exc_info=True)

    # -- the outbox -------------------------------------------------------------------------

    async def _persist(self, n: _Notification) -> None:
        """Record ``n`` as pending (blob first, then the index entry that points at it)."""
        try:
            await self._storage.put_blob(n.ws, n.run_id, notification_blob(n.id), _dumps(n.to_json()))
            await self._index(outbox_shard(n.ws, n.run_id), add={n.id: {"ws": n.ws, "run_id": n.run_id}})
        except Exception:  # delivery goes on from memory; the next retry tries again
            log.warning("could not record a pending webhook for %s; a crash now would lose it", n.run_id,
                        exc_info=True, extra={"run_id": n.run_id})  # fmt: skip

    async def _still_pending(self, n: _Notification) -> bool:
        """False once any process settled ``n``; else make sure it is (still) in the outbox."""
        try:
            raw = await self._storage.get_blob(n.ws, n.run_id, notification_blob(n.id))
        except Exception:
            log.warning("could not read the webhook outbox of %s", n.run_id, exc_info=True)
            return True
        if raw is None:
            await self._persist(n)  # recording it failed before: try again
            return True
        if json.loads(raw).get("state") != PENDING:
            return False
        # Never rewrite a pending blob (it could land on a tombstone written meanwhile); only put
        # back its index entry, in case another process's edit of the shard overwrote ours.
        try:
            await self._index(outbox_shard(n.ws, n.run_id), add={n.id: {"ws": n.ws, "run_id": n.run_id}})
        except Exception:
            log.warning("could not update the webhook outbox for %s", n.run_id, exc_info=True)
        return True

    async def _settle(self, n: _Notification, outcome: str, attempts: int) -> None:
        """Mark ``n`` done (``delivered``, ``refused`` or ``gave_up``) and drop it from the index."""
        tombstone = {"id": n.id, "event": n.event, "state": outcome, "attempts": attempts,
                     "settled_at": time.time()}  # fmt: skip
        if self._timers is not None:
            self._timers.cancel_timer(n.ws, n.run_id, TIMER_PREFIX + n.id)
        try:
            await self._storage.put_blob(n.ws, n.run_id, notification_blob(n.id), _dumps(tombstone))
            await self._index(outbox_shard(n.ws, n.run_id), remove=[n.id])
        except Exception:
            log.warning("could not settle a webhook for %s; a restart may send it again", n.run_id,
                        exc_info=True, extra={"run_id": n.run_id})  # fmt: skip

    async def _index(
        self, shard: str, *, add: Mapping[str, JsonObject] | None = None, remove: list[str] | None = None
    ) -> None:
        """Edit one index shard (read, change, write; serialised in this process)."""
        lock = self._index_locks.setdefault(shard, asyncio.Lock())
        async with lock:
            doc = await self._storage.get_shared(shard)
            pending: dict[str, JsonObject] = dict((doc or {}).get("pending") or {})
            changed = False
            for nid, where in (add or {}).items():
                if nid not in pending:
                    pending[nid] = dict(where)
                    changed = True
            for nid in remove or ():
                changed = pending.pop(nid, None) is not None or changed
            if changed:
                await self._storage.put_shared(shard, {"pending": pending})

    async def _resume_shard(self, shard: str) -> int:
        doc = await self._storage.get_shared(shard)
        pending: dict[str, JsonObject] = (doc or {}).get("pending") or {}
        settled: list[str] = []
        resumed = 0
        for nid, where in pending.items():
            if nid in self._inflight:
                continue
            try:
                raw = await self._storage.get_blob(where["ws"], where["run_id"], notification_blob(nid))
                stored: JsonObject | None = json.loads(raw) if raw else None
                if stored is None or stored.get("state") != PENDING:
                    settled.append(nid)
                    continue
                n = _Notification.from_json(stored)
                if self._timers is not None:
                    # Its next attempt is a timer row; a row that exists (a retry scheduled by a
                    # live process, or the guard of an attempt under way) is left as it is.
                    self._timers.ensure_timer(n.ws, n.run_id, TIMER_PREFIX + n.id, time.time())
                    resumed += 1
                    continue
                if n.config.secret_ref and self._resolve_secret(n.ws, n.config.secret_ref) is None:
                    # Sending unsigned could get it refused for good: leave it to a process that can sign.
                    log.warning(
                        "a pending webhook for %s names secret %r, which this process lacks; leaving it",
                        n.run_id, n.config.secret_ref, extra={"run_id": n.run_id},
                    )  # fmt: skip
                    continue
                attempts, gave_up = await self._attempts_made(n)
                if gave_up or attempts >= self._max_attempts:
                    # It died between its last attempt and settling.
                    if gave_up:
                        await self._settle(n, "gave_up", attempts)
                    else:
                        await self._give_up(n, attempts)
                    continue
                self._spawn(n.id, n.run_id, self._deliver(n, first_attempt=attempts + 1))
                resumed += 1
            except Exception:
                log.warning("could not resume pending webhook %s", nid, exc_info=True)
        if settled:
            await self._index(shard, remove=settled)
        return resumed

    async def _attempts_made(self, n: _Notification) -> tuple[int, bool]:
        """(the last attempt number the delivery log shows for ``n``, whether it gave up)."""
        mine = [e for e in await self.deliveries(n.ws, n.run_id) if e.get("notification") == n.id]
        return max((int(e.get("attempt", 0)) for e in mine), default=0), any(e.get("gave_up") for e in mine)
