"""The storage contract, against the local adapter (the S3 adapter will run the same tests)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine_service import EngineError, LocalStorage
from engine_service.storage._local import SEGMENT_RECORDS
from engine_service.storage._protocol import segment_starts


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[LocalStorage]:
    storage = LocalStorage(tmp_path)
    yield storage
    await storage.close()


async def test_create_is_exclusive(storage: LocalStorage) -> None:
    assert await storage.create_run("ws", "r1", {"task": "a"}, {"state": "QUEUED"})
    assert not await storage.create_run("ws", "r1", {"task": "b"}, {"state": "QUEUED"})
    assert await storage.read_spec("ws", "r1") == {"task": "a"}


async def test_state_writes_are_atomic_and_leave_no_temp_files(storage: LocalStorage, tmp_path: Path) -> None:
    await storage.create_run("ws", "r1", {}, {"n": 0})
    for n in range(50):
        await storage.write_state("ws", "r1", {"n": n, "pad": "x" * 1000})
    assert await storage.read_state("ws", "r1") == {"n": 49, "pad": "x" * 1000}
    run_dir = tmp_path / "workspaces" / "ws" / "runs" / "r1"
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    json.loads((run_dir / "state.json").read_text())


async def test_segments_read_back_exact_ranges(storage: LocalStorage) -> None:
    await storage.create_run("ws", "r1", {}, {})
    await storage.write_segment("ws", "r1", "events", 1, [{"seq": i} for i in range(1, 6)])
    await storage.write_segment("ws", "r1", "events", 6, [{"seq": i} for i in range(6, 9)])
    await storage.write_segment("ws", "r1", "events", 9, [{"seq": 9}])
    read = await storage.read_segments("ws", "r1", "events", 3, 9)
    assert [d["seq"] for d in read] == [4, 5, 6, 7, 8, 9]
    assert [d["seq"] for d in await storage.read_segments("ws", "r1", "events", 0, 7)] == list(range(1, 8))
    assert await storage.read_segments("ws", "r1", "events", 9, 9) == []


async def test_uncommitted_records_are_ignored_then_dropped(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await storage.create_run("ws", "r1", {}, {})
    await storage.write_segment("ws", "r1", "events", 1, [{"seq": 1, "v": "ok"}, {"seq": 2, "v": "ok"}])
    # The writer appends 3..6 but dies before committing them (state says 2).
    await storage.write_segment("ws", "r1", "events", 3, [{"seq": i, "v": "dead"} for i in range(3, 7)])
    await storage.close()
    assert [d["v"] for d in await storage.read_segments("ws", "r1", "events", 0, 2)] == ["ok", "ok"]
    # The next writer drops the uncommitted tail, then continues from 3.
    successor = LocalStorage(tmp_path)
    await successor.drop_uncommitted("ws", "r1", "events", 2)
    await successor.write_segment("ws", "r1", "events", 3, [{"seq": 3, "v": "new"}])
    assert [d["v"] for d in await successor.read_segments("ws", "r1", "events", 0, 3)] == ["ok", "ok", "new"]
    await successor.close()


async def test_a_torn_last_line_is_dropped(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await storage.create_run("ws", "r1", {}, {})
    await storage.write_segment("ws", "r1", "events", 1, [{"seq": 1}])
    await storage.close()
    segment = tmp_path / "workspaces" / "ws" / "runs" / "r1" / "events" / "000000000001.jsonl"
    with open(segment, "a") as fh:
        fh.write('{"seq": 2, "torn')
    await storage.drop_uncommitted("ws", "r1", "events", 1)
    await storage.write_segment("ws", "r1", "events", 2, [{"seq": 2}])
    assert [d["seq"] for d in await storage.read_segments("ws", "r1", "events", 0, 2)] == [1, 2]
    await storage.close()


async def test_repair_end_drops_only_a_torn_last_line(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await storage.create_run("ws", "r1", {}, {})
    await storage.write_segment("ws", "r1", "events", 1, [{"seq": 1}, {"seq": 2}])
    await storage.write_segment("ws", "r1", "events", 3, [{"seq": 3}])
    await storage.close()
    segment = tmp_path / "workspaces" / "ws" / "runs" / "r1" / "events" / "000000000001.jsonl"
    with open(segment, "a") as fh:
        fh.write('{"seq": 4, "torn')  # a crash in the middle of a write
    successor = LocalStorage(tmp_path)
    assert await successor.repair_end("ws", "r1", "events") == 3
    await successor.write_segment("ws", "r1", "events", 4, [{"seq": 4}])
    assert [d["seq"] for d in await successor.read_segments("ws", "r1", "events", 0, 4)] == [1, 2, 3, 4]
    await successor.close()


async def test_segments_roll_over_and_stay_numbered(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await storage.create_run("ws", "r1", {}, {})
    total = SEGMENT_RECORDS * 2 + 10
    for first in range(1, total + 1, 100):
        last = min(first + 99, total)
        await storage.write_segment("ws", "r1", "events", first, [{"seq": i} for i in range(first, last + 1)])
    names = sorted(p.name for p in (tmp_path / "workspaces" / "ws" / "runs" / "r1" / "events").iterdir())
    assert len(segment_starts(names)) == 3
    read = await storage.read_segments("ws", "r1", "events", SEGMENT_RECORDS - 5, SEGMENT_RECORDS + 5)
    assert [d["seq"] for d in read] == list(range(SEGMENT_RECORDS - 4, SEGMENT_RECORDS + 6))
    await storage.close()


@pytest.mark.parametrize("bad", ["../x", "", "a/b", ".hidden", "x" * 200, "ü"])
async def test_ids_can_never_escape_the_workspace(storage: LocalStorage, bad: str) -> None:
    with pytest.raises(EngineError):
        await storage.read_state(bad, "r1")
    with pytest.raises(EngineError):
        await storage.read_state("ws", bad)
    with pytest.raises(EngineError):
        await storage.put_if_absent("ws", bad, {})


async def test_put_if_absent_has_one_winner(storage: LocalStorage) -> None:
    results = await asyncio.gather(*(storage.put_if_absent("ws", "req-1", {"n": n}) for n in range(10)))
    assert sum(r is None for r in results) == 1
    assert len({json.dumps(r) for r in results if r is not None}) == 1


async def test_lease_one_owner_at_a_time_and_expiry(storage: LocalStorage) -> None:
    await storage.create_run("ws", "r1", {}, {})
    assert await storage.acquire_lease("ws", "r1", "a", ttl=30)
    assert not await storage.acquire_lease("ws", "r1", "b", ttl=30)
    assert await storage.acquire_lease("ws", "r1", "a", ttl=30)  # renewal
    await storage.release_lease("ws", "r1", "b")  # not b's to release
    assert not await storage.acquire_lease("ws", "r1", "b", ttl=30)
    await storage.release_lease("ws", "r1", "a")
    assert await storage.acquire_lease("ws", "r1", "b", ttl=0.01)
    await asyncio.sleep(0.05)
    assert await storage.acquire_lease("ws", "r1", "a", ttl=30)  # b's lease expired


async def test_fsync_mode_round_trips(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, fsync=True)
    await storage.create_run("ws", "r1", {"a": 1}, {"b": 2})
    await storage.write_segment("ws", "r1", "transcript", 1, [{"role": "user"}])
    assert await storage.read_segments("ws", "r1", "transcript", 0, 1) == [{"role": "user"}]
    await storage.close()


# -- torn segments: a failed append, and a segment torn on purpose --------------------------------


async def test_a_segment_torn_on_purpose_reads_back_whole_records(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await storage.create_run("ws", "r1", {}, {})
    await storage.write_segment("ws", "r1", "events", 1, [{"seq": 1}, {"seq": 2}])
    await storage.close()
    segment = tmp_path / "workspaces" / "ws" / "runs" / "r1" / "events" / "000000000001.jsonl"
    with open(segment, "ab") as fh:
        fh.write(b'{"seq":3,"torn')  # a writer died in the middle of an append
    storage = LocalStorage(tmp_path)
    # Readers stop at the torn record (never fail, never repeat); the writer appends after the cut.
    assert await storage.read_segments("ws", "r1", "events", 0, 5) == [{"seq": 1}, {"seq": 2}]
    await storage.write_segment("ws", "r1", "events", 3, [{"seq": 3}, {"seq": 4}])
    assert await storage.read_segments("ws", "r1", "events", 0, 4) == [{"seq": n} for n in range(1, 5)]
    assert await storage.read_segments("ws", "r1", "events", 2, 4) == [{"seq": 3}, {"seq": 4}]
    await storage.close()


@pytest.mark.slow
async def test_an_append_that_fails_on_a_full_disk_is_cut_back_then_retried(tmp_path: Path) -> None:
    from tests.fs_faults import fill, small_tmpfs

    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        storage = LocalStorage(disk / "store")
        await storage.create_run("ws", "r1", {}, {})
        await storage.write_segment("ws", "r1", "events", 1, [{"seq": 1}])
        filler = fill(disk)
        big = [{"seq": n, "pad": "x" * 4000} for n in range(2, 40)]  # more than a page: partly written
        with pytest.raises(OSError, match="No space left"):
            await storage.write_segment("ws", "r1", "events", 2, big)
        assert await storage.read_segments("ws", "r1", "events", 0, 100) == [{"seq": 1}]
        filler.unlink()
        await storage.write_segment("ws", "r1", "events", 2, big)  # the same batch, retried
        assert await storage.read_segments("ws", "r1", "events", 0, 100) == [{"seq": 1}, *big]
        assert await storage.repair_end("ws", "r1", "events") == 39
        await storage.close()
