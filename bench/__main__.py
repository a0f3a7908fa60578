"""``python -m bench``: measure the engine against the SPEC §7 targets.

Prints one table and writes ``bench-results/bench.json``. Medians of several
repetitions; ratios are computed from numbers measured in this same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from engine_service import Engine, EngineConfig, LocalStorage, RunSpec, ScriptedTurn, Storage, ToolRegistry
from engine_service._tools import ASK_USER
from engine_service._types import Principal, RunState
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import engine_service_pb2_grpc as svc_grpc
from machina.engine.v1 import run_pb2
from tests import tools as test_tools

ROOT = Path(__file__).resolve().parent.parent
PRINCIPAL = Principal("default", "bench")


def progress(message: str) -> None:
    print(f"  … {message}", file=sys.stderr, flush=True)


# -- per-turn engine overhead (in process, no gRPC) ----------------------------------


async def per_turn_ms(turns: int, repeats: int, storage: Storage | None = None) -> list[float]:
    """Wall time per turn of a scripted run with a no-op tool, checkpointing every turn."""
    script = [ScriptedTurn("step", [("noop", {})]) for _ in range(turns - 1)] + [ScriptedTurn("done")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(
            EngineConfig(max_turns=100_000),
            storage or LocalStorage(tmp),
            tools=ToolRegistry([ASK_USER, *test_tools.ALL]),
        )
        for _ in range(repeats):
            spec = RunSpec(task="bench", model_provider="scripted", script=script, max_turns=turns + 1)
            started = time.perf_counter()
            record, _ = await engine.create_run(PRINCIPAL, spec)
            record, _ = await engine.wait_run(PRINCIPAL, record.run_id, timeout=600)
            elapsed = time.perf_counter() - started
            assert record.state is RunState.DONE, record.error
            results.append(elapsed * 1000 / turns)
        await engine.close()
    return results


def storage_ratio(root: Path) -> float:
    """Bytes stored per run ÷ bytes of its transcript and events (SPEC: ≤ 2×)."""
    total = payload = 0
    for path in root.rglob("*"):
        if path.is_file():
            size = path.stat().st_size
            total += size
            if path.parent.name in ("events", "transcript"):
                payload += size
    return total / payload if payload else float("nan")


# -- engine process helpers ------------------------------------------------------------


def start_engine(
    storage: Path, env: dict[str, str] | None = None, storage_url: str | None = None
) -> tuple[subprocess.Popen[bytes], str, float]:
    port_file = storage / "port"
    port_file.unlink(missing_ok=True)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine_service",
            "--listen",
            "127.0.0.1:0",
            "--storage",
            storage_url or str(storage),
            "--port-file",
            str(port_file),
            "--log-format",
            "json",
            "--model",
            "scripted",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={
            **os.environ,
            "MACHINA_TOOLS_CUSTOM": "tests.tools:noop,tests.tools:double",
            "MACHINA_TOOLS_PERMISSIONS": "double=ask",
            "MACHINA_WORKDIR_ROOT": str(storage / "work"),
            **(env or {}),
        },
    )
    while not (port_file.exists() and port_file.read_text()):
        if proc.poll() is not None:
            raise RuntimeError("engine exited during start-up")
        time.sleep(0.005)
    target = f"127.0.0.1:{port_file.read_text()}"
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while stub.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.SERVING:
            time.sleep(0.005)
    return proc, target, time.perf_counter() - started


def stop_engine(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def scripted(text: str, calls: list[tuple[str, dict[str, Any]]] | None = None) -> svc.ScriptedTurn:
    turn = svc.ScriptedTurn(text=text)
    for name, arguments in calls or []:
        turn.tool_calls.add(name=name).arguments.update(arguments)
    return turn


async def events_per_second(target: str, n_events: int, repeats: int) -> dict[str, list[float]]:
    """Events/s over one stream: live (ExecuteRun) and replay from storage (StreamRunEvents)."""
    text = "w " * (n_events - 5)  # one text_delta per word, plus ~5 lifecycle events
    out: dict[str, list[float]] = {"live": [], "replay": []}
    async with grpc.aio.insecure_channel(
        target, options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as ch:
        stub = svc_grpc.EngineServiceStub(ch)
        for _ in range(repeats):
            spec = svc.RunSpec(
                task="stream", model=svc.ModelSpec(provider="scripted", script=[scripted(text)])
            )
            count, started, run_id = 0, time.perf_counter(), ""
            async for response in stub.ExecuteRun(svc.ExecuteRunRequest(spec=spec)):
                count += len(response.events)
                if response.HasField("run"):
                    run_id = response.run.run_id
            out["live"].append(count / (time.perf_counter() - started))
            count, started = 0, time.perf_counter()
            async for response in stub.StreamRunEvents(svc.StreamRunEventsRequest(run_id=run_id)):
                count += len(response.events)
            out["replay"].append(count / (time.perf_counter() - started))
    return out


def start_runner(
    storage: Path, secret: str, env: dict[str, str] | None = None, storage_url: str | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    port_file = storage / "runner.port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner_service", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
         "--storage", storage_url or str(storage), "--port-file", str(port_file), "--log-format", "json"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "MACHINA_RUNNER_SECRET": secret, "MACHINA_WORKDIR_ROOT": str(storage / "work"),
             **(env or {})},
    )  # fmt: skip
    while not (port_file.exists() and port_file.read_text()):
        if proc.poll() is not None:
            raise RuntimeError("runner exited during start-up")
        time.sleep(0.005)
    return proc, int(json.loads(port_file.read_text())["http"])


async def round_trip_ms(target: str, repeats: int) -> list[float]:
    """CreateRun of a one-Bash-step run → WaitRun sees DONE (ms)."""
    script = [scripted("", [("Bash", {"command": "true"})]), scripted("done")]
    results = []
    async with grpc.aio.insecure_channel(target) as ch:
        stub = svc_grpc.EngineServiceStub(ch)
        for _ in range(repeats):
            started = time.perf_counter()
            spec = svc.RunSpec(task="handoff", model=svc.ModelSpec(provider="scripted", script=script))
            run = (await stub.CreateRun(svc.CreateRunRequest(spec=spec))).run
            while run.state not in (run_pb2.RUN_STATE_DONE, run_pb2.RUN_STATE_FAILED):
                run = (await stub.WaitRun(svc.WaitRunRequest(run_id=run.run_id, timeout_ms=30_000))).run
            results.append((time.perf_counter() - started) * 1000)
            assert run.state == run_pb2.RUN_STATE_DONE, run.error
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


async def approval_round_trips(target: str, repeats: int) -> list[float]:
    """ResumeRun sent → the watcher sees the next event (ms)."""
    results = []
    async with grpc.aio.insecure_channel(target) as ch:
        stub = svc_grpc.EngineServiceStub(ch)
        for _ in range(repeats):
            spec = svc.RunSpec(
                task="approve",
                model=svc.ModelSpec(
                    provider="scripted", script=[scripted("", [("double", {"x": 1})]), scripted("ok")]
                ),
            )
            run = (await stub.CreateRun(svc.CreateRunRequest(spec=spec))).run
            run = (await stub.WaitRun(svc.WaitRunRequest(run_id=run.run_id, timeout_ms=10_000))).run
            watch = stub.StreamRunEvents(
                svc.StreamRunEventsRequest(run_id=run.run_id, after_seq=run.last_seq, follow=True)
            )
            first = asyncio.ensure_future(watch.read())
            await asyncio.sleep(0.01)  # the watcher is attached and idle
            started = time.perf_counter()
            await stub.ResumeRun(
                svc.ResumeRunRequest(
                    run_id=run.run_id,
                    decisions=[
                        svc.Decision(interrupt_id=run.pause.interrupts[0].interrupt_id, approve=svc.Approve())
                    ],
                )
            )
            await first
            results.append((time.perf_counter() - started) * 1000)
            watch.cancel()
    return results


def summarize(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
        "n": len(ordered),
    }


def row(name: str, value: str, target: str, met: bool | None) -> tuple[str, str, str, str]:
    return (name, value, target, "—" if met is None else ("met" if met else "MISSED"))


async def run(quick: bool) -> dict[str, Any]:
    reps_small, reps_big = (10, 1) if quick else (30, 3)
    results: dict[str, Any] = {}
    progress(f"per-turn overhead, 10-turn runs ×{reps_small}")
    small = await per_turn_ms(10, reps_small)
    progress(f"per-turn overhead, 1,000-turn runs ×{reps_big}")
    big = await per_turn_ms(1000, reps_big)
    results["per_turn_ms_10"] = summarize(small)
    results["per_turn_ms_1000"] = summarize(big)
    results["per_turn_ratio_1000_vs_10"] = (
        results["per_turn_ms_1000"]["median"] / results["per_turn_ms_10"]["median"]
    )

    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(tmp)
        progress("cold start of python -m engine_service to SERVING ×3")
        cold = []
        for _ in range(1 if quick else 3):
            proc, _, seconds = start_engine(storage)
            cold.append(seconds)
            stop_engine(proc)
        results["cold_start_s"] = summarize(cold)
        proc, target, _ = start_engine(storage)
        try:
            n_events = 20_000 if quick else 100_000
            progress(f"events/s over one gRPC stream ({n_events:,} events)")
            eps = await events_per_second(target, n_events, 1 if quick else 3)
            results["events_per_s_live"] = summarize(eps["live"])
            results["events_per_s_replay"] = summarize(eps["replay"])
            progress("approval round trip ×20")
            results["approval_rtt_ms"] = summarize(await approval_round_trips(target, 5 if quick else 20))
        finally:
            stop_engine(proc)
        progress("handoff round trip (engine → runner → DONE seen by WaitRun) ×20, and the same run locally")
        trips = await handoff_round_trips(storage, 5 if quick else 20)
        results["handoff_rtt_ms"] = summarize(trips["handoff"])
        results["local_rtt_ms"] = summarize(trips["local"])
        results["storage_bytes_ratio"] = storage_ratio(storage / "workspaces")
    await s3_benchmarks(results, quick)
    return results


async def s3_benchmarks(results: dict[str, Any], quick: bool) -> None:
    """Per-turn overhead and handoff time over a real S3-compatible server (moto, on loopback)."""
    from engine_service._s3 import S3Storage
    from tests.s3_server import CREDENTIALS, running_moto
    from tests.test_storage_contract import new_bucket

    for key, value in CREDENTIALS.items():
        os.environ.setdefault(key, value)
    with running_moto() as endpoint, tempfile.TemporaryDirectory() as tmp:
        bucket = await new_bucket(endpoint)
        progress("per-turn overhead on the S3 server, 10-turn runs ×5 and one 1,000-turn run")
        small = await per_turn_ms(10, 2 if quick else 5, S3Storage(bucket, "p", endpoint_url=endpoint))
        big = await per_turn_ms(200 if quick else 1000, 1, S3Storage(bucket, "q", endpoint_url=endpoint))
        results["s3_per_turn_ms_10"] = summarize(small)
        results["s3_per_turn_ms_1000"] = summarize(big)
        progress("handoff round trip on the S3 server ×10")
        env = {"AWS_ENDPOINT_URL": endpoint, **CREDENTIALS}
        trips = await handoff_round_trips(Path(tmp), 3 if quick else 10, f"s3://{bucket}/h", env)
        results["s3_handoff_rtt_ms"] = summarize(trips["handoff"])
        results["s3_local_rtt_ms"] = summarize(trips["local"])


def table(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    r = results
    return [
        row(
            "engine overhead per turn, 10-turn run (p50)",
            f"{r['per_turn_ms_10']['median']:.3f} ms",
            "≤ 1 ms",
            r["per_turn_ms_10"]["median"] <= 1,
        ),
        row(
            "engine overhead per turn, 1,000-turn run (p50)",
            f"{r['per_turn_ms_1000']['median']:.3f} ms",
            "≤ 1 ms",
            r["per_turn_ms_1000"]["median"] <= 1,
        ),
        row(
            "per-turn cost 1,000 ÷ 10 turns",
            f"{r['per_turn_ratio_1000_vs_10']:.2f}×",
            "≤ 1.2×",
            r["per_turn_ratio_1000_vs_10"] <= 1.2,
        ),
        row(
            "events/s, one stream, live ExecuteRun",
            f"{r['events_per_s_live']['median']:,.0f}",
            "≥ 100,000",
            r["events_per_s_live"]["median"] >= 100_000,
        ),
        row(
            "events/s, one stream, replay StreamRunEvents",
            f"{r['events_per_s_replay']['median']:,.0f}",
            "≥ 100,000",
            r["events_per_s_replay"]["median"] >= 100_000,
        ),
        row(
            "approval round trip (p50)",
            f"{r['approval_rtt_ms']['median']:.2f} ms",
            "≤ 2 ms",
            r["approval_rtt_ms"]["median"] <= 2,
        ),
        row(
            "handoff round trip, local storage (p50)",
            f"{r['handoff_rtt_ms']['median']:.1f} ms (locally: {r['local_rtt_ms']['median']:.1f} ms)",
            "≤ 50 ms",
            r["handoff_rtt_ms"]["median"] <= 50,
        ),
        row(
            "S3 server: overhead per turn, 10-turn run (p50)",
            f"{r['s3_per_turn_ms_10']['median']:.2f} ms",
            "—",
            None,
        ),
        row(
            "S3 server: overhead per turn, 1,000-turn run (p50)",
            f"{r['s3_per_turn_ms_1000']['median']:.2f} ms",
            "flat (≤ 1.2× the 10-turn cost)",
            r["s3_per_turn_ms_1000"]["median"] <= 1.2 * r["s3_per_turn_ms_10"]["median"],
        ),
        row(
            "S3 server: handoff round trip (p50)",
            f"{r['s3_handoff_rtt_ms']['median']:.1f} ms (locally: {r['s3_local_rtt_ms']['median']:.1f} ms)",
            "≤ 250 ms",
            r["s3_handoff_rtt_ms"]["median"] <= 250,
        ),
        row(
            "cold start to SERVING (median)",
            f"{r['cold_start_s']['median']:.2f} s",
            "≤ 1.5 s",
            r["cold_start_s"]["median"] <= 1.5,
        ),
        row(
            "storage bytes ÷ transcript+event bytes",
            f"{r['storage_bytes_ratio']:.2f}×",
            "≤ 2×",
            r["storage_bytes_ratio"] <= 2,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test of the harness)")
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "bench.json"))
    ns = parser.parse_args(argv)
    results = asyncio.run(run(ns.quick))
    python = platform.python_version()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {python}, {platform.system()}"
    rows = table(results)
    header = ("what", "measured", "target", "status")
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(4)]
    print(f"\nMachina bench — {machine}")
    print(
        " | ".join(h.ljust(w) for h, w in zip(("what", "measured", "target", "status"), widths, strict=True))
    )
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps({"machine": machine, "results": results, "table": rows}, indent=2))
    print(f"\nwrote {ns.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
