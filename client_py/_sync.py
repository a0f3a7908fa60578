"""The synchronous client: a thin layer over the async one.

Every call is sent to a private event loop running in a daemon thread, so the
sync client also works where an event loop is already running in the calling
thread (Jupyter): it never touches that loop. All behaviour (retries,
reconnects, conversions) lives in ``_async``; this module only bridges.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Mapping, Sequence
from typing import Any, Self, TypeVar, Unpack

from client_py import _render
from client_py._async import (
    DEFAULT_RECONNECT_DEADLINE_S,
    AsyncEngineClient,
    AsyncExecution,
    AsyncRunHandle,
    AsyncThreadHandle,
    CallOptions,
)
from client_py._retry import RetryPolicy
from client_py._spec import DecisionLike, RunOptions
from client_py._types import RetentionReport, Run, RunEvent, Thread

__all__ = ["EngineClient", "Execution", "RunHandle", "ThreadHandle"]

T = TypeVar("T")


class _Portal:
    """An event loop in a daemon thread, and a way to run coroutines on it."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="machina-client-loop", daemon=True
        )
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a sync Machina client cannot be called from its own event loop thread")
        if self._loop.is_closed() or not self._loop.is_running():
            coro.close()
            raise RuntimeError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            # KeyboardInterrupt (a notebook's "interrupt kernel") must stop the
            # RPC too, not leave it running in the background.
            future.cancel()
            raise

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        if self._loop.is_running():
            self.call(self._loop.shutdown_asyncgens())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()


async def _next(source: AsyncIterator[T]) -> T:
    return await source.__anext__()


class _SyncIterator(Iterator[T]):
    """Pulls one item at a time from an async iterator on the portal's loop."""

    def __init__(self, client: EngineClient, source: AsyncIterator[T]) -> None:
        # Holding the client keeps its loop thread alive while we are in use.
        self._client = client
        self._portal = client._portal
        self._source = source

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> T:
        try:
            return self._portal.call(_next(self._source))
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        """Stops the underlying stream now rather than when garbage-collected."""
        aclose = getattr(self._source, "aclose", None)
        if aclose is not None:
            self._portal.call(aclose())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _shutdown(portal: _Portal, client: AsyncEngineClient) -> None:
    try:
        portal.call(client.close())
    finally:
        portal.stop()


class EngineClient:
    """The synchronous counterpart of ``AsyncEngineClient`` (same arguments and methods).

    Use ``with EngineClient(...) as client:`` or call ``close()``.
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
        self._async = AsyncEngineClient(
            target,
            api_key=api_key,
            tls=tls,
            root_certificates=root_certificates,
            channel_options=channel_options,
            max_retries=max_retries,
            call_timeout=call_timeout,
            reconnect_deadline=reconnect_deadline,
            retry=retry,
        )
        self._portal = _Portal()
        # A forgotten client must not keep its thread and channel alive forever;
        # at interpreter exit the daemon thread simply ends with the process.
        self._finalizer = weakref.finalize(self, _shutdown, self._portal, self._async)
        self._finalizer.atexit = False

    @property
    def target(self) -> str:
        return self._async.target

    def __repr__(self) -> str:
        return f"EngineClient(target={self.target!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel and stops the client's thread; idempotent."""
        self._finalizer()

    def execute(
        self, task: str, *, metadata: Sequence[tuple[str, str]] | None = None, **options: Unpack[RunOptions]
    ) -> Execution:
        """Starts a run; iterate the result for events, then read ``.run`` (or call ``result()``)."""
        return Execution(self, self._async.execute(task, metadata=metadata, **options))

    def create(
        self,
        task: str,
        *,
        call_timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
        **options: Unpack[RunOptions],
    ) -> RunHandle:
        return RunHandle(
            self,
            self._portal.call(
                self._async.create(task, call_timeout=call_timeout, metadata=metadata, **options)
            ),
        )

    def attach(self, run_id: str, **call: Unpack[CallOptions]) -> RunHandle:
        return RunHandle(self, self._portal.call(self._async.attach(run_id, **call)))

    def get_run(self, run_id: str, **call: Unpack[CallOptions]) -> Run:
        return self._portal.call(self._async.get_run(run_id, **call))

    def list_runs(
        self,
        states: Sequence[str] | None = None,
        labels: Mapping[str, str] | None = None,
        page_size: int | None = None,
        **call: Unpack[CallOptions],
    ) -> Iterator[Run]:
        return _SyncIterator(self, self._async.list_runs(states, labels, page_size, **call))

    def recover_orphaned_runs(self, **call: Unpack[CallOptions]) -> list[str]:
        return self._portal.call(self._async.recover_orphaned_runs(**call))

    def thread(self, thread_id: str | None = None) -> ThreadHandle:
        """A handle on a thread (no call is made); without an id, a new thread with a fresh id."""
        return ThreadHandle(self, self._async.thread(thread_id))

    def get_thread(self, thread_id: str, **call: Unpack[CallOptions]) -> Thread:
        return self._portal.call(self._async.get_thread(thread_id, **call))

    def list_threads(
        self,
        labels: Mapping[str, str] | None = None,
        page_size: int | None = None,
        **call: Unpack[CallOptions],
    ) -> Iterator[Thread]:
        return _SyncIterator(self, self._async.list_threads(labels, page_size, **call))

    def fork(
        self,
        from_run: str,
        task: str,
        *,
        turn: int | None = None,
        seq: int | None = None,
        **options: Unpack[RunOptions],
    ) -> RunHandle:
        return RunHandle(
            self, self._portal.call(self._async.fork(from_run, task, turn=turn, seq=seq, **options))
        )

    def delete_run(self, run_id: str, **call: Unpack[CallOptions]) -> None:
        self._portal.call(self._async.delete_run(run_id, **call))

    def delete_thread(self, thread_id: str, *, force: bool = False, **call: Unpack[CallOptions]) -> list[str]:
        return self._portal.call(self._async.delete_thread(thread_id, force=force, **call))

    def apply_retention(self, *, dry_run: bool = False, **call: Unpack[CallOptions]) -> RetentionReport:
        return self._portal.call(self._async.apply_retention(dry_run=dry_run, **call))


class Execution(_SyncIterator[RunEvent]):
    """The events of ``EngineClient.execute``; afterwards ``run`` is the final Run."""

    def __init__(self, client: EngineClient, execution: AsyncExecution) -> None:
        super().__init__(client, execution)
        self._execution = execution

    @property
    def run(self) -> Run | None:
        return self._execution.run

    @property
    def run_id(self) -> str | None:
        return self._execution.run_id

    @property
    def last_seq(self) -> int:
        return self._execution.last_seq

    @property
    def handle(self) -> RunHandle:
        return RunHandle(self._client, self._execution.handle)

    def result(self) -> Run:
        return self._portal.call(self._execution.result())

    def __repr__(self) -> str:
        return f"Execution(run_id={self.run_id!r}, last_seq={self.last_seq}, run={self.run!r})"


class RunHandle:
    """The synchronous counterpart of ``AsyncRunHandle``."""

    def __init__(self, client: EngineClient, handle: AsyncRunHandle) -> None:
        # Holding the client keeps its loop thread alive while we are in use.
        self._client = client
        self._portal = client._portal
        self._handle = handle

    @property
    def run_id(self) -> str:
        return self._handle.run_id

    @property
    def run(self) -> Run:
        """The last known Run."""
        return self._handle.run

    def __repr__(self) -> str:
        return f"RunHandle({self.run!r})"

    def __str__(self) -> str:
        return str(self.run)

    def _repr_html_(self) -> str:
        return _render.handle_html(type(self).__name__, self.run)

    def refresh(self, **call: Unpack[CallOptions]) -> Run:
        return self._portal.call(self._handle.refresh(**call))

    def wait(self, timeout: float | None = None, *, metadata: Sequence[tuple[str, str]] | None = None) -> Run:
        return self._portal.call(self._handle.wait(timeout, metadata=metadata))

    def events(
        self, after_seq: int = 0, follow: bool = True, *, metadata: Sequence[tuple[str, str]] | None = None
    ) -> Iterator[RunEvent]:
        return _SyncIterator(self._client, self._handle.events(after_seq, follow, metadata=metadata))

    def resume(
        self,
        decisions: Iterable[DecisionLike] | DecisionLike,
        *,
        request_id: str | None = None,
        api: Mapping[str, Any] | None = None,
        **call: Unpack[CallOptions],
    ) -> Run:
        return self._portal.call(self._handle.resume(decisions, request_id=request_id, api=api, **call))

    def approve(
        self, interrupt_id: str, edits: Mapping[str, Any] | None = None, **call: Unpack[CallOptions]
    ) -> Run:
        return self._portal.call(self._handle.approve(interrupt_id, edits, **call))

    def reject(self, interrupt_id: str, reason: str = "", **call: Unpack[CallOptions]) -> Run:
        return self._portal.call(self._handle.reject(interrupt_id, reason, **call))

    def respond(self, interrupt_id: str, output: Any, **call: Unpack[CallOptions]) -> Run:
        return self._portal.call(self._handle.respond(interrupt_id, output, **call))

    def answer(self, interrupt_id: str, text: str, **call: Unpack[CallOptions]) -> Run:
        return self._portal.call(self._handle.answer(interrupt_id, text, **call))

    def retry_handoff(self, **call: Unpack[CallOptions]) -> Run:
        """Hands a run to its runner again: after ERR_RUNNER_UNREACHABLE or ERR_RUNNER_LOST, or at once
        while it waits for a runner that has not taken it."""
        return self._portal.call(self._handle.retry_handoff(**call))

    def tool_result(self, call_id: str, **call: Unpack[CallOptions]) -> str:
        """The full text of a tool result the model saw truncated (stored by the engine)."""
        return self._portal.call(self._handle.tool_result(call_id, **call))

    def cancel(self, reason: str = "", **call: Unpack[CallOptions]) -> Run:
        return self._portal.call(self._handle.cancel(reason, **call))

    def follow_up(self, task: str, **options: Unpack[RunOptions]) -> RunHandle:
        """Starts the next run of this run's thread (see ``AsyncRunHandle.follow_up``)."""
        return RunHandle(self._client, self._portal.call(self._handle.follow_up(task, **options)))

    def fork(
        self, task: str, *, turn: int | None = None, seq: int | None = None, **options: Unpack[RunOptions]
    ) -> RunHandle:
        """Starts a new thread from this run's history (see ``AsyncRunHandle.fork``)."""
        return RunHandle(
            self._client, self._portal.call(self._handle.fork(task, turn=turn, seq=seq, **options))
        )

    def delete(self, **call: Unpack[CallOptions]) -> None:
        self._portal.call(self._handle.delete(**call))


class ThreadHandle:
    """The synchronous counterpart of ``AsyncThreadHandle``."""

    def __init__(self, client: EngineClient, handle: AsyncThreadHandle) -> None:
        self._client = client
        self._portal = client._portal
        self._handle = handle

    @property
    def thread_id(self) -> str:
        return self._handle.thread_id

    def __repr__(self) -> str:
        return f"ThreadHandle({self.thread_id!r})"

    def _repr_html_(self) -> str:
        return _render.thread_html(self.get())

    def create(self, task: str, **options: Unpack[RunOptions]) -> RunHandle:
        return RunHandle(self._client, self._portal.call(self._handle.create(task, **options)))

    def execute(
        self, task: str, *, metadata: Sequence[tuple[str, str]] | None = None, **options: Unpack[RunOptions]
    ) -> Execution:
        return Execution(self._client, self._handle.execute(task, metadata=metadata, **options))

    def get(self, **call: Unpack[CallOptions]) -> Thread:
        return self._portal.call(self._handle.get(**call))

    def runs(self, **call: Unpack[CallOptions]) -> list[Run]:
        return self._portal.call(self._handle.runs(**call))

    def events(self, **call: Unpack[CallOptions]) -> Iterator[RunEvent]:
        return _SyncIterator(self._client, self._handle.events(**call))

    def delete(self, *, force: bool = False, **call: Unpack[CallOptions]) -> list[str]:
        return self._portal.call(self._handle.delete(force=force, **call))
