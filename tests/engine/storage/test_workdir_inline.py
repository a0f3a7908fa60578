"""Small run directories travel in the checkpoint itself: small files inside the manifest, a small
manifest inside the run's state document, so a turn that edits a small file writes no blob."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from engine_service import LocalStorage, RunState
from engine_service.storage import _workdir_snapshot as snap
from engine_service.storage._workdir_snapshot import WorkdirSnapshots
from tests.engine.harness import Harness, turn


class Counting(LocalStorage):
    """LocalStorage that records the names of the blobs it is asked to store."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.stored: list[str] = []

    async def put_blob(self, ws: str, run_id: str, name: str, data: bytes) -> None:
        self.stored.append(name)
        await super().put_blob(ws, run_id, name, data)


@pytest.fixture
async def storage(tmp_path: Path) -> Any:
    store = Counting(tmp_path / "storage")
    await store.create_run("ws", "r1", {}, {})
    yield store
    await store.close()


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


async def test_a_small_directory_travels_in_the_checkpoint(storage: Counting, tmp_path: Path) -> None:
    a, dir_a = WorkdirSnapshots(tmp_path / "a", 1 << 20), tmp_path / "a" / "ws" / "r1"
    b, dir_b = WorkdirSnapshots(tmp_path / "b", 1 << 20), tmp_path / "b" / "ws" / "r1"
    (dir_a / "src").mkdir(parents=True)
    (dir_a / "notes.txt").write_text("v0")
    (dir_a / "src" / "bin").write_bytes(bytes(range(256)))
    digest, manifest = await a.take(storage, "ws", "r1", dir_a)
    assert storage.stored == []  # neither the files nor the manifest: the state carries them
    assert hashlib.sha256(manifest.encode()).hexdigest() == digest
    await b.restore(storage, "ws", "r1", dir_b, digest, manifest)
    assert files(dir_b) == files(dir_a)
    # The next turn edits one file: still nothing but the state to write, and b follows.
    (dir_a / "notes.txt").write_text("v1")
    digest, manifest = await a.take(storage, "ws", "r1", dir_a)
    assert storage.stored == []
    await b.restore(storage, "ws", "r1", dir_b, digest, manifest)
    assert (dir_b / "notes.txt").read_text() == "v1"
    # A new process on a's disk, from its cache: the same manifest travels again, whole.
    again = WorkdirSnapshots(tmp_path / "a", 1 << 20)
    assert await again.take(storage, "ws", "r1", dir_a) == (digest, manifest)
    assert storage.stored == []


async def test_large_files_and_manifests_still_go_to_blobs(storage: Counting, tmp_path: Path) -> None:
    a, dir_a = WorkdirSnapshots(tmp_path / "a", 1 << 24), tmp_path / "a" / "ws" / "r1"
    b, dir_b = WorkdirSnapshots(tmp_path / "b", 1 << 24), tmp_path / "b" / "ws" / "r1"
    dir_a.mkdir(parents=True)
    big = b"x" * (snap.INLINE_FILE_BYTES + 1)
    (dir_a / "big.bin").write_bytes(big)
    (dir_a / "small.txt").write_text("small")
    digest, manifest = await a.take(storage, "ws", "r1", dir_a)
    assert storage.stored == [f"wd-{hashlib.sha256(big).hexdigest()}"]
    assert manifest  # the manifest still fits the state
    # Small files past the budget of inline data go to blobs, each once.
    for i in range(snap.INLINE_DATA_CHARS // 1000 + 2):
        (dir_a / f"f{i}.txt").write_bytes(bytes([65 + i]) * 750)
    storage.stored.clear()
    digest, manifest = await a.take(storage, "ws", "r1", dir_a)
    entries = json.loads(manifest)["entries"]
    inline = [rel for rel, e in entries.items() if "data" in e]
    assert sum(len(entries[rel]["data"]) for rel in inline) <= snap.INLINE_DATA_CHARS
    assert len(storage.stored) == len(entries) - len(inline) - 1  # big.bin was stored already
    await b.restore(storage, "ws", "r1", dir_b, digest, manifest)
    assert files(dir_b) == files(dir_a)
    # A directory whose manifest is too large for the state: the manifest is a blob, named only.
    for i in range(snap.MANIFEST_INLINE_BYTES // 100):
        (dir_a / f"many-{i:04d}.txt").write_text("")
    storage.stored.clear()
    digest, manifest = await a.take(storage, "ws", "r1", dir_a)
    assert manifest == ""
    assert storage.stored[-1] == f"wdm-{digest}"
    c, dir_c = WorkdirSnapshots(tmp_path / "c", 1 << 24), tmp_path / "c" / "ws" / "r1"
    await c.restore(storage, "ws", "r1", dir_c, digest)
    assert files(dir_c) == files(dir_a)


async def test_a_carried_manifest_or_file_that_does_not_match_is_refused(
    storage: Counting, tmp_path: Path
) -> None:
    a, dir_a = WorkdirSnapshots(tmp_path / "a", 1 << 20), tmp_path / "a" / "ws" / "r1"
    dir_a.mkdir(parents=True)
    (dir_a / "notes.txt").write_text("v0")
    digest, manifest = await a.take(storage, "ws", "r1", dir_a)
    tampered = manifest.replace('"mode":420', '"mode":511')
    with pytest.raises(RuntimeError, match="manifest"):
        await WorkdirSnapshots(tmp_path / "b", 1 << 20).restore(
            storage, "ws", "r1", tmp_path / "b" / "ws" / "r1", digest, tampered
        )
    doc = json.loads(manifest)
    doc["entries"]["notes.txt"]["data"] = "djE="  # "v1", not the content the digest names
    forged = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    with pytest.raises(RuntimeError, match="blob"):
        await WorkdirSnapshots(tmp_path / "c", 1 << 20).restore(
            storage,
            "ws",
            "r1",
            tmp_path / "c" / "ws" / "r1",
            hashlib.sha256(forged.encode()).hexdigest(),
            forged,
        )


async def test_a_run_that_edits_a_small_file_writes_no_blob(harness: Harness) -> None:
    record = await harness.run(
        "notes",
        turn("", ("Write", {"path": "notes.txt", "content": "v0"})),
        turn("", ("Edit", {"path": "notes.txt", "old_string": "v0", "new_string": "v1"})),
        turn("done"),
    )
    assert record.state is RunState.DONE
    run_dir = harness.root / "workspaces" / "default" / "runs" / record.run_id
    assert not [p.name for p in (run_dir / "blobs").glob("wd*")]
    state = await harness.engine.storage.read_state("default", record.run_id)
    assert state is not None
    assert state["workdir_manifest"]
    entries = json.loads(state["workdir_inline"])["entries"]
    assert entries["notes.txt"]["data"] == "djE="  # "v1"
    assert hashlib.sha256(state["workdir_inline"].encode()).hexdigest() == state["workdir_manifest"]
