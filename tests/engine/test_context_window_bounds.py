"""A run's own context window through gRPC: refused outside sane bounds, and never wider than the
window the engine knows its model has."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from client_py import AsyncEngineClient, ContextCompacted, InvalidArgumentError
from engine_service.core._types import ToolCall, ToolChoice, Usage
from engine_service.models import ModelRequest, TextChunk, TurnResult
from tests.conftest import ServerFactory

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("tokens", [1, 255, 10_000_001, 2_000_000_000])
async def test_an_absurd_window_is_refused(servers: ServerFactory, tokens: int) -> None:
    server = await servers.start()
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        with pytest.raises(InvalidArgumentError) as refused:
            await client.create("x", script=["hi"], context_window_tokens=tokens)
    assert refused.value.reason == "ERR_INVALID_REQUEST"
    assert refused.value.metadata["field"] == "model.context_window_tokens"


async def test_the_bounds_themselves_are_accepted(servers: ServerFactory) -> None:
    server = await servers.start()
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        for tokens in (256, 10_000_000):
            handle = await client.create("x", script=["hi"], context_window_tokens=tokens)
            assert (await handle.wait(timeout=20)).state in ("DONE", "FAILED")


class Echoer:
    """Echoes a long text for 12 turns, then answers; a summarising request gets a summary."""

    provider = "openai"
    name = "tiny"

    async def stream(self, request: ModelRequest) -> AsyncIterator[TextChunk | TurnResult]:
        if request.tool_choice is ToolChoice.NONE:
            yield TurnResult("summary of the echoes", [], Usage(10, 5), "end_turn")
            return
        calls = []
        if request.turn < 12:
            calls = [ToolCall(f"c{request.turn}", "echo", {"text": "lorem ipsum " * 60})]
        yield TurnResult("" if calls else "done", calls, Usage(0, 0), "tool_use" if calls else "end_turn")

    async def aclose(self) -> None:
        return None


async def test_a_run_cannot_widen_its_models_known_window(servers: ServerFactory) -> None:
    config = {"model": {"openai": {"context_window_tokens": {"tiny": 2_000}}, "compact_keep_turns": 2}}
    server = await servers.start(config=config, model_factory=lambda provider, name: Echoer())
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        execution = client.execute(
            "echo", model="openai:tiny", tools=["echo"], context_window_tokens=1_000_000, max_turns=40
        )
        events = [e async for e in execution]
    assert execution.run is not None
    assert execution.run.state == "DONE", execution.run.error
    # The model's 2,000 tokens held: its requests were compacted though the run asked for a million.
    assert [e for e in events if isinstance(e, ContextCompacted)]
