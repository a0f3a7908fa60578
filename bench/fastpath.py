"""The durable fast path, measured through gRPC against real engine processes.

- **Per turn**: a run of N turns (turn 1 writes ``notes.txt``, each later turn but the last
  edits it with the built-in ``Edit`` tool, which is not idempotent, so the engine commits a
  checkpoint before each call; the last answers) against a 1-turn run, CreateRun → WaitRun sees DONE; per-turn
  cost is the difference over N-1 turns, so creating and finishing a run is left out. With
  fsync off and on (``MACHINA_FSYNC``), N = 10 and 1,000; the sizes and the two settings are
  interleaved repetition by repetition, median and spread reported.
- **Approval round trip**: a run paused for approval; ResumeRun sent → a watcher (already
  attached with StreamRunEvents follow) sees the next event; beside it GetRun of the same
  run, the fixed cost of any unary call. Then, independent of the load, what one
  ``Engine.resume_run`` of a run the engine paused itself costs: its storage operations and
  Python function calls (``bench/_resume_probe.py``, in process).
- **Events/s**: 50 concurrent ExecuteRun streams whose model adapter streams text in bursts
  (``bench.host``), one engine process; then two engine processes on one port
  (``--reuse-port``) over one storage directory, each stream on a connection of its own.

``BENCH_BASELINE_ROOT=/path/to/an/older/checkout`` measures that checkout's engine too, side by
side (its processes interleaved with this one's, same client, same load), and each row gives
the ratio to it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from bench._common import ROOT, channel, engine_env, scripted, stop_engine, wait_serving
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


def _sides() -> list[tuple[str, Path]]:
    """This checkout, and the baseline checkout if one is named."""
    baseline = os.environ.get("BENCH_BASELINE_ROOT")
    return [("now", ROOT)] + ([("baseline", Path(baseline).resolve())] if baseline else [])


def _launch(
    module: list[str], storage: Path, name: str, cwd: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m MODULE... --port-file F`` run from ``cwd`` (its ``engine_service`` is the one
    imported); (process, target) once it reports SERVING."""
    storage.mkdir(parents=True, exist_ok=True)
    port_file = storage / f"{name}.port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", *module, "--port-file", str(port_file)],
        cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=engine_env(storage, env),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{name} ({' '.join(module[:1])} in {cwd}) did not start")
        time.sleep(0.01)
    target = f"127.0.0.1:{port_file.read_text()}"
    try:
        wait_serving(target)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, target


def _start_engine(storage: Path, name: str, cwd: Path, fsync: bool) -> tuple[subprocess.Popen[bytes], str]:
    env = {"MACHINA_FSYNC": "true" if fsync else "false", "MACHINA_MAX_TURNS": "100000"}
    module = ["engine_service", "--listen", "127.0.0.1:0", "--storage", str(storage), "--log-format", "json",
              "--model", "scripted"]  # fmt: skip
    return _launch(module, storage, name, cwd, env)


Engines = dict[tuple[str, str], tuple[subprocess.Popen[bytes], str]]


def _start_engines(tmp: str) -> Engines:
    """One engine per (side, fsync setting)."""
    engines: Engines = {}
    try:
        for side, cwd in _sides():
            for setting in ("off", "on"):
                engines[side, setting] = _start_engine(
                    Path(tmp, side, setting), f"{side}-{setting}", cwd, setting == "on"
                )
    except BaseException:
        _stop_all(engines)
        raise
    return engines


def _stop_all(engines: Engines) -> None:
    for proc, _ in engines.values():
        stop_engine(proc)


async def per_turn_ms(sizes: tuple[int, ...], repeats: int) -> dict[str, dict[str, dict[int, list[float]]]]:
    """Per-turn ms by side, fsync setting and size: each repetition runs every combination once."""
    out: dict[str, dict[str, dict[int, list[float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        engines = _start_engines(tmp)
        channels = {key: channel(target) for key, (_, target) in engines.items()}
        try:
            stubs = {key: svc_grpc.EngineServiceStub(ch) for key, ch in channels.items()}
            for stub in stubs.values():  # warm-up: imports, caches, the first run directory
                await _one_run(stub, 1)
                await _one_run(stub, 10)
            for _ in range(repeats):
                for n in sizes:
                    for (side, setting), stub in stubs.items():
                        base = await _one_run(stub, 1)
                        whole = await _one_run(stub, n)
                        out.setdefault(side, {}).setdefault(setting, {}).setdefault(n, []).append(
                            (whole - base) / (n - 1)
                        )
        finally:
            for ch in channels.values():
                await ch.close()
            _stop_all(engines)
    return out


async def concurrent_turns_per_s(runs: int, turns: int, repeats: int) -> dict[str, list[float]]:
    """Turns/s with fsync on: ``runs`` runs of ``turns`` turns at once, and one alone. Runs that
    checkpoint together share the file system's journal commits, so together they go faster."""
    out: dict[str, list[float]] = {"together": [], "alone": []}
    with tempfile.TemporaryDirectory() as tmp:
        proc, target = _start_engine(Path(tmp), "group", ROOT, True)
        try:
            async with channel(target) as ch:
                stub = svc_grpc.EngineServiceStub(ch)
                await _one_run(stub, turns)  # warm-up
                for _ in range(repeats):
                    started = time.perf_counter()
                    await _one_run(stub, turns)
                    out["alone"].append(turns / (time.perf_counter() - started))
                    started = time.perf_counter()
                    await asyncio.gather(*(_one_run(stub, turns) for _ in range(runs)))
                    out["together"].append(runs * turns / (time.perf_counter() - started))
        finally:
            stop_engine(proc)
    return out


# -- approval round trip ----------------------------------------------------------------------


async def _approval_once(stub: svc_grpc.EngineServiceStub) -> tuple[float, float]:
    """(ResumeRun sent → the watcher sees the next event, GetRun of the same run), ms."""
    script = [scripted("", [("double", {"x": 1})]), scripted("ok")]
    spec = svc.RunSpec(task="approve", model=svc.ModelSpec(provider="scripted", script=script))
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
    decision = svc.Decision(interrupt_id=run.pause.interrupts[0].interrupt_id, approve=svc.Approve())
    started = time.perf_counter()
    await stub.ResumeRun(svc.ResumeRunRequest(run_id=run.run_id, decisions=[decision]))
    await first
    resume = (time.perf_counter() - started) * 1000
    watch.cancel()
    await stub.WaitRun(svc.WaitRunRequest(run_id=run.run_id, timeout_ms=10_000))
    return resume, get


async def approval_ms(repeats: int) -> dict[str, dict[str, dict[str, list[float]]]]:
    """By side and fsync setting: approval round trips and GetRun times (ms), interleaved."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        engines = _start_engines(tmp)
        channels = {key: channel(target) for key, (_, target) in engines.items()}
        try:
            stubs = {key: svc_grpc.EngineServiceStub(ch) for key, ch in channels.items()}
            for index in range(repeats + 2):  # two warm-ups
                for (side, setting), stub in stubs.items():
                    resume, get = await _approval_once(stub)
                    if index >= 2:
                        figures = out.setdefault(side, {}).setdefault(setting, {"resume": [], "get": []})
                        figures["resume"].append(resume)
                        figures["get"].append(get)
        finally:
            for ch in channels.values():
                await ch.close()
            _stop_all(engines)
    return out


def resume_costs(n: int) -> dict[str, dict[str, Any]]:
    """By side: storage operations and Python function calls of one ``Engine.resume_run`` of a
    run the same engine paused (bench/_resume_probe.py, in a process of that side's checkout)."""
    probe = (Path(__file__).parent / "_resume_probe.py").read_text()
    out = {}
    for side, cwd in _sides():
        env = {**os.environ, "PYTHONPATH": str(cwd)}
        command = [sys.executable, "-c", probe, str(n)]
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, check=True, timeout=300)
        out[side] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return out


# -- events/s ---------------------------------------------------------------------------------


def _start_host(
    storage: Path, name: str, cwd: Path, listen: str = "127.0.0.1:0", reuse_port: bool = False
) -> tuple[subprocess.Popen[bytes], str]:
    module = ["bench.host", "--storage", str(storage)]
    if listen != "127.0.0.1:0" or reuse_port:  # a baseline's host may lack these options
        module += ["--listen", listen, *(["--reuse-port"] if reuse_port else [])]
    return _launch(module, storage, name, cwd, {})


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
    """Events/s: one engine process per side (interleaved), then two of this side on one port."""
    out: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        hosts = {}
        try:
            for side, cwd in _sides():
                hosts[side] = _start_host(Path(tmp, side), side, cwd)
            for _ in range(repeats):
                for side, (_, target) in hosts.items():
                    out.setdefault(side, []).extend(await events_per_second(target, per_stream, 1))
        finally:
            for proc, _ in hosts.values():
                stop_engine(proc)
        port = free_port()
        procs = []
        try:
            for name in ("a", "b"):
                procs.append(_start_host(Path(tmp, "two"), name, ROOT, f"127.0.0.1:{port}", True)[0])
            out["two"] = await events_per_second(f"127.0.0.1:{port}", per_stream, repeats)
        finally:
            for proc in procs:
                stop_engine(proc)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- rows -------------------------------------------------------------------------------------


def _ms(s: dict[str, float]) -> str:
    return f"{s['median']:.2f} ms ({s['min']:.2f}–{s['max']:.2f}, n={s['n']})"


def _figures(unit: str, s: dict[str, float], baseline: list[float] | None) -> dict[str, Any]:
    """Flat numbers of a row (what ``--compare`` sets beside an earlier result)."""
    out: dict[str, Any] = {f"p50_{unit}": s["median"], f"min_{unit}": s["min"], f"max_{unit}": s["max"]}
    if baseline:
        then = statistics.median(baseline)
        out |= {f"baseline_p50_{unit}": then, "ratio_to_baseline": s["median"] / then}
    return out


def _beside(now: float, baseline: list[float] | None, unit: str, digits: int = 2) -> str:
    """`` · baseline X (R×)`` when a baseline was measured."""
    if not baseline:
        return ""
    then = statistics.median(baseline)
    return f" · baseline {then:,.{digits}f}{unit} ({now / then:.2f}×)"


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
                now = data["now"][setting][n]
                baseline = data.get("baseline", {}).get(setting, {}).get(n)
                s = _stats(now)
                value = _ms(s) + _beside(s["median"], baseline, " ms")
                name = f"per turn through gRPC, Edit tool, {n:,} turns, fsync {setting}"
                figures = _figures("ms", s, baseline) | {"per_turn_ms": now, "baseline_per_turn_ms": baseline}
                result.append(_row(name, value, f"≤ {limit:g} ms", s["median"] <= limit, figures))
        return result

    async def together() -> list[dict[str, Any]]:
        runs = 20
        data = await concurrent_turns_per_s(runs, 10, repeats)
        both, alone = _stats(data["together"]), _stats(data["alone"])
        value = f"{both['median']:,.0f} turns/s ({runs} runs at once) vs {alone['median']:,.0f} (one run)"
        figures = {"together_turns_per_s": both["median"], "alone_turns_per_s": alone["median"], **data}
        return [_row(f"fsync on: {runs} runs checkpointing together", value, "", None, figures)]

    async def approvals() -> list[dict[str, Any]]:
        data = await approval_ms(20 if quick else 200)
        result = []
        for setting in ("off", "on"):
            now = data["now"][setting]
            baseline = data.get("baseline", {}).get(setting, {}).get("resume")
            resume, get = _stats(now["resume"]), _stats(now["get"])
            value = (
                f"p50 {resume['median']:.2f} ms, p95 {resume['p95']:.2f} ms "
                f"(GetRun p50 {get['median']:.2f} ms)" + _beside(resume["median"], baseline, " ms")
            )
            met = resume["median"] <= 1.5 if setting == "off" else None
            target = "p50 ≤ 1.5 ms" if setting == "off" else ""
            figures = _figures("ms", resume, baseline) | {
                "get_p50_ms": get["median"],
                **now,
                "baseline": baseline,
            }
            result.append(
                _row(f"approval round trip through gRPC, fsync {setting}", value, target, met, figures)
            )
        costs = await asyncio.to_thread(resume_costs, 20 if quick else 100)
        now, then = costs["now"], costs.get("baseline")
        value = f"{now['storage_ops_total']:g} storage operations, {now['python_calls']:,.0f} Python calls"
        if then:
            value += f" · baseline {then['storage_ops_total']:g}, {then['python_calls']:,.0f}"
        figures = {"storage_ops": now["storage_ops_total"], "python_calls": now["python_calls"],
                   "by_operation": now["storage_ops"], "baseline": then}  # fmt: skip
        name = "ResumeRun of a run paused here, in process, per resume"
        result.append(_row(name, value, "", None, figures))
        return result

    async def events() -> list[dict[str, Any]]:
        per_stream = 1_000 if quick else 10_000
        data = await streams(per_stream, repeats)
        one, two = _stats(data["now"]), _stats(data["two"])
        cores = os.cpu_count() or 0
        value = f"{one['median']:,.0f} ({one['min']:,.0f}–{one['max']:,.0f})"
        value += _beside(one["median"], data.get("baseline"), "", 0)
        return [
            _row(f"events/s, {STREAMS} concurrent streams, one engine process", value, "≥ 300,000",
                 one["median"] >= 300_000, _figures("events_per_s", one, data.get("baseline")) | {
                     "events_per_s": data["now"], "baseline": data.get("baseline")}),
            _row(f"events/s, {STREAMS} concurrent streams, two engine processes (--reuse-port), {cores} CPUs",
                 f"{two['median']:,.0f} ({two['min']:,.0f}–{two['max']:,.0f})", "", None,
                 _figures("events_per_s", two, None) | {"events_per_s": data["two"]}),
        ]  # fmt: skip

    await _guarded(out, "per turn through gRPC", turns)
    await _guarded(out, "fsync on: runs checkpointing together", together)
    await _guarded(out, "approval round trip through gRPC", approvals)
    await _guarded(out, "events/s over concurrent streams", events)
    return out


if __name__ == "__main__":  # python -m bench.fastpath [--quick]: this group alone
    import json

    for row in asyncio.run(rows("--quick" in sys.argv)):
        print(json.dumps({k: v for k, v in row.items() if k != "data"}, ensure_ascii=False))
