"""The Python client's conversations: threads, follow-ups, forks, deletion and retention."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from client_py import (
    AsyncEngineClient,
    EngineClient,
    ForkPointError,
    RunActiveError,
    RunNotFoundError,
    RunReferencedError,
    Thread,
    ThreadBusyError,
    ThreadNotFoundError,
)
from client_py._render import thread_html
from client_py._view import RunViewModel
from tests.engine.threads_fixture import Stack, build_stack

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    built = await build_stack("local", tmp_path, None, config={"retention_days": 1})
    yield built
    await built.channel.close()
    await built.server.stop(0.5)


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[AsyncEngineClient]:
    async with AsyncEngineClient(f"127.0.0.1:{stack.server.port}") as c:
        yield c


async def test_follow_up_continues_the_conversation(client: AsyncEngineClient) -> None:
    first = await client.create("remember apples", model="openai:memory")
    await first.wait(timeout=20)
    assert first.run.thread_id == first.run_id
    second = await first.follow_up("remember pears", model="openai:memory")
    assert (await second.wait(timeout=20)).state == "DONE"
    third = await second.follow_up("recall", model="openai:memory")
    assert (await third.wait(timeout=20)).data == "apples,pears"
    assert third.run.thread_id == first.run_id
    thread = await client.get_thread(first.run_id)
    assert isinstance(thread, Thread)
    assert thread.run_ids == [first.run_id, second.run_id, third.run_id]


async def test_a_thread_handle_and_its_event_history(client: AsyncEngineClient) -> None:
    chat = client.thread("chat-7")
    one = await chat.create("remember a", labels={"user": "ana"}, model="openai:memory")
    await one.wait(timeout=20)
    two = await chat.create("recall", model="openai:memory")
    assert (await two.wait(timeout=20)).data == "a"
    runs = await chat.runs()
    assert [r.run_id for r in runs] == [one.run_id, two.run_id]
    events = [e async for e in chat.events()]
    assert [e.run_id for e in events] == [one.run_id] * one.run.last_seq + [two.run_id] * two.run.last_seq
    listed = [t async for t in client.list_threads(labels={"user": "ana"})]
    assert [t.thread_id for t in listed] == ["chat-7"]
    assert "chat-7" in thread_html(await chat.get())


async def test_one_run_at_a_time_and_fork(client: AsyncEngineClient) -> None:
    first = await client.create("remember apples", model="openai:memory")
    await first.wait(timeout=20)
    paused = await first.follow_up(
        "ask", script=[{"tool_calls": [{"name": "lookup"}]}], client_tools=[{"name": "lookup"}]
    )
    assert (await paused.wait(timeout=20)).paused
    with pytest.raises(ThreadBusyError):
        await first.follow_up("recall", model="openai:memory")
    with pytest.raises(RunActiveError):
        await paused.delete()
    branch = await first.fork("remember plums", turn=1, model="openai:memory")
    await branch.wait(timeout=20)
    recall = await branch.follow_up("recall", model="openai:memory")
    assert (await recall.wait(timeout=20)).data == "apples,plums"
    with pytest.raises(ForkPointError):
        await first.fork("x", turn=5, model="openai:memory")
    with pytest.raises(RunReferencedError):
        await first.delete()
    await paused.cancel()


async def test_delete_and_retention(client: AsyncEngineClient, stack: Stack) -> None:
    run = await client.create("remember a", model="openai:memory")
    await run.wait(timeout=20)
    await run.delete()
    with pytest.raises(RunNotFoundError):
        await run.refresh()
    chat = client.thread()
    await (await chat.create("remember b", model="openai:memory")).wait(timeout=20)
    old = await client.create("remember c", model="openai:memory")
    await old.wait(timeout=20)
    stack.clock.advance(2 * 86_400)
    report = await client.apply_retention(dry_run=True)
    assert report.dry_run
    assert report.retention_days == 1
    assert old.run_id in report.run_ids
    assert chat.thread_id in report.thread_ids
    before = (await chat.get()).run_ids
    assert sorted(await chat.delete()) == sorted(before)
    with pytest.raises(ThreadNotFoundError):
        await chat.get()
    done = await client.apply_retention()
    assert done.run_ids == [old.run_id]


async def test_the_sync_client(stack: Stack) -> None:
    # The sync client blocks its caller: it runs in a worker thread while the engine serves here.
    await asyncio.to_thread(sync_conversation, f"127.0.0.1:{stack.server.port}")


def sync_conversation(target: str) -> None:
    with EngineClient(target) as client:
        first = client.create("remember apples", model="openai:memory")
        first.wait(timeout=20)
        second = first.follow_up("recall", model="openai:memory")
        assert second.wait(timeout=20).data == "apples"
        fork = second.fork("recall", model="openai:memory")
        assert fork.wait(timeout=20).data == "apples"
        chat = client.thread(first.run_id)
        assert [r.run_id for r in chat.runs()] == [first.run_id, second.run_id]
        assert chat.get().run_ids == [first.run_id, second.run_id]
        client.delete_thread(fork.run.thread_id)
        assert sorted(chat.delete()) == sorted([first.run_id, second.run_id])
        assert list(client.list_threads()) == []


def test_the_view_names_the_thread() -> None:
    from datetime import UTC, datetime

    from client_py import Run, RunMeta, Usage

    now = datetime.now(UTC)
    run = Run("r2", "default", "DONE", None, [], "x", None, RunMeta(1, Usage(1, 1), 0.0, 1, [], ""), now, now,
              "recall", 3, thread_id="chat")  # fmt: skip
    model = RunViewModel(run)
    assert model.thread_id == "chat"
    from client_py._render import run_html, view_status_html

    assert "chat" in view_status_html(model)
    assert "chat" in run_html(run)
