"""EngineServicer invoked in memory with grpcio-testing (no network, no channel).

grpcio-testing drives synchronous handlers from worker threads; a small shim
runs our grpc.aio servicer's coroutines on an event loop thread for it.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc_testing
import pytest
from google.rpc import error_details_pb2, status_pb2

from engine_service import Engine, EngineConfig, LocalStorage
from engine_service.api._auth import Authenticator
from engine_service.api._server import EngineServicer
from engine_service.core._types import Principal
from machina.engine.v1 import engine_service_pb2 as svc

SERVICE = svc.DESCRIPTOR.services_by_name["EngineService"]


class SyncShim:
    """Exposes each async servicer method as a sync one running on ``loop``."""

    def __init__(self, servicer: EngineServicer, loop: asyncio.AbstractEventLoop) -> None:
        self._servicer = servicer
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._servicer, name)
        loop = self._loop
        if inspect.isasyncgenfunction(method):

            def stream(request: Any, context: Any) -> Iterator[Any]:
                agen = method(request, context)
                while True:
                    try:
                        yield asyncio.run_coroutine_threadsafe(agen.__anext__(), loop).result(10)
                    except StopAsyncIteration:
                        return

            return stream

        def unary(request: Any, context: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(method(request, context), loop).result(10)

        return unary


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def make_server(
    tmp_path: Path, loop: asyncio.AbstractEventLoop, keys: dict[str, Principal] | None = None
) -> Any:
    async def build() -> Engine:
        return Engine(EngineConfig(), LocalStorage(tmp_path))

    engine = asyncio.run_coroutine_threadsafe(build(), loop).result(5)
    servicer = SyncShim(EngineServicer(engine, Authenticator(keys)), loop)
    return grpc_testing.server_from_dictionary({SERVICE: servicer}, grpc_testing.strict_real_time())


def reason(trailing_metadata: Any) -> str:
    raw = dict(trailing_metadata)["grpc-status-details-bin"]
    info = error_details_pb2.ErrorInfo()
    status_pb2.Status.FromString(raw).details[0].Unpack(info)
    return str(info.reason)


def unary(server: Any, name: str, request: Any, metadata: Any = ()) -> tuple[Any, Any, Any, str]:
    rpc = server.invoke_unary_unary(SERVICE.methods_by_name[name], metadata, request, None)
    response, trailing, code, details = rpc.termination()
    return response, trailing, code, details


def test_get_run_not_found_maps_to_status_and_error_info(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    server = make_server(tmp_path, loop)
    _, trailing, code, details = unary(server, "GetRun", svc.GetRunRequest(run_id="missing"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert reason(trailing) == "ERR_RUN_NOT_FOUND"
    assert "missing" in details


def test_create_then_get(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    server = make_server(tmp_path, loop)
    spec = svc.RunSpec(
        task="hi",
        run_id="r1",
        model=svc.ModelSpec(provider="scripted", script=[svc.ScriptedTurn(text="hello")]),
    )
    response, _, code, _ = unary(server, "CreateRun", svc.CreateRunRequest(spec=spec))
    assert code == grpc.StatusCode.OK
    assert response.run.run_id == "r1"
    response, _, code, _ = unary(server, "GetRun", svc.GetRunRequest(run_id="r1"))
    assert code == grpc.StatusCode.OK
    assert response.run.task == "hi"


def test_execute_run_streams_batches_then_the_run(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    server = make_server(tmp_path, loop)
    spec = svc.RunSpec(
        task="hi", model=svc.ModelSpec(provider="scripted", script=[svc.ScriptedTurn(text="a b c")])
    )
    rpc = server.invoke_unary_stream(
        SERVICE.methods_by_name["ExecuteRun"], (), svc.ExecuteRunRequest(spec=spec), None
    )
    responses = []
    while True:
        try:
            responses.append(rpc.take_response())
        except ValueError:
            break
        if responses[-1].HasField("run"):
            break
    _, code, _ = rpc.termination()
    assert code == grpc.StatusCode.OK
    events = [e for r in responses for e in r.events]
    assert events[0].WhichOneof("kind") == "run_started"
    assert responses[-1].run.state == responses[-1].run.state.__class__(4)  # RUN_STATE_DONE


def test_auth_is_checked_before_anything_else(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    server = make_server(tmp_path, loop, keys={"k-12345678": Principal("ws", "me")})
    _, trailing, code, _ = unary(server, "GetRun", svc.GetRunRequest(run_id="../bad"))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert reason(trailing) == "ERR_UNAUTHENTICATED"
    _, trailing, code, _ = unary(
        server, "GetRun", svc.GetRunRequest(run_id="x"), (("authorization", "Bearer k-12345678"),)
    )
    assert code == grpc.StatusCode.NOT_FOUND
