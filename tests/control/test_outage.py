"""The database goes away: commits never wait for it, ListRuns says so, the index catches up."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from client_py import AsyncEngineClient, UnavailableError
from tests.conftest import refresh_until, turn
from tests.control.conftest import PgProxy, Replicas

pytestmark = pytest.mark.timeout(90)


async def _unavailable(client: AsyncEngineClient) -> UnavailableError:
    """ListRuns until it answers UNAVAILABLE (the replica noticed the database is away)."""
    for _ in range(60):
        try:
            [r async for r in client.list_runs(timeout=2)]
        except UnavailableError as exc:
            return exc
        except Exception:  # noqa: S110 - a query stuck on the stalled connection times out first
            pass
        await asyncio.sleep(0.2)
    raise AssertionError("ListRuns never answered UNAVAILABLE")


async def test_a_run_finishes_while_the_database_is_stalled_and_the_index_catches_up(
    replicas: Replicas, pg_proxy: PgProxy
) -> None:
    # The replica notices a silent database only after 30 s: until then a commit that waited
    # for PostgreSQL would hang.
    server = await replicas.start(control_url=pg_proxy.url, connect_timeout=30)
    script = [turn("", ("sleep", {"seconds": 0.1})) for _ in range(4)] + [turn("finished")]
    async with AsyncEngineClient(f"127.0.0.1:{server.port}", max_retries=0) as client:
        handle = await client.create("through an outage", model="scripted", script=script)
        await refresh_until(handle, "RUNNING", "DONE")
        pg_proxy.stall()  # every query from now on hangs, as with a paused database
        # Each checkpoint commits to storage and queues its index row: none waits for PostgreSQL.
        run = await handle.wait(timeout=15)
        assert run.state == "DONE", run
        assert run.data == "finished"
        pg_proxy.resume()
        listed = []
        for _ in range(100):
            listed = [(r.run_id, r.state, r.last_seq) async for r in client.list_runs(states=["DONE"])]
            if listed:
                break
            await asyncio.sleep(0.1)
    # The rows queued during the stall were written once it answered: the index has the end.
    assert listed == [(run.run_id, "DONE", run.last_seq)]


async def test_list_runs_answers_unavailable_while_the_database_is_down(
    replicas: Replicas, pg_proxy: PgProxy
) -> None:
    server = await replicas.start(control_url=pg_proxy.url)
    async with AsyncEngineClient(f"127.0.0.1:{server.port}", max_retries=0) as client:
        handle = await client.create("t", model="scripted", script=[turn("ok")])
        await handle.wait(timeout=20)
        pg_proxy.stall()
        refused = await _unavailable(client)
        # After a failed query or a missed heartbeat it answers at once, without trying the
        # database: a retryable answer naming the cause, not a partial list from a storage scan.
        assert refused.reason == "ERR_CONTROL_UNAVAILABLE"
        assert "retry" in refused.message
        # Reading one run needs storage only.
        assert (await handle.refresh()).state == "DONE"


async def test_the_creator_lists_its_run_on_any_replica_at_once(replicas: Replicas) -> None:
    a = await replicas.start()
    b = await replicas.start()
    async with AsyncEngineClient(f"127.0.0.1:{a.port}") as ca, AsyncEngineClient(f"127.0.0.1:{b.port}") as cb:
        for i in range(5):
            handle = await ca.create(f"task {i}", model="scripted", script=[turn("ok")])
            # CreateRun wrote the run's index row with its queue entry before answering.
            assert handle.run_id in [r.run_id async for r in cb.list_runs()]
            assert handle.run_id in [r.run_id async for r in ca.list_runs()]


async def test_a_finished_run_is_listed_finished_at_once_by_its_replica(replicas: Replicas) -> None:
    server = await replicas.start()
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        for i in range(5):
            handle = await client.create(f"task {i}", model="scripted", script=[turn("ok")])
            run = await handle.wait(timeout=20)
            assert run.state == "DONE"
            # Its last index row may still be queued: ListRuns first lands this replica's rows.
            assert run.run_id in [r.run_id async for r in client.list_runs(states=["DONE"])]


async def test_many_quick_runs_are_all_indexed_with_their_final_state(
    replicas: Replicas, database: str
) -> None:
    """Rows are written in batches, one per run however many commits it made."""
    server = await replicas.start()
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        handles = await asyncio.gather(
            *(client.create(f"t{i}", model="scripted", script=[turn(f"r{i}")]) for i in range(30))
        )
        runs = [await h.wait(timeout=30) for h in handles]
        listed = {r.run_id: r.state async for r in client.list_runs(states=["DONE"])}
    assert all(listed.get(r.run_id) == "DONE" for r in runs)
    conn = await asyncpg.connect(database)
    try:
        rows = await conn.fetch("SELECT run_id, last_seq FROM machina_runs")
    finally:
        await conn.close()
    assert {r["run_id"]: r["last_seq"] for r in rows} == {r.run_id: r.last_seq for r in runs}
