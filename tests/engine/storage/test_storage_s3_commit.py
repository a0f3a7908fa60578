"""The S3 adapter's one-request checkpoint: state.json carries the log's tail (storage/_s3.py).

Against a real S3 server (moto): what readers see across tail move-outs, a crash between a
move-out and the state that drops it, storage written one segment per checkpoint (as
before), and a writer whose lease went stale losing to the one that took the run over.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from engine_service.core._types import Message
from engine_service.storage import _s3
from engine_service.storage._protocol import Checkpoint, StateConflict, StorageUnavailable
from engine_service.storage._s3 import S3Storage
from tests.s3_server import new_bucket


async def _storage(moto: str, bucket: str | None = None) -> S3Storage:
    return S3Storage(bucket or await new_bucket(moto), "p", endpoint_url=moto)


async def _raw_keys(store: S3Storage, run_id: str) -> list[str]:
    keys, _ = await store._list(store._run("ws", run_id) + "/")
    return [k.split(f"/{run_id}/", 1)[1] for k in keys]


def _events(first: int, count: int, tag: str = "") -> list[dict[str, object]]:
    return [{"seq": first + i, "k": "x", "tag": tag} for i in range(count)]


async def _moves_landed(store: S3Storage) -> None:
    """Wait for the tails being moved out in the background (they stay known to the store)."""
    for task, _ in list(store._moving.values()):
        await task


async def test_a_checkpoint_is_one_request_and_readers_see_everything(moto: str) -> None:
    store = await _storage(moto)
    try:
        await store.create_run("ws", "r1", {}, {"last_seq": 0, "transcript_len": 0})
        seq = 0
        for n in range(1, 6):
            events = _events(seq + 1, 3)
            seq += 3
            state = {"last_seq": seq, "transcript_len": n}
            await store.commit("ws", "r1", Checkpoint(state, n, [{"text": f"m{n}"}], {}, events))
        # Nothing but spec.json and state.json: the log is in state.json's tail.
        assert sorted(await _raw_keys(store, "r1")) == ["spec.json", "state.json"]
        assert await store.read_state("ws", "r1") == {"last_seq": 15, "transcript_len": 5}
        reader = await _storage(moto, store._bucket)  # another process, nothing cached
        assert [d["seq"] for d in await reader.read_segments("ws", "r1", "events", 4, 12)] == list(
            range(5, 13)
        )
        assert [d["text"] for d in await reader.read_segments("ws", "r1", "transcript", 0, 5)] == [
            f"m{n}" for n in range(1, 6)
        ]
        assert await reader.repair_end("ws", "r1", "events") == 15
        assert await reader.repair_end("ws", "r1", "transcript") == 5
        await reader.close()
    finally:
        await store.close()


async def test_the_tail_moves_out_to_segments_and_state_stays_small(
    moto: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_s3, "TAIL_BYTES", 2000)
    store = await _storage(moto)
    try:
        await store.create_run("ws", "r1", {}, {"last_seq": 0})
        seq = 0
        for n in range(1, 41):
            # Events written ahead by the background writer interleave with committed ones.
            if n % 3 == 0:
                await store.write_segment("ws", "r1", "events", seq + 1, _events(seq + 1, 2, "ahead"))
                seq += 2
            events = _events(seq + 1, 2, "commit")
            seq += 2
            state = {"last_seq": seq, "transcript_len": n}
            await store.commit(
                "ws", "r1", Checkpoint(state, n, [{"text": f"m{n}", "pad": "y" * 80}], {}, events)
            )
            raw = await store._get(store._run("ws", "r1", "state.json"))
            assert raw is not None
            assert len(raw[0]) < 2 * 2000 + 1000
        keys = await _raw_keys(store, "r1")
        assert any(k.startswith("transcript/") for k in keys)
        assert any(k.startswith("events/") for k in keys)
        reader = await _storage(moto, store._bucket)
        read = await reader.read_segments("ws", "r1", "events", 0, seq)
        assert [d["seq"] for d in read] == list(range(1, seq + 1))
        for after in (0, 7, 33, seq - 1):
            assert [d["seq"] for d in await reader.read_segments("ws", "r1", "events", after, seq)] == list(
                range(after + 1, seq + 1)
            )
        texts = [d["text"] for d in await reader.read_segments("ws", "r1", "transcript", 0, 40)]
        assert texts == [f"m{n}" for n in range(1, 41)]
        assert await reader.repair_end("ws", "r1", "events") == seq
        await reader.close()
    finally:
        await store.close()


async def test_a_crash_between_a_move_out_and_its_state_loses_and_doubles_nothing(
    moto: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_s3, "TAIL_BYTES", 100)  # every commit's tail is moved out after it
    store = await _storage(moto)
    bucket = store._bucket
    await store.create_run("ws", "r1", {}, {"last_seq": 0})
    for n in range(1, 4):
        state = {"last_seq": 2 * n, "transcript_len": n}
        await store.commit("ws", "r1", Checkpoint(state, n, [{"text": f"m{n}"}], {}, _events(2 * n - 1, 2)))
        await _moves_landed(store)

    put = store._put

    async def dies_at_state(key: str, data: bytes, **conditions: str) -> str | None:
        if key.endswith("state.json"):
            raise ConnectionError("the process died here")
        return await put(key, data, **conditions)

    # The next commit leaves out the tail moved out after the last one, then dies before its
    # state.json lands.
    monkeypatch.setattr(store, "_put", dies_at_state)
    with pytest.raises(ConnectionError):
        await store.commit("ws", "r1", Checkpoint({"last_seq": 8, "transcript_len": 4}, 4, [{"text": "m4"}]))
    successor = await _storage(moto, bucket)
    try:
        keys = await _raw_keys(successor, "r1")
        # The move-out of m3 landed, so m3 is in a segment and in the committed tail...
        assert "transcript/000000000003-000000000003.jsonl" in keys
        # ...yet a successor reads each record once, from the last committed state.
        assert await successor.read_state("ws", "r1") == {"last_seq": 6, "transcript_len": 3}
        assert [d["seq"] for d in await successor.read_segments("ws", "r1", "events", 0, 6)] == list(
            range(1, 7)
        )
        texts = [d["text"] for d in await successor.read_segments("ws", "r1", "transcript", 0, 3)]
        assert texts == ["m1", "m2", "m3"]
        await successor.commit(
            "ws", "r1", Checkpoint({"last_seq": 6, "transcript_len": 4}, 4, [{"text": "m4b"}])
        )
        texts = [d["text"] for d in await successor.read_segments("ws", "r1", "transcript", 0, 4)]
        assert texts == ["m1", "m2", "m3", "m4b"]
    finally:
        await successor.close()
        await store.close()


async def test_a_writer_with_a_stale_lease_does_not_overwrite_the_new_one(moto: str) -> None:
    stale = await _storage(moto)
    bucket = stale._bucket
    fresh = await _storage(moto, bucket)
    try:
        await stale.create_run("ws", "r1", {}, {"last_seq": 0, "by": "stale"})
        await stale.commit("ws", "r1", Checkpoint({"last_seq": 1, "by": "stale"}, 0, (), {}, _events(1, 1)))
        # The stale writer's lease expires; another process takes the run over and moves it on.
        assert await fresh.read_state("ws", "r1") == {"last_seq": 1, "by": "stale"}
        await fresh.commit("ws", "r1", Checkpoint({"last_seq": 2, "by": "fresh"}, 0, (), {}, _events(2, 1)))
        with pytest.raises(StateConflict):
            await stale.commit(
                "ws", "r1", Checkpoint({"last_seq": 2, "by": "stale"}, 0, (), {}, _events(2, 1))
            )
        assert await fresh.read_state("ws", "r1") == {"last_seq": 2, "by": "fresh"}
        assert [d["tag"] for d in await fresh.read_segments("ws", "r1", "events", 0, 2)] == ["", ""]
        # The winner goes on writing.
        await fresh.commit("ws", "r1", Checkpoint({"last_seq": 2, "by": "fresh", "n": 2}))
        assert await stale.read_state("ws", "r1") == {"last_seq": 2, "by": "fresh", "n": 2}
    finally:
        await stale.close()
        await fresh.close()


async def test_runs_written_one_segment_per_checkpoint_still_read(moto: str) -> None:
    """Storage an earlier version wrote: events and transcript segments, state.json without a tail."""
    store = await _storage(moto)
    try:
        await store.create_run("ws", "r1", {}, {"last_seq": 0})
        s3 = await store._s3()
        base = store._run("ws", "r1")
        lines = "".join(json.dumps(e) + "\n" for e in _events(1, 4))
        await s3.put_object(
            Bucket=store._bucket, Key=f"{base}/events/000000000001-000000000004.jsonl", Body=lines
        )
        entry = json.dumps(Message("user", "old").to_json()) + "\n"
        await s3.put_object(
            Bucket=store._bucket, Key=f"{base}/transcript/000000000001-000000000001.jsonl", Body=entry
        )
        await s3.put_object(
            Bucket=store._bucket, Key=f"{base}/state.json", Body=b'{"last_seq":4,"transcript_len":1}'
        )
        reader = await _storage(moto, store._bucket)
        assert await reader.read_state("ws", "r1") == {"last_seq": 4, "transcript_len": 1}
        assert [d["seq"] for d in await reader.read_segments("ws", "r1", "events", 0, 4)] == [1, 2, 3, 4]
        assert await reader.repair_end("ws", "r1", "events") == 4
        # The new writer goes on from there with its one-request checkpoints.
        entries = [Message("assistant", "new").to_json()]
        checkpoint = Checkpoint({"last_seq": 5, "transcript_len": 2}, 2, entries, {}, _events(5, 1))
        await reader.commit("ws", "r1", checkpoint)
        assert [d["seq"] for d in await reader.read_segments("ws", "r1", "events", 0, 5)] == [1, 2, 3, 4, 5]
        texts = [d["text"] for d in await reader.read_segments("ws", "r1", "transcript", 0, 2)]
        assert texts == ["old", "new"]
        await reader.close()
    finally:
        await store.close()


async def test_a_commit_that_landed_although_it_failed_is_taken_for_ours(
    moto: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await _storage(moto)
    try:
        await store.create_run("ws", "r1", {}, {"last_seq": 0, "transcript_len": 0})
        put = store._put

        async def lands_then_fails(key: str, data: bytes, **conditions: str) -> str | None:
            await put(key, data, **conditions)
            monkeypatch.setattr(store, "_put", put)
            raise StorageUnavailable("the answer was lost")

        monkeypatch.setattr(store, "_put", lands_then_fails)
        first = Checkpoint(
            {"last_seq": 1, "transcript_len": 1, "at": 1.0}, 1, [{"text": "m1"}], {}, _events(1, 1)
        )
        with pytest.raises(StorageUnavailable):
            await store.commit("ws", "r1", first)
        # The engine retries with the checkpoint built again (a later clock, a new event).
        again = Checkpoint(
            {"last_seq": 2, "transcript_len": 1, "at": 2.0}, 1, [{"text": "m1"}], {}, _events(1, 2)
        )
        await store.commit("ws", "r1", again)
        assert await store.read_state("ws", "r1") == {"last_seq": 2, "transcript_len": 1, "at": 2.0}
        assert [d["seq"] for d in await store.read_segments("ws", "r1", "events", 0, 2)] == [1, 2]
        assert [d["text"] for d in await store.read_segments("ws", "r1", "transcript", 0, 1)] == ["m1"]
    finally:
        await store.close()


async def test_a_read_that_started_before_a_commit_does_not_outdate_it(
    moto: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await _storage(moto)
    try:
        await store.create_run("ws", "r1", {}, {"last_seq": 0})
        await store.commit("ws", "r1", Checkpoint({"last_seq": 1}, 0, (), {}, _events(1, 1)))
        get = store._get
        answered, release = asyncio.Event(), asyncio.Event()

        async def slow(key: str) -> tuple[bytes, str] | None:
            found = await get(key)
            answered.set()
            await release.wait()
            return found

        monkeypatch.setattr(store, "_get", slow)
        reader = asyncio.create_task(store.read_state("ws", "r1"))  # e.g. a watcher's poll
        await answered.wait()  # it read the first state...
        monkeypatch.setattr(store, "_get", get)
        await store.commit("ws", "r1", Checkpoint({"last_seq": 2}, 0, (), {}, _events(2, 1)))
        written = store._heads[("ws", "r1")]
        release.set()  # ...and hands it over only after the second one landed
        assert await reader == {"last_seq": 1}
        assert store._heads[("ws", "r1")] is written
    finally:
        await store.close()


async def test_leases_this_process_wrote_are_renewed_without_a_read_yet_never_stolen(moto: str) -> None:
    a = await _storage(moto)
    b = await _storage(moto, a._bucket)
    try:
        # Created by a, first leased by b (another process) which writes events ahead.
        await a.create_run("ws", "r1", {}, {"last_seq": 0})
        assert await b.read_state("ws", "r1") == {"last_seq": 0}
        assert await b.acquire_lease("ws", "r1", "b", ttl=1.0)
        await b.write_segment("ws", "r1", "events", 1, _events(1, 3))
        assert not await a.acquire_lease("ws", "r1", "a", ttl=30)
        await asyncio.sleep(1.1)  # b's lease runs out; a takes the run over and finds b's events
        assert await a.acquire_lease("ws", "r1", "a", ttl=30)
        assert await a.read_state("ws", "r1") == {"last_seq": 0}
        assert await a.repair_end("ws", "r1", "events") == 3
        # b, stale, can neither renew (its remembered version is gone) nor release a's lease.
        assert not await b.acquire_lease("ws", "r1", "b", ttl=30)
        await b.release_lease("ws", "r1", "b")
        assert await a.acquire_lease("ws", "r1", "a", ttl=30)  # renewed
        assert not await b.acquire_lease("ws", "r1", "b", ttl=30)
        await a.release_lease("ws", "r1", "a")
        assert await b.acquire_lease("ws", "r1", "b", ttl=30)
    finally:
        await a.close()
        await b.close()


async def test_checkpoints_do_not_wait_for_the_tail_being_moved_out(
    moto: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_s3, "TAIL_BYTES", 300)
    store = await _storage(moto)
    gate = asyncio.Event()
    put = store._put

    async def slow_segments(key: str, data: bytes, **conditions: str) -> str | None:
        if "/events/" in key or "/transcript/" in key:
            await gate.wait()  # a slow object store
        return await put(key, data, **conditions)

    monkeypatch.setattr(store, "_put", slow_segments)
    try:
        await store.create_run("ws", "r1", {}, {"last_seq": 0})

        async def commit(n: int) -> None:
            state = {"last_seq": 2 * n, "transcript_len": n}
            entry = [{"text": f"m{n}", "pad": "y" * 100}]
            await store.commit("ws", "r1", Checkpoint(state, n, entry, {}, _events(2 * n - 1, 2)))

        for n in range(1, 11):  # the tail passes TAIL_BYTES at once; its segments cannot land yet
            await asyncio.wait_for(commit(n), 5)
        assert ("ws", "r1") in store._moving
        raw = await store._get(store._run("ws", "r1", "state.json"))
        assert raw is not None
        grown = len(raw[0])
        gate.set()
        await _moves_landed(store)  # the tail of commit 1 (the one move under way)
        await commit(11)  # leaves that out, and moves the rest out after it
        await _moves_landed(store)
        await commit(12)  # leaves all that out
        raw = await store._get(store._run("ws", "r1", "state.json"))
        assert raw is not None
        assert len(raw[0]) < grown / 3
        assert [e["seq"] for e in json.loads(raw[0])["log"]["events"]] == [23, 24]
        reader = await _storage(moto, store._bucket)
        seqs = [d["seq"] for d in await reader.read_segments("ws", "r1", "events", 0, 24)]
        assert seqs == list(range(1, 25))
        texts = [d["text"] for d in await reader.read_segments("ws", "r1", "transcript", 0, 12)]
        assert texts == [f"m{n}" for n in range(1, 13)]
        await reader.close()

        # A deletion waits for a move under way: no segment of it lands after the run is gone.
        gate.clear()
        for n in range(13, 17):
            await commit(n)
        assert ("ws", "r1") in store._moving
        deleting = asyncio.create_task(store.delete_run("ws", "r1"))
        await asyncio.sleep(0.2)
        assert not deleting.done()
        gate.set()
        await asyncio.wait_for(deleting, 10)
        assert await _raw_keys(store, "r1") == []
    finally:
        gate.set()
        await store.close()
