"""Client streams ride through an engine restart: kill -9, a few seconds down, back on the same port.

Every watcher built on the client (async ``events``, the sync iterator, ``execute``, the notebook
view model's watcher) reconnects with backoff for up to ``reconnect_deadline`` and continues from
its last seq: it sees every event of the run exactly once, in order, and no error.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from client_py import AsyncEngineClient, EngineClient, RunEvent, UnavailableError
from client_py._view import RunViewModel, Watcher
from tests.conftest import turn
from tests.processes import EngineProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

DOUBLE = [turn("doubling", ("double", {"x": 21})), turn("42")]
# Down for longer than a few quick retries last (the old policy gave up after ~0.7 s).
DOWNTIME_S = 2.5


def engine_env(tmp: Path) -> dict[str, str]:
    return {
        "MACHINA_STORAGE": str(tmp / "storage"),
        "MACHINA_WORKDIR_ROOT": str(tmp / "work"),
        "MACHINA_LEASE_TTL_S": "1",
        "MACHINA_RECOVERY_INTERVAL_S": "0.2",
        "MACHINA_TOOLS_CUSTOM": "tests.tools:double,tests.tools:sleep",
        "MACHINA_TOOLS_PERMISSIONS": "double=ask",
    }


def restart(engine: EngineProcess, tmp: Path, port: int) -> EngineProcess:
    """kill -9 the engine, stay down for DOWNTIME_S, start it again on the same port."""
    engine.kill9()
    time.sleep(DOWNTIME_S)
    return EngineProcess(tmp, env=engine_env(tmp), port=port)


def assert_exactly_once(events: list[Any], durable: list[Any]) -> None:
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert [(e.seq, e.kind) for e in events] == [(e.seq, e.kind) for e in durable]
    assert events[-1].kind == "run_finished"


async def test_async_watcher_and_execute_ride_through_a_restart(tmp_path: Path) -> None:
    port = free_port()
    engine = EngineProcess(tmp_path, env=engine_env(tmp_path), port=port)
    try:
        async with AsyncEngineClient(engine.target) as client:  # default settings
            # A run paused for approval, watched live.
            handle = await client.create("double", model="scripted", script=DOUBLE)
            assert (await handle.wait(timeout=20)).state == "PAUSED"
            watched: list[RunEvent] = []

            async def watch() -> None:
                async for event in handle.events(follow=True):
                    watched.append(event)

            watcher = asyncio.create_task(watch())
            # A run started with execute, its stream cut in the middle of a tool call.
            execution = client.execute(
                "sleepy", model="scripted", script=[turn("napping", ("sleep", {"seconds": 1.5})), turn("up")]
            )
            executed: list[RunEvent] = []
            async for event in execution:
                executed.append(event)
                if event.kind == "tool_call_started":
                    break
            resumed_execution = asyncio.create_task(_drain(execution, executed))
            await asyncio.sleep(0.3)
            engine = await asyncio.to_thread(restart, engine, tmp_path, port)
            # The engine's recovery finishes the executed run; the paused one waits for us.
            # gRPC's reconnect backoff (up to 2 s) may still hold the channel: more unary retries.
            async with AsyncEngineClient(engine.target, max_retries=8) as fresh:
                run = await (await fresh.attach(handle.run_id)).approve(handle.run.interrupts[0].interrupt_id)
            await asyncio.wait_for(watcher, 30)
            final = await asyncio.wait_for(resumed_execution, 30)
            durable = [e async for e in handle.events(follow=False)]
            durable_exec = [e async for e in (await client.attach(final.run_id)).events(follow=False)]
        assert run.state in ("RUNNING", "DONE")
        assert_exactly_once(watched, durable)
        assert final.state == "DONE"
        assert_exactly_once(executed, durable_exec)
        # The stream continued the run; it did not start it again.
        assert sum(e.kind == "run_started" for e in executed) == 1
        assert any(e.kind == "resumed" for e in executed)
    finally:
        engine.close()


async def _drain(execution: Any, into: list[RunEvent]) -> Any:
    async for event in execution:
        into.append(event)
    return execution.run


def test_sync_iterator_and_view_model_ride_through_a_restart(tmp_path: Path) -> None:
    port = free_port()
    engine = EngineProcess(tmp_path, env=engine_env(tmp_path), port=port)
    try:
        with EngineClient(engine.target) as client:
            handle = client.create("double", model="scripted", script=DOUBLE)
            assert handle.wait(timeout=20).state == "PAUSED"
            watched: list[RunEvent] = []
            failed: list[BaseException] = []

            def watch() -> None:
                try:
                    watched.extend(handle.events(follow=True))
                except BaseException as exc:  # reported below
                    failed.append(exc)

            thread = threading.Thread(target=watch)
            thread.start()
            model = RunViewModel(handle.run, actions=handle)
            view_watcher = Watcher(handle, model).start()
            assert model.wait_for(lambda m: m.last_seq == handle.run.last_seq, timeout=20)
            engine = restart(engine, tmp_path, port)
            assert model.watching
            assert model.watch_error is None
            # The channel to the engine may still be in gRPC's reconnect backoff (up to 2 s): a unary
            # call needs more than the default 3 quick retries to ride that out.
            with EngineClient(engine.target, max_retries=8) as fresh:
                fresh.attach(handle.run_id).approve(handle.run.interrupts[0].interrupt_id)
            thread.join(30)
            assert view_watcher.join(30)
            durable = list(handle.events(follow=False))
        assert not failed, failed
        assert_exactly_once(watched, durable)
        assert model.watch_error is None
        assert model.state == "DONE"
        assert model.data == "42"
        assert model.last_seq == durable[-1].seq
        assert [entry.tool_name for entry in model.tool_log] == ["double"]
    finally:
        engine.close()


async def test_a_stream_gives_up_after_its_reconnect_deadline(tmp_path: Path) -> None:
    port = free_port()
    engine = EngineProcess(tmp_path, env=engine_env(tmp_path), port=port)
    try:
        async with AsyncEngineClient(engine.target, reconnect_deadline=1.0) as client:
            handle = await client.create("double", model="scripted", script=DOUBLE)
            assert (await handle.wait(timeout=20)).state == "PAUSED"
            stream = handle.events(follow=True)
            first = await stream.__anext__()
            engine.kill9()
            with pytest.raises(UnavailableError):
                async for _ in stream:
                    pass
        assert first.seq == 1
    finally:
        engine.close()
