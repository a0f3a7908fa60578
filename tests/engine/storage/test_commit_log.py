"""The local adapter's commit log: one record a checkpoint, the newest whole one the state; in
fsync mode one fdatasync a checkpoint (shared by runs that commit together), and after a power
loss what the records carry is written back into the files they name."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

import engine_service.storage._local as local
from engine_service import LocalStorage
from engine_service.storage._protocol import Checkpoint

RUN = Path("workspaces", "ws", "runs", "r1")


def logs(root: Path) -> list[Path]:
    return sorted((root / RUN / "commits").iterdir())


class Syncs:
    """Counts fdatasync (files) and fsync (directories) calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.data: list[int] = []
        self.full: list[int] = []
        real_data, real_full = os.fdatasync, os.fsync

        def data(fd: int) -> None:
            self.data.append(fd)
            real_data(fd)

        def full(fd: int) -> None:
            self.full.append(fd)
            real_full(fd)

        monkeypatch.setattr(os, "fdatasync", data)
        monkeypatch.setattr(os, "fsync", full)

    def clear(self) -> None:
        self.data.clear()
        self.full.clear()


async def test_states_are_records_of_one_log_and_the_newest_whole_one_counts(tmp_path: Path) -> None:
    writer, reader = LocalStorage(tmp_path), LocalStorage(tmp_path)  # two processes, as it were
    await writer.create_run("ws", "r1", {}, {"n": 0})
    assert await reader.read_state("ws", "r1") == {"n": 0}
    for n in range(1, 21):
        await writer.write_state("ws", "r1", {"n": n, "pad": "é" * 10})
        assert await reader.read_state("ws", "r1") == {"n": n, "pad": "é" * 10}
    [log] = logs(tmp_path)
    assert len(log.read_bytes().splitlines()) == 20  # appended, no file a checkpoint
    assert json.loads((tmp_path / RUN / "state.json").read_bytes()) == {"n": 0}  # never replaced
    await writer.close()


async def test_a_torn_commit_record_at_any_byte_reads_as_the_previous_one(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await storage.create_run("ws", "r1", {}, {"n": 0})
    await storage.write_state("ws", "r1", {"n": 1, "text": "é" * 5})
    [log] = logs(tmp_path)
    whole = log.read_bytes()
    await storage.write_state("ws", "r1", {"n": 2, "text": "ü" * 5})
    await storage.close()
    full = log.read_bytes()
    for cut in range(len(whole), len(full)):  # a crash left the second record up to here
        log.write_bytes(full[:cut])
        assert await LocalStorage(tmp_path).read_state("ws", "r1") == {"n": 1, "text": "é" * 5}, cut
    # The next writer appends after the last whole record, never after torn bytes.
    log.write_bytes(full[: len(whole) + 7])
    writer = LocalStorage(tmp_path)
    await writer.write_state("ws", "r1", {"n": 3})
    assert await LocalStorage(tmp_path).read_state("ws", "r1") == {"n": 3}
    assert [json.loads(line)["state"]["n"] for line in log.read_bytes().splitlines()] == [1, 3]
    await writer.close()


async def test_runs_written_by_earlier_versions_read_the_same(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await storage.create_run("ws", "r1", {}, {"n": 0})
    states = tmp_path / RUN / "states"  # one file a state, the highest whole one counting
    states.mkdir()
    (states / "000000000001.json").write_bytes(b'{"n":1}')
    (states / "000000000002.json").write_bytes(b'{"n":2}')
    (states / "000000000003.json").write_bytes(b'{"n":')  # torn
    assert await storage.read_state("ws", "r1") == {"n": 2}
    await storage.write_state("ws", "r1", {"n": 4})  # the next checkpoint goes to the log
    assert await LocalStorage(tmp_path).read_state("ws", "r1") == {"n": 4}
    await storage.close()


async def test_a_pause_or_an_end_starts_a_log_of_its_own(tmp_path: Path) -> None:
    writer, reader = LocalStorage(tmp_path), LocalStorage(tmp_path)
    await writer.create_run("ws", "r1", {}, {"state": "QUEUED"})
    for n in range(10):
        await writer.write_state("ws", "r1", {"state": "RUNNING", "n": n})
    await writer.write_state("ws", "r1", {"state": "PAUSED", "n": 10})
    [log] = logs(tmp_path)
    assert log.read_bytes().splitlines() == [b'{"state":{"state":"PAUSED","n":10}}']
    assert await reader.read_state("ws", "r1") == {"state": "PAUSED", "n": 10}
    await writer.write_state("ws", "r1", {"state": "RUNNING", "n": 11})  # resumed: appended
    await writer.write_state("ws", "r1", {"state": "DONE", "n": 12})
    [log] = logs(tmp_path)
    assert log.read_bytes().splitlines() == [b'{"state":{"state":"DONE","n":12}}']
    # Like creating any file, it needs a writable directory: storage refusing writes holds it back.
    (tmp_path / RUN / "commits").chmod(0o555)
    try:
        if os.geteuid() != 0:
            with pytest.raises(PermissionError):
                await writer.write_state("ws", "r1", {"state": "FAILED", "n": 13})
            assert await reader.read_state("ws", "r1") == {"state": "DONE", "n": 12}
    finally:
        (tmp_path / RUN / "commits").chmod(0o755)
    await writer.close()


async def test_a_full_log_is_replaced_and_a_reader_that_listed_the_old_one_lists_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "LOG_BYTES", 300)
    writer, reader = LocalStorage(tmp_path), LocalStorage(tmp_path)
    await writer.create_run("ws", "r1", {}, {"n": 0})
    await writer.write_state("ws", "r1", {"n": 1})
    stale = os.listdir(tmp_path / RUN / "commits")  # what a reader listed just before
    for n in range(2, 40):
        await writer.write_state("ws", "r1", {"n": n, "pad": "x" * 20})
    assert len(logs(tmp_path)) == 1
    assert logs(tmp_path)[0].name != stale[0]
    listdir = os.listdir
    listings = iter([stale])
    monkeypatch.setattr(os, "listdir", lambda path: next(listings, None) or listdir(path))
    assert await reader.read_state("ws", "r1") == {"n": 39, "pad": "x" * 20}
    await writer.close()


async def test_fsync_mode_syncs_only_the_log_once_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(tmp_path, fsync=True)
    await storage.create_run("ws", "r1", {}, {})
    await storage.write_state("ws", "r1", {"last_seq": 0})  # the log's first record
    syncs = Syncs(monkeypatch)
    for turn in range(1, 4):
        for seq in (3 * turn - 2, 3 * turn - 1, 3 * turn):  # appends ahead of the checkpoint
            await storage.write_segment("ws", "r1", "events", seq, [{"seq": seq}])
        # A new file of the run directory's snapshot, its manifest, the transcript entry.
        await storage.put_blob("ws", "r1", "wd-" + f"{turn:02d}" * 32, b"content %d" % turn)
        await storage.put_blob("ws", "r1", "wdm-" + f"{turn:02d}" * 32, b"manifest")
        checkpoint = Checkpoint({"last_seq": 3 * turn}, turn, [{"role": "user", "text": str(turn)}])
        await storage.commit("ws", "r1", checkpoint)
        assert (len(syncs.data), len(syncs.full)) == (1, 0)  # the log, nothing else
        syncs.clear()
    # What the commit records carry: everything written since the run's previous commit.
    [log] = logs(tmp_path)
    last = json.loads(log.read_bytes().splitlines()[-1])
    assert last["redo"]["events"] == [[7, [{"seq": 7}]], [8, [{"seq": 8}]], [9, [{"seq": 9}]]]
    assert last["redo"]["transcript"] == [[3, [{"role": "user", "text": "3"}]]]
    assert sorted(last["redo"]["blobs"]) == ["wd-" + "03" * 32, "wdm-" + "03" * 32]
    await storage.close()


async def test_without_fsync_nothing_is_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs = Syncs(monkeypatch)
    storage = LocalStorage(tmp_path)
    await storage.create_run("ws", "r1", {}, {})
    await storage.write_segment("ws", "r1", "events", 1, [{"seq": 1}])
    await storage.put_blob("ws", "r1", "wd-" + "ab" * 32, b"content")
    await storage.commit("ws", "r1", Checkpoint({"last_seq": 1}, 1, [{"role": "user"}]))
    await storage.acquire_lease("ws", "r1", "me", 30)
    await storage.release_lease("ws", "r1", "me")
    await storage.close()
    assert (syncs.data, syncs.full) == ([], [])


async def test_runs_committing_together_share_syncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = LocalStorage(tmp_path, fsync=True)
    runs = [f"r{i}" for i in range(8)]
    for run in runs:
        await storage.create_run("ws", run, {}, {})
        await storage.write_state("ws", run, {"n": 0})
    passes: list[int] = []
    real = local._datasync_all

    def counting(fds: list[int]) -> list[OSError | None]:
        passes.append(len(fds))
        return real(fds)

    monkeypatch.setattr(local, "_datasync_all", counting)
    await asyncio.gather(*(storage.write_state("ws", run, {"n": 1}) for run in runs))
    assert sum(passes) == 8
    assert len(passes) < 8
    for run in runs:
        assert await storage.read_state("ws", run) == {"n": 1}
    await storage.close()


async def test_a_failed_sync_fails_the_commit_and_the_retry_carries_what_it_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(tmp_path, fsync=True)
    await storage.create_run("ws", "r1", {}, {})
    await storage.write_state("ws", "r1", {"last_seq": 0})
    await storage.write_segment("ws", "r1", "events", 1, [{"seq": 1}])
    real = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(OSError, match="Input/output"):
        await storage.write_state("ws", "r1", {"last_seq": 1})
    monkeypatch.setattr(os, "fdatasync", real)
    await storage.write_segment("ws", "r1", "events", 2, [{"seq": 2}])
    await storage.write_state("ws", "r1", {"last_seq": 2})
    last = json.loads(logs(tmp_path)[0].read_bytes().splitlines()[-1])
    assert last["redo"]["events"] == [[1, [{"seq": 1}]], [2, [{"seq": 2}]]]
    await storage.close()


def lose_what_was_not_synced(root: Path, synced: dict[Path, bytes]) -> None:
    """A power loss: every file of the run but the commit log goes back to what it held when
    last synced (``synced``), or goes."""
    for path in sorted((root / RUN).rglob("*"), reverse=True):
        if path.is_file() and path.parent.name != "commits" and path.name not in ("spec.json", "state.json"):
            if path in synced:
                path.write_bytes(synced[path])
            else:
                path.unlink()
        elif path.is_dir() and path.name != "commits" and not any(path.iterdir()):
            path.rmdir()


async def test_after_a_power_loss_what_the_log_carries_is_written_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(tmp_path, fsync=True)
    await storage.create_run("ws", "r1", {}, {"last_seq": 0})
    assert await storage.acquire_lease("ws", "r1", "me", 30)
    seq = 0
    for turn in range(1, 6):
        await storage.write_segment(
            "ws", "r1", "events", seq + 1, [{"seq": seq + 1}, {"seq": seq + 2, "n": 2}]
        )
        seq += 3
        await storage.put_blob("ws", "r1", "wd-" + f"{turn:02d}" * 32, b"file %d" % turn)
        entry = {"role": "assistant", "text": f"turn {turn}"}
        state = {"last_seq": seq, "transcript_len": turn, "turn": turn}
        blobs = {"agent-a-transcript": b"[%d]" % turn}
        await storage.commit("ws", "r1", Checkpoint(state, turn, [entry], blobs))
    # Written ahead after the last commit: not committed, may be lost.
    await storage.write_segment("ws", "r1", "events", seq + 1, [{"seq": seq + 1}])
    events = await storage.read_segments("ws", "r1", "events", 0, seq)
    transcript = await storage.read_segments("ws", "r1", "transcript", 0, 5)
    await storage.close()

    lose_what_was_not_synced(tmp_path, {})
    assert not (tmp_path / RUN / "events").exists()
    monkeypatch.setattr(local, "BOOT_ID", "the-next-boot")
    syncs = Syncs(monkeypatch)
    after = LocalStorage(tmp_path, fsync=True)
    assert await after.read_state("ws", "r1") == {"last_seq": 15, "transcript_len": 5, "turn": 5}
    assert syncs.data  # what it wrote back is durable before anyone relies on it
    assert await after.read_segments("ws", "r1", "events", 0, seq) == events
    assert await after.read_segments("ws", "r1", "transcript", 0, 5) == transcript
    for turn in range(1, 6):
        assert await after.get_blob("ws", "r1", "wd-" + f"{turn:02d}" * 32) == b"file %d" % turn
    assert await after.get_blob("ws", "r1", "agent-a-transcript") == b"[5]"
    # Done once: the log now ends with a record of this boot.
    syncs.clear()
    assert await LocalStorage(tmp_path, fsync=True).read_state("ws", "r1") == {
        "last_seq": 15, "transcript_len": 5, "turn": 5
    }  # fmt: skip
    assert syncs.data == []
    # The run goes on from there.
    assert await after.acquire_lease("ws", "r1", "next", 30)
    assert await after.repair_end("ws", "r1", "events") == 15
    await after.close()


async def test_after_a_power_loss_files_partly_there_are_completed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(tmp_path, fsync=True)
    await storage.create_run("ws", "r1", {}, {})
    await storage.write_segment("ws", "r1", "events", 1, [{"seq": i} for i in range(1, 4)])
    await storage.commit("ws", "r1", Checkpoint({"last_seq": 3}, 1, [{"text": "a"}]))
    await storage.write_segment("ws", "r1", "events", 4, [{"seq": i} for i in range(4, 7)])
    await storage.commit("ws", "r1", Checkpoint({"last_seq": 6}, 2, [{"text": "b"}]))
    await storage.close()
    segment = tmp_path / RUN / "events" / "000000000001.jsonl"
    content = segment.read_bytes()
    for cut in range(len(content)):  # the segment kept up to any byte
        for other in segment.parent.iterdir():  # (and none written back by the round before)
            other.unlink()
        segment.write_bytes(content[:cut])
        for log in logs(tmp_path):  # and its records are from before the reboot again
            lines = log.read_bytes().splitlines(keepends=True)
            log.write_bytes(b"".join(line for line in lines if b'"the-next-boot"' not in line))
        monkeypatch.setattr(local, "BOOT_ID", "the-next-boot")
        reader = LocalStorage(tmp_path, fsync=True)
        assert await reader.read_state("ws", "r1") == {"last_seq": 6}
        read = await reader.read_segments("ws", "r1", "events", 0, 6)
        assert [d["seq"] for d in read] == [1, 2, 3, 4, 5, 6], cut
        monkeypatch.setattr(local, "BOOT_ID", "the-first-boot")
    await storage.close()


async def test_a_reader_leaves_a_run_another_process_holds_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(tmp_path, fsync=True)
    await storage.create_run("ws", "r1", {}, {})
    await storage.write_segment("ws", "r1", "events", 1, [{"seq": 1}])
    await storage.commit("ws", "r1", Checkpoint({"last_seq": 1}))
    await storage.close()
    monkeypatch.setattr(local, "BOOT_ID", "the-next-boot")
    holder, reader = LocalStorage(tmp_path, fsync=True), LocalStorage(tmp_path, fsync=True)
    lease = tmp_path / RUN / "lease.json"
    lease.write_text(json.dumps({"owner": "someone", "expires_at": 2e9}))
    [log] = logs(tmp_path)
    before = log.read_bytes()
    assert await reader.read_state("ws", "r1") == {"last_seq": 1}
    assert log.read_bytes() == before  # that process writes back what is missing, not this one
    lease.write_text(json.dumps({"owner": "someone", "expires_at": 0}))
    assert await holder.acquire_lease("ws", "r1", "holder", 30)
    assert await holder.read_state("ws", "r1") == {"last_seq": 1}
    assert log.read_bytes() != before
    await holder.close()
    await reader.close()
