"""Durable timers beyond approvals: webhook retries and handoff deadlines, fired by any replica."""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncpg
import pytest

from client_py import AsyncEngineClient
from tests.conftest import refresh_until, turn
from tests.control.conftest import Replicas
from tests.processes import EngineProcess
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.timeout(90)

LOOPBACK = {"egress_allow_hosts": ["127.0.0.1"]}
SECRET = "runner-secret-for-tests"


class HoldingReceiver:
    """A webhook receiver that holds its first request unanswered (its sender dies meanwhile)
    and answers 200 to the others; counts what arrives."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.requests.append({k.lower(): v for k, v in self.headers.items()})
                if len(receiver.requests) == 1:
                    receiver.release.wait(60)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


async def _timers(database: str, run_id: str) -> list[str]:
    conn = await asyncpg.connect(database)
    try:
        rows = await conn.fetch("SELECT kind FROM machina_timers WHERE run_id = $1", run_id)
    finally:
        await conn.close()
    return sorted(r["kind"] for r in rows)


async def _until_timer(database: str, run_id: str, prefix: str) -> list[str]:
    for _ in range(200):
        kinds = await _timers(database, run_id)
        if any(k.startswith(prefix) for k in kinds):
            return kinds
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {prefix} timer for {run_id}")


async def test_webhook_retries_are_timer_rows_each_attempt_made_once(
    replicas: Replicas, database: str
) -> None:
    receiver = Receiver(statuses=(503, 503, 200))
    try:
        a = await replicas.start(config=LOOPBACK)
        await replicas.start(config=LOOPBACK)
        async with AsyncEngineClient(f"127.0.0.1:{a.port}") as client:
            webhook = {"url": receiver.url, "events": ["done"]}
            handle = await client.create("hi", model="scripted", script=[turn("hello")], webhook=webhook)
            run = await handle.wait(timeout=20)
            await receiver.wait_for(1)
            # Between attempts the next one is a row, not a sleep in the process that failed.
            assert (await _until_timer(database, run.run_id, "webhook:"))[0].startswith("webhook:")
            await receiver.wait_for(3)
            await asyncio.sleep(1.5)  # a second delivery (or a third retry) would arrive by now
        log = []
        for _ in range(100):
            log = await a.engine.webhooks.deliveries("default", run.run_id)
            if len(log) >= 3 and not await _timers(database, run.run_id):
                break
            await asyncio.sleep(0.05)
    finally:
        receiver.close()
    # Both replicas fire timers; each attempt was made by one of them, once.
    assert [(e["attempt"], e["status"]) for e in log] == [(1, 503), (2, 503), (3, 200)]
    assert len(receiver.requests) == 3
    assert len({h["x-machina-notification-id"] for h, _ in receiver.requests}) == 1
    assert await _timers(database, run.run_id) == []  # settled: its timer row is gone


async def test_a_handoff_deadline_set_on_one_replica_fires_on_another(
    replicas: Replicas, database: str
) -> None:
    runner = Receiver(statuses=(200,))  # takes every handoff and never continues the run
    config = {
        "runner_url": runner.url,
        "runner_secret": SECRET,
        "capabilities_subprocess": False,
        "handoff_deadline_s": 1.5,
        "handoff_attempts": 2,
        "recovery_interval_s": 3600,  # the sweep runs at startup only: the timer must do it
    }
    try:
        a = await replicas.start(config=config)
        async with AsyncEngineClient(f"127.0.0.1:{a.port}") as client:
            script = [turn("", ("Bash", {"command": "echo hi"})), turn("done")]
            handle = await client.create("handoff", model="scripted", script=script)
            run = await refresh_until(handle, "PAUSED", "FAILED", tries=200, interval=0.05)
            assert (run.state, run.pause_reason) == ("PAUSED", "HANDOFF_TO_RUNNER"), run
        assert await _until_timer(database, run.run_id, "handoff") == ["handoff"]
        await replicas.running[0].stop(0.5)  # the replica that handed it off is gone
        replicas.running.clear()
        b = await replicas.start(config=config)
        async with AsyncEngineClient(f"127.0.0.1:{b.port}") as client:
            ended = await refresh_until(await client.attach(run.run_id), "FAILED", tries=300, interval=0.05)
        assert ended.state == "FAILED", ended
        assert ended.error is not None
        assert ended.error.code == "ERR_RUNNER_LOST"
        # Handed off twice (by A, then by B's timer), then given up by B's next timer.
        assert len(runner.requests) == 2
        assert await _timers(database, run.run_id) == []
    finally:
        runner.close()


# -- with real processes, kill -9 ---------------------------------------------------------------


@pytest.fixture
def engines(tmp_path: Path, database: str) -> dict[str, str]:
    return {
        "MACHINA_STORAGE": str(tmp_path / "storage"),
        "MACHINA_CONTROL_URL": database,
        "MACHINA_EGRESS_ALLOW_HOSTS": "127.0.0.1",
        "MACHINA_LEASE_TTL_S": "3",
        "MACHINA_RECOVERY_INTERVAL_S": "3600",
        "MACHINA_RUNNER_SECRET": SECRET,
        "MACHINA_CAPABILITIES_SUBPROCESS": "false",
        "MACHINA_HANDOFF_DEADLINE_S": "1.5",
        "MACHINA_HANDOFF_ATTEMPTS": "2",
    }


def _engine(tmp_path: Path, name: str, env: dict[str, str]) -> EngineProcess:
    return EngineProcess(tmp_path / name, env={**env, "MACHINA_WORKDIR_ROOT": str(tmp_path / name / "w")})


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_webhook_whose_replica_is_killed_is_delivered_by_another_exactly_once(
    tmp_path: Path, engines: dict[str, str], database: str
) -> None:
    receiver = HoldingReceiver()
    a = _engine(tmp_path, "a", engines)
    b = None
    try:
        async with AsyncEngineClient(a.target) as client:
            webhook = {"url": receiver.url, "events": ["done"]}
            handle = await client.create("hi", model="scripted", script=[turn("hello")], webhook=webhook)
            await handle.wait(timeout=20)
        for _ in range(200):  # A's first attempt is under way (and held)
            if receiver.requests:
                break
            await asyncio.sleep(0.05)
        assert len(receiver.requests) == 1
        assert (await _until_timer(database, handle.run_id, "webhook:"))[0].startswith("webhook:")
        # B starts while A still holds the attempt: it finds the notification pending in the
        # outbox, sees its timer, and leaves it alone.
        b = _engine(tmp_path, "b", engines)
        await asyncio.sleep(1.0)
        assert len(receiver.requests) == 1
        a.kill9()
        receiver.release.set()  # the held request ends; A is not there to hear the answer
        for _ in range(600):  # B fires the timer once the attempt A made would have timed out
            if len(receiver.requests) >= 2 and not await _timers(database, handle.run_id):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)  # nothing more arrives
    finally:
        receiver.close()
        a.close()
        if b is not None:
            b.close()
    assert len(receiver.requests) == 2
    ids = {h["x-machina-notification-id"] for h in receiver.requests}
    assert len(ids) == 1
    assert await _timers(database, handle.run_id) == []


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_handoff_deadline_fires_on_b_after_a_is_killed(
    tmp_path: Path, engines: dict[str, str], database: str
) -> None:
    runner = Receiver(statuses=(200,))  # takes every handoff and never continues the run
    env = {**engines, "MACHINA_RUNNER_URL": runner.url}
    a = _engine(tmp_path, "a", env)
    b = None
    try:
        async with AsyncEngineClient(a.target) as client:
            script = [turn("", ("Bash", {"command": "echo hi"})), turn("done")]
            handle = await client.create("handoff", model="scripted", script=script)
            run = await refresh_until(handle, "PAUSED", "FAILED", tries=200, interval=0.05)
        assert (run.state, run.pause_reason) == ("PAUSED", "HANDOFF_TO_RUNNER"), run
        assert await _until_timer(database, run.run_id, "handoff") == ["handoff"]
        b = _engine(tmp_path, "b", env)
        a.kill9()
        async with AsyncEngineClient(b.target) as client:
            ended = await refresh_until(await client.attach(run.run_id), "FAILED", tries=600, interval=0.05)
    finally:
        runner.close()
        a.close()
        if b is not None:
            b.close()
    assert ended.state == "FAILED", ended
    assert ended.error is not None
    assert ended.error.code == "ERR_RUNNER_LOST"
    assert len(runner.requests) == 2  # A's handoff, then B's timer's (the sweep runs hourly here)


async def test_a_pause_commits_with_its_deadline_timer_already_written(
    replicas: Replicas, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica's queued changes never reach the database (as if it died right after the
    pause committed): the approval deadline's timer row is there all the same."""
    server = await replicas.start(config={"tools": {"permissions": {"double": "ask"}}})
    stalled = asyncio.Event()

    async def never_written(_pool: object) -> None:
        stalled.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(server.engine.control, "_apply_ops", never_written)
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        handle = await client.create(
            "expiring",
            model="scripted",
            script=[turn("", ("double", {"x": 4})), turn("x")],
            approval_timeout=600,
        )
        run = await handle.wait(timeout=20)
    assert run.state == "PAUSED", run
    await asyncio.wait_for(stalled.wait(), 5)  # the queued changes are stuck
    assert await _timers(database, run.run_id) == ["approval"]
