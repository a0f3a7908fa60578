"""Subagents driven by a hostile model: call ids it crafts, budgets it asks for (real EngineService,
public async client)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from client_py import AgentFinished, AgentStarted, AssistantMessage, AsyncEngineClient, ToolCallCompleted
from engine_service.core._checkpoint import transcript_blob
from engine_service.core._types import ToolCall, Usage
from engine_service.models import ModelRequest, TextChunk, TurnResult
from tests.conftest import ServerFactory, turn

pytestmark = pytest.mark.timeout(60)

LONG_ID = "z" * 200


class CraftedIds:
    """A model whose Agent calls carry the call ids a prompt injection could make it choose: one
    that used to share a blob name with a grandchild's ("a.b" and "a/b"), a path of its own
    ("x/y", "../up"), and one far too long for a name (the last three are replaced)."""

    provider = "openai"
    name = "crafted"

    async def stream(self, request: ModelRequest) -> AsyncIterator[TextChunk | TurnResult]:
        task = request.messages[0].text
        results = [m.text for m in request.messages if m.role == "tool"]
        calls: list[ToolCall] = []
        text = ""
        if task == "crafted":
            if request.turn == 0:
                calls = [
                    ToolCall("a.b", "Agent", {"task": "flat"}),
                    ToolCall("a", "Agent", {"task": "outer"}),
                    ToolCall("x/y", "Agent", {"task": "slash"}),
                    ToolCall("../up", "Agent", {"task": "dots"}),
                    ToolCall(LONG_ID, "Agent", {"task": "long"}),
                    ToolCall("cancel-request", "Agent", {"task": "named like a blob"}),
                ]
            else:
                text = " | ".join(results)
        elif task == "outer":
            if request.turn == 0:
                calls = [ToolCall("b", "Agent", {"task": "inner"})]
            else:
                text = f"outer got {results[-1]}"
        else:
            text = f"{task} answer"
        yield TurnResult(text, calls, Usage(10, 5), "tool_use" if calls else "end_turn")

    async def aclose(self) -> None:
        return None


@pytest.fixture
async def crafted(servers: ServerFactory) -> AsyncIterator[tuple[AsyncEngineClient, Any]]:
    server = await servers.start(model_factory=lambda provider, name: CraftedIds())
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as c:
        yield c, server.engine.storage


async def test_crafted_call_ids_neither_collide_nor_escape(crafted: tuple[AsyncEngineClient, Any]) -> None:
    client, storage = crafted
    handle = await client.create("crafted", model="openai:crafted", tools=["Agent"])
    run = await handle.wait(timeout=20)
    assert run.state == "DONE", run.error
    events = [e async for e in handle.events(follow=False)]
    results = {e.call_id: e for e in events if isinstance(e, ToolCallCompleted) and not e.agent_path}
    assert results["a.b"].output == "flat answer"
    assert results["a"].output == "outer got inner answer"
    assert results["cancel-request"].output == "named like a blob answer"
    # Ids that are not ids ("x/y", "../up", far too long) are replaced by ids the engine makes
    # (``call_{turn}_{n}``), and those subagents run under them.
    for call_id, task in (("call_1_3", "slash"), ("call_1_4", "dots"), ("call_1_5", "long")):
        assert results[call_id].output == f"{task} answer"
    assert not {"x/y", "../up", LONG_ID} & set(results)
    started = sorted(e.agent_path for e in events if isinstance(e, AgentStarted))
    assert started == ["a", "a.b", "a/b", "call_1_3", "call_1_4", "call_1_5", "cancel-request"]
    # Each subagent has a transcript of its own, whatever its path looks like.
    names = {path: transcript_blob(path) for path in started}
    assert len(set(names.values())) == len(names)
    for path, task in (("a.b", "flat"), ("a/b", "inner"), ("cancel-request", "named like a blob")):
        blob = await storage.get_blob("default", run.run_id, names[path])
        assert blob is not None
        entries = json.loads(blob)
        assert (entries[0]["text"], entries[-1]["text"]) == (task, f"{task} answer")
    # The run's own blobs are untouched: a cancel request is still only what CancelRun writes.
    assert not await storage.get_blob("default", run.run_id, "cancel-request")


def _used(n: int) -> dict[str, int]:
    return {"input_tokens": n, "output_tokens": 0}


async def test_a_child_gets_at_most_what_its_parent_has_left(client: AsyncEngineClient) -> None:
    script = [
        {**turn("", ("Agent", {"task": "child", "max_turns": 50, "max_tokens": 5_000})), "usage": _used(100)},
        {**turn("done"), "usage": _used(1)},
    ]
    agent_scripts = {
        "call_1_1": [
            {**turn("", ("Agent", {"task": "grandchild", "max_turns": 10})), "usage": _used(100)},
            {**turn("child done"), "usage": _used(1)},
        ],
        "call_1_1/call_1_1": [{**turn("grandchild done"), "usage": _used(1)}],
    }
    handle = await client.create(
        "budgets", script=script, agent_scripts=agent_scripts, tools=["Agent"],
        max_turns=3, max_tokens=1_000, max_cost_usd=2.0,
    )  # fmt: skip
    run = await handle.wait(timeout=20)
    assert run.state == "DONE", run.error
    events = [e async for e in handle.events(follow=False)]
    started = {e.agent_path: e for e in events if isinstance(e, AgentStarted)}
    child, grandchild = started["call_1_1"], started["call_1_1/call_1_1"]
    # The run had 2 of its 3 turns and 900 of its 1,000 tokens left when its turn 1 asked for more.
    assert (child.max_turns, child.max_tokens, child.max_cost_usd) == (2, 900, 2.0)
    # The child had 1 turn and 800 tokens left (what it spent, the run spent too).
    assert (grandchild.max_turns, grandchild.max_tokens, grandchild.max_cost_usd) == (1, 800, 2.0)


async def test_no_subagent_starts_without_budget_left(client: AsyncEngineClient) -> None:
    script = [turn("", ("Agent", {"task": "child"}))]
    handle = await client.create("last turn", script=script, tools=["Agent"], max_turns=1)
    run = await handle.wait(timeout=20)
    assert run.state == "FAILED"
    assert run.error is not None
    assert run.error.code == "ERR_MAX_TURNS"
    events = [e async for e in handle.events(follow=False)]
    assert not [e for e in events if isinstance(e, AgentStarted)]
    (result,) = [e for e in events if isinstance(e, ToolCallCompleted)]
    assert result.is_error
    assert "ERR_AGENT_BUDGET" in result.output


async def test_siblings_share_their_parents_budget(client: AsyncEngineClient) -> None:
    """Two subagents of one parent each get what the parent has left; what one spends ends the
    other once the parent's budget is gone, though the other's own is not."""
    script = [turn("", ("Agent", {"task": "parent", "max_tokens": 1_000})), turn("done")]
    agent_scripts = {
        "call_1_1": [
            {**turn("", ("Agent", {"task": "slow"}), ("Agent", {"task": "greedy"})), "usage": _used(100)},
            {**turn("parent done"), "usage": _used(1)},
        ],
        # The slow one works a while; meanwhile its sibling spends the rest of their parent's budget.
        "call_1_1/call_1_1": [
            {**turn("", ("sleep", {"seconds": 0.5})), "usage": _used(10)},
            {**turn("slow done"), "usage": _used(10)},
        ],
        "call_1_1/call_1_2": [{**turn("greedy done"), "usage": _used(890)}],
    }
    handle = await client.create(
        "share", script=script, agent_scripts=agent_scripts, tools=["Agent", "sleep"]
    )
    run = await handle.wait(timeout=20)
    events = [e async for e in handle.events(follow=False)]
    finished = {e.agent_path: e for e in events if isinstance(e, AgentFinished)}
    stopped = finished["call_1_1/call_1_1"]
    assert stopped.state == "FAILED"
    assert stopped.error is not None
    assert stopped.error.code == "ERR_TOKEN_BUDGET"
    assert "parent agent 'call_1_1'" in stopped.error.message
    assert finished["call_1_1/call_1_2"].state == "DONE"
    slow = "call_1_1/call_1_1"
    assert len([e for e in events if isinstance(e, AssistantMessage) and e.agent_path == slow]) == 1
    assert run.state == "DONE", run.error


async def test_a_run_stored_with_the_old_transcript_names_resumes(servers: ServerFactory) -> None:
    """A paused run whose subagent transcript was stored under the name used before names were
    hashed (``agent-<path>-transcript``) resumes with that transcript."""
    from tests.engine.test_subagents import CONFIG, TreeModel

    server = await servers.start(config=CONFIG, model_factory=lambda provider, name: TreeModel())
    storage = server.engine.storage
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        handle = await client.create("compare", model="openai:tree", tools=["Agent", "double", "echo"])
        run = await handle.wait(timeout=20)
        assert run.state == "PAUSED"
    blob = await storage.get_blob("default", run.run_id, transcript_blob("a"))
    assert blob is not None
    await storage.put_blob("default", run.run_id, "agent-a-transcript", blob)
    await storage.put_blob("default", run.run_id, transcript_blob("a"), b"")  # as if never written
    await servers.stop_all()  # a new process: nothing of the run in memory
    server = await servers.start(config=CONFIG, model_factory=lambda provider, name: TreeModel())
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        handle = await client.attach(run.run_id)
        await handle.approve(run.interrupts[0].interrupt_id)
        run = await handle.wait(timeout=20)
    assert run.state == "DONE", run.error
    assert run.data == "children said: A doubled to 42 | B echoed hi"
    # The child went on from its stored transcript: its first turn (the call) is still in it.
    resumed = await server.engine.storage.get_blob("default", run.run_id, transcript_blob("a"))
    assert resumed is not None
    assert [e["role"] for e in json.loads(resumed)] == ["user", "assistant", "tool", "assistant"]


class FanOut:
    """A hostile model: every agent that may still start subagents asks for ``width`` of them in
    its first turn (all in one answer), then answers. Its turns take a little while, so the
    subagents it started are all working at the same moment."""

    provider = "openai"
    name = "fanout"

    def __init__(self, width: int) -> None:
        self.width = width
        self.calls = 0
        self.working = 0
        self.most_working = 0

    async def stream(self, request: ModelRequest) -> AsyncIterator[TextChunk | TurnResult]:
        self.calls += 1
        self.working += 1
        self.most_working = max(self.most_working, self.working)
        try:
            await asyncio.sleep(0.01)
        finally:
            self.working -= 1
        calls: list[ToolCall] = []
        if request.turn == 0 and any(t.name == "Agent" for t in request.tools):
            calls = [ToolCall(f"c{i}", "Agent", {"task": f"sub {i}"}) for i in range(self.width)]
        yield TurnResult("" if calls else "done", calls, Usage(1, 1), "tool_use" if calls else "end_turn")

    async def aclose(self) -> None:
        return None


async def test_one_model_turn_cannot_start_a_swarm_of_subagents(servers: ServerFactory) -> None:
    """40 Agent calls in one answer, and 40 more from each child, would be 1,600 model streams at
    once from one run; a run's subagents work at most ``max_parallel_agents`` at a time, and the
    calls past it start none and say why."""
    model = FanOut(width=40)
    server = await servers.start(
        config={"max_parallel_agents": 5}, model_factory=lambda provider, name: model
    )
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        handle = await client.create("go", model="openai:fanout", tools=["Agent"], max_turns=3)
        run = await handle.wait(timeout=30)
        assert run.state == "DONE", run.error
        events = [e async for e in handle.events(follow=False)]
    started = [e for e in events if isinstance(e, AgentStarted)]
    assert len(started) == 5  # the first 5 of the run's calls; theirs find no room left
    refused = [e for e in events if isinstance(e, ToolCallCompleted) and "ERR_AGENT_LIMIT" in e.output]
    assert len(refused) == 35 + 5 * 40
    assert all(e.is_error for e in refused)
    assert model.most_working <= 1 + 5
    assert model.calls == 1 + 5 * 2 + 1
