"""Text deltas written together are one record and one internal event covering several seqs;
over gRPC every seq is still its own event, delivered once, and a watcher can resume after any
seq — from storage, and from a run that is still streaming."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2

from engine_service import Engine, EngineConfig, LocalStorage, ToolRegistry
from engine_service.api._convert import add_events
from engine_service.api._server import RunningServer, start_server
from engine_service.core._feed import EventFeed
from engine_service.core._types import Event, EventKind, ToolCall, Usage
from engine_service.models import ModelRequest, TextChunk, TurnResult
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import engine_service_pb2_grpc as svc_grpc
from machina.engine.v1 import event_pb2, run_pb2
from tests import tools as test_tools

WORDS = [f"w{i} " for i in range(120)]


class GatedModel:
    """Streams WORDS in bursts (several flushes, so several events of deltas), then waits at
    ``gate`` before its last burst and the end of the turn; a second turn ends the run."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    @property
    def provider(self) -> str:
        return "openai"

    @property
    def name(self) -> str:
        return "gated"

    async def stream(self, request: ModelRequest) -> AsyncIterator[TextChunk | TurnResult]:
        if request.turn:
            yield TextChunk("done")
            yield TurnResult("done", [], Usage(1, 1))
            return
        for index, word in enumerate(WORDS):
            if index % 7 == 0:
                await asyncio.sleep(0.002)  # the writer flushes what came so far
            if index == 100:
                self.waiting.set()
                await self.gate.wait()
            yield TextChunk(word)
        yield TurnResult("".join(WORDS), [ToolCall("c1", "noop", {})], Usage(3, 4))

    async def aclose(self) -> None:
        return None


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, GatedModel]]:
    model = GatedModel()
    engine = Engine(
        EngineConfig(),
        LocalStorage(tmp_path),
        tools=ToolRegistry(list(test_tools.ALL)),
        model_factory=lambda provider, name: model,
    )
    server = await start_server(engine, "127.0.0.1:0")
    yield server, model
    await server.stop(0.5)


async def _stream(stub: svc_grpc.EngineServiceStub, run_id: str, after: int) -> list[bytes]:
    out: list[bytes] = []
    async for response in stub.StreamRunEvents(svc.StreamRunEventsRequest(run_id=run_id, after_seq=after)):
        out.extend(e.SerializeToString() for e in response.events)
    return out


async def test_a_watcher_resumes_after_any_seq_live_and_from_storage_each_event_once(
    served: tuple[RunningServer, GatedModel], tmp_path: Path
) -> None:
    server, model = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = svc_grpc.EngineServiceStub(channel)
        spec = svc.RunSpec(task="talk", model=svc.ModelSpec(provider="openai", name="gated"))
        run = (await stub.CreateRun(svc.CreateRunRequest(spec=spec))).run
        await asyncio.wait_for(model.waiting.wait(), 10)
        await asyncio.sleep(0.05)  # what came before the gate is written and shown

        # Live: the run is streaming; every seq so far is a place to resume from.
        live = await _stream(stub, run.run_id, 0)
        seqs = [event_pb2.RunEvent.FromString(e).seq for e in live]
        assert seqs == list(range(1, len(seqs) + 1))
        assert len(seqs) > 100
        for after in range(len(live)):
            assert await _stream(stub, run.run_id, after) == live[after:], after

        model.gate.set()
        done = (await stub.WaitRun(svc.WaitRunRequest(run_id=run.run_id, timeout_ms=10_000))).run
        assert done.state == run_pb2.RUN_STATE_DONE

        # From storage: the whole log, then from every seq.
        whole = await _stream(stub, run.run_id, 0)
        events = [event_pb2.RunEvent.FromString(e) for e in whole]
        assert [e.seq for e in events] == list(range(1, done.last_seq + 1))
        assert whole[: len(live)] == live
        deltas = [e.text_delta.text for e in events if e.HasField("text_delta")]
        assert "".join(deltas) == "".join(WORDS) + "done"
        for after in range(done.last_seq + 1):
            assert await _stream(stub, run.run_id, after) == whole[after:], after

    # The deltas were stored as fewer records than seqs.
    segments = list((tmp_path / "workspaces" / "default" / "runs" / run.run_id / "events").iterdir())
    lines = sum(len(p.read_bytes().splitlines()) for p in segments)
    assert lines < done.last_seq - len(WORDS) // 2


def _deltas(seq: int, texts: list[str]) -> Event:
    return Event(seq, 1.0, EventKind.TEXT_DELTA, {"texts": texts, "turn": 1}, n=len(texts))


def test_the_feed_finds_any_seq_inside_an_event_of_several() -> None:
    feed = EventFeed(10)
    feed.publish_many(
        [_deltas(11, ["a", "b", "c"]), Event(14, 1.0, EventKind.USAGE, {}), _deltas(15, ["d", "e"])]
    )
    assert feed.last_seq == 16
    expanded = [doc["seq"] for e in feed.after(10) for doc in e.expand()]
    assert expanded == list(range(11, 17))
    for after in range(10, 17):
        got = [doc["seq"] for e in feed.after(after) for doc in e.expand()]
        assert got == list(range(after + 1, 17))
    assert [doc["d"]["text"] for doc in feed.after(12)[0].expand()] == ["c"]
    assert feed.events[0].n == 3  # cutting a watcher's copy leaves the feed's event whole


def test_an_event_of_several_deltas_splits_between_responses_without_a_gap() -> None:
    batch = [_deltas(1, ["x" * 100] * 50), Event(51, 1.0, EventKind.USAGE, {"turn": 1, "usage": {
        "input_tokens": 1, "output_tokens": 1}, "cost_usd": 0.0})]  # fmt: skip
    seqs: list[int] = []
    start = 0
    while start < len(batch):
        response = svc.StreamRunEventsResponse()
        start = add_events(response.events, "r1", batch, start, max_bytes=2000)
        assert response.ByteSize() <= 2000
        seqs.extend(e.seq for e in response.events)
    assert seqs == list(range(1, 52))


@pytest.mark.parametrize("texts", [["a"], ["a", ""], ["a", "", "ü€", "d"]])
@pytest.mark.parametrize(("t", "turn", "path"), [(1.25, 3, ""), (0.0, 0, "a/b")])
def test_each_delta_of_an_event_renders_as_its_own_whole_message(
    texts: list[str], t: float, turn: int, path: str
) -> None:
    event = Event(7, t, EventKind.TEXT_DELTA, {"texts": texts, "turn": turn}, path, len(texts))
    response = svc.StreamRunEventsResponse()
    assert add_events(response.events, "r1", [event]) == 1
    expected = [
        event_pb2.RunEvent(
            run_id="r1",
            seq=7 + i,
            agent_path=path,
            time=timestamp_pb2.Timestamp(seconds=int(t), nanos=int((t - int(t)) * 1e9)),
            text_delta=event_pb2.TextDelta(text=text, turn=turn),
        )
        for i, text in enumerate(texts)
    ]
    assert list(response.events) == expected
    assert all(e.HasField("time") and e.WhichOneof("kind") == "text_delta" for e in response.events)
