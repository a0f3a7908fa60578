"""The storage contract, run against both adapters: local directory and a real S3 server (moto).

Plus fault injection in front of the S3 server: 5xx, throttling, slow answers and
dropped connections, with no torn or lost checkpoint.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine_service import EngineError, LocalStorage, Storage
from engine_service._s3 import S3Storage
from tests.s3_server import FaultyProxy, new_bucket


@pytest.fixture(params=["local", "s3"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    if request.param == "local":
        store: Storage = LocalStorage(tmp_path)
    else:
        endpoint = request.getfixturevalue("moto")
        store = S3Storage(await new_bucket(endpoint), "machina/prod", endpoint_url=endpoint)
    yield store
    await store.close()


async def test_create_is_exclusive(storage: Storage) -> None:
    assert await storage.create_run("ws", "r1", {"task": "a"}, {"state": "QUEUED"})
    assert not await storage.create_run("ws", "r1", {"task": "b"}, {"state": "QUEUED"})
    assert await storage.read_spec("ws", "r1") == {"task": "a"}
    assert await storage.list_runs("ws") == ["r1"]
    assert await storage.list_runs("other") == []


async def test_state_round_trip(storage: Storage) -> None:
    await storage.create_run("ws", "r1", {}, {"n": 0})
    for n in range(20):
        await storage.write_state("ws", "r1", {"n": n, "pad": "x" * 500})
    assert await storage.read_state("ws", "r1") == {"n": 19, "pad": "x" * 500}
    assert await storage.read_state("ws", "missing") is None


async def test_segments_and_uncommitted_tails(storage: Storage) -> None:
    await storage.create_run("ws", "r1", {}, {})
    await storage.write_segment("ws", "r1", "events", 1, [{"seq": i} for i in range(1, 6)])
    await storage.write_segment("ws", "r1", "events", 6, [{"seq": i} for i in range(6, 9)])
    assert [d["seq"] for d in await storage.read_segments("ws", "r1", "events", 3, 8)] == [4, 5, 6, 7, 8]
    # A writer dies after writing 9..12 without committing (state says 8).
    await storage.write_segment("ws", "r1", "events", 9, [{"seq": i, "dead": True} for i in range(9, 13)])
    assert [d["seq"] for d in await storage.read_segments("ws", "r1", "events", 0, 8)] == list(range(1, 9))
    await storage.drop_uncommitted("ws", "r1", "events", 8)
    await storage.write_segment("ws", "r1", "events", 9, [{"seq": 9}])
    read = await storage.read_segments("ws", "r1", "events", 0, 9)
    assert [d["seq"] for d in read] == list(range(1, 10))
    assert not any(d.get("dead") for d in read)


async def test_repair_end_keeps_what_was_written_ahead(storage: Storage) -> None:
    await storage.create_run("ws", "r1", {}, {})
    assert await storage.repair_end("ws", "r1", "events") == 0
    await storage.write_segment("ws", "r1", "events", 1, [{"seq": i} for i in range(1, 6)])
    # Written ahead of any checkpoint (watchers may have seen them): a successor keeps them.
    await storage.write_segment("ws", "r1", "events", 6, [{"seq": i} for i in range(6, 9)])
    assert await storage.repair_end("ws", "r1", "events") == 8
    await storage.write_segment("ws", "r1", "events", 9, [{"seq": 9}])
    assert [d["seq"] for d in await storage.read_segments("ws", "r1", "events", 0, 9)] == list(range(1, 10))
    assert await storage.repair_end("ws", "r1", "events") == 9


async def test_put_if_absent_has_one_winner(storage: Storage) -> None:
    results = await asyncio.gather(*(storage.put_if_absent("ws", "req-1", {"n": n}) for n in range(8)))
    winners = [r for r in results if r is None]
    assert len(winners) == 1
    assert len({str(r) for r in results if r is not None}) == 1


async def test_lease_one_owner_at_a_time(storage: Storage) -> None:
    await storage.create_run("ws", "r1", {}, {})
    assert await storage.acquire_lease("ws", "r1", "a", ttl=30)
    assert not await storage.acquire_lease("ws", "r1", "b", ttl=30)
    assert await storage.acquire_lease("ws", "r1", "a", ttl=30)
    await storage.create_run("ws", "r2", {}, {})
    outcomes = await asyncio.gather(*(storage.acquire_lease("ws", "r2", f"o{i}", ttl=30) for i in range(6)))
    assert sum(outcomes) == 1
    await storage.release_lease("ws", "r1", "a")
    assert await storage.acquire_lease("ws", "r1", "b", ttl=0.05)
    await asyncio.sleep(0.1)
    assert await storage.acquire_lease("ws", "r1", "c", ttl=30)


async def test_blobs_and_shared_documents(storage: Storage) -> None:
    await storage.create_run("ws", "r1", {}, {})
    await storage.put_blob("ws", "r1", "result-abc", b"\x00binary\xff")
    assert await storage.get_blob("ws", "r1", "result-abc") == b"\x00binary\xff"
    assert await storage.get_blob("ws", "r1", "nope") is None
    await storage.put_shared("mcp-time", {"tools": []})
    assert await storage.get_shared("mcp-time") == {"tools": []}


@pytest.mark.parametrize("bad", ["../x", "", "a/b", ".hidden", "x" * 200, "a\\b", "%2e%2e"])
async def test_keys_can_never_escape_the_prefix(storage: Storage, bad: str) -> None:
    with pytest.raises(EngineError):
        await storage.read_state(bad, "r1")
    with pytest.raises(EngineError):
        await storage.read_state("ws", bad)
    with pytest.raises(EngineError):
        await storage.put_blob("ws", "r1", bad, b"x")


@pytest.mark.parametrize(
    "pattern",
    [
        ["500", *["ok"] * 4],
        ["503", *["ok"] * 4],
        [*["ok"] * 5, "slow"],
        ["ok", "drop", "ok", "ok"],
        ["500", *["ok"] * 3, "503", *["ok"] * 3, "slow", *["ok"] * 3, "drop", *["ok"] * 3],
    ],
    ids=["5xx", "throttling", "slow", "dropped", "mixed"],
)
async def test_checkpoints_survive_storage_faults(moto: str, pattern: list[str]) -> None:
    bucket = await new_bucket(moto)
    proxy = FaultyProxy(moto, pattern, delay=1.2)
    await proxy.start()
    faulty = S3Storage(bucket, "p", endpoint_url=proxy.url, timeout_s=0.8)
    clean = S3Storage(bucket, "p", endpoint_url=moto)
    try:
        assert await faulty.create_run("ws", "r1", {"task": "t"}, {"last_seq": 0})
        assert await faulty.acquire_lease("ws", "r1", "writer", ttl=60)
        seq = 0
        for checkpoint in range(8):
            events = [{"seq": seq + i + 1, "checkpoint": checkpoint} for i in range(3)]
            await faulty.write_segment("ws", "r1", "events", seq + 1, events)
            seq += len(events)
            await faulty.write_state("ws", "r1", {"last_seq": seq, "checkpoint": checkpoint})
            # A reader never sees a torn or half-written state.json.
            state = await clean.read_state("ws", "r1")
            assert state == {"last_seq": seq, "checkpoint": checkpoint}
        assert await faulty.acquire_lease("ws", "r1", "writer", ttl=60)
        assert await faulty.put_if_absent("ws", "req-9", {"run_id": "r1"}) is None
        assert await faulty.put_if_absent("ws", "req-9", {"run_id": "other"}) == {"run_id": "r1"}
    finally:
        await faulty.close()
        await proxy.stop()
    read = await clean.read_segments("ws", "r1", "events", 0, seq)
    assert [d["seq"] for d in read] == list(range(1, seq + 1))
    await clean.close()
    assert sum(proxy.counts.get(f, 0) for f in pattern if f != "ok") > 0
