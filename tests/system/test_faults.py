"""Fault injection end to end: real engine and runner processes killed with SIGKILL at
random points of multi-turn runs, an S3 server behind a fault-injecting proxy, a runner that is
down, a webhook receiver that is down.

Every run must end in a correct state with nothing lost or duplicated:

- the durable event log is gap-free (seqs 1..N), with one ``run_started`` and one final
  ``run_finished``; what a killed engine wrote past its last checkpoint (watchers may have seen
  it) stays in the log, marked undone by the recovered run's ``resumed`` event, and outside
  those undone ranges every assistant turn appears exactly once, in order;
- every tool call has exactly one result in the transcript; a call that completed ran exactly
  once (its side effect, a line appended to ``side.log`` in the run's directory, is there once);
  a call a crash interrupted is reported to the model as interrupted and ran at most once — no
  tool is re-run silently.

Each scenario draws its kill point (and its script, and its storage fault pattern) from
``random.Random(seed)``; a failure names the seed, so ``-k 'seed7'`` replays it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from client_py import (
    AssistantMessage,
    AsyncEngineClient,
    AsyncRunHandle,
    Resumed,
    RunEvent,
    RunFinished,
    ToolCallCompleted,
    ToolCallStarted,
)
from engine_service import LocalStorage, Storage
from engine_service.storage._protocol import Checkpoint
from engine_service.storage._s3 import S3Storage
from tests.conftest import ServerFactory, turn, undone_seqs
from tests.processes import EngineProcess, RunnerProcess, free_port
from tests.s3_server import FaultyProxy, new_bucket
from tests.webhook_receiver import Receiver, signed

pytestmark = pytest.mark.slow

SECRET = "runner-secret-for-fault-tests-93b1"
WEBHOOK_SECRET = "whsec-faults-0c4e1a"
ENGINE_SEEDS = range(10)
RUNNER_SEEDS = range(10, 16)
S3_SEEDS = range(16, 20)
INTERRUPTED = "interrupted by an engine crash"
TERMINAL = ("DONE", "FAILED", "CANCELLED")


# -- scripts and the history check ------------------------------------------------------------


@dataclass
class Plan:
    """A scripted multi-turn run whose every Bash call appends a unique marker to side.log."""

    script: list[dict[str, Any]]
    turns: int  # model turns, the final answer included
    markers: dict[str, str] = field(default_factory=dict)  # call_id -> marker


def make_plan(rng: random.Random, *, min_turns: int = 3, max_turns: int = 7) -> Plan:
    tool_turns = rng.randint(min_turns, max_turns)
    plan = Plan(script=[], turns=tool_turns + 1)
    for i in range(1, tool_turns + 1):
        calls = []
        for j in range(1, rng.randint(1, 2) + 1):
            marker = f"t{i}c{j}"
            # Some calls take a while, so that kills land inside a tool call as well as between.
            tail = rng.choice(["", "", "; sleep 0.05", "; sleep 0.3"])
            calls.append(("Bash", {"command": f"echo {marker} >> side.log{tail}"}))
            plan.markers[f"call_{i}_{j}"] = marker
        plan.script.append(turn(f"turn {i}", *calls))
    plan.script.append(turn("all done"))
    return plan


@dataclass
class Outcome:
    events: list[RunEvent]
    interrupted: list[str]  # call ids reported to the model as interrupted
    resumed_by: list[str]


async def durable_events(client: AsyncEngineClient, run_id: str) -> list[RunEvent]:
    handle = await client.attach(run_id)
    return [e async for e in handle.events(follow=False)]


async def check_history(
    client: AsyncEngineClient,
    run_id: str,
    plan: Plan,
    store: Storage,
    workdir_root: Path,
    *,
    failed_attempts: int = 0,
) -> Outcome:
    """Assert the run ended DONE with nothing lost or duplicated (see the module docstring)."""
    run = await (await client.attach(run_id)).refresh()
    assert run.state == "DONE", run
    assert run.data == "all done"
    logged = await durable_events(client, run_id)
    assert [e.seq for e in logged] == list(range(1, len(logged) + 1)), "seqs are not gap-free 1..N"
    assert run.last_seq == len(logged), list(enumerate((e.kind for e in logged), start=1))
    undone = undone_seqs(logged)
    events = [e for e in logged if e.seq not in undone]
    kinds = [e.kind for e in events]
    assert [e.kind for e in logged if e.seq in undone].count("run_finished") == 0
    assert [e.kind for e in logged].count("run_started") <= 1
    # A kill before the first checkpoint undoes the run_started (or it was never written).
    if isinstance(events[0], Resumed):
        assert events[0].resumed_by == "recovery"
        assert "run_started" not in kinds
    else:
        assert kinds[0] == "run_started"
        assert kinds.count("run_started") == 1
    finished = [e for e in events if isinstance(e, RunFinished)]
    # A run that failed its runner handoff and was retried ended once FAILED before its final DONE.
    assert [f.state for f in finished] == ["FAILED"] * failed_attempts + ["DONE"]
    assert kinds[-1] == "run_finished"
    assistant_turns = [e.turn for e in events if isinstance(e, AssistantMessage)]
    assert assistant_turns == list(range(1, plan.turns + 1)), "an assistant turn was lost or repeated"
    assert run.meta.turns == plan.turns

    state = await store.read_state("default", run_id)
    assert state is not None
    assert state["last_seq"] == len(logged)
    transcript = await store.read_segments("default", run_id, "transcript", 0, state["transcript_len"])
    results = [d for d in transcript if d["role"] == "tool"]
    by_call = collections.Counter(d["call_id"] for d in results)
    assert sorted(by_call) == sorted(plan.markers), "a tool call has no result in the transcript"
    assert set(by_call.values()) == {1}, f"a tool call has several results: {by_call}"

    side = workdir_root / "default" / run_id / "side.log"
    lines = side.read_text().split() if side.exists() else []
    ran = collections.Counter(lines)
    assert set(ran) <= set(plan.markers.values()), ran
    assert all(n == 1 for n in ran.values()), f"a tool ran twice: {ran.most_common(3)}"
    started = collections.Counter(e.call.call_id for e in events if isinstance(e, ToolCallStarted))
    completed = collections.Counter(e.call_id for e in events if isinstance(e, ToolCallCompleted))
    assert all(n == 1 for n in started.values()), started
    assert all(n == 1 for n in completed.values()), completed

    interrupted = []
    for result in results:
        call_id, marker = result["call_id"], plan.markers[result["call_id"]]
        if INTERRUPTED in result["text"]:
            # Reported, not silently re-run: at most once, and its completion says interrupted.
            interrupted.append(call_id)
            assert result["is_error"]
            # If the dead engine got as far as announcing the call, that announcement was undone.
            assert all(
                e.seq in undone
                for e in logged
                if isinstance(e, ToolCallStarted) and e.call.call_id == call_id
            )
            assert ran[marker] <= 1
            (done,) = [e for e in events if isinstance(e, ToolCallCompleted) and e.call_id == call_id]
            assert done.outcome == "interrupted"
        else:
            assert not result["is_error"], result
            assert ran[marker] == 1, f"{call_id} ({marker}) completed but its side effect is missing"
            assert completed[call_id] == 1
    resumed_by = [e.resumed_by for e in events if isinstance(e, Resumed)]
    return Outcome(events, interrupted, resumed_by)


# -- process plumbing -------------------------------------------------------------------------


def base_env(tmp: Path, **extra: str) -> dict[str, str]:
    return {
        "MACHINA_STORAGE": str(tmp / "storage"),
        "MACHINA_WORKDIR_ROOT": str(tmp / "work"),
        "MACHINA_LEASE_TTL_S": "1",
        "MACHINA_RECOVERY_INTERVAL_S": "0.2",
        "MACHINA_MAX_TURNS": "100",
        "MACHINA_RUNNER_SECRET": SECRET,
        "MACHINA_RUNNER_TIMEOUT_S": "2",
        "MACHINA_EGRESS_ALLOW_HOSTS": "127.0.0.1",  # the webhook receivers listen on loopback
        **extra,
    }


async def wait_terminal(handle: AsyncRunHandle, timeout: float = 30) -> Any:
    """Wait until the run is DONE, FAILED or CANCELLED (a PAUSED HANDOFF_TO_RUNNER is transient)."""
    deadline = time.monotonic() + timeout
    run = await handle.wait(timeout=1)
    while run.state not in TERMINAL and time.monotonic() < deadline:
        if run.state == "PAUSED" and run.pause_reason != "HANDOFF_TO_RUNNER":
            break
        run = await handle.wait(timeout=1)
        if run.state == "PAUSED":
            await asyncio.sleep(0.05)
            run = await handle.refresh()
    return run


async def follow_until(handle: AsyncRunHandle, count: int, extra_delay: float) -> list[RunEvent]:
    """Watch live until ``count`` events were seen (or the run ended), then wait ``extra_delay``."""
    seen: list[RunEvent] = []
    async for event in handle.events(follow=True):
        seen.append(event)
        if len(seen) >= count:
            break
    await asyncio.sleep(extra_delay)
    return seen


# -- 1. kill -9 of the engine at random points --------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", ENGINE_SEEDS, ids=[f"seed{s}" for s in ENGINE_SEEDS])
async def test_engine_kill_9_at_a_random_point(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    plan = make_plan(rng)
    # A run emits ~5 events per tool turn; the kill lands anywhere from the first event to the end.
    kill_after = rng.randint(1, 5 * plan.turns)
    extra_delay = rng.choice([0.0, 0.0, 0.01, 0.05, 0.2])
    env = base_env(tmp_path)
    store = LocalStorage(tmp_path / "storage")
    engine = EngineProcess(tmp_path, env=env)
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create("side effects", model="scripted", script=plan.script)
            await follow_until(handle, kill_after, extra_delay)
    finally:
        engine.kill9()
    at_kill = await store.read_state("default", handle.run_id)
    assert at_kill is not None
    restarted = EngineProcess(tmp_path, env=env)
    try:
        async with AsyncEngineClient(restarted.target) as client:
            run = await wait_terminal(await client.attach(handle.run_id))
            assert run.state == "DONE", (seed, run)
            outcome = await check_history(client, handle.run_id, plan, store, tmp_path / "work")
    finally:
        restarted.close()
    if at_kill["state"] in TERMINAL:
        assert outcome.resumed_by == []
    else:
        assert outcome.resumed_by == ["recovery"], (seed, at_kill["state"], outcome.resumed_by)
    print(
        f"seed {seed}: killed after {kill_after} events (+{extra_delay}s) at committed seq "
        f"{at_kill['last_seq']} ({at_kill['state']}); interrupted {outcome.interrupted}"
    )


# -- 2. kill -9 of the runner at random points ---------------------------------------------------


def runner_env(tmp: Path) -> dict[str, str]:
    return base_env(tmp)


def handoff_engine(tmp: Path, runner_port: int) -> EngineProcess:
    env = base_env(
        tmp,
        MACHINA_CAPABILITIES_SUBPROCESS="false",
        MACHINA_RUNNER_URL=f"http://127.0.0.1:{runner_port}/continue",
    )
    return EngineProcess(tmp, env=env)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", RUNNER_SEEDS, ids=[f"seed{s}" for s in RUNNER_SEEDS])
async def test_runner_kill_9_at_a_random_point(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    plan = make_plan(rng)
    kill_after = rng.randint(0, 5 * plan.turns)
    extra_delay = rng.choice([0.0, 0.02, 0.1, 0.3])
    port = free_port()
    store = LocalStorage(tmp_path / "storage")
    runner = RunnerProcess(tmp_path / "runner-1", http_port=port, env=runner_env(tmp_path))
    engine = handoff_engine(tmp_path, port)
    retries = 0
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create("side effects", model="scripted", script=plan.script)
            # The engine hands the run to the runner at the first Bash call; the runner executes the
            # rest. Events from the runner reach this watcher through storage, so once the watcher
            # sees the runner's `resumed` the run is committed RUNNING. (A kill during the runner's
            # first tool call is test_runner_killed_in_its_first_tool_call_is_recovered below.)
            seen = 0
            async for event in handle.events(follow=True):
                if isinstance(event, Resumed) and event.resumed_by == "runner":
                    seen = 1
                elif seen:
                    seen += 1
                if (seen and seen > kill_after) or isinstance(event, RunFinished):
                    break
            await asyncio.sleep(extra_delay)
            runner.kill9()
            # Restart it at once: the engine's recovery sweep (or the new runner's) takes the run
            # over when the dead runner's lease expires; the next Bash call is handed off again.
            runner = RunnerProcess(tmp_path / "runner-2", http_port=port, env=runner_env(tmp_path))
            run = await wait_terminal(handle)
            while run.state == "FAILED" and run.error is not None and retries < 3:
                # The engine recovered the run and tried the handoff before the runner was back.
                assert run.error.code == "ERR_RUNNER_UNREACHABLE", run.error
                retries += 1
                await handle.retry_handoff()
                run = await wait_terminal(handle)
            assert run.state == "DONE", (seed, run)
            outcome = await check_history(
                client, handle.run_id, plan, store, tmp_path / "work", failed_attempts=retries
            )
    finally:
        engine.close()
        runner.close()
    assert set(outcome.resumed_by) <= {"runner", "recovery", "local-user"}
    print(
        f"seed {seed}: runner killed {kill_after} events after it resumed (+{extra_delay}s); "
        f"resumed by {outcome.resumed_by}; handoff retries {retries}; interrupted {outcome.interrupted}"
    )


@pytest.mark.timeout(40)
async def test_runner_killed_in_its_first_tool_call_is_recovered(tmp_path: Path) -> None:
    port = free_port()
    runner = RunnerProcess(tmp_path / "runner-1", http_port=port, env=runner_env(tmp_path))
    engine = handoff_engine(tmp_path, port)
    script = [turn("", ("Bash", {"command": "echo t1c1 >> side.log; sleep 30"})), turn("all done")]
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create("side effect", model="scripted", script=script)
            side = tmp_path / "work" / "default" / handle.run_id / "side.log"
            for _ in range(500):
                if side.exists():
                    break
                await asyncio.sleep(0.02)
            assert side.exists()
            runner.kill9()
            runner = RunnerProcess(tmp_path / "runner-2", http_port=port, env=runner_env(tmp_path))
            deadline = time.monotonic() + 5  # 5 lease lifetimes and 25 recovery sweeps
            run = await handle.refresh()
            while run.state not in TERMINAL and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                run = await handle.refresh()
            assert run.state == "DONE", f"stranded: {run.state} {run.pause_reason}"
            assert side.read_text() == "t1c1\n"  # reported interrupted, not re-run
    finally:
        engine.close()
        runner.close()


@pytest.mark.timeout(40)
async def test_engine_killed_during_an_approved_call_does_not_rerun_it(tmp_path: Path) -> None:
    env = base_env(tmp_path, MACHINA_TOOLS_PERMISSIONS="Bash=ask")
    script = [turn("", ("Bash", {"command": "echo t1c1 >> side.log; sleep 30"})), turn("all done")]
    engine = EngineProcess(tmp_path, env=env)
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create("side effect", model="scripted", script=script)
            run = await handle.wait(timeout=20)
            assert run.pause_reason == "AWAITING_APPROVAL"
            await handle.approve(run.interrupts[0].interrupt_id)
            side = tmp_path / "work" / "default" / handle.run_id / "side.log"
            for _ in range(500):
                if side.exists():
                    break
                await asyncio.sleep(0.02)
            assert side.exists()
    finally:
        engine.kill9()
    restarted = EngineProcess(tmp_path, env=env)
    try:
        async with AsyncEngineClient(restarted.target) as client:
            handle = await client.attach(handle.run_id)
            run = await wait_terminal(handle, timeout=10)
            if run.state == "PAUSED" and run.interrupts:
                # What a person does when the run asks again: approve. The tool must not run twice.
                await handle.approve(run.interrupts[0].interrupt_id)
                await handle.wait(timeout=5)
                await asyncio.sleep(0.3)
            assert side.read_text() == "t1c1\n", "the approved call ran twice"
            run = await handle.refresh()
            assert run.state in ("RUNNING", "DONE")
    finally:
        restarted.close()


# -- 3. storage faults: the engine on S3 behind a fault-injecting proxy -----------------------------


@pytest.fixture
async def s3_bucket(moto: str) -> AsyncIterator[tuple[str, S3Storage]]:
    bucket = await new_bucket(moto)
    clean = S3Storage(bucket, "machina", endpoint_url=moto)
    yield bucket, clean
    await clean.close()


@pytest.mark.timeout(75)
@pytest.mark.parametrize("seed", S3_SEEDS, ids=[f"seed{s}" for s in S3_SEEDS])
async def test_s3_faults_and_a_kill_9(
    tmp_path: Path, moto: str, s3_bucket: tuple[str, S3Storage], seed: int
) -> None:
    rng = random.Random(seed)
    bucket, clean = s3_bucket
    # A repeating pattern: mostly answered, with 5xx, throttling, slow answers and dropped connections.
    # (Each fault costs a botocore retry with up to ~1 s of backoff, so they are kept sparse.)
    pattern = ["ok"] * rng.randint(12, 16) + rng.sample(["500", "503", "drop", "slow"], k=rng.randint(1, 2))
    rng.shuffle(pattern)
    proxy = FaultyProxy(moto, pattern, delay=0.3)
    await proxy.start()
    plan = make_plan(rng, min_turns=2, max_turns=3)
    kill_after = rng.randint(1, 5 * plan.turns)
    env = base_env(
        tmp_path,
        MACHINA_STORAGE=f"s3://{bucket}/machina",
        AWS_ENDPOINT_URL=proxy.url,
        # Each sweep lists and reads every run: sweep less often, so most faults hit the run itself.
        MACHINA_RECOVERY_INTERVAL_S="0.5",
    )
    try:
        engine = EngineProcess(tmp_path, env=env)
        try:
            async with AsyncEngineClient(engine.target) as client:
                handle = await client.create("side effects", model="scripted", script=plan.script)
                await follow_until(handle, kill_after, 0.0)
        finally:
            engine.kill9()
        restarted = EngineProcess(tmp_path, env=env)
        try:
            async with AsyncEngineClient(restarted.target) as client:
                run = await wait_terminal(await client.attach(handle.run_id), timeout=45)
                assert run.state == "DONE", (seed, pattern, run)
                # Read back through a clean connection to the S3 server: nothing torn or lost.
                outcome = await check_history(client, handle.run_id, plan, clean, tmp_path / "work")
        finally:
            restarted.close()
    finally:
        await proxy.stop()
    injected = {k: v for k, v in proxy.counts.items() if k != "ok"}
    assert injected, "no fault was injected"
    print(f"seed {seed}: pattern {pattern}, injected {injected}, resumed by {outcome.resumed_by}")


# -- 4. runner outage, then retry_handoff ------------------------------------------------------


@pytest.mark.timeout(60)
async def test_runner_down_then_retry_handoff_after_it_is_back(tmp_path: Path) -> None:
    plan = make_plan(random.Random(100), min_turns=3, max_turns=3)
    port = free_port()  # nothing listens here yet
    store = LocalStorage(tmp_path / "storage")
    engine = handoff_engine(tmp_path, port)
    runner: RunnerProcess | None = None
    try:
        async with AsyncEngineClient(engine.target) as client:
            started = time.monotonic()
            handle = await client.create("side effects", model="scripted", script=plan.script)
            run = await wait_terminal(handle, timeout=15)
            assert time.monotonic() - started < 10, "the failed handoff took too long to surface"
            assert run.state == "FAILED"
            assert run.error is not None
            assert run.error.code == "ERR_RUNNER_UNREACHABLE"
            assert not (tmp_path / "work" / "default" / handle.run_id / "side.log").exists()
            # Retrying while the runner is still down fails the same way, cleanly.
            await handle.retry_handoff()
            run = await wait_terminal(handle, timeout=15)
            assert (run.state, run.error.code if run.error else "") == ("FAILED", "ERR_RUNNER_UNREACHABLE")
            runner = RunnerProcess(tmp_path / "runner", http_port=port, env=runner_env(tmp_path))
            await handle.retry_handoff()
            run = await wait_terminal(handle)
            assert run.state == "DONE", run
            outcome = await check_history(
                client, handle.run_id, plan, store, tmp_path / "work", failed_attempts=2
            )
    finally:
        engine.close()
        if runner is not None:
            runner.close()
    assert outcome.interrupted == []
    kinds = [e.kind for e in outcome.events]
    assert kinds.count("handoff_to_runner") == 3
    assert outcome.resumed_by.count("runner") == 1


# -- 5. webhook receiver outage -----------------------------------------------------------------


@pytest.fixture
def hook_port() -> int:
    return free_port()


@pytest.mark.timeout(45)
async def test_webhook_receiver_outage_is_retried_and_never_blocks_the_run(
    servers: ServerFactory, tmp_path: Path, hook_port: int
) -> None:
    srv = await servers.start(
        config={"webhook_secrets": {"hook": WEBHOOK_SECRET}, "egress_allow_hosts": ["127.0.0.1"]}
    )
    plan = make_plan(random.Random(200), min_turns=2, max_turns=2)
    webhook = {"url": f"http://127.0.0.1:{hook_port}/hook", "secret_ref": "hook"}
    receiver: Receiver | None = None
    try:
        async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
            started = time.monotonic()
            handle = await client.create("hooked", model="scripted", script=plan.script, webhook=webhook)
            run = await wait_terminal(handle, timeout=15)
            took = time.monotonic() - started
            assert run.state == "DONE"
            assert took < 5, f"the run waited for the webhook receiver ({took:.1f}s)"
            await asyncio.sleep(0.5)  # a few failed attempts while nobody listens
            receiver = Receiver(hook_port, statuses=(204,))
            await receiver.wait_for(1, timeout=20)
            assert len(receiver.requests) == 1, "the done notification was not delivered after the outage"
            storage = LocalStorage(tmp_path / "storage")
            await check_history(client, handle.run_id, plan, storage, tmp_path / "storage" / "workdirs")
            await asyncio.sleep(1.0)  # nothing more arrives: delivered exactly once
    finally:
        if receiver is not None:
            receiver.close()
    ((headers, body),) = receiver.requests
    assert headers["x-machina-event"] == "status.done"
    assert headers["x-machina-run-id"] == handle.run_id
    assert signed(WEBHOOK_SECRET, headers, body)
    assert json.loads(body)["state"] == "DONE"
    deliveries = await srv.engine.webhooks.deliveries("default", handle.run_id)
    assert len(deliveries) >= 2
    assert [d["ok"] for d in deliveries] == [False] * (len(deliveries) - 1) + [True]
    assert all(d["error"] for d in deliveries[:-1])  # connection refused, recorded per attempt
    assert len({d["delivery"] for d in deliveries}) == len(deliveries)  # a fresh UUID per attempt
    assert deliveries[-1]["delivery"] == headers["x-machina-delivery"]


@pytest.mark.timeout(40)
async def test_webhook_pending_at_a_crash_is_delivered_after_restart(tmp_path: Path, hook_port: int) -> None:
    env = base_env(tmp_path, MACHINA_WEBHOOK_SECRETS=f"hook={WEBHOOK_SECRET}")
    engine = EngineProcess(tmp_path, env=env)
    webhook = {"url": f"http://127.0.0.1:{hook_port}/hook", "secret_ref": "hook"}
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create("hooked", model="scripted", script=[turn("done")], webhook=webhook)
            assert (await wait_terminal(handle)).state == "DONE"
            await asyncio.sleep(0.3)  # the first delivery attempt failed: the receiver is down
    finally:
        engine.kill9()
    restarted = EngineProcess(tmp_path, env=env)
    receiver = Receiver(hook_port, statuses=(204,))
    try:
        await receiver.wait_for(1, timeout=6)
    finally:
        receiver.close()
        restarted.close()
    assert len(receiver.requests) == 1, "the done notification was lost in the crash"


# -- 6. a live watcher across a crash -----------------------------------------------------------


@pytest.mark.timeout(40)
async def test_a_live_watcher_reconnecting_after_a_crash_sees_the_durable_history(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    script = [turn("checking", ("Bash", {"command": "echo t1c1 >> side.log; sleep 30"})), turn("all done")]
    engine = EngineProcess(tmp_path, env=env)
    try:
        async with AsyncEngineClient(engine.target) as client:
            handle = await client.create("side effect", model="scripted", script=script)
            live: list[RunEvent] = []
            async for event in handle.events(follow=True):
                live.append(event)
                if isinstance(event, ToolCallStarted):
                    break
    finally:
        engine.kill9()
    restarted = EngineProcess(tmp_path, env=env)
    try:
        async with AsyncEngineClient(restarted.target) as client:
            handle = await client.attach(handle.run_id)
            assert (await wait_terminal(handle)).state == "DONE"
            # What the client does on reconnect: continue from the last seq it saw.
            later = [e async for e in handle.events(after_seq=live[-1].seq, follow=False)]
            durable = await durable_events(client, handle.run_id)
    finally:
        restarted.close()
    watched = [(e.seq, e.kind) for e in live + later]
    assert watched == [(e.seq, e.kind) for e in durable]
    # The recovered run says which of the events the watcher saw were undone by the crash.
    resumed = next(e for e in later if isinstance(e, Resumed))
    assert resumed.resumed_by == "recovery"
    assert 0 < resumed.rolled_back_from_seq <= live[-1].seq < resumed.seq


# -- 7. what GetRun reports while a run is being committed ------------------------------------------


class SlowCommitStorage(LocalStorage):
    """Local storage whose commit of a pause or an end takes a while (as on a slow object store)."""

    async def commit(self, ws: str, run_id: str, checkpoint: Checkpoint) -> None:
        if checkpoint.state["state"] in ("DONE", "PAUSED"):
            await asyncio.sleep(0.5)
        await super().commit(ws, run_id, checkpoint)


@pytest.mark.timeout(30)
async def test_get_run_never_reports_an_end_that_is_not_committed(tmp_path: Path) -> None:
    from engine_service import Engine, EngineConfig, ToolRegistry
    from engine_service.api._server import start_server
    from engine_service.core._catalogue import builtin_tools

    config = EngineConfig.model_validate({"storage": str(tmp_path), "workdir_root": str(tmp_path / "w")})
    storage = SlowCommitStorage(tmp_path)
    server = await start_server(
        Engine(config, storage, tools=ToolRegistry(builtin_tools(config))), "127.0.0.1:0"
    )
    try:
        async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
            handle = await client.create("x", model="scripted", script=[turn("all done")])
            run = await handle.refresh()
            while run.state not in TERMINAL:
                await asyncio.sleep(0.01)
                run = await handle.refresh()
            committed = await storage.read_state("default", handle.run_id)
            assert committed is not None
            assert (committed["state"], committed["last_seq"]) == (run.state, run.last_seq)
            await handle.wait(timeout=5)
    finally:
        await server.stop(1)
