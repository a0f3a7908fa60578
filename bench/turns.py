"""Per-turn cost through the real gRPC server, side by side with LangGraph.

The script (``bench/_script.py``) writes a file on turn 1 and edits it every later turn but
the last: ``Edit`` is a built-in tool that is not idempotent, so the engine commits a checkpoint
before each call. Machina: two ``python -m engine_service`` processes, one with ``fsync`` off (the
default) and one with it on; the bench process is the gRPC client (``CreateRun`` →
``WaitRun`` sees DONE). LangGraph: ``python -m bench.langgraph_side`` per configuration, a
process that imports only LangChain/LangGraph — ``create_agent`` and the prebuilt agent, each
with ``SqliteSaver``'s default sync and with ``PRAGMA synchronous=OFF``. Repetitions alternate
the sides (Machina fsync off, on, then each LangGraph configuration), so a burst of load on
the shared machine hits both. Every N-turn run follows a 1-turn run on the same side: per-turn
growth is ``(T(N) − T(1)) ÷ (N − 1)``, the cost of a turn without creating the run.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import (
    ROOT,
    channel,
    dir_bytes,
    per_turn_ms,
    proc_status_mb,
    progress,
    scripted,
    start_engine,
    stop_engine,
)
from bench._rows import Check, Row, Target, at_most, ms, ratio_text, row, summarize
from bench._script import edit_script
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import engine_service_pb2_grpc as svc_grpc
from machina.engine.v1 import run_pb2

LANGGRAPH = [(agent, sync) for agent in ("create_agent", "prebuilt") for sync in ("default", "off")]


@dataclass
class Side:
    """One configuration's samples: per-run ms of N-turn runs and of the 1-turn runs beside them."""

    runs: dict[int, list[float]] = field(default_factory=dict)
    one_turn: list[float] = field(default_factory=list)
    rss: dict[int, dict[str, float]] = field(default_factory=dict)
    storage_bytes: dict[int, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def per_turn(self, turns: int) -> dict[str, float]:
        return summarize([t / turns for t in self.runs.get(turns, [])])

    def growth_samples(self, turns: int) -> list[float]:
        """Per-turn cost without creating the run: (T(N) − median T(1)) ÷ (N − 1), per run."""
        base = statistics.median(self.one_turn) if self.one_turn else float("nan")
        return [(t - base) / (turns - 1) for t in self.runs.get(turns, [])]

    def growth_per_turn(self, turns: int) -> dict[str, float]:
        return summarize(self.growth_samples(turns))


def proto_script(turns: int) -> list[svc.ScriptedTurn]:
    return [scripted(text, calls) for text, calls in edit_script(turns)]


async def one_run(stub: svc_grpc.EngineServiceStub, turns: int) -> tuple[float, str]:
    spec = svc.RunSpec(
        task="bench",
        limits=svc.RunLimits(max_turns=turns + 1),
        model=svc.ModelSpec(provider="scripted", script=proto_script(turns)),
    )
    started = time.perf_counter()
    run = (await stub.CreateRun(svc.CreateRunRequest(spec=spec))).run
    while run.state not in (run_pb2.RUN_STATE_DONE, run_pb2.RUN_STATE_FAILED, run_pb2.RUN_STATE_CANCELLED):
        run = (await stub.WaitRun(svc.WaitRunRequest(run_id=run.run_id, timeout_ms=60_000))).run
    elapsed = (time.perf_counter() - started) * 1000
    if run.state != run_pb2.RUN_STATE_DONE:
        raise RuntimeError(f"a {turns}-turn run ended {run_pb2.RunState.Name(run.state)}: {run.error}")
    return elapsed, run.run_id


async def machina_batch(
    target: str, proc: subprocess.Popen[bytes], storage: Path, side: Side, turns: int, runs: int
) -> None:
    async with channel(target) as ch:
        stub = svc_grpc.EngineServiceStub(ch)
        if not side.one_turn:
            await one_run(stub, min(turns, 10))  # warm-up, not counted
        for _ in range(runs):
            side.one_turn.append((await one_run(stub, 1))[0])
            elapsed, run_id = await one_run(stub, turns)
            side.runs.setdefault(turns, []).append(elapsed)
            if turns not in side.storage_bytes:
                side.storage_bytes[turns] = dir_bytes(storage / "workspaces" / "default" / "runs" / run_id)
    side.rss[turns] = {
        "rss_mb": proc_status_mb(proc.pid, "VmRSS"),
        "peak_rss_mb": proc_status_mb(proc.pid, "VmHWM"),
    }


def langgraph_batch(agent: str, sync: str, side: Side, turns: int, runs: int) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.langgraph_side", agent, sync, str(turns), str(runs)],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"bench.langgraph_side {agent} {sync} failed: {out.stderr.strip()[-300:]}")
    result = json.loads(out.stdout.splitlines()[-1])
    if result["imports_engine_or_grpc"]:
        raise RuntimeError(f"the LangGraph process imported {result['imports_engine_or_grpc']}")
    side.runs.setdefault(turns, []).extend(result["per_run_ms"])
    side.one_turn.extend(result["one_turn_ms"])
    side.storage_bytes.setdefault(turns, result["storage_bytes"])
    peak = max(side.rss.get(turns, {}).get("peak_rss_mb", 0.0), result["peak_rss_mb"])
    side.rss[turns] = {"rss_mb": result["rss_mb"], "peak_rss_mb": peak}
    side.extra["pragmas"] = result["pragmas"]


def _paired_ratios(ours: list[float], theirs: list[float], per_rep: int, turns: int) -> list[float]:
    """Per repetition, our median per-turn time ÷ theirs (the two were measured back to back)."""
    out = []
    for i in range(0, min(len(ours), len(theirs)), per_rep):
        a, b = ours[i : i + per_rep], theirs[i : i + per_rep]
        if a and b:
            out.append(statistics.median(a) / statistics.median(b))
    return out


async def rows(ctx: Any) -> list[Row]:
    quick: bool = ctx.quick
    sizes = {10: 3 if quick else 10, (100 if quick else 1000): 1}
    big = max(sizes)
    reps = 1 if quick else 3
    sides: dict[str, Side] = {"fsync off": Side(), "fsync on": Side()}
    sides.update({f"{a} {s}": Side() for a, s in LANGGRAPH})
    with tempfile.TemporaryDirectory() as tmp:
        engines = {}
        try:
            for label, value in (("fsync off", "false"), ("fsync on", "true")):
                storage = Path(tmp) / label.replace(" ", "-")
                storage.mkdir()
                proc, target, _ = start_engine(
                    storage, {"MACHINA_FSYNC": value}, name=label.replace(" ", "-")
                )
                engines[label] = (proc, target, storage)
            for rep in range(reps):
                for turns, runs in sizes.items():
                    progress(
                        f"per turn, {turns}-turn runs ×{runs}, "
                        f"repetition {rep + 1}/{reps}: Machina, LangGraph"
                    )
                    for label, (proc, target, storage) in engines.items():
                        await machina_batch(target, proc, storage, sides[label], turns, runs)
                    for agent, sync in LANGGRAPH:
                        await asyncio.to_thread(
                            langgraph_batch, agent, sync, sides[f"{agent} {sync}"], turns, runs
                        )
        finally:
            for proc, _, _ in engines.values():
                stop_engine(proc)
    progress("per turn in process (no gRPC; the no-op test tool, idempotent)")
    in_process = {n: summarize(await per_turn_ms(n, 5 if n == 10 else 1, warmup=True)) for n in (10, big)}
    return table(sides, sizes, in_process)


def table(
    sides: dict[str, Side], sizes: dict[int, int], in_process: dict[int, dict[str, float]]
) -> list[Row]:
    small, big = min(sizes), max(sizes)
    off, on = sides["fsync off"], sides["fsync on"]
    lg_off, lg_on = sides["create_agent off"], sides["create_agent default"]
    out: list[Row] = []
    for turns in (small, big):
        for label, limit in (("fsync off", 1.0), ("fsync on", 2.0)):
            s = sides[label].per_turn(turns)
            g = sides[label].growth_per_turn(turns)
            out.append(row(
                f"Machina per turn through gRPC, Edit tool, creating the run left out, "
                f"{turns:,} turns, {label}",
                f"{ms(g, 3, 'range')}; with it {s['median']:.3f} ms",
                {"p50_ms": g["median"], "with_creation_p50_ms": s["median"]},
                at_most("p50_ms", limit, f"p50 ≤ {limit:g} ms"),
                {"per_turn_ms": s, "growth_per_turn_ms": g},
            ))  # fmt: skip
    for label in ("fsync off", "fsync on"):
        a, b = sides[label].growth_per_turn(small), sides[label].growth_per_turn(big)
        ratio = b["median"] / a["median"] if a["median"] > 0 else float("nan")
        out.append(row(
            f"per-turn growth {big:,} ÷ {small} turns, without creating the run, {label}",
            f"{ratio:.2f}× ({b['median']:.3f} ÷ {a['median']:.3f} ms)",
            {"ratio": ratio}, at_most("ratio", 1.2, "≤ 1.2×"),
        ))  # fmt: skip
    for turns in (small, big):
        for agent in ("create_agent", "prebuilt"):
            d, o = sides[f"{agent} default"].per_turn(turns), sides[f"{agent} off"].per_turn(turns)
            what = "create_agent" if agent == "create_agent" else "prebuilt create_react_agent"
            out.append(row(
                f"LangGraph {what} per turn, {turns:,}-turn run (SqliteSaver)",
                f"default sync {ms(d, 2, 'range')}; synchronous=OFF {ms(o, 2, 'range')}",
                {"default_p50_ms": d["median"], "sync_off_p50_ms": o["median"]},
                None,
                {"default_sync": d, "sync_off": o, "pragmas": sides[f"{agent} default"].extra.get("pragmas")},
            ))  # fmt: skip
    targets = {(small, "off"): 0.2, (small, "on"): 0.3, (big, "off"): 0.05, (big, "on"): 0.03}
    for turns in (small, big):
        for durable, ours, theirs in (("off", off, lg_off), ("on", on, lg_on)):
            ratios = summarize(
                _paired_ratios(ours.growth_samples(turns), theirs.growth_samples(turns), sizes[turns], turns)
            )
            limit = targets[(turns, durable)]
            how = "no fsync on either side" if durable == "off" else "fsync on both sides"
            out.append(row(
                f"Machina ÷ LangGraph create_agent per turn, creating the run left out, "
                f"{turns:,} turns, {how}",
                ratio_text(ratios) + (" per repetition" if ratios["n"] > 1 else ""),
                {"ratio": ratios["median"]}, at_most("ratio", limit, f"≤ {limit:g}×"), {"ratios": ratios},
            ))  # fmt: skip
    ours_rss, theirs_rss = off.rss.get(big, {}), lg_off.rss.get(big, {})
    peak_ours, peak_theirs = (
        ours_rss.get("peak_rss_mb", float("nan")),
        theirs_rss.get("peak_rss_mb", float("nan")),
    )
    out.append(row(
        f"peak RSS after {big:,}-turn runs: engine process vs LangGraph create_agent process",
        f"{peak_ours:.0f} MB vs {peak_theirs:.0f} MB",
        {"ours_mb": peak_ours, "langgraph_mb": peak_theirs, "ratio": peak_ours / peak_theirs},
        Target("lower", (Check("ratio", "<", 1.0),)),
    ))  # fmt: skip
    ours_b, theirs_b = off.storage_bytes.get(big, 0), lg_on.storage_bytes.get(big, 0)
    out.append(row(
        f"bytes stored by one {big:,}-turn run, Machina vs LangGraph create_agent",
        f"{ours_b / 1e6:.2f} MB vs {theirs_b / 1e6:,.1f} MB",
        {"ours_bytes": ours_b, "langgraph_bytes": theirs_b},
    ))  # fmt: skip
    for turns, s in in_process.items():
        out.append(row(
            f"engine per turn in process (no gRPC, idempotent no-op test tool), {turns:,}-turn run",
            ms(s, 3), {"p50_ms": s["median"]}, None, {"per_turn_ms": s},
        ))  # fmt: skip
    return out
