"""Bad input gets a clear error with the right status code, and the server keeps serving."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from client_py import (
    AsyncEngineClient,
    InvalidDecisionError,
    InvalidEditsError,
    InvalidIdError,
    InvalidRequestError,
    InvalidScriptError,
    MachinaError,
    RunNotFoundError,
)
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import engine_service_pb2_grpc as svc_grpc
from tests.conftest import turn
from tests.grpc_errors import error_info

DOUBLE = [turn("", ("double", {"x": 21})), turn("42")]


@pytest.fixture
async def stub(server: Any) -> Any:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield svc_grpc.EngineServiceStub(channel)


def spec(**kwargs: Any) -> svc.RunSpec:
    base = svc.RunSpec(
        task="t", model=svc.ModelSpec(provider="scripted", script=[svc.ScriptedTurn(text="hi")])
    )
    base.MergeFrom(svc.RunSpec(**kwargs))
    return base


BAD_REQUESTS = [
    ("GetRun", svc.GetRunRequest(run_id="../etc/passwd"), grpc.StatusCode.INVALID_ARGUMENT, "ERR_INVALID_ID"),
    ("GetRun", svc.GetRunRequest(run_id=""), grpc.StatusCode.INVALID_ARGUMENT, "ERR_INVALID_ID"),
    ("GetRun", svc.GetRunRequest(run_id="a" * 129), grpc.StatusCode.INVALID_ARGUMENT, "ERR_INVALID_ID"),
    ("GetRun", svc.GetRunRequest(run_id="run\x00x"), grpc.StatusCode.INVALID_ARGUMENT, "ERR_INVALID_ID"),
    ("GetRun", svc.GetRunRequest(run_id="no-such-run"), grpc.StatusCode.NOT_FOUND, "ERR_RUN_NOT_FOUND"),
    ("CancelRun", svc.CancelRunRequest(run_id="no-such-run"), grpc.StatusCode.NOT_FOUND, "ERR_RUN_NOT_FOUND"),
    ("WaitRun", svc.WaitRunRequest(run_id="no-such-run"), grpc.StatusCode.NOT_FOUND, "ERR_RUN_NOT_FOUND"),
    (
        "WaitRun",
        svc.WaitRunRequest(run_id="x", timeout_ms=-1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERR_INVALID_REQUEST",
    ),
    (
        "CreateRun",
        svc.CreateRunRequest(spec=svc.RunSpec(task=" ", model=svc.ModelSpec(provider="scripted"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERR_INVALID_REQUEST",
    ),
    (
        "CreateRun",
        svc.CreateRunRequest(spec=spec(run_id="bad/id")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERR_INVALID_ID",
    ),
    (
        "CreateRun",
        svc.CreateRunRequest(spec=spec(request_id="../r")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERR_INVALID_ID",
    ),
    (
        "CreateRun",
        svc.CreateRunRequest(spec=svc.RunSpec(task="t", model=svc.ModelSpec(provider="scripted"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERR_INVALID_SCRIPT",
    ),
    (
        "CreateRun",
        svc.CreateRunRequest(
            spec=svc.RunSpec(task="t", model=svc.ModelSpec(provider="scripted", script=[svc.ScriptedTurn()]))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERR_INVALID_SCRIPT",
    ),
    (
        "CreateRun",
        svc.CreateRunRequest(
            spec=svc.RunSpec(
                task="t",
                model=svc.ModelSpec(
                    provider="scripted", script=[svc.ScriptedTurn(tool_calls=[svc.ScriptedToolCall(name="")])]
                ),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERR_INVALID_SCRIPT",
    ),
    (
        "CreateRun",
        svc.CreateRunRequest(spec=spec(model=svc.ModelSpec(provider="gpt-9"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERR_INVALID_REQUEST",
    ),
    (
        "CreateRun",
        svc.CreateRunRequest(spec=spec(gated_tools=["nope"])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERR_UNKNOWN_TOOL",
    ),
    (
        "CreateRun",
        svc.CreateRunRequest(spec=spec(limits=svc.RunLimits(max_turns=-1))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERR_INVALID_REQUEST",
    ),
    (
        "CreateRun",
        svc.CreateRunRequest(spec=spec(output_schema={"type": "no-such-type"})),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERR_INVALID_REQUEST",
    ),
    (
        "CreateRun",
        svc.CreateRunRequest(spec=spec(permissions={"echo": 42})),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERR_INVALID_REQUEST",
    ),
    (
        "ResumeRun",
        svc.ResumeRunRequest(
            run_id="no-such-run", decisions=[svc.Decision(interrupt_id="i", approve=svc.Approve())]
        ),
        grpc.StatusCode.NOT_FOUND,
        "ERR_RUN_NOT_FOUND",
    ),
    ("ResumeRun", svc.ResumeRunRequest(run_id="x"), grpc.StatusCode.NOT_FOUND, "ERR_RUN_NOT_FOUND"),
    (
        "ListRuns",
        svc.ListRunsRequest(page_size=5000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERR_INVALID_REQUEST",
    ),
    (
        "ListRuns",
        svc.ListRunsRequest(page_token="garbage"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERR_INVALID_REQUEST",
    ),
]


@pytest.mark.parametrize(
    ("rpc", "request_message", "code", "reason"),
    BAD_REQUESTS,
    ids=[f"{r[0]}-{r[3]}-{i}" for i, r in enumerate(BAD_REQUESTS)],
)
async def test_bad_unary_requests(
    stub: Any, rpc: str, request_message: Any, code: grpc.StatusCode, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub, rpc)(request_message)
    assert caught.value.code() == code
    assert error_info(caught.value).reason == reason
    assert caught.value.details()
    # The server keeps serving.
    health = await stub.ListRuns(svc.ListRunsRequest())
    assert health is not None


async def test_bad_streaming_requests(stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.StreamRunEvents(svc.StreamRunEventsRequest(run_id="../../x")):
            pass
    assert error_info(caught.value).reason == "ERR_INVALID_ID"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.StreamRunEvents(svc.StreamRunEventsRequest(run_id="missing", after_seq=-5)):
            pass
    assert error_info(caught.value).reason == "ERR_INVALID_REQUEST"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.ExecuteRun(svc.ExecuteRunRequest(spec=svc.RunSpec(task=""))):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_oversized_message_is_refused_and_server_keeps_serving(stub: Any) -> None:
    huge = "x" * (5 * 1024 * 1024)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateRun(svc.CreateRunRequest(spec=spec(task=huge)))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await stub.ListRuns(svc.ListRunsRequest()) is not None


async def test_too_long_task_is_a_clear_error(stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateRun(svc.CreateRunRequest(spec=spec(task="x" * 300_000)))
    assert error_info(caught.value).reason == "ERR_INVALID_REQUEST"
    assert error_info(caught.value).metadata["field"] == "task"


async def test_client_exceptions_carry_reason_and_metadata(client: AsyncEngineClient) -> None:
    with pytest.raises(InvalidIdError) as caught:
        await client.get_run("../x")
    assert caught.value.code == "ERR_INVALID_ID"
    assert caught.value.metadata["field"] == "run_id"
    with pytest.raises(RunNotFoundError):
        await client.get_run("missing-run")
    with pytest.raises(InvalidScriptError):
        await client.create("t", model="scripted", script=[{"text": ""}])
    with pytest.raises(InvalidRequestError):
        await client.create("   ", model="scripted", script=[turn("x")])
    assert all(
        issubclass(cls, MachinaError) for cls in (InvalidIdError, RunNotFoundError, InvalidScriptError)
    )


async def test_edits_that_fail_the_tool_schema(client: AsyncEngineClient) -> None:
    handle = await client.create("d", model="scripted", script=DOUBLE)
    run = await handle.wait(timeout=10)
    interrupt_id = run.interrupts[0].interrupt_id
    with pytest.raises(InvalidEditsError) as caught:
        await handle.approve(interrupt_id, edits={"x": "not a number"})
    assert "x" in caught.value.message
    # Nothing was applied: the interrupt is still pending and can be approved properly.
    run = await handle.refresh()
    assert run.state == "PAUSED"
    await handle.approve(interrupt_id, edits={"x": 2})
    assert (await handle.wait(timeout=10)).state == "DONE"


async def test_decision_without_action_and_wrong_kind(stub: Any, client: AsyncEngineClient) -> None:
    handle = await client.create(
        "d", model="scripted", script=[turn("", ("AskUser", {"question": "?"})), turn("k")]
    )
    run = await handle.wait(timeout=10)
    interrupt_id = run.interrupts[0].interrupt_id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ResumeRun(
            svc.ResumeRunRequest(run_id=run.run_id, decisions=[svc.Decision(interrupt_id=interrupt_id)])
        )
    assert error_info(caught.value).reason == "ERR_INVALID_DECISION"
    with pytest.raises(InvalidDecisionError):
        await handle.approve(interrupt_id)


async def test_malformed_scripted_tool_arguments_from_the_model(client: AsyncEngineClient) -> None:
    # The model calls a real tool with arguments that fail its schema: an error result, the run goes on.
    run = await client.execute(
        "x", model="scripted", script=[turn("", ("double", {"y": 1})), turn("ok")]
    ).result()
    assert run.state == "DONE"


async def test_unauthenticated_and_wrong_key(servers: Any) -> None:
    from client_py import UnauthenticatedError
    from engine_service.core._types import Principal

    srv = await servers.start(api_keys={"right-key-123": Principal("ws1", "me")})
    async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as anonymous:
        with pytest.raises(UnauthenticatedError):
            await anonymous.get_run("x")
    async with AsyncEngineClient(f"127.0.0.1:{srv.port}", api_key="wrong-key-999") as wrong:
        with pytest.raises(UnauthenticatedError) as caught:
            await wrong.get_run("x")
        assert "wrong-key-999" not in str(caught.value)


async def test_resume_without_decisions(client: AsyncEngineClient) -> None:
    handle = await client.create("d", model="scripted", script=DOUBLE)
    await handle.wait(timeout=10)
    with pytest.raises(ValueError, match="at least one decision"):
        await handle.resume([])
    # On the wire, no decisions means "retry the runner handoff", which needs a run that failed it.
    with pytest.raises(InvalidDecisionError):
        await handle.retry_handoff()
