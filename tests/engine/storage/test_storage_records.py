"""How records are encoded and read back: orjson, files of earlier versions, records that stand
for several indexes (a run's text deltas written together), leases and snapshot blobs (the local
commit log and what fsync mode syncs: test_commit_log.py)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from engine_service import LocalStorage, Storage
from engine_service.storage._records import dump_lines, dumps, loads, span
from engine_service.storage._s3 import S3Storage
from tests.s3_server import new_bucket


@pytest.fixture(params=["local", "s3"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    if request.param == "local":
        store: Storage = LocalStorage(tmp_path)
    else:
        endpoint = request.getfixturevalue("moto")
        store = S3Storage(await new_bucket(endpoint), "machina/prod", endpoint_url=endpoint)
    yield store
    await store.close()


def test_records_are_compact_utf8_json_that_the_standard_library_reads() -> None:
    doc = {"seq": 1, "t": 1.5, "k": "text_delta", "d": {"text": 'héllo 😀 "q"', "turn": 1}}
    assert dumps(doc) == json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    assert json.loads(dumps(doc)) == doc
    assert loads(dumps(doc)) == doc


def test_what_orjson_refuses_goes_through_the_standard_library() -> None:
    doc = {"big": 1 << 70, "tuple": [1, 2]}
    assert loads(dumps(doc)) == doc
    assert dump_lines([{"a": 1}, {"b": 1 << 70}]) == b'{"a":1}\n{"b":' + str(1 << 70).encode() + b"}\n"
    assert loads(b'{"x": NaN}')["x"] != loads(b'{"x": NaN}')["x"]  # NaN, as earlier versions wrote it


def test_a_records_span_is_read_from_its_first_bytes() -> None:
    assert span(b'{"seq":12,"n":40,"t":1.0,"k":"text_delta","d":{}}\n') == 40
    assert span(b'{"seq":12,"t":1.0,"k":"usage","d":{"n":5}}\n') == 1
    assert span(b'{"role":"user","text":"{\\"seq\\":1,\\"n\\":9}"}\n') == 1
    assert span(b'{"seq":1}\n') == 1


async def test_an_event_log_written_by_an_earlier_version_reads_back(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await storage.create_run("ws", "r1", {}, {})
    directory = tmp_path / "workspaces" / "ws" / "runs" / "r1" / "events"
    directory.mkdir()
    old = [{"seq": n, "t": 1.0, "k": "text_delta", "d": {"text": f"é{n}", "turn": 1}} for n in (1, 2)]
    with open(directory / "000000000001.jsonl", "w", encoding="utf-8") as fh:
        for doc in old:
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")  # spaced, as json.dumps writes
    assert await storage.read_segments("ws", "r1", "events", 0, 2) == old
    assert await storage.repair_end("ws", "r1", "events") == 2
    await storage.close()


def _deltas(seq: int, n: int) -> dict[str, Any]:
    return {"seq": seq, "n": n, "t": 1.0, "k": "text_delta", "d": {"texts": [str(seq + i) for i in range(n)]}}


async def test_records_of_several_indexes_count_as_that_many(storage: Storage) -> None:
    await storage.create_run("ws", "r1", {}, {})
    one, many, last = {"seq": 1, "k": "run_started"}, _deltas(2, 5), {"seq": 7, "k": "usage"}
    await storage.write_segment("ws", "r1", "events", 1, [one, many])
    await storage.write_segment("ws", "r1", "events", 7, [last])  # follows index 6, not 3
    assert await storage.read_segments("ws", "r1", "events", 0, 7) == [one, many, last]
    # A range that starts inside a record returns that whole record.
    for after in range(1, 6):
        assert await storage.read_segments("ws", "r1", "events", after, 7) == [many, last]
    assert await storage.read_segments("ws", "r1", "events", 6, 7) == [last]
    assert await storage.read_segments("ws", "r1", "events", 0, 3) == [one, many]
    assert await storage.repair_end("ws", "r1", "events") == 7
    await storage.drop_uncommitted("ws", "r1", "events", 6)
    assert await storage.repair_end("ws", "r1", "events") == 6
    assert await storage.read_segments("ws", "r1", "events", 0, 10) == [one, many]


async def test_without_fsync_nothing_is_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "fdatasync", calls.append)
    monkeypatch.setattr(os, "fsync", calls.append)
    storage = LocalStorage(tmp_path)
    await storage.create_run("ws", "r1", {}, {})
    await storage.write_segment("ws", "r1", "events", 1, [{"seq": 1}])
    await storage.write_state("ws", "r1", {"last_seq": 1})
    await storage.acquire_lease("ws", "r1", "me", 30)
    await storage.close()
    assert calls == []


async def test_the_lease_is_rewritten_in_place_and_a_torn_one_reads_as_none(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, fsync=True)
    await storage.create_run("ws", "r1", {}, {})
    lease = tmp_path / "workspaces" / "ws" / "runs" / "r1" / "lease.json"
    assert await storage.acquire_lease("ws", "r1", "a-longer-owner-name", 30)
    inode = lease.stat().st_ino
    assert await storage.acquire_lease("ws", "r1", "a-longer-owner-name", 30)
    assert lease.stat().st_ino == inode
    assert not await storage.acquire_lease("ws", "r1", "b", 30)
    await storage.release_lease("ws", "r1", "a-longer-owner-name")
    assert await storage.acquire_lease("ws", "r1", "b", 30)
    assert json.loads(lease.read_bytes())["owner"] == "b"  # no tail of the longer name left
    lease.write_bytes(b'{"owner":"b","expi')  # torn by a power loss
    assert await storage.acquire_lease("ws", "r1", "c", 30)
    await storage.close()


async def test_the_snapshot_cache_is_rewritten_in_place_and_a_torn_one_reads_as_none(tmp_path: Path) -> None:
    from engine_service.storage._workdir_snapshot import WorkdirSnapshots

    storage = LocalStorage(tmp_path / "storage")
    await storage.create_run("ws", "r1", {}, {})
    workdir = tmp_path / "work" / "ws" / "r1"
    workdir.mkdir(parents=True)
    (workdir / "a.txt").write_text("one")
    digest = await WorkdirSnapshots(tmp_path / "work", 1 << 20).save(storage, "ws", "r1", workdir)
    cache = next((tmp_path / "work" / "ws").glob("*/r1.json"))
    inode = cache.stat().st_ino
    (workdir / "a.txt").write_text("two")
    assert await WorkdirSnapshots(tmp_path / "work", 1 << 20).save(storage, "ws", "r1", workdir) != digest
    assert cache.stat().st_ino == inode
    assert WorkdirSnapshots(tmp_path / "work", 1 << 20)._get("ws", "r1").digest  # read back by a new process
    cache.write_bytes(cache.read_bytes()[:-20])  # torn
    assert not WorkdirSnapshots(tmp_path / "work", 1 << 20)._get("ws", "r1").digest
    await storage.close()


async def test_a_run_taken_back_untouched_skips_rereading_its_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine_service.storage._local as local

    storage, other = LocalStorage(tmp_path), LocalStorage(tmp_path)
    await storage.create_run("ws", "r1", {}, {})
    assert await storage.acquire_lease("ws", "r1", "me", 30)
    await storage.write_segment("ws", "r1", "events", 1, [{"seq": 1}, _deltas(2, 3)])
    await storage.write_segment("ws", "r1", "transcript", 1, [{"role": "user"}])
    await storage.release_lease("ws", "r1", "me")

    reads: list[Path] = []
    real = local._truncate_after

    def counting(path: Path, keep: int) -> int:
        reads.append(path)
        return real(path, keep)

    monkeypatch.setattr(local, "_truncate_after", counting)
    assert await storage.acquire_lease("ws", "r1", "me", 30)
    assert await storage.repair_end("ws", "r1", "events") == 4
    await storage.drop_uncommitted("ws", "r1", "transcript", 1)
    assert reads == []  # nobody wrote since this process left them
    await storage.release_lease("ws", "r1", "me")
    assert await storage.acquire_lease("ws", "r1", "me", 30)  # and again: what it learnt carries over
    assert await storage.repair_end("ws", "r1", "events") == 4
    assert reads == []
    await storage.release_lease("ws", "r1", "me")

    assert await other.acquire_lease("ws", "r1", "someone-else", 30)  # another writer came by
    await other.release_lease("ws", "r1", "someone-else")
    assert await storage.acquire_lease("ws", "r1", "me", 30)
    assert await storage.repair_end("ws", "r1", "events") == 4
    assert len(reads) == 1  # read again
    await storage.close()
    await other.close()


async def test_a_state_write_goes_on_after_states_another_writer_added(tmp_path: Path) -> None:
    first, second = LocalStorage(tmp_path), LocalStorage(tmp_path)
    await first.create_run("ws", "r1", {}, {"n": 0})
    await first.write_state("ws", "r1", {"n": 1})
    await second.write_state("ws", "r1", {"n": 2})  # it took the run over
    await first.write_state("ws", "r1", {"n": 3})  # its next number is taken: it goes after
    assert await LocalStorage(tmp_path).read_state("ws", "r1") == {"n": 3}
    await first.close()
    await second.close()


async def test_a_snapshot_blob_torn_by_a_crash_is_rewritten_whole(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await storage.create_run("ws", "r1", {}, {})
    name = "wd-" + "ab" * 32
    await storage.put_blob("ws", "r1", name, b"whole content")
    blob = tmp_path / "workspaces" / "ws" / "runs" / "r1" / "blobs" / name
    blob.write_bytes(b"whole")  # a process died while writing it
    await storage.put_blob("ws", "r1", name, b"whole content")  # the next save writes it again
    assert await storage.get_blob("ws", "r1", name) == b"whole content"
    assert not [p for p in blob.parent.iterdir() if p.name.endswith(".tmp")]
    await storage.close()
