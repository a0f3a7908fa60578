"""The seams between processes: waits through handoffs, stranded handoffs, resumes that hand off,
read-your-writes and cancels across replicas, one end per run, truthful creates.

Real engine and runner processes (kill -9 where a process dies), a tiny HTTP server as a runner
that accepts and never continues, and two replicas on one moto bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from aiohttp import web

from client_py import (
    AsyncEngineClient,
    RunFinished,
    RunNotPausedError,
    RunTerminalError,
    ToolCallCompleted,
    ToolCallStarted,
)
from tests.conftest import turn
from tests.processes import EngineProcess, RunnerProcess, free_port
from tests.runner.test_runner import BASH_SCRIPT, engine_for, shared_env, stub_runner
from tests.s3_server import FaultyProxy, new_bucket

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

# Stranded handoffs are found fast: the sweep runs every 0.1 s, the first deadline is 0.5 s.
FAST_HANDOFF = {
    "MACHINA_RUNNER_TIMEOUT_S": "10",  # a loaded test machine must not turn a slow 202 into a failure
    "MACHINA_RECOVERY_INTERVAL_S": "0.1",
    "MACHINA_HANDOFF_DEADLINE_S": "0.5",
    "MACHINA_HANDOFF_ATTEMPTS": "3",
    "MACHINA_LEASE_TTL_S": "2",
}


async def wait_for_log(process: RunnerProcess | EngineProcess, text: str, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while text not in process.log.read_text(errors="replace"):
        assert loop.time() < deadline, f"{text!r} not logged: {process.log.read_text()}"
        await asyncio.sleep(0.02)


async def tool_outputs(client: AsyncEngineClient, run_id: str) -> list[str]:
    handle = await client.attach(run_id)
    return [e.output async for e in handle.events(follow=False) if isinstance(e, ToolCallCompleted)]


# -- 1. waiting through a handoff ---------------------------------------------------------------


class _Forwarder(BaseHTTPRequestHandler):
    """A runner front that queues: answers 202 at once and forwards the POST a moment later."""

    target: ClassVar[str] = ""
    delay: ClassVar[float] = 1.0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        headers = {"Authorization": self.headers.get("authorization", ""), "Content-Type": "application/json"}
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

        def later() -> None:
            time.sleep(self.delay)
            with contextlib.suppress(httpx.HTTPError):  # the runner may be gone at the test's end
                httpx.post(self.target, content=body, headers=headers, timeout=10)

        threading.Thread(target=later, daemon=True).start()

    def log_message(self, *args: object) -> None:
        return None


@contextlib.contextmanager
def queueing_front(target: str, delay: float) -> Iterator[str]:
    handler = type("Front", (_Forwarder,), {"target": target, "delay": delay})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/continue"
    finally:
        server.shutdown()
        server.server_close()


async def test_wait_goes_on_while_the_runner_queues_the_run(tmp_path: Path) -> None:
    runner = RunnerProcess(tmp_path, env=shared_env(tmp_path))
    with queueing_front(f"{runner.http}/continue", delay=1.0) as url:
        engine = engine_for(tmp_path, url, MACHINA_RUNNER_TIMEOUT_S="10")
        try:
            async with AsyncEngineClient(engine.target) as client:
                handle = await client.create("run a command", model="scripted", script=BASH_SCRIPT)
                run = await handle.wait(timeout=30)
                assert (run.state, run.data) == ("DONE", "It printed hello-from-runner."), run
                # WaitRun itself (not only the client's loop) waits through the handoff.
                other = await client.create("again", model="scripted", script=BASH_SCRIPT)
                raw, timed_out = await client._wait_run(other.run_id, 30)
                assert (raw.state, timed_out) == ("DONE", False), raw
        finally:
            engine.close()
            runner.close()


async def test_a_runner_that_queues_accepted_runs_is_waited_through(tmp_path: Path) -> None:
    runner = RunnerProcess(tmp_path, env=shared_env(tmp_path, MACHINA_TEST_RUNNER_HOLD_S="1"))
    engine = engine_for(tmp_path, f"{runner.http}/continue", MACHINA_RUNNER_TIMEOUT_S="10")
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create("run a command", model="scripted", script=BASH_SCRIPT)
            run = await handle.wait(timeout=30)
            assert (run.state, run.data) == ("DONE", "It printed hello-from-runner."), run
    finally:
        engine.close()
        runner.close()


# -- 2. no stranded handoffs ----------------------------------------------------------------


async def test_a_runner_that_accepts_and_never_continues_is_asked_again_then_the_run_fails(
    tmp_path: Path,
) -> None:
    stub, url = stub_runner("accept")
    port = stub.server_address[1]
    engine = engine_for(tmp_path, url, **FAST_HANDOFF)
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create("run", model="scripted", script=BASH_SCRIPT)
            run = await handle.wait(timeout=60)
            assert run.state == "FAILED", run
            assert run.error is not None
            assert run.error.code == "ERR_RUNNER_LOST"
            assert len(stub.RequestHandlerClass.posts) == 3  # type: ignore[attr-defined]  # 1 + 2 again
            # A runner that works appears on that address: retrying hands the run off again.
            stub.shutdown()
            stub.server_close()
            runner = RunnerProcess(tmp_path / "runner", http_port=port, env=shared_env(tmp_path))
            try:
                await handle.retry_handoff()
                run = await handle.wait(timeout=30)
                assert (run.state, run.data) == ("DONE", "It printed hello-from-runner."), run
                outputs = await tool_outputs(client, run.run_id)
                assert len(outputs) == 1
                assert "hello-from-runner" in outputs[0]
            finally:
                runner.close()
    finally:
        engine.close()
        stub.shutdown()
        stub.server_close()


async def test_retry_handoff_asks_again_at_once_for_a_run_no_runner_took(tmp_path: Path) -> None:
    stub, url = stub_runner("accept")
    engine = engine_for(tmp_path, url, MACHINA_RUNNER_TIMEOUT_S="10")  # deadline 30 s: the sweep waits
    posts: list[bytes] = stub.RequestHandlerClass.posts  # type: ignore[attr-defined]
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create("run", model="scripted", script=BASH_SCRIPT)
            run, timed_out = await client._wait_run(handle.run_id, 1.0)
            assert (run.pause_reason, timed_out) == ("HANDOFF_TO_RUNNER", True), run
            assert len(posts) == 1
            await handle.retry_handoff()
            for _ in range(200):
                if len(posts) == 2:
                    break
                await asyncio.sleep(0.02)
            assert len(posts) == 2
            run = await handle.refresh()
            assert (run.state, run.pause_reason) == ("PAUSED", "HANDOFF_TO_RUNNER")
    finally:
        engine.close()
        stub.shutdown()
        stub.server_close()


async def test_a_runner_killed_after_accepting_does_not_strand_the_run(tmp_path: Path) -> None:
    port = free_port()
    queueing = RunnerProcess(
        tmp_path / "r1", http_port=port, env=shared_env(tmp_path, MACHINA_TEST_RUNNER_HOLD_S="60")
    )
    # The replacement runner takes seconds to start on a loaded machine: enough attempts that one
    # comes after it serves (the waits double from 0.5 s: 15.5 s in all).
    patient = FAST_HANDOFF | {"MACHINA_HANDOFF_ATTEMPTS": "6"}
    engine = engine_for(tmp_path, f"http://127.0.0.1:{port}/continue", **patient)
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create("run", model="scripted", script=BASH_SCRIPT)
            await wait_for_log(queueing, "queued run")
            # Killed once its 202 reached the engine (it logs before it answers): accepted, then lost.
            await wait_for_log(engine, "handed off to the runner")
            queueing.kill9()
            runner = RunnerProcess(tmp_path / "r2", http_port=port, env=shared_env(tmp_path))
            try:
                run = await handle.wait(timeout=60)
                assert (run.state, run.data) == ("DONE", "It printed hello-from-runner."), run
                assert len(await tool_outputs(client, run.run_id)) == 1
            finally:
                runner.close()
    finally:
        engine.close()
        queueing.close()


async def test_an_engine_killed_between_the_handoff_commit_and_its_post_does_not_strand_the_run(
    tmp_path: Path,
) -> None:
    runner = RunnerProcess(tmp_path, env=shared_env(tmp_path))
    # The first engine's POST goes to a socket that accepts connections and never reads: the
    # pause is committed, the runner never hears of the run, and the engine dies meanwhile.
    blackhole = socket.create_server(("127.0.0.1", 0))
    hole = f"http://127.0.0.1:{blackhole.getsockname()[1]}/continue"
    first = engine_for(tmp_path, hole, MACHINA_RUNNER_TIMEOUT_S="60")
    second = None
    try:
        async with AsyncEngineClient(first.target) as client:
            handle = await client.create("run", model="scripted", script=BASH_SCRIPT)
            run, timed_out = await client._wait_run(handle.run_id, 1.0)
            assert (run.pause_reason, timed_out) == ("HANDOFF_TO_RUNNER", True), run
        first.kill9()
        second = engine_for(tmp_path, f"{runner.http}/continue", **FAST_HANDOFF)
        async with AsyncEngineClient(second.target) as client:
            handle = await client.attach(run.run_id)
            run = await handle.wait(timeout=60)
            assert (run.state, run.data) == ("DONE", "It printed hello-from-runner."), run
            assert len(await tool_outputs(client, run.run_id)) == 1
    finally:
        first.close()
        if second is not None:
            second.close()
        runner.close()
        blackhole.close()


# -- 3. a resumed run hands off ----------------------------------------------------------------


async def test_a_run_started_with_execute_then_resumed_hands_its_next_call_to_the_runner(
    tmp_path: Path,
) -> None:
    runner = RunnerProcess(tmp_path, env=shared_env(tmp_path))
    engine = engine_for(
        tmp_path,
        f"{runner.http}/continue",
        MACHINA_TOOLS_PERMISSIONS="Bash=ask",
        MACHINA_RUNNER_TIMEOUT_S="10",
    )
    try:
        async with AsyncEngineClient(engine.target) as client:
            run = await client.execute("run a command", model="scripted", script=BASH_SCRIPT).result()
            assert (run.state, run.pause_reason) == ("PAUSED", "AWAITING_APPROVAL"), run
            handle = await client.attach(run.run_id)
            await handle.approve(run.interrupts[0].interrupt_id)
            run = await handle.wait(timeout=30)
            assert (run.state, run.data) == ("DONE", "It printed hello-from-runner."), run
            assert run.meta.capabilities_missing == []
            outputs = await tool_outputs(client, run.run_id)
            assert len(outputs) == 1
            assert "hello-from-runner" in outputs[0]
    finally:
        engine.close()
        runner.close()


# -- replicas on one bucket ----------------------------------------------------------------------


@pytest.fixture
async def replicas(tmp_path: Path, moto: str) -> AsyncIterator[tuple[EngineProcess, EngineProcess]]:
    env = await bucket_env(tmp_path, moto)
    a = EngineProcess(tmp_path / "a", env=env)
    b = EngineProcess(tmp_path / "b", env=env)
    yield a, b
    a.close()
    b.close()


async def bucket_env(tmp_path: Path, moto: str) -> dict[str, str]:
    bucket = await new_bucket(moto)
    return {
        "MACHINA_STORAGE": f"s3://{bucket}/machina",
        "AWS_ENDPOINT_URL": moto,
        "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
        "MACHINA_WORKDIR_ROOT": str(tmp_path / "work"),
        "MACHINA_LEASE_TTL_S": "3",
        "MACHINA_TOOLS_CUSTOM": "tests.tools:double,tests.tools:sleep",
        "MACHINA_TOOLS_PERMISSIONS": "double=ask",
    }


DOUBLE = [turn("", ("double", {"x": 21})), turn("42")]


# -- 5. read-your-writes across replicas ---------------------------------------------------------


async def test_a_run_resumed_on_one_replica_is_never_older_on_the_other(
    replicas: tuple[EngineProcess, EngineProcess],
) -> None:
    a, b = replicas
    async with AsyncEngineClient(a.target) as ca, AsyncEngineClient(b.target) as cb:
        for _ in range(6):
            handle = await ca.create("double", model="scripted", script=DOUBLE)
            paused = await handle.wait(timeout=20)
            assert paused.state == "PAUSED"
            resumed = await handle.approve(paused.interrupts[0].interrupt_id)
            seen = await cb.get_run(paused.run_id)
            assert resumed.state != "PAUSED"
            assert seen.state != "PAUSED", seen
            assert seen.last_seq >= resumed.last_seq
            assert (await handle.wait(timeout=20)).state == "DONE"


# -- 6. a cancel is never lost and never late ---------------------------------------------------


async def test_a_cancel_on_one_replica_of_a_run_that_then_pauses_on_the_other_is_applied_at_the_pause(
    replicas: tuple[EngineProcess, EngineProcess],
) -> None:
    a, b = replicas
    script = [turn("", ("sleep", {"seconds": 0.05})), turn("", ("double", {"x": 1})), turn("never")]
    async with AsyncEngineClient(a.target) as ca, AsyncEngineClient(b.target) as cb:
        for attempt in range(3):
            handle = await cb.create(f"pauses soon {attempt}", model="scripted", script=script)
            async for event in handle.events(follow=True):
                if event.kind == "tool_call_started":
                    break
            other = await ca.attach(handle.run_id)
            answered = await other.cancel("stop from replica a")
            assert answered.state == "CANCELLED", answered
            run = await handle.refresh()
            assert run.state == "CANCELLED", run
            assert run.error is not None
            assert "replica a" in run.error.message
            with pytest.raises(RunNotPausedError):
                await handle.approve(f"int_{attempt}")  # whatever it was: nothing is paused now
            events = [e async for e in handle.events(follow=False)]
            assert sum(e.kind == "run_finished" for e in events) == 1
            started = [e.call.tool_name for e in events if isinstance(e, ToolCallStarted)]
            assert started == ["sleep"]


# -- 7. one end per run -----------------------------------------------------------------------


async def test_a_cancel_racing_the_end_of_a_run_never_makes_a_second_end(
    replicas: tuple[EngineProcess, EngineProcess],
) -> None:
    a, b = replicas
    script = [turn("", ("sleep", {"seconds": 0.3})), turn("finished")]
    rng = random.Random(7)

    async def one(ca: AsyncEngineClient, cb: AsyncEngineClient, index: int) -> None:
        handle = await cb.create(f"race {index}", model="scripted", script=script)
        watched = []
        async for event in handle.events(follow=True):
            watched.append(event)
            if event.kind == "tool_call_started":
                break
        await asyncio.sleep(0.2 + rng.random() * 0.4)  # around the end commit
        with contextlib.suppress(RunTerminalError):  # it ended first: that is the end
            await (await ca.attach(handle.run_id)).cancel("late cancel")
        watched += [e async for e in handle.events(after_seq=watched[-1].seq, follow=True)]
        run = await handle.wait(timeout=30)
        ends = [e for e in watched if isinstance(e, RunFinished)]
        assert len(ends) == 1, [e.kind for e in watched]
        assert ends[0].state == run.state
        stored = [e async for e in handle.events(follow=False) if e.kind == "run_finished"]
        assert len(stored) == 1

    async with AsyncEngineClient(a.target) as ca, AsyncEngineClient(b.target) as cb:
        await asyncio.gather(*(one(ca, cb, i) for i in range(20)))


# -- 8. a create is answered truthfully -------------------------------------------------------------


class LeaseDelayProxy(FaultyProxy):
    """In front of the S3 server: every request for a run's lease answers ``delay`` s late."""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/lease.json"):
            await asyncio.sleep(self.delay)
        return await self._forward(request)


async def test_a_create_is_answered_truthfully_while_a_runner_sweeps(tmp_path: Path, moto: str) -> None:
    env = await bucket_env(tmp_path, moto)
    # The creator reaches its lease slowly; the runner sweeps (directly on the server) all the time.
    proxy = LeaseDelayProxy(moto, ["ok"], delay=0.5)
    await proxy.start()
    sweeping = {"MACHINA_RUNNER_SECRET": "s" * 20, "MACHINA_RECOVERY_INTERVAL_S": "0.01"}
    runner = RunnerProcess(tmp_path / "runner", env={**env, **sweeping})
    engine = EngineProcess(tmp_path / "engine", env={**env, "AWS_ENDPOINT_URL": proxy.url})
    try:
        async with AsyncEngineClient(engine.target) as client:
            for index in range(3):
                handle = await client.create(f"fresh {index}", model="scripted", script=[turn("hi")])
                assert handle.run.state in ("RUNNING", "DONE"), handle.run
                run = await handle.wait(timeout=20)
                assert (run.state, run.data) == ("DONE", "hi"), run
                events = [e async for e in handle.events(follow=False)]
                assert [e.kind for e in events].count("run_started") == 1
    finally:
        engine.close()
        runner.close()
        await proxy.stop()
