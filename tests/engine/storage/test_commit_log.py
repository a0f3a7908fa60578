"""The local adapter's commit log: one record a checkpoint, the newest whole one the state; in
fsync mode one fdatasync a checkpoint (shared by runs that commit together), and after a power
loss what the records carry is written back into the files they name."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import pytest

import engine_service.storage._local as local
from engine_service import LocalStorage
from engine_service.storage._protocol import Checkpoint, StateConflict

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


def expire_lease(root: Path) -> None:
    """The holder's lease runs out (it stalled past its time to live)."""
    lease = root / RUN / "lease.json"
    lease.write_bytes(json.dumps({**json.loads(lease.read_bytes()), "expires_at": 0}).encode())


async def test_a_process_taking_a_run_back_writes_to_the_log_others_read(tmp_path: Path) -> None:
    a, b, reader = LocalStorage(tmp_path), LocalStorage(tmp_path), LocalStorage(tmp_path)
    await a.create_run("ws", "r1", {}, {"state": "QUEUED"})
    assert await a.acquire_lease("ws", "r1", "a", 30)
    await a.write_state("ws", "r1", {"state": "RUNNING", "by": "a"})
    expire_lease(tmp_path)  # a stalls; b takes the run over and pauses it (a new log)
    assert await b.acquire_lease("ws", "r1", "b", 30)
    await b.write_state("ws", "r1", {"state": "RUNNING", "by": "b"})
    await b.write_state("ws", "r1", {"state": "PAUSED", "by": "b"})
    await b.release_lease("ws", "r1", "b")
    # A resume reaches a: it takes the run back, and what it commits is what everyone reads.
    assert await a.acquire_lease("ws", "r1", "a", 30)
    await a.write_state("ws", "r1", {"state": "RUNNING", "by": "a again"})
    assert await reader.read_state("ws", "r1") == {"state": "RUNNING", "by": "a again"}
    for storage in (a, b):
        await storage.close()


async def test_a_writer_whose_log_was_replaced_or_appended_to_reopens_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, reader = LocalStorage(tmp_path), LocalStorage(tmp_path), LocalStorage(tmp_path)
    await a.create_run("ws", "r1", {}, {})
    await a.write_state("ws", "r1", {"state": "RUNNING", "n": 1})
    await b.write_state("ws", "r1", {"state": "PAUSED", "n": 2})  # replaces the log a has open
    await a.write_state("ws", "r1", {"state": "RUNNING", "n": 3})
    assert await reader.read_state("ws", "r1") == {"state": "RUNNING", "n": 3}
    await b.write_state("ws", "r1", {"state": "RUNNING", "n": 4})  # appended after a's record
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        real_write(fd, data[:5])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space"):
        await a.write_state("ws", "r1", {"state": "RUNNING", "n": 5})
    monkeypatch.setattr(os, "write", real_write)
    # Cut back to the end of b's record, not to where a last knew the log to end.
    assert await reader.read_state("ws", "r1") == {"state": "RUNNING", "n": 4}
    [log] = logs(tmp_path)
    assert [json.loads(line)["state"]["n"] for line in log.read_bytes().splitlines()] == [2, 3, 4]
    for storage in (a, b):
        await storage.close()


@pytest.mark.parametrize("fsync", [False, True])
async def test_a_writer_that_lost_the_lease_cannot_end_the_run_over_the_holder(
    tmp_path: Path, fsync: bool
) -> None:
    a, b = LocalStorage(tmp_path, fsync=fsync), LocalStorage(tmp_path, fsync=fsync)
    reader = LocalStorage(tmp_path)
    await a.create_run("ws", "r1", {}, {"state": "QUEUED"})
    assert await a.acquire_lease("ws", "r1", "a", 30)
    await a.write_state("ws", "r1", {"state": "RUNNING", "by": "a"})
    expire_lease(tmp_path)
    assert await b.acquire_lease("ws", "r1", "b", 30)
    # a's final commit, in flight before it noticed: refused, the log stays b's.
    with pytest.raises(StateConflict):
        await a.write_state("ws", "r1", {"state": "DONE", "by": "a"})
    await b.write_state("ws", "r1", {"state": "RUNNING", "by": "b", "n": 1})
    with pytest.raises(StateConflict):
        await a.write_state("ws", "r1", {"state": "DONE", "by": "a"})
    assert await reader.read_state("ws", "r1") == {"state": "RUNNING", "by": "b", "n": 1}
    await b.write_state("ws", "r1", {"state": "RUNNING", "by": "b", "n": 2})
    assert await reader.read_state("ws", "r1") == {"state": "RUNNING", "by": "b", "n": 2}
    await b.write_state("ws", "r1", {"state": "DONE", "by": "b"})
    assert await reader.read_state("ws", "r1") == {"state": "DONE", "by": "b"}
    for storage in (a, b):
        await storage.close()


class Synced:
    """Records what each fdatasync/fsync made durable: the content of the file then."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.files: dict[Path, bytes] = {}
        real_data, real_full = os.fdatasync, os.fsync

        def note(fd: int) -> None:
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if path.is_file():
                self.files[path] = path.read_bytes()

        def data(fd: int) -> None:
            real_data(fd)
            note(fd)

        def full(fd: int) -> None:
            real_full(fd)
            note(fd)

        def replace(src: str | Path, dst: str | Path) -> None:
            real_replace(src, dst)
            if Path(src) in self.files:  # a synced temporary file renamed into place
                self.files[Path(dst)] = self.files.pop(Path(src))

        real_replace = os.replace
        monkeypatch.setattr(os, "fdatasync", data)
        monkeypatch.setattr(os, "fsync", full)
        monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("tail_synced", [True, False])
async def test_a_power_loss_after_a_takeover_keeps_what_the_new_writer_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tail_synced: bool
) -> None:
    root = tmp_path.resolve()
    synced = Synced(monkeypatch)
    if not tail_synced:  # what is written back must not stop at a gap either
        monkeypatch.setattr(local, "_sync_segments", lambda directory, starts: None)
    dead = LocalStorage(root, fsync=True)
    await dead.create_run("ws", "r1", {}, {"last_seq": 0})
    assert await dead.acquire_lease("ws", "r1", "dead", 30)
    await dead.write_segment("ws", "r1", "events", 1, [{"seq": i} for i in range(1, 11)])
    await dead.commit("ws", "r1", Checkpoint({"last_seq": 10}))
    await dead.write_segment("ws", "r1", "events", 11, [{"seq": i} for i in range(11, 16)])
    expire_lease(root)  # killed with -9; another process on this boot takes the run
    new = LocalStorage(root, fsync=True)
    assert await new.acquire_lease("ws", "r1", "new", 30)
    assert await new.read_state("ws", "r1") == {"last_seq": 10}
    assert await new.repair_end("ws", "r1", "events") == 15  # kept: watchers may have seen them
    await new.write_segment("ws", "r1", "events", 16, [{"seq": i} for i in range(16, 21)])
    await new.commit("ws", "r1", Checkpoint({"last_seq": 20}))

    lose_what_was_not_synced(root, synced.files)
    monkeypatch.setattr(local, "BOOT_ID", "the-next-boot")
    after = LocalStorage(root, fsync=True)
    assert await after.read_state("ws", "r1") == {"last_seq": 20}
    seqs = [d["seq"] for d in await after.read_segments("ws", "r1", "events", 0, 20)]
    assert seqs == (list(range(1, 21)) if tail_synced else [*range(1, 11), *range(16, 21)])
    for storage in (dead, new, after):
        await storage.close()


async def test_large_blobs_are_synced_on_their_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path.resolve()
    synced = Synced(monkeypatch)
    storage = LocalStorage(root, fsync=True)
    await storage.create_run("ws", "r1", {}, {})
    big = b"x" * (local.INLINE_BLOB_BYTES + 1)
    await storage.write_segment("ws", "r1", "events", 1, [{"seq": 1}])
    small = {"agent-a-transcript": b"[1]"}
    await storage.commit("ws", "r1", Checkpoint({"state": "RUNNING", "last_seq": 1}, 1, [{"n": 1}], small))
    await storage.put_blob("ws", "r1", "wd-" + "ab" * 32, big)  # a large file of the run directory
    await storage.write_segment("ws", "r1", "events", 2, [{"seq": 2}])
    grown = {"agent-a-transcript": big}  # the same blob, grown past the limit
    await storage.commit("ws", "r1", Checkpoint({"state": "RUNNING", "last_seq": 2}, 2, [{"n": 2}], grown))
    [log] = logs(root)
    assert len(log.read_bytes()) < 2000  # the large blobs are not in the records
    await storage.write_segment("ws", "r1", "events", 3, [{"seq": 3}])
    await storage.commit("ws", "r1", Checkpoint({"state": "PAUSED", "last_seq": 3}, 3, [{"n": 3}]))
    [log] = logs(root)
    assert len(log.read_bytes()) < 2000
    await storage.close()

    lose_what_was_not_synced(root, synced.files)
    monkeypatch.setattr(local, "BOOT_ID", "the-next-boot")
    after = LocalStorage(root, fsync=True)
    assert await after.read_state("ws", "r1") == {"state": "PAUSED", "last_seq": 3}
    assert [d["seq"] for d in await after.read_segments("ws", "r1", "events", 0, 3)] == [1, 2, 3]
    assert await after.read_segments("ws", "r1", "transcript", 0, 3) == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert await after.get_blob("ws", "r1", "agent-a-transcript") == big
    assert await after.get_blob("ws", "r1", "wd-" + "ab" * 32) == big
    await after.close()


async def test_a_lease_taken_before_the_machine_rebooted_has_expired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LocalStorage(tmp_path, fsync=True)
    await storage.create_run("ws", "r1", {}, {})
    assert await storage.acquire_lease("ws", "r1", "before", 3600)
    assert not await LocalStorage(tmp_path).acquire_lease("ws", "r1", "other", 30)
    monkeypatch.setattr(local, "BOOT_ID", "the-next-boot")  # a reboot shorter than the lease
    assert await LocalStorage(tmp_path).acquire_lease("ws", "r1", "after", 30)
    await storage.close()


async def test_fsync_mode_never_syncs_on_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync takes milliseconds; on the event loop it would hold up every other run of the
    engine. Each operation that syncs does it in a thread."""
    loop_thread = threading.get_ident()
    on_loop: list[str] = []
    elsewhere: list[str] = []
    real_data, real_full = os.fdatasync, os.fsync

    def data(fd: int) -> None:
        (on_loop if threading.get_ident() == loop_thread else elsewhere).append("fdatasync")
        real_data(fd)

    def full(fd: int) -> None:
        if threading.get_ident() == loop_thread:
            on_loop.append("fsync")
        real_full(fd)

    monkeypatch.setattr(os, "fdatasync", data)
    monkeypatch.setattr(os, "fsync", full)
    storage = LocalStorage(tmp_path, fsync=True)
    assert await storage.create_run("ws", "r1", {"task": "t"}, {"last_seq": 0})
    assert await storage.acquire_lease("ws", "r1", "me", 30)
    await storage.write_state("ws", "r1", {"last_seq": 0})
    for turn in range(1, 3):
        await storage.write_segment("ws", "r1", "events", turn, [{"seq": turn}])
        await storage.put_blob("ws", "r1", "wd-" + f"{turn:02d}" * 32, b"snapshot %d" % turn)
        await storage.put_blob("ws", "r1", "wd-" + f"{turn + 10:02d}" * 32, b"x" * (100 << 10))
        await storage.put_blob("ws", "r1", f"result-{turn}", b"a tool's result")
        await storage.commit("ws", "r1", Checkpoint({"last_seq": turn}, turn, [{"role": "user"}]))
    assert await storage.put_doc("ws", "threads/t1", {"n": 1})
    assert await storage.put_doc("ws", "threads/t2", {"n": 2}, create_only=True)
    assert not await storage.put_doc("ws", "threads/t2", {"n": 3}, create_only=True)
    assert await storage.put_if_absent("ws", "req-1", {"run_id": "r1"}) is None
    await storage.put_shared("settings", {"a": 1})
    assert await storage.renew_lease("ws", "r1", "me", 30)
    await storage.release_lease("ws", "r1", "me")
    await storage.close()
    assert on_loop == []
    # And what was written reads back.
    assert await storage.get_blob("ws", "r1", "result-2") == b"a tool's result"
    assert await storage.get_doc("ws", "threads/t2") == {"n": 2}
    assert await storage.get_shared("settings") == {"a": 1}
    await storage.close()
    # After a power loss, the first read of each run writes back what its records carry and
    # syncs it: the sweep reads every run's state then, so that too happens off the loop.
    monkeypatch.setattr(local, "BOOT_ID", "the-next-boot")
    elsewhere.clear()
    after = LocalStorage(tmp_path, fsync=True)
    assert await after.read_state("ws", "r1") == {"last_seq": 2}
    await after.close()
    assert on_loop == []
    assert elsewhere  # it did sync
