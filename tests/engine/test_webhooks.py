"""Webhooks against a real local receiver: signatures, retries, delivery ids, never blocking."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from client_py import AsyncEngineClient, InvalidRequestError
from tests.conftest import ServerFactory, turn
from tests.processes import free_port
from tests.webhook_receiver import Receiver, signed

SECRET = "whsec-test-8d1f2c"
# The receivers listen on loopback, which the egress policy refuses unless the operator allows it.
CONFIG = {
    "webhook_secrets": {"hook": SECRET},
    "tools": {"permissions": {"double": "ask"}},
    "egress_allow_hosts": ["127.0.0.1"],
}
DOUBLE = [turn("", ("double", {"x": 2})), turn("4")]


async def test_signed_deliveries_for_pause_and_done(servers: ServerFactory, receiver: Receiver) -> None:
    srv = await servers.start(config=CONFIG)
    async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
        webhook = {"url": receiver.url, "secret_ref": "hook", "headers": {"X-Tenant": "acme"}}
        handle = await client.create("d", model="scripted", script=DOUBLE, webhook=webhook)
        run = await handle.wait(timeout=10)
        await receiver.wait_for(1)
        await handle.approve(run.interrupts[0].interrupt_id)
        await handle.wait(timeout=10)
        await receiver.wait_for(2)
    (paused_headers, paused_body), (done_headers, done_body) = receiver.requests
    assert paused_headers["x-machina-event"] == "status.paused"
    assert done_headers["x-machina-event"] == "status.done"
    for headers, body in receiver.requests:
        assert signed(SECRET, headers, body)
        assert headers["x-machina-run-id"] == run.run_id
        assert headers["x-tenant"] == "acme"
        assert abs(int(headers["x-machina-timestamp"]) / 1000 - time.time()) < 60
    assert paused_headers["x-machina-delivery"] != done_headers["x-machina-delivery"]
    paused, done = json.loads(paused_body), json.loads(done_body)
    assert paused["state"] == "PAUSED"
    assert paused["pause"]["interrupts"][0]["tool"] == "double"
    assert (done["state"], done["data"]) == ("DONE", "4")
    assert SECRET.encode() not in paused_body + done_body


async def test_failed_deliveries_are_retried_with_new_ids_and_logged(servers: ServerFactory) -> None:
    receiver = Receiver(statuses=(500, 500, 200))
    try:
        srv = await servers.start(config=CONFIG)
        async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
            webhook = {"url": receiver.url, "secret_ref": "hook", "events": ["done"]}
            run = await client.execute(
                "hi", model="scripted", script=[turn("hello")], webhook=webhook
            ).result()
            await receiver.wait_for(3)
        ids = [headers["x-machina-delivery"] for headers, _ in receiver.requests]
        assert len(set(ids)) == 3
        assert all(signed(SECRET, h, b) for h, b in receiver.requests)
        # The receiver has answered the third attempt; the sender logs it a moment later.
        for _ in range(100):
            log = await srv.engine.webhooks.deliveries("default", run.run_id)
            if len(log) >= 3:
                break
            await asyncio.sleep(0.02)
        assert [(e["attempt"], e["status"], e["ok"]) for e in log] == [
            (1, 500, False),
            (2, 500, False),
            (3, 200, True),
        ]
    finally:
        receiver.close()


async def test_a_dead_receiver_never_delays_the_run(servers: ServerFactory) -> None:
    srv = await servers.start(config=CONFIG)
    dead = f"http://127.0.0.1:{free_port()}/hook"
    async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
        started = time.monotonic()
        run = await client.execute(
            "hi", model="scripted", script=[turn("hello")], webhook={"url": dead, "secret_ref": "hook"}
        ).result()
        assert run.state == "DONE"
        assert time.monotonic() - started < 2
        await asyncio.sleep(0.3)
    log = await srv.engine.webhooks.deliveries("default", run.run_id)
    assert log
    assert log[0]["ok"] is False
    assert log[0]["error"]


@pytest.mark.parametrize(
    "webhook",
    [
        {"url": "ftp://x/hook"},
        {"url": "http://127.0.0.1:1/hook", "events": ["exploded"]},
        {"url": "http://127.0.0.1:1/hook", "headers": {"X-Machina-Signature": "forged"}},
    ],
)
async def test_invalid_webhooks_are_refused(client: AsyncEngineClient, webhook: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        await client.create("hi", model="scripted", script=[turn("x")], webhook=webhook)
    assert caught.value.metadata["field"] == "webhook"
