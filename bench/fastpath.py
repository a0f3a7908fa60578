"""The durable fast path, measured through gRPC against real engine processes.

- **Per turn**: a run of N turns (turn 1 writes ``notes.txt``, each later turn but the last
  edits it with the built-in ``Edit`` tool, which is not idempotent, so the engine checkpoints
  around it; the last answers) against a 1-turn run, CreateRun → WaitRun sees DONE; per-turn
  cost is the difference over N-1 turns, so creating and finishing a run is left out. With
  fsync off and on (``MACHINA_FSYNC``), N = 10 and 1,000; the sizes and the two settings are
  interleaved repetition by repetition, median and spread reported.
- **Approval round trip**: a run paused for approval; ResumeRun sent → a watcher (already
  attached with StreamRunEvents follow) sees the next event; beside it GetRun of the same
  run, the fixed cost of any unary call.
- **Events/s**: 50 concurrent ExecuteRun streams whose model adapter streams text in bursts
  (``bench.host``), one engine process; then two engine processes on one port
  (``--reuse-port``) over one storage directory, each stream on a connection of its own.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from bench._common import ROOT, channel, engine_env, scripted, start_engine, stop_engine, wait_serving
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import engine_service_pb2_grpc as svc_grpc
from machina.engine.v1 import run_pb2

DONE = run_pb2.RUN_STATE_DONE
# The streaming adapter hands control to the event loop after every BURST chunks, as a
# network adapter does once it has parsed what one socket read brought.
BURST = 50
STREAMS = 50


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "p95": float("nan"), "n": 0}

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))]

    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "p95": rank(0.95),
            "n": len(ordered)}  # fmt: skip


def _row(name: str, value: str, target: str, met: bool | None, data: dict[str, Any]) -> dict[str, Any]:
    verdict = "REPORT" if met is None else ("MET" if met else "MISSED")
    return {"name": name, "value": value, "target": target, "verdict": verdict, "data": data}


def _error_row(name: str, exc: BaseException) -> dict[str, Any]:
    return {"name": name, "value": f"{type(exc).__name__}: {exc}"[:200], "target": "", "verdict": "ERROR",
            "data": {}}  # fmt: skip


# -- per turn ---------------------------------------------------------------------------------


def edit_script(turns: int) -> list[svc.ScriptedTurn]:
    script = []
    for k in range(1, turns):
        if k == 1:
            script.append(scripted("step", [("Write", {"path": "notes.txt", "content": "v0"})]))
        else:
            edit = {"path": "notes.txt", "old_string": f"v{k - 2}", "new_string": f"v{k - 1}"}
            script.append(scripted("step", [("Edit", edit)]))
    return [*script, scripted("done")]


async def _one_run(stub: svc_grpc.EngineServiceStub, turns: int) -> float:
    """Milliseconds from CreateRun to WaitRun answering DONE."""
    spec = svc.RunSpec(
        task="bench",
        model=svc.ModelSpec(provider="scripted", script=edit_script(turns)),
        limits=svc.RunLimits(max_turns=turns + 1),
    )
    started = time.perf_counter()
    run = (await stub.CreateRun(svc.CreateRunRequest(spec=spec))).run
    while run.state not in (DONE, run_pb2.RUN_STATE_FAILED, run_pb2.RUN_STATE_CANCELLED):
        run = (await stub.WaitRun(svc.WaitRunRequest(run_id=run.run_id, timeout_ms=120_000))).run
    elapsed = (time.perf_counter() - started) * 1000
    if run.state != DONE or run.meta.turns != turns:
        raise RuntimeError(
            f"a {turns}-turn run ended {run_pb2.RunState.Name(run.state)}: {run.error.message}"
        )
    return elapsed


def _start_fsync_engine(storage: Path, fsync: bool) -> tuple[subprocess.Popen[bytes], str, float]:
    storage.mkdir()
    env = {"MACHINA_FSYNC": "true" if fsync else "false", "MACHINA_MAX_TURNS": "100000"}
    return start_engine(storage, env)


async def per_turn_ms(sizes: tuple[int, ...], repeats: int) -> dict[str, dict[int, list[float]]]:
    """Per-turn ms by fsync setting and size: each repetition runs every (setting, size) once."""
    out: dict[str, dict[int, list[float]]] = {"off": {n: [] for n in sizes}, "on": {n: [] for n in sizes}}
    with tempfile.TemporaryDirectory() as tmp:
        engines: dict[str, tuple[subprocess.Popen[bytes], str, float]] = {}
        try:
            for setting in out:
                engines[setting] = _start_fsync_engine(Path(tmp, setting), setting == "on")
            async with channel(engines["off"][1]) as off, channel(engines["on"][1]) as on:
                stubs = {"off": svc_grpc.EngineServiceStub(off), "on": svc_grpc.EngineServiceStub(on)}
                for stub in stubs.values():  # warm-up: imports, caches, the first run directory
                    await _one_run(stub, 1)
                    await _one_run(stub, 10)
                for _ in range(repeats):
                    for n in sizes:
                        for setting, stub in stubs.items():
                            base = await _one_run(stub, 1)
                            whole = await _one_run(stub, n)
                            out[setting][n].append((whole - base) / (n - 1))
        finally:
            for proc, _, _ in engines.values():
                stop_engine(proc)
    return out


# -- approval round trip ----------------------------------------------------------------------


async def approval_ms(repeats: int, fsync: bool) -> dict[str, list[float]]:
    """ResumeRun sent → the watcher sees the next event; and GetRun of the same run (ms)."""
    out: dict[str, list[float]] = {"resume": [], "get": []}
    with tempfile.TemporaryDirectory() as tmp:
        proc, target, _ = start_engine(Path(tmp), {"MACHINA_FSYNC": "true" if fsync else "false"})
        try:
            async with channel(target) as ch:
                stub = svc_grpc.EngineServiceStub(ch)
                script = [scripted("", [("double", {"x": 1})]), scripted("ok")]
                spec = svc.RunSpec(task="approve", model=svc.ModelSpec(provider="scripted", script=script))
                for index in range(repeats + 2):  # two warm-ups
                    run = (await stub.CreateRun(svc.CreateRunRequest(spec=spec))).run
                    run = (await stub.WaitRun(svc.WaitRunRequest(run_id=run.run_id, timeout_ms=10_000))).run
                    started = time.perf_counter()
                    await stub.GetRun(svc.GetRunRequest(run_id=run.run_id))
                    get = (time.perf_counter() - started) * 1000
                    watch = stub.StreamRunEvents(
                        svc.StreamRunEventsRequest(run_id=run.run_id, after_seq=run.last_seq, follow=True)
                    )
                    first = asyncio.ensure_future(watch.read())
                    await asyncio.sleep(0.01)  # the watcher is attached and idle
                    decision = svc.Decision(
                        interrupt_id=run.pause.interrupts[0].interrupt_id, approve=svc.Approve()
                    )
                    started = time.perf_counter()
                    await stub.ResumeRun(svc.ResumeRunRequest(run_id=run.run_id, decisions=[decision]))
                    await first
                    resume = (time.perf_counter() - started) * 1000
                    watch.cancel()
                    await stub.WaitRun(svc.WaitRunRequest(run_id=run.run_id, timeout_ms=10_000))
                    if index >= 2:
                        out["resume"].append(resume)
                        out["get"].append(get)
        finally:
            stop_engine(proc)
    return out


# -- events/s ---------------------------------------------------------------------------------


def _start_host(
    storage: Path, name: str, listen: str, reuse_port: bool
) -> tuple[subprocess.Popen[bytes], str]:
    port_file = storage / f"{name}.port"
    port_file.unlink(missing_ok=True)
    args = [sys.executable, "-m", "bench.host", "--storage", str(storage), "--port-file", str(port_file),
            "--listen", listen, *(["--reuse-port"] if reuse_port else [])]  # fmt: skip
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=engine_env(storage)
    )
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"bench host {name} did not start")
        time.sleep(0.01)
    target = f"127.0.0.1:{port_file.read_text()}"
    try:
        wait_serving(target)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, target


async def _execute(stub: svc_grpc.EngineServiceStub, n_events: int) -> int:
    spec = svc.RunSpec(
        task="stream", model=svc.ModelSpec(provider="openai", name=f"burst-{n_events}-{BURST}")
    )
    count, state = 0, run_pb2.RUN_STATE_UNSPECIFIED
    async for response in stub.ExecuteRun(svc.ExecuteRunRequest(spec=spec)):
        count += len(response.events)
        if response.HasField("run"):
            state = response.run.state
    if state != DONE:
        raise RuntimeError(f"a streaming run ended {run_pb2.RunState.Name(state)}")
    return count


async def events_per_second(target: str, per_stream: int, repeats: int) -> list[float]:
    """Aggregate events/s of STREAMS concurrent ExecuteRun calls, each on a connection of its
    own (a local subchannel pool: grpc would otherwise share one connection between them)."""
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(STREAMS)]
    try:
        stubs = [svc_grpc.EngineServiceStub(ch) for ch in channels]
        await asyncio.gather(*(_execute(stub, 10) for stub in stubs))  # connect and warm up
        out = []
        for _ in range(repeats):
            started = time.perf_counter()
            counts = await asyncio.gather(*(_execute(stub, per_stream) for stub in stubs))
            out.append(sum(counts) / (time.perf_counter() - started))
        return out
    finally:
        for ch in channels:
            await ch.close()


async def streams(per_stream: int, repeats: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(tmp)
        proc, target = _start_host(storage, "one", "127.0.0.1:0", False)
        try:
            out["one"] = await events_per_second(target, per_stream, repeats)
        finally:
            stop_engine(proc)
        port = target.rpartition(":")[2]
        procs = []
        try:
            for name in ("a", "b"):
                procs.append(_start_host(storage, name, f"127.0.0.1:{port}", True)[0])
            out["two"] = await events_per_second(f"127.0.0.1:{port}", per_stream, repeats)
        finally:
            for proc in procs:
                stop_engine(proc)
    return out


# -- rows -------------------------------------------------------------------------------------


def _ms(s: dict[str, float]) -> str:
    return f"{s['median']:.2f} ms ({s['min']:.2f}–{s['max']:.2f}, n={s['n']})"


async def _guarded(
    rows: list[dict[str, Any]], name: str, measure: Callable[[], Awaitable[list[dict[str, Any]]]]
) -> None:
    try:
        rows.extend(await measure())
    except Exception as exc:  # a check that cannot run says so in its row; the bench goes on
        rows.append(_error_row(name, exc))


async def rows(quick: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    sizes = (10, 100) if quick else (10, 1000)
    repeats = 1 if quick else 3

    async def turns() -> list[dict[str, Any]]:
        data = await per_turn_ms(sizes, repeats)
        result = []
        for setting, limit in (("off", 1.0), ("on", 2.0)):
            for n in sizes:
                s = _stats(data[setting][n])
                result.append(
                    _row(
                        f"per turn through gRPC, Edit tool, {n:,} turns, fsync {setting}",
                        _ms(s),
                        f"≤ {limit:g} ms",
                        s["median"] <= limit,
                        {"per_turn_ms": data[setting][n]},
                    )
                )
        return result

    async def approvals() -> list[dict[str, Any]]:
        result = []
        for fsync in (False, True):
            data = await approval_ms(5 if quick else 30, fsync)
            resume, get = _stats(data["resume"]), _stats(data["get"])
            setting = "on" if fsync else "off"
            value = (
                f"p50 {resume['median']:.2f} ms, p95 {resume['p95']:.2f} ms "
                f"(GetRun p50 {get['median']:.2f} ms)"
            )
            met = None if fsync else resume["median"] <= 1.5
            result.append(
                _row(
                    f"approval round trip through gRPC, fsync {setting}",
                    value,
                    "" if fsync else "p50 ≤ 1.5 ms",
                    met,
                    data,
                )
            )
        return result

    async def events() -> list[dict[str, Any]]:
        per_stream = 1_000 if quick else 10_000
        data = await streams(per_stream, repeats)
        one, two = _stats(data["one"]), _stats(data["two"])
        cores = os.cpu_count() or 0
        return [
            _row(f"events/s, {STREAMS} concurrent streams, one engine process",
                 f"{one['median']:,.0f} ({one['min']:,.0f}–{one['max']:,.0f})", "≥ 300,000",
                 one["median"] >= 300_000, {"events_per_s": data["one"]}),
            _row(f"events/s, {STREAMS} concurrent streams, two engine processes (--reuse-port), {cores} CPUs",
                 f"{two['median']:,.0f} ({two['min']:,.0f}–{two['max']:,.0f})", "", None,
                 {"events_per_s": data["two"]}),
        ]  # fmt: skip

    await _guarded(out, "per turn through gRPC", turns)
    await _guarded(out, "approval round trip through gRPC", approvals)
    await _guarded(out, "events/s over concurrent streams", events)
    return out


if __name__ == "__main__":  # python -m bench.fastpath [--quick]: this group alone
    import json

    for row in asyncio.run(rows("--quick" in sys.argv)):
        print(json.dumps({k: v for k, v in row.items() if k != "data"}, ensure_ascii=False))
