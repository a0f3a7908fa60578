"""The checkpoint after a turn's tool calls waits up to ``commit_delay_s`` for the run's next one,
which commits both: one commit (and with fsync one sync) a turn instead of two. It is written by
itself once the delay has passed (the next model call may take long), and when the engine shuts
down; a crash before that is a crash during the calls (tests/system/test_recovery.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from engine_service import Engine, EngineConfig, LocalStorage, ToolRegistry
from engine_service.api._server import start_server
from engine_service.core._catalogue import builtin_tools
from engine_service.core._types import ToolCall, Usage
from engine_service.models import ModelRequest, TextChunk, TurnResult
from engine_service.storage._protocol import Checkpoint
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import engine_service_pb2_grpc as svc_grpc
from machina.engine.v1 import event_pb2, run_pb2
from tests import tools as test_tools

pytestmark = pytest.mark.timeout(60)

TURNS = 10


class CountingStorage(LocalStorage):
    def __init__(self, root: Path, *, fsync: bool = False) -> None:
        super().__init__(root, fsync=fsync)
        self.commits = 0

    async def commit(self, ws: str, run_id: str, checkpoint: Checkpoint) -> None:
        self.commits += 1
        await super().commit(ws, run_id, checkpoint)


def _engine(root: Path, storage: LocalStorage, model: Any = None, **config: Any) -> Engine:
    cfg = EngineConfig.model_validate({"storage": str(root), "workdir_root": str(root / "w"), **config})
    tools = ToolRegistry([*builtin_tools(cfg), *test_tools.ALL])
    if model is None:
        return Engine(cfg, storage, tools=tools)
    return Engine(cfg, storage, tools=tools, model_factory=lambda provider, name: model)


def _scripted(text: str = "", call: tuple[str, dict[str, Any]] | None = None) -> svc.ScriptedTurn:
    turn = svc.ScriptedTurn(text=text)
    if call is not None:
        turn.tool_calls.add(name=call[0]).arguments.update(call[1])
    return turn


def _edit_script() -> list[svc.ScriptedTurn]:
    """A file written on turn 1 and edited every later turn: the tools are not idempotent."""
    script = [_scripted(call=("Write", {"path": "f.txt", "content": "v0\n"}))]
    for i in range(1, TURNS):
        edit = {"path": "f.txt", "old_string": f"v{i - 1}", "new_string": f"v{i}"}
        script.append(_scripted(call=("Edit", edit)))
    script.append(_scripted("done"))
    return script


async def _edit_run(root: Path, storage: LocalStorage, **config: Any) -> str:
    server = await start_server(_engine(root, storage, **config), "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = svc_grpc.EngineServiceStub(channel)
            spec = svc.RunSpec(task="edit", model=svc.ModelSpec(provider="scripted", script=_edit_script()))
            run = (await stub.CreateRun(svc.CreateRunRequest(spec=spec))).run
            while run.state not in (run_pb2.RUN_STATE_DONE, run_pb2.RUN_STATE_FAILED):
                run = (await stub.WaitRun(svc.WaitRunRequest(run_id=run.run_id, timeout_ms=10_000))).run
            assert run.state == run_pb2.RUN_STATE_DONE, run.error
            assert run.meta.turns == TURNS + 1
            return str(run.run_id)
    finally:
        await server.stop(0.5)


@pytest.mark.parametrize("fsync", [False, True])
async def test_a_turn_with_a_tool_is_one_commit_and_with_fsync_one_sync(
    tmp_path: Path, fsync: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs = 0
    datasync = os.fdatasync

    def counted(fd: int) -> None:
        nonlocal syncs
        syncs += 1
        datasync(fd)

    monkeypatch.setattr(os, "fdatasync", counted)
    counts = {}
    for delay in (0.05, 0.0):
        storage = CountingStorage(tmp_path / f"delay-{delay}", fsync=fsync)
        syncs = 0
        await _edit_run(tmp_path / f"delay-{delay}", storage, fsync=fsync, commit_delay_s=delay)
        counts[delay] = (storage.commits, syncs)
    # Start, the checkpoint before each call, the end; without the delay also one after each.
    assert counts[0.05][0] <= TURNS + 3, counts
    assert counts[0.0][0] >= 2 * TURNS, counts
    if fsync:
        assert counts[0.05][1] <= TURNS + 3, counts
        assert counts[0.0][1] >= 2 * TURNS, counts


class _TestModel:
    """What the engine asks of a model adapter besides ``stream`` (provider ``openai``, which the
    tests' model factory answers with this object; ``name`` as the run asks for it)."""

    name = ""

    @property
    def provider(self) -> str:
        return "openai"

    async def aclose(self) -> None:
        return None


class ToolThenSlowTurn(_TestModel):
    """Turn 1 asks for ``echo``; turn 2 streams words, then waits at ``gate``; turn 3 ends."""

    name = "slow"

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def stream(self, request: ModelRequest) -> AsyncIterator[TextChunk | TurnResult]:
        if request.turn == 0:
            yield TurnResult("", [ToolCall("c1", "echo", {"text": "the result"})], Usage(1, 1))
            return
        if request.turn == 1:
            for i in range(40):
                if i == 20:
                    self.waiting.set()
                    await self.gate.wait()
                await asyncio.sleep(0.005)
                yield TextChunk(f"w{i} ")
            yield TurnResult("thinking", [], Usage(1, 1))
            return
        yield TurnResult("done", [], Usage(1, 1))


async def _stream(stub: svc_grpc.EngineServiceStub, run_id: str, after: int = 0) -> list[bytes]:
    out: list[bytes] = []
    async for response in stub.StreamRunEvents(svc.StreamRunEventsRequest(run_id=run_id, after_seq=after)):
        out.extend(e.SerializeToString() for e in response.events)
    return out


@pytest.fixture
async def slow_turn(tmp_path: Path) -> AsyncIterator[tuple[Any, ToolThenSlowTurn, LocalStorage, Any]]:
    model = ToolThenSlowTurn()
    storage = LocalStorage(tmp_path)
    server = await start_server(_engine(tmp_path, storage, model, commit_delay_s=0.1), "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, model, storage, svc_grpc.EngineServiceStub(channel)
    finally:
        model.gate.set()
        await server.stop(0.5)


def _committed_result(state: dict[str, Any] | None) -> bool:
    """Whether ``state`` commits the echo call's result (the task, the call, its result)."""
    return state is not None and state["transcript_len"] >= 3 and not state["pending"]


async def test_the_delayed_checkpoint_is_written_while_a_long_model_call_streams(
    slow_turn: tuple[Any, ToolThenSlowTurn, LocalStorage, Any],
) -> None:
    _, model, storage, stub = slow_turn
    spec = svc.RunSpec(task="t", model=svc.ModelSpec(provider="openai", name="slow"))
    run = (await stub.CreateRun(svc.CreateRunRequest(spec=spec))).run
    await asyncio.wait_for(model.waiting.wait(), 10)
    await asyncio.sleep(0.4)  # the delay (0.1 s) passed during the model call
    state = await storage.read_state("default", run.run_id)
    assert _committed_result(state), state
    # What the checkpoint wrote while the model streamed is what watchers saw, each seq once.
    live = await _stream(stub, run.run_id)
    seqs = [event_pb2.RunEvent.FromString(e).seq for e in live]
    assert seqs == list(range(1, len(seqs) + 1))
    assert state is not None
    assert state["last_seq"] <= seqs[-1]

    model.gate.set()
    done = (await stub.WaitRun(svc.WaitRunRequest(run_id=run.run_id, timeout_ms=10_000))).run
    assert done.state == run_pb2.RUN_STATE_DONE
    whole = await _stream(stub, run.run_id)
    assert whole[: len(live)] == live
    events = [event_pb2.RunEvent.FromString(e) for e in whole]
    assert [e.seq for e in events] == list(range(1, done.last_seq + 1))
    text = "".join(e.text_delta.text for e in events if e.HasField("text_delta"))
    assert text == "".join(f"w{i} " for i in range(40))
    for after in range(0, done.last_seq + 1, 3):
        assert await _stream(stub, run.run_id, after) == whole[after:], after


async def test_an_engine_that_stops_writes_the_checkpoint_it_delayed(tmp_path: Path) -> None:
    model = ToolThenSlowTurn()
    storage = LocalStorage(tmp_path)
    server = await start_server(_engine(tmp_path, storage, model, commit_delay_s=10), "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = svc_grpc.EngineServiceStub(channel)
            spec = svc.RunSpec(task="t", model=svc.ModelSpec(provider="openai", name="slow"))
            run = (await stub.CreateRun(svc.CreateRunRequest(spec=spec))).run
            await asyncio.wait_for(model.waiting.wait(), 10)
            state = await storage.read_state("default", run.run_id)
            assert not _committed_result(state), state  # still delayed (10 s)
    finally:
        await server.stop(0.5)
    assert _committed_result(await LocalStorage(tmp_path).read_state("default", run.run_id))


class PacedTools(_TestModel):
    """Every turn takes 10 ms and asks for ``echo`` (not idempotent: a checkpoint comes before
    each call); the last answers."""

    name = "paced"

    def __init__(self, turns: int) -> None:
        self.turns = turns

    async def stream(self, request: ModelRequest) -> AsyncIterator[TextChunk | TurnResult]:
        await asyncio.sleep(0.01)
        if request.turn < self.turns:
            yield TextChunk("calling ")
            call = ToolCall(f"c{request.turn}", "echo", {"text": str(request.turn)})
            yield TurnResult("calling", [call], Usage(1, 1))
        else:
            yield TurnResult("done", [], Usage(1, 1))


class GatheringStorage(LocalStorage):
    """Local storage that gathers events for 50 ms before writing them ahead, as an object
    store does; counts the writes ahead apart from the events checkpoints carry."""

    event_flush_delay = 0.05

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.ahead = 0
        self._committing = False

    async def commit(self, ws: str, run_id: str, checkpoint: Checkpoint) -> None:
        self._committing = True
        try:
            await super().commit(ws, run_id, checkpoint)
        finally:
            self._committing = False

    async def write_segment(
        self, ws: str, run_id: str, stream: str, first: int, records: list[dict[str, Any]]
    ) -> None:
        if stream == "events" and not self._committing:
            self.ahead += 1
        await super().write_segment(ws, run_id, stream, first, records)


async def test_events_ride_with_checkpoints_that_come_more_often_than_the_flush_delay(
    tmp_path: Path,
) -> None:
    turns = 40
    storage = GatheringStorage(tmp_path)
    server = await start_server(_engine(tmp_path, storage, PacedTools(turns)), "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = svc_grpc.EngineServiceStub(channel)
            spec = svc.RunSpec(task="t", model=svc.ModelSpec(provider="openai", name="paced"))
            run = (await stub.CreateRun(svc.CreateRunRequest(spec=spec))).run
            while run.state not in (run_pb2.RUN_STATE_DONE, run_pb2.RUN_STATE_FAILED):
                run = (await stub.WaitRun(svc.WaitRunRequest(run_id=run.run_id, timeout_ms=10_000))).run
            assert run.state == run_pb2.RUN_STATE_DONE, run.error
            events = await _stream(stub, run.run_id)
    finally:
        await server.stop(0.5)
    seqs = [event_pb2.RunEvent.FromString(e).seq for e in events]
    assert seqs == list(range(1, run.last_seq + 1))
    # A checkpoint lands every ~10 ms and carries the events; writing them ahead every 50 ms as
    # well (about 8 writes in this run) would only hold the next checkpoint up.
    assert storage.ahead <= 2, storage.ahead
