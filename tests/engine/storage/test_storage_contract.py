"""The storage contract, run against both adapters: local directory and a real S3 server (moto).

Plus fault injection in front of the S3 server: 5xx, throttling, slow answers and
dropped connections, with no torn or lost checkpoint.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from engine_service import EngineError, LocalStorage, Storage
from engine_service.storage._protocol import Checkpoint
from engine_service.storage._s3 import S3Storage
from engine_service.storage._workdir_snapshot import WorkdirSnapshots, WorkdirTooLarge
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


async def test_a_checkpoint_commits_its_transcript_blobs_and_state(storage: Storage) -> None:
    await storage.create_run("ws", "r1", {}, {"transcript_len": 0})
    entries = [{"role": "user", "text": f"m{i}"} for i in range(1, 4)]
    first = Checkpoint({"transcript_len": 3, "n": 1}, 1, entries, {"agent-a-transcript": b"[1]"})
    await storage.commit("ws", "r1", first)
    # A commit that raised is retried with the same checkpoint: nothing is doubled.
    await storage.commit("ws", "r1", first)
    await storage.commit("ws", "r1", Checkpoint({"transcript_len": 4, "n": 2}, 4, [{"text": "m4"}]))
    await storage.commit("ws", "r1", Checkpoint({"transcript_len": 4, "n": 3}))
    assert await storage.read_state("ws", "r1") == {"transcript_len": 4, "n": 3}
    read = await storage.read_segments("ws", "r1", "transcript", 0, 4)
    assert [d["text"] for d in read] == ["m1", "m2", "m3", "m4"]
    assert await storage.get_blob("ws", "r1", "agent-a-transcript") == b"[1]"


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


async def test_a_lease_is_renewed_only_while_its_owner_still_holds_it(storage: Storage) -> None:
    await storage.create_run("ws", "r1", {}, {})
    assert not await storage.renew_lease("ws", "r1", "a", ttl=30)  # never taken
    assert await storage.acquire_lease("ws", "r1", "a", ttl=0.05)
    assert await storage.renew_lease("ws", "r1", "a", ttl=0.05)
    await asyncio.sleep(0.1)
    assert await storage.renew_lease("ws", "r1", "a", ttl=30)  # expired, but nobody took it
    assert not await storage.acquire_lease("ws", "r1", "b", ttl=30)
    assert not await storage.renew_lease("ws", "r1", "b", ttl=30)
    await storage.release_lease("ws", "r1", "a")
    assert not await storage.renew_lease("ws", "r1", "a", ttl=30)  # given up
    # Taken by another owner, even one that gave it up again: never renewed by the first.
    assert await storage.acquire_lease("ws", "r1", "b", ttl=30)
    assert not await storage.renew_lease("ws", "r1", "a", ttl=30)
    await storage.release_lease("ws", "r1", "b")
    assert not await storage.renew_lease("ws", "r1", "a", ttl=30)
    assert await storage.acquire_lease("ws", "r1", "c", ttl=30)
    assert not await storage.renew_lease("ws", "missing", "a", ttl=30)


async def test_blobs_and_shared_documents(storage: Storage) -> None:
    await storage.create_run("ws", "r1", {}, {})
    await storage.put_blob("ws", "r1", "result-abc", b"\x00binary\xff")
    assert await storage.get_blob("ws", "r1", "result-abc") == b"\x00binary\xff"
    assert await storage.get_blob("ws", "r1", "nope") is None
    await storage.put_shared("mcp-time", {"tools": []})
    assert await storage.get_shared("mcp-time") == {"tools": []}


async def test_workspace_documents(storage: Storage) -> None:
    assert await storage.put_doc("ws", "threads/t1", {"n": 1}, create_only=True)
    assert not await storage.put_doc("ws", "threads/t1", {"n": 2}, create_only=True)
    assert await storage.get_doc("ws", "threads/t1") == {"n": 1}
    assert await storage.put_doc("ws", "threads/t1", {"n": 3})
    assert await storage.get_doc("ws", "threads/t1") == {"n": 3}
    await storage.put_doc("ws", "thread-runs/t1/00000002", {"run_id": "b"})
    await storage.put_doc("ws", "thread-runs/t1/00000001", {"run_id": "a"})
    await storage.put_doc("ws", "thread-runs/t10/00000001", {"run_id": "c"})
    assert await storage.list_docs("ws", "thread-runs/t1") == [
        "thread-runs/t1/00000001",
        "thread-runs/t1/00000002",
    ]
    assert await storage.list_docs("ws", "threads") == ["threads/t1"]
    assert await storage.list_docs("other", "threads") == []
    await storage.delete_doc("ws", "thread-runs/t1/00000001")
    await storage.delete_doc("ws", "thread-runs/t1/00000001")  # gone already: nothing happens
    assert await storage.get_doc("ws", "thread-runs/t1/00000001") is None
    assert await storage.list_docs("ws", "thread-runs/t1") == ["thread-runs/t1/00000002"]
    for bad in ("../x", "a//b", "", "a/../b", "/a"):
        with pytest.raises(EngineError):
            await storage.put_doc("ws", bad, {})


async def test_creating_a_document_has_one_winner(storage: Storage) -> None:
    results = await asyncio.gather(
        *(storage.put_doc("ws", "slots/x/00000001", {"by": n}, create_only=True) for n in range(8))
    )
    assert results.count(True) == 1
    winner = next(n for n, won in enumerate(results) if won)
    assert await storage.get_doc("ws", "slots/x/00000001") == {"by": winner}


async def test_delete_run_removes_every_object_of_it(storage: Storage) -> None:
    for run_id in ("r1", "r2"):
        await storage.create_run("ws", run_id, {}, {"state": "DONE"})
        await storage.write_segment("ws", run_id, "events", 1, [{"seq": 1}])
        await storage.write_segment("ws", run_id, "transcript", 1, [{"role": "user"}])
        await storage.put_blob("ws", run_id, "wd-abc", b"x")
        assert await storage.acquire_lease("ws", run_id, "me", 30)
    await storage.put_if_absent("ws", "req-1", {"run_id": "r1"})
    await storage.delete_run("ws", "r1")
    await storage.delete_request_key("ws", "req-1")
    assert await storage.read_state("ws", "r1") is None
    assert await storage.read_segments("ws", "r1", "events", 0, 1) == []
    assert await storage.get_blob("ws", "r1", "wd-abc") is None
    assert await storage.list_runs("ws") == ["r2"]
    assert await storage.put_if_absent("ws", "req-1", {"run_id": "r3"}) is None  # the key is free again
    assert await storage.read_segments("ws", "r2", "events", 0, 1) == [{"seq": 1}]
    await storage.delete_run("ws", "r1")  # nothing left: nothing happens
    if isinstance(storage, LocalStorage):
        assert not (storage.root / "workspaces" / "ws" / "runs" / "r1").exists()


@pytest.mark.parametrize("bad", ["../x", "", "a/b", ".hidden", "x" * 200, "a\\b", "%2e%2e"])
async def test_keys_can_never_escape_the_prefix(storage: Storage, bad: str) -> None:
    with pytest.raises(EngineError):
        await storage.read_state(bad, "r1")
    with pytest.raises(EngineError):
        await storage.read_state("ws", bad)
    with pytest.raises(EngineError):
        await storage.put_blob("ws", "r1", bad, b"x")


@pytest.mark.slow
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


# -- run directories carried in storage (engine_service/storage/_workdir_snapshot.py) -------------------


class CountingStorage:
    """Delegates to a storage and records the names of the blobs it is asked to store."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.stored: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put_blob(self, ws: str, run_id: str, name: str, data: bytes) -> None:
        self.stored.append(name)
        await self.inner.put_blob(ws, run_id, name, data)


def tree(root: Path) -> dict[str, Any]:
    """Every entry under ``root`` as the snapshot sees it: files by content and mode, links, dirs."""
    out: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            out[rel] = "dir"
        elif path.is_file():
            out[rel] = (path.read_bytes(), path.stat().st_mode & 0o777)
        else:
            out[rel] = "special"
    return out


def host(root: Path, max_bytes: int = 1 << 20) -> tuple[WorkdirSnapshots, Path]:
    """One process's snapshots and the run directory ``r1`` under its own workdir root."""
    return WorkdirSnapshots(root, max_bytes), root / "ws" / "r1"


async def test_a_run_directory_follows_the_run_to_another_host(storage: Storage, tmp_path: Path) -> None:
    await storage.create_run("ws", "r1", {}, {})
    a, dir_a = host(tmp_path / "a")
    b, dir_b = host(tmp_path / "b")
    (dir_a / "src" / "empty").mkdir(parents=True)
    (dir_a / "src" / "main.py").write_text("print('hi')\n")
    (dir_a / "run.sh").write_text("#!/bin/sh\n")
    (dir_a / "run.sh").chmod(0o755)
    (dir_a / "data.bin").write_bytes(bytes(range(256)) * 10)
    (dir_a / "same.txt").write_text("twice")
    (dir_a / "copy.txt").write_text("twice")
    (dir_a / "inside").symlink_to("src/main.py")
    (dir_a / "outside").symlink_to("/etc/passwd")
    (dir_a / "src" / "up").symlink_to("../../..")
    os.mkfifo(dir_a / "fifo")
    digest = await a.save(storage, "ws", "r1", dir_a)
    await b.restore(storage, "ws", "r1", dir_b, digest)
    expected = {k: v for k, v in tree(dir_a).items() if k not in ("outside", "src/up", "fifo")}
    assert tree(dir_b) == expected


async def test_only_changed_files_are_stored_and_removals_follow(storage: Storage, tmp_path: Path) -> None:
    await storage.create_run("ws", "r1", {}, {})
    counting = CountingStorage(storage)
    store = cast(Storage, counting)
    a, dir_a = host(tmp_path / "a")
    b, dir_b = host(tmp_path / "b")
    (dir_a / "d").mkdir(parents=True)
    for i in range(20):
        (dir_a / "d" / f"f{i}.txt").write_text(f"file {i}")
    (dir_a / "gone.txt").write_text("removed on b")
    first = await a.save(store, "ws", "r1", dir_a)
    assert len(counting.stored) == 22  # 21 files and the manifest
    counting.stored.clear()
    assert await a.save(store, "ws", "r1", dir_a) == first
    assert counting.stored == []  # unchanged: nothing read, nothing stored
    await b.restore(store, "ws", "r1", dir_b, first)
    # On b: one file changed, one removed, a directory removed, one added.
    (dir_b / "d" / "f3.txt").write_text("changed on b")
    (dir_b / "gone.txt").unlink()
    (dir_b / "new").mkdir()
    (dir_b / "new" / "n.txt").write_text("new on b")
    second = await b.save(store, "ws", "r1", dir_b)
    assert len(counting.stored) == 3  # two new contents and the manifest
    # Back on a, where a person dropped a file in meanwhile: it stays.
    (dir_a / "mine.txt").write_text("local only")
    shutil.rmtree(dir_b / "new")
    third = await b.save(store, "ws", "r1", dir_b)
    await a.restore(store, "ws", "r1", dir_a, second)
    assert (dir_a / "new" / "n.txt").read_text() == "new on b"
    await a.restore(store, "ws", "r1", dir_a, third)
    assert tree(dir_a) == {**tree(dir_b), "mine.txt": (b"local only", 0o644)}
    # A process that restarts on a's disk knows what it last synced to: nothing to fetch.
    again, _ = host(tmp_path / "a")
    counting.stored.clear()
    assert await again.save(store, "ws", "r1", dir_a) != third  # mine.txt joins the snapshot
    mine = hashlib.sha256(b"local only").hexdigest()
    assert counting.stored[0] == f"wd-{mine}"
    assert len(counting.stored) == 2  # and the manifest: no other file was read again


async def test_a_directory_past_the_cap_is_refused(storage: Storage, tmp_path: Path) -> None:
    await storage.create_run("ws", "r1", {}, {})
    snapshots, workdir = host(tmp_path / "a", max_bytes=1000)
    workdir.mkdir(parents=True)
    (workdir / "small.txt").write_text("x" * 600)
    await snapshots.save(storage, "ws", "r1", workdir)
    (workdir / "more.txt").write_text("y" * 600)
    with pytest.raises(WorkdirTooLarge) as info:
        await snapshots.save(storage, "ws", "r1", workdir)
    assert info.value.code == "ERR_WORKDIR_TOO_LARGE"
    assert info.value.metadata == {"size": "1200", "max_bytes": "1000"}


HOSTILE_PATHS = ["../escape.txt", "/tmp/abs.txt", "a/../../escape.txt", "./x", "a//b", "", "nul\x00"]


async def test_a_hostile_manifest_writes_nothing_outside(storage: Storage, tmp_path: Path) -> None:
    await storage.create_run("ws", "r1", {}, {})
    content = b"payload"
    sha = hashlib.sha256(content).hexdigest()
    await storage.put_blob("ws", "r1", f"wd-{sha}", content)
    file = {"sha256": sha, "size": len(content), "mode": 0o644}
    entries: dict[str, Any] = dict.fromkeys(HOSTILE_PATHS, file)
    entries.update({"ok.txt": file, "up": {"link": "../../../etc"}, "abs": {"link": "/etc/passwd"}})
    manifest = json.dumps({"v": 1, "entries": entries}, sort_keys=True).encode()
    digest = hashlib.sha256(manifest).hexdigest()
    await storage.put_blob("ws", "r1", f"wdm-{digest}", manifest)
    snapshots, workdir = host(tmp_path / "host" / "root")
    await snapshots.restore(storage, "ws", "r1", workdir, digest)
    assert tree(workdir) == {"ok.txt": (content, 0o644)}
    written = [p for p in (tmp_path / "host").rglob("*") if p.is_file()]
    assert [p.name for p in written if ".snapshots" not in p.parts] == ["ok.txt"]
