"""E1 agent-loop behaviour: limits, tool choice, allow-lists, structured output."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from client_py import (
    AssistantMessage,
    AsyncEngineClient,
    RunFinished,
    UnknownToolError,
)
from engine_service import Engine, EngineConfig, LocalStorage, RunState, ToolRegistry
from engine_service.api._server import start_server
from engine_service.core._types import ToolCall, ToolChoice, Usage
from engine_service.models import ModelRequest, TextChunk, TurnResult
from engine_service.tools._registry import ASK_USER
from tests import tools as test_tools
from tests.conftest import turn
from tests.engine.harness import Harness


def loop_script(n: int, tool: str = "noop") -> list[dict[str, Any]]:
    return [turn(f"step {i}", (tool, {})) for i in range(n)] + [turn("finished")]


async def test_max_turns(client: AsyncEngineClient) -> None:
    run = await client.execute("loop", model="scripted", script=loop_script(10), max_turns=3).result()
    assert run.state == "FAILED"
    assert run.error is not None
    assert run.error.code == "ERR_MAX_TURNS"
    assert run.meta.turns == 3


async def test_token_budget(client: AsyncEngineClient) -> None:
    script = [{**turn("x", ("noop", {})), "usage": {"input_tokens": 60, "output_tokens": 10}}] * 5
    run = await client.execute("loop", model="scripted", script=script, max_tokens=100).result()
    assert run.state == "FAILED"
    assert run.error is not None
    assert run.error.code == "ERR_TOKEN_BUDGET"


async def test_deadline(client: AsyncEngineClient) -> None:
    script = [turn("", ("sleep", {"seconds": 5})), turn("never")]
    run = await client.execute("slow", model="scripted", script=script, timeout=0.3).result()
    assert run.state == "FAILED"
    assert run.error is not None
    assert run.error.code == "ERR_DEADLINE_EXCEEDED"


async def test_cost_budget(servers: Any) -> None:
    srv = await servers.start(config={"model": {"input_cost_per_mtok": 1_000_000.0}})
    async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as c:
        script = [{**turn("x", ("noop", {})), "usage": {"input_tokens": 1, "output_tokens": 0}}] * 5
        run = await c.execute("loop", model="scripted", script=script, max_cost_usd=2.5).result()
    assert run.state == "FAILED"
    assert run.error is not None
    assert run.error.code == "ERR_COST_BUDGET"
    assert run.meta.cost_usd == pytest.approx(3.0)


async def test_unknown_tool_from_the_model_is_an_error_result(client: AsyncEngineClient) -> None:
    script = [turn("", ("no_such_tool", {"a": 1})), turn("I could not do it.")]
    events = [e async for e in client.execute("x", model="scripted", script=script)]
    run = events[-1]
    assert isinstance(run, RunFinished)
    assert run.state == "DONE"
    assistant = [e for e in events if isinstance(e, AssistantMessage)]
    assert len(assistant) == 2


async def test_tool_failure_and_bad_arguments_become_error_results(harness: Harness) -> None:
    record = await harness.run("x", turn("", ("explode", {}), ("echo", {"text": 5})), turn("ok"))
    assert record.state is RunState.DONE
    events = await harness.events(record)
    completed = {e["d"]["tool"]: e["d"] for e in events if e["k"] == "tool_call_completed"}
    assert completed["explode"]["is_error"]
    assert completed["explode"]["outcome"] == "ran"
    assert "boom" in completed["explode"]["output"]
    # The call that never ran is on the record too, with the result the model saw.
    assert completed["echo"]["is_error"]
    assert completed["echo"]["outcome"] == "invalid_arguments"
    assert "Invalid arguments for echo" in completed["echo"]["output"]
    docs = await harness.transcript(record)
    tool_results = [d for d in docs if d["role"] == "tool"]
    assert [d["tool"] for d in tool_results] == ["explode", "echo"]  # call order
    assert all(d["is_error"] for d in tool_results)
    assert "Invalid arguments for echo" in tool_results[1]["text"]


async def test_tool_allow_list_and_empty_list(client: AsyncEngineClient, server: Any) -> None:
    script = [turn("", ("echo", {"text": "a"}), ("double", {"x": 1})), turn("done")]
    run = await client.execute("x", model="scripted", script=script, tools=["echo"]).result()
    docs = await server.engine.storage.read_segments("default", run.run_id, "transcript", 0, 10)
    results = {d["tool"]: d for d in docs if d["role"] == "tool"}
    assert results["echo"]["is_error"] is False
    assert "Unknown tool 'double'" in results["double"]["text"]
    run = await client.execute("x", model="scripted", script=script, tools=[]).result()
    docs = await server.engine.storage.read_segments("default", run.run_id, "transcript", 0, 10)
    assert all(d["is_error"] for d in docs if d["role"] == "tool")
    with pytest.raises(UnknownToolError):
        await client.create("x", model="scripted", script=script, tools=["nope"])


async def test_per_run_permissions_only_narrow(client: AsyncEngineClient, server: Any) -> None:
    script = [turn("", ("echo", {"text": "a"})), turn("done")]
    run = await client.execute("x", model="scripted", script=script, permissions={"echo": "deny"}).result()
    docs = await server.engine.storage.read_segments("default", run.run_id, "transcript", 0, 10)
    assert "Permission denied" in docs[2]["text"]
    # 'allow' cannot widen the engine's 'ask' for double.
    run = await client.execute(
        "x",
        model="scripted",
        script=[turn("", ("double", {"x": 1})), turn("d")],
        permissions={"double": "allow"},
    ).result()
    assert run.state == "PAUSED"
    # A run can narrow allow to ask.
    run = await client.execute("x", model="scripted", script=script, permissions={"echo": "ask"}).result()
    assert run.pause_reason == "AWAITING_APPROVAL"


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "temp": {"type": "number"}},
    "required": ["city", "temp"],
}


async def test_structured_output_valid(harness: Harness) -> None:
    record = await harness.run("weather", turn('{"city": "Paris", "temp": 21}'), output_schema=SCHEMA)
    assert record.state is RunState.DONE
    assert record.data == {"city": "Paris", "temp": 21}


async def test_structured_output_one_repair_turn(harness: Harness) -> None:
    script = [turn("It is sunny in Paris."), turn('{"city": "Paris", "temp": 21.5}')]
    record = await harness.run("weather", *script, output_schema=SCHEMA)
    assert record.state is RunState.DONE
    assert record.data == {"city": "Paris", "temp": 21.5}
    assert record.meta.turns == 2


async def test_structured_output_fails_after_the_repair(harness: Harness) -> None:
    record = await harness.run("weather", turn("sunny"), turn('{"city": "Paris"}'), output_schema=SCHEMA)
    assert record.state is RunState.FAILED
    assert record.error is not None
    assert record.error.code == "ERR_OUTPUT_SCHEMA"
    assert "temp" in record.error.message


class RecordingModel:
    """A model adapter that records requests (to check what the engine sends)."""

    def __init__(self) -> None:
        self.requests: list[ModelRequest] = []
        self.roles: list[list[str]] = []  # the history as it was at each request

    @property
    def provider(self) -> str:
        return "openai"

    @property
    def name(self) -> str:
        return "recorder"

    async def stream(self, request: ModelRequest) -> AsyncIterator[TextChunk | TurnResult]:
        self.requests.append(request)
        self.roles.append([m.role for m in request.messages])
        if request.turn == 0:
            yield TurnResult("", [ToolCall("c1", "echo", {"text": "hi"})], Usage(3, 4))
        else:
            yield TextChunk("bye")
            yield TurnResult("bye", [], Usage(5, 1))

    async def aclose(self) -> None:
        return None


async def test_engine_passes_tool_choice_tools_and_full_history_to_the_model(tmp_path: Any) -> None:
    model = RecordingModel()
    engine = Engine(
        EngineConfig(),
        LocalStorage(tmp_path),
        tools=ToolRegistry([ASK_USER, *test_tools.ALL]),
        model_factory=lambda provider, name: model,
    )
    srv = await start_server(engine, "127.0.0.1:0")
    try:
        async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as c:
            run = await c.execute(
                "hi",
                model="openai",
                model_name="recorder",
                tool_choice="required",
                tools=["echo", "noop"],
                system_prompt="Be brief.",
            ).result()
    finally:
        await srv.stop(0.5)
    assert run.state == "DONE"
    assert run.meta.model == "openai:recorder"
    assert run.meta.usage.input_tokens == 8
    first, second = model.requests
    assert first.tool_choice is ToolChoice.REQUIRED
    assert [t.name for t in first.tools] == ["echo", "noop"]
    assert first.system == "Be brief."
    assert model.roles == [["user"], ["user", "assistant", "tool"]]
    assert second.turn == 1
