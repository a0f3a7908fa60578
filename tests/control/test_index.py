"""The run index: ListRuns by query with keyset pages, migrations, reindex, live fan-out."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from client_py import AsyncEngineClient, NotFoundError
from engine_service import EngineError
from engine_service.control import PostgresControl, migrate, migrations
from engine_service.testing import free_port
from tests.conftest import ROOT, turn
from tests.control.conftest import Replicas
from tests.engine.harness import FakeClock

pytestmark = pytest.mark.timeout(60)


async def test_migrations_apply_once_even_when_replicas_start_together(database: str) -> None:
    conns = [await asyncpg.connect(database) for _ in range(4)]
    try:
        applied = await asyncio.gather(*(migrate(c) for c in conns))
        versions = await conns[0].fetch("SELECT version FROM machina_schema ORDER BY version")
    finally:
        for conn in conns:
            await conn.close()
    assert sorted(len(a) for a in applied) == [0, 0, 0, len(migrations())]
    assert [v[0] for v in versions] == [m[0] for m in migrations()]


async def test_list_runs_pages_by_query_with_stable_tokens(replicas: Replicas) -> None:
    server = await replicas.start()
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        created = []
        for i in range(7):
            handle = await client.create(
                f"task {i}", model="scripted", script=[turn(f"done {i}")], labels={"parity": str(i % 2)}
            )
            created.append(handle.run_id)
        for run_id in created:
            await (await client.attach(run_id)).wait(timeout=20)
        stub = client._stub  # page tokens: not exposed by the iterator
        from machina.engine.v1 import engine_service_pb2 as svc

        first = await stub.ListRuns(svc.ListRunsRequest(page_size=3))
        assert [r.run_id for r in first.runs] == created[::-1][:3]
        # A run created between pages does not shift the next page.
        late = await client.create("late", model="scripted", script=[turn("late")])
        second = await stub.ListRuns(svc.ListRunsRequest(page_size=3, page_token=first.next_page_token))
        assert [r.run_id for r in second.runs] == created[::-1][3:6]
        third = await stub.ListRuns(svc.ListRunsRequest(page_size=3, page_token=second.next_page_token))
        assert [r.run_id for r in third.runs] == created[:1]
        assert third.next_page_token == ""
        listed = [r.run_id async for r in client.list_runs(labels={"parity": "1"})]
        assert listed == [r for i, r in enumerate(created) if i % 2][::-1]
        done = [r.run_id async for r in client.list_runs(states=["DONE"])]
        await late.wait(timeout=20)
        assert set(done) >= set(created)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListRuns(svc.ListRunsRequest(page_token="12"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_watcher_on_another_replica_hears_events_without_polling(replicas: Replicas) -> None:
    a = await replicas.start(config={"tools": {"permissions": {"double": "ask"}}})
    b = await replicas.start(config={"tools": {"permissions": {"double": "ask"}}})
    async with AsyncEngineClient(f"127.0.0.1:{a.port}") as ca, AsyncEngineClient(f"127.0.0.1:{b.port}") as cb:
        handle = await ca.create(
            "double", model="scripted", script=[turn("", ("double", {"x": 21})), turn("42")]
        )
        # It may execute on either replica; watch it from the one that does not.
        run = await handle.wait(timeout=20)
        assert run.state == "PAUSED"
        executing, watching = (ca, cb) if b.engine._active.get(("default", run.run_id)) is None else (cb, ca)
        watcher_engine = b.engine if watching is cb else a.engine
        reads = 0
        original = watcher_engine.storage.read_state

        async def counting(ws: str, run_id: str) -> dict[str, Any] | None:
            nonlocal reads
            reads += 1
            return await original(ws, run_id)

        watcher_engine.storage.read_state = counting  # type: ignore[method-assign]
        watched = await watching.attach(run.run_id)
        seen = []

        async def watch() -> None:
            async for event in watched.events(after_seq=run.last_seq, follow=True):
                seen.append(event.kind)

        task = asyncio.create_task(watch())
        await asyncio.sleep(0.3)
        before = reads
        await asyncio.sleep(1.5)  # without news a watcher would re-read the paused run's state
        idle_reads = reads - before
        await (await executing.attach(run.run_id)).approve(run.interrupts[0].interrupt_id)
        await asyncio.wait_for(task, 20)
    assert idle_reads == 0
    assert seen[-1] == "run_finished"


async def test_reindex_rebuilds_the_index_from_storage(
    replicas: Replicas, database: str, tmp_path: Path
) -> None:
    server = await replicas.start()
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        handle = await client.create("t", model="scripted", script=[turn("ok")])
        lost = await client.create("lost", model="scripted", script=[turn("ok")])
        await handle.wait(timeout=20)
        await lost.wait(timeout=20)
        await replicas.stop_all()
        conn = await asyncpg.connect(database)
        await conn.execute("DELETE FROM machina_runs WHERE run_id = $1", handle.run_id)
        await conn.close()
        # A run gone from storage behind the index's back (storage restored from an older copy).
        shutil.rmtree(replicas.root / "workspaces" / "default" / "runs" / lost.run_id)
        done = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "engine_service",
                "reindex",
                "--storage",
                str(replicas.root),
                "--control-url",
                database,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "indexed 1 runs; dropped 1 rows" in done.stdout
        again = await replicas.start()
    async with AsyncEngineClient(f"127.0.0.1:{again.port}") as client:
        assert [r.run_id async for r in client.list_runs()] == [handle.run_id]


def test_a_malformed_control_url_is_one_line_without_the_password() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "engine_service", "--control-url", "postgresql://u:hunter2@db:notaport/x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "hunter2" not in done.stderr
    assert "control_url" in lines[0]
    assert "u:***@db" in lines[0]


async def test_health_follows_the_database_and_recovers_by_itself(database: str, tmp_path: Path) -> None:
    """A proxy in front of PostgreSQL is cut and restored: the engine reports NOT_SERVING, then SERVING."""
    host_port = database.split("@", 1)[1].split("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    cut = asyncio.Event()
    links: list[asyncio.StreamWriter] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if cut.is_set():
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        links.extend([writer, up_writer])
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    proxy = await asyncio.start_server(accept, "127.0.0.1", 0)
    proxy_port = proxy.sockets[0].getsockname()[1]
    url = database.replace(host_port, f"127.0.0.1:{proxy_port}")
    from grpc_health.v1 import health_pb2

    from engine_service.api.serving import watch_storage_health
    from engine_service.storage._local import LocalStorage

    control = PostgresControl(url)
    await control.start("test", lambda *_: None)
    statuses: list[int] = []

    class Recorder:
        async def set(self, _name: str, status: int) -> None:
            statuses.append(status)

    watch = asyncio.create_task(
        watch_storage_health(Recorder(), [""], LocalStorage(tmp_path), 30.0, control.available)
    )
    try:
        assert control.available() == ""
        cut.set()
        for link in links:
            link.close()
        for _ in range(100):
            if statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]:
                break
            await asyncio.sleep(0.1)
        assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]
        cut.clear()
        for _ in range(100):
            if len(statuses) == 2:
                break
            await asyncio.sleep(0.1)
        assert statuses[-1] == health_pb2.HealthCheckResponse.SERVING
        assert control.available() == ""
    finally:
        watch.cancel()
        await control.close()
        proxy.close()


async def test_a_deleted_run_leaves_the_index(replicas: Replicas) -> None:
    server = await replicas.start()
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        kept = await client.create("kept", model="scripted", script=[turn("ok")])
        gone = await client.create("gone", model="scripted", script=[turn("ok")])
        await kept.wait(timeout=20)
        await gone.wait(timeout=20)
        await client.delete_run(gone.run_id)
        listed = []
        for _ in range(50):
            listed = [r.run_id async for r in client.list_runs()]
            if listed == [kept.run_id]:
                break
            await asyncio.sleep(0.05)
    assert listed == [kept.run_id]


async def test_the_retention_command_removes_deleted_runs_from_the_index(replicas: Replicas) -> None:
    server = await replicas.start()
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        run = await client.create("expire me", model="scripted", script=[turn("ok")])
        await run.wait(timeout=20)
    await replicas.stop_all()
    await asyncio.sleep(0.2)  # older than the retention period below
    env = {
        **os.environ,
        "MACHINA_STORAGE": str(replicas.root),
        "MACHINA_CONTROL_URL": replicas.database,
        "MACHINA_RETENTION_DAYS": "0.000001",  # about 0.09 s
    }
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "engine_service", "retention"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert run.run_id in done.stdout
    conn = await asyncpg.connect(replicas.database)
    try:
        left = await conn.fetchval("SELECT count(*) FROM machina_runs WHERE run_id = $1", run.run_id)
    finally:
        await conn.close()
    assert left == 0


async def test_retention_reads_only_the_runs_the_index_says_ended_before_the_cutoff(
    replicas: Replicas,
) -> None:
    """With a control plane a retention sweep does not read every run in storage (hourly, on
    every replica): the index names the runs that ended before the cutoff, and only those are
    read (storage still decides)."""
    from machina.engine.v1 import engine_service_pb2 as svc

    clock = FakeClock()
    config = {"retention_days": 1, "retention_interval_s": 0, "tools": {"permissions": {"double": "ask"}}}
    server = await replicas.start(config=config, clock=clock)
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        old = [await client.create(f"old {i}", model="scripted", script=[turn("ok")]) for i in range(3)]
        for handle in old:
            await handle.wait(timeout=20)
        paused = await client.create(
            "ask", model="scripted", script=[turn("", ("double", {"x": 1})), turn("2")]
        )
        assert (await paused.wait(timeout=20)).state == "PAUSED"
        clock.advance(2 * 86_400)
        young = await client.create("young", model="scripted", script=[turn("ok")])
        await young.wait(timeout=20)
        storage = server.engine.storage
        read: list[str] = []
        real_read = storage.read_state

        async def counted(ws: str, run_id: str) -> Any:
            read.append(run_id)
            return await real_read(ws, run_id)

        storage.read_state = counted  # type: ignore[method-assign]
        applied = await client._stub.ApplyRetention(svc.ApplyRetentionRequest())
        assert sorted(applied.run_ids) == sorted(h.run_id for h in old)
        assert set(read) <= {h.run_id for h in old}  # never the paused or the young run
        storage.read_state = real_read  # type: ignore[method-assign]
        for handle in old:
            with pytest.raises(NotFoundError):
                await client.get_run(handle.run_id)
        assert (await client.get_run(paused.run_id)).state == "PAUSED"
        assert (await client.get_run(young.run_id)).state == "DONE"


async def test_callers_learn_the_database_is_away_but_not_where_or_who(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    control = PostgresControl(f"postgresql://ops-user-7f3a@127.0.0.1:{port}/runs", connect_timeout=0.5)
    await control.start("t", lambda *_: None)
    try:
        with pytest.raises(EngineError) as caught:
            await control.active_runs("default")
    finally:
        await control.close()
    assert caught.value.code == "ERR_CONTROL_UNAVAILABLE"
    assert str(port) not in caught.value.message
    assert "ops-user-7f3a" not in caught.value.message
    assert "127.0.0.1" not in caught.value.message


async def test_one_workspaces_sweep_leaves_other_workspaces_slots_alone(database: str) -> None:
    control = PostgresControl(database)
    await control.start("t", lambda *_: None)
    conn = await asyncpg.connect(database)
    try:
        for ws in ("mine", "theirs"):  # a finished run each, whose slot was never released
            await conn.execute(
                "INSERT INTO machina_runs (workspace, run_id, state, created_at, updated_at, doc) "
                "VALUES ($1, 'r1', 'DONE', 0, 0, '{}')",
                ws,
            )
            await conn.execute(
                "INSERT INTO machina_slots (workspace, run_id, owner) VALUES ($1, 'r1', 'x')", ws
            )
        await control.active_runs("mine")  # a tenant's RecoverOrphanedRuns
        left = [r["workspace"] for r in await conn.fetch("SELECT workspace FROM machina_slots")]
        assert left == ["theirs"]
        await control.active_runs(None)  # the engine's own sweep: every workspace
        assert await conn.fetchval("SELECT count(*) FROM machina_slots") == 0
    finally:
        await conn.close()
        await control.close()


async def test_the_recovery_sweep_repairs_a_row_its_dead_writer_left_stale(
    replicas: Replicas, database: str
) -> None:
    server = await replicas.start()
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        run = await (await client.create("t", model="scripted", script=[turn("ok")])).wait(timeout=20)
        assert [r.run_id async for r in client.list_runs(states=["DONE"])] == [run.run_id]  # written
        # As if the replica that finished it died before its last index row was written.
        conn = await asyncpg.connect(database)
        try:
            await conn.execute(
                "UPDATE machina_runs SET state = 'RUNNING', last_seq = 1 WHERE run_id = $1", run.run_id
            )
            assert [r.run_id async for r in client.list_runs(states=["RUNNING"])] == [run.run_id]
            assert await client.recover_orphaned_runs() == []
        finally:
            await conn.close()
        assert [r.run_id async for r in client.list_runs(states=["RUNNING"])] == []
        assert [r.state async for r in client.list_runs()] == ["DONE"]
