"""One error family: a mistake raises the same class whether the client notices it before
sending or the engine refuses it, so a caller catches one class per condition."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable

import grpc
import pytest

from client_py import (
    AsyncEngineClient,
    InvalidDecisionError,
    InvalidEditsError,
    InvalidRequestError,
    InvalidScriptError,
    error_from_rpc,
)
from client_py._view import RunViewModel
from engine_service.api._server import RunningServer
from machina.engine.v1 import engine_service_pb2 as pb
from machina.engine.v1 import engine_service_pb2_grpc as pb_grpc
from tests.conftest import ServerFactory, turn


@pytest.fixture
async def server(servers: ServerFactory) -> RunningServer:
    return await servers.start(config={"tools": {"permissions": {"ticket": "ask"}}})


@pytest.fixture
async def stub(server: RunningServer) -> AsyncIterator[pb_grpc.EngineServiceStub]:
    """The engine without the client's checks in between."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.EngineServiceStub(channel)


async def _server_error(call: Awaitable[object]) -> Exception:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return error_from_rpc(exc)
    raise AssertionError("the engine accepted it")


async def test_a_page_size_out_of_range(client: AsyncEngineClient, stub: pb_grpc.EngineServiceStub) -> None:
    with pytest.raises(InvalidRequestError) as by_client:
        client.list_runs(page_size=0)  # checked when called, before any iteration
    by_server = await _server_error(stub.ListRuns(pb.ListRunsRequest(page_size=-1)))
    assert type(by_server) is type(by_client.value) is InvalidRequestError
    assert by_server.code == by_client.value.code == "ERR_INVALID_REQUEST"
    assert isinstance(by_client.value, ValueError)  # and still a ValueError for older callers


async def test_a_resume_without_decisions(client: AsyncEngineClient, stub: pb_grpc.EngineServiceStub) -> None:
    handle = await client.create("x", model="scripted", script=[turn("", ("ticket", {"code": "ABC-1"}))])
    await handle.wait(timeout=20)
    with pytest.raises(InvalidDecisionError) as by_client:
        await handle.resume([])
    by_server = await _server_error(stub.ResumeRun(pb.ResumeRunRequest(run_id=handle.run_id)))
    assert type(by_server) is type(by_client.value) is InvalidDecisionError


async def test_a_scripted_call_without_a_name(
    stub: pb_grpc.EngineServiceStub, client: AsyncEngineClient
) -> None:
    with pytest.raises(InvalidScriptError) as by_client:
        await client.create("x", model="scripted", script=[{"tool_calls": [{"arguments": {}}]}])
    spec = pb.RunSpec(task="x")
    spec.model.provider = "scripted"
    spec.model.script.add().tool_calls.add(name="")
    by_server = await _server_error(stub.CreateRun(pb.CreateRunRequest(spec=spec)))
    assert type(by_server) is type(by_client.value) is InvalidScriptError


async def test_an_edit_that_breaks_the_tool_schema_pattern(client: AsyncEngineClient) -> None:
    handle = await client.create(
        "x", model="scripted", script=[turn("", ("ticket", {"code": "ABC-1"})), turn("ok")]
    )
    run = await handle.wait(timeout=20)
    assert run.state == "PAUSED"
    interrupt = run.interrupts[0]

    # The card (what the widget shows) checks the pattern before sending anything...
    card = RunViewModel(run).card(interrupt.interrupt_id)
    card.arguments_text = '{"code": "abc"}'
    with pytest.raises(InvalidEditsError, match="pattern") as by_client:
        card.edits()
    # ...and the engine, asked directly, refuses the same edit with the same class.
    with pytest.raises(InvalidEditsError) as by_server:
        await handle.approve(interrupt.interrupt_id, edits={"code": "abc"})
    assert by_server.value.code == by_client.value.code == "ERR_INVALID_EDITS"

    await handle.approve(interrupt.interrupt_id, edits={"code": "XYZ-9"})
    assert (await handle.wait(timeout=20)).state == "DONE"
