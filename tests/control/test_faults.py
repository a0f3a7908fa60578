"""The control plane at its seams: a creator killed between two writes, a replica that stops
with runs queued for it alone, a query the database refuses, NUL characters, a held lock."""

from __future__ import annotations

import asyncio
import base64

import asyncpg
import asyncpg.pool
import grpc
import pytest

from client_py import AsyncEngineClient, AsyncRunHandle, InternalError, InvalidArgumentError
from engine_service import LocalStorage
from engine_service.control import PostgresControl, _postgres
from engine_service.control._postgres import MIGRATION_LOCK
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import engine_service_pb2_grpc as svc_grpc
from tests.conftest import turn
from tests.control.conftest import Replicas

pytestmark = pytest.mark.timeout(90)

QUICK = {"lease_ttl_s": 2, "recovery_interval_s": 1}
# Replicas whose workspaces run one run at a time, and may call the credentialed service below.
ONE_AT_A_TIME = {**QUICK, "egress_allow_hosts": ["127.0.0.1"]}


async def pinned_behind_busy(
    client: AsyncEngineClient, busy_s: float
) -> tuple[AsyncRunHandle, AsyncRunHandle]:
    """A run holding the workspace's one slot for ``busy_s``, and a run with per-run credentials
    queued behind it: queued for the replica ``client`` talks to alone."""
    busy = await client.create(
        "busy", model="scripted", script=[turn("", ("sleep", {"seconds": busy_s})), turn("ok")]
    )
    await asyncio.sleep(0.5)  # it holds the workspace's one slot
    api = {"services": [{"name": "svc", "base_url": "http://127.0.0.1:9"}], "env": {"k": "v"}}
    pinned = await client.create("pinned", model="scripted", script=[turn("done")], api=api)
    assert (await pinned.refresh()).state == "QUEUED"
    return busy, pinned


async def test_a_run_whose_creator_died_before_queueing_it_is_recovered(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CreateRun indexes the run, writes it to storage, then queues it. A creator killed after
    the storage write (or whose queueing failed, and that stopped before the database came back)
    leaves a QUEUED run without a queue entry: the sweep finds its row and queues it."""

    async def dies_here(self: object, *args: object, **kwargs: object) -> int:
        raise RuntimeError("killed")  # as if the process died right after storage.create_run

    with monkeypatch.context() as patch:
        patch.setattr(_postgres.PostgresControl, "enqueue", dies_here)
        a = await replicas.start(config=QUICK)
        async with AsyncEngineClient(f"127.0.0.1:{a.port}") as ca:
            with pytest.raises(InternalError):
                await ca.create("lost", model="scripted", script=[turn("done")], run_id="lost-run")
        await replicas.stop_all()
    state = await LocalStorage(replicas.root).read_state("default", "lost-run")
    assert state is not None
    assert state["state"] == "QUEUED"
    b = await replicas.start(config=QUICK)
    async with AsyncEngineClient(f"127.0.0.1:{b.port}") as cb:
        run = await (await cb.attach("lost-run")).wait(timeout=20)
        assert run.state == "DONE"


async def test_a_row_whose_run_never_reached_storage_goes(replicas: Replicas, database: str) -> None:
    """The other side of indexing first: a creator that died after the row and before storage
    leaves a row for no run; the sweep drops it once it is older than a lease."""
    a = await replicas.start(config=QUICK)
    async with AsyncEngineClient(f"127.0.0.1:{a.port}") as ca:
        kept = await ca.create("kept", model="scripted", script=[turn("ok")])
        await kept.wait(timeout=20)
        conn = await asyncpg.connect(database)
        try:
            await conn.execute(
                "INSERT INTO machina_runs SELECT workspace, 'ghost', 'QUEUED', pause_reason, labels, "
                "created_at - 60, updated_at - 60, 0, jsonb_set(doc, '{run_id}', '\"ghost\"') "
                "FROM machina_runs WHERE run_id = $1",
                kept.run_id,
            )
            for _ in range(100):
                left = await conn.fetchval("SELECT count(*) FROM machina_runs WHERE run_id = 'ghost'")
                if left == 0:
                    break
                await asyncio.sleep(0.1)
        finally:
            await conn.close()
        assert left == 0
        assert [r.run_id async for r in ca.list_runs()] == [kept.run_id]


async def test_a_run_queued_for_a_replica_that_stopped_goes_to_another(replicas: Replicas) -> None:
    """A run created with per-run credentials waits in the queue for its creator alone. When the
    creator stops (a rolling deploy) before it claims the run, the run goes to any replica, as
    it would be recovered without a control plane."""
    a = await replicas.start(config=ONE_AT_A_TIME, max_running=1)
    async with AsyncEngineClient(f"127.0.0.1:{a.port}") as ca:
        busy, pinned = await pinned_behind_busy(ca, 3)
    await replicas.stop_all()
    b = await replicas.start(config=ONE_AT_A_TIME, max_running=1)
    async with AsyncEngineClient(f"127.0.0.1:{b.port}") as cb:
        assert (await (await cb.attach(busy.run_id)).wait(timeout=30)).state == "DONE"
        assert (await (await cb.attach(pinned.run_id)).wait(timeout=30)).state == "DONE"


async def test_one_refused_query_does_not_stop_the_timer_loop(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal the database gives under load (too many connections) while the timer loop waits
    for the next due time: the loop goes on, and an approval deadline still fires."""
    original = asyncpg.pool.Pool.fetchval
    refused: list[str] = []

    async def fetchval(self: asyncpg.pool.Pool, query: str, *args: object, **kwargs: object) -> object:
        if "FROM machina_timers" in query and not refused:
            refused.append(query)
            raise asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already")
        return await original(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.pool.Pool, "fetchval", fetchval)
    config = {"tools": {"permissions": {"double": "ask"}}, "recovery_interval_s": 1}
    a = await replicas.start(config=config)
    async with AsyncEngineClient(f"127.0.0.1:{a.port}") as ca:
        handle = await ca.create(
            "double",
            model="scripted",
            script=[turn("", ("double", {"x": 2})), turn("after")],
            approval_timeout=1.0,
            approval_expiry_action="approve",
        )
        assert (await handle.wait(timeout=20)).state == "PAUSED"
        for _ in range(60):
            run = await handle.refresh()
            if run.state != "PAUSED":
                break
            await asyncio.sleep(0.1)
        assert refused, "the refusal was not reached"
        assert run.state == "DONE", "the approval deadline never fired"


async def test_a_nul_character_in_a_run_is_indexed(replicas: Replicas) -> None:
    """PostgreSQL's jsonb refuses NUL; a task (or a model's answer) may hold one. The run is
    indexed (NUL shown as U+FFFD there) and runs; storage keeps its text as it is."""
    a = await replicas.start(config=QUICK)
    async with AsyncEngineClient(f"127.0.0.1:{a.port}") as ca:
        handle = await ca.create("hello\x00world", model="scripted", script=[turn("a\x00b")])
        run = await handle.wait(timeout=20)
        assert run.state == "DONE"
        listed = [r async for r in ca.list_runs()]
        assert [r.run_id for r in listed] == [handle.run_id]
        assert listed[0].state == "DONE"


def _token(raw: bytes) -> str:
    return "k1." + base64.urlsafe_b64encode(raw).decode()


@pytest.mark.parametrize(
    ("labels", "token"),
    [
        ({"team": "a\x00b"}, ""),
        ({"a\x00b": "team"}, ""),
        ({}, _token(b'[1.0, "a\\u0000b"]')),
        ({}, _token(b"[1" + b"0" * 400 + b', "x"]')),
        ({}, _token(b'[1e999, "x"]')),
    ],
    ids=["nul-in-label-value", "nul-in-label-key", "nul-in-token", "huge-int-in-token", "inf-in-token"],
)
async def test_list_runs_refuses_bad_filters_and_tokens(
    replicas: Replicas, labels: dict[str, str], token: str
) -> None:
    a = await replicas.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as channel:
        stub = svc_grpc.EngineServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListRuns(svc.ListRunsRequest(labels=labels, page_token=token))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()


async def test_a_run_with_a_nul_in_its_labels_is_refused(replicas: Replicas) -> None:
    a = await replicas.start()
    async with AsyncEngineClient(f"127.0.0.1:{a.port}") as ca:
        with pytest.raises(InvalidArgumentError, match="NUL"):
            await ca.create("t", model="scripted", script=[turn("ok")], labels={"team": "a\x00b"})


async def test_a_session_holding_the_migration_lock_does_not_keep_replicas_out(
    replicas: Replicas, database: str
) -> None:
    """Every connection and reconnection checks the schema. A session holding the migration
    lock and hanging (a replica partitioned away mid-startup) must not keep a replica whose
    schema is current from connecting."""
    await replicas.start()  # the schema is there now
    await replicas.stop_all()
    holder = await asyncpg.connect(database)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        b = await replicas.start(connect_timeout=2.0)
        control = b.engine.control
        assert isinstance(control, PostgresControl)
        assert await control.wait_connected(5.0), control.available()
    finally:
        await holder.close()


async def test_a_migration_waits_for_the_lock_only_so_long(database: str) -> None:
    holder = await asyncpg.connect(database)
    waiter = await asyncpg.connect(database)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        with pytest.raises(TimeoutError, match="migration lock"):
            await _postgres.migrate(waiter, lock_wait_s=0.3)
    finally:
        await holder.close()
        await waiter.close()


async def test_a_run_queued_for_a_replica_that_died_goes_to_another(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same when the creator dies without a word (kill -9): its session with PostgreSQL
    ends with it, and once another replica's sweep misses it twice in a row, its queued runs go
    to any replica."""
    a = await replicas.start(config=ONE_AT_A_TIME, max_running=1)
    async with AsyncEngineClient(f"127.0.0.1:{a.port}") as ca:
        busy, pinned = await pinned_behind_busy(ca, 2)

    async def says_nothing(self: PostgresControl) -> None:
        return None  # dies: no goodbye

    monkeypatch.setattr(PostgresControl, "_unpin", says_nothing)
    await replicas.stop_all()
    monkeypatch.undo()
    b = await replicas.start(config=ONE_AT_A_TIME, max_running=1)
    async with AsyncEngineClient(f"127.0.0.1:{b.port}") as cb:
        assert (await (await cb.attach(busy.run_id)).wait(timeout=30)).state == "DONE"
        assert (await (await cb.attach(pinned.run_id)).wait(timeout=30)).state == "DONE"


async def test_runs_queued_for_a_live_replica_stay_with_it(replicas: Replicas) -> None:
    """A replica that is alive keeps the runs queued for it alone, however many sweeps other
    replicas make."""
    a = await replicas.start(config=ONE_AT_A_TIME, max_running=1)
    b = await replicas.start(config=ONE_AT_A_TIME, max_running=1)
    async with AsyncEngineClient(f"127.0.0.1:{a.port}") as ca:
        busy, pinned = await pinned_behind_busy(ca, 4)
        await asyncio.sleep(3)  # three sweeps of each replica
        assert (await pinned.refresh()).state == "QUEUED"
        await busy.wait(timeout=30)
        run = await pinned.wait(timeout=30)
        assert run.state == "DONE"
    assert b.engine.control.queued  # b was there all along, sweeping
