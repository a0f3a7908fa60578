"""The webhook outbox: a notification is persisted as pending until it is delivered, refused or
given up, so a restart (or a crash: tests/system/test_faults.py) resumes it; it carries a stable
``X-Machina-Notification-Id`` across attempts and processes; the secret is never stored."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from client_py import AsyncEngineClient
from engine_service import LocalStorage, Storage
from engine_service.core._types import JsonObject
from engine_service.net._egress import EgressPolicy
from engine_service.net._webhooks import (
    OUTBOX_SHARDS,
    WebhookSender,
    notification_blob,
    outbox_shard,
)
from engine_service.storage._s3 import S3Storage
from tests.conftest import ServerFactory, turn
from tests.processes import free_port
from tests.s3_server import new_bucket
from tests.webhook_receiver import Receiver, signed

pytestmark = pytest.mark.timeout(60)

SECRET = "whsec-outbox-5b7e3a"
# The receivers listen on loopback, which the egress policy refuses unless the operator allows it.
CONFIG = {"webhook_secrets": {"hook": SECRET}, "egress_allow_hosts": ["127.0.0.1"]}
LOOPBACK = EgressPolicy.from_settings(allow_hosts=["127.0.0.1"])
RUN = {"run_id": "run_1", "workspace_id": "default", "state": "DONE", "data": "ok"}


async def outbox(storage: Storage) -> dict[str, JsonObject]:
    """Every pending entry of the shared index, by notification id."""
    entries: dict[str, JsonObject] = {}
    for index in range(OUTBOX_SHARDS):
        doc = await storage.get_shared(f"webhook-outbox-{index:x}")
        entries.update((doc or {}).get("pending", {}))
    return entries


async def notification(storage: Storage, ws: str, run_id: str, notification_id: str) -> JsonObject:
    raw = await storage.get_blob(ws, run_id, notification_blob(notification_id))
    assert raw is not None
    doc: JsonObject = json.loads(raw)
    return doc


async def wait_until_settled(sender: WebhookSender, ws: str, run_id: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = await sender.deliveries(ws, run_id)
        if log and (log[-1]["ok"] or log[-1].get("gave_up") or 400 <= log[-1]["status"] < 500):
            await asyncio.sleep(0.1)  # the tombstone is written right after the log entry
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the notification was not settled")


async def wait_for_attempts(sender: WebhookSender, ws: str, run_id: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(await sender.deliveries(ws, run_id)) < count:
        assert time.monotonic() < deadline, "no delivery attempt was recorded"
        await asyncio.sleep(0.02)


# -- through the engine (gRPC) ---------------------------------------------------------------------


async def test_delivered_exactly_once_when_the_receiver_is_up_and_the_outbox_is_cleared(
    servers: ServerFactory, receiver: Receiver
) -> None:
    srv = await servers.start(config=CONFIG)
    webhook = {"url": receiver.url, "secret_ref": "hook", "events": ["done"]}
    async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
        run = await client.execute("hi", model="scripted", script=[turn("hello")], webhook=webhook).result()
        await receiver.wait_for(1)
    await wait_until_settled(srv.engine.webhooks, "default", run.run_id)
    ((headers, body),) = receiver.requests
    assert signed(SECRET, headers, body)
    notification_id = headers["x-machina-notification-id"]
    assert notification_id != headers["x-machina-delivery"]
    (entry,) = await srv.engine.webhooks.deliveries("default", run.run_id)
    assert (entry["notification"], entry["delivery"], entry["ok"]) == (
        notification_id,
        headers["x-machina-delivery"],
        True,
    )
    storage = LocalStorage(servers.root)
    assert await outbox(storage) == {}
    settled = await notification(storage, "default", run.run_id, notification_id)
    assert (settled["state"], settled["attempts"]) == ("delivered", 1)
    assert "run" not in settled  # the tombstone keeps no copy of the body

    # A restart over the same storage finds nothing to resend.
    again = await servers.start(config=CONFIG)
    assert await again.engine.webhooks.resume_pending_all() == 0
    await asyncio.sleep(1.0)
    assert len(receiver.requests) == 1


@pytest.mark.slow
async def test_pending_at_shutdown_is_delivered_by_the_next_engine(servers: ServerFactory) -> None:
    hook_port = free_port()
    first = await servers.start(config=CONFIG)
    webhook = {"url": f"http://127.0.0.1:{hook_port}/hook", "secret_ref": "hook"}
    async with AsyncEngineClient(f"127.0.0.1:{first.port}") as client:
        run = await client.execute("hi", model="scripted", script=[turn("hello")], webhook=webhook).result()
        assert run.state == "DONE"
    await wait_for_attempts(first.engine.webhooks, "default", run.run_id, 1)
    storage = LocalStorage(servers.root)
    ((notification_id, where),) = (await outbox(storage)).items()
    assert where == {"ws": "default", "run_id": run.run_id}
    assert outbox_shard("default", run.run_id) in {
        p.stem for p in (servers.root / "shared").glob("webhook-outbox-*.json")
    }
    servers.running.remove(first)
    await first.stop(0.5)  # the receiver is still down: the delivery is cancelled, not settled
    assert (await notification(storage, "default", run.run_id, notification_id))["state"] == "pending"
    tried = len(await first.engine.webhooks.deliveries("default", run.run_id))

    receiver = Receiver(hook_port)
    try:
        second = await servers.start(config=CONFIG)
        await receiver.wait_for(1, timeout=10)
        await wait_until_settled(second.engine.webhooks, "default", run.run_id)
        await asyncio.sleep(0.5)
    finally:
        receiver.close()
    ((headers, body),) = receiver.requests
    assert headers["x-machina-notification-id"] == notification_id
    assert headers["x-machina-event"] == "status.done"
    assert signed(SECRET, headers, body)
    assert json.loads(body)["state"] == "DONE"
    log = await second.engine.webhooks.deliveries("default", run.run_id)
    assert {e["notification"] for e in log} == {notification_id}
    # The attempt count goes on from where the first engine stopped.
    assert [e["attempt"] for e in log] == list(range(1, tried + 2))
    assert [e["ok"] for e in log] == [False] * tried + [True]
    assert len({e["delivery"] for e in log}) == len(log)  # a fresh delivery id per attempt
    assert await outbox(storage) == {}
    assert (await notification(storage, "default", run.run_id, notification_id))["state"] == "delivered"


async def test_the_outbox_never_holds_the_secret(servers: ServerFactory) -> None:
    srv = await servers.start(config=CONFIG)
    dead = f"http://127.0.0.1:{free_port()}/hook"
    webhook = {"url": dead, "secret_ref": "hook", "headers": {"X-Tenant": "acme"}}
    async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
        run = await client.execute("hi", model="scripted", script=[turn("hello")], webhook=webhook).result()
    await wait_for_attempts(srv.engine.webhooks, "default", run.run_id, 1)
    storage = LocalStorage(servers.root)
    ((notification_id, _),) = (await outbox(storage)).items()
    pending = await notification(storage, "default", run.run_id, notification_id)
    assert pending["state"] == "pending"
    assert pending["webhook"]["secret_ref"] == "hook"
    assert pending["run"]["state"] == "DONE"
    files = [p for p in servers.root.rglob("*") if p.is_file()]
    assert any(p.name == notification_blob(notification_id) for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path


# -- the sender against a storage directory ----------------------------------------------------------


async def with_run(root: Path) -> LocalStorage:
    """A storage directory holding the run ``run_1`` (blobs live in a run's directory)."""
    storage = LocalStorage(root)
    assert await storage.create_run("default", "run_1", {}, {"state": "DONE"})
    return storage


def sender(storage: Storage, *, max_attempts: int = 6, base_delay_s: float = 0.01) -> WebhookSender:
    secrets = {"hook": SECRET}
    return WebhookSender(
        storage,
        lambda _ws, ref: secrets.get(ref),
        max_attempts=max_attempts,
        base_delay_s=base_delay_s,
        egress=LOOPBACK,
    )


async def test_giving_up_after_max_attempts_clears_the_outbox_and_is_logged(tmp_path: Path) -> None:
    storage = await with_run(tmp_path)
    receiver = Receiver(statuses=(503,))
    webhooks = sender(storage, max_attempts=3)
    try:
        webhooks.notify("default", "run_1", {"url": receiver.url, "secret_ref": "hook"}, "done", RUN)
        await wait_until_settled(webhooks, "default", "run_1")
    finally:
        await webhooks.close()
        receiver.close()
    ids = {headers["x-machina-notification-id"] for headers, _ in receiver.requests}
    assert len(receiver.requests) == 3
    (notification_id,) = ids
    log = await webhooks.deliveries("default", "run_1")
    assert [(e["attempt"], e["status"], e["ok"]) for e in log[:3]] == [(1, 503, False), (2, 503, False),
                                                                        (3, 503, False)]  # fmt: skip
    assert log[3]["gave_up"] is True
    assert (log[3]["notification"], log[3]["attempt"], log[3]["ok"]) == (notification_id, 3, False)
    assert await outbox(storage) == {}
    assert (await notification(storage, "default", "run_1", notification_id))["state"] == "gave_up"
    later = sender(storage)
    assert await later.resume_pending_all() == 0
    await later.close()


async def test_attempts_are_counted_across_restarts(tmp_path: Path) -> None:
    storage = await with_run(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}/hook"
    first = sender(storage, max_attempts=3, base_delay_s=30)
    first.notify("default", "run_1", {"url": dead}, "done", RUN)
    await wait_for_attempts(first, "default", "run_1", 1)
    await first.close(grace=0)  # "crash" while it waits to retry
    assert len(await outbox(storage)) == 1

    second = sender(storage, max_attempts=2)
    assert await second.resume_pending_all() == 1
    await wait_until_settled(second, "default", "run_1")
    await second.close()
    log = await second.deliveries("default", "run_1")
    assert [e["attempt"] for e in log] == [1, 2, 2]
    assert [bool(e.get("gave_up")) for e in log] == [False, False, True]
    assert await outbox(storage) == {}


async def test_a_refused_notification_is_settled_and_not_resumed(tmp_path: Path) -> None:
    storage = await with_run(tmp_path)
    receiver = Receiver(statuses=(410,))
    webhooks = sender(storage)
    try:
        webhooks.notify("default", "run_1", {"url": receiver.url}, "done", RUN)
        await wait_until_settled(webhooks, "default", "run_1")
        await webhooks.close()
        later = sender(storage)
        assert await later.resume_pending_all() == 0
        await later.close()
    finally:
        receiver.close()
    assert len(receiver.requests) == 1
    notification_id = receiver.requests[0][0]["x-machina-notification-id"]
    assert (await notification(storage, "default", "run_1", notification_id))["state"] == "refused"
    assert await outbox(storage) == {}


async def test_two_processes_resuming_one_notification_use_one_notification_id(tmp_path: Path) -> None:
    """At least once: a process that starts while another retries resends, with the same id, and the
    one still retrying stops once the other has delivered it."""
    storage = await with_run(tmp_path)
    receiver = Receiver(statuses=(503, 200))
    first = sender(storage, base_delay_s=0.6)
    try:
        first.notify("default", "run_1", {"url": receiver.url, "secret_ref": "hook"}, "done", RUN)
        await receiver.wait_for(1)
        second = sender(storage)
        assert await second.resume_pending_all() == 1
        await receiver.wait_for(2)
        await asyncio.sleep(1.0)  # past the first sender's next retry, which finds it delivered
        await second.close()
        await first.close()
    finally:
        receiver.close()
    assert len(receiver.requests) == 2
    assert len({headers["x-machina-notification-id"] for headers, _ in receiver.requests}) == 1
    assert len({headers["x-machina-delivery"] for headers, _ in receiver.requests}) == 2
    assert all(signed(SECRET, headers, body) for headers, body in receiver.requests)
    assert await outbox(storage) == {}


async def test_a_process_without_the_secret_leaves_the_notification_pending(tmp_path: Path) -> None:
    storage = await with_run(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}/hook"
    first = sender(storage, base_delay_s=30)
    first.notify("default", "run_1", {"url": dead, "secret_ref": "hook"}, "done", RUN)
    await wait_for_attempts(first, "default", "run_1", 1)
    await first.close(grace=0)
    unsigned = WebhookSender(storage, lambda _ws, _ref: None, egress=LOOPBACK)
    assert await unsigned.resume_pending_all() == 0  # it would have to send unsigned
    await unsigned.close()
    assert len(await outbox(storage)) == 1


class CountingStorage(LocalStorage):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.calls: list[str] = []

    async def list_workspaces(self) -> list[str]:
        self.calls.append("list_workspaces")
        return await super().list_workspaces()

    async def list_runs(self, ws: str) -> list[str]:
        self.calls.append("list_runs")
        return await super().list_runs(ws)

    async def read_state(self, ws: str, run_id: str) -> JsonObject | None:
        self.calls.append("read_state")
        return await super().read_state(ws, run_id)

    async def get_blob(self, ws: str, run_id: str, name: str) -> bytes | None:
        self.calls.append("get_blob")
        return await super().get_blob(ws, run_id, name)

    async def get_shared(self, name: str) -> JsonObject | None:
        self.calls.append("get_shared")
        return await super().get_shared(name)


async def test_the_startup_scan_reads_the_index_not_every_run(servers: ServerFactory) -> None:
    srv = await servers.start(config=CONFIG)
    async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
        for i in range(5):
            await client.execute(f"r{i}", model="scripted", script=[turn("hello")]).result()
    storage = CountingStorage(servers.root)
    webhooks = WebhookSender(storage, lambda _ws, _ref: None, egress=LOOPBACK)
    assert await webhooks.resume_pending_all() == 0
    await webhooks.close()
    assert storage.calls == ["get_shared"] * OUTBOX_SHARDS


async def test_the_outbox_over_s3(moto: str) -> None:
    bucket = await new_bucket(moto)
    hook_port = free_port()
    crashed = S3Storage(bucket, "machina", endpoint_url=moto)
    assert await crashed.create_run("default", "run_1", {}, {"state": "DONE"})
    first = sender(crashed, base_delay_s=30)
    first.notify("default", "run_1", {"url": f"http://127.0.0.1:{hook_port}/hook", "secret_ref": "hook"},
                 "done", RUN)  # fmt: skip
    await wait_for_attempts(first, "default", "run_1", 1)
    await first.close(grace=0)
    await crashed.close()

    storage = S3Storage(bucket, "machina", endpoint_url=moto)
    receiver = Receiver(hook_port)
    second = sender(storage)
    try:
        assert await second.resume_pending_all() == 1
        await receiver.wait_for(1)
        await wait_until_settled(second, "default", "run_1")
    finally:
        await second.close()
        receiver.close()
    ((headers, body),) = receiver.requests
    assert signed(SECRET, headers, body)
    assert json.loads(body) == RUN
    assert await outbox(storage) == {}
    settled = await notification(storage, "default", "run_1", headers["x-machina-notification-id"])
    assert settled["state"] == "delivered"
    await storage.close()
