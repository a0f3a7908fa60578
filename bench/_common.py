"""Helpers shared by the benchmark modules: processes, statistics, memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from engine_service import (
    Engine,
    EngineConfig,
    LocalStorage,
    Principal,
    RunSpec,
    RunState,
    ScriptedTurn,
    Storage,
    ToolRegistry,
)
from engine_service.testing import ASK_USER, SAMPLE_TOOLS
from machina.engine.v1 import engine_service_pb2 as svc

ROOT = Path(__file__).resolve().parent.parent
PRINCIPAL = Principal("default", "bench")
# How long a started engine, runner or bench host may take to write its port file and to report
# SERVING before the benchmark gives up on it instead of waiting forever.
START_TIMEOUT_S = 60.0


def progress(message: str) -> None:
    print(f"  … {message}", file=sys.stderr, flush=True)


def proc_status_mb(pid: int | str, field: str) -> float:
    """A memory line of /proc/PID/status (VmRSS, VmHWM, …) in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    raise KeyError(field)


def tool_script(turns: int) -> list[ScriptedTurn]:
    """``turns`` model turns: each but the last calls the no-op tool; the last answers."""
    return [ScriptedTurn("step", [("noop", {})]) for _ in range(turns - 1)] + [ScriptedTurn("done")]


def bench_engine(storage: Storage, workdirs: str) -> Engine:
    """An in-process engine with the test tools (noop among them) and room for long runs."""
    config = EngineConfig(max_turns=100_000, workdir_root=workdirs)
    return Engine(config, storage, tools=ToolRegistry([ASK_USER, *SAMPLE_TOOLS]))


async def per_turn_ms(
    turns: int, repeats: int, storage: Storage | None = None, warmup: bool = False
) -> list[float]:
    """Wall time per turn of a scripted run with a no-op tool, checkpointing every turn.

    In process, no gRPC: CreateRun → WaitRun sees DONE, divided by the number of turns.
    """
    script = tool_script(turns)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        engine = bench_engine(storage or LocalStorage(tmp), str(Path(tmp) / "work"))
        for i in range(repeats + int(warmup)):
            spec = RunSpec(task="bench", model_provider="scripted", script=script, max_turns=turns + 1)
            started = time.perf_counter()
            record, _ = await engine.create_run(PRINCIPAL, spec)
            record, _ = await engine.wait_run(PRINCIPAL, record.run_id, timeout=600)
            elapsed = time.perf_counter() - started
            assert record.state is RunState.DONE, record.error
            if i >= int(warmup):
                results.append(elapsed * 1000 / turns)
        await engine.close()
    return results


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def storage_ratio(root: Path) -> float:
    """Bytes stored per run ÷ bytes of its transcript and events (the target: ≤ 2×)."""
    total = payload = 0
    for path in root.rglob("*"):
        if path.is_file():
            size = path.stat().st_size
            total += size
            if path.parent.name in ("events", "transcript"):
                payload += size
    return total / payload if payload else float("nan")


# -- engine and runner processes --------------------------------------------------------


def _wait_port(
    proc: subprocess.Popen[bytes], port_file: Path, what: str, timeout: float = START_TIMEOUT_S
) -> str:
    """The port file's contents once ``proc`` has written it; a hung process is killed after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (port_file.exists() and port_file.read_text()):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited during start-up")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{what} wrote no port to {port_file} within {timeout:.0f} s (killed)")
        time.sleep(0.005)
    return port_file.read_text()


def wait_serving(target: str, timeout: float = START_TIMEOUT_S) -> None:
    """Return once the gRPC health check at ``target`` reports SERVING; fail after ``timeout`` s."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{target} did not report SERVING within {timeout:.0f} s")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=remaining).status
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                continue  # the next pass reports the timeout
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.005)


def _serving_or_kill(proc: subprocess.Popen[bytes], target: str) -> None:
    """``wait_serving``, killing ``proc`` if it never gets there (no process is left behind)."""
    try:
        wait_serving(target)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def engine_env(storage: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **os.environ,
        "MACHINA_TOOLS_CUSTOM": "engine_service.testing:noop,engine_service.testing:double",
        "MACHINA_TOOLS_PERMISSIONS": "double=ask",
        "MACHINA_WORKDIR_ROOT": str(storage / "work"),
        **(env or {}),
    }


def start_engine(
    storage: Path,
    env: dict[str, str] | None = None,
    storage_url: str | None = None,
    *,
    listen: str = "127.0.0.1:0",
    args: list[str] | None = None,
    name: str = "engine",
) -> tuple[subprocess.Popen[bytes], str, float]:
    """``python -m engine_service`` on ``listen`` (a free loopback port by default), with extra
    command-line ``args``; (process, target, seconds to SERVING). ``name`` tells apart the port
    files of engines that share ``storage``."""
    port_file = storage / f"{name}.port"
    port_file.unlink(missing_ok=True)
    log = storage / f"{name}.stderr"
    started = time.perf_counter()
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine_service", "--listen", listen,
             "--storage", storage_url or str(storage), "--port-file", str(port_file),
             "--log-format", "json", "--model", "scripted", *(args or [])],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, env=engine_env(storage, env),
        )  # fmt: skip
    try:
        target = f"127.0.0.1:{_wait_port(proc, port_file, name)}"
    except RuntimeError as exc:
        lines = log.read_text(errors="replace").strip().splitlines()
        raise RuntimeError(f"{exc}: {lines[-1][-300:] if lines else '(no output)'}") from None
    _serving_or_kill(proc, target)
    return proc, target, time.perf_counter() - started


def start_host(storage: Path, profile: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m bench.host``: the engine server with the benchmark model adapters (see bench/host.py)."""
    port_file = storage / "host.port"
    port_file.unlink(missing_ok=True)
    prefix = [sys.executable]
    if profile is not None:
        prefix += ["-m", "pyinstrument", "-r", "text", "-o", str(profile)]
    proc = subprocess.Popen(
        [*prefix, "-m", "bench.host", "--storage", str(storage), "--port-file", str(port_file)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=engine_env(storage),
    )  # fmt: skip
    target = f"127.0.0.1:{_wait_port(proc, port_file, 'bench host')}"
    _serving_or_kill(proc, target)
    return proc, target


def stop_engine(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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
    return proc, int(json.loads(_wait_port(proc, port_file, "runner"))["http"])


def scripted(text: str, calls: list[tuple[str, dict[str, Any]]] | None = None) -> svc.ScriptedTurn:
    turn = svc.ScriptedTurn(text=text)
    for name, arguments in calls or []:
        turn.tool_calls.add(name=name).arguments.update(arguments)
    return turn


def channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
