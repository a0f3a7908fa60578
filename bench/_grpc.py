"""Measurements over gRPC against a real engine process (``python -m engine_service`` or ``bench.host``)."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import time
from pathlib import Path
from typing import cast

import grpc

from bench._common import (
    channel,
    proc_status_mb,
    scripted,
    start_engine,
    start_runner,
    stop_engine,
)
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import engine_service_pb2_grpc as svc_grpc
from machina.engine.v1 import run_pb2

DONE = run_pb2.RUN_STATE_DONE


async def _execute(stub: svc_grpc.EngineServiceStub, spec: svc.RunSpec) -> tuple[int, str, int]:
    """Drive one ExecuteRun to its end: (events seen, run id, final state)."""
    count, run_id, state = 0, "", 0
    async for response in stub.ExecuteRun(svc.ExecuteRunRequest(spec=spec)):
        count += len(response.events)
        if response.HasField("run"):
            run_id, state = response.run.run_id, response.run.state
    return count, run_id, state


async def scripted_events_per_second(target: str, n_events: int, repeats: int) -> dict[str, list[float]]:
    """Events/s over one stream with the scripted model: live ExecuteRun, then replay (StreamRunEvents).

    The scripted model never hands control back to the event loop, so the whole run
    (and its checkpoint) happens before the stream sends its first message.
    """
    text = "w " * (n_events - 5)  # one text_delta per word, plus ~5 lifecycle events
    out: dict[str, list[float]] = {"live": [], "replay": []}
    async with channel(target) as ch:
        stub = svc_grpc.EngineServiceStub(ch)
        for _ in range(repeats):
            spec = svc.RunSpec(
                task="stream", model=svc.ModelSpec(provider="scripted", script=[scripted(text)])
            )
            started = time.perf_counter()
            count, run_id, _ = await _execute(stub, spec)
            out["live"].append(count / (time.perf_counter() - started))
            count, started = 0, time.perf_counter()
            async for response in stub.StreamRunEvents(svc.StreamRunEventsRequest(run_id=run_id)):
                count += len(response.events)
            out["replay"].append(count / (time.perf_counter() - started))
    return out


def _burst_spec(n_events: int, burst: int) -> svc.RunSpec:
    return svc.RunSpec(
        task="stream", model=svc.ModelSpec(provider="openai", name=f"burst-{n_events}-{burst}")
    )


async def streamed_events_per_second(
    target: str, n_events: int, burst: int, streams: int, repeats: int
) -> list[float]:
    """Aggregate events/s of ``streams`` concurrent ExecuteRun calls whose model streams in bursts."""
    out = []
    async with channel(target) as ch:
        stub = svc_grpc.EngineServiceStub(ch)
        for _ in range(repeats):
            started = time.perf_counter()
            results = await asyncio.gather(
                *(_execute(stub, _burst_spec(n_events, burst)) for _ in range(streams))
            )
            elapsed = time.perf_counter() - started
            assert all(state == DONE for _, _, state in results)
            out.append(sum(count for count, _, _ in results) / elapsed)
    return out


async def token_latency_ms(target: str, chunks: int, interval_ms: float, repeats: int) -> list[float]:
    """Model adapter yields a delta → the client has it (ms), per text delta."""
    out: list[float] = []
    spec = svc.RunSpec(
        task="tokens", model=svc.ModelSpec(provider="openai", name=f"paced-{chunks}-{interval_ms:g}")
    )
    async with channel(target) as ch:
        stub = svc_grpc.EngineServiceStub(ch)
        for _ in range(repeats):
            async for response in stub.ExecuteRun(svc.ExecuteRunRequest(spec=spec)):
                seen = time.perf_counter_ns()
                for event in response.events:
                    if event.HasField("text_delta"):
                        out.append((seen - int(event.text_delta.text)) / 1e6)
    return out


async def approval_round_trips(target: str, repeats: int) -> list[float]:
    """ResumeRun sent → the watcher sees the next event (ms)."""
    results = []
    async with channel(target) as ch:
        stub = svc_grpc.EngineServiceStub(ch)
        for _ in range(repeats):
            script = [scripted("", [("double", {"x": 1})]), scripted("ok")]
            spec = svc.RunSpec(task="approve", model=svc.ModelSpec(provider="scripted", script=script))
            run = (await stub.CreateRun(svc.CreateRunRequest(spec=spec))).run
            run = (await stub.WaitRun(svc.WaitRunRequest(run_id=run.run_id, timeout_ms=10_000))).run
            watch = stub.StreamRunEvents(
                svc.StreamRunEventsRequest(run_id=run.run_id, after_seq=run.last_seq, follow=True)
            )
            first = asyncio.ensure_future(watch.read())
            await asyncio.sleep(0.01)  # the watcher is attached and idle
            started = time.perf_counter()
            decision = svc.Decision(interrupt_id=run.pause.interrupts[0].interrupt_id, approve=svc.Approve())
            await stub.ResumeRun(svc.ResumeRunRequest(run_id=run.run_id, decisions=[decision]))
            await first
            results.append((time.perf_counter() - started) * 1000)
            watch.cancel()
    return results


async def round_trip_ms(target: str, repeats: int) -> list[float]:
    """CreateRun of a one-Bash-step run → WaitRun sees DONE (ms)."""
    script = [scripted("", [("Bash", {"command": "true"})]), scripted("done")]
    results = []
    async with channel(target) as ch:
        stub = svc_grpc.EngineServiceStub(ch)
        for _ in range(repeats):
            started = time.perf_counter()
            spec = svc.RunSpec(task="handoff", model=svc.ModelSpec(provider="scripted", script=script))
            run = (await stub.CreateRun(svc.CreateRunRequest(spec=spec))).run
            while run.state not in (run_pb2.RUN_STATE_DONE, run_pb2.RUN_STATE_FAILED):
                run = (await stub.WaitRun(svc.WaitRunRequest(run_id=run.run_id, timeout_ms=30_000))).run
            results.append((time.perf_counter() - started) * 1000)
            assert run.state == DONE, run.error
    return results


async def handoff_round_trips(
    storage: Path, repeats: int, storage_url: str | None = None, env: dict[str, str] | None = None
) -> dict[str, list[float]]:
    """The same Bash-step run on an engine that hands off to a runner, and on one that runs it itself."""
    secret = secrets.token_urlsafe(16)
    runner, http_port = start_runner(storage, secret, env, storage_url)
    handoff_env = {"MACHINA_CAPABILITIES_SUBPROCESS": "false", "MACHINA_RUNNER_SECRET": secret,
                   "MACHINA_RUNNER_URL": f"http://127.0.0.1:{http_port}/continue", **(env or {})}  # fmt: skip
    try:
        engine, target, _ = start_engine(storage, handoff_env, storage_url)
        try:
            handoff = await round_trip_ms(target, repeats)
        finally:
            stop_engine(engine)
        engine, target, _ = start_engine(storage, env, storage_url)
        try:
            local = await round_trip_ms(target, repeats)
        finally:
            stop_engine(engine)
    finally:
        stop_engine(runner)
    return {"handoff": handoff, "local": local}


async def paused_runs_rss(proc: subprocess.Popen[bytes], target: str, runs: int) -> dict[str, float]:
    """RSS of the engine process idle, with ``runs`` runs paused for approval, and with one open
    follow stream per paused run (a client waiting on each)."""
    out = {"idle_mb": proc_status_mb(proc.pid, "VmRSS")}
    script = [scripted("", [("double", {"x": 1})]), scripted("ok")]
    spec = svc.RunSpec(task="pause", model=svc.ModelSpec(provider="scripted", script=script))
    async with channel(target) as ch:
        stub = svc_grpc.EngineServiceStub(ch)
        started = time.perf_counter()
        gate = asyncio.Semaphore(50)

        async def create() -> run_pb2.Run:
            async with gate:
                run = (await stub.CreateRun(svc.CreateRunRequest(spec=spec))).run
                while run.state != run_pb2.RUN_STATE_PAUSED:
                    run = (await stub.WaitRun(svc.WaitRunRequest(run_id=run.run_id, timeout_ms=30_000))).run
                return cast(run_pb2.Run, run)

        paused = await asyncio.gather(*(create() for _ in range(runs)))
        out["create_s"] = time.perf_counter() - started
        await asyncio.sleep(0.5)
        out["paused_mb"] = proc_status_mb(proc.pid, "VmRSS")
        # Each watcher gets the last event (PAUSED) at once, which proves it is attached, then idles.
        watches = [
            stub.StreamRunEvents(
                svc.StreamRunEventsRequest(run_id=r.run_id, after_seq=r.last_seq - 1, follow=True)
            )
            for r in paused
        ]
        await asyncio.gather(*(w.read() for w in watches))
        await asyncio.sleep(0.5)
        out["paused_watched_mb"] = proc_status_mb(proc.pid, "VmRSS")
        out["peak_mb"] = proc_status_mb(proc.pid, "VmHWM")
        for w in watches:
            w.cancel()
    return out


async def concurrent_runs(target: str, runs: int, turns: int) -> dict[str, float]:
    """``runs`` runs of ``turns`` scripted turns (no-op tool) at once: how many ended DONE, turns/s."""
    script = [scripted("step", [("noop", {})]) for _ in range(turns - 1)] + [scripted("done")]
    spec = svc.RunSpec(task="many", model=svc.ModelSpec(provider="scripted", script=script))
    async with channel(target) as ch:
        stub = svc_grpc.EngineServiceStub(ch)
        started = time.perf_counter()
        created = await asyncio.gather(
            *(stub.CreateRun(svc.CreateRunRequest(spec=spec)) for _ in range(runs))
        )
        states = []
        for response in created:
            run = response.run
            while run.state not in (DONE, run_pb2.RUN_STATE_FAILED, run_pb2.RUN_STATE_CANCELLED):
                run = (await stub.WaitRun(svc.WaitRunRequest(run_id=run.run_id, timeout_ms=60_000))).run
            states.append(run.state)
        elapsed = time.perf_counter() - started
    done = sum(s == DONE for s in states)
    return {
        "runs": runs,
        "done": done,
        "turns": turns,
        "seconds": elapsed,
        "turns_per_s": done * turns / elapsed,
    }


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def scripted_streams_per_second(
    target: str, streams: int, words: int, repeats: int, pids: list[int]
) -> dict[str, list[float]]:
    """Aggregate events/s of ``streams`` concurrent ExecuteRun calls of the scripted model, each on
    its own connection (so SO_REUSEPORT can spread them over engine processes), and each engine
    process's share of the CPU the engines spent."""
    spec = svc.RunSpec(
        task="streams", model=svc.ModelSpec(provider="scripted", script=[scripted("w " * words)])
    )
    out: dict[str, list[float]] = {"events_per_s": [], "cpu_share": []}
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(streams)]
    try:
        stubs = [svc_grpc.EngineServiceStub(ch) for ch in channels]
        await asyncio.gather(*(ch.channel_ready() for ch in channels))
        for _ in range(repeats):
            cpu = [_cpu_seconds(pid) for pid in pids]
            started = time.perf_counter()
            results = await asyncio.gather(*(_execute(stub, spec) for stub in stubs))
            elapsed = time.perf_counter() - started
            spent = [_cpu_seconds(pid) - before for pid, before in zip(pids, cpu, strict=True)]
            if any(state != DONE for _, _, state in results):
                raise RuntimeError("a stream's run did not end DONE")
            out["events_per_s"].append(sum(count for count, _, _ in results) / elapsed)
            out["cpu_share"].append(min(spent) / sum(spent) if sum(spent) else 0.0)
    finally:
        for ch in channels:
            await ch.close()
    return out
