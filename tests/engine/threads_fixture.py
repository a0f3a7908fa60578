"""A real EngineService over local storage or S3 (moto), a model that answers from its whole
request, and a raw gRPC stub: what the thread, deletion and retention tests talk to."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from engine_service.api._server import RunningServer, start_server
from engine_service.core._catalogue import builtin_tools
from engine_service.core._config import EngineConfig
from engine_service.core._engine import Engine
from engine_service.core._types import Usage
from engine_service.models import ModelRequest, TextChunk, TurnResult
from engine_service.storage._local import LocalStorage
from engine_service.storage._protocol import Storage
from engine_service.tools._registry import ToolRegistry
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import engine_service_pb2_grpc as svc_grpc
from machina.engine.v1 import run_pb2 as rp
from tests.engine.harness import FakeClock


class MemoryModel:
    """Answers from the request it is sent, so an answer shows what the model was shown.

    ``remember X`` answers ``ok``; ``recall`` answers every X it was asked to remember, in order
    (``nothing`` if none); any other task is echoed. Every request's messages are kept.
    """

    def __init__(self, seen: list[list[tuple[str, str]]]) -> None:
        self.seen = seen

    provider = "openai"
    name = "memory"

    async def stream(self, request: ModelRequest) -> AsyncIterator[TextChunk | TurnResult]:
        messages = [(m.role, m.text) for m in request.messages]
        self.seen.append(messages)
        task = messages[-1][1]
        if task.startswith("remember "):
            answer = "ok"
        elif task == "recall":
            kept = [
                text[len("remember ") :]
                for role, text in messages
                if role == "user" and text.startswith("remember ")
            ]
            answer = ",".join(kept) or "nothing"
        else:
            answer = f"echo {task}"
        yield TextChunk(answer)
        yield TurnResult(answer, [], Usage(1, 1), "end_turn")

    async def aclose(self) -> None:
        return None


@dataclass
class Stack:
    """One engine served over gRPC, its storage, its clock and what its model was sent."""

    server: RunningServer
    channel: grpc.aio.Channel
    stub: svc_grpc.EngineServiceStub
    storage: Storage
    clock: FakeClock
    seen: list[list[tuple[str, str]]] = field(default_factory=list)
    kind: str = "local"
    bucket: str = ""
    endpoint: str = ""

    @property
    def engine(self) -> Engine:
        return self.server.engine

    async def start(self, task: str, **spec: Any) -> rp.Run:
        spec.setdefault("model", svc.ModelSpec(provider="openai", name="memory"))
        response: svc.CreateRunResponse = await self.stub.CreateRun(
            svc.CreateRunRequest(spec=svc.RunSpec(task=task, **spec))
        )
        return response.run

    async def wait(self, run_id: str) -> rp.Run:
        response: svc.WaitRunResponse = await self.stub.WaitRun(
            svc.WaitRunRequest(run_id=run_id, timeout_ms=20_000)
        )
        assert not response.timed_out
        return response.run

    async def run(self, task: str, **spec: Any) -> rp.Run:
        run = await self.start(task, **spec)
        return await self.wait(run.run_id)

    async def events(self, run_id: str) -> list[Any]:
        out = []
        async for response in self.stub.StreamRunEvents(svc.StreamRunEventsRequest(run_id=run_id)):
            out.extend(response.events)
        return out

    async def object_names(self, run_id: str = "") -> list[str]:
        """Every object (file or S3 key) in storage, or only those naming ``run_id``."""
        if self.kind == "local":
            assert isinstance(self.storage, LocalStorage)
            names = [
                str(p.relative_to(self.storage.root)) for p in self.storage.root.rglob("*") if p.is_file()
            ]
        else:
            import aioboto3

            names = []
            session = aioboto3.Session()
            async with session.client("s3", region_name="us-east-1", endpoint_url=self.endpoint) as s3:
                paginator = s3.get_paginator("list_objects_v2")
                async for page in paginator.paginate(Bucket=self.bucket):
                    names += [item["Key"] for item in page.get("Contents", ())]
        return sorted(n for n in names if run_id in n)


def code_of(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
    """The status and the ErrorInfo reason of a failed call."""
    from google.rpc import error_details_pb2, status_pb2

    reason = ""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    reason = info.reason
    return error.code(), reason


async def fails(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status and reason ``call`` (a unary call, a stream or a coroutine) fails with."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _drain(call)
    return code_of(caught.value)


async def _drain(call: Any) -> None:
    if hasattr(call, "__aiter__"):
        async for _ in call:
            pass
    else:
        await call


async def build_stack(
    kind: str, root: Path, moto_url: str | None, *, config: dict[str, Any] | None = None
) -> Stack:
    clock = FakeClock()
    seen: list[list[tuple[str, str]]] = []
    bucket = ""
    storage: Storage
    if kind == "local":
        storage = LocalStorage(root / "storage")
    else:
        from engine_service.storage._s3 import S3Storage
        from tests.s3_server import new_bucket

        assert moto_url is not None
        bucket = await new_bucket(moto_url)
        storage = S3Storage(bucket, "machina", endpoint_url=moto_url)
    cfg = EngineConfig.model_validate(
        {
            "storage": str(root / "storage"),
            "workdir_root": str(root / "workdirs"),
            "workdir_snapshot_max_bytes": 1 << 20,
            "recovery_interval_s": 0,
            "retention_interval_s": 0,
            **(config or {}),
        }
    )
    egress = cfg.egress_policy()
    engine = Engine(
        cfg,
        storage,
        tools=ToolRegistry(builtin_tools(cfg, egress)),
        egress=egress,
        clock=clock,
        model_factory=lambda provider, name: MemoryModel(seen),
    )
    server = await start_server(engine, "127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stub = svc_grpc.EngineServiceStub(channel)
    return Stack(server, channel, stub, storage, clock, seen, kind, bucket, moto_url or "")


@pytest.fixture(params=["local", "s3"])
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncGenerator[Stack, None]:
    moto_url = request.getfixturevalue("moto") if request.param == "s3" else None
    built = await build_stack(request.param, tmp_path, moto_url)
    yield built
    await built.channel.close()
    await built.server.stop(0.5)


async def gather_runs(stack: Stack, tasks: Sequence[str], **spec: Any) -> list[rp.Run]:
    return list(await asyncio.gather(*(stack.run(t, **spec) for t in tasks)))
