"""Threads and forks through gRPC, on local storage and on S3 (moto): a run continues a thread's
history, a fork branches from any completed turn, and neither copies what it shares."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from engine_service.core._threads import load_context
from engine_service.core._types import Message
from engine_service.storage._local import LocalStorage
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import run_pb2 as rp
from tests.engine.threads_fixture import Stack, fails, stack

pytestmark = pytest.mark.timeout(60)

__all__ = ["stack"]


async def test_a_third_run_answers_from_the_first(stack: Stack) -> None:
    first = await stack.run("remember apples")
    assert first.state == rp.RUN_STATE_DONE
    assert first.thread_id == first.run_id  # a run of its own is the first run of its own thread
    second = await stack.run("remember pears", thread_id=first.run_id)
    third = await stack.run("recall", thread_id=first.run_id)
    assert third.data.string_value == "apples,pears"
    assert {second.thread_id, third.thread_id} == {first.run_id}
    # The model was shown the whole conversation, then the new task.
    assert stack.seen[-1] == [
        ("user", "remember apples"),
        ("assistant", "ok"),
        ("user", "remember pears"),
        ("assistant", "ok"),
        ("user", "recall"),
    ]
    thread = (await stack.stub.GetThread(svc.GetThreadRequest(thread_id=first.run_id))).thread
    assert list(thread.run_ids) == [first.run_id, second.run_id, third.run_id]
    assert thread.active_run_id == ""


async def test_a_run_without_a_thread_sees_only_its_task(stack: Stack) -> None:
    await stack.run("remember apples")
    alone = await stack.run("recall")
    assert alone.data.string_value == "nothing"


async def test_each_run_keeps_its_own_gap_free_seq(stack: Stack) -> None:
    first = await stack.run("remember a", thread_id="chat-1")
    second = await stack.run("remember b", thread_id="chat-1")
    assert first.thread_id == second.thread_id == "chat-1"
    for run in (first, second):
        seqs = [e.seq for e in await stack.events(run.run_id)]
        assert seqs == list(range(1, len(seqs) + 1))
    thread = (await stack.stub.GetThread(svc.GetThreadRequest(thread_id="chat-1"))).thread
    assert list(thread.run_ids) == [first.run_id, second.run_id]


async def test_a_run_stores_references_not_a_copy_of_the_history(stack: Stack) -> None:
    runs = [await stack.run(f"remember {i}", thread_id="long") for i in range(4)]
    spec = await stack.storage.read_spec("default", runs[-1].run_id)
    assert spec is not None
    assert spec["context"] == [
        {"run_id": runs[0].run_id, "upto": 2},
        {"run_id": runs[1].run_id, "upto": 2},
        {"run_id": runs[2].run_id, "upto": 2},
    ]
    # Its own transcript holds only its own turn.
    state = await stack.storage.read_state("default", runs[-1].run_id)
    assert state is not None
    assert state["transcript_len"] == 2
    context = await load_context(stack.storage, "default", spec["context"])
    assert [m.text for m in context] == ["remember 0", "ok", "remember 1", "ok", "remember 2", "ok"]


async def test_one_active_run_per_thread(stack: Stack) -> None:
    first = await stack.run("remember a", thread_id="busy")
    paused = await stack.start(
        "write",
        thread_id="busy",
        model=svc.ModelSpec(
            provider="scripted",
            script=[svc.ScriptedTurn(tool_calls=[svc.ScriptedToolCall(name="lookup")])],
        ),
        client_tools=[svc.ToolDefinition(name="lookup", description="the caller answers")],
    )
    assert (await stack.wait(paused.run_id)).state == rp.RUN_STATE_PAUSED
    code = await fails(stack.start("recall", thread_id="busy"))
    assert code == (grpc.StatusCode.FAILED_PRECONDITION, "ERR_THREAD_BUSY")
    thread = (await stack.stub.GetThread(svc.GetThreadRequest(thread_id="busy"))).thread
    assert thread.active_run_id == paused.run_id
    await stack.stub.CancelRun(svc.CancelRunRequest(run_id=paused.run_id))
    after = await stack.run("recall", thread_id="busy")
    assert after.state == rp.RUN_STATE_DONE
    assert first.run_id in thread.run_ids


async def test_concurrent_starts_on_one_thread_one_wins(stack: Stack) -> None:
    await stack.run("remember a", thread_id="race")
    results = await asyncio.gather(
        *(stack.stub.CreateRun(svc.CreateRunRequest(spec=svc.RunSpec(
            task="remember b", thread_id="race", model=svc.ModelSpec(provider="openai", name="memory"))))
          for _ in range(4)),
        return_exceptions=True,
    )  # fmt: skip
    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(won) >= 1
    assert len(won) + len(lost) == 4
    for error in lost:
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_fork_diverges_while_the_original_is_untouched(stack: Stack) -> None:
    a = await stack.run("remember apples", thread_id="orig")
    b = await stack.run("remember pears", thread_id="orig")
    # Fork after the first run's turn: the branch shares "apples" only.
    fork = await stack.run(
        "remember plums", fork_from=rp.ForkSource(run_id=a.run_id, turn=1), thread_id="branch"
    )
    assert fork.thread_id == "branch"
    branch_recall = await stack.run("recall", thread_id="branch")
    assert branch_recall.data.string_value == "apples,plums"
    orig_recall = await stack.run("recall", thread_id="orig")
    assert orig_recall.data.string_value == "apples,pears"
    orig = (await stack.stub.GetThread(svc.GetThreadRequest(thread_id="orig"))).thread
    assert list(orig.run_ids) == [a.run_id, b.run_id, orig_recall.run_id]
    branch = (await stack.stub.GetThread(svc.GetThreadRequest(thread_id="branch"))).thread
    assert list(branch.run_ids) == [fork.run_id, branch_recall.run_id]
    assert branch.forked_from.run_id == a.run_id
    assert branch.forked_from.turn == 1


async def test_a_fork_at_a_seq_and_of_a_whole_run(stack: Stack) -> None:
    a = await stack.run("remember apples")
    events = await stack.events(a.run_id)
    assistant_seq = next(e.seq for e in events if e.WhichOneof("kind") == "assistant_message")
    at_seq = await stack.run("recall", fork_from=rp.ForkSource(run_id=a.run_id, seq=assistant_seq))
    assert at_seq.data.string_value == "apples"
    assert at_seq.thread_id not in ("", a.run_id)
    whole = await stack.run("recall", fork_from=rp.ForkSource(run_id=a.run_id))
    assert whole.data.string_value == "apples"


async def test_bad_fork_points_are_refused(stack: Stack) -> None:
    a = await stack.run("remember apples")
    for source in (
        rp.ForkSource(run_id=a.run_id, turn=2),
        rp.ForkSource(run_id=a.run_id, seq=10_000),
        rp.ForkSource(run_id=a.run_id, seq=1),
    ):
        code = await fails(stack.start("x", fork_from=source))
        assert code == (grpc.StatusCode.FAILED_PRECONDITION, "ERR_FORK_POINT")
    missing = rp.ForkSource(run_id="no-such-run")
    code = await fails(stack.start("x", fork_from=missing))
    assert code == (grpc.StatusCode.NOT_FOUND, "ERR_RUN_NOT_FOUND")
    await stack.run("remember b", thread_id="taken")
    taken = rp.ForkSource(run_id=a.run_id)
    code = await fails(stack.start("x", fork_from=taken, thread_id="taken"))
    assert code == (grpc.StatusCode.ALREADY_EXISTS, "ERR_THREAD_EXISTS")


async def test_get_thread_of_nothing_is_not_found(stack: Stack) -> None:
    code = await fails(stack.stub.GetThread(svc.GetThreadRequest(thread_id="nope")))
    assert code == (grpc.StatusCode.NOT_FOUND, "ERR_THREAD_NOT_FOUND")
    code = await fails(stack.stub.GetThread(svc.GetThreadRequest(thread_id="../x")))
    assert code == (grpc.StatusCode.INVALID_ARGUMENT, "ERR_INVALID_ID")


async def test_list_threads_pages_and_filters_by_labels(stack: Stack) -> None:
    for i in range(5):
        stack.clock.advance(1)
        await stack.run("remember x", thread_id=f"t{i}", labels={"team": "red" if i % 2 else "blue"})
    page = await stack.stub.ListThreads(svc.ListThreadsRequest(page_size=2))
    assert [t.thread_id for t in page.threads] == ["t4", "t3"]
    seen = [t.thread_id for t in page.threads]
    while page.next_page_token:
        page = await stack.stub.ListThreads(
            svc.ListThreadsRequest(page_size=2, page_token=page.next_page_token)
        )
        seen += [t.thread_id for t in page.threads]
    assert seen == ["t4", "t3", "t2", "t1", "t0"]
    red = await stack.stub.ListThreads(svc.ListThreadsRequest(labels={"team": "red"}))
    assert [t.thread_id for t in red.threads] == ["t3", "t1"]
    assert all(len(t.run_ids) == 1 for t in red.threads)
    code = await fails(stack.stub.ListThreads(svc.ListThreadsRequest(page_token="junk")))
    assert code == (grpc.StatusCode.INVALID_ARGUMENT, "ERR_INVALID_REQUEST")


async def test_the_threads_bench_runs_at_a_tiny_size() -> None:
    from bench.threads import measure

    data = await measure(length=4, samples=2)
    assert len(data["first_start_ms"]) == len(data["last_start_ms"]) == 2
    assert data["runs_deleted"] == 6
    assert data["bytes_left"] == 0


async def test_a_compacted_run_is_continued_as_its_model_saw_it(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    transcript = [
        Message("user", "task one"),
        Message("assistant", "old turn"),
        Message("user", "old question"),
        Message("assistant", "kept turn"),
        Message("compaction", "what happened before", keep_from=3),
    ]
    await storage.create_run("default", "r1", {}, {})
    await storage.write_segment("default", "r1", "transcript", 1, [m.to_json() for m in transcript])
    history = await load_context(
        storage, "default", [{"run_id": "r1", "upto": 5}, {"run_id": "gone", "upto": 3}]
    )
    assert [m.role for m in history] == ["user", "user", "assistant"]
    assert history[0].text == "task one"
    assert "what happened before" in history[1].text
    assert history[2].text == "kept turn"
    # A shorter segment of the same run stops before its compaction: all of it is seen.
    assert [m.text for m in await load_context(storage, "default", [{"run_id": "r1", "upto": 2}])] == [
        "task one",
        "old turn",
    ]
    await storage.close()


async def test_a_fork_that_fails_to_start_leaves_nothing_behind(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine_service.storage._protocol import StorageUnavailable

    a = await stack.run("remember apples")
    real = stack.storage.create_run

    async def down(*args: object, **kwargs: object) -> bool:
        raise StorageUnavailable("storage is away")

    monkeypatch.setattr(stack.storage, "create_run", down)
    code = await fails(stack.start("recall", fork_from=rp.ForkSource(run_id=a.run_id), thread_id="branch"))
    assert code[0] == grpc.StatusCode.UNAVAILABLE
    monkeypatch.setattr(stack.storage, "create_run", real)
    # No thread, and no fork mark keeping the source run: it can be deleted, the thread id reused.
    code = await fails(stack.stub.GetThread(svc.GetThreadRequest(thread_id="branch")))
    assert code == (grpc.StatusCode.NOT_FOUND, "ERR_THREAD_NOT_FOUND")
    assert not [n for n in await stack.object_names() if "branch" in n]
    retried = await stack.run("recall", fork_from=rp.ForkSource(run_id=a.run_id), thread_id="branch")
    assert retried.data.string_value == "apples"
    await stack.stub.DeleteThread(svc.DeleteThreadRequest(thread_id="branch"))
    await stack.stub.DeleteRun(svc.DeleteRunRequest(run_id=a.run_id))


async def _all_thread_ids(stack: Stack, page_size: int) -> list[str]:
    page = await stack.stub.ListThreads(svc.ListThreadsRequest(page_size=page_size))
    seen = [t.thread_id for t in page.threads]
    while page.next_page_token:
        page = await stack.stub.ListThreads(
            svc.ListThreadsRequest(page_size=page_size, page_token=page.next_page_token)
        )
        seen += [t.thread_id for t in page.threads]
    return seen


async def test_list_threads_pages_by_key_and_reads_only_the_page(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(12):
        stack.clock.advance(1)
        await stack.run("remember x", thread_id=f"k{i:02d}")
    reads: list[str] = []
    real_get = stack.storage.get_doc

    async def counted(ws: str, key: str) -> object:
        reads.append(key)
        return await real_get(ws, key)

    monkeypatch.setattr(stack.storage, "get_doc", counted)
    first = await stack.stub.ListThreads(svc.ListThreadsRequest(page_size=3))
    assert [t.thread_id for t in first.threads] == ["k11", "k10", "k09"]
    # One page reads its own threads' documents (and one index entry past it), not all twelve.
    assert len([k for k in reads if k.startswith("threads/")]) == 3
    assert len(reads) < 12
    # Threads created or deleted meanwhile shift nothing: the token names the last one shown.
    stack.clock.advance(1)
    await stack.run("remember y", thread_id="newer")
    await stack.stub.DeleteThread(svc.DeleteThreadRequest(thread_id="k10"))
    second = await stack.stub.ListThreads(
        svc.ListThreadsRequest(page_size=3, page_token=first.next_page_token)
    )
    assert [t.thread_id for t in second.threads] == ["k08", "k07", "k06"]
    assert await _all_thread_ids(stack, 5) == ["newer", "k11", *(f"k{i:02d}" for i in range(9, -1, -1))]


async def test_list_threads_refuses_tokens_it_did_not_write(stack: Stack) -> None:
    import base64
    import json

    for i in range(3):
        stack.clock.advance(1)
        await stack.run("remember x", thread_id=f"t{i}")
    page = await stack.stub.ListThreads(svc.ListThreadsRequest(page_size=1))
    assert page.next_page_token.startswith("t1.")

    def forged(name: object) -> str:
        return "t1." + base64.urlsafe_b64encode(json.dumps([name]).encode()).decode().rstrip("=")

    for token in (
        "2",
        "junk",
        "t1.!!!",
        forged("../threads/t0"),
        forged(5),
        forged("0" * 14 + ".zz"),
        "t1." + "A" * 400,
    ):
        code = await fails(stack.stub.ListThreads(svc.ListThreadsRequest(page_size=1, page_token=token)))
        assert code == (grpc.StatusCode.INVALID_ARGUMENT, "ERR_INVALID_REQUEST"), token


async def test_threads_stored_before_the_index_are_listed(stack: Stack) -> None:
    for i in range(4):
        stack.clock.advance(1)
        await stack.run("remember x", thread_id=f"old{i}", labels={"n": str(i % 2)})
    for key in await stack.storage.list_docs("default", "thread-index"):
        await stack.storage.delete_doc("default", key)
    assert await _all_thread_ids(stack, 3) == ["old3", "old2", "old1", "old0"]
    odd = await stack.stub.ListThreads(svc.ListThreadsRequest(labels={"n": "1"}))
    assert [t.thread_id for t in odd.threads] == ["old3", "old1"]
    assert len(await stack.storage.list_docs("default", "thread-index")) == 4


async def test_an_entry_left_by_a_gone_thread_hides_no_thread_missing_its_own(stack: Stack) -> None:
    for i in range(3):
        stack.clock.advance(1)
        await stack.run("remember x", thread_id=f"kept{i}")
    keys = await stack.storage.list_docs("default", "thread-index")
    # One thread lost its entry (a start that died between its writes) while an entry of a
    # thread whose document is gone is still there: as many entries as threads.
    await stack.storage.delete_doc("default", keys[0])
    await stack.storage.put_doc(
        "default",
        "thread-index/00000000000001." + "0" * 24,
        {"thread_id": "gone", "created_at": 1, "labels": {}},
    )
    assert await _all_thread_ids(stack, 2) == ["kept2", "kept1", "kept0"]


async def test_a_run_of_its_own_cannot_take_a_threads_name(stack: Stack) -> None:
    """A run started without a thread starts a thread named by its run id: a run id the caller
    chose that names an existing thread would make the run look like part of that thread (its
    deletion then refused, the thread later adopting it)."""
    await stack.run("remember apples", thread_id="shared-name")
    code = await fails(stack.start("remember pears", run_id="shared-name"))
    assert code == (grpc.StatusCode.ALREADY_EXISTS, "ERR_THREAD_EXISTS")
    assert (await stack.run("recall", thread_id="shared-name")).data.string_value == "apples"
    # An id that names no thread is fine, and a follow-up on that run continues it as before.
    own = await stack.run("remember plums", run_id="own-name")
    assert own.state == rp.RUN_STATE_DONE
    assert (await stack.run("recall", thread_id="own-name")).data.string_value == "plums"
