"""The client against a real grpc.aio server running a small fake EngineService.

The server runs on its own event loop in a thread, so the same fixture serves the
async client (on the test's loop) and the sync client (on its private loop),
including the sync client called from inside a running event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

import client_py
from machina.engine.v1 import engine_service_pb2 as pb
from machina.engine.v1 import engine_service_pb2_grpc as pb_grpc
from machina.engine.v1 import event_pb2, run_pb2

API_KEY = "test-key"
T0 = timestamp_pb2.Timestamp(seconds=1_700_000_000)


async def abort_with_info(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, reason: str, message: str, **meta: str
) -> None:
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain="machina.dev", metadata=meta))
    rich = rpc_status.to_status(status)
    await context.abort(rich.code, rich.details, rich.trailing_metadata)


def interrupt(interrupt_id: str = "i1") -> run_pb2.Interrupt:
    return run_pb2.Interrupt(
        interrupt_id=interrupt_id,
        kind=run_pb2.INTERRUPT_KIND_APPROVAL,
        call_id="c1",
        tool_name="shell",
        description="run ls",
        create_time=T0,
    )


def run_proto(run_id: str, state: run_pb2.RunState.ValueType, **fields: Any) -> run_pb2.Run:
    return run_pb2.Run(
        run_id=run_id, workspace_id="ws", state=state, create_time=T0, update_time=T0, **fields
    )


def paused_run(run_id: str, last_seq: int) -> run_pb2.Run:
    pause = run_pb2.Pause(reason=run_pb2.PAUSE_REASON_AWAITING_APPROVAL, interrupts=[interrupt()])
    return run_proto(run_id, run_pb2.RUN_STATE_PAUSED, pause=pause, last_seq=last_seq)


def event(run_id: str, seq: int) -> event_pb2.RunEvent:
    """Events of the canned run: started, three text deltas, then finished (seq 6)."""
    proto = event_pb2.RunEvent(run_id=run_id, seq=seq, time=T0)
    if seq == 1:
        proto.run_started.task = "t"
    elif seq < 6:
        proto.text_delta.text = f"part{seq}"
        proto.text_delta.turn = 1
    else:
        proto.run_finished.state = run_pb2.RUN_STATE_DONE
        proto.run_finished.data.string_value = "all done"
    return proto


def paused_event(run_id: str, seq: int) -> event_pb2.RunEvent:
    proto = event_pb2.RunEvent(run_id=run_id, seq=seq, time=T0)
    proto.paused.pause.reason = run_pb2.PAUSE_REASON_AWAITING_APPROVAL
    proto.paused.pause.interrupts.append(interrupt())
    return proto


class FakeEngine(pb_grpc.EngineServiceServicer):
    """Canned answers, keyed by run id or task, and a record of what was asked."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.stream_requests: list[tuple[int, bool]] = []
        self.resume_requests: list[pb.ResumeRunRequest] = []
        self.wait_timeouts: list[int] = []
        self.flaky_failures = 2
        self.dropped_once = False
        self.metadata: list[tuple[str, dict[str, str]]] = []

    async def _enter(self, name: str, context: grpc.aio.ServicerContext) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.metadata.append((name, dict(context.invocation_metadata() or ())))
        if dict(context.invocation_metadata()).get("authorization") != f"Bearer {API_KEY}":
            await abort_with_info(context, grpc.StatusCode.UNAUTHENTICATED, "ERR_UNAUTHENTICATED", "bad key")

    async def ExecuteRun(
        self, request: pb.ExecuteRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExecuteRunResponse]:
        await self._enter("ExecuteRun", context)
        run_id = request.spec.run_id or "r-exec"
        yield pb.ExecuteRunResponse(events=[event(run_id, 1), event(run_id, 2)])
        if request.spec.task == "drop":
            # The connection breaks mid-run; the rest must come via StreamRunEvents.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        yield pb.ExecuteRunResponse(
            events=[event(run_id, 3), paused_event(run_id, 4)], run=paused_run(run_id, last_seq=4)
        )

    async def CreateRun(
        self, request: pb.CreateRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateRunResponse:
        await self._enter("CreateRun", context)
        if request.spec.run_id == "exists":
            await abort_with_info(
                context,
                grpc.StatusCode.ALREADY_EXISTS,
                "ERR_RUN_EXISTS",
                "run exists exists",
                run_id="exists",
            )
        if request.spec.task == "flaky" and self.calls["CreateRun"] == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return pb.CreateRunResponse(run=run_proto(request.spec.run_id or "r-new", run_pb2.RUN_STATE_QUEUED))

    async def GetRun(self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext) -> pb.GetRunResponse:
        await self._enter("GetRun", context)
        if request.run_id == "missing":
            await abort_with_info(
                context,
                grpc.StatusCode.NOT_FOUND,
                "ERR_RUN_NOT_FOUND",
                "run missing not found",
                run_id="missing",
            )
        if request.run_id == "down":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        if request.run_id == "busy":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
        if request.run_id == "stall":
            await asyncio.sleep(0.5)
        if request.run_id == "flaky" and self.calls["GetRun"] <= self.flaky_failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        if request.run_id == "r-exec":
            return pb.GetRunResponse(run=paused_run("r-exec", last_seq=4))
        if request.run_id == "r-stream":
            return pb.GetRunResponse(run=run_proto("r-stream", run_pb2.RUN_STATE_RUNNING, last_seq=6))
        return pb.GetRunResponse(run=run_proto(request.run_id, run_pb2.RUN_STATE_RUNNING))

    async def ListRuns(
        self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRunsResponse:
        await self._enter("ListRuns", context)
        assert list(request.states) == [run_pb2.RUN_STATE_PAUSED]
        assert dict(request.labels) == {"team": "a"}
        start = int(request.page_token or 0)
        ids = [f"r{i}" for i in range(5)][start : start + request.page_size]
        more = start + request.page_size < 5
        return pb.ListRunsResponse(
            runs=[run_proto(i, run_pb2.RUN_STATE_PAUSED) for i in ids],
            next_page_token=str(start + request.page_size) if more else "",
        )

    async def WaitRun(
        self, request: pb.WaitRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.WaitRunResponse:
        await self._enter("WaitRun", context)
        self.wait_timeouts.append(request.timeout_ms)
        if request.run_id == "slow":
            await asyncio.sleep(min(request.timeout_ms, 200) / 1000)
            return pb.WaitRunResponse(run=run_proto("slow", run_pb2.RUN_STATE_RUNNING), timed_out=True)
        if request.run_id == "handoff" and len(self.wait_timeouts) < 3:
            # A server answers timed_out while a runner holds the run: not the caller's pause.
            pause = run_pb2.Pause(reason=run_pb2.PAUSE_REASON_HANDOFF_TO_RUNNER)
            return pb.WaitRunResponse(
                run=run_proto("handoff", run_pb2.RUN_STATE_PAUSED, pause=pause), timed_out=True
            )
        if request.run_id == "handoff":
            return pb.WaitRunResponse(run=run_proto("handoff", run_pb2.RUN_STATE_DONE))
        if len(self.wait_timeouts) < 3:
            return pb.WaitRunResponse(
                run=run_proto(request.run_id, run_pb2.RUN_STATE_RUNNING), timed_out=True
            )
        return pb.WaitRunResponse(run=paused_run(request.run_id, last_seq=4))

    async def StreamRunEvents(
        self, request: pb.StreamRunEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamRunEventsResponse]:
        await self._enter("StreamRunEvents", context)
        self.stream_requests.append((request.after_seq, request.follow))
        run_id, after = request.run_id, request.after_seq
        if run_id == "r-exec":
            # The tail of the ExecuteRun that dropped: up to the pause.
            yield pb.StreamRunEventsResponse(events=[event(run_id, s) for s in range(after + 1, 4)])
            yield pb.StreamRunEventsResponse(events=[paused_event(run_id, 4)])
            await asyncio.sleep(30)  # a follow stream stays open while paused
            return
        match len(self.stream_requests):
            case 1:
                # Two batches, then the server goes away.
                yield pb.StreamRunEventsResponse(events=[event(run_id, after + 1), event(run_id, after + 2)])
                yield pb.StreamRunEventsResponse(events=[event(run_id, after + 3)])
                await context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down")
            case 2:
                # Replays an event the client already has, then ends early with OK.
                yield pb.StreamRunEventsResponse(events=[event(run_id, s) for s in range(after, after + 2)])
            case _:
                yield pb.StreamRunEventsResponse(events=[event(run_id, s) for s in range(after + 1, 7)])

    async def ResumeRun(
        self, request: pb.ResumeRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResumeRunResponse:
        await self._enter("ResumeRun", context)
        self.resume_requests.append(request)
        if request.run_id == "flaky" and len(self.resume_requests) == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return pb.ResumeRunResponse(run=run_proto(request.run_id, run_pb2.RUN_STATE_RUNNING))

    async def CancelRun(
        self, request: pb.CancelRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelRunResponse:
        await self._enter("CancelRun", context)
        error = run_pb2.RunError(code="ERR_CANCELLED", message=request.reason)
        return pb.CancelRunResponse(run=run_proto(request.run_id, run_pb2.RUN_STATE_CANCELLED, error=error))

    async def RecoverOrphanedRuns(
        self, request: pb.RecoverOrphanedRunsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecoverOrphanedRunsResponse:
        await self._enter("RecoverOrphanedRuns", context)
        return pb.RecoverOrphanedRunsResponse(run_ids=["a", "b"])

    async def GetToolResult(
        self, request: pb.GetToolResultRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetToolResultResponse:
        await self._enter("GetToolResult", context)
        return pb.GetToolResultResponse(content="", total_chars=0)

    async def GetThread(
        self, request: pb.GetThreadRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetThreadResponse:
        await self._enter("GetThread", context)
        return pb.GetThreadResponse(thread=run_pb2.Thread(thread_id=request.thread_id, run_ids=["a", "b"]))

    async def ListThreads(
        self, request: pb.ListThreadsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListThreadsResponse:
        await self._enter("ListThreads", context)
        return pb.ListThreadsResponse()

    async def DeleteRun(
        self, request: pb.DeleteRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteRunResponse:
        await self._enter("DeleteRun", context)
        return pb.DeleteRunResponse()

    async def DeleteThread(
        self, request: pb.DeleteThreadRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteThreadResponse:
        await self._enter("DeleteThread", context)
        return pb.DeleteThreadResponse(run_ids=["a", "b"])

    async def ApplyRetention(
        self, request: pb.ApplyRetentionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApplyRetentionResponse:
        await self._enter("ApplyRetention", context)
        return pb.ApplyRetentionResponse(dry_run=request.dry_run)


class ServerThread:
    """A grpc.aio server on 127.0.0.1:0 with its own event loop in a thread."""

    def __init__(self, servicer: FakeEngine) -> None:
        self._servicer = servicer
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.port = 0
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        server = grpc.aio.server()
        pb_grpc.add_EngineServiceServicer_to_server(self._servicer, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await server.stop(grace=None)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(10), "fake server did not start"
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._loop is not None
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def target(fake: FakeEngine) -> Iterator[str]:
    with ServerThread(fake) as server:
        yield f"127.0.0.1:{server.port}"


@pytest.fixture
async def client(target: str) -> AsyncIterator[client_py.AsyncEngineClient]:
    async with client_py.AsyncEngineClient(target, api_key=API_KEY) as client:
        yield client


@pytest.fixture
def sync_client(target: str) -> Iterator[client_py.EngineClient]:
    with client_py.EngineClient(target, api_key=API_KEY) as client:
        yield client


# --- async client -----------------------------------------------------------------


async def test_execute_yields_flattened_events_then_run(client: client_py.AsyncEngineClient) -> None:
    execution = client.execute("hello", script=["hi"])
    events = [e async for e in execution]
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert [e.kind for e in events] == ["run_started", "text_delta", "text_delta", "paused"]
    assert isinstance(events[-1], client_py.Paused)
    assert execution.run is not None
    assert execution.run.paused
    assert execution.run.interrupts[0].interrupt_id == "i1"
    assert execution.last_seq == 4
    handle = execution.handle
    run = await handle.approve("i1", edits={"cmd": "ls -la"})
    assert run.state == "RUNNING"
    assert handle.run is run


async def test_execute_result_drains(client: client_py.AsyncEngineClient) -> None:
    run = await client.execute("hello").result()
    assert run.state == "PAUSED"


async def test_execute_continues_through_stream_events_after_a_drop(
    client: client_py.AsyncEngineClient, fake: FakeEngine
) -> None:
    execution = client.execute("drop")
    events = [e async for e in execution]
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert fake.stream_requests == [(2, True)]
    assert execution.run is not None
    assert execution.run.paused


async def test_events_reconnect_without_loss_or_duplicates(
    client: client_py.AsyncEngineClient, fake: FakeEngine
) -> None:
    handle = await client.attach("r-stream")
    events = [e async for e in handle.events()]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
    assert isinstance(events[-1], client_py.RunFinished)
    assert events[-1].data == "all done"
    # 1st: UNAVAILABLE after seq 3; 2nd: replayed seq 3, ended early after 4; 3rd: the rest.
    assert fake.stream_requests == [(0, True), (3, True), (4, True)]


async def test_errors_map_to_classes(client: client_py.AsyncEngineClient, target: str) -> None:
    with pytest.raises(client_py.RunNotFoundError) as info:
        await client.get_run("missing")
    assert info.value.code == "ERR_RUN_NOT_FOUND"
    assert info.value.metadata == {"run_id": "missing"}
    assert info.value.status == grpc.StatusCode.NOT_FOUND
    with pytest.raises(client_py.RunExistsError):
        await client.create("t", run_id="exists")
    async with client_py.AsyncEngineClient(target, api_key="wrong") as bad:
        with pytest.raises(client_py.UnauthenticatedError, match="bad key"):
            await bad.get_run("r")
        with pytest.raises(client_py.UnauthenticatedError):
            async for _ in bad.execute("t"):
                pass


async def test_get_run_is_retried_on_unavailable(
    client: client_py.AsyncEngineClient, fake: FakeEngine
) -> None:
    run = await client.get_run("flaky")
    assert run.run_id == "flaky"
    assert fake.calls["GetRun"] == 3


async def test_retries_are_bounded(client: client_py.AsyncEngineClient, fake: FakeEngine) -> None:
    with pytest.raises(client_py.UnavailableError):
        await client.get_run("down")
    assert fake.calls["GetRun"] == 4  # the call and max_retries=3 retries


async def test_create_retried_only_with_request_id(
    client: client_py.AsyncEngineClient, fake: FakeEngine
) -> None:
    with pytest.raises(client_py.UnavailableError):
        await client.create("flaky")
    assert fake.calls["CreateRun"] == 1
    fake.calls.clear()
    handle = await client.create("flaky", request_id="req-1")
    assert handle.run.state == "QUEUED"
    assert fake.calls["CreateRun"] == 2


async def test_resume_retry_reuses_its_request_id(
    client: client_py.AsyncEngineClient, fake: FakeEngine
) -> None:
    handle = await client.attach("flaky")
    await handle.resume(
        [client_py.Reject("i1", "no"), {"interrupt_id": "i2", "action": "respond", "output": {"x": 1}}]
    )
    first, second = fake.resume_requests
    assert first.request_id
    assert first.request_id == second.request_id
    assert [d.WhichOneof("action") for d in second.decisions] == ["reject", "respond"]


async def test_handle_decisions_and_cancel(client: client_py.AsyncEngineClient, fake: FakeEngine) -> None:
    handle = await client.attach("r1")
    await handle.answer("i1", "blue")
    await handle.respond("i2", [1, 2])
    await handle.reject("i3")
    actions = [r.decisions[0] for r in fake.resume_requests]
    assert actions[0].respond.output.string_value == "blue"
    assert actions[1].respond.output.list_value.values[1].number_value == 2
    assert actions[2].WhichOneof("action") == "reject"
    run = await handle.cancel("enough")
    assert run.state == "CANCELLED"
    assert run.error == client_py.RunError("ERR_CANCELLED", "enough")
    assert handle.run is run


async def test_wait_loops_until_paused(client: client_py.AsyncEngineClient, fake: FakeEngine) -> None:
    handle = await client.attach("r1")
    run = await handle.wait()
    assert run.paused
    assert fake.wait_timeouts == [60_000, 60_000, 60_000]


async def test_wait_goes_on_through_a_handoff(client: client_py.AsyncEngineClient, fake: FakeEngine) -> None:
    handle = await client.attach("handoff")
    run = await handle.wait()
    assert run.state == "DONE"
    assert len(fake.wait_timeouts) == 3


async def test_wait_honours_client_timeout(client: client_py.AsyncEngineClient, fake: FakeEngine) -> None:
    handle = await client.attach("slow")
    run = await handle.wait(timeout=0.3)
    assert run.state == "RUNNING"
    assert all(t <= 300 for t in fake.wait_timeouts)
    assert len(fake.wait_timeouts) >= 1


async def test_list_runs_follows_pages(client: client_py.AsyncEngineClient, fake: FakeEngine) -> None:
    runs = [r async for r in client.list_runs(states=["paused"], labels={"team": "a"}, page_size=2)]
    assert [r.run_id for r in runs] == ["r0", "r1", "r2", "r3", "r4"]
    assert fake.calls["ListRuns"] == 3


async def test_recover_orphaned_runs(client: client_py.AsyncEngineClient) -> None:
    assert await client.recover_orphaned_runs() == ["a", "b"]


async def test_thread_calls(client: client_py.AsyncEngineClient, fake: FakeEngine) -> None:
    thread = await client.get_thread("t1")
    assert (thread.thread_id, thread.run_ids, thread.forked_from) == ("t1", ["a", "b"], None)
    assert [t async for t in client.list_threads(labels={"x": "y"}, page_size=5)] == []
    assert await client.thread("t1").delete(force=True) == ["a", "b"]
    await client.delete_run("a")
    report = await client.apply_retention(dry_run=True)
    assert report.dry_run
    assert {name: fake.calls[name] for name in ("GetThread", "ListThreads", "DeleteThread", "DeleteRun")} == {
        "GetThread": 1,
        "ListThreads": 1,
        "DeleteThread": 1,
        "DeleteRun": 1,
    }


def test_fork_and_thread_options_are_checked_before_sending() -> None:
    spec = client_py._spec.build_run_spec("x", thread_id="t1", fork_from={"run_id": "r1", "seq": 7})
    assert (spec.thread_id, spec.fork_from.run_id, spec.fork_from.seq) == ("t1", "r1", 7)
    assert client_py._spec.build_run_spec("x", fork_from="r1").fork_from.WhichOneof("point") is None
    with pytest.raises(client_py.InvalidRequestError):
        client_py._spec.build_run_spec("x", fork_from={"run_id": "r1", "turn": 1, "seq": 2})
    with pytest.raises(client_py.InvalidRequestError):
        client_py._spec.build_run_spec("x", fork_from={"run_id": "r1", "page": 1})
    with pytest.raises(client_py.InvalidRequestError):
        client_py._spec.build_run_spec("x", fork_from=3)  # type: ignore[arg-type]


def test_sync_thread_handle(sync_client: client_py.EngineClient) -> None:
    chat = sync_client.thread("t1")
    assert chat.get().run_ids == ["a", "b"]
    assert sync_client.delete_thread("t1") == ["a", "b"]


async def test_unreachable_server_is_unavailable() -> None:
    # Port 1 on loopback is closed; no ErrorInfo can come back.
    async with client_py.AsyncEngineClient("127.0.0.1:1", max_retries=0, call_timeout=10) as client:
        with pytest.raises(client_py.UnavailableError) as info:
            await client.get_run("r")
    assert info.value.code == "UNAVAILABLE"


async def test_retry_policy_sets_the_attempts(target: str, fake: FakeEngine) -> None:
    policy = client_py.RetryPolicy(max_attempts=2, initial_backoff=0.0)
    async with client_py.AsyncEngineClient(target, api_key=API_KEY, retry=policy) as client:
        with pytest.raises(client_py.UnavailableError):
            await client.get_run("down")
        assert fake.calls["GetRun"] == 2
        # A call that could act twice is never retried, whatever the policy.
        await client.recover_orphaned_runs()
        assert fake.calls["RecoverOrphanedRuns"] == 1


async def test_retry_policy_retries_only_its_codes(target: str, fake: FakeEngine) -> None:
    default = client_py.RetryPolicy(max_attempts=3, initial_backoff=0.0)
    async with client_py.AsyncEngineClient(target, api_key=API_KEY, retry=default) as client:
        with pytest.raises(client_py.ResourceExhaustedError):
            await client.get_run("busy")
    assert fake.calls["GetRun"] == 1
    busy = client_py.RetryPolicy(
        max_attempts=3, initial_backoff=0.0, retryable=(grpc.StatusCode.RESOURCE_EXHAUSTED,)
    )
    async with client_py.AsyncEngineClient(target, api_key=API_KEY, retry=busy) as client:
        with pytest.raises(client_py.ResourceExhaustedError):
            await client.get_run("busy")
        with pytest.raises(client_py.UnavailableError):
            await client.get_run("down")
    assert fake.calls["GetRun"] == 1 + 3 + 1


async def test_max_retries_is_a_shorthand(target: str, fake: FakeEngine) -> None:
    async with client_py.AsyncEngineClient(target, api_key=API_KEY, max_retries=1) as client:
        with pytest.raises(client_py.UnavailableError):
            await client.get_run("down")
    assert fake.calls["GetRun"] == 2
    with pytest.raises(ValueError, match="not both"):
        client_py.AsyncEngineClient(target, max_retries=1, retry=client_py.RetryPolicy())
    with pytest.raises(ValueError, match="max_attempts"):
        client_py.RetryPolicy(max_attempts=0)


async def test_retry_policy_backoff_grows_to_its_cap() -> None:
    policy = client_py.RetryPolicy(initial_backoff=1.0, max_backoff=3.0, multiplier=2.0, jitter=0.0)
    assert [policy.backoff(n) for n in range(4)] == [1.0, 2.0, 3.0, 3.0]
    jittered = client_py.RetryPolicy(initial_backoff=1.0, jitter=0.5)
    assert all(0.5 <= jittered.backoff(0) <= 1.0 for _ in range(50))


async def test_a_per_call_timeout_overrides_the_clients(target: str) -> None:
    async with client_py.AsyncEngineClient(target, api_key=API_KEY, max_retries=0) as client:
        with pytest.raises(client_py.DeadlineExceededError):
            await client.get_run("stall", timeout=0.05)
        assert (await client.get_run("stall")).run_id == "stall"  # the client's 60 s default
    async with client_py.AsyncEngineClient(
        target, api_key=API_KEY, max_retries=0, call_timeout=0.05
    ) as client:
        with pytest.raises(client_py.DeadlineExceededError):
            await client.get_run("stall")
        assert (await client.get_run("stall", timeout=30)).run_id == "stall"


async def test_metadata_reaches_the_server_with_the_authorization(
    client: client_py.AsyncEngineClient, fake: FakeEngine
) -> None:
    tag = [("x-request-tag", "nightly-42")]
    await client.get_run("r1", metadata=tag)
    handle = await client.attach("r1", metadata=tag)
    await handle.approve("i1", metadata=tag)
    [_ async for _ in client.list_runs(["PAUSED"], {"team": "a"}, page_size=2, metadata=tag)]
    run = await client.execute("t", metadata=tag).result()
    assert run.state == "PAUSED"
    seen = {name for name, md in fake.metadata if md.get("x-request-tag") == "nightly-42"}
    assert seen == {"GetRun", "ResumeRun", "ListRuns", "ExecuteRun"}
    assert all(md.get("authorization") == f"Bearer {API_KEY}" for _, md in fake.metadata)


async def test_metadata_cannot_replace_the_authorization(client: client_py.AsyncEngineClient) -> None:
    for key in ("authorization", "Authorization"):
        with pytest.raises(ValueError, match="api_key"):
            await client.get_run("r1", metadata=[(key, "Bearer other")])
    with pytest.raises(ValueError, match="pairs"):
        await client.get_run("r1", metadata=["x-a"])  # type: ignore[list-item]


def test_sync_client_takes_per_call_options(target: str, fake: FakeEngine) -> None:
    policy = client_py.RetryPolicy(max_attempts=2, initial_backoff=0.0)
    with client_py.EngineClient(target, api_key=API_KEY, retry=policy) as client:
        with pytest.raises(client_py.DeadlineExceededError):
            client.get_run("stall", timeout=0.05)
        client.get_run("r1", metadata=[("x-request-tag", "sync")])
        with pytest.raises(client_py.UnavailableError):
            client.get_run("down")
    assert fake.calls["GetRun"] == 1 + 1 + 2
    assert ("GetRun", "sync") in {(name, md.get("x-request-tag")) for name, md in fake.metadata}


# --- sync client ------------------------------------------------------------------


def test_sync_execute_and_events(sync_client: client_py.EngineClient, fake: FakeEngine) -> None:
    execution = sync_client.execute("hello")
    assert [e.seq for e in execution] == [1, 2, 3, 4]
    assert execution.run is not None
    assert execution.run.paused
    handle = sync_client.attach("r-stream")
    assert [e.seq for e in handle.events()] == [1, 2, 3, 4, 5, 6]
    assert fake.stream_requests == [(0, True), (3, True), (4, True)]


def test_sync_errors_and_handles(sync_client: client_py.EngineClient) -> None:
    with pytest.raises(client_py.RunNotFoundError):
        sync_client.get_run("missing")
    handle = sync_client.create("t")
    assert handle.run.state == "QUEUED"
    assert handle.approve("i1").state == "RUNNING"
    assert handle.cancel().state == "CANCELLED"
    assert handle.run.state == "CANCELLED"
    runs = sync_client.list_runs(states=["PAUSED"], labels={"team": "a"}, page_size=3)
    assert [r.run_id for r in runs] == ["r0", "r1", "r2", "r3", "r4"]
    assert sync_client.recover_orphaned_runs() == ["a", "b"]
    assert "RunHandle(Run(" in repr(handle)
    assert "<table" in handle._repr_html_()


def test_sync_iterator_can_stop_early(sync_client: client_py.EngineClient) -> None:
    handle = sync_client.attach("r-exec")
    with handle.events() as events:  # type: ignore[attr-defined]
        first = next(events)
    assert first.seq == 1
    # The client is still usable after abandoning a live stream.
    assert sync_client.get_run("r1").run_id == "r1"


async def test_sync_client_inside_running_event_loop(target: str) -> None:
    # As in Jupyter: a loop is running in this thread, and blocking calls still work.
    asyncio.get_running_loop()
    with client_py.EngineClient(target, api_key=API_KEY) as client:
        assert client.get_run("flaky").run_id == "flaky"
        run = client.execute("hello").result()
        assert run.paused
        assert client.attach("r1").wait().paused


def test_sync_client_close_is_idempotent(target: str) -> None:
    client = client_py.EngineClient(target, api_key=API_KEY)
    client.get_run("r1")
    client.close()
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.get_run("r1")
