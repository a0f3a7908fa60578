"""Subagents (the Agent tool) through a real EngineService and the public async client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from client_py import (
    AgentFinished,
    AgentStarted,
    ApprovalDecided,
    ApprovalRequested,
    AssistantMessage,
    AsyncEngineClient,
    ContextCompacted,
    InvalidArgumentError,
    Paused,
    Run,
    RunEvent,
    ToolCallCompleted,
    UsageReported,
)
from engine_service.core._checkpoint import transcript_blob
from engine_service.core._types import ToolCall, Usage
from engine_service.models import ModelRequest, TextChunk, TurnResult
from tests.conftest import ServerFactory, refresh_until, turn

pytestmark = pytest.mark.timeout(60)

CONFIG = {"tools": {"permissions": {"double": "ask"}}}


class TreeModel:
    """A model that plays the parent or a child by the task it was given (the transcript's first
    entry), and whose parent answers with every result its Agent calls returned: what the children
    answered must reach the parent's final answer for the test to see it there."""

    provider = "openai"
    name = "tree"

    async def stream(self, request: ModelRequest) -> AsyncIterator[TextChunk | TurnResult]:
        task = request.messages[0].text
        results = [m.text for m in request.messages if m.role == "tool"]
        calls: list[ToolCall] = []
        text = ""
        if task == "compare":
            if request.turn == 0:
                calls = [
                    ToolCall("a", "Agent", {"task": "double 21", "tools": ["double"]}),
                    ToolCall("b", "Agent", {"task": "echo hi", "tools": ["echo"]}),
                ]
            else:
                text = "children said: " + " | ".join(results)
        elif task == "double 21":
            if request.turn == 0:
                calls = [ToolCall("d", "double", {"x": 21})]
            else:
                text = f"A doubled to {results[-1]}"
        elif task == "echo hi":
            if request.turn == 0:
                calls = [ToolCall("e", "echo", {"text": "hi"})]
            else:
                text = f"B echoed {results[-1]}"
        else:
            text = f"unexpected task {task!r}"
        if text:
            yield TextChunk(text)
        yield TurnResult(text, calls, Usage(10, 5), "tool_use" if calls else "end_turn")

    async def aclose(self) -> None:
        return None


@pytest.fixture
async def tree_client(servers: ServerFactory) -> AsyncIterator[AsyncEngineClient]:
    server = await servers.start(config=CONFIG, model_factory=lambda provider, name: TreeModel())
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as c:
        yield c


async def _events(handle: Any) -> list[RunEvent]:
    return [e async for e in handle.events(follow=False)]


def _code(event: AgentFinished) -> str:
    assert event.error is not None
    return event.error.code


async def _run(client: AsyncEngineClient, task: str, **options: Any) -> tuple[Run, list[RunEvent]]:
    handle = await client.create(task, **options)
    run = await handle.wait(timeout=20)
    return run, await _events(handle)


async def test_parallel_children_one_gated_through_the_parent(tree_client: AsyncEngineClient) -> None:
    handle = await tree_client.create("compare", model="openai:tree", tools=["Agent", "double", "echo"])
    run = await handle.wait(timeout=20)
    # The child's gated call pauses the whole run, with the child's path on the interrupt.
    assert run.state == "PAUSED"
    assert run.pause_reason == "AWAITING_APPROVAL"
    (interrupt,) = run.interrupts
    assert (interrupt.tool_name, interrupt.agent_path, interrupt.arguments) == ("double", "a", {"x": 21})
    events = await _events(handle)
    started = {e.agent_path: e for e in events if isinstance(e, AgentStarted)}
    assert set(started) == {"a", "b"}
    assert started["a"].tools == ["double"]
    assert started["a"].task == "double 21"
    # The other child ran on meanwhile and finished before the run paused.
    finished = [e for e in events if isinstance(e, AgentFinished)]
    assert [(e.agent_path, e.state, e.output) for e in finished] == [("b", "DONE", "B echoed hi")]
    paused = next(e for e in events if isinstance(e, Paused))
    assert finished[0].seq < paused.seq
    requested = next(e for e in events if isinstance(e, ApprovalRequested))
    assert requested.agent_path == "a"
    assert requested.interrupt.agent_path == "a"
    # Deciding through the parent resumes the child.
    await handle.approve(interrupt.interrupt_id)
    run = await handle.wait(timeout=20)
    assert run.state == "DONE", run.error
    assert run.data == "children said: A doubled to 42 | B echoed hi"
    events = await _events(handle)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    decided = next(e for e in events if isinstance(e, ApprovalDecided))
    assert decided.agent_path == "a"
    child_calls = [e for e in events if isinstance(e, ToolCallCompleted) and e.agent_path == "a"]
    assert [(e.tool_name, e.output) for e in child_calls] == [("double", "42")]
    agent_calls = [e for e in events if isinstance(e, ToolCallCompleted) and e.tool_name == "Agent"]
    assert sorted((e.agent_path, e.call_id, e.output) for e in agent_calls) == [
        ("", "a", "A doubled to 42"),
        ("", "b", "B echoed hi"),
    ]
    # The run's own turns are its own; what the children spent counts in its usage.
    assert run.meta.turns == 2
    assert run.meta.usage.input_tokens == 10 * 6
    own = [e for e in events if isinstance(e, AssistantMessage) and not e.agent_path]
    assert [e.turn for e in own] == [1, 2]


async def test_a_child_may_only_narrow_its_parents_tools(client: AsyncEngineClient) -> None:
    script = [
        turn("", ("Agent", {"task": "use double", "tools": ["double"]}), ("Agent", {"task": "use echo"})),
        turn("done"),
    ]
    agent_scripts = {"call_1_2": [turn("", ("double", {"x": 1})), turn("could not")]}
    run, events = await _run(
        client, "narrow", script=script, agent_scripts=agent_scripts, tools=["Agent", "echo"]
    )
    assert run.state == "DONE", run.error
    by_call = {e.call_id: e for e in events if isinstance(e, ToolCallCompleted) and not e.agent_path}
    # Asking for a tool the parent lacks starts nothing.
    refused = by_call["call_1_1"]
    assert refused.is_error
    assert "ERR_AGENT_TOOLS" in refused.output
    assert "double" in refused.output
    assert [e.agent_path for e in events if isinstance(e, AgentStarted)] == ["call_1_2"]
    # A child with the parent's tools (by default) still cannot call what the parent cannot.
    started = next(e for e in events if isinstance(e, AgentStarted))
    assert started.tools == ["echo", "Agent"]  # all of the parent's, no more
    inner = next(e for e in events if isinstance(e, ToolCallCompleted) and e.agent_path == "call_1_2")
    assert inner.outcome == "unknown_tool"
    assert "Unknown tool 'double'" in inner.output
    assert by_call["call_1_2"].output == "could not"


async def test_depth_is_limited(servers: ServerFactory) -> None:
    server = await servers.start(config={**CONFIG, "max_agent_depth": 2})
    script = [turn("", ("Agent", {"task": "level 1", "tools": ["Agent", "echo"]})), turn("top done")]
    agent_scripts = {
        # depth 1 may start depth 2, but may not give it the Agent tool
        "call_1_1": [
            turn("", ("Agent", {"task": "level 2 with agents", "tools": ["Agent"]})),
            turn("", ("Agent", {"task": "level 2"})),
            turn("level 1 done"),
        ],
        # depth 2 has no Agent tool
        "call_1_1/call_2_1": [turn("", ("Agent", {"task": "level 3"})), turn("level 2 done")],
    }
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        run, events = await _run(
            client, "deep", script=script, agent_scripts=agent_scripts, tools=["Agent", "echo"]
        )
        assert run.state == "DONE", run.error
    assert [e.agent_path for e in events if isinstance(e, AgentStarted)] == ["call_1_1", "call_1_1/call_2_1"]
    agent_results = {
        (e.agent_path, e.call_id): e
        for e in events
        if isinstance(e, ToolCallCompleted) and e.tool_name == "Agent"
    }
    refused = agent_results[("call_1_1", "call_1_1")]
    assert refused.is_error
    assert "ERR_AGENT_DEPTH" in refused.output
    deepest = agent_results[("call_1_1/call_2_1", "call_1_1")]
    assert deepest.outcome == "unknown_tool"
    assert agent_results[("call_1_1", "call_2_1")].output == "level 2 done"
    assert agent_results[("", "call_1_1")].output == "level 1 done"
    assert run.data == "top done"


async def test_cancel_cascades_to_children(client: AsyncEngineClient) -> None:
    script = [turn("", ("Agent", {"task": "sleep"})), turn("never")]
    agent_scripts = {"call_1_1": [turn("", ("sleep", {"seconds": 30})), turn("woke")]}
    handle = await client.create(
        "cancel me", script=script, agent_scripts=agent_scripts, tools=["Agent", "sleep"]
    )
    async for event in handle.events(follow=True):
        if event.kind == "tool_call_started" and event.agent_path == "call_1_1":
            break
    run = await handle.cancel("stop")
    run = await refresh_until(handle, "CANCELLED")
    assert run.state == "CANCELLED"
    events = await _events(handle)
    (finished,) = [e for e in events if isinstance(e, AgentFinished)]
    assert finished.agent_path == "call_1_1"
    assert finished.state == "CANCELLED"
    assert finished.error is not None
    assert finished.error.code == "ERR_CANCELLED"
    assert events[-1].kind == "run_finished"
    assert finished.seq < events[-1].seq


async def test_a_childs_budget_ends_the_child_the_runs_ends_the_run(client: AsyncEngineClient) -> None:
    usage = {"input_tokens": 100, "output_tokens": 0}
    script = [
        turn("", ("Agent", {"task": "long", "max_turns": 1})),
        turn("", ("Agent", {"task": "costly"})),
        turn("never"),
    ]
    agent_scripts = {
        "call_1_1": [turn("", ("echo", {"text": "x"})), turn("second turn")],
        "call_2_1": [{**turn("", ("echo", {"text": "x"})), "usage": usage}] * 3,
    }
    run, events = await _run(
        client, "budgets", script=script, agent_scripts=agent_scripts, tools=["Agent", "echo"], max_tokens=250
    )
    finished = {e.agent_path: e for e in events if isinstance(e, AgentFinished)}
    # Its own budget ends the child only: the parent's call gets an error result and it goes on.
    assert finished["call_1_1"].state == "FAILED"
    assert _code(finished["call_1_1"]) == "ERR_MAX_TURNS"
    first = next(e for e in events if isinstance(e, ToolCallCompleted) and e.tool_name == "Agent")
    assert first.is_error
    assert "ERR_MAX_TURNS" in first.output
    # The run's budget bounds its children: what they spend ends the run.
    assert run.state == "FAILED"
    assert run.error is not None
    assert run.error.code == "ERR_TOKEN_BUDGET"
    assert finished["call_2_1"].state == "FAILED"
    assert _code(finished["call_2_1"]) == "ERR_PARENT_ENDED"


async def test_a_childs_events_carry_its_path_and_a_missing_script_fails_only_it(
    client: AsyncEngineClient,
) -> None:
    run, events = await _run(
        client, "no script", script=[turn("", ("Agent", {"task": "x"})), turn("parent ok")], tools=["Agent"]
    )
    assert run.state == "DONE"
    assert run.data == "parent ok"
    (finished,) = [e for e in events if isinstance(e, AgentFinished)]
    assert finished.state == "FAILED"
    assert _code(finished) == "ERR_SCRIPT_EXHAUSTED"


async def test_the_agent_tool_is_offered_only_when_named(client: AsyncEngineClient) -> None:
    run, events = await _run(client, "x", script=[turn("", ("Agent", {"task": "y"})), turn("ok")])
    assert run.state == "DONE"
    (completed,) = [e for e in events if isinstance(e, ToolCallCompleted)]
    assert completed.outcome == "unknown_tool"
    assert not [e for e in events if isinstance(e, AgentStarted)]


async def test_a_long_working_child_is_compacted_like_its_run(client: AsyncEngineClient) -> None:
    filler = "lorem ipsum dolor sit amet " * 22
    steps = [turn(f"step {i}", ("echo", {"text": f"{i}: {filler}"})) for i in range(60)]
    run, events = await _run(
        client,
        "delegate",
        script=[turn("", ("Agent", {"task": "work long"})), turn("parent done")],
        agent_scripts={"call_1_1": [*steps, turn("child done")]},
        tools=["Agent", "echo"],
        context_window_tokens=3_000,
        max_turns=100,
    )
    assert run.state == "DONE", run.error
    compactions = [e for e in events if isinstance(e, ContextCompacted)]
    assert compactions
    assert {e.agent_path for e in compactions} == {"call_1_1"}  # the run's own stayed small
    child_inputs = [e.input_tokens for e in events if isinstance(e, UsageReported) and e.agent_path]
    assert len(child_inputs) == 61
    assert max(child_inputs) <= 3_000  # bounded by the window, not growing with the child's work
    agent_call = next(e for e in events if isinstance(e, ToolCallCompleted) and e.tool_name == "Agent")
    assert agent_call.output == "child done"


async def test_subagent_scripts_need_the_scripted_model(tree_client: AsyncEngineClient) -> None:
    with pytest.raises(InvalidArgumentError) as refused:
        await tree_client.create("x", model="openai:tree", agent_scripts={"a": [turn("hi")]})
    assert refused.value.reason == "ERR_INVALID_SCRIPT"
    with pytest.raises(InvalidArgumentError) as empty:
        await tree_client.create("x", script=[turn("hi")], agent_scripts={"a": []})
    assert empty.value.reason == "ERR_INVALID_SCRIPT"


async def test_finished_children_leave_the_state_their_transcripts_stay(servers: ServerFactory) -> None:
    server = await servers.start(config=CONFIG, model_factory=lambda provider, name: TreeModel())
    storage = server.engine.storage
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        handle = await client.create("compare", model="openai:tree", tools=["Agent", "double", "echo"])
        run = await handle.wait(timeout=20)
        assert run.state == "PAUSED"
        paused = await storage.read_state("default", run.run_id)
        assert paused is not None
        # While paused both are kept: one waits for its decision, the other's answer for the run.
        assert set(paused["children"]) == {"a", "b"}
        await handle.approve(run.interrupts[0].interrupt_id)
        run = await handle.wait(timeout=20)
        assert run.state == "DONE", run.error
    done = await storage.read_state("default", run.run_id)
    assert done is not None
    assert done["children"] == {}  # the state document does not grow with the subagents a run had
    for path, task, answer in (("a", "double 21", "A doubled to 42"), ("b", "echo hi", "B echoed hi")):
        blob = await storage.get_blob("default", run.run_id, transcript_blob(path))
        assert blob is not None
        entries = json.loads(blob)
        assert [e["role"] for e in entries] == ["user", "assistant", "tool", "assistant"]
        assert (entries[0]["text"], entries[-1]["text"]) == (task, answer)
