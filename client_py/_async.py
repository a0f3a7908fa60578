"""The asyncio client: ``AsyncEngineClient``, ``AsyncExecution`` and ``AsyncRunHandle``.

Retry policy: only calls that cannot do anything twice are retried on
UNAVAILABLE (GetRun, ListRuns, WaitRun, GetThread, ListThreads; CreateRun when the
spec has a request_id; ResumeRun, which always carries one). Event streams (``events``,
and ``execute`` once its run has started) reconnect after UNAVAILABLE or a
dropped stream, with exponential backoff and jitter, for up to
``reconnect_deadline`` seconds without a new event (an engine restart or a
rolling deploy), and continue from the last seq they delivered, so a consumer
sees every event exactly once.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, TypedDict, Unpack

import grpc

from client_py import _render
from client_py._errors import InternalError, UnavailableError, error_from_rpc, refused
from client_py._retry import RetryPolicy
from client_py._spec import (
    Approve,
    DecisionLike,
    Reject,
    Respond,
    RunOptions,
    api_spec_into,
    build_run_spec,
    decision_to_proto,
    states_to_proto,
)
from client_py._tracing import client_span, with_trace_context
from client_py._types import (
    Paused,
    RetentionReport,
    Run,
    RunEvent,
    RunFinished,
    Thread,
    event_from_proto,
    run_from_proto,
    thread_from_proto,
)
from machina.engine.v1 import engine_service_pb2 as pb
from machina.engine.v1 import engine_service_pb2_grpc as pb_grpc

__all__ = ["AsyncEngineClient", "AsyncExecution", "AsyncRunHandle", "AsyncThreadHandle", "CallOptions"]


class CallOptions(TypedDict, total=False):
    """Per-call options of a unary method.

    - ``timeout``: the call's deadline in seconds, instead of the client's ``call_timeout``.
    - ``metadata``: extra ``(key, value)`` gRPC metadata, sent with the client's
      authorization (an ``authorization`` key of the caller's own is refused).
    """

    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None


# WaitRun is capped server-side; shorter chunks also keep idle proxies from
# cutting a silent connection.
_WAIT_CHUNK_S = 60.0
# How much longer than the server-side wait the RPC deadline may run.
_WAIT_DEADLINE_MARGIN_S = 30.0
_BACKOFF_BASE_S = 0.1
_BACKOFF_MAX_S = 2.0
DEFAULT_RECONNECT_DEADLINE_S = 60.0
# gRPC's own reconnect backoff grows to 120 s by default: after a long outage a channel
# would stay idle for minutes after the engine is back. Ours caps it near our own backoff.
_CHANNEL_DEFAULTS = (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000))

_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def _backoff(attempt: int) -> float:
    # Jitter spreads out clients that all lost the same server at once.
    return min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2.0**attempt) * random.uniform(0.5, 1.0)


class _Reconnects:
    """When a stream reconnects: backoff with jitter, until ``deadline`` s pass without an event."""

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline
        self._attempt = 0
        self._failing_since: float | None = None

    def progress(self) -> None:
        self._attempt, self._failing_since = 0, None

    def exhausted(self) -> bool:
        """Called on each failure: True once the stream has been failing for the whole deadline."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        return now - self._failing_since >= self._deadline

    async def pause(self) -> None:
        assert self._failing_since is not None
        left = self._failing_since + self._deadline - time.monotonic()
        await asyncio.sleep(max(0.0, min(_backoff(self._attempt), left)))
        self._attempt += 1


class AsyncEngineClient:
    """A connection to a Machina engine, for use inside one asyncio event loop.

    The gRPC channel is created on first use, inside the running loop, and stays
    bound to that loop; use one client per loop (``EngineClient`` does this for
    synchronous code). Use ``async with`` or call ``close()``.

    Args:
        target: ``host:port`` of the engine.
        api_key: sent as ``authorization: Bearer <api_key>`` on every call.
        tls: use TLS (implied by ``root_certificates``).
        root_certificates: PEM bytes of the CA to trust instead of the system's.
        channel_options: extra ``(name, value)`` gRPC channel options.
        retry: how idempotent unary calls are retried (``RetryPolicy``; default: UNAVAILABLE,
            4 attempts, backoff 0.1 s doubling up to 2 s, with jitter).
        max_retries: shorthand for ``retry=RetryPolicy(max_attempts=max_retries + 1)``.
        call_timeout: deadline in seconds of each unary call (None = no deadline).
        reconnect_deadline: how long, in seconds, an event stream keeps reconnecting
            (backoff with jitter, up to 2 s apart) while no new event arrives, e.g.
            through an engine restart; then it raises ``UnavailableError``. 0 = never.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        max_retries: int | None = None,
        call_timeout: float | None = 60.0,
        reconnect_deadline: float = DEFAULT_RECONNECT_DEADLINE_S,
        retry: RetryPolicy | None = None,
    ) -> None:
        if max_retries is not None and retry is not None:
            raise ValueError("pass retry= or max_retries=, not both")
        if retry is None:
            retry = RetryPolicy() if max_retries is None else RetryPolicy.retries(max_retries)
        if not reconnect_deadline >= 0:
            raise ValueError(f"reconnect_deadline must be >= 0, got {reconnect_deadline}")
        self.target = target
        self._tls = tls or root_certificates is not None
        self._root_certificates = root_certificates
        given = {name for name, _ in channel_options}
        self._channel_options = [*channel_options, *(o for o in _CHANNEL_DEFAULTS if o[0] not in given)]
        self._retry = retry
        self._reconnect_deadline = float(reconnect_deadline)
        self._call_timeout = call_timeout
        self._metadata: tuple[tuple[str, str], ...] | None = (
            (("authorization", f"Bearer {api_key}"),) if api_key else None
        )
        self._channel: Any = None
        self._stub_instance: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def __repr__(self) -> str:
        # Never the API key.
        return f"AsyncEngineClient(target={self.target!r}, tls={self._tls})"

    async def __aenter__(self) -> AsyncEngineClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; calls still in flight are cancelled."""
        self._closed = True
        channel, self._channel, self._stub_instance = self._channel, None, None
        if channel is not None:
            await channel.close()

    @property
    def _stub(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._stub_instance is None:
            if self._tls:
                credentials = grpc.ssl_channel_credentials(root_certificates=self._root_certificates)
                self._channel = grpc.aio.secure_channel(self.target, credentials, self._channel_options)
            else:
                self._channel = grpc.aio.insecure_channel(self.target, self._channel_options)
            self._stub_instance = pb_grpc.EngineServiceStub(self._channel)
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError(
                "this AsyncEngineClient is bound to the event loop it was first used in; "
                "create one client per loop, or use EngineClient from synchronous code"
            )
        return self._stub_instance

    def _call_metadata(self, extra: Sequence[tuple[str, str]] | None) -> tuple[tuple[str, str], ...] | None:
        """The client's authorization plus the caller's own ``(key, value)`` pairs."""
        if not extra:
            return self._metadata
        pairs = []
        for pair in extra:
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                raise ValueError(f"metadata must be (key, value) pairs of str, got {pair!r}")
            if pair[0].lower() == "authorization":
                raise ValueError(
                    "metadata must not carry 'authorization': pass api_key= to the client instead"
                )
            pairs.append((pair[0].lower(), pair[1]))
        return (*(self._metadata or ()), *pairs)

    async def _unary(
        self,
        method: str,
        request: Any,
        *,
        retry: bool,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> Any:
        call_metadata = self._call_metadata(metadata)
        attempt = 0
        with client_span(method) as span:
            call_metadata = with_trace_context(call_metadata)
            while True:
                try:
                    return await getattr(self._stub, method)(
                        request,
                        metadata=call_metadata,
                        timeout=self._call_timeout if timeout is None else timeout,
                    )
                except grpc.aio.AioRpcError as exc:
                    if retry and self._retry.should_retry(exc.code(), attempt):
                        await asyncio.sleep(self._retry.backoff(attempt))
                        attempt += 1
                        continue
                    if span is not None:
                        span.set_attribute("rpc.grpc.status_code", exc.code().value[0])
                    raise error_from_rpc(exc) from None

    # --- starting runs ------------------------------------------------------------

    def execute(
        self, task: str, *, metadata: Sequence[tuple[str, str]] | None = None, **options: Unpack[RunOptions]
    ) -> AsyncExecution:
        """Starts a run and streams its events until it pauses or ends.

        Iterate the returned ``AsyncExecution`` for typed events; afterwards
        ``execution.run`` is the final Run. ``await execution.result()`` drains it.
        The call starts on the first iteration; the options are validated now.
        """
        return AsyncExecution(self, build_run_spec(task, **options), self._call_metadata(metadata))

    async def create(
        self,
        task: str,
        *,
        call_timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
        **options: Unpack[RunOptions],
    ) -> AsyncRunHandle:
        """Starts a run in the background; retried on UNAVAILABLE only with a ``request_id``.

        ``timeout`` is the run's own limit (an option of the run); this call's deadline is
        ``call_timeout``.
        """
        spec = build_run_spec(task, **options)
        response: pb.CreateRunResponse = await self._unary(
            "CreateRun",
            pb.CreateRunRequest(spec=spec),
            retry=bool(spec.request_id),
            timeout=call_timeout,
            metadata=metadata,
        )
        return AsyncRunHandle(self, run_from_proto(response.run))

    async def attach(self, run_id: str, **call: Unpack[CallOptions]) -> AsyncRunHandle:
        """A handle on an existing run (e.g. after a kernel restart)."""
        return AsyncRunHandle(self, await self.get_run(run_id, **call))

    # --- reading runs -------------------------------------------------------------

    async def get_run(self, run_id: str, **call: Unpack[CallOptions]) -> Run:
        response: pb.GetRunResponse = await self._unary(
            "GetRun", pb.GetRunRequest(run_id=run_id), retry=True, **call
        )
        return run_from_proto(response.run)

    def list_runs(
        self,
        states: Sequence[str] | None = None,
        labels: Mapping[str, str] | None = None,
        page_size: int | None = None,
        **call: Unpack[CallOptions],
    ) -> AsyncIterator[Run]:
        """The workspace's runs, newest first, fetched page by page as you iterate.

        ``states`` are names such as ``"PAUSED"``; ``labels`` must all match.
        """
        request = pb.ListRunsRequest(states=states_to_proto(states))
        if labels is not None:
            request.labels.update(dict(labels))
        if page_size is not None:
            if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
                raise refused("ERR_INVALID_REQUEST", f"page_size must be a positive int, got {page_size!r}")
            request.page_size = page_size
        self._call_metadata(call.get("metadata"))  # refused now, not on the first iteration
        return self._list_runs(request, call)

    async def _list_runs(self, request: pb.ListRunsRequest, call: CallOptions) -> AsyncGenerator[Run, None]:
        while True:
            response: pb.ListRunsResponse = await self._unary("ListRuns", request, retry=True, **call)
            for run in response.runs:
                yield run_from_proto(run)
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    async def recover_orphaned_runs(self, **call: Unpack[CallOptions]) -> list[str]:
        """Resumes runs whose executor died; returns their ids."""
        response: pb.RecoverOrphanedRunsResponse = await self._unary(
            "RecoverOrphanedRuns", pb.RecoverOrphanedRunsRequest(), retry=False, **call
        )
        return list(response.run_ids)

    # --- threads, deletion, retention -----------------------------------------------

    def thread(self, thread_id: str | None = None) -> AsyncThreadHandle:
        """A handle on a thread (no call is made): each run it creates continues the thread's
        conversation. Without an id, a new thread with a fresh id."""
        return AsyncThreadHandle(self, thread_id or f"thread_{uuid.uuid4().hex}")

    async def get_thread(self, thread_id: str, **call: Unpack[CallOptions]) -> Thread:
        response: pb.GetThreadResponse = await self._unary(
            "GetThread", pb.GetThreadRequest(thread_id=thread_id), retry=True, **call
        )
        return thread_from_proto(response.thread)

    def list_threads(
        self,
        labels: Mapping[str, str] | None = None,
        page_size: int | None = None,
        **call: Unpack[CallOptions],
    ) -> AsyncIterator[Thread]:
        """The workspace's threads, newest first, fetched page by page; ``labels`` must all match."""
        request = pb.ListThreadsRequest()
        if labels is not None:
            request.labels.update(dict(labels))
        if page_size is not None:
            if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
                raise refused("ERR_INVALID_REQUEST", f"page_size must be a positive int, got {page_size!r}")
            request.page_size = page_size
        self._call_metadata(call.get("metadata"))
        return self._list_threads(request, call)

    async def _list_threads(
        self, request: pb.ListThreadsRequest, call: CallOptions
    ) -> AsyncGenerator[Thread, None]:
        while True:
            response: pb.ListThreadsResponse = await self._unary("ListThreads", request, retry=True, **call)
            for thread in response.threads:
                yield thread_from_proto(thread)
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    async def fork(
        self,
        from_run: str,
        task: str,
        *,
        turn: int | None = None,
        seq: int | None = None,
        **options: Unpack[RunOptions],
    ) -> AsyncRunHandle:
        """Starts a new thread from run ``from_run``'s history (up to ``turn`` or ``seq``; all of it
        by default) with ``task``; the original is left as it is."""
        merged: RunOptions = {**options, "fork_from": {"run_id": from_run, "turn": turn, "seq": seq}}
        return await self.create(task, **merged)

    async def delete_run(self, run_id: str, **call: Unpack[CallOptions]) -> None:
        """Deletes an ended run and everything it stored (RunActiveError while it is not ended,
        RunReferencedError while a later run of its thread or a fork shares its history)."""
        await self._unary("DeleteRun", pb.DeleteRunRequest(run_id=run_id), retry=False, **call)

    async def delete_thread(
        self, thread_id: str, *, force: bool = False, **call: Unpack[CallOptions]
    ) -> list[str]:
        """Deletes every run of a thread, then the thread; returns the run ids deleted. ``force``
        deletes it even where a fork shares its history (the fork loses that part)."""
        request = pb.DeleteThreadRequest(thread_id=thread_id, force=force)
        response: pb.DeleteThreadResponse = await self._unary("DeleteThread", request, retry=False, **call)
        return list(response.run_ids)

    async def apply_retention(self, *, dry_run: bool = False, **call: Unpack[CallOptions]) -> RetentionReport:
        """Applies the workspace's retention policy now; ``dry_run`` only lists what would go."""
        response: pb.ApplyRetentionResponse = await self._unary(
            "ApplyRetention", pb.ApplyRetentionRequest(dry_run=dry_run), retry=dry_run, **call
        )
        return RetentionReport(
            run_ids=list(response.run_ids),
            thread_ids=list(response.thread_ids),
            retention_days=response.retention_days,
            dry_run=response.dry_run,
        )

    # --- used by handles and executions -------------------------------------------

    async def _wait_run(
        self, run_id: str, seconds: float, metadata: Sequence[tuple[str, str]] | None = None
    ) -> tuple[Run, bool]:
        request = pb.WaitRunRequest(run_id=run_id, timeout_ms=max(1, round(seconds * 1000)))
        response: pb.WaitRunResponse = await self._unary(
            "WaitRun", request, retry=True, timeout=seconds + _WAIT_DEADLINE_MARGIN_S, metadata=metadata
        )
        return run_from_proto(response.run), response.timed_out

    async def _resume(
        self,
        run_id: str,
        decisions: Sequence[DecisionLike],
        request_id: str | None,
        *,
        allow_empty: bool = False,
        api: Mapping[str, Any] | None = None,
        call: CallOptions | None = None,
    ) -> Run:
        if not decisions and not allow_empty:
            raise refused("ERR_INVALID_DECISION", "resume needs at least one decision")
        request = pb.ResumeRunRequest(
            run_id=run_id,
            decisions=[decision_to_proto(d) for d in decisions],
            # A key of our own makes the retry safe: the server answers a repeat
            # with the first outcome instead of deciding twice.
            request_id=request_id or uuid.uuid4().hex,
        )
        if api is not None:
            api_spec_into(api, request.api)
        response: pb.ResumeRunResponse = await self._unary("ResumeRun", request, retry=True, **(call or {}))
        return run_from_proto(response.run)

    async def _cancel(self, run_id: str, reason: str, call: CallOptions) -> Run:
        response: pb.CancelRunResponse = await self._unary(
            "CancelRun", pb.CancelRunRequest(run_id=run_id, reason=reason), retry=False, **call
        )
        return run_from_proto(response.run)

    async def _events(
        self,
        run_id: str,
        after_seq: int,
        follow: bool,
        *,
        until_pause: bool = False,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> AsyncGenerator[RunEvent, None]:
        """``metadata`` is the whole call metadata (``_call_metadata``'s result); None = the client's."""
        metadata = with_trace_context(metadata or self._metadata)
        last = after_seq
        reconnects = _Reconnects(self._reconnect_deadline)
        while True:
            call = self._stub.StreamRunEvents(
                pb.StreamRunEventsRequest(run_id=run_id, after_seq=last, follow=follow),
                metadata=metadata,
            )
            try:
                async for response in call:
                    for proto in response.events:
                        # A server may replay a little after a reconnect; never repeat.
                        if proto.seq <= last:
                            continue
                        event = event_from_proto(proto)
                        last = event.seq
                        reconnects.progress()
                        yield event
                        # Without follow the server ends the stream after what exists now:
                        # a run retried after failing has more events past its first end.
                        ended = follow and isinstance(event, RunFinished)
                        if ended or (until_pause and isinstance(event, Paused)):
                            return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != _UNAVAILABLE or reconnects.exhausted():
                    raise error_from_rpc(exc) from None
            else:
                if not follow:
                    return
                # A follow stream only ends by itself once the run has ended (or its server
                # stopped); if the end of the run is already behind us, so is the stream.
                try:
                    response = await self._stub.GetRun(
                        pb.GetRunRequest(run_id=run_id), metadata=metadata, timeout=self._call_timeout
                    )
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != _UNAVAILABLE or reconnects.exhausted():
                        raise error_from_rpc(exc) from None
                else:
                    run = run_from_proto(response.run)
                    if run.done and run.last_seq <= last:
                        return
                    if reconnects.exhausted():
                        raise UnavailableError(
                            "UNAVAILABLE",
                            f"the event stream of run {run_id} kept ending before the run did",
                            metadata={"run_id": run_id, "last_seq": str(last)},
                        )
            finally:
                call.cancel()
            await reconnects.pause()


class AsyncExecution:
    """The events of an ``execute`` call, as an async iterator, then the final Run.

    ``run`` is None until the stream has ended. If the connection drops after the
    run has started, the events continue through StreamRunEvents from the last
    seq, up to the pause or the end, so nothing is lost.
    """

    def __init__(
        self,
        client: AsyncEngineClient,
        spec: pb.RunSpec,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> None:
        self._client = client
        self._spec = spec
        self._metadata = metadata or client._metadata
        self.run: Run | None = None
        self.last_seq = 0
        self.run_id: str | None = spec.run_id or None
        self._stream: AsyncGenerator[RunEvent, None] | None = None

    def __repr__(self) -> str:
        return f"AsyncExecution(run_id={self.run_id!r}, last_seq={self.last_seq}, run={self.run!r})"

    def __aiter__(self) -> AsyncExecution:
        return self

    async def __anext__(self) -> RunEvent:
        if self._stream is None:
            self._stream = self._events()
        return await self._stream.__anext__()

    async def result(self) -> Run:
        """Consumes the remaining events and returns the Run as it paused or ended."""
        async for _ in self:
            pass
        if self.run is None:
            raise RuntimeError("the execution was closed before it finished")
        return self.run

    async def aclose(self) -> None:
        """Stops streaming (the run itself goes on; cancel it through a handle)."""
        if self._stream is not None:
            await self._stream.aclose()

    @property
    def handle(self) -> AsyncRunHandle:
        """A handle on the run, once the stream has ended (``run`` is set)."""
        if self.run is None:
            raise RuntimeError("the execution has not finished yet; iterate it or await result() first")
        return AsyncRunHandle(self._client, self.run)

    def _seen(self, event: RunEvent) -> RunEvent:
        self.run_id = event.run_id or self.run_id
        self.last_seq = max(self.last_seq, event.seq)
        return event

    async def _events(self) -> AsyncGenerator[RunEvent, None]:
        client = self._client
        call = client._stub.ExecuteRun(
            pb.ExecuteRunRequest(spec=self._spec), metadata=with_trace_context(self._metadata)
        )
        stopped = False  # saw the pause or the end the stream stops at
        try:
            async for response in call:
                for proto in response.events:
                    event = self._seen(event_from_proto(proto))
                    stopped = stopped or isinstance(event, Paused | RunFinished)
                    yield event
                if response.HasField("run"):
                    self.run = run_from_proto(response.run)
        except grpc.aio.AioRpcError as exc:
            # Before the first event the run may not exist; restarting it is not ours to do.
            if exc.code() != _UNAVAILABLE or self.run_id is None or self.last_seq == 0:
                raise error_from_rpc(exc) from None
        finally:
            call.cancel()
        if self.run is not None:
            return
        if self.run_id is None:
            raise InternalError("ERR_INTERNAL", "ExecuteRun ended without any event or run")
        if not stopped:
            async for event in client._events(
                self.run_id, self.last_seq, True, until_pause=True, metadata=self._metadata
            ):
                yield self._seen(event)
        self.run = await client.get_run(self.run_id)


class AsyncRunHandle:
    """Controls one run. Every method returns the updated Run and stores it in ``run``."""

    def __init__(self, client: AsyncEngineClient, run: Run) -> None:
        self._client = client
        self.run = run

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def __repr__(self) -> str:
        return f"AsyncRunHandle({self.run!r})"

    def __str__(self) -> str:
        return str(self.run)

    def _repr_html_(self) -> str:
        return _render.handle_html(type(self).__name__, self.run)

    def _update(self, run: Run) -> Run:
        self.run = run
        return run

    async def refresh(self, **call: Unpack[CallOptions]) -> Run:
        return self._update(await self._client.get_run(self.run_id, **call))

    async def wait(
        self, timeout: float | None = None, *, metadata: Sequence[tuple[str, str]] | None = None
    ) -> Run:
        """Waits until the run is paused for the caller or ended, or ``timeout`` seconds pass.

        A run handed to a runner is waited through: it is not the caller's to act on.

        Returns the Run either way; check ``run.paused``/``run.done``.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            chunk = _WAIT_CHUNK_S if deadline is None else min(_WAIT_CHUNK_S, deadline - loop.time())
            if chunk <= 0:
                return await self.refresh(metadata=metadata)
            run, timed_out = await self._client._wait_run(self.run_id, chunk, metadata)
            self._update(run)
            # A handoff pause is not the caller's to act on: the runner continues the run.
            if not timed_out or run.done or (run.paused and run.pause_reason != "HANDOFF_TO_RUNNER"):
                return run
            if deadline is not None and loop.time() >= deadline:
                return run

    def events(
        self, after_seq: int = 0, follow: bool = True, *, metadata: Sequence[tuple[str, str]] | None = None
    ) -> AsyncIterator[RunEvent]:
        """Events with seq > ``after_seq``; with ``follow`` it stays live until the run ends.

        Reconnects after UNAVAILABLE or a dropped stream from the last seq seen.
        """
        full = self._client._call_metadata(metadata)
        return self._client._events(self.run_id, after_seq, follow, metadata=full)

    async def resume(
        self,
        decisions: Iterable[DecisionLike] | DecisionLike,
        *,
        request_id: str | None = None,
        api: Mapping[str, Any] | None = None,
        **call: Unpack[CallOptions],
    ) -> Run:
        """Answers several interrupts at once.

        Each decision is an ``Approve(interrupt_id, edits=None)``,
        ``Reject(interrupt_id, reason="")`` or ``Respond(interrupt_id, output)``,
        or a dict ``{"interrupt_id": ..., "action": "approve"|"reject"|"respond",
        "edits"|"reason"|"output": ...}`` (or with the action as its key:
        ``{"interrupt_id": ..., "approve": True, "edits": {...}}``,
        ``{"interrupt_id": ..., "respond": output}``). A single decision needs no list.
        ``request_id`` defaults to a fresh key, which makes the retry on
        UNAVAILABLE safe.
        """
        if isinstance(decisions, Approve | Reject | Respond | Mapping):
            batch: list[DecisionLike] = [decisions]
        else:
            batch = list(decisions)
        return self._update(await self._client._resume(self.run_id, batch, request_id, api=api, call=call))

    async def approve(
        self, interrupt_id: str, edits: Mapping[str, Any] | None = None, **call: Unpack[CallOptions]
    ) -> Run:
        """Approves a tool call; ``edits`` replaces its arguments."""
        return await self.resume(Approve(interrupt_id, edits), **call)

    async def reject(self, interrupt_id: str, reason: str = "", **call: Unpack[CallOptions]) -> Run:
        return await self.resume(Reject(interrupt_id, reason), **call)

    async def respond(self, interrupt_id: str, output: Any, **call: Unpack[CallOptions]) -> Run:
        """Supplies a tool result or an answer (any JSON value)."""
        return await self.resume(Respond(interrupt_id, output), **call)

    async def answer(self, interrupt_id: str, text: str, **call: Unpack[CallOptions]) -> Run:
        """Answers the model's question (an INPUT interrupt) with text."""
        if not isinstance(text, str):
            raise refused(
                "ERR_INVALID_DECISION",
                f"answer takes a str, got {type(text).__name__}; use respond() for JSON",
            )
        return await self.respond(interrupt_id, text, **call)

    async def retry_handoff(self, **call: Unpack[CallOptions]) -> Run:
        """Hands a run to its runner again: after ERR_RUNNER_UNREACHABLE or ERR_RUNNER_LOST, or at once
        while it waits for a runner that has not taken it."""
        return self._update(await self._client._resume(self.run_id, [], None, allow_empty=True, call=call))

    async def tool_result(self, call_id: str, **call: Unpack[CallOptions]) -> str:
        """The full text of a tool result the model saw truncated (stored by the engine)."""
        parts: list[str] = []
        offset = 0
        while True:
            request = pb.GetToolResultRequest(run_id=self.run_id, call_id=call_id, offset=offset)
            response = await self._client._unary("GetToolResult", request, retry=True, **call)
            parts.append(response.content)
            if not response.next_offset:
                return "".join(parts)
            offset = response.next_offset

    async def cancel(self, reason: str = "", **call: Unpack[CallOptions]) -> Run:
        """Cancels the run at its next await point or, at the latest, when it pauses.

        Returns the run once it has ended (CANCELLED, or the end it reached first); a run
        another process moves is followed for up to 10 s, and may still be RUNNING then.
        """
        return self._update(await self._client._cancel(self.run_id, reason, call))

    # --- conversations ----------------------------------------------------------------

    async def follow_up(self, task: str, **options: Unpack[RunOptions]) -> AsyncRunHandle:
        """Starts the next run of this run's thread: the model sees the conversation so far,
        then ``task``. Raises ThreadBusyError while a run of the thread is not ended."""
        merged: RunOptions = {**options, "thread_id": self.run.thread_id or self.run_id}
        return await self._client.create(task, **merged)

    async def fork(
        self,
        task: str,
        *,
        turn: int | None = None,
        seq: int | None = None,
        **options: Unpack[RunOptions],
    ) -> AsyncRunHandle:
        """Starts a new thread from this run's history (up to ``turn`` or ``seq``; all of it by
        default), sharing it without copying; this run's thread is left as it is."""
        return await self._client.fork(self.run_id, task, turn=turn, seq=seq, **options)

    async def delete(self, **call: Unpack[CallOptions]) -> None:
        """Deletes the run and everything it stored; afterwards it is not found anywhere."""
        await self._client.delete_run(self.run_id, **call)


class AsyncThreadHandle:
    """A conversation: every run it creates sees the thread's history, then its own task."""

    def __init__(self, client: AsyncEngineClient, thread_id: str) -> None:
        self._client = client
        self.thread_id = thread_id

    def __repr__(self) -> str:
        return f"AsyncThreadHandle({self.thread_id!r})"

    async def create(self, task: str, **options: Unpack[RunOptions]) -> AsyncRunHandle:
        """Starts the thread's next run (the first one starts the thread)."""
        merged: RunOptions = {**options, "thread_id": self.thread_id}
        return await self._client.create(task, **merged)

    def execute(
        self, task: str, *, metadata: Sequence[tuple[str, str]] | None = None, **options: Unpack[RunOptions]
    ) -> AsyncExecution:
        """Starts the thread's next run and streams its events (see ``AsyncEngineClient.execute``)."""
        merged: RunOptions = {**options, "thread_id": self.thread_id}
        return self._client.execute(task, metadata=metadata, **merged)

    async def get(self, **call: Unpack[CallOptions]) -> Thread:
        return await self._client.get_thread(self.thread_id, **call)

    async def runs(self, **call: Unpack[CallOptions]) -> list[Run]:
        """The thread's runs, oldest first."""
        thread = await self.get(**call)
        return [await self._client.get_run(run_id, **call) for run_id in thread.run_ids]

    async def events(self, **call: Unpack[CallOptions]) -> AsyncIterator[RunEvent]:
        """The thread's event history: its runs' events, run after run (each run's seq is its own)."""
        thread = await self.get(**call)
        for run_id in thread.run_ids:
            async for event in self._client._events(
                run_id, 0, False, metadata=self._client._call_metadata(call.get("metadata"))
            ):
                yield event

    async def delete(self, *, force: bool = False, **call: Unpack[CallOptions]) -> list[str]:
        """Deletes every run of the thread, then the thread; returns the run ids deleted."""
        return await self._client.delete_thread(self.thread_id, force=force, **call)
