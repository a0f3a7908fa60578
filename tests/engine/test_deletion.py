"""Deleting runs and threads, and retention, through gRPC on local storage and S3 (moto):
deleted means NOT_FOUND through every RPC and no object of it left in storage."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from engine_service.core import _deletion as deletion
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import run_pb2 as rp
from tests.engine.threads_fixture import Stack, build_stack, code_of, fails, stack

pytestmark = pytest.mark.timeout(90)

__all__ = ["stack"]

DAY = 86_400.0


def files_run(task: str) -> dict[str, object]:
    """A run that writes a file (its directory is snapshotted into storage: the file is too
    large to travel inside the run's state) and answers."""
    content = "hi " * 2000
    script = [
        svc.ScriptedTurn(
            tool_calls=[
                svc.ScriptedToolCall(name="Write", arguments=_struct({"path": "a.txt", "content": content}))
            ]
        ),
        svc.ScriptedTurn(text=f"done {task}"),
    ]
    return {"model": svc.ModelSpec(provider="scripted", script=script)}


def _struct(doc: dict[str, Any]) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(doc)
    return value


async def every_rpc_is_not_found(stack: Stack, run_id: str) -> None:
    stub = stack.stub
    calls = [
        stub.GetRun(svc.GetRunRequest(run_id=run_id)),
        stub.WaitRun(svc.WaitRunRequest(run_id=run_id, timeout_ms=100)),
        stub.StreamRunEvents(svc.StreamRunEventsRequest(run_id=run_id)),
        stub.StreamRunEvents(svc.StreamRunEventsRequest(run_id=run_id, follow=True)),
        stub.ResumeRun(
            svc.ResumeRunRequest(
                run_id=run_id, decisions=[svc.Decision(interrupt_id="x", approve=svc.Approve())]
            )
        ),
        stub.CancelRun(svc.CancelRunRequest(run_id=run_id)),
        stub.GetToolResult(svc.GetToolResultRequest(run_id=run_id, call_id="call_1_1")),
        stub.DeleteRun(svc.DeleteRunRequest(run_id=run_id)),
    ]
    for call in calls:
        code, reason = await fails(call)
        assert code == grpc.StatusCode.NOT_FOUND, (call, reason)
    listed = await stub.ListRuns(svc.ListRunsRequest())
    assert run_id not in [r.run_id for r in listed.runs]


async def test_a_deleted_run_is_not_found_anywhere_and_nothing_of_it_is_left(stack: Stack) -> None:
    run = await stack.run("files", request_id="req-files-1", **files_run("files"))
    assert run.state == rp.RUN_STATE_DONE
    before = await stack.object_names(run.run_id)
    assert any("/blobs/" in name for name in before)  # the run directory's snapshot
    await stack.stub.DeleteRun(svc.DeleteRunRequest(run_id=run.run_id))
    await every_rpc_is_not_found(stack, run.run_id)
    assert await stack.object_names(run.run_id) == []
    assert await stack.object_names("req-files-1") == []
    # The idempotency key went with it: the same request starts a new run.
    again = await stack.run("files", request_id="req-files-1", **files_run("files"))
    assert again.run_id != run.run_id


async def test_an_active_or_paused_run_is_cancelled_first(stack: Stack) -> None:
    paused = await stack.start(
        "ask",
        model=svc.ModelSpec(
            provider="scripted", script=[svc.ScriptedTurn(tool_calls=[svc.ScriptedToolCall(name="lookup")])]
        ),
        client_tools=[svc.ToolDefinition(name="lookup")],
    )
    assert (await stack.wait(paused.run_id)).state == rp.RUN_STATE_PAUSED
    code = await fails(stack.stub.DeleteRun(svc.DeleteRunRequest(run_id=paused.run_id)))
    assert code == (grpc.StatusCode.FAILED_PRECONDITION, "ERR_RUN_ACTIVE")
    code = await fails(stack.stub.DeleteThread(svc.DeleteThreadRequest(thread_id=paused.run_id)))
    assert code == (grpc.StatusCode.FAILED_PRECONDITION, "ERR_RUN_ACTIVE")
    await stack.stub.CancelRun(svc.CancelRunRequest(run_id=paused.run_id))
    await stack.stub.DeleteRun(svc.DeleteRunRequest(run_id=paused.run_id))
    await every_rpc_is_not_found(stack, paused.run_id)


async def test_a_run_whose_history_is_shared_is_kept(stack: Stack) -> None:
    a = await stack.run("remember a", thread_id="t")
    b = await stack.run("remember b", thread_id="t")
    code = await fails(stack.stub.DeleteRun(svc.DeleteRunRequest(run_id=a.run_id)))
    assert code == (grpc.StatusCode.FAILED_PRECONDITION, "ERR_RUN_REFERENCED")
    await stack.stub.DeleteRun(svc.DeleteRunRequest(run_id=b.run_id))  # the latest run may go
    thread = (await stack.stub.GetThread(svc.GetThreadRequest(thread_id="t"))).thread
    assert list(thread.run_ids) == [a.run_id]
    # The thread goes on from what is left.
    c = await stack.run("recall", thread_id="t")
    assert c.data.string_value == "a"
    await stack.stub.DeleteRun(svc.DeleteRunRequest(run_id=c.run_id))
    await stack.stub.DeleteRun(svc.DeleteRunRequest(run_id=a.run_id))
    await every_rpc_is_not_found(stack, a.run_id)


async def test_delete_thread_leaves_nothing_of_it(stack: Stack) -> None:
    runs = [await stack.run(f"remember {i}", thread_id="gone") for i in range(3)]
    kept = await stack.run("remember other", thread_id="kept")
    response = await stack.stub.DeleteThread(svc.DeleteThreadRequest(thread_id="gone"))
    assert sorted(response.run_ids) == sorted(r.run_id for r in runs)
    for run in runs:
        await every_rpc_is_not_found(stack, run.run_id)
        assert await stack.object_names(run.run_id) == []
    assert await stack.object_names("gone") == []
    code = await fails(stack.stub.GetThread(svc.GetThreadRequest(thread_id="gone")))
    assert code == (grpc.StatusCode.NOT_FOUND, "ERR_THREAD_NOT_FOUND")
    assert (await stack.stub.GetRun(svc.GetRunRequest(run_id=kept.run_id))).run.state == rp.RUN_STATE_DONE
    listed = await stack.stub.ListThreads(svc.ListThreadsRequest())
    assert [t.thread_id for t in listed.threads] == ["kept"]


async def test_a_forked_history_needs_force(stack: Stack) -> None:
    a = await stack.run("remember apples", thread_id="src")
    fork = await stack.run("remember plums", fork_from=rp.ForkSource(run_id=a.run_id), thread_id="fork")
    code = await fails(stack.stub.DeleteThread(svc.DeleteThreadRequest(thread_id="src")))
    assert code == (grpc.StatusCode.FAILED_PRECONDITION, "ERR_RUN_REFERENCED")
    code = await fails(stack.stub.DeleteRun(svc.DeleteRunRequest(run_id=a.run_id)))
    assert code == (grpc.StatusCode.FAILED_PRECONDITION, "ERR_RUN_REFERENCED")
    # Deleting the fork first frees the source.
    await stack.stub.DeleteThread(svc.DeleteThreadRequest(thread_id="fork"))
    await every_rpc_is_not_found(stack, fork.run_id)
    await stack.stub.DeleteThread(svc.DeleteThreadRequest(thread_id="src"))
    assert [n for n in await stack.object_names() if "/runs/" in n or "/docs/" in n] == []


async def test_force_deletes_a_thread_a_fork_shares(stack: Stack) -> None:
    a = await stack.run("remember apples", thread_id="src")
    await stack.run("remember plums", fork_from=rp.ForkSource(run_id=a.run_id), thread_id="fork")
    await stack.stub.DeleteThread(svc.DeleteThreadRequest(thread_id="src", force=True))
    await every_rpc_is_not_found(stack, a.run_id)
    assert await stack.object_names(a.run_id) == []
    # The fork lost the shared part of its history, nothing else.
    recall = await stack.run("recall", thread_id="fork")
    assert recall.data.string_value == "plums"


async def test_bytes_left_after_deleting_every_thread_are_zero(stack: Stack) -> None:
    first = await stack.run("remember a")
    await stack.run("remember b", thread_id=first.run_id)
    await stack.run("remember c", fork_from=rp.ForkSource(run_id=first.run_id), thread_id="f")
    await stack.stub.DeleteThread(svc.DeleteThreadRequest(thread_id="f"))
    await stack.stub.DeleteThread(svc.DeleteThreadRequest(thread_id=first.run_id))
    left = [n for n in await stack.object_names() if "/runs/" in n or "/docs/" in n or "/requests/" in n]
    assert left == []


# -- retention ------------------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
async def kept_one_day(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncGenerator[Stack, None]:
    moto_url = request.getfixturevalue("moto") if request.param == "s3" else None
    built = await build_stack(
        request.param,
        tmp_path,
        moto_url,
        config={"retention_days": 1, "workspace_retention_days": {"other": 0}},
    )
    yield built
    await built.channel.close()
    await built.server.stop(0.5)


async def test_retention_deletes_exactly_the_expired_runs(kept_one_day: Stack) -> None:
    stack = kept_one_day
    old = [await stack.run(f"remember {i}") for i in range(3)]
    stack.clock.advance(DAY / 2)
    young = await stack.run("remember young")
    stack.clock.advance(DAY / 2 + 60)  # the old ones ended a day and a minute ago
    listed = await stack.stub.ApplyRetention(svc.ApplyRetentionRequest(dry_run=True))
    assert listed.dry_run
    assert listed.retention_days == 1
    assert sorted(listed.run_ids) == sorted(r.run_id for r in old)
    for run in old:  # a dry run deletes nothing
        assert (await stack.stub.GetRun(svc.GetRunRequest(run_id=run.run_id))).run.state == rp.RUN_STATE_DONE
    applied = await stack.stub.ApplyRetention(svc.ApplyRetentionRequest())
    assert sorted(applied.run_ids) == sorted(r.run_id for r in old)
    for run in old:
        await every_rpc_is_not_found(stack, run.run_id)
        assert await stack.object_names(run.run_id) == []
    assert (await stack.stub.GetRun(svc.GetRunRequest(run_id=young.run_id))).run.state == rp.RUN_STATE_DONE
    assert (await stack.stub.ApplyRetention(svc.ApplyRetentionRequest())).run_ids == []


async def test_retention_keeps_history_a_kept_run_shares(kept_one_day: Stack) -> None:
    stack = kept_one_day
    a = await stack.run("remember a", thread_id="t")
    stack.clock.advance(2 * DAY)
    b = await stack.run("remember b", thread_id="t")
    assert (await stack.stub.ApplyRetention(svc.ApplyRetentionRequest())).run_ids == []
    stack.clock.advance(2 * DAY)
    applied = await stack.stub.ApplyRetention(svc.ApplyRetentionRequest())
    assert applied.run_ids == [b.run_id, a.run_id]  # the latest first
    assert list(applied.thread_ids) == ["t"]
    assert [n for n in await stack.object_names() if "/runs/" in n or "/docs/" in n] == []


async def test_retention_is_per_workspace_and_off_by_default(stack: Stack) -> None:
    run = await stack.run("remember a")
    stack.clock.advance(1000 * DAY)
    response = await stack.stub.ApplyRetention(svc.ApplyRetentionRequest())
    assert response.retention_days == 0
    assert list(response.run_ids) == []
    assert (await stack.stub.GetRun(svc.GetRunRequest(run_id=run.run_id))).run.state == rp.RUN_STATE_DONE


async def test_the_background_sweep_applies_retention(tmp_path: Path) -> None:
    first = await build_stack("local", tmp_path, None)
    run = await first.run("remember a")
    await first.channel.close()
    await first.server.stop(0.5)
    second = await build_stack(
        "local",
        tmp_path,
        None,
        config={"retention_days": 1, "retention_interval_s": 3600, "recovery_interval_s": 0},
    )
    try:
        # A day later: the sweep at startup deletes it (recovery_interval_s 0 sweeps once).
        second.clock.advance(2 * DAY)
        await second.engine._jobs._retention_due()
        await every_rpc_is_not_found(second, run.run_id)
    finally:
        await second.channel.close()
        await second.server.stop(0.5)


@pytest.mark.slow
async def test_the_retention_command(tmp_path: Path) -> None:
    stack = await build_stack("local", tmp_path, None)
    stack.clock.now = time.time() - 3 * DAY
    old = await stack.run("remember old")
    stack.clock.now = time.time()
    young = await stack.run("remember young")
    await stack.channel.close()
    await stack.server.stop(0.5)
    env = {**os.environ, "MACHINA_STORAGE": str(tmp_path / "storage"), "MACHINA_RETENTION_DAYS": "2"}
    command = [sys.executable, "-m", "engine_service", "retention"]
    dry = await asyncio.to_thread(
        subprocess.run, [*command, "--dry-run"], env=env, capture_output=True, text=True, timeout=60
    )
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout.splitlines()[0])
    assert report == {"workspace": "default", "retention_days": 2.0, "dry_run": True,
                      "run_ids": [old.run_id], "thread_ids": []}  # fmt: skip
    assert (tmp_path / "storage" / "workspaces" / "default" / "runs" / old.run_id).exists()
    done = await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[0])["run_ids"] == [old.run_id]
    assert not (tmp_path / "storage" / "workspaces" / "default" / "runs" / old.run_id).exists()
    assert (tmp_path / "storage" / "workspaces" / "default" / "runs" / young.run_id).exists()


async def _outcome(call: Any) -> Any:
    """What a unary call answered, or the (status, reason) it failed with."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        return code_of(error)


BUSY = (grpc.StatusCode.FAILED_PRECONDITION, "ERR_THREAD_BUSY")


async def test_delete_thread_racing_a_start_on_it_leaves_no_run_on_a_deleted_thread(stack: Stack) -> None:
    """DeleteThread and CreateRun on one thread at once, many times, at varied offsets: either the
    deletion is refused and the new run continues the thread, or the start is refused, or the run
    starts a new thread of that id once the old one is gone; never a run on a deleted thread."""
    for i in range(24):
        thread_id = f"race-{i:03d}-x"
        await stack.run("remember apples", thread_id=thread_id)

        async def start(thread_id: str, delay: float) -> Any:
            await asyncio.sleep(delay)
            return await _outcome(stack.start("recall", thread_id=thread_id))

        deleting = _outcome(stack.stub.DeleteThread(svc.DeleteThreadRequest(thread_id=thread_id)))
        done, started = await asyncio.gather(deleting, start(thread_id, (i % 8) * 0.002))
        deleted = isinstance(done, svc.DeleteThreadResponse)
        assert deleted or done in (BUSY, (grpc.StatusCode.FAILED_PRECONDITION, "ERR_RUN_ACTIVE")), done
        if not isinstance(started, rp.Run):
            assert started == BUSY
            if deleted:
                code = await fails(stack.stub.GetThread(svc.GetThreadRequest(thread_id=thread_id)))
                assert code == (grpc.StatusCode.NOT_FOUND, "ERR_THREAD_NOT_FOUND")
                assert not [n for n in await stack.object_names() if thread_id in n]
            continue
        waited = await _outcome(
            stack.stub.WaitRun(svc.WaitRunRequest(run_id=started.run_id, timeout_ms=20_000))
        )
        if not isinstance(waited, svc.WaitRunResponse):
            # It started and ended before the deletion read the thread: it went with the thread.
            assert waited[0] == grpc.StatusCode.NOT_FOUND
            assert deleted
            code = await fails(stack.stub.GetThread(svc.GetThreadRequest(thread_id=thread_id)))
            assert code == (grpc.StatusCode.NOT_FOUND, "ERR_THREAD_NOT_FOUND")
            continue
        run = waited.run
        assert run.state == rp.RUN_STATE_DONE
        thread = (await stack.stub.GetThread(svc.GetThreadRequest(thread_id=thread_id))).thread
        assert thread.run_ids[-1] == run.run_id
        if deleted:  # it started a new thread of that id after the old one went
            assert list(thread.run_ids) == [run.run_id]
            assert run.data.string_value == "nothing"
        else:
            assert len(thread.run_ids) == 2
            assert run.data.string_value == "apples"


# -- a deletion that dies, a deletion that stalls ---------------------------------------------


async def test_a_thread_deletion_that_died_is_taken_over_by_the_next(stack: Stack) -> None:
    """A DeleteThread whose process died leaves the thread's closing mark behind, never renewed:
    another DeleteThread refuses while the mark may belong to a deletion at work, then takes it
    over and finishes, instead of the thread staying half-deleted for many minutes."""
    runs = [await stack.run(f"remember {i}", thread_id="half") for i in range(2)]
    now = stack.clock()
    dead = {"thread_id": "half", "at": now, "beat": now, "token": "del_dead"}
    await stack.storage.put_doc("default", "thread-closing/half", dead)
    stack.clock.advance(30)
    refused = await fails(stack.stub.DeleteThread(svc.DeleteThreadRequest(thread_id="half")))
    assert refused == BUSY
    assert await fails(stack.start("recall", thread_id="half")) == BUSY
    stack.clock.advance(31)  # a minute without the mark being renewed: its deletion died
    response = await stack.stub.DeleteThread(svc.DeleteThreadRequest(thread_id="half"))
    assert sorted(response.run_ids) == sorted(r.run_id for r in runs)
    code = await fails(stack.stub.GetThread(svc.GetThreadRequest(thread_id="half")))
    assert code == (grpc.StatusCode.NOT_FOUND, "ERR_THREAD_NOT_FOUND")
    assert [n for n in await stack.object_names() if "half" in n] == []


async def test_a_thread_deletion_at_work_keeps_its_mark(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deletion stalled on storage far longer than a dead one's mark lasts still holds the
    thread: it renews its mark while it works, so neither a second DeleteThread nor a new run
    gets in, and nothing of the thread (its mark included) is left once it finishes."""
    monkeypatch.setattr(deletion, "CLOSING_BEAT_S", 0.02)
    runs = [await stack.run(f"remember {i}", thread_id="slow") for i in range(2)]
    go_on, stalled = asyncio.Event(), asyncio.Event()
    real_delete = stack.storage.delete_run

    async def delete_run(ws: str, run_id: str) -> None:
        stalled.set()
        await go_on.wait()
        await real_delete(ws, run_id)

    monkeypatch.setattr(stack.storage, "delete_run", delete_run)
    deleting = asyncio.ensure_future(stack.stub.DeleteThread(svc.DeleteThreadRequest(thread_id="slow")))
    await asyncio.wait_for(stalled.wait(), 10)
    stack.clock.advance(120)  # two minutes into the stall
    mark = None
    for _ in range(200):  # the deletion renews its mark at the new time
        mark = await stack.storage.get_doc("default", "thread-closing/slow")
        if mark is not None and mark["beat"] == stack.clock():
            break
        await asyncio.sleep(0.02)
    assert mark is not None
    assert mark["beat"] == stack.clock()
    refused = await fails(stack.stub.DeleteThread(svc.DeleteThreadRequest(thread_id="slow")))
    assert refused == BUSY
    assert await fails(stack.start("recall", thread_id="slow")) == BUSY
    go_on.set()
    response = await deleting
    assert sorted(response.run_ids) == sorted(r.run_id for r in runs)
    assert [n for n in await stack.object_names() if "slow" in n] == []


# -- what shares a history, at the moment it is deleted -----------------------------------------


async def test_a_fork_named_like_a_run_of_the_thread_still_needs_force(stack: Stack) -> None:
    """Run ids and thread ids are the caller's to choose and may coincide: a fork whose thread id
    is the id of a run being deleted is still a fork sharing the history."""
    a = await stack.run("remember apples", thread_id="t")
    await stack.run("remember pears", thread_id="t", run_id="ticket-42")
    fork = await stack.run("remember plums", fork_from=rp.ForkSource(run_id=a.run_id), thread_id="ticket-42")
    assert fork.thread_id == "ticket-42"
    code = await fails(stack.stub.DeleteThread(svc.DeleteThreadRequest(thread_id="t")))
    assert code == (grpc.StatusCode.FAILED_PRECONDITION, "ERR_RUN_REFERENCED")
    assert (await stack.run("recall", thread_id="ticket-42")).data.string_value == "apples,plums"


async def test_retention_keeps_what_a_fork_named_like_an_expired_run_shares(kept_one_day: Stack) -> None:
    stack = kept_one_day
    a = await stack.run("remember apples", thread_id="t")
    await stack.run("remember x", thread_id="u")
    await stack.run("remember y", thread_id="u", run_id="side")  # expires with thread "u"
    stack.clock.advance(2 * DAY)
    await stack.run("remember plums", fork_from=rp.ForkSource(run_id=a.run_id), thread_id="side")
    applied = await stack.stub.ApplyRetention(svc.ApplyRetentionRequest())
    assert a.run_id not in applied.run_ids  # the fork "side" (kept) shares a's history
    assert "side" in applied.run_ids
    assert (await stack.run("recall", thread_id="side")).data.string_value == "apples,plums"


async def test_delete_run_refuses_while_a_follow_up_is_being_created(stack: Stack) -> None:
    """A follow-up has claimed its place on the thread but not written its run yet: the run
    before it is part of its history already."""
    a = await stack.run("remember apples", thread_id="t")
    real_create = stack.storage.create_run
    deleting: list[Any] = []

    async def create_run(ws: str, run_id: str, spec: Any, state: Any) -> bool:
        if run_id == "follow-up":
            deleting.append(await _outcome(stack.stub.DeleteRun(svc.DeleteRunRequest(run_id=a.run_id))))
        return await real_create(ws, run_id, spec, state)

    stack.storage.create_run = create_run  # type: ignore[method-assign]
    follow = await stack.run("recall", thread_id="t", run_id="follow-up")
    assert deleting == [(grpc.StatusCode.FAILED_PRECONDITION, "ERR_RUN_REFERENCED")]
    assert follow.data.string_value == "apples"


def before_first_call(
    monkeypatch: pytest.MonkeyPatch, target: object, name: str, action: Callable[[], Awaitable[Any]]
) -> list[Any]:
    """Make the first call of ``target.name`` run ``action`` first (a request landing at that
    moment of a deletion); the list gets what the action returned."""
    real = getattr(target, name)
    returned: list[Any] = []

    async def patched(*args: Any, **kwargs: Any) -> Any:
        if not returned:
            returned.append(await action())
        return await real(*args, **kwargs)

    monkeypatch.setattr(target, name, patched)
    return returned


async def test_retention_keeps_a_thread_a_run_joined_after_it_was_planned(
    kept_one_day: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follow-up lands between retention's plan and its deletions: the thread stays whole."""
    stack = kept_one_day
    await stack.run("remember apples", thread_id="t")
    stack.clock.advance(2 * DAY)
    before_first_call(
        monkeypatch, stack.engine.deleter, "close_thread", lambda: stack.run("remember pears", thread_id="t")
    )
    applied = await stack.stub.ApplyRetention(svc.ApplyRetentionRequest())
    monkeypatch.undo()
    assert list(applied.run_ids) == []
    assert list(applied.thread_ids) == []
    assert (await stack.run("recall", thread_id="t")).data.string_value == "apples,pears"


async def test_no_run_starts_on_a_thread_retention_is_deleting(
    kept_one_day: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = kept_one_day
    old = await stack.run("remember apples", thread_id="t")
    stack.clock.advance(2 * DAY)
    started = before_first_call(
        monkeypatch,
        stack.engine.deleter,
        "remove",
        lambda: _outcome(stack.start("remember pears", thread_id="t")),
    )
    applied = await stack.stub.ApplyRetention(svc.ApplyRetentionRequest())
    monkeypatch.undo()
    assert started == [BUSY]
    assert list(applied.run_ids) == [old.run_id]
    assert list(applied.thread_ids) == ["t"]
    assert [n for n in await stack.object_names() if "/docs/" in n] == []


async def test_no_follow_up_or_fork_starts_on_a_run_being_deleted(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeleteRun marks the run's thread before it looks for later runs and forks, so a follow-up
    or a fork made while the run is being removed is refused (and may be made again after),
    instead of starting on a history that is going."""
    a = await stack.run("remember apples", thread_id="t")

    async def follow_up_and_fork() -> list[Any]:
        follow_up = await _outcome(stack.start("recall", thread_id="t"))
        fork = stack.start("recall", fork_from=rp.ForkSource(run_id=a.run_id), thread_id="f")
        return [follow_up, await _outcome(fork)]

    returned = before_first_call(monkeypatch, stack.engine.deleter, "remove", follow_up_and_fork)
    await stack.stub.DeleteRun(svc.DeleteRunRequest(run_id=a.run_id))
    monkeypatch.undo()
    [tried] = returned
    assert tried == [BUSY, BUSY]
    await every_rpc_is_not_found(stack, a.run_id)
    # The mark went with the deletion: the thread takes runs again (with nothing before them).
    assert (await stack.run("recall", thread_id="t")).data.string_value == "nothing"
    code = await fails(stack.stub.GetThread(svc.GetThreadRequest(thread_id="f")))
    assert code == (grpc.StatusCode.NOT_FOUND, "ERR_THREAD_NOT_FOUND")


async def test_a_fork_made_as_its_source_thread_is_closed_keeps_it(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeleteThread looks for forks after it marks the thread: a fork made just before the mark
    is found (ERR_RUN_REFERENCED), one made after is refused."""
    a = await stack.run("remember apples", thread_id="t")
    forks = before_first_call(
        monkeypatch,
        stack.engine.deleter,
        "close_thread",
        lambda: stack.run("remember plums", fork_from=rp.ForkSource(run_id=a.run_id)),
    )
    code = await fails(stack.stub.DeleteThread(svc.DeleteThreadRequest(thread_id="t")))
    monkeypatch.undo()
    assert code == (grpc.StatusCode.FAILED_PRECONDITION, "ERR_RUN_REFERENCED")
    recall = await stack.run("recall", thread_id=forks[0].thread_id)
    assert recall.data.string_value == "apples,plums"
    assert (await stack.run("recall", thread_id="t")).data.string_value == "apples"
